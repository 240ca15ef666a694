//! The real thing: containerd 2.x (from `scripts/containerd-deps.sh`) on private dirs
//! inside `unshare --net`, the `gpuvm` runtime pointing at the built shim, a hand-made
//! busybox OCI image, and `ctr run --runtime io.containerd.gpuvm.v1`. The container
//! runs in a QEMU VM with the guest image from `guest/build.sh`.
//!
//! Needs: root; `GPUVM_CONTAINERD_DIR` (default `/opt/gpuvm-containerd/usr/bin`);
//! `GPUVM_GUEST_DIR` (default `<repo>/.work/guest`) with `vmlinux` and
//! `initramfs.cpio.gz`; `qemu-system-x86_64`, `vhost-device-vsock`, `virtiofsd`
//! (`scripts/vm-deps.sh`); `/bin/busybox`; `unshare`. Prints `SKIPPED: <reason>` and
//! passes when something is missing.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

const SHIM_BIN: &str = env!("CARGO_BIN_EXE_containerd-shim-gpuvm-v1");
const IMAGE: &str = "docker.io/gpuvm/busybox:test";

fn find_binary(env: &str, name: &str) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(env)
        .map(PathBuf::from)
        .filter(|p| p.exists())
    {
        return Some(p);
    }
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("CARGO_HOME") {
        dirs.push(PathBuf::from(home).join("bin"));
    }
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(PathBuf::from(home).join(".cargo/bin"));
    }
    dirs.push(PathBuf::from("/usr/libexec"));
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.exists())
}

struct Setup {
    containerd: PathBuf,
    ctr: PathBuf,
    kernel: PathBuf,
    initramfs: PathBuf,
    qemu: PathBuf,
    vsock: PathBuf,
    virtiofsd: PathBuf,
    guest_dir: PathBuf,
}

fn setup() -> Result<Setup, String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err("needs root".into());
    }
    let cdir = std::env::var_os("GPUVM_CONTAINERD_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/gpuvm-containerd/usr/bin"));
    let containerd = cdir.join("containerd");
    let ctr = cdir.join("ctr");
    if !containerd.exists() || !ctr.exists() {
        return Err(format!(
            "no containerd 2.x in {} (run scripts/containerd-deps.sh or set GPUVM_CONTAINERD_DIR)",
            cdir.display()
        ));
    }
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let guest_dir = std::env::var_os("GPUVM_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo.join(".work/guest"));
    let kernel = guest_dir.join("vmlinux");
    let initramfs = guest_dir.join("initramfs.cpio.gz");
    if !kernel.exists() || !initramfs.exists() {
        return Err(format!(
            "no guest image in {} (run guest/build.sh or set GPUVM_GUEST_DIR)",
            guest_dir.display()
        ));
    }
    let qemu = find_binary("QEMU_BIN", "qemu-system-x86_64")
        .ok_or("qemu-system-x86_64 not found (scripts/vm-deps.sh)")?;
    let vsock = find_binary("VHOST_DEVICE_VSOCK_BIN", "vhost-device-vsock")
        .ok_or("vhost-device-vsock not found (scripts/vm-deps.sh)")?;
    let virtiofsd = find_binary("VIRTIOFSD_BIN", "virtiofsd")
        .ok_or("virtiofsd not found (scripts/vm-deps.sh)")?;
    if !Path::new("/bin/busybox").exists() {
        return Err("/bin/busybox (busybox-static) is missing".into());
    }
    if find_binary("UNSHARE_BIN", "unshare").is_none() {
        return Err("unshare not found".into());
    }
    Ok(Setup {
        containerd,
        ctr,
        kernel,
        initramfs,
        qemu,
        vsock,
        virtiofsd,
        guest_dir: guest_dir.canonicalize().unwrap_or(guest_dir),
    })
}

fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum");
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .expect("digest")
        .to_owned()
}

fn run(cmd: &mut Command) {
    let status = cmd.status().expect("spawn");
    assert!(status.success(), "{cmd:?} failed: {status}");
}

/// Writes blob `bytes`, returns (digest, size).
fn blob(oci: &Path, path: &Path) -> (String, u64) {
    let digest = sha256(path);
    let size = std::fs::metadata(path).expect("stat").len();
    std::fs::copy(path, oci.join("blobs/sha256").join(&digest)).expect("copy blob");
    (format!("sha256:{digest}"), size)
}

