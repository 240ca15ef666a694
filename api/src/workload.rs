//! What a machine's container takes from its namespace: volumes and their mounts, and
//! environment variables from ConfigMaps, Secrets and the Pod's own fields, with the
//! same meaning as in a Pod, restricted to what a tenant may use.
//!
//! The fields reuse k8s-openapi's types, so a GpuMachine reads like a Pod. Two lines of
//! defence keep a GpuMachine from giving its VM more than its namespace holds:
//!
//! - the CRD schema ([`volumes_schema`] and friends) carries CEL rules, so the API
//!   server refuses a `hostPath` (or any other volume type outside
//!   [`ALLOWED_VOLUME_TYPES`]), a projected service-account token, a cross-namespace
//!   claim data source, a mount of an undeclared volume or a path with `..`;
//! - the operator checks the same with [`GpuMachineSpec::check_workload`] before it
//!   builds a Pod, for an object stored without those rules.
//!
//! Each volume type a GpuMachine may not use stays in the schema as an opaque object,
//! so that the CEL rule can name it; the API server would otherwise drop it silently
//! and the volume would become an `emptyDir`. A type that a newer k8s-openapi adds to
//! `Volume` is refused the same way, with no change here.

use k8s_openapi::api::core::v1::{EnvFromSource, Volume, VolumeMount};
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde_json::{Map, Value, json};

use crate::machine::GpuMachineSpec;

/// The volume types a GpuMachine may use: each reads only objects of the machine's own
/// namespace (or none). `hostPath`, `local`-style node paths and every storage driver
/// reached from the node (`nfs`, `iscsi`, `csi`, `rbd`, `image`, ...) are refused: a
/// GpuMachine must not give its VM what its namespace does not hold. A PVC of such
/// storage is fine, since the cluster admin's PV and StorageClass decide what it reaches.
pub const ALLOWED_VOLUME_TYPES: [&str; 7] = [
    "configMap",
    "secret",
    "emptyDir",
    "persistentVolumeClaim",
    "projected",
    "downwardAPI",
    "ephemeral",
];

/// The most volumes (and volume mounts) a machine may declare.
pub const MAX_VOLUMES: u32 = 64;
/// The most `envFrom` sources a machine may declare.
pub const MAX_ENV_FROM: u32 = 32;
/// The most sources one projected volume may have.
pub const MAX_PROJECTED_SOURCES: u32 = 32;
/// The longest mount path or sub-path accepted.
pub const MAX_PATH: u32 = 4096;

/// A volume name, as Kubernetes requires (a DNS label).
const DNS_LABEL: &str = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";
/// A path with a `..` component.
const DOT_DOT: &str = "(^|/)[.][.](/|$)";

/// Why the operator will not run a machine's spec: what it asks of its namespace is
/// outside what a GpuMachine may use.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum WorkloadError {
    /// A volume of a type outside [`ALLOWED_VOLUME_TYPES`].
    #[error(
        "volume {volume} is of type {kind}, which a GpuMachine may not use (allowed: configMap, secret, emptyDir, persistentVolumeClaim, projected, downwardAPI, ephemeral)"
    )]
    VolumeType {
        /// The volume's name.
        volume: String,
        /// Its type, e.g. `hostPath`.
        kind: String,
    },
    /// A volume that sets more than one type.
    #[error("volume {volume} sets {kinds}: a volume has exactly one type")]
    SeveralTypes {
        /// The volume's name.
        volume: String,
        /// The types it sets, comma-separated.
        kinds: String,
    },
    /// A projected service-account token: the machine's Pod gets no API credentials.
    #[error(
        "volume {0} projects a service-account token, which a GpuMachine may not use: its VM gets no credentials for the cluster's API"
    )]
    ServiceAccountToken(String),
    /// An ephemeral claim whose data source names another namespace.
    #[error("volume {0}: an ephemeral claim's dataSourceRef may not name another namespace")]
    ForeignDataSource(String),
    /// A mount of a volume that `spec.volumes` does not declare.
    #[error("volumeMount {path} names volume {volume}, which spec.volumes does not declare")]
    UndeclaredVolume {
        /// The mount path.
        path: String,
        /// The volume it names.
        volume: String,
    },
    /// A mount path that is relative or has a `..` component.
    #[error("volumeMount {0}: mountPath must be an absolute path without '..'")]
    MountPath(String),
    /// A sub-path that is absolute or has a `..` component.
    #[error("volumeMount {path}: subPath {sub_path} must be a relative path without '..'")]
    SubPath {
        /// The mount path.
        path: String,
        /// The offending sub-path (or sub-path expression).
        sub_path: String,
    },
}

