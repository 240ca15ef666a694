"""The admission policies (templates/admission.yaml) as Helm renders them.

What they do is tested against a real API server in e2e/tests/admission.rs, which applies
the template file with a fixed table of substitutions instead of Helm (gpuvm_e2e::chart);
the first test here checks that table against Helm, so the e2e tests and the chart cannot
drift apart.
"""

from __future__ import annotations

import re

import yaml

from render import CHART, NAMESPACE

# gpuvm_e2e::chart::substitutions, for release "gpuvm" in NAMESPACE with the default
# values. Keep the two lists equal.
OPERATOR_USER = f"system:serviceaccount:{NAMESPACE}:gpuvm-operator"
NODE_USER = f"system:serviceaccount:{NAMESPACE}:gpuvm-node"
E2E_SUBSTITUTIONS = {
    'include "gpuvm.fullname" .': "gpuvm",
    'include "gpuvm.node.name" .': "gpuvm-node",
    'include "gpuvm.operator.name" .': "gpuvm-operator",
    ".Release.Namespace": NAMESPACE,
    'include "gpuvm.labels" . | nindent 4': "\n    app.kubernetes.io/part-of: gpuvm",
    'include "gpuvm.operator.username" . | squote': f"'{OPERATOR_USER}'",
    'include "gpuvm.operator.username" . | squote | quote': f"\"'{OPERATOR_USER}'\"",
    'include "gpuvm.node.username" . | squote': f"'{NODE_USER}'",
    'include "gpuvm.node.username" . | squote | quote': f"\"'{NODE_USER}'\"",
}
# The templates the e2e tests apply that way.
E2E_TEMPLATES = ("admission.yaml", "node-rbac.yaml")


def e2e_render(text: str) -> str:
    """The e2e tests' rendering (gpuvm_e2e::chart::render_str): known expressions only,
    Helm's trim markers and comments honoured."""
    out = ""
    pos = 0
    for m in re.finditer(r"\{\{(-?)(.*?)(-?)\}\}", text, re.S):
        chunk = text[pos:m.start()]
        out += chunk
        if m.group(1):
            out = out.rstrip()
        pos = m.end()
        if m.group(3):
            while pos < len(text) and text[pos].isspace():
                pos += 1
        inner = m.group(2).strip()
        if inner.startswith("/*") and inner.endswith("*/"):
            continue
        assert inner in E2E_SUBSTITUTIONS, f"the e2e rendering does not know `{{{{ {inner} }}}}`"
        out += E2E_SUBSTITUTIONS[inner]
    return out + text[pos:]


def without_labels(obj: dict) -> dict:
    obj = dict(obj)
    obj["metadata"] = {k: v for k, v in obj["metadata"].items() if k != "labels"}
    return obj


def test_admission_templates_render_as_the_e2e_tests_apply_them(default):
    for name in E2E_TEMPLATES:
        text = (CHART / "templates" / name).read_text()
        ours = [without_labels(d) for d in yaml.safe_load_all(e2e_render(text)) if d]
        assert ours, name
        for obj in ours:
            helm = [o for o in default.objects
                    if o["kind"] == obj["kind"] and o["metadata"]["name"] == obj["metadata"]["name"]]
            assert len(helm) == 1, (name, obj["kind"], obj["metadata"]["name"])
            assert without_labels(helm[0]) == obj, (name, obj["kind"], obj["metadata"]["name"])


def test_policies_are_bound_deny_and_fail_closed(default):
    policies = {p["metadata"]["name"]: p for p in default.all("ValidatingAdmissionPolicy")}
    bindings = {b["metadata"]["name"]: b for b in default.all("ValidatingAdmissionPolicyBinding")}
    assert set(policies) == set(bindings) == {"gpuvm-pods", "gpuvm-pod-allocation", "gpuvm-node-agent"}
    for name, policy in policies.items():
        # A policy that cannot be evaluated refuses the request.
        assert policy["spec"]["failurePolicy"] == "Fail", name
        assert policy["apiVersion"] == "admissionregistration.k8s.io/v1", name
        binding = bindings[name]["spec"]
        assert binding["policyName"] == name
        assert binding["validationActions"] == ["Deny"], name
        for v in policy["spec"]["validations"]:
            assert v.get("message") or v.get("messageExpression"), (name, v["expression"])


