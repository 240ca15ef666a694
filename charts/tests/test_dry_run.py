"""Server-side dry-run of every rendered object, when an API server is given."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import yaml


def test_server_side_dry_run(default, ha):
    if not os.environ.get("KUBECONFIG") or not shutil.which("kubectl"):
        print("SKIPPED: no API server")
        pytest.skip("no API server (set KUBECONFIG)")
    # CRDs first, for real (a dry-run CRD does not make its kind known).
    crds = yaml.safe_dump_all(default.crds)
    subprocess.run(["kubectl", "apply", "--server-side", "-f", "-"], input=crds, text=True, check=True)
    for r in (default, ha):
        # A ServiceMonitor needs the Prometheus Operator's CRD, which a test cluster lacks.
        objs = [o for o in r.objects + r.hooks if o["kind"] != "ServiceMonitor"]
        subprocess.run(["kubectl", "create", "namespace", "gpuvm-system"], capture_output=True)
        out = subprocess.run(["kubectl", "apply", "--server-side", "--dry-run=server",
                              "--field-manager=gpuvm-chart-test", "-f", "-"],
                             input=yaml.safe_dump_all(objs), text=True, capture_output=True)
        assert out.returncode == 0, out.stderr
