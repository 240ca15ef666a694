"""The rendered chart, object by object, for the default values and two other sets."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

from render import CHART, NAMESPACE, render

REPO = CHART.parent.parent
APP_VERSION = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]


def kinds_and_names(r):
    return sorted((o["kind"], o["metadata"]["name"]) for o in r.objects)


def rules_of(role) -> dict:
    """{(apiGroup, resource, resourceNames): sorted verbs} — one entry per combination."""
    out: dict = {}
    for rule in role["rules"]:
        names = tuple(rule.get("resourceNames", []))
        for group in rule["apiGroups"]:
            for res in rule["resources"]:
                key = (group, res, names)
                assert key not in out, f"{role['metadata']['name']}: {key} appears twice"
                out[key] = sorted(rule["verbs"])
    return out


def container(pod_spec, name, init=False):
    items = pod_spec["initContainers" if init else "containers"]
    found = [c for c in items if c["name"] == name]
    assert len(found) == 1
    return found[0]


def env_of(c) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


# ---------------------------------------------------------------- what is rendered

def test_default_objects(default):
    assert kinds_and_names(default) == sorted([
        ("ServiceAccount", "gpuvm-operator"),
        ("ClusterRole", "gpuvm-operator"),
        ("ClusterRoleBinding", "gpuvm-operator"),
        ("Role", "gpuvm-operator-leader-election"),
        ("RoleBinding", "gpuvm-operator-leader-election"),
        ("Deployment", "gpuvm-operator"),
        ("Service", "gpuvm-operator-metrics"),
        ("ServiceAccount", "gpuvm-node"),
        ("ClusterRole", "gpuvm-node"),
        ("ClusterRoleBinding", "gpuvm-node"),
        ("ConfigMap", "gpuvm-installer"),
        ("DaemonSet", "gpuvm-node"),
        ("DaemonSet", "gpuvm-installer"),
        ("RuntimeClass", "gpuvm"),
        ("ValidatingAdmissionPolicy", "gpuvm-pods"),
        ("ValidatingAdmissionPolicyBinding", "gpuvm-pods"),
        ("ValidatingAdmissionPolicy", "gpuvm-pod-allocation"),
        ("ValidatingAdmissionPolicyBinding", "gpuvm-pod-allocation"),
        ("ValidatingAdmissionPolicy", "gpuvm-node-agent"),
        ("ValidatingAdmissionPolicyBinding", "gpuvm-node-agent"),
    ])
    assert sorted((h["kind"], h["metadata"]["name"]) for h in default.hooks) == sorted([
        ("ServiceAccount", "gpuvm-cleanup"),
        ("Role", "gpuvm-cleanup"),
        ("RoleBinding", "gpuvm-cleanup"),
        ("DaemonSet", "gpuvm-cleanup"),
        ("Job", "gpuvm-cleanup-wait"),
    ])
    assert sorted(c["metadata"]["name"] for c in default.crds) == [
        "gpuallocations.gpuvm.dev", "gpumachines.gpuvm.dev", "gpunodes.gpuvm.dev"]


def test_namespaced_objects_are_in_the_release_namespace(default, ha, qemu):
    cluster_scoped = {"ClusterRole", "ClusterRoleBinding", "RuntimeClass",
                      "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"}
    for r in (default, ha, qemu):
        for o in r.objects + r.hooks:
            if o["kind"] in cluster_scoped:
                assert "namespace" not in o["metadata"]
            else:
                assert o["metadata"]["namespace"] == NAMESPACE, o["metadata"]["name"]


def test_every_container_has_resources_and_a_pinned_image(default, ha, qemu):
    for r in (default, ha, qemu):
        for o in r.objects + r.hooks:
            spec = o.get("spec", {}).get("template", {}).get("spec")
            if not spec:
                continue
            for c in spec.get("initContainers", []) + spec["containers"]:
                assert c["resources"]["requests"], c["name"]
                assert "memory" in c["resources"]["limits"], c["name"]
                assert not c["image"].endswith(":latest") and ":" in c["image"], c["image"]


# ---------------------------------------------------------------- RBAC

def test_no_wildcards_anywhere(default, ha, qemu):
    for r in (default, ha, qemu):
        for role in r.all("ClusterRole") + r.all("Role"):
            for rule in role["rules"]:
                for key in ("apiGroups", "resources", "verbs", "resourceNames"):
                    assert "*" not in rule.get(key, []), (role["metadata"]["name"], rule)


def test_operator_cluster_role_is_exact(default):
    assert rules_of(default.get("ClusterRole", "gpuvm-operator")) == {
        ("gpuvm.dev", "gpumachines", ()): ["get", "list", "patch", "watch"],
        ("gpuvm.dev", "gpumachines/status", ()): ["update"],
        ("gpuvm.dev", "gpuallocations", ()): ["create", "get", "list", "update", "watch"],
        ("gpuvm.dev", "gpunodes", ()): ["list", "watch"],
        ("", "nodes", ()): ["list", "watch"],
        ("", "pods", ()): ["create", "delete", "get", "list", "watch"],
        ("events.k8s.io", "events", ()): ["create", "patch"],
    }


def test_operator_lease_role_is_exact_and_namespaced(default):
    role = default.get("Role", "gpuvm-operator-leader-election")
    assert rules_of(role) == {
        ("coordination.k8s.io", "leases", ()): ["create"],
        ("coordination.k8s.io", "leases", ("gpuvm-operator",)): ["get", "patch"],
    }
    binding = default.get("RoleBinding", "gpuvm-operator-leader-election")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": "gpuvm-operator-leader-election"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "gpuvm-operator",
                                    "namespace": NAMESPACE}]


def test_node_cluster_role_is_exact(default):
    assert rules_of(default.get("ClusterRole", "gpuvm-node")) == {
        ("gpuvm.dev", "gpunodes", ()): ["create", "get"],
        ("gpuvm.dev", "gpunodes/status", ()): ["patch"],
        # Patch only: the agent never reads a Node (admission: its own, three labels).
        ("", "nodes", ()): ["patch"],
        # The GPU check: the Pod's gpuvm.dev/gpu-check annotation, and the Warning Event.
        ("", "pods", ()): ["get", "patch"],
        ("events.k8s.io", "events", ()): ["create", "patch"],
    }


def test_node_cluster_role_grants_nothing_on_core_events(default):
    """The agent's Events go through events.k8s.io only; no list/watch/delete anywhere."""
    rules = rules_of(default.get("ClusterRole", "gpuvm-node"))
    assert ("", "events", ()) not in rules
    assert not {"list", "watch", "delete", "update"} & {v for verbs in rules.values() for v in verbs}


