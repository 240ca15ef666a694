//! The shim's error type and its single mapping onto ttrpc status codes.

use std::path::PathBuf;

use containerd_shim::protos::ttrpc;

use crate::state::{TaskAction, TaskState};

/// Result type of every fallible operation in the shim.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the shim.
///
/// Messages are sentences that don't repeat their source; the one `From<Error> for
/// ttrpc::Error` impl below decides which ttrpc code containerd sees.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request or annotation carried a value the shim cannot use.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// No task, process or sandbox with that id.
    #[error("{0} not found")]
    NotFound(String),
    /// A task or process with that id exists already.
    #[error("{0} already exists")]
    AlreadyExists(String),
    /// The task lifecycle forbids this action in the task's current state.
    #[error("cannot {action} {id}: it is {state}")]
    BadTransition {
        /// Task or exec id.
        id: String,
        /// The state the task was in.
        state: TaskState,
        /// What was asked.
        action: TaskAction,
    },
    /// The process has exited already (containerd treats this like runc's "not found").
    #[error("process {0} has already finished")]
    ProcessFinished(String),
    /// The guest or the backend cannot do this.
    #[error("not supported by gpuvm: {0}")]
    Unimplemented(String),
    /// The configuration file could not be read.
    #[error("cannot read config file {path}")]
    ConfigRead {
        /// Path of the file.
        path: PathBuf,
        /// Underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The configuration file is not valid TOML for the shim's schema.
    #[error("invalid config file {path}")]
    ConfigParse {
        /// Path of the file.
        path: PathBuf,
        /// Parser error.
        #[source]
        source: toml::de::Error,
    },
    /// A configuration value is out of range or inconsistent.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The VM configuration could not be built from the sandbox's spec.
    #[error("invalid VM configuration: {0}")]
    VmConfig(String),
    /// A system call or file operation failed.
    #[error("{context}")]
    Io {
        /// What the shim was doing.
        context: String,
        /// Underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The hypervisor's REST API answered with an error status.
    #[error("hypervisor API {endpoint} answered {status}: {body}")]
    VmmApi {
        /// API endpoint, e.g. `vm.create`.
        endpoint: String,
        /// HTTP status code.
        status: u16,
        /// Response body.
        body: String,
    },
    /// The hypervisor failed in some other way (process died, protocol error).
    #[error("hypervisor: {0}")]
    Hypervisor(String),
    /// The guest agent cannot be reached.
    #[error("guest agent unavailable: {0}")]
    AgentUnavailable(String),
    /// The guest agent answered with an error.
    #[error("guest agent: {0}")]
    Agent(String),
    /// Something took longer than its configured timeout.
    #[error("timed out after {secs}s waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// The timeout in seconds.
        secs: u64,
    },
    /// A device from `gpuvm.dev/devices` cannot be passed to the VM (or locked for it).
    #[error("cannot pass {device} to the VM")]
    Device {
        /// The device (or devices, for a lock).
        device: String,
        /// Why, from `gpuvm-pci`.
        #[source]
        source: gpuvm_pci::Error,
    },
    /// The devices annotation does not list whole IOMMU groups of GPUs.
    #[error("annotation gpuvm.dev/devices: {0}")]
    DeviceSet(String),
    /// A device failed its reset and still fails it.
    #[error("{0}")]
    DeviceUnhealthy(String),
    /// A device's last VM has not been followed by its reset yet (its shim was killed).
    #[error(
        "cannot pass {device} to the VM: it waits for its reset after sandbox {sandbox}, \
         whose shim ended without one (containerd's `shim delete` for that sandbox resets \
         it; the marker is {})",
        marker.display()
    )]
    ResetPending {
        /// The device.
        device: String,
        /// The sandbox whose VM last had it.
        sandbox: String,
        /// The marker file.
        marker: PathBuf,
    },
    /// The guest cannot do what was asked in its current state (the agent's
    /// `FAILED_PRECONDITION`, e.g. no NVIDIA driver in the guest).
    #[error("guest agent: {0}")]
    GuestPrecondition(String),
    /// An error from the containerd-shim crate (events, mounts, spec parsing).
    #[error("containerd shim runtime")]
    Shim(#[from] containerd_shim::Error),
}

