//! `GpuMachine`: what a user asks for (an image, a command, GPUs and a guest size, and
//! what the container takes from its namespace: volumes, Secrets and ConfigMaps) and
//! what the operator reports back (placement, devices, phase, conditions).

use k8s_openapi::api::core::v1::{EnvFromSource, EnvVarSource, Volume, VolumeMount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A GPU machine: one container image run inside its own micro-VM with whole GPUs passed
/// through. The operator places it on a GPU node, picks the exact devices, and runs it
/// as a Pod whose RuntimeClass boots the VM.
// Several printcolumns share a `type_`, which clippy mistakes for a repeated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[cfg_attr(test, kube(cel))]
#[kube(
    group = "gpuvm.dev",
    version = "v1alpha1",
    kind = "GpuMachine",
    namespaced,
    shortname = "gm",
    category = "gpuvm",
    status = "GpuMachineStatus",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Model", type_ = "string", json_path = ".spec.gpu.model"),
    printcolumn(name = "GPUs", type_ = "integer", json_path = ".spec.gpu.count"),
    printcolumn(name = "Node", type_ = "string", json_path = ".status.nodeName"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    printcolumn(
        name = "Pod",
        type_ = "string",
        json_path = ".status.podName",
        priority = 1
    ),
    printcolumn(
        name = "Devices",
        type_ = "string",
        json_path = ".status.gpus[*].pciAddress",
        priority = 1
    ),
    printcolumn(
        name = "Message",
        type_ = "string",
        json_path = ".status.message",
        priority = 1
    ),
    validation = Rule::new(
        "!has(oldSelf.status) || !has(oldSelf.status.nodeName) || (self.spec.gpu == oldSelf.spec.gpu && self.spec.guest == oldSelf.spec.guest)"
    ).message("spec.gpu and spec.guest cannot change once the machine is scheduled: delete it and create a new one"),
    validation = Rule::new(
        "!has(self.spec.volumeMounts) || self.spec.volumeMounts.all(m, has(self.spec.volumes) && self.spec.volumes.exists(v, v.name == m.name))"
    ).message("every spec.volumeMounts entry must name a volume declared in spec.volumes").field_path(".spec.volumeMounts")
)]
#[serde(rename_all = "camelCase")]
pub struct GpuMachineSpec {
    /// Container image to run inside the VM, e.g. `nvcr.io/nvidia/pytorch:24.05-py3`.
    #[x_kube(validation = Rule::new("self.trim() != ''").message("spec.image must name a container image, such as nvcr.io/nvidia/pytorch:24.05-py3"))]
    #[schemars(length(max = 1024))]
    pub image: String,

    /// Entrypoint override (the image's ENTRYPOINT is used when empty).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,

    /// Arguments to the entrypoint (the image's CMD is used when empty).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,

    /// Environment variables set in the container: a `value`, or a `valueFrom` reading a
    /// key of a Secret or ConfigMap of the machine's namespace, or a field of its Pod,
    /// as in a Pod.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,

    /// Environment variables from every key of a ConfigMap or Secret of the machine's
    /// namespace, as a Pod container's `envFrom` (at most 32 sources).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "crate::workload::env_from_schema")]
    pub env_from: Vec<EnvFromSource>,

    /// Volumes the container may mount, as in a Pod, of the types a tenant may use:
    /// `configMap`, `secret`, `emptyDir`, `persistentVolumeClaim`, `projected` (without
    /// service-account tokens), `downwardAPI` and `ephemeral`. `hostPath` and every other
    /// node-level or driver volume is refused (at most 64 volumes).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "crate::workload::volumes_schema")]
    pub volumes: Vec<Volume>,

    /// Where the container mounts `volumes`, as a Pod container's `volumeMounts`: each
    /// names a declared volume, at an absolute `mountPath` without `..`, with an optional
    /// relative `subPath` (at most 64 mounts, one per path).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "crate::workload::volume_mounts_schema")]
    pub volume_mounts: Vec<VolumeMount>,

    /// The GPUs this machine needs: a model and how many.
    pub gpu: GpuRequest,

    /// The size of the guest VM.
    pub guest: GuestResources,

    /// What happens when the container exits: `Never` (default), `OnFailure` or `Always`.
    /// A restart boots a new Pod on the same GPUs.
    #[serde(default)]
    pub restart_policy: RestartPolicy,

    /// Node labels the chosen node must carry, on top of being a gpuvm GPU node.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub node_selector: std::collections::BTreeMap<String, String>,

