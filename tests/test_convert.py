"""The converter (stbllm-convert): tiny random LLaMA / Mistral / OPT models and the real default model -> .stb,
checked against transformers through the oracle (a transformers model with the file's dequantized weights)."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from stbllm_convert import cli  # noqa: E402
from stbllm_convert.convert import convert  # noqa: E402
from stbllm_convert.errors import ConvertWarning  # noqa: E402
from stbllm_convert.methods import nm_mask, parse_nm  # noqa: E402
from stbllm_convert.oracle import build_hf_model  # noqa: E402
from stbllm_rt.stbfile import FEATURE_NM_MASK, FEATURE_SLIDING_WINDOW, StbReader, unpack_bits  # noqa: E402
from stbllm_rt.tokenizer import Tokenizer  # noqa: E402

torch.set_num_threads(1)

ARCHS = ["llama", "mistral", "opt"]
LINEAR_KEYS = ("attn_q", "attn_k", "attn_v", "attn_o", "ffn_gate", "ffn_up", "ffn_down")
# fp16 weights change each weight by at most 2^-11 relative; on these tiny models (logits of std ~1) that moves
# logits by a few 1e-3. The tolerance below is ~5x the largest difference observed.
FP16_LOGIT_ATOL = 0.02


def hf_reference(model_dir):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32,
                                                attn_implementation="eager").eval()


def source_tensors(model_dir) -> dict:
    from safetensors.numpy import load_file
    return {k: v.astype(np.float32) for k, v in load_file(str(Path(model_dir) / "model.safetensors")).items()}


def hf_linear_name(arch, canonical):
    """blk.{i}.attn_q.weight -> the transformers name (independent of the converter's own table)."""
    _, i, key, _ = canonical.split(".")
    if arch == "opt":
        sub = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
               "attn_o": "self_attn.out_proj", "ffn_up": "fc1", "ffn_down": "fc2"}[key]
        return f"model.decoder.layers.{i}.{sub}.weight"
    sub = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
           "attn_o": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
           "ffn_down": "mlp.down_proj"}[key]
    return f"model.layers.{i}.{sub}.weight"


def expected_sign(w: np.ndarray, block: int, nm):
    """Independent re-statement of the sign quantizer: dequantized float32 values (scales rounded to fp16)."""
    rows, cols = w.shape
    a = np.abs(w).astype(np.float64)
    keep = np.ones_like(w, dtype=bool)
    if nm is not None:
        n, m = nm
        for start in range(0, cols, m):
            g = a[:, start:start + m]
            width = g.shape[1]
            k = math.ceil(n * width / m)
            # rank = how many weights of the group beat this one (larger |w|, or equal |w| at a lower column)
            greater = (g[:, None, :] > g[:, :, None]).sum(axis=2)
            idx = np.arange(width)
            tie_before = ((g[:, None, :] == g[:, :, None]) & (idx[None, :] < idx[:, None])[None]).sum(axis=2)
            keep[:, start:start + m] = (greater + tie_before) < k
    out = np.zeros_like(w, dtype=np.float32)
    for start in range(0, cols, block):
        sl = slice(start, min(start + block, cols))
        kb = keep[:, sl]
        count = kb.sum(axis=1)
        mean = np.where(count > 0, (a[:, sl] * kb).sum(axis=1) / np.maximum(count, 1), 0.0)
        scale = mean.astype(np.float32).astype(np.float16).astype(np.float32)
        out[:, sl] = np.where(w[:, sl] >= 0, 1.0, -1.0) * scale[:, None] * kb
    return out, keep


def run_cli(args, capsys):
    code = cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---------------------------------------------------------------------------------------------------------------
# fp16: the oracle reproduces the original model


