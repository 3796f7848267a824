"""The layer-by-layer calibration driver shared by the calibrated methods (REFERENCE_ALGORITHMS.md §0).

The calibration windows are embedded once; then, for each decoder layer in turn (only that layer on the compute
device): every linear's Hessian H = (2/N) sum x x^T (float32) is collected from the layer's inputs, each linear is
quantized by its recipe's method (recipe.py; calibrated methods from H's damped inverse Cholesky factor, the others
from the weight alone), the quantized weights are put back into the layer, and the inputs are run through the
QUANTIZED layer to become the next layer's inputs. Position embeddings and the causal (sliding-window) mask are
built here and passed explicitly to each layer.

With N:M and layer-wise allocation, a first pass runs the windows through the unquantized layers to measure each
layer's share of outlier weights (RIA importance), which sets that layer's N (mean exactly the requested N).

Checkpoints: with a work directory, each finished layer's packed tensors and the next layer's inputs are saved
there, so `resume=True` continues a killed conversion from the last finished layer.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import ConvertError


@dataclass
class CalibrationOptions:
    texts: list = field(default_factory=list)  # text files; empty = the C4 sample
    samples: int = 128
    seqlen: int = 2048
    seed: int = 0
    device: str = "cpu"
    work_dir: Path | None = None
    resume: bool = False

    def check(self):
        if self.samples < 1 or self.seqlen < 2:
            raise ConvertError("--calib-samples must be >= 1 and --calib-seqlen >= 2")
        if self.resume and self.work_dir is None:
            raise ConvertError("--resume needs --work-dir (where the per-layer checkpoints are)")
        if self.device not in ("cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise ConvertError(f"--device {self.device}: expected cpu or cuda")


def read_text(path) -> str:
    """A text file with Wikipedia-dump `<doc ...>` / `</doc>` lines dropped (they are markup, not text)."""
    try:
        raw = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConvertError(f"cannot read text file {path}: {e}") from None
    return "\n".join(line for line in raw.split("\n") if not line.startswith(("<doc", "</doc")))


def calibration_windows(tokenizer, texts, samples: int, seqlen: int, seed: int):
    """`samples` windows of `seqlen` tokens at random offsets (Python random, seeded) of the texts tokenized once
    without special tokens. Returns a LongTensor [samples, seqlen]."""
    import torch

    paths = [Path(t) for t in texts]
    if not paths:
        from .assets import text_sample_paths
        paths = [text_sample_paths()["c4"]]
    ids = []
    for p in paths:
        ids.extend(tokenizer.encode(read_text(p), add_special_tokens=False))
    if len(ids) < seqlen + 1:
        raise ConvertError(f"the calibration text has {len(ids)} tokens, fewer than --calib-seqlen {seqlen} + 1")
    rng = random.Random(seed)
    starts = [rng.randint(0, len(ids) - seqlen - 1) for _ in range(samples)]
    return torch.tensor([ids[s:s + seqlen] for s in starts], dtype=torch.long), paths


def source_model(src, arch: str, config: dict, plan):
    """The source model as a float32 transformers model (eval mode, sdpa attention)."""
    import torch
    from transformers import AutoModelForCausalLM

    from .oracle import hf_config

    hf_cfg = hf_config(arch, config)
    hf_cfg._attn_implementation = "sdpa"
    model = AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32).eval()
    state = {spec.hf_name: torch.from_numpy(np.ascontiguousarray(src.tensor(spec.hf_name))) for spec in plan.all()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if set(missing) - {"lm_head.weight"} or unexpected:
        raise ConvertError(f"cannot build the calibration model: missing {missing}, unexpected {unexpected}")
    return model


class LayerRunner:
    """Runs calibration windows through one decoder layer at a time, with explicit positions and masks."""

    def __init__(self, model, arch: str, config: dict, seqlen: int, device):
        import torch

        self.arch, self.device = arch, device
        inner = model.model.decoder if arch == "opt" else model.model
        self.layers = inner.layers
        self.embed_tokens = inner.embed_tokens
        self.positions = torch.arange(seqlen)[None]
        self.position_weights = inner.embed_positions.weight if arch == "opt" else None
        self.position_offset = config.get("position_offset", 0)
        self.rotary = None if arch == "opt" else inner.rotary_emb
        self.final_norm = inner.final_layer_norm if arch == "opt" else inner.norm  # its output is the head's input
        i, j = torch.arange(seqlen)[:, None], torch.arange(seqlen)[None]
        visible = j <= i
        window = config.get("sliding_window")
        if window:
            visible &= j > i - window
        self.mask = torch.zeros((1, 1, seqlen, seqlen)).masked_fill(~visible, torch.finfo(torch.float32).min)
        self.mask = self.mask.to(device)
        self.position_embeddings = None
        if self.rotary is not None:
            self.rotary.to(device)
            with torch.no_grad():  # cos/sin only take dtype and device from their first argument
                self.position_embeddings = self.rotary(self.mask, self.positions.to(device))

    def embed(self, ids):
        """Hidden states entering layer 0 for token ids [1, T] (on the CPU)."""
        import torch

        with torch.no_grad():
            h = self.embed_tokens(ids)
            if self.position_weights is not None:
                h = h + self.position_weights[self.positions[0] + self.position_offset][None]
        return h

    def forward(self, layer, hidden):
        import torch

        kwargs = {"attention_mask": self.mask, "position_ids": self.positions.to(self.device)}
        if self.position_embeddings is not None:
            kwargs["position_embeddings"] = self.position_embeddings
        with torch.no_grad():
            out = layer(hidden.to(self.device), **kwargs)
        return (out[0] if isinstance(out, tuple) else out).to("cpu")


def _collect_inputs(runner, layer, modules: dict, inputs: list, statistic):
    """Runs every window through `layer` with a forward hook on each module of `modules`; statistic(name, x2d)
    accumulates whatever is needed. Modules fed the same tensor (q/k/v, gate/up) get the same x2d object, so a
    statistic can compute once per input. Returns the layer outputs."""
    last = [None, None]  # the latest module input and its 2-D float view

    def hook(module, args, output, name):
        if args[0] is not last[0]:
            last[:] = args[0], args[0].reshape(-1, args[0].shape[-1]).float()
        statistic(name, last[1])
    handles = [m.register_forward_hook(lambda mod, args, out, name=name: hook(mod, args, out, name))
               for name, m in modules.items()]
    try:
        return [runner.forward(layer, h) for h in inputs]
    finally:
        for handle in handles:
            handle.remove()


def linear_modules(model, plan, i: int) -> dict:
    """{canonical name: module} of layer i's linears."""
    return {spec.name: model.get_submodule(spec.hf_name.removesuffix(".weight"))
            for spec in plan.layers[i] if spec.kind == "linear"}


