//! The Pod that runs a placed machine: a pure function of the machine and its allocation.

use std::collections::BTreeMap;

use gpuvm_api::{GpuMachine, GpuMachineSpec, GpuMachineStatus, keys};
use k8s_openapi::api::core::v1::{
    Affinity, Container, EnvVar, NodeAffinity, NodeSelector, NodeSelectorRequirement,
    NodeSelectorTerm, Pod, PodSpec, ResourceRequirements, Toleration,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::ObjectMeta;
use kube::{Resource, ResourceExt};
use sha2::{Digest, Sha256};

/// Why no Pod can be built for a machine.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PodError {
    /// The machine has no allocation yet.
    #[error("machine {0} has no GPU allocation yet")]
    NotPlaced(String),
    /// The machine object lacks what an owner reference needs (uid, name).
    #[error("machine {0} has no uid, so it cannot own a Pod")]
    NoOwner(String),
    /// The spec asks its namespace for what a GpuMachine may not use (a `hostPath`
    /// volume, say): the CRD's rules refuse it, so only an object stored without them
    /// gets here.
    #[error("machine {name}: {source}")]
    Refused {
        /// Machine name.
        name: String,
        /// What is refused.
        source: gpuvm_api::workload::WorkloadError,
    },
    /// The guest memory is not a usable quantity: the CRD rule catches non-quantities,
    /// but not values past Kubernetes' largest (2^63-1), which the API server caps.
    #[error("machine {name}: {source}")]
    BadMemory {
        /// Machine name.
        name: String,
        /// The parse error.
        source: gpuvm_api::quantity::QuantityError,
    },
}

/// The name of a machine's Pod for a given Pod index: `<machine>-vm`, then
/// `<machine>-vm-1`, `<machine>-vm-2`, ... Kept within the 253-character limit.
pub fn pod_name(machine: &str, index: i32) -> String {
    let suffix = if index == 0 {
        "-vm".to_owned()
    } else {
        format!("-vm-{index}")
    };
    let mut keep = machine.len().min(253 - suffix.len());
    while !machine.is_char_boundary(keep) {
        keep -= 1;
    }
    let mut base = machine[..keep].to_owned();
    while base.ends_with(['-', '.']) {
        base.pop();
    }
    base + &suffix
}

/// The index of the machine's current Pod. A status written before `podIndex` existed
/// named its Pods by the restart count, so the larger of the two is current.
pub fn pod_index(status: &GpuMachineStatus) -> i32 {
    status.pod_index.max(status.restarts)
}

/// The name the machine's current Pod has (or will have).
pub fn current_pod_name(machine: &GpuMachine) -> String {
    let index = machine.status.as_ref().map(pod_index).unwrap_or_default();
    pod_name(&machine.name_any(), index)
}

/// Whether `pod` is controlled by the machine with uid `uid` (its controller
/// ownerReference names that uid). Only such a Pod is the machine's to run or delete.
pub fn owned_by(pod: &Pod, uid: &str) -> bool {
    pod.owner_references()
        .iter()
        .any(|o| o.controller == Some(true) && o.uid == uid)
}

