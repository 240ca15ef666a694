//! Cloud Hypervisor, run for real: the shim's own [`CloudHypervisor`] backend drives the
//! real `cloud-hypervisor` binary through its whole REST lifecycle (ping, create, boot,
//! info, shutdown, delete) with tiny PVH guests of a few instructions each. A stock Linux
//! kernel does not boot under a nested PVM KVM, but these guests do, so this tier runs
//! wherever `/dev/kvm` works; the agent-in-guest test (`vm_backends.rs`) needs a KVM
//! that boots real kernels.
//!
//! The guests, built here with `as` and `ld` from one template (the layout of
//! `../shared/vmm/tiny.S`), print `TINY-PVH-MARKER-OK` on the serial port, then:
//! power off through the ACPI port (`../shared/vmm/tiny64.elf` itself when present),
//! halt forever, reset through the keyboard controller (what Linux does after a panic
//! with `panic=1 reboot=k`), or report a panic to the pvpanic PCI device.
//!
//! Needs, else each test prints `SKIPPED: <reason>` (and fails instead under
//! `GPUVM_REQUIRE=cloud-hypervisor`):
//! - the binary: `CLOUD_HYPERVISOR_BIN`; else `$HOME/.cache/gpuvm-kube/cloud-hypervisor`
//!   (where `scripts/kube-deps.sh` puts it); else `../shared/vmm/cloud-hypervisor.xz`
//!   next to the checkout, decompressed with `xz` into that same cache;
//! - a usable `/dev/kvm`;
//! - `as` and `ld` (binutils).
//!
//! The virtio-fs case also needs `virtiofsd` (`scripts/vm-deps.sh`; requirement `qemu`).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{bare_vm_spec, find_cloud_hypervisor, kvm_usable, shared_dir};
use gpuvm_shim::config::{Backend, ShimConfig};
use gpuvm_shim::error::Error;
use gpuvm_shim::hypervisor::cloud_hypervisor::GuestEnd;
use gpuvm_shim::hypervisor::{CloudHypervisor, Hypervisor, VmRecord, VmSpec};
use gpuvm_testkit::{Requirement, skip};

/// What every guest prints first.
const MARKER: &str = "TINY-PVH-MARKER-OK";

/// How long a tiny guest may take to do its one thing (it takes ~30 ms).
const GUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// What a tiny guest does after printing the marker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Guest {
    /// ACPI S5 through Cloud Hypervisor's shutdown port (and QEMU's isa-debug-exit).
    PowerOff,
    /// `hlt` forever: a VM that stays up until it is shut down.
    StayUp,
    /// 0xfe to the keyboard controller's command port: a reset.
    Reset,
    /// Finds the pvpanic PCI device (1b36:0011) on bus 0 and writes PANICKED to its BAR.
    Panic,
}

impl Guest {
    fn name(self) -> &'static str {
        match self {
            Guest::PowerOff => "poweroff",
            Guest::StayUp => "stayup",
            Guest::Reset => "reset",
            Guest::Panic => "panic",
        }
    }

    /// The instructions that follow the marker (32-bit protected mode, paging off).
    fn action(self) -> &'static str {
        match self {
            Guest::PowerOff => {
                "    mov $0xf4, %dx\n    xor %al, %al\n    out %al, %dx\n\
                 \x20   mov $0x600, %dx\n    mov $0x34, %al\n    out %al, %dx\n"
            }
            Guest::StayUp => "",
            Guest::Reset => "    mov $0xfe, %al\n    out %al, $0x64\n",
            Guest::Panic => PVPANIC,
        }
    }
}

/// Scans bus 0 through the 0xcf8/0xcfc config ports for the pvpanic device, turns on
/// its memory decoding, and writes PANICKED (1) to its 32-bit MMIO BAR 0. Not found:
/// falls through to the halt loop, and the test times out.
const PVPANIC: &str = "    xor %ebx, %ebx
4:  mov %ebx, %eax
    or $0x80000000, %eax
    mov $0xcf8, %dx
    out %eax, %dx
    mov $0xcfc, %dx
    in %dx, %eax
    cmp $0x00111b36, %eax
    je 5f
    add $0x800, %ebx
    cmp $0x10000, %ebx
    jb 4b
    jmp 3f
