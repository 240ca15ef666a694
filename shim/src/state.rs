//! The task lifecycle as an explicit state machine.
//!
//! ```text
//! Created ──start──▶ Running ──exit──▶ Stopped ──delete──▶ Deleted
//!    │                 │  ▲                ▲
//!    │               pause resume          │
//!    │                 ▼  │                │
//!    │                Paused ────exit──────┘
//!    └──────────────────delete (never started)──▶ Deleted
//! ```
//!
//! Every handler asks [`TaskState::apply`] before it acts, so a bad transition answers
//! `FailedPrecondition` (or `NotFound` for a kill after exit, as runc's shim does and
//! containerd expects) without touching the guest.

use std::fmt;

use crate::error::{Error, Result};

/// Where a task (container or exec process) is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskState {
    /// Created in the guest, not started.
    Created,
    /// Started and not yet exited.
    Running,
    /// Frozen by `Pause`.
    Paused,
    /// Exited; the exit status is known.
    Stopped,
    /// Deleted; only kept until it is removed from the shim's tables.
    Deleted,
}

/// What containerd asks of a task, or what happens to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskAction {
    /// `Start`.
    Start,
    /// `Pause`.
    Pause,
    /// `Resume`.
    Resume,
    /// `Kill` with any signal.
    Kill,
    /// The process exited (seen by the shim, not asked by containerd).
    Exit,
    /// `Delete`.
    Delete,
    /// `Exec` of a new process in this container.
    Exec,
    /// `ResizePty` or `CloseIO`.
    Io,
}

impl fmt::Display for TaskState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TaskState::Created => "created",
            TaskState::Running => "running",
            TaskState::Paused => "paused",
            TaskState::Stopped => "stopped",
            TaskState::Deleted => "deleted",
        })
    }
}

impl fmt::Display for TaskAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TaskAction::Start => "start",
            TaskAction::Pause => "pause",
            TaskAction::Resume => "resume",
            TaskAction::Kill => "kill",
            TaskAction::Exit => "record the exit of",
            TaskAction::Delete => "delete",
            TaskAction::Exec => "exec in",
            TaskAction::Io => "change the stdio of",
        })
    }
}

impl TaskState {
    /// The state after `action`, or the error that containerd should see.
    ///
    /// Actions that don't change the state (kill, exec, io) return the same state when
    /// they are allowed.
    pub fn apply(self, id: &str, action: TaskAction) -> Result<TaskState> {
        use TaskAction as A;
        use TaskState as S;
        let next = match (self, action) {
            (S::Created, A::Start) => S::Running,
            (S::Running, A::Pause) => S::Paused,
            (S::Paused, A::Resume) => S::Running,
            (S::Running | S::Paused, A::Exit) => S::Stopped,
            // A process can die between create and start (e.g. killed): record it.
            (S::Created, A::Exit) => S::Stopped,
            (S::Created | S::Stopped, A::Delete) => S::Deleted,
            (S::Created | S::Running | S::Paused, A::Kill) => self,
            (S::Stopped, A::Kill) => return Err(Error::ProcessFinished(id.to_owned())),
            (S::Created | S::Running | S::Paused, A::Exec) => self,
            (S::Created | S::Running | S::Paused | S::Stopped, A::Io) => self,
            (state, action) => {
                return Err(Error::BadTransition {
                    id: id.to_owned(),
                    state,
                    action,
                });
            }
        };
        Ok(next)
    }

    /// The matching containerd task status.
    pub fn to_status(self) -> containerd_shim::api::Status {
        use containerd_shim::api::Status;
        match self {
            TaskState::Created => Status::CREATED,
            TaskState::Running => Status::RUNNING,
            TaskState::Paused => Status::PAUSED,
            TaskState::Stopped | TaskState::Deleted => Status::STOPPED,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use TaskAction as A;
    use TaskState as S;
    use containerd_shim::protos::ttrpc::Code;

    const ALL_STATES: [S; 5] = [S::Created, S::Running, S::Paused, S::Stopped, S::Deleted];
    const ALL_ACTIONS: [A; 8] = [
        A::Start,
        A::Pause,
        A::Resume,
        A::Kill,
        A::Exit,
        A::Delete,
        A::Exec,
        A::Io,
    ];

    /// The full table: every (state, action) pair and what it gives.
    fn expected(state: S, action: A) -> std::result::Result<S, Code> {
        match (state, action) {
            (S::Created, A::Start) => Ok(S::Running),
            (S::Running, A::Pause) => Ok(S::Paused),
            (S::Paused, A::Resume) => Ok(S::Running),
            (S::Created | S::Running | S::Paused, A::Exit) => Ok(S::Stopped),
            (S::Created | S::Stopped, A::Delete) => Ok(S::Deleted),
            (S::Created | S::Running | S::Paused, A::Kill | A::Exec) => Ok(state),
            (S::Stopped, A::Kill) => Err(Code::NOT_FOUND),
            (S::Created | S::Running | S::Paused | S::Stopped, A::Io) => Ok(state),
            _ => Err(Code::FAILED_PRECONDITION),
        }
    }

    #[test]
    fn transition_table() {
        for state in ALL_STATES {
            for action in ALL_ACTIONS {
                let got = state.apply("c1", action).map_err(|e| e.code());
                assert_eq!(got, expected(state, action), "{state} + {action}");
            }
        }
    }

    #[test]
    fn full_lifecycle() {
        let mut s = S::Created;
        for action in [A::Start, A::Pause, A::Resume, A::Exit, A::Delete] {
            s = s.apply("c1", action).expect("allowed");
        }
        assert_eq!(s, S::Deleted);
    }

    #[test]
    fn deleting_a_running_task_is_a_failed_precondition() {
        let err = S::Running.apply("c1", A::Delete).expect_err("must fail");
        assert_eq!(err.code(), Code::FAILED_PRECONDITION);
        assert_eq!(err.to_string(), "cannot delete c1: it is running");
    }
}
