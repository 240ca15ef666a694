//! Kubernetes volumes reach the guest over virtio-fs, bound (never copied) from the
//! host into the container's `volumes/` directory of the VM's share
//! (`gpuvm_shim::sandbox::volumes`).
//!
//! On the host, without a VM (root): a read-only volume is read-only through the
//! guest's view of the share, its submounts too; a writable one is the host's
//! directory itself; file binds; host-to-guest propagation for `rslave`, none for
//! `rprivate`; symlinks the guest writes into a volume are never followed on the
//! host (`nosymfollow`); sources the shim refuses; and the one cleanup leaves nothing.
//!
//! Through CRI, in a real QEMU guest (`pod_volumes_reach_the_guest…`): the container's
//! `/etc/resolv.conf` (the pod's DNS config), `/etc/hosts` and `/etc/hostname` are
//! the files containerd and kubelet prepared; a read-only mount is `EROFS` in the
//! guest; a Secret laid out by kubelet's atomic writer and swapped on the host is seen
//! updated; an emptyDir written by one container is read by another (and is the
//! host's directory); `/dev/termination-log` reaches the host; the pod's containers
//! share the guest's `/dev/shm`; removing one container unmounts its volumes while
//! the pod runs on. Then the shim is SIGKILLed, and after containerd's
//! cleanup no mount, process or socket is left.

mod common;

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::cri::{
    container_config, create_and_start, exec_sync, kill_shim_then_remove_pod, run_pod,
    sandbox_config, start_cri,
};
use common::share::{ShareFixture, errno, is_mount_point, mount_tmpfs};
use common::{ShimSettings, test_dir};
use gpuvm_shim::sandbox::volumes::{plan_mounts, remove_container_share, share_volumes};
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    ContainerConfig, DnsConfig, Mount, RemoveContainerRequest, StopContainerRequest,
};
use tonic::transport::Channel;

/// An OCI spec with these mounts.
fn spec(mounts: serde_json::Value) -> oci_spec::runtime::Spec {
    serde_json::from_value(serde_json::json!({"ociVersion": "1.1.0", "mounts": mounts}))
        .expect("spec")
}

/// A bind mount as containerd's CRI plugin writes it.
fn bind(destination: &str, source: &Path, options: &[&str]) -> serde_json::Value {
    serde_json::json!({"destination": destination, "type": "bind", "source": source, "options": options})
}

/// Plans `mounts` for container `c1` and binds them into its `volumes/` directory of
/// the fixture's share; returns that directory (the shim's side).
fn share(f: &ShareFixture, mounts: serde_json::Value) -> gpuvm_shim::Result<PathBuf> {
    let plan = plan_mounts(&spec(mounts), "/run/gpuvm/shared/c1/volumes")?;
    let dir = f.share.mounts.join("c1/volumes");
    share_volumes(&plan.binds, &dir, &[&f.share.root, Path::new("/run/gpuvm")])?;
    Ok(dir)
}

/// The one cleanup of container `c1`'s footprint in the share, then `shim delete`'s
/// teardown: nothing of either is left, and the host is as it was.
fn remove_c1_then_clean_up(f: &ShareFixture) {
    let c1 = f.share.mounts.join("c1");
    remove_container_share(&c1);
    assert!(!c1.exists(), "the container's directory is left");
    f.clean_up(&[]);
    f.assert_host_untouched();
}

