//! The API side of the agent: the node's `GpuNode` and the Node's labels.

use std::collections::BTreeMap;

use gpuvm_api::{GpuDevice, GpuNode, GpuNodeSpec, GpuNodeStatus};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::{Client, Resource as _};
use serde_json::json;

use crate::labels::label_patch;
use crate::{Error, FIELD_MANAGER, Result};

/// Publishes one node's inventory. The `GpuNode` is cluster-scoped and named like the node.
#[derive(Clone)]
pub struct Publisher {
    gpu_nodes: Api<GpuNode>,
    nodes: Api<Node>,
    node_name: String,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("node_name", &self.node_name)
            .finish_non_exhaustive()
    }
}

impl Publisher {
    /// A publisher for `node_name` through `client`.
    pub fn new(client: Client, node_name: impl Into<String>) -> Self {
        Self {
            gpu_nodes: Api::all(client.clone()),
            nodes: Api::all(client),
            node_name: node_name.into(),
        }
    }

    /// The node's name.
    pub fn node_name(&self) -> &str {
        &self.node_name
    }

    /// The devices the `GpuNode` lists now (empty when it does not exist), so that a GPU
    /// gone from the bus stays listed across passes and agent restarts. Deleting the
    /// `GpuNode` forgets such GPUs.
    pub async fn published_devices(&self) -> Result<Vec<GpuDevice>> {
        let found = self
            .gpu_nodes
            .get_opt(&self.node_name)
            .await
            .map_err(|source| self.error("read", source))?;
        Ok(found
            .and_then(|gn| gn.status)
            .map(|s| s.devices)
            .unwrap_or_default())
    }

    /// Creates the `GpuNode` when missing (spec `nodeName` only; an administrator owns
    /// `unschedulable`), then applies `status` with a fresh heartbeat through the status
    /// subresource, server-side, as field manager `gpuvm-node`.
    pub async fn publish(&self, status: &GpuNodeStatus) -> Result<GpuNode> {
        self.ensure_exists().await?;
        let status = GpuNodeStatus {
            heartbeat: Some(Time(Timestamp::now())),
            ..status.clone()
        };
        let body = json!({
            "apiVersion": GpuNode::api_version(&()),
            "kind": GpuNode::kind(&()),
            "metadata": { "name": self.node_name },
            "status": status,
        });
        self.gpu_nodes
            .patch_status(
                &self.node_name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&body),
            )
            .await
            .map_err(|source| self.error("publish the status of", source))
    }

    async fn ensure_exists(&self) -> Result<()> {
        let exists = self
            .gpu_nodes
            .get_metadata_opt(&self.node_name)
            .await
            .map_err(|source| self.error("read", source))?
            .is_some();
        if exists {
            return Ok(());
        }
        let gpu_node = GpuNode::new(
            &self.node_name,
            GpuNodeSpec {
                node_name: self.node_name.clone(),
                unschedulable: false,
            },
        );
        let params = PostParams {
            field_manager: Some(FIELD_MANAGER.to_owned()),
            ..PostParams::default()
        };
        match self.gpu_nodes.create(&params, &gpu_node).await {
            Ok(_) => {
                tracing::info!(gpu_node = %self.node_name, "created GpuNode");
                Ok(())
            }
            // Another writer (a previous agent) won the race: fine.
            Err(kube::Error::Api(status)) if status.is_already_exists() => Ok(()),
            Err(source) => Err(self.error("create", source)),
        }
    }

    /// Makes the Node's gpuvm labels equal `labels` by a merge patch that names only
    /// the agent's own keys (see [`crate::labels::OWNED_LABELS`]).
    pub async fn label_node(&self, labels: &BTreeMap<String, String>) -> Result<()> {
        let params = PatchParams {
            field_manager: Some(FIELD_MANAGER.to_owned()),
            ..PatchParams::default()
        };
        self.nodes
            .patch(&self.node_name, &params, &Patch::Merge(label_patch(labels)))
            .await
            .map(|_| ())
            .map_err(|source| Error::LabelNode {
                name: self.node_name.clone(),
                source,
            })
    }

    fn error(&self, action: &'static str, source: kube::Error) -> Error {
        Error::GpuNode {
            action,
            name: self.node_name.clone(),
            source,
        }
    }
}
