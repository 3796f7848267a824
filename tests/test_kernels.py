"""Every CPU kernel path (scalar, AVX2, AVX-512: whichever this machine has) against a numpy reference of the same
arithmetic, on ragged shapes, every block size and every N:M keep-mask. Binary weights multiply int8 activations
quantized per group of 64 (engine/cpu/kernels.h); the reference quantizes exactly the same way, so the only
difference left is float summation order (tolerance 1e-5 relative)."""
import numpy as np
import pytest

from stbllm_rt import _core
from stbllm_rt.stbfile import pack_bits

PATHS = ["scalar", "avx2", "avx512"]


@pytest.fixture(params=PATHS)
def kernels(request, monkeypatch):
    monkeypatch.setenv("STBLLM_KERNELS", request.param)
    probe = _core.Linear("f32", 1, 1, values=np.ones((1, 1), np.float32), threads=1)
    if probe.kernels != request.param:
        pytest.skip(f"this CPU has no {request.param} path (best available: {probe.kernels})")
    return request.param


def quantize_q8(x):
    """The runtime's activation quantization: groups of 64, round half to even, float32 throughout."""
    n, cols = x.shape
    groups = -(-cols // 64)
    padded = np.zeros((n, groups * 64), np.float32)
    padded[:, :cols] = x
    g = padded.reshape(n, groups, 64)
    amax = np.abs(g).max(axis=2)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), np.float32(0)).astype(np.float32)
    q = np.rint(g * inv[:, :, None]).astype(np.int64)
    return q.reshape(n, groups * 64)[:, :cols], (amax / np.float32(127)).astype(np.float32)


def sign_reference(signs, mask, scales, block, x):
    q, d = quantize_q8(x)
    w = np.where(signs, 1, -1) * (mask if mask is not None else 1)
    cols = x.shape[1]
    deq_x = q * np.repeat(d, 64, axis=1)[:, :cols].astype(np.float64)
    alpha = np.repeat(scales.astype(np.float64), block, axis=1)[:, :cols]
    return deq_x @ (w * alpha).T


