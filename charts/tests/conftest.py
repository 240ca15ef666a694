"""Shared renderings of the chart (each is one Helm install against FakeKube)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpuvm_require  # noqa: E402
from render import Rendered, render  # noqa: E402


def pytest_configure(config):
    """A GPUVM_REQUIRE that names no requirement stops the run before any test: a typo
    must not turn strict mode into skips."""
    try:
        gpuvm_require.parse(os.environ.get(gpuvm_require.REQUIRE_VAR, ""))
    except gpuvm_require.RequireError as e:
        raise pytest.UsageError(str(e)) from None


# The two non-default sets the tests render besides the defaults.
HA_VALUES = {
    "operator": {"replicas": 2},
    "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}}},
    "logFormat": "text",
    "logLevel": "debug",
}
QEMU_VALUES = {
    "shim": {
        "hypervisor": "qemu",
        "guest": {"defaultCpus": 2, "defaultMemory": "2Gi", "kernelParams": "quiet",
                  "gpuCheckInterval": 0},
    },
    "node": {
        "selector": {"nvidia.com/gpu.present": "true"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "image": {"repository": "registry.example.com/gpuvm/node", "tag": "v9.9.9"},
        "bind": False,
    },
    "operator": {"image": {"repository": "registry.example.com/gpuvm/operator", "tag": "v9.9.9"}},
    "gpuNode": {
        "nodeSelector": {"example.com/gpu-pool": "vm"},
        "taint": {"key": "example.com/dedicated", "effect": "NoExecute"},
    },
    "installer": {"hostDir": "/var/lib/gpuvm", "containerd": {"restart": False}},
    "runtimeClass": {"overhead": {"memory": "160Mi", "cpu": "500m"}},
    "cleanup": {"force": True},
}


@pytest.fixture(scope="session")
def default() -> Rendered:
    return render()


@pytest.fixture(scope="session")
def ha() -> Rendered:
    return render(HA_VALUES)


@pytest.fixture(scope="session")
def qemu() -> Rendered:
    return render(QEMU_VALUES, release="edge")
