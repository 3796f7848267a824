"""Write and read `.stb` v1 files (docs/format.md).

The writer is pure Python (numpy); reading goes through the C++ reader in `_core`, so one validator guards both the
runtime and every Python tool: a file that Python accepts is exactly a file the engine accepts.
"""
from __future__ import annotations

import copy
import json
import os
import struct
from pathlib import Path

import numpy as np

from . import _core, binary_groups, qgroup, rowcol
from ._core import FormatError

MAGIC = b"\x89STB\r\n\x1a\n"
BYTE_ORDER_MARK = 0x0A0B0C0D
FORMAT_VERSION = 1
FIXED_HEADER_SIZE = 64
ALIGNMENT = 64

FEATURE_SLIDING_WINDOW = 1 << 0
FEATURE_NM_MASK = 1 << 1

CODEC_F32 = "stb.f32.v1"
CODEC_F16 = "stb.f16.v1"
CODEC_BYTES = "stb.bytes.v1"
CODEC_SIGN_BLOCK = "stb.sign-block.v1"
CODEC_INT8_GROUP = "stb.int8-group.v1"
CODEC_BINARY_GROUPS = binary_groups.CODEC
CODEC_ROW_COL_SIGN = rowcol.CODEC
CODEC_QGROUP = qgroup.CODEC

LINEAR_SUFFIXES = ("attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_o.weight",
                   "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight")