    /// How to choose among nodes that fit: `BinPack` (default) fills partly used nodes
    /// first to keep whole nodes free for 8-GPU machines; `Spread` prefers the emptiest.
    #[serde(default)]
    pub placement: PlacementStrategy,

    /// Whether `Ready` waits for the in-guest GPU check (`GPUReady`): `Required`
    /// (default) or `Ignored`, for CPU-only debugging of a machine whose guest does not
    /// see its GPUs. `GPUReady` is reported either way.
    #[serde(default)]
    pub gpu_check: GpuCheckPolicy,
}

/// Whether a machine's readiness includes the in-guest GPU check.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum GpuCheckPolicy {
    /// `Ready` is `True` only once the guest sees its GPUs (`GPUReady=True`).
    #[default]
    Required,
    /// `Ready` follows the container alone; `GPUReady` is still reported.
    Ignored,
}

/// One environment variable: a value, or where to read it from.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.valueFrom) || !has(self.value) || self.value == ''").message("an env entry sets value or valueFrom, not both"))]
pub struct EnvVar {
    /// Variable name.
    pub name: String,
    /// Variable value (empty when omitted).
    #[serde(default)]
    pub value: String,
    /// Where the value comes from instead, as in a Pod: exactly one of `secretKeyRef`
    /// or `configMapKeyRef` (a key of an object in the machine's namespace), `fieldRef`
    /// (a field of the machine's Pod) or `resourceFieldRef` (the container's resources).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("(has(self.secretKeyRef) ? 1 : 0) + (has(self.configMapKeyRef) ? 1 : 0) + (has(self.fieldRef) ? 1 : 0) + (has(self.resourceFieldRef) ? 1 : 0) == 1").message("an env valueFrom names exactly one of secretKeyRef, configMapKeyRef, fieldRef or resourceFieldRef"))]
    pub value_from: Option<EnvVarSource>,
}

/// The GPUs a machine asks for.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, KubeSchema)]
pub struct GpuRequest {
    /// GPU model as published by the node agent, e.g. `h100-80gb`, `a100-40gb`, `l40s`,
    /// or `any` for whatever is free.
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([a-z0-9-]*[a-z0-9])?$')").message("spec.gpu.model must be a lowercase model name such as h100-80gb, a100-40gb, l40s, or any"))]
    #[schemars(length(max = 63))]
    pub model: String,

    /// How many GPUs, 1 to 8. They are whole devices, passed through with their
    /// IOMMU group; several GPUs come from one node, on one NUMA node where possible.
    #[x_kube(validation = Rule::new("self >= 1 && self <= 8").message("spec.gpu.count must be between 1 and 8"))]
    pub count: i32,
}

/// The guest VM's size.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, KubeSchema)]
pub struct GuestResources {
    /// Virtual CPUs of the guest, 1 to 256.
    #[x_kube(validation = Rule::new("self >= 1 && self <= 256").message("spec.guest.cpus must be between 1 and 256"))]
    pub cpus: i32,

    /// Guest memory as a Kubernetes quantity, at least 128Mi, e.g. `64Gi`.
    #[x_kube(validation = Rule::new("isQuantity(self) && quantity(self).compareTo(quantity('128Mi')) >= 0").message("spec.guest.memory must be a Kubernetes quantity of at least 128Mi, such as 16Gi"))]
    #[schemars(length(max = 32))]
    pub memory: String,
}

/// Restart behaviour when the container exits.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum RestartPolicy {
    /// Never restart: the machine ends `Succeeded` or `Failed`.
    #[default]
    Never,
    /// Restart only after a non-zero exit.
    OnFailure,
    /// Always restart.
    Always,
}

/// How the scheduler ranks nodes that fit.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum PlacementStrategy {
    /// Prefer the node with the fewest free GPUs that still fits (keeps whole nodes free).
    #[default]
    BinPack,
    /// Prefer the node with the most free GPUs.
    Spread,
}

/// The lifecycle phase of a machine.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum MachinePhase {
    /// Accepted, not yet placed.
    #[default]
    Pending,
    /// GPUs allocated on a node; the Pod is being created.
    Scheduled,
    /// The Pod exists; its VM is booting.
    Booting,
    /// The container runs inside the VM.
    Running,
    /// The container exited with status 0 and will not restart.
    Succeeded,
    /// The container failed and will not restart, or the machine cannot run.
    Failed,
    /// Being deleted: waiting for the Pod to go before the GPUs are released.
    Terminating,
}

impl MachinePhase {
    /// Whether the machine has ended and will not run again.
    pub fn is_terminal(self) -> bool {
        matches!(self, MachinePhase::Succeeded | MachinePhase::Failed)
    }
}

