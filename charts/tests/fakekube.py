"""A tiny stand-in for a Kubernetes API server, just enough for Helm's install action.

helm-sdkpy exposes Helm's Go library but not `helm template` (no dry-run / client-only
install). To render the chart with the real Helm engine and no cluster, the tests run
`Install` against this server: it answers discovery for the kinds the chart uses, says
404 to every lookup, stores what is created, and reports CRDs as Established. The
objects Helm sends are exactly what `helm install` would apply, so the tests read them
back from here. It validates nothing: real validation is the server-side dry-run tier
(`KUBECONFIG`).
"""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# group -> version -> [(plural, kind, namespaced)]
RESOURCES: dict[str, dict[str, list[tuple[str, str, bool]]]] = {
    "": {
        "v1": [
            ("namespaces", "Namespace", False),
            ("serviceaccounts", "ServiceAccount", True),
            ("services", "Service", True),
            ("configmaps", "ConfigMap", True),
            ("secrets", "Secret", True),
            ("pods", "Pod", True),
            ("nodes", "Node", False),
            ("events", "Event", True),
        ]
    },
    "apps": {"v1": [("deployments", "Deployment", True), ("daemonsets", "DaemonSet", True)]},
    "batch": {"v1": [("jobs", "Job", True)]},
    "rbac.authorization.k8s.io": {
        "v1": [
            ("clusterroles", "ClusterRole", False),
            ("clusterrolebindings", "ClusterRoleBinding", False),
            ("roles", "Role", True),
            ("rolebindings", "RoleBinding", True),
        ]
    },
    "node.k8s.io": {"v1": [("runtimeclasses", "RuntimeClass", False)]},
    "admissionregistration.k8s.io": {
        "v1": [
            ("validatingadmissionpolicies", "ValidatingAdmissionPolicy", False),
            ("validatingadmissionpolicybindings", "ValidatingAdmissionPolicyBinding", False),
        ]
    },
    "apiextensions.k8s.io": {
        "v1": [("customresourcedefinitions", "CustomResourceDefinition", False)]
    },
    "coordination.k8s.io": {"v1": [("leases", "Lease", True)]},
    "events.k8s.io": {"v1": [("events", "Event", True)]},
    "policy": {"v1": [("poddisruptionbudgets", "PodDisruptionBudget", True)]},
    "monitoring.coreos.com": {"v1": [("servicemonitors", "ServiceMonitor", True)]},
    "gpuvm.dev": {"v1alpha1": [("gpumachines", "GpuMachine", True), ("gpunodes", "GpuNode", False),
                              ("gpuallocations", "GpuAllocation", False)]},
}

PATH = re.compile(
    r"^/(?:api/(?P<cv>v1)|apis/(?P<g>[^/]+)/(?P<v>[^/]+))"
    r"(?:/namespaces/(?P<ns>[^/]+))?/(?P<res>[^/]+)(?:/(?P<name>[^/]+))?(?:/(?P<sub>[^/]+))?$"
)


