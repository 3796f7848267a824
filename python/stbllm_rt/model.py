"""`stbllm_rt.Model`: load an .stb file and generate text. The per-token work runs in C++ with the GIL released;
Python only turns token ids into text (incrementally, for streaming and stop strings)."""
from __future__ import annotations

import json
import os
from collections import Counter
from typing import Iterator, Sequence

import numpy as np

from . import _core
from .stbfile import StbReader, class_report
from .tokenizer import IncrementalDecoder, Tokenizer


class StopStringFilter:
    """Cuts a stream of text at the first occurrence of any stop string (which is dropped), holding back a tail
    that may be the start of one until the next piece shows whether it is."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.longest = max((len(s) for s in self.stops), default=0)
        self.held = ""
        self.stopped = False

    def push(self, text: str, final: bool = False) -> str:
        """The part of `text` that can be shown now; sets `stopped` when a stop string appeared."""
        text = self.held + text
        for s in self.stops:
            cut = text.find(s)
            if cut >= 0:
                self.stopped = True
                self.held = ""
                return text[:cut]
        keep = 0
        if not final:
            for k in range(min(self.longest - 1, len(text)), 0, -1):
                if any(s.startswith(text[-k:]) for s in self.stops):
                    keep = k
                    break
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]


class Model:
    """A structured-binary model loaded from a `.stb` file.

    device: "cpu" or "auto" (the CPU backend; the CUDA backend comes in a later release).
    threads: worker threads for the matmuls (default: all cores).
    kv_cache: "f16" (default: half the memory and the bytes attention reads per position) or "f32" (exact keys
    and values, as the oracle tests and perplexity evaluation use).
    """

    def __init__(self, path, device: str = "auto", threads: int | None = None, verify_checksums: bool = True,
                 kv_cache: str = "f16"):
        if device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
        if device == "cuda":
            raise RuntimeError("this build of stbllm has no CUDA backend; use device='cpu'")
        path = os.fspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"no such model file: {path}")
        if os.path.isdir(path):
            raise IsADirectoryError(f"{path} is a directory; pass a .stb file (make one with stbllm-convert)")
        self.path = path
        self.device = "cpu"
        self._model = _core.Model(path, threads or 0, verify_checksums, kv_cache)
        # The C++ model has validated (and checksummed) the file; this second mapping only reads metadata.
        self._reader = StbReader(path, verify_checksums=False)
        self.metadata = self._reader.metadata
        self.config = self.metadata["config"]
        self.tokenizer = Tokenizer.from_file(self._reader)
        self.last_generated_tokens = 0  # tokens the last generate() produced, for throughput reports

    # ---- lifetime -----------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Releases the weights and the file mapping as soon as no call is using them: calls already running (other
        threads, open streams) finish normally; later calls raise ValueError. `del model` does the same."""
        self._model = None
        self._reader = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _live(self):
        """(C++ model, reader); a call holds them until it returns, whatever close() does meanwhile."""
        model, reader = self._model, self._reader
        if model is None or reader is None:
            raise ValueError(f"this Model ({self.path}) is closed")
        return model, reader

    # ---- tokens -------------------------------------------------------------------------------------------------

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def detokenize(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Renders chat messages ([{"role": ..., "content": ...}]) with the model's own template."""
        template = self.tokenizer.chat_template
        if not template:
            raise RuntimeError("this model has no chat template")
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        special = {}
        for key, tid in (("bos_token", self.tokenizer.bos_token_id),
                         ("eos_token", (self.tokenizer.eos_token_ids or [None])[0])):
            special[key] = self.detokenize([tid], skip_special_tokens=False) if tid is not None else ""
        return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                **special)

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """Logits [T, vocab] (float32) of one fresh sequence: row t predicts token t+1."""
        return self._live()[0].logits([int(t) for t in token_ids])

    def info(self) -> dict:
        """Config, codecs, honest bits, and the bytes of weights and KV cache."""
        core, reader = self._live()
        provenance = self.metadata.get("provenance", {})
        codecs = Counter(reader.tensor_info(n)["codec"] for n in reader.tensor_names())
        return {
            "path": self.path,
            "architecture": self.metadata.get("architecture"),
            "config": self.config,
            "device": self.device,
            "threads": core.threads,
            "kernels": core.simd,
            "codecs": dict(codecs),
            "method": provenance.get("method"),
            "bits": provenance.get("bits"),
            "classes": class_report((n, reader.tensor_info(n)["codec"], reader.tensor_info(n)["shape"],
                                     sum(c["length"] for c in reader.tensor_info(n)["components"].values()))
                                    for n in reader.tensor_names()),
            "file_bytes": reader.file_size,
            "weight_bytes": core.weight_bytes,
            "kv_cache": core.kv_cache,
            "kv_cache_bytes_per_token": core.kv_bytes_per_token,
            "tokenizer": self.tokenizer.kind,
            "provenance": provenance,
        }

    # ---- generation ---------------------------------------------------------------------------------------------

    def generate(self, prompt, max_new_tokens: int = 128, temperature: float = 0.8, top_k: int = 40,
                 top_p: float = 0.95, min_p: float = 0.05, repetition_penalty: float = 1.0, seed: int | None = None,
                 stop: Sequence[str] | None = None, stream: bool = False, stop_token_ids: Sequence[int] | None = None,
                 frequency_penalty: float = 0.0, presence_penalty: float = 0.0):
        """Continue `prompt`: a string or a list of token ids; a list of those is a batch. Text prompts give text,
        token-id prompts give token ids (and need no tokenizer).

        temperature 0 is greedy. frequency_penalty / presence_penalty (OpenAI's, 0 = off) lower the logits of tokens
        by how often / whether they were generated so far. Generation ends at an end-of-sequence token, at any of the `stop` strings (cut from
        the text) or after `max_new_tokens`. The same seed gives the same text. Returns the new text or ids (a list of
        them for a batch); with stream=True an iterator of text pieces or ids ((index, item) pairs for a batch).
        """
        batch = isinstance(prompt, (list, tuple)) and len(prompt) > 0 and isinstance(prompt[0], (str, list, tuple))
        prompts = list(prompt) if batch else [prompt]
        if len({isinstance(p, str) for p in prompts}) > 1:
            raise ValueError("a batch mixes text and token-id prompts; use one kind")
        token_prompts = [self.tokenize(p) if isinstance(p, str) else [int(t) for t in p] for p in prompts]
        if any(len(t) == 0 for t in token_prompts):
            raise ValueError("a prompt must have at least one token")
        if max_new_tokens < 0:
            raise ValueError("max_new_tokens must be >= 0")
        if temperature < 0 or not 0 < top_p <= 1 or not 0 <= min_p <= 1 or top_k < 0 or repetition_penalty <= 0:
            raise ValueError("need temperature >= 0, top_k >= 0, 0 < top_p <= 1, 0 <= min_p <= 1, "
                             "repetition_penalty > 0")
        if seed is None:
            seed = int.from_bytes(os.urandom(8), "little") >> 1
        stops = [s for s in (stop or []) if s]
        eos = list(stop_token_ids) if stop_token_ids is not None else self.tokenizer.eos_token_ids
        generator = _core.Generator(self._live()[0], token_prompts, int(max_new_tokens), float(temperature), int(top_k),
                                    float(top_p), float(min_p), float(repetition_penalty), int(seed), eos,
                                    float(frequency_penalty), float(presence_penalty))
        if not isinstance(prompts[0], str):  # token ids in, token ids out; no tokenizer needed
            if stops:
                raise ValueError("stop strings need text prompts; with token ids use stop_token_ids")
            ids_out = self._token_ids(generator, len(prompts), max_new_tokens, stream)
            if stream:
                return ids_out if batch else (t for _, t in ids_out)
            out = [[] for _ in prompts]
            for i, t in ids_out:
                out[i].append(t)
            return out if batch else out[0]
        pieces = self._pieces(generator, len(prompts), max_new_tokens, stops, stream)
        if stream:
            return pieces if batch else (piece for _, piece in pieces)
        texts = [""] * len(prompts)
        for i, piece in pieces:
            texts[i] += piece
        return texts if batch else texts[0]

    def _token_ids(self, generator, n: int, max_new_tokens: int, stream: bool) -> Iterator[tuple[int, int]]:
        """Drives the C++ generator and yields (sequence, token id); one C++ call per token only when streaming."""
        self.last_generated_tokens = 0
        while not generator.done:
            for i, ids in enumerate(generator.step(1 if stream else max(1, max_new_tokens))):
                self.last_generated_tokens += len(ids)
                for t in ids:
                    yield i, t

    def _pieces(self, generator, n: int, max_new_tokens: int, stops: list[str],
                stream: bool) -> Iterator[tuple[int, str]]:
        """Drives the C++ generator and yields (sequence, text piece). Without streaming or stop strings the whole
        generation is one C++ call; otherwise one call per token so text can be shown or cut as it appears."""
        decoders = [IncrementalDecoder(self.tokenizer) for _ in range(n)]
        filters = [StopStringFilter(stops) for _ in range(n)]
        steps = 1 if (stream or stops) else max(1, max_new_tokens)

        self.last_generated_tokens = 0
        while not generator.done and not all(f.stopped for f in filters):
            for i, ids in enumerate(generator.step(steps)):
                self.last_generated_tokens += len(ids)
                if ids and not filters[i].stopped:
                    piece = filters[i].push(decoders[i].push(ids))
                    if piece:
                        yield i, piece
            if any(f.stopped for f in filters):
                generator.stop([i for i in range(n) if filters[i].stopped])
        for i in range(n):
            if not filters[i].stopped:
                piece = filters[i].push(decoders[i].flush(), final=True)
                if piece:
                    yield i, piece