/// A one-layer busybox OCI image as an `oci-layout` tarball.
fn busybox_image(dir: &Path) -> PathBuf {
    let rootfs = dir.join("rootfs");
    std::fs::create_dir_all(rootfs.join("bin")).expect("mkdir");
    for d in ["proc", "sys", "dev", "tmp", "etc"] {
        std::fs::create_dir_all(rootfs.join(d)).expect("mkdir");
    }
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).expect("copy busybox");
    for applet in ["sh", "echo", "uname", "sleep", "cat", "ls", "true"] {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet)).expect("symlink");
    }
    let oci = dir.join("oci");
    std::fs::create_dir_all(oci.join("blobs/sha256")).expect("mkdir");
    let layer = dir.join("layer.tar");
    run(Command::new("tar")
        .args(["--owner=0", "--group=0", "--numeric-owner", "-C"])
        .arg(&rootfs)
        .arg("-cf")
        .arg(&layer)
        .arg("."));
    let (layer_digest, layer_size) = blob(&oci, &layer);
    let config = dir.join("config.json");
    std::fs::write(
        &config,
        serde_json::to_vec(&json!({
            "architecture": "amd64",
            "os": "linux",
            "config": {"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"]},
            "rootfs": {"type": "layers", "diff_ids": [layer_digest]}
        }))
        .expect("json"),
    )
    .expect("write config");
    let (config_digest, config_size) = blob(&oci, &config);
    let manifest = dir.join("manifest.json");
    std::fs::write(
        &manifest,
        serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": config_digest, "size": config_size},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                        "digest": layer_digest, "size": layer_size}]
        }))
        .expect("json"),
    )
    .expect("write manifest");
    let (manifest_digest, manifest_size) = blob(&oci, &manifest);
    std::fs::write(
        oci.join("index.json"),
        serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "manifests": [{
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": manifest_digest, "size": manifest_size,
                "annotations": {"io.containerd.image.name": IMAGE,
                                "org.opencontainers.image.ref.name": "test"}
            }]
        }))
        .expect("json"),
    )
    .expect("write index");
    std::fs::write(oci.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).expect("layout");
    let tarball = dir.join("image.tar");
    run(Command::new("tar")
        .arg("-C")
        .arg(&oci)
        .arg("-cf")
        .arg(&tarball)
        .arg("."));
    tarball
}

