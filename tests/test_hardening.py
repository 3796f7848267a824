"""Hostile and broken inputs (docs/security.md): each is a clear, typed error naming what is wrong, and nothing is
lost — .stb fields at their extremes, broken model directories and GGUF files, a converter killed and resumed, a
full disk, one runtime used from many threads."""
from __future__ import annotations

import importlib.util
import json
import os
import random
import resource
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from stbllm_rt import FormatError, Model, StbReader, stbfile
from test_corpus import repaired, use_everything
from test_format import _rebuild, _split, _tamper_component, rng, sample_file  # noqa: F401  (fixtures)


def run_cli(args, capsys):
    from stbllm_convert import cli
    code = cli.main([str(a) for a in args])
    return code, capsys.readouterr().err


# ---- .stb fields at their extremes (those tests/test_format.py does not cover) -------------------------------

def _patch_fixed(path, offset, fmt, value, fix_crc=True):
    raw = bytearray(path.read_bytes())
    struct.pack_into(fmt, raw, offset, value)
    if fix_crc:
        struct.pack_into("<I", raw, 60, stbfile._core.crc32c(bytes(raw[:60])))
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("offset, fmt, value, match", [
    (24, "<Q", 0, "JSON header length"),
    (24, "<Q", 1, "JSON header length"),
    (24, "<Q", 2 ** 64 - 1, "JSON header length"),
    (24, "<Q", (256 << 20) + 1, "JSON header length"),
    (32, "<Q", 0, "data offset"),
    (32, "<Q", 2 ** 64 - 64, "data offset"),
    (40, "<Q", 2 ** 64 - 1, "file size"),
    (40, "<Q", 0, "file size"),
    (48, "<I", 0, "JSON header checksum"),
    (52, "<I", 1, "reserved"),
    (56, "<I", 2 ** 32 - 1, "reserved"),
])
def test_fixed_header_extremes(sample_file, offset, fmt, value, match):
    _patch_fixed(sample_file, offset, fmt, value)
    with pytest.raises(FormatError, match=match):
        StbReader(sample_file)


def _mutated(path, mutate):
    raw, header, data_offset = _split(path)
    mutate(header)
    _rebuild(path, header, raw[data_offset:])


def _tensor(h, name="blk.0.attn_q.weight"):
    return h["tensors"][name]


@pytest.mark.parametrize("mutate, match", [
    (lambda h: _tensor(h)["params"].update(nm=[0, 8]), "nm N"),
    (lambda h: _tensor(h)["params"].update(nm=[4, 65]), "nm M"),
    (lambda h: _tensor(h)["params"].update(nm=[4]), r"\[N, M\]"),
    (lambda h: _tensor(h)["params"].update(nm=[4, 2 ** 63]), "64-bit range|nm M"),
    (lambda h: _tensor(h)["params"].update(block=0), "block"),
    (lambda h: _tensor(h)["params"].update(block=-(2 ** 63)), "block"),
    (lambda h: _tensor(h)["params"].update(block="128"), "block must be a number"),
    (lambda h: _tensor(h)["params"].update(extra=None), "unknown param 'extra'"),
    (lambda h: _tensor(h).update(shape=[6, 2 ** 31 - 1]), "need"),
    (lambda h: _tensor(h).update(shape=[2 ** 20, 2 ** 20]), "need"),
    (lambda h: _tensor(h).update(shape=[True, 576]), "dimension must be a number"),
    (lambda h: _tensor(h).update(shape=[6.0, 576]), "integer"),
    (lambda h: _tensor(h).update(shape=[]), "1 to 4"),
    (lambda h: _tensor(h).update(codec=""), "unknown codec"),
    (lambda h: _tensor(h).update(codec=5), "codec must be a string"),
    (lambda h: _tensor(h).update(note="x"), "unknown field 'note'"),
    (lambda h: _tensor(h)["components"]["signs"].update(length=0), "length"),
    (lambda h: _tensor(h)["components"]["signs"].update(length=2 ** 62 + 1), "length"),
    (lambda h: _tensor(h)["components"]["signs"].update(crc32c=-1), "crc32c"),
    (lambda h: _tensor(h)["components"]["signs"].update(extra=0), "offset, length and crc32c"),
    (lambda h: _tensor(h)["components"].update(bogus=_tensor(h)["components"]["signs"]), "components"),
    (lambda h: _tensor(h)["components"]["signs"].update(offset=2 ** 64), "64-bit range"),
    (lambda h: h["tensors"].update({"x" * 257: h["tensors"].pop("output_norm.weight")}), "tensor name"),
    (lambda h: h["tensors"].update({"": h["tensors"].pop("output_norm.weight")}), "tensor name"),
    (lambda h: h["tensors"].update({"caf\u00e9": h["tensors"].pop("output_norm.weight")}), "tensor name"),
    # Two tensors naming the same bytes: the overlap is found whatever the order of the table.
    (lambda h: _tensor(h, "output_norm.weight").update(
        components={"data": dict(_tensor(h, "output_norm.weight")["components"]["data"],
                                 offset=_tensor(h, "token_embd.weight")["components"]["data"]["offset"])}),
     "overlaps|hole"),
    (lambda h: h.update(tensors=[]), "tensors must be an object"),
    (lambda h: h["metadata"].update(blob="x" * (1 << 20)), None),  # a large header is fine
])
def test_table_extremes(sample_file, mutate, match):
    _mutated(sample_file, mutate)
    if match is None:
        assert StbReader(sample_file).metadata["blob"] == "x" * (1 << 20)
        return
    with pytest.raises(FormatError, match=match):
        StbReader(sample_file)


