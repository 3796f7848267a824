"""The order-0 rANS coder of the binary-groups labels (docs/format.md, label_coder "rans"; engine/format/rans.cpp):
lossless on any symbols, within a header of the order-0 entropy, decoded exactly as the format describes (checked
against a decoder written here from that description), and strict about malformed streams."""
import math
import struct

import numpy as np
import pytest

from stbllm_rt import FormatError, _core
from stbllm_rt.entropy import order0_bits


def spec_decode(stream: bytes, count: int, alphabet: int) -> list[int]:
    """docs/format.md's decoder, one symbol at a time in plain Python."""
    freq = struct.unpack_from(f"<{alphabet}H", stream)
    start = [sum(freq[:s]) for s in range(alphabet + 1)]
    assert start[-1] == 1 << 15
    (x,), pos, out = struct.unpack_from("<I", stream, 2 * alphabet), 2 * alphabet + 4, []
    for _ in range(count):
        slot = x & 0x7FFF
        s = next(s for s in range(alphabet) if start[s] <= slot < start[s + 1])
        out.append(s)
        x = freq[s] * (x >> 15) + slot - start[s]
        while x < 1 << 23:
            x = (x << 8) | stream[pos]
            pos += 1
    assert pos == len(stream) and x == 1 << 23
    return out


CASES = [([0.8, 0.1, 0.1], 20000), ([0.5, 0.5], 777), ([1.0, 0.0, 0.0], 5000), ([0.0, 0.0, 1.0], 3),
         ([0.999, 0.001], 50000), ([1 / 16] * 16, 4096), ([0.6, 0.3, 0.1], 1), ([0.2, 0.8], 0)]


@pytest.mark.parametrize("p, n", CASES)
def test_round_trip_and_spec(p, n):
    symbols = np.random.default_rng(n).choice(len(p), size=n, p=p).astype(np.uint8)
    stream = _core.rans_encode(symbols, len(p))
    np.testing.assert_array_equal(_core.rans_decode(stream, n, len(p)), symbols)
    if n <= 5000:
        assert spec_decode(stream.tobytes(), n, len(p)) == symbols.tolist()


@pytest.mark.parametrize("p, n", [c for c in CASES if c[1] >= 1000])
def test_size_is_the_entropy_plus_a_header(p, n):
    symbols = np.random.default_rng(1).choice(len(p), size=n, p=p).astype(np.uint8)
    stored = _core.rans_encode(symbols, len(p)).size * 8
    bound = order0_bits(symbols)
    header = 8 * (2 * len(p) + 4)
    # the final state's 32 bits carry symbols too; frequencies are counts rounded to 1/2^15, a tiny loss
    assert bound - 32 < stored - header < bound * 1.002 + 32


def _stream(n=3000):
    symbols = np.random.default_rng(5).choice(3, size=n, p=[0.7, 0.2, 0.1]).astype(np.uint8)
    return symbols, _core.rans_encode(symbols, 3)


@pytest.mark.parametrize("edit, count, match", [
    (lambda s: s[:-1], 3000, "ends before its symbols"),
    (lambda s: np.append(s, np.uint8(0)), 3000, "bytes past its symbols"),
    (lambda s: s[:9], 3000, "shorter than its header"),
    (lambda s: s, 2999, "past its symbols|initial state"),
    (lambda s: s, 3001, "ends before|initial state"),
    (lambda s: np.concatenate([[s[0] ^ 1], s[1:]]).astype(np.uint8), 3000, "frequencies sum"),
])
def test_malformed_streams_are_refused(edit, count, match):
    _, stream = _stream()
    with pytest.raises(FormatError, match=match):
        _core.rans_decode(edit(stream), count, 3)


def test_encoder_refuses_bad_input():
    with pytest.raises(ValueError, match="alphabet"):
        _core.rans_encode(np.zeros(4, np.uint8), 1)
    with pytest.raises(ValueError, match="outside the alphabet"):
        _core.rans_encode(np.array([0, 1, 3], np.uint8), 3)


def test_rare_symbols_stay_codable():
    """A symbol seen once among a million still gets frequency >= 1 (else it could not be coded)."""
    symbols = np.zeros(1_000_000, np.uint8)
    symbols[123_456] = 2
    stream = _core.rans_encode(symbols, 3)
    freq = struct.unpack_from("<3H", stream.tobytes())
    assert freq == ((1 << 15) - 1, 0, 1)
    np.testing.assert_array_equal(_core.rans_decode(stream, symbols.size, 3), symbols)
    assert stream.size * 8 < order0_bits(symbols) + 64 + 8 * 10 + math.log2(1 << 15) + 16
