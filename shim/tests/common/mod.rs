//! What the real-containerd tests (`containerd.rs`, `cri.rs`) and the start benchmark
//! share: finding the binaries, a hand-made busybox OCI image, containerd 2.x on
//! private dirs inside `unshare --net`, the shim's config file, and the check that a
//! test left nothing behind. The VM tests (`cloud_hypervisor.rs`, `vm_backends.rs`)
//! take the Cloud Hypervisor binary and the KVM check from here.
//!
//! Needs: root; `GPUVM_CONTAINERD_DIR` (default `/opt/gpuvm-containerd/usr/bin`);
//! `GPUVM_GUEST_DIR` (default `<repo>/.work/guest`) with `vmlinux` and
//! `initramfs.cpio.gz`; `qemu-system-x86_64`, `vhost-device-vsock`, `virtiofsd`
//! (`scripts/vm-deps.sh`); `/bin/busybox`; `unshare`. [`setup`] says what is missing.

// Each test crate uses a different part of this module.
#![allow(dead_code)]

pub mod cri;
pub mod share;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use gpuvm_shim::config::GuestSize;
use gpuvm_shim::hypervisor::{self, VmSpec};
use gpuvm_testkit::Requirement;
use serde_json::json;

/// The shim binary under test.
pub const SHIM_BIN: &str = env!("CARGO_BIN_EXE_containerd-shim-gpuvm-v1");
/// The busybox image's name in containerd.
pub const IMAGE: &str = "docker.io/gpuvm/busybox:test";
/// Where the shim puts each VM's private directory.
pub const RUN_DIR: &str = "/run/gpuvm";

/// `$env` if it names an existing file, else `name` on `PATH`, in cargo's bin dir or
/// `/usr/libexec`.
pub fn find_binary(env: &str, name: &str) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(env)
        .map(PathBuf::from)
        .filter(|p| p.exists())
    {
        return Some(p);
    }
    gpuvm_testkit::find_tool(name)
}

/// `../shared` next to the checkout.
pub fn shared_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared")
}

/// The Cloud Hypervisor binary, or why there is none: `CLOUD_HYPERVISOR_BIN`; else
/// `$HOME/.cache/gpuvm-kube/cloud-hypervisor` (where `scripts/kube-deps.sh` puts it);
/// else `../shared/vmm/cloud-hypervisor.xz`, decompressed with `xz` into that cache.
pub fn find_cloud_hypervisor() -> Result<PathBuf, String> {
    if let Some(bin) = std::env::var_os("CLOUD_HYPERVISOR_BIN").map(PathBuf::from) {
        return if bin.is_file() {
            Ok(bin)
        } else {
            Err(format!(
                "CLOUD_HYPERVISOR_BIN={} does not exist",
                bin.display()
            ))
        };
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    let cached = home.join(".cache/gpuvm-kube/cloud-hypervisor");
    if cached.is_file() {
        return Ok(cached);
    }
    let xz = shared_dir().join("vmm/cloud-hypervisor.xz");
    if !xz.is_file() {
        return Err(format!(
            "no cloud-hypervisor: set CLOUD_HYPERVISOR_BIN, run scripts/kube-deps.sh, or put \
             cloud-hypervisor.xz in {}",
            xz.parent().unwrap_or(Path::new("")).display()
        ));
    }
    decompress(&xz, &cached)?;
    Ok(cached)
}

/// `xz -dc <xz> > <out>`, made executable, renamed into place at the end so that
/// concurrent tests never run a half-written binary.
fn decompress(xz: &Path, out: &Path) -> Result<(), String> {
    let dir = out.parent().ok_or("the cache path has no parent")?;
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let tmp = dir.join(format!("cloud-hypervisor.{}.tmp", std::process::id()));
    let file =
        std::fs::File::create(&tmp).map_err(|e| format!("cannot create {}: {e}", tmp.display()))?;
    let status = Command::new("xz")
        .arg("-dc")
        .arg(xz)
        .stdout(file)
        .status()
        .map_err(|e| format!("cannot run xz to decompress {}: {e}", xz.display()))?;
    if !status.success() {
        let _ = std::fs::remove_file(&tmp);
        return Err(format!("xz -dc {} failed: {status}", xz.display()));
    }
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))
        .and_then(|()| std::fs::rename(&tmp, out))
        .map_err(|e| format!("cannot install {}: {e}", out.display()))
}

