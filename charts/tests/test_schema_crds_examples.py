"""values.schema.json, the CRDs in the chart, the examples, and the docs' values table."""

from __future__ import annotations

import json
import re
import subprocess
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

from render import CHART, render

REPO = CHART.parent.parent
SCHEMA = json.loads((CHART / "values.schema.json").read_text())
VALUES = yaml.safe_load((CHART / "values.yaml").read_text())

BAD = [
    ({"shim": {"hypervisor": "kvm"}}, "/shim/hypervisor"),
    ({"operator": {"replicas": -1}}, "/operator/replicas"),
    ({"operator": {"replicas": 3}}, "/operator/replicas"),
    ({"operator": {"replicas": 2, "leaderElection": {"enabled": False}}}, "leaderElection/enabled"),
    ({"logLevel": "verbose"}, "/logLevel"),
    ({"shim": {"guest": {"defaultMemory": "lots"}}}, "/shim/guest/defaultMemory"),
    ({"shim": {"guest": {"defaultCpus": 0}}}, "/shim/guest/defaultCpus"),
    ({"shim": {"guest": {"gpuCheckInterval": 1}}}, "/shim/guest/gpuCheckInterval"),
    ({"shim": {"guest": {"gpuCheckInterval": 86401}}}, "/shim/guest/gpuCheckInterval"),
    ({"shim": {"guest": {"gpuCheckInterval": "60s"}}}, "/shim/guest/gpuCheckInterval"),
    ({"operator": {"image": {"tag": "bad tag"}}}, "/operator/image/tag"),
    ({"gpuNode": {"taint": {"effect": "PreferNoSchedule"}}}, "/gpuNode/taint/effect"),
    ({"installer": {"hostDir": "relative/path"}}, "/installer/hostDir"),
    ({"node": {"selector": {"gpuvm.dev/gpu-node": "true"}}}, "gpuvm.dev/gpu-node"),
    ({"runtimeClass": {"overhead": {"memory": "forty"}}}, "/runtimeClass/overhead/memory"),
    ({"unknownKey": 1}, "unknownKey"),
    ({"shim": {"memory": {"hugepageSize": "3Mi", "hugepages": True}}}, "/shim/memory/hugepageSize"),
    ({"shim": {"memory": {"hugepageSize": "2M", "hugepages": True}}}, "/shim/memory/hugepageSize"),
    ({"shim": {"memory": {"hugepageSize": "2Mi"}}}, "/shim/memory/hugepages"),
    ({"shim": {"memory": {"prefault": "yes"}}}, "/shim/memory/prefault"),
]


def test_defaults_pass_the_schema():
    jsonschema.validate(VALUES, SCHEMA)


@pytest.mark.parametrize("values,where", BAD, ids=[w for _, w in BAD])
def test_schema_rejects_bad_values_locally(values, where):
    merged = json.loads(json.dumps(VALUES))

    def merge(dst, src):
        for k, v in src.items():
            if isinstance(v, dict) and isinstance(dst.get(k), dict):
                merge(dst[k], v)
            else:
                dst[k] = v
    merge(merged, values)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(merged, SCHEMA)


@pytest.mark.parametrize("values,where", BAD[:4], ids=[w for _, w in BAD[:4]])
def test_helm_rejects_bad_values(values, where):
    """The real engine: a few of the same through Helm's own schema check."""
    from helm_sdkpy.exceptions import InstallError

    with pytest.raises(InstallError) as err:
        render(values)
    assert "schema" in str(err.value)
    assert where.split("/")[-1] in str(err.value)


def test_helm_rejects_a_hugepage_size_without_hugepages():
    """The allOf rule (hugepage_size needs hugepages, as the shim checks) in Helm itself."""
    from helm_sdkpy.exceptions import InstallError

    with pytest.raises(InstallError) as err:
        render({"shim": {"memory": {"hugepageSize": "2Mi"}}})
    assert "schema" in str(err.value) and "hugepages" in str(err.value)


def test_schema_accepts_hugepage_sizes():
    for size in ("", "2Mi", "1Gi", "1Mi", "16Gi"):
        merged = json.loads(json.dumps(VALUES))
        merged["shim"]["memory"] = {"prefault": True, "hugepages": True, "hugepageSize": size}
        jsonschema.validate(merged, SCHEMA)


