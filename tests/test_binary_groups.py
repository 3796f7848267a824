"""stb.binary-groups.v2: the compact streams (N:M colex codes, kept-only signs, base-3 labels) round-trip bit-exactly
through the Python writer, the C++ validator, the Python reader and the runtime's decoder; malformed streams are
refused with a clear error; the stored bits are what the data needs."""
import itertools
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from stbllm_convert import binarize as B  # noqa: E402
from stbllm_convert.calibrate import CalibrationOptions  # noqa: E402
from stbllm_convert.convert import convert  # noqa: E402
from stbllm_convert.methods import make_method  # noqa: E402
from stbllm_rt import FormatError, Model, StbReader, StbWriter, binary_groups  # noqa: E402

from conftest import CORPUS  # noqa: E402
from test_calibrate import _correlated_layer  # noqa: E402
from test_format import _metadata, _rebuild, _set_half, _split, _tamper_component  # noqa: E402
from test_oracle import assert_logits_close, oracle_logits  # noqa: E402

NAME = "blk.0.attn_q.weight"


@pytest.mark.parametrize("m, n", [(8, 6), (8, 4), (8, 1), (8, 8), (5, 3), (16, 7), (64, 32)])
def test_colex_codes_are_a_bijection(m, n):
    subsets = list(itertools.islice(itertools.combinations(range(m), n), 5000))
    keep = np.zeros((len(subsets), m), dtype=bool)
    for i, c in enumerate(subsets):
        keep[i, list(c)] = True
    ranks = binary_groups._colex_rank(keep)
    assert len(set(ranks.tolist())) == len(subsets) and int(ranks.max()) < math.comb(m, n)
    np.testing.assert_array_equal(binary_groups._colex_unrank(ranks, m, n), keep)


