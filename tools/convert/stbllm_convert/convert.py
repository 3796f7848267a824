"""The conversion driver: source -> canonical config + tokenizer -> layer-by-layer quantization -> .stb."""
from __future__ import annotations

import datetime
import os
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from . import __version__
from .arch import canonical_config, tensor_plan
from .errors import ConvertError, ConvertWarning
from .calibrate import CalibrationOptions, Calibrator
from .methods import make_method, parse_nm, to_f16
from .source import open_source
from .tokenizer_meta import tokenizer_metadata


def _progress(iterable, enabled, **kw):
    if enabled is False:
        return iterable
    from tqdm import tqdm
    return tqdm(iterable, disable=None if enabled is None else False, **kw)


# Provenance values that differ from run to run: left out of reproducible files (SOURCE_DATE_EPOCH).
RUN_MEASUREMENTS = ("seconds", "calibration_seconds", "peak_rss_mib", "allocation_seconds")


def conversion_date() -> tuple[str, bool]:
    """(ISO date for provenance, reproducible). SOURCE_DATE_EPOCH (the reproducible-builds convention) fixes the date
    and asks for a file that depends only on the inputs: the same inputs and seed give the same bytes."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch is None:
        return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), False
    try:
        when = datetime.datetime.fromtimestamp(int(epoch), datetime.timezone.utc)
    except (ValueError, OverflowError, OSError):
        raise ConvertError(f"SOURCE_DATE_EPOCH={epoch!r}: expected seconds since 1970 (an integer)") from None
    return when.isoformat(timespec="seconds"), True


def _calibration_tokenizer(spec, blob):
    from stbllm_rt.tokenizer import Tokenizer

    if spec.get("kind") == "none":
        raise ConvertError("calibration needs the model's tokenizer; this model has none (pass --tokenizer)")
    return Tokenizer(spec, blob)


def add_table(writer, name: str, w, bits: int, group: int, head_hessian=None, params_bits: int | None = None) -> None:
    """An embedding table or LM head: fp16 (16), int8 per group of 64 (8) or k-bit groups (4, 3, 2; stb.qgroup.v1
    with `group` columns per scale, params_bits 8: 8-bit scales and offsets), rounded to nearest or, given the head's
    input Hessian, GPTQ with it (as a linear over the final hidden states: act-order, group fits weighted by diag H)."""
    if bits == 16:
        writer.add_f16(name, to_f16(name, w))
    elif bits == 8:
        writer.add_int8_group(name, w)
    elif head_hessian is None:
        make_method(f"q{bits}-rtn", group=group, params_bits=params_bits).add_linear(writer, name, w)
    else:
        import torch

        method = make_method(f"q{bits}", group=group, params_bits=params_bits)
        method.write(writer, name, method.quantize(torch.from_numpy(np.asarray(w, np.float32)), None, None,
                                                   head_hessian), None)


def build_recipe(method=None, nm=None, block: int = 128, group=None, rules=(), recipe=None, **method_options):
    """The Recipe and the (embed_bits, head_bits) a recipe file asks for (None when it does not). method: a method
    name or spec (default: the recipe file's, else fp16); rules: PATTERN=METHOD strings, after the file's rules."""
    from .recipe import Recipe, _split_rule, parse_method, read_recipe_file

    spec = read_recipe_file(recipe) if recipe is not None else {}
    default_options = method_options
    if not (method or spec.get("method")):  # the implicit fp16: --params-bits is then for q rules and k-bit tables
        default_options = {k: v for k, v in method_options.items() if k != "params_bits"}
    method = method or spec.get("method") or "fp16"
    if isinstance(nm, str):
        nm = parse_nm(nm)
    elif nm is not None:
        nm = parse_nm(f"{nm[0]}:{nm[1]}")
    if ":" in method:
        if nm is not None or group is not None:
            raise ConvertError(f"method {method!r} already says its N:M / group; drop --nm / --group")
        default = parse_method(method, block=block, **default_options)
    else:
        default = make_method(method, nm=nm, block=block, group=group, **default_options)
    all_rules = {**spec.get("rules", {}), **dict(_split_rule(r) for r in rules)}
    return (Recipe(default, method, all_rules.items(), block=block, **method_options),
            spec.get("embed_bits"), spec.get("head_bits"))


def convert(model, out, method: str | None = None, nm=None, block: int = 128, tokenizer=None,
            progress: bool | None = None, head_bits: int | None = None, calibration: CalibrationOptions | None = None,
            embed_bits: int | None = None, group: int | None = None, rules=(), recipe=None,
            target_bpw: float | None = None, bpw_scope: str | None = None, candidates: str | None = None,
            save_recipe=None, code_coder: str | None = "rans", **method_options) -> dict:
    """Converts MODEL (HF directory, .gguf file or `smollm2-135m`) into the .stb file `out`.

    method: a registered method name (fp16, sign, billm, stbllm, arb-x, arb-rc, onebit-svid, q2, q3, q4, q2-rtn,
    ...) or a method spec such as "stbllm:6:8" (default fp16); nm: "N:M" string or (N, M) or None; block: scale block size of the binary methods;
    group: columns per scale of q2/q3/q4 (default 64) and of 2-4 bit tables; rules: PATTERN=METHOD strings and
    recipe: a recipe file (recipe.py) giving linears other methods; tokenizer: optional path overriding the model's
    tokenizer; progress: True (always), None (when on a terminal), False (never); head_bits / embed_bits: 16 (fp16),
    8 (stb.int8-group.v1) or 4, 3, 2 (stb.qgroup.v1, GPTQ'd with a calibration pass, else rounded to nearest; with
    params_bits 8 among method_options, 8-bit scales and offsets) for the LM head and the token embedding
    (embed_bits defaults to head_bits; a tied table is both); calibration: CalibrationOptions for calibrated
    methods (default: 128 x 2048 tokens of the C4 sample, seed 0, cpu); method_options: importance, layerwise,
    lamda, hyper_m (binary calibrated methods), arb_iters (arb-x, arb-rc), svid, kd_steps, kd_lr (onebit-svid).
    target_bpw: choose the linears' methods among `candidates` (allocate.py; comma-separated specs) for at most
    that many honest bits per weight of bpw_scope "linear" (default) or "file"; the rules fix their linears, group
    is then the tables' only; save_recipe: also write the chosen recipe (JSON) there; code_coder: how
    stb.qgroup.v1 tensors (q2/q3/q4 linears, 2-4 bit tables) store their codes: "rans" (entropy-coded, lossless)
    or None (fixed width).
    Returns {"path", "bits", "seconds", "file_size", "architecture", "tensors"} (+ "allocation").
    Raises ConvertError for user errors; nothing is written unless the whole conversion succeeds."""
    from .recipe import TABLE_BITS, read_recipe_file

    start = time.monotonic()
    date, reproducible = conversion_date()
    file_spec = read_recipe_file(recipe) if recipe is not None else {}
    if target_bpw is None:
        for option, value in (("--bpw-scope", bpw_scope), ("--candidates", candidates),
                              ("--save-recipe", save_recipe)):
            if value is not None:
                raise ConvertError(f"{option} needs --target-bpw")
    elif method is not None or "method" in file_spec:
        raise ConvertError("--target-bpw chooses the method of every linear: drop --method (fix chosen linears "
                           "with --set, pick the choices with --candidates)")
    recipe_obj, file_embed_bits, file_head_bits = build_recipe(method, nm, block,
                                                               group if target_bpw is None else None, rules,
                                                               recipe, **method_options)
    head_bits = head_bits or file_head_bits
    embed_bits = embed_bits or file_embed_bits
    for option, bits in (("--head-bits", head_bits), ("--embed-bits", embed_bits)):
        if bits is not None and bits not in TABLE_BITS:
            raise ConvertError(f"{option} {bits}: must be one of {', '.join(map(str, TABLE_BITS))}")
    if target_bpw is None:
        head_bits = head_bits or 16
        embed_bits = embed_bits or head_bits
    file_groups = file_spec.get("table_group")  # a group for both tables, or {tensor name: group}
    table_group = group or (file_groups if isinstance(file_groups, int) else None) or 64
    # per table: the allocation's chosen group (or the recipe file's), where it differs from table_group
    table_groups = dict(file_groups) if isinstance(file_groups, dict) and not group else {}
    # --params-bits 8: the k-bit tables' params too
    table_params_bits = method_options.get("params_bits") or file_spec.get("table_params_bits")
    calibrated = any(m.calibrated for m in recipe_obj.methods())
    distilled = any(getattr(m, "kd_steps", 0) for m in recipe_obj.methods())
    if calibration is not None and not (calibrated or distilled or target_bpw is not None):
        raise ConvertError(f"calibration options need a calibrated method (billm, stbllm, arb-x, arb-rc, q2, q3, "
                           f"q4) or onebit-svid with --kd-steps, not {recipe_obj.default.name}")
    out = Path(out).expanduser()
    if out.is_dir():
        raise ConvertError(f"output {out} is a directory; give a file name like model.stb")
    if not out.parent.is_dir():
        raise ConvertError(f"output directory {out.parent} does not exist")
    if save_recipe is not None and not Path(save_recipe).expanduser().parent.is_dir():
        raise ConvertError(f"--save-recipe {save_recipe}: its directory does not exist")

    from stbllm_rt.stbfile import StbWriter

    with open_source(model, quiet=progress is False) as src:
        arch, config = canonical_config(src.config)
        plan = tensor_plan(arch, config)
        missing = [t.hf_name for t in plan.all() if src.resolve(t.hf_name) is None]
        if missing:
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise ConvertError(f"{src.description} lacks tensors the {arch} config implies: "
                               f"{', '.join(missing[:5])}{more}")
        tok_spec, tok_blob = tokenizer_metadata(src.tokenizer_dir, tokenizer, src.config, src.generation_config)
        tok_vocab = tok_spec.pop("vocab_size", None)
        if tok_vocab is not None and tok_vocab > config["vocab_size"]:
            warnings.warn(f"the tokenizer has {tok_vocab} tokens but the model only {config['vocab_size']}",
                          ConvertWarning, stacklevel=2)
        kinds = [spec.name.split(".")[2] for spec in plan.layers[0] if spec.kind == "linear"] if plan.layers else []
        recipe_obj.check(len(plan.layers), kinds)
        allocation = None
        if target_bpw is not None:
            from .allocate import allocate
            from .recipe import Recipe

            allocation = allocate(src, arch, config, plan, _calibration_tokenizer(tok_spec, tok_blob), recipe_obj,
                                  calibration or CalibrationOptions(), target_bpw, bpw_scope or "linear", candidates,
                                  head_bits, embed_bits, block, group, progress, table_params_bits,
                                  code_coder)
            recipe_obj = Recipe(recipe_obj.default, recipe_obj.default_spec, allocation.rules.items(), block=block,
                                **method_options)
            recipe_obj.check(len(plan.layers), kinds)
            head_bits, embed_bits = allocation.head_bits, allocation.embed_bits
            table_groups = allocation.table_groups
            calibrated = any(m.calibrated for m in recipe_obj.methods())
        if config["tie_word_embeddings"] and embed_bits != head_bits:
            raise ConvertError(f"this model ties its LM head to the token embedding: --embed-bits {embed_bits} and "
                               f"--head-bits {head_bits} must agree")
        quantizer = recipe_obj.default
        provenance = {
            "converter_version": __version__,
            "source": src.description,
            "method": quantizer.name if recipe_obj.uniform else "recipe",
            **quantizer.params(),
            "head_bits": head_bits,
            "embed_bits": embed_bits,
            "date": date,
        }
        if table_params_bits == 8 and min(head_bits, embed_bits) <= 4:
            provenance["table_params_bits"] = 8
        # A k-bit head (the tied table, else output.weight) is GPTQ'd with its input Hessian when there is a
        # calibration pass: it is written after the last layer, whose outputs give that Hessian.
        head_name = "token_embd.weight" if config["tie_word_embeddings"] else "output.weight"
        calibrated_head = calibrated and head_bits <= 4
        if head_bits <= 4:
            provenance["head_quantizer"] = "gptq" if calibrated_head else "round-to-nearest"
        if not recipe_obj.uniform:
            provenance["recipe"] = recipe_obj.describe()
        if allocation is not None:
            provenance["allocation"] = allocation.provenance
        writer = StbWriter({"architecture": arch, "config": config, "tokenizer": tok_spec,
                            "provenance": provenance}, code_coder=code_coder)

        def add_plain(spec, w):
            if spec.name == head_name and calibrated_head:
                return
            if spec.kind in ("norm", "bias"):
                writer.add_f32(spec.name, w)
            elif spec.name == "token_embd.weight":
                add_table(writer, spec.name, w, embed_bits, table_groups.get(spec.name, table_group),
                          params_bits=table_params_bits)
            elif spec.kind == "head":
                add_table(writer, spec.name, w, head_bits, table_groups.get(spec.name, table_group),
                          params_bits=table_params_bits)
            elif spec.kind == "embedding":  # learned positions
                writer.add_f16(spec.name, to_f16(spec.name, w))
            else:
                raise AssertionError(spec.kind)

        calibrator = None
        if calibrated:
            calibrator = Calibrator(recipe_obj, src, arch, config, plan, _calibration_tokenizer(tok_spec, tok_blob),
                                    calibration or CalibrationOptions(), progress)
        for spec in plan.pre:
            add_plain(spec, src.planned_tensor(spec))
        bar = _progress(range(len(plan.layers)), progress, desc=f"{provenance['method']} layers", unit="layer")
        for i in bar:
            for spec in plan.layers[i]:
                if spec.kind != "linear":
                    add_plain(spec, src.planned_tensor(spec))
                elif calibrator is None:
                    linear_method = recipe_obj.method_for(i, spec.name.split(".")[2])
                    linear_method.add_linear(writer, spec.name, src.planned_tensor(spec))
            if calibrator is not None:
                calibrator.add_layer(writer, i)
        for spec in plan.post:
            add_plain(spec, src.planned_tensor(spec))
        if calibrated_head:
            head = next(spec for spec in plan.all() if spec.name == head_name)
            add_table(writer, head_name, src.planned_tensor(head), head_bits,
                      table_groups.get(head_name, table_group), calibrator.head_hessian(), table_params_bits)
        context = SimpleNamespace(src=src, arch=arch, config=config, plan=plan,
                                  tokenizer=lambda: _calibration_tokenizer(tok_spec, tok_blob),
                                  calibration=calibration or CalibrationOptions(), progress=progress)
        for method_ in recipe_obj.methods():
            writer.metadata["provenance"].update(method_.finish(writer, context))
        if tok_blob is not None:
            writer.add_bytes("tokenizer.data", tok_blob)

        if calibrator is not None:
            writer.metadata["provenance"].update(calibrator.provenance())
        provenance = writer.metadata["provenance"]
        provenance["seconds"] = round(time.monotonic() - start, 2)
        if reproducible:
            for entry in [provenance, *provenance.get("layers", []), provenance.get("allocation", {})]:
                for key in RUN_MEASUREMENTS:
                    entry.pop(key, None)
        if allocation is not None:
            scope = allocation.provenance["scope"]
            measured = writer.bit_report()[f"{scope}_bits_per_weight"]
            predicted = allocation.provenance["predicted_bits_per_weight"]
            if code_coder is None and measured != predicted:  # fixed widths: its byte count must be the file's
                raise ConvertError(f"internal error: the allocator counted {predicted} bits per {scope} weight, the "
                                   f"file holds {measured}")
            for entry in (allocation.provenance, writer.metadata["provenance"]["allocation"]):  # (the writer's copy)
                entry["written_bits_per_weight"] = measured
            if code_coder is not None and measured > target_bpw:  # coded sizes came from the allocation's quantization
                warnings.warn(f"the file holds {measured} bits per {scope} weight, over --target-bpw {target_bpw:g}: "
                              f"the rANS-coded codes came out larger than the allocation measured them (plus its "
                              f"{allocation.provenance['coded_margin']:.1%} margin)", ConvertWarning, stacklevel=2)
        try:
            report = writer.write(out)
        except OSError as e:  # e.g. a full disk: the writer has removed its temporary file, OUT is untouched
            raise ConvertError(f"cannot write {out}: {e.strerror or e}") from None
    result = {"path": str(out), "bits": report, "seconds": round(time.monotonic() - start, 2),
              "file_size": os.path.getsize(out), "architecture": arch,
              "tensors": sum(1 for _ in plan.all()) + (tok_blob is not None)}
    if allocation is not None:
        result["allocation"] = allocation.provenance
        if save_recipe is not None:
            _write_recipe(save_recipe, allocation)
    return result


def _write_recipe(path, allocation) -> None:
    """The chosen recipe as a JSON recipe file (--recipe FILE converts with it again, without the allocation)."""
    import json

    try:
        recipe = {"rules": allocation.rules, "head_bits": allocation.head_bits, "embed_bits": allocation.embed_bits}
        groups = allocation.table_groups
        if groups:  # one group for every k-bit table, or (two untied ones that differ) one per table
            recipe["table_group"] = next(iter(groups.values())) if len(set(groups.values())) == 1 else groups
        if allocation.table_params_bits:
            recipe["table_params_bits"] = allocation.table_params_bits
        Path(path).expanduser().write_text(json.dumps(recipe, indent=1) + "\n")
    except OSError as e:
        raise ConvertError(f"cannot write the recipe {path}: {e.strerror or e}") from None