class FakeKube:
    """Runs the server on 127.0.0.1 on a free port; `objects` holds what Helm created."""

    def __init__(self) -> None:
        self.objects: list[dict] = []
        self._lock = threading.Lock()
        self._store: dict[str, dict] = {}
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _body(self) -> dict:
                n = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(n) if n else b"{}"
                if "protobuf" in (self.headers.get("Content-Type") or ""):
                    # Helm's release record (a Secret) comes from a typed client as
                    # protobuf; it is not part of the chart, so it is acknowledged only.
                    m = PATH.match(self.path.split("?")[0])
                    kind = "Secret"
                    name = (m and m.group("name")) or "helm-release"
                    return {"kind": kind, "apiVersion": "v1", "metadata": {"name": name},
                            "_protobuf": True}
                return json.loads(raw or b"{}")

            def do_GET(self):
                path = self.path.split("?")[0]
                if path == "/version":
                    return self._send(200, {"major": "1", "minor": "32", "gitVersion": "v1.32.0",
                                            "platform": "linux/amd64"})
                if path == "/api":
                    return self._send(200, {"kind": "APIVersions", "versions": ["v1"],
                                            "serverAddressByClientCIDRs": []})
                if path == "/apis":
                    groups = []
                    for g, vs in RESOURCES.items():
                        if not g:
                            continue
                        gvs = [{"groupVersion": f"{g}/{v}", "version": v} for v in vs]
                        groups.append({"name": g, "versions": gvs, "preferredVersion": gvs[0]})
                    return self._send(200, {"kind": "APIGroupList", "apiVersion": "v1",
                                            "groups": groups})
                m = re.match(r"^/(?:api/(v1)|apis/([^/]+)/([^/]+))$", path)
                if m:
                    g, v = ("", "v1") if m.group(1) else (m.group(2), m.group(3))
                    if g not in RESOURCES or v not in RESOURCES[g]:
                        return self._not_found()
                    res = []
                    for plural, kind, namespaced in RESOURCES[g][v]:
                        verbs = ["create", "delete", "get", "list", "patch", "update", "watch"]
                        res.append({"name": plural, "singularName": "", "namespaced": namespaced,
                                    "kind": kind, "verbs": verbs})
                        res.append({"name": f"{plural}/status", "singularName": "",
                                    "namespaced": namespaced, "kind": kind,
                                    "verbs": ["get", "patch", "update"]})
                    gv = f"{g}/{v}" if g else v
                    return self._send(200, {"kind": "APIResourceList", "apiVersion": "v1",
                                            "groupVersion": gv, "resources": res})
                m = PATH.match(path)
                if m and m.group("name"):
                    with fake._lock:
                        obj = fake._store.get(path.rsplit("/status", 1)[0] if m.group("sub") else path)
                    if obj is not None:
                        return self._send(200, obj)
                    return self._not_found()
                if m:  # a list
                    return self._send(200, {"kind": "List", "apiVersion": "v1",
                                            "metadata": {"resourceVersion": "1"}, "items": []})
                return self._not_found()

            def _not_found(self):
                self._send(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                 "reason": "NotFound", "code": 404, "message": "not found"})

            def do_POST(self):
                body = self._body()
                path = self.path.split("?")[0]
                meta = body.setdefault("metadata", {})
                meta.setdefault("uid", f"uid-{len(fake.objects)}")
                meta.setdefault("resourceVersion", "1")
                meta.setdefault("creationTimestamp", "2024-01-01T00:00:00Z")
                if body.get("kind") == "CustomResourceDefinition":
                    body["status"] = {
                        "conditions": [
                            {"type": "Established", "status": "True"},
                            {"type": "NamesAccepted", "status": "True"},
                        ],
                        "acceptedNames": body.get("spec", {}).get("names", {}),
                        "storedVersions": [v["name"] for v in body["spec"]["versions"]],
                    }
                with fake._lock:
                    if not body.pop("_protobuf", False):
                        fake.objects.append(json.loads(json.dumps(body)))
                    fake._store[f"{path}/{meta.get('name')}"] = body
                self._send(201, body)

            def do_PUT(self):
                body = self._body()
                body.pop("_protobuf", None)
                with fake._lock:
                    fake._store[self.path.split("?")[0]] = body
                self._send(200, body)

            def do_PATCH(self):
                path = self.path.split("?")[0]
                body = self._body()
                with fake._lock:
                    obj = fake._store.get(path)
                    if obj is None:  # server-side apply creates
                        fake.objects.append(json.loads(json.dumps(body)))
                        fake._store[path] = body
                        obj = body
                self._send(200, obj)

            def do_DELETE(self):
                with fake._lock:
                    fake._store.pop(self.path.split("?")[0], None)
                self._send(200, {"kind": "Status", "apiVersion": "v1", "status": "Success"})

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeKube":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def kubeconfig(self, path: str) -> str:
        """Writes a kubeconfig that points at this server and returns its path."""
        cfg = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": f"http://127.0.0.1:{self.port}"}}],
            "users": [{"name": "fake", "user": {"token": "fake"}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
            "current-context": "fake",
        }
        with open(path, "w") as f:
            json.dump(cfg, f)
        return path