impl GpuMachineSpec {
    /// Checks what the spec takes from its namespace against what a GpuMachine may use,
    /// as the CRD's CEL rules do: the operator builds no Pod for a spec that fails.
    pub fn check_workload(&self) -> Result<(), WorkloadError> {
        self.volumes.iter().try_for_each(check_volume)?;
        self.volume_mounts
            .iter()
            .try_for_each(|m| check_mount(m, &self.volumes))
    }
}

/// The types a volume sets (every field but its name).
pub fn volume_types(volume: &Volume) -> Vec<String> {
    match serde_json::to_value(volume) {
        Ok(Value::Object(fields)) => fields
            .into_iter()
            .map(|(k, _)| k)
            .filter(|k| k != "name")
            .collect(),
        // Unreachable for a derived Serialize; treated as a type nobody allows.
        _ => vec!["unknown".to_owned()],
    }
}

fn check_volume(volume: &Volume) -> Result<(), WorkloadError> {
    let name = volume.name.clone();
    let kinds = volume_types(volume);
    if let Some(kind) = kinds
        .iter()
        .find(|k| !ALLOWED_VOLUME_TYPES.contains(&k.as_str()))
    {
        return Err(WorkloadError::VolumeType {
            volume: name,
            kind: kind.clone(),
        });
    }
    if kinds.len() > 1 {
        return Err(WorkloadError::SeveralTypes {
            volume: name,
            kinds: kinds.join(", "),
        });
    }
    let projects_token = volume
        .projected
        .iter()
        .flat_map(|p| p.sources.iter().flatten())
        .any(|s| s.service_account_token.is_some());
    if projects_token {
        return Err(WorkloadError::ServiceAccountToken(name));
    }
    let foreign = volume
        .ephemeral
        .as_ref()
        .and_then(|e| e.volume_claim_template.as_ref())
        .and_then(|t| t.spec.data_source_ref.as_ref())
        .is_some_and(|r| r.namespace.is_some());
    if foreign {
        return Err(WorkloadError::ForeignDataSource(name));
    }
    Ok(())
}

fn has_dot_dot(path: &str) -> bool {
    path.split('/').any(|part| part == "..")
}

fn check_mount(mount: &VolumeMount, volumes: &[Volume]) -> Result<(), WorkloadError> {
    let path = &mount.mount_path;
    if !volumes.iter().any(|v| v.name == mount.name) {
        return Err(WorkloadError::UndeclaredVolume {
            path: path.clone(),
            volume: mount.name.clone(),
        });
    }
    if !path.starts_with('/') || has_dot_dot(path) {
        return Err(WorkloadError::MountPath(path.clone()));
    }
    for sub in [&mount.sub_path, &mount.sub_path_expr]
        .into_iter()
        .flatten()
    {
        if sub.starts_with('/') || has_dot_dot(sub) {
            return Err(WorkloadError::SubPath {
                path: path.clone(),
                sub_path: sub.clone(),
            });
        }
    }
    Ok(())
}

/// A CEL rule with a fixed message.
fn rule(rule: &str, message: &str) -> Value {
    json!({"rule": rule, "message": message})
}