impl std::fmt::Display for MachinePhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

/// The condition types a machine reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ConditionType {
    /// GPUs are allocated on a node.
    Scheduled,
    /// The VM booted and its agent answers.
    VmReady,
    /// The guest sees the GPUs it was given.
    GpuReady,
    /// The machine's container is running (the standard readiness condition).
    Ready,
}

impl ConditionType {
    /// The condition's `type` string.
    pub fn as_str(self) -> &'static str {
        match self {
            ConditionType::Scheduled => "Scheduled",
            ConditionType::VmReady => "VMReady",
            ConditionType::GpuReady => "GPUReady",
            ConditionType::Ready => "Ready",
        }
    }

    /// All condition types, in the order they are reported.
    pub const ALL: [ConditionType; 4] = [
        ConditionType::Scheduled,
        ConditionType::VmReady,
        ConditionType::GpuReady,
        ConditionType::Ready,
    ];
}

/// One GPU allocated to a machine.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AllocatedGpu {
    /// PCI address of the GPU, e.g. `0000:17:00.0`.
    pub pci_address: String,
    /// GPU model, e.g. `h100-80gb`.
    pub model: String,
    /// IOMMU group the GPU belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iommu_group: Option<u32>,
    /// NUMA node the GPU is attached to, when the host reports one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub numa_node: Option<i32>,
    /// Companion functions of the same IOMMU group passed along (e.g. HDMI audio).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub companions: Vec<String>,
}

impl AllocatedGpu {
    /// Every PCI address `gpus` take: each GPU followed by its companion functions.
    pub fn devices(gpus: &[AllocatedGpu]) -> Vec<String> {
        gpus.iter()
            .flat_map(|g| std::iter::once(g.pci_address.clone()).chain(g.companions.clone()))
            .collect()
    }
}

/// What the operator observed and decided about a machine. The allocation recorded here
/// (`nodeName` + `gpus`) is the source of truth for which GPUs are taken.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct GpuMachineStatus {
    /// Lifecycle phase: Pending, Scheduled, Booting, Running, Succeeded, Failed or Terminating.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<MachinePhase>,
    /// The node the machine's GPUs were allocated on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// The Pod currently running the machine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_name: Option<String>,
    /// The GPUs allocated to the machine.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gpus: Vec<AllocatedGpu>,
    /// Latest observations of the machine's state.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// A human-readable summary of the current state or the last error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The spec generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// How many times the machine's Pod was replaced under its restart policy.
    #[serde(default)]
    pub restarts: i32,
    /// Exit code of the container's last run, when it has ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// The index of the machine's current Pod: 0 for the first, one more for every
    /// replacement (a restart or a spec roll-out). The Pod is `<machine>-vm` for 0,
    /// `<machine>-vm-<index>` after. Written before the old Pod is deleted, so a crash
    /// in between never reuses a name.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub pod_index: i32,
    /// Restarts in a row without a run of at least the back-off reset period (10 min by
    /// default): the next restart waits 10 s doubled this many times less one, capped
    /// at 5 min (as kubelet's CrashLoopBackOff).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub consecutive_restarts: i32,
    /// When the replacement Pod of a restart in back-off will be created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_restart_time: Option<Time>,
    /// How the container's last run ended: exit code, reason and the termination
    /// message (which, for a failed run that wrote none, is the tail of its log).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_termination: Option<Termination>,
}

fn is_zero(n: &i32) -> bool {
    *n == 0
}

/// How a machine's container ended, copied from its Pod before the Pod is deleted.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Termination {
    /// The Pod the run was in.
    pub pod_name: String,
    /// The container's exit code.
    pub exit_code: i32,
    /// The signal that ended it, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    /// A one-word reason, e.g. `Completed`, `Error` or `OOMKilled`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The termination message: what the container wrote to `/dev/termination-log`,
    /// or, when it failed without writing one, the last lines of its log (the Pod's
    /// `terminationMessagePolicy` is `FallbackToLogsOnError`). At most 4096 bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// When the run started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Time>,
    /// When it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Time>,
}

impl GpuMachineStatus {
    /// Every PCI address the machine holds: each GPU and its companion functions.
    pub fn devices(&self) -> Vec<String> {
        AllocatedGpu::devices(&self.gpus)
    }

    /// Whether GPUs are allocated (the machine is placed).
    pub fn is_placed(&self) -> bool {
        self.node_name.is_some() && !self.gpus.is_empty()
    }