#[test]
fn volumes_are_the_host_s_own_and_read_only_where_the_spec_says_so() {
    let Some(f) = ShareFixture::new() else {
        return;
    };
    let rootfs = f.mount_rootfs("c1");
    let host = f.dir.path().join("kubelet");
    // A Secret (read-only) with a mount of its own inside, an emptyDir, kubelet's
    // /etc/hosts (a file, writable) and containerd's resolv.conf (read-only).
    let secret = host.join("secret");
    std::fs::create_dir_all(&secret).expect("mkdir");
    std::fs::write(secret.join("token"), "s3cret").expect("write");
    mount_tmpfs(&secret.join("sub"));
    let empty_dir = host.join("empty-dir");
    std::fs::create_dir_all(&empty_dir).expect("mkdir");
    std::fs::write(host.join("etc-hosts"), "127.0.0.1 localhost\n").expect("write");
    std::fs::write(host.join("resolv.conf"), "nameserver 10.96.0.10\n").expect("write");
    share(
        &f,
        serde_json::json!([
            bind("/secret", &secret, &["rbind", "rprivate", "ro"]),
            bind("/cache", &empty_dir, &["rbind", "rprivate", "rw"]),
            bind(
                "/etc/hosts",
                &host.join("etc-hosts"),
                &["rbind", "rprivate", "rw"]
            ),
            bind(
                "/etc/resolv.conf",
                &host.join("resolv.conf"),
                &["rbind", "ro"]
            ),
        ]),
    )
    .expect("share the volumes");

    // What virtiofsd serves the guest.
    let view = f.share.shared.join("c1/volumes");
    let erofs = Some(libc::EROFS);
    assert_eq!(
        std::fs::read_to_string(view.join("0/token")).expect("read"),
        "s3cret"
    );
    assert_eq!(errno(std::fs::write(view.join("0/token"), "x")), erofs);
    assert_eq!(errno(std::fs::write(view.join("0/planted"), "x")), erofs);
    assert_eq!(
        errno(std::fs::write(view.join("0/sub/planted"), "x")),
        erofs,
        "a submount of a read-only volume"
    );
    assert_eq!(
        errno(std::fs::write(view.join("3"), "x")),
        erofs,
        "a read-only file bind"
    );
    // Writable volumes are the host's files, not copies.
    std::fs::write(view.join("1/note"), "from the guest").expect("emptyDir is rw");
    assert_eq!(
        std::fs::read_to_string(empty_dir.join("note")).expect("read"),
        "from the guest"
    );
    std::fs::write(view.join("2"), "10.0.0.1 volpod\n").expect("the hosts file is rw");
    assert_eq!(
        std::fs::read_to_string(host.join("etc-hosts")).expect("read"),
        "10.0.0.1 volpod\n"
    );
    assert!(view.join("2").is_file() && view.join("0").is_dir());

    // The guest writes symlinks into its emptyDir: nothing on the host follows them
    // through the share (nosymfollow), while reading the link itself works.
    symlink("/etc", view.join("1/to-etc")).expect("symlink");
    symlink("/", view.join("1/to-root")).expect("symlink");
    assert_eq!(
        errno(std::fs::read_to_string(view.join("1/to-etc/passwd"))),
        Some(libc::ELOOP)
    );
    assert_eq!(
        errno(std::fs::read_dir(view.join("1/to-root"))),
        Some(libc::ELOOP)
    );
    assert_eq!(
        std::fs::read_link(view.join("1/to-etc")).expect("readlink"),
        Path::new("/etc")
    );

    // The one cleanup: nothing mounted under the container's directory, which is
    // gone; the host's data and its own mount inside the Secret stay.
    remove_c1_then_clean_up(&f);
    assert!(!rootfs.exists());
    assert!(
        is_mount_point(&secret.join("sub")),
        "the host's own mount was unmounted"
    );
    assert_eq!(
        std::fs::read_to_string(secret.join("token")).expect("read"),
        "s3cret"
    );
    assert_eq!(
        std::fs::read_to_string(empty_dir.join("note")).expect("read"),
        "from the guest"
    );
}

#[test]
fn mounts_made_later_on_the_host_reach_an_rslave_volume_only() {
    let Some(f) = ShareFixture::new() else {
        return;
    };
    // A host directory that is a shared mount (what HostToContainer requires).
    let source = f.dir.path().join("host-mount");
    mount_tmpfs(&source);
    nix::mount::mount(
        None::<&str>,
        &source,
        None::<&str>,
        nix::mount::MsFlags::MS_SHARED,
        None::<&str>,
    )
    .expect("make shared");
    share(
        &f,
        serde_json::json!([
            bind("/slave", &source, &["rbind", "rslave"]),
            bind("/private", &source, &["rbind", "rprivate"]),
        ]),
    )
    .expect("share");
    // A mount made after the VM got its volumes (a CSI driver's, say).
    mount_tmpfs(&source.join("late"));
    std::fs::write(source.join("late/file"), "late").expect("write");
    let view = f.share.shared.join("c1/volumes");
    assert_eq!(
        std::fs::read_to_string(view.join("0/late/file")).expect("rslave sees it"),
        "late"
    );
    assert!(
        !view.join("1/late/file").exists(),
        "rprivate must not see it"
    );

    remove_c1_then_clean_up(&f);
    assert!(
        is_mount_point(&source.join("late")),
        "the host's mount was unmounted"
    );
}