/// An array of `T` with at most `max_items` items, each carrying `rules`; a list-map
/// keyed by `key` when given (duplicates of the key are then refused).
fn list_of<T: JsonSchema>(
    generator: &mut SchemaGenerator,
    max_items: u32,
    key: Option<&str>,
    rules: Vec<Value>,
    shape: impl FnOnce(&mut Map<String, Value>),
) -> Schema {
    let mut item = T::json_schema(generator);
    if let Some(object) = item.as_object_mut() {
        if let Some(Value::Object(properties)) = object.get_mut("properties") {
            shape(properties);
        }
        object.insert("x-kubernetes-validations".to_owned(), Value::Array(rules));
    }
    let mut list = json_schema!({"type": "array", "maxItems": max_items, "items": item});
    if let Some(key) = key {
        list.insert("x-kubernetes-list-type".to_owned(), json!("map"));
        list.insert("x-kubernetes-list-map-keys".to_owned(), json!([key]));
    }
    list
}

/// Caps a string property's length (CEL's cost estimate needs a bound).
fn cap_length(properties: &mut Map<String, Value>, name: &str, max: u32) {
    if let Some(Value::Object(p)) = properties.get_mut(name) {
        p.insert("maxLength".to_owned(), json!(max));
    }
}

/// The schema of `spec.volumes`: k8s-openapi's `Volume` with the allowed types typed,
/// every other type an opaque object that a CEL rule refuses by name.
pub fn volumes_schema(generator: &mut SchemaGenerator) -> Schema {
    let mut refused = Vec::new();
    let mut rules = Vec::new();
    let shape = |properties: &mut Map<String, Value>| {
        cap_length(properties, "name", 63);
        // An ephemeral claim's metadata takes labels and annotations only (the Pod's
        // validation says so); its full ObjectMeta schema would double the CRD's size.
        // Bounded, so that the CEL rule over the sources has an estimable cost.
        if let Some(Value::Object(sources)) = properties
            .get_mut("projected")
            .and_then(|p| p.pointer_mut("/properties/sources"))
        {
            sources.insert("maxItems".to_owned(), json!(MAX_PROJECTED_SOURCES));
        }
        let template = "/properties/volumeClaimTemplate/properties/metadata";
        if let Some(metadata) = properties
            .get_mut("ephemeral")
            .and_then(|e| e.pointer_mut(template))
        {
            *metadata = json!({
                "type": "object",
                "x-kubernetes-preserve-unknown-fields": true,
                "description": "Labels and annotations for the claim, as in a Pod's ephemeral volume.",
            });
        }
        for (kind, schema) in properties.iter_mut() {
            if kind == "name" || ALLOWED_VOLUME_TYPES.contains(&kind.as_str()) {
                continue;
            }
            refused.push(kind.clone());
            *schema = json!({
                "type": "object",
                "x-kubernetes-preserve-unknown-fields": true,
                "description": format!("Not allowed in a GpuMachine: only {} volumes are.", ALLOWED_VOLUME_TYPES.join(", ")),
            });
        }
    };
    let mut schema = list_of::<Volume>(generator, MAX_VOLUMES, Some("name"), Vec::new(), shape);
    // The rules name the refused types, known only once the schema is shaped.
    let which = refused
        .iter()
        .rfold("'another type'".to_owned(), |rest, kind| {
            format!("has(self.{kind}) ? '{kind}' : {rest}")
        });
    let any_refused = refused
        .iter()
        .map(|kind| format!("has(self.{kind})"))
        .collect::<Vec<_>>()
        .join(" || ");
    rules.push(json!({
        "rule": format!("!({any_refused})"),
        "messageExpression": format!(
            "'volume ' + self.name + ': ' + ({which}) + ' volumes are not allowed in a GpuMachine, only {} volumes (nothing that reaches the node or its storage drivers)'",
            ALLOWED_VOLUME_TYPES.join(", ")
        ),
        "reason": "FieldValueForbidden",
    }));
    let count = ALLOWED_VOLUME_TYPES
        .iter()
        .map(|kind| format!("(has(self.{kind}) ? 1 : 0)"))
        .collect::<Vec<_>>()
        .join(" + ");
    rules.push(rule(
        &format!("{count} <= 1"),
        "a volume has exactly one type (configMap, secret, emptyDir, persistentVolumeClaim, projected, downwardAPI or ephemeral)",
    ));
    rules.push(rule(
        &format!("self.name.matches('{DNS_LABEL}')"),
        "a volume's name must be a DNS label: lowercase letters, digits and '-', such as model-cache",
    ));
    rules.push(rule(
        "!has(self.projected) || !has(self.projected.sources) || self.projected.sources.all(s, !has(s.serviceAccountToken))",
        "a GpuMachine may not project a service-account token: its VM gets no credentials for the cluster's API",
    ));
    rules.push(rule(
        "!has(self.ephemeral) || !has(self.ephemeral.volumeClaimTemplate) || !has(self.ephemeral.volumeClaimTemplate.spec.dataSourceRef) || !has(self.ephemeral.volumeClaimTemplate.spec.dataSourceRef.namespace)",
        "an ephemeral claim's dataSourceRef may not name another namespace",
    ));
    if let Some(Value::Object(item)) = schema.get_mut("items") {
        item.insert("x-kubernetes-validations".to_owned(), Value::Array(rules));
    }
    schema
}