impl Error {
    /// Wraps an I/O error with what the shim was doing.
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let context = context.into();
        move |source| Error::Io { context, source }
    }

    /// The ttrpc code containerd sees for this error.
    pub fn code(&self) -> ttrpc::Code {
        use ttrpc::Code;
        match self {
            Error::InvalidArgument(_)
            | Error::DeviceSet(_)
            | Error::Config(_)
            | Error::ConfigParse { .. }
            | Error::VmConfig(_) => Code::INVALID_ARGUMENT,
            Error::NotFound(_) | Error::ProcessFinished(_) => Code::NOT_FOUND,
            Error::AlreadyExists(_) => Code::ALREADY_EXISTS,
            Error::BadTransition { .. }
            | Error::Device { .. }
            | Error::DeviceUnhealthy(_)
            | Error::ResetPending { .. }
            | Error::GuestPrecondition(_) => Code::FAILED_PRECONDITION,
            Error::Unimplemented(_) => Code::UNIMPLEMENTED,
            Error::AgentUnavailable(_) => Code::UNAVAILABLE,
            Error::Timeout { .. } => Code::DEADLINE_EXCEEDED,
            Error::ConfigRead { .. }
            | Error::Io { .. }
            | Error::VmmApi { .. }
            | Error::Hypervisor(_)
            | Error::Agent(_)
            | Error::Shim(_) => Code::INTERNAL,
        }
    }

    /// The message with its whole source chain, for the ttrpc status.
    pub fn full_message(&self) -> String {
        let mut message = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(cause) = source {
            message.push_str(": ");
            message.push_str(&cause.to_string());
            source = cause.source();
        }
        message
    }
}

/// The one place where shim errors become ttrpc statuses.
impl From<Error> for ttrpc::Error {
    fn from(err: Error) -> Self {
        ttrpc::Error::RpcStatus(ttrpc::get_status(err.code(), err.full_message()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ttrpc::Code;

    fn status_of(err: Error) -> (Code, String) {
        match ttrpc::Error::from(err) {
            ttrpc::Error::RpcStatus(status) => (status.code(), status.message),
            other => panic!("expected an RpcStatus, got {other:?}"),
        }
    }

    #[test]
    fn errors_map_to_ttrpc_codes() {
        let io = || std::io::Error::other("disk on fire");
        let cases: Vec<(Error, Code)> = vec![
            (Error::InvalidArgument("x".into()), Code::INVALID_ARGUMENT),
            (Error::Config("x".into()), Code::INVALID_ARGUMENT),
            (Error::VmConfig("x".into()), Code::INVALID_ARGUMENT),
            (Error::NotFound("task a".into()), Code::NOT_FOUND),
            (Error::ProcessFinished("a".into()), Code::NOT_FOUND),
            (Error::AlreadyExists("a".into()), Code::ALREADY_EXISTS),
            (
                Error::BadTransition {
                    id: "a".into(),
                    state: TaskState::Running,
                    action: TaskAction::Delete,
                },
                Code::FAILED_PRECONDITION,
            ),
            (Error::Unimplemented("pause".into()), Code::UNIMPLEMENTED),
            (Error::AgentUnavailable("x".into()), Code::UNAVAILABLE),
            (
                Error::Timeout {
                    what: "agent".into(),
                    secs: 3,
                },
                Code::DEADLINE_EXCEEDED,
            ),
            (Error::io("writing state")(io()), Code::INTERNAL),
            (
                Error::VmmApi {
                    endpoint: "vm.boot".into(),
                    status: 500,
                    body: "no".into(),
                },
                Code::INTERNAL,
            ),
            (Error::Hypervisor("x".into()), Code::INTERNAL),
            (Error::Agent("x".into()), Code::INTERNAL),
            (Error::DeviceSet("x".into()), Code::INVALID_ARGUMENT),
            (
                Error::DeviceUnhealthy("x".into()),
                Code::FAILED_PRECONDITION,
            ),
            (
                Error::GuestPrecondition("x".into()),
                Code::FAILED_PRECONDITION,
            ),
            (
                Error::Device {
                    device: "0000:18:00.0".into(),
                    source: gpuvm_pci::Error::NotBoundToVfio {
                        address: gpuvm_pci::PciAddress::parse("0000:18:00.0").expect("bdf"),
                        driver: Some("nvidia".into()),
                    },
                },
                Code::FAILED_PRECONDITION,
            ),
        ];
        for (err, want) in cases {
            let shown = err.to_string();
            let (code, _) = status_of(err);
            assert_eq!(code, want, "{shown}");
        }
    }

    #[test]
    fn status_message_carries_the_source_chain() {
        let (_, message) = status_of(Error::io("writing state file")(std::io::Error::other(
            "disk on fire",
        )));
        assert_eq!(message, "writing state file: disk on fire");
    }
}
