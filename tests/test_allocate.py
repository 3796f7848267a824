"""The bit-budget allocator (--target-bpw, allocate.py): the knapsack is exact against brute force and monotone in
the budget; on tiny models the written file's measured bits stay within the budget and close to it (linear and
file scope, tied and untied tables), the choice is deterministic, rules fix their linears, the saved recipe
reproduces the file, and bad budgets or candidates are one-line errors."""
import itertools
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from stbllm_convert import allocate as A  # noqa: E402
from stbllm_convert.calibrate import CalibrationOptions  # noqa: E402
from stbllm_convert.cli import main  # noqa: E402
from stbllm_convert.convert import convert  # noqa: E402
from stbllm_convert.errors import ConvertError  # noqa: E402
from stbllm_convert.recipe import Recipe, parse_method  # noqa: E402
from stbllm_rt import Model, StbReader  # noqa: E402

from conftest import CORPUS  # noqa: E402
from test_oracle import assert_logits_close, oracle_logits  # noqa: E402

CANDIDATES = "q2:g64,q3:g64,q4:g64"


# ---- the knapsack ------------------------------------------------------------------------------------------------

def _brute_force(sizes, losses, budget):
    best = None
    for pick in itertools.product(*[range(len(s)) for s in sizes]):
        if sum(s[c] for s, c in zip(sizes, pick)) <= budget:
            loss = sum(ls[c] for ls, c in zip(losses, pick))
            best = loss if best is None else min(best, loss)
    return best


def _random_table(seed, items=6, options=4):
    rng = np.random.default_rng(seed)
    sizes, losses = [], []
    for _ in range(items):
        s = sorted(rng.choice(np.arange(8, 200, 4), options, replace=False).tolist())
        loss = sorted(rng.random(options) * rng.random() * 10, reverse=True)
        if rng.random() < 0.3:  # a non-convex or dominated option
            loss[1] = loss[0] + 0.5
        sizes.append([int(x) for x in s])
        losses.append([float(x) for x in loss])
    return sizes, losses


@pytest.mark.parametrize("seed", range(6))
def test_knapsack_is_exact_and_monotone(seed):
    sizes, losses = _random_table(seed)
    low, high = sum(min(s) for s in sizes), sum(max(s) for s in sizes)
    previous = None
    for budget in range(low, high + 1, 7):
        choice = A.solve(sizes, losses, budget)
        used = sum(s[c] for s, c in zip(sizes, choice))
        loss = sum(ls[c] for ls, c in zip(losses, choice))
        assert used <= budget
        assert loss == pytest.approx(_brute_force(sizes, losses, budget), abs=1e-12)
        assert previous is None or loss <= previous + 1e-12
        previous = loss
    with pytest.raises(ValueError):
        A.solve(sizes, losses, low - 1)


def test_knapsack_with_rounded_units_keeps_the_budget(monkeypatch):
    """When the gcd of the sizes needs too many cells, sizes are rounded up: never over budget, still monotone."""
    monkeypatch.setattr(A, "MAX_UNITS", 64)
    sizes, losses = _random_table(11, items=5, options=3)
    sizes = [[s + 1 for s in item] for item in sizes]  # gcd 1
    previous = None
    for budget in range(sum(min(s) for s in sizes), sum(max(s) for s in sizes) + 1, 5):
        choice = A.solve(sizes, losses, budget)
        assert sum(s[c] for s, c in zip(sizes, choice)) <= budget
        loss = sum(ls[c] for ls, c in zip(losses, choice))
        assert previous is None or loss <= previous + 1e-12
        previous = loss


def test_compressed_rules_give_every_linear_its_choice():
    kinds = ("attn_q", "attn_k", "ffn_down")
    rng = np.random.default_rng(3)
    choice = {(i, k): ["q2:g64", "q3:g64", "q4:g32"][rng.integers(3)] for i in range(9) for k in kinds}
    choice.update({(i, "attn_k"): "q4:g32" for i in range(9)})
    rules = A.compress_rules(choice, 9)
    assert rules["attn_k"] == "q4:g32" and A.layer_list([0, 1, 2, 3, 7, 9, 10]) == "0-3,7,9-10"
    recipe = Recipe(parse_method("fp16"), "fp16", rules.items())
    recipe.check(9, kinds)
    for (i, k), spec in choice.items():
        assert recipe.method_for(i, k) is next(r.method for r in recipe.rules if r.spec == spec)