/// The parts of a spec a Pod carries beyond image, command and args, each with a short
/// digest of its value as the machine states it. The API server fills defaults into
/// what a Pod stores (a Secret volume's `defaultMode`, a `fieldRef`'s `apiVersion`), so
/// the Pod records these digests (`gpuvm.dev/spec-digest`) instead of being compared
/// field by field, which would see a change where there is none.
fn carried_parts(spec: &GpuMachineSpec) -> [(&'static str, String); 4] {
    fn digest(value: &impl serde::Serialize) -> String {
        // Serializing these derived types cannot fail; an empty digest just differs.
        let bytes = serde_json::to_vec(value).unwrap_or_default();
        let sum = Sha256::digest(&bytes);
        sum[..8].iter().map(|b| format!("{b:02x}")).collect()
    }
    [
        ("env", digest(&spec.env)),
        ("envFrom", digest(&spec.env_from)),
        ("volumes", digest(&spec.volumes)),
        ("volumeMounts", digest(&spec.volume_mounts)),
    ]
}

/// The `gpuvm.dev/spec-digest` annotation of a Pod built from `spec`:
/// `env=<hex>,envFrom=<hex>,volumes=<hex>,volumeMounts=<hex>`.
pub fn spec_digest(spec: &GpuMachineSpec) -> String {
    carried_parts(spec)
        .iter()
        .map(|(part, digest)| format!("{part}={digest}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// The carried parts whose digest in the Pod differs from the spec's. A Pod built
/// before the digest existed carried plain env values only: it differs in `env` when
/// those differ, and in every other part the spec sets.
fn changed_parts(pod: &Pod, spec: &GpuMachineSpec) -> Vec<&'static str> {
    let parts = carried_parts(spec);
    match pod.annotations().get(keys::ANNOTATION_SPEC_DIGEST) {
        Some(recorded) => {
            let recorded: BTreeMap<&str, &str> = recorded
                .split(',')
                .filter_map(|kv| kv.split_once('='))
                .collect();
            parts
                .iter()
                .filter(|(part, digest)| recorded.get(part) != Some(&digest.as_str()))
                .map(|(part, _)| *part)
                .collect()
        }
        None => {
            let mut changed = Vec::new();
            if !legacy_env_matches(pod, spec) {
                changed.push("env");
            }
            if !spec.env_from.is_empty() {
                changed.push("envFrom");
            }
            if !spec.volumes.is_empty() {
                changed.push("volumes");
            }
            if !spec.volume_mounts.is_empty() {
                changed.push("volumeMounts");
            }
            changed
        }
    }
}

/// Whether a Pod without a digest has the spec's env: the same names and plain values.
fn legacy_env_matches(pod: &Pod, spec: &GpuMachineSpec) -> bool {
    let env: Vec<(&str, &str)> = container(pod)
        .and_then(|c| c.env.as_ref())
        .into_iter()
        .flatten()
        .map(|e| (e.name.as_str(), e.value.as_deref().unwrap_or_default()))
        .collect();
    let want: Vec<(&str, &str)> = spec
        .env
        .iter()
        .map(|e| (e.name.as_str(), e.value.as_str()))
        .collect();
    env == want && spec.env.iter().all(|e| e.value_from.is_none())
}

fn container(pod: &Pod) -> Option<&Container> {
    pod.spec.as_ref().and_then(|s| s.containers.first())
}

/// Whether the Pod's container runs what the spec asks for now: image, command, args,
/// env, envFrom, volumes and volume mounts. A Pod that does not is replaced (a spec
/// roll-out).
pub fn reflects_spec(pod: &Pod, spec: &GpuMachineSpec) -> bool {
    let Some(c) = container(pod) else {
        return false;
    };
    c.image.as_deref() == Some(spec.image.as_str())
        && c.command.as_deref().unwrap_or_default() == spec.command.as_slice()
        && c.args.as_deref().unwrap_or_default() == spec.args.as_slice()
        && changed_parts(pod, spec).is_empty()
}

/// What differs between the Pod and the spec, for messages: `image a -> b`, `volumes`.
pub fn spec_change(pod: &Pod, spec: &GpuMachineSpec) -> String {
    let c = container(pod);
    let mut changed = Vec::new();
    let image = c.and_then(|c| c.image.clone()).unwrap_or_default();
    if image != spec.image {
        changed.push(format!("image {image} -> {}", spec.image));
    }
    if c.and_then(|c| c.command.clone()).unwrap_or_default() != spec.command {
        changed.push("command".to_owned());
    }
    if c.and_then(|c| c.args.clone()).unwrap_or_default() != spec.args {
        changed.push("args".to_owned());
    }
    changed.extend(changed_parts(pod, spec).into_iter().map(str::to_owned));
    changed.join(", ")
}

/// Builds the Pod for a placed machine: RuntimeClass `gpuvm`, pinned to the allocated
/// node, tolerating the GPU-node taint, owned by the machine, and annotated with the
/// devices and the guest size the shim needs.
pub fn build_pod(machine: &GpuMachine) -> Result<Pod, PodError> {
    let name = machine.name_any();
    let status = machine.status.clone().unwrap_or_default();
    let node = match (&status.node_name, status.gpus.is_empty()) {
        (Some(node), false) => node.clone(),
        _ => return Err(PodError::NotPlaced(name)),
    };
    let owner = machine
        .controller_owner_ref(&())
        .ok_or_else(|| PodError::NoOwner(name.clone()))?;
    let spec = &machine.spec;
    spec.check_workload().map_err(|source| PodError::Refused {
        name: name.clone(),
        source,
    })?;
    // The same parser the shim reads the annotation with: a machine the operator
    // builds a Pod for is one the shim can size (shim/tests/guest_size_contract.rs).
    gpuvm_api::quantity::parse_bytes(&spec.guest.memory).map_err(|source| PodError::BadMemory {
        name: name.clone(),
        source,
    })?;

    let models: Vec<&str> = status.gpus.iter().map(|g| g.model.as_str()).collect();
    let annotations = BTreeMap::from([
        (
            keys::ANNOTATION_DEVICES.to_owned(),
            status.devices().join(","),
        ),
        (
            keys::ANNOTATION_CPUS.to_owned(),
            spec.guest.cpus.to_string(),
        ),
        (
            keys::ANNOTATION_MEMORY.to_owned(),
            spec.guest.memory.clone(),
        ),
        (keys::ANNOTATION_GPU_MODELS.to_owned(), models.join(",")),
        (
            keys::ANNOTATION_GENERATION.to_owned(),
            machine.metadata.generation.unwrap_or_default().to_string(),
        ),
        (keys::ANNOTATION_SPEC_DIGEST.to_owned(), spec_digest(spec)),
    ]);
    let labels = BTreeMap::from([
        (keys::LABEL_MACHINE.to_owned(), name.clone()),
        (keys::LABEL_RESTART.to_owned(), status.restarts.to_string()),
        (
            "app.kubernetes.io/managed-by".to_owned(),
            keys::FIELD_MANAGER.to_owned(),
        ),
    ]);
    let resources = BTreeMap::from([
        ("cpu".to_owned(), Quantity(spec.guest.cpus.to_string())),
        ("memory".to_owned(), Quantity(spec.guest.memory.clone())),
    ]);
    let container = Container {
        name: "machine".to_owned(),
        image: Some(spec.image.clone()),
        command: (!spec.command.is_empty()).then(|| spec.command.clone()),
        args: (!spec.args.is_empty()).then(|| spec.args.clone()),
        env: (!spec.env.is_empty()).then(|| spec.env.iter().map(env_var).collect()),
        env_from: (!spec.env_from.is_empty()).then(|| spec.env_from.clone()),
        volume_mounts: (!spec.volume_mounts.is_empty()).then(|| spec.volume_mounts.clone()),
        resources: Some(ResourceRequirements {
            requests: Some(resources.clone()),
            limits: Some(resources),
            ..ResourceRequirements::default()
        }),
        // A failed run that wrote no termination message gets the tail of its log
        // there, which the operator keeps in `status.lastTermination`.
        termination_message_policy: Some("FallbackToLogsOnError".to_owned()),
        ..Container::default()
    };
    // Pinned with a required affinity on the node's name (as DaemonSets do) rather than
    // `nodeName`, so kube-scheduler still accounts the Pod's resources and overhead.
    let affinity = Affinity {
        node_affinity: Some(NodeAffinity {
            required_during_scheduling_ignored_during_execution: Some(NodeSelector {
                node_selector_terms: vec![NodeSelectorTerm {
                    match_fields: Some(vec![NodeSelectorRequirement {
                        key: "metadata.name".to_owned(),
                        operator: "In".to_owned(),
                        values: Some(vec![node]),
                    }]),
                    ..NodeSelectorTerm::default()
                }],
            }),
            ..NodeAffinity::default()
        }),
        ..Affinity::default()
    };
    Ok(Pod {
        metadata: ObjectMeta {
            name: Some(pod_name(&name, pod_index(&status))),
            namespace: machine.namespace(),
            labels: Some(labels),
            annotations: Some(annotations),
            owner_references: Some(vec![owner]),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            runtime_class_name: Some(keys::RUNTIME_CLASS.to_owned()),
            affinity: Some(affinity),
            tolerations: Some(vec![Toleration {
                key: Some(keys::TAINT_GPU_NODE.to_owned()),
                operator: Some("Exists".to_owned()),
                effect: Some("NoSchedule".to_owned()),
                ..Toleration::default()
            }]),
            // The operator applies the machine's restart policy itself, with a new Pod
            // on the same devices, so the Pod never restarts in place.
            restart_policy: Some("Never".to_owned()),
            // A tenant VM has no business talking to this cluster's API.
            automount_service_account_token: Some(false),
            enable_service_links: Some(false),
            containers: vec![container],
            volumes: (!spec.volumes.is_empty()).then(|| spec.volumes.clone()),
            ..PodSpec::default()
        }),
        status: None,
    })
}

/// A machine's env entry as a Pod's: its value, or where the value comes from.
fn env_var(e: &gpuvm_api::EnvVar) -> EnvVar {
    EnvVar {
        name: e.name.clone(),
        // A Pod refuses a value next to a valueFrom, even an empty one.
        value: e.value_from.is_none().then(|| e.value.clone()),
        value_from: e.value_from.clone(),
    }
}

/// The node a Pod is pinned to by its required node affinity
/// (`matchFields metadata.name In [node]`, as [`build_pod`] writes it).
pub fn pinned_node(pod: &Pod) -> Option<&str> {
    let term = pod
        .spec
        .as_ref()?
        .affinity
        .as_ref()?
        .node_affinity
        .as_ref()?
        .required_during_scheduling_ignored_during_execution
        .as_ref()?
        .node_selector_terms
        .first()?;
    let field = term
        .match_fields
        .as_ref()?
        .iter()
        .find(|f| f.key == "metadata.name" && f.operator == "In")?;
    match field.values.as_deref() {
        Some([one]) => Some(one.as_str()),
        _ => None,
    }
}

/// Whether a Pod runs exactly the machine's committed allocation: pinned to its node and
/// carrying its devices. A Pod that does not (left by a writer that lost a race) must go.
pub fn matches_allocation(pod: &Pod, status: &GpuMachineStatus) -> bool {
    let devices = pod
        .annotations()
        .get(keys::ANNOTATION_DEVICES)
        .map(|v| keys::parse_devices(v))
        .unwrap_or_default();
    status.is_placed()
        && pinned_node(pod) == status.node_name.as_deref()
        && devices == status.devices()
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpuvm_api::{AllocatedGpu, GpuMachineSpec, GpuMachineStatus, GpuRequest, GuestResources};

    fn placed() -> GpuMachine {
        let mut m = GpuMachine::new(
            "train",
            GpuMachineSpec {
                image: "nvcr.io/nvidia/pytorch:24.05-py3".into(),
                command: vec!["python".into()],
                args: vec!["train.py".into()],
                env: vec![gpuvm_api::EnvVar {
                    name: "EPOCHS".into(),
                    value: "3".into(),
                    ..Default::default()
                }],
                gpu: GpuRequest {
                    model: "l40s".into(),
                    count: 1,
                },
                guest: GuestResources {
                    cpus: 8,
                    memory: "32Gi".into(),
                },
                restart_policy: Default::default(),
                node_selector: Default::default(),
                placement: Default::default(),
                gpu_check: Default::default(),
                ..Default::default()
            },
        );
        m.metadata.namespace = Some("ml".into());
        m.metadata.uid = Some("uid-1".into());
        m.status = Some(GpuMachineStatus {
            node_name: Some("ws-1".into()),
            gpus: vec![AllocatedGpu {
                pci_address: "0000:01:00.0".into(),
                model: "l40s".into(),
                iommu_group: Some(12),
                numa_node: Some(0),
                companions: vec!["0000:01:00.1".into()],
            }],
            ..Default::default()
        });
        m
    }

    #[test]
    fn pod_carries_runtime_class_pinning_annotations_and_owner() {
        let pod = build_pod(&placed()).unwrap();
        let meta = &pod.metadata;
        assert_eq!(meta.name.as_deref(), Some("train-vm"));
        assert_eq!(meta.namespace.as_deref(), Some("ml"));
        let ann = meta.annotations.as_ref().unwrap();
        assert_eq!(ann["gpuvm.dev/devices"], "0000:01:00.0,0000:01:00.1");
        assert_eq!(ann["gpuvm.dev/cpus"], "8");
        assert_eq!(ann["gpuvm.dev/memory"], "32Gi");
        assert_eq!(ann["gpuvm.dev/gpu-models"], "l40s");
        assert_eq!(meta.labels.as_ref().unwrap()["gpuvm.dev/machine"], "train");
        let owner = &meta.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str()),
            ("GpuMachine", "uid-1")
        );
        assert_eq!(owner.controller, Some(true));

        let spec = pod.spec.unwrap();
        assert_eq!(spec.runtime_class_name.as_deref(), Some("gpuvm"));
        assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
        let term = &spec
            .affinity
            .unwrap()
            .node_affinity
            .unwrap()
            .required_during_scheduling_ignored_during_execution
            .unwrap()
            .node_selector_terms[0];
        let field = &term.match_fields.as_ref().unwrap()[0];
        assert_eq!(field.key, "metadata.name");
        assert_eq!(field.values.as_deref(), Some(&["ws-1".to_owned()][..]));
        let tol = &spec.tolerations.unwrap()[0];
        assert_eq!(tol.key.as_deref(), Some("gpuvm.dev/gpu-node"));
        assert_eq!(tol.effect.as_deref(), Some("NoSchedule"));
        let c = &spec.containers[0];
        assert_eq!(c.image.as_deref(), Some("nvcr.io/nvidia/pytorch:24.05-py3"));
        assert_eq!(c.command.as_deref(), Some(&["python".to_owned()][..]));
        assert_eq!(c.args.as_deref(), Some(&["train.py".to_owned()][..]));
        assert_eq!(c.env.as_ref().unwrap()[0].value.as_deref(), Some("3"));
        assert_eq!(
            c.termination_message_policy.as_deref(),
            Some("FallbackToLogsOnError")
        );
        let req = c.resources.as_ref().unwrap().requests.as_ref().unwrap();
        assert_eq!(req["cpu"].0, "8");
        assert_eq!(req["memory"].0, "32Gi");
    }

    #[test]
    fn restarts_get_new_names() {
        let mut m = placed();
        m.status.as_mut().unwrap().restarts = 2;
        let pod = build_pod(&m).unwrap();
        assert_eq!(pod.metadata.name.as_deref(), Some("train-vm-2"));
        assert_eq!(pod.metadata.labels.unwrap()["gpuvm.dev/restart"], "2");
        // A replacement (restart or roll-out) counts in podIndex; an old status without
        // it is named by its restarts.
        m.status.as_mut().unwrap().pod_index = 5;
        assert_eq!(current_pod_name(&m), "train-vm-5");
        m.status.as_mut().unwrap().pod_index = 0;
        assert_eq!(current_pod_name(&m), "train-vm-2");
        let long = "x".repeat(253);
        assert_eq!(pod_name(&long, 12).len(), 253);
    }

    #[test]
    fn a_pod_reflects_the_spec_it_was_built_from_and_its_generation() {
        let mut m = placed();
        m.metadata.generation = Some(4);
        let pod = build_pod(&m).unwrap();
        assert_eq!(pod.annotations()[keys::ANNOTATION_GENERATION], "4");
        assert!(reflects_spec(&pod, &m.spec));
        assert!(owned_by(&pod, "uid-1"));
        assert!(!owned_by(&pod, "uid-2"));
        type Change = fn(&mut GpuMachineSpec);
        let cases: [(&str, Change, &str); 4] = [
            (
                "image",
                |s| s.image = "img:2".into(),
                "image nvcr.io/nvidia/pytorch:24.05-py3 -> img:2",
            ),
            ("command", |s| s.command.clear(), "command"),
            ("args", |s| s.args.push("--fast".into()), "args"),
            ("env", |s| s.env[0].value = "4".into(), "env"),
        ];
        for (name, change, says) in cases {
            let mut spec = m.spec.clone();
            change(&mut spec);
            assert!(!reflects_spec(&pod, &spec), "{name}");
            assert_eq!(spec_change(&pod, &spec), says, "{name}");
        }
        // What the Pod does not carry may change without a roll-out.
        let mut spec = m.spec.clone();
        spec.restart_policy = gpuvm_api::RestartPolicy::Always;
        spec.gpu_check = gpuvm_api::GpuCheckPolicy::Ignored;
        assert!(reflects_spec(&pod, &spec));
    }

    #[test]
    fn unplaced_or_ownerless_machines_get_no_pod() {
        let mut m = placed();
        m.status = None;
        assert_eq!(build_pod(&m), Err(PodError::NotPlaced("train".into())));
        let mut m = placed();
        m.metadata.uid = None;
        assert_eq!(build_pod(&m), Err(PodError::NoOwner("train".into())));
    }

    #[test]
    fn a_pod_matches_only_its_machines_committed_allocation() {
        let m = placed();
        let pod = build_pod(&m).unwrap();
        let status = m.status.clone().unwrap();
        assert_eq!(pinned_node(&pod), Some("ws-1"));
        assert!(matches_allocation(&pod, &status));
        type Change = fn(&mut GpuMachineStatus);
        let cases: [(&str, Change); 4] = [
            ("other node", |s| s.node_name = Some("ws-2".into())),
            ("other GPU", |s| {
                s.gpus[0].pci_address = "0000:02:00.0".into()
            }),
            ("companion dropped", |s| s.gpus[0].companions.clear()),
            ("unplaced", |s| {
                s.node_name = None;
                s.gpus.clear();
            }),
        ];
        for (name, change) in cases {
            let mut other = status.clone();
            change(&mut other);
            assert!(!matches_allocation(&pod, &other), "{name}");
        }
    }

    /// A machine reading a model from a claim, a token from a Secret and settings from
    /// a ConfigMap.
    fn with_volumes() -> GpuMachine {
        let mut m = placed();
        let spec: GpuMachineSpec = serde_json::from_value(serde_json::json!({
            "image": "vllm/vllm-openai:v0.6.0",
            "gpu": {"model": "l40s", "count": 1},
            "guest": {"cpus": 8, "memory": "32Gi"},
            "env": [
                {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}},
                {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "MODE", "value": "serve"},
            ],
            "envFrom": [{"configMapRef": {"name": "server-settings"}, "prefix": "VLLM_"}],
            "volumes": [
                {"name": "models", "persistentVolumeClaim": {"claimName": "llama", "readOnly": true}},
                {"name": "tls", "secret": {"secretName": "server-tls"}},
            ],
            "volumeMounts": [
                {"name": "models", "mountPath": "/models", "readOnly": true},
                {"name": "tls", "mountPath": "/etc/tls", "subPath": "certs"},
            ],
        }))
        .unwrap();
        m.spec = spec;
        m
    }

    #[test]
    fn the_pod_carries_volumes_mounts_and_env_sources() {
        let m = with_volumes();
        let pod = build_pod(&m).unwrap();
        let spec = pod.spec.as_ref().unwrap();
        assert_eq!(spec.volumes.as_ref(), Some(&m.spec.volumes));
        let c = &spec.containers[0];
        assert_eq!(c.volume_mounts.as_ref(), Some(&m.spec.volume_mounts));
        assert_eq!(c.env_from.as_ref(), Some(&m.spec.env_from));
        let env = c.env.as_ref().unwrap();
        let token = &env[0];
        assert_eq!(
            (token.name.as_str(), token.value.as_deref()),
            ("HF_TOKEN", None)
        );
        let key = token
            .value_from
            .as_ref()
            .unwrap()
            .secret_key_ref
            .as_ref()
            .unwrap();
        assert_eq!((key.name.as_str(), key.key.as_str()), ("hf", "token"));
        let field = env[1]
            .value_from
            .as_ref()
            .unwrap()
            .field_ref
            .as_ref()
            .unwrap();
        assert_eq!(field.field_path, "metadata.name");
        assert_eq!(
            (env[2].value.as_deref(), env[2].value_from.as_ref()),
            (Some("serve"), None)
        );
        // Still no API credentials in the VM.
        assert_eq!(spec.automount_service_account_token, Some(false));
        assert_eq!(
            pod.annotations()[keys::ANNOTATION_SPEC_DIGEST],
            spec_digest(&m.spec)
        );
    }

    #[test]
    fn a_pod_as_the_api_server_stores_it_still_reflects_its_spec() {
        let m = with_volumes();
        let mut pod = build_pod(&m).unwrap();
        // Defaults the API server fills in must not read as a spec change.
        let spec = pod.spec.as_mut().unwrap();
        let volumes = spec.volumes.as_mut().unwrap();
        volumes[1].secret.as_mut().unwrap().default_mode = Some(420);
        let env = spec.containers[0].env.as_mut().unwrap();
        env[1]
            .value_from
            .as_mut()
            .unwrap()
            .field_ref
            .as_mut()
            .unwrap()
            .api_version = Some("v1".into());
        assert!(reflects_spec(&pod, &m.spec));

        type Change = fn(&mut GpuMachineSpec);
        let cases: [(&str, Change, &str); 5] = [
            (
                "claim",
                |s| {
                    s.volumes[0]
                        .persistent_volume_claim
                        .as_mut()
                        .unwrap()
                        .claim_name = "mistral".into()
                },
                "volumes",
            ),
            (
                "mount",
                |s| s.volume_mounts[0].mount_path = "/weights".into(),
                "volumeMounts",
            ),
            ("envFrom", |s| s.env_from[0].prefix = None, "envFrom"),
            (
                "secret key",
                |s| {
                    s.env[0]
                        .value_from
                        .as_mut()
                        .unwrap()
                        .secret_key_ref
                        .as_mut()
                        .unwrap()
                        .key = "other".into()
                },
                "env",
            ),
            (
                "image and volumes",
                |s| {
                    s.image = "img:2".into();
                    s.volumes.pop();
                    s.volume_mounts.pop();
                },
                "image vllm/vllm-openai:v0.6.0 -> img:2, volumes, volumeMounts",
            ),
        ];
        for (name, change, says) in cases {
            let mut spec = m.spec.clone();
            change(&mut spec);
            assert!(!reflects_spec(&pod, &spec), "{name}");
            assert_eq!(spec_change(&pod, &spec), says, "{name}");
        }
    }

    #[test]
    fn a_pod_built_before_the_digest_reflects_a_spec_without_the_new_fields() {
        let m = placed();
        let mut pod = build_pod(&m).unwrap();
        pod.metadata
            .annotations
            .as_mut()
            .unwrap()
            .remove(keys::ANNOTATION_SPEC_DIGEST);
        // No roll-out of every running machine when the operator is upgraded.
        assert!(reflects_spec(&pod, &m.spec));
        let mut spec = m.spec.clone();
        spec.env[0].value = "4".into();
        assert_eq!(spec_change(&pod, &spec), "env");
        let spec = with_volumes().spec;
        assert!(!reflects_spec(&pod, &spec));
        assert!(spec_change(&pod, &spec).ends_with("env, envFrom, volumes, volumeMounts"));
    }

    #[test]
    fn no_pod_for_a_refused_spec() {
        let mut m = with_volumes();
        m.spec.volumes[1] = serde_json::from_value(
            serde_json::json!({"name": "tls", "hostPath": {"path": "/etc/kubernetes"}}),
        )
        .unwrap();
        let error = build_pod(&m).unwrap_err();
        assert!(
            matches!(&error, PodError::Refused { name, .. } if name == "train"),
            "{error}"
        );
        assert!(
            error.to_string().contains("volume tls is of type hostPath"),
            "{error}"
        );
    }
}