def test_header_with_too_many_values_is_refused(tmp_path):
    """~270 bytes per parsed value at peak: a 2 MB header of zeros took 275 MB. The value count is capped."""
    text = b'{"metadata":{"a":[' + b"0," * (1 << 18) + b'0]},"tensors":{}}'
    path = tmp_path / "many.stb"
    data_offset = stbfile._align(stbfile.FIXED_HEADER_SIZE + len(text))
    body = text + b"\0" * (data_offset - stbfile.FIXED_HEADER_SIZE - len(text))
    path.write_bytes(stbfile.fixed_header(0, text, stbfile.FIXED_HEADER_SIZE + len(body)) + body)
    with pytest.raises(FormatError, match="more than 262144 values"):
        StbReader(path)


def test_tensor_table_order_does_not_matter(sample_file):
    """Components tile the data section by offset; the order of the JSON table is free (it is an object)."""
    raw, header, data_offset = _split(sample_file)
    header["tensors"] = dict(reversed(list(header["tensors"].items())))
    _rebuild(sample_file, header, raw[data_offset:])
    r = StbReader(sample_file)
    assert set(r.tensor_names()) == set(header["tensors"])


def _set_tokenizer(spec):
    return lambda h: h["metadata"].update(tokenizer=spec(h["metadata"]["tokenizer"]))


@pytest.mark.parametrize("mutate", [
    _set_tokenizer(lambda t: 5),
    _set_tokenizer(lambda t: {**t, "kind": "bpe"}),
    _set_tokenizer(lambda t: {k: v for k, v in t.items() if k != "blob"}),
    _set_tokenizer(lambda t: {**t, "blob": "output_norm.weight"}),
    _set_tokenizer(lambda t: {**t, "eos_token_ids": "2"}),
    _set_tokenizer(lambda t: {**t, "eos_token_ids": [2.5]}),
    _set_tokenizer(lambda t: {**t, "bos_token_id": "1"}),
    _set_tokenizer(lambda t: {**t, "chat_template": ["x"]}),
    _set_tokenizer(lambda t: {**t, "kind": "sentencepiece"}),  # a tokenizer.json blob read as sentencepiece
])
def test_unusable_tokenizer_metadata_is_a_format_error(tiny_stb, tmp_path, mutate):
    path = tmp_path / "m.stb"
    shutil.copy(tiny_stb("llama"), path)
    _mutated(path, mutate)
    with pytest.raises(FormatError, match="metadata.tokenizer"):
        Model(path, threads=1)


def test_corrupt_tokenizer_blob_is_a_format_error(tiny_stb, tmp_path):
    path = tmp_path / "m.stb"
    shutil.copy(tiny_stb("llama"), path)
    raw, header, data_offset = _split(path)
    blob = header["tensors"]["tokenizer.data"]["components"]["data"]
    data = bytearray(raw[data_offset:])
    data[blob["offset"]:blob["offset"] + blob["length"]] = b"{" * blob["length"]
    blob["crc32c"] = stbfile._core.crc32c(bytes(data[blob["offset"]:blob["offset"] + blob["length"]]))
    _rebuild(path, header, bytes(data))
    with pytest.raises(FormatError, match="metadata.tokenizer is unusable"):
        Model(path, threads=1)


