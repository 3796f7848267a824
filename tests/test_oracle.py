"""The C++ runtime against the oracle: the Hugging Face `transformers` model rebuilt from the same .stb file's
dequantized weights (stbllm_convert.oracle), with the runtime's int8 activation quantization mirrored on the
binary layers. Both compute in float32 on identical weights.

Tolerances (max |runtime − oracle| over the logit range): fp16 files 2e-4 (they differ only by summation order;
measured ~1e-6). Binary files 3e-2: usually they agree to ~1e-7 too, but float-order noise can move an activation
across an int8 rounding boundary, and one flipped step (1/127 of its group's max) then shows in that position's
logits and, through the KV cache, in later ones (measured up to 1e-2). Argmax agreement ≥ 95 % everywhere, and
greedy generations (fp16) token-identical. These comparisons run with a float32 KV cache (exact keys and values);
the default fp16 cache rounds them to 11 significant bits, measured up to 6e-4 of the logit range on the tiny
models: its own test allows 2e-3.
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from stbllm_convert.oracle import build_hf_model  # noqa: E402
from stbllm_rt import Model, StbReader, StbWriter  # noqa: E402

CASES = [("fp16", None), ("sign", None), ("sign", "4:8"), ("sign", "6:8")]
TOLERANCE = {"fp16": 2e-4, "sign": 3e-2, "fp16 weights, fp16 KV cache": 2e-3}


def recode(src_path, dst_path, metadata=None, int8=()):
    """A copy of an .stb file with other metadata and/or the named tensors re-stored as stb.int8-group.v1."""
    src = StbReader(src_path)
    meta = dict(metadata or src.metadata)
    meta.pop("provenance", None)
    w = StbWriter(meta)
    for name in src.tensor_names():
        info = src.tensor_info(name)
        if name in int8:
            w.add_int8_group(name, src.dequantize(name))
        elif info["codec"] == "stb.bytes.v1":
            w.add_bytes(name, src.blob(name))
        elif info["codec"] == "stb.sign-block.v1":
            comps = {k: src.component(name, k).view("<u8").reshape(info["shape"][0], -1) for k in ("signs", "mask")
                     if k in info["components"]}
            w.add_sign_block_words(name, info["shape"][1], comps["signs"],
                                   src.component(name, "scales").view("<f2").reshape(info["shape"][0], -1),
                                   comps.get("mask"), info["params"]["block"], info["params"]["nm"])
        elif info["codec"] == "stb.f16.v1":
            w.add_f16(name, src.component(name, "data").view("<f2").reshape(info["shape"]))
        else:
            w.add_f32(name, src.dequantize(name))
    w.write(dst_path)
    return dst_path


def oracle_logits(stb_path, ids, runtime_activations=True):
    model = build_hf_model(stb_path, runtime_activations=runtime_activations)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def assert_logits_close(got, ref, method="fp16"):
    scale = max(1.0, float(np.abs(ref).max()))
    err = float(np.abs(got - ref).max())
    allowed = TOLERANCE[method] * scale
    assert err <= allowed, f"max |runtime - oracle| = {err:.3g}, allowed {allowed:.3g}"
    assert (got.argmax(-1) == ref.argmax(-1)).mean() > 0.95


@pytest.mark.parametrize("arch", ["llama", "mistral", "opt"])
@pytest.mark.parametrize("method, nm", CASES)
def test_logits_match_oracle(tiny_stb, arch, method, nm):
    path = tiny_stb(arch, method, nm)
    # 40 tokens: longer than Mistral's sliding window (8), so the window is exercised.
    ids = list(np.random.default_rng(1).integers(4, 300, size=40))
    got = Model(path, threads=2, kv_cache="f32").logits(ids)
    assert_logits_close(got, oracle_logits(path, ids), method)


@pytest.mark.parametrize("arch", ["llama", "mistral", "opt"])
def test_fp16_kv_cache_stays_close_to_oracle(tiny_stb, arch):
    """The default fp16 KV cache against the float32 oracle, past Mistral's window; and its keys and values do
    matter (the logits differ from the float32 cache's)."""
    path = tiny_stb(arch, "fp16")
    ids = list(np.random.default_rng(1).integers(4, 300, size=40))
    got = Model(path, threads=2)
    assert got.info()["kv_cache"] == "f16"
    logits = got.logits(ids)
    assert_logits_close(logits, oracle_logits(path, ids), "fp16 weights, fp16 KV cache")
    assert np.abs(logits - Model(path, threads=2, kv_cache="f32").logits(ids)).max() > 1e-5


@pytest.mark.parametrize("arch, method, nm", [("llama", "sign", "4:8"), ("mistral", "fp16", None),
                                              ("opt", "sign", None)])
def test_int8_embedding_and_head_match_oracle(tiny_stb, tmp_path, arch, method, nm):
    """stb.int8-group.v1 embedding and LM head (llama: untied head; mistral / opt: one tied table)."""
    src = tiny_stb(arch, method, nm)
    names = {"token_embd.weight"} | ({"output.weight"} if "output.weight" in StbReader(src).tensor_names() else set())
    path = recode(src, tmp_path / "int8.stb", int8=names)
    ids = list(np.random.default_rng(3).integers(4, 300, size=24))
    got = Model(path, threads=2, kv_cache="f32").logits(ids)
    assert_logits_close(got, oracle_logits(path, ids), "sign")
    # And it is a real change: int8 tables differ from the source file's fp16 ones.
    assert np.abs(got - Model(src, threads=2, kv_cache="f32").logits(ids)).max() > 1e-4


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_converter_head_bits_8(tiny_stb, arch):
    """stbllm-convert --head-bits 8 stores the embedding and head as int8 groups, and the runtime agrees."""
    path = tiny_stb(arch, "sign", "4:8", head_bits=8)
    r = StbReader(path)
    tables = [n for n in ("token_embd.weight", "output.weight") if n in r.tensor_names()]
    assert tables and all(r.tensor_info(n)["codec"] == "stb.int8-group.v1" for n in tables)
    assert r.metadata["provenance"]["head_bits"] == 8
    embedding_bits = r.metadata["provenance"]["bits"]["groups"]["embedding"]["bits_per_weight"]
    # 8 bits + one fp16 scale per 64 (hidden 192 is 3 whole groups); OPT's learned positions stay fp16.
    assert embedding_bits == 8.25 if arch == "llama" else 8.25 < embedding_bits < 16
    ids = list(np.random.default_rng(4).integers(4, 300, size=20))
    assert_logits_close(Model(path, threads=2, kv_cache="f32").logits(ids), oracle_logits(path, ids), "sign")


def test_int8_activations_cost_little(tiny_stb):
    """Against the plain float oracle the binary layers' int8 activations show, but only as small noise."""
    path = tiny_stb("llama", "sign", "4:8")
    ids = list(np.random.default_rng(2).integers(4, 300, size=40))
    got = Model(path, threads=2, kv_cache="f32").logits(ids)
    exact = oracle_logits(path, ids, runtime_activations=False)
    err = np.abs(got - exact).max() / np.abs(exact).max()
    assert 1e-5 < err < 0.05
    assert (got.argmax(-1) == exact.argmax(-1)).mean() >= 0.9


@pytest.mark.parametrize("arch", ["llama", "mistral", "opt"])
def test_greedy_generation_matches_transformers(tiny_stb, arch):
    path = tiny_stb(arch, "fp16")
    m = Model(path, threads=2, kv_cache="f32")
    prompt = m.tokenize("The quick brown fox")
    hf = build_hf_model(path)
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, min_new_tokens=24,
                          attention_mask=torch.ones(1, len(prompt), dtype=torch.long))[0, len(prompt):].tolist()
    ours = m.generate(prompt, max_new_tokens=24, temperature=0, stop_token_ids=[])
    assert len(ours) == 24
    assert ours == ref


