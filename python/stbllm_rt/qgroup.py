"""stb.qgroup.v1 (docs/format.md): k-bit group quantization, w = scale · code + offset with one fp16 scale and offset
per (row, group of input columns). Pure numpy packing and unpacking of the codes; the C++ reader
(engine/format/qgroup.cpp) decodes the same bytes for the runtime.

Codes are stored densely in chunks of 32 columns, 4·k bytes each, in the order one SIMD load turns into 32 byte
lanes: k = 4 puts column i in the low nibble of byte i and column 16 + i in its high nibble; k = 2 puts column
8s + i in bits 2s..2s+1 of byte i; k = 3 stores the low two bits as k = 2 does, then a u32 of the third bits.
With code_coder "rans" the `codes` component is instead one order-0 rANS stream (engine/format/rans.cpp) of the
rows × cols codes in row-major order, about n·H bits. With params_bits = 8 the scales and offsets are int8 codes
under one fp16 (d_scale, d_offset) per row, decoded by the binary-groups rule (binary_groups.expand_params).
"""
from __future__ import annotations

import numpy as np

from . import _core, binary_groups
from ._core import FormatError

CODEC = "stb.qgroup.v1"
CHUNK = 32
BITS = (2, 3, 4)
CODE_CODER = "rans"  # the one entropy coder of the codes ("code_coder" param)


def check_params(bits: int, group: int) -> None:
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")
    if group % CHUNK or not CHUNK <= group <= 4096:
        raise ValueError(f"group must be a multiple of {CHUNK} in [{CHUNK}, 4096], got {group}")


def row_bytes(cols: int, bits: int) -> int:
    return -(-cols // CHUNK) * 4 * bits


def _two_bit_plane(codes: np.ndarray) -> np.ndarray:
    """uint8 [rows, chunks, 32] codes (low two bits used) -> [rows, chunks, 8] bytes: byte i = sum_s c[8s+i] << 2s."""
    c = codes.reshape(*codes.shape[:2], 4, 8).astype(np.uint8) & 3
    return (c[:, :, 0] | c[:, :, 1] << 2 | c[:, :, 2] << 4 | c[:, :, 3] << 6).astype(np.uint8)


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes [rows, cols] in [0, 2^bits) -> the `codes` component [rows, row_bytes(cols, bits)]."""
    rows, cols = codes.shape
    chunks = -(-cols // CHUNK)
    padded = np.zeros((rows, chunks * CHUNK), np.uint8)
    padded[:, :cols] = codes
    c = padded.reshape(rows, chunks, CHUNK)
    if bits == 4:
        out = c[:, :, :16] | (c[:, :, 16:] << 4)
    else:
        out = _two_bit_plane(c)
        if bits == 3:
            high = np.packbits((c >> 2) & 1, axis=2, bitorder="little")  # 4 bytes: the little-endian u32
            out = np.concatenate([out, high], axis=2)
    return np.ascontiguousarray(out.reshape(rows, -1))


def encode_codes(codes: np.ndarray, bits: int, coder: str | None = None) -> np.ndarray:
    """uint8 codes [rows, cols] -> the `codes` component: fixed width (pack_codes), or with coder "rans" one rANS
    stream of the codes in row-major order."""
    if coder == CODE_CODER:
        return _core.rans_encode(np.ascontiguousarray(codes, dtype=np.uint8).reshape(-1), 1 << bits)
    return pack_codes(codes, bits)


def decode_codes(component: np.ndarray, rows: int, cols: int, bits: int, coder: str | None = None) -> np.ndarray:
    """The `codes` component -> uint8 [rows, chunks * 32] (padding columns 0); raises FormatError on a malformed
    rANS stream (the runtime's decoder) or a fixed-width one with codes in its padding."""
    if coder == CODE_CODER:
        codes = np.zeros((rows, -(-cols // CHUNK) * CHUNK), np.uint8)
        codes[:, :cols] = _core.rans_decode(np.asarray(component, np.uint8), rows * cols, 1 << bits).reshape(rows, cols)
        return codes
    codes = unpack_codes(component, rows, cols, bits)
    if codes[:, cols:].any():
        raise FormatError("a code past the last column is not zero")
    return codes


def unpack_codes(packed: np.ndarray, rows: int, cols: int, bits: int) -> np.ndarray:
    """Inverse of pack_codes: all chunk columns, padding included: uint8 [rows, chunks * 32]."""
    chunks = -(-cols // CHUNK)
    p = np.asarray(packed, np.uint8).reshape(rows, chunks, 4 * bits)
    if bits == 4:
        codes = np.concatenate([p & 0xF, p >> 4], axis=2)
    else:
        low = p[:, :, :8]
        codes = np.concatenate([(low >> (2 * s)) & 3 for s in range(4)], axis=2)
        if bits == 3:
            codes |= np.unpackbits(p[:, :, 8:], axis=2, bitorder="little") << 2
    return codes.reshape(rows, chunks * CHUNK)


def param_codes(scales, offsets, param_scales) -> tuple[np.ndarray, np.ndarray]:
    """The int8 codes of fp16 scales and offsets [rows, G] under each row's (d_scale, d_offset) [rows, 2]
    (params_bits = 8); ValueError if a value is not fp16(d · code) for a code in [-127, 127]."""
    param_scales = np.asarray(param_scales, dtype="<f2")
    return tuple(binary_groups.param_codes(np.asarray(v, dtype="<f2")[:, :, None], param_scales[:, i:i + 1])[:, :, 0]
                 for i, v in enumerate((scales, offsets)))


def stored_params(scales_component, offsets_component, rows: int, groups: int, param_scales_component=None):
    """The fp16 scales and offsets [rows, G] as float32, expanded from 8-bit codes when param_scales_component
    (params_bits = 8: d_scale, d_offset per row) is given; FormatError where the C++ reader refuses them."""
    if param_scales_component is None:
        values = [np.asarray(c).view("<f2").reshape(rows, groups) for c in (scales_component, offsets_component)]
    else:
        d = np.asarray(param_scales_component).view("<f2").reshape(rows, 2)
        values = [binary_groups.expand_params(np.asarray(c).view(np.int8).reshape(rows, groups, 1), d[:, i:i + 1])
                  [:, :, 0] for i, c in enumerate((scales_component, offsets_component))]
    for what, v in zip(("scales", "offsets"), values):
        if not np.isfinite(v).all():
            raise FormatError(f"{what} hold a non-finite value")
    return tuple(v.astype(np.float32) for v in values)


def dequantize(codes_component, scales_component, offsets_component, shape, params,
               param_scales_component=None) -> np.ndarray:
    """The tensor as float32, float(scale) · code + float(offset) (product rounded, then the sum), after the checks
    the C++ reader makes: finite scales and offsets (8-bit ones with params_bits = 8: valid codes and per-row
    scales), zero codes past the last column (fixed width) or a rANS stream of exactly rows × cols codes."""
    rows, cols = shape
    bits, group = params["bits"], params["group"]
    if (params.get("params_bits") == 8) != (param_scales_component is not None):
        raise FormatError("param_scales go with params_bits = 8 and only with it")
    scales, offsets = stored_params(scales_component, offsets_component, rows, -(-cols // group),
                                    param_scales_component)
    codes = decode_codes(codes_component, rows, cols, bits, params.get("code_coder"))
    per_col = lambda a: np.repeat(a, group, axis=1)[:, :cols]  # noqa: E731
    return per_col(scales) * codes[:, :cols].astype(np.float32) + per_col(offsets)