#[test]
fn sources_the_shim_refuses() {
    let Some(f) = ShareFixture::new() else {
        return;
    };
    let rootfs = f.mount_rootfs("c1");
    let socket_path = f.dir.path().join("docker.sock");
    let _socket = std::os::unix::net::UnixListener::bind(&socket_path).expect("bind");
    let into_share = f.dir.path().join("into-share");
    symlink(&rootfs, &into_share).expect("symlink");
    let cases: [(PathBuf, &str); 5] = [
        (f.dir.path().join("missing"), "does not exist on the host"),
        (socket_path.clone(), "is neither a file nor a directory"),
        (rootfs.join("bin"), "where guests write"),
        // A symlink into the share is resolved first, then refused.
        (into_share, "where guests write"),
        // No /proc magic links (another process's root, say).
        (
            PathBuf::from("/proc/self/root/etc"),
            "cannot open the source",
        ),
    ];
    for (source, want) in cases {
        let err = share(&f, serde_json::json!([bind("/data", &source, &["rbind"])]))
            .expect_err("refused");
        assert!(
            err.full_message().contains(want),
            "{}: {}",
            source.display(),
            err.full_message()
        );
    }
    remove_c1_then_clean_up(&f);
}

/// `ctr run --mount` (what the demo does): a host file bound read-only and a host
/// directory bound writable reach the container in the VM.
#[test]
fn ctr_run_mounts_reach_the_vm() {
    let Some(s) = common::setup_or_skip() else {
        return;
    };
    let dir = test_dir();
    let image = common::busybox_image(dir.path());
    let containerd = common::start_containerd(
        &s,
        dir.path(),
        &ShimSettings::new(&s),
        &common::Plugins::CtrOnly,
    );
    common::run(containerd.ctr().args(["images", "import"]).arg(&image));
    let file = dir.path().join("from-host.txt");
    std::fs::write(&file, "written on the host").expect("write");
    let out_dir = dir.path().join("out");
    std::fs::create_dir(&out_dir).expect("mkdir");
    let id = format!("gpuvm-test-{}-mounts", std::process::id());
    let out = containerd
        .ctr()
        .args([
            "run",
            "--rm",
            "--runtime",
            "io.containerd.gpuvm.v1",
            "--runtime-config-path",
        ])
        .arg(&containerd.shim_config)
        .arg("--mount")
        .arg(format!(
            "type=bind,src={},dst=/mnt/from-host.txt,options=rbind:ro",
            file.display()
        ))
        .arg("--mount")
        .arg(format!(
            "type=bind,src={},dst=/out,options=rbind:rw",
            out_dir.display()
        ))
        .args([common::IMAGE, &id, "/bin/sh", "-c"])
        .arg("cat /mnt/from-host.txt; echo from-the-vm > /out/note; echo x > /mnt/from-host.txt")
        .output()
        .expect("ctr run");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    let context = || {
        format!(
            "stdout: {stdout}\nstderr: {stderr}\n{}",
            containerd.log_tail()
        )
    };
    assert_eq!(stdout.trim(), "written on the host", "{}", context());
    assert!(stderr.contains("Read-only file system"), "{}", context());
    assert_ne!(out.status.code(), Some(0));
    assert_eq!(
        std::fs::read_to_string(&file).expect("read"),
        "written on the host"
    );
    assert_eq!(
        std::fs::read_to_string(out_dir.join("note")).expect("read"),
        "from-the-vm\n"
    );
    containerd.assert_nothing_left_behind(&[&id]);
}

