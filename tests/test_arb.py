"""ARB-LLM (arb-x, arb-rc) and OneBit (onebit-svid): the alternating updates, the rank-1 factors, the
stb.row-col-sign.v1 codec (Python writer and reader against the C++ reader and runtime), runtime vs oracle on tiny
models, and malformed row-col-sign files."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from stbllm_convert import arb  # noqa: E402
from stbllm_convert import binarize as B  # noqa: E402
from stbllm_convert.calibrate import CalibrationOptions  # noqa: E402
from stbllm_convert.convert import convert  # noqa: E402
from stbllm_convert.errors import ConvertError  # noqa: E402
from stbllm_convert.methods import make_method  # noqa: E402
from stbllm_rt import FormatError, Model, StbReader, StbWriter, rowcol  # noqa: E402

from conftest import CORPUS  # noqa: E402
from test_calibrate import _correlated_layer  # noqa: E402
from test_format import _tamper  # noqa: E402
from test_oracle import assert_logits_close, oracle_logits  # noqa: E402



@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """These tests run many small tensor operations: on 2 shared cores a second intra-op thread made them up to 50x
    slower (measured), so this module runs torch on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _block(seed=0, rows=48, cols=128):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((rows, cols), generator=gen) * (0.2 + torch.rand((1, cols), generator=gen) * 2)
    x = x * (0.5 + torch.rand((rows, 1), generator=gen))
    mask = torch.rand((rows, cols), generator=gen) > 0.25
    inputs = torch.randn((512, cols), generator=gen) * (0.3 + torch.rand(cols, generator=gen)) + torch.randn(cols)
    return x, mask, inputs.t() @ inputs / 512


def _never_increases(history):
    return all(b <= a * (1 + 1e-5) + 1e-6 for a, b in zip(history, history[1:]))


# ---- the alternating updates -----------------------------------------------------------------------------------

@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("seed", [0, 1])
def test_arb_updates_never_increase_the_error(order, seed):
    x, mask, gram = _block(seed)
    history = []
    q, alphas, mus, signs = arb.arb_binarize(x, mask, order, gram=gram, round_f16=False, history=history)
    weight_space, s_weighted = history[:arb.ARB_ITERS], history[arb.ARB_ITERS:]
    assert _never_increases(weight_space) and _never_increases(s_weighted)
    # ARB refines BiLLM's binarizer, its starting point: measured 5-6 % (order 1) and 29-32 % (order 2) less error.
    billm = B.binarize(x, mask, order, round_f16=False)[0]
    plain = arb.arb_binarize(x, mask, order, round_f16=False)[0]
    sse = lambda q: float(((x * mask - q) ** 2).sum())  # noqa: E731
    assert sse(plain) < (0.97 if order == 1 else 0.8) * sse(billm)
    # ARB-X trades weight-space error for the S-weighted error it optimizes
    s_err = lambda q: float((((x * mask - q) @ gram) * (x * mask - q)).sum())  # noqa: E731
    assert s_err(q) < s_err(plain)
    assert (q[~mask] == 0).all() and (signs & ~mask[None]).sum() == 0 and (mus[:, 1:] == 0).all()


def test_arb_output_is_what_binary_groups_stores():
    """fp16 alpha / mu and q computed with the codec's formulas: the file reproduces q exactly."""
    x, mask, gram = _block(2)
    for order in (1, 2):
        q, alphas, mus, signs = arb.arb_binarize(x, mask, order, gram=gram)
        assert torch.equal(alphas, alphas.half().float()) and torch.equal(mus, mus.half().float())
        pm = lambda s: torch.where(s, 1.0, -1.0)  # noqa: E731
        expect = alphas[:, :1] * pm(signs[0]) + mus[:, :1]
        if order == 2:
            expect = expect + (alphas[:, 1:] * pm(signs[1]) + mus[:, 1:])
        assert torch.equal(q, torch.where(mask, expect, 0.0))


