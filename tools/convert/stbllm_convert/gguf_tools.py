"""GGUF files as comparison rows: their honest bits, and writing (re)quantized ones with the `gguf` package.

Bits follow the definitions of a .stb file's bit report (provenance.bits): linear = bytes of the decoder's 2-D
projection weights (tensors `blk.N.*` with two dimensions: attn_q/k/v/output, ffn_gate/up/down) × 8 / their weights;
file = bytes of all tensors × 8 / all their elements (embedding, head if untied, norms). Neither counts the metadata
(tokenizer, config) or the alignment padding, as a .stb report counts neither its tokenizer blob nor its padding.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .errors import ConvertError


def _reader(path):
    import gguf

    path = Path(path)
    if not path.is_file():
        raise ConvertError(f"GGUF file {path} does not exist")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 - the reader raises ValueError, struct errors, numpy errors ...
        raise ConvertError(f"{path} is not a readable GGUF file: {str(e).splitlines()[0] if str(e) else e!r}") \
            from None


def _is_linear(name: str, shape) -> bool:
    return name.startswith("blk.") and len(shape) == 2


def gguf_bits(path) -> dict:
    """Honest bits of a GGUF file (see the module docstring) and the quantization types of its linear weights."""
    reader = _reader(path)
    linear_bytes = linear_weights = all_bytes = all_weights = 0
    types: set[str] = set()
    for t in reader.tensors:
        all_bytes += int(t.n_bytes)
        all_weights += int(t.n_elements)
        if _is_linear(t.name, t.shape):
            linear_bytes += int(t.n_bytes)
            linear_weights += int(t.n_elements)
            types.add(t.tensor_type.name)
    if not linear_weights:
        raise ConvertError(f"{path} has no decoder projection weights (no 2-D blk.* tensors)")
    return {"linear_weights": linear_weights, "linear_bits_per_weight": round(linear_bytes * 8 / linear_weights, 4),
            "file_weights": all_weights, "file_bits_per_weight": round(all_bytes * 8 / all_weights, 4),
            "types": sorted(types)}


def write_gguf(out, architecture: str, fields, tensors) -> None:
    """Writes a GGUF file atomically (temp file + rename). fields: (key, value, GGUFValueType, array sub-type or
    None); tensors: (name, float32 array in numpy order [rows, cols], GGMLQuantizationType) quantized here."""
    import gguf

    out = Path(out)
    tmp = out.with_name(f".{out.name}.partial")
    writer = gguf.GGUFWriter(str(tmp), architecture)
    try:
        for key, value, vtype, sub_type in fields:
            writer.add_key_value(key, value, vtype, sub_type=sub_type)
        for name, array, qtype in tensors:
            try:
                data = gguf.quants.quantize(np.ascontiguousarray(array, dtype=np.float32), qtype)
            except (gguf.quants.QuantError, NotImplementedError) as e:
                raise ConvertError(f"{name} {tuple(array.shape)} cannot be stored as {qtype.name}: {e}") from None
            if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                writer.add_tensor(name, data)
            else:
                writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def quant_type(name: str):
    """A GGMLQuantizationType from its name (q4_0, Q8_0, f16, ...); ConvertError naming the choices."""
    import gguf

    try:
        return gguf.GGMLQuantizationType[name.upper()]
    except KeyError:
        choices = ", ".join(t.name.lower() for t in gguf.GGMLQuantizationType)
        raise ConvertError(f"unknown GGUF type {name!r} (one of {choices})") from None


def requantize_gguf(source, out, linear_type, table_type, progress: bool | None = None) -> dict:
    """Writes `out`: the GGUF `source` with its decoder projection weights dequantized and quantized again to
    linear_type, its token embedding and head to table_type, every other tensor unchanged. Metadata (config,
    tokenizer) is copied; general.file_type follows linear_type. Returns gguf_bits(out)."""
    import gguf

    from .convert import _progress

    reader = _reader(source)
    fields = []
    for field in reader.fields.values():
        # GGUF.* are the reader's own header fields; the writer adds the architecture itself.
        if field.name.startswith("GGUF.") or field.name == gguf.Keys.General.ARCHITECTURE:
            continue
        value = field.contents()
        if field.name == gguf.Keys.General.FILE_TYPE:
            file_type = getattr(gguf.LlamaFileType, f"MOSTLY_{linear_type.name}", None)
            value = int(file_type) if file_type is not None else value
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        fields.append((field.name, value, field.types[0], sub_type))
    architecture = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()

    def tensors():
        for t in _progress(reader.tensors, progress, desc="tensors", unit="tensor"):
            shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dimensions innermost first
            values = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
            if _is_linear(t.name, shape):
                qtype = linear_type
            elif t.name in ("token_embd.weight", "output.weight"):
                qtype = table_type
            else:
                qtype = t.tensor_type if t.tensor_type in (gguf.GGMLQuantizationType.F32,
                                                           gguf.GGMLQuantizationType.F16) \
                    else gguf.GGMLQuantizationType.F32
            yield t.name, values, qtype

    write_gguf(out, architecture, fields, tensors())
    return gguf_bits(out)
