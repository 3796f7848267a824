"""Text <-> token ids with the tokenizer embedded in the .stb file (HF tokenizer.json or a sentencepiece model)."""
from __future__ import annotations


class NoTokenizerError(RuntimeError):
    """The file carries no tokenizer: use the token-id APIs, or reconvert with --tokenizer."""


def _optional(spec: dict, key: str, kind):
    value = spec.get(key)
    if value is not None and (not isinstance(value, kind) or isinstance(value, bool) and kind is int):
        raise ValueError(f"tokenizer.{key} must be {kind.__name__} or null, not {value!r:.40}")
    return value


class Tokenizer:
    def __init__(self, spec: dict, blob: bytes | None):
        self.kind = spec.get("kind", "none")
        self.bos_token_id = _optional(spec, "bos_token_id", int)
        eos = _optional(spec, "eos_token_ids", list) or []
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in eos):
            raise ValueError("tokenizer.eos_token_ids must be a list of token ids")
        self.eos_token_ids = eos
        self.add_bos_token = bool(spec.get("add_bos_token", False))
        self.chat_template = _optional(spec, "chat_template", str)
        if self.kind == "hf-tokenizer-json":
            from tokenizers import Tokenizer as HFTokenizer
            self._hf = HFTokenizer.from_str(blob.decode("utf-8"))
        elif self.kind == "sentencepiece":
            import sentencepiece
            self._sp = sentencepiece.SentencePieceProcessor(model_proto=blob)
        elif self.kind != "none":
            raise ValueError(f"unknown tokenizer kind {self.kind!r} in the file's metadata")

    @classmethod
    def from_file(cls, reader) -> "Tokenizer":
        """The tokenizer an .stb file embeds (metadata.tokenizer and its blob); FormatError when it is unusable."""
        from ._core import FormatError

        spec = reader.metadata.get("tokenizer") or {"kind": "none"}
        try:
            if not isinstance(spec, dict):
                raise ValueError("must be an object")
            blob = reader.blob(spec.get("blob")) if spec.get("kind", "none") != "none" else None
            return cls(spec, blob)
        except Exception as e:  # noqa: BLE001 - the tokenizer libraries raise bare Exceptions for a corrupt blob
            raise FormatError(f"metadata.tokenizer is unusable: {e}") from None

    def _require(self):
        if self.kind == "none":
            raise NoTokenizerError("this .stb file has no tokenizer; pass token ids, or reconvert with "
                                   "`stbllm-convert ... --tokenizer PATH`")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self._require()
        if self.kind == "hf-tokenizer-json":
            return self._hf.encode(text, add_special_tokens=add_special_tokens).ids
        ids = self._sp.encode(text)
        if add_special_tokens and self.add_bos_token and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        self._require()
        ids = [int(i) for i in ids]
        if self.kind == "hf-tokenizer-json":
            return self._hf.decode(ids, skip_special_tokens=skip_special_tokens)
        if skip_special_tokens:
            ids = [i for i in ids if not (self._sp.is_control(i) or self._sp.is_unknown(i))]
        return self._sp.decode(ids)


class IncrementalDecoder:
    """Turns a growing list of token ids into text pieces, never splitting a multi-byte character or a piece whose
    meaning depends on the next token (the decode of a window is compared with the decode of its prefix)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def push(self, new_ids) -> str:
        self.ids.extend(int(i) for i in new_ids)
        prefix_text = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
        full_text = self.tokenizer.decode(self.ids[self.prefix_offset:])
        if len(full_text) > len(prefix_text) and not full_text.endswith("\ufffd"):
            piece = full_text[len(prefix_text):]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return piece
        return ""

    def flush(self) -> str:
        """Whatever text is still held back (an incomplete character at the very end)."""
        prefix_text = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
        full_text = self.tokenizer.decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return full_text[len(prefix_text):] if len(full_text) > len(prefix_text) else ""