def test_cleanup_role_is_exact(default):
    assert rules_of(default.get("Role", "gpuvm-cleanup")) == {
        ("apps", "daemonsets", ("gpuvm-cleanup",)): ["get", "list", "watch"],
    }


def test_bindings_tie_each_service_account_to_its_own_role(default):
    for name in ("gpuvm-operator", "gpuvm-node"):
        b = default.get("ClusterRoleBinding", name)
        assert b["roleRef"]["name"] == name
        assert b["subjects"] == [{"kind": "ServiceAccount", "name": name, "namespace": NAMESPACE}]
    assert default.get("Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "gpuvm-operator"
    assert default.get("DaemonSet", "gpuvm-node")["spec"]["template"]["spec"]["serviceAccountName"] == "gpuvm-node"
    cleanup = default.get("DaemonSet", "gpuvm-cleanup")["spec"]["template"]["spec"]
    assert cleanup["automountServiceAccountToken"] is False


def test_every_rbac_rule_has_a_justifying_comment():
    for name in ("operator-rbac.yaml", "node-rbac.yaml", "cleanup-hooks.yaml"):
        lines = (CHART / "templates" / name).read_text().splitlines()
        for i, line in enumerate(lines):
            if line.strip().startswith("- apiGroups:"):
                assert lines[i - 1].strip().startswith("#"), f"{name}:{i + 1}: rule without a comment"


# ---------------------------------------------------------------- operator Deployment

def test_operator_deployment(default):
    d = default.get("Deployment", "gpuvm-operator")
    assert d["spec"]["replicas"] == 1
    pod = d["spec"]["template"]["spec"]
    c = container(pod, "operator")
    assert c["image"] == f"ghcr.io/gpuvm/gpuvm-operator:{APP_VERSION}"
    assert c["args"] == [
        "--metrics-addr=0.0.0.0:8080",
        "--log-format=json",
        "--log-level=info",
        "--leader-elect=true",
        "--lease-name=gpuvm-operator",
        "--lease-seconds=15",
        "--heartbeat-timeout-seconds=120",
    ]
    env = env_of(c)
    assert env["POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["POD_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert c["ports"] == [{"name": "metrics", "containerPort": 8080, "protocol": "TCP"}]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert c["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 65532
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert "hostPID" not in pod and "volumes" not in pod
    assert "affinity" not in pod
    # The Service selects exactly the operator Pods.
    svc = default.get("Service", "gpuvm-operator-metrics")
    labels = d["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"] == d["spec"]["selector"]["matchLabels"]
    assert all(labels[k] == v for k, v in svc["spec"]["selector"].items())
    assert svc["spec"]["ports"] == [{"name": "metrics", "port": 8080, "targetPort": "metrics",
                                     "protocol": "TCP"}]
    assert not default.all("ServiceMonitor")


def test_ha_operator_with_service_monitor(ha):
    d = ha.get("Deployment", "gpuvm-operator")
    assert d["spec"]["replicas"] == 2
    assert d["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    pod = d["spec"]["template"]["spec"]
    anti = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]
    assert anti["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert anti["podAffinityTerm"]["labelSelector"]["matchLabels"] == d["spec"]["selector"]["matchLabels"]
    args = container(pod, "operator")["args"]
    assert "--leader-elect=true" in args and "--log-format=text" in args and "--log-level=debug" in args
    sm = ha.get("ServiceMonitor", "gpuvm-operator")
    assert sm["metadata"]["labels"]["release"] == "prometheus"
    assert sm["spec"]["selector"]["matchLabels"] == d["spec"]["selector"]["matchLabels"]
    assert sm["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    assert sm["spec"]["endpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "30s",
                                        "scrapeTimeout": "10s"}]
    svc = ha.get("Service", "gpuvm-operator-metrics")
    assert all(svc["metadata"]["labels"].get(k) == v
               for k, v in sm["spec"]["selector"]["matchLabels"].items())


# ---------------------------------------------------------------- node DaemonSet

DEFAULT_HOST_VOLUMES = {
    "host-sys": ("/sys", "Directory"),
    "host-dev-vfio": ("/dev/vfio", "DirectoryOrCreate"),
    "host-run-gpuvm-health": ("/run/gpuvm/health", "DirectoryOrCreate"),
    "host-run-gpuvm-gpu-check": ("/run/gpuvm/gpu-check", "DirectoryOrCreate"),
}
INSTALLER_HOST_VOLUMES = {
    "host-gpuvm-dir": ("/opt/gpuvm", "DirectoryOrCreate"),
    "host-shim-config": ("/etc/gpuvm", "DirectoryOrCreate"),
    "host-containerd-config": ("/etc/containerd", "Directory"),
    "host-run-gpuvm": ("/run/gpuvm", "DirectoryOrCreate"),
}


def host_volumes(pod) -> dict:
    return {v["name"]: (v["hostPath"]["path"], v["hostPath"]["type"])
            for v in pod["volumes"] if "hostPath" in v}


def mounts(c) -> dict:
    return {m["name"]: (m["mountPath"], m.get("readOnly", False)) for m in c["volumeMounts"]}


def test_node_daemonset_host_mounts_are_exactly_these(default):
    ds = default.get("DaemonSet", "gpuvm-node")
    pod = ds["spec"]["template"]["spec"]
    assert host_volumes(pod) == DEFAULT_HOST_VOLUMES
    assert mounts(container(pod, "node")) == {
        "host-sys": ("/host/sys", False),
        "host-dev-vfio": ("/host/dev/vfio", True),
        "host-run-gpuvm-health": ("/host/run/gpuvm/health", True),
        # Read-write: the agent removes the records of Pods that are gone.
        "host-run-gpuvm-gpu-check": ("/host/run/gpuvm/gpu-check", False),
    }
    assert "initContainers" not in pod
    pod = default.get("DaemonSet", "gpuvm-installer")["spec"]["template"]["spec"]
    assert host_volumes(pod) == INSTALLER_HOST_VOLUMES
    assert mounts(container(pod, "installer", init=True)) == {
        "host-gpuvm-dir": ("/host/opt/gpuvm", False),
        "host-shim-config": ("/host/etc/gpuvm", False),
        "host-containerd-config": ("/host/etc/containerd", False),
        "host-run-gpuvm": ("/host/run/gpuvm", True),
        "installer-files": ("/etc/gpuvm-installer", True),
    }
    cm = [v for v in pod["volumes"] if v["name"] == "installer-files"][0]
    assert cm["configMap"]["name"] == "gpuvm-installer"


def test_node_daemonset_default(default):
    ds = default.get("DaemonSet", "gpuvm-node")
    pod = ds["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"gpuvm.dev/install": "true"}
    assert pod["tolerations"] == [{"key": "gpuvm.dev/gpu-node", "operator": "Exists",
                                   "effect": "NoSchedule"}]
    # The agent holds API credentials: it does not see the host's processes.
    assert "hostPID" not in pod and "hostNetwork" not in pod and "hostIPC" not in pod
    assert pod["priorityClassName"] == "system-node-critical"
    node = container(pod, "node")
    assert node["image"] == f"ghcr.io/gpuvm/gpuvm-node:{APP_VERSION}"
    assert node["command"] == ["/usr/local/bin/gpuvm-node"]
    assert node["args"] == ["--sysfs-root=/host/sys", "--dev-root=/host/dev",
                            "--health-dir=/host/run/gpuvm/health",
                            "--gpu-check-dir=/host/run/gpuvm/gpu-check", "--interval=30",
                            "--log-format=json", "--bind"]
    assert env_of(node)["NODE_NAME"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert node["securityContext"]["privileged"] is True
    assert ds["spec"]["updateStrategy"] == {"type": "RollingUpdate",
                                           "rollingUpdate": {"maxUnavailable": 1}}


def test_installer_daemonset_default(default):
    """hostPID (nsenter into PID 1) only here, in a Pod without API credentials."""
    ds = default.get("DaemonSet", "gpuvm-installer")
    pod = ds["spec"]["template"]["spec"]
    node = default.get("DaemonSet", "gpuvm-node")["spec"]["template"]["spec"]
    assert pod["hostPID"] is True
    assert pod["automountServiceAccountToken"] is False
    assert "serviceAccountName" not in pod
    # The same nodes as the node agent.
    for key in ("nodeSelector", "tolerations", "priorityClassName"):
        assert pod[key] == node[key], key
    installer = container(pod, "installer", init=True)
    assert installer["command"] == ["/etc/gpuvm-installer/gpuvm-install.sh", "install"]
    assert installer["securityContext"] == {"privileged": True, "runAsUser": 0}
    env = env_of(installer)
    assert env["GPUVM_HOST_DIR"] == "/opt/gpuvm"
    assert env["GPUVM_CONTAINERD_DROP_IN"] == "conf.d/gpuvm.toml"
    assert env["GPUVM_CONTAINERD_RESTART"] == "true"
    assert env["NODE_NAME"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    done = container(pod, "done")
    assert done["securityContext"]["runAsNonRoot"] is True
    assert done["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert ds["spec"]["updateStrategy"] == {"type": "RollingUpdate",
                                           "rollingUpdate": {"maxUnavailable": 1}}


def test_no_installer_daemonset_when_the_installer_is_off():
    r = render({"installer": {"enabled": False}})
    assert [d["metadata"]["name"] for d in r.objects if d["kind"] == "DaemonSet"] == ["gpuvm-node"]
    assert "hostPID" not in r.get("DaemonSet", "gpuvm-node")["spec"]["template"]["spec"]


def test_node_daemonset_custom_selector_taint_images_no_bind(qemu):
    ds = qemu.get("DaemonSet", "edge-gpuvm-node")
    pod = ds["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"] == [
        {"key": "example.com/dedicated", "operator": "Exists", "effect": "NoExecute"},
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
    ]
    node = container(pod, "node")
    assert node["image"] == "registry.example.com/gpuvm/node:v9.9.9"
    assert node["args"][-1] == "--no-bind"
    # --no-bind: no privilege, sysfs read-only.
    assert node["securityContext"] == {"runAsUser": 0, "allowPrivilegeEscalation": False,
                                       "readOnlyRootFilesystem": True,
                                       "capabilities": {"drop": ["ALL"]}}
    assert mounts(node)["host-sys"] == ("/host/sys", True)
    pod = qemu.get("DaemonSet", "edge-gpuvm-installer")["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert host_volumes(pod)["host-gpuvm-dir"] == ("/var/lib/gpuvm", "DirectoryOrCreate")
    assert mounts(container(pod, "installer", init=True))["host-gpuvm-dir"] == ("/host/var/lib/gpuvm", False)
    assert env_of(container(pod, "installer", init=True))["GPUVM_CONTAINERD_RESTART"] == "false"
    op = container(qemu.get("Deployment", "edge-gpuvm-operator")["spec"]["template"]["spec"], "operator")
    assert op["image"] == "registry.example.com/gpuvm/operator:v9.9.9"


def test_installer_change_rolls_the_daemonset(default, qemu):
    def checksum(r, name):
        return r.get("DaemonSet", name)["spec"]["template"]["metadata"]["annotations"]["checksum/installer"]
    assert re.fullmatch(r"[0-9a-f]{64}", checksum(default, "gpuvm-installer"))
    assert checksum(default, "gpuvm-installer") != checksum(qemu, "edge-gpuvm-installer")


# ---------------------------------------------------------------- RuntimeClass

def test_runtime_class_default(default):
    rc = default.get("RuntimeClass", "gpuvm")
    assert rc["handler"] == "gpuvm"
    assert rc["overhead"] == {"podFixed": {"memory": "128Mi", "cpu": "250m"}}
    assert rc["scheduling"] == {
        "nodeSelector": {"gpuvm.dev/gpu-node": "true"},
        "tolerations": [{"key": "gpuvm.dev/gpu-node", "operator": "Exists", "effect": "NoSchedule"}],
    }


def test_runtime_class_custom(qemu):
    rc = qemu.get("RuntimeClass", "gpuvm")
    assert rc["handler"] == "gpuvm"
    assert rc["overhead"] == {"podFixed": {"memory": "160Mi", "cpu": "500m"}}
    assert rc["scheduling"] == {
        "nodeSelector": {"example.com/gpu-pool": "vm"},
        "tolerations": [{"key": "example.com/dedicated", "operator": "Exists", "effect": "NoExecute"}],
    }


# ---------------------------------------------------------------- installer files

def shim_readme_keys() -> dict:
    """The keys of the shim config documented in shim/README.md, by table."""
    text = (REPO / "shim" / "README.md").read_text()
    block = re.search(r"## Config file.*?```toml\n(.*?)```", text, re.S).group(1)
    doc = tomllib.loads(block)
    return {k: (set(v) if isinstance(v, dict) else None) for k, v in doc.items()}


def check_shim_toml(text: str, documented: dict) -> dict:
    cfg = tomllib.loads(text)
    for key, value in cfg.items():
        assert key in documented, f"shim.toml key {key} is not in shim/README.md"
        if isinstance(value, dict):
            assert set(value) <= documented[key], set(value) - documented[key]
    return cfg


def test_installer_files_default(default):
    data = default.get("ConfigMap", "gpuvm-installer")["data"]
    assert set(data) == {"gpuvm-install.sh", "containerd-gpuvm.toml", "shim.toml"}
    assert data["gpuvm-install.sh"] == (CHART / "files" / "gpuvm-install.sh").read_text()
    drop_in = tomllib.loads(data["containerd-gpuvm.toml"])
    assert drop_in["version"] == 3
    runtime = drop_in["plugins"]["io.containerd.cri.v1.runtime"]["containerd"]["runtimes"]["gpuvm"]
    assert runtime == {
        "runtime_type": "io.containerd.gpuvm.v1",
        "runtime_path": "/opt/gpuvm/bin/containerd-shim-gpuvm-v1",
        "pod_annotations": ["gpuvm.dev/*"],
        "privileged_without_host_devices": True,
        "options": {"ConfigPath": "/etc/gpuvm/shim.toml"},
    }
    shim = check_shim_toml(data["shim.toml"], shim_readme_keys())
    assert shim["backend"] == "auto"
    assert shim["log_level"] == "info"
    assert shim["guest"]["kernel"] == "/opt/gpuvm/share/vmlinux"
    assert shim["guest"]["initramfs"] == "/opt/gpuvm/share/initramfs.img"
    assert shim["guest"]["gpu_initramfs"] == "/opt/gpuvm/share/initramfs-gpu.img"
    assert "gpu_kernel" not in shim["guest"]  # the GPU image's modules are for `kernel`
    assert shim["guest"]["gpu_check_interval"] == 60
    assert shim["guest"]["default_cpus"] == 1 and shim["guest"]["default_memory"] == "1Gi"
    assert shim["binaries"] == {
        "cloud_hypervisor": "/opt/gpuvm/bin/cloud-hypervisor",
        "qemu": "/usr/bin/qemu-system-x86_64",
        "virtiofsd": "/opt/gpuvm/bin/virtiofsd",
        "vhost_device_vsock": "/opt/gpuvm/bin/vhost-device-vsock",
    }
    assert shim["timeouts"] == {"agent_connect_secs": 60, "vm_shutdown_secs": 10}
    assert shim["memory"] == {"prefault": False, "hugepages": False, "hugepage_size": ""}
    assert shim["host"] == {
        "sysfs_root": "/sys",
        "dev_root": "/dev",
        "lock_dir": "/run/gpuvm/devices",
        "health_dir": "/run/gpuvm/health",
        "gpu_check_dir": "/run/gpuvm/gpu-check",
    }


def test_shim_host_paths_match_the_node_agent_mounts(default):
    """What the shim writes is what the agent reads: same host folders, and the agent's
    flags point at them through its /host mounts."""
    shim = tomllib.loads(default.get("ConfigMap", "gpuvm-installer")["data"]["shim.toml"])
    pod = default.get("DaemonSet", "gpuvm-node")["spec"]["template"]["spec"]
    volumes = host_volumes(pod)
    node = container(pod, "node")
    by_volume = {m["name"]: m["mountPath"] for m in node["volumeMounts"]}
    for key, flag in (("health_dir", "--health-dir"), ("gpu_check_dir", "--gpu-check-dir")):
        path = shim["host"][key]
        name = [n for n, (p, _) in volumes.items() if p == path]
        assert len(name) == 1, (key, path)
        assert by_volume[name[0]] == "/host" + path
        assert f"{flag}=/host{path}" in node["args"]
    # Every shim folder lies under the /run/gpuvm the installer and the cleanup mount.
    pod = default.get("DaemonSet", "gpuvm-installer")["spec"]["template"]["spec"]
    for key in ("lock_dir", "health_dir", "gpu_check_dir"):
        assert shim["host"][key].startswith(host_volumes(pod)["host-run-gpuvm"][0] + "/")
    env = env_of(container(pod, "installer", init=True))
    assert env["GPUVM_LOCK_DIR"] == shim["host"]["lock_dir"]
    assert env["GPUVM_HEALTH_DIR"] == shim["host"]["health_dir"]
    assert env["GPUVM_GPU_CHECK_DIR"] == shim["host"]["gpu_check_dir"]


def test_shim_memory_options():
    r = render({"shim": {"memory": {"prefault": True, "hugepages": True, "hugepageSize": "1Gi"}}})
    shim = check_shim_toml(r.get("ConfigMap", "gpuvm-installer")["data"]["shim.toml"],
                           shim_readme_keys())
    assert shim["memory"] == {"prefault": True, "hugepages": True, "hugepage_size": "1Gi"}


def test_installer_files_qemu(qemu):
    data = qemu.get("ConfigMap", "edge-gpuvm-installer")["data"]
    shim = check_shim_toml(data["shim.toml"], shim_readme_keys())
    assert shim["backend"] == "qemu"
    assert shim["guest"]["default_cpus"] == 2 and shim["guest"]["default_memory"] == "2Gi"
    assert shim["guest"]["kernel_params"] == "quiet"
    assert shim["guest"]["kernel"] == "/var/lib/gpuvm/share/vmlinux"
    assert shim["guest"]["gpu_initramfs"] == "/var/lib/gpuvm/share/initramfs-gpu.img"
    assert shim["guest"]["gpu_check_interval"] == 0  # boot only
    runtime = tomllib.loads(data["containerd-gpuvm.toml"])["plugins"][
        "io.containerd.cri.v1.runtime"]["containerd"]["runtimes"]["gpuvm"]
    assert runtime["runtime_path"] == "/var/lib/gpuvm/bin/containerd-shim-gpuvm-v1"


# ---------------------------------------------------------------- uninstall hooks

def test_cleanup_hooks(default, qemu):
    for h in default.hooks:
        ann = h["metadata"]["annotations"]
        assert ann["helm.sh/hook"] == "pre-delete"
        assert ann["helm.sh/hook-delete-policy"] == "before-hook-creation,hook-succeeded"
    weights = {(h["kind"], h["metadata"]["name"]): int(h["metadata"]["annotations"]["helm.sh/hook-weight"])
               for h in default.hooks}
    assert weights[("DaemonSet", "gpuvm-cleanup")] < weights[("Job", "gpuvm-cleanup-wait")]
    assert weights[("ServiceAccount", "gpuvm-cleanup")] < weights[("DaemonSet", "gpuvm-cleanup")]
    ds = default.get("DaemonSet", "gpuvm-cleanup")
    pod = ds["spec"]["template"]["spec"]
    node_pod = default.get("DaemonSet", "gpuvm-node")["spec"]["template"]["spec"]
    # Same nodes, same host paths as the installer.
    assert pod["nodeSelector"] == node_pod["nodeSelector"]
    assert pod["tolerations"] == node_pod["tolerations"]
    assert host_volumes(pod) == INSTALLER_HOST_VOLUMES
    cleanup = container(pod, "cleanup", init=True)
    # Like the installer, except /run/gpuvm is writable: it removes the shim's empty
    # runtime folders and released lock files.
    assert mounts(cleanup) == {
        "host-gpuvm-dir": ("/host/opt/gpuvm", False),
        "host-shim-config": ("/host/etc/gpuvm", False),
        "host-containerd-config": ("/host/etc/containerd", False),
        "host-run-gpuvm": ("/host/run/gpuvm", False),
        "installer-files": ("/etc/gpuvm-installer", True),
    }
    assert cleanup["command"] == ["/etc/gpuvm-installer/gpuvm-install.sh", "uninstall"]
    assert env_of(cleanup)["GPUVM_CLEANUP_FORCE"] == "false"
    assert container(pod, "done")["securityContext"]["runAsNonRoot"] is True
    job = default.get("Job", "gpuvm-cleanup-wait")
    wait = job["spec"]["template"]["spec"]["containers"][0]
    assert wait["args"] == ["rollout", "status", "daemonset/gpuvm-cleanup",
                            f"--namespace={NAMESPACE}", "--timeout=300s"]
    assert job["spec"]["backoffLimit"] == 0
    assert job["spec"]["template"]["spec"]["serviceAccountName"] == "gpuvm-cleanup"
    q = container(qemu.get("DaemonSet", "edge-gpuvm-cleanup")["spec"]["template"]["spec"], "cleanup", init=True)
    assert env_of(q)["GPUVM_CLEANUP_FORCE"] == "true"


# ---------------------------------------------------------------- NOTES

def test_notes_tell_what_to_do_next(default, qemu):
    assert "kubectl label node <node> gpuvm.dev/install=true" in default.notes
    assert "kubectl taint node <node> gpuvm.dev/gpu-node=true:NoSchedule" in default.notes
    assert "kubectl apply -f examples/inference-1gpu.yaml" in default.notes
    assert "kubectl get gm -o wide" in default.notes
    assert "nvidia.com/gpu.present=true" in qemu.notes
    assert "gpuvm.dev/install=true" not in qemu.notes
    assert "example.com/dedicated=true:NoExecute" in qemu.notes
