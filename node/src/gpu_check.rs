//! The in-guest GPU check records the shim writes, carried to the API.
//!
//! The record (`/run/gpuvm/gpu-check/<namespace>_<pod name>`: `ok: …` or `failed: …`,
//! then `pod-uid: <uid>`), its default directory and its parser are owned by
//! `gpuvm_api::gpu_check`, shared with the shim that writes them. The shim has no API
//! credentials, so the node agent carries each record to the API: it merge-patches the
//! Pod's `gpuvm.dev/gpu-check` annotation when the value changed (the operator mirrors
//! it into the `GPUReady` condition), emits a Warning Event on the Pod for a failure,
//! and removes records whose Pod no longer exists (or is another Pod of the same name).
//!
//! [`plan_gpu_checks`] decides, as a pure function; [`report_gpu_checks`] does the I/O.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use gpuvm_api::gpu_check::{GpuCheck, GpuCheckRecord};
use gpuvm_api::keys::ANNOTATION_GPU_CHECK;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Resource as _, ResourceExt as _};

use crate::{Error, Result};

pub use gpuvm_api::gpu_check::DEFAULT_GPU_CHECK_DIR;

/// The Event reason for a failed check.
pub const EVENT_REASON_FAILED: &str = "GuestGpuCheckFailed";

/// Reads every record in `dir`, sorted by file name; a missing directory has none.
pub fn read_gpu_checks(dir: &Path) -> Result<Vec<GpuCheckRecord>> {
    let dir_error = |source: io::Error| Error::GpuCheckDir {
        path: dir.to_owned(),
        source,
    };
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => return Err(dir_error(err)),
    };
    let mut records = Vec::new();
    for entry in entries {
        let entry = entry.map_err(dir_error)?;
        let Some(file) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        // A record removed between the listing and the read is simply gone.
        let Ok(text) = fs::read_to_string(entry.path()) else {
            continue;
        };
        if let Some(record) = GpuCheckRecord::parse(&file, &text) {
            records.push(record);
        }
    }
    records.sort_by_key(GpuCheckRecord::file_name);
    Ok(records)
}

/// What the API says about a record's Pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodFacts {
    /// Its UID.
    pub uid: String,
    /// Its current `gpuvm.dev/gpu-check` annotation.
    pub gpu_check: Option<String>,
}

/// One thing to do for a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GpuCheckAction {
    /// Merge-patch the Pod's annotation to `value`; with `event`, also emit a
    /// Warning Event carrying that note.
    Annotate {
        /// The Pod's namespace.
        namespace: String,
        /// The Pod's name.
        name: String,
        /// The new annotation value.
        value: String,
        /// The failure reason, for a Warning Event.
        event: Option<String>,
    },
    /// Remove the record: its Pod is gone.
    Forget {
        /// The record's file name.
        file: String,
    },
}

/// Decides what to do for each record, given the Pods found (`None`: no such Pod):
/// a record whose Pod is gone, or is a newer Pod of the same name (UID differs), is
/// forgotten; a result that differs from the Pod's annotation is written, with an
/// Event when it is a failure; an unchanged one needs nothing.
pub fn plan_gpu_checks(
    records: &[GpuCheckRecord],
    pods: &BTreeMap<String, Option<PodFacts>>,
) -> Vec<GpuCheckAction> {
    let mut actions = Vec::new();
    for record in records {
        let file = record.file_name();
        let pod = pods.get(&file).and_then(Option::as_ref);
        let Some(pod) = pod.filter(|p| record.pod_uid.as_ref().is_none_or(|uid| *uid == p.uid))
        else {
            actions.push(GpuCheckAction::Forget { file });
            continue;
        };
        let value = record.check.to_string();
        if pod.gpu_check.as_deref() == Some(value.as_str()) {
            continue;
        }
        let event = match &record.check {
            GpuCheck::Failed(reason) => Some(reason.clone()),
            GpuCheck::Ok(_) => None,
        };
        actions.push(GpuCheckAction::Annotate {
            namespace: record.namespace.clone(),
            name: record.name.clone(),
            value,
            event,
        });
    }
    actions
}

/// The merge patch that sets the annotation (and touches nothing else).
pub fn annotation_patch(value: &str) -> serde_json::Value {
    serde_json::json!({ "metadata": { "annotations": { ANNOTATION_GPU_CHECK: value } } })
}

