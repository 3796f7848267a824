#!/usr/bin/env bash
# Incremental developer build of the package (editable). Serialized with a lock: the machine has 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
exec flock /tmp/stbllm-build.lock python3 -m pip install --no-build-isolation --no-deps -q -e . "$@"
