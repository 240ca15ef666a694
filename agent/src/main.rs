//! `gpuvm-agent`: PID 1 of a gpuvm guest, or (for tests and development) an ordinary
//! process serving the agent protocol on a unix socket.
//!
//! ```text
//! gpuvm-agent                       # as /init in the guest: boot, serve on vsock:1024
//! gpuvm-agent --listen unix:///tmp/agent.sock
//! ```

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use gpuvm_agent::boot::{self, BootConfig};
use gpuvm_agent::cgroup::Cgroups;
use gpuvm_agent::procfs;
use gpuvm_agent::runtime::Runtime;
use gpuvm_agent::service::{AgentService, GuestFacts};
use gpuvm_protocol::AGENT_VSOCK_PORT;

fn usage() -> String {
    "usage: gpuvm-agent [--listen <unix:///path | vsock://-1:<port>>] [--debug]".to_string()
}

fn main() {
    let pid1 = std::process::id() == 1;
    let started = Instant::now();
    let result = if pid1 {
        run_as_init(started)
    } else {
        run_as_process()
    };
    if let Err(error) = result {
        eprintln!("gpuvm-agent: {error:#}");
        if pid1 {
            // Exiting would panic the kernel; powering off lets the VMM exit cleanly
            // and the shim report the failure.
            power_off();
        }
        std::process::exit(1);
    }
}

fn init_logging(debug: bool) {
    let level = if debug {
        tracing::Level::DEBUG
    } else {
        tracing::Level::INFO
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(level)
        .with_target(false)
        .with_ansi(false)
        .init();
}

fn run_as_process() -> anyhow::Result<()> {
    let mut listen = None;
    let mut debug = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--listen" => listen = Some(args.next().context(usage())?),
            "--debug" => debug = true,
            "--help" | "-h" => {
                println!("{}", usage());
                return Ok(());
            }
            other => bail!("unknown argument {other:?}\n{}", usage()),
        }
    }
    init_logging(debug);
    let listen = listen.context(format!("--listen is required when not PID 1\n{}", usage()))?;
    if let Some(path) = listen.strip_prefix("unix://") {
        // A stale socket from an earlier run would make bind fail.
        let _ = std::fs::remove_file(path);
    }
    let runtime = Arc::new(Runtime::default());
    let (shutdown_tx, shutdown_rx) = mpsc::channel();
    let server = serve(&listen, &runtime, GuestFacts::default(), shutdown_tx)?;
    tracing::info!(%listen, "serving");
    let _ = shutdown_rx.recv();
    runtime.kill_all();
    server.shutdown();
    Ok(())
}

