"""Server-side dry-run of every rendered object against a real API server.

The API server comes from `KUBECONFIG`; `charts/tests/run.sh` sets it to a loopback
control plane (the e2e harness's `with-control-plane`) when `KUBEBUILDER_ASSETS` or
`KUBE_APISERVER` + `ETCD` name the binaries. Without one the test prints `SKIPPED`, or
fails when `GPUVM_REQUIRE` names `apiserver`.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess

import yaml

import gpuvm_require
from render import NAMESPACE

# What a stored object carries that a client must not send back: the server answers
# "uid mismatch" / "the object has been modified" otherwise (TESTBED.md).
SERVER_FIELDS = ("uid", "resourceVersion", "creationTimestamp", "generation", "managedFields")


def applicable(obj: dict) -> dict:
    """`obj` as a client would send it: without the server-owned metadata and status."""
    obj = copy.deepcopy(obj)
    obj.pop("status", None)
    meta = obj.get("metadata", {})
    for key in SERVER_FIELDS:
        meta.pop(key, None)
    return obj


def test_applicable_strips_server_fields_and_status_only():
    stored = {"apiVersion": "v1", "kind": "ConfigMap",
              "metadata": {"name": "x", "uid": "u", "resourceVersion": "7", "labels": {"a": "b"}},
              "data": {"k": "v"}, "status": {"phase": "x"}}
    assert applicable(stored) == {"apiVersion": "v1", "kind": "ConfigMap",
                                  "metadata": {"name": "x", "labels": {"a": "b"}},
                                  "data": {"k": "v"}}
    assert stored["metadata"]["uid"] == "u", "the original is left alone"


def kubectl(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["kubectl", *args], input=stdin, text=True, capture_output=True)


def server_or_skip() -> None:
    if not os.environ.get("KUBECONFIG"):
        gpuvm_require.skip("apiserver", "no API server (set KUBECONFIG, or KUBEBUILDER_ASSETS "
                                        "for charts/tests/run.sh to start one)")
    if not shutil.which("kubectl"):
        gpuvm_require.skip("apiserver", "kubectl is not installed")


def test_server_side_dry_run(default, ha, qemu):
    server_or_skip()
    # CRDs first, for real (a dry-run CRD does not make its kind known); then the
    # release's namespace, for real (the namespaced objects are dry-run into it).
    crds = [applicable(c) for c in default.crds]
    assert {c["metadata"]["name"] for c in crds} >= {"gpumachines.gpuvm.dev", "gpunodes.gpuvm.dev"}
    out = kubectl("apply", "--server-side", "--field-manager=gpuvm-chart-test", "-f", "-",
                  stdin=yaml.safe_dump_all(crds))
    assert out.returncode == 0, out.stderr
    out = kubectl("wait", "--for=condition=Established", "--timeout=60s",
                  *(f"crd/{c['metadata']['name']}" for c in crds))
    assert out.returncode == 0, out.stderr
    namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}
    out = kubectl("apply", "--server-side", "--field-manager=gpuvm-chart-test", "-f", "-",
                  stdin=yaml.safe_dump(namespace))
    assert out.returncode == 0, out.stderr

    for name, r in (("default", default), ("ha", ha), ("qemu", qemu)):
        # A ServiceMonitor needs the Prometheus Operator's CRD, which a test cluster lacks.
        objs = [applicable(o) for o in r.objects + r.hooks if o["kind"] != "ServiceMonitor"]
        assert objs, name
        out = kubectl("apply", "--server-side", "--dry-run=server", f"--namespace={NAMESPACE}",
                      "--field-manager=gpuvm-chart-test", "-o", "name", "-f", "-",
                      stdin=yaml.safe_dump_all(objs))
        assert out.returncode == 0, f"{name}: {out.stderr}"
        # One line per object: the server accepted each one, none was left out.
        accepted = [line for line in out.stdout.splitlines() if line.strip()]
        assert len(accepted) == len(objs), f"{name}: {len(objs)} objects, server said:\n{out.stdout}"