def test_rowcol_updates_never_increase_the_error_and_beat_plain_sign():
    x, mask, _ = _block(3)
    salient = torch.zeros(x.shape[1], dtype=torch.bool)
    salient[[5, 40, 99]] = True
    history = []
    q = arb.rowcol_binarize(x, mask, salient, round_f16=False, history=history)[0]
    assert _never_increases(history)
    sign = torch.where(mask, x.sign() * (x.abs() * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True), 0.0)
    sse = lambda q: float(((x * mask - q) ** 2).sum())  # noqa: E731
    assert sse(q) < 0.8 * sse(sign) and (q[~mask] == 0).all()


@pytest.mark.parametrize("solver", ["power", "nmf"])
def test_rank1_factors_are_nonnegative_and_beat_plain_sign(solver):
    w, _, _ = _correlated_layer(rows=64, cols=192)
    w = w * (0.2 + torch.rand(64, 1)) * (0.2 + torch.rand(1, 192))
    a, b = arb.rank1_nonnegative(w.abs(), solver)
    assert (a >= 0).all() and (b >= 0).all() and abs(float(b.mean()) - 1) < 1e-4
    svid = float(((w - w.sign() * torch.outer(a, b)) ** 2).sum())
    sign = float(((w - w.sign() * w.abs().mean(1, keepdim=True)) ** 2).sum())
    best = torch.linalg.svdvals(w.abs().double())
    optimum = float((best[1:] ** 2).sum())  # Eckart-Young: the error of the best rank-1 approximation of |W|
    assert svid < 0.95 * sign and svid <= optimum * 1.001


def test_rowcol_obc_keeps_pruned_weights_zero_and_lowers_output_error():
    w, x, h = _correlated_layer()
    keep = torch.from_numpy(B.nm_keep(w.abs().numpy(), 6, 8))
    u = B.inverse_hessian_factor(h, w.clone())
    plain = arb.quantize_rowcol(w, u, keep, compensate=False).q
    result = arb.quantize_rowcol(w, u, keep)
    err = lambda q: float(((x @ (w - q).t()) ** 2).mean())  # noqa: E731
    assert err(result.q) < 0.97 * err(plain)
    assert (result.q[~keep] == 0).all() and (result.q[keep] != 0).float().mean() > 0.99


# ---- the codec -------------------------------------------------------------------------------------------------

SCALE_KEYS = ("row_scales", "col_scales", "residual_row_scales", "residual_col_scales")


