"""The oracle: a transformers model rebuilt from a `.stb` file with its DEQUANTIZED weights.

The C++ runtime's logits are compared with this model's, so it reproduces the file's config exactly (norm eps,
rope theta, sliding window, head_dim, tied embeddings, biases) and uses eager attention in float32.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


def hf_config(architecture: str, c: dict, tokenizer: dict | None = None):
    """A transformers config equivalent to the canonical config `c`."""
    tokenizer = tokenizer or {}
    eos = tokenizer.get("eos_token_ids") or None
    ids = {"bos_token_id": tokenizer.get("bos_token_id"),
           "eos_token_id": (eos[0] if len(eos) == 1 else eos) if eos else None,
           "pad_token_id": tokenizer.get("pad_token_id")}
    common = dict(vocab_size=c["vocab_size"], hidden_size=c["hidden_size"],
                  num_hidden_layers=c["num_hidden_layers"], num_attention_heads=c["num_attention_heads"],
                  max_position_embeddings=c["max_position_embeddings"],
                  tie_word_embeddings=c["tie_word_embeddings"], **ids)
    if architecture in ("llama", "mistral"):
        from transformers import LlamaConfig, MistralConfig
        kw = dict(common, intermediate_size=c["intermediate_size"], num_key_value_heads=c["num_key_value_heads"],
                  head_dim=c["head_dim"], rms_norm_eps=c["norm_eps"], rope_theta=c["rope_theta"],
                  hidden_act="silu")
        if architecture == "llama":
            if c.get("sliding_window") is not None:
                raise ValueError("a llama .stb with a sliding window has no transformers equivalent")
            return LlamaConfig(**kw, attention_bias=c["attention_bias"], mlp_bias=c["mlp_bias"])
        if c.get("attention_bias") or c.get("mlp_bias"):
            raise ValueError("a mistral .stb with biases has no transformers equivalent")
        return MistralConfig(**kw, sliding_window=c.get("sliding_window"))
    if architecture == "opt":
        from transformers import OPTConfig
        if c["attention_bias"] != c["mlp_bias"]:
            raise ValueError("an opt .stb needs attention_bias == mlp_bias (OPT's enable_bias)")
        if c.get("position_offset", 2) != 2:
            raise ValueError("transformers' OPT uses position_offset 2")
        return OPTConfig(**common, ffn_dim=c["intermediate_size"], do_layer_norm_before=True,
                         word_embed_proj_dim=c["hidden_size"], activation_function="relu",
                         enable_bias=c["attention_bias"], layer_norm_elementwise_affine=True,
                         dropout=0.0, attention_dropout=0.0)
    raise ValueError(f"unknown architecture {architecture!r}")


# Codecs whose CPU kernels multiply int8 activations (engine/cpu/kernels.h) rather than float ones.
INT8_ACTIVATION_CODECS = {"stb.sign-block.v1", "stb.int8-group.v1", "stb.qgroup.v1"}


def quantize_activations_q8(x):
    """The runtime's activation quantization, in torch: groups of 64 along the last dim, q = round_half_even(
    x·127/max|x|), value q·max|x|/127, float32 throughout."""
    import torch

    cols = x.shape[-1]
    pad = (-cols) % 64
    g = torch.nn.functional.pad(x.float(), (0, pad)).reshape(*x.shape[:-1], -1, 64)
    amax = g.abs().amax(dim=-1, keepdim=True)
    inv = torch.where(amax > 0, torch.tensor(127.0) / torch.where(amax > 0, amax, torch.ones_like(amax)),
                      torch.zeros_like(amax))
    q = torch.round(g * inv)  # torch.round rounds half to even, as the runtime does
    return (q * (amax / torch.tensor(127.0))).reshape(*x.shape[:-1], -1)[..., :cols].to(x.dtype)


ROW_COL_CODEC = "stb.row-col-sign.v1"


def _row_col_runtime(reader, name):
    """A forward hook giving a stb.row-col-sign.v1 layer the runtime's output: per scale group the input scaled by
    the group's column scales and quantized to int8 for its main sign plane, in float for the salient plane."""
    import torch
    from stbllm_rt import rowcol

    info = reader.tensor_info(name)
    mains, salient = rowcol.runtime_parts(lambda key: reader.component(name, key), info["shape"], info["params"])
    mains = [(torch.from_numpy(main), torch.from_numpy(col_scales)) for main, col_scales in mains]
    salient = torch.from_numpy(salient)

    def hook(module, args, _output):
        x = args[0]
        y = x @ salient.to(x.dtype).t()
        for main, col_scales in mains:
            y = y + quantize_activations_q8(x * col_scales.to(x.dtype)) @ main.to(x.dtype).t()
        return y if module.bias is None else y + module.bias
    return hook


