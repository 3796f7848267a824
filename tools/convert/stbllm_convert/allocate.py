"""Bit-budget allocation (`--target-bpw B`): choose each decoder linear's method (and, under `--bpw-scope file`,
the bits of the embedding and head) to minimize the estimated loss increase with the honest bits <= B.

Sensitivity, measured once on the full-precision model over the calibration windows:
- Output Fisher: one forward + backward pass of the whole model per window (next-token NLL summed over the window)
  records, for every linear, G_i = sum over tokens of (dNLL/dy_i)^2 / (predicted tokens), y its output. A second
  order Taylor expansion of the mean NLL with the empirical Fisher as its Hessian, diagonal in the outputs, and the
  output gradient taken independent of the quantization error gives the estimated increase of the mean NLL (nats
  per token) when W becomes Q, E = W - Q:   loss = 1/4 * sum_i G_i (E H E^T)_ii,
  H = (2/N) sum x x^T the linear's input Hessian. So the Hessian-weighted output error of every tensor is weighed by
  how much the loss feels that tensor's outputs, which makes the errors of different tensors commensurable.
- Errors: the windows then run through the full-precision layers one at a time (the calibration driver's pieces);
  each linear is quantized by every candidate exactly as the conversion would (GPTQ with H for q2/q3/q4, the plain
  quantizer for sign / fp16 / -rtn) and its loss above is recorded, with the relative error tr(EHE^T)/tr(WHW^T).
- Tables (file scope, when --head-bits / --embed-bits are not given): the head is a linear over the final hidden
  states (same formula); the embedding's loss is 1/2 * sum over the tokens seen of G_emb (E_row)^2, G_emb the
  squared gradient of the NLL at the token's embedding (a tied table pays both). Each of 16 / 8 bits and 4 / 3 bits
  at each of TABLE_GROUPS (or the --group given) is measured on the table as the file would store it (a calibrated
  k-bit head: GPTQ with the full-precision model's head input Hessian, where the conversion uses the quantized
  model's).
Cost: one forward+backward of the model per window, plus one quantization per (linear, candidate): with the default
candidates four GPTQ runs per linear, i.e. about four q3 conversions (sign and fp16 cost little).

Bytes: each (shape, candidate) is written once (zeros) into a scratch StbWriter and its component bytes counted the
way the bit report counts them, so the budget uses exactly the file's byte counts. Only candidates whose size is
fixed by the shape are admitted (fp16, sign[:N:M], q2/q3/q4[-rtn][:gG][:pP]). With rANS-coded qgroup codes (the
converter's default) a q candidate's or k-bit table's size depends on its codes: each is then measured on the
quantization the sensitivity pass makes anyway, plus CODED_MARGIN for the conversion's own quantization (of the
quantized model's layer inputs), whose codes differ a little; a linear fixed by a rule is counted at fixed width.

Choice: a multiple-choice knapsack, minimize sum of losses with sum of bytes <= budget, solved by dynamic
programming over bytes in units of the gcd of all option sizes (exact) or, when that needs more than MAX_UNITS
cells, of sum(max option) / MAX_UNITS with every size rounded up (the budget still holds; at most one unit per
tensor is lost). The unit does not depend on the budget, so more budget never gives a higher estimated loss. Ties go
to the cheaper option, so the result is deterministic.
"""
from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import ConvertError
from .recipe import LINEAR_KINDS, parse_method

DEFAULT_CANDIDATES = "sign,q2:g64,q3:g128,q3:g64,q4:g64,fp16"
TABLE_CHOICES = (16, 8, 4, 3)  # a free table's bits
TABLE_GROUPS = (64, 32)  # and the group of its k-bit options, unless --group fixes it
SCOPES = ("linear", "file")
MAX_UNITS = 1 << 19
# Added to the measured size of every rANS-coded stream: on SmolLM2 the conversion's coded sizes differed from the
# allocation's by less than a quarter of this (docs/results.md, session 10).
CODED_MARGIN = 0.002


# ---- the knapsack ------------------------------------------------------------------------------------------------

