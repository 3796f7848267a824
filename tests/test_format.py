"""The .stb v1 format: exact round trips for every codec, and a clear FormatError for every kind of damage."""
import json
import struct

import numpy as np
import pytest

from stbllm_rt import FormatError, StbReader, StbWriter, _core
from stbllm_rt import stbfile
from stbllm_rt.stbfile import FIXED_HEADER_SIZE, fixed_header


def _metadata(sliding_window=None):
    return {"architecture": "llama", "config": {"sliding_window": sliding_window},
            "tokenizer": {"kind": "none"}, "provenance": {"method": "test"}}


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture
def sample_file(tmp_path, rng):
    """A small file holding one tensor of every codec, with a ragged sign-block tensor and an N:M mask."""
    w = StbWriter(_metadata())
    w.add_f32("output_norm.weight", rng.standard_normal(96))
    w.add_f16("token_embd.weight", rng.standard_normal((10, 96)))
    w.add_bytes("tokenizer.data", b"{\"model\": 1}")
    signs = rng.random((6, 576)) > 0.5
    mask = np.zeros((6, 576), dtype=bool)
    for g in range(0, 576, 8):  # 4:8, chosen at random
        for r in range(6):
            mask[r, g + rng.choice(8, 4, replace=False)] = True
    w.add_sign_block("blk.0.attn_q.weight", signs, rng.random((6, 5)) + 0.1, mask=mask, block=128, nm=(4, 8))
    w.add_sign_block("blk.0.attn_k.weight", rng.random((3, 200)) > 0.5, rng.random((3, 2)), block=128)
    w.add_int8_group("output.weight", rng.standard_normal((10, 96)))
    path = tmp_path / "sample.stb"
    w.write(path)
    return path


def test_round_trip_every_codec(tmp_path, rng):
    f32 = rng.standard_normal((4, 7)).astype(np.float32)
    f16 = rng.standard_normal((5, 3, 2)).astype(np.float16)
    signs = rng.random((9, 576)) > 0.5
    scales = (rng.random((9, 5)) + 0.01).astype(np.float16)
    mask = rng.random((9, 576)) > 0.3
    w = StbWriter(_metadata())
    w.add_f32("a", f32)
    w.add_f16("b", f16)
    w.add_bytes("c", b"\x00\x01binary\xff")
    w.add_sign_block("d", signs, scales, block=128)
    w.add_sign_block("e", signs, scales, mask=mask, block=128, nm=(4, 8))
    int8_source = rng.standard_normal((6, 100)).astype(np.float32)
    w.add_int8_group("f", int8_source)
    w.write(tmp_path / "rt.stb")
    r = StbReader(tmp_path / "rt.stb")
    assert r.tensor_names() == ["a", "b", "c", "d", "e", "f"]
    np.testing.assert_array_equal(r.dequantize("a"), f32)
    np.testing.assert_array_equal(r.dequantize("b"), f16.astype(np.float32))
    assert r.blob("c") == b"\x00\x01binary\xff"
    expected = np.where(signs, 1.0, -1.0) * np.repeat(scales.astype(np.float32), 128, axis=1)[:, :576]
    np.testing.assert_array_equal(r.dequantize("d"), expected)
    np.testing.assert_array_equal(r.dequantize("e"), expected * mask)
    # int8-group: value = round(w / s) · s with s = fp16(max|w| / 127) per (row, group of 64); error ≤ s / 2.
    values = r.component("f", "values").view(np.int8).reshape(6, 128)
    scales8 = r.component("f", "scales").view("<f2").reshape(6, 2).astype(np.float32)
    np.testing.assert_array_equal(r.dequantize("f"), (values * np.repeat(scales8, 64, axis=1))[:, :100])
    assert (values[:, 100:] == 0).all() and np.abs(values).max() == 127
    assert (np.abs(r.dequantize("f") - int8_source) <= np.repeat(scales8, 64, axis=1)[:, :100] / 2 + 1e-7).all()
    assert r.required_features == stbfile.FEATURE_NM_MASK
    # Components are 64-byte aligned in the file.
    for name in r.tensor_names():
        for comp in r.tensor_info(name)["components"].values():
            assert comp["offset"] % 64 == 0


def test_pack_bits_layout():
    bits = np.zeros((2, 130), dtype=bool)
    bits[0, 0] = bits[0, 63] = bits[0, 64] = bits[1, 129] = True
    words = stbfile.pack_bits(bits)
    assert words.shape == (2, 3)
    assert words[0, 0] == (1 | (1 << 63)) and words[0, 1] == 1 and words[1, 2] == 2
    np.testing.assert_array_equal(stbfile.unpack_bits(words, 130), bits)


