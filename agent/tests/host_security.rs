//! Process security on the host: the real agent binary (as root, on a unix socket in
//! a temp dir) runs containers whose root is a temp dir holding the host's `/usr`,
//! and the tests read back what the kernel applied: capability sets, uid/gid,
//! no_new_privs, seccomp, pid namespaces. `vm_boot.rs` shows the same in the guest.

// Test helpers outside `#[test]` fns may panic on failure too.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;

use common::*;
use gpuvm_protocol::agent as pb;
use gpuvm_testkit::{Requirement, skip};
use protobuf::MessageField;

/// The agent as root, or `None` after printing SKIPPED.
fn start_agent() -> Option<Agent> {
    if !nix::unistd::geteuid().is_root() {
        skip(
            Requirement::Root,
            "needs root for namespaces, capabilities and uid changes",
        );
        return None;
    }
    Some(spawn_agent())
}

fn bind(destination: &str, options: &[&str]) -> pb::Mount {
    pb::Mount {
        destination: destination.into(),
        type_: "bind".into(),
        source: destination.into(),
        options: options.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

impl Agent {
    /// A fresh rootfs under the agent's temp dir: the host's `/usr` (read-only),
    /// `/etc` (read-only, for `id`), `/dev`, its own `/proc` and a writable `/tmp`.
    fn request(&self, id: &str, process: pb::ProcessSpec) -> pb::CreateProcessRequest {
        let root = self.dir.path().join(id);
        std::fs::create_dir_all(root.join("tmp")).unwrap();
        std::fs::set_permissions(root.join("tmp"), std::fs::Permissions::from_mode(0o1777))
            .unwrap();
        for dir in ["bin", "lib", "lib64", "sbin"] {
            if Path::new("/").join(dir).is_symlink() {
                symlink(format!("usr/{dir}"), root.join(dir)).unwrap();
            }
        }
        pb::CreateProcessRequest {
            container_id: id.into(),
            rootfs: root.display().to_string(),
            process: MessageField::some(process),
            mounts: vec![
                bind("/usr", &["rbind", "ro"]),
                bind("/etc", &["rbind", "ro"]),
                bind("/dev", &["rbind"]),
                pb::Mount {
                    destination: "/proc".into(),
                    type_: "proc".into(),
                    source: "proc".into(),
                    ..Default::default()
                },
            ],
            ..Default::default()
        }
    }

    fn run(&self, req: &pb::CreateProcessRequest) -> (String, String, u32) {
        create_request_and_start(&self.client, req).unwrap();
        let (stdout, stderr, exit) = finish(&self.client, &req.container_id);
        (stdout, stderr, exit.exit_status)
    }
}

fn caps(list: &[&str]) -> pb::Capabilities {
    let names: Vec<String> = list.iter().map(|s| s.to_string()).collect();
    pb::Capabilities {
        bounding: names.clone(),
        effective: names.clone(),
        permitted: names.clone(),
        inheritable: Vec::new(),
        ambient: Vec::new(),
        ..Default::default()
    }
}

const STATUS_LINES: &str = "grep -E '^(CapInh|CapPrm|CapEff|CapBnd|CapAmb|NoNewPrivs|Seccomp):' /proc/self/status | tr -s '\\t ' ' '";

#[test]
fn dropping_every_capability_forbids_mount_and_the_sets_are_exact() {
    let Some(agent) = start_agent() else { return };
    let script =
        format!("{STATUS_LINES}; mkdir -p /tmp/m; mount -t tmpfs t /tmp/m && echo MOUNTED");

    let mut spec = process(&["sh", "-c", &script]);
    spec.capabilities = MessageField::some(caps(&[]));
    let (stdout, stderr, status) = agent.run(&agent.request("nocaps", spec));
    assert!(stdout.contains("CapEff: 0000000000000000"), "{stdout}");
    assert!(stdout.contains("CapPrm: 0000000000000000"), "{stdout}");
    assert!(stdout.contains("CapBnd: 0000000000000000"), "{stdout}");
    assert!(!stdout.contains("MOUNTED"), "{stdout}");
    assert!(
        stderr.contains("ermission denied") || stderr.contains("not permitted"),
        "{stderr}"
    );
    assert_ne!(status, 0);

    // The same container keeping CAP_SYS_ADMIN (21) and CAP_CHOWN (0) may mount:
    // the refusal above came from the capabilities, nothing else.
    let mut spec = process(&["sh", "-c", &script]);
    spec.capabilities = MessageField::some(caps(&["CAP_SYS_ADMIN", "CAP_CHOWN"]));
    let (stdout, stderr, status) = agent.run(&agent.request("sysadmin", spec));
    assert!(stdout.contains("CapEff: 0000000000200001"), "{stdout}");
    assert!(stdout.contains("CapBnd: 0000000000200001"), "{stdout}");
    assert!(stdout.contains("MOUNTED"), "{stdout} {stderr}");
    assert_eq!(status, 0, "{stderr}");
}

#[test]
fn a_non_root_user_keeps_only_ambient_capabilities_and_its_groups_and_umask() {
    let Some(agent) = start_agent() else { return };
    let mut spec = process(&[
        "sh",
        "-c",
        &format!("id -u; id -g; id -G; umask; {STATUS_LINES}"),
    ]);
    spec.uid = 1000;
    spec.gid = 1000;
    spec.additional_gids = vec![44, 1000];
    spec.umask = Some(0o077);
    spec.no_new_privileges = true;
    // CAP_NET_BIND_SERVICE (10) survives the uid change through the ambient set.
    let mut sets = caps(&["CAP_NET_BIND_SERVICE", "CAP_CHOWN"]);
    sets.inheritable = vec!["CAP_NET_BIND_SERVICE".into()];
    sets.ambient = vec!["CAP_NET_BIND_SERVICE".into()];
    spec.capabilities = MessageField::some(sets);
    let (stdout, stderr, status) = agent.run(&agent.request("user1000", spec));
    assert_eq!(status, 0, "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[..4], ["1000", "1000", "1000 44", "0077"], "{stdout}");
    assert!(stdout.contains("CapAmb: 0000000000000400"), "{stdout}");
    assert!(stdout.contains("CapEff: 0000000000000400"), "{stdout}");
    assert!(stdout.contains("CapBnd: 0000000000000401"), "{stdout}");
    assert!(stdout.contains("NoNewPrivs: 1"), "{stdout}");
}

fn deny_mkdir() -> pb::Seccomp {
    pb::Seccomp {
        default_action: "SCMP_ACT_ALLOW".into(),
        syscalls: vec![pb::SeccompSyscall {
            names: vec!["mkdir".into(), "mkdirat".into()],
            action: "SCMP_ACT_ERRNO".into(),
            errno_ret: Some(libc::EPERM as u32),
            ..Default::default()
        }],
        ..Default::default()
    }
}

#[test]
fn a_seccomp_profile_denies_its_syscalls_in_the_container_and_its_execs() {
    let Some(agent) = start_agent() else { return };
    let script =
        format!("{STATUS_LINES}; mkdir /tmp/made && echo MADE; touch /tmp/file && echo TOUCHED");

    // Without no_new_privs (the filter is then loaded while still privileged).
    let mut req = agent.request("seccomp", process(&["sh", "-c", &script]));
    req.seccomp = MessageField::some(deny_mkdir());
    let (stdout, stderr, _) = agent.run(&req);
    assert!(stdout.contains("Seccomp: 2"), "{stdout}");
    assert!(stdout.contains("NoNewPrivs: 0"), "{stdout}");
    assert!(!stdout.contains("MADE"), "{stdout}");
    assert!(stdout.contains("TOUCHED"), "{stdout}");
    assert!(stderr.contains("Operation not permitted"), "{stderr}");

    // With no_new_privs, as non-root, and in an exec of the running container.
    let mut spec = process(&["sleep", "30"]);
    spec.no_new_privileges = true;
    spec.uid = 1000;
    spec.gid = 1000;
    let mut req = agent.request("seccomp-nnp", spec);
    req.seccomp = MessageField::some(deny_mkdir());
    create_request_and_start(&agent.client, &req).unwrap();
    let mut exec = process(&["sh", "-c", &script]);
    exec.uid = 1000;
    exec.gid = 1000;
    exec_and_start(&agent.client, "seccomp-nnp", "e1", exec).unwrap();
    let stdout = String::from_utf8(read_all(&agent.client, "seccomp-nnp", "e1", true)).unwrap();
    let stderr = String::from_utf8(read_all(&agent.client, "seccomp-nnp", "e1", false)).unwrap();
    wait(&agent.client, "seccomp-nnp", "e1");
    assert!(stdout.contains("Seccomp: 2"), "{stdout}");
    assert!(!stdout.contains("MADE"), "{stdout}");
    assert!(stdout.contains("TOUCHED"), "{stdout}");
    assert!(stderr.contains("Operation not permitted"), "{stderr}");
    signal(&agent.client, "seccomp-nnp", 9, true);
    wait(&agent.client, "seccomp-nnp", "");
    delete(&agent.client, "seccomp-nnp", "");

    // An action the agent cannot honour is refused at create, not ignored.
    let mut req = agent.request("notify", process(&["true"]));
    req.seccomp = MessageField::some(pb::Seccomp {
        default_action: "SCMP_ACT_NOTIFY".into(),
        ..Default::default()
    });
    let (code, message) = status_of(agent.client.create_process(ctx(), &req).unwrap_err());
    assert_eq!(code, ttrpc::Code::INVALID_ARGUMENT, "{message}");
    assert!(message.contains("SCMP_ACT_NOTIFY"), "{message}");
}

/// The cmdlines of every process a container's `/proc` shows, one per line.
const LIST_PROCESSES: &str =
    "echo self=$$; for f in /proc/[0-9]*/cmdline; do tr '\\0' ' ' < $f; echo; done";

fn pid_namespace() -> Vec<pb::Namespace> {
    vec![pb::Namespace {
        type_: "pid".into(),
        ..Default::default()
    }]
}

#[test]
fn containers_with_their_own_pid_namespace_do_not_see_each_other() {
    let Some(agent) = start_agent() else { return };
    // A long-running container with a marker in its command line.
    let mut sleeper = agent.request("sleeper", process(&["sleep", "4242"]));
    sleeper.namespaces = pid_namespace();
    create_request_and_start(&agent.client, &sleeper).unwrap();

    // A private pid namespace: pid 1 is the container itself, no sleeper.
    let mut own = agent.request("own", process(&["sh", "-c", LIST_PROCESSES]));
    own.namespaces = pid_namespace();
    let (stdout, stderr, status) = agent.run(&own);
    assert_eq!(status, 0, "{stderr}");
    assert!(stdout.starts_with("self=1\n"), "{stdout}");
    assert!(!stdout.contains("sleep 4242"), "{stdout}");

    // Sharing the pod's (here the host's) pid namespace: the sleeper is visible.
    let shared = agent.request("shared", process(&["sh", "-c", LIST_PROCESSES]));
    let (stdout, stderr, status) = agent.run(&shared);
    assert_eq!(status, 0, "{stderr}");
    assert!(!stdout.starts_with("self=1\n"), "{stdout}");
    assert!(stdout.contains("sleep 4242"), "{stdout}");

    // An exec joins the sleeper's namespace: it sees the sleeper as pid 1.
    exec_and_start(
        &agent.client,
        "sleeper",
        "look",
        process(&["cat", "/proc/1/cmdline"]),
    )
    .unwrap();
    let stdout = read_all(&agent.client, "sleeper", "look", true);
    wait(&agent.client, "sleeper", "look");
    assert_eq!(stdout, b"sleep\x004242\x00");

    signal(&agent.client, "sleeper", 9, false);
    assert_eq!(wait(&agent.client, "sleeper", "").signal, 9);
    delete(&agent.client, "sleeper", "");
}

/// An image that plants symlinks where the agent creates mount points: the paths
/// resolve inside the rootfs (as if it were `/`), never on the host.
#[test]
fn mount_points_resolve_inside_the_rootfs_even_through_absolute_symlinks() {
    let Some(agent) = start_agent() else { return };
    let outside = tempfile::tempdir().unwrap();
    let mut req = agent.request(
        "links",
        process(&[
            "sh",
            "-c",
            "grep -E ' /inside | /tmp/escape' /proc/mounts | cut -d' ' -f2,3",
        ]),
    );
    let root = Path::new(&req.rootfs).to_path_buf();
    // Absolute, to a host directory; and one with `..` past the root.
    symlink(outside.path(), root.join("escape")).unwrap();
    symlink("../../../../../../inside", root.join("link")).unwrap();
    std::fs::create_dir(root.join("inside")).unwrap();
    let tmpfs = |destination: &str| pb::Mount {
        destination: destination.into(),
        type_: "tmpfs".into(),
        source: "tmpfs".into(),
        ..Default::default()
    };
    // `/escape/sub` makes a directory through the link; `/link` mounts on it.
    req.mounts.push(tmpfs("/escape/sub"));
    req.mounts.push(tmpfs("/link"));
    let result = create_request_and_start(&agent.client, &req);
    // Whatever became of the container, nothing was created on the host side.
    assert_eq!(
        std::fs::read_dir(outside.path()).unwrap().count(),
        0,
        "the agent followed a symlink out of the rootfs"
    );
    let (code, message) = status_of(result.unwrap_err());
    // `/escape` resolves to `<rootfs><outside>`, which does not exist in the image.
    assert_eq!(code, ttrpc::Code::INTERNAL, "{message}");
    assert!(message.contains("/escape/sub"), "{message}");
    delete(&agent.client, "links", "");

    // Without the escaping link, `/link` (→ `../../../inside`) is `/inside`.
    let mut req = agent.request(
        "links2",
        process(&[
            "sh",
            "-c",
            "grep -E ' /inside ' /proc/mounts | cut -d' ' -f2,3",
        ]),
    );
    let root = Path::new(&req.rootfs).to_path_buf();
    symlink("../../../../../../inside", root.join("link")).unwrap();
    std::fs::create_dir(root.join("inside")).unwrap();
    req.mounts.push(tmpfs("/link"));
    let (stdout, stderr, status) = agent.run(&req);
    assert_eq!(
        (stdout.as_str(), status),
        ("/inside tmpfs\n", 0),
        "{stderr}"
    );
}