def solve(sizes: list[list[int]], losses: list[list[float]], budget: int) -> list[int]:
    """One option per item minimizing sum(losses) with sum(sizes) <= budget (bytes). Options of an item should be
    ordered by size (ties in loss go to the earlier one). Raises ValueError when even the smallest options exceed the
    budget."""
    if budget < sum(min(s) for s in sizes):
        raise ValueError("the smallest options exceed the budget")
    unit = math.gcd(*[b for s in sizes for b in s]) or 1
    unit = max(unit, -(-sum(max(s) for s in sizes) // MAX_UNITS))
    units = [[-(-b // unit) for b in s] for s in sizes]
    cap = budget // unit
    if sum(min(u) for u in units) > cap:  # feasible in bytes, not after rounding up: the smallest options
        return [int(np.argmin(s)) for s in sizes]
    best = np.zeros(cap + 1)  # best[c]: least loss of the items so far within c units
    picks = np.zeros((len(sizes), cap + 1), np.int8 if max(map(len, sizes)) < 128 else np.int32)
    for k, (item_units, item_losses) in enumerate(zip(units, losses)):
        new = np.full(cap + 1, np.inf)
        for c, (u, loss) in enumerate(zip(item_units, item_losses)):
            if u > cap:
                continue
            candidate = best[:cap + 1 - u] + loss
            better = candidate < new[u:]
            new[u:][better] = candidate[better]
            picks[k, u:][better] = c
        best = new
    choice, c = [], cap
    for k in range(len(sizes) - 1, -1, -1):
        pick = int(picks[k, c])
        choice.append(pick)
        c -= units[k][pick]
    return choice[::-1]


# ---- bytes -------------------------------------------------------------------------------------------------------

def counted_bytes(writer) -> int:
    """Bytes the bit report counts for what a writer holds."""
    return sum(g["bytes"] for g in writer.bit_report()["groups"].values())


def written_bytes(add, code_coder: str | None = None) -> int:
    """Bytes the bit report counts for what add(writer) writes into an empty StbWriter."""
    from stbllm_rt.stbfile import StbWriter

    writer = StbWriter({}, code_coder=code_coder)
    add(writer)
    return counted_bytes(writer)


def stored_table(w: np.ndarray, bits: int, group: int, head_hessian=None, params_bits: int | None = None,
                 code_coder: str | None = None) -> tuple[np.ndarray, int]:
    """The values of an embedding / head table as the file stores it at `bits` (convert.add_table; head_hessian:
    the head's input Hessian when the conversion calibrates the head), and its bytes."""
    from stbllm_rt.stbfile import StbReader, StbWriter

    from .convert import add_table

    writer = StbWriter({}, code_coder=code_coder)
    add_table(writer, "output.weight", w, bits, group, head_hessian, params_bits)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "table.stb"
        writer.write(path)
        return StbReader(path).dequantize("output.weight"), counted_bytes(writer)


class ByteCounter:
    """Exact bytes of a tensor written with a given codec choice, computed once per (shape, choice)."""

    def __init__(self, group: int, table_params_bits: int | None = None):
        self.group, self.table_params_bits, self.cache = group, table_params_bits, {}

    def linear(self, method, spec: str, shape) -> int:
        key = ("linear", spec, tuple(shape))
        if key not in self.cache:
            self.cache[key] = written_bytes(lambda writer: method.add_linear(writer, "blk.0.attn_q.weight",
                                                                             np.zeros(shape, np.float32)))
        return self.cache[key]

    def table(self, bits: int, shape, group: int | None = None) -> int:
        group = group or self.group
        key = ("table", bits, group, tuple(shape))
        if key not in self.cache:
            from .convert import add_table

            self.cache[key] = written_bytes(lambda writer: add_table(writer, "output.weight",
                                                                     np.zeros(shape, np.float32), bits, group,
                                                                     params_bits=self.table_params_bits))
        return self.cache[key]

    def plain(self, spec) -> int:
        """Norms, biases (f32) and learned positions (f16): always stored as is."""
        size = int(np.prod(spec.shape))
        return size * (4 if spec.kind in ("norm", "bias") else 2)


# ---- candidates --------------------------------------------------------------------------------------------------

def shape_sized(method) -> bool:
    """Whether a method's file size is fixed by the tensor's shape (the budget can then be exact)."""
    from .methods import FP16, QGroupMethod, Sign

    return isinstance(method, (FP16, Sign, QGroupMethod))


def parse_candidates(text: str | None, block: int, params_bits: int | None = None) -> dict:
    """'q3:g64,q4:p8,...' -> {spec: Method}, ordered as given (duplicates dropped); params_bits (--params-bits): the
    q specs' without a :pBITS, as the conversion's recipe parses them (their specs then end in :pBITS)."""
    specs = [s.strip() for s in (text or DEFAULT_CANDIDATES).split(",") if s.strip()]
    if not specs:
        raise ConvertError("--candidates: give at least one method, e.g. q2:g64,q3:g64,q4:g64")
    from .methods import QGroupMethod

    methods = {}
    for spec in dict.fromkeys(specs):
        method = parse_method(spec, block=block, params_bits=params_bits)
        if not shape_sized(method):
            raise ConvertError(f"--candidates: {spec!r} has a size that depends on the data (searched salient "
                               "columns or regions); candidates must be fp16, sign[:N:M] or q2/q3/q4[-rtn][:gGROUP][:p8]")
        if isinstance(method, QGroupMethod) and params_bits is not None and not spec.split(":")[-1].startswith("p"):
            spec = f"{spec}:p{method.params_bits}"  # the chosen rules then say it (a saved recipe needs no option)
        methods.setdefault(spec, method)
    return methods


# ---- sensitivity -------------------------------------------------------------------------------------------------

@dataclass
class Fisher:
    """Squared output gradients of the calibration NLL, per predicted token (see the module docstring)."""
    outputs: dict = field(default_factory=dict)  # module name -> [rows] (linears and "head")
    head_hessian: object = None                  # (2/N) sum x x^T of the head's input, when measured
    embed_ids: object = None                     # the distinct token ids of the windows
    embed: object = None                         # [len(embed_ids), hidden]: squared gradients at their embeddings
    tokens: int = 0


def output_fisher(model, windows, modules: dict, tables: bool, device, progress) -> Fisher:
    """One forward + backward per window through the whole model (on `device`); modules: name -> linear module
    whose output gradients are recorded; tables: also record the head's (lm_head) and the embedding's."""
    import torch
    import torch.nn.functional as F

    from .convert import _progress

    fisher, sums, embed_rows = Fisher(), {}, []
    head_sum, head_tokens = [0], [0]
    model.to(device)
    for p in model.parameters():
        p.requires_grad_(False)

    def record(name):
        def hook(grad):
            g = grad.detach().float().reshape(-1, grad.shape[-1])
            sums[name] = sums.get(name, 0) + (g * g).sum(0)
        return hook

    def on_output(module, args, out, name):
        out.register_hook(record(name))

    def on_embedding(module, args, out):
        out = out.detach().requires_grad_(True)  # the graph starts here: weights need no gradients

        def hook(grad):
            g = grad.detach().float()[0]
            embed_rows.append((args[0][0].cpu(), (g * g).cpu()))
        if tables:
            out.register_hook(hook)
        return out

    def on_head_input(module, args, out):
        x = args[0].detach().float().reshape(-1, args[0].shape[-1])
        head_sum[0] = head_sum[0] + x.t() @ x
        head_tokens[0] += x.shape[0]

    embed_module = model.get_input_embeddings()
    head = model.get_output_embeddings()
    watched = dict(modules)
    if tables:
        watched["head"] = head
    handles = [m.register_forward_hook(lambda mod, args, out, name=name: on_output(mod, args, out, name))
               for name, m in watched.items()]
    handles.append(embed_module.register_forward_hook(on_embedding))
    if tables:
        handles.append(head.register_forward_hook(on_head_input))
    try:
        for window in _progress(windows, progress, desc="sensitivity: gradients", unit="window", leave=False):
            ids = window[None].to(device)
            logits = model(input_ids=ids).logits[0, :-1].float()
            nll = F.cross_entropy(logits, ids[0, 1:], reduction="sum")
            nll.backward()
            fisher.tokens += ids.shape[1] - 1
    finally:
        for handle in handles:
            handle.remove()
        model.to("cpu")
    fisher.outputs = {name: (s / fisher.tokens).cpu() for name, s in sums.items()}
    if tables:
        fisher.head_hessian = (head_sum[0] * (2.0 / head_tokens[0])).cpu()
        ids = torch.cat([i for i, _ in embed_rows])
        fisher.embed_ids, inverse = torch.unique(ids, return_inverse=True)
        fisher.embed = torch.zeros((len(fisher.embed_ids), embed_rows[0][1].shape[1])).index_add_(
            0, inverse, torch.cat([g for _, g in embed_rows])) / fisher.tokens
    return fisher


def output_loss(g, e, h) -> float:
    """1/4 sum_i g_i (E H E^T)_ii: the estimated mean-NLL increase of the output error E under input Hessian H."""
    return 0.25 * float((g.double() * ((e @ h) * e).sum(1).double()).sum())


def relative_error(e, w, h) -> float:
    total = float(((w @ h) * w).sum())
    return float(((e @ h) * e).sum()) / total if total > 0 else 0.0


def linear_sensitivity(model, runner, plan, windows, fisher: Fisher, free: set, candidates: dict, device,
                       progress, code_coder: str | None = None) -> dict:
    """{tensor name: ([loss per candidate], [relative error per candidate], [bytes per candidate])} for the linears
    in `free`; bytes are measured for q candidates under `code_coder` "rans" (None otherwise: fixed by the shape)."""
    from .calibrate import layer_hessians, linear_modules, live_weight, shared_factor
    from .convert import _progress
    from .methods import QGroupMethod

    table = {}
    inputs = [runner.embed(w[None]) for w in windows]
    for i in _progress(range(len(plan.layers)), progress, desc="sensitivity: layers", unit="layer", leave=False):
        layer = runner.layers[i].to(device)
        modules = linear_modules(model, plan, i)
        outputs, hessians, owner = layer_hessians(runner, layer, modules, inputs)
        factors = {}
        for name, module in modules.items():
            if name not in free:
                continue
            h = hessians[name]
            w = live_weight(module, h)  # as the driver prepares it
            g = fisher.outputs[name].to(w.device)
            losses, errors, sizes = [], [], []
            for method in candidates.values():
                u = shared_factor(h, owner[name], factors) if method.calibrated else None
                result = method.quantize(w, u, None, h)
                e = w - result.q.to(w.device)
                losses.append(output_loss(g, e, h))
                errors.append(relative_error(e, w, h))
                coded = code_coder is not None and isinstance(method, QGroupMethod)
                sizes.append(written_bytes(lambda writer: method.write(writer, name, result, None), code_coder)
                             if coded else None)
            table[name] = (losses, errors, sizes)
        layer.to("cpu")
        inputs = outputs
    return table


def table_options(groups) -> list[tuple[int, int | None]]:
    """A free table's options (bits, group): 16 and 8 bits (no group), then 4 and 3 bits at each group."""
    return [(b, None) if b > 4 else (b, g) for b in TABLE_CHOICES for g in ((None,) if b > 4 else groups)]


def table_label(option) -> str:
    """(4, 32) -> '4:g32', (16, None) -> '16'."""
    bits, group = option
    return str(bits) if group is None else f"{bits}:g{group}"


def table_sensitivity(w: np.ndarray, fisher: Fisher, as_head: bool, as_embedding: bool, options, calibrated: bool,
                      params_bits: int | None = None, code_coder: str | None = None) -> dict:
    """{(bits, group): (estimated loss, bytes)} of a table for each of `options` (table_options); calibrated:
    whether the conversion GPTQs a k-bit head with its input Hessian (here the full-precision model's,
    fisher.head_hessian)."""
    import torch

    out = {}
    hessian = fisher.head_hessian if as_head and calibrated else None
    for bits, group in options:
        values, stored = stored_table(w, bits, group or 64, hessian, params_bits, code_coder)
        e = torch.from_numpy(np.asarray(w, np.float32) - values)
        loss = 0.0
        if as_head:
            loss += output_loss(fisher.outputs["head"], e, fisher.head_hessian)
        if as_embedding:
            rows = e[fisher.embed_ids]
            loss += 0.5 * float((fisher.embed.double() * (rows * rows).double()).sum())
        out[bits, group] = (loss, stored)
    return out


# ---- the allocation ----------------------------------------------------------------------------------------------

@dataclass
class Allocation:
    rules: dict           # PATTERN -> METHOD for every decoder linear (the fixed rules included)
    head_bits: int
    embed_bits: int
    provenance: dict
    table_groups: dict = field(default_factory=dict)  # chosen k-bit tables' groups, by tensor name
    table_params_bits: int | None = None              # --params-bits of the k-bit tables


def layer_list(layers) -> str:
    """[0, 1, 2, 3, 7] -> '0-3,7'."""
    parts, layers = [], sorted(layers)
    start = prev = layers[0]
    for i in layers[1:] + [None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        parts.append(f"{start}-{prev}" if prev > start else f"{start}")
        if i is not None:
            start = prev = i
    return ",".join(parts)


def compress_rules(choice: dict, layers: int) -> dict:
    """{(layer, kind): spec} -> {PATTERN: spec}, one pattern per (kind, spec) in LINEAR_KINDS order."""
    grouped: dict = {}
    for (i, kind), spec in sorted(choice.items(), key=lambda kv: (LINEAR_KINDS.index(kv[0][1]), kv[0][0])):
        grouped.setdefault((kind, spec), []).append(i)
    return {(kind if len(idx) == layers else f"{layer_list(idx)}.{kind}"): spec
            for (kind, spec), idx in grouped.items()}


def mix_summary(chosen: dict) -> dict:
    """{tensor name: spec} -> {kind: {spec: count}} (kinds in LINEAR_KINDS order)."""
    mix: dict = {}
    for name, spec in chosen.items():
        counts = mix.setdefault(name.split(".")[2], {})
        counts[spec] = counts.get(spec, 0) + 1
    return {k: mix[k] for k in LINEAR_KINDS if k in mix}


def budget_items(plan, fixed, methods: dict, counter: ByteCounter, scope: str, free_tables: list, head_bits,
                 embed_bits, table_groups=(64,)):
    """The byte side of the knapsack: (bytes of everything fixed, weights the budget is over, items, sizes), items
    [(tensor name, options ordered by size)] for the free linears and tables, sizes their bytes per option."""
    fixed_bytes, weights, items, sizes = 0, 0, [], []
    for spec in plan.all():
        counted = scope == "file" or spec.kind == "linear"
        if counted:
            weights += int(np.prod(spec.shape))
        if spec.kind == "linear":
            layer, kind = int(spec.name.split(".")[1]), spec.name.split(".")[2]
            rule = next((r for r in fixed.rules if r.matches(layer, kind)), None)
            if rule is not None:
                if not shape_sized(rule.method):
                    raise ConvertError(f"--target-bpw: the rule {rule.pattern}={rule.spec} gives a method whose size "
                                       "depends on the data; fix linears only with fp16, sign or q2/q3/q4 rules")
                fixed_bytes += counter.linear(rule.method, rule.spec, spec.shape)
                continue
            options = sorted(methods, key=lambda s: (counter.linear(methods[s], s, spec.shape),
                                                     list(methods).index(s)))
            items.append((spec.name, options))
            sizes.append([counter.linear(methods[s], s, spec.shape) for s in options])
        elif not counted:
            continue
        elif spec.name in free_tables:
            options = sorted(table_options(table_groups), key=lambda o: counter.table(o[0], spec.shape, o[1]))
            items.append((spec.name, options))
            sizes.append([counter.table(b, spec.shape, g) for b, g in options])
        elif spec.name == "token_embd.weight":
            fixed_bytes += counter.table(embed_bits, spec.shape)
        elif spec.kind == "head":
            fixed_bytes += counter.table(head_bits, spec.shape)
        else:
            fixed_bytes += counter.plain(spec)
    return fixed_bytes, weights, items, sizes


def allocate(src, arch: str, config: dict, plan, tokenizer, fixed, calibration, target_bpw: float, scope: str,
             candidates: str | None, head_bits: int | None, embed_bits: int | None, block: int, group: int | None,
             progress, params_bits: int | None = None, code_coder: str | None = None) -> Allocation:
    """Measures the sensitivities and solves the knapsack. fixed: the Recipe of the user's rules (the linears they
    match keep their method; the rest are chosen); head_bits / embed_bits: given table bits or None (file scope:
    chosen; linear scope: 16); group: the k-bit tables' (--group; None: chosen among TABLE_GROUPS for a free table,
    64 for a given one); params_bits: --params-bits, for the k-bit tables and the q candidates without
    a :pBITS; code_coder: the conversion's (rANS-coded codes are sized as measured, see the module docstring)."""
    import torch

    from .calibrate import LayerRunner, calibration_windows, linear_modules, source_model

    started = time.monotonic()
    if scope not in SCOPES:
        raise ConvertError(f"--bpw-scope {scope}: choose linear or file")
    if not (isinstance(target_bpw, (int, float)) and math.isfinite(target_bpw) and target_bpw > 0):
        raise ConvertError(f"--target-bpw {target_bpw}: must be a positive number of bits per weight")
    methods = parse_candidates(candidates, block, params_bits)
    tied = config["tie_word_embeddings"]

    # Which tables the allocator chooses (file scope, bits not given); the rest are fixed.
    if scope == "linear":  # the tables are outside the budget: convert's defaults
        head_bits = head_bits or 16
        embed_bits = embed_bits or head_bits
        free_tables = []
    elif tied:  # one table, the head too
        head_bits = embed_bits = head_bits or embed_bits
        free_tables = [] if head_bits else ["token_embd.weight"]
    else:
        free_tables = [n for n, given in (("token_embd.weight", embed_bits), ("output.weight", head_bits))
                       if not given]

    table_groups = (group,) if group else TABLE_GROUPS
    fixed_bytes, weights, items, sizes = budget_items(plan, fixed, methods, ByteCounter(group or 64, params_bits),
                                                      scope, free_tables, head_bits, embed_bits, table_groups)
    free = {name for name, _ in items if name not in free_tables}
    if not free:
        raise ConvertError("--target-bpw: the --set / recipe rules fix every linear; nothing is left to allocate")
    total_budget = math.floor(target_bpw * weights / 8)

    def check_reach(sizes, coded_low=False):
        """The budget lies between the smallest and the largest options (coded_low: sizes at fixed width, which
        rANS-coded codes undercut, so only the upper end is known yet)."""
        low = fixed_bytes + sum(min(s) for s in sizes)
        high = fixed_bytes + sum(max(s) for s in sizes)
        if not (coded_low or low <= total_budget) or total_budget > high:
            raise ConvertError(
                f"--target-bpw {target_bpw:g}: the candidates ({', '.join(methods)}) reach "
                f"{math.ceil(low * 8 / weights * 1e4) / 1e4:.4f} to {math.floor(high * 8 / weights * 1e4) / 1e4:.4f} "
                f"bits per {scope} weight on this model" + (" with the fixed tensors" if fixed_bytes else "")
                + (" at fixed width (the codes' rANS coding undercuts the lower end)" if coded_low else ""))

    check_reach(sizes, coded_low=code_coder is not None)
    # Sensitivities on the full-precision model.
    calibration.check()
    torch.manual_seed(calibration.seed)
    windows, paths = calibration_windows(tokenizer, calibration.texts, calibration.samples, calibration.seqlen,
                                         calibration.seed)
    model = source_model(src, arch, config, plan)
    device = torch.device(calibration.device)
    all_linears = {}
    for i in range(len(plan.layers)):
        all_linears.update({n: m for n, m in linear_modules(model, plan, i).items() if n in free})
    fisher = output_fisher(model, windows, all_linears, bool(free_tables), device, progress)
    runner = LayerRunner(model, arch, config, calibration.seqlen, device)
    linear_table = linear_sensitivity(model, runner, plan, windows, fisher, free, methods, device, progress,
                                      code_coder)
    losses = []
    table_losses = {}

    def with_margin(measured, fixed_width):  # measured: bytes of a coded option, None when its size is fixed
        return fixed_width if measured is None else math.ceil(measured * (1 + CODED_MARGIN))

    for k, (name, opts) in enumerate(items):
        if name in linear_table:
            by_spec = dict(zip(methods, linear_table[name][0]))
            measured = dict(zip(methods, linear_table[name][2]))
            losses.append([by_spec[s] for s in opts])
        else:
            table = next(s for s in plan.all() if s.name == name)
            by_option = table_sensitivity(src.planned_tensor(table), fisher,
                                          as_head=tied or name == "output.weight",
                                          as_embedding=name == "token_embd.weight", options=opts,
                                          calibrated=any(m.calibrated for m in methods.values()),
                                          params_bits=params_bits, code_coder=code_coder)
            table_losses[name] = {table_label(o): round(by_option[o][0], 6) for o in table_options(table_groups)}
            measured = {o: by_option[o][1] if code_coder is not None and o[0] <= 4 else None for o in opts}
            losses.append([by_option[o][0] for o in opts])
        sizes[k] = [with_margin(measured[o], size) for o, size in zip(opts, sizes[k])]
        order = sorted(range(len(opts)), key=lambda j: (sizes[k][j], j))  # solve() wants them by size
        items[k] = (name, [opts[j] for j in order])
        sizes[k], losses[k] = [sizes[k][j] for j in order], [losses[k][j] for j in order]
    del model, runner
    if code_coder is not None:
        check_reach(sizes)

    choice = solve(sizes, losses, total_budget - fixed_bytes)
    chosen, picked_bytes, estimated = {}, 0, 0.0
    for (name, opts), c, item_sizes, item_losses in zip(items, choice, sizes, losses):
        chosen[name] = opts[c]
        picked_bytes += item_sizes[c]
        estimated += item_losses[c]
    tables = {name: chosen.pop(name) for name in free_tables}  # (bits, group) each
    if tied and free_tables:
        head_bits = embed_bits = tables["token_embd.weight"][0]
    else:
        embed_bits = tables.get("token_embd.weight", (embed_bits,))[0]
        head_bits = tables.get("output.weight", (head_bits,))[0]
    chosen_groups = {name: g for name, (_, g) in tables.items() if g is not None}
    per_linear = {(int(n.split(".")[1]), n.split(".")[2]): s for n, s in chosen.items()}
    rules = {**{r.pattern: r.spec for r in fixed.rules}, **compress_rules(per_linear, len(plan.layers))}
    predicted = fixed_bytes + picked_bytes
    provenance = {
        "target_bpw": target_bpw, "scope": scope, "candidates": list(methods),
        "measure": "estimated mean-NLL increase (nats/token) = 1/4 sum_i G_i (E H E^T)_ii, G: squared output "
                   "gradients of the calibration NLL (full-precision model)",
        "estimated_loss": round(estimated, 6),
        "predicted_bits_per_weight": round(predicted * 8 / weights, 4),
        "budget_bytes": total_budget, "bytes": predicted,
        **({"code_coder": code_coder, "coded_margin": CODED_MARGIN} if code_coder is not None else {}),
        "calibration": {"text": [p.name for p in paths], "samples": calibration.samples,
                        "seqlen": calibration.seqlen, "seed": calibration.seed},
        "chosen": chosen, "mix": mix_summary(chosen), "head_bits": head_bits, "embed_bits": embed_bits,
        **({"table_groups": chosen_groups} if chosen_groups else {}),
        "sensitivity": {name: {"loss": [float(f"{x:.4g}") for x in linear_table[name][0]],
                               "relative_error": [float(f"{x:.4g}") for x in linear_table[name][1]]}
                        for name in sorted(linear_table)},
        "allocation_seconds": round(time.monotonic() - started, 2),
    }
    if table_losses:
        provenance["table_loss"] = table_losses
    return Allocation(rules, head_bits, embed_bits, provenance, chosen_groups, params_bits)


def describe(provenance: dict) -> list[str]:
    """Lines printed after an allocated conversion: the chosen mix per kind and method."""
    specs = [s for s in provenance["candidates"] if any(s in c for c in provenance["mix"].values())]
    lines = [f"allocation: target {provenance['target_bpw']:g} bits per {provenance['scope']} weight, estimated "
             f"loss {provenance['estimated_loss']:.4f} nats/token, {provenance['allocation_seconds']:.1f} s",
             f"  tables: embedding {provenance['embed_bits']} bits, head {provenance['head_bits']} bits"
             + "".join(f", {name.split('.')[0]} group {g}" for name, g in provenance.get("table_groups", {}).items()),
             "  " + f"{'kind':<9}" + "".join(f"{s:>{max(9, len(s) + 1)}}" for s in specs)]
    totals = {s: sum(c.get(s, 0) for c in provenance["mix"].values()) for s in specs}
    for kind, counts in [*provenance["mix"].items(), ("all", totals)]:
        lines.append("  " + f"{kind:<9}" + "".join(f"{counts.get(s, 0):>{max(9, len(s) + 1)}}" for s in specs))
    return lines