def _random_planes(rng, rows, cols, regions, nm, block=128, salient_fraction=0.05, salient_groups=1):
    keep = None if nm is None else B.nm_keep(rng.random((rows, cols)), *nm)
    salient = rng.random(cols) < salient_fraction
    params = rng.standard_normal((rows, -(-cols // block), 2 * regions + 4 * salient_groups)).astype(np.float16)
    planes = dict(signs=rng.random((rows, cols)) < 0.5,
                  labels=rng.integers(0, regions, (rows, cols)).astype(np.uint8), salient=salient,
                  residual=rng.random((rows, cols)) < 0.5, params=params, regions=regions, block=block, mask=keep,
                  nm=nm)
    if salient_groups == 2:
        planes["salient_labels"] = rng.random((rows, cols)) < 0.5
    return planes


def _reference(planes):
    """The dequantization rule of docs/format.md, written directly on the planes."""
    p = planes["params"].astype(np.float32)
    rows, cols = planes["signs"].shape
    per_col = np.repeat(p, planes["block"], axis=1)[:, :cols]
    s = np.where(planes["signs"], 1, -1).astype(np.float32)
    t = np.where(planes["residual"], 1, -1).astype(np.float32)
    g = planes["labels"].astype(np.int64)
    r = 2 * planes["regions"] + 4 * planes.get("salient_labels", np.zeros((rows, cols), bool)).astype(np.int64)
    pick = lambda k: np.take_along_axis(per_col, k[..., None], axis=2)[..., 0]  # noqa: E731
    values = pick(2 * g) * s + pick(2 * g + 1)
    salient_values = (pick(r) * s + pick(r + 1)) + (pick(r + 2) * t + pick(r + 3))
    values = np.where(planes["salient"][None, :], salient_values, values)
    return values if planes["mask"] is None else np.where(planes["mask"], values, np.float32(0))


@pytest.mark.parametrize("regions, nm, cols", [(3, (6, 8), 576), (3, (5, 8), 203), (2, (4, 8), 64), (2, None, 130),
                                                (1, (8, 8), 72), (3, (3, 7), 100), (3, None, 64)])
def test_random_planes_round_trip(tmp_path, regions, nm, cols):
    planes = _random_planes(np.random.default_rng(cols), 9, cols, regions, nm)
    writer = StbWriter(_metadata())
    writer.add_binary_groups(NAME, **planes)
    writer.write(tmp_path / "g.stb")
    reader = StbReader(tmp_path / "g.stb")
    np.testing.assert_array_equal(reader.dequantize(NAME), _reference(planes))
    kept = 9 * cols if nm is None else int(planes["mask"].sum())
    assert len(reader.component(NAME, "signs")) == -(-kept // 8)  # one sign bit per kept weight


def _groups_file(tmp_path, regions=3, nm=(5, 8), cols=200, rows=24):
    w, _, h = _correlated_layer(rows, cols, tokens=512, seed=regions)
    keep = None if nm is None else torch.from_numpy(B.nm_keep(w.abs().numpy(), *nm))
    result = B.quantize_groups(w, B.inverse_hessian_factor(h, w.clone()), keep, regions)
    writer = StbWriter(_metadata())
    make_method("stbllm" if regions == 3 else "billm", nm=nm).write(writer, NAME, result, nm)
    path = tmp_path / f"groups-{regions}-{cols}.stb"
    writer.write(path)
    return path, result


@pytest.mark.parametrize("regions, nm, cols", [(3, (5, 8), 200), (2, None, 576), (2, (4, 8), 64), (1, None, 130)])
def test_quantizer_output_round_trips_bit_exactly(tmp_path, regions, nm, cols):
    path, result = _groups_file(tmp_path, regions, nm, cols)
    reader = StbReader(path)
    got = reader.dequantize(NAME)
    np.testing.assert_array_equal(got, result.q.numpy())
    assert reader.tensor_info(NAME)["params"]["salient_columns"] == int(result.salient.sum()) > 0
    if nm is not None:
        assert (got[~result.keep.numpy()] == 0).all()
    bits = reader.metadata["provenance"]["bits"]["groups"]
    assert {"signs", "salient_bitmap", "residual_signs", "scales"} <= set(bits)
    assert ("labels" in bits) == (regions > 1) and ("masks" in bits) == (nm is not None)


@pytest.mark.parametrize("coder", ["rans", None])
def test_stored_bits_are_what_the_data_needs(tmp_path, coder):
    """6:8 with three regions: 5-bit mask codes per group of 8, 6 sign bits; labels of kept non-salient weights at
    1.6 bits each fixed-width, or their order-0 entropy (+ at most the 10-byte header) rANS-coded."""
    rng = np.random.default_rng(0)
    planes = _random_planes(rng, 64, 1024, 3, (6, 8))
    planes["labels"] = rng.choice(3, size=planes["labels"].shape, p=[0.7, 0.2, 0.1]).astype(np.uint8)
    writer = StbWriter(_metadata())
    writer.add_binary_groups(NAME, **planes, label_coder=coder)
    report = writer.bit_report()["groups"]
    assert report["masks"]["bits_per_weight"] == 5 / 8
    assert report["signs"]["bits_per_weight"] == 6 / 8
    plain = planes["labels"][planes["mask"] & ~planes["salient"][None]]
    if coder is None:
        assert report["labels"]["bytes"] == -(-plain.size // 5)
    else:
        from stbllm_rt.entropy import order0_bits
        assert 0 < report["labels"]["bytes"] - order0_bits(plain) / 8 < 10 + 0.001 * plain.size


def _set_bit(index):
    def edit(buf):
        buf[index // 8] |= 1 << (index % 8)
    return edit


@pytest.mark.parametrize("case, match", [
    ("regions", "regions"), ("salient_count", "salient"), ("unknown_param", "unknown param"),
    ("params_length", "need"), ("missing_labels", "components"), ("kept_salient", "kept_salient"),
    ("salient_past_end", "past the last column"), ("salient_popcount", "salient bitmap has"),
    ("param_nan", "non-finite"), ("param_inf", "non-finite"),
])
def test_malformed_headers_are_rejected_at_open(tmp_path, case, match):
    path, result = _groups_file(tmp_path, 3, (5, 8), cols=203, rows=7)
    if case.startswith("param_"):  # an fp16 param (the 3rd) set to NaN / +inf
        _tamper_component(path, NAME, "params", lambda b: b.__setitem__(slice(4, 6), b"\x00\x7e" if case == "param_nan"
                                                                         else b"\x00\x7c"))
    elif case.startswith("salient_"):
        free = int((~result.salient).nonzero()[0][0])
        _tamper_component(path, NAME, "salient", _set_bit(205 if case == "salient_past_end" else free))
    else:
        raw, header, data_offset = _split(path)
        t = header["tensors"][NAME]
        {"regions": lambda: t["params"].update(regions=4),
         "salient_count": lambda: t["params"].update(salient_columns=t["params"]["salient_columns"] + 1),
         "unknown_param": lambda: t["params"].update(scale_dtype="f16"),
         "params_length": lambda: t["components"]["params"].update(length=t["components"]["params"]["length"] - 2),
         "missing_labels": lambda: t["components"].pop("labels"),
         "kept_salient": lambda: t["params"].update(kept_salient=7 * 203)}[case]()
        _rebuild(path, header, raw[data_offset:])
    with pytest.raises(FormatError, match=match):
        StbReader(path)


@pytest.fixture(scope="module")
def tiny_stbllm(tmp_path_factory, tiny_hf_models):
    """STBLLM 6:8 files of the tiny LLaMA: {label coder: path}."""
    root = tmp_path_factory.mktemp("codec")
    text = root / "calib.txt"
    text.write_text("\n".join(CORPUS * 3))
    paths = {}
    for coder in ("rans", "fixed"):
        paths[coder] = root / f"llama-stbllm-{coder}.stb"
        convert(tiny_hf_models["llama"], paths[coder], method="stbllm", nm="6:8", progress=False, label_coder=coder,
                calibration=CalibrationOptions(texts=[text], samples=2, seqlen=32))
    return paths


def test_label_coders_store_the_same_weights(tiny_stbllm):
    """The rANS labels are lossless: both files dequantize identically, and the rANS one is smaller."""
    rans, fixed = StbReader(tiny_stbllm["rans"]), StbReader(tiny_stbllm["fixed"])
    assert rans.tensor_info(NAME)["params"]["label_coder"] == "rans"
    assert "label_coder" not in fixed.tensor_info(NAME)["params"]
    for name in fixed.tensor_names():
        if fixed.tensor_info(name)["codec"] == binary_groups.CODEC:
            np.testing.assert_array_equal(rans.dequantize(name), fixed.dequantize(name))
    assert tiny_stbllm["rans"].stat().st_size < tiny_stbllm["fixed"].stat().st_size


@pytest.mark.parametrize("coder, case, match", [
    ("rans", "mask_code", "mask code out of range"), ("fixed", "label_digit", "not 5 base-3 digits"),
    ("fixed", "padding", "padding"), ("fixed", "kept_salient", "kept salient"),
    ("rans", "rans_frequencies", "rans frequencies sum"), ("rans", "rans_state", r"rans state \d+ is outside"),
    ("rans", "rans_body", "rans stream"),
])
def test_malformed_streams_are_refused_by_the_runtime(tiny_stbllm, tmp_path, coder, case, match):
    """Stream contents that lengths cannot express are checked when the runtime decodes them."""
    path = tmp_path / "bad.stb"
    path.write_bytes(tiny_stbllm[coder].read_bytes())
    Model(path)  # the untouched file loads
    info = StbReader(path).tensor_info(NAME)
    (n, m), rows, cols = info["params"]["nm"], *info["shape"]
    kept, kept_salient = rows * binary_groups.kept_per_row(cols, n, m), info["params"]["kept_salient"]
    if case == "mask_code":  # the largest code of its width is out of range unless C(m, n) is a power of two
        width = binary_groups.rank_width(m, n)
        assert math.comb(m, n) < 1 << width
        _tamper_component(path, NAME, "mask", lambda b: b.__setitem__(0, b[0] | ((1 << width) - 1)))
    elif case == "rans_frequencies":  # the first u16 frequency one higher
        _tamper_component(path, NAME, "labels", lambda b: b.__setitem__(0, (b[0] + 1) % 256))
    elif case == "rans_state":  # the state's top two bytes cleared: below 2^23 (3 regions: the state is bytes 6..9)
        _tamper_component(path, NAME, "labels", lambda b: b.__setitem__(slice(8, 10), b"\0\0"))
    elif case == "rans_body":  # a flipped byte after the header: decodes to a wrong end state or runs off the end
        _tamper_component(path, NAME, "labels", lambda b: b.__setitem__(len(b) - 1, b[len(b) - 1] ^ 0x5A))
    elif case == "label_digit":
        _tamper_component(path, NAME, "labels", lambda b: b.__setitem__(0, 250))
    elif case == "padding":  # a set bit past the end of a stream whose length is not whole bytes / digits
        key, used = next((k, u) for k, u in (("signs", kept % 8), ("residual", kept_salient % 8),
                                             ("labels", (kept - kept_salient) % 5)) if u)
        _tamper_component(path, NAME, key, lambda b: b.__setitem__(len(b) - 1, 242 if key == "labels" else 0x80))
    else:  # a count that keeps every stream's length: only decoding can tell
        lengths = lambda ks: (-(-ks // 8), -(-(kept - ks) // 5))  # noqa: E731
        delta = next(d for d in (-1, 1, -2, 2, -3, 3) if lengths(kept_salient + d) == lengths(kept_salient))
        raw, header, data_offset = _split(path)
        header["tensors"][NAME]["params"]["kept_salient"] += delta
        _rebuild(path, header, raw[data_offset:])
    with pytest.raises(FormatError, match=match):
        Model(path)


# ---- 8-bit params under per-(row, slot) fp16 scales (params_bits = 8) ---------------------------------------------

def _every_safe_scale():
    """Every fp16 scale >= 0 whose product with code 127 stays finite: zero, subnormals, normals up to ~515."""
    bits = np.arange(0x7C00, dtype=np.uint16)
    scales = bits.view(np.float16)
    return scales[scales.astype(np.float32) * 127 < 65504]


def _compact_planes(rng, scales, regions=1, nm=None, cols=130, block=64):
    """Random planes whose params are random 8-bit codes (±127, 0 and ±1 included) under the given scales, laid
    out over as many rows as they fill."""
    slots = 2 * regions + 4
    rows = -(-scales.size // slots)
    param_scales = np.resize(scales, rows * slots).reshape(rows, slots)
    codes = rng.integers(-127, 128, (rows, -(-cols // block), slots)).astype(np.int8)
    codes.reshape(-1)[:4] = [127, -127, 0, 1]
    codes[np.broadcast_to(param_scales[:, None, :] == 0, codes.shape)] = 0  # the writer's code under a zero scale
    planes = _random_planes(rng, rows, cols, regions, nm, block)
    planes.update(params=binary_groups.expand_params(codes, param_scales), param_scales=param_scales)
    return planes, codes


@pytest.mark.parametrize("regions, nm, cols", [(1, None, 130), (3, (6, 8), 203)])
def test_8bit_params_round_trip_bit_exactly(tmp_path, regions, nm, cols):
    """C++ and Python expand every fp16 scale (subnormal to huge) times random codes to the same fp16 bits, and the
    dequantized weights follow the format's rule on those values; ragged last blocks included."""
    scales = _every_safe_scale() if regions == 1 else np.random.default_rng(1).choice(_every_safe_scale(), 300)
    planes, codes = _compact_planes(np.random.default_rng(cols), scales, regions, nm, cols)
    writer = StbWriter(_metadata())
    writer.add_binary_groups(NAME, **planes)
    writer.write(tmp_path / "p8.stb")
    reader = StbReader(tmp_path / "p8.stb")
    info = reader.tensor_info(NAME)
    assert info["params"]["params_bits"] == 8
    np.testing.assert_array_equal(reader.component(NAME, "params").view(np.int8), codes.reshape(-1))
    runtime = reader._file.binary_groups_params(NAME)
    np.testing.assert_array_equal(runtime, planes["params"].view(np.uint16).reshape(-1))
    np.testing.assert_array_equal(reader.dequantize(NAME), _reference(planes))
    rows, slots = planes["param_scales"].shape
    assert info["components"]["params"]["length"] == codes.size  # one byte per param
    assert info["components"]["param_scales"]["length"] == rows * slots * 2


def test_8bit_params_encoder_refuses_values_off_the_grid():
    scales = np.full((2, 6), 0.5, np.float16)
    params = np.full((2, 1, 6), 0.25, np.float16)  # half a step
    with pytest.raises(ValueError, match="8-bit codes"):
        binary_groups.param_codes(params, scales)


def test_quantizer_with_8bit_params_round_trips_bit_exactly(tmp_path):
    """The quantizer rounds every alpha and mu to its code when it computes it, so the file reproduces q exactly."""
    w, _, h = _correlated_layer(24, 200, tokens=512, seed=3)
    keep = torch.from_numpy(B.nm_keep(w.abs().numpy(), 5, 8))
    method = make_method("stbllm", nm=(5, 8), params_bits=8)
    result = method.quantize(w, B.inverse_hessian_factor(h, w.clone()), keep)
    assert result.param_scales is not None and (result.params != 0).any()
    writer = StbWriter(_metadata())
    method.write(writer, NAME, result, (5, 8))
    writer.write(tmp_path / "q8.stb")
    reader = StbReader(tmp_path / "q8.stb")
    np.testing.assert_array_equal(reader.dequantize(NAME), result.q.numpy())
    report = writer.bit_report()["groups"]["scales"]
    assert report["bytes"] == 24 * 2 * 10 + 24 * 10 * 2  # codes [rows, blocks, slots] + scales [rows, slots]


def test_8bit_params_only_for_binarizers_with_plain_alphas():
    from stbllm_convert.methods import ConvertError

    with pytest.raises(ConvertError, match="billm, stbllm, q2, q3 or q4"):
        make_method("arb-x", params_bits=8)
    with pytest.raises(ConvertError, match="billm, stbllm, q2, q3 or q4"):
        make_method("sign", params_bits=8)
    for name in ("billm", "q3"):
        with pytest.raises(ConvertError, match="16 or 8"):
            make_method(name, params_bits=4)


def test_label_coder_option_is_checked():
    from stbllm_convert.methods import ConvertError

    assert make_method("arb-x", label_coder="fixed").label_coder == "fixed"
    assert make_method("billm").label_coder == "rans"
    with pytest.raises(ConvertError, match="choose rans or fixed"):
        make_method("stbllm", nm=(6, 8), label_coder="huffman")
    for method in ("sign", "arb-rc", "q3"):
        with pytest.raises(ConvertError, match="--label-coder needs billm, stbllm or arb-x"):
            make_method(method, label_coder="fixed")


def _p8_file(tmp_path):
    planes, _ = _compact_planes(np.random.default_rng(5), np.array([0.5, 1e-7, 0, 2.0, 3.0, 0.25], np.float16), 1)
    writer = StbWriter(_metadata())
    writer.add_binary_groups(NAME, **planes)
    path = tmp_path / "bad-p8.stb"
    writer.write(path)
    return path


@pytest.mark.parametrize("case, match", [
    ("code_min", "-128"), ("negative_scale", "negative or not finite"), ("inf_scale", "negative or not finite"),
    ("overflow", "overflows fp16"), ("bits_16", "params_bits"), ("bits_4", "params_bits"),
    ("scales_length", "need"), ("no_scales", "components"),
])
def test_malformed_8bit_params_are_refused(tmp_path, case, match):
    """Checked by the C++ reader at open; the Python decoder has the same rules (expand_params)."""
    path = _p8_file(tmp_path)
    if case == "code_min":
        _tamper_component(path, NAME, "params", lambda b: b.__setitem__(0, 0x80))
    elif case in ("negative_scale", "inf_scale", "overflow"):
        _tamper_component(path, NAME, "param_scales", _set_half(3, {"negative_scale": -2.0, "inf_scale": np.inf,
                                                    "overflow": 60000.0}[case]))
    else:
        raw, header, data_offset = _split(path)
        t = header["tensors"][NAME]
        {"bits_16": lambda: t["params"].update(params_bits=16), "bits_4": lambda: t["params"].update(params_bits=4),
         "scales_length": lambda: t["components"]["param_scales"].update(
             length=t["components"]["param_scales"]["length"] - 2),
         "no_scales": lambda: t["components"].pop("param_scales")}[case]()
        _rebuild(path, header, raw[data_offset:])
    with pytest.raises(FormatError, match=match):
        StbReader(path)


@pytest.mark.parametrize("codes, scales, match", [
    ([-128], [1.0], "-128"), ([1], [-1.0], "negative or not finite"), ([1], [np.nan], "negative or not finite"),
    ([127], [600.0], "overflows fp16"),
])
def test_python_decoder_refuses_bad_8bit_params(codes, scales, match):
    with pytest.raises(FormatError, match=match):
        binary_groups.expand_params(np.array(codes, np.int8).reshape(1, 1, 1), np.array([scales], np.float16))


def test_tiny_model_with_8bit_params_matches_oracle(tmp_path, tiny_hf_models):
    text = tmp_path / "calib.txt"
    text.write_text("\n".join(CORPUS * 3))
    out = tmp_path / "llama-stbllm-p8.stb"
    convert(tiny_hf_models["llama"], out, method="stbllm", nm="6:8", progress=False, params_bits=8,
            calibration=CalibrationOptions(texts=[text], samples=2, seqlen=32))
    reader = StbReader(out)
    assert reader.tensor_info(NAME)["params"]["params_bits"] == 8
    assert reader.metadata["provenance"]["params_bits"] == 8
    ids = list(np.random.default_rng(1).integers(4, 300, size=40))
    assert_logits_close(Model(out, threads=2, kv_cache="f32").logits(ids), oracle_logits(out, ids))


@pytest.mark.parametrize("regions", [1, 2, 3])
def test_regions_option_sets_the_split_and_round_trips(tmp_path, regions):
    """--regions (the ablation of STBLLM's three regions against BiLLM's two): the file holds that many groups of
    params per block and dequantizes to the quantizer's output."""
    w, _, h = _correlated_layer(24, 200, tokens=512, seed=4)
    keep = torch.from_numpy(B.nm_keep(w.abs().numpy(), 6, 8))
    method = make_method("stbllm", nm=(6, 8), regions=regions)
    assert method.params()["regions"] == regions
    result = method.quantize(w, B.inverse_hessian_factor(h, w.clone()), keep)
    assert result.params.shape[-1] == 2 * regions + 4
    used = {int(g) for g in result.labels[result.keep & ~result.salient[None, :]].unique()} if regions > 1 else {0}
    assert used == set(range(regions))
    writer = StbWriter(_metadata())
    method.write(writer, NAME, result, (6, 8))
    writer.write(tmp_path / "r.stb")
    np.testing.assert_array_equal(StbReader(tmp_path / "r.stb").dequantize(NAME), result.q.numpy())


def test_stbllm_without_its_three_components_is_billm(tmp_path, tiny_hf_models):
    """STBLLM with magnitude importance, the same N in every layer and two regions is BiLLM: the converted files
    dequantize identically, so the three options measure all that separates the two methods (docs/results.md)."""
    text = tmp_path / "calib.txt"
    text.write_text("\n".join(CORPUS * 3))
    paths = {}
    for method, options in [("billm", {}), ("stbllm", dict(importance="magnitude", layerwise=False, regions=2)),
                            ("stbllm", {})]:
        paths[method, bool(options)] = out = tmp_path / f"{method}-{len(paths)}.stb"
        convert(tiny_hf_models["llama"], out, method=method, nm="4:8", progress=False, **options,
                calibration=CalibrationOptions(texts=[text], samples=2, seqlen=32))
    billm, reduced, full = (StbReader(paths[k]) for k in [("billm", False), ("stbllm", True), ("stbllm", False)])
    linears = [n for n in billm.tensor_names() if billm.tensor_info(n)["codec"].startswith("stb.binary-groups")]
    assert linears
    for name in linears:
        np.testing.assert_array_equal(reduced.dequantize(name), billm.dequantize(name))
    assert any(not np.array_equal(full.dequantize(n), billm.dequantize(n)) for n in linears)


def test_regions_option_only_for_billm_and_stbllm():
    from stbllm_convert.methods import ConvertError

    with pytest.raises(ConvertError, match="billm or stbllm"):
        make_method("arb-x", regions=3)
    with pytest.raises(ConvertError, match="1, 2 or 3"):
        make_method("billm", regions=4)


# ---- two salient groups (ARB-LLM's column-group bitmap, salient_groups = 2) ---------------------------------------

@pytest.mark.parametrize("regions, nm, cols, params_bits", [
    (2, None, 130, 16), (3, (6, 8), 576, 16), (1, (5, 8), 203, 16), (2, (4, 8), 64, 8), (3, None, 200, 8)])
def test_two_salient_groups_round_trip(tmp_path, regions, nm, cols, params_bits):
    """The group stream (one bit per kept salient weight) and 4 more params per (row, block), fp16 or 8-bit, read
    back by the C++ reader and the Python decoder exactly as the format's rule says."""
    rng = np.random.default_rng(cols + regions)
    planes = _random_planes(rng, 11, cols, regions, nm, salient_fraction=0.2, salient_groups=2)
    slots = 2 * regions + 8
    if params_bits == 8:
        scales = rng.choice(_every_safe_scale()[1000:20000], (11, slots)).astype(np.float16)
        codes = rng.integers(-127, 128, planes["params"].shape).astype(np.int8)
        planes.update(params=binary_groups.expand_params(codes, scales), param_scales=scales)
    writer = StbWriter(_metadata())
    writer.add_binary_groups(NAME, **planes)
    writer.write(tmp_path / "cgb.stb")
    reader = StbReader(tmp_path / "cgb.stb")
    info = reader.tensor_info(NAME)
    kept_salient = int((np.ones((11, cols), bool) if nm is None else planes["mask"])[:, planes["salient"]].sum())
    assert info["params"]["salient_groups"] == 2 and info["params"]["kept_salient"] == kept_salient
    assert info["components"]["salient_labels"]["length"] == -(-kept_salient // 8)
    assert info["components"]["params"]["length"] == 11 * -(-cols // 128) * slots * params_bits // 8
    if params_bits == 8:
        np.testing.assert_array_equal(reader._file.binary_groups_params(NAME),
                                      planes["params"].view(np.uint16).reshape(-1))
    np.testing.assert_array_equal(reader.dequantize(NAME), _reference(planes))
    assert writer.bit_report()["groups"]["labels"]["bytes"] >= -(-kept_salient // 8)  # the group bits count
    from stbllm_rt.entropy import binary_groups_streams
    streams = binary_groups_streams(reader, NAME)
    assert streams["salient_labels"]["stored_bits"] == 8 * -(-kept_salient // 8)
    assert streams["params.salient_alpha"]["symbols"] == 11 * -(-cols // 128) * 4  # α₁, α₂ of both groups


def _cgb_file(tmp_path):
    planes = _random_planes(np.random.default_rng(4), 7, 203, 2, (5, 8), salient_fraction=0.2, salient_groups=2)
    writer = StbWriter(_metadata())
    writer.add_binary_groups(NAME, **planes)
    path = tmp_path / "cgb.stb"
    writer.write(path)
    return path


@pytest.mark.parametrize("case, match", [
    ("groups_3", "salient_groups"), ("groups_1", "salient_groups"), ("no_stream", "components"),
    ("stream_length", "need"), ("params_length", "need"), ("no_groups_param", "components"),
])
def test_malformed_two_group_files_are_rejected_at_open(tmp_path, case, match):
    path = _cgb_file(tmp_path)
    StbReader(path)  # the untouched file opens
    raw, header, data_offset = _split(path)
    t = header["tensors"][NAME]
    {"groups_3": lambda: t["params"].update(salient_groups=3),
     "groups_1": lambda: t["params"].update(salient_groups=1),
     "no_stream": lambda: t["components"].pop("salient_labels"),
     "stream_length": lambda: t["components"]["salient_labels"].update(
         length=t["components"]["salient_labels"]["length"] + 1),
     "params_length": lambda: t["components"]["params"].update(length=t["components"]["params"]["length"] - 8),
     "no_groups_param": lambda: t["params"].pop("salient_groups")}[case]()
    _rebuild(path, header, raw[data_offset:])
    with pytest.raises(FormatError, match=match):
        StbReader(path)


def test_two_group_padding_bits_are_refused(tmp_path):
    """A set bit past the last group bit: the Python decoder refuses it (the runtime's decoder: test_arb.py)."""
    path = _cgb_file(tmp_path)
    kept_salient = StbReader(path).tensor_info(NAME)["params"]["kept_salient"]
    assert kept_salient % 8
    _tamper_component(path, NAME, "salient_labels", lambda b: b.__setitem__(len(b) - 1, b[len(b) - 1] | 0x80))
    with pytest.raises(FormatError, match="salient_labels stream has non-zero padding"):
        StbReader(path).dequantize(NAME)


def test_quantizer_with_two_salient_groups_round_trips_bit_exactly(tmp_path):
    w, _, h = _correlated_layer(24, 200, tokens=512, seed=4)
    keep = torch.from_numpy(B.nm_keep(w.abs().numpy(), 6, 8))
    result = B.quantize_groups(w, B.inverse_hessian_factor(h, w.clone()), keep, 2, salient_groups=2)
    assert result.stats["salient_split_blocks"] > 0 and result.salient_labels.any()
    writer = StbWriter(_metadata())
    make_method("billm", nm=(6, 8)).write(writer, NAME, result, (6, 8))
    writer.write(tmp_path / "q.stb")
    reader = StbReader(tmp_path / "q.stb")
    assert reader.tensor_info(NAME)["params"]["salient_groups"] == 2
    np.testing.assert_array_equal(reader.dequantize(NAME), result.q.numpy())
