//! The Node labels the agent owns, derived from the published status.

use std::collections::BTreeMap;

use gpuvm_api::GpuNodeStatus;
use gpuvm_api::keys::{LABEL_GPU_COUNT, LABEL_GPU_MODEL, LABEL_GPU_NODE};
use serde_json::{Value, json};

/// Every label key the agent writes; it never touches any other.
pub const OWNED_LABELS: [&str; 3] = [LABEL_GPU_NODE, LABEL_GPU_MODEL, LABEL_GPU_COUNT];

/// The labels a node with this status should carry.
///
/// A node with GPUs gets `gpuvm.dev/gpu-node=true`, `gpuvm.dev/gpu.model=<the most
/// common model>` (ties go to the first name in order) and `gpuvm.dev/gpu.count=<healthy
/// GPUs>`. A node without any gets none of them: it offers no gpuvm GPUs.
pub fn labels_for(status: &GpuNodeStatus) -> BTreeMap<String, String> {
    let mut per_model: BTreeMap<&str, usize> = BTreeMap::new();
    for device in &status.devices {
        *per_model.entry(device.model.as_str()).or_default() += 1;
    }
    // max_by_key keeps the last maximum; iterate in reverse so the first name wins ties.
    let Some((model, _)) = per_model.iter().rev().max_by_key(|(_, n)| **n) else {
        return BTreeMap::new();
    };
    let healthy = status.devices.iter().filter(|d| d.healthy).count();
    BTreeMap::from([
        (LABEL_GPU_NODE.to_owned(), "true".to_owned()),
        (LABEL_GPU_MODEL.to_owned(), (*model).to_owned()),
        (LABEL_GPU_COUNT.to_owned(), healthy.to_string()),
    ])
}

/// The JSON merge patch that makes the Node's owned labels equal `labels`: each owned
/// key is set, or removed (`null`) when absent. Other labels are left alone.
pub fn label_patch(labels: &BTreeMap<String, String>) -> Value {
    let entries: serde_json::Map<String, Value> = OWNED_LABELS
        .iter()
        .map(|key| {
            let value = labels
                .get(*key)
                .map_or(Value::Null, |v| Value::String(v.clone()));
            ((*key).to_owned(), value)
        })
        .collect();
    json!({ "metadata": { "labels": entries } })
}
