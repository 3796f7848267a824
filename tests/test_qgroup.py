"""stb.qgroup.v1 (k-bit group quantization) and per-tensor recipes: the codec round-trips bit-exactly through the
Python writer, the C++ validator, the Python reader and the runtime's row decoder; malformed tensors are refused by
both readers; every kernel path matches a numpy reference; GPTQ beats round-to-nearest on correlated inputs and
act-order beats column order; a table GPTQ'd with the head's input Hessian beats round-to-nearest;
recipes parse and refuse what they should; a tiny model converted with a mixed recipe runs and matches the oracle."""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from stbllm_convert import binarize as B  # noqa: E402
from stbllm_convert import qgroup_quant as Q  # noqa: E402
from stbllm_convert.calibrate import CalibrationOptions  # noqa: E402
from stbllm_convert.convert import convert  # noqa: E402
from stbllm_convert.errors import ConvertError  # noqa: E402
from stbllm_convert.methods import make_method  # noqa: E402
from stbllm_convert.recipe import Recipe, parse_method, read_recipe_file  # noqa: E402
from stbllm_rt import FormatError, Model, StbReader, StbWriter, _core, binary_groups, qgroup  # noqa: E402

from conftest import CORPUS  # noqa: E402
from test_calibrate import _correlated_layer  # noqa: E402
from test_format import _metadata, _rebuild, _set_half, _split, _tamper_component  # noqa: E402
from test_kernels import kernels, quantize_q8  # noqa: E402,F401  (kernels: the fixture over every path)
from test_oracle import assert_logits_close, oracle_logits  # noqa: E402

NAME = "blk.0.attn_q.weight"


