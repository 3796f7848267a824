"""Architectures: a transformers config -> the canonical `.stb` config (docs/format.md), and the tensor-name plan
(canonical name <- Hugging Face name) the driver walks layer by layer."""
from __future__ import annotations

from dataclasses import dataclass, field

from .errors import ConvertError

SUPPORTED = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "opt": "OPTForCausalLM"}
SUPPORTED_TEXT = ", ".join(SUPPORTED.values())


@dataclass
class TensorSpec:
    name: str           # canonical .stb name
    hf_name: str        # name in the Hugging Face state dict
    kind: str           # "embedding" | "norm" | "bias" | "linear" | "head"
    shape: tuple        # expected shape


@dataclass
class Plan:
    pre: list = field(default_factory=list)      # before the decoder layers (embeddings)
    layers: list = field(default_factory=list)   # one list of TensorSpec per decoder layer
    post: list = field(default_factory=list)     # after them (final norm, head)

    def all(self):
        yield from self.pre
        for layer in self.layers:
            yield from layer
        yield from self.post


def _get(cfg, key, default=None):
    value = getattr(cfg, key, None)
    return default if value is None else value


def _rope_theta(cfg) -> float:
    """rope_theta, refusing any rope scaling (linear, dynamic, yarn, llama3, ...): not supported yet."""
    params = dict(getattr(cfg, "rope_parameters", None) or {})
    legacy = getattr(cfg, "rope_scaling", None)
    if legacy and legacy is not params:
        params = {**dict(legacy), **params}
    rope_type = params.get("rope_type", params.get("type")) or "default"
    if rope_type != "default":
        raise ConvertError(f"rope scaling {rope_type!r} is not supported yet (only plain RoPE, rope_type 'default')")
    theta = params.get("rope_theta", getattr(cfg, "rope_theta", None))
    return float(theta if theta is not None else 10000.0)


def architecture_of(cfg) -> str:
    model_type = getattr(cfg, "model_type", None)
    if model_type in SUPPORTED:
        return model_type
    named = getattr(cfg, "architectures", None) or [model_type or "unknown"]
    raise ConvertError(f"unsupported architecture {', '.join(map(str, named))} (model_type {model_type!r}); "
                       f"supported: {SUPPORTED_TEXT}")