/// Waits until `cmd` in `container` prints `want` (trimmed); returns how long it took.
async fn wait_for_output(
    client: &mut RuntimeServiceClient<Channel>,
    container: &str,
    cmd: &[&str],
    want: &str,
) -> Duration {
    let started = Instant::now();
    loop {
        let out = exec_sync(client, container, cmd).await;
        let got = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if got == want {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{cmd:?} still prints {got:?}, not {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Output of `cmd` in `container` (stdout, trimmed), asserting it succeeded.
async fn output(
    client: &mut RuntimeServiceClient<Channel>,
    container: &str,
    cmd: &[&str],
) -> String {
    let out = exec_sync(client, container, cmd).await;
    assert_eq!(
        out.exit_code,
        0,
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The stderr of `cmd` in `container`, asserting it failed.
async fn failure(
    client: &mut RuntimeServiceClient<Channel>,
    container: &str,
    cmd: &[&str],
) -> String {
    let out = exec_sync(client, container, cmd).await;
    assert_ne!(out.exit_code, 0, "{cmd:?} succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A CRI mount of `host` at `container`.
fn mount(container: &str, host: &Path, readonly: bool) -> Mount {
    Mount {
        container_path: container.to_owned(),
        host_path: host.display().to_string(),
        readonly,
        ..Default::default()
    }
}

fn with_mounts(name: &str, mounts: Vec<Mount>) -> ContainerConfig {
    ContainerConfig {
        mounts,
        ..container_config(name)
    }
}

/// A Secret volume as kubelet's atomic writer lays it out: the data in a
/// timestamped directory, `..data` a symlink to it, each key a symlink through
/// `..data`.
fn write_secret(dir: &Path, token: &str) {
    std::fs::create_dir_all(dir.join("..2026_12_01_10_00_00.000000001")).expect("mkdir");
    std::fs::write(dir.join("..2026_12_01_10_00_00.000000001/token"), token).expect("write");
    symlink("..2026_12_01_10_00_00.000000001", dir.join("..data")).expect("symlink");
    symlink("..data/token", dir.join("token")).expect("symlink");
}

/// kubelet's update of that Secret: a new timestamped directory, a `..data_tmp` link
/// to it renamed over `..data`, the old directory removed.
fn swap_secret(dir: &Path, token: &str) {
    let new = "..2026_12_01_10_05_00.000000002";
    std::fs::create_dir(dir.join(new)).expect("mkdir");
    std::fs::write(dir.join(new).join("token"), token).expect("write");
    symlink(new, dir.join("..data_tmp")).expect("symlink");
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).expect("rename");
    std::fs::remove_dir_all(dir.join("..2026_12_01_10_00_00.000000001")).expect("rm old");
}

/// The host source of `destination` in container `id`'s OCI spec (what containerd
/// prepared for it).
fn spec_source(containerd: &common::Containerd, id: &str, destination: &str) -> PathBuf {
    let config = containerd.bundle("k8s.io", id).join("config.json");
    let spec: oci_spec::runtime::Spec =
        serde_json::from_slice(&std::fs::read(&config).expect("read the bundle's spec"))
            .expect("spec");
    spec.mounts()
        .iter()
        .flatten()
        .find(|m| m.destination() == Path::new(destination))
        .and_then(|m| m.source().clone())
        .unwrap_or_else(|| panic!("no {destination} mount in {}", config.display()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_volumes_reach_the_guest_and_a_killed_shim_leaves_no_mount() {
    let Some(s) = common::setup_or_skip() else {
        return;
    };
    let dir = test_dir();
    let (containerd, mut client) = start_cri(&s, dir.path(), &ShimSettings::new(&s)).await;
    let log_dir = dir.path().join("pod-logs");
    // What kubelet prepares on the node for the Pod.
    let kubelet = dir.path().join("kubelet");
    let (secret, empty_dir, host_path) = (
        kubelet.join("secret"),
        kubelet.join("cache"),
        kubelet.join("host"),
    );
    for d in [&log_dir, &secret, &empty_dir, &host_path] {
        std::fs::create_dir_all(d).expect("mkdir");
    }
    write_secret(&secret, "token-v1");
    std::fs::write(host_path.join("data.txt"), "from the host").expect("write");
    let etc_hosts = "# Kubernetes-managed hosts file.\n127.0.0.1\tlocalhost\n10.1.2.3\tvolpod\n";
    std::fs::write(kubelet.join("etc-hosts"), etc_hosts).expect("write");
    let termination_log = kubelet.join("termination-log");
    std::fs::write(&termination_log, "").expect("write");

    let pod_name = format!("gpuvm-vol-{}", std::process::id());
    let mut config = sandbox_config(&pod_name, &log_dir);
    config.dns_config = Some(DnsConfig {
        servers: vec!["10.96.0.10".to_owned()],
        searches: vec!["default.svc.cluster.local".to_owned()],
        options: vec!["ndots:5".to_owned()],
    });
    let pod_id = run_pod(&mut client, &config, || containerd.log_tail()).await;
    let reader = with_mounts(
        "reader",
        vec![
            mount("/etc/hosts", &kubelet.join("etc-hosts"), false),
            mount("/var/run/secrets/app", &secret, true),
            mount("/ro", &host_path, true),
            mount("/cache", &empty_dir, false),
            mount("/dev/termination-log", &termination_log, false),
        ],
    );
    let writer = with_mounts("writer", vec![mount("/cache", &empty_dir, false)]);
    let reader = create_and_start(&mut client, &pod_id, &config, reader, || {
        containerd.log_tail()
    })
    .await;
    let writer = create_and_start(&mut client, &pod_id, &config, writer, || {
        containerd.log_tail()
    })
    .await;

    // The files containerd and kubelet prepared, as they are on the host.
    let resolv = output(&mut client, &reader, &["/bin/cat", "/etc/resolv.conf"]).await;
    assert!(
        resolv.lines().any(|l| l == "nameserver 10.96.0.10"),
        "{resolv}"
    );
    let prepared = std::fs::read_to_string(spec_source(&containerd, &reader, "/etc/resolv.conf"))
        .expect("read");
    assert_eq!(resolv, prepared.trim());
    assert_eq!(
        output(&mut client, &reader, &["/bin/cat", "/etc/hosts"]).await,
        etc_hosts.trim()
    );
    assert_eq!(
        output(&mut client, &reader, &["/bin/cat", "/etc/hostname"]).await,
        pod_name
    );

    // Read-only means read-only in the guest.
    assert_eq!(
        output(&mut client, &reader, &["/bin/cat", "/ro/data.txt"]).await,
        "from the host"
    );
    for path in ["/ro/new", "/var/run/secrets/app/token"] {
        let err = failure(
            &mut client,
            &reader,
            &["/bin/sh", "-c", &format!("echo x > {path}")],
        )
        .await;
        assert!(err.contains("Read-only file system"), "{path}: {err}");
    }

    // The termination log is kubelet's file.
    output(
        &mut client,
        &reader,
        &["/bin/sh", "-c", "echo all done > /dev/termination-log"],
    )
    .await;
    assert_eq!(
        std::fs::read_to_string(&termination_log).expect("read"),
        "all done\n"
    );

    // An emptyDir written by one container is read by the other, and is the host's.
    output(
        &mut client,
        &writer,
        &["/bin/sh", "-c", "echo from-writer > /cache/note"],
    )
    .await;
    wait_for_output(
        &mut client,
        &reader,
        &["/bin/cat", "/cache/note"],
        "from-writer",
    )
    .await;
    assert_eq!(
        std::fs::read_to_string(empty_dir.join("note")).expect("read"),
        "from-writer\n"
    );
    // The pod's containers share the guest's /dev/shm.
    output(
        &mut client,
        &writer,
        &["/bin/sh", "-c", "echo shm > /dev/shm/pod-ipc"],
    )
    .await;
    assert_eq!(
        output(&mut client, &reader, &["/bin/cat", "/dev/shm/pod-ipc"]).await,
        "shm"
    );

    // kubelet swaps the Secret: the guest sees the new token.
    let token = ["/bin/cat", "/var/run/secrets/app/token"];
    assert_eq!(output(&mut client, &reader, &token).await, "token-v1");
    swap_secret(&secret, "token-v2");
    let seen = wait_for_output(&mut client, &reader, &token, "token-v2").await;
    println!("SECRET_UPDATE_SEEN_AFTER_MS={}", seen.as_millis());

    // A container's delete unmounts its volumes (and rootfs) while the pod runs on.
    client
        .stop_container(StopContainerRequest {
            container_id: writer.clone(),
            timeout: 0,
        })
        .await
        .expect("StopContainer");
    client
        .remove_container(RemoveContainerRequest {
            container_id: writer.clone(),
        })
        .await
        .expect("RemoveContainer");
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::fs::read_to_string("/proc/self/mountinfo")
        .expect("mountinfo")
        .contains(&format!("/{writer}/"))
    {
        assert!(
            Instant::now() < deadline,
            "the removed container's mounts stay"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(
        output(&mut client, &reader, &["/bin/cat", "/cache/note"]).await,
        "from-writer"
    );

    // The shim dies (SIGKILL) with the volumes mounted; containerd's cleanup runs
    // `shim delete`, then kubelet stops and removes the pod.
    let work_dir = format!("{}/{pod_id}", common::RUN_DIR);
    // The leak checker sees the volume mounts while they are there.
    let volumes = format!("{work_dir}/share/mounts/{reader}/volumes/");
    let seen = containerd.leftovers(&[&pod_id]);
    assert!(
        seen.iter()
            .any(|l| l.starts_with("mount ") && l.contains(&volumes)),
        "the leak checker does not see {volumes}: {seen:#?}"
    );
    kill_shim_then_remove_pod(&mut client, &pod_id, || containerd.log_tail()).await;
    tokio::task::block_in_place(|| {
        containerd.assert_nothing_left_behind(&[&pod_id, &reader, &writer])
    });
    // The volumes' data is the host's and stays.
    assert_eq!(
        std::fs::read_to_string(empty_dir.join("note")).expect("read"),
        "from-writer\n"
    );
    assert_eq!(
        std::fs::read_to_string(secret.join("token")).expect("read"),
        "token-v2"
    );
}
