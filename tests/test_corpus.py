"""Replays tests/corpus/ (docs/security.md): inputs of the .stb fuzzer — every finding once fixed, and a minimized
corpus of its coverage — through the Python reader and the runtime. Each must load and run, or be refused with a
FormatError; never a crash, a hang or another exception. The CI runs this file against a sanitizer build too."""
from __future__ import annotations

import struct
from pathlib import Path

import pytest

from stbllm_rt import FormatError, Model, StbReader, stbfile

CORPUS = sorted(p for p in (Path(__file__).parent / "corpus").iterdir() if p.is_file())


def repaired(raw: bytes) -> bytes:
    """The fixed header made consistent with the bytes after it (file size, data offset, both checksums), as the
    fuzz target does, so that a mutated file reaches the JSON table and the codecs."""
    raw = bytearray(raw)
    if len(raw) < 64:
        return bytes(raw)
    struct.pack_into("<Q", raw, 40, len(raw))
    (json_length,) = struct.unpack_from("<Q", raw, 24)
    if json_length <= len(raw) - 64:
        struct.pack_into("<Q", raw, 32, stbfile._align(64 + json_length))
        struct.pack_into("<I", raw, 48, stbfile._core.crc32c(bytes(raw[64:64 + json_length])))
    struct.pack_into("<I", raw, 60, stbfile._core.crc32c(bytes(raw[:60])))
    return bytes(raw)


def use_everything(path, verify_checksums: bool = False) -> None:
    """Reads a file with every Python API and generates from it; a problem must surface as a FormatError."""
    try:
        r = StbReader(path, verify_checksums=verify_checksums)
        for name in r.tensor_names():
            if r.tensor_info(name)["codec"] == stbfile.CODEC_BYTES:
                r.blob(name)
            else:
                r.dequantize(name)
        model = Model(path, threads=1, verify_checksums=verify_checksums)
        model.info()
        model.generate([0], max_new_tokens=2, temperature=0.7, top_k=0, seed=1)
    except FormatError:
        pass
    except ValueError as e:  # the runtime's own ValueError: a model whose context cannot take a prompt
        assert "context" in str(e), e


def test_corpus_is_not_empty():
    assert len(CORPUS) > 10


@pytest.mark.parametrize("path", CORPUS, ids=[p.name for p in CORPUS])
def test_corpus_input(path, tmp_path):
    use_everything(path, verify_checksums=True)
    fixed = tmp_path / "repaired.stb"
    fixed.write_bytes(repaired(path.read_bytes()))
    use_everything(fixed)