def test_batched_generation_matches_single(tiny_stb):
    m = Model(tiny_stb("mistral", "sign", "4:8"), threads=2)
    prompts = ["Once upon a time", "The capital of France is Paris. The", "Hello"]
    batch = m.generate(prompts, max_new_tokens=12, temperature=0)
    assert batch == [m.generate(p, max_new_tokens=12, temperature=0) for p in prompts]


def test_text_api_round_trip_and_streaming(tiny_stb):
    m = Model(tiny_stb("llama", "fp16"), threads=2)
    text = "The quick brown fox jumps over the lazy dog."
    assert m.detokenize(m.tokenize(text)) == text
    full = m.generate("Once upon a time", max_new_tokens=16, temperature=0.7, seed=5)
    pieces = list(m.generate("Once upon a time", max_new_tokens=16, temperature=0.7, seed=5, stream=True))
    assert "".join(pieces) == full and len(pieces) > 1


def test_stop_strings_cut_the_text(tiny_stb):
    m = Model(tiny_stb("llama", "fp16"), threads=2)
    full = m.generate("The", max_new_tokens=20, temperature=0, stop_token_ids=[])
    needle = full.strip()[3:6]
    if len(needle) < 3:
        pytest.skip("greedy text too short to pick a stop string from")
    cut = m.generate("The", max_new_tokens=20, temperature=0, stop_token_ids=[], stop=[needle])
    assert cut == full[:full.index(needle)]
    streamed = "".join(m.generate("The", max_new_tokens=20, temperature=0, stop_token_ids=[], stop=[needle],
                                  stream=True))
    assert streamed == cut


def test_chat_template_renders(tiny_stb):
    m = Model(tiny_stb("llama", "fp16"), threads=1)
    prompt = m.apply_chat_template([{"role": "user", "content": "hi"}])
    assert prompt == "<|user|>hi</s><|assistant|>"


# ---- the real default model ---------------------------------------------------------------------------------------

REAL_TEXT = ("The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named "
             "after the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889.")


def test_real_model_logits_match_oracle(smollm2_fp16_stb):
    m = Model(smollm2_fp16_stb, kv_cache="f32")
    ids = m.tokenize(REAL_TEXT)
    assert len(ids) > 30
    assert_logits_close(m.logits(ids), oracle_logits(smollm2_fp16_stb, ids))


def test_real_model_knows_paris(smollm2_fp16_stb):
    m = Model(smollm2_fp16_stb)
    text = m.generate("The capital of France is", max_new_tokens=12, temperature=0)
    assert "Paris" in text


def test_real_model_as_mistral_with_sliding_window(smollm2_fp16_stb, tmp_path):
    """SmolLM2's weights in the Mistral graph with a 16-token window: runtime vs the transformers Mistral model."""
    src = StbReader(smollm2_fp16_stb)
    meta = dict(src.metadata, architecture="mistral", config=dict(src.metadata["config"], sliding_window=16))
    path = recode(smollm2_fp16_stb, tmp_path / "smollm2-as-mistral.stb", metadata=meta)
    m = Model(path, kv_cache="f32")
    ids = m.tokenize(REAL_TEXT)
    got = m.logits(ids)
    assert_logits_close(got, oracle_logits(path, ids))
    # The window really changes the result once the sequence is longer than it.
    plain = Model(smollm2_fp16_stb, kv_cache="f32").logits(ids)
    assert np.abs(plain[:16] - got[:16]).max() < 1e-3 and np.abs(plain[20:] - got[20:]).max() > 1e-2