/// Whether `/dev/kvm` can be opened for use, or why not.
/// A VM with nothing passed but a kernel and an initramfs: 1 vCPU, 128 MiB, no share,
/// devices or taps. Tests change what they need with `VmSpec { .., ..bare_vm_spec(..) }`.
pub fn bare_vm_spec(id: &str, work_dir: PathBuf, kernel: PathBuf, initramfs: PathBuf) -> VmSpec {
    VmSpec {
        id: id.to_owned(),
        work_dir,
        kernel,
        initramfs,
        cmdline: hypervisor::kernel_cmdline(""),
        size: GuestSize {
            cpus: 1,
            memory_mib: 128,
        },
        shared_dir: None,
        devices: vec![],
        nics: vec![],
        netns: None,
        mmio64_size: None,
        memory: Default::default(),
        cgroups: vec![],
        numa: None,
    }
}

pub fn kvm_usable() -> Result<(), String> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map(drop)
        .map_err(|e| format!("/dev/kvm is not usable ({e}), so Cloud Hypervisor cannot run"))
}

/// The binaries and guest image a test runs.
#[derive(Debug, Clone)]
pub struct Setup {
    pub containerd: PathBuf,
    pub ctr: PathBuf,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub qemu: PathBuf,
    pub vsock: PathBuf,
    pub virtiofsd: PathBuf,
    pub guest_dir: PathBuf,
}

/// Finds everything a real-containerd test needs, or says what is missing and which
/// [`Requirement`] that is.
pub fn setup() -> Result<Setup, (Requirement, String)> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err((Requirement::Root, "needs root".into()));
    }
    let cdir = std::env::var_os("GPUVM_CONTAINERD_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/gpuvm-containerd/usr/bin"));
    let containerd = cdir.join("containerd");
    let ctr = cdir.join("ctr");
    if !containerd.exists() || !ctr.exists() {
        return Err((
            Requirement::Containerd,
            format!(
                "no containerd 2.x in {} (run scripts/containerd-deps.sh or set GPUVM_CONTAINERD_DIR)",
                cdir.display()
            ),
        ));
    }
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let guest_dir = std::env::var_os("GPUVM_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo.join(".work/guest"));
    let kernel = guest_dir.join("vmlinux");
    let initramfs = guest_dir.join("initramfs.cpio.gz");
    // The guest image and the VM tools are what `Requirement::Qemu` names.
    let vm = |reason: &str| (Requirement::Qemu, reason.to_owned());
    if !kernel.exists() || !initramfs.exists() {
        return Err(vm(&format!(
            "no guest image in {} (run guest/build.sh or set GPUVM_GUEST_DIR)",
            guest_dir.display()
        )));
    }
    let qemu = find_binary("QEMU_BIN", "qemu-system-x86_64")
        .ok_or_else(|| vm("qemu-system-x86_64 not found (scripts/vm-deps.sh)"))?;
    let vsock = find_binary("VHOST_DEVICE_VSOCK_BIN", "vhost-device-vsock")
        .ok_or_else(|| vm("vhost-device-vsock not found (scripts/vm-deps.sh)"))?;
    let virtiofsd = find_binary("VIRTIOFSD_BIN", "virtiofsd")
        .ok_or_else(|| vm("virtiofsd not found (scripts/vm-deps.sh)"))?;
    if !Path::new("/bin/busybox").exists() {
        return Err((
            Requirement::Containerd,
            "/bin/busybox (busybox-static) is missing: the test image is made from it".into(),
        ));
    }
    if find_binary("UNSHARE_BIN", "unshare").is_none() {
        return Err((Requirement::Containerd, "unshare not found".into()));
    }
    Ok(Setup {
        containerd,
        ctr,
        kernel: kernel.canonicalize().unwrap_or(kernel),
        initramfs: initramfs.canonicalize().unwrap_or(initramfs),
        qemu,
        vsock,
        virtiofsd,
        guest_dir: guest_dir.canonicalize().unwrap_or(guest_dir),
    })
}

