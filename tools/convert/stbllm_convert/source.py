"""Model sources: a Hugging Face model directory read lazily from safetensors, or a GGUF file loaded through
transformers. Both give a transformers config, tensors one at a time as float32 numpy arrays, and where to find the
tokenizer files."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from .errors import ConvertError


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ConvertError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise ConvertError(f"{path} is not a JSON object")
    return data


class Source:
    """Common interface. Attributes: config (transformers PretrainedConfig), description (str for provenance),
    tokenizer_dir (Path or None), generation_config (dict)."""

    config = None
    description = ""
    tokenizer_dir: Path | None = None
    generation_config: dict = {}

    def names(self) -> set[str]:
        raise NotImplementedError

    def _raw(self, name: str):
        raise NotImplementedError

    def resolve(self, hf_name: str) -> str | None:
        """The stored name for a canonical transformers name (checkpoints differ on the `model.` prefix:
        facebook/opt-* store `decoder.layers...`)."""
        names = self.names()
        for candidate in (hf_name, hf_name.removeprefix("model."), "model." + hf_name):
            if candidate in names:
                return candidate
        return None

    def tensor(self, hf_name: str) -> np.ndarray:
        """One tensor as a float32 numpy array (read on demand)."""
        stored = self.resolve(hf_name)
        if stored is None:
            raise ConvertError(f"tensor {hf_name} is missing from {self.description}")
        return self._raw(stored)

    def planned_tensor(self, spec) -> np.ndarray:
        """The tensor a conversion plan entry names, checked against the shape the config implies."""
        w = self.tensor(spec.hf_name)
        if tuple(w.shape) != tuple(spec.shape):
            raise ConvertError(f"{self.description}: tensor {spec.hf_name} has shape {tuple(w.shape)}, the config "
                               f"implies {tuple(spec.shape)}")
        return w

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class HFDirSource(Source):
    """A Hugging Face model directory: config.json + model.safetensors or a sharded
    model.safetensors.index.json. Tensors are read lazily with safetensors.safe_open, one at a time.
    Pickled pytorch_model.bin checkpoints are refused (unpickling runs arbitrary code)."""

    def __init__(self, path: Path):
        from transformers import AutoConfig

        self.path = path
        self.description = str(path)
        if not (path / "config.json").is_file():
            raise ConvertError(f"{path} has no config.json (not a Hugging Face model directory)")
        raw = _read_json(path / "config.json")
        try:
            self.config = AutoConfig.from_pretrained(str(path))
        except (ValueError, KeyError, OSError) as e:
            model_type = raw.get("model_type")
            archs = ", ".join(raw.get("architectures") or []) or model_type or "unknown"
            from .arch import SUPPORTED_TEXT
            raise ConvertError(f"unsupported architecture {archs} (transformers cannot read its config: "
                               f"{str(e).splitlines()[0]}); supported: {SUPPORTED_TEXT}") from None
        from .arch import architecture_of
        architecture_of(self.config)  # an unsupported architecture is reported before anything about weights
        gen = path / "generation_config.json"
        self.generation_config = _read_json(gen) if gen.is_file() else {}
        self.tokenizer_dir = path

        index = path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ConvertError(f"{index}: weight_map must be a non-empty object (tensor name -> shard file)")
            self._files = {name: self._shard_path(index, shard) for name, shard in weight_map.items()}
        else:
            shards = sorted(path.glob("*.safetensors"))
            if not shards:
                pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
                hint = (f" (found {', '.join(pickles)}: pickled checkpoints are not read because unpickling can "
                        "run arbitrary code; re-save the model with save_pretrained(safe_serialization=True))"
                        if pickles else "")
                raise ConvertError(f"{path} has no *.safetensors weights{hint}")
            self._files = {}
            from safetensors import safe_open
            for shard in shards:
                try:
                    with safe_open(str(shard), framework="pt") as f:
                        for name in f.keys():
                            self._files[name] = shard
                except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
                    raise ConvertError(f"cannot read {shard}: {e}") from None
        for shard in set(self._files.values()):
            if not shard.is_file():
                raise ConvertError(f"safetensors shard {shard} is missing")
        self._stack = contextlib.ExitStack()
        self._handles = {}

    def _shard_path(self, index: Path, shard) -> Path:
        """A shard the index names: a plain file name in the model directory, never a path leading out of it."""
        if not isinstance(shard, str) or shard in ("", ".", "..") or Path(shard).name != shard:
            raise ConvertError(f"{index} names shard {shard!r}, which is not a file name in the model directory")
        return self.path / shard

    def names(self):
        return self._files.keys()

    def _raw(self, name):
        import torch
        from safetensors import safe_open
        shard = self._files[name]
        try:
            handle = self._handles.get(shard)
            if handle is None:
                handle = self._stack.enter_context(safe_open(str(shard), framework="pt"))
                self._handles[shard] = handle
            return handle.get_tensor(name).to(torch.float32).numpy()
        except Exception as e:  # noqa: BLE001
            raise ConvertError(f"cannot read tensor {name} from {shard}: {e}") from None

    def close(self):
        self._handles.clear()
        self._stack.close()


class GGUFSource(Source):
    """A .gguf file, loaded with transformers (dequantized to float32; needs the `gguf` package). Its tokenizer is
    saved with save_pretrained into a temporary directory so that it is embedded like any other."""

    def __init__(self, path: Path, description: str | None = None, quiet: bool = False):
        import torch
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.path = path
        self.description = description or str(path)
        folder, name = str(path.parent), path.name
        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()
        patched = None
        if quiet:
            transformers.logging.disable_progress_bar()
            # transformers' GGUF loader shows its own tqdm bar regardless of the setting above.
            import functools
            import importlib
            try:
                gguf_utils = importlib.import_module("transformers.modeling_gguf_pytorch_utils")
                if hasattr(gguf_utils, "tqdm"):
                    patched = (gguf_utils, gguf_utils.tqdm)
                    gguf_utils.tqdm = functools.partial(gguf_utils.tqdm, disable=True)
            except ImportError:
                pass
        try:
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        except Exception as e:  # noqa: BLE001 - transformers/gguf raise many types for a bad or unsupported file
            from .arch import SUPPORTED_TEXT
            raise ConvertError(f"cannot load {path} with transformers: {str(e).splitlines()[0]} "
                               f"(supported: {SUPPORTED_TEXT})") from None
        finally:
            transformers.logging.set_verbosity(verbosity)
            if quiet:
                transformers.logging.enable_progress_bar()
            if patched is not None:
                patched[0].tqdm = patched[1]
        self.config = model.config
        self._state = model.state_dict()
        gen = getattr(model, "generation_config", None)
        self.generation_config = gen.to_dict() if gen is not None else {}
        self._tmp = tempfile.TemporaryDirectory(prefix="stbllm-gguf-tok-")
        self.tokenizer_dir = Path(self._tmp.name)
        if getattr(tokenizer, "is_fast", False):
            tokenizer.save_pretrained(self._tmp.name)
        del model

    def names(self):
        return self._state.keys()

    def _raw(self, name):
        import torch
        return self._state[name].detach().to(torch.float32).numpy()

    def close(self):
        self._state = {}
        self._tmp.cleanup()


def open_source(model: str | os.PathLike, quiet: bool = False) -> Source:
    """MODEL: a Hugging Face model directory, a .gguf file, or a known model name (`smollm2-135m`)."""
    from . import assets

    text = str(model)
    path = Path(text).expanduser()
    if path.is_dir():
        return HFDirSource(path)
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return GGUFSource(path, quiet=quiet)
        raise ConvertError(f"{path} is a file but not a .gguf; MODEL is a Hugging Face model directory, a .gguf "
                           f"file or the name {assets.DEFAULT_MODEL_NAME!r}")
    if text.lower() == assets.DEFAULT_MODEL_NAME:
        return GGUFSource(assets.default_model_path(), description=assets.DEFAULT_MODEL_NAME, quiet=quiet)
    raise ConvertError(f"model {text!r} not found: not a directory, not a .gguf file, and not a known model name "
                       f"({assets.DEFAULT_MODEL_NAME})")
