#!/usr/bin/env bash
# Fetch the released Stable Cascade weights into models/ beside this script (the official script's
# words, extended; `bash download_models.sh --help` lists them):
#   bash download_models.sh essential big-big bfloat16
#   bash download_models.sh big-small controlnet lora --models-dir /content/models --dry-run
# A thin wrapper: the work is cascade_helpers.download, also callable from Python.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

python="${PYTHON:-}"
if [ -z "$python" ]; then
    if command -v python3 >/dev/null 2>&1; then
        python=python3
    elif command -v python >/dev/null 2>&1; then
        python=python
    else
        echo "download_models.sh: no python3 or python on PATH; set PYTHON=/path/to/python" >&2
        exit 1
    fi
fi

if ! "$python" -c "import huggingface_hub" 2>/dev/null; then
    echo "download_models.sh: $python has no huggingface_hub: $python -m pip install huggingface_hub," \
        "or set PYTHON=/path/to/a/python that has it" >&2
    exit 1
fi

# cascade_helpers imports from this checkout even when the package is not installed.
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
# The default folder comes first: a --models-dir given by the user comes later and wins.
exec "$python" -m cascade_helpers.download --models-dir "$here/models" "$@"