def random_mask(rng, rows, cols, n_keep, m):
    keep = rng.random((rows, -(-cols // m), m)).argsort(axis=2) < n_keep
    return keep.reshape(rows, -1)[:, :cols]


@pytest.mark.parametrize("rows, cols, block", [(7, 64, 64), (33, 576, 128), (16, 1000, 256), (130, 2048, 128),
                                               (5, 192, 128), (9, 4096, 4096)])
@pytest.mark.parametrize("n", [1, 3, 17])
def test_sign_block_dense(kernels, rows, cols, block, n):
    rng = np.random.default_rng(rows * cols + n)
    signs = rng.random((rows, cols)) < 0.5
    scales = (0.01 + rng.random((rows, -(-cols // block)))).astype(np.float16)
    x = rng.standard_normal((n, cols)).astype(np.float32) * 3
    x[0, : min(cols, 64)] = 0  # an all-zero activation group
    bias = rng.standard_normal(rows).astype(np.float32)
    lin = _core.Linear("sign-block", rows, cols, signs=pack_bits(signs), scales=scales.view(np.uint16),
                       block=block, bias=bias, threads=2)
    ref = sign_reference(signs, None, scales, block, x) + bias
    np.testing.assert_allclose(lin.forward(x), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("n_keep, m", [(k, 8) for k in range(1, 9)] + [(2, 4), (3, 16)])
def test_sign_block_masked(kernels, n_keep, m):
    rng = np.random.default_rng(n_keep * 100 + m)
    rows, cols, block = 24, 576, 128
    signs = rng.random((rows, cols)) < 0.5
    mask = random_mask(rng, rows, cols, n_keep, m)
    scales = (0.01 + rng.random((rows, cols // 64 // 2 + 1))).astype(np.float16)[:, : -(-cols // block)]
    x = rng.standard_normal((5, cols)).astype(np.float32)
    # Sign bits under a clear mask bit must not count (the format says they are 0; kernels do not rely on it).
    lin = _core.Linear("sign-block", rows, cols, signs=pack_bits(signs), mask=pack_bits(mask),
                       scales=np.ascontiguousarray(scales).view(np.uint16), block=block, threads=3)
    ref = sign_reference(signs, mask, scales, block, x)
    np.testing.assert_allclose(lin.forward(x), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("codec", ["f32", "f16"])
@pytest.mark.parametrize("rows, cols", [(3, 5), (64, 576), (17, 1000)])
def test_dense(kernels, codec, rows, cols):
    rng = np.random.default_rng(rows + cols)
    w = rng.standard_normal((rows, cols)).astype(np.float32 if codec == "f32" else np.float16)
    x = rng.standard_normal((4, cols)).astype(np.float32)
    values = w if codec == "f32" else w.view(np.uint16)
    lin = _core.Linear(codec, rows, cols, values=values, threads=2)
    np.testing.assert_allclose(lin.forward(x), x.astype(np.float64) @ w.astype(np.float64).T, rtol=1e-4,
                               atol=1e-4)


def test_quantization_is_identical_in_every_path(monkeypatch):
    """A weight row of a single +1 in each group reads back q·d exactly: the quantized activations are the same
    bits in every path (so results differ across paths only by float summation order)."""
    rng = np.random.default_rng(7)
    cols = 640
    x = (rng.standard_normal((3, cols)) * 10).astype(np.float32)
    x[1, :64] = np.clip(x[1, :64], -100, 100)
    x[1, :4] = [127.0, 2.5, -3.5, 0.5]  # max 127 -> scale 1: exact ties, which round half to even (2, -4, 0)
    signs = np.zeros((cols, cols), bool)
    mask = np.eye(cols, dtype=bool)
    signs[mask] = True
    scales = np.ones((cols, cols // 64), np.float16)
    q, d = quantize_q8(x)
    assert list(q[1, :4]) == [127, 2, -4, 0]
    expected = q * np.repeat(d, 64, axis=1)
    seen = set()
    for path in PATHS:
        monkeypatch.setenv("STBLLM_KERNELS", path)
        lin = _core.Linear("sign-block", cols, cols, signs=pack_bits(signs), mask=pack_bits(mask),
                           scales=scales.view(np.uint16), block=64, threads=1)
        if lin.kernels in seen:
            continue
        seen.add(lin.kernels)
        np.testing.assert_array_equal(lin.forward(x), expected.astype(np.float32))


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="shape"):
        _core.Linear("sign-block", 4, 100, signs=np.zeros((4, 1), np.uint64), scales=np.zeros((4, 1), np.uint16))
    with pytest.raises(ValueError, match="scales"):
        _core.Linear("sign-block", 4, 100, signs=np.zeros((4, 2), np.uint64))
    lin = _core.Linear("f32", 2, 3, values=np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="shape"):
        lin.forward(np.zeros((1, 4), np.float32))


@pytest.mark.parametrize("rows, cols", [(5, 64), (33, 576), (16, 1000)])
@pytest.mark.parametrize("n", [1, 4])
def test_int8_group(kernels, rows, cols, n):
    rng = np.random.default_rng(rows + cols + n)
    groups = -(-cols // 64)
    values = np.zeros((rows, groups * 64), np.int8)
    values[:, :cols] = rng.integers(-127, 128, size=(rows, cols))
    scales = (0.001 + 0.01 * rng.random((rows, groups))).astype(np.float16)
    x = rng.standard_normal((n, cols)).astype(np.float32)
    bias = rng.standard_normal(rows).astype(np.float32)
    lin = _core.Linear("int8-group", rows, cols, values=values, scales=scales.view(np.uint16), bias=bias,
                       threads=2)
    q, d = quantize_q8(x)
    w = values[:, :cols] * np.repeat(scales.astype(np.float64), 64, axis=1)[:, :cols]
    ref = (q * np.repeat(d, 64, axis=1)[:, :cols].astype(np.float64)) @ w.T + bias
    np.testing.assert_allclose(lin.forward(x), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_int8_extremes_do_not_overflow(kernels):
    """±127 weights against ±127 activations: the int16 pair sums sit at their limit and must not wrap."""
    cols = 128
    values = np.full((2, cols), 127, np.int8)
    values[1] = -127
    x = np.full((1, cols), 5.0, np.float32)
    lin = _core.Linear("int8-group", 2, cols, values=values, scales=np.ones((2, 2), np.float16).view(np.uint16))
    np.testing.assert_allclose(lin.forward(x), [[127 * 5.0 * cols, -127 * 5.0 * cols]], rtol=1e-6)


def _silu64(a):
    a = a.astype(np.float64)
    return a / (1 + np.exp(-a))


@pytest.mark.parametrize("n", [1, 7, 8, 16, 33, 1536 * 3 + 5])
def test_silu_gate_is_bit_identical_on_every_path_and_within_2_ulp(kernels, monkeypatch, n):
    """SiLU gating (engine/cpu/silu.h): every path the same bits as the scalar one, within ~2 ulp of float64."""
    rng = np.random.default_rng(n)
    gate = (rng.standard_normal(n) * 6).astype(np.float32)
    gate[: min(n, 6)] = [0.0, -0.0, 100.0, -100.0, 87.5, -88.5][: min(n, 6)]
    up = rng.standard_normal(n).astype(np.float32)
    got, path = _core.activation(gate, up)
    assert path == kernels
    monkeypatch.setenv("STBLLM_KERNELS", "scalar")
    reference, _ = _core.activation(gate, up)
    np.testing.assert_array_equal(got.view(np.uint32), reference.view(np.uint32))
    np.testing.assert_allclose(got, _silu64(gate) * up, rtol=3e-7, atol=1e-30)
    alone, _ = _core.activation(None, gate)
    np.testing.assert_allclose(alone, _silu64(gate), rtol=3e-7, atol=1e-30)


@pytest.mark.parametrize("n", [1, 7, 49152])
def test_sampler_weights_are_bit_identical_on_every_path(kernels, monkeypatch, n):
    """The sampler's softmax weights e^(l/T - max(l)/T) (engine/cpu/silu.h's exp): the same bits on every path,
    within ~2 ulp of float64, and the most likely token weighs exactly 1."""
    rng = np.random.default_rng(n)
    logits = (rng.standard_normal(n) * 4).astype(np.float32)
    got, path = _core.exp_weights(logits, 0.8)
    assert path == kernels and got.dtype == np.float32 and got[np.argmax(logits)] == 1.0
    monkeypatch.setenv("STBLLM_KERNELS", "scalar")
    np.testing.assert_array_equal(got.view(np.uint32), _core.exp_weights(logits, 0.8)[0].view(np.uint32))
    t = np.float32(0.8)
    argument = logits / t - np.float32(logits.max() / t)  # in float32, as the kernels form it
    np.testing.assert_allclose(got, np.exp(argument.astype(np.float64)), rtol=3e-7, atol=1e-37)


def test_silu_of_special_values(kernels, monkeypatch):
    """+inf stays inf, NaN stays NaN, tiny values halve, huge ones pass or vanish; -inf (a broken model) just gets
    the same bits on every path."""
    x = np.array([np.inf, np.nan, 1e-40, -1e-40, 3.4e38, -3.4e38, -np.inf] * 3, np.float32)
    got, _ = _core.activation(None, x)
    assert got[0] == np.inf and np.isnan(got[1]) and got[4] == x[4] and abs(got[5]) < 1e-30
    np.testing.assert_allclose(got[2:4], x[2:4] / 2, rtol=1e-6)
    monkeypatch.setenv("STBLLM_KERNELS", "scalar")
    np.testing.assert_array_equal(got.view(np.uint32), _core.activation(None, x)[0].view(np.uint32))
    relu, _ = _core.activation(x[:1], np.ones(1, np.float32), silu=False)
    assert relu.tolist() == [np.inf]


@pytest.mark.parametrize("hd, heads, kv_heads, window", [(64, 9, 3, 0), (40, 4, 4, 0), (12, 6, 2, 5)])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("kv_cache", ["f32", "f16"])
def test_attention_matches_softmax_reference(kernels, hd, heads, kv_heads, window, threads, kv_cache):
    """Causal GQA attention against float64 softmax(q kᵀ / √hd) v: head sizes with and without whole SIMD blocks,
    a sliding window, lengths past a multiple of 8, both task splits (per head, per KV-head group), and both KV
    cache types (the fp16 one against keys and values rounded as numpy rounds to float16)."""
    rng = np.random.default_rng(hd + heads)
    n = 37
    q = (rng.standard_normal((n, heads * hd)) * 2).astype(np.float32)
    k = (rng.standard_normal((n, kv_heads * hd)) * 2).astype(np.float32)
    v = rng.standard_normal((n, kv_heads * hd)).astype(np.float32)
    got, path = _core.attention(q, k, v, heads, kv_heads, window, threads, kv_cache)
    assert path == kernels
    if kv_cache == "f16":
        k, v = k.astype(np.float16).astype(np.float32), v.astype(np.float16).astype(np.float32)
    expected = np.zeros((n, heads * hd))
    for i in range(n):
        first = max(0, i - window + 1) if window else 0
        for h in range(heads):
            kvh = h // (heads // kv_heads)
            qh = q[i, h * hd:(h + 1) * hd].astype(np.float64)
            keys = k[first:i + 1, kvh * hd:(kvh + 1) * hd].astype(np.float64)
            s = keys @ qh / np.sqrt(hd)
            p = np.exp(s - s.max())
            expected[i, h * hd:(h + 1) * hd] = (p / p.sum()) @ v[first:i + 1, kvh * hd:(kvh + 1) * hd]
    np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-5)
