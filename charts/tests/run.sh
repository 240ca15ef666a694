#!/usr/bin/env bash
# Runs the chart tests (charts/tests) in a Python ≥ 3.12 venv with pinned packages.
#   charts/tests/run.sh [pytest args]
# Env: GPUVM_CHART_VENV (default .work/chart-venv), PYTHON312 (the interpreter; else
#      pyenv's 3.12+, python3.13, python3.12 or python3 if new enough),
#      KUBECONFIG (the API server for the server-side dry-run test), or else
#      KUBEBUILDER_ASSETS / KUBE_APISERVER + ETCD: then the tests run under the e2e
#      harness's `with-control-plane`, which starts etcd + kube-apiserver on loopback and
#      tears them down afterwards (GPUVM_WITH_CONTROL_PLANE: a built binary to use
#      instead of `cargo run -p gpuvm-e2e --bin with-control-plane`),
#      GPUVM_REQUIRE (gpuvm_require.py: `apiserver` makes a missing API server a failure).
# Exits non-zero on any failure; prints pytest's summary line.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
venv="${GPUVM_CHART_VENV:-$root/.work/chart-venv}"

new_enough() { "$1" -c 'import sys; assert sys.version_info >= (3, 12)' 2>/dev/null; }
python="${PYTHON312:-}"
if [[ -z "$python" ]]; then
    for candidate in "$HOME"/.pyenv/versions/3.1[2-9]*/bin/python3 python3.13 python3.12 python3; do
        if command -v "$candidate" >/dev/null 2>&1 && new_enough "$(command -v "$candidate")"; then
            python="$(command -v "$candidate")"
            break
        fi
    done
fi
if [[ -z "$python" ]] || ! new_enough "$python"; then
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

cd "$here"
# No __pycache__ next to the sources.
export PYTHONDONTWRITEBYTECODE=1
pytest=("$venv/bin/python" -m pytest -p no:cacheprovider -q -rs "$@")
if [[ -z "${KUBECONFIG:-}" && -n "${KUBEBUILDER_ASSETS:-}${KUBE_APISERVER:-}" ]]; then
    echo "charts/tests: a loopback control plane for the server-side dry-run (with-control-plane)"
    if [[ -n "${GPUVM_WITH_CONTROL_PLANE:-}" ]]; then
        exec "$GPUVM_WITH_CONTROL_PLANE" -- "${pytest[@]}"
    fi
    exec cargo run -q --locked --manifest-path "$root/Cargo.toml" -p gpuvm-e2e \
        --bin with-control-plane -- "${pytest[@]}"
fi
if [[ -z "${KUBECONFIG:-}" ]]; then
    echo "charts/tests: no API server (KUBECONFIG, KUBEBUILDER_ASSETS and KUBE_APISERVER unset):" \
        "the server-side dry-run test skips"
fi
exec "${pytest[@]}"
