"""`stbllm-pareto`: perplexity against honest bits for several conversions of one model, plus GGUF reference rows.

Each recipe is converted by its own `stbllm-convert` process (one at a time, so each conversion's wall time and peak
RSS are its own) into OUT/NAME.stb and evaluated by its own `stbllm-eval` process under one protocol (default: the
DESIGN protocol, the Wikipedia sample in 2048-token windows, the first 16, on the torch oracle). GGUF files are
evaluated the same way, their weights dequantized by transformers, and their bits counted from their tensor byte
sizes with the .stb bit report's definitions. A row whose outputs are already in OUT (made from the same model,
arguments and protocol) is not redone, so an interrupted run continues where it stopped. Writes OUT/pareto.json and,
with matplotlib, OUT/pareto.png (PPL against bits per linear weight and per weight of the whole file, log PPL, the
Pareto frontier drawn).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConvertError

PROG = "stbllm-pareto"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
# Options the tool passes to every recipe with a calibrated method (the recipe's own values win).
CALIBRATION_OPTIONS = ("--calib-samples", "--calib-seqlen")


@dataclass(frozen=True)
class Protocol:
    """How every row is evaluated (stbllm-eval's options)."""
    seqlen: int = 2048
    windows: int = 16
    backend: str = "torch"
    text: str | None = None  # None: the Wikipedia sample

    def eval_args(self) -> list[str]:
        return (["--seqlen", str(self.seqlen), "--max-windows", str(self.windows), "--backend", self.backend]
                + (["--text", self.text] if self.text else []))

    def tag(self) -> str:
        """A file-name part, so that evaluations under different protocols live side by side in one directory."""
        return f"{self.backend}-{self.seqlen}x{self.windows}" + (f"-{Path(self.text).stem}" if self.text else "")

    def describe(self) -> dict:
        return {"text": self.text or "wiki.utf8 (Wikipedia sample, <doc> lines dropped)", "seqlen": self.seqlen,
                "max_windows": self.windows, "backend": self.backend,
                "command": shlex.join(["stbllm-eval", "FILE", *self.eval_args()])}


@dataclass(frozen=True)
class RowSpec:
    """A recipe: the row's name and its stbllm-convert arguments (everything but MODEL and -o)."""
    name: str
    args: tuple[str, ...] = field(default_factory=tuple)


def _check_name(name: str, what: str) -> str:
    if not NAME.fullmatch(name):
        raise ConvertError(f"{what}: row name {name!r} must be letters, digits and . _ + - (it names files)")
    return name


def _load_list_or_recipe(path: Path):
    import yaml

    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))  # YAML reads JSON too
    except (OSError, UnicodeDecodeError) as e:
        raise ConvertError(f"cannot read recipe file {path}: {e}") from None
    except yaml.YAMLError as e:
        raise ConvertError(f"recipe file {path} is not valid JSON or YAML: {str(e).splitlines()[0]}") from None


def parse_recipes(items) -> list[RowSpec]:
    """--recipes entries: NAME=ARGS (shell words), a converter recipe file (a mapping: the row runs --recipe FILE
    and is named after it), or a JSON / YAML list of {name, args} (args a string or a list of words)."""
    specs = []
    for item in items:
        name, sep, args = item.partition("=")
        if sep and NAME.fullmatch(name):
            try:
                specs.append(RowSpec(name, tuple(shlex.split(args))))
            except ValueError as e:
                raise ConvertError(f"recipe {item!r}: {e}") from None
            continue
        path = Path(item).expanduser()
        if not path.is_file():
            raise ConvertError(f"recipe {item!r}: neither NAME=ARGS (e.g. \"q4=--method q4-rtn --group 32\") nor "
                               "an existing recipe file")
        data = _load_list_or_recipe(path)
        if isinstance(data, dict):
            specs.append(RowSpec(_check_name(path.stem, str(path)), ("--recipe", str(path))))
        elif isinstance(data, list):
            for i, entry in enumerate(data):
                if not (isinstance(entry, dict) and set(entry) == {"name", "args"} and isinstance(entry["name"], str)
                        and isinstance(entry["args"], (str, list))):
                    raise ConvertError(f"{path}: entry {i} must be {{name: NAME, args: ARGS}} (ARGS a string or a "
                                       "list of strings)")
                args = shlex.split(entry["args"]) if isinstance(entry["args"], str) else map(str, entry["args"])
                specs.append(RowSpec(_check_name(entry["name"], str(path)), tuple(args)))
        else:
            raise ConvertError(f"{path}: expected a converter recipe (a mapping) or a list of {{name, args}}")
    seen = set()
    for spec in specs:
        if spec.name in seen:
            raise ConvertError(f"two recipes are named {spec.name!r}")
        seen.add(spec.name)
    return specs


