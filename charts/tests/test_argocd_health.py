"""The Argo CD health check (files/argocd-health.lua) in Lua 5.1, as gopher-lua runs it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from render import CHART

LUA = (CHART / "files" / "argocd-health.lua").read_text()
REPO = CHART.parent.parent


def health(obj: dict) -> dict:
    import lupa.lua51

    lua = lupa.lua51.LuaRuntime(unpack_returned_tuples=True)
    assert lua.eval("_VERSION") == "Lua 5.1"

    def to_lua(v):
        if isinstance(v, dict):
            return lua.table_from({k: to_lua(x) for k, x in v.items()})
        if isinstance(v, list):
            return lua.table_from([to_lua(x) for x in v])
        return v

    fn = lua.eval("function(obj) " + LUA + " end")
    out = fn(to_lua(obj))
    return {"status": out["status"], "message": out["message"]}


def machine(phase=None, conditions=(), generation=1, observed=1, message=None):
    obj = {"apiVersion": "gpuvm.dev/v1alpha1", "kind": "GpuMachine",
           "metadata": {"name": "m", "generation": generation}}
    if phase is not None or conditions:
        obj["status"] = {"observedGeneration": observed, "conditions": list(conditions)}
        if phase:
            obj["status"]["phase"] = phase
        if message:
            obj["status"]["message"] = message
    return obj


def cond(type_, status, reason="", message=""):
    return {"type": type_, "status": status, "reason": reason, "message": message}


CASES = [
    ("no status", machine(), "Progressing", "Waiting for the gpuvm operator to pick the machine up"),
    ("pending", machine("Pending", [cond("Ready", "Unknown", "Pending", "waiting for placement")]),
     "Progressing", "Pending: waiting for placement"),
    ("scheduled", machine("Scheduled", [cond("Scheduled", "True", "Scheduled", "gpu-1"),
                                        cond("Ready", "False", "PodCreating", "creating the Pod")]),
     "Progressing", "PodCreating: creating the Pod"),
    ("booting", machine("Booting", [cond("Scheduled", "True"), cond("Ready", "Unknown", "Booting", "VM boots")]),
     "Progressing", "Booting: VM boots"),
    ("running and ready", machine("Running", [cond("Scheduled", "True"),
                                              cond("Ready", "True", "Running", "container runs")]),
     "Healthy", "Running: container runs"),
    ("running, not ready", machine("Running", [cond("GPUReady", "False", "GpuCheckFailed", "no GPU"),
                                               cond("Ready", "False", "GpuCheckFailed", "guest sees 0 of 2 GPUs")]),
     "Degraded", "GpuCheckFailed: guest sees 0 of 2 GPUs"),
    ("unschedulable", machine("Pending", [
        cond("Scheduled", "False", "Unschedulable", "0/3 nodes have 8 free h100-80gb GPUs"),
        cond("Ready", "False", "NotScheduled", "the machine has no GPUs yet")]),
     "Degraded", "Unschedulable: 0/3 nodes have 8 free h100-80gb GPUs"),
    ("no gpu nodes", machine("Pending", [cond("Scheduled", "False", "NoGpuNodes", "no GPU node")]),
     "Degraded", "NoGpuNodes: no GPU node"),
    ("failed", machine("Failed", [cond("Ready", "False", "Failed", "exit 3")], message="container exited with 3"),
     "Degraded", "container exited with 3"),
    ("failed, no message", machine("Failed", [cond("Ready", "False", "Failed", "exit 3")]),
     "Degraded", "Failed: exit 3"),
    ("succeeded", machine("Succeeded", [cond("Ready", "False", "Completed", "exit 0")]),
     "Healthy", "The machine ran to completion"),
    ("stale status", machine("Running", [cond("Ready", "True")], generation=3, observed=2),
     "Progressing", "Waiting for the gpuvm operator to observe generation 3"),
    ("terminating", machine("Terminating", [cond("Ready", "False", "Terminating", "deleting the Pod")]),
     "Progressing", "Terminating: deleting the Pod"),
    ("phase only", machine("Booting"), "Progressing", "Phase Booting"),
    ("awaiting the gpu check", machine("Running", [cond("GPUReady", "Unknown", "AwaitingGpuCheck"),
                                                   cond("Ready", "False", "AwaitingGpuCheck", "guest GPU check pending")]),
     "Progressing", "AwaitingGpuCheck: guest GPU check pending"),
    ("rolling out", machine("Running", [cond("Ready", "False", "RollingOut", "replacing the Pod for generation 2")]),
     "Progressing", "RollingOut: replacing the Pod for generation 2"),
    ("crash loop", machine("Scheduled", [cond("Scheduled", "True"),
                                         cond("Ready", "False", "CrashLoopBackOff", "restart 3 in 40s")]),
     "Degraded", "CrashLoopBackOff: restart 3 in 40s"),
]


@pytest.mark.parametrize("name,obj,status,message", CASES, ids=[c[0] for c in CASES])
def test_health(name, obj, status, message):
    assert health(obj) == {"status": status, "message": message}


def test_argocd_cm_snippet_carries_the_same_script():
    cm = yaml.safe_load((REPO / "examples" / "argocd-cm-health.yaml").read_text())
    assert cm["data"]["resource.customizations.health.gpuvm.dev_GpuMachine"] == LUA


def test_no_lua52_features():
    # gopher-lua is Lua 5.1: no goto, no integer division, no bit operators, no utf8.
    for bad in ("goto ", "//", "utf8.", "table.unpack", "<<", ">>", " & ", " ~ "):
        assert bad not in LUA.replace("--", "  "), bad
