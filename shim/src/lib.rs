//! gpuvm's containerd runtime v2 shim (`containerd-shim-gpuvm-v1`).
//!
//! One shim process and one micro-VM per pod sandbox. See `README.md` for what this
//! crate owns and the config file it reads.

pub mod config;
pub mod error;
pub mod state;

pub use error::{Error, Result};
pub mod agent;
pub mod cgroup;
pub mod devices;
pub mod gpu_check;
pub mod host_path;
pub mod hypervisor;
pub mod network;
pub mod numa;
pub mod persist;
pub mod process;
pub mod rootfs;
pub mod sandbox;
pub mod service;
pub mod stdio;
pub mod vsock;