def _parse_converter_args(spec: RowSpec):
    """The recipe's arguments as stbllm-convert parses them; ConvertError naming the recipe when they are wrong."""
    from .cli import build_parser

    parser = build_parser()

    def fail(message):
        raise ConvertError(f"recipe {spec.name}: {message}")
    parser.error = fail
    placeholder = f"{spec.name}.stb"
    args = parser.parse_args(["MODEL", "-o", placeholder, *spec.args])
    if args.output != placeholder:
        fail("-o/--output is chosen by the tool (OUT/NAME.stb); leave it out")
    return args


def calibrated(spec: RowSpec) -> bool:
    """Whether the recipe has a calibrated method (or distillation, or a bit budget, whose allocator measures on the
    calibration windows), i.e. takes the calibration options."""
    from .convert import build_recipe

    args = _parse_converter_args(spec)
    if args.target_bpw is not None:
        return True
    try:
        recipe, _, _ = build_recipe(args.method, args.nm, args.block, args.group, args.rules, args.recipe,
                                    kd_steps=args.kd_steps)
    except ConvertError as e:
        raise ConvertError(f"recipe {spec.name}: {e}") from None
    return any(m.calibrated or getattr(m, "kd_steps", 0) for m in recipe.methods())


def with_calibration(specs, calibration_args) -> list[RowSpec]:
    """Every recipe checked; the calibrated ones get calibration_args in front of their own (which win)."""
    return [RowSpec(s.name, (*calibration_args, *s.args)) if calibrated(s) and calibration_args else s
            for s in specs]


def run_measured(cmd: list[str], log: Path, what: str) -> dict:
    """Runs cmd to completion, output to log; its wall seconds and peak RSS (MiB, from wait4). ConvertError naming
    `what`, with the log's last line, when it fails."""
    start = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except KeyboardInterrupt:
            proc.terminate()
            proc.wait()
            raise
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
        raise ConvertError(f"{what} failed (exit {code}): {lines[-1] if lines else 'no output'} (log: {log})")
    return {"seconds": round(time.monotonic() - start, 1), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1)}


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _stat(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _readable_stb(path: Path) -> bool:
    from stbllm_rt import StbReader

    try:
        StbReader(path)
    except Exception:  # noqa: BLE001 - FormatError, OSError: a file that does not open is redone
        return False
    return True


def convert_row(model: str, spec: RowSpec, out_dir: Path) -> dict:
    """Converts the recipe into out_dir/NAME.stb unless that file and its record (same model and arguments) are
    there; returns the record {model, args, seconds, peak_rss_mib}. The converter writes atomically, and the
    record is written only after it succeeded, so a killed conversion is redone."""
    stb, record_path = out_dir / f"{spec.name}.stb", out_dir / f"{spec.name}.convert.json"
    record = _read_json(record_path)
    if (record and record.get("model") == model and record.get("args") == list(spec.args) and stb.is_file()
            and record.get("stat") == _stat(stb) and _readable_stb(stb)):
        return record
    record_path.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "stbllm_convert", model, "-o", str(stb), "-q", *spec.args]
    record = {"model": model, "args": list(spec.args),
              **run_measured(cmd, out_dir / f"{spec.name}.convert.log", f"conversion of {spec.name}")}
    record["stat"] = _stat(stb)
    record_path.write_text(json.dumps(record, indent=1) + "\n")
    return record


def evaluate_file(path: Path, result_path: Path, protocol: Protocol) -> dict:
    """stbllm-eval of path under the protocol in its own process, unless result_path holds the result for this
    very file (size and mtime) and protocol. Returns stbllm-eval's JSON plus the process's peak RSS."""
    result = _read_json(result_path)
    if result and result.get("stat") == _stat(path) and result.get("protocol") == protocol.describe():
        return result
    result_path.unlink(missing_ok=True)
    tmp = result_path.with_name(f".{result_path.name}.partial")
    cmd = [sys.executable, "-m", "stbllm_convert.evaluate", str(path), *protocol.eval_args(), "-q", "--json",
           str(tmp)]
    measured = run_measured(cmd, result_path.with_suffix(".log"), f"evaluation of {path.name}")
    result = {**json.loads(tmp.read_text()), "peak_rss_mib": measured["peak_rss_mib"], "stat": _stat(path),
              "protocol": protocol.describe()}
    tmp.unlink()
    result_path.write_text(json.dumps(result, indent=1) + "\n")
    return result


