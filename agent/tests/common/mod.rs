//! Helpers shared by the integration tests: drive a process through the protocol.

#![allow(dead_code)]

pub mod vm;

use std::process::{Child, Command};
use std::time::{Duration, Instant};

use gpuvm_protocol::agent as pb;
use gpuvm_protocol::agent_ttrpc::AgentServiceClient;
use protobuf::MessageField;

/// The real agent binary in process mode, serving on a unix socket in its own temp
/// dir; killed on drop.
pub struct Agent {
    pub child: Child,
    pub client: AgentServiceClient,
    /// Holds the socket; tests put their container roots here too.
    pub dir: tempfile::TempDir,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the agent (`--listen unix://…`) and connects to it.
pub fn spawn_agent() -> Agent {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("agent.sock");
    let address = format!("unix://{}", socket.display());
    let child = Command::new(env!("CARGO_BIN_EXE_gpuvm-agent"))
        .args(["--listen", &address])
        .spawn()
        .expect("start the agent");
    // The socket file appears at bind(), a moment before listen(): retry.
    let deadline = Instant::now() + Duration::from_secs(10);
    let client = loop {
        match ttrpc::Client::connect(&address) {
            Ok(client) => break client,
            Err(e) => {
                assert!(Instant::now() < deadline, "agent did not listen: {e:?}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    };
    Agent {
        child,
        client: AgentServiceClient::new(client),
        dir,
    }
}

/// A context without a deadline (the calls below may block for a while).
pub fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(0)
}

/// A ProcessSpec with a usual PATH.
pub fn process(args: &[&str]) -> pb::ProcessSpec {
    pb::ProcessSpec {
        args: args.iter().map(|s| s.to_string()).collect(),
        env: vec![
            "PATH=/usr/sbin:/usr/bin:/sbin:/bin".into(),
            "GREETING=hello".into(),
        ],
        ..Default::default()
    }
}

/// Creates and starts a container's init process; returns its pid.
pub fn create_and_start(
    client: &AgentServiceClient,
    id: &str,
    rootfs: &str,
    spec: pb::ProcessSpec,
) -> ttrpc::Result<u32> {
    create_request_and_start(
        client,
        &pb::CreateProcessRequest {
            container_id: id.into(),
            rootfs: rootfs.into(),
            process: MessageField::some(spec),
            ..Default::default()
        },
    )
}

/// Creates a container from a full request and starts it; returns its pid.
pub fn create_request_and_start(
    client: &AgentServiceClient,
    req: &pb::CreateProcessRequest,
) -> ttrpc::Result<u32> {
    client.create_process(ctx(), req)?;
    Ok(client
        .start_process(
            ctx(),
            &pb::StartProcessRequest {
                container_id: req.container_id.clone(),
                ..Default::default()
            },
        )?
        .pid)
}

/// Registers an exec in a container and starts it; returns its pid.
pub fn exec_and_start(
    client: &AgentServiceClient,
    container_id: &str,
    exec_id: &str,
    spec: pb::ProcessSpec,
) -> ttrpc::Result<u32> {
    client.exec_process(
        ctx(),
        &pb::ExecProcessRequest {
            container_id: container_id.into(),
            exec_id: exec_id.into(),
            process: MessageField::some(spec),
            ..Default::default()
        },
    )?;
    Ok(client
        .start_process(
            ctx(),
            &pb::StartProcessRequest {
                container_id: container_id.into(),
                exec_id: exec_id.into(),
                ..Default::default()
            },
        )?
        .pid)
}

/// Runs a started container to completion and deletes it: (stdout, stderr, wait
/// response).
pub fn finish(client: &AgentServiceClient, id: &str) -> (String, String, pb::WaitProcessResponse) {
    let stdout = read_all(client, id, "", true);
    let stderr = read_all(client, id, "", false);
    let exit = wait(client, id, "");
    delete(client, id, "");
    (
        String::from_utf8_lossy(&stdout).into_owned(),
        String::from_utf8_lossy(&stderr).into_owned(),
        exit,
    )
}

/// Reads one stream to its end.
pub fn read_all(client: &AgentServiceClient, id: &str, exec_id: &str, stdout: bool) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let req = pb::ReadStreamRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
            ..Default::default()
        };
        let chunk = if stdout {
            client.read_stdout(ctx(), &req)
        } else {
            client.read_stderr(ctx(), &req)
        }
        .expect("read stream");
        out.extend_from_slice(&chunk.data);
        if chunk.eof {
            return out;
        }
    }
}

/// Waits for a process.
pub fn wait(client: &AgentServiceClient, id: &str, exec_id: &str) -> pb::WaitProcessResponse {
    client
        .wait_process(
            ctx(),
            &pb::WaitProcessRequest {
                container_id: id.into(),
                exec_id: exec_id.into(),
                ..Default::default()
            },
        )
        .expect("wait")
}

/// Sends `signal` to a container's init process, or with `all` to all its processes.
pub fn signal(client: &AgentServiceClient, container_id: &str, signal: u32, all: bool) {
    client
        .signal_process(
            ctx(),
            &pb::SignalProcessRequest {
                container_id: container_id.into(),
                signal,
                all,
                ..Default::default()
            },
        )
        .expect("signal");
}

/// Deletes a process (or container).
pub fn delete(client: &AgentServiceClient, id: &str, exec_id: &str) {
    client
        .delete_process(
            ctx(),
            &pb::DeleteProcessRequest {
                container_id: id.into(),
                exec_id: exec_id.into(),
                ..Default::default()
            },
        )
        .expect("delete");
}

/// Runs a container to completion: (stdout, stderr, wait response).
pub fn run(
    client: &AgentServiceClient,
    id: &str,
    rootfs: &str,
    spec: pb::ProcessSpec,
) -> (String, String, pb::WaitProcessResponse) {
    create_and_start(client, id, rootfs, spec).expect("create and start");
    finish(client, id)
}

/// The status code and message of a failed call.
pub fn status_of(error: ttrpc::Error) -> (ttrpc::Code, String) {
    match error {
        ttrpc::Error::RpcStatus(status) => (status.code(), status.message().to_string()),
        other => panic!("expected an RPC status, got {other:?}"),
    }
}