def _random_rowcol(rows=40, cols=200, block=64, nm=(6, 8), salient_count=7, seed=0, groups=1):
    rng = np.random.default_rng(seed)
    blocks = -(-cols // block)
    keep = None if nm is None else B.nm_keep(rng.random((rows, cols)), *nm)
    salient = np.zeros(cols, dtype=bool)
    salient[rng.choice(cols, salient_count, replace=False)] = True

    def scales():
        return dict(row_scales=rng.random((rows, blocks)).astype(np.float16),
                    col_scales=(rng.random(cols) + 0.5).astype(np.float16),
                    residual_row_scales=rng.random((rows, blocks)).astype(np.float16),
                    residual_col_scales=rng.random(salient_count).astype(np.float16))
    t = dict(signs=rng.random((rows, cols)) < 0.5, block=block, mask=keep, nm=nm, salient=salient,
             residual=rng.random((rows, salient_count)) < 0.5, **scales())
    if groups == 2:
        high = rng.random((rows, cols)) < 0.3
        t.update(group=high if keep is None else high & keep, group1=scales())
    return t


def _reference_dequantize(t):
    """numpy float32 reference of the format's formula, from the writer's inputs."""
    one = np.float32(1)
    cols = t["signs"].shape[1]
    column_block = np.arange(cols) // t["block"]
    j = np.flatnonzero(t["salient"])

    def value(scales):
        w = (scales["row_scales"].astype(np.float32)[:, column_block] * np.where(t["signs"], one, -one)) \
            * scales["col_scales"].astype(np.float32)[None]
        w[:, j] += (scales["residual_row_scales"].astype(np.float32)[:, column_block[j]]
                    * np.where(t["residual"], one, -one)) * scales["residual_col_scales"].astype(np.float32)[None]
        return w
    w = value(t)
    if t.get("group") is not None:
        w = np.where(t["group"], value(t["group1"]), w)
    return w if t["mask"] is None else np.where(t["mask"], w, np.float32(0))


def _write(path, tensors):
    w = StbWriter({"architecture": "llama"})
    for name, t in tensors.items():
        w.add_row_col_sign(name, **t)
    w.write(path)
    return path


@pytest.mark.parametrize("nm, salient_count", [(None, 0), (None, 5), ((6, 8), 7), ((4, 8), 70)])
def test_rowcol_round_trip_is_exact(tmp_path, nm, salient_count):
    t = _random_rowcol(nm=nm, salient_count=salient_count)
    if salient_count == 0:
        for k in ("salient", "residual", "residual_row_scales", "residual_col_scales"):
            t[k] = None
    reader = StbReader(_write(tmp_path / "rc.stb", {"blk.0.attn_q.weight": t}))  # the C++ reader validated it
    got = reader.dequantize("blk.0.attn_q.weight")
    if salient_count == 0:
        t.update(salient=np.zeros(200, bool), residual=np.zeros((40, 0), bool),
                 residual_row_scales=np.zeros((40, 4), np.float16), residual_col_scales=np.zeros(0, np.float16))
    np.testing.assert_array_equal(got, _reference_dequantize(t))
    info = reader.tensor_info("blk.0.attn_q.weight")
    assert "groups" not in info["params"] and not any(k.startswith("group") for k in info["components"])
    bits = reader.metadata["provenance"]["bits"]
    kept = 40 * 200 if nm is None else int(t["mask"].sum())
    kept_salient = 40 * salient_count if nm is None else int(t["mask"][:, t["salient"]].sum())
    assert bits["paper_bits_per_weight"] == round((kept + kept_salient) / 8000, 4)


@pytest.mark.parametrize("nm, salient_count, groups", [(None, 0, 1), ((6, 8), 9, 1), (None, 0, 2), ((6, 8), 9, 2)])
def test_rowcol_runtime_matmul_matches_the_formula(tmp_path, nm, salient_count, groups):
    """The runtime (column scale folded into int8 activations + sign kernels + float salient plane, per scale
    group) on a whole model layer vs the dequantized matrix: agreement to the int8 activation rounding."""
    from stbllm_convert.oracle import quantize_activations_q8

    t = _random_rowcol(rows=64, cols=128, block=64, nm=nm, salient_count=salient_count, seed=4, groups=groups)
    if salient_count == 0:
        for k in ("salient", "residual", "residual_row_scales", "residual_col_scales"):
            t[k] = None
    reader = StbReader(_write(tmp_path / "rc.stb", {"blk.0.attn_q.weight": t}))
    info = reader.tensor_info("blk.0.attn_q.weight")
    mains, sal = rowcol.runtime_parts(lambda k: reader.component("blk.0.attn_q.weight", k), info["shape"],
                                      info["params"])
    assert len(mains) == groups
    x = torch.randn(3, 128)
    mirrored = x @ torch.from_numpy(sal).t()
    for main, col_scales in mains:
        mirrored = mirrored + quantize_activations_q8(x * torch.from_numpy(col_scales)) @ torch.from_numpy(main).t()
    exact = x @ torch.from_numpy(reader.dequantize("blk.0.attn_q.weight")).t()
    assert float((mirrored - exact).abs().max()) < 0.05 * float(exact.abs().max())


# ---- conversions on tiny models, runtime vs oracle ---------------------------------------------------------------

@pytest.fixture(scope="module")
def converted(tmp_path_factory, tiny_hf_models):
    root = tmp_path_factory.mktemp("arb")
    text = root / "calib.txt"
    text.write_text("\n".join(CORPUS * 3))
    cache = {}

    def make(arch, method, nm=None, calibrate=True, **options):
        key = (arch, method, nm, tuple(sorted(options.items())))
        if key not in cache:
            out = root / f"{arch}-{method}-{str(nm).replace(':', 'of')}-{len(cache)}.stb"
            calibration = CalibrationOptions(texts=[text], samples=4, seqlen=32) if calibrate else None
            convert(tiny_hf_models[arch], out, method=method, nm=nm, progress=False, calibration=calibration,
                    **options)
            cache[key] = out
        return cache[key]

    return make


@pytest.mark.parametrize("arch, method, nm", [
    ("llama", "arb-x", None), ("opt", "arb-x", "6:8"), ("llama", "arb-rc", None), ("mistral", "arb-rc", "6:8"),
    ("llama", "onebit-svid", None), ("opt", "onebit-svid", None)])
def test_new_methods_match_oracle(converted, arch, method, nm):
    path = converted(arch, method, nm, calibrate=method != "onebit-svid")
    ids = list(np.random.default_rng(1).integers(4, 300, size=40))
    assert_logits_close(Model(path, threads=2, kv_cache="f32").logits(ids), oracle_logits(path, ids), "sign")


# ---- ARB's column-group bitmap (arb-x --cgb) ------------------------------------------------------------------------

def _without_and_with_cgb(method, nm, seed):
    """A correlated layer quantized by `method` without and with --cgb: the two layer output errors, the two
    results, and the N:M keep-mask (None when dense)."""
    w, x, h = _correlated_layer(rows=64, cols=384, tokens=1024, seed=seed)
    keep = None if nm is None else torch.from_numpy(B.nm_keep(w.abs().numpy(), *nm))
    u = B.inverse_hessian_factor(h, w.clone())
    results = [make_method(method, nm=nm, cgb=cgb).quantize(w, u, keep, h) for cgb in (False, True)]
    return [float(((x @ (w - r.q).t()) ** 2).mean()) for r in results], results, keep


@pytest.mark.parametrize("nm", [None, (6, 8)])
@pytest.mark.parametrize("seed", [0, 1])
def test_cgb_lowers_the_layer_output_error(nm, seed):
    """Two salient groups per block (each with its own order-2 params) where they beat one: the layer's output
    error on correlated inputs is never higher than arb-x's without them (measured: 0.80-0.95 of it)."""
    errors, results, keep = _without_and_with_cgb("arb-x", nm, seed)
    for result in results:
        if keep is not None:
            assert (result.q[~keep] == 0).all()
    assert result.stats["salient_split_blocks"] > 0 and result.salient_labels.any()
    assert not (result.salient_labels & ~result.salient[None]).any()  # only salient weights have a group
    assert errors[1] <= errors[0]


def test_salient_split_search_beats_one_group_on_mixed_magnitudes():
    """Salient weights drawn from two magnitude scales: a break point among their magnitudes beats one group; inf
    (one group) for weights of one magnitude, where no split helps, and for an empty mask."""
    gen = torch.Generator().manual_seed(0)
    signs = torch.where(torch.rand((32, 40), generator=gen) < 0.5, -1.0, 1.0)
    big = torch.rand((32, 40), generator=gen) < 0.3
    x = signs * torch.where(big, 1.0, 0.1) * (1 + 0.05 * torch.rand((32, 40), generator=gen))
    mask = torch.rand((32, 40), generator=gen) < 0.9
    p = B.search_salient_split(x, mask)
    assert 0.1 <= p <= 1.05
    assert B.search_salient_split(torch.ones((4, 8)), torch.ones((4, 8), dtype=torch.bool)) == float("inf")
    assert B.search_salient_split(x, torch.zeros_like(mask)) == float("inf")


def test_cgb_tiny_model_matches_oracle_and_stores_two_groups(converted):
    """arb-x --cgb through the converter, the C++ reader and decoder and the runtime: logits against the oracle
    (which dequantizes with the Python decoder); the files record the split."""
    for arch, nm in (("llama", None), ("opt", "6:8")):
        path = converted(arch, "arb-x", nm, cgb=True)
        ids = list(np.random.default_rng(2).integers(4, 300, size=40))
        assert_logits_close(Model(path, threads=2, kv_cache="f32").logits(ids), oracle_logits(path, ids), "sign")
        reader = StbReader(path)
        assert reader.metadata["provenance"]["salient_groups"].startswith("CGB")
        infos = [reader.tensor_info(n) for n in reader.tensor_names()]
        groups = [i for i in infos if i["codec"] == "stb.binary-groups.v2"]
        assert groups and all(i["params"]["salient_groups"] == 2 for i in groups)
        assert any("salient_labels" in i["components"] for i in groups)


def test_runtime_refuses_set_padding_in_the_group_stream(converted, tmp_path):
    source = converted("opt", "arb-x", "6:8", cgb=True)  # N:M: kept_salient need not be a multiple of 8
    reader = StbReader(source)
    name = next(n for n in reader.tensor_names() if "salient_labels" in reader.tensor_info(n)["components"]
                and reader.tensor_info(n)["params"]["kept_salient"] % 8)
    path = tmp_path / "bad.stb"
    path.write_bytes(source.read_bytes())

    def set_last_bit(entry, data):
        c = entry["components"]["salient_labels"]
        data[c["offset"] + c["length"] - 1] |= 0x80
    with pytest.raises(FormatError, match="salient_labels stream has non-zero padding"):
        Model(_tamper(path, name, set_last_bit))


def test_cgb_only_for_arb_methods(tiny_hf_models, tmp_path):
    for method in ("billm", "sign"):
        with pytest.raises(ConvertError, match="--cgb needs arb-x or arb-rc"):
            convert(tiny_hf_models["llama"], tmp_path / "x.stb", method=method, cgb=True, progress=False)


def test_arb_files_record_their_method_and_keep_pruned_weights_zero(converted):
    for method, codec in (("arb-x", "stb.binary-groups.v2"), ("arb-rc", "stb.row-col-sign.v1")):
        reader = StbReader(converted("llama", method, "6:8"))
        prov = reader.metadata["provenance"]
        assert prov["method"] == method and prov["arb_iters"] == 15 and prov["nm"] == [6, 8]
        info = reader.tensor_info("blk.0.ffn_up.weight")
        assert info["codec"] == codec
        values = reader.dequantize("blk.0.ffn_up.weight")
        rows, cols = values.shape
        assert ((values != 0).reshape(rows, cols // 8, 8).sum(2) == 6).all()


def test_onebit_file_is_one_sign_bit_plus_two_vectors(converted, tiny_hf_models):
    reader = StbReader(converted("llama", "onebit-svid", None, calibrate=False))
    info = reader.tensor_info("blk.0.ffn_down.weight")
    rows, cols = info["shape"]
    stored = sum(c["length"] for c in info["components"].values())
    assert info["codec"] == "stb.row-col-sign.v1" and info["params"]["salient_columns"] == 0
    assert stored == rows * -(-cols // 64) * 8 + 2 * rows + 2 * cols
    assert reader.metadata["provenance"]["bits"]["paper_bits_per_weight"] == 1.0


def test_method_option_errors(tiny_hf_models, tmp_path):
    with pytest.raises(ConvertError, match="--arb-iters"):
        convert(tiny_hf_models["llama"], tmp_path / "x.stb", method="arb-x", arb_iters=-1, progress=False)
    with pytest.raises(ConvertError, match="--nm"):
        convert(tiny_hf_models["llama"], tmp_path / "x.stb", method="onebit-svid", nm="6:8", progress=False)
    with pytest.raises(ConvertError, match="--kd-steps needs onebit-svid, not sign"):
        convert(tiny_hf_models["llama"], tmp_path / "x.stb", method="sign", kd_steps=3, progress=False)


# ---- malformed row-col-sign files --------------------------------------------------------------------------------

def _set_bit(component, bit):
    def change(entry, data):
        data[entry["components"][component]["offset"] + bit // 8] |= 1 << (bit % 8)
    return change


@pytest.mark.parametrize("change, message", [
    (lambda e, d: e["params"].update(salient_columns=6), "need"),
    (lambda e, d: e["params"].update(extra=1), "unknown param 'extra'"),
    (lambda e, d: e["components"].pop("col_scales"), "needs"),
    (lambda e, d: e["params"].update(block=96), "multiple of 64"),
    (_set_bit("signs", 200 + 3), "bits set past the last column"),
    (_set_bit("salient", 201), "salient bitmap has bits set past the last column"),
    (_set_bit("residual", 7 + 5), "past its salient columns"),
])
def test_malformed_rowcol_files_are_refused(tmp_path, change, message):
    path = _write(tmp_path / "rc.stb", {"blk.0.attn_q.weight": _random_rowcol()})
    with pytest.raises(FormatError, match=message):
        StbReader(_tamper(path, "blk.0.attn_q.weight", change))


def test_pruned_weight_with_a_sign_or_residual_bit_is_refused(tmp_path):
    t = _random_rowcol()
    path = _write(tmp_path / "rc.stb", {"blk.0.attn_q.weight": t})
    pruned = int(np.flatnonzero(~t["mask"][0])[0])
    with pytest.raises(FormatError, match="pruned weight in row 0 has its sign bit set"):
        StbReader(_tamper(path, "blk.0.attn_q.weight", _set_bit("signs", pruned)))
    salient = np.flatnonzero(t["salient"])
    k = int(np.flatnonzero(~t["mask"][0, salient])[0])
    path = _write(tmp_path / "rc2.stb", {"blk.0.attn_q.weight": t})
    with pytest.raises(FormatError, match="pruned weight in row 0 has its residual sign bit set"):
        StbReader(_tamper(path, "blk.0.attn_q.weight", _set_bit("residual", k)))


def test_short_distillation_lowers_its_loss_and_the_file_matches_oracle(tiny_hf_models, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text("\n".join(CORPUS * 3))
    out = tmp_path / "kd.stb"
    convert(tiny_hf_models["llama"], out, method="onebit-svid", kd_steps=8, kd_lr=2e-3, progress=False,
            calibration=CalibrationOptions(texts=[text], samples=1, seqlen=32))
    prov = StbReader(out).metadata["provenance"]
    assert prov["kd_steps"] == 8 and prov["kd"]["steps"] == 8
    assert prov["kd"]["loss_last"] < 0.9 * prov["kd"]["loss_first"]  # one window, learned
    ids = list(np.random.default_rng(2).integers(4, 300, size=24))
    assert_logits_close(Model(out, threads=2, kv_cache="f32").logits(ids), oracle_logits(out, ids), "sign")


# ---- ARB-RC with the column-group bitmap (arb-rc --cgb) --------------------------------------------------------

@pytest.mark.parametrize("nm", [None, (6, 8)])
@pytest.mark.parametrize("seed", [0, 1])
def test_rowcol_cgb_lowers_the_layer_output_error(nm, seed):
    """Two scale groups per block (high / low magnitude, each with its own row and column scales) against one: the
    layer's output error on correlated inputs (measured: 0.39-0.49 of it without the groups)."""
    errors, results, keep = _without_and_with_cgb("arb-rc", nm, seed)
    for result in results:
        if keep is not None:
            assert (result.q[~keep] == 0).all() and not (result.group is not None and (result.group & ~keep).any())
    assert result.stats["group_split_blocks"] > 0 and 0 < result.stats["high_group_fraction"] < 0.5
    assert errors[1] < 0.7 * errors[0]


def test_rowcol_cgb_groups_refine_without_increasing_the_error():
    """Each group's alternating updates never increase its error, and the searched groups cover salient and
    non-salient weights (the four parts salient-high, salient-low, rest-high, rest-low)."""
    x, mask, _ = _block(5)
    salient = torch.zeros(x.shape[1], dtype=torch.bool)
    salient[[3, 17, 64, 90, 101]] = True
    high = arb.rowcol_high_group(x, x * x, mask, salient)
    assert not (high & ~mask).any()
    for part in (high & salient[None], high & ~salient[None], mask & ~high & salient[None]):
        assert part.any()
    for group in (mask & ~high, high):
        history = []
        arb.rowcol_binarize(x, group, salient, round_f16=False, history=history)
        assert _never_increases(history) and history[-1] < history[0]


def test_rowcol_groups_round_trip_is_exact(tmp_path):
    for nm, salient_count in ((None, 5), ((6, 8), 7), ((4, 8), 0)):
        t = _random_rowcol(nm=nm, salient_count=salient_count, groups=2)
        if salient_count == 0:
            for k in ("salient", "residual", "residual_row_scales", "residual_col_scales"):
                t[k] = t["group1"][k] = None
        reader = StbReader(_write(tmp_path / "rcg.stb", {"blk.0.attn_q.weight": t}))  # validated by the C++ reader
        info = reader.tensor_info("blk.0.attn_q.weight")
        assert info["params"]["groups"] == 2 and "group1_col_scales" in info["components"]
        if salient_count == 0:
            t.update(salient=np.zeros(200, bool), residual=np.zeros((40, 0), bool))
            for scales in (t, t["group1"]):
                scales.update(residual_row_scales=np.zeros((40, 4), np.float16),
                              residual_col_scales=np.zeros(0, np.float16))
        np.testing.assert_array_equal(reader.dequantize("blk.0.attn_q.weight"), _reference_dequantize(t))


def test_rowcol_cgb_tiny_models_match_oracle_and_store_two_groups(converted):
    """arb-rc --cgb through the converter, the C++ reader and the runtime (two passes of the sign kernels): logits
    against the oracle, which runs each group's plane on its own int8-quantized scaled input."""
    for arch, nm in (("llama", None), ("mistral", "6:8")):
        path = converted(arch, "arb-rc", nm, cgb=True)
        ids = list(np.random.default_rng(3).integers(4, 300, size=40))
        assert_logits_close(Model(path, threads=2, kv_cache="f32").logits(ids), oracle_logits(path, ids), "sign")
        reader = StbReader(path)
        prov = reader.metadata["provenance"]
        assert prov["method"] == "arb-rc" and prov["scale_groups"].startswith("CGB")
        infos = [reader.tensor_info(n) for n in reader.tensor_names()]
        rowcols = [i for i in infos if i["codec"] == "stb.row-col-sign.v1"]
        assert rowcols and all(i["params"]["groups"] == 2 for i in rowcols)
        assert prov["bits"]["groups"]["labels"]["bits_per_weight"] == pytest.approx(1.0, abs=0.05)


@pytest.mark.parametrize("change, message", [
    (lambda e, d: e["params"].update(groups=3), "groups"),
    (lambda e, d: e["components"].pop("group1_row_scales"), "needs"),
    (_set_bit("group", 200 + 3), "bits set past the last column"),
])
def test_malformed_rowcol_group_files_are_refused(tmp_path, change, message):
    path = _write(tmp_path / "rcg.stb", {"blk.0.attn_q.weight": _random_rowcol(groups=2)})
    with pytest.raises(FormatError, match=message):
        StbReader(_tamper(path, "blk.0.attn_q.weight", change))


def test_pruned_weight_with_a_group_bit_is_refused(tmp_path):
    t = _random_rowcol(groups=2)
    path = _write(tmp_path / "rcg.stb", {"blk.0.attn_q.weight": t})
    pruned = int(np.flatnonzero(~t["mask"][0])[0])
    with pytest.raises(FormatError, match="pruned weight in row 0 has its group bit set"):
        StbReader(_tamper(path, "blk.0.attn_q.weight", _set_bit("group", pruned)))
