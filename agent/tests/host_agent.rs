//! The real agent binary, serving on a unix socket on the host, running real
//! processes. Everything but the VM is real here.

// Test helpers outside `#[test]` fns may panic on failure too.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::symlink;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use gpuvm_protocol::agent as pb;
use protobuf::MessageField;

#[test]
fn ping_and_guest_info() {
    let agent = spawn_agent();
    let pong = agent.client.ping(ctx(), &pb::PingRequest::new()).unwrap();
    assert_eq!(pong.agent_version, env!("CARGO_PKG_VERSION"));
    let info = agent
        .client
        .guest_info(ctx(), &pb::GuestInfoRequest::new())
        .unwrap();
    let host = Command::new("uname").arg("-r").output().unwrap();
    assert_eq!(
        info.kernel_release,
        String::from_utf8_lossy(&host.stdout).trim()
    );
    let stats = agent.client.stats(ctx(), &pb::StatsRequest::new()).unwrap();
    assert!(stats.agent_rss_bytes > 0 && stats.mem_total_bytes > 0);
}

#[test]
fn runs_a_process_with_exact_stdio_and_exit() {
    let agent = spawn_agent();
    let before = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64;
    let (stdout, stderr, exit) = run(
        &agent.client,
        "c1",
        "",
        process(&["sh", "-c", "echo $GREETING; echo oops >&2; exit 3"]),
    );
    let after = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64;
    assert_eq!(stdout, "hello\n");
    assert_eq!(stderr, "oops\n");
    assert_eq!((exit.exit_status, exit.signal), (3, 0));
    assert!(exit.pid > 0);
    assert!(before <= exit.exited_at_unix_nanos && exit.exited_at_unix_nanos <= after);
}

#[test]
fn cwd_uid_and_rlimits_apply() {
    let agent = spawn_agent();
    let mut spec = process(&["sh", "-c", "pwd; id -u; id -g; ulimit -n"]);
    spec.cwd = "/tmp".into();
    spec.uid = 65534;
    spec.gid = 65534;
    spec.rlimits = vec![pb::Rlimit {
        type_: "RLIMIT_NOFILE".into(),
        soft: 123,
        hard: 456,
        ..Default::default()
    }];
    let (stdout, _, exit) = run(&agent.client, "c2", "", spec);
    assert_eq!(exit.exit_status, 0);
    assert_eq!(stdout, "/tmp\n65534\n65534\n123\n");
}

#[test]
fn configure_network_checks_its_input_and_never_touches_the_host() {
    let agent = spawn_agent();
    let mut request = pb::ConfigureNetworkRequest {
        hostname: "pod-a".into(),
        ..Default::default()
    };
    request.interfaces.push(pb::NetworkInterface {
        mac: "02:42:0a:58:00".into(),
        name: "eth0".into(),
        ..Default::default()
    });
    let err = agent.client.configure_network(ctx(), &request).unwrap_err();
    let (code, message) = status_of(err);
    assert_eq!(code, ttrpc::Code::INVALID_ARGUMENT);
    assert!(
        message.contains("MAC address \"02:42:0a:58:00\""),
        "{message}"
    );
    // A valid request in process mode is refused: it would reconfigure the host.
    request.interfaces[0].mac = "02:42:0a:58:00:05".into();
    let err = agent.client.configure_network(ctx(), &request).unwrap_err();
    let (code, message) = status_of(err);
    assert_eq!(code, ttrpc::Code::FAILED_PRECONDITION);
    assert!(message.contains("only runs in the guest"), "{message}");
}

#[test]
fn a_missing_command_is_a_clear_not_found() {
    let agent = spawn_agent();
    let err =
        create_and_start(&agent.client, "c3", "", process(&["no-such-command-xyz"])).unwrap_err();
    let (code, message) = status_of(err);
    assert_eq!(code, ttrpc::Code::NOT_FOUND);
    assert!(
        message.contains("\"no-such-command-xyz\" was not found"),
        "{message}"
    );
    // The failed process can be cleaned up, and the id reused.
    delete(&agent.client, "c3", "");
    let (_, _, exit) = run(&agent.client, "c3", "", process(&["true"]));
    assert_eq!(exit.exit_status, 0);
}

