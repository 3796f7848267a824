"""The stb.binary-groups.v2 kernels (scalar reference on the planes; AVX2 and AVX-512 on the repacked codes) against
a numpy dequantization that follows docs/format.md's order of operations, on ragged shapes, every N:M, 1-3 regions
and 0 to all salient columns. Activations stay float32 and every weight is bit-identical to the format's value, so
paths differ from the float64 reference only by float32 summation: |error| <= 1e-5 · Σ_j |w_j·x_j|."""
import numpy as np
import pytest
from test_kernels import kernels, random_mask  # noqa: F401  (kernels: the per-path fixture)

from stbllm_rt import _core
from stbllm_rt.stbfile import pack_bits


def random_groups(rng, rows, cols, block, regions, nm=None, n_salient=0, salient_groups=1):
    """Random planes of one matrix. Signs and labels under pruned weights are random too (the format writes 0 there;
    kernels must not read them). salient_groups 2: each salient weight's group (ARB's column-group bitmap) is random
    and the params hold four more slots per block."""
    keep = random_mask(rng, rows, cols, *nm) if nm else np.ones((rows, cols), bool)
    salient = np.zeros(cols, bool)
    salient[rng.choice(cols, n_salient, replace=False)] = True
    labels = rng.integers(0, regions, size=(rows, cols))
    labels[:, salient] = 0
    blocks = -(-cols // block)
    params = np.empty((rows, blocks, 2 * regions + 4 * salient_groups), np.float16)
    params[..., 0::2] = 0.01 + rng.random(params[..., 0::2].shape)  # alphas
    params[..., 1::2] = rng.standard_normal(params[..., 1::2].shape) * 0.3  # mus
    return dict(signs=rng.random((rows, cols)) < 0.5, keep=keep, labels=labels, salient=salient,
                residual=rng.random((rows, cols)) < 0.5, params=params, block=block, regions=regions,
                salient_labels=rng.random((rows, cols)) < 0.5 if salient_groups == 2 else None)


def dequantize(p):
    """w in float32, with the format's operations: α·s + μ; salient (α₁·s + μ₁) + (α₂·t + μ₂); 0 where pruned."""
    cols = p["signs"].shape[1]
    per_col = np.repeat(p["params"].astype(np.float32), p["block"], axis=1)[:, :cols]
    s = np.where(p["signs"], np.float32(1), np.float32(-1))
    t = np.where(p["residual"], np.float32(1), np.float32(-1))
    alpha = np.take_along_axis(per_col, 2 * p["labels"][..., None], axis=2)[..., 0]
    mu = np.take_along_axis(per_col, 2 * p["labels"][..., None] + 1, axis=2)[..., 0]
    w = alpha * s + mu
    group = np.zeros(p["signs"].shape, np.int64) if p["salient_labels"] is None else p["salient_labels"].astype(np.int64)
    first = 2 * p["regions"] + 4 * group  # α₁ of the weight's salient group

    def slot(k):
        return np.take_along_axis(per_col, (first + k)[..., None], axis=2)[..., 0]
    salient_w = (slot(0) * s + slot(1)) + (slot(2) * t + slot(3))
    w = np.where(p["salient"][None, :], salient_w, w)
    return np.where(p["keep"], w, np.float32(0))


def linear(p, nm, bias=None, threads=2):
    rows, cols = p["signs"].shape
    salient = p["salient"]
    planes = (p["regions"] - 1).bit_length()  # label bit planes of the runtime Matrix
    groups = p["salient_labels"]
    return _core.Linear(
        "binary-groups", rows, cols, signs=pack_bits(p["signs"]), mask=pack_bits(p["keep"]) if nm else None,
        labels=np.stack([pack_bits((p["labels"] >> i) & 1 == 1) for i in range(planes)]) if planes else None,
        salient=pack_bits(salient[None, :])[0],
        residual=pack_bits(p["residual"][:, salient].reshape(1, -1))[0] if salient.any() else None,
        params=p["params"].view(np.uint16), block=p["block"], regions=p["regions"], bias=bias, threads=threads,
        salient_labels=None if groups is None else (
            pack_bits(groups[:, salient].reshape(1, -1))[0] if salient.any() else np.zeros(0, np.uint64)))


def check(p, nm, n, seed, bias=False):
    rng = np.random.default_rng(seed)
    rows, cols = p["signs"].shape
    x = rng.standard_normal((n, cols)).astype(np.float32)
    b = rng.standard_normal(rows).astype(np.float32) if bias else None
    w = dequantize(p).astype(np.float64)
    ref = x.astype(np.float64) @ w.T + (b if bias else 0)
    bound = 1e-5 * (np.abs(x.astype(np.float64)) @ np.abs(w).T) + 1e-6
    got = linear(p, nm, b).forward(x)
    assert np.all(np.abs(got - ref) <= bound), float(np.max(np.abs(got - ref) / bound))


@pytest.mark.parametrize("rows, cols, block", [(7, 64, 64), (33, 576, 128), (16, 1000, 256), (130, 2048, 128),
                                               (5, 200, 128), (3, 4096, 4096), (9, 130, 64), (4, 5, 64)])
@pytest.mark.parametrize("n", [1, 3, 17])
def test_shapes_and_batches(kernels, rows, cols, block, n):
    rng = np.random.default_rng(rows * cols + n)
    p = random_groups(rng, rows, cols, block, regions=3, nm=(6, 8), n_salient=min(cols, 5))
    check(p, (6, 8), n, seed=n, bias=True)


@pytest.mark.parametrize("nm", [(k, 8) for k in range(1, 9)] + [(2, 4), (3, 16), None])
def test_every_nm(kernels, nm):
    rng = np.random.default_rng(sum(map(ord, str(nm))))
    p = random_groups(rng, 24, 576, 128, regions=3, nm=nm, n_salient=9)
    check(p, nm, 5, seed=1)


@pytest.mark.parametrize("regions", [1, 2, 3])
@pytest.mark.parametrize("n_salient", [0, 1, 40, 320])  # 320: every column salient
def test_regions_and_salient_columns(kernels, regions, n_salient):
    rng = np.random.default_rng(regions * 1000 + n_salient)
    p = random_groups(rng, 19, 320, 64, regions=regions, nm=(4, 8), n_salient=n_salient)
    check(p, (4, 8), 2, seed=regions)


def test_codebook_entries_are_bit_exact(kernels):
    """One weight per row against x = e_j reads the weight back: each code's float value equals the format's."""
    rng = np.random.default_rng(5)
    cols = 128
    p = random_groups(rng, 64, cols, 64, regions=3, nm=(7, 8), n_salient=16)
    x = np.eye(cols, dtype=np.float32)
    np.testing.assert_array_equal(linear(p, (7, 8)).forward(x).T, dequantize(p))


def test_repacked_bytes_and_bad_labels(kernels):
    rng = np.random.default_rng(6)
    rows, cols, block = 10, 200, 128  # 200 columns: 4 steps of 64 codes, 2 blocks of 10 params
    p = random_groups(rng, rows, cols, block, regions=3, n_salient=3)
    if kernels != "scalar":  # the SIMD paths hold 4-bit codes and a copy of the params, not the planes
        # AVX2 adds its salient chunks: per block, its salient columns padded to chunks of 8 slots, each slot a
        # 4-bit code per row (after the row's steps; rows padded to 32 bytes) and an int32 column index, each chunk
        # an int32 block index.
        per_block = [p["salient"][b:b + block].sum() for b in range(0, cols, block)]
        slots = sum(-(-k // 8) * 8 for k in per_block) if kernels == "avx2" else 0
        row_bytes = -(-(256 + slots) // 2 // 32) * 32
        assert linear(p, None).weight_bytes == (rows * row_bytes + (rows * 2 * 10 + 16) * 2
                                                + (slots + slots // 8) * 4)
    p["labels"][3, np.flatnonzero(~p["salient"])[0]] = 3  # no region 3 here: its code would alias a salient one
    if kernels != "scalar":
        with pytest.raises(ValueError, match="region label 3"):
            linear(p, None)


@pytest.mark.parametrize("rows, cols, block, nm, n_salient", [
    (7, 64, 64, None, 9), (33, 576, 128, (6, 8), 40), (16, 1000, 256, (4, 8), 77), (5, 200, 128, None, 200),
    (9, 130, 64, (3, 8), 1), (4, 5, 64, (6, 8), 3), (12, 320, 64, (5, 8), 0)])
@pytest.mark.parametrize("regions", [1, 3])
def test_two_salient_groups(kernels, rows, cols, block, nm, n_salient, regions):
    """ARB's column-group bitmap: each salient weight takes the params of its group (ragged blocks, dense and N:M,
    every path); with 1 region the params are 2 + 8 per block, with 3 regions 14."""
    rng = np.random.default_rng(rows * cols + n_salient + regions)
    p = random_groups(rng, rows, cols, block, regions, nm=nm, n_salient=n_salient, salient_groups=2)
    check(p, nm, 3, seed=regions, bias=True)
    check(p, nm, 17, seed=regions + 1)


def test_two_salient_groups_codebook_entries_are_bit_exact(kernels):
    rng = np.random.default_rng(8)
    cols = 192
    p = random_groups(rng, 40, cols, 64, regions=2, nm=(6, 8), n_salient=30, salient_groups=2)
    x = np.eye(cols, dtype=np.float32)
    np.testing.assert_array_equal(linear(p, (6, 8)).forward(x).T, dequantize(p))
