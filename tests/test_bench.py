"""stbllm-bench: the model and kernel benchmarks run and report self-consistent numbers (speed targets live in
benchmarks/results, not in tests)."""
import json

import numpy as np
import pytest

from stbllm_rt import Model, bench
from stbllm_rt.stbfile import unpack_bits


def test_model_bench_json_and_vs(tiny_stb, tmp_path, capsys):
    a, b = tiny_stb("llama", "sign", "4:8"), tiny_stb("llama", "fp16")
    out = tmp_path / "r.json"
    assert bench.main([str(a), "-p", "8", "-n", "6", "-r", "2", "--threads", "2", "--vs", str(b), "--json",
                       str(out)]) == 0
    text = capsys.readouterr().out
    assert "decode" in text and "ratio first/second" in text
    result = json.loads(out.read_text())
    assert result["machine"]["read_gb_s"] > 0 and result["date"] and result["command"].startswith("stbllm-bench")
    first, second = result["runs"]
    for r in (first, second):
        assert r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0 and r["ttft_ms"] > 0
        assert r["threads"] == 2 and r["new_tokens"] == 6
    assert first["weight_bytes"] == Model(a).info()["weight_bytes"]
    assert first["weight_bytes"] < second["weight_bytes"]
    assert result["ratios"]["weight_bytes"] == pytest.approx(first["weight_bytes"] / second["weight_bytes"],
                                                             abs=1e-3)
    assert first["memory"]["kv_cache"] == Model(a).info()["kv_cache_bytes_per_token"] * (8 + 6)


def test_model_bench_profile(tiny_stb, capsys, monkeypatch):
    monkeypatch.setenv("STBLLM_PROFILE", "0")  # restored (unset) after the test; the --profile flag sets it
    assert bench.main([str(tiny_stb("opt", "sign")), "-p", "4", "-n", "3", "-r", "1", "--profile"]) == 0
    line = [ln for ln in capsys.readouterr().out.splitlines() if "profile" in ln][0]
    for op in ("linear ffn_up", "linear ffn_down", "attention", "norm", "embed"):
        assert op in line


def test_model_bench_user_errors(tmp_path, capsys):
    assert bench.main([str(tmp_path / "absent.stb")]) == 2
    assert "error" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main([])


def test_kernels_bench(tmp_path, capsys):
    out = tmp_path / "k.json"
    assert bench.main(["kernels", "--shape", "64x576", "--nm", "4:8", "--batch", "2", "--threads", "1",
                       "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["results"]) == {"binary-groups 4:8", "sign-block 4:8", "int8-group", "qgroup q4 g64",
                                      "qgroup q3 g64", "qgroup q2 g64", "f16", "f32"}
    assert result["results"]["int8-group"]["weight_bytes"] == 64 * 9 * (64 + 2)
    q3 = result["results"]["qgroup q3 g64"]  # 3-bit codes + an fp16 scale and offset per 64 weights
    assert q3["weight_bytes"] == 64 * 576 * 3 // 8 + 64 * 9 * 2 * 2 and q3["us"] > 0
    sign = result["results"]["sign-block 4:8"]
    assert sign["weight_bytes"] == 64 * 9 * 8 * 2 + 64 * 5 * 2 and sign["us"] > 0
    groups = result["results"]["binary-groups 4:8"]
    if groups["kernels"] != "scalar":  # the repacked codes (4 bits a weight) and params (10 fp16 per row block)
        assert groups["weight_bytes"] == 64 * 576 // 2 + (64 * 5 * 10 + 16) * 2 and groups["us"] > 0


@pytest.mark.parametrize("n, m", [(4, 8), (6, 8), (1, 4), (3, 16)])
def test_synthetic_masks_are_exact_nm(n, m):
    words = bench.nm_mask_words(np.random.default_rng(0), 5, 200, n, m)
    bits = unpack_bits(words, 256).reshape(5, -1, m)
    assert (bits.sum(axis=2) == n).all()


def test_synthetic_model_runs(tmp_path):
    path = bench.synthetic_model("smollm2-135m", "sign", (6, 8), tmp_path / "s.stb")
    m = Model(path, threads=2)
    info = m.info()
    assert info["config"]["hidden_size"] == 576 and info["codecs"]["stb.sign-block.v1"] == 30 * 7
    assert np.isfinite(m.logits([1, 2, 3])).all()
