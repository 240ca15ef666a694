"""Renders the chart with the real Helm engine (helm-sdkpy) and no cluster.

helm-sdkpy has no `helm template`; `Install` against the FakeKube stand-in renders
exactly what `helm install` would apply. The result: the release's manifest (templates),
its hooks, its notes, and the CRDs Helm created from crds/.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from fakekube import FakeKube

CHART = Path(__file__).resolve().parent.parent / "gpuvm"
NAMESPACE = "gpuvm-system"


@dataclass
class Rendered:
    """One rendering: every object (templates + hooks + CRDs) and the notes."""

    objects: list[dict]
    hooks: list[dict]
    crds: list[dict]
    notes: str
    manifest: str = field(repr=False)

    def get(self, kind: str, name: str | None = None) -> dict:
        found = [o for o in self.objects + self.hooks
                 if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
        assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
        return found[0]

    def all(self, kind: str) -> list[dict]:
        return [o for o in self.objects + self.hooks if o["kind"] == kind]


def render(values: dict | None = None, release: str = "gpuvm") -> Rendered:
    """Renders the chart; raises helm_sdkpy's InstallError on template or schema errors."""
    import helm_sdkpy

    with FakeKube() as fake, tempfile.TemporaryDirectory() as tmp:
        kubeconfig = fake.kubeconfig(os.path.join(tmp, "kubeconfig"))
        config = helm_sdkpy.Configuration(namespace=NAMESPACE, kubeconfig=kubeconfig)
        result = asyncio.run(
            helm_sdkpy.Install(config).run(
                release, str(CHART), values=values or {}, wait=False, timeout=60
            )
        )
        crds = [o for o in fake.objects if o["kind"] == "CustomResourceDefinition"]
    manifest = result.get("manifest", "")
    objects = [d for d in yaml.safe_load_all(manifest) if d]
    hooks = []
    for hook in result.get("hooks") or []:
        hooks.extend(d for d in yaml.safe_load_all(hook["manifest"]) if d)
    notes = (result.get("info") or {}).get("notes", "")
    return Rendered(objects=objects, hooks=hooks, crds=crds, notes=notes, manifest=manifest)