def _align(n: int) -> int:
    return (n + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


def pack_bits(bits: np.ndarray) -> np.ndarray:
    """bool [rows, cols] -> uint64 [rows, ceil(cols/64)]; bit j of a row is bit j%64 of word j//64."""
    rows, cols = bits.shape
    words = (cols + 63) // 64
    padded = np.zeros((rows, words * 64), dtype=bool)
    padded[:, :cols] = bits
    return np.packbits(padded, axis=1, bitorder="little").view("<u8")


def unpack_bits(words: np.ndarray, cols: int) -> np.ndarray:
    """Inverse of pack_bits."""
    return np.unpackbits(words.view(np.uint8), axis=1, bitorder="little")[:, :cols].astype(bool)


def fixed_header(features: int, header_json: bytes, file_size: int) -> bytes:
    """The 64-byte fixed header for a file whose JSON header is `header_json`."""
    data_offset = _align(FIXED_HEADER_SIZE + len(header_json))
    fixed = struct.pack("<8sIIQQQQIII", MAGIC, BYTE_ORDER_MARK, FORMAT_VERSION, features, len(header_json),
                        data_offset, file_size, _core.crc32c(header_json), 0, 0)
    return fixed + struct.pack("<I", _core.crc32c(fixed))


# Bit-report line of each component of the binary codecs.
COMPONENT_GROUPS = {"signs": "signs", "mask": "masks", "labels": "labels", "salient_labels": "labels",
                    "salient": "salient_bitmap",
                    "residual": "residual_signs", "scales": "scales", "params": "scales", "param_scales": "scales", "row_scales": "scales",
                    "col_scales": "scales", "residual_row_scales": "scales", "residual_col_scales": "scales",
                    "codes": "codes", "offsets": "scales", "group": "labels",
                    **{rowcol.GROUP1_PREFIX + k: "scales" for k in ("row_scales", "col_scales", "residual_row_scales",
                                                                    "residual_col_scales")}}
BINARY_GROUPS = ("signs", "masks", "labels", "salient_bitmap", "residual_signs", "codes", "scales")
# Linear codecs whose bytes the bit report splits by component (codes, signs, masks, scales, ...).
COMPONENT_CODECS = (CODEC_SIGN_BLOCK, CODEC_BINARY_GROUPS, CODEC_ROW_COL_SIGN, CODEC_QGROUP)


def tensor_class(name: str) -> str:
    """The class a tensor's bytes are reported under per tensor kind: attn_q ... ffn_down, token_embd, pos_embd,
    output, or norms_biases."""
    if name in ("token_embd.weight", "pos_embd.weight", "output.weight"):
        return name.removesuffix(".weight")
    if name.endswith(LINEAR_SUFFIXES):
        return name.rsplit(".", 2)[-2]
    return "norms_biases"


def class_report(tensors) -> dict:
    """Bytes, weights, honest bits per weight and codecs of each tensor class; tensors: (name, codec, shape, bytes)
    tuples (byte blobs are not weights and are left out)."""
    out: dict[str, dict] = {}
    for name, codec, shape, nbytes in tensors:
        if codec == CODEC_BYTES:
            continue
        c = out.setdefault(tensor_class(name), {"bytes": 0, "weights": 0, "codecs": {}})
        c["bytes"] += int(nbytes)
        c["weights"] += int(np.prod(shape))
        c["codecs"][codec] = c["codecs"].get(codec, 0) + 1
    for c in out.values():
        c["bits_per_weight"] = round(c["bytes"] * 8 / c["weights"], 4)
    return out


def tensor_group(name: str) -> str:
    """Which line of the bit report a tensor's bytes belong to."""
    if name in ("token_embd.weight", "pos_embd.weight"):
        return "embedding"
    if name == "output.weight":
        return "head"
    if name.endswith(LINEAR_SUFFIXES):
        return "linear"
    return "norms_biases"


class StbWriter:
    """Collects tensors, then writes one `.stb` file atomically (temp file + fsync + rename)."""

    def __init__(self, metadata: dict, code_coder: str | None = None):
        """code_coder: how add_qgroup stores codes: "rans" (entropy-coded) or None (fixed width)."""
        self.metadata = copy.deepcopy(metadata)
        self.code_coder = code_coder
        self._tensors: dict[str, dict] = {}
        self._features = 0

    def _add(self, name: str, codec: str, shape, params: dict | None, components: dict[str, np.ndarray],
             paper_bits: int = 0):
        """paper_bits: the sign bits the papers count for this tensor (one per kept sign, two for salient weights)."""
        if name in self._tensors:
            raise ValueError(f"tensor {name!r} added twice")
        if not (1 <= len(name) <= 256 and all(0x21 <= ord(c) <= 0x7E for c in name)):
            raise ValueError(f"invalid tensor name {name!r}")
        entry = {"codec": codec, "shape": [int(d) for d in shape]}
        if params is not None:
            entry["params"] = params
        data = {k: np.ascontiguousarray(v).reshape(-1).view(np.uint8) for k, v in components.items()}
        self._tensors[name] = {"entry": entry, "data": data, "paper_bits": int(paper_bits)}

    def add_f32(self, name: str, array) -> None:
        a = np.asarray(array, dtype="<f4")
        self._add(name, CODEC_F32, a.shape, None, {"data": a})

    def add_f16(self, name: str, array) -> None:
        a = np.asarray(array, dtype="<f2")
        self._add(name, CODEC_F16, a.shape, None, {"data": a})

    def add_bytes(self, name: str, data: bytes) -> None:
        self._add(name, CODEC_BYTES, (len(data),), None, {"data": np.frombuffer(bytes(data), dtype=np.uint8)})

    def add_sign_block(self, name: str, signs, scales, mask=None, block: int = 128, nm=None) -> None:
        """signs: bool [rows, cols] (True = +1); scales: [rows, ceil(cols/block)] (stored fp16);
        mask: bool [rows, cols] keep-mask (False = exactly zero) or None; nm: (N, M) recorded with the mask."""
        signs = np.asarray(signs, dtype=bool)
        if signs.ndim != 2:
            raise ValueError(f"{name}: signs must be 2-D")
        mask_words = None
        if mask is not None:
            mask = np.asarray(mask, dtype=bool)
            if mask.shape != signs.shape:
                raise ValueError(f"{name}: mask shape {mask.shape} != signs shape {signs.shape}")
            mask_words = pack_bits(mask)
        self.add_sign_block_words(name, signs.shape[1], pack_bits(signs), scales, mask_words, block, nm)

    def add_sign_block_words(self, name: str, cols: int, sign_words, scales, mask_words=None, block: int = 128,
                             nm=None) -> None:
        """add_sign_block with the bit planes already packed (uint64 [rows, ceil(cols/64)], pack_bits layout)."""
        sign_words = np.asarray(sign_words, dtype="<u8")
        rows, words = sign_words.shape
        if words != -(-cols // 64):
            raise ValueError(f"{name}: {cols} columns need {-(-cols // 64)} words per row, got {words}")
        if block % 64 or not 64 <= block <= 4096:
            raise ValueError(f"{name}: block must be a multiple of 64 in [64, 4096], got {block}")
        nblocks = -(-cols // block)
        scales = np.asarray(scales, dtype="<f2")
        if scales.shape != (rows, nblocks):
            raise ValueError(f"{name}: scales must have shape {(rows, nblocks)}, got {scales.shape}")
        if (mask_words is None) != (nm is None):
            raise ValueError(f"{name}: a mask and its nm pattern go together")
        components = {"signs": None, "scales": scales}
        if mask_words is not None:
            mask_words = np.asarray(mask_words, dtype="<u8")
            if mask_words.shape != sign_words.shape:
                raise ValueError(f"{name}: mask shape {mask_words.shape} != signs shape {sign_words.shape}")
            n, m = (int(x) for x in nm)
            if not 1 <= n <= m <= 64:
                raise ValueError(f"{name}: bad N:M {n}:{m}")
            sign_words = sign_words & mask_words  # pruned weights carry a clear sign bit (format rule)
            components["mask"] = mask_words
            self._features |= FEATURE_NM_MASK
            nm = [n, m]
        if cols % 64:  # padding bits past the last column are zero (format rule)
            tail = np.uint64((1 << (cols % 64)) - 1)
            sign_words = sign_words.copy()
            sign_words[:, -1] &= tail
            if mask_words is not None:
                components["mask"] = mask_words.copy()
                components["mask"][:, -1] &= tail
        components["signs"] = sign_words
        kept = rows * cols if mask_words is None else int(np.unpackbits(components["mask"].view(np.uint8)).sum())
        self._add(name, CODEC_SIGN_BLOCK, (rows, cols), {"block": int(block), "nm": nm}, components, kept)

    def add_binary_groups(self, name: str, signs, labels, salient, residual, params, regions: int,
                          block: int = 128, mask=None, nm=None, param_scales=None,
                          label_coder: str | None = binary_groups.LABEL_CODER, salient_labels=None) -> None:
        """stb.binary-groups.v2 (docs/format.md; arguments: stbllm_rt.binary_groups.encode). Stores only what the
        data needs: exact N:M masks as one code per group, signs and labels of kept weights only."""
        try:
            params_json, components, paper_bits = binary_groups.encode(signs, labels, salient, residual, params,
                                                                       regions, block, mask, nm, param_scales,
                                                                       label_coder, salient_labels)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
        if params_json["nm"] is not None:
            self._features |= FEATURE_NM_MASK
        rows, cols = np.shape(signs)
        self._add(name, CODEC_BINARY_GROUPS, (rows, cols), params_json, components, paper_bits)

    def add_row_col_sign(self, name: str, signs, row_scales, col_scales, block: int, mask=None, nm=None,
                         salient=None, residual=None, residual_row_scales=None, residual_col_scales=None,
                         group=None, group1=None) -> None:
        """stb.row-col-sign.v1 (docs/format.md; arguments: stbllm_rt.rowcol.encode)."""
        try:
            params, components, paper_bits = rowcol.encode(signs, row_scales, col_scales, block, mask, nm, salient,
                                                           residual, residual_row_scales, residual_col_scales,
                                                           group, group1)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
        if params["nm"] is not None:
            self._features |= FEATURE_NM_MASK
        self._add(name, CODEC_ROW_COL_SIGN, np.shape(signs), params, components, paper_bits)

    def add_int8_group(self, name: str, array, group: int = 64) -> None:
        """Symmetric 8-bit: per (row, group of 64 columns) scale = max|w| / 127, value = round(w / scale)."""
        if group != 64:
            raise ValueError(f"{name}: stb.int8-group.v1 defines group 64 only")
        w = np.asarray(array, dtype=np.float32)
        if w.ndim != 2:
            raise ValueError(f"{name}: int8-group needs a 2-D matrix")
        rows, cols = w.shape
        groups = -(-cols // group)
        padded = np.zeros((rows, groups * group), np.float32)
        padded[:, :cols] = w
        g = padded.reshape(rows, groups, group)
        scales = (np.abs(g).max(axis=2) / 127).astype("<f2")
        s32 = scales.astype(np.float32)[:, :, None]
        values = np.where(s32 > 0, np.rint(g / np.where(s32 > 0, s32, 1)), 0).clip(-127, 127).astype(np.int8)
        self._add(name, CODEC_INT8_GROUP, (rows, cols), {"group": group},
                  {"values": values.reshape(rows, -1), "scales": scales})

    def add_qgroup(self, name: str, codes, scales, offsets, bits: int, group: int, param_scales=None) -> None:
        """stb.qgroup.v1: codes uint8 [rows, cols] in [0, 2^bits); scales and offsets [rows, ceil(cols/group)], stored
        as fp16 (finite); w = scale · code + offset. param_scales: fp16 [rows, 2] (d_scale, d_offset) to store them
        as 8-bit codes (params_bits = 8); each scale and offset must then be fp16(d · code), code in [-127, 127].
        The codes are stored as the writer's code_coder says: "rans", one order-0 rANS stream (lossless, about n·H
        bits), or None, fixed width."""
        code_coder = self.code_coder
        codes = np.asarray(codes)
        try:
            qgroup.check_params(bits, group)
            if codes.ndim != 2:
                raise ValueError("codes must be 2-D")
            rows, cols = codes.shape
            groups = -(-cols // group)
            if codes.size and (codes.min() < 0 or codes.max() >= 1 << bits):
                raise ValueError(f"codes must lie in [0, {1 << bits})")
            halves = {}
            for key, values in (("scales", scales), ("offsets", offsets)):
                with np.errstate(over="ignore"):  # an overflow to inf is refused below
                    values = np.asarray(values, dtype="<f2")
                if values.shape != (rows, groups):
                    raise ValueError(f"{key} must have shape {(rows, groups)}, got {values.shape}")
                if not np.isfinite(values).all():
                    raise ValueError(f"{key} must be finite fp16 values")
                halves[key] = values
            params = {"bits": int(bits), "group": int(group)}
            if code_coder not in (None, qgroup.CODE_CODER):
                raise ValueError(f"code_coder must be {qgroup.CODE_CODER!r} or None, got {code_coder!r}")
            if code_coder:
                params["code_coder"] = code_coder
            if param_scales is not None:
                param_scales = np.asarray(param_scales, dtype="<f2")
                if param_scales.shape != (rows, 2):
                    raise ValueError(f"param_scales must have shape {(rows, 2)}, got {param_scales.shape}")
                halves["scales"], halves["offsets"] = qgroup.param_codes(halves["scales"], halves["offsets"],
                                                                         param_scales)
                halves["param_scales"], params["params_bits"] = param_scales, 8
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
        self._add(name, CODEC_QGROUP, (rows, cols), params,
                  {"codes": qgroup.encode_codes(codes.astype(np.uint8), bits, code_coder), **halves},
                  bits * rows * cols)

    def bit_report(self) -> dict:
        """Honest bits: bytes actually in the file for each group of tensors, over the weights they hold."""
        group_bytes: dict[str, int] = {}
        group_weights: dict[str, int] = {}
        kept_sign_bits = 0
        dense_linear_bits = 0
        for name, t in self._tensors.items():
            entry = t["entry"]
            if entry["codec"] == CODEC_BYTES:
                continue
            n = int(np.prod(entry["shape"]))
            group = tensor_group(name)
            group_weights[group] = group_weights.get(group, 0) + n
            if group == "linear" and entry["codec"] in COMPONENT_CODECS:
                for key, buf in t["data"].items():
                    label = COMPONENT_GROUPS[key]
                    group_bytes[label] = group_bytes.get(label, 0) + buf.nbytes
                kept_sign_bits += t["paper_bits"]
            else:
                label = "linear_dense" if group == "linear" else group
                nbytes = sum(buf.nbytes for buf in t["data"].values())
                group_bytes[label] = group_bytes.get(label, 0) + nbytes
                if group == "linear":
                    dense_linear_bits += nbytes * 8
        linear_weights = group_weights.get("linear", 0)
        denominators = {**{g: linear_weights for g in BINARY_GROUPS}, "linear_dense": linear_weights,
                        "embedding": group_weights.get("embedding", 0),
                        "head": group_weights.get("head", 0), "norms_biases": group_weights.get("norms_biases", 0)}
        groups = {g: {"bytes": b, "bits_per_weight": round(b * 8 / denominators[g], 4) if denominators[g] else None}
                  for g, b in sorted(group_bytes.items())}
        linear_bytes = sum(group_bytes.get(g, 0) for g in (*BINARY_GROUPS, "linear_dense"))
        all_weights = sum(group_weights.values())
        all_bytes = sum(group_bytes.values())
        return {
            "groups": groups,
            "linear_weights": linear_weights,
            "linear_bits_per_weight": round(linear_bytes * 8 / linear_weights, 4) if linear_weights else None,
            "paper_bits_per_weight": (round((kept_sign_bits + dense_linear_bits) / linear_weights, 4)
                                      if linear_weights else None),
            "file_weights": all_weights,
            "file_bits_per_weight": round(all_bytes * 8 / all_weights, 4) if all_weights else None,
            "classes": class_report((name, t["entry"]["codec"], t["entry"]["shape"],
                                     sum(buf.nbytes for buf in t["data"].values()))
                                    for name, t in self._tensors.items()),
            "note": "linear groups are over all linear weights; embedding/head/norms over their own weights; "
                    "paper bits count one bit per kept sign, two for kept salient weights, k per k-bit code (16 "
                    "per dense fp16 weight), nothing else; classes: each tensor kind over its own weights",
        }

    def write(self, path) -> dict:
        """Writes the file atomically; returns the bit report that went into provenance.bits."""
        path = Path(path)
        metadata = copy.deepcopy(self.metadata)
        report = self.bit_report()
        metadata.setdefault("provenance", {})["bits"] = report
        features = self._features
        if (metadata.get("config") or {}).get("sliding_window") is not None:
            features |= FEATURE_SLIDING_WINDOW

        # Lay components out in insertion order, each 64-byte aligned, and checksum them.
        tensors_json, layout, offset = {}, [], 0
        for name, t in self._tensors.items():
            entry = dict(t["entry"])
            comps = {}
            for key, buf in t["data"].items():
                offset = _align(offset)
                comps[key] = {"offset": offset, "length": int(buf.nbytes), "crc32c": int(_core.crc32c(buf))}
                layout.append((offset, buf))
                offset += buf.nbytes
            entry["components"] = comps
            tensors_json[name] = entry
        header_json = json.dumps({"metadata": metadata, "tensors": tensors_json}, ensure_ascii=False,
                                 separators=(",", ":")).encode("utf-8")
        data_offset = _align(FIXED_HEADER_SIZE + len(header_json))
        file_size = data_offset + offset
        fixed = fixed_header(features, header_json, file_size)

        tmp = path.with_name(f".{path.name}.partial")
        try:
            with open(tmp, "wb") as f:
                f.write(fixed)
                f.write(header_json)
                f.write(b"\0" * (data_offset - FIXED_HEADER_SIZE - len(header_json)))
                pos = 0
                for off, buf in layout:
                    f.write(b"\0" * (off - pos))
                    f.write(memoryview(buf))
                    pos = off + buf.nbytes
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return report


class StbReader:
    """A validated `.stb` file: metadata, tensor table, zero-copy components and dequantized tensors."""

    def __init__(self, path, verify_checksums: bool = True):
        self.path = str(path)
        self._file = _core.StbFile(self.path, verify_checksums)
        header = json.loads(self._file.json)
        self.metadata: dict = header["metadata"]
        self._tensors: dict = header["tensors"]

    @property
    def required_features(self) -> int:
        return self._file.required_features

    @property
    def file_size(self) -> int:
        return self._file.file_size

    def tensor_names(self) -> list[str]:
        return list(self._tensors)

    def tensor_info(self, name: str) -> dict:
        if name not in self._tensors:
            raise KeyError(f"tensor {name!r} is not in {self.path}")
        return self._tensors[name]

    def component(self, name: str, key: str) -> np.ndarray:
        return self._file.component(name, key)

    def blob(self, name: str) -> bytes:
        if self.tensor_info(name)["codec"] != CODEC_BYTES:
            raise FormatError(f"tensor {name!r} is not a byte blob")
        return self.component(name, "data").tobytes()

    def dequantize(self, name: str) -> np.ndarray:
        """The tensor as float32, exactly as the codec defines its values."""
        info = self.tensor_info(name)
        codec, shape = info["codec"], tuple(info["shape"])
        if codec == CODEC_F32:
            return self.component(name, "data").view("<f4").reshape(shape).copy()
        if codec == CODEC_F16:
            return self.component(name, "data").view("<f2").reshape(shape).astype(np.float32)
        if codec == CODEC_SIGN_BLOCK:
            rows, cols = shape
            block = info["params"]["block"]
            words = self.component(name, "signs").view("<u8").reshape(rows, -1)
            values = np.where(unpack_bits(words, cols), np.float32(1), np.float32(-1))
            scales = self.component(name, "scales").view("<f2").reshape(rows, -1).astype(np.float32)
            values *= np.repeat(scales, block, axis=1)[:, :cols]
            if info["params"].get("nm") is not None:
                mask_words = self.component(name, "mask").view("<u8").reshape(rows, -1)
                values *= unpack_bits(mask_words, cols)
            return values
        if codec == CODEC_INT8_GROUP:
            rows, cols = shape
            values = self.component(name, "values").view(np.int8).reshape(rows, -1).astype(np.float32)
            scales = self.component(name, "scales").view("<f2").reshape(rows, -1).astype(np.float32)
            return (values * np.repeat(scales, info["params"]["group"], axis=1))[:, :cols]
        if codec == CODEC_QGROUP:
            try:
                return qgroup.dequantize(*(self.component(name, k) for k in ("codes", "scales", "offsets")), shape,
                                         info["params"], self.component(name, "param_scales")
                                         if "param_scales" in info["components"] else None)
            except FormatError as e:
                raise FormatError(f"tensor {name!r}: {e}") from None
        if codec in (CODEC_BINARY_GROUPS, CODEC_ROW_COL_SIGN):
            def stream(key):  # an empty stream is absent from the file
                return self.component(name, key) if key in info["components"] else np.zeros(0, np.uint8)
            decoder = binary_groups if codec == CODEC_BINARY_GROUPS else rowcol
            try:
                return decoder.dequantize(stream, info["shape"], info["params"])
            except FormatError as e:
                raise FormatError(f"tensor {name!r}: {e}") from None
        raise FormatError(f"tensor {name!r} has codec {codec}, which has no numeric value")