@pytest.mark.parametrize("arch", ARCHS)
def test_fp16_oracle_matches_transformers(arch, tiny_hf_models, tiny_stb):
    path = tiny_stb(arch, "fp16")
    reader = StbReader(path)
    md = reader.metadata
    assert md["architecture"] == arch
    ref = hf_reference(tiny_hf_models[arch])
    oracle = build_hf_model(path)
    assert oracle.config._attn_implementation == "eager"
    assert next(oracle.parameters()).dtype == torch.float32 and not oracle.training
    # every stored fp16 tensor is exactly the fp16 rounding of the source tensor
    src = source_tensors(tiny_hf_models[arch])
    for name in reader.tensor_names():
        info = reader.tensor_info(name)
        if name.endswith(LINEAR_KEYS[0] + ".weight"):
            w = src[hf_linear_name(arch, name)]
            assert info["codec"] == "stb.f16.v1"
            np.testing.assert_array_equal(reader.dequantize(name), w.astype(np.float16).astype(np.float32))
    torch.manual_seed(1)
    ids = torch.randint(4, 300, (2, 24))  # 24 > Mistral's sliding window of 8
    with torch.no_grad():
        want = ref(ids).logits
        got = oracle(ids).logits
    diff = (want - got).abs().max().item()
    assert diff < FP16_LOGIT_ATOL, f"{arch}: max |logit diff| {diff}"
    assert want.std().item() > 0.3  # the comparison is not vacuous


def test_canonical_configs(tiny_stb):
    llama = StbReader(tiny_stb("llama", "fp16")).metadata["config"]
    assert llama == {
        "vocab_size": 384, "hidden_size": 192, "intermediate_size": 320, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "max_position_embeddings": 128,
        "norm_type": "rms", "norm_eps": 1e-5, "hidden_act": "silu", "mlp_gated": True, "position_type": "rope",
        "rope_theta": 50000.0, "sliding_window": None, "tie_word_embeddings": False, "attention_bias": True,
        "mlp_bias": False}
    mistral_reader = StbReader(tiny_stb("mistral", "fp16"))
    mistral = mistral_reader.metadata["config"]
    assert mistral["sliding_window"] == 8 and mistral["num_key_value_heads"] == 1 and mistral["head_dim"] == 32
    assert mistral["tie_word_embeddings"] is True and mistral["norm_eps"] == 1e-6
    assert mistral_reader.required_features & FEATURE_SLIDING_WINDOW
    assert "output.weight" not in mistral_reader.tensor_names()
    opt_reader = StbReader(tiny_stb("opt", "fp16"))
    opt = opt_reader.metadata["config"]
    assert opt["norm_type"] == "layer" and opt["norm_eps"] == 1e-5 and opt["hidden_act"] == "relu"
    assert opt["mlp_gated"] is False and opt["position_type"] == "learned" and opt["position_offset"] == 2
    assert "rope_theta" not in opt and opt["attention_bias"] and opt["mlp_bias"]
    assert opt_reader.tensor_info("pos_embd.weight")["shape"] == [64 + 2, 128]
    assert "blk.1.ffn_up.bias" in opt_reader.tensor_names() and "blk.0.ffn_gate.weight" not in opt_reader.tensor_names()
    assert "output_norm.bias" in opt_reader.tensor_names()
    prov = opt_reader.metadata["provenance"]
    assert prov["method"] == "fp16" and prov["source"].endswith("opt") and prov["converter_version"]
    assert prov["seconds"] >= 0 and "date" in prov and "bits" in prov


# ---------------------------------------------------------------------------------------------------------------
# sign: exact values


