#!/usr/bin/env bash
# Copies the generated CRDs (crds/, written by `crdgen`) into the chart's crds/ folder.
# Run it after regenerating crds/; charts/tests fails while the two differ.
#   charts/sync-crds.sh          copy
#   charts/sync-crds.sh --check  exit 1 (and name the files) when they differ
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
src="$root/crds"
dst="$root/charts/gpuvm/crds"
if [[ "${1:-}" == "--check" ]]; then
    if diff -r "$src" "$dst" >/dev/null; then
        exit 0
    fi
    echo "charts/gpuvm/crds differs from crds/: run charts/sync-crds.sh" >&2
    diff -rq "$src" "$dst" >&2 || true
    exit 1
fi
mkdir -p "$dst"
rm -f "$dst"/*.yaml
cp "$src"/*.yaml "$dst"/
echo "copied the CRDs of crds/ into charts/gpuvm/crds"