fn run_as_init(started: Instant) -> anyhow::Result<()> {
    boot::mount_api_filesystems().context("mounting the API filesystems")?;
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let config: BootConfig = boot::parse_cmdline(&cmdline)?;
    init_logging(config.debug);
    // SAFETY: called before any other thread exists (the logger spawns none), so no
    // concurrent reader of the environment can observe the change.
    unsafe {
        std::env::set_var(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        );
    }

    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    let list = config
        .module_list
        .clone()
        .unwrap_or_else(|| boot::DEFAULT_MODULE_LIST.into());
    let loaded_modules = boot::load_modules(&list, &release)?;
    tracing::info!(modules = loaded_modules.len(), "kernel modules loaded");
    // After the virtio stack; on its own thread, so serving does not wait for it.
    let nvidia = gpuvm_agent::nvidia::Driver::start(config.nvidia, release);

    if let Err(error) = boot::link_up("lo") {
        tracing::warn!("{}", gpuvm_agent::error::chain(&error));
    }
    if let Some(ip) = &config.ip {
        boot::configure_ip(ip)?;
    }
    let shared_dir = match &config.share_tag {
        Some(tag) => Some(boot::mount_share(tag)?),
        None => None,
    };

    let listen = config
        .listen
        .clone()
        .unwrap_or_else(|| format!("vsock://-1:{AGENT_VSOCK_PORT}"));
    let runtime = match Cgroups::setup(Path::new("/sys/fs/cgroup")) {
        Ok(cgroups) => Runtime::with_cgroups(cgroups),
        Err(error) => {
            tracing::warn!(
                "{}; containers share the root cgroup and OOM kills are judged guest-wide",
                gpuvm_agent::error::chain(&error)
            );
            Runtime::default()
        }
    };
    let runtime = Arc::new(runtime);
    let (shutdown_tx, shutdown_rx) = mpsc::channel();
    let facts = GuestFacts {
        loaded_modules,
        shared_dir: shared_dir.clone(),
        in_guest: true,
        nvidia,
        ..GuestFacts::default()
    };
    let listening = Arc::clone(&facts.listening_uptime_ns);
    let _server = serve(&listen, &runtime, facts, shutdown_tx)?;
    let uptime_ns = procfs::parse_uptime_ns(&procfs::read("/proc/uptime")).unwrap_or(0);
    listening.store(uptime_ns, Ordering::Relaxed);
    tracing::info!(
        %listen,
        agent_ms = started.elapsed().as_millis() as u64,
        kernel_boot_to_listen_ms = uptime_ns / 1_000_000,
        "agent ready"
    );

    let _ = shutdown_rx.recv();
    let stopping = Instant::now();
    let left = kill_everything(&runtime, Duration::from_secs(5));
    if left.is_empty() {
        tracing::info!(
            ms = stopping.elapsed().as_millis() as u64,
            "every process killed and reaped"
        );
    } else {
        tracing::warn!(?left, "processes still there at power-off");
    }
    nix::unistd::sync();
    if let Some(dir) = shared_dir {
        let _ = nix::mount::umount2(dir.as_path(), nix::mount::MntFlags::MNT_DETACH);
    }
    power_off();
    Ok(())
}

/// SIGKILLs every process but PID 1 until none is left (the reaper collects them),
/// or `timeout` passes; returns the pids still there.
fn kill_everything(runtime: &Runtime, timeout: Duration) -> Vec<u32> {
    runtime.kill_all();
    let deadline = Instant::now() + timeout;
    loop {
        // Strays included: kill(-1) spares only PID 1. Repeated, since a process may
        // fork between two rounds.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(-1),
            nix::sys::signal::Signal::SIGKILL,
        );
        let left = procfs::user_pids(&procfs::all_pid_stats(Path::new("/proc")));
        if left.is_empty() || Instant::now() >= deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn serve(
    listen: &str,
    runtime: &Arc<Runtime>,
    facts: GuestFacts,
    shutdown: mpsc::Sender<()>,
) -> anyhow::Result<ttrpc::Server> {
    let methods = AgentService::new(Arc::clone(runtime), facts, shutdown).into_methods();
    // Right after the vsock transport module loads, bind can briefly fail.
    let mut attempt = 0;
    let mut server = loop {
        match ttrpc::Server::new().bind(listen) {
            Ok(server) => break server,
            Err(error) if attempt < 50 && listen.starts_with("vsock://") => {
                attempt += 1;
                tracing::debug!("bind {listen} failed, retrying: {error}");
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(error) => return Err(anyhow::anyhow!("binding {listen} failed: {error}")),
        }
    }
    .register_service(methods)
    // Blocking calls (WaitProcess, the stdio long-polls) each hold a worker thread.
    .set_thread_count_max(256);
    server
        .start()
        .map_err(|e| anyhow::anyhow!("starting the ttrpc server failed: {e}"))?;
    Ok(server)
}

fn power_off() {
    nix::unistd::sync();
    if std::process::id() != 1 || !Path::new("/proc/1").exists() {
        return;
    }
    // Only ever reached as PID 1 inside the guest.
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    // reboot() does not return on success.
    loop {
        std::thread::sleep(Duration::from_secs(60));
    }
}