@pytest.mark.parametrize("arch,nm", [("llama", None), ("llama", "4:8"), ("mistral", None), ("opt", "4:8")])
def test_sign_weights_exact(arch, nm, tiny_hf_models, tiny_stb):
    path = tiny_stb(arch, "sign", nm)
    reader = StbReader(path)
    oracle_state = build_hf_model(path).state_dict()
    src = source_tensors(tiny_hf_models[arch])
    nm_tuple = parse_nm(nm)
    linears = [n for n in reader.tensor_names() if n.endswith(tuple(k + ".weight" for k in LINEAR_KEYS))]
    assert len(linears) == 2 * (6 if arch == "opt" else 7)
    ragged = False
    for name in linears:
        info = reader.tensor_info(name)
        assert info["codec"] == "stb.sign-block.v1"
        assert info["params"] == {"block": 128, "nm": list(nm_tuple) if nm_tuple else None}
        hf_name = hf_linear_name(arch, name)
        w = src[hf_name]
        want, _ = expected_sign(w, 128, nm_tuple)
        ragged |= w.shape[1] % 128 != 0
        np.testing.assert_array_equal(reader.dequantize(name), want, err_msg=name)
        np.testing.assert_array_equal(oracle_state[hf_name].numpy(), want, err_msg=name)
    if arch == "llama":
        assert ragged  # hidden 192 = 128 + 64: the ragged last block is covered
    # embeddings stay fp16, norms and biases exact float32
    emb = "model.decoder.embed_tokens.weight" if arch == "opt" else "model.embed_tokens.weight"
    assert reader.tensor_info("token_embd.weight")["codec"] == "stb.f16.v1"
    np.testing.assert_array_equal(oracle_state[emb].numpy(), src[emb].astype(np.float16).astype(np.float32))
    if arch == "llama":
        assert reader.tensor_info("output.weight")["codec"] == "stb.f16.v1"
        np.testing.assert_array_equal(reader.dequantize("blk.1.attn_k.bias"), src["model.layers.1.self_attn.k_proj.bias"])
        np.testing.assert_array_equal(reader.dequantize("blk.0.ffn_norm.weight"),
                                      src["model.layers.0.post_attention_layernorm.weight"])
    if arch == "opt":
        np.testing.assert_array_equal(reader.dequantize("blk.0.ffn_down.bias"), src["model.decoder.layers.0.fc2.bias"])
    assert bool(reader.required_features & FEATURE_NM_MASK) == (nm is not None)