def test_bit_report_counts_every_byte(sample_file):
    r = StbReader(sample_file)
    bits = r.metadata["provenance"]["bits"]
    q = r.tensor_info("blk.0.attn_q.weight")["components"]
    k = r.tensor_info("blk.0.attn_k.weight")["components"]
    linear_bytes = sum(c["length"] for c in list(q.values()) + list(k.values()))
    assert bits["linear_weights"] == 6 * 576 + 3 * 200
    assert bits["linear_bits_per_weight"] == pytest.approx(linear_bytes * 8 / bits["linear_weights"], abs=1e-4)
    # Paper convention: one bit per kept sign (half of q is kept, all of k).
    assert bits["paper_bits_per_weight"] == pytest.approx((6 * 576 / 2 + 600) / (6 * 576 + 600), abs=1e-4)
    assert bits["groups"]["masks"]["bytes"] == 6 * 9 * 8


def test_interrupted_write_leaves_no_file(tmp_path, monkeypatch):
    w = StbWriter(_metadata())
    w.add_f32("a", np.ones(1000))
    target = tmp_path / "out.stb"

    def boom(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(stbfile.os, "fsync", boom)
    with pytest.raises(KeyboardInterrupt):
        w.write(target)
    assert list(tmp_path.iterdir()) == []


def test_writer_rejects_bad_input(rng):
    w = StbWriter(_metadata())
    with pytest.raises(ValueError, match="block"):
        w.add_sign_block("x", rng.random((2, 64)) > 0, np.ones((2, 1)), block=100)
    with pytest.raises(ValueError, match="scales"):
        w.add_sign_block("x", rng.random((2, 200)) > 0, np.ones((2, 1)), block=128)
    w.add_f32("y", np.ones(3))
    with pytest.raises(ValueError, match="twice"):
        w.add_f32("y", np.ones(3))


# ---- malformed files -------------------------------------------------------------------------------------------

def _split(path):
    raw = path.read_bytes()
    json_length, data_offset = struct.unpack_from("<QQ", raw, 24)
    header = json.loads(raw[FIXED_HEADER_SIZE:FIXED_HEADER_SIZE + json_length])
    return raw, header, data_offset


def _rebuild(path, header, data, features=None):
    """Re-emits a file with a modified JSON header and valid header checksums, so only the change is wrong."""
    raw = path.read_bytes()
    if features is None:
        features = struct.unpack_from("<Q", raw, 16)[0]
    header_json = json.dumps(header).encode()
    data_offset = stbfile._align(FIXED_HEADER_SIZE + len(header_json))
    body = header_json + b"\0" * (data_offset - FIXED_HEADER_SIZE - len(header_json)) + data
    path.write_bytes(fixed_header(features, header_json, FIXED_HEADER_SIZE + len(body)) + body)


def _tamper(path, tensor, change):
    """Rewrites the file with change(entry, data) applied to one tensor's JSON entry and the data section (a
    bytearray), with every component checksum recomputed, so only the change is wrong. Returns path."""
    raw, header, data_offset = _split(path)
    data = bytearray(raw[data_offset:])
    change(header["tensors"][tensor], data)
    for entry in header["tensors"].values():
        for c in entry["components"].values():
            c["crc32c"] = int(_core.crc32c(bytes(data[c["offset"]:c["offset"] + c["length"]])))
    _rebuild(path, header, bytes(data))
    return path


def _tamper_component(path, tensor, key, edit):
    """Applies edit(bytearray) to the bytes of one component of one tensor (checksums kept valid)."""
    def change(entry, data):
        c = entry["components"][key]
        piece = bytearray(data[c["offset"]:c["offset"] + c["length"]])
        edit(piece)
        data[c["offset"]:c["offset"] + c["length"]] = piece
    return _tamper(path, tensor, change)


def _set_half(index, value):
    """An edit for _tamper_component: fp16 value `value` at half `index`."""
    def edit(buf):
        buf[2 * index:2 * index + 2] = np.array([value], "<f2").tobytes()
    return edit


def _reads(path):
    return StbReader(path)


@pytest.mark.parametrize("tensor", ["blk.0.attn_q.weight", "output.weight"])  # sign-block, int8-group
@pytest.mark.parametrize("value", [b"\x00\x7e", b"\x00\x7c", b"\x00\xfc"])  # NaN, +inf, -inf
def test_non_finite_scales_are_refused_at_open(sample_file, tensor, value):
    StbReader(sample_file)  # untouched, it opens
    _tamper_component(sample_file, tensor, "scales", lambda b: b.__setitem__(slice(2, 4), value))
    with pytest.raises(FormatError, match="scales hold a non-finite value"):
        StbReader(sample_file)


def test_truncation_at_many_offsets(sample_file, tmp_path):
    raw = sample_file.read_bytes()
    offsets = sorted(set([0, 1, 7, 8, 16, 63, 64, 65, 100, len(raw) // 2, len(raw) - 1] +
                         list(range(0, len(raw), max(1, len(raw) // 97)))))
    bad = tmp_path / "truncated.stb"
    for n in offsets:
        if n >= len(raw):
            continue
        bad.write_bytes(raw[:n])
        with pytest.raises(FormatError):
            _reads(bad)


def test_appended_bytes(sample_file):
    sample_file.write_bytes(sample_file.read_bytes() + b"\0" * 64)
    with pytest.raises(FormatError, match="file size"):
        _reads(sample_file)


def test_flipped_bytes_everywhere_are_caught(sample_file, tmp_path):
    raw = bytearray(sample_file.read_bytes())
    bad = tmp_path / "flipped.stb"
    for pos in range(0, len(raw), max(1, len(raw) // 211)):
        mutated = bytearray(raw)
        mutated[pos] ^= 0x10
        bad.write_bytes(bytes(mutated))
        with pytest.raises(FormatError):
            _reads(bad)


def test_flipped_data_byte_names_the_tensor(sample_file):
    raw, header, data_offset = _split(sample_file)
    comp = header["tensors"]["blk.0.attn_q.weight"]["components"]["signs"]
    mutated = bytearray(raw)
    mutated[data_offset + comp["offset"] + 5] ^= 0xFF
    sample_file.write_bytes(bytes(mutated))
    with pytest.raises(FormatError, match="checksum mismatch in tensor 'blk.0.attn_q.weight'"):
        _reads(sample_file)
    StbReader(sample_file, verify_checksums=False)  # the layout itself is still valid


def test_bad_magic_and_version(sample_file):
    raw = bytearray(sample_file.read_bytes())
    sample_file.write_bytes(b"GGUF" + bytes(raw[4:]))
    with pytest.raises(FormatError, match="magic"):
        _reads(sample_file)
    v2 = bytearray(raw)
    v2[12:16] = struct.pack("<I", 2)
    v2[60:64] = struct.pack("<I", stbfile._core.crc32c(bytes(v2[:60])))
    sample_file.write_bytes(bytes(v2))
    with pytest.raises(FormatError, match="version 2"):
        _reads(sample_file)


def test_big_endian_byte_order_mark(sample_file):
    raw = bytearray(sample_file.read_bytes())
    raw[8:12] = struct.pack(">I", stbfile.BYTE_ORDER_MARK)
    sample_file.write_bytes(bytes(raw))
    with pytest.raises(FormatError, match="byte-order"):
        _reads(sample_file)


def test_unknown_required_feature(sample_file):
    raw, header, data_offset = _split(sample_file)
    _rebuild(sample_file, header, raw[data_offset:], features=stbfile.FEATURE_NM_MASK | (1 << 17))
    with pytest.raises(FormatError, match="unknown features"):
        _reads(sample_file)


def test_undeclared_features(sample_file):
    raw, header, data_offset = _split(sample_file)
    _rebuild(sample_file, header, raw[data_offset:], features=0)
    with pytest.raises(FormatError, match="nm_mask"):
        _reads(sample_file)
    header["metadata"]["config"]["sliding_window"] = 16
    _rebuild(sample_file, header, raw[data_offset:], features=stbfile.FEATURE_NM_MASK)
    with pytest.raises(FormatError, match="sliding_window"):
        _reads(sample_file)


def _mutated(sample_file, mutate, match):
    raw, header, data_offset = _split(sample_file)
    mutate(header)
    _rebuild(sample_file, header, raw[data_offset:])
    with pytest.raises(FormatError, match=match):
        _reads(sample_file)


def _comp(header, tensor="blk.0.attn_q.weight", key="signs"):
    return header["tensors"][tensor]["components"][key]


@pytest.mark.parametrize("mutate, match", [
    (lambda h: h["tensors"]["output_norm.weight"].update(codec="stb.q9.v1"), "unknown codec"),
    (lambda h: h["tensors"]["output_norm.weight"].update(shape=[2 ** 31]), "dimension"),
    (lambda h: h["tensors"]["output_norm.weight"].update(shape=[2 ** 30, 2 ** 30, 4]), "too many elements"),
    (lambda h: h["tensors"]["output_norm.weight"].update(shape=[0]), "dimension"),
    (lambda h: h["tensors"]["output_norm.weight"].update(shape=[1, 1, 1, 1, 1]), "1 to 4"),
    (lambda h: h["tensors"]["output_norm.weight"].update(shape=[95]), "need"),
    (lambda h: h["tensors"]["output_norm.weight"].update(shape=-3), "array"),
    (lambda h: _comp(h).update(offset=_comp(h)["offset"] + 64), "hole|overlaps"),
    (lambda h: _comp(h).update(offset=_comp(h, "blk.0.attn_q.weight", "scales")["offset"]), "hole|overlaps"),
    (lambda h: _comp(h, "blk.0.attn_k.weight", "scales").update(offset=_comp(h, "blk.0.attn_k.weight")["offset"]),
     "overlaps"),
    (lambda h: _comp(h).update(offset=2 ** 40), "outside"),
    (lambda h: _comp(h).update(offset=2 ** 63 - 64), "outside"),
    (lambda h: _comp(h).update(offset=3), "aligned"),
    (lambda h: _comp(h).update(length=_comp(h)["length"] + 8), "need"),
    (lambda h: _comp(h).update(offset=-64), "offset"),
    (lambda h: _comp(h).update(crc32c=2 ** 33), "crc32c"),
    (lambda h: _comp(h).update(offset=1.5), "integer"),
    (lambda h: h["tensors"]["blk.0.attn_q.weight"]["components"].pop("mask"), "components"),
    (lambda h: h["tensors"]["blk.0.attn_q.weight"]["params"].update(block=100), "multiple of 64"),
    (lambda h: h["tensors"]["blk.0.attn_q.weight"]["params"].update(block=2 ** 40), "block"),
    (lambda h: h["tensors"]["blk.0.attn_q.weight"]["params"].update(nm=[9, 8]), "nm N"),
    (lambda h: h["tensors"]["blk.0.attn_q.weight"].update(shape=[6, 576, 1]), "2-D"),
    (lambda h: h["tensors"]["output.weight"]["params"].update(group=32), "group"),
    (lambda h: h["tensors"]["output.weight"]["params"].update(bits=4), "unknown param"),
    (lambda h: h["tensors"]["output.weight"].pop("params"), "needs params"),
    (lambda h: h["tensors"]["output.weight"].update(shape=[10, 160]), "need"),
    (lambda h: h["tensors"].pop("token_embd.weight"), "hole"),
    (lambda h: h["tensors"].update({"bad name": h["tensors"].pop("output_norm.weight")}), "name"),
    (lambda h: h.update(extra=1), "exactly"),
    (lambda h: h.update(metadata=[1]), "object"),
])
def test_malformed_table(sample_file, mutate, match):
    _mutated(sample_file, mutate, match)


@pytest.mark.parametrize("text, match", [
    (b'{"metadata": {}, "tensors": {}, "metadata": {}}', "duplicate"),
    (b'{"metadata": {}, "tensors": {}} x', "trailing"),
    (b'[' * 100 + b']' * 100, "nesting"),
    (b'{"metadata": {"a": "\xff"}, "tensors": {}}', "UTF-8"),
    (b'{"metadata": {"a": "\\ud800"}, "tensors": {}}', "surrogate"),
    (b'{"metadata": {"a": 1e999}, "tensors": {}}', "range"),
    (b'{"metadata": {}, "tensors": {', "end of input|unterminated|expected"),
])
def test_malformed_json(tmp_path, text, match):
    path = tmp_path / "bad.stb"
    data_offset = stbfile._align(FIXED_HEADER_SIZE + len(text))
    body = text + b"\0" * (data_offset - FIXED_HEADER_SIZE - len(text))
    path.write_bytes(fixed_header(0, text, FIXED_HEADER_SIZE + len(body)) + body)
    with pytest.raises(FormatError, match=match):
        _reads(path)


def test_empty_and_missing_files(tmp_path):
    (tmp_path / "empty.stb").write_bytes(b"")
    with pytest.raises(FormatError, match="too small"):
        _reads(tmp_path / "empty.stb")
    with pytest.raises(RuntimeError, match="cannot open"):
        _reads(tmp_path / "missing.stb")
    with pytest.raises(RuntimeError, match="not a regular file"):
        _reads(tmp_path)
