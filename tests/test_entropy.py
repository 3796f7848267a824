"""The entropy-bound report of stb.binary-groups.v2 files (stbllm_rt/entropy.py): order-0 bounds of hand-made planes
whose entropy is known, stored bits that match the file's bit report, and ratios >= 1 for fixed-width streams."""
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

from stbllm_rt import StbReader, StbWriter  # noqa: E402
from stbllm_rt.entropy import entropy_report, order0_bits  # noqa: E402

from test_binary_groups import NAME, _random_planes  # noqa: E402
from test_format import _metadata  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LINEAR_GROUPS = ("signs", "masks", "labels", "salient_bitmap", "residual_signs", "scales")


def _write(tmp_path, planes, param_scales=None):
    writer = StbWriter(_metadata())
    writer.add_binary_groups(NAME, **planes, param_scales=param_scales)
    path = tmp_path / "g.stb"
    writer.write(path)
    return path


def test_order0_bits_of_known_distributions():
    assert order0_bits(np.zeros(100, np.uint8)) == 0
    assert order0_bits(np.array([0, 1] * 50)) == pytest.approx(100)
    assert order0_bits(np.arange(8).repeat(3)) == pytest.approx(24 * 3)
    assert order0_bits(np.zeros(0)) == 0


def test_random_planes_bounds(tmp_path):
    rows, cols = 64, 576
    planes = _random_planes(np.random.default_rng(0), rows, cols, 3, (6, 8))
    report = entropy_report(_write(tmp_path, planes))
    streams = report["streams"]
    kept = int(planes["mask"].sum())
    # uniform random signs: within 1 % of one bit per kept weight
    assert streams["signs"]["symbols"] == kept
    assert streams["signs"]["bound_bits"] == pytest.approx(kept, rel=0.01)
    # uniform random labels of three regions: close to log2 3 each; the base-3 bytes store 1.6
    labels = streams["labels"]
    assert labels["bound_bits"] == pytest.approx(labels["symbols"] * math.log2(3), rel=0.01)
    # the stored bits are exactly the file's bytes, which the bit report counts
    bits = StbReader(report["file"]).metadata["provenance"]["bits"]["groups"]
    assert report["stored_bits"] == 8 * sum(bits[g]["bytes"] for g in LINEAR_GROUPS if g in bits)
    assert report["weights"] == rows * cols
    # every stream here is a fixed-width code at least as wide as its alphabet needs: stored >= bound
    for key, s in streams.items():
        assert s["ratio"] >= 1, key
        assert s["coder_bits"] <= s["stored_bits"] + 1e-9, key
    # a random N:M mask is near uniform over the C(8, 6) = 28 patterns
    mask = streams["mask"]
    assert mask["uniform_bits"] == pytest.approx(rows * cols / 8 * math.log2(28))
    assert 0.97 * mask["uniform_bits"] < mask["bound_bits"] <= mask["uniform_bits"]
    assert report["simple_bound_bits_per_weight"] == pytest.approx((math.log2(28) + 6) / 8, abs=1e-5)
    assert sum(s["share_of_stored"] for s in streams.values()) == pytest.approx(1, abs=1e-4)


def test_constant_planes_have_zero_entropy(tmp_path):
    rows, cols = 16, 203  # a ragged tail group of 3 columns keeps ceil(5 * 3 / 8) = 2
    planes = _random_planes(np.random.default_rng(1), rows, cols, 3, (5, 8))
    planes["labels"][:] = 2
    keep = np.zeros((rows, cols), dtype=bool)
    keep[:, :200] = np.tile([True] * 5 + [False] * 3, 25)  # the same pattern in every group
    keep[:, 200:202] = True
    planes["mask"] = keep
    streams = entropy_report(_write(tmp_path, planes))["streams"]
    assert streams["labels"]["bound_bits"] == 0 and streams["labels"]["stored_bits"] > 0
    assert streams["mask"]["bound_bits"] == 0 and streams["mask"]["stored_bits"] > 0
    assert streams["mask"]["symbols"] == rows * 25 + rows  # full groups, then one tail group per row


def test_eight_bit_params_are_codes_and_scales(tmp_path):
    planes = _random_planes(np.random.default_rng(2), 8, 256, 2, (4, 8))
    scales = np.full((8, 2 * 2 + 4), 0.5, dtype=np.float16)
    codes = np.random.default_rng(3).integers(-127, 128, planes["params"].shape)
    planes["params"] = (codes * 0.5).astype(np.float16)
    streams = entropy_report(_write(tmp_path, planes, param_scales=scales))["streams"]
    assert streams["param_scales"]["bound_bits"] == 0  # one value everywhere
    alpha = streams["params.region_alpha"]
    assert alpha["stored_bits"] == 8 * alpha["symbols"] and 1 <= alpha["ratio"]


def test_script_prints_the_table_and_writes_json(tmp_path):
    path = _write(tmp_path, _random_planes(np.random.default_rng(4), 16, 128, 2, (6, 8)))
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "entropy_report.py"), str(path), "--json",
                          str(tmp_path / "r.json")], capture_output=True, text=True, check=True).stdout
    assert "signs" in out and "total" in out and (tmp_path / "r.json").exists()
    bad = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "entropy_report.py"), str(tmp_path / "no.stb")],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "entropy_report:" in bad.stderr
