//! The crate's error type.

use std::io;
use std::path::PathBuf;

/// What can go wrong outside the pure core: reading the health directory and talking
/// to the Kubernetes API. Scanning sysfs never fails (problems land in the inventory).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The reset-failure directory exists but could not be listed.
    #[error("could not list the health directory {}", path.display())]
    HealthDir {
        /// The directory (`/run/gpuvm/health` by default).
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },

    /// The GPU check directory (or a record in it) could not be read or removed.
    #[error("could not read or clean the GPU check directory {}", path.display())]
    GpuCheckDir {
        /// The directory or record (`/run/gpuvm/gpu-check` by default).
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },

    /// A request about a Pod's GPU check failed.
    #[error("could not {action} Pod {pod}")]
    Pod {
        /// What was being done: "read", "annotate", "emit an Event on".
        action: &'static str,
        /// `<namespace>/<name>`.
        pod: String,
        /// The API error (boxed: it is large, and rare).
        #[source]
        source: Box<kube::Error>,
    },

    /// A request about the node's `GpuNode` failed.
    #[error("could not {action} GpuNode {name}")]
    GpuNode {
        /// What was being done: "read", "create", "publish the status of".
        action: &'static str,
        /// The GpuNode's name (the node's name).
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },

    /// The Node's labels could not be patched.
    #[error("could not label Node {name}")]
    LabelNode {
        /// The Node's name.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