def test_chart_crds_equal_generated_crds():
    generated = sorted(p.name for p in (REPO / "crds").glob("*.yaml"))
    in_chart = sorted(p.name for p in (CHART / "crds").glob("*.yaml"))
    assert in_chart == generated, "run charts/sync-crds.sh"
    for name in generated:
        assert (CHART / "crds" / name).read_bytes() == (REPO / "crds" / name).read_bytes(), \
            f"charts/gpuvm/crds/{name} differs from crds/{name}: run charts/sync-crds.sh"
    r = subprocess.run([str(REPO / "charts" / "sync-crds.sh"), "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_rendered_crds_are_the_generated_ones(default):
    by_name = {c["metadata"]["name"]: c for c in default.crds}
    for path in (REPO / "crds").glob("*.yaml"):
        want = yaml.safe_load(path.read_text())
        got = by_name[want["metadata"]["name"]]
        assert got["spec"] == want["spec"]


def gpumachine_schema():
    crd = yaml.safe_load((REPO / "crds" / "gpumachines.gpuvm.dev.yaml").read_text())
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


QUANTITY = re.compile(r"^([0-9]+)(Ki|Mi|Gi|Ti)?$")


@pytest.mark.parametrize("name", ["inference-1gpu.yaml", "inference-server.yaml", "training-8gpu.yaml"])
def test_example_machines_are_valid(name):
    docs = yaml.safe_load_all((REPO / "examples" / name).read_text())
    obj = next(d for d in docs if d and d.get("kind") == "GpuMachine")
    assert obj["apiVersion"] == "gpuvm.dev/v1alpha1" and obj["kind"] == "GpuMachine"
    jsonschema.validate(obj["spec"], gpumachine_schema()["properties"]["spec"])
    # The CEL rules of the CRD, by hand (no API server here).
    assert 1 <= obj["spec"]["gpu"]["count"] <= 8
    assert re.fullmatch(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?", obj["spec"]["gpu"]["model"])
    assert 1 <= obj["spec"]["guest"]["cpus"] <= 256
    m = QUANTITY.match(obj["spec"]["guest"]["memory"])
    assert m, obj["spec"]["guest"]["memory"]
    scale = {None: 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}[m.group(2)]
    assert int(m.group(1)) * scale >= 128 * 2**20
    assert obj["spec"]["image"].strip()
    # The volume rules (api/src/workload.rs), by hand.
    allowed = {"configMap", "secret", "emptyDir", "persistentVolumeClaim", "projected",
               "downwardAPI", "ephemeral"}
    volumes = {v["name"]: v for v in obj["spec"].get("volumes", [])}
    for v in volumes.values():
        assert set(v) - {"name"} <= allowed, v
    for mount in obj["spec"].get("volumeMounts", []):
        assert mount["name"] in volumes, mount
        assert mount["mountPath"].startswith("/") and ".." not in mount["mountPath"].split("/")


# The shim's quantity suffixes (shim/src/config.rs, parse_memory_mib).
SHIM_SUFFIX = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15,
               "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50}


def shim_bytes(quantity: str) -> int:
    m = re.fullmatch(r"([0-9]+)([A-Za-z]*)", quantity.strip())
    assert m and m.group(2) in SHIM_SUFFIX, f"{quantity!r} is not a quantity the shim reads"
    return int(m.group(1)) * SHIM_SUFFIX[m.group(2)]


def test_shim_bytes_reads_the_shims_suffixes():
    assert shim_bytes("256Gi") == 256 * 2**30
    assert shim_bytes("1536Gi") > shim_bytes("1Ti")
    assert shim_bytes("2G") == 2 * 10**9
    with pytest.raises(AssertionError):
        shim_bytes("lots")


def installed_shim_toml(rendered) -> dict:
    """The shim.toml the chart's installer writes onto every node."""
    found = [cm["data"]["shim.toml"] for cm in rendered.all("ConfigMap")
             if "shim.toml" in cm.get("data", {})]
    assert len(found) == 1, f"expected one ConfigMap with shim.toml, found {len(found)}"
    return tomllib.loads(found[0])


def example_machines() -> list[tuple[str, dict]]:
    machines = []
    for path in sorted((REPO / "examples").glob("*.y*ml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "GpuMachine":
                machines.append((path.name, doc))
    return machines


def test_every_example_machine_boots_within_the_shim_limits_the_chart_installs(default):
    """The operator passes spec.guest.cpus/memory to the shim as gpuvm.dev/cpus/memory;
    the shim refuses a Pod above guest.max_cpus / guest.max_memory. Every GpuMachine in
    examples/ must boot with the chart's defaults."""
    guest = installed_shim_toml(default)["guest"]
    machines = example_machines()
    assert len(machines) >= 2, f"no GpuMachine examples found: {machines}"
    too_big = []
    for name, m in machines:
        spec = m["spec"]["guest"]
        if spec["cpus"] > guest["max_cpus"]:
            too_big.append(f"{name}: cpus {spec['cpus']} > shim.guest.maxCpus {guest['max_cpus']}")
        if shim_bytes(spec["memory"]) > shim_bytes(guest["max_memory"]):
            too_big.append(f"{name}: memory {spec['memory']} > shim.guest.maxMemory "
                           f"{guest['max_memory']}")
    assert not too_big, "examples the chart's shim would refuse:\n  " + "\n  ".join(too_big)


def test_example_training_machine_uses_eight_gpus():
    obj = yaml.safe_load((REPO / "examples" / "training-8gpu.yaml").read_text())
    assert obj["spec"]["gpu"]["count"] == 8


def test_gitops_examples_point_at_the_chart_with_valid_values():
    app = yaml.safe_load((REPO / "examples" / "argocd-application.yaml").read_text())
    assert app["kind"] == "Application" and app["spec"]["source"]["path"] == "charts/gpuvm"
    docs = [d for d in yaml.safe_load_all((REPO / "examples" / "flux-helmrelease.yaml").read_text()) if d]
    kinds = {d["kind"]: d for d in docs}
    assert {"GitRepository", "HelmRelease"} <= set(kinds)
    hr = kinds["HelmRelease"]
    assert hr["spec"]["chart"]["spec"]["chart"] == "charts/gpuvm"
    assert hr["spec"]["chart"]["spec"]["sourceRef"]["name"] == kinds["GitRepository"]["metadata"]["name"]
    for values in (app["spec"]["source"]["helm"]["valuesObject"], hr["spec"]["values"]):
        merged = json.loads(json.dumps(VALUES))
        for k, v in values.items():
            if isinstance(v, dict):
                merged[k] = {**merged[k], **v}
        jsonschema.validate(merged, SCHEMA)


def leaf_keys(d, prefix=""):
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and k not in ("resources", "selector", "nodeSelector",
                                                   "labels", "annotations", "podAnnotations"):
            yield from leaf_keys(v, key + ".")
        else:
            yield key


def test_every_value_is_in_the_readme_table():
    readme = (CHART / "README.md").read_text()
    missing = [k for k in leaf_keys(VALUES) if f"`{k}`" not in readme]
    assert not missing, f"charts/gpuvm/README.md lacks: {missing}"