    /// The condition of a given type, if reported.
    pub fn condition(&self, kind: ConditionType) -> Option<&Condition> {
        self.conditions.iter().find(|c| c.type_ == kind.as_str())
    }
}

impl GpuMachine {
    /// The machine's phase, `Pending` when no status was written yet.
    pub fn phase(&self) -> MachinePhase {
        self.status
            .as_ref()
            .and_then(|s| s.phase)
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::CustomResourceExt;

    fn machine(spec: serde_json::Value) -> serde_json::Value {
        serde_json::json!({
            "apiVersion": "gpuvm.dev/v1alpha1",
            "kind": "GpuMachine",
            "metadata": {"name": "m", "namespace": "default"},
            "spec": spec,
        })
    }

    fn valid_spec() -> serde_json::Value {
        serde_json::json!({
            "image": "nvcr.io/nvidia/pytorch:24.05-py3",
            "command": ["python", "train.py"],
            "gpu": {"model": "h100-80gb", "count": 2},
            "guest": {"cpus": 16, "memory": "64Gi"},
        })
    }

    fn cel_errors(obj: &serde_json::Value, old: Option<&serde_json::Value>) -> Vec<String> {
        let crd = GpuMachine::crd();
        let schema = serde_json::to_value(
            crd.spec.versions[0]
                .schema
                .as_ref()
                .and_then(|s| s.open_api_v3_schema.as_ref())
                .unwrap(),
        )
        .unwrap();
        match kube::core::cel::Validator::new().validate(&schema, obj, old) {
            Ok(()) => Vec::new(),
            Err(errors) => errors.iter().map(|e| e.to_string()).collect(),
        }
    }

    #[test]
    fn crd_schema_carries_the_cel_rules_and_columns() {
        let crd = serde_json::to_string(&GpuMachine::crd()).unwrap();
        for needle in [
            "spec.gpu.count must be between 1 and 8",
            "spec.guest.cpus must be between 1 and 256",
            "spec.guest.memory must be a Kubernetes quantity",
            "spec.image must name a container image",
            "cannot change once the machine is scheduled",
            "x-kubernetes-list-map-keys",
            "\"shortNames\":[\"gm\"]",
            ".status.phase",
        ] {
            assert!(crd.contains(needle), "CRD lacks {needle}");
        }
    }

    #[test]
    fn a_valid_machine_passes_cel() {
        assert_eq!(
            cel_errors(&machine(valid_spec()), None),
            Vec::<String>::new()
        );
    }

    #[test]
    fn bad_specs_fail_cel_with_a_clear_message() {
        let cases: [(&str, serde_json::Value, &str); 7] = [
            (
                "count 0",
                serde_json::json!({"gpu": {"model": "h100-80gb", "count": 0}}),
                "between 1 and 8",
            ),
            (
                "count 9",
                serde_json::json!({"gpu": {"model": "h100-80gb", "count": 9}}),
                "between 1 and 8",
            ),
            (
                "cpus 0",
                serde_json::json!({"guest": {"cpus": 0, "memory": "1Gi"}}),
                "cpus must be between",
            ),
            (
                "memory lots",
                serde_json::json!({"guest": {"cpus": 1, "memory": "lots"}}),
                "memory must be a Kubernetes quantity",
            ),
            (
                "memory tiny",
                serde_json::json!({"guest": {"cpus": 1, "memory": "1Mi"}}),
                "at least 128Mi",
            ),
            (
                "empty image",
                serde_json::json!({"image": " "}),
                "must name a container image",
            ),
            (
                "bad model",
                serde_json::json!({"gpu": {"model": "H100 80GB", "count": 1}}),
                "lowercase model name",
            ),
        ];
        for (name, patch, want) in cases {
            let mut spec = valid_spec();
            for (k, v) in patch.as_object().unwrap() {
                spec[k] = v.clone();
            }
            let errors = cel_errors(&machine(spec), None);
            assert!(
                errors.iter().any(|e| e.contains(want)),
                "{name}: want {want:?} in {errors:?}"
            );
        }
    }

    #[test]
    fn volume_rules_admit_a_pods_volumes_and_refuse_the_rest() {
        let mut spec = valid_spec();
        spec["volumes"] = serde_json::json!([
            {"name": "models", "persistentVolumeClaim": {"claimName": "llama"}},
            {"name": "token", "secret": {"secretName": "hf"}},
        ]);
        spec["volumeMounts"] = serde_json::json!([
            {"name": "models", "mountPath": "/models", "subPath": "llama-3"},
            {"name": "token", "mountPath": "/run/secrets/hf"},
        ]);
        spec["env"] = serde_json::json!([
            {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}},
        ]);
        spec["envFrom"] = serde_json::json!([{"configMapRef": {"name": "settings"}}]);
        assert_eq!(
            cel_errors(&machine(spec.clone()), None),
            Vec::<String>::new()
        );

        type Edit = fn(&mut serde_json::Value);
        let cases: [(&str, Edit, &str); 7] = [
            (
                "two types",
                |s| s["volumes"][0]["emptyDir"] = serde_json::json!({}),
                "exactly one type",
            ),
            (
                "bad name",
                |s| s["volumes"][1]["name"] = serde_json::json!("Token"),
                "DNS label",
            ),
            (
                "undeclared",
                |s| s["volumeMounts"][1]["name"] = serde_json::json!("cache"),
                "declared in spec.volumes",
            ),
            (
                "relative",
                |s| s["volumeMounts"][0]["mountPath"] = serde_json::json!("models"),
                "absolute path",
            ),
            (
                "dot-dot",
                |s| s["volumeMounts"][0]["subPath"] = serde_json::json!("../x"),
                "relative path without",
            ),
            (
                "value too",
                |s| s["env"][0]["value"] = serde_json::json!("x"),
                "value or valueFrom, not both",
            ),
            (
                "bidirectional",
                |s| s["volumeMounts"][0]["mountPropagation"] = serde_json::json!("Bidirectional"),
                "cannot be Bidirectional",
            ),
        ];
        for (name, edit, want) in cases {
            let mut bad = spec.clone();
            edit(&mut bad);
            let errors = cel_errors(&machine(bad), None);
            assert!(
                errors.iter().any(|e| e.contains(want)),
                "{name}: want {want:?} in {errors:?}"
            );
        }
        let mut host = spec.clone();
        host["volumes"][1] = serde_json::json!({"name": "token", "hostPath": {"path": "/"}});
        assert!(
            !cel_errors(&machine(host), None).is_empty(),
            "hostPath must be refused"
        );
    }

