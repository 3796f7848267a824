"""stbllm-pareto: recipes converted and evaluated in their own processes, GGUF reference rows (bits from tensor
sizes, PPL through transformers' GGUF loader), resume, the frontier, the plot and the errors."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import CORPUS

# A GGUF-shaped tiny LLaMA (what llama.cpp's converter accepts: no biases, head_dim = hidden / heads), GQA 4/2 so
# that the Q and K permutations differ, tied head as in SmolLM2. vocab_size is set to the tokenizer's.
GGUF_CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=10000.0,
                   tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=3)
SEQLEN, WINDOWS = 32, 3
PROTOCOL = ["--seqlen", str(SEQLEN), "--max-windows", str(WINDOWS)]


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's rope permutation of a Q or K weight (transformers' GGUF loader undoes it)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(tokenizer_dir: Path, out: Path, linear_type: str = "F16") -> None:
    """A random tiny LLaMA with the tiny byte-level BPE tokenizer, written as a GGUF: decoder projections as
    linear_type, embedding F16, norms F32."""
    import gguf
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from stbllm_convert.gguf_tools import write_gguf

    tok = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    vocab = {**tok["model"]["vocab"], **{t["content"]: t["id"] for t in tok["added_tokens"]}}
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    assert len(tokens) == max(vocab.values()) + 1
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    torch.manual_seed(3)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokens), initializer_range=0.1, **GGUF_CONFIG)).eval()
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    c, V = GGUF_CONFIG, gguf.GGUFValueType
    u32 = lambda key, value: (f"llama.{key}", value, V.UINT32, None)  # noqa: E731
    fields = [u32("context_length", c["max_position_embeddings"]), u32("embedding_length", c["hidden_size"]),
              u32("block_count", c["num_hidden_layers"]), u32("feed_forward_length", c["intermediate_size"]),
              u32("rope.dimension_count", c["hidden_size"] // c["num_attention_heads"]),
              u32("attention.head_count", c["num_attention_heads"]),
              u32("attention.head_count_kv", c["num_key_value_heads"]),
              ("llama.attention.layer_norm_rms_epsilon", c["rms_norm_eps"], V.FLOAT32, None),
              ("llama.rope.freq_base", c["rope_theta"], V.FLOAT32, None),
              ("tokenizer.ggml.model", "gpt2", V.STRING, None), ("tokenizer.ggml.pre", "default", V.STRING, None),
              ("tokenizer.ggml.tokens", tokens, V.ARRAY, V.STRING),
              ("tokenizer.ggml.token_type", [3 if i < 4 else 1 for i in range(len(tokens))], V.ARRAY, V.INT32),
              ("tokenizer.ggml.merges", merges, V.ARRAY, V.STRING),
              *[(f"tokenizer.ggml.{key}_token_id", i, V.UINT32, None)
                for key, i in (("unknown", 0), ("bos", 1), ("eos", 2), ("padding", 3))]]
    linear = gguf.GGMLQuantizationType[linear_type]
    tensors = [("token_embd.weight", state["model.embed_tokens.weight"], gguf.GGMLQuantizationType.F16)]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for name, hf, qtype in (("attn_norm", "input_layernorm", None), ("attn_q", "self_attn.q_proj", linear),
                                ("attn_k", "self_attn.k_proj", linear), ("attn_v", "self_attn.v_proj", linear),
                                ("attn_output", "self_attn.o_proj", linear),
                                ("ffn_norm", "post_attention_layernorm", None),
                                ("ffn_gate", "mlp.gate_proj", linear), ("ffn_up", "mlp.up_proj", linear),
                                ("ffn_down", "mlp.down_proj", linear)):
            w = state[p + hf + ".weight"]
            if name in ("attn_q", "attn_k"):
                w = _permute(w, c["num_attention_heads"] if name == "attn_q" else c["num_key_value_heads"])
            if qtype is None:  # norms: perturbed so that they matter, kept in F32
                w = w + 0.2 * np.sin(np.arange(w.size, dtype=np.float32) + i)
                qtype = gguf.GGMLQuantizationType.F32
            tensors.append((f"blk.{i}.{name}.weight", w, qtype))
    tensors.append(("output_norm.weight", state["model.norm.weight"], gguf.GGMLQuantizationType.F32))
    write_gguf(out, "llama", fields, tensors)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    out = tmp_path_factory.mktemp("gguf") / "tiny-f16.gguf"
    write_tiny_gguf(tiny_tokenizer_dir, out)
    return out


@pytest.fixture(scope="module")
def tiny_text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "eval.txt"
    path.write_text("<doc id=1>\n" + "\n".join(CORPUS[::-1] * 2) + "\n</doc>\n")
    return path


@pytest.fixture(scope="module")
def pareto_run(tmp_path_factory, tiny_gguf, tiny_text):
    """stbllm-pareto on the tiny GGUF model: two recipes (fp16, sign 4:8) and the GGUF itself as a reference row."""
    from stbllm_convert.pareto import main

    out = tmp_path_factory.mktemp("pareto")
    argv = [str(tiny_gguf), "--recipes", "fp16=--method fp16", "sign48=--method sign --nm 4:8 --block 64",
            "--gguf", str(tiny_gguf), "--text", str(tiny_text), *PROTOCOL, "--out", str(out), "-q"]
    assert main(argv) == 0
    return out, argv


def test_rows_bits_and_ppl_match_the_files(pareto_run, tiny_gguf, tiny_text):
    from stbllm_rt import StbReader

    from stbllm_convert.evaluate import perplexity

    out, _ = pareto_run
    doc = json.loads((out / "pareto.json").read_text())
    assert doc["protocol"]["seqlen"] == SEQLEN and doc["protocol"]["max_windows"] == WINDOWS
    assert doc["protocol"]["backend"] == "torch" and doc["date"] and doc["machine"]
    rows = {r["name"]: r for r in doc["rows"]}
    assert list(rows) == ["fp16", "sign48", "gguf-tiny-f16"]
    for name in ("fp16", "sign48"):
        r = rows[name]
        bits = StbReader(out / f"{name}.stb").metadata["provenance"]["bits"]
        assert r["linear_bits_per_weight"] == bits["linear_bits_per_weight"]
        assert r["file_bits_per_weight"] == bits["file_bits_per_weight"]
        assert r["conversion_seconds"] > 0 and r["conversion_peak_rss_mib"] > 50
        direct = perplexity(out / f"{name}.stb", tiny_text, SEQLEN, WINDOWS, "torch", progress=False)
        assert r["ppl"] == pytest.approx(direct["ppl"], rel=1e-5)
        assert r["predicted_tokens"] == WINDOWS * (SEQLEN - 1)
    assert rows["sign48"]["linear_bits_per_weight"] < 3 < rows["fp16"]["linear_bits_per_weight"]
    assert rows["sign48"]["ppl"] > rows["fp16"]["ppl"]

    # The GGUF row: F16 projections are exactly 16 bits; the whole file counts the F16 embedding and F32 norms.
    g = rows["gguf-tiny-f16"]
    c, vocab = GGUF_CONFIG, StbReader(out / "fp16.stb").metadata["config"]["vocab_size"]
    h, inter, layers = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    linear = layers * (2 * h * h + 2 * h * (h // 2) + 3 * h * inter)
    norms = (2 * layers + 1) * h
    assert g["linear_bits_per_weight"] == 16.0
    assert g["file_bits_per_weight"] == pytest.approx(
        round((16 * (linear + vocab * h) + 32 * norms) / (linear + vocab * h + norms), 4))
    # Same weights and tokens as the fp16 conversion of that GGUF (fp16 holds F16 exactly): the same PPL.
    assert g["ppl"] == pytest.approx(rows["fp16"]["ppl"], rel=1e-4)
    assert g["ppl"] == pytest.approx(perplexity(tiny_gguf, tiny_text, SEQLEN, WINDOWS, "torch",
                                                progress=False)["ppl"], rel=1e-5)
    # At 16 bits the fp16 and GGUF rows tie up to rounding: one of them closes the frontier.
    assert doc["frontier"]["linear"][0] == "sign48" and len(doc["frontier"]["linear"]) == 2
    assert rows["sign48"]["on_frontier"] == {"linear": True, "file": True}
    png = out / "pareto.png"
    pytest.importorskip("matplotlib")
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_redoes_nothing_and_a_new_protocol_only_evaluates(pareto_run):
    from stbllm_convert.pareto import main

    out, argv = pareto_run
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != "pareto.json"
              and p.name != "pareto.png"}
    assert main(argv) == 0
    after = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name in before}
    assert after == before

    # Two windows instead of three: the .stb files stay, each row is evaluated again into its own file.
    argv2 = [a if a != str(WINDOWS) else "2" for a in argv]
    assert main(argv2) == 0
    assert all((out / name).stat().st_mtime_ns == before[name] for name in before)
    assert len(list(out.glob("*.eval-torch-32x2-eval.json"))) == 3

    # A file that no longer matches its record (here: truncated, as by a crash of something else) is converted again.
    stb = out / "sign48.stb"
    stb.write_bytes(stb.read_bytes()[:100])
    assert main(argv) == 0
    assert stb.stat().st_size > 100 and (out / "fp16.stb").stat().st_mtime_ns == before["fp16.stb"]


def test_cpu_backend_for_stb_rows_torch_for_gguf(tmp_path, tiny_gguf, tiny_text, pareto_run):
    """--backend cpu runs the .stb rows on the C++ runtime (fp16: the oracle's PPL up to float order); the GGUF row,
    which the runtime cannot read, stays on torch."""
    from stbllm_convert.pareto import main

    out = tmp_path / "cpu"
    assert main([str(tiny_gguf), "--recipes", "fp16=--method fp16", "--gguf", str(tiny_gguf), "--text",
                 str(tiny_text), *PROTOCOL, "--backend", "cpu", "--out", str(out), "-q", "--no-plot"]) == 0
    rows = {r["name"]: r for r in json.loads((out / "pareto.json").read_text())["rows"]}
    assert rows["fp16"]["backend"] == "cpu" and rows["gguf-tiny-f16"]["backend"] == "torch"
    assert (out / f"fp16.eval-cpu-{SEQLEN}x{WINDOWS}-eval.json").is_file()
    torch_rows = {r["name"]: r for r in json.loads((pareto_run[0] / "pareto.json").read_text())["rows"]}
    assert rows["fp16"]["ppl"] == pytest.approx(torch_rows["fp16"]["ppl"], rel=1e-3)
    assert rows["gguf-tiny-f16"]["ppl"] == torch_rows["gguf-tiny-f16"]["ppl"]
    assert not (out / "pareto.png").exists()


def test_frontier_on_a_hand_made_table():
    from stbllm_convert.pareto import frontier, mark_frontiers

    points = [(4.5, 21.0), (1.0, 900.0), (16.0, 19.4), (3.9, 57.0), (4.5, 30.0), (8.5, 19.5), (2.0, 900.0),
              (1.0, 900.0)]
    # (4.5, 30) is beaten by (4.5, 21); (2, 900) by (1, 900); the second (1, 900) duplicates the first.
    assert frontier(points) == [1, 3, 0, 5, 2]
    assert frontier([]) == []
    rows = [{"name": n, "linear_bits_per_weight": lb, "file_bits_per_weight": fb, "ppl": ppl}
            for n, lb, fb, ppl in (("a", 1.0, 9.0, 100.0), ("b", 2.0, 3.0, 50.0), ("c", 3.0, 4.0, 60.0))]
    assert mark_frontiers(rows) == {"linear": ["a", "b"], "file": ["b"]}
    assert rows[0]["on_frontier"] == {"linear": True, "file": False}
    assert rows[2]["on_frontier"] == {"linear": False, "file": False}


def test_recipe_forms(tmp_path):
    from stbllm_convert.pareto import RowSpec, parse_recipes, with_calibration

    mix = tmp_path / "mix.yaml"
    mix.write_text("method: q3\nrules: {ffn_down: q4}\nhead_bits: 8\n")
    rows = tmp_path / "rows.json"
    rows.write_text(json.dumps([{"name": "s68", "args": "--method stbllm --nm 6:8"},
                                {"name": "q4", "args": ["--method", "q4-rtn", "--group", "32"]}]))
    specs = parse_recipes(["fp16=--method fp16", str(mix), str(rows), "b3=--target-bpw 3 --candidates sign,fp16"])
    assert specs == [RowSpec("fp16", ("--method", "fp16")), RowSpec("mix", ("--recipe", str(mix))),
                     RowSpec("s68", ("--method", "stbllm", "--nm", "6:8")),
                     RowSpec("q4", ("--method", "q4-rtn", "--group", "32")),
                     RowSpec("b3", ("--target-bpw", "3", "--candidates", "sign,fp16"))]
    calibration = ("--calib-samples", "4", "--calib-seqlen", "64")
    got = {s.name: s.args for s in with_calibration(specs, calibration)}
    assert got["fp16"] == ("--method", "fp16") and got["q4"] == ("--method", "q4-rtn", "--group", "32")
    assert got["mix"] == (*calibration, "--recipe", str(mix))  # q3 is GPTQ: calibrated
    assert got["s68"] == (*calibration, "--method", "stbllm", "--nm", "6:8")
    assert got["b3"] == (*calibration, "--target-bpw", "3", "--candidates", "sign,fp16")  # the allocator calibrates


@pytest.mark.parametrize("recipes, message", [
    (["nonsense"], "neither NAME=ARGS"),
    (["missing.yaml"], "neither NAME=ARGS"),
    (["a=--method fp16", "a=--method sign"], "two recipes are named 'a'"),
    (["a=--method q9"], "recipe a: unknown method 'q9'"),
    (["a=--method fp16 -o x.stb"], "recipe a: -o/--output is chosen by the tool"),
    (["a=--methd fp16"], "recipe a: unrecognized arguments: --methd"),
    (["a=--method 'fp16"], "No closing quotation"),
])
def test_bad_recipes_fail_before_any_work(recipes, message, tmp_path, tiny_gguf, capsys):
    from stbllm_convert.pareto import main

    out = tmp_path / "out"
    assert main([str(tiny_gguf), "--recipes", *recipes, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("stbllm-pareto: error: ") and message in err and err.count("\n") == 1
    assert not out.exists()


def test_bad_list_file_and_gguf_errors(tmp_path, tiny_gguf, capsys):
    from stbllm_convert.pareto import main

    listing = tmp_path / "rows.yaml"
    listing.write_text("- {name: a, args: --method fp16, extra: 1}\n")
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"GGUF" + b"\xff" * 64)
    for argv, message in (
            (["--recipes", str(listing)], "entry 0 must be {name: NAME, args: ARGS}"),
            (["--gguf", str(tmp_path / "absent.gguf")], "not an existing .gguf file"),
            (["--gguf", str(garbage)], "is not a readable GGUF file"),
            (["--recipes", "a=--method fp16", "--text", str(tmp_path / "none.txt")], "--text"),
    ):
        assert main([str(tiny_gguf), *argv, "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert main(["/no/such/model", "--recipes", "a=--method fp16", "--out", str(tmp_path / "o")]) == 2
    assert "model '/no/such/model' not found" in capsys.readouterr().err


def test_failed_conversion_names_its_log(tmp_path, tiny_gguf, capsys):
    """An error only the converter sees (a tied model asked for different head and embedding bits) stops the run
    with exit 1 and the converter's message and log; nothing half-made counts."""
    from stbllm_convert.pareto import main

    out = tmp_path / "out"
    assert main([str(tiny_gguf), "--recipes", "bad=--method fp16 --head-bits 8 --embed-bits 16", "--out", str(out),
                 "-q"]) == 1
    err = capsys.readouterr().err
    assert "conversion of bad failed (exit 2)" in err and "must agree" in err and "bad.convert.log" in err
    assert not (out / "bad.stb").exists() and not (out / "bad.convert.json").exists()


def test_requantized_gguf_bits(tmp_path, tiny_gguf):
    """requantize_gguf (benchmarks/make_gguf.py): Q4_0 projections (4.5 bits: an fp16 scale per 32 weights) and a
    Q8_0 table; the norms stay F32."""
    from stbllm_convert.gguf_tools import gguf_bits, quant_type, requantize_gguf

    out = tmp_path / "tiny-q4_0.gguf"
    bits = requantize_gguf(tiny_gguf, out, quant_type("q4_0"), quant_type("q8_0"), progress=False)
    source = gguf_bits(tiny_gguf)
    assert bits["types"] == ["Q4_0"] and bits["linear_bits_per_weight"] == 4.5
    assert bits["linear_weights"] == source["linear_weights"] and bits["file_weights"] == source["file_weights"]
    assert 4.5 < bits["file_bits_per_weight"] < 8.5
    with pytest.raises(Exception, match="unknown GGUF type 'q9_9'"):
        quant_type("q9_9")
    import gguf
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(out)).tensors}
    assert types["token_embd.weight"] == "Q8_0" and types["output_norm.weight"] == "F32"