/// The setup, or `None` after `gpuvm_testkit::skip` said what is missing (a failure
/// instead when `GPUVM_REQUIRE` names it).
pub fn setup_or_skip() -> Option<Setup> {
    match setup() {
        Ok(s) => Some(s),
        Err((requirement, reason)) => {
            gpuvm_testkit::skip(requirement, &reason);
            None
        }
    }
}

/// A private temp dir for one test.
pub fn test_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("gpuvm-ctr-")
        .tempdir_in("/tmp")
        .expect("tempdir")
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

/// Runs `cmd` and asserts it succeeded.
pub fn run(cmd: &mut Command) {
    let status = cmd.status().expect("spawn");
    assert!(status.success(), "{cmd:?} failed: {status}");
}

/// Copies the blob at `path` into the layout, returns (digest, size).
fn blob(oci: &Path, path: &Path) -> (String, u64) {
    let digest = sha256(path);
    let size = std::fs::metadata(path).expect("stat").len();
    std::fs::copy(path, oci.join("blobs/sha256").join(&digest)).expect("copy blob");
    (format!("sha256:{digest}"), size)
}

/// A one-layer busybox OCI image as an `oci-layout` tarball; the unpacked tree stays
/// in `<dir>/rootfs`.
pub fn busybox_image(dir: &Path) -> PathBuf {
    let rootfs = dir.join("rootfs");
    std::fs::create_dir_all(rootfs.join("bin")).expect("mkdir");
    for d in ["proc", "sys", "dev", "tmp", "etc"] {
        std::fs::create_dir_all(rootfs.join(d)).expect("mkdir");
    }
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).expect("copy busybox");
    for applet in [
        "sh", "echo", "uname", "sleep", "cat", "ls", "true", "tty", "stty", "head",
    ] {
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

/// Settings of the shim's config file that a test changes.
#[derive(Debug, Clone)]
pub struct ShimSettings {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    /// The image pods with GPUs boot (`guest.gpu_initramfs`); the small one by
    /// default: the fake-GPU tests have no driver to load.
    pub gpu_initramfs: PathBuf,
    pub qemu: PathBuf,
    pub kernel_params: String,
    pub agent_connect_secs: u64,
    /// TOML appended to the config file (e.g. a `[host]` section).
    pub extra_toml: String,
}

impl ShimSettings {
    /// The working settings for `s`.
    pub fn new(s: &Setup) -> ShimSettings {
        ShimSettings {
            kernel: s.kernel.clone(),
            initramfs: s.initramfs.clone(),
            gpu_initramfs: s.initramfs.clone(),
            qemu: s.qemu.clone(),
            kernel_params: String::new(),
            // TCG boots take seconds, and longer on a loaded 2-core box.
            agent_connect_secs: 120,
            extra_toml: String::new(),
        }
    }
}

/// Writes a shim config file with `settings` to `path`.
pub fn write_shim_config(s: &Setup, settings: &ShimSettings, path: &Path) {
    std::fs::write(
        path,
        format!(
            r#"backend = "qemu"
log_level = "debug"
[guest]
kernel = "{}"
initramfs = "{}"
gpu_initramfs = "{}"
kernel_params = "{}"
default_cpus = 1
default_memory = "512Mi"
[binaries]
qemu = "{}"
vhost_device_vsock = "{}"
virtiofsd = "{}"
[timeouts]
agent_connect_secs = {}
vm_shutdown_secs = 10
{}
"#,
            settings.kernel.display(),
            settings.initramfs.display(),
            settings.gpu_initramfs.display(),
            settings.kernel_params,
            settings.qemu.display(),
            s.vsock.display(),
            s.virtiofsd.display(),
            settings.agent_connect_secs,
            settings.extra_toml,
        ),
    )
    .expect("write shim config");
}

/// containerd on private dirs; on drop it is killed, and what its shims left (a
/// failed test's VM) is cleaned up the way containerd does after a shim crash.
#[derive(Debug)]
pub struct Containerd {
    child: std::process::Child,
    pub socket: PathBuf,
    ctr: PathBuf,
    log: PathBuf,
    /// The shim config file (`ctr --runtime-config-path`, CRI's `ConfigPath`).
    pub shim_config: PathBuf,
    /// The test's private dir.
    pub dir: PathBuf,
    /// containerd's state dir (holds the task bundles).
    pub state_dir: PathBuf,
    /// Pod network namespaces whose taps and tc qdiscs [`Containerd::leftovers`]
    /// checks (see [`Containerd::watch_netns`]).
    pod_netns: std::sync::Mutex<Vec<PathBuf>>,
}

/// The containerd namespaces the tests use.
const NAMESPACES: [&str; 2] = ["default", "k8s.io"];

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // A failed test may leave its shim running: kill what names our containerd
        // socket (the shims).
        for entry in processes_mentioning(&self.socket.display().to_string()) {
            if let Some(pid) = entry.split(':').next().and_then(|p| p.parse::<i32>().ok()) {
                // SAFETY: kill(2) with a pid we just read and SIGKILL has no memory
                // effects on this process.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        // Then what containerd does after a shim crash: `shim delete` in each bundle,
        // which kills the VM and unmounts what the state file names.
        for ns in NAMESPACES {
            let tasks = self
                .state_dir
                .join("io.containerd.runtime.v2.task")
                .join(ns);
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
                    .args(["-namespace", ns, "-id", &id, "-address", "/nonexistent"])
                    .arg("-bundle")
                    .arg(&bundle)
                    .arg("delete")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
        }
        // What containerd itself mounted and unmounts only when a sandbox is removed
        // (each CRI sandbox's `/dev/shm`): killed first, it leaves them behind, and the
        // test's temp dir could not be removed ("Device or resource busy").
        unmount_under(&self.state_dir);
    }
}

/// Detaches every mount at or below `root`, the deepest first.
pub fn unmount_under(root: &Path) {
    let Ok(table) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let mut points: Vec<PathBuf> = table
        .lines()
        // The 5th field is the mount point, with space, tab, newline and backslash
        // written as octal escapes.
        .filter_map(|line| line.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape_mountinfo(p)))
        .filter(|p| p.starts_with(root))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
    points.dedup();
    for point in points {
        let Ok(c) = std::ffi::CString::new(point.as_os_str().as_encoded_bytes()) else {
            continue;
        };
        // SAFETY: umount2(2) with a NUL-terminated path that lives across the call.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
}

/// Undoes mountinfo's `\ooo` octal escapes.
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| {
            let text = std::str::from_utf8(d).ok()?;
            u8::from_str_radix(text, 8).ok()
        });
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What containerd serves besides ctr's task API.
#[derive(Debug, Clone)]
pub enum Plugins {
    /// No CRI: `ctr` only.
    CtrOnly,
    /// The CRI plugin with a `gpuvm` runtime handler and `sandbox_image` as the pod
    /// sandbox image.
    Cri { sandbox_image: String },
}