/// The schema of `spec.volumeMounts`: k8s-openapi's `VolumeMount`, keyed by mount path,
/// with absolute mount paths and relative sub-paths, none with `..`.
pub fn volume_mounts_schema(generator: &mut SchemaGenerator) -> Schema {
    let relative = |field: &str| {
        format!(
            "!has(self.{field}) || (!self.{field}.startsWith('/') && !self.{field}.matches('{DOT_DOT}'))"
        )
    };
    let rules = vec![
        rule(
            &format!("self.mountPath.startsWith('/') && !self.mountPath.matches('{DOT_DOT}')"),
            "a volumeMount's mountPath must be an absolute path without '..'",
        ),
        rule(
            &relative("subPath"),
            "a volumeMount's subPath must be a relative path without '..'",
        ),
        rule(
            &relative("subPathExpr"),
            "a volumeMount's subPathExpr must be a relative path without '..'",
        ),
        rule(
            "!has(self.subPath) || !has(self.subPathExpr) || self.subPath == '' || self.subPathExpr == ''",
            "a volumeMount sets subPath or subPathExpr, not both",
        ),
        // A Pod refuses it for a container that is not privileged, as the machine's is.
        rule(
            "!has(self.mountPropagation) || self.mountPropagation != 'Bidirectional'",
            "a volumeMount's mountPropagation cannot be Bidirectional: the machine's container is not privileged",
        ),
    ];
    list_of::<VolumeMount>(generator, MAX_VOLUMES, Some("mountPath"), rules, |p| {
        for field in ["name", "mountPath", "subPath", "subPathExpr"] {
            cap_length(p, field, MAX_PATH);
        }
    })
}