def test_pod_policy_keys_on_the_operator_service_account(default):
    pods = default.get("ValidatingAdmissionPolicy", "gpuvm-pods")["spec"]
    variables = {v["name"]: v["expression"] for v in pods["variables"]}
    assert variables["operator"] == f"'{OPERATOR_USER}'"
    assert variables["nodeAgent"] == f"'{NODE_USER}'"
    rules = pods["matchConstraints"]["resourceRules"]
    assert rules == [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE", "UPDATE"],
                      "resources": ["pods", "pods/status", "pods/resize"]}]
    assert "'gpuvm'" in pods["matchConditions"][0]["expression"]


def test_allocation_policy_reads_every_gpu_allocation_and_denies_without_one(default):
    policy = default.get("ValidatingAdmissionPolicy", "gpuvm-pod-allocation")["spec"]
    assert policy["paramKind"] == {"apiVersion": "gpuvm.dev/v1alpha1", "kind": "GpuAllocation"}
    conditions = {c["name"]: c["expression"] for c in policy["matchConditions"]}
    assert conditions["created-by-the-operator"] == f"request.userInfo.username == '{OPERATOR_USER}'"
    ref = default.get("ValidatingAdmissionPolicyBinding", "gpuvm-pod-allocation")["spec"]["paramRef"]
    assert ref == {"selector": {}, "parameterNotFoundAction": "Deny"}
    # Params are looked up before matchConditions: without this selector, Deny would
    # refuse every Pod of the cluster while no GpuAllocation exists.
    assert policy["matchConstraints"]["objectSelector"] == {
        "matchExpressions": [{"key": "gpuvm.dev/machine", "operator": "Exists"}]}


def test_node_agent_policy_covers_every_write_its_role_grants(default):
    """Every write verb of the node agent's ClusterRole reaches the node-agent policy,
    which keys on the node name of the agent's bound token."""
    policy = default.get("ValidatingAdmissionPolicy", "gpuvm-node-agent")["spec"]
    assert policy["matchConditions"] == [{
        "name": "node-agent", "expression": f"request.userInfo.username == '{NODE_USER}'"}]
    covered = set()
    for rule in policy["matchConstraints"]["resourceRules"]:
        assert {"CREATE", "UPDATE", "DELETE"} <= set(rule["operations"]), rule
        covered |= {(g, r) for g in rule["apiGroups"] for r in rule["resources"]}
    role = default.get("ClusterRole", "gpuvm-node")
    writes = {"create", "update", "patch", "delete", "deletecollection"}
    for rule in role["rules"]:
        if set(rule["verbs"]) & writes:
            for group in rule["apiGroups"]:
                for res in rule["resources"]:
                    assert (group, res) in covered, f"{group}/{res} is written but not narrowed"
    variables = {v["name"]: v["expression"] for v in policy["variables"]}
    assert "authentication.kubernetes.io/node-name" in variables["callerNode"]
    assert variables["ownLabels"] == "['gpuvm.dev/gpu-node', 'gpuvm.dev/gpu.model', 'gpuvm.dev/gpu.count']"


def test_policy_names_follow_the_release(qemu):
    names = sorted(p["metadata"]["name"] for p in qemu.all("ValidatingAdmissionPolicy"))
    assert names == ["edge-gpuvm-node-agent", "edge-gpuvm-pod-allocation", "edge-gpuvm-pods"]
    pods = qemu.get("ValidatingAdmissionPolicy", "edge-gpuvm-pods")["spec"]
    variables = {v["name"]: v["expression"] for v in pods["variables"]}
    assert variables["operator"] == f"'system:serviceaccount:{NAMESPACE}:edge-gpuvm-operator'"


def test_chart_needs_the_kubernetes_that_has_these_apis():
    # ValidatingAdmissionPolicy v1: 1.30; the node name in bound tokens: 1.32.
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["kubeVersion"] == ">=1.32.0-0"