def _eval_fields(result: dict) -> dict:
    return {"ppl": result["ppl"], "nll": result["nll"], "eval_seconds": result["seconds"],
            "eval_peak_rss_mib": result["peak_rss_mib"], "predicted_tokens": result["predicted_tokens"]}


def stb_row(model: str, spec: RowSpec, out_dir: Path, protocol: Protocol) -> dict:
    """One recipe converted and evaluated (each resumable): bits from the file's provenance, PPL, timings."""
    from stbllm_rt import StbReader

    record = convert_row(model, spec, out_dir)
    stb = out_dir / f"{spec.name}.stb"
    provenance = StbReader(stb).metadata["provenance"]
    bits = provenance["bits"]
    result = evaluate_file(stb, out_dir / f"{spec.name}.eval-{protocol.tag()}.json", protocol)
    return {"name": spec.name, "kind": "stb", "file": stb.name, "args": list(spec.args), "backend": protocol.backend,
            "convert_command": shlex.join(["stbllm-convert", model, "-o", stb.name, *spec.args]),
            "method": provenance["method"], "nm": provenance.get("nm"), "block": provenance.get("block"),
            "importance": provenance.get("importance"), "calibration": provenance.get("calibration"),
            "linear_bits_per_weight": bits["linear_bits_per_weight"],
            "file_bits_per_weight": bits["file_bits_per_weight"],
            "paper_bits_per_weight": bits["paper_bits_per_weight"],
            "groups_bits_per_weight": {g: v["bits_per_weight"] for g, v in bits["groups"].items()},
            "file_bytes": stb.stat().st_size, **_eval_fields(result),
            "conversion_seconds": record["seconds"], "conversion_peak_rss_mib": record["peak_rss_mib"]}


def gguf_name(path: Path) -> str:
    """A row name for a GGUF file: its stem with anything outside the name alphabet replaced by '_'."""
    return "gguf-" + re.sub(r"[^A-Za-z0-9._+-]", "_", path.stem)


def gguf_row(path: Path, out_dir: Path, protocol: Protocol) -> dict:
    """A GGUF file evaluated (resumable) under the protocol, always on the torch backend (the runtime reads only
    .stb files); bits from its tensor sizes (gguf_tools.gguf_bits)."""
    from .gguf_tools import gguf_bits

    bits = gguf_bits(path)
    name = gguf_name(path)
    protocol = Protocol(protocol.seqlen, protocol.windows, "torch", protocol.text)
    result = evaluate_file(path, out_dir / f"{name}.eval-{protocol.tag()}.json", protocol)
    return {"name": name, "kind": "gguf", "file": str(path), "method": "gguf " + "+".join(bits["types"]),
            "backend": protocol.backend,
            "linear_bits_per_weight": bits["linear_bits_per_weight"],
            "file_bits_per_weight": bits["file_bits_per_weight"], "paper_bits_per_weight": None,
            "file_bytes": path.stat().st_size, **_eval_fields(result),
            "conversion_seconds": None, "conversion_peak_rss_mib": None}


def frontier(points) -> list[int]:
    """Indices of the Pareto-optimal points among (bits, ppl) pairs, fewest bits first: no other point has at most
    the bits and at most the PPL with one of them strictly lower (of identical points the first counts)."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1], i))
    best, result = math.inf, []
    for i in order:
        if points[i][1] < best:
            best = points[i][1]
            result.append(i)
    return result


BIT_AXES = {"linear": ("linear_bits_per_weight", "bits per linear weight (decoder projections)"),
            "file": ("file_bits_per_weight", "bits per weight, whole file (embedding and norms included)")}


def mark_frontiers(rows: list[dict]) -> dict:
    """Sets each row's on_frontier {linear, file}; returns {axis: frontier row names, fewest bits first}."""
    names = {}
    for axis, (key, _) in BIT_AXES.items():
        idx = frontier([(r[key], r["ppl"]) for r in rows])
        names[axis] = [rows[i]["name"] for i in idx]
        for i, r in enumerate(rows):
            r.setdefault("on_frontier", {})[axis] = i in idx
    return names


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def machine(load_before: float) -> str:
    """CPU model, core count and the load average at the start and now (the machines are shared)."""
    try:
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), None)
    except OSError:
        cpu = None
    return (f"{cpu or platform.processor() or platform.machine()}, {os.cpu_count()} cores (load average "
            f"{load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end)")