impl Containerd {
    /// `ctr` against this containerd in namespace `default`.
    pub fn ctr(&self) -> Command {
        self.ctr_in("default")
    }

    /// `ctr` against this containerd in `namespace`.
    pub fn ctr_in(&self, namespace: &str) -> Command {
        let mut cmd = Command::new(&self.ctr);
        cmd.arg("--address")
            .arg(&self.socket)
            .args(["--namespace", namespace]);
        cmd
    }

    /// containerd's log (shim logs included).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last lines of containerd's log, for assertion messages.
    pub fn log_tail(&self) -> String {
        let lines: Vec<String> = self
            .log()
            .lines()
            .filter(|l| !l.contains("loading plugin"))
            .map(str::to_owned)
            .collect();
        let start = lines.len().saturating_sub(40);
        lines[start..].join("\n")
    }

    /// containerd's own pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The bundle dir of task `id` in `namespace`.
    pub fn bundle(&self, namespace: &str, id: &str) -> PathBuf {
        self.state_dir
            .join("io.containerd.runtime.v2.task")
            .join(namespace)
            .join(id)
    }

    /// What this test left behind for the sandboxes `sandbox_ids`: VMM, virtiofsd and
    /// vhost-device-vsock processes (their command lines name the VM's work dir),
    /// shims, mounts under the VM's or the test's dirs, socket files.
    pub fn leftovers(&self, sandbox_ids: &[&str]) -> Vec<String> {
        let mut found = Vec::new();
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let dir = format!("{}/", self.dir.display());
        for id in sandbox_ids {
            let work_dir = format!("{RUN_DIR}/{id}");
            for p in processes_mentioning(&format!("{work_dir}/")) {
                found.push(format!("VM process {p}"));
            }
            for p in processes_mentioning(&format!("-id {id} ")) {
                found.push(format!("shim {p}"));
            }
            if Path::new(&work_dir).exists() {
                found.push(format!("work dir {work_dir}"));
            }
            for ns in NAMESPACES {
                for address in [
                    self.socket.display().to_string(),
                    format!("{}.ttrpc", self.socket.display()),
                ] {
                    let socket = containerd_shim::socket_address(&address, ns, id);
                    let socket = socket.trim_start_matches("unix://");
                    if Path::new(socket).exists() {
                        found.push(format!("shim socket {socket}"));
                    }
                }
            }
            for line in mountinfo.lines().filter(|l| l.contains(&work_dir)) {
                found.push(format!("mount {line}"));
            }
        }
        for line in mountinfo.lines().filter(|l| l.contains(&dir)) {
            found.push(format!("mount {line}"));
        }
        let own = self.pid().to_string();
        for p in processes_mentioning(&dir) {
            if p.split(':').next() != Some(own.as_str()) {
                found.push(format!("process {p}"));
            }
        }
        let ours = [
            self.socket.clone(),
            self.socket.with_extension("sock.ttrpc"),
        ];
        for socket in sockets_under(&self.dir) {
            if !ours.contains(&socket) {
                found.push(format!("socket {}", socket.display()));
            }
        }
        found.extend(self.netns_leftovers());
        found
    }

