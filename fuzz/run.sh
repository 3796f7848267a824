#!/usr/bin/env bash
# Builds and runs the libFuzzer target for the .stb loader (docs/security.md).
#
#   fuzz/run.sh [-t SECONDS | -n EXECUTIONS] [-j JOBS] [-- extra libFuzzer flags]
#   fuzz/run.sh --replay [PATHS...]   # replay files/directories once (default: tests/corpus), gcc or clang
#   fuzz/run.sh --coverage            # line coverage of the engine by the corpus (clang, llvm-cov)
#
# Needs clang with its sanitizer and libFuzzer runtimes (Debian: apt-get install -y clang) and the stbllm package
# installed (the seed generator writes files with StbWriter). The working corpus lives in build/fuzz-corpus and
# grows across runs; findings (crash-*, leak-*, oom-*, timeout-*) land in build/fuzz-findings/. Keep each one
# under tests/corpus/ once it is fixed (tests/test_corpus.py and the CI replay run them).
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=60 runs="" jobs=1 replay=0 coverage=0 extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    -t) seconds="$2"; shift 2 ;;
    -n) runs="$2"; shift 2 ;;
    -j) jobs="$2"; shift 2 ;;
    --replay) replay=1; shift; break ;;
    --coverage) coverage=1; shift ;;
    --) shift; extra=("$@"); break ;;
    *) echo "usage: fuzz/run.sh [-t SECONDS | -n EXECUTIONS] [-j JOBS] [-- FLAGS] | --replay [PATHS] | --coverage" >&2
       exit 2 ;;
  esac
done

build() {  # build DIR EXTRA_CMAKE_ARGS...: configure once, rebuild incrementally (serialized: 2-core machines)
  local dir="$1"; shift
  [[ -f "$dir/CMakeCache.txt" ]] || cmake -S fuzz -B "$dir" "$@" >/dev/null
  flock /tmp/stbllm-build.lock cmake --build "$dir" -j 2 >/dev/null
}

if [[ $replay == 1 ]]; then
  # The replay driver runs every input once through the same target; gcc is enough (CI has no clang).
  if command -v clang++ >/dev/null; then
    build build/fuzz-replay -DCMAKE_CXX_COMPILER=clang++ -DSTBLLM_LIBFUZZER=OFF
  else
    build build/fuzz-replay -DCMAKE_CXX_COMPILER=g++ -DSTBLLM_LIBFUZZER=OFF
  fi
  [[ $# -gt 0 ]] || set -- tests/corpus
  exec build/fuzz-replay/stb_loader_replay "$@"
fi

command -v clang++ >/dev/null || { echo "fuzz/run.sh: needs clang++ (apt-get install -y clang)" >&2; exit 2; }
corpora=(build/fuzz-corpus build/fuzz-seeds tests/corpus)
[[ -d build/fuzz-seeds ]] || python3 fuzz/make_seeds.py build/fuzz-seeds
mkdir -p build/fuzz-corpus build/fuzz-findings

if [[ $coverage == 1 ]]; then
  build build/fuzz-coverage -DCMAKE_CXX_COMPILER=clang++ -DSTBLLM_FUZZ_COVERAGE=ON
  LLVM_PROFILE_FILE=build/fuzz-coverage/replay.profraw build/fuzz-coverage/stb_loader_replay "${corpora[@]}"
  llvm-profdata merge -o build/fuzz-coverage/replay.profdata build/fuzz-coverage/replay.profraw
  exec llvm-cov report build/fuzz-coverage/stb_loader_replay -instr-profile=build/fuzz-coverage/replay.profdata \
    engine/format/*.cpp engine/model/config.cpp engine/model/model.cpp engine/model/generate.cpp
fi
build build/fuzz -DCMAKE_CXX_COMPILER=clang++
budget=(-max_total_time="$seconds")
[[ -n "$runs" ]] && budget=(-runs="$runs")
# 2 GB RSS and 10 s per input: a file of at most 64 KiB must load well within both. Seeds and earlier findings
# are read as extra corpora; new interesting inputs go to build/fuzz-corpus only.
flags=(-rss_limit_mb=2048 -malloc_limit_mb=2048 -timeout=10 -max_len=65536 -print_final_stats=1
       -artifact_prefix=build/fuzz-findings/ "${budget[@]}")
if [[ $jobs -gt 1 ]]; then flags+=(-jobs="$jobs" -workers="$jobs"); fi
exec build/fuzz/stb_loader_fuzz "${flags[@]}" "${extra[@]}" "${corpora[@]}"