#[test]
fn a_failed_setup_step_is_named() {
    let agent = spawn_agent();
    for round in 0..20 {
        let mut spec = process(&["true"]);
        spec.cwd = "/no/such/working/dir".into();
        let id = format!("bad-cwd-{round}");
        let (code, message) =
            status_of(create_and_start(&agent.client, &id, "", spec).unwrap_err());
        assert_eq!(code, ttrpc::Code::INTERNAL, "{message}");
        assert!(
            message.starts_with("Changing to the working directory /no/such/working/dir failed: "),
            "{message}"
        );
        delete(&agent.client, &id, "");
    }
    // The agent is still serving (a failed exec never races the reaper).
    let (stdout, _, _) = run(&agent.client, "after", "", process(&["echo", "ok"]));
    assert_eq!(stdout, "ok\n");
}

#[test]
fn stdin_reaches_the_process() {
    let agent = spawn_agent();
    create_and_start(&agent.client, "cat", "", process(&["cat"])).unwrap();
    let written = agent
        .client
        .write_stdin(
            ctx(),
            &pb::WriteStdinRequest {
                container_id: "cat".into(),
                data: b"piped through\n".to_vec(),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(written.written, 14);
    agent
        .client
        .close_stdin(
            ctx(),
            &pb::CloseStdinRequest {
                container_id: "cat".into(),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(read_all(&agent.client, "cat", "", true), b"piped through\n");
    assert_eq!(wait(&agent.client, "cat", "").exit_status, 0);
}

#[test]
fn signals_stats_list_and_exec() {
    let agent = spawn_agent();
    let pid = create_and_start(
        &agent.client,
        "sleeper",
        "",
        process(&["sh", "-c", "sleep 30 & wait"]),
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(200));

    let stats = agent
        .client
        .process_stats(
            ctx(),
            &pb::ProcessStatsRequest {
                container_id: "sleeper".into(),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(stats.pid, pid);
    assert!(stats.processes >= 2 && stats.rss_bytes > 0, "{stats:?}");

    let list = agent
        .client
        .list_processes(
            ctx(),
            &pb::ListProcessesRequest {
                container_id: "sleeper".into(),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(list.processes.len(), 1);
    assert_eq!(
        list.processes[0].state.enum_value_or_default(),
        pb::ProcessState::PROCESS_STATE_RUNNING
    );
    assert!(
        list.pids.contains(&pid) && list.pids.len() >= 2,
        "{:?}",
        list.pids
    );

    // An exec in the same container.
    exec_and_start(
        &agent.client,
        "sleeper",
        "e1",
        process(&["echo", "from exec"]),
    )
    .unwrap();
    assert_eq!(
        read_all(&agent.client, "sleeper", "e1", true),
        b"from exec\n"
    );
    assert_eq!(wait(&agent.client, "sleeper", "e1").exit_status, 0);

    // Kill everything in the container; the shell dies of SIGKILL.
    signal(&agent.client, "sleeper", 9, true);
    let exit = wait(&agent.client, "sleeper", "");
    assert_eq!((exit.exit_status, exit.signal), (137, 9));
    let running = agent
        .client
        .stats(ctx(), &pb::StatsRequest::new())
        .unwrap()
        .running_processes;
    assert_eq!(running, 0);
    delete(&agent.client, "sleeper", "");
}

#[test]
fn a_terminal_process_gets_a_pty() {
    let agent = spawn_agent();
    let mut spec = process(&["sh", "-c", "tty; stty size"]);
    spec.terminal = true;
    spec.console_size = MessageField::some(pb::ConsoleSize {
        rows: 33,
        columns: 101,
        ..Default::default()
    });
    let (stdout, stderr, exit) = run(&agent.client, "tty", "", spec);
    assert_eq!(exit.exit_status, 0, "{stdout}");
    assert!(stdout.starts_with("/dev/pts/"), "{stdout:?}");
    assert!(stdout.contains("33 101"), "{stdout:?}");
    assert_eq!(stderr, "");
}

/// A container with its own root: the host's /usr bind-mounted into an otherwise
/// empty rootfs that holds a marker file. Needs root (mount namespaces).
#[test]
fn a_container_sees_its_own_root() {
    if !nix::unistd::geteuid().is_root() {
        gpuvm_testkit::skip(
            gpuvm_testkit::Requirement::Root,
            "needs root for mount namespaces",
        );
        return;
    }
    let agent = spawn_agent();
    let rootfs = tempfile::tempdir().unwrap();
    let root = rootfs.path();
    std::fs::write(root.join("marker"), "inside the container\n").unwrap();
    for dir in ["bin", "lib", "lib64", "sbin"] {
        if Path::new("/").join(dir).is_symlink() {
            symlink(format!("usr/{dir}"), root.join(dir)).unwrap();
        }
    }
    let mut spec = process(&[
        "sh",
        "-c",
        "cat /marker; ls /proc/self >/dev/null && echo proc; pwd",
    ]);
    spec.cwd = "/usr".into();
    agent
        .client
        .create_process(
            ctx(),
            &pb::CreateProcessRequest {
                container_id: "rooted".into(),
                rootfs: root.display().to_string(),
                process: MessageField::some(spec),
                mounts: vec![
                    pb::Mount {
                        destination: "/usr".into(),
                        type_: "bind".into(),
                        source: "/usr".into(),
                        options: vec!["rbind".into(), "ro".into()],
                        ..Default::default()
                    },
                    pb::Mount {
                        destination: "/proc".into(),
                        type_: "proc".into(),
                        source: "proc".into(),
                        ..Default::default()
                    },
                    pb::Mount {
                        destination: "/dev".into(),
                        type_: "bind".into(),
                        source: "/dev".into(),
                        options: vec!["rbind".into()],
                        ..Default::default()
                    },
                ],
                ..Default::default()
            },
        )
        .unwrap();
    agent
        .client
        .start_process(
            ctx(),
            &pb::StartProcessRequest {
                container_id: "rooted".into(),
                ..Default::default()
            },
        )
        .unwrap();
    let stdout = String::from_utf8(read_all(&agent.client, "rooted", "", true)).unwrap();
    let stderr = String::from_utf8(read_all(&agent.client, "rooted", "", false)).unwrap();
    assert_eq!(wait(&agent.client, "rooted", "").exit_status, 0, "{stderr}");
    assert_eq!(stdout, "inside the container\nproc\n/usr\n");
    delete(&agent.client, "rooted", "");
    // The host never saw the container's mounts.
    assert!(
        std::fs::read_dir(root.join("proc"))
            .unwrap()
            .next()
            .is_none()
    );
}

#[test]
fn shutdown_stops_the_agent_and_its_processes() {
    let mut agent = spawn_agent();
    let pid = create_and_start(&agent.client, "long", "", process(&["sleep", "60"])).unwrap();
    agent
        .client
        .shutdown(ctx(), &pb::ShutdownRequest::new())
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = agent.child.try_wait().unwrap() {
            assert!(status.success(), "{status}");
            break;
        }
        assert!(Instant::now() < deadline, "agent did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The sleeper was killed (and, its parent gone, reaped by init).
    std::thread::sleep(Duration::from_millis(100));
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    assert!(stat.is_empty() || stat.contains(") Z"), "{stat}");
}

/// The NVML helper of the GPU image prints one JSON object the agent parses: the
/// report where a driver is installed, else NVML's error with exit status 1.
#[test]
fn the_gpu_check_helper_prints_what_the_agent_parses() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gpuvm-gpu-check"))
        .output()
        .expect("run gpuvm-gpu-check");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    match gpuvm_agent::gpu::parse_check_output(&stdout) {
        Ok(report) => {
            assert!(out.status.success());
            println!("NVML: {report:?}");
        }
        Err(error) => {
            assert_eq!(out.status.code(), Some(1), "{stdout}");
            assert!(
                error.starts_with("There is no NVIDIA driver in the guest: "),
                "{error}"
            );
        }
    }
}