def test_nm_masks_respect_pattern(tiny_stb):
    reader = StbReader(tiny_stb("llama", "sign", "4:8"))
    for name in reader.tensor_names():
        info = reader.tensor_info(name)
        if info["codec"] != "stb.sign-block.v1":
            continue
        rows, cols = info["shape"]
        mask = unpack_bits(reader.component(name, "mask").view("<u8").reshape(rows, -1), cols)
        signs = unpack_bits(reader.component(name, "signs").view("<u8").reshape(rows, -1), cols)
        assert (mask.reshape(rows, cols // 8, 8).sum(axis=2) == 4).all()
        assert not (signs & ~mask).any()  # pruned weights carry a clear sign bit
        assert (reader.dequantize(name)[~mask] == 0).all()


@pytest.mark.parametrize("n,m,cols", [(4, 8, 21), (2, 4, 7), (5, 8, 16), (1, 16, 35), (8, 8, 13)])
def test_nm_mask_counts_and_ragged_group(n, m, cols):
    rng = np.random.default_rng(n * 100 + m)
    w = rng.standard_normal((6, cols)).astype(np.float32)
    w[0, :4] = 0.5  # ties: the lower columns win
    mask = nm_mask(w, n, m)
    for start in range(0, cols, m):
        g = min(m, cols - start)
        k = math.ceil(n * g / m)
        block = mask[:, start:start + m]
        assert (block.sum(axis=1) == k).all()
        a = np.abs(w[:, start:start + m])
        for r in range(6):  # every kept weight is at least as large as every pruned one
            if (~block[r]).any():
                assert a[r][block[r]].min() >= a[r][~block[r]].max()
    _, keep = expected_sign(w, 64, (n, m))
    np.testing.assert_array_equal(mask, keep)


def test_bit_report(tiny_stb):
    def bits(arch, method, nm=None):
        return StbReader(tiny_stb(arch, method, nm)).metadata["provenance"]["bits"]

    # Mistral's linear layers have 128 or 256 input columns: exactly 1 sign bit + one fp16 scale per 128 weights.
    plain = bits("mistral", "sign")
    assert plain["linear_bits_per_weight"] == pytest.approx(1 + 16 / 128)
    assert plain["paper_bits_per_weight"] == pytest.approx(1.0)
    masked = bits("mistral", "sign", "4:8")
    assert masked["linear_bits_per_weight"] == pytest.approx(2 + 16 / 128)  # signs + mask + scales
    assert masked["paper_bits_per_weight"] == pytest.approx(0.5)
    assert bits("mistral", "fp16")["linear_bits_per_weight"] == pytest.approx(16.0)
    # LLaMA (hidden 192: two scale blocks per row of 192 columns, 64-bit padded sign rows): count it out.
    c = StbReader(tiny_stb("llama", "sign")).metadata["config"]
    h, i, q, kv = 192, c["intermediate_size"], 4 * 32, 2 * 32
    shapes = [(q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i)]
    nbytes = sum(r * (math.ceil(k / 64) * 8 + math.ceil(k / 128) * 2) for r, k in shapes)
    weights = sum(r * k for r, k in shapes)
    llama = bits("llama", "sign")
    assert llama["linear_bits_per_weight"] == pytest.approx(nbytes * 8 / weights, abs=1e-4)
    assert llama["groups"]["head"]["bits_per_weight"] == 16.0
    assert llama["groups"]["embedding"]["bits_per_weight"] == 16.0
    assert 1 < llama["file_bits_per_weight"] < 16


# ---------------------------------------------------------------------------------------------------------------
# tokenizer metadata


def test_tokenizer_embedded(tiny_hf_models, tiny_stb):
    from tokenizers import Tokenizer as HFTokenizer

    reader = StbReader(tiny_stb("llama", "sign"))
    spec = reader.metadata["tokenizer"]
    assert spec["kind"] == "hf-tokenizer-json" and spec["blob"] == "tokenizer.data"
    blob = reader.blob("tokenizer.data")
    assert blob == (tiny_hf_models["llama"] / "tokenizer.json").read_bytes()
    assert spec["bos_token_id"] == 1 and spec["eos_token_ids"] == [2] and spec["pad_token_id"] == 3
    assert spec["add_bos_token"] is True and "add_generation_prompt" in spec["chat_template"]
    tok = Tokenizer(spec, blob)
    text = "The capital of France is Paris."
    ids = tok.encode(text)
    assert ids == HFTokenizer.from_str(blob.decode()).encode(text).ids and ids[0] == 1
    assert tok.decode(ids) == text

    sp_reader = StbReader(tiny_stb("mistral", "fp16"))
    sp = sp_reader.metadata["tokenizer"]
    assert sp["kind"] == "sentencepiece" and sp["add_bos_token"] is True and sp["eos_token_ids"] == [2]
    sp_blob = sp_reader.blob("tokenizer.data")
    assert sp_blob == (tiny_hf_models["mistral"] / "tokenizer.model").read_bytes()
    sp_tok = Tokenizer(sp, sp_blob)
    assert sp_tok.decode(sp_tok.encode("Hello world!")) == "Hello world!"


def test_no_tokenizer_warns_and_tokenizer_flag(tiny_hf_models, tiny_tokenizer_dir, tmp_path, capsys):
    out = tmp_path / "notok.stb"
    code, stdout, err = run_cli([tiny_hf_models["llama-notok"], "-o", out, "--method", "fp16", "-q"], capsys)
    assert code == 0, err
    assert "warning" in err and "--tokenizer" in err and "Traceback" not in err
    reader = StbReader(out)
    assert reader.metadata["tokenizer"] == {"kind": "none"}
    assert "tokenizer.data" not in reader.tensor_names()
    with pytest.warns(ConvertWarning, match="no tokenizer"):
        convert(tiny_hf_models["llama-notok"], tmp_path / "again.stb", progress=False)

    # --tokenizer DIR
    out2 = tmp_path / "withtok.stb"
    code, stdout, err = run_cli([tiny_hf_models["llama-notok"], "-o", out2, "--tokenizer", tiny_tokenizer_dir],
                                capsys)
    assert code == 0 and "warning" not in err
    assert "bits per linear weight" in stdout and "whole file" in stdout
    spec = StbReader(out2).metadata["tokenizer"]
    assert spec["kind"] == "hf-tokenizer-json" and spec["bos_token_id"] == 1 and spec["chat_template"]
    # --tokenizer FILE (its sibling tokenizer_config.json is read too)
    out3 = tmp_path / "withfile.stb"
    code, _, err = run_cli([tiny_hf_models["llama-notok"], "-o", out3, "-q",
                            "--tokenizer", tiny_tokenizer_dir / "tokenizer.json"], capsys)
    assert code == 0, err
    assert StbReader(out3).metadata["tokenizer"] == spec
    # a sentencepiece file
    out4 = tmp_path / "withsp.stb"
    code, _, err = run_cli([tiny_hf_models["llama-notok"], "-o", out4, "-q",
                            "--tokenizer", tiny_hf_models["mistral"] / "tokenizer.model"], capsys)
    assert code == 0, err
    assert StbReader(out4).metadata["tokenizer"]["kind"] == "sentencepiece"


# ---------------------------------------------------------------------------------------------------------------
# other source layouts


def test_sharded_bf16_and_prefixless_checkpoints(tiny_hf_models, tiny_stb, tmp_path):
    from safetensors.torch import save_file

    ref = hf_reference(tiny_hf_models["llama"])
    sharded = tmp_path / "sharded"
    ref.save_pretrained(str(sharded), safe_serialization=True, max_shard_size="200KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 1
    out = tmp_path / "sharded.stb"
    with pytest.warns(ConvertWarning):
        convert(sharded, out, method="sign", progress=False)
    a, b = StbReader(out), StbReader(tiny_stb("llama", "sign"))
    for name in b.tensor_names():
        if name != "tokenizer.data":
            np.testing.assert_array_equal(a.dequantize(name), b.dequantize(name), err_msg=name)

    bf16 = tmp_path / "bf16"
    ref.to(torch.bfloat16).save_pretrained(str(bf16), safe_serialization=True)
    out = tmp_path / "bf16.stb"
    with pytest.warns(ConvertWarning):
        convert(bf16, out, progress=False)
    want = ref.model.layers[0].mlp.up_proj.weight.detach().float().numpy().astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(StbReader(out).dequantize("blk.0.ffn_up.weight"), want)

    # facebook/opt-* checkpoints store "decoder.layers..." without the "model." prefix
    opt = tmp_path / "opt-noprefix"
    shutil.copytree(tiny_hf_models["opt"], opt)
    src = {k.removeprefix("model."): torch.from_numpy(v) for k, v in source_tensors(opt).items()}
    save_file(src, str(opt / "model.safetensors"))
    out = tmp_path / "opt.stb"
    convert(opt, out, progress=False)
    np.testing.assert_array_equal(StbReader(out).dequantize("pos_embd.weight"),
                                  StbReader(tiny_stb("opt", "fp16")).dequantize("pos_embd.weight"))


# ---------------------------------------------------------------------------------------------------------------
# CLI errors and interruption


def _config_variant(tmp_path, src_dir, name, **changes):
    folder = tmp_path / name
    shutil.copytree(src_dir, folder)
    cfg = json.loads((folder / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def test_cli_user_errors(tiny_hf_models, tmp_path, capsys):
    out = tmp_path / "x.stb"
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
                                                 "n_embd": 64, "n_layer": 2, "n_head": 2, "vocab_size": 100}))
    noconfig = tmp_path / "noconfig"
    noconfig.mkdir()
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(tiny_hf_models["llama"] / "config.json", pickled / "config.json")
    (pickled / "pytorch_model.bin").write_bytes(b"not read")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    shutil.copy(tiny_hf_models["llama"] / "config.json", corrupt / "config.json")
    (corrupt / "model.safetensors").write_bytes((tiny_hf_models["llama"] / "model.safetensors").read_bytes()[:100])
    bad_gguf = tmp_path / "bad.gguf"
    bad_gguf.write_bytes(b"GGUF" + b"\0" * 5)
    cases = [
        ([tmp_path / "missing", "-o", out], "not found"),
        ([corrupt, "-o", out], "cannot read"),
        ([bad_gguf, "-o", out], "cannot load"),
        ([noconfig, "-o", out], "no config.json"),
        ([pickled, "-o", out], "pickled"),
        ([gpt2, "-o", out], "supported: LlamaForCausalLM, MistralForCausalLM, OPTForCausalLM"),
        ([tiny_hf_models["llama"], "-o", out, "--method", "sign", "--nm", "7:4"], "N must be between 1 and M"),
        ([tiny_hf_models["llama"], "-o", out, "--method", "sign", "--nm", "abc"], "expected N:M"),
        ([tiny_hf_models["llama"], "-o", out, "--method", "sign", "--nm", "4:7"], "M must be one of"),
        ([tiny_hf_models["llama"], "-o", out, "--method", "sign", "--nm", "0:8"], "N must be between"),
        ([tiny_hf_models["llama"], "-o", out, "--nm", "4:8"], "binarizing method"),
        ([tiny_hf_models["llama"], "-o", out, "--method", "nope"], "unknown method 'nope'"),
        ([tiny_hf_models["llama"], "-o", out, "--method", "sign", "--block", "100"], "multiple of 64"),
        ([tiny_hf_models["llama"], "-o", tmp_path / "nodir" / "x.stb"], "does not exist"),
        ([tiny_hf_models["llama"], "-o", out, "--tokenizer", tmp_path / "nothing"], "does not exist"),
        ([_config_variant(tmp_path, tiny_hf_models["opt"], "opt-post", do_layer_norm_before=False), "-o", out],
         "do_layer_norm_before"),
        ([_config_variant(tmp_path, tiny_hf_models["opt"], "opt-proj", word_embed_proj_dim=64), "-o", out],
         "word_embed_proj_dim"),
        ([_config_variant(tmp_path, tiny_hf_models["llama"], "llama-rope",
                          rope_scaling={"rope_type": "linear", "factor": 2.0}), "-o", out], "rope scaling"),
        ([_config_variant(tmp_path, tiny_hf_models["llama"], "llama-big", intermediate_size=321), "-o", out],
         "shape"),
    ]
    for args, message in cases:
        code, _, err = run_cli(args, capsys)
        assert code == 2, (args, err)
        assert message in err and err.startswith("stbllm-convert: error:"), (args, err)
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()


def test_cli_subprocess_entry_point(tmp_path):
    env = dict(os.environ)
    help_text = subprocess.run([sys.executable, "-m", "stbllm_convert", "--help"], capture_output=True, text=True,
                               env=env)
    assert help_text.returncode == 0
    for word in ("smollm2-135m", "--nm", "safetensors", ".gguf", "sign", "fp16", "examples"):
        assert word in help_text.stdout
    bad = subprocess.run([sys.executable, "-m", "stbllm_convert", str(tmp_path / "missing"), "-o",
                          str(tmp_path / "x.stb")], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "not found" in bad.stderr and "Traceback" not in bad.stderr


def _assert_nothing_left(folder: Path, expected=()):
    assert sorted(p.name for p in folder.iterdir()) == sorted(expected)


def test_interrupt_leaves_no_output(tiny_hf_models, tmp_path, monkeypatch, capsys):
    from stbllm_convert import methods

    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "model.stb"
    calls = {"n": 0}
    real = methods.Sign.add_linear

    def interrupted(self, writer, name, w):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(self, writer, name, w)

    monkeypatch.setattr(methods.Sign, "add_linear", interrupted)
    code, _, err = run_cli([tiny_hf_models["llama"], "-o", out, "--method", "sign", "-q"], capsys)
    assert code == 130 and "interrupted" in err
    _assert_nothing_left(out_dir)
    monkeypatch.undo()

    # interrupted while writing (after the temp file was created): no temp file, an existing OUT is untouched
    out.write_bytes(b"previous")
    import stbllm_rt.stbfile as stbfile

    def fsync(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(stbfile.os, "fsync", fsync)
    code, _, err = run_cli([tiny_hf_models["llama"], "-o", out, "-q"], capsys)
    assert code == 130
    _assert_nothing_left(out_dir, ["model.stb"])
    assert out.read_bytes() == b"previous"


# ---------------------------------------------------------------------------------------------------------------
# assets and the real default model


def test_text_samples_fetched_and_cached(tmp_path, monkeypatch):
    from stbllm_convert import assets

    monkeypatch.setenv("STBLLM_CACHE", str(tmp_path / "cache"))
    paths = assets.text_sample_paths()
    assert set(paths) == {"c4", "wiki"}
    wiki = paths["wiki"].read_text(encoding="utf-8")
    assert "<doc" in wiki and len(wiki) > 1_000_000
    assert paths["c4"].stat().st_size > 1_000_000
    assert not list((tmp_path / "cache").rglob("*.whl")) and not list((tmp_path / "cache").rglob("*.partial"))

    def no_download(*a, **k):
        raise AssertionError("downloaded again")

    monkeypatch.setattr(assets, "_pip_download", no_download)
    assert assets.text_sample_paths() == paths


def test_smollm2_fp16_real_model(smollm2_fp16_stb, smollm2_gguf, monkeypatch):
    """The default real model: the fp16 .stb's oracle continues the prompt with Paris and matches transformers'
    own GGUF loading of the model (fp16 rounding of the Q4_1-dequantized weights only)."""
    from stbllm_convert import assets
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(assets, "_pip_download", lambda *a, **k: pytest.fail("the cached model was downloaded again"))
    assert assets.default_model_path() == smollm2_gguf

    reader = StbReader(smollm2_fp16_stb)
    md = reader.metadata
    assert md["architecture"] == "llama" and md["config"]["hidden_size"] == 576
    assert md["config"]["tie_word_embeddings"] is True and md["config"]["rope_theta"] == 100000.0
    assert md["provenance"]["source"] == "smollm2-135m"
    tok_spec = md["tokenizer"]
    assert tok_spec["kind"] == "hf-tokenizer-json" and "<|im_start|>" in tok_spec["chat_template"]
    assert 2 in tok_spec["eos_token_ids"]
    tok = Tokenizer(tok_spec, reader.blob("tokenizer.data"))

    oracle = build_hf_model(smollm2_fp16_stb)
    ids = tok.encode("The capital of France is")
    seq = list(ids)
    with torch.no_grad():
        for _ in range(6):
            seq.append(int(oracle(torch.tensor([seq])).logits[0, -1].argmax()))
        got = oracle(torch.tensor([seq])).logits[0]
    assert "Paris" in tok.decode(seq[len(ids):])

    ref = AutoModelForCausalLM.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name,
                                               dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        want = ref(torch.tensor([seq])).logits[0]
    diff = (want - got).abs().max().item()
    scale = want.std().item()
    assert diff < 0.02 * scale, (diff, scale)  # measured: 0.031 vs a logit std of 6.9
    assert (want.argmax(-1) == got.argmax(-1)).float().mean() >= 0.9
