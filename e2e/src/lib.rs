//! gpuvm's end-to-end harness: a real kube-apiserver (an existing cluster from
//! `KUBECONFIG`, or etcd + kube-apiserver binaries started on loopback, the envtest
//! convention), the committed CRDs, fake GPU nodes modelled on real machines, and the
//! real `gpuvm-operator` binary run as a child process.
//!
//! Without an API server every test prints `SKIPPED: <reason>` and passes, unless
//! `GPUVM_REQUIRE` names `apiserver` (or `controller-manager`, for the tests that need
//! garbage collection): then it fails (the `gpuvm-testkit` rule). Everything the harness
//! starts (processes, temp dirs) is torn down on drop, panics included.

pub mod assets;
pub mod bench;
pub mod chart;
pub mod cluster;
pub mod control_plane;
pub mod fixtures;
pub mod invariants;
pub mod kubeconfig;
pub mod net;
pub mod operator;
pub mod pki;
pub mod process;
pub mod tokens;

pub use assets::{Assets, ServerSource};
pub use cluster::{Beat, Check, TestEnv, eventually, generation_observed};
pub use control_plane::ControlPlane;
pub use fixtures::HostKind;
pub use gpuvm_testkit::{Requirement, note, skip};
pub use operator::{Memory, Operator, OperatorOptions};