    /// Makes [`Containerd::leftovers`] check the pod network namespace `netns` (while
    /// it exists) for taps and ingress qdiscs (the shim's tc redirects hang from them).
    pub fn watch_netns(&self, netns: &Path) {
        if let Ok(mut watched) = self.pod_netns.lock() {
            watched.push(netns.to_owned());
        }
    }

    /// Taps and ingress qdiscs in the watched pod network namespaces.
    pub fn netns_leftovers(&self) -> Vec<String> {
        let watched = self.pod_netns.lock().map(|w| w.clone()).unwrap_or_default();
        let mut found = Vec::new();
        for netns in watched {
            match gpuvm_shim::network::taps_and_qdiscs(&netns) {
                Ok(items) => found.extend(
                    items
                        .into_iter()
                        .map(|item| format!("{item} in {}", netns.display())),
                ),
                Err(e) => found.push(format!("cannot inspect {}: {e}", netns.display())),
            }
        }
        found
    }

    /// Asserts, waiting up to 30 s for teardown to finish, that the test left nothing
    /// behind for `sandbox_ids` (see [`Containerd::leftovers`]).
    pub fn assert_nothing_left_behind(&self, sandbox_ids: &[&str]) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let leftovers = self.leftovers(sandbox_ids);
            if leftovers.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "left behind:\n{}\ncontainerd log (tail):\n{}",
                leftovers.join("\n"),
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

/// Socket files under `dir` (recursively, not following links).
fn sockets_under(dir: &Path) -> Vec<PathBuf> {
    use std::os::unix::fs::FileTypeExt;
    let mut found = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_dir() {
                stack.push(entry.path());
            } else if kind.is_socket() {
                found.push(entry.path());
            }
        }
    }
    found
}

