//! `with-control-plane [--] COMMAND [ARGS...]`: runs COMMAND with `KUBECONFIG` pointing at
//! the harness's API server, then tears it down.
//!
//! The API server comes from the environment exactly as for the e2e tests: an existing
//! cluster (`KUBECONFIG`), or etcd + kube-apiserver (+ kube-controller-manager) started on
//! loopback from `KUBEBUILDER_ASSETS` / `KUBE_APISERVER` + `ETCD`. Where there is none it
//! prints `SKIPPED: ...` and runs COMMAND without `KUBECONFIG` (so COMMAND's own
//! API-server tests skip), or fails when `GPUVM_REQUIRE` names `apiserver`.
//!
//! Used by `charts/tests/run.sh` for the chart's server-side dry-run. The exit status is
//! COMMAND's (128 + signal when a signal ended it).

use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt as _;
use std::process::{Command, ExitCode, ExitStatus};
use std::time::Duration;

use anyhow::{Context as _, bail};
use gpuvm_e2e::{ControlPlane, note};
use tokio::signal::unix::{SignalKind, signal};

const USAGE: &str = "usage: with-control-plane [--] COMMAND [ARGS...]\n\
    Runs COMMAND with KUBECONFIG set to an API server: KUBECONFIG's cluster, or a loopback\n\
    control plane from KUBEBUILDER_ASSETS (or KUBE_APISERVER + ETCD), torn down afterwards.";

fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let command = match parse_args(args) {
        Ok(Some(command)) => command,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("with-control-plane: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("with-control-plane: could not start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(command)) {
        Ok(status) => exit_code(status),
        Err(e) => {
            eprintln!("with-control-plane: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The command to run; `None` for `--help`.
fn parse_args(mut args: Vec<OsString>) -> anyhow::Result<Option<Vec<OsString>>> {
    match args.first().and_then(|a| a.to_str()) {
        Some("-h" | "--help") => return Ok(None),
        Some("--") => {
            args.remove(0);
        }
        Some(flag) if flag.starts_with('-') => bail!("unknown option {flag:?}"),
        _ => {}
    }
    if args.is_empty() {
        bail!("no command given");
    }
    Ok(Some(args))
}

async fn run(command: Vec<OsString>) -> anyhow::Result<ExitStatus> {
    // Starts (or connects to) the control plane; prints SKIPPED, or panics when
    // GPUVM_REQUIRE names apiserver, when there is none.
    let cp = ControlPlane::try_start_for(Some("with-control-plane"))
        .await
        .context("starting the control plane")?;
    let mut cmd = Command::new(&command[0]);
    cmd.args(&command[1..]);
    match &cp {
        Some(cp) => {
            cmd.env("KUBECONFIG", cp.kubeconfig_path());
        }
        None => {
            cmd.env_remove("KUBECONFIG");
        }
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {:?}", command[0]))?;
    let mut term = signal(SignalKind::terminate()).context("handling SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("handling SIGINT")?;
    // Polled rather than waited on a blocking thread, so a signal to this process can
    // still end the child and, through `cp`'s drop, the control plane.
    let status = loop {
        if let Some(status) = child.try_wait().context("waiting for the command")? {
            break status;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            _ = term.recv() => {
                note("with-control-plane: SIGTERM: stopping the command and the control plane");
                // Either it is running and gets killed, or it already exited.
                let _ = child.kill();
                break child.wait().context("waiting for the command")?;
            }
            _ = int.recv() => {
                note("with-control-plane: SIGINT: stopping the command and the control plane");
                let _ = child.kill();
                break child.wait().context("waiting for the command")?;
            }
        }
    };
    drop(cp);
    Ok(status)
}

fn exit_code(status: ExitStatus) -> ExitCode {
    ExitCode::from(shell_status(status))
}

/// The status as a shell reports it: the exit code, or 128 + the signal that ended it.
fn shell_status(status: ExitStatus) -> u8 {
    if let Some(code) = status.code() {
        return u8::try_from(code).unwrap_or(1);
    }
    let signal = status.signal().unwrap_or(0);
    u8::try_from(128 + signal).unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(args: &[&str]) -> Vec<OsString> {
        args.iter().map(OsString::from).collect()
    }

    #[test]
    fn args_take_the_command_after_an_optional_double_dash() {
        assert_eq!(
            parse_args(os(&["--", "pytest", "-q"])).unwrap(),
            Some(os(&["pytest", "-q"]))
        );
        assert_eq!(
            parse_args(os(&["sh", "-c", "true"])).unwrap(),
            Some(os(&["sh", "-c", "true"]))
        );
        // After `--`, options belong to the command.
        assert_eq!(
            parse_args(os(&["--", "--version"])).unwrap(),
            Some(os(&["--version"]))
        );
        assert_eq!(parse_args(os(&["--help"])).unwrap(), None);
        assert!(parse_args(os(&[])).is_err());
        assert!(parse_args(os(&["--"])).is_err());
        assert!(parse_args(os(&["--bogus", "x"])).is_err());
    }

    #[test]
    fn exit_codes_follow_the_shell() {
        assert_eq!(shell_status(ExitStatus::from_raw(3 << 8)), 3);
        // Killed by SIGKILL (9): 137, as a shell reports it.
        assert_eq!(shell_status(ExitStatus::from_raw(9)), 137);
    }
}
