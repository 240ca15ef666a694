//! The gpuvm operator: places `GpuMachine`s on GPU nodes, picks the exact GPUs, runs each
//! machine as a Pod whose RuntimeClass boots a micro-VM, and mirrors the Pod's state back
//! into the machine's status.
//!
//! Decisions are pure functions ([`scheduler`], [`pod`], [`status`], [`inventory`]) with
//! table tests; [`controller`] is the thin I/O layer that applies them.

pub mod allocator;
pub mod controller;
pub mod crds;
#[cfg(test)]
mod fixtures;
pub mod inventory;
pub mod leader;
pub mod metrics;
pub mod node_loss;
pub mod pod;
pub mod scheduler;
pub mod status;
