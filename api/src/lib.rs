//! gpuvm's Kubernetes API: the `GpuMachine`, `GpuNode` and `GpuAllocation` custom resources and the
//! label, annotation and finalizer keys shared by the operator, the node agent and the
//! containerd shim, the one Kubernetes quantity parser, and the in-guest GPU check
//! record the shim writes for the node agent. [`workload`] says which volumes, Secrets
//! and ConfigMaps a machine's container may use.
//!
//! This crate does no I/O. The CRD YAML in `crds/` is generated from these types by the
//! operator's `crdgen` binary, so every field's doc comment becomes the description that
//! `kubectl explain` prints.

pub mod allocation;
pub mod gpu_check;
pub mod keys;
pub mod machine;
pub mod node;
pub mod quantity;
pub mod workload;

pub use allocation::{Clash, DeviceOwner, GpuAllocation, GpuAllocationSpec, MachineRef};
pub use machine::{
    AllocatedGpu, ConditionType, EnvVar, GpuCheckPolicy, GpuMachine, GpuMachineSpec,
    GpuMachineStatus, GpuRequest, GuestResources, MachinePhase, PlacementStrategy, RestartPolicy,
    Termination,
};
pub use node::{GpuDevice, GpuNode, GpuNodeSpec, GpuNodeStatus, IommuMember, MemberRole, NvSwitch};

/// The API group of every gpuvm resource.
pub const GROUP: &str = "gpuvm.dev";
/// The API version served by this crate.
pub const VERSION: &str = "v1alpha1";