/// containerd on private dirs; killed (with its shims' leftovers checked) on drop.
struct Containerd {
    child: std::process::Child,
    socket: PathBuf,
    ctr: PathBuf,
    log: PathBuf,
    shim_config: PathBuf,
    /// The VM work dir of the one container this test runs.
    vm_work_dir: String,
    /// containerd's state dir (holds the task bundles).
    state_dir: PathBuf,
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // A failed test may leave its shim and VM running: kill what names our
        // containerd socket (the shim) or this test's VM work dirs.
        let needles = [
            self.socket.display().to_string(),
            format!("{}/", self.vm_work_dir),
        ];
        for needle in needles {
            for entry in processes_mentioning(&needle) {
                if let Some(pid) = entry.split(':').next().and_then(|p| p.parse::<i32>().ok()) {
                    // SAFETY: kill(2) with a pid we just read and SIGKILL has no memory
                    // effects on this process.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        // Then what containerd does after a shim crash: `shim delete` in each bundle,
        // which unmounts and removes what the state file names.
        let tasks = self.state_dir.join("io.containerd.runtime.v2.task/default");
        for bundle in std::fs::read_dir(&tasks).into_iter().flatten().flatten() {
            let bundle = bundle.path();
            let Some(id) = bundle
                .file_name()
                .and_then(|n| n.to_str())
                .map(str::to_owned)
            else {
                continue;
            };
            let _ = Command::new(SHIM_BIN)
                .current_dir(&bundle)
                .args([
                    "-namespace",
                    "default",
                    "-id",
                    &id,
                    "-address",
                    "/nonexistent",
                    "-bundle",
                ])
                .arg(&bundle)
                .arg("delete")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

impl Containerd {
    fn ctr(&self) -> Command {
        let mut cmd = Command::new(&self.ctr);
        cmd.arg("--address")
            .arg(&self.socket)
            .args(["--namespace", "default"]);
        cmd
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

fn start_containerd(s: &Setup, dir: &Path, container_id: &str) -> Containerd {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).expect("mkdir");
    std::os::unix::fs::symlink(SHIM_BIN, bin.join("containerd-shim-gpuvm-v1")).expect("symlink");
    let shim_config = dir.join("shim.toml");
    std::fs::write(
        &shim_config,
        format!(
            r#"backend = "qemu"
log_level = "debug"
[guest]
kernel = "{}"
initramfs = "{}"
default_cpus = 1
default_memory = "512Mi"
[binaries]
qemu = "{}"
vhost_device_vsock = "{}"
virtiofsd = "{}"
[timeouts]
agent_connect_secs = 90
vm_shutdown_secs = 10
"#,
            s.kernel.display(),
            s.initramfs.display(),
            s.qemu.display(),
            s.vsock.display(),
            s.virtiofsd.display()
        ),
    )
    .expect("write shim config");
    let socket = dir.join("containerd.sock");
    let config = dir.join("containerd.toml");
    std::fs::write(
        &config,
        format!(
            r#"version = 3
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.cri.v1.images", "io.containerd.cri.v1.runtime", "io.containerd.internal.v1.tracing", "io.containerd.tracing.processor.v1.otlp"]
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[debug]
  level = "debug"
"#,
            root = dir.join("root").display(),
            state = dir.join("state").display(),
            sock = socket.display()
        ),
    )
    .expect("write containerd config");
    let log = dir.join("containerd.log");
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into())
    );
    let child = Command::new("unshare")
        .args(["--net", "--"])
        .arg(&s.containerd)
        .arg("--config")
        .arg(&config)
        .env("PATH", path)
        .env_remove("GPUVM_SHIM_CONFIG")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log).expect("log"))
        .stderr(
            std::fs::File::options()
                .append(true)
                .open(&log)
                .expect("log"),
        )
        .spawn()
        .expect("start containerd");
    let containerd = Containerd {
        child,
        socket,
        ctr: s.ctr.clone(),
        log,
        shim_config,
        vm_work_dir: format!("/run/gpuvm/{container_id}"),
        state_dir: dir.join("state"),
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !containerd.socket.exists() {
        assert!(
            Instant::now() < deadline,
            "containerd did not start:\n{}",
            containerd.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    containerd
}

/// Processes whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.chars().all(|c| c.is_ascii_digit()))
        else {
            continue;
        };
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if text.contains(needle) {
                found.push(format!("{pid}: {text}"));
            }
        }
    }
    found
}

/// What a container run should show.
const SCRIPT: &str = "echo hello from the vm; uname -r; echo oops >&2; exit 3";

/// A minimal OCI spec: no mounts nested under another mount.
fn minimal_spec(dir: &Path) -> PathBuf {
    let path = dir.join("spec.json");
    // With a spec file ctr takes no image: the root is the unpacked busybox tree.
    let rootfs = dir.join("rootfs");
    let spec = json!({
        "ociVersion": "1.1.0",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": ["/bin/sh", "-c", SCRIPT],
            "env": ["PATH=/bin"],
            "cwd": "/"
        },
        "root": {"path": rootfs},
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "mode=755", "size=65536k"]}
        ],
        "linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}]}
    });
    std::fs::write(&path, serde_json::to_vec(&spec).expect("json")).expect("write spec");
    path
}

/// The minimal spec with `args` as the process.
fn spec_with_args(dir: &Path, args: &[&str]) -> PathBuf {
    let path = minimal_spec(dir);
    let mut spec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).expect("read spec")).expect("spec");
    spec["process"]["args"] = json!(args);
    std::fs::write(&path, serde_json::to_vec(&spec).expect("json")).expect("write spec");
    path
}