def report(model: str, rows: list[dict], protocol: Protocol, command: str, load_before: float, **extra) -> dict:
    """The JSON document: when, where, which commit, the protocol, the rows and both frontiers."""
    frontiers = mark_frontiers(rows)
    return {"model": model, "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "commit": _git_commit(), "machine": machine(load_before), "protocol": protocol.describe(),
            "command": command, **extra, "rows": rows, "frontier": frontiers}


def plot(doc: dict, path: Path) -> bool:
    """PPL (log) against bits per linear weight and per whole-file weight, points labelled, frontier as a step
    line; False when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda v, _: f"{v:,.4g}")  # log axes label 20.5, not 2.05x10^1

    rows = doc["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5), sharey=True)
    for ax, (axis, (key, label)) in zip(axes, BIT_AXES.items()):
        for kind, marker, color, legend in (("stb", "o", "tab:blue", ".stb"), ("gguf", "s", "tab:orange", "GGUF")):
            chosen = [r for r in rows if r["kind"] == kind]
            if chosen:
                ax.scatter([r[key] for r in chosen], [r["ppl"] for r in chosen], marker=marker, color=color,
                           label=legend, zorder=3)
        for r in rows:
            ax.annotate(r["name"], (r[key], r["ppl"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        best = [next(r for r in rows if r["name"] == n) for n in doc["frontier"][axis]]
        if best:
            xs = [r[key] for r in best] + [max(r[key] for r in rows)]
            ax.plot(xs, [r["ppl"] for r in best] + [best[-1]["ppl"]], drawstyle="steps-post", color="tab:green",
                    label="Pareto frontier", zorder=2)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(plain)
        ppls = [r["ppl"] for r in rows]
        if max(ppls) < 10 * min(ppls):  # less than a decade: label the minor ticks too (there are few)
            ax.yaxis.set_minor_formatter(plain)
        ax.set_xlabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel(f"perplexity ({doc['protocol']['seqlen']} tokens x {doc['protocol']['max_windows']} "
                       f"windows, {doc['protocol']['backend']})")
    axes[0].legend()
    fig.suptitle(f"{Path(doc['model']).name}: perplexity against honest bits ({doc['date'][:10]}, "
                 f"commit {doc['commit']})")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.partial.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    return True


def run(model: str, specs: list[RowSpec], ggufs: list[Path], out_dir: Path, protocol: Protocol,
        progress: bool | None = None) -> list[dict]:
    """Every recipe row, then every GGUF row, one at a time (a tqdm bar over the rows)."""
    from .convert import _progress

    jobs = [(s.name, lambda s=s: stb_row(model, s, out_dir, protocol)) for s in specs]
    jobs += [(gguf_name(g), lambda g=g: gguf_row(g, out_dir, protocol)) for g in ggufs]
    rows = []
    bar = _progress(jobs, progress, desc="rows", unit="row")
    for name, job in bar:
        if hasattr(bar, "set_postfix_str"):
            bar.set_postfix_str(name)
        rows.append(job())
    return rows


EPILOG = """\
recipes (--recipes, one or more):
  NAME=ARGS        stbllm-convert arguments as shell words: "q3g64=--method q3 --group 64 --head-bits 4"
  FILE.yaml|.json  a converter recipe (a mapping, see stbllm-convert --recipe): the row NAME is the file's stem
  FILE.yaml|.json  a list of {name: NAME, args: ARGS} (ARGS a string or a list of words)
  --calib-samples / --calib-seqlen are added to every recipe with a calibrated method (its own values win).