# ---- broken model inputs to the converter: a one-line error, exit status 2, an existing output untouched -----------

def _safetensors_parts(path):
    raw = path.read_bytes()
    (n,) = struct.unpack_from("<Q", raw, 0)
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _write_safetensors(path, header, data):
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def _model_copy(src, dst, skip=()):
    dst.mkdir()
    for f in src.iterdir():
        if f.name not in skip:
            shutil.copy(f, dst / f.name)
    return dst


def _lying_header(folder):
    header, data = _safetensors_parts(folder / "model.safetensors")
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = [2 ** 40, 2 ** 20]  # the offsets still say a few KB
    _write_safetensors(folder / "model.safetensors", header, data)


def _offsets_past_end(folder):
    header, data = _safetensors_parts(folder / "model.safetensors")
    name = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    begin, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [begin, end + 2 ** 40]
    _write_safetensors(folder / "model.safetensors", header, data)


def _truncated_data(folder):
    raw = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(raw[: len(raw) * 2 // 3])


def _sharded(folder, weight_map):
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _index_names_missing_shard(folder):
    header, _ = _safetensors_parts(folder / "model.safetensors")
    names = [k for k in header if k != "__metadata__"]
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    _sharded(folder, {n: f"model-0000{1 + i % 2}-of-00002.safetensors" for i, n in enumerate(names)})


def _index_escapes_the_directory(folder):
    header, _ = _safetensors_parts(folder / "model.safetensors")
    _sharded(folder, {n: "../../model.safetensors" for n in header if n != "__metadata__"})


def _index_not_an_object(folder):
    _sharded(folder, ["model.safetensors"])


def _corrupt(name, data):
    def corrupt(folder):
        (folder / name).write_bytes(data)
    return corrupt


@pytest.mark.parametrize("arch, breaks, message", [
    ("llama", _lying_header, "cannot read"),
    ("llama", _offsets_past_end, "cannot read"),
    ("llama", _truncated_data, "cannot read"),
    ("llama", _index_names_missing_shard, "model-00002-of-00002.safetensors is missing"),
    ("llama", _index_escapes_the_directory, "not a file name in the model directory"),
    ("llama", _index_not_an_object, "weight_map"),
    ("llama", _corrupt("tokenizer.json", b'{"model": {"type": "BPE", "vocab": 3}}'), "not a valid tokenizer.json"),
    ("llama", _corrupt("tokenizer.json", b"\xff\xfe"), "tokenizer.json"),
    ("llama", _corrupt("tokenizer_config.json", b"{"), "cannot read"),
    ("mistral", _corrupt("tokenizer.model", b"\x0a\x03abc" * 10), "not a valid sentencepiece model"),
    ("llama", _corrupt("config.json", b'{"model_type": "mamba", "architectures": ["MambaForCausalLM"]}'),
     "unsupported architecture"),
    ("llama", _corrupt("config.json", b"[1, 2]"), "not a JSON object"),
])
def test_broken_model_directories(tiny_hf_models, tmp_path, capsys, arch, breaks, message):
    folder = _model_copy(tiny_hf_models[arch], tmp_path / "model")
    breaks(folder)
    out = tmp_path / "out.stb"
    out.write_bytes(b"previous output")
    code, err = run_cli([folder, "-o", out, "--method", "sign", "-q"], capsys)
    assert code == 2 and message in err, err
    assert err.startswith("stbllm-convert: error:") and len(err.strip().splitlines()) == 1, err
    assert out.read_bytes() == b"previous output"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "out.stb"]


def _tiny_gguf(path):
    import gguf
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(8)
    w.add_embedding_length(8)
    w.add_feed_forward_length(8)
    w.add_head_count(2)
    w.add_tensor("token_embd.weight", np.ones((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    raw = bytearray(path.read_bytes())
    return raw, raw.find(b"token_embd.weight") + len(b"token_embd.weight")  # n_dims (u32), then dims (u64 each)


@pytest.mark.parametrize("patch", [
    lambda raw, at: struct.pack_into("<QQ", raw, at + 4, 2 ** 40, 2 ** 30),  # 2^70 elements
    lambda raw, at: struct.pack_into("<QQ", raw, at + 4, 2 ** 64 - 1, 2 ** 64 - 1),
    lambda raw, at: struct.pack_into("<I", raw, at, 2 ** 31 - 1),  # n_dims
    lambda raw, at: struct.pack_into("<Q", raw, 8, 2 ** 62),  # tensor count
])
def test_gguf_with_absurd_dims(tmp_path, capsys, patch):
    raw, dims_at = _tiny_gguf(tmp_path / "m.gguf")
    patch(raw, dims_at)
    (tmp_path / "m.gguf").write_bytes(bytes(raw))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    code, err = run_cli([tmp_path / "m.gguf", "-o", tmp_path / "out.stb", "-q"], capsys)
    assert code == 2 and "cannot load" in err and len(err.strip().splitlines()) == 1, err
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 512 * 1024  # KiB: no huge allocation
    assert not (tmp_path / "out.stb").exists()


# ---- property-based: the Python reader and the converter's own readers on mutated inputs ---------------------------

PROPERTY = settings(max_examples=60, derandomize=True, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _seeds(tmp_path_factory, *makers):
    """The fuzzer's seeds (fuzz/make_seeds.py) that the named functions make, as bytes by file name."""
    path = Path(__file__).parent.parent / "fuzz" / "make_seeds.py"
    spec = importlib.util.spec_from_file_location("make_seeds", path)
    make_seeds = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_seeds)
    out = tmp_path_factory.mktemp("seeds")
    rng = np.random.default_rng(0)
    for maker in makers:
        getattr(make_seeds, maker)(out, *(() if maker == "model_files" else (rng,)))
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


@pytest.fixture(scope="module")
def seed_files(tmp_path_factory):
    """One small file per codec and tiny models."""
    return _seeds(tmp_path_factory, "codec_files", "model_files")


@pytest.fixture(scope="module")
def salient_group_seeds(tmp_path_factory):
    """Binary-groups files with two salient groups."""
    return _seeds(tmp_path_factory, "salient_group_files")


@PROPERTY
@given(data=st.data())
def test_python_reader_on_flipped_bytes(seed_files, tmp_path, data):
    """Bytes of the data section changed (the JSON header has its own test below, the fixed header the tests
    above): the codecs' streams hold what their lengths cannot express (mask codes, label bytes, padding)."""
    _flip_bytes_and_use(seed_files, tmp_path, data)


@PROPERTY
@given(data=st.data())
def test_python_reader_on_flipped_bytes_of_two_salient_groups(salient_group_seeds, tmp_path, data):
    _flip_bytes_and_use(salient_group_seeds, tmp_path, data)


def _flip_bytes_and_use(files, tmp_path, data):
    raw = bytearray(files[data.draw(st.sampled_from(sorted(files)))])
    (data_offset,) = struct.unpack_from("<Q", raw, 32)
    for _ in range(data.draw(st.integers(1, 6))):
        raw[data.draw(st.integers(data_offset, len(raw) - 1))] ^= data.draw(st.integers(1, 255))
    path = tmp_path / "mutated.stb"
    path.write_bytes(repaired(raw))
    use_everything(path)


json_values = st.recursive(st.none() | st.booleans() | st.integers(-2 ** 63, 2 ** 64) | st.floats(allow_nan=False)
                           | st.text(max_size=8), lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)


def _paths(node, prefix=()):
    yield prefix
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in children:
        yield from _paths(child, prefix + (key,))


@PROPERTY
@given(data=st.data())
def test_python_reader_on_replaced_json_values(seed_files, tmp_path, data):
    """Any value of the JSON header (a field, a shape, the tokenizer spec, a whole tensor entry) replaced by any
    JSON value: the file is refused with a FormatError or works."""
    path = tmp_path / "seed.stb"
    path.write_bytes(seed_files[data.draw(st.sampled_from(sorted(seed_files)))])
    raw, header, data_offset = _split(path)
    where = data.draw(st.sampled_from(list(_paths(header))[1:]))
    parent = header
    for key in where[:-1]:
        parent = parent[key]
    parent[where[-1]] = data.draw(json_values)
    _rebuild(path, header, raw[data_offset:])
    use_everything(path)


@PROPERTY
@given(header_value=json_values, where=st.sampled_from(["shape", "dtype", "data_offsets", "entry", "metadata"]))
def test_safetensors_header_values(tiny_hf_models, tmp_path, header_value, where):
    """A safetensors header with any value in any field: HFDirSource reads the tensors or raises ConvertError."""
    from stbllm_convert.errors import ConvertError
    from stbllm_convert.source import HFDirSource

    folder = tmp_path / "model"
    shutil.rmtree(folder, ignore_errors=True)
    _model_copy(tiny_hf_models["llama"], folder)
    header, data = _safetensors_parts(folder / "model.safetensors")
    name = sorted(k for k in header if k != "__metadata__")[0]
    if where == "entry":
        header[name] = header_value
    elif where == "metadata":
        header["__metadata__"] = header_value
    else:
        header[name][where] = header_value
    _write_safetensors(folder / "model.safetensors", header, data)
    try:
        with HFDirSource(folder) as src:
            for n in src.names():
                src.tensor(n)
    except ConvertError:
        pass


@settings(PROPERTY, max_examples=25)
@given(data=st.data())
def test_gguf_flipped_bytes(tmp_path, capsys, data):
    """A mutated GGUF file fails with the one-line error (the tiny file lacks what a model needs, so every mutation
    ends in some reader's error path); nothing else escapes the converter."""
    raw, _ = _tiny_gguf(tmp_path / "m.gguf")
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(0, len(raw) - 1))] ^= data.draw(st.integers(1, 255))
    (tmp_path / "m.gguf").write_bytes(bytes(raw))
    code, err = run_cli([tmp_path / "m.gguf", "-o", tmp_path / "out.stb", "-q"], capsys)
    assert code == 2 and err.startswith("stbllm-convert: error:") and len(err.strip().splitlines()) == 1, err


# ---- conversions killed and resumed, full disks, reproducible files ---------------------------------------------

EPOCH = "1700000000"


@pytest.fixture(scope="module")
def small_llama(tmp_path_factory, tiny_tokenizer_dir):
    """A 3-layer LLaMA small enough (hidden 64) that a calibrated conversion takes about a second, and its
    calibration text."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.set_num_threads(1)  # as test_convert does: 2-core CI machines, and results must not depend on it
    folder = tmp_path_factory.mktemp("small-llama")
    config = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=64,
                         bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(str(folder / "model"))
    for f in tiny_tokenizer_dir.iterdir():
        shutil.copy(f, folder / "model" / f.name)
    from conftest import CORPUS
    (folder / "calib.txt").write_text("\n".join(CORPUS * 3))
    return folder


def _calibrated_args(small_llama, out, work):
    return [small_llama / "model", "-o", out, "--method", "stbllm", "--nm", "6:8", "--calib", small_llama / "calib.txt",
            "--calib-samples", "4", "--calib-seqlen", "32", "--seed", "3", "--work-dir", work, "-q"]


@pytest.fixture(scope="module")
def reference_stb(small_llama, tmp_path_factory):
    """An uninterrupted reproducible conversion (SOURCE_DATE_EPOCH), the bytes every resumed run must match."""
    from stbllm_convert import cli
    out = tmp_path_factory.mktemp("reference") / "ref.stb"
    os.environ["SOURCE_DATE_EPOCH"] = EPOCH
    try:
        assert cli.main([str(a) for a in _calibrated_args(small_llama, out, out.parent / "work")]) == 0
    finally:
        del os.environ["SOURCE_DATE_EPOCH"]
    return out.read_bytes()


class Killed(BaseException):
    """Stands for SIGKILL in-process: no handler catches it, nothing is cleaned up."""


@pytest.mark.parametrize("dies_at_save", [1, 2, 6])
def test_resume_after_death_at_every_checkpoint(small_llama, reference_stb, tmp_path, monkeypatch, capsys,
                                                dies_at_save):
    """The conversion dies while writing its n-th checkpoint file (half of it on disk: 1 = layer 0's results, 2 =
    layer 1's inputs), or once the .stb is written but not yet renamed (6, after the 3 layers' 6 checkpoint files):
    --resume completes it with exactly the reference bytes."""
    import torch
    real_save, saves = torch.save, []

    def dying_save(payload, path, *args, **kwargs):
        saves.append(path)
        if len(saves) == dies_at_save + 1:
            open(path, "wb").write(b"half a checkpoint")
            raise Killed
        return real_save(payload, path, *args, **kwargs)

    real_fsync = stbfile.os.fsync

    def dying_fsync(fd):  # after the 6 checkpoints of 3 layers: the .stb is written, about to be renamed
        if dies_at_save == 6:
            raise Killed
        real_fsync(fd)

    monkeypatch.setenv("SOURCE_DATE_EPOCH", EPOCH)
    monkeypatch.setattr(torch, "save", dying_save)
    monkeypatch.setattr(stbfile.os, "fsync", dying_fsync)
    out, work = tmp_path / "out.stb", tmp_path / "work"
    with pytest.raises(Killed):
        run_cli(_calibrated_args(small_llama, out, work), capsys)
    assert not out.exists()
    monkeypatch.setattr(torch, "save", real_save)
    monkeypatch.setattr(stbfile.os, "fsync", real_fsync)
    code, err = run_cli(_calibrated_args(small_llama, out, work) + ["--resume"], capsys)
    assert code == 0, err
    assert out.read_bytes() == reference_stb


def test_sigkill_at_a_random_point_then_resume(small_llama, reference_stb, tmp_path, capsys):
    """A real SIGKILL at a (seeded) random moment of the calibration: no .stb or temporary file at the output path,
    and --resume gives the reference bytes."""
    rng = random.Random(9)
    out, work = tmp_path / "out" / "model.stb", tmp_path / "work"
    out.parent.mkdir()
    env = dict(os.environ, SOURCE_DATE_EPOCH=EPOCH, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "stbllm_convert", *map(str, _calibrated_args(small_llama, out, work))]
    proc = subprocess.Popen(command, env=env, stderr=subprocess.PIPE)
    trigger = work / f"layer-{rng.randrange(2):04d}.pt"
    deadline = time.monotonic() + 120
    while not trigger.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.001)
    time.sleep(rng.uniform(0, 0.05))
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL, "the conversion finished before the kill"
    assert list(out.parent.iterdir()) == []
    os.environ["SOURCE_DATE_EPOCH"] = EPOCH
    try:
        code, err = run_cli(_calibrated_args(small_llama, out, work) + ["--resume"], capsys)
    finally:
        del os.environ["SOURCE_DATE_EPOCH"]
    assert code == 0, err
    assert out.read_bytes() == reference_stb


def test_same_seed_same_bytes_and_generations(small_llama, reference_stb, tmp_path, capsys, monkeypatch):
    """Two reproducible conversions (no work directory) give the reference bytes; without SOURCE_DATE_EPOCH only
    the provenance's date and timings differ. The same seed gives the same generation."""
    monkeypatch.setenv("SOURCE_DATE_EPOCH", EPOCH)
    args = _calibrated_args(small_llama, tmp_path / "a.stb", tmp_path / "w")[:-3] + ["-q"]  # no --work-dir
    assert run_cli(args, capsys)[0] == 0
    assert (tmp_path / "a.stb").read_bytes() == reference_stb
    monkeypatch.delenv("SOURCE_DATE_EPOCH")
    args[2] = tmp_path / "b.stb"
    assert run_cli(args, capsys)[0] == 0
    a, b = StbReader(tmp_path / "a.stb"), StbReader(tmp_path / "b.stb")
    for name in a.tensor_names():
        np.testing.assert_array_equal(a.component(name, next(iter(a.tensor_info(name)["components"]))),
                                      b.component(name, next(iter(b.tensor_info(name)["components"]))))
    assert "seconds" in b.metadata["provenance"] and "seconds" not in a.metadata["provenance"]
    assert a.metadata["provenance"]["date"] == "2023-11-14T22:13:20+00:00"
    model_a, model_b = Model(tmp_path / "a.stb", threads=1), Model(tmp_path / "b.stb", threads=2)
    prompt = "The capital of France is"
    assert model_a.generate(prompt, max_new_tokens=12, seed=5) == model_b.generate(prompt, max_new_tokens=12, seed=5)
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "yesterday")
    code, err = run_cli(args, capsys)
    assert code == 2 and "SOURCE_DATE_EPOCH" in err


@pytest.fixture
def small_disk(tmp_path):
    """A 384 KiB tmpfs (needs root; skipped elsewhere)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=384k", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root (mount -t tmpfs); the full-disk case is not run here")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_full_disk_is_a_clear_error_and_keeps_the_previous_output(small_llama, small_disk, capsys):
    out = small_disk / "model.stb"
    previous = b"previous output" * 10000  # 150 KB: the new file (278 KB) does not fit beside it
    out.write_bytes(previous)
    code, err = run_cli([small_llama / "model", "-o", out, "--method", "fp16", "-q"], capsys)
    assert code == 2 and "No space left on device" in err and len(err.strip().splitlines()) == 1, err
    assert out.read_bytes() == previous
    assert sorted(p.name for p in small_disk.iterdir()) == ["model.stb"]


# ---- one runtime under load: many threads, many models, a model closed while in use -------------------------------

@pytest.fixture(scope="module")
def runtime_files(tmp_path_factory):
    import test_runtime
    d = tmp_path_factory.mktemp("load")
    return {codec: test_runtime.write_model(d / f"{codec}.stb", codec) for codec in ("f16", "sign-nm")}


PROMPT = [5, 17, 33, 2, 90, 41, 7]


def _tasks(model):
    """Calls of every kind, each with a fixed answer: logits, sampled and greedy generation, a batch, a stream."""
    return [lambda: model.logits(PROMPT).tobytes(),
            *[lambda s=s: model.generate(PROMPT, max_new_tokens=8, temperature=0.9, seed=s) for s in range(3)],
            lambda: model.generate([PROMPT, PROMPT[:3]], max_new_tokens=6, temperature=0),
            lambda: list(model.generate(PROMPT, max_new_tokens=6, stream=True, seed=11))]


def test_one_model_shared_by_many_threads(runtime_files):
    model = Model(runtime_files["sign-nm"], threads=2)
    tasks = _tasks(model)
    expected = [t() for t in tasks]
    with ThreadPoolExecutor(6) as pool:
        got = list(pool.map(lambda i: tasks[i % len(tasks)](), range(4 * len(tasks))))
    assert got == expected * 4


def test_several_models_in_one_process(runtime_files):
    models = [Model(path, threads=1) for path in runtime_files.values() for _ in range(2)]
    expected = [m.logits(PROMPT).tobytes() for m in models]
    assert expected[0] == expected[1] and expected[2] == expected[3] and expected[0] != expected[2]
    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(lambda m: m.logits(PROMPT).tobytes(), models * 3)) == expected * 3


def test_model_closed_while_another_thread_uses_it(runtime_files):
    """Calls running when the model is closed finish with the right answer (they hold the weights); calls made
    after it raise ValueError. Nothing crashes and nothing returns garbage."""
    model = Model(runtime_files["f16"], threads=1)
    expected_logits = model.logits(PROMPT)
    expected_stream = list(model.generate(PROMPT, max_new_tokens=30, stream=True, seed=4))
    stream = model.generate(PROMPT, max_new_tokens=30, stream=True, seed=4)
    first = next(stream)  # a generation in flight
    outcomes, started = [], threading.Event()

    def hammer():  # logits in a loop until the close is seen
        started.set()
        while not outcomes or outcomes[-1] != "closed":
            try:
                outcomes.append(np.array_equal(model.logits(PROMPT), expected_logits))
            except ValueError as e:
                outcomes.append("closed" if "closed" in str(e) else e)
    worker = threading.Thread(target=hammer)
    worker.start()
    started.wait()
    model.close()
    rest = list(stream)
    worker.join()
    assert [first, *rest] == expected_stream
    assert outcomes[-1] == "closed" and all(o is True for o in outcomes[:-1])
    for call in (lambda: model.logits(PROMPT), lambda: model.generate(PROMPT), model.info):
        with pytest.raises(ValueError, match="closed"):
            call()
    with Model(runtime_files["f16"], threads=1) as again:
        assert np.array_equal(again.logits(PROMPT), expected_logits)


@pytest.mark.parametrize("key", ["row_scales", "col_scales", "residual_row_scales", "residual_col_scales",
                                 "group1_row_scales", "group1_residual_col_scales"])
def test_non_finite_row_col_scales_are_refused_at_open(tmp_path, key):
    """A NaN scale would only surface as NaN logits at generation: the reader refuses it at open."""
    pytest.importorskip("torch")
    from test_arb import _random_rowcol, _write
    path = _write(tmp_path / "rc.stb", {"w": _random_rowcol(groups=2 if key.startswith("group1_") else 1)})
    StbReader(path)
    _tamper_component(path, "w", key, lambda b: b.__setitem__(slice(0, 2), b"\x00\x7e"))
    with pytest.raises(FormatError, match=f"{key} hold a non-finite value"):
        StbReader(path)