# ---- end to end on tiny models -----------------------------------------------------------------------------------

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices: thread hand-offs cost more than they save (several-fold on a loaded 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def calibration(tmp_path_factory):
    text = tmp_path_factory.mktemp("alloc") / "calib.txt"
    text.write_text("\n".join(CORPUS * 3))
    return lambda: CalibrationOptions(texts=[text], samples=2, seqlen=32)


def _allocated(model_dir, out, calibration, target, **kw):
    """An allocated conversion, by default with fixed-width codes: sizes fixed by the shape, counted exactly."""
    kw.setdefault("candidates", CANDIDATES)
    kw.setdefault("code_coder", None)
    return convert(model_dir, out, target_bpw=target, calibration=calibration(), progress=False, **kw)


def _largest_step(shapes, candidates=CANDIDATES, group=64) -> int:
    """The largest byte increase of one tensor between consecutive candidates."""
    counter = A.ByteCounter(group)
    methods = A.parse_candidates(candidates, 128)
    steps = [0]
    for shape in shapes:
        sizes = sorted(counter.linear(m, s, shape) for s, m in methods.items())
        steps += [b - a for a, b in zip(sizes, sizes[1:])]
    return max(steps)


def _linear_names(reader):
    return [n for n in reader.tensor_names() if n.split(".")[-2:-1] and n.split(".")[-2] in A.LINEAR_KINDS
            and n.endswith(".weight")]


@pytest.mark.parametrize("target", [2.6, 3.0, 3.9])
def test_linear_budget_is_respected_and_nearly_used(tiny_hf_models, calibration, tmp_path, target):
    out = tmp_path / "a.stb"
    result = _allocated(tiny_hf_models["llama"], out, calibration, target)
    bits = StbReader(out).metadata["provenance"]["bits"]
    reader = StbReader(out)
    step = _largest_step([tuple(reader.tensor_info(n)["shape"]) for n in _linear_names(reader)]) * 8 / \
        bits["linear_weights"]
    assert target - step <= bits["linear_bits_per_weight"] <= target
    alloc = result["allocation"]
    assert alloc["predicted_bits_per_weight"] == bits["linear_bits_per_weight"]
    assert sorted(alloc["chosen"]) == sorted(_linear_names(reader)) and len(alloc["chosen"]) == 14
    assert set(alloc["chosen"].values()) <= set(CANDIDATES.split(","))
    for name, spec in alloc["chosen"].items():  # the file holds what the allocation chose
        bits_, group = int(spec[1]), int(spec.split(":g")[1])
        assert StbReader(out).tensor_info(name)["params"] == {"bits": bits_, "group": group}
    assert alloc["head_bits"] == 16 and bits["groups"]["head"]["bits_per_weight"] == 16


def test_deterministic_and_more_budget_never_costs_loss(tiny_hf_models, calibration, tmp_path):
    runs = [_allocated(tiny_hf_models["llama"], tmp_path / f"{i}.stb", calibration, t)["allocation"]
            for i, t in enumerate([2.8, 2.8, 3.4, 4.4])]
    assert runs[0]["chosen"] == runs[1]["chosen"] and runs[0]["sensitivity"] == runs[1]["sensitivity"]
    assert (tmp_path / "0.stb").read_bytes() != b"" and runs[0]["estimated_loss"] == runs[1]["estimated_loss"]
    losses = [r["estimated_loss"] for r in runs[1:]]
    assert losses[0] >= losses[1] >= losses[2]
    # the loss estimate orders the candidates: more bits, less error, for every tensor
    for entry in runs[0]["sensitivity"].values():
        assert entry["loss"][0] > entry["loss"][1] > entry["loss"][2] >= 0
        assert 0 < entry["relative_error"][2] < entry["relative_error"][0] < 1


@pytest.mark.parametrize("arch", ["mistral", "opt"])
def test_file_scope_chooses_the_tied_table(tiny_hf_models, calibration, tmp_path, arch):
    """Tied heads: the file's bits (table, norms, biases, OPT's positions included) are within the budget, and the
    allocator chooses the table's bits when none are given."""
    out = tmp_path / "f.stb"
    result = _allocated(tiny_hf_models[arch], out, calibration, 4.2, bpw_scope="file")
    reader = StbReader(out)
    bits = reader.metadata["provenance"]["bits"]
    alloc = result["allocation"]
    assert bits["file_bits_per_weight"] <= 4.2 and alloc["predicted_bits_per_weight"] == bits["file_bits_per_weight"]
    assert alloc["head_bits"] == alloc["embed_bits"] in A.TABLE_CHOICES
    assert set(alloc["table_loss"]["token_embd.weight"]) == {"16", "8", "4:g64", "4:g32", "3:g64", "3:g32"}
    table_loss = alloc["table_loss"]["token_embd.weight"]
    assert table_loss["3:g64"] > table_loss["4:g64"] > table_loss["8"] > table_loss["16"] >= 0
    assert table_loss["3:g64"] > table_loss["3:g32"] and table_loss["4:g64"] > table_loss["4:g32"]
    assert reader.metadata["provenance"]["head_bits"] == alloc["head_bits"]
    if alloc["head_bits"] <= 4:  # the file holds the chosen group
        assert reader.tensor_info("token_embd.weight")["params"]["group"] == alloc["table_groups"]["token_embd.weight"]
    if arch == "opt":
        return
    # given table bits are fixed and counted
    fixed = _allocated(tiny_hf_models["mistral"], tmp_path / "g.stb", calibration, 4.2, bpw_scope="file",
                       head_bits=8)["allocation"]
    assert fixed["head_bits"] == fixed["embed_bits"] == 8 and "table_loss" not in fixed
    assert StbReader(tmp_path / "g.stb").tensor_info("token_embd.weight")["codec"] == "stb.int8-group.v1"


def test_8bit_param_candidates_and_tables_are_counted_honestly(tiny_hf_models, calibration, tmp_path):
    """q specs with :p8 (and, with --params-bits 8, the k-bit tables and the q specs without :pBITS) cost their
    file bytes: k/8 per weight + one byte per scale and offset + 4 bytes of steps per row; the allocated file keeps
    the budget and the methods it was measured with."""
    counter, counter8 = A.ByteCounter(64), A.ByteCounter(64, 8)
    methods = A.parse_candidates("q4:g64,q4:g64:p8,q3:g32:p8", 128)
    rows, cols = 96, 576
    assert counter.linear(methods["q4:g64"], "q4:g64", (rows, cols)) == rows * cols // 2 + 2 * rows * 9 * 2
    assert counter.linear(methods["q4:g64:p8"], "q4:g64:p8", (rows, cols)) == rows * cols // 2 + 2 * rows * 9 + rows * 4
    assert counter.linear(methods["q3:g32:p8"], "q3:g32:p8", (rows, cols)) == rows * cols * 3 // 8 + 2 * rows * 18 + \
        rows * 4
    assert counter8.table(4, (rows, cols)) == counter.linear(methods["q4:g64:p8"], "q4:g64:p8", (rows, cols))
    assert A.parse_candidates("q4:g64", 128, 8)["q4:g64:p8"].params_bits == 8
    out = tmp_path / "p8.stb"
    alloc = _allocated(tiny_hf_models["mistral"], out, calibration, 4.0, bpw_scope="file",
                       candidates="q3:g64,q4:g32,q4:g64:p16", params_bits=8)["allocation"]
    reader = StbReader(out)
    assert reader.metadata["provenance"]["bits"]["file_bits_per_weight"] == alloc["predicted_bits_per_weight"] <= 4.0
    for name, spec in alloc["chosen"].items():
        assert reader.tensor_info(name)["params"].get("params_bits", 16) == (16 if spec.endswith(":p16") else 8)
    if alloc["head_bits"] <= 4:
        assert reader.tensor_info("token_embd.weight")["params"]["params_bits"] == 8


def test_file_scope_untied_head_and_embedding(tiny_hf_models, calibration, tmp_path):
    out = tmp_path / "u.stb"
    alloc = _allocated(tiny_hf_models["llama"], out, calibration, 3.5, bpw_scope="file", embed_bits=4)["allocation"]
    bits = StbReader(out).metadata["provenance"]["bits"]
    assert bits["file_bits_per_weight"] <= 3.5 and alloc["embed_bits"] == 4
    assert list(alloc["table_loss"]) == ["output.weight"] and alloc["head_bits"] in A.TABLE_CHOICES


def test_saved_recipe_keeps_the_tables_group_and_params_bits(tiny_hf_models, calibration, tmp_path):
    """File scope with --params-bits 8: the chosen table group and the tables' 8-bit params go into the saved recipe,
    and converting with it alone gives the same tensors."""
    saved = tmp_path / "chosen.json"
    alloc = _allocated(tiny_hf_models["mistral"], tmp_path / "a.stb", calibration, 4.0, bpw_scope="file",
                       params_bits=8, candidates="q3:g64,q4:g64", save_recipe=saved, code_coder="rans")["allocation"]
    recipe = json.loads(saved.read_text())
    assert recipe["table_params_bits"] == 8
    if alloc["head_bits"] <= 4:
        assert recipe["table_group"] == alloc["table_groups"]["token_embd.weight"] in A.TABLE_GROUPS
    convert(tiny_hf_models["mistral"], tmp_path / "b.stb", recipe=saved, calibration=calibration(), progress=False)
    first, second = StbReader(tmp_path / "a.stb"), StbReader(tmp_path / "b.stb")
    assert {n: first.tensor_info(n).get("params") for n in first.tensor_names()} == \
        {n: second.tensor_info(n).get("params") for n in second.tensor_names()}
    np.testing.assert_array_equal(first.dequantize("token_embd.weight"), second.dequantize("token_embd.weight"))


def test_rans_coded_candidates_are_sized_as_measured_and_buy_more(tiny_hf_models, calibration, tmp_path):
    """With rANS-coded codes each q option costs its measured stream (round-to-nearest candidates quantize the same
    in the allocation and the conversion, so the file is exactly the measured bytes, the margin on top): the budget
    holds, and the bytes the coding saves buy a lower estimated loss than the fixed-width allocation's."""
    candidates = "q2-rtn:g64,q3-rtn:g64,q4-rtn:g64"
    fixed = _allocated(tiny_hf_models["llama"], tmp_path / "fixed.stb", calibration, 3.0,
                       candidates=candidates)["allocation"]
    out = tmp_path / "coded.stb"
    coded = _allocated(tiny_hf_models["llama"], out, calibration, 3.0, candidates=candidates,
                       code_coder="rans")["allocation"]
    reader = StbReader(out)
    bits = reader.metadata["provenance"]["bits"]
    written = sum(bits["groups"][g]["bytes"] for g in ("codes", "scales"))
    assert coded["code_coder"] == "rans" and coded["written_bits_per_weight"] == bits["linear_bits_per_weight"] <= 3.0
    assert reader.metadata["provenance"]["allocation"]["written_bits_per_weight"] == coded["written_bits_per_weight"]
    assert written <= coded["bytes"] <= written * (1 + A.CODED_MARGIN) + len(coded["chosen"])
    assert coded["estimated_loss"] < fixed["estimated_loss"]  # (0.277 against 0.326 when written)
    for name in coded["chosen"]:
        assert reader.tensor_info(name)["params"]["code_coder"] == "rans"
    ids = list(np.random.default_rng(3).integers(4, 300, size=16))
    assert_logits_close(Model(out, threads=1, kv_cache="f32").logits(ids), oracle_logits(out, ids), "sign")


def test_rules_fix_their_linears_and_the_saved_recipe_reproduces_the_file(tiny_hf_models, calibration, tmp_path):
    saved = tmp_path / "chosen.json"
    out = tmp_path / "r.stb"
    alloc = _allocated(tiny_hf_models["llama"], out, calibration, 3.2, rules=["ffn_down=q4:g32"],
                       save_recipe=saved)["allocation"]
    reader = StbReader(out)
    assert reader.tensor_info("blk.1.ffn_down.weight")["params"] == {"bits": 4, "group": 32}
    assert not any(".ffn_down." in n for n in alloc["chosen"])
    assert reader.metadata["provenance"]["bits"]["linear_bits_per_weight"] <= 3.2
    recipe = json.loads(saved.read_text())
    assert recipe["rules"]["ffn_down"] == "q4:g32" and recipe["head_bits"] == 16
    again = tmp_path / "again.stb"
    convert(tiny_hf_models["llama"], again, recipe=saved, calibration=calibration(), progress=False, code_coder=None)
    second = StbReader(again)
    assert {n: second.tensor_info(n).get("params") for n in second.tensor_names()} == \
        {n: reader.tensor_info(n).get("params") for n in reader.tensor_names()}
    assert second.metadata["provenance"]["bits"]["linear_bits_per_weight"] == \
        reader.metadata["provenance"]["bits"]["linear_bits_per_weight"]


@pytest.mark.parametrize("kwargs, match", [
    (dict(target=1.0), r"reach 2\.\d{4} to 4\.\d{4} bits per linear weight"),
    (dict(target=9.0), r"reach 2\.\d{4} to 4\.\d{4} bits per linear weight"),
    (dict(target=-1.0), "positive"),
    (dict(target=3.0, method="q3"), "drop --method"),
    (dict(target=3.0, candidates="q3,stbllm:6:8"), "depends on the data"),
    (dict(target=3.0, rules=["attn_q=billm"]), "depends on the data"),
    (dict(target=3.0, rules=["*=q3"]), "nothing is left to allocate"),
    (dict(target=3.0, bpw_scope="both"), "choose linear or file"),
    (dict(target=None, bpw_scope="file"), "--bpw-scope needs --target-bpw"),
    (dict(target=None, candidates="q3"), "--candidates needs --target-bpw"),
])
def test_bad_budgets_and_options_are_clear_errors(tiny_hf_models, calibration, tmp_path, kwargs, match):
    target = kwargs.pop("target")
    with pytest.raises(ConvertError, match=match):
        _allocated(tiny_hf_models["llama"], tmp_path / "x.stb", calibration, target, **kwargs)
    assert not (tmp_path / "x.stb").exists()


def test_cli_prints_the_mix(tiny_hf_models, tmp_path, capsys):
    text = tmp_path / "calib.txt"
    text.write_text("\n".join(CORPUS * 3))
    out = tmp_path / "cli.stb"
    assert main([str(tiny_hf_models["llama"]), "-o", str(out), "--target-bpw", "3", "--candidates", CANDIDATES,
                 "--calib", str(text), "--calib-samples", "2", "--calib-seqlen", "32", "--save-recipe",
                 str(tmp_path / "r.json")]) == 0
    printed = capsys.readouterr().out
    assert "allocation: target 3 bits per linear weight" in printed
    total = next(line for line in printed.splitlines() if line.strip().startswith("all "))
    assert sum(int(x) for x in total.split()[1:]) == 14  # 2 layers x 7 linears
    coders = lambda path: {StbReader(path).tensor_info(n)["params"].get("code_coder")  # noqa: E731
                           for n in _linear_names(StbReader(path))}
    assert coders(out) == {"rans"}  # the default
    fixed = tmp_path / "fixed.stb"
    assert main([str(tiny_hf_models["llama"]), "-o", str(fixed), "--target-bpw", "3", "--candidates", CANDIDATES,
                 "--calib", str(text), "--calib-samples", "2", "--calib-seqlen", "32", "--code-coder", "fixed"]) == 0
    assert coders(fixed) == {None}
    assert main([str(tiny_hf_models["llama"]), "-o", str(out), "--target-bpw", "0.5", "--candidates", CANDIDATES,
                 "--calib", str(text), "--calib-samples", "2", "--calib-seqlen", "32"]) == 2
    assert "reach" in capsys.readouterr().err


def test_real_model_file_budget(smollm2_gguf, tmp_path):
    """SmolLM2-135M with the cheapest candidates to quantize (sign, fp16), a tiny calibration, --bpw-scope file: the
    210 linears and the tied 49152 x 576 table fill 4 bits per weight of the file; the runtime loads the result."""
    from stbllm_rt import Model

    candidates = "sign,fp16"
    out = tmp_path / "real.stb"
    result = convert("smollm2-135m", out, target_bpw=4.0, bpw_scope="file", candidates=candidates,
                     calibration=CalibrationOptions(samples=1, seqlen=64), progress=False)
    bits, alloc = result["bits"], result["allocation"]
    step = _largest_step([(1536, 576), (576, 1536)], candidates) * 8 / bits["file_weights"]
    assert 4.0 - step <= bits["file_bits_per_weight"] <= 4.0
    assert len(alloc["chosen"]) == 210 and set(alloc["chosen"].values()) == {"sign", "fp16"}
    assert alloc["head_bits"] == alloc["embed_bits"] in A.TABLE_CHOICES and alloc["estimated_loss"] > 0
    logits = Model(out, threads=2).logits([1, 504, 3458, 282, 4649, 314])
    assert np.isfinite(logits).all()