def live_weight(module, h):
    """The linear's weight as float, its dead input columns (inputs that are always zero: diag H = 0) zeroed as
    GPTQ does."""
    import torch

    w = module.weight.detach().float().clone()
    w[:, torch.diag(h) == 0] = 0
    return w


def shared_factor(h, key: str, factors: dict):
    """The inverse-Hessian factor of input `key`, computed once and kept in `factors` (q/k/v share one input, and so
    do gate/up)."""
    from .binarize import inverse_hessian_factor

    if key not in factors:
        factors[key] = inverse_hessian_factor(h)
    return factors[key]


def layer_hessians(runner, layer, modules: dict, inputs: list):
    """Runs every window through `layer` and returns (outputs, hessians, owner): hessians[name] is the input
    Hessian H = (2/N) sum x x^T (float32) of each module in `modules`; modules fed the same input (q/k/v, gate/up)
    share one H object, and owner[name] names the module whose entry it is (one inverse factor per owner)."""
    sums, tokens, owner, latest = {}, {}, {}, [None, None]

    def statistic(name, x):
        if x is not latest[0]:
            latest[:] = x, name
            sums[name] = sums.get(name, 0) + x.t() @ x
            tokens[name] = tokens.get(name, 0) + x.shape[0]
        owner[name] = latest[1]
    outputs = _collect_inputs(runner, layer, modules, inputs, statistic)
    shared = {first: sums[first] * (2.0 / tokens[first]) for first in sums}
    return outputs, {name: shared[owner[name]] for name in modules}, owner