/// Starts containerd, imports the image, runs one container with `extra_args`
/// (before the image name), checks its output, exit status and that nothing is
/// left behind.
fn run_container(extra_args: &[&str], with_spec_file: bool) {
    let s = match setup() {
        Ok(s) => s,
        Err(reason) => {
            println!("SKIPPED: {reason}");
            return;
        }
    };
    let dir = tempfile::Builder::new()
        .prefix("gpuvm-ctr-")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let image = busybox_image(dir.path());
    let id = format!(
        "gpuvm-test-{}-{}",
        std::process::id(),
        u8::from(with_spec_file)
    );
    let containerd = start_containerd(&s, dir.path(), &id);
    run(containerd.ctr().args(["images", "import"]).arg(&image));

    let started = Instant::now();
    let mut ctr = containerd.ctr();
    ctr.args(["run", "--rm", "--runtime", "io.containerd.gpuvm.v1"])
        // containerd's ConfigPath runtime option names the shim's config file.
        .arg("--runtime-config-path")
        .arg(&containerd.shim_config)
        .args(extra_args);
    if with_spec_file {
        ctr.arg("--config").arg(minimal_spec(dir.path())).arg(&id);
    } else {
        ctr.args([IMAGE, &id, "/bin/sh", "-c", SCRIPT]);
    }
    let out = ctr.output().expect("ctr run");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let context = || {
        let tail: Vec<String> = containerd
            .log()
            .lines()
            .filter(|l| !l.contains("loading plugin"))
            .map(str::to_owned)
            .collect();
        let start = tail.len().saturating_sub(40);
        format!(
            "stdout:\n{stdout}\nstderr:\n{stderr}\ncontainerd log (tail):\n{}",
            tail[start..].join("\n")
        )
    };
    assert!(stdout.contains("hello from the vm"), "{}", context());
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(s.guest_dir.join("manifest.json")).unwrap_or_default(),
    )
    .unwrap_or_default();
    if let Some(release) = manifest.get("kernel_release").and_then(|r| r.as_str()) {
        assert!(
            stdout.contains(release),
            "not the guest kernel {release}: {}",
            context()
        );
    }
    assert!(
        stderr.contains("oops"),
        "stderr not forwarded: {}",
        context()
    );
    assert_eq!(out.status.code(), Some(3), "exit status: {}", context());
    println!("ctr run in a VM took {:?}", started.elapsed());

    // Nothing left behind: no VM processes, no work dir, no mounts.
    let deadline = Instant::now() + Duration::from_secs(20);
    let work_dir = format!("/run/gpuvm/{id}");
    loop {
        let leftovers = processes_mentioning(&work_dir);
        let mounted = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .contains(&work_dir);
        if leftovers.is_empty() && !mounted && !Path::new(&work_dir).exists() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "left behind: processes {leftovers:?}, mounted {mounted}, dir exists {}\n{}",
            Path::new(&work_dir).exists(),
            context()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn ctr_run_with_a_minimal_spec_runs_in_a_vm_and_leaves_nothing_behind() {
    run_container(&[], true);
}

#[test]
#[ignore = "the guest agent creates mount targets (/dev/pts, /dev/shm, /dev/mqueue) before \
            mounting the /dev tmpfs that hides them, so ctr's default spec fails to start; \
            un-ignore once agent/src/process.rs creates targets after each mount"]
fn ctr_run_with_ctr_default_spec() {
    run_container(&[], false);
}

/// A long-running container: exec into it (stdout, stderr, exit status), read its
/// pids and metrics, kill it, delete it, and check that nothing is left behind.
#[test]
fn exec_kill_and_delete_in_a_running_vm() {
    let s = match setup() {
        Ok(s) => s,
        Err(reason) => {
            println!("SKIPPED: {reason}");
            return;
        }
    };
    let dir = tempfile::Builder::new()
        .prefix("gpuvm-ctr-")
        .tempdir_in("/tmp")
        .expect("tempdir");
    busybox_image(dir.path());
    let id = format!("gpuvm-test-{}-exec", std::process::id());
    let containerd = start_containerd(&s, dir.path(), &id);
    let spec = spec_with_args(dir.path(), &["/bin/sleep", "600"]);
    let context = || {
        let lines: Vec<String> = containerd
            .log()
            .lines()
            .filter(|l| !l.contains("loading plugin"))
            .map(str::to_owned)
            .collect();
        let start = lines.len().saturating_sub(40);
        lines[start..].join("\n")
    };
    let out = containerd
        .ctr()
        .args([
            "run",
            "-d",
            "--runtime",
            "io.containerd.gpuvm.v1",
            "--runtime-config-path",
        ])
        .arg(&containerd.shim_config)
        .arg("--config")
        .arg(&spec)
        .arg(&id)
        .output()
        .expect("ctr run -d");
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        context()
    );

    let exec = containerd
        .ctr()
        .args(["task", "exec", "--exec-id", "e1", &id])
        .args(["/bin/sh", "-c", "echo from exec; echo exec-err >&2; exit 5"])
        .output()
        .expect("ctr task exec");
    let stdout = String::from_utf8_lossy(&exec.stdout);
    let stderr = String::from_utf8_lossy(&exec.stderr);
    assert!(
        stdout.contains("from exec"),
        "stdout {stdout:?} stderr {stderr:?}\n{}",
        context()
    );
    assert!(
        stderr.contains("exec-err"),
        "stderr {stderr:?}\n{}",
        context()
    );
    assert_eq!(exec.status.code(), Some(5), "{}", context());

    let ps = containerd
        .ctr()
        .args(["task", "ps", &id])
        .output()
        .expect("ctr task ps");
    assert!(
        ps.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&ps.stderr),
        context()
    );
    let metrics = containerd
        .ctr()
        .args(["task", "metrics", &id])
        .output()
        .expect("ctr task metrics");
    assert!(
        metrics.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&metrics.stderr),
        context()
    );
    let pause = containerd
        .ctr()
        .args(["task", "pause", &id])
        .output()
        .expect("pause");
    assert!(!pause.status.success(), "pause must be refused");
    assert!(
        String::from_utf8_lossy(&pause.stderr).contains("not supported"),
        "{}",
        String::from_utf8_lossy(&pause.stderr)
    );

    run(containerd
        .ctr()
        .args(["task", "kill", "-s", "SIGKILL", &id]));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = containerd
            .ctr()
            .args(["task", "ls"])
            .output()
            .expect("task ls");
        let list = String::from_utf8_lossy(&out.stdout).into_owned();
        if list
            .lines()
            .any(|l| l.starts_with(&id) && l.contains("STOPPED"))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "task did not stop: {list}\n{}",
            context()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    run(containerd.ctr().args(["task", "delete", &id]));
    run(containerd.ctr().args(["container", "delete", &id]));

    let work_dir = format!("/run/gpuvm/{id}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let leftovers = processes_mentioning(&work_dir);
        let mounted = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .contains(&work_dir);
        if leftovers.is_empty() && !mounted && !Path::new(&work_dir).exists() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "left behind: {leftovers:?} mounted {mounted}\n{}",
            context()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The pod flow CRI drives, through ctr: a pod sandbox task (the VM itself, grouped by
/// `io.kubernetes.cri.sandbox-id`), then an app container that joins the same shim and
/// VM, then stop and removal in CRI's order, and nothing left behind.
#[test]
fn pod_sandbox_and_app_container_share_one_vm() {
    let s = match setup() {
        Ok(s) => s,
        Err(reason) => {
            println!("SKIPPED: {reason}");
            return;
        }
    };
    let dir = tempfile::Builder::new()
        .prefix("gpuvm-ctr-")
        .tempdir_in("/tmp")
        .expect("tempdir");
    busybox_image(dir.path());
    let pod = format!("gpuvm-test-{}-pod", std::process::id());
    let app = format!("{pod}-app");
    let containerd = start_containerd(&s, dir.path(), &pod);
    let context = || {
        let lines: Vec<String> = containerd
            .log()
            .lines()
            .filter(|l| !l.contains("loading plugin"))
            .map(str::to_owned)
            .collect();
        let start = lines.len().saturating_sub(40);
        lines[start..].join("\n")
    };
    let spec_for = |name: &str, kind: &str, args: &[&str]| {
        let sub = dir.path().join(name);
        std::fs::create_dir_all(&sub).expect("mkdir");
        std::fs::create_dir_all(sub.join("rootfs")).expect("mkdir");
        let path = spec_with_args(dir.path(), args);
        let mut spec: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).expect("read")).expect("spec");
        spec["annotations"] = json!({
            "io.kubernetes.cri.container-type": kind,
            "io.kubernetes.cri.sandbox-id": pod,
            "gpuvm.dev/cpus": "1",
            "gpuvm.dev/memory": "384Mi",
        });
        let out = sub.join("spec.json");
        std::fs::write(&out, serde_json::to_vec(&spec).expect("json")).expect("write");
        out
    };
    let run_detached = |id: &str, spec: &Path| {
        let out = containerd
            .ctr()
            .args([
                "run",
                "-d",
                "--runtime",
                "io.containerd.gpuvm.v1",
                "--runtime-config-path",
            ])
            .arg(&containerd.shim_config)
            .arg("--config")
            .arg(spec)
            .arg(id)
            .output()
            .expect("ctr run -d");
        assert!(
            out.status.success(),
            "{id}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            context()
        );
    };

    // The pod sandbox: its task is the VM; its pid is the VMM's.
    run_detached(&pod, &spec_for("pod", "sandbox", &["/bin/sleep", "600"]));
    let vmm_pids = processes_mentioning(&format!("-name gpuvm-{pod}"));
    assert_eq!(vmm_pids.len(), 1, "one VMM for the pod: {vmm_pids:?}");
    let vmm_pid = vmm_pids[0].split(':').next().expect("pid").to_owned();
    let tasks = containerd
        .ctr()
        .args(["task", "ls"])
        .output()
        .expect("task ls");
    let tasks = String::from_utf8_lossy(&tasks.stdout).into_owned();
    assert!(
        tasks
            .lines()
            .any(|l| l.starts_with(&pod) && l.contains(&vmm_pid) && l.contains("RUNNING")),
        "pod task should run with the VMM's pid {vmm_pid}: {tasks}"
    );

    // The app container joins the same shim and VM.
    run_detached(&app, &spec_for("app", "container", &["/bin/sleep", "600"]));
    assert_eq!(
        processes_mentioning("qemu-system-x86_64 -name gpuvm-gpuvm-test-")
            .iter()
            .filter(|p| p.contains(&pod))
            .count(),
        1,
        "the app container must not start a second VM"
    );
    let exec = containerd
        .ctr()
        .args([
            "task",
            "exec",
            "--exec-id",
            "e1",
            &app,
            "/bin/sh",
            "-c",
            "echo in app",
        ])
        .output()
        .expect("exec");
    assert!(
        String::from_utf8_lossy(&exec.stdout).contains("in app"),
        "{}\n{}",
        String::from_utf8_lossy(&exec.stderr),
        context()
    );

    // CRI's stop order: app Kill(15), Kill(9, all), Delete; then the sandbox.
    run(containerd
        .ctr()
        .args(["task", "kill", "-s", "SIGTERM", &app]));
    // If SIGTERM already ended it, SIGKILL answers NotFound ("already finished"), which
    // CRI ignores, as with runc.
    let kill = containerd
        .ctr()
        .args(["task", "kill", "-a", "-s", "SIGKILL", &app])
        .output()
        .expect("kill -a");
    assert!(
        kill.status.success() || String::from_utf8_lossy(&kill.stderr).contains("already finished"),
        "{}",
        String::from_utf8_lossy(&kill.stderr)
    );
    let wait_stopped = |id: &str| {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let out = containerd
                .ctr()
                .args(["task", "ls"])
                .output()
                .expect("task ls");
            let list = String::from_utf8_lossy(&out.stdout).into_owned();
            if list
                .lines()
                .any(|l| l.starts_with(&format!("{id} ")) && l.contains("STOPPED"))
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{id} did not stop: {list}\n{}",
                context()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    wait_stopped(&app);
    run(containerd.ctr().args(["task", "delete", &app]));
    run(containerd.ctr().args(["container", "delete", &app]));
    run(containerd
        .ctr()
        .args(["task", "kill", "-s", "SIGKILL", &pod]));
    wait_stopped(&pod);
    run(containerd.ctr().args(["task", "delete", &pod]));
    run(containerd.ctr().args(["container", "delete", &pod]));

    let work_dir = format!("/run/gpuvm/{pod}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let leftovers = processes_mentioning(&work_dir);
        let shims = processes_mentioning(&format!("-id {pod}"));
        let mounted = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .contains(&work_dir);
        if leftovers.is_empty() && shims.is_empty() && !mounted && !Path::new(&work_dir).exists() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "left behind: {leftovers:?} shims {shims:?} mounted {mounted}\n{}",
            context()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
