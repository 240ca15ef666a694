//! The gpuvm guest agent: PID 1 inside each gpuvm micro-VM.
//!
//! At boot it mounts the API filesystems, loads the kernel modules shipped in the
//! initramfs, brings up the network and mounts the virtio-fs share ([`boot`]). Then it
//! serves the `gpuvm-protocol` ttrpc service on vsock port 1024 ([`service`]): it
//! runs containers as processes in their own mount namespace ([`runtime`],
//! [`process`]), buffers their output for the shim ([`stream`]), reports exits,
//! stats ([`procfs`]) and GPUs ([`gpu`], [`nvidia`]), gives GPU containers the
//! NVIDIA driver ([`cdi`]), and powers the guest off on request.
//!
//! Outside a VM (tests, development) the same server runs as an ordinary process
//! on a unix socket.

pub mod boot;
pub mod cdi;
pub mod cgroup;
pub mod error;
pub mod gpu;
pub mod mounts;
pub mod network;
pub mod nvidia;
pub mod process;
pub mod procfs;
pub mod runtime;
pub mod security;
pub mod service;
pub mod spec;
pub mod stream;

pub use error::{Error, Result};