5:  mov %ebx, %eax
    or $0x80000004, %eax
    mov $0xcf8, %dx
    out %eax, %dx
    mov $0xcfc, %dx
    in %dx, %ax
    or $0x2, %ax
    out %ax, %dx
    mov %ebx, %eax
    or $0x80000010, %eax
    mov $0xcf8, %dx
    out %eax, %dx
    mov $0xcfc, %dx
    in %dx, %eax
    and $0xfffffff0, %eax
    movb $1, (%eax)
";

/// The guest's source: a PVH ELF note, the marker on COM1, the action, a halt loop.
fn guest_source(guest: Guest) -> String {
    format!(
        r#"    .section .note.Xen, "a"
    .p2align 2
    .long 4
    .long 4
    .long 18
    .asciz "Xen"
    .long _start
    .text
    .code32
    .globl _start
_start:
    mov $msg, %esi
    mov $0x3f8, %dx
1:  lodsb
    test %al, %al
    jz 2f
    out %al, %dx
    jmp 1b
2:
{action}3:  hlt
    jmp 3b
    .data
msg: .asciz "{MARKER}\r\n"
"#,
        action = guest.action()
    )
}

/// Builds `guest` into `dir` with `as` and `ld`; `../shared/vmm/tiny64.elf` is used
/// as is for [`Guest::PowerOff`] when present.
fn build_guest(dir: &Path, guest: Guest) -> Result<PathBuf, String> {
    let shared = shared_dir().join("vmm/tiny64.elf");
    if guest == Guest::PowerOff && shared.is_file() {
        return shared
            .canonicalize()
            .map_err(|e| format!("{}: {e}", shared.display()));
    }
    let source = dir.join(format!("{}.S", guest.name()));
    let object = dir.join(format!("{}.o", guest.name()));
    let elf = dir.join(format!("{}.elf", guest.name()));
    std::fs::write(&source, guest_source(guest)).map_err(|e| e.to_string())?;
    let tool = |cmd: &mut Command, what: &str| -> Result<(), String> {
        let out = cmd
            .output()
            .map_err(|e| format!("cannot run {what} (binutils) to build the tiny guest: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{what} failed on the {} guest: {}",
                guest.name(),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    };
    tool(
        Command::new("as")
            .arg("--64")
            .arg(&source)
            .arg("-o")
            .arg(&object),
        "as",
    )?;
    tool(
        Command::new("ld")
            .args(["-m", "elf_x86_64", "-Ttext=0x100000", "-o"])
            .arg(&elf)
            .arg(&object),
        "ld",
    )?;
    Ok(elf)
}

/// The guests themselves, under QEMU TCG (no KVM needed): each does what the Cloud
/// Hypervisor tests expect of it, so when one of those fails, the VMM is to blame, not
/// the guest. QEMU's counterparts: isa-debug-exit at 0xf4 for the power-off (exit code
/// 1), `-no-reboot` for the reset (exit code 0), pvpanic-pci with
/// `-action panic=exit-failure` for the panic (exit code 1).
#[test]
fn the_tiny_guests_do_their_one_thing_under_qemu() {
    let Some(qemu) = common::find_binary("QEMU_BIN", "qemu-system-x86_64") else {
        skip(
            Requirement::Qemu,
            "qemu-system-x86_64 not found (scripts/vm-deps.sh)",
        );
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let cases = [
        (Guest::PowerOff, Some(1)),
        (Guest::Reset, Some(0)),
        (Guest::Panic, Some(1)),
        (Guest::StayUp, None),
    ];
    for (guest, want) in cases {
        let elf = match build_guest(dir.path(), guest) {
            Ok(elf) => elf,
            Err(reason) => {
                skip(Requirement::Qemu, &reason);
                return;
            }
        };
        let log = dir.path().join(format!("{}.log", guest.name()));
        let mut child = Command::new(&qemu)
            .args(["-M", "q35", "-accel", "tcg", "-m", "64", "-display", "none"])
            .args(["-nodefaults", "-no-reboot", "-action", "panic=exit-failure"])
            .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=1"])
            .args(["-device", "pvpanic-pci"])
            .arg("-serial")
            .arg(format!("file:{}", log.display()))
            .arg("-kernel")
            .arg(&elf)
            .stdin(std::process::Stdio::null())
            .spawn()
            .expect("start qemu");
        // A guest that stays up is given long enough to have shown any other behaviour.
        let deadline = Instant::now()
            + if want.is_some() {
                GUEST_TIMEOUT
            } else {
                Duration::from_secs(3)
            };
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait") {
                break Some(status);
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let console = std::fs::read_to_string(&log).unwrap_or_default();
        assert!(console.contains(MARKER), "{guest:?}: console {console:?}");
        assert_eq!(
            status.and_then(|s| s.code()),
            want,
            "{guest:?}: QEMU ended with {status:?}"
        );
    }
}

/// One test's setting: the binary, a private short dir, the config.
struct Live {
    dir: tempfile::TempDir,
    config: ShimConfig,
}

/// The live setup, or `None` after `skip` said why.
fn live() -> Option<Live> {
    let binary = match find_cloud_hypervisor() {
        Ok(b) => b,
        Err(reason) => {
            skip(Requirement::CloudHypervisor, &reason);
            return None;
        }
    };
    if let Err(reason) = kvm_usable() {
        skip(Requirement::CloudHypervisor, &reason);
        return None;
    }
    // Unix socket paths are limited to 108 bytes: keep the work dir short.
    let dir = tempfile::Builder::new()
        .prefix("gpuvm-ch-")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let mut config = ShimConfig {
        backend: Backend::CloudHypervisor,
        ..ShimConfig::default()
    };
    config.binaries.cloud_hypervisor = binary;
    config.timeouts.vm_shutdown_secs = 10;
    Some(Live { dir, config })
}

impl Live {
    /// A VM spec that boots `guest` (built here), with the vsock device, serial log
    /// and shared memory the shim always configures.
    fn spec(&self, guest: Guest) -> Option<VmSpec> {
        let kernel = match build_guest(self.dir.path(), guest) {
            Ok(k) => k,
            Err(reason) => {
                skip(Requirement::CloudHypervisor, &reason);
                return None;
            }
        };
        // The tiny guests take no initramfs, but the shim always passes one.
        let initramfs = self.dir.path().join("initramfs.img");
        std::fs::write(&initramfs, [0u8; 512]).expect("write initramfs");
        Some(bare_vm_spec(
            &format!("tiny-{}", guest.name()),
            self.dir.path().join(guest.name()),
            kernel,
            initramfs,
        ))
    }
}

/// Waits until the serial log holds the marker; returns the log.
async fn wait_for_marker(spec: &VmSpec) -> String {
    let deadline = Instant::now() + GUEST_TIMEOUT;
    loop {
        let console = std::fs::read_to_string(spec.console_log()).unwrap_or_default();
        if console.contains(MARKER) || Instant::now() >= deadline {
            return console;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The VMM's log, for assertion messages.
fn vmm_log(spec: &VmSpec) -> String {
    std::fs::read_to_string(spec.work_dir.join("cloud-hypervisor.log")).unwrap_or_default()
}

/// Starts `vm`, panicking with the VMM's log when it fails.
async fn start(vm: &CloudHypervisor, spec: &VmSpec) {
    if let Err(e) = vm.start(&|_| {}).await {
        let log = vmm_log(spec);
        vm.cleanup().await;
        panic!("start: {}\ncloud-hypervisor log:\n{log}", e.full_message());
    }
}

#[tokio::test]
async fn create_boot_info_shutdown_delete_through_the_backend() {
    let Some(live) = live() else { return };
    let Some(spec) = live.spec(Guest::StayUp) else {
        return;
    };
    let vm = CloudHypervisor::new(&live.config, spec.clone());
    // start = vmm.ping, vm.create, vm.boot.
    start(&vm, &spec).await;
    let pid = vm.pid().expect("the VMM's pid");
    assert!(Path::new(&format!("/proc/{pid}")).exists());
    assert_eq!(vm.vm_state().await.expect("vm.info"), "Running");
    let console = wait_for_marker(&spec).await;
    assert!(console.contains(MARKER), "console:\n{console}");

    // vm.info reports the config the shim sent, as the VMM understood it.
    let info = vm.api().get_json("vm.info").await.expect("vm.info");
    let config = &info["config"];
    assert_eq!(
        config["payload"]["kernel"].as_str().map(PathBuf::from),
        Some(spec.kernel.clone())
    );
    assert_eq!(config["memory"]["shared"], true, "{info}");
    assert_eq!(config["memory"]["size"], 128u64 << 20, "{info}");
    assert_eq!(config["vsock"]["cid"], 3, "{info}");
    assert_eq!(
        config["vsock"]["socket"].as_str().map(PathBuf::from),
        Some(spec.vsock_socket())
    );
    assert_eq!(config["pvpanic"], true, "{info}");

    // A REST error comes back as a typed error naming the call: the VM exists already.
    let body = serde_json::json!({"payload": {"kernel": spec.kernel}});
    match vm.api().put("vm.create", Some(&body)).await {
        Err(Error::VmmApi {
            endpoint, status, ..
        }) => {
            assert_eq!(endpoint, "vm.create");
            assert!(status >= 400, "{status}");
        }
        other => panic!("a second vm.create must fail, got {other:?}"),
    }

    // Each teardown call on its own: vm.shutdown, then vm.delete, then the VMM.
    vm.api()
        .put("vm.shutdown", None)
        .await
        .expect("vm.shutdown");
    // v54 tears the VM down and keeps its config ("Created", bootable again); older
    // versions said "Shutdown".
    let state = vm.vm_state().await.expect("vm.info");
    assert!(state == "Created" || state == "Shutdown", "{state}");
    vm.api().put("vm.delete", None).await.expect("vm.delete");
    let gone = vm.api().get("vm.info").await;
    assert!(
        matches!(gone, Err(Error::VmmApi { .. })),
        "vm.info after vm.delete: {gone:?}"
    );
    tokio::time::timeout(Duration::from_secs(30), vm.shutdown())
        .await
        .expect("shutdown in time")
        .expect("vmm.shutdown");
    let exit = tokio::time::timeout(Duration::from_secs(5), vm.wait_exit())
        .await
        .expect("the VMM exited");
    assert_eq!(exit.vmm_exit_code, 0, "{}", vmm_log(&spec));
    assert_eq!(vm.guest_end(), None);
    vm.cleanup().await;
    assert!(!spec.work_dir.exists(), "work dir left behind");
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "VMM left running"
    );
}

#[tokio::test]
async fn shutdown_of_a_running_vm_ends_the_vmm() {
    let Some(live) = live() else { return };
    let Some(spec) = live.spec(Guest::StayUp) else {
        return;
    };
    let vm = CloudHypervisor::new(&live.config, spec.clone());
    start(&vm, &spec).await;
    assert_eq!(vm.vm_state().await.expect("vm.info"), "Running");
    // What the shim does on Shutdown: vm.shutdown, vm.delete, vmm.shutdown, each bounded.
    tokio::time::timeout(Duration::from_secs(30), vm.shutdown())
        .await
        .expect("shutdown in time")
        .expect("shutdown");
    let exit = tokio::time::timeout(Duration::from_secs(5), vm.wait_exit())
        .await
        .expect("the VMM exited");
    assert_eq!(exit.vmm_exit_code, 0, "{}", vmm_log(&spec));
    // Once the VMM is gone, a REST call is a clear error, not a hang.
    let err = vm.api().get("vm.info").await.expect_err("no VMM");
    assert!(
        err.full_message().contains("ch-api.sock"),
        "{}",
        err.full_message()
    );
    vm.cleanup().await;
    assert!(!spec.work_dir.exists(), "work dir left behind");
}

#[tokio::test]
async fn a_guest_that_powers_off_ends_the_vm() {
    let Some(live) = live() else { return };
    let Some(spec) = live.spec(Guest::PowerOff) else {
        return;
    };
    let vm = CloudHypervisor::new(&live.config, spec.clone());
    start(&vm, &spec).await;
    let exit = tokio::time::timeout(GUEST_TIMEOUT, vm.wait_exit()).await;
    let console = std::fs::read_to_string(spec.console_log()).unwrap_or_default();
    let log = vmm_log(&spec);
    vm.cleanup().await;
    let exit = exit.unwrap_or_else(|_| panic!("the guest did not power off; console:\n{console}"));
    assert_eq!(exit.vmm_exit_code, 0, "{log}");
    assert!(console.contains(MARKER), "console:\n{console}");
    assert_eq!(vm.guest_end(), None, "a power-off is no reset");
    assert!(!spec.work_dir.exists(), "work dir left behind");
}

/// A guest that resets or panics: the VM must end (Cloud Hypervisor alone would
/// reboot the first and ignore the second), and the backend says why.
async fn guest_crash_ends_the_vm(guest: Guest, want: GuestEnd) {
    let Some(live) = live() else { return };
    let Some(spec) = live.spec(guest) else {
        return;
    };
    let vm = CloudHypervisor::new(&live.config, spec.clone());
    start(&vm, &spec).await;
    let exit = tokio::time::timeout(GUEST_TIMEOUT, vm.wait_exit()).await;
    let console = std::fs::read_to_string(spec.console_log()).unwrap_or_default();
    let log = vmm_log(&spec);
    vm.cleanup().await;
    assert!(
        exit.is_ok(),
        "the {guest:?} guest did not end its VM; console:\n{console}\nVMM log:\n{log}"
    );
    assert!(console.contains(MARKER), "console:\n{console}");
    assert_eq!(vm.guest_end(), Some(want), "VMM log:\n{log}");
    assert!(!spec.work_dir.exists(), "work dir left behind");
}

#[tokio::test]
async fn a_guest_reset_ends_the_vm() {
    guest_crash_ends_the_vm(Guest::Reset, GuestEnd::Reset).await;
}

#[tokio::test]
async fn a_guest_panic_ends_the_vm() {
    guest_crash_ends_the_vm(Guest::Panic, GuestEnd::Panic).await;
}

/// What the tiny guest cannot use, the VMM must still accept: the hybrid-vsock device
/// (its host socket listens; a CONNECT gets no answer from a guest without a vsock
/// driver, and the shim's connect gives up with a clear error) and a virtio-fs share on
/// shared memory served by a real virtiofsd.
#[tokio::test]
async fn vsock_and_virtio_fs_on_shared_memory_are_accepted() {
    let Some(live) = live() else { return };
    let Some(virtiofsd) = common::find_binary("VIRTIOFSD_BIN", "virtiofsd") else {
        skip(
            Requirement::Qemu,
            "virtiofsd not found (scripts/vm-deps.sh or VIRTIOFSD_BIN)",
        );
        return;
    };
    let Some(mut spec) = live.spec(Guest::StayUp) else {
        return;
    };
    let shared = live.dir.path().join("shared");
    std::fs::create_dir(&shared).expect("mkdir shared");
    spec.shared_dir = Some(shared);
    let mut config = live.config.clone();
    config.binaries.virtiofsd = virtiofsd;
    let vm = CloudHypervisor::new(&config, spec.clone());
    start(&vm, &spec).await;
    assert_eq!(vm.vm_state().await.expect("vm.info"), "Running");
    let info = vm.api().get_json("vm.info").await.expect("vm.info");
    assert_eq!(info["config"]["memory"]["shared"], true, "{info}");
    assert_eq!(info["config"]["fs"][0]["tag"], "gpuvm", "{info}");
    assert_eq!(
        info["config"]["fs"][0]["socket"]
            .as_str()
            .map(PathBuf::from),
        Some(spec.virtiofs_socket())
    );
    let record = vm.record();
    let names: Vec<&str> = record.processes.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["virtiofsd", "cloud-hypervisor"]);

    tokio::net::UnixStream::connect(spec.vsock_socket())
        .await
        .expect("the hybrid-vsock socket listens");
    let err = gpuvm_shim::vsock::connect(&spec.vsock_socket(), 1024, Duration::from_secs(1))
        .await
        .expect_err("no guest listens on vsock");
    assert!(
        matches!(&err, Error::Timeout { what, .. } if what.contains("vsock port 1024")),
        "{err}"
    );

    tokio::time::timeout(Duration::from_secs(30), vm.shutdown())
        .await
        .expect("shutdown in time")
        .expect("shutdown");
    vm.cleanup().await;
    assert_nothing_left(&record, &spec);
}

/// No process of `record` runs any more and the VM's work dir is gone.
fn assert_nothing_left(record: &VmRecord, spec: &VmSpec) {
    for process in &record.processes {
        assert!(
            !Path::new(&format!("/proc/{}", process.pid)).exists(),
            "{} left running",
            process.name
        );
    }
    assert!(!spec.work_dir.exists(), "work dir left behind");
}

/// A kernel that isn't there: `start` fails with the VMM's own answer to the call that
/// failed, and nothing is left running.
#[tokio::test]
async fn a_bad_payload_is_a_rest_error_and_leaves_nothing() {
    let Some(live) = live() else { return };
    let Some(mut spec) = live.spec(Guest::StayUp) else {
        return;
    };
    spec.kernel = live.dir.path().join("no-such-kernel");
    let vm = CloudHypervisor::new(&live.config, spec.clone());
    let err = vm.start(&|_| {}).await.expect_err("no kernel");
    let record = vm.record();
    vm.cleanup().await;
    match &err {
        Error::VmmApi { endpoint, .. } => {
            assert!(
                endpoint == "vm.create" || endpoint == "vm.boot",
                "{}",
                err.full_message()
            );
        }
        other => panic!(
            "expected the VMM's REST error, got {}",
            other.full_message()
        ),
    }
    assert_nothing_left(&record, &spec);
}

/// A VMM that dies at start (here: its API socket path is taken by a directory, and
/// where there is no `/dev/kvm` it cannot create a VM either) is an error that names
/// the VMM and its log, at once rather than after a timeout.
#[tokio::test]
async fn a_vmm_that_dies_at_start_is_a_prompt_clear_error() {
    let binary = match find_cloud_hypervisor() {
        Ok(b) => b,
        Err(reason) => {
            skip(Requirement::CloudHypervisor, &reason);
            return;
        }
    };
    let dir = tempfile::Builder::new()
        .prefix("gpuvm-ch-")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let mut config = ShimConfig::default();
    config.binaries.cloud_hypervisor = binary;
    let spec = bare_vm_spec(
        "dies",
        dir.path().join("vm"),
        dir.path().join("kernel"),
        dir.path().join("initramfs"),
    );
    std::fs::create_dir_all(spec.work_dir.join("ch-api.sock")).expect("mkdir");
    let vm = CloudHypervisor::new(&config, spec.clone());
    let started = Instant::now();
    let err = vm.start(&|_| {}).await.expect_err("the VMM cannot start");
    let log = vmm_log(&spec);
    vm.cleanup().await;
    let message = err.full_message();
    assert!(started.elapsed() < Duration::from_secs(8), "{message}");
    assert!(
        message.contains("cloud-hypervisor exited with code")
            && message.contains("cloud-hypervisor.log"),
        "{message}"
    );
    assert!(!log.is_empty(), "the VMM's log is empty");
    assert!(!spec.work_dir.exists(), "work dir left behind");
}