def _hf_model(architecture: str, c: dict, tokenizer: dict | None, tensor):
    """The transformers model (float32, eval, eager attention) of canonical config `c` with the weights
    tensor(spec) -> numpy array gives for every TensorSpec of the plan."""
    import torch
    from transformers import LlamaForCausalLM, MistralForCausalLM, OPTForCausalLM

    from .arch import tensor_plan

    config = hf_config(architecture, c, tokenizer)
    config._attn_implementation = "eager"
    cls = {"llama": LlamaForCausalLM, "mistral": MistralForCausalLM, "opt": OPTForCausalLM}[architecture]
    model = cls(config)
    model.to(torch.float32)

    state = {spec.hf_name: torch.from_numpy(np.ascontiguousarray(tensor(spec), dtype=np.float32))
             for spec in tensor_plan(architecture, c).all()}
    result = model.load_state_dict(state, strict=False)
    allowed_missing = {"lm_head.weight"} if c["tie_word_embeddings"] else set()
    if set(result.missing_keys) - allowed_missing or result.unexpected_keys:
        raise RuntimeError(f"oracle state dict mismatch: missing {result.missing_keys}, "
                           f"unexpected {result.unexpected_keys}")
    if c["tie_word_embeddings"]:
        model.tie_weights()
        assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    model.eval()
    return model


def build_hf_model_from_gguf(gguf_path):
    """(transformers model, tokenizer spec, tokenizer blob) of a .gguf file: its weights dequantized to float32 by
    transformers' GGUF loader, in the same model class and config as the oracle of a .stb converted from it, and
    its tokenizer as the converter would embed it. ConvertError for a file that cannot be loaded."""
    from .arch import canonical_config
    from .errors import ConvertError
    from .source import GGUFSource
    from .tokenizer_meta import tokenizer_metadata

    path = Path(gguf_path)
    if not path.is_file():
        raise ConvertError(f"GGUF file {path} does not exist")
    with GGUFSource(path, quiet=True) as src:
        architecture, c = canonical_config(src.config)
        spec, blob = tokenizer_metadata(src.tokenizer_dir, None, src.config, src.generation_config)
        if blob is None:
            raise ConvertError(f"{path} has no tokenizer transformers can read")
        return _hf_model(architecture, c, spec, src.planned_tensor), spec, blob


def build_hf_model(stb_path, dtype=None, runtime_activations: bool = False):
    """transformers LlamaForCausalLM / MistralForCausalLM / OPTForCausalLM (float32, eval, eager attention) with
    the dequantized weights of the .stb file. runtime_activations=True also quantizes the inputs of the linear
    layers whose codec runs on int8 activations in the CPU runtime, so the two compute the same function."""
    import torch
    from stbllm_rt.stbfile import StbReader

    from .arch import tensor_plan

    reader = StbReader(Path(stb_path))
    md = reader.metadata
    arch, c = md["architecture"], md["config"]
    model = _hf_model(arch, c, md.get("tokenizer"), lambda spec: reader.dequantize(spec.name))
    if runtime_activations:
        modules = dict(model.named_modules())
        quantized = {spec.hf_name.removesuffix(".weight") for spec in tensor_plan(arch, c).all()
                     if reader.tensor_info(spec.name)["codec"] in INT8_ACTIVATION_CODECS}
        if c["tie_word_embeddings"] and reader.tensor_info("token_embd.weight")["codec"] in INT8_ACTIVATION_CODECS:
            quantized.add("lm_head")  # the tied head multiplies by the int8 table too
        for name in quantized:
            if isinstance(modules[name], torch.nn.Linear):  # an embedding lookup takes ids, not activations
                modules[name].register_forward_pre_hook(
                    lambda _module, args: (quantize_activations_q8(args[0]),) + tuple(args[1:]))
        for spec in tensor_plan(arch, c).all():
            if reader.tensor_info(spec.name)["codec"] == ROW_COL_CODEC:
                modules[spec.hf_name.removesuffix(".weight")].register_forward_hook(
                    _row_col_runtime(reader, spec.name))
    if dtype is not None:
        model.to(dtype)
    return model