def _random_tensor(rng, rows, cols, bits, group, params_bits=16):
    """Random codes, scales and offsets; params_bits 8: the scales and offsets are 8-bit codes (code -127 and 127
    included) times random per-row steps (param_scales [rows, 2]), one row's steps subnormal."""
    groups = -(-cols // group)
    t = dict(codes=rng.integers(0, 1 << bits, (rows, cols)).astype(np.uint8),
             scales=(rng.random((rows, groups)) * 0.1).astype(np.float16),
             offsets=(rng.standard_normal((rows, groups)) * 0.1).astype(np.float16), bits=bits, group=group)
    if params_bits == 8:
        steps = (rng.random((rows, 2)) * 1e-3).astype(np.float16)
        steps[-1] = 3e-7  # subnormal: the products round to subnormals too
        codes = rng.integers(-127, 128, (2, rows, groups, 1))
        codes[0, :2, 0, 0] = -127, 127  # the scales of rows 0 and 1 in group 0
        t["scales"], t["offsets"] = (binary_groups.expand_params(codes[i], steps[:, i:i + 1])[:, :, 0]
                                     for i in range(2))
        t["param_scales"] = steps
    return t


def _reference(t):
    """docs/format.md's rule, written directly: float32 scale · code, rounded, plus offset, rounded."""
    cols = t["codes"].shape[1]
    per_col = lambda a: np.repeat(a.astype(np.float32), t["group"], axis=1)[:, :cols]  # noqa: E731
    return per_col(t["scales"]) * t["codes"].astype(np.float32) + per_col(t["offsets"])


@pytest.mark.parametrize("code_coder", [None, "rans"])
@pytest.mark.parametrize("params_bits", [16, 8])
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("cols, group", [(576, 64), (100, 32), (1000, 128), (64, 96), (31, 32)])
def test_round_trip_is_bit_exact_in_python_and_cpp(tmp_path, bits, cols, group, params_bits, code_coder):
    t = _random_tensor(np.random.default_rng(cols * bits), 7, cols, bits, group, params_bits)
    writer = StbWriter(_metadata(), code_coder=code_coder)
    writer.add_qgroup(NAME, **t)
    writer.write(tmp_path / "q.stb")
    reader = StbReader(tmp_path / "q.stb")
    ref = _reference(t)
    np.testing.assert_array_equal(reader.dequantize(NAME), ref)
    np.testing.assert_array_equal(_core.StbFile(str(tmp_path / "q.stb")).dequantize_qgroup(NAME), ref)
    if code_coder is None:
        assert len(reader.component(NAME, "codes")) == 7 * -(-cols // 32) * 4 * bits  # dense: k bits per code
    else:  # one stream of the 7 × cols codes in row-major order
        assert reader.tensor_info(NAME)["params"]["code_coder"] == "rans"
        np.testing.assert_array_equal(reader.component(NAME, "codes"), _core.rans_encode(t["codes"], 1 << bits))
    info = reader.tensor_info(NAME)
    groups = -(-cols // group)
    assert info["components"]["scales"]["length"] == info["components"]["offsets"]["length"] == \
        7 * groups * params_bits // 8
    if params_bits == 8:
        assert info["params"]["params_bits"] == 8 and info["components"]["param_scales"]["length"] == 7 * 4
        stored = reader.component(NAME, "scales").view(np.int8)
        assert stored.min() == -127 and stored.max() == 127
    else:
        assert "param_scales" not in info["components"] and "params_bits" not in info["params"]


def test_honest_bits_are_k_plus_32_over_group():
    writer = StbWriter(_metadata())
    for bits, name in zip((2, 3, 4), ("blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.attn_v.weight")):
        writer.add_qgroup(name, **_random_tensor(np.random.default_rng(bits), 16, 576, bits, 64))
    report = writer.bit_report()
    assert report["linear_bits_per_weight"] == 3 + 0.5
    assert report["classes"]["attn_k"]["bits_per_weight"] == 3.5
    assert report["classes"]["attn_k"]["codecs"] == {"stb.qgroup.v1": 1}
    assert report["groups"]["codes"]["bits_per_weight"] == 3 and report["groups"]["scales"]["bits_per_weight"] == 0.5


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("rows, cols, group, n", [(9, 576, 64, 1), (33, 1536, 128, 5), (5, 100, 32, 3),
                                                  (16, 224, 96, 9), (3, 64, 64, 4)])
def test_kernels_match_numpy(kernels, bits, rows, cols, group, n):
    """Weights dequantized by the format's rule times the runtime's int8 activations (float64 reference)."""
    rng = np.random.default_rng(rows * cols + bits)
    t = _random_tensor(rng, rows, cols, bits, group)
    x = rng.standard_normal((n, cols)).astype(np.float32) * 2
    x[0, :min(cols, 64)] = 0  # an all-zero activation group
    q, d = quantize_q8(x)
    deq_x = q * np.repeat(d, 64, axis=1)[:, :cols].astype(np.float64)
    ref = deq_x @ _reference(t).astype(np.float64).T
    lin = _core.Linear("qgroup", rows, cols, values=qgroup.pack_codes(t["codes"], bits),
                       scales=t["scales"].view(np.uint16), offsets=t["offsets"].view(np.uint16), bits=bits,
                       group=group, threads=2)
    np.testing.assert_allclose(lin.forward(x), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("bits, group", [(2, 64), (3, 32), (4, 128)])
def test_a_row_gets_the_same_bits_alone_or_batched(kernels, bits, group):
    """The tile kernels (16 weight rows per vector, up to 8 activation rows per pass) do the same float work for an
    activation row whatever else shares its pass, so batching never changes a sequence's logits."""
    rng = np.random.default_rng(bits)
    t = _random_tensor(rng, 37, 300, bits, group)
    lin = _core.Linear("qgroup", 37, 300, values=qgroup.pack_codes(t["codes"], bits), scales=t["scales"].view(np.uint16),
                       offsets=t["offsets"].view(np.uint16), bits=bits, group=group, threads=2)
    x = rng.standard_normal((11, 300)).astype(np.float32)
    batched = lin.forward(x)
    for i in range(11):
        np.testing.assert_array_equal(lin.forward(x[i:i + 1])[0].view(np.uint32), batched[i].view(np.uint32))


@pytest.mark.parametrize("n", [1, 3, 9])
def test_matrices_sharing_an_input_give_the_bits_of_separate_calls(kernels, n):
    """Backend::linears (the model's q/k/v and gate/up: the input quantized once, all tiles in one loop) against
    one linear() per matrix, bit for bit: different row counts (ragged tiles), bit widths and group sizes."""
    rng = np.random.default_rng(n)
    lins = []
    for rows, bits, group in [(48, 3, 64), (21, 4, 32), (37, 2, 128)]:
        t = _random_tensor(rng, rows, 320, bits, group)
        lins.append(_core.Linear("qgroup", rows, 320, values=qgroup.pack_codes(t["codes"], bits),
                                 scales=t["scales"].view(np.uint16), offsets=t["offsets"].view(np.uint16), bits=bits,
                                 group=group, threads=2))
    x = rng.standard_normal((n, 320)).astype(np.float32)
    for got, lin in zip(_core.linears(lins, x), lins):
        np.testing.assert_array_equal(got.view(np.uint32), lin.forward(x).view(np.uint32))


def _qgroup_file(tmp_path, cols=100, bits=3, group=32, params_bits=16):
    t = _random_tensor(np.random.default_rng(0), 5, cols, bits, group, params_bits)
    writer = StbWriter(_metadata())
    writer.add_qgroup(NAME, **t)
    path = tmp_path / "q.stb"
    writer.write(path)
    return path


@pytest.mark.parametrize("case, match", [
    ("bits", "bits"), ("group", "multiple of 32"), ("unknown_param", "unknown param"), ("codes_length", "need"),
    ("missing_offsets", "components"), ("nan_scale", "non-finite"), ("inf_offset", "non-finite"),
    ("padding_code", "past the last column"),
])
def test_malformed_tensors_are_refused_at_open(tmp_path, case, match):
    path = _qgroup_file(tmp_path)  # 100 columns: the last chunk has 28 padding codes
    if case == "nan_scale":
        _tamper_component(path, NAME, "scales", lambda b: b.__setitem__(slice(2, 4), b"\x00\x7e"))
    elif case == "inf_offset":
        _tamper_component(path, NAME, "offsets", lambda b: b.__setitem__(slice(0, 2), b"\x00\x7c"))
    elif case == "padding_code":  # row 0's last chunk, column 31 (a padding column): bit 2 in the high u32
        _tamper_component(path, NAME, "codes", lambda b: b.__setitem__(3 * 12 + 11, 0x80))
    else:
        raw, header, data_offset = _split(path)
        t = header["tensors"][NAME]
        {"bits": lambda: t["params"].update(bits=5), "group": lambda: t["params"].update(group=48),
         "unknown_param": lambda: t["params"].update(zero_point=1),
         "codes_length": lambda: t["components"]["codes"].update(length=t["components"]["codes"]["length"] - 1),
         "missing_offsets": lambda: t["components"].pop("offsets")}[case]()
        _rebuild(path, header, raw[data_offset:])
    with pytest.raises(FormatError, match=match):
        StbReader(path)


@pytest.mark.parametrize("case, match", [
    ("code_min", "-128"), ("offset_code_min", "-128"), ("nan_step", "negative or not finite"),
    ("negative_step", "negative or not finite"), ("negative_zero_step", "negative or not finite"),
    ("overflow", "overflows fp16"), ("bits_16", "params_bits"), ("scales_length", "need"),
    ("steps_length", "need"), ("no_steps", "components"),
])
def test_malformed_8bit_params_are_refused_by_both_readers(tmp_path, case, match):
    """Checked by the C++ reader at open, and by the Python decoder (qgroup.dequantize) with the same rules."""
    path = _qgroup_file(tmp_path, params_bits=8)
    if case in ("code_min", "offset_code_min"):
        _tamper_component(path, NAME, "scales" if case == "code_min" else "offsets",
                          lambda b: b.__setitem__(3, 0x80))
    elif case in ("nan_step", "negative_step", "negative_zero_step", "overflow"):
        value = {"nan_step": np.nan, "negative_step": -1e-3, "negative_zero_step": -0.0, "overflow": 60000.0}[case]
        _tamper_component(path, NAME, "param_scales", _set_half(2, value))  # row 1's d_scale
    else:
        raw, header, data_offset = _split(path)
        c = header["tensors"][NAME]["components"]
        {"bits_16": lambda: header["tensors"][NAME]["params"].update(params_bits=16),
         "scales_length": lambda: c["scales"].update(length=c["scales"]["length"] * 2),
         "steps_length": lambda: c["param_scales"].update(length=c["param_scales"]["length"] - 2),
         "no_steps": lambda: c.pop("param_scales")}[case]()
        _rebuild(path, header, raw[data_offset:])
    with pytest.raises(FormatError, match=match):
        StbReader(path)
    if case in ("code_min", "offset_code_min", "nan_step", "negative_step", "negative_zero_step", "overflow"):
        with pytest.raises(FormatError, match=match):  # the Python decoder, past the C++ checks
            _python_dequantize(path)


@pytest.mark.parametrize("case, match", [
    ("truncated", "ends before its symbols"), ("extra_byte", "past its symbols"),
    ("state", "initial state|outside"), ("frequencies", "sum to"), ("coder", "code_coder must be"),
])
def test_malformed_rans_codes_are_refused_by_both_readers(tmp_path, case, match):
    """A rANS codes stream must decode to exactly rows × cols codes and end where they do; its header is checked."""
    t = _random_tensor(np.random.default_rng(4), 5, 100, 3, 32)
    stream = bytearray(_core.rans_encode(t["codes"], 8))
    params = {"bits": 3, "group": 32, "code_coder": "rans"}
    if case == "truncated":
        stream = stream[:-1]
    elif case == "extra_byte":
        stream += b"\x00"
    elif case == "state":  # the final state: the 4 bytes after 8 frequencies
        stream[16:20] = (int.from_bytes(stream[16:20], "little") ^ 0x10000).to_bytes(4, "little")
    elif case == "frequencies":
        stream[0] ^= 1
    elif case == "coder":
        params["code_coder"] = "huffman"
    writer = StbWriter(_metadata())
    writer._add(NAME, qgroup.CODEC, (5, 100), params,  # the raw components, past add_qgroup's checks
                {"codes": np.frombuffer(bytes(stream), np.uint8), "scales": t["scales"], "offsets": t["offsets"]})
    path = tmp_path / "q.stb"
    writer.write(path)
    with pytest.raises(FormatError, match=match):
        StbReader(path)
    if case != "coder":
        with pytest.raises(FormatError, match=match):  # the Python decoder, past the C++ checks
            _python_dequantize(path)


def _python_dequantize(path):
    """qgroup.dequantize on the raw bytes of NAME in `path` (no C++ reader in between)."""
    raw, header, data_offset = _split(path)
    t = header["tensors"][NAME]
    component = lambda key: np.frombuffer(raw, np.uint8, t["components"][key]["length"],  # noqa: E731
                                          data_offset + t["components"][key]["offset"])
    return qgroup.dequantize(component("codes"), component("scales"), component("offsets"), tuple(t["shape"]),
                             t["params"], component("param_scales") if "param_scales" in t["components"] else None)


def test_python_decoder_checks_what_the_cpp_reader_checks():
    t = _random_tensor(np.random.default_rng(1), 2, 40, 4, 32)
    codes = qgroup.pack_codes(t["codes"], 4)
    args = (t["scales"].view(np.uint8), t["offsets"].view(np.uint8), (2, 40), {"bits": 4, "group": 32})
    np.testing.assert_array_equal(qgroup.dequantize(codes, *args), _reference(t))
    bad = codes.copy()
    bad[0, 16 + 15] |= 0x10  # column 63 of row 0 (a padding column) in a high nibble
    with pytest.raises(FormatError, match="past the last column"):
        qgroup.dequantize(bad, *args)
    scales = t["scales"].copy()
    scales[1, 1] = np.inf
    with pytest.raises(FormatError, match="non-finite"):
        qgroup.dequantize(codes, scales.view(np.uint8), *args[1:])


def test_writer_refuses_bad_input():
    w = StbWriter(_metadata())
    t = _random_tensor(np.random.default_rng(2), 2, 64, 2, 32)
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 4\)"):
        w.add_qgroup(NAME, **{**t, "codes": t["codes"] + 4})
    with pytest.raises(ValueError, match="group must be a multiple of 32"):
        w.add_qgroup(NAME, **{**t, "group": 40})
    with pytest.raises(ValueError, match="finite"):
        w.add_qgroup(NAME, **{**t, "scales": np.full((2, 2), 1e6)})


# ---- the quantizers -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_lowers_layer_output_error_vs_round_to_nearest(bits):
    w, x, h = _correlated_layer(rows=32, cols=256)
    u = B.inverse_hessian_factor(h, w.clone())
    rtn = Q.quantize_rtn(w, bits, 64)
    gptq = Q.quantize_gptq(w, u, bits, 64, torch.diag(h))
    err = lambda q: float(((x @ (w - q).t()) ** 2).mean())  # noqa: E731
    # measured ratios gptq / rtn: 0.58 (q2), 0.53 (q3), 0.52 (q4)
    assert err(gptq.q) < 0.75 * err(rtn.q)
    for r in (rtn, gptq):  # the codes, scales and offsets reproduce q exactly as the file will
        per_col = lambda a: a.repeat_interleave(64, dim=1)[:, :256]  # noqa: E731
        assert torch.equal(per_col(r.scales) * r.codes.float() + per_col(r.offsets), r.q)
        assert int(r.codes.max()) < 1 << bits


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group", [64, 96])
def test_act_order_lowers_gptq_error_and_keeps_the_file_layout(bits, group):
    """Columns by descending diag(H), groups still consecutive columns (96: groups straddle the lazy batches)."""
    w, x, h = _correlated_layer(rows=32, cols=256)
    in_order = Q.quantize_gptq(w, B.inverse_hessian_factor(h), bits, group, torch.diag(h))
    order, factor = Q.act_order_factor(h)
    assert torch.equal(order, torch.argsort(torch.diag(h), descending=True)) and Q.act_order_factor(h)[1] is factor
    act = Q.quantize_gptq(w, factor, bits, group, torch.diag(h), order)
    err = lambda q: float(((x @ (w - q).t()) ** 2).mean())  # noqa: E731
    # measured ratios act-order / column order: 0.89 (q2), 0.80 (q3), 0.75 (q4) at group 64
    assert err(act.q) < 0.95 * err(in_order.q)
    per_col = lambda a: a.repeat_interleave(group, dim=1)[:, :256]  # noqa: E731
    assert torch.equal(per_col(act.scales) * act.codes.float() + per_col(act.offsets), act.q)
    assert int(act.codes.max()) < 1 << bits
    # the method quantizes with act-order: exactly the call above
    assert torch.equal(make_method(f"q{bits}", group=group).quantize(w, None, None, h).q, act.q)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_8bit_params_cost_little_layer_error_and_the_file_holds_them(tmp_path, bits):
    """params_bits 8: each scale and offset is fp16(d · code) under its row's steps, the file (and the runtime's
    decoder) reproduce the quantizer bit for bit for GPTQ and round-to-nearest, the layer output error on correlated
    inputs is at most 10 % above fp16 params' and the params cost 16/group + 32/cols bits per weight."""
    w, x, h = _correlated_layer(rows=32, cols=256)
    err = lambda q: float(((x @ (w - q).t()) ** 2).mean())  # noqa: E731
    fp16, p8 = (make_method(f"q{bits}", group=64, params_bits=p).quantize(w, None, None, h) for p in (16, 8))
    assert fp16.param_scales is None and p8.param_scales.shape == (32, 2)
    # measured ratios p8 / fp16: 0.98 (q2), 0.98 (q3), 1.02 (q4)
    assert err(p8.q) <= 1.1 * err(fp16.q)
    rtn_method = make_method(f"q{bits}-rtn", group=64, params_bits=8)
    rtn = Q.quantize_rtn(w, bits, 64, grid=Q.row_grid(w, bits, 64))
    writer = StbWriter(_metadata())
    make_method(f"q{bits}", group=64, params_bits=8).write(writer, NAME, p8, None)
    rtn_method.add_linear(writer, "blk.0.attn_k.weight", w.numpy())
    assert writer.bit_report()["groups"]["scales"]["bits_per_weight"] == 16 / 64 + 32 / 256
    writer.write(tmp_path / "p8.stb")
    reader = StbReader(tmp_path / "p8.stb")
    for name, result in ((NAME, p8), ("blk.0.attn_k.weight", rtn)):
        steps = result.param_scales
        for values, d in ((result.scales, steps[:, :1]), (result.offsets, steps[:, 1:])):
            assert torch.equal(B.round_to_codes(values, d), values)  # on the row's code grid
        assert np.array_equal(reader.dequantize(name), result.q.numpy())
        assert np.array_equal(_core.StbFile(str(tmp_path / "p8.stb")).dequantize_qgroup(name), result.q.numpy())


def test_calibrated_table_lowers_the_head_output_error(tmp_path):
    """A k-bit table given the head's input Hessian is GPTQ'd with it: lower error in the head's outputs on
    correlated inputs than rounding to nearest, and the file holds exactly the quantizer's values."""
    from stbllm_convert.convert import add_table

    w, x, h = _correlated_layer(rows=300, cols=256)
    writer = StbWriter(_metadata())
    add_table(writer, "output.weight", w.numpy(), 4, 64)
    add_table(writer, "token_embd.weight", w.numpy(), 4, 64, head_hessian=h)
    writer.write(tmp_path / "t.stb")
    reader = StbReader(tmp_path / "t.stb")
    rtn, gptq = (torch.from_numpy(reader.dequantize(n)) for n in ("output.weight", "token_embd.weight"))
    assert torch.equal(rtn, Q.quantize_rtn(w, 4, 64).q)
    assert torch.equal(gptq, make_method("q4", group=64).quantize(w, None, None, h).q)
    err = lambda q: float(((x @ (w - q).t()) ** 2).mean())  # noqa: E731
    assert err(gptq) < 0.75 * err(rtn)  # measured: 0.40


def test_group_fit_beats_plain_min_max():
    """The shrink search and least-squares refit never do worse than the min/max range (candidate 1.0)."""
    x = torch.randn(64, 64) ** 3  # heavy tails: clipping pays
    scale, offset = Q.fit_group(x, 2)
    lo, hi = x.min(1, keepdim=True).values, x.max(1, keepdim=True).values
    s0, m0 = Q._f16((hi - lo) / 3), Q._f16(lo)
    err = lambda s, m: float(((Q.dequantize(Q._codes(x, s, m, 3), s, m) - x) ** 2).sum())  # noqa: E731
    assert err(scale, offset) < 0.8 * err(s0, m0)


# ---- recipes ------------------------------------------------------------------------------------------------------

def _recipe(*rules, default="q4"):
    return Recipe(parse_method(default), default, [r.split("=") for r in rules])


def test_recipe_patterns_pick_methods():
    r = _recipe("ffn_down=q2:g32", "0-1,5.attn_*=stbllm:6:8", "*.ffn_gate=fp16")
    assert r.method_for(3, "ffn_down").bits == 2 and r.method_for(3, "ffn_down").group == 32
    assert r.method_for(5, "attn_v").name == "stbllm" and r.method_for(5, "attn_v").nm == (6, 8)
    assert r.method_for(2, "attn_v").name == "q4" and r.method_for(0, "ffn_gate").name == "fp16"
    assert r.method_for(0, "attn_q") is r.method_for(1, "attn_k")  # one instance per distinct spec
    r.check(6, ["attn_q", "attn_k", "attn_v", "attn_o", "ffn_gate", "ffn_up", "ffn_down"])
    assert r.describe() == {"method": "q4", "rules": {"ffn_down": "q2:g32", "0-1,5.attn_*": "stbllm:6:8",
                                                      "*.ffn_gate": "fp16"}}


def test_params_bits_in_specs_and_from_the_option():
    """:pBITS spells a q method's params bits; --params-bits (the params_bits option) is the default of the q specs
    without one and of the binary calibrated methods, and reaches no other method."""
    assert (parse_method("q4:g32:p8").bits, parse_method("q4:g32:p8").group) == (4, 32)
    assert parse_method("q4:g32:p8").params_bits == parse_method("q3:p8").params_bits == 8
    assert parse_method("q3:p8").group == 64 and parse_method("q3").params_bits == 16
    assert parse_method("q2-rtn", params_bits=8).params_bits == 8
    assert parse_method("q2:g128:p16", params_bits=8).params_bits == 16
    assert parse_method("stbllm:6:8:p16").params_bits == 16
    assert parse_method("fp16", params_bits=8).name == "fp16"
    assert parse_method("q4:p8").params()["params_bits"] == 8 and "params_bits" not in parse_method("q4").params()


@pytest.mark.parametrize("rules, match", [
    (["ffn_down=q4:p4"], "p8 or p16"), (["ffn_down=sign:4:8:p8"], "billm, stbllm, q2, q3 or q4"),
    (["ffn_down=q5"], "unknown method 'q5'"), (["ffn_down=q4:g48"], "multiple of 32"),
    (["ffn_down=q4:6:8"], "binarizing method"), (["mlp=q4"], "matches no linear kind"),
    (["3-1.ffn_down=q4"], "bad layer list"), (["9.ffn_down=q4"], "matches no linear of this model"),
    (["ffn_*=q3", "ffn_down=q2"], "matches the rules"), (["ffn_down=stbllm"], "needs --nm"),
])
def test_recipe_errors(rules, match):
    with pytest.raises(ConvertError, match=match):
        _recipe(*rules).check(2, ["attn_q", "ffn_down", "ffn_up"])


def test_recipe_files(tmp_path):
    (tmp_path / "r.json").write_text(json.dumps({"method": "q3", "rules": {"ffn_down": "q4"}, "head_bits": 8}))
    (tmp_path / "r.yaml").write_text("method: q3\nrules:\n  - ffn_down=q4\nhead_bits: 8\n")
    assert read_recipe_file(tmp_path / "r.json") == read_recipe_file(tmp_path / "r.yaml") == {
        "method": "q3", "rules": {"ffn_down": "q4"}, "head_bits": 8}
    (tmp_path / "bad.json").write_text(json.dumps({"methods": "q3"}))
    with pytest.raises(ConvertError, match="expected an object with the keys"):
        read_recipe_file(tmp_path / "bad.json")
    (tmp_path / "broken.yaml").write_text("rules: [")
    with pytest.raises(ConvertError, match="not valid YAML"):
        read_recipe_file(tmp_path / "broken.yaml")
    (tmp_path / "tables.yaml").write_text("table_group: {token_embd.weight: 32, output.weight: 64}\n"
                                          "table_params_bits: 8\n")
    assert read_recipe_file(tmp_path / "tables.yaml")["table_group"] == {"token_embd.weight": 32, "output.weight": 64}
    for bad, match in (("table_group: {lm_head: 32}", "table_group"), ("table_group: '64'", "table_group"),
                       ("table_params_bits: 4", "table_params_bits")):
        (tmp_path / "bad.yaml").write_text(bad + "\n")
        with pytest.raises(ConvertError, match=match):
            read_recipe_file(tmp_path / "bad.yaml")


def test_mixed_recipe_end_to_end(tiny_hf_models, tmp_path):
    """One calibration pass where GPTQ, STBLLM, sign, fp16 and round-to-nearest linears mix, a 4-bit head and an
    8-bit embedding (fixed-width codes: k + 32/group bits); the runtime loads the file and its logits match the
    oracle's."""
    text = tmp_path / "calib.txt"
    text.write_text("\n".join(CORPUS * 3))
    recipe = tmp_path / "mix.yaml"
    recipe.write_text("method: q3\nrules:\n  ffn_down: q4:g32\n  0.attn_*: stbllm:6:8\n  1.attn_o: sign:4:8\n"
                      "  1.ffn_gate: fp16\n  1.ffn_up: q2-rtn\nembed_bits: 8\n")
    out = tmp_path / "mix.stb"
    result = convert(tiny_hf_models["llama"], out, recipe=recipe, head_bits=4, progress=False,
                     calibration=CalibrationOptions(texts=[text], samples=2, seqlen=32), code_coder=None)
    reader = StbReader(out)
    codec = lambda name: reader.tensor_info(name)["codec"]  # noqa: E731
    assert codec("blk.0.attn_k.weight") == "stb.binary-groups.v2" and codec("blk.1.attn_o.weight") == \
        "stb.sign-block.v1"
    assert codec("blk.1.attn_q.weight") == codec("blk.0.ffn_down.weight") == codec("output.weight") == \
        "stb.qgroup.v1"
    assert reader.tensor_info("blk.1.ffn_down.weight")["params"] == {"bits": 4, "group": 32}  # fixed-width codes
    assert codec("token_embd.weight") == "stb.int8-group.v1" and codec("blk.1.ffn_gate.weight") == "stb.f16.v1"
    provenance = reader.metadata["provenance"]
    assert provenance["method"] == "recipe" and provenance["recipe"]["rules"]["1.ffn_up"] == "q2-rtn"
    assert provenance["head_bits"] == 4 and provenance["embed_bits"] == 8
    classes = result["bits"]["classes"]
    assert classes["output"]["bits_per_weight"] == 4.5 and classes["token_embd"]["codecs"] == {
        "stb.int8-group.v1": 1}
    model = Model(out, threads=2, kv_cache="f32")
    assert model.info()["classes"] == classes
    ids = list(np.random.default_rng(5).integers(4, 300, size=32))
    assert_logits_close(model.logits(ids), oracle_logits(out, ids), "sign")


@pytest.mark.parametrize("params_bits", [16, 8])
def test_tied_table_is_gptqd_with_the_head_hessian_and_resumes(tiny_hf_models, tmp_path, params_bits):
    """With a calibration pass a 4-bit tied table is GPTQ'd with the head's input Hessian (not rounded to nearest);
    the runtime matches the oracle; a resume over finished checkpoints rebuilds the same Hessian, the same table.
    --params-bits 8: the linears and the table store 8-bit scales and offsets, and the runtime (its embedding lookup
    included) decodes them as the oracle does."""
    from stbllm_convert.source import open_source

    text = tmp_path / "calib.txt"
    text.write_text("\n".join(CORPUS * 3))
    opts = dict(texts=[text], samples=2, seqlen=32, work_dir=tmp_path / "work")
    out = tmp_path / "q4.stb"
    convert(tiny_hf_models["mistral"], out, method="q4", head_bits=4, progress=False,
            calibration=CalibrationOptions(**opts), params_bits=params_bits)
    reader = StbReader(out)
    assert reader.metadata["provenance"]["head_quantizer"] == "gptq" and "output.weight" not in reader.tensor_names()
    for name in ("token_embd.weight", "blk.0.ffn_down.weight"):
        assert reader.tensor_info(name)["params"].get("params_bits", 16) == params_bits
    table = reader.dequantize("token_embd.weight")
    with open_source(tiny_hf_models["mistral"], quiet=True) as src:
        source = torch.from_numpy(np.ascontiguousarray(src.tensor("model.embed_tokens.weight"))).float()
    assert not np.array_equal(table, Q.quantize_rtn(source, 4, 64).q.numpy())
    ids = list(np.random.default_rng(7).integers(4, 300, size=24))
    assert_logits_close(Model(out, threads=2, kv_cache="f32").logits(ids), oracle_logits(out, ids), "sign")
    convert(tiny_hf_models["mistral"], tmp_path / "resumed.stb", method="q4", head_bits=4, progress=False,
            calibration=CalibrationOptions(**opts, resume=True), params_bits=params_bits)
    np.testing.assert_array_equal(StbReader(tmp_path / "resumed.stb").dequantize("token_embd.weight"), table)


def test_calibration_free_recipe_needs_no_calibration(tiny_hf_models, tmp_path):
    out = tmp_path / "rtn.stb"
    convert(tiny_hf_models["mistral"], out, method="q4-rtn", rules=["ffn_*=q2-rtn:g32"], head_bits=3, progress=False)
    reader = StbReader(out)
    assert reader.metadata["provenance"]["head_quantizer"] == "round-to-nearest"
    # the converter's default rANS-coded codes; the tied table's embedding lookups read its head tiles back
    assert reader.tensor_info("blk.0.ffn_up.weight")["params"] == {"bits": 2, "group": 32, "code_coder": "rans"}
    assert reader.tensor_info("token_embd.weight")["params"] == {"bits": 3, "group": 64, "code_coder": "rans"}
    ids = list(np.random.default_rng(6).integers(4, 300, size=24))
    assert_logits_close(Model(out, threads=2, kv_cache="f32").logits(ids), oracle_logits(out, ids), "sign")
    with pytest.raises(ConvertError, match="must agree"):
        convert(tiny_hf_models["mistral"], tmp_path / "x.stb", method="q4-rtn", head_bits=4, embed_bits=8,
                progress=False)
    with pytest.raises(ConvertError, match="--group needs a q2, q3 or q4 method"):
        make_method("sign", group=32)
