//! The agent's error type, and its one mapping onto ttrpc status codes.

use std::io;

use ttrpc::Code;

/// Everything that can go wrong in the agent.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request itself is malformed.
    #[error("Invalid request: {0}")]
    InvalidArgument(String),
    /// A container with this id is already registered.
    #[error("Container {0} already exists")]
    ContainerExists(String),
    /// No container with this id.
    #[error("Container {0} does not exist")]
    ContainerNotFound(String),
    /// An exec with this id is already registered in the container.
    #[error("Process {exec_id} already exists in container {container_id}")]
    ProcessExists {
        /// Container id.
        container_id: String,
        /// Exec id.
        exec_id: String,
    },
    /// No such process.
    #[error("Process {exec_id:?} does not exist in container {container_id}")]
    ProcessNotFound {
        /// Container id.
        container_id: String,
        /// Exec id (empty for the init process).
        exec_id: String,
    },
    /// The process is not in a state that allows the call.
    #[error("Process {exec_id:?} of container {container_id} is {actual}, not {expected}")]
    WrongState {
        /// Container id.
        container_id: String,
        /// Exec id (empty for the init process).
        exec_id: String,
        /// The state the call needs.
        expected: &'static str,
        /// The state the process is in.
        actual: &'static str,
    },
    /// The program to run does not exist in the container.
    #[error("Executable {program:?} was not found in the container (PATH {path:?})")]
    ExecutableNotFound {
        /// argv\[0\].
        program: String,
        /// The PATH searched.
        path: String,
    },
    /// fork/exec or a setup step in the child failed.
    #[error("Starting {program:?} failed")]
    Spawn {
        /// argv\[0\].
        program: String,
        /// The errno the child reported.
        #[source]
        source: io::Error,
    },
    /// A step of setting up the container in the child failed (a mount, the
    /// working directory, ...).
    #[error("{step} failed")]
    ContainerSetup {
        /// What the child was doing, e.g. "Mounting devpts at /…/dev/pts".
        step: String,
        /// The errno the child reported.
        #[source]
        source: io::Error,
    },
    /// NVML could not be initialised: no NVIDIA driver (or no libnvidia-ml) in the guest.
    #[error("There is no NVIDIA driver in the guest")]
    NoGpuDriver(#[source] nvml_wrapper::error::NvmlError),
    /// An NVML query failed after initialisation.
    #[error("Querying NVML failed")]
    Nvml(#[source] nvml_wrapper::error::NvmlError),
    /// The call only makes sense in the guest (PID 1), not in process mode on a host.
    #[error("{0} only runs in the guest (as PID 1); in process mode it would change the host")]
    NotInGuest(&'static str),
    /// A system call or file operation failed.
    #[error("{context} failed")]
    Io {
        /// What was being done, e.g. "Mounting /proc".
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

impl Error {
    /// An [`Error::InvalidArgument`].
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::InvalidArgument(message.into())
    }

    /// An [`Error::Io`] with context.
    pub fn io(context: impl Into<String>, source: impl Into<io::Error>) -> Self {
        Self::Io {
            context: context.into(),
            source: source.into(),
        }
    }

    /// The ttrpc status code the caller sees.
    pub fn code(&self) -> Code {
        match self {
            Self::InvalidArgument(_) => Code::INVALID_ARGUMENT,
            Self::ContainerExists(_) | Self::ProcessExists { .. } => Code::ALREADY_EXISTS,
            Self::ContainerNotFound(_) | Self::ProcessNotFound { .. } => Code::NOT_FOUND,
            Self::ExecutableNotFound { .. } => Code::NOT_FOUND,
            Self::WrongState { .. } => Code::FAILED_PRECONDITION,
            Self::NoGpuDriver(_) | Self::NotInGuest(_) => Code::FAILED_PRECONDITION,
            Self::Spawn { .. } | Self::ContainerSetup { .. } | Self::Nvml(_) | Self::Io { .. } => {
                Code::INTERNAL
            }
        }
    }
}

/// Renders an error with its whole source chain, since ttrpc carries only a string.
pub fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

impl From<Error> for ttrpc::Error {
    fn from(error: Error) -> Self {
        ttrpc::Error::RpcStatus(ttrpc::get_status(error.code(), chain(&error)))
    }
}

/// Result of agent operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_codes_with_their_causes() {
        let err = Error::io("Mounting /proc", io::Error::from_raw_os_error(libc::EPERM));
        let ttrpc::Error::RpcStatus(status) = ttrpc::Error::from(err) else {
            panic!("not a status");
        };
        assert_eq!(status.code(), Code::INTERNAL);
        assert!(status.message().starts_with("Mounting /proc failed: "));
        let err = Error::ExecutableNotFound {
            program: "nope".into(),
            path: "/bin".into(),
        };
        assert_eq!(err.code(), Code::NOT_FOUND);
    }
}
