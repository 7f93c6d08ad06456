#!/usr/bin/env bash
# The GPU kit's entry point, on a machine with no network (see docs/gpu.md):
#   bash run.sh OUT [--cpu] [--arch SM] [--work DIR] [--budget SECONDS]
# builds llama-cpp-python for this GPU (or for the CPU with --cpu), installs it and blendin_cpp into
# a prefix, writes the stand-in models, runs the GPU tests and the benchmarks, and always writes
# OUT/report.md, OUT/report.json and OUT/logs.tar.gz. PYTHON picks the interpreter (default python3).
set -euo pipefail
if [ $# -lt 1 ] || [ "${1:0:1}" = "-" ]; then
    echo "usage: bash run.sh OUT [--cpu] [--arch SM] [--work DIR] [--budget SECONDS]" >&2
    exit 2
fi
KIT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY="${PYTHON:-python3}"
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 9))' 2>/dev/null; then
    echo "run.sh: $PY is missing or older than Python 3.9 (set PYTHON=...)" >&2
    exit 2
fi
# nothing may come from a package index: everything the kit needs travels in it
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
exec "$PY" "$KIT/run_kit.py" "$@"
