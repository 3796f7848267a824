"""Seed corpus for fuzz/stb_loader_fuzz.cpp: small valid files of every codec (binary-groups with 1, 2 and 3
regions, with and without N:M and salient columns, rANS labels, two with fixed-width labels, one with 8-bit params;
row-col-sign with and without N:M, salient columns and two scale groups; qgroup at 2, 3 and 4 bits with ragged chunks and
groups, one with 8-bit params, two with rANS-coded codes),
tiny complete models (f16, sign, sign with 4:8 masks, qgroup linears and embedding, int8 head, tied head, sliding
window), and the malformed files of tests/test_format.py.

usage: python fuzz/make_seeds.py OUT_DIR   (needs the stbllm package installed)
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

from stbllm_rt import StbWriter, binary_groups

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
import test_format  # noqa: E402  (its sample file and malformed-file cases)
import test_runtime  # noqa: E402  (its tiny model writer)

# A model small enough for the fuzzer to mutate quickly: 1 layer, hidden 64, 16 tokens.
TINY_MODEL = dict(vocab_size=16, hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=32, max_position_embeddings=8)
METADATA = {"architecture": "llama", "config": {"sliding_window": None}, "tokenizer": {"kind": "none"},
            "provenance": {}}


def exact_nm_mask(rng, rows: int, cols: int, n: int, m: int) -> np.ndarray:
    """A random keep-mask with exactly n of every m (ceil(n*g/m) of a ragged last group of g), as the format wants."""
    keep = np.zeros((rows, cols), dtype=bool)
    for start in range(0, cols, m):
        width = min(m, cols - start)
        kept = -(-n * width // m)
        chosen = np.argsort(rng.random((rows, width)), axis=1)[:, :kept]
        keep[np.arange(rows)[:, None], start + chosen] = True
    return keep


def binary_groups_file(path: Path, rng, rows: int, cols: int, regions: int, nm, salient_fraction: float,
                       block: int = 64, params_bits: int = 16, label_coder: str | None = "rans",
                       salient_groups: int = 1) -> None:
    w = StbWriter(METADATA)
    mask = None if nm is None else exact_nm_mask(rng, rows, cols, *nm)
    shape = (rows, -(-cols // block), binary_groups.param_slots(regions, salient_groups))
    scales = None if params_bits == 16 else rng.random((rows, shape[2])).astype(np.float16)
    params = (rng.standard_normal(shape) if scales is None else
              binary_groups.expand_params(rng.integers(-127, 128, shape), scales))
    w.add_binary_groups("blk.0.attn_q.weight", signs=rng.random((rows, cols)) < 0.5,
                        labels=rng.integers(0, regions, (rows, cols)).astype(np.uint8),
                        salient=rng.random(cols) < salient_fraction, residual=rng.random((rows, cols)) < 0.5,
                        params=params, regions=regions, block=block, mask=mask, nm=nm, param_scales=scales,
                        label_coder=label_coder,
                        salient_labels=rng.random((rows, cols)) < 0.5 if salient_groups == 2 else None)
    w.write(path)


def row_col_sign_file(path: Path, rng, rows: int, cols: int, nm, salient_count: int, block: int = 64,
                      groups: int = 1) -> None:
    w = StbWriter(METADATA)
    blocks = -(-cols // block)
    salient = np.zeros(cols, dtype=bool)
    salient[rng.choice(cols, salient_count, replace=False)] = True
    mask = None if nm is None else exact_nm_mask(rng, rows, cols, *nm)
    group = group1 = None
    if groups == 2:
        group = rng.random((rows, cols)) < 0.3
        group1 = dict(row_scales=rng.random((rows, blocks)), col_scales=rng.random(cols),
                      residual_row_scales=rng.random((rows, blocks)), residual_col_scales=rng.random(salient_count))
    w.add_row_col_sign("blk.0.attn_q.weight", rng.random((rows, cols)) < 0.5, rng.random((rows, blocks)),
                       rng.random(cols), block=block, mask=mask, nm=nm, salient=salient,
                       residual=rng.random((rows, salient_count)) < 0.5, residual_row_scales=rng.random((rows, blocks)),
                       residual_col_scales=rng.random(salient_count), group=group, group1=group1)
    w.write(path)


def codec_files(out: Path, rng) -> None:
    w = StbWriter(METADATA)
    w.add_f32("a.weight", rng.standard_normal(7))
    w.add_f16("b.weight", rng.standard_normal((3, 5)))
    w.add_bytes("tokenizer.data", b"{}")
    w.add_int8_group("c.weight", rng.standard_normal((3, 70)))
    w.write(out / "dense-codecs.stb")
    w = StbWriter(METADATA)
    w.add_sign_block("s.weight", rng.random((3, 130)) < 0.5, rng.random((3, 3)), block=64)
    w.add_sign_block("m.weight", rng.random((2, 72)) < 0.5, rng.random((2, 2)),
                     mask=exact_nm_mask(rng, 2, 72, 4, 8), block=64, nm=(4, 8))
    w.write(out / "sign-block.stb")
    for regions in (1, 2, 3):
        for nm in (None, (6, 8), (2, 5)):
            for salient in (0.0, 0.2):
                tag = f"r{regions}-" + (f"{nm[0]}of{nm[1]}" if nm else "dense") + f"-s{int(salient * 100)}"
                binary_groups_file(out / f"binary-groups-{tag}.stb", rng, rows=3, cols=77, regions=regions, nm=nm,
                                   salient_fraction=salient)
    binary_groups_file(out / "binary-groups-r3-6of8-s20-p8.stb", rng, rows=3, cols=77, regions=3, nm=(6, 8),
                       salient_fraction=0.2, params_bits=8)
    for regions in (2, 3):  # the fixed-width labels older files have
        binary_groups_file(out / f"binary-groups-r{regions}-6of8-s20-fixed.stb", rng, rows=3, cols=77,
                           regions=regions, nm=(6, 8), salient_fraction=0.2, label_coder=None)
    for nm in (None, (6, 8)):
        for salient_count in (0, 5):
            tag = (f"{nm[0]}of{nm[1]}" if nm else "dense") + f"-s{salient_count}"
            row_col_sign_file(out / f"row-col-sign-{tag}.stb", rng, rows=3, cols=77, nm=nm, salient_count=salient_count)


def salient_group_files(out: Path, rng) -> None:
    """stb.binary-groups.v2 with two salient groups (ARB's column-group bitmap: salient_groups 2)."""
    for nm, params_bits in ((None, 16), ((6, 8), 16), ((6, 8), 8)):
        tag = (f"{nm[0]}of{nm[1]}" if nm else "dense") + f"-s20-g2-p{params_bits}"
        binary_groups_file(out / f"binary-groups-r2-{tag}.stb", rng, rows=3, cols=77, regions=2, nm=nm,
                           salient_fraction=0.2, params_bits=params_bits, salient_groups=2)


def row_col_group_files(out: Path, rng) -> None:
    """stb.row-col-sign.v1 with two scale groups (ARB-RC's column-group bitmap: groups 2)."""
    for nm in (None, (6, 8)):
        for salient_count in (0, 5):
            tag = (f"{nm[0]}of{nm[1]}" if nm else "dense") + f"-s{salient_count}-g2"
            row_col_sign_file(out / f"row-col-sign-{tag}.stb", rng, rows=3, cols=77, nm=nm,
                              salient_count=salient_count, groups=2)


def qgroup_files(out: Path, rng) -> None:
    """k = 2, 3, 4 with fp16 params, k = 3 with 8-bit params (params_bits = 8), and rANS-coded codes at k = 2, 4."""
    for bits, params_bits, coder in ((2, 16, None), (3, 16, None), (4, 16, None), (3, 8, None), (2, 16, "rans"),
                                     (4, 8, "rans")):
        w = StbWriter(METADATA, code_coder=coder)
        for name, (rows, cols, group) in {"a.weight": (3, 77, 32), "b.weight": (2, 64, 96)}.items():
            groups = -(-cols // group)
            if params_bits == 8:
                steps = rng.random((rows, 2)).astype(np.float16)
                scales, offsets = (binary_groups.expand_params(rng.integers(-127, 128, (rows, groups, 1)),
                                                               steps[:, i:i + 1])[:, :, 0] for i in range(2))
            else:
                steps, scales, offsets = None, rng.random((rows, groups)), rng.standard_normal((rows, groups))
            w.add_qgroup(name, rng.integers(0, 1 << bits, (rows, cols)), scales, offsets, bits, group, steps)
        w.write(out / (f"qgroup-{bits}bit" + ("-p8" if params_bits == 8 else "") + ("-rans" if coder else "") +
                       ".stb"))


def model_files(out: Path) -> None:
    for codec in ("f16", "sign", "sign-nm", "qgroup"):
        test_runtime.write_model(out / f"model-{codec}.stb", codec, config=TINY_MODEL)
    test_runtime.write_model(out / "model-tied-window.stb", "sign",
                             config=dict(TINY_MODEL, tie_word_embeddings=True, sliding_window=4),
                             drop=["output.weight"], architecture="mistral")


def malformed_files(out: Path, rng) -> None:
    """Each mutation of test_format's malformed-table cases applied to its sample file, and its malformed JSON."""
    with tempfile.TemporaryDirectory() as tmp:
        sample = test_format.sample_file.__wrapped__(Path(tmp), rng)
        raw, header, data_offset = test_format._split(sample)
        cases = test_format.test_malformed_table.pytestmark[0].args[1]
        for i, (mutate, _match) in enumerate(cases):
            _, header, _ = test_format._split(sample)
            mutate(header)
            bad = Path(tmp) / "bad.stb"
            bad.write_bytes(raw)
            test_format._rebuild(bad, header, raw[data_offset:])
            (out / f"malformed-table-{i:02d}.stb").write_bytes(bad.read_bytes())
        (out / "sample.stb").write_bytes(raw)
    for i, (text, _match) in enumerate(test_format.test_malformed_json.pytestmark[0].args[1]):
        data_offset = test_format.stbfile._align(test_format.FIXED_HEADER_SIZE + len(text))
        body = text + b"\0" * (data_offset - test_format.FIXED_HEADER_SIZE - len(text))
        header = test_format.fixed_header(0, text, test_format.FIXED_HEADER_SIZE + len(body))
        (out / f"malformed-json-{i:02d}.stb").write_bytes(header + body)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    out = Path(argv[0])
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    codec_files(out, rng)
    salient_group_files(out, rng)
    qgroup_files(out, rng)
    model_files(out)
    malformed_files(out, rng)
    row_col_group_files(out, rng)
    files = sorted(out.iterdir())
    print(f"{len(files)} seeds, {sum(f.stat().st_size for f in files)} bytes in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