class Calibrator:
    """Drives a calibrated method over a model. Call `add_layer(writer, i)` for i = 0, 1, ... in order."""

    def __init__(self, recipe, src, arch: str, config: dict, plan, tokenizer, options: CalibrationOptions,
                 progress=None):
        import torch

        options.check()
        if options.device != "cpu" and not torch.cuda.is_available():
            raise ConvertError(f"--device {options.device}: torch sees no CUDA device")
        if tokenizer.kind == "none":
            raise ConvertError("calibration needs the model's tokenizer; this model has none (pass --tokenizer)")
        self.recipe, self.plan, self.options, self.progress = recipe, plan, options, progress
        self.device = torch.device(options.device)
        self.start = time.monotonic()
        torch.manual_seed(options.seed)
        windows, paths = calibration_windows(tokenizer, options.texts, options.samples, options.seqlen,
                                             options.seed)
        self.calibration = {"text": [p.name for p in paths], "samples": options.samples,
                            "seqlen": options.seqlen, "seed": options.seed, "device": options.device}

        self.model = source_model(src, arch, config, plan)
        self.runner = LayerRunner(self.model, arch, config, options.seqlen, self.device)

        self.work_dir = Path(options.work_dir).expanduser() if options.work_dir else None
        self.key = hashlib.sha256(json.dumps({"source": src.description, "recipe": recipe.describe(),
                                              "params": [m.params() for m in recipe.methods()],
                                              "calibration": self.calibration},
                                             sort_keys=True).encode()).hexdigest()[:16]
        self._prepare_work_dir()
        self.outlier_ratios = None
        self.layer_nm = self._allocate(windows)
        self.layer_log: list[dict] = []
        self.next_layer = 0
        self.inputs = None
        self._windows = windows

    # ---- work directory --------------------------------------------------------------------------------------

    def _prepare_work_dir(self):
        if self.work_dir is None:
            return
        self.work_dir.mkdir(parents=True, exist_ok=True)
        stamp = self.work_dir / "conversion.json"
        if self.options.resume:
            if not stamp.is_file() or json.loads(stamp.read_text()).get("key") != self.key:
                raise ConvertError(f"--resume: {self.work_dir} holds no checkpoints of this conversion (different "
                                   "model, method or calibration options)")
        else:
            for old in [*self.work_dir.glob("layer-*.pt"), *self.work_dir.glob("inputs-*.pt"),
                        *self.work_dir.glob("*.partial"), self.work_dir / "allocation.json"]:
                old.unlink(missing_ok=True)
            _replace_file(stamp, lambda partial: partial.write_text(json.dumps({"key": self.key})))

    def _checkpoint_path(self, i: int) -> Path:
        return self.work_dir / f"layer-{i:04d}.pt"

    def _inputs_path(self, i: int) -> Path:
        return self.work_dir / f"inputs-{i:04d}.pt"

    def _save_checkpoint(self, i: int, tensors: list, log: dict):
        """The inputs of layer i+1, then layer i's packed results (each file replaced atomically), then layer i's
        inputs are dropped: wherever the process dies, the first layer without a checkpoint has its inputs saved."""
        import torch

        _replace_file(self._inputs_path(i + 1), lambda partial: torch.save(self.inputs, partial))
        _replace_file(self._checkpoint_path(i), lambda partial: torch.save({"tensors": tensors, "log": log}, partial))
        self._inputs_path(i).unlink(missing_ok=True)

    def _load_inputs(self, i: int):
        import torch

        path = self._inputs_path(i)
        if not path.is_file():
            raise ConvertError(f"--resume: {self.work_dir} has no saved inputs for layer {i}; start without --resume")
        return torch.load(path, weights_only=False)

    # ---- layer-wise N:M allocation ---------------------------------------------------------------------------

    def _allocate(self, windows) -> list:
        """Per-layer N (kept of M) when one binary method with layer-wise allocation quantizes every linear; else
        None per layer (each linear's method uses its own N:M)."""
        method, layers = self.recipe.default, len(self.plan.layers)
        if not self.recipe.uniform or method.nm is None or not getattr(method, "layerwise", False):
            return [None] * layers
        if self.work_dir is not None and (self.work_dir / "allocation.json").is_file() and self.options.resume:
            saved = json.loads((self.work_dir / "allocation.json").read_text())
            self.outlier_ratios = saved["ratios"]
            return [tuple(x) for x in saved["nm"]]
        from .binarize import allocate_nm, importance, outlier_ratio

        inputs = [self.runner.embed(w[None]) for w in windows]
        ratios = []
        for i in self._bar(range(layers), "outlier scan"):
            layer = self.runner.layers[i].to(self.device)
            modules = linear_modules(self.model, self.plan, i)
            sq, square = {}, [None, None]

            def statistic(name, x):
                if x is not square[0]:
                    square[:] = x, (x * x).sum(0).double()
                sq[name] = sq.get(name, 0) + square[1]
            inputs = _collect_inputs(self.runner, layer, modules, inputs, statistic)
            scores = [importance(m.weight.float(), sq[name].float().sqrt(), "ria") for name, m in modules.items()]
            ratios.append(outlier_ratio(scores, method.hyper_m))
            layer.to("cpu")
        nm = method.nm
        kept = allocate_nm(ratios, nm[0], nm[1], method.lamda)
        self.outlier_ratios = [round(r, 6) for r in ratios]
        result = [(k, nm[1]) for k in kept]
        if self.work_dir is not None:
            _replace_file(self.work_dir / "allocation.json", lambda partial: partial.write_text(
                json.dumps({"nm": result, "ratios": self.outlier_ratios})))
        return result

    def _bar(self, iterable, desc):
        from .convert import _progress
        return _progress(iterable, self.progress, desc=desc, unit="layer", leave=False)

    # ---- the sequential pass ---------------------------------------------------------------------------------

    def add_layer(self, writer, i: int) -> None:
        import torch

        from .binarize import importance, nm_keep

        if i != self.next_layer:
            raise AssertionError(f"layers must be calibrated in order (expected {self.next_layer}, got {i})")
        self.next_layer += 1
        modules = linear_modules(self.model, self.plan, i)
        resuming = self.work_dir is not None and self.options.resume
        if resuming and self._checkpoint_path(i).is_file():
            saved = torch.load(self._checkpoint_path(i), weights_only=False)
            for name, result, nm in saved["tensors"]:
                self._method(i, name).write(writer, name, result, nm)
            self.layer_log.append(saved["log"])
            return
        if self.inputs is None:
            self.inputs = (self._load_inputs(i) if resuming and i > 0
                           else [self.runner.embed(w[None]) for w in self._windows])
        started = time.monotonic()
        layer = self.runner.layers[i].to(self.device)
        # One Hessian (and one inverse factor) per distinct input: q/k/v share theirs, and so do gate/up.
        _, hessians, owner = layer_hessians(self.runner, layer, modules, self.inputs)
        saved, salient, columns, regions, factors = [], 0, 0, [], {}
        for name, module in modules.items():
            method = self._method(i, name)
            nm = self.layer_nm[i] or method.nm
            h = hessians[name]
            u = shared_factor(h, owner[name], factors) if method.calibrated else None
            w = live_weight(module, h)
            keep = None
            if nm is not None and method.calibrated:  # binary methods prune by their importance metric
                score = importance(w, torch.diag(h).sqrt(), method.importance)
                keep = torch.from_numpy(nm_keep(score.cpu().numpy(), *nm)).to(w.device)
            result = method.quantize(w, u, keep, h)
            module.weight.data.copy_(result.q.to(module.weight.dtype))
            result = _to_cpu(result)
            method.write(writer, name, result, nm)
            saved.append((name, result, nm))
            if "salient_columns" in result.stats:
                salient += result.stats["salient_columns"]
                columns += w.shape[1]
                regions.append(result.stats["region_fractions"])
        self.inputs = _collect_inputs(self.runner, layer, {}, self.inputs, None)
        layer.to("cpu")
        nm = self.layer_nm[i] or self.recipe.default.nm
        log = {"layer": i, "nm": list(nm) if nm else None, "seconds": round(time.monotonic() - started, 2)}
        if regions:  # binary methods' statistics
            log.update(salient_column_fraction=round(salient / columns, 4),
                       region_fractions=[round(float(x), 4) for x in np.mean(regions, axis=0)])
        self.layer_log.append(log)
        if self.work_dir is not None:
            self._save_checkpoint(i, saved, log)

    def head_hessian(self):
        """H = (2/N) sum x x^T (float32) of the LM head's input x over the calibration windows: the final norm of the
        last quantized layer's outputs. Call after the last add_layer."""
        import torch

        layers = len(self.plan.layers)
        if self.next_layer != layers:
            raise AssertionError(f"the head's Hessian needs all {layers} layers added first")
        if self.inputs is None:  # every layer came from a checkpoint: the last one saved its outputs
            self.inputs = self._load_inputs(layers)
        total, tokens = 0, 0
        with torch.no_grad():
            for hidden in self.inputs:
                x = self.runner.final_norm(hidden).reshape(-1, hidden.shape[-1]).float()
                total, tokens = total + x.t() @ x, tokens + x.shape[0]
        return total * (2.0 / tokens)

    def _method(self, layer: int, name: str):
        return self.recipe.method_for(layer, name.split(".")[2])

    def provenance(self) -> dict:
        """What went into the file's provenance: calibration set, per-layer N:M and statistics, time, memory."""
        nm = [x for x in self.layer_nm if x is not None]
        out = {"calibration": self.calibration, "layers": self.layer_log,
               "calibration_seconds": round(time.monotonic() - self.start, 2),
               "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
        if nm:
            out["nm_per_layer"] = [n for n, _ in nm]
            out["nm_mean_kept"] = sum(n for n, _ in nm) / len(nm)
        if self.outlier_ratios:
            out["outlier_ratios"] = self.outlier_ratios
        return out


def _replace_file(path: Path, write) -> None:
    """write(partial) fills a temporary file, which then replaces `path` at once: a reader sees the old or the new
    file, never half of one, whenever the process dies."""
    partial = path.with_name(path.name + ".partial")
    write(partial)
    os.replace(partial, path)


def _to_cpu(result):
    """A method's result (a dataclass) with every tensor field on the CPU."""
    from dataclasses import fields, replace

    import torch
    return replace(result, **{f.name: getattr(result, f.name).cpu() for f in fields(result)
                              if isinstance(getattr(result, f.name), torch.Tensor)})