def canonical_config(cfg) -> tuple[str, dict]:
    """(architecture, config dict with the keys of docs/format.md) for a transformers PretrainedConfig."""
    arch = architecture_of(cfg)
    hidden = int(cfg.hidden_size)
    heads = int(cfg.num_attention_heads)
    common = {
        "vocab_size": int(cfg.vocab_size),
        "hidden_size": hidden,
        "num_hidden_layers": int(cfg.num_hidden_layers),
        "num_attention_heads": heads,
        "max_position_embeddings": int(cfg.max_position_embeddings),
        "tie_word_embeddings": bool(_get(cfg, "tie_word_embeddings", False)),
    }
    if arch in ("llama", "mistral"):
        act = _get(cfg, "hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ConvertError(f"{SUPPORTED[arch]} with hidden_act {act!r} is not supported (only silu)")
        head_dim = int(_get(cfg, "head_dim", hidden // heads))
        window = getattr(cfg, "sliding_window", None) if arch == "mistral" else None
        # Mistral's attention has no biases in transformers; LLaMA's follow the config.
        biased = arch == "llama"
        config = {
            **common,
            "intermediate_size": int(cfg.intermediate_size),
            "num_key_value_heads": int(_get(cfg, "num_key_value_heads", heads)),
            "head_dim": head_dim,
            "norm_type": "rms",
            "norm_eps": float(_get(cfg, "rms_norm_eps", 1e-6)),
            "hidden_act": "silu",
            "mlp_gated": True,
            "position_type": "rope",
            "rope_theta": _rope_theta(cfg),
            "sliding_window": int(window) if window else None,
            "attention_bias": bool(_get(cfg, "attention_bias", False)) if biased else False,
            "mlp_bias": bool(_get(cfg, "mlp_bias", False)) if biased else False,
        }
    else:  # opt
        if not _get(cfg, "do_layer_norm_before", True):
            raise ConvertError("OPT with do_layer_norm_before=False (post-norm, e.g. opt-350m) is not supported; "
                               "only pre-norm OPT models")
        proj = _get(cfg, "word_embed_proj_dim", hidden)
        if int(proj) != hidden:
            raise ConvertError(f"OPT with word_embed_proj_dim {proj} != hidden_size {hidden} (project_in/out "
                               "layers) is not supported")
        if getattr(cfg, "_remove_final_layer_norm", False):
            raise ConvertError("OPT with _remove_final_layer_norm=True is not supported")
        if not _get(cfg, "layer_norm_elementwise_affine", True):
            raise ConvertError("OPT with layer_norm_elementwise_affine=False is not supported")
        act = _get(cfg, "activation_function", "relu")
        if act != "relu":
            raise ConvertError(f"OPT with activation_function {act!r} is not supported (only relu)")
        if hidden % heads:
            raise ConvertError(f"hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
        bias = bool(_get(cfg, "enable_bias", True))
        config = {
            **common,
            "intermediate_size": int(cfg.ffn_dim),
            "num_key_value_heads": heads,
            "head_dim": hidden // heads,
            "norm_type": "layer",
            "norm_eps": 1e-5,  # OPT's nn.LayerNorm default
            "hidden_act": "relu",
            "mlp_gated": False,
            "position_type": "learned",
            "position_offset": 2,
            "sliding_window": None,
            "attention_bias": bias,
            "mlp_bias": bias,
        }
    if config["num_attention_heads"] % config["num_key_value_heads"]:
        raise ConvertError("num_attention_heads is not a multiple of num_key_value_heads")
    order = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "head_dim", "max_position_embeddings", "norm_type", "norm_eps", "hidden_act",
             "mlp_gated", "position_type", "rope_theta", "position_offset", "sliding_window", "tie_word_embeddings",
             "attention_bias", "mlp_bias"]
    return arch, {k: config[k] for k in order if k in config}


def tensor_plan(arch: str, c: dict) -> Plan:
    """Every tensor the .stb gets, with its Hugging Face source name and expected shape."""
    h, inter, vocab = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    q_dim = c["num_attention_heads"] * c["head_dim"]
    kv_dim = c["num_key_value_heads"] * c["head_dim"]
    plan = Plan()
    if arch == "opt":
        pre = "model.decoder."
        plan.pre.append(TensorSpec("token_embd.weight", pre + "embed_tokens.weight", "embedding", (vocab, h)))
        plan.pre.append(TensorSpec("pos_embd.weight", pre + "embed_positions.weight", "embedding",
                                   (c["max_position_embeddings"] + c["position_offset"], h)))
        names = {"attn_norm": "self_attn_layer_norm", "ffn_norm": "final_layer_norm",
                 "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                 "attn_o": "self_attn.out_proj", "ffn_up": "fc1", "ffn_down": "fc2"}
        norm_bias = True
        layer_prefix = pre + "layers.{i}."
        final_norm = pre + "final_layer_norm"
    else:
        plan.pre.append(TensorSpec("token_embd.weight", "model.embed_tokens.weight", "embedding", (vocab, h)))
        names = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                 "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                 "attn_o": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                 "ffn_down": "mlp.down_proj"}
        norm_bias = False
        layer_prefix = "model.layers.{i}."
        final_norm = "model.norm"
    shapes = {"attn_q": (q_dim, h), "attn_k": (kv_dim, h), "attn_v": (kv_dim, h), "attn_o": (h, q_dim),
              "ffn_gate": (inter, h), "ffn_up": (inter, h), "ffn_down": (h, inter)}
    for i in range(c["num_hidden_layers"]):
        lp = layer_prefix.format(i=i)
        layer = []
        for norm in ("attn_norm", "ffn_norm"):
            layer.append(TensorSpec(f"blk.{i}.{norm}.weight", lp + names[norm] + ".weight", "norm", (h,)))
            if norm_bias:
                layer.append(TensorSpec(f"blk.{i}.{norm}.bias", lp + names[norm] + ".bias", "bias", (h,)))
        for lin, shape in shapes.items():
            if lin not in names:
                continue
            layer.append(TensorSpec(f"blk.{i}.{lin}.weight", lp + names[lin] + ".weight", "linear", shape))
            has_bias = c["attention_bias"] if lin.startswith("attn") else c["mlp_bias"]
            if has_bias:
                layer.append(TensorSpec(f"blk.{i}.{lin}.bias", lp + names[lin] + ".bias", "bias", (shape[0],)))
        plan.layers.append(layer)
    plan.post.append(TensorSpec("output_norm.weight", final_norm + ".weight", "norm", (h,)))
    if norm_bias:
        plan.post.append(TensorSpec("output_norm.bias", final_norm + ".bias", "bias", (h,)))
    if not c["tie_word_embeddings"]:
        plan.post.append(TensorSpec("output.weight", "lm_head.weight", "head", (vocab, h)))
    return plan
