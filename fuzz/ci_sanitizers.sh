#!/usr/bin/env bash
# CI step (docs/security.md): the engine built with AddressSanitizer + UndefinedBehaviorSanitizer (gcc; no clang
# needed), then
#   1. the fuzz target's replay driver runs every input of tests/corpus/ and the seed corpus once;
#   2. the tests that drive the C++ engine run against a sanitized build of the Python extension.
# Any sanitizer report aborts the step. Needs the package installed with its test extra (cmake, ninja, pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
export CXX="${CXX:-g++}"
sanitize="-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer"
site="$PWD/build/asan-site"

python3 fuzz/make_seeds.py build/fuzz-seeds
CMAKE_GENERATOR=Ninja fuzz/run.sh --replay tests/corpus build/fuzz-seeds

python3 -m pip install -q --no-deps --target "$site" -C build-dir=build/asan \
  -C cmake.build-type=RelWithDebInfo -C "cmake.define.CMAKE_CXX_FLAGS=$sanitize" \
  -C "cmake.define.CMAKE_SHARED_LINKER_FLAGS=-fsanitize=address,undefined" .
cd tests
# An editable install's import hook would shadow PYTHONPATH and test the unsanitized build: refuse to run then.
origin=$(PYTHONPATH="$site" python3 -c "import importlib.util as u; print(u.find_spec('stbllm_rt').origin)")
[[ "$origin" == "$site"/* ]] || { echo "ci_sanitizers.sh: stbllm_rt comes from $origin, not $site" >&2; exit 2; }
# The sanitizer runtimes must be loaded before Python; leaks are not checked (the interpreter keeps its own).
LD_PRELOAD="$("$CXX" -print-file-name=libasan.so):$("$CXX" -print-file-name=libubsan.so)" \
ASAN_OPTIONS=detect_leaks=0 PYTHONPATH="$site" \
  python3 -m pytest -q -p no:cacheprovider test_format.py test_runtime.py test_binary_groups.py test_kernels.py \
    test_corpus.py test_hardening.py \
    -k "not broken and not gguf and not safetensors and not checkpoint and not sigkill and not same_seed and not disk"
