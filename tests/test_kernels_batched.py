"""Batched (GEMM) paths of the int8-activation kernels: stb.sign-block.v1 (the lookup kernel below the batched
kernel's crossover, the batched kernel from there on) and stb.int8-group.v1 (16-row tiles). Every SIMD path follows
the scalar reference's order of float operations, so results must be *bit-identical* to the scalar path for any
number of activation rows — and a row's output must not depend on the batch it was computed in (what keeps
continuous batching token-identical to single requests). tests/test_kernels.py checks the scalar path itself
against numpy."""
import numpy as np
import pytest
from test_kernels import kernels, random_mask  # noqa: F401  (kernels: the per-path fixture)

from stbllm_rt import _core
from stbllm_rt.stbfile import pack_bits

ROW_COUNTS = [1, 2, 3, 7, 8, 9, 33]


def scalar_and_path(monkeypatch, path, make):
    """The same matrix built on the scalar path and on `path` (the backend picks its kernels at construction)."""
    monkeypatch.setenv("STBLLM_KERNELS", "scalar")
    reference = make()
    monkeypatch.setenv("STBLLM_KERNELS", path)
    return reference, make()


def activations(rng, n, cols):
    x = rng.standard_normal((n, cols)).astype(np.float32) * 2
    x[0, : min(cols, 64)] = 0  # an all-zero activation group (scale 0)
    if n > 2:
        x[2] *= 1e-3  # small and large rows side by side
    return x


def assert_batch_bit_identical(reference, lin, x):
    """Bit-identical to the scalar path for the whole batch, and each row alone equals its row in the batch."""
    got = lin.forward(x)
    np.testing.assert_array_equal(got, reference.forward(x))
    for t in {0, len(x) // 2, len(x) - 1}:
        np.testing.assert_array_equal(lin.forward(x[t: t + 1])[0], got[t])


@pytest.mark.parametrize("rows, cols, block", [(40, 576, 128), (17, 1000, 256), (64, 1536, 128), (5, 64, 64),
                                               (33, 4096, 4096)])
@pytest.mark.parametrize("nm", [None, (1, 8), (2, 8), (3, 8), (4, 8), (5, 8), (6, 8), (7, 8), (8, 8), (2, 4)])
def test_sign_block_batched(kernels, monkeypatch, rows, cols, block, nm):
    rng = np.random.default_rng(rows * cols + (nm[0] if nm else 0))
    signs = rng.random((rows, cols)) < 0.5
    mask = random_mask(rng, rows, cols, *nm) if nm else None
    scales = (0.01 + rng.random((rows, -(-cols // block)))).astype(np.float16)
    bias = rng.standard_normal(rows).astype(np.float32)

    def make():
        return _core.Linear("sign-block", rows, cols, signs=pack_bits(signs),
                            mask=None if mask is None else pack_bits(mask), scales=scales.view(np.uint16),
                            block=block, bias=bias, threads=2)

    reference, lin = scalar_and_path(monkeypatch, kernels, make)
    for n in ROW_COUNTS if cols <= 1536 else [1, 9]:
        assert_batch_bit_identical(reference, lin, activations(rng, n, cols))


@pytest.mark.parametrize("nm", [None, (6, 8)])
def test_sign_block_tall_matrix(kernels, monkeypatch, nm):
    """From 2048 rows on, a single activation row takes the lookup kernel on VNNI machines too (its tables then pay
    off), more rows the batched kernel: both bit-identical to the scalar path."""
    rng = np.random.default_rng(5)
    rows, cols = 2080, 192
    signs = rng.random((rows, cols)) < 0.5
    mask = random_mask(rng, rows, cols, *nm) if nm else None
    scales = (0.01 + rng.random((rows, 2))).astype(np.float16)

    def make():
        return _core.Linear("sign-block", rows, cols, signs=pack_bits(signs),
                            mask=None if mask is None else pack_bits(mask), scales=scales.view(np.uint16), threads=2)

    reference, lin = scalar_and_path(monkeypatch, kernels, make)
    for n in [1, 2, 9]:
        assert_batch_bit_identical(reference, lin, activations(rng, n, cols))


@pytest.mark.parametrize("rows, cols", [(16, 64), (33, 576), (7, 1000), (100, 1536)])
def test_int8_group_batched(kernels, monkeypatch, rows, cols):
    rng = np.random.default_rng(rows + cols)
    groups = -(-cols // 64)
    values = np.zeros((rows, groups * 64), np.int8)
    values[:, :cols] = rng.integers(-127, 128, size=(rows, cols))
    values[0, :64] = -128  # the format's int8 admits -128; the unsigned offset must not overflow on it
    values[1, :64] = 127
    scales = (0.001 + 0.01 * rng.random((rows, groups))).astype(np.float16)
    bias = rng.standard_normal(rows).astype(np.float32)

    def make():
        return _core.Linear("int8-group", rows, cols, values=values, scales=scales.view(np.uint16), bias=bias,
                            threads=2)

    reference, lin = scalar_and_path(monkeypatch, kernels, make)
    for n in ROW_COUNTS:
        x = activations(rng, n, cols)
        x[-1, :64] = 127.0  # activations at ±127 against weights at ±127/-128: the largest int products
        x[-1, 1:64:2] = -127.0
        assert_batch_bit_identical(reference, lin, x)


@pytest.mark.parametrize("rows, cols", [(9, 7), (40, 576), (13, 1000)])
def test_f16_batched(kernels, rows, cols):
    """fp16 weights (heads of files without --head-bits): each row's result has the same bits alone and in any
    batch; the sum order differs from the scalar path's, so against numpy within float32 rounding."""
    rng = np.random.default_rng(rows * cols)
    w = rng.standard_normal((rows, cols)).astype(np.float16)
    bias = rng.standard_normal(rows).astype(np.float32)
    lin = _core.Linear("f16", rows, cols, values=w.view(np.uint16), bias=bias, threads=2)
    for n in ROW_COUNTS:
        x = activations(rng, n, cols)
        got = lin.forward(x)
        np.testing.assert_allclose(got, x.astype(np.float64) @ w.astype(np.float64).T + bias, rtol=1e-4, atol=1e-4)
        for t in {0, n // 2, n - 1}:
            np.testing.assert_array_equal(lin.forward(x[t: t + 1])[0], got[t])