/// The schema of `spec.envFrom`: k8s-openapi's `EnvFromSource`, each naming one
/// ConfigMap or one Secret.
pub fn env_from_schema(generator: &mut SchemaGenerator) -> Schema {
    let rules = vec![rule(
        "has(self.configMapRef) != has(self.secretRef)",
        "an envFrom entry names exactly one of configMapRef or secretRef",
    )];
    list_of::<EnvFromSource>(generator, MAX_ENV_FROM, None, rules, |_| {})
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        EmptyDirVolumeSource, HostPathVolumeSource, PersistentVolumeClaimVolumeSource,
        ProjectedVolumeSource, SecretVolumeSource, ServiceAccountTokenProjection, VolumeProjection,
    };

    fn spec(volumes: Vec<Volume>, mounts: Vec<VolumeMount>) -> GpuMachineSpec {
        let mut spec: GpuMachineSpec = serde_json::from_value(json!({
            "image": "img",
            "gpu": {"model": "l40s", "count": 1},
            "guest": {"cpus": 1, "memory": "1Gi"},
        }))
        .unwrap();
        spec.volumes = volumes;
        spec.volume_mounts = mounts;
        spec
    }

    fn pvc(name: &str) -> Volume {
        Volume {
            name: name.into(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: "models".into(),
                read_only: Some(true),
            }),
            ..Volume::default()
        }
    }

    fn mount(name: &str, path: &str) -> VolumeMount {
        VolumeMount {
            name: name.into(),
            mount_path: path.into(),
            ..VolumeMount::default()
        }
    }

    #[test]
    fn allowed_volumes_and_mounts_pass() {
        let secret = Volume {
            name: "token".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some("hf".into()),
                ..Default::default()
            }),
            ..Volume::default()
        };
        let mut sub = mount("models", "/models/llama");
        sub.sub_path = Some("llama-3/weights".into());
        let s = spec(
            vec![pvc("models"), secret],
            vec![sub, mount("token", "/run/token")],
        );
        assert_eq!(s.check_workload(), Ok(()));
    }

    #[test]
    fn refused_volumes_and_mounts_say_why() {
        let host = Volume {
            name: "root".into(),
            host_path: Some(HostPathVolumeSource {
                path: "/".into(),
                type_: None,
            }),
            ..Volume::default()
        };
        let mut two = pvc("two");
        two.empty_dir = Some(EmptyDirVolumeSource::default());
        let token = Volume {
            name: "sa".into(),
            projected: Some(ProjectedVolumeSource {
                sources: Some(vec![VolumeProjection {
                    service_account_token: Some(ServiceAccountTokenProjection {
                        path: "token".into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Volume::default()
        };
        let mut up = mount("models", "/models");
        up.sub_path = Some("a/../../etc".into());
        let cases: Vec<(GpuMachineSpec, &str)> = vec![
            (spec(vec![host], vec![]), "volume root is of type hostPath"),
            (
                spec(vec![two], vec![]),
                "volume two sets emptyDir, persistentVolumeClaim",
            ),
            (
                spec(vec![token], vec![]),
                "projects a service-account token",
            ),
            (
                spec(vec![pvc("models")], vec![mount("cache", "/cache")]),
                "names volume cache, which spec.volumes does not declare",
            ),
            (
                spec(vec![pvc("models")], vec![mount("models", "models")]),
                "mountPath must be an absolute path",
            ),
            (
                spec(vec![pvc("models")], vec![mount("models", "/a/../etc")]),
                "mountPath must be an absolute path without '..'",
            ),
            (
                spec(vec![pvc("models")], vec![up]),
                "subPath a/../../etc must be",
            ),
        ];
        for (spec, want) in cases {
            let error = spec.check_workload().unwrap_err().to_string();
            assert!(error.contains(want), "want {want:?} in {error:?}");
        }
    }

    #[test]
    fn the_schema_types_allowed_volumes_and_refuses_the_rest_by_name() {
        let mut generator = schemars::generate::SchemaSettings::openapi3()
            .with(|s| s.inline_subschemas = true)
            .into_generator();
        let schema = volumes_schema(&mut generator);
        let item = &schema.as_value()["items"];
        let properties = item["properties"].as_object().unwrap();
        assert!(properties["secret"]["properties"]["secretName"].is_object());
        assert_eq!(
            properties["hostPath"]["x-kubernetes-preserve-unknown-fields"],
            true
        );
        let rules = item["x-kubernetes-validations"].to_string();
        for needle in [
            "has(self.hostPath) ? 'hostPath'",
            "has(self.nfs)",
            "has(self.csi)",
        ] {
            assert!(rules.contains(needle), "{needle} not in {rules}");
        }
        assert!(!rules.contains("'secret' :"), "{rules}");
        assert_eq!(
            schema.as_value()["x-kubernetes-list-map-keys"],
            json!(["name"])
        );
    }
}
