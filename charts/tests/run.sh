#!/usr/bin/env bash
# Runs the chart tests (charts/tests) in a Python 3.12 venv with pinned packages.
#   charts/tests/run.sh [pytest args]
# Env: GPUVM_CHART_VENV (default .work/chart-venv), PYTHON312 (the interpreter),
#      KUBECONFIG (enables the server-side dry-run test).
# Exits non-zero on any failure; prints pytest's summary line.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
venv="${GPUVM_CHART_VENV:-$root/.work/chart-venv}"

python="${PYTHON312:-}"
if [[ -z "$python" ]]; then
    for candidate in "$HOME/.pyenv/versions/3.12.1/bin/python3.12" python3.12; do
        if command -v "$candidate" >/dev/null 2>&1; then
            python="$(command -v "$candidate")"
            break
        fi
    done
fi
if [[ -z "$python" ]] || ! "$python" -c 'import sys; assert sys.version_info >= (3, 12)' 2>/dev/null; then
    echo "SKIPPED: Python 3.12 is not available (helm-sdkpy needs it; set PYTHON312)"
    exit 0
fi

stamp="$venv/.requirements"
if [[ ! -x "$venv/bin/python" ]] || ! cmp -s "$here/requirements.txt" "$stamp"; then
    rm -rf "$venv"
    "$python" -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$here/requirements.txt"
    cp "$here/requirements.txt" "$stamp"
fi

if [[ -z "${KUBECONFIG:-}" ]]; then
    echo "SKIPPED: no API server (KUBECONFIG unset): the server-side dry-run test is skipped"
fi
cd "$here"
exec "$venv/bin/python" -m pytest -p no:cacheprovider -q -rs "$@"
