"""The tokenizer entry of the metadata and its blob (docs/format.md, "tokenizer").

Sources, in order: a `--tokenizer PATH` (a directory, a tokenizer.json or a tokenizer.model file; the JSON/jinja
files next to a file are read too), else the model directory. tokenizer.json wins over tokenizer.model.
Special token ids come from generation_config.json, then config.json, then the token strings of
tokenizer_config.json; eos_token_ids is the union of all of them (instruct models often stop on several tokens).
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

from .errors import ConvertError, ConvertWarning


def _load_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConvertError(f"cannot read {path}: {e}") from None
    return data if isinstance(data, dict) else {}


def _token_text(value):
    if isinstance(value, dict):  # AddedToken serialized as {"content": ...}
        value = value.get("content")
    return value if isinstance(value, str) else None


def _ids(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value if v is not None]
    return [int(value)]


def _chat_template(folder: Path, tok_config: dict):
    template = tok_config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    if isinstance(template, str) and template:
        return template
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    return _load_json(folder / "chat_template.json").get("chat_template") or None


def find_tokenizer(path: Path | None) -> tuple[str, Path, Path] | None:
    """(kind, blob file, folder with its configs) for a directory or a file, or None when there is none."""
    if path is None:
        return None
    if path.is_file():
        if path.suffix == ".json":
            return "hf-tokenizer-json", path, path.parent
        if path.suffix == ".model":
            return "sentencepiece", path, path.parent
        raise ConvertError(f"--tokenizer {path}: expected a directory, a tokenizer.json or a tokenizer.model file")
    if (path / "tokenizer.json").is_file():
        return "hf-tokenizer-json", path / "tokenizer.json", path
    if (path / "tokenizer.model").is_file():
        return "sentencepiece", path / "tokenizer.model", path
    return None


def tokenizer_metadata(model_tokenizer_dir: Path | None, override: Path | None, model_config,
                       generation_config: dict) -> tuple[dict, bytes | None]:
    """(tokenizer metadata, blob bytes or None)."""
    if override is not None:
        override = Path(override).expanduser()
        if not override.exists():
            raise ConvertError(f"--tokenizer {override} does not exist")
        found = find_tokenizer(override)
        if found is None:
            raise ConvertError(f"--tokenizer {override}: no tokenizer.json or tokenizer.model there")
    else:
        found = find_tokenizer(model_tokenizer_dir)
        if found is None:
            warnings.warn("no tokenizer found (tokenizer.json or tokenizer.model) next to the model; the .stb gets "
                          "none (token-id APIs only); pass --tokenizer PATH to embed one", ConvertWarning,
                          stacklevel=2)
            return {"kind": "none"}, None
    kind, blob_path, folder = found
    blob = blob_path.read_bytes()
    tok_config = _load_json(folder / "tokenizer_config.json")

    if kind == "hf-tokenizer-json":
        from tokenizers import Tokenizer
        try:
            tok = Tokenizer.from_str(blob.decode("utf-8"))
        except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception
            raise ConvertError(f"{blob_path} is not a valid tokenizer.json: {e}") from None
        token_to_id = tok.token_to_id
        vocab_size = tok.get_vocab_size(with_added_tokens=True)
    else:
        import sentencepiece
        sp = sentencepiece.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(blob)
        except Exception as e:  # noqa: BLE001
            raise ConvertError(f"{blob_path} is not a valid sentencepiece model: {e}") from None

        def token_to_id(text):
            i = sp.piece_to_id(text)
            return i if sp.id_to_piece(i) == text else None
        vocab_size = sp.get_piece_size()

    def token_id(key):
        text = _token_text(tok_config.get(key))
        return token_to_id(text) if text is not None else None

    def first(*values):
        for v in values:
            ids = _ids(v)
            if ids:
                return ids[0]
        return None

    cfg = lambda key: getattr(model_config, key, None) if model_config is not None else None  # noqa: E731
    bos = first(generation_config.get("bos_token_id"), cfg("bos_token_id"), token_id("bos_token"))
    pad = first(generation_config.get("pad_token_id"), cfg("pad_token_id"), token_id("pad_token"))
    eos = []
    for ids in (_ids(generation_config.get("eos_token_id")), _ids(cfg("eos_token_id")), _ids(token_id("eos_token"))):
        eos += [i for i in ids if i not in eos]

    add_bos = tok_config.get("add_bos_token")
    if add_bos is None:
        if kind == "hf-tokenizer-json":  # the post-processor decides; record what it does
            ids = tok.encode("a", add_special_tokens=True).ids
            add_bos = bool(ids) and bos is not None and ids[0] == bos
        else:
            add_bos = bos is not None  # LlamaTokenizer's default
    spec = {
        "kind": kind,
        "blob": "tokenizer.data",
        "bos_token_id": bos,
        "eos_token_ids": eos,
        "pad_token_id": pad,
        "add_bos_token": bool(add_bos),
        "chat_template": _chat_template(folder, tok_config),
        "vocab_size": vocab_size,
    }
    return spec, blob
