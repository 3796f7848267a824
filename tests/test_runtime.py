"""The C++ runtime on small files written directly with StbWriter (no converter): API behaviour, batching,
determinism, the scalar vs SIMD kernels, and clear errors for files that are well-formed but not a usable model."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import stbllm_rt
from stbllm_rt import FormatError, Model, NoTokenizerError, StbWriter

CONFIG = dict(vocab_size=96, hidden_size=160, intermediate_size=224, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=40, max_position_embeddings=48, norm_type="rms", norm_eps=1e-5,
              hidden_act="silu", mlp_gated=True, position_type="rope", rope_theta=10000.0, sliding_window=None,
              tie_word_embeddings=False, attention_bias=False, mlp_bias=False)
LINEARS = {"attn_q": ("q", "h"), "attn_k": ("kv", "h"), "attn_v": ("kv", "h"), "attn_o": ("h", "q"),
           "ffn_gate": ("i", "h"), "ffn_up": ("i", "h"), "ffn_down": ("h", "i")}


def write_model(path, codec="f16", config=None, drop=(), reshape=None, architecture="llama", seed=0, edit=None):
    """A random LLaMA-shaped .stb. codec: f16 | sign | sign-nm (4:8 masks) | qgroup (3-bit linears and embedding,
    group 32). drop: tensor names to leave out; reshape: {name: shape} to write with a wrong shape; edit: {name:
    function} applied to a dense tensor's values."""
    cfg = dict(CONFIG, **(config or {}))
    rng = np.random.default_rng(seed)
    dims = {"h": cfg["hidden_size"], "q": cfg["num_attention_heads"] * cfg["head_dim"],
            "kv": cfg["num_key_value_heads"] * cfg["head_dim"], "i": cfg["intermediate_size"]}
    w = StbWriter({"architecture": architecture, "config": cfg, "tokenizer": {"kind": "none"}, "provenance": {}})

    def add(name, shape, kind):
        if name in drop:
            return
        shape = (reshape or {}).get(name, shape)
        if kind == "norm":
            w.add_f32(name, 1 + 0.1 * rng.standard_normal(shape))
        elif codec == "qgroup" and name != "output.weight":
            groups = (shape[0], -(-shape[1] // 32))
            w.add_qgroup(name, rng.integers(0, 8, shape), 0.02 * rng.random(groups),
                         -0.07 * rng.random(groups), 3, 32)
        elif kind == "dense" or codec == "f16":
            values = 0.08 * rng.standard_normal(shape)
            w.add_f16(name, (edit or {}).get(name, lambda v: v)(values))
        else:
            signs = rng.random(shape) < 0.5
            scales = 0.02 + 0.05 * rng.random((shape[0], -(-shape[1] // 128)))
            if codec == "sign-nm":
                mask = np.zeros(shape, dtype=bool)
                keep = np.argsort(rng.random((shape[0], -(-shape[1] // 8), 8)), axis=2)[:, :, :4]
                for g in range(keep.shape[1]):
                    cols = g * 8 + keep[:, g, :]
                    rows = np.repeat(np.arange(shape[0])[:, None], 4, axis=1)
                    ok = cols < shape[1]
                    mask[rows[ok], cols[ok]] = True
                w.add_sign_block(name, signs, scales, mask=mask, nm=(4, 8))
            else:
                w.add_sign_block(name, signs, scales)

    add("token_embd.weight", (cfg["vocab_size"], dims["h"]), "dense")
    for i in range(cfg["num_hidden_layers"]):
        add(f"blk.{i}.attn_norm.weight", (dims["h"],), "norm")
        add(f"blk.{i}.ffn_norm.weight", (dims["h"],), "norm")
        for name, (rows, cols) in LINEARS.items():
            add(f"blk.{i}.{name}.weight", (dims[rows], dims[cols]), "linear")
    add("output_norm.weight", (dims["h"],), "norm")
    add("output.weight", (cfg["vocab_size"], dims["h"]), "dense")
    w.write(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("rt")
    return {codec: write_model(d / f"{codec}.stb", codec) for codec in ("f16", "sign", "sign-nm")}


PROMPT = [5, 17, 33, 2, 90, 41, 7]


def test_nan_logits_are_never_sampled_and_all_nan_is_an_error(tmp_path):
    """A NaN logit (here: NaN head rows for the even tokens) must never be chosen, greedy or sampled; when every
    logit is NaN, generation stops with an error instead of returning token 0."""
    def nan_even_rows(v):
        v[0::2] = np.nan
        return v

    m = Model(write_model(tmp_path / "half.stb", edit={"output.weight": nan_even_rows}))
    assert np.isnan(m.logits(PROMPT)[-1][0::2]).all()
    for temperature, top_k, top_p in [(0, 0, 1.0), (1.0, 0, 1.0), (1.5, 20, 0.9)]:
        out = m.generate(PROMPT, max_new_tokens=24, temperature=temperature, top_k=top_k, top_p=top_p, seed=3)
        assert out and all(t % 2 == 1 for t in out), out
    broken = Model(write_model(tmp_path / "nan.stb", edit={"output.weight": lambda v: v * np.nan}))
    with pytest.raises(RuntimeError, match="NaN"):
        broken.generate(PROMPT, max_new_tokens=2, temperature=0)


def test_logits_shape_and_prefix_consistency(tiny):
    m = Model(tiny["f16"], threads=2)
    full = m.logits(PROMPT)
    assert full.shape == (len(PROMPT), CONFIG["vocab_size"]) and full.dtype == np.float32
    assert np.isfinite(full).all()
    # Causality: the logits of a prefix do not depend on what follows it.
    np.testing.assert_allclose(m.logits(PROMPT[:3]), full[:3], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("codec", ["f16", "sign", "sign-nm"])
def test_thread_count_does_not_change_results(tiny, codec):
    one = Model(tiny[codec], threads=1).logits(PROMPT)
    for threads in (3, 8):  # 8 oversubscribes these 2-core machines: slower, never different
        np.testing.assert_array_equal(one, Model(tiny[codec], threads=threads).logits(PROMPT))


def test_models_run_concurrently_from_python_threads(tiny):
    """The GIL is released during compute: two models (each with its own pool) in two Python threads at once."""
    from concurrent.futures import ThreadPoolExecutor

    models = [Model(tiny["sign-nm"], threads=2), Model(tiny["f16"], threads=2)]
    expected = [m.generate(PROMPT, max_new_tokens=10, temperature=0) for m in models]
    with ThreadPoolExecutor(2) as pool:
        for _ in range(3):
            got = list(pool.map(lambda m: m.generate(PROMPT, max_new_tokens=10, temperature=0), models))
            assert got == expected
        # One model shared by several threads: calls are serialized inside, results unchanged.
        shared = list(pool.map(lambda _: models[0].generate(PROMPT, max_new_tokens=10, temperature=0), range(6)))
        assert shared == [expected[0]] * 6


@pytest.mark.parametrize("codec", ["f16", "sign", "sign-nm"])
def test_every_kernel_path_gives_the_same_model(tiny, codec, tmp_path):
    """Whole-model logits with each SIMD path this CPU has, against the portable scalar path (fresh processes:
    STBLLM_KERNELS is read when a model is loaded)."""
    script = ("import sys, numpy as np, stbllm_rt; m = stbllm_rt.Model(sys.argv[1], threads=1); "
              "np.save(sys.argv[2], m.logits([5, 17, 33, 2, 90, 41, 7])); print(m.info()['kernels'])")
    results = {}
    for path in ("scalar", "avx2", "avx512"):
        out = tmp_path / f"{path}.npy"
        env = dict(os.environ, STBLLM_KERNELS=path)
        res = subprocess.run([sys.executable, "-c", script, tiny[codec], str(out)], env=env, capture_output=True,
                             text=True, check=True)
        results[res.stdout.strip()] = np.load(out)
    assert "scalar" in results
    if len(results) == 1:
        pytest.skip("this CPU has no SIMD path; only the portable kernels ran")
    for name, logits in results.items():
        np.testing.assert_allclose(logits, results["scalar"], rtol=1e-4, atol=1e-4, err_msg=name)


def test_greedy_batch_equals_single_sequences(tiny):
    m = Model(tiny["sign"], threads=2)
    prompts = [PROMPT, [3, 4], PROMPT[2:] + [11, 12, 13]]
    singles = [m.generate(p, max_new_tokens=12, temperature=0) for p in prompts]
    batch = m.generate(prompts, max_new_tokens=12, temperature=0)
    assert batch == singles
    assert all(len(s) == 12 for s in singles)


def test_greedy_matches_argmax_of_logits(tiny):
    m = Model(tiny["f16"], threads=2)
    seq = list(PROMPT)
    new = m.generate(seq, max_new_tokens=6, temperature=0)
    for t in new:
        assert t == int(np.argmax(m.logits(seq)[-1]))
        seq.append(t)


def test_sampling_is_reproducible(tiny):
    m = Model(tiny["f16"], threads=2)
    kw = dict(max_new_tokens=16, temperature=1.5, top_k=0, top_p=1.0, min_p=0.0)
    a = m.generate(PROMPT, seed=7, **kw)
    assert a == m.generate(PROMPT, seed=7, **kw)
    others = [m.generate(PROMPT, seed=s, **kw) for s in range(8, 12)]
    assert any(o != a for o in others)


def test_unfiltered_sampling_follows_the_softmax(tiny):
    """No top-k / top-p / min-p (the fast path): first tokens drawn with 1,500 seeds match softmax(logits / T): the
    8 likeliest tokens' frequencies lie within 4.5 standard deviations of their probabilities."""
    m = Model(tiny["f16"], threads=1)
    ids = list(PROMPT)
    logits = m.logits(ids)[-1].astype(np.float64) / 0.5
    p = np.exp(logits - logits.max())
    p /= p.sum()
    kw = dict(max_new_tokens=1, temperature=0.5, top_k=0, top_p=1.0, min_p=0.0, stop_token_ids=[])
    draws = np.array([m.generate(ids, seed=s, **kw)[0] for s in range(1500)])
    empirical = np.bincount(draws, minlength=p.size) / draws.size
    top = np.argsort(p)[::-1][:8]
    assert (np.abs(empirical[top] - p[top]) < 4.5 * np.sqrt(p[top] * (1 - p[top]) / draws.size)).all()
    assert p[draws].min() > 1e-6  # nothing (nearly) impossible was drawn


def test_top_k_one_is_greedy(tiny):
    m = Model(tiny["sign-nm"], threads=2)
    greedy = m.generate(PROMPT, max_new_tokens=8, temperature=0)
    assert m.generate(PROMPT, max_new_tokens=8, temperature=1.0, top_k=1, seed=3) == greedy


def test_stop_token_ends_generation(tiny):
    m = Model(tiny["f16"], threads=2)
    greedy = m.generate(PROMPT, max_new_tokens=8, temperature=0)
    stopped = m.generate(PROMPT, max_new_tokens=8, temperature=0, stop_token_ids=[greedy[2]])
    assert stopped == greedy[:greedy.index(greedy[2]) + 1]


def test_context_length_is_enforced(tiny):
    m = Model(tiny["f16"], threads=1)
    out = m.generate([1] * 40, max_new_tokens=100, temperature=0)
    assert len(out) == CONFIG["max_position_embeddings"] - 40  # stops when the context is full
    with pytest.raises(ValueError, match="context"):
        m.generate([1] * 48, max_new_tokens=1)
    with pytest.raises(ValueError, match="context length"):
        m.logits([1] * 49)


def test_bad_token_ids_and_arguments(tiny):
    m = Model(tiny["f16"], threads=1)
    with pytest.raises((ValueError, IndexError), match="vocabulary"):
        m.logits([1, 96])
    with pytest.raises((ValueError, IndexError), match="vocabulary"):
        m.generate([1, -3], max_new_tokens=2)
    with pytest.raises(ValueError):
        m.generate(PROMPT, max_new_tokens=-1)
    with pytest.raises(ValueError):
        m.generate(PROMPT, top_p=0.0)
    assert m.generate(PROMPT, max_new_tokens=0) == []


def test_text_api_without_tokenizer_is_a_clear_error(tiny):
    m = Model(tiny["f16"], threads=1)
    with pytest.raises(NoTokenizerError, match="no tokenizer"):
        m.generate("hello")
    with pytest.raises(NoTokenizerError):
        m.detokenize([1, 2])


def test_info_reports_sizes_and_bits(tiny):
    info = Model(tiny["sign-nm"], threads=2).info()
    assert info["threads"] == 2
    assert info["codecs"]["stb.sign-block.v1"] == 14
    kv = 2 * CONFIG["num_hidden_layers"] * CONFIG["num_key_value_heads"] * CONFIG["head_dim"] * 2  # fp16 K and V
    assert info["kv_cache"] == "f16" and info["kv_cache_bytes_per_token"] == kv
    assert Model(tiny["sign-nm"], threads=1, kv_cache="f32").info()["kv_cache_bytes_per_token"] == 2 * kv
    with pytest.raises(ValueError, match="kv_cache must be 'f16' or 'f32'"):
        Model(tiny["sign-nm"], kv_cache="q8")
    # Weight bytes held: fp16 tables and f32 norms as stored; binary matrices as stored (scalar path) or in the
    # lookup layout of the SIMD paths (rows padded to tiles of 32, 2 nibble planes, fp16 scales per tile row).
    shapes = [(160, 160), (80, 160), (80, 160), (160, 160), (224, 160), (224, 160), (160, 224)]
    dense = 2 * 2 * 96 * 160 + 4 * 160 * (2 * CONFIG["num_hidden_layers"] + 1)
    if info["kernels"] == "scalar":
        binary = sum(r * -(-c // 64) * 16 + r * -(-c // 128) * 2 for r, c in shapes)
    else:
        binary = sum(-(-r // 32) * 32 * (-(-c // 64) * 64 // 8 * 2 + -(-c // 128) * 2) for r, c in shapes)
    assert info["weight_bytes"] == dense + 2 * binary
    # One mask bit per weight, rows padded to whole 64-bit words (160 -> 192, 224 -> 256 columns): measured honestly.
    padded = sum(r * -(-c // 64) * 64 for r, c in shapes)
    assert info["bits"]["groups"]["masks"]["bits_per_weight"] == pytest.approx(padded / sum(r * c for r, c in shapes),
                                                                               abs=1e-4)


@pytest.mark.parametrize("case, message", [
    (dict(drop=["blk.1.ffn_up.weight"]), "blk.1.ffn_up.weight"),
    (dict(drop=["output.weight"]), "output.weight"),
    (dict(reshape={"blk.0.attn_k.weight": (40, 160)}), "blk.0.attn_k.weight"),
    (dict(reshape={"output_norm.weight": (161,)}), "output_norm.weight"),
    (dict(config={"num_key_value_heads": 3}), "num_key_value_heads"),
    (dict(config={"norm_type": "batch"}), "norm_type"),
    (dict(config={"hidden_act": "gelu"}), "hidden_act"),
    (dict(config={"num_hidden_layers": 0}), "num_hidden_layers"),
    (dict(config={"head_dim": 39}), "head_dim"),
    (dict(architecture="gpt2"), "architecture"),
])
def test_unusable_model_files_are_clear_errors(tmp_path, case, message):
    path = write_model(tmp_path / "bad.stb", **case)
    with pytest.raises(FormatError, match=message.replace(".", r"\.")):
        Model(path, threads=1)


def test_missing_config_key_is_named(tmp_path):
    cfg = dict(CONFIG)
    del cfg["rope_theta"]
    w = StbWriter({"architecture": "llama", "config": cfg, "tokenizer": {"kind": "none"}, "provenance": {}})
    w.add_f32("token_embd.weight", np.zeros((96, 160), np.float32))
    w.write(tmp_path / "m.stb")
    with pytest.raises(FormatError, match="rope_theta"):
        Model(tmp_path / "m.stb")


def test_truncated_file_is_a_clear_error(tiny, tmp_path):
    data = open(tiny["sign"], "rb").read()
    bad = tmp_path / "t.stb"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(FormatError):
        Model(bad)
    with pytest.raises(FileNotFoundError):
        Model(tmp_path / "absent.stb")


def test_tied_embeddings_reuse_the_table(tmp_path):
    path = write_model(tmp_path / "tied.stb", config={"tie_word_embeddings": True}, drop=["output.weight"])
    m = Model(path, threads=1)
    assert np.isfinite(m.logits(PROMPT)).all()
    untied = json.loads(json.dumps(CONFIG))
    assert untied["tie_word_embeddings"] is False
