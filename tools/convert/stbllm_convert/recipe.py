"""Per-tensor recipes: which method quantizes each decoder linear, and the codecs of the embedding and the head.

A rule is PATTERN=METHOD. PATTERN is `[LAYERS.]KIND`: KIND a glob over the linear kinds (attn_q, attn_k, attn_v,
attn_o, ffn_gate, ffn_up, ffn_down; e.g. `attn_*`, `*`), LAYERS `*` or a list of indices and ranges (`0-3,29`);
without LAYERS every layer. METHOD is `NAME[:N:M][:gGROUP][:pBITS]`, e.g. `stbllm:6:8`, `billm`, `sign:4:8`, `fp16`,
`q4`, `q3:g128`, `q2-rtn:g32`, `q4:g32:p8` (pBITS: --params-bits of that method, 8 or 16). Linears no rule matches take the default method (--method). Every rule must match at least
one linear and no linear may match two rules (an overlap is an error, not a silent precedence).

A recipe file (--recipe, JSON or YAML) holds {"method": default METHOD, "rules": {PATTERN: METHOD, ...},
"embed_bits": 16|8|4|3|2, "head_bits": ..., "table_group": the 2-4 bit tables' group (--group; or {tensor name:
group} for an untied embedding and head), "table_params_bits": 8|16 (their --params-bits)}; every key is optional and
command-line options override it.
"""
from __future__ import annotations

import fnmatch
import json
import re
from pathlib import Path

from .errors import ConvertError
from .methods import CalibratedMethod, Method, QGroupMethod, make_method, method_class, method_names, parse_nm

LINEAR_KINDS = ("attn_q", "attn_k", "attn_v", "attn_o", "ffn_gate", "ffn_up", "ffn_down")
TABLE_BITS = (16, 8, 4, 3, 2)
RECIPE_KEYS = ("method", "rules", "embed_bits", "head_bits", "table_group", "table_params_bits")


def parse_method(spec: str, block: int = 128, **options) -> Method:
    """'stbllm:6:8', 'q3:g128', 'q4:g64:p8', 'fp16', ... -> a Method; options (importance, layerwise, ...) go to the
    binary calibrated methods only, params_bits to q2/q3/q4 too; a :pBITS in the spec wins over it."""
    name, *rest = str(spec).strip().split(":")
    if name not in method_names():
        raise ConvertError(f"unknown method {name!r} in {spec!r}; available: {', '.join(method_names())}")
    if issubclass(method_class(name), QGroupMethod):
        options = {"params_bits": options.get("params_bits")}
    elif not issubclass(method_class(name), CalibratedMethod):
        options = {}
    nm, group = None, None
    if rest and rest[-1].startswith("p"):
        if rest[-1][1:] not in ("8", "16"):
            raise ConvertError(f"method {spec!r}: expected p8 or p16 (the bits of its scales and offsets) at the end")
        options = {**options, "params_bits": int(rest.pop()[1:])}
    if rest and rest[-1].startswith("g"):
        if not rest[-1][1:].isdigit():
            raise ConvertError(f"method {spec!r}: expected gGROUP (e.g. g64) after the name")
        group = int(rest.pop()[1:])
    if len(rest) == 2:
        nm = parse_nm(":".join(rest))
    elif rest:
        raise ConvertError(f"method {spec!r}: expected NAME[:N:M][:gGROUP][:pBITS]")
    return make_method(name, nm=nm, block=block, group=group, **options)


def _parse_layers(text: str, pattern: str):
    """'*' -> None (all layers); '0-3,29' -> a set of indices."""
    if text == "*":
        return None
    layers = set()
    for part in text.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m or (m.group(2) and int(m.group(2)) < int(m.group(1))):
            raise ConvertError(f"pattern {pattern!r}: bad layer list {text!r} (e.g. 0-3,29 or *)")
        layers.update(range(int(m.group(1)), int(m.group(2) or m.group(1)) + 1))
    return layers


