//! gpuvm's node agent (`gpuvm-node`): the DaemonSet that turns a GPU node's sysfs into
//! its `GpuNode` inventory and Node labels.
//!
//! Each pass scans the host with [`gpuvm_pci::scan`], binds passthrough-capable GPUs'
//! IOMMU groups to `vfio-pci` (unless told not to), reads the shim's reset-failure
//! records ([`health`]), and publishes the result.
//!
//! The decisions are pure functions with table tests:
//! - [`inventory_to_status`] turns a scan and what was observed around it
//!   ([`Observations`]) into the `GpuNodeStatus`, health and reasons included;
//! - [`labels_for`] derives the Node labels from that status;
//! - [`planned_actions`] and [`render_table`] describe a pass for `--dry-run`.
//!
//! - [`plan_gpu_checks`] turns the shim's in-guest GPU check records into Pod
//!   annotation patches and Events.
//!
//! I/O stays in thin layers: [`agent`] (sysfs, `/dev/vfio`, the health directory) and
//! [`publish`] (the Kubernetes API).

pub mod agent;
mod error;
pub mod gpu_check;
pub mod health;
pub mod labels;
pub mod publish;
pub mod status;
pub mod table;

pub use agent::{AgentConfig, Pass, observe};
pub use error::{Error, Result};
pub use gpu_check::{DEFAULT_GPU_CHECK_DIR, plan_gpu_checks, report_gpu_checks};
pub use health::{DEFAULT_HEALTH_DIR, read_reset_failures};
pub use labels::{label_patch, labels_for};
pub use publish::Publisher;
pub use status::{Observations, REASON_DISAPPEARED, inventory_to_status};
pub use table::{PlannedAction, planned_actions, planned_bindings, render_table};

/// The field manager of every write the node agent makes.
pub const FIELD_MANAGER: &str = "gpuvm-node";