    #[test]
    fn gpu_and_guest_are_frozen_once_scheduled() {
        let mut old = machine(valid_spec());
        let mut new = old.clone();
        new["spec"]["gpu"]["count"] = serde_json::json!(4);
        // Unscheduled: the change is fine.
        assert!(cel_errors(&new, Some(&old)).is_empty());
        old["status"] = serde_json::json!({"nodeName": "gpu-1", "phase": "Scheduled"});
        new["status"] = old["status"].clone();
        let errors = cel_errors(&new, Some(&old));
        assert!(
            errors
                .iter()
                .any(|e| e.contains("cannot change once the machine is scheduled")),
            "{errors:?}"
        );
        // Other fields may still change (e.g. env), the freeze is only gpu/guest.
        let mut env_only = old.clone();
        env_only["spec"]["env"] = serde_json::json!([{"name": "A", "value": "b"}]);
        assert!(cel_errors(&env_only, Some(&old)).is_empty());
    }

    #[test]
    fn status_helpers() {
        let status = GpuMachineStatus {
            node_name: Some("n".into()),
            gpus: vec![AllocatedGpu {
                pci_address: "0000:01:00.0".into(),
                model: "l40s".into(),
                iommu_group: Some(3),
                numa_node: Some(0),
                companions: vec!["0000:01:00.1".into()],
            }],
            ..Default::default()
        };
        assert!(status.is_placed());
        assert_eq!(status.devices(), vec!["0000:01:00.0", "0000:01:00.1"]);
        assert!(MachinePhase::Failed.is_terminal());
        assert!(!MachinePhase::Running.is_terminal());
    }

    #[test]
    fn new_fields_default_for_objects_written_before_them() {
        let m: GpuMachine = serde_json::from_value(serde_json::json!({
            "apiVersion": "gpuvm.dev/v1alpha1",
            "kind": "GpuMachine",
            "metadata": {"name": "m"},
            "spec": valid_spec(),
            "status": {"phase": "Running", "restarts": 2, "podName": "m-vm-2"},
        }))
        .unwrap();
        assert_eq!(m.spec.gpu_check, GpuCheckPolicy::Required);
        let s = m.status.unwrap();
        assert_eq!((s.pod_index, s.consecutive_restarts), (0, 0));
        assert!(s.next_restart_time.is_none() && s.last_termination.is_none());
        let out = serde_json::to_value(&s).unwrap();
        assert!(out.get("podIndex").is_none(), "{out}");
        assert!(out.get("lastTermination").is_none(), "{out}");
    }
}