/// Starts containerd on private dirs under `dir` with the `gpuvm` runtime (the shim
/// config at `<dir>/shim.toml`, written from `settings`).
pub fn start_containerd(
    s: &Setup,
    dir: &Path,
    settings: &ShimSettings,
    plugins: &Plugins,
) -> Containerd {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).expect("mkdir");
    std::os::unix::fs::symlink(SHIM_BIN, bin.join("containerd-shim-gpuvm-v1")).expect("symlink");
    let shim_config = dir.join("shim.toml");
    write_shim_config(s, settings, &shim_config);
    let socket = dir.join("containerd.sock");
    let config = dir.join("containerd.toml");
    let plugin_config = match plugins {
        Plugins::CtrOnly => r#"disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.cri.v1.images", "io.containerd.cri.v1.runtime", "io.containerd.internal.v1.tracing", "io.containerd.tracing.processor.v1.otlp"]
"#
        .to_owned(),
        Plugins::Cri { sandbox_image } => format!(
            r#"disabled_plugins = ["io.containerd.internal.v1.tracing", "io.containerd.tracing.processor.v1.otlp"]
[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = "{sandbox_image}"
[plugins."io.containerd.cri.v1.runtime"]
  [plugins."io.containerd.cri.v1.runtime".containerd]
    default_runtime_name = "gpuvm"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.gpuvm]
      runtime_type = "io.containerd.gpuvm.v1"
      # As the chart configures it: the Pod's gpuvm.dev/* annotations reach the shim.
      pod_annotations = ["gpuvm.dev/*"]
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.gpuvm.options]
        ConfigPath = "{shim_config}"
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["{cni}"]
    conf_dir = "{cni}"
[plugins."io.containerd.grpc.v1.cri"]
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
"#,
            shim_config = shim_config.display(),
            cni = dir.join("cni").display(),
        ),
    };
    std::fs::write(
        &config,
        format!(
            r#"version = 3
root = "{root}"
state = "{state}"
{plugin_config}
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
        dir: dir.to_owned(),
        state_dir: dir.join("state"),
        pod_netns: std::sync::Mutex::new(Vec::new()),
    };
    let deadline = Instant::now() + Duration::from_secs(60);
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

/// Processes whose command line mentions `needle`, as `"<pid>: <cmdline>"`.
pub fn processes_mentioning(needle: &str) -> Vec<String> {
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

/// The pid of the one process whose command line mentions `needle`.
pub fn only_process_mentioning(needle: &str) -> Option<u32> {
    let found = processes_mentioning(needle);
    match found.as_slice() {
        [one] => one.split(':').next().and_then(|p| p.parse().ok()),
        _ => None,
    }
}

/// `VmRSS` of `pid` in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// A minimal OCI spec running `args` (no mounts nested under another mount). With a
/// spec file ctr takes no image: the root is the unpacked busybox tree.
pub fn spec_with_args(dir: &Path, args: &[&str]) -> PathBuf {
    spec_with_args_and_annotations(dir, args, &[])
}

/// [`spec_with_args`] with OCI annotations (as CRI passes pod annotations).
pub fn spec_with_args_and_annotations(
    dir: &Path,
    args: &[&str],
    annotations: &[(&str, &str)],
) -> PathBuf {
    let path = dir.join("spec.json");
    let annotations: serde_json::Map<String, serde_json::Value> = annotations
        .iter()
        .map(|(k, v)| ((*k).to_owned(), json!(v)))
        .collect();
    let rootfs = dir.join("rootfs");
    let spec = json!({
        "ociVersion": "1.1.0",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": ["PATH=/bin"],
            "cwd": "/"
        },
        "root": {"path": rootfs},
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "mode=755", "size=65536k"]}
        ],
        "linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}]},
        "annotations": annotations
    });
    std::fs::write(&path, serde_json::to_vec(&spec).expect("json")).expect("write spec");
    path
}