class Rule:
    def __init__(self, pattern: str, spec: str, method: Method):
        self.pattern, self.spec, self.method = pattern, spec, method
        layers, dot, kind = pattern.rpartition(".")
        self.layers = _parse_layers(layers, pattern) if dot else None
        if not any(fnmatch.fnmatchcase(k, kind) for k in LINEAR_KINDS):
            raise ConvertError(f"pattern {pattern!r}: {kind!r} matches no linear kind ({', '.join(LINEAR_KINDS)})")
        self.kind = kind

    def matches(self, layer: int, kind: str) -> bool:
        return (self.layers is None or layer in self.layers) and fnmatch.fnmatchcase(kind, self.kind)


def _split_rule(text: str) -> tuple[str, str]:
    pattern, eq, spec = str(text).partition("=")
    if not eq or not pattern.strip() or not spec.strip():
        raise ConvertError(f"--set {text!r}: expected PATTERN=METHOD, e.g. ffn_down=q4")
    return pattern.strip(), spec.strip()


def read_recipe_file(path) -> dict:
    """A recipe file's contents (JSON, or YAML for .yaml / .yml), checked for unknown keys."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConvertError(f"cannot read recipe {path}: {e.strerror or e}") from None
    is_yaml = path.suffix in (".yaml", ".yml")
    try:
        if is_yaml:
            import yaml
            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # json.JSONDecodeError, yaml.YAMLError
        raise ConvertError(f"recipe {path} is not valid {'YAML' if is_yaml else 'JSON'}: {e}") from None
    if not isinstance(data, dict) or set(data) - set(RECIPE_KEYS):
        raise ConvertError(f"recipe {path}: expected an object with the keys {', '.join(RECIPE_KEYS)}")
    rules = data.get("rules", {})
    if isinstance(rules, list):
        rules = dict(_split_rule(r) for r in rules)
    if not isinstance(rules, dict):
        raise ConvertError(f"recipe {path}: 'rules' must map PATTERN to METHOD")
    data["rules"] = {str(k): str(v) for k, v in rules.items()}
    group = data.get("table_group")
    groups = group if isinstance(group, dict) else {"token_embd.weight": group} if group is not None else {}
    for name, g in groups.items():
        if name not in ("token_embd.weight", "output.weight") or isinstance(g, bool) or not isinstance(g, int):
            raise ConvertError(f"recipe {path}: 'table_group' must be a group size (e.g. 64) or map "
                               "token_embd.weight / output.weight to one")
    if data.get("table_params_bits") not in (None, 8, 16):
        raise ConvertError(f"recipe {path}: 'table_params_bits' must be 8 or 16")
    return data


class Recipe:
    """The method of every decoder linear: the default, overridden by the rules (PATTERN, METHOD spec) pairs."""

    def __init__(self, default: Method, default_spec: str, rules=(), **options):
        self.default, self.default_spec = default, default_spec
        specs: dict[str, Method] = {}  # one instance per distinct spec, so equal specs share a method
        self.rules = []
        for pattern, spec in rules:
            if spec not in specs:
                specs[spec] = parse_method(spec, **options)
            self.rules.append(Rule(pattern, spec, specs[spec]))

    def method_for(self, layer: int, kind: str) -> Method:
        hits = [r for r in self.rules if r.matches(layer, kind)]
        if len(hits) > 1:
            raise ConvertError(f"blk.{layer}.{kind} matches the rules {hits[0].pattern!r} and {hits[1].pattern!r}; "
                               "make the patterns disjoint")
        return hits[0].method if hits else self.default

    def check(self, layers: int, kinds) -> None:
        """Every rule matches some linear of a model with `layers` layers and these kinds; no two rules overlap."""
        for rule in self.rules:
            if not any(rule.matches(i, k) for i in range(layers) for k in kinds):
                raise ConvertError(f"pattern {rule.pattern!r} matches no linear of this model ({layers} layers: "
                                   f"{', '.join(kinds)})")
        for i in range(layers):
            for k in kinds:
                self.method_for(i, k)

    @property
    def uniform(self) -> bool:
        return not self.rules

    def methods(self) -> list[Method]:
        return [self.default, *dict.fromkeys(r.method for r in self.rules)]

    def describe(self) -> dict:
        return {"method": self.default_spec, "rules": {r.pattern: r.spec for r in self.rules}}