/// One pass over the records: read them, look up their Pods, and carry out
/// [`plan_gpu_checks`]. Returns how many actions were taken.
pub async fn report_gpu_checks(
    client: &kube::Client,
    recorder: &Recorder,
    dir: &Path,
) -> Result<usize> {
    let records = read_gpu_checks(dir)?;
    let mut pods: BTreeMap<String, Option<PodFacts>> = BTreeMap::new();
    let mut found: BTreeMap<String, Pod> = BTreeMap::new();
    for record in &records {
        let api: Api<Pod> = Api::namespaced(client.clone(), &record.namespace);
        let pod = api
            .get_opt(&record.name)
            .await
            .map_err(|source| pod_error("read", &record.namespace, &record.name, source))?;
        let facts = pod.as_ref().map(|p| PodFacts {
            uid: p.uid().unwrap_or_default(),
            gpu_check: p.annotations().get(ANNOTATION_GPU_CHECK).cloned(),
        });
        if let Some(pod) = pod {
            found.insert(record.file_name(), pod);
        }
        pods.insert(record.file_name(), facts);
    }
    let actions = plan_gpu_checks(&records, &pods);
    for action in &actions {
        match action {
            GpuCheckAction::Forget { file } => {
                let path: PathBuf = dir.join(file);
                match fs::remove_file(&path) {
                    Err(err) if err.kind() != io::ErrorKind::NotFound => {
                        return Err(Error::GpuCheckDir { path, source: err });
                    }
                    _ => tracing::debug!(record = %file, "GPU check record of a gone Pod removed"),
                }
            }
            GpuCheckAction::Annotate {
                namespace,
                name,
                value,
                event,
            } => {
                let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
                api.patch(
                    name,
                    &PatchParams::default(),
                    &Patch::Merge(annotation_patch(value)),
                )
                .await
                .map_err(|source| pod_error("annotate", namespace, name, source))?;
                tracing::info!(namespace, pod = %name, value, "GPU check reported");
                if let (Some(note), Some(pod)) = (event, found.get(&format!("{namespace}_{name}")))
                {
                    recorder
                        .publish(
                            &Event {
                                type_: EventType::Warning,
                                reason: EVENT_REASON_FAILED.to_owned(),
                                note: Some(note.clone()),
                                action: "CheckGuestGpus".to_owned(),
                                secondary: None,
                            },
                            &pod.object_ref(&()),
                        )
                        .await
                        .map_err(|source| pod_error("emit an Event on", namespace, name, source))?;
                }
            }
        }
    }
    Ok(actions.len())
}

fn pod_error(action: &'static str, namespace: &str, name: &str, source: kube::Error) -> Error {
    Error::Pod {
        action,
        pod: format!("{namespace}/{name}"),
        source: Box::new(source),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn record(file: &str, result: &str, uid: Option<&str>) -> GpuCheckRecord {
        let (namespace, name) = file.split_once('_').unwrap();
        GpuCheckRecord {
            namespace: namespace.into(),
            name: name.into(),
            check: GpuCheck::parse(result).unwrap(),
            pod_uid: uid.map(Into::into),
        }
    }

    fn pod(uid: &str, check: Option<&str>) -> Option<PodFacts> {
        Some(PodFacts {
            uid: uid.into(),
            gpu_check: check.map(Into::into),
        })
    }

    #[test]
    fn reads_a_directory_of_records() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("b_p"), "failed: x\n").unwrap();
        fs::write(dir.path().join("a_p"), "ok: 1 x l4\n").unwrap();
        fs::write(dir.path().join(".a_q.tmp"), "ok").unwrap();
        let files: Vec<String> = read_gpu_checks(dir.path())
            .unwrap()
            .into_iter()
            .map(|r| r.file_name())
            .collect();
        assert_eq!(files, vec!["a_p", "b_p"]);
        assert!(
            read_gpu_checks(&dir.path().join("absent"))
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn planning_table() {
        let ok = "ok: 2 x h100-80gb";
        let failed = "failed: no NVIDIA driver in the guest";
        let annotate =
            |ns: &str, name: &str, value: &str, event: Option<&str>| GpuCheckAction::Annotate {
                namespace: ns.into(),
                name: name.into(),
                value: value.into(),
                event: event.map(Into::into),
            };
        let forget = |file: &str| GpuCheckAction::Forget { file: file.into() };
        type Case<'a> = (
            &'a str,
            GpuCheckRecord,
            Option<PodFacts>,
            Vec<GpuCheckAction>,
        );
        let cases: Vec<Case<'_>> = vec![
            (
                "new ok result",
                record("ns_a", ok, Some("u1")),
                pod("u1", None),
                vec![annotate("ns", "a", ok, None)],
            ),
            (
                "unchanged: nothing",
                record("ns_a", ok, Some("u1")),
                pod("u1", Some(ok)),
                vec![],
            ),
            (
                "failure: annotation and Event",
                record("ns_a", failed, None),
                pod("u1", Some(ok)),
                vec![annotate(
                    "ns",
                    "a",
                    failed,
                    Some("no NVIDIA driver in the guest"),
                )],
            ),
            (
                "Pod gone: forget",
                record("ns_a", ok, None),
                None,
                vec![forget("ns_a")],
            ),
            (
                "another Pod of the same name: forget",
                record("ns_a", ok, Some("old")),
                pod("new", None),
                vec![forget("ns_a")],
            ),
        ];
        for (what, record, facts, want) in cases {
            let pods = BTreeMap::from([(record.file_name(), facts)]);
            assert_eq!(plan_gpu_checks(&[record], &pods), want, "{what}");
        }
    }

    #[test]
    fn the_patch_names_only_the_annotation() {
        assert_eq!(
            annotation_patch("ok: 1 x l4"),
            serde_json::json!({"metadata": {"annotations": {"gpuvm.dev/gpu-check": "ok: 1 x l4"}}})
        );
    }
}