files in OUT: NAME.stb, NAME.convert.json / .log (the conversion's arguments, wall time, peak RSS),
NAME.eval-PROTOCOL.json / .log (stbllm-eval's result), pareto.json, pareto.png. Rerunning skips every row whose
files are there and match (same model and arguments; same file and protocol for the evaluation).

examples:
  stbllm-pareto smollm2-135m --recipes "fp16=--method fp16" "q4rtn=--method q4-rtn --group 32" \\
      "stbllm68=--method stbllm --nm 6:8" --calib-samples 32 --calib-seqlen 512 --gguf smollm2-q4_0.gguf --out pareto
  stbllm-pareto smollm2-135m --recipes rows.yaml --max-windows 2 --seqlen 512 --out /tmp/quick

exit status: 0 success, 2 bad input (one-line message), 1 a conversion or evaluation failed (its log is named).
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL", help="what stbllm-convert takes: a Hugging Face model directory, a "
                                                  ".gguf file or smollm2-135m")
    p.add_argument("--recipes", nargs="+", default=[], metavar="RECIPE", help="rows to convert (see below)")
    p.add_argument("--gguf", nargs="+", default=[], metavar="FILE",
                   help="GGUF files to evaluate as reference rows (smollm2-135m: the default model's own Q4_1 file)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="directory for the files and results")
    p.add_argument("--text", default=None, metavar="FILE", help="evaluation text (default: the Wikipedia sample)")
    p.add_argument("--seqlen", type=int, default=2048, help="tokens per evaluation window (default 2048)")
    p.add_argument("--max-windows", type=int, default=16, help="windows evaluated (default 16)")
    p.add_argument("--backend", choices=["torch", "cpu"], default="torch",
                   help=".stb rows: torch (the oracle on the dequantized weights, as the GGUF rows; default) or cpu "
                        "(the C++ runtime, int8 activations for some codecs); GGUF rows always run on torch")
    p.add_argument("--calib-samples", type=int, default=None, help="passed to every calibrated recipe")
    p.add_argument("--calib-seqlen", type=int, default=None, help="passed to every calibrated recipe")
    p.add_argument("--no-plot", action="store_true", help="write only pareto.json")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.seqlen < 2 or args.max_windows < 1:
        p.error("--seqlen must be >= 2 and --max-windows >= 1")
    if not args.recipes and not args.gguf:
        p.error("give at least one of --recipes and --gguf")
    try:
        from .assets import DEFAULT_MODEL_NAME, resolve_named_model
        from .gguf_tools import gguf_bits

        if args.recipes and not (Path(args.model).expanduser().exists() or args.model.lower() == DEFAULT_MODEL_NAME):
            raise ConvertError(f"model {args.model!r} not found: not a directory, not a file, and not "
                               f"{DEFAULT_MODEL_NAME}")
        specs = parse_recipes(args.recipes)
        calibration = [word for opt, value in (("--calib-samples", args.calib_samples),
                                               ("--calib-seqlen", args.calib_seqlen)) if value is not None
                       for word in (opt, str(value))]
        specs = with_calibration(specs, calibration)
        ggufs = []
        for item in args.gguf:
            path = resolve_named_model(item) or Path(item).expanduser()
            if path.suffix.lower() != ".gguf" or not path.is_file():
                raise ConvertError(f"--gguf {item}: not an existing .gguf file")
            gguf_bits(path)  # a file the gguf package cannot read is refused before any conversion
            ggufs.append(path.resolve())
        names = [s.name for s in specs] + [gguf_name(g) for g in ggufs]
        if len(set(names)) != len(names):
            raise ConvertError(f"row names must differ: {', '.join(names)}")
        if args.text is not None and not Path(args.text).is_file():
            raise ConvertError(f"--text {args.text}: no such file")
        args.out.mkdir(parents=True, exist_ok=True)
    except ConvertError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    protocol = Protocol(args.seqlen, args.max_windows, args.backend,
                        str(Path(args.text).resolve()) if args.text else None)
    load_before = os.getloadavg()[0]
    try:
        rows = run(args.model, specs, ggufs, args.out, protocol, progress=False if args.quiet else None)
    except ConvertError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; finished rows are kept in {args.out} (rerun to continue)", file=sys.stderr)
        return 130
    doc = report(args.model, rows, protocol, shlex.join([PROG, *(sys.argv[1:] if argv is None else argv)]),
                 load_before)
    (args.out / "pareto.json").write_text(json.dumps(doc, indent=1) + "\n")
    for r in rows:
        star = "*" if r["on_frontier"]["linear"] else " "
        print(f"{star} {r['name']:<24} {r['linear_bits_per_weight']:7.3f} bits/linear  "
              f"{r['file_bits_per_weight']:7.3f} bits/file  PPL {r['ppl']:,.4f}")
    print(f"wrote {args.out / 'pareto.json'} (* = on the frontier of PPL against bits per linear weight)")
    if args.no_plot:
        return 0
    if plot(doc, args.out / "pareto.png"):
        print(f"wrote {args.out / 'pareto.png'}")
    else:
        print(f"{PROG}: matplotlib is not installed (pip install \"stbllm[plot]\"); plot skipped", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
