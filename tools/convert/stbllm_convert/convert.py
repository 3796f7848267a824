"""The conversion driver: source -> canonical config + tokenizer -> layer-by-layer quantization -> .stb."""
from __future__ import annotations

import datetime
import os
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

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
RUN_MEASUREMENTS = ("seconds", "calibration_seconds", "peak_rss_mib")


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


def convert(model, out, method: str = "fp16", nm=None, block: int = 128, tokenizer=None,
            progress: bool | None = None, head_bits: int = 16, calibration: CalibrationOptions | None = None,
            **method_options) -> dict:
    """Converts MODEL (HF directory, .gguf file or `smollm2-135m`) into the .stb file `out`.

    method: a registered method name (fp16, sign, billm, stbllm, arb-x, arb-rc, onebit-svid); nm: "N:M" string or (N, M) or None; block: scale
    block size; tokenizer: optional path overriding the model's tokenizer; progress: True (always), None (when on
    a terminal), False (never); head_bits: 16 (fp16) or 8 (stb.int8-group.v1) for the token embedding and the LM
    head; calibration: CalibrationOptions for calibrated methods (default: 128 x 2048 tokens of the C4 sample,
    seed 0, cpu); method_options: importance, layerwise, lamda, hyper_m (calibrated methods), arb_iters
    (arb-x, arb-rc), svid, kd_steps, kd_lr (onebit-svid).
    Returns {"path", "bits", "seconds", "file_size", "architecture", "tensors"}.
    Raises ConvertError for user errors; nothing is written unless the whole conversion succeeds."""
    start = time.monotonic()
    date, reproducible = conversion_date()
    if isinstance(nm, str):
        nm = parse_nm(nm)
    elif nm is not None:
        nm = parse_nm(f"{nm[0]}:{nm[1]}")
    quantizer = make_method(method, nm=nm, block=block, **method_options)
    if calibration is not None and not (quantizer.calibrated or getattr(quantizer, "kd_steps", 0)):
        raise ConvertError(f"calibration options need a calibrated method (billm, stbllm, arb-x, arb-rc) or "
                           f"onebit-svid with --kd-steps, not {quantizer.name}")
    if head_bits not in (16, 8):
        raise ConvertError(f"--head-bits {head_bits}: must be 16 or 8")
    out = Path(out).expanduser()
    if out.is_dir():
        raise ConvertError(f"output {out} is a directory; give a file name like model.stb")
    if not out.parent.is_dir():
        raise ConvertError(f"output directory {out.parent} does not exist")

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
        provenance = {
            "converter_version": __version__,
            "source": src.description,
            "method": quantizer.name,
            **quantizer.params(),
            "head_bits": head_bits,
            "date": date,
        }
        writer = StbWriter({"architecture": arch, "config": config, "tokenizer": tok_spec,
                            "provenance": provenance})

        def load(spec):
            w = src.tensor(spec.hf_name)
            if tuple(w.shape) != tuple(spec.shape):
                raise ConvertError(f"tensor {spec.hf_name} has shape {tuple(w.shape)}, the config implies "
                                   f"{tuple(spec.shape)}")
            return w

        def add_plain(spec, w):
            if spec.kind in ("norm", "bias"):
                writer.add_f32(spec.name, w)
            elif head_bits == 8 and spec.name in ("token_embd.weight", "output.weight"):
                writer.add_int8_group(spec.name, w)
            elif spec.kind == "embedding":
                writer.add_f16(spec.name, to_f16(spec.name, w))
            elif spec.kind == "head":
                quantizer.add_head(writer, spec.name, w)
            else:
                raise AssertionError(spec.kind)

        calibrator = None
        if quantizer.calibrated:
            calibrator = Calibrator(quantizer, src, arch, config, plan, _calibration_tokenizer(tok_spec, tok_blob),
                                    calibration or CalibrationOptions(), progress)
        for spec in plan.pre:
            add_plain(spec, load(spec))
        bar = _progress(range(len(plan.layers)), progress, desc=f"{quantizer.name} layers", unit="layer")
        for i in bar:
            layer = plan.layers[i]
            linears = {}
            for spec in layer:
                if spec.kind != "linear":
                    add_plain(spec, load(spec))
                elif calibrator is None:
                    linears[spec.name] = load(spec)
            if calibrator is None:
                quantizer.add_layer(writer, i, linears)
            else:
                calibrator.add_layer(writer, i)
            del linears
        for spec in plan.post:
            add_plain(spec, load(spec))
        writer.metadata["provenance"].update(quantizer.finish(writer, SimpleNamespace(
            src=src, arch=arch, config=config, plan=plan, tokenizer=lambda: _calibration_tokenizer(tok_spec, tok_blob),
            calibration=calibration or CalibrationOptions(), progress=progress)))
        if tok_blob is not None:
            writer.add_bytes("tokenizer.data", tok_blob)

        if calibrator is not None:
            writer.metadata["provenance"].update(calibrator.provenance())
        provenance = writer.metadata["provenance"]
        provenance["seconds"] = round(time.monotonic() - start, 2)
        if reproducible:
            for entry in [provenance, *provenance.get("layers", [])]:
                for key in RUN_MEASUREMENTS:
                    entry.pop(key, None)
        try:
            report = writer.write(out)
        except OSError as e:  # e.g. a full disk: the writer has removed its temporary file, OUT is untouched
            raise ConvertError(f"cannot write {out}: {e.strerror or e}") from None
    return {"path": str(out), "bits": report, "seconds": round(time.monotonic() - start, 2),
            "file_size": os.path.getsize(out), "architecture": arch,
            "tensors": sum(1 for _ in plan.all()) + (tok_blob is not None)}
