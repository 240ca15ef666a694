//! One managed process: its state machine, its stdio, how it is spawned into a
//! container, and the reaper that records its exit.
//!
//! State machine: `Created → Starting → Running → Exited`. A failed start returns to
//! `Created`. Only the reaper moves a process to `Exited`.

use std::collections::HashMap;
use std::ffi::CString;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, SystemTime};

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, FdFlag, OFlag, fcntl, open};
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, setns, unshare};
use nix::sys::resource::setrlimit;
use nix::sys::signal::{Signal, kill};
use nix::sys::stat::Mode;
use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid, waitpid};
use nix::unistd::{
    Gid, Pid, Uid, chdir, chroot, fchdir, pivot_root, setgroups, setresgid, setresuid, setsid,
};

use crate::cgroup::{OomCounter, was_oom_killed};
use crate::error::{Error, Result};
use crate::mounts::{GuestMounts, SourceKind, Step, plan_mounts};
use crate::security::{CapabilitySets, NamespaceMode, Namespaces, SeccompFilters};
use crate::spec::{ConsoleSize, ContainerSpec, ProcessSpec, join_in_root};
use crate::stream::OutputBuffer;

/// How a process exited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitInfo {
    /// Its pid.
    pub pid: u32,
    /// Exit code, or 128 + signal.
    pub exit_status: u32,
    /// The terminating signal, 0 for a normal exit.
    pub signal: u32,
    /// When the reaper collected it.
    pub exited_at: SystemTime,
    /// The kernel's OOM killer ended it (see [`was_oom_killed`]).
    pub oom_killed: bool,
}

impl ExitInfo {
    fn from_wait_status(status: WaitStatus, exited_at: SystemTime) -> Option<Self> {
        let (pid, exit_status, signal) = match status {
            WaitStatus::Exited(pid, code) => (pid, u32::try_from(code).unwrap_or(255), 0),
            WaitStatus::Signaled(pid, signal, _) => {
                let number = signal as u32;
                (pid, 128 + number, number)
            }
            _ => return None,
        };
        Some(Self {
            pid: u32::try_from(pid.as_raw()).ok()?,
            exit_status,
            signal,
            exited_at,
            oom_killed: false,
        })
    }
}

/// Where a process is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Registered, not started.
    Created,
    /// Being spawned right now.
    Starting,
    /// Running with this pid.
    Running(u32),
    /// Reaped.
    Exited(ExitInfo),
}

impl State {
    /// A short name for messages.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Starting => "starting",
            Self::Running(_) => "running",
            Self::Exited(_) => "exited",
        }
    }
}

/// The OOM counter a process is judged by, as it was when the process started.
#[derive(Debug)]
struct OomWatch {
    counter: OomCounter,
    before: Option<u64>,
    /// An init process watched through its container's own cgroup.
    container_scope: bool,
}

#[derive(Debug)]
struct Status {
    state: State,
    deleted: bool,
}

/// One process the agent manages.
#[derive(Debug)]
pub struct Process {
    /// Its container.
    pub container_id: String,
    /// Its exec id; empty for the container's init process.
    pub exec_id: String,
    /// What to run.
    pub spec: ProcessSpec,
    status: Mutex<Status>,
    changed: Condvar,
    /// Standard output (and standard error, on a terminal).
    pub stdout: OutputBuffer,
    /// Standard error.
    pub stderr: OutputBuffer,
    stdin: Mutex<Option<File>>,
    pty_master: Mutex<Option<OwnedFd>>,
    oom: Mutex<Option<OomWatch>>,
}

/// How a process enters its container.
#[derive(Debug)]
pub enum Launch<'a> {
    /// In the agent's own root and namespaces, under the container's seccomp filter.
    Guest(&'a ContainerSpec),
    /// A new mount namespace rooted at the container's rootfs, and the container's
    /// pid/ipc/uts namespaces.
    NewContainer(&'a ContainerSpec),
    /// The namespaces and root of the running process `init_pid`.
    JoinContainer {
        /// The container's init process.
        init_pid: u32,
        /// Its container.
        container: &'a ContainerSpec,
    },
}

impl Launch<'_> {
    fn container(&self) -> &ContainerSpec {
        match self {
            Self::Guest(container)
            | Self::NewContainer(container)
            | Self::JoinContainer { container, .. } => container,
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // All guarded state stays consistent across a panic of another thread.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Process {
    /// A new process in the `Created` state.
    pub fn new(container_id: &str, exec_id: &str, spec: ProcessSpec) -> Arc<Self> {
        Arc::new(Self {
            container_id: container_id.to_string(),
            exec_id: exec_id.to_string(),
            spec,
            status: Mutex::new(Status {
                state: State::Created,
                deleted: false,
            }),
            changed: Condvar::new(),
            stdout: OutputBuffer::default(),
            stderr: OutputBuffer::default(),
            stdin: Mutex::new(None),
            pty_master: Mutex::new(None),
            oom: Mutex::new(None),
        })
    }

    /// The current state.
    pub fn state(&self) -> State {
        lock(&self.status).state
    }

    /// The pid while running or after exit.
    pub fn pid(&self) -> Option<u32> {
        match self.state() {
            State::Running(pid) => Some(pid),
            State::Exited(exit) => Some(exit.pid),
            State::Created | State::Starting => None,
        }
    }

    fn wrong_state(&self, expected: &'static str, actual: State) -> Error {
        Error::WrongState {
            container_id: self.container_id.clone(),
            exec_id: self.exec_id.clone(),
            expected,
            actual: actual.name(),
        }
    }

    fn not_found(&self) -> Error {
        Error::ProcessNotFound {
            container_id: self.container_id.clone(),
            exec_id: self.exec_id.clone(),
        }
    }

    /// Spawns the process, in the cgroup directory `cgroup` if given, and returns
    /// its pid.
    pub fn start(self: &Arc<Self>, launch: Launch<'_>, cgroup: Option<&Path>) -> Result<u32> {
        {
            let mut status = lock(&self.status);
            if status.state != State::Created {
                return Err(self.wrong_state("created", status.state));
            }
            status.state = State::Starting;
        }
        match self.spawn(launch, cgroup) {
            Ok(pid) => {
                let mut status = lock(&self.status);
                // The reaper may already have recorded a very short-lived process.
                if status.state == State::Starting {
                    status.state = State::Running(pid);
                }
                self.changed.notify_all();
                Ok(pid)
            }
            Err(error) => {
                lock(&self.status).state = State::Created;
                Err(error)
            }
        }
    }

    fn spawn(self: &Arc<Self>, launch: Launch<'_>, cgroup: Option<&Path>) -> Result<u32> {
        let spec = &self.spec;
        let Prepared {
            setup,
            host_root,
            failures,
            namespaces,
        } = ChildSetup::prepare(spec, &launch, cgroup)?;
        // The baseline predates the process, so any kill of it counts.
        let counter = OomCounter::for_cgroup(cgroup);
        *lock(&self.oom) = Some(OomWatch {
            before: counter.read(),
            container_scope: self.exec_id.is_empty() && matches!(counter, OomCounter::Cgroup(_)),
            counter,
        });
        let mut command = Command::new(&spec.args[0]);
        command
            .args(&spec.args[1..])
            .env_clear()
            .envs(spec.env.iter().map(|(k, v)| (k, v)));

        let mut pty_master = None;
        if spec.terminal {
            let pty = nix::pty::openpty(spec.console_size.map(winsize).as_ref(), None)
                .map_err(|e| Error::io("Opening a pseudo-terminal", e))?;
            set_cloexec(&pty.master)?;
            let clone = |fd: &OwnedFd| {
                fd.try_clone()
                    .map_err(|e| Error::io("Duplicating the terminal", e))
            };
            command
                .stdin(clone(&pty.slave)?)
                .stdout(clone(&pty.slave)?)
                .stderr(pty.slave);
            pty_master = Some(pty.master);
        } else {
            command
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
        }
        let terminal = spec.terminal;
        // SAFETY: the closure runs in the forked child before exec. It only makes
        // system calls on values prepared before the fork (no allocation, no locks),
        // which is what `pre_exec` requires.
        unsafe {
            command.pre_exec(move || setup.run_in_child(terminal));
        }

        // Started here, outside the namespaces: a thread whose new pid namespace is
        // pending cannot create threads (EINVAL), and the reaper is one.
        let reaper = reaper();
        let spawned = namespaces.run(|| reaper.track(self, || command.spawn()))?;
        let child = spawned.map_err(|source| {
            if let Some(step) = failures.failed_step(spec) {
                Error::ContainerSetup { step, source }
            } else if source.raw_os_error() == Some(libc::ENOENT)
                && !program_exists(&host_root, spec)
            {
                Error::ExecutableNotFound {
                    program: spec.args[0].clone(),
                    path: spec.path_env().unwrap_or(DEFAULT_EXEC_PATH).to_string(),
                }
            } else {
                Error::Spawn {
                    program: spec.args[0].clone(),
                    source,
                }
            }
        })?;
        let pid = child.id();
        let mut child = child;
        if let Some(master) = pty_master {
            let reader = File::from(
                master
                    .try_clone()
                    .map_err(|e| Error::io("Duplicating the terminal", e))?,
            );
            let writer = File::from(
                master
                    .try_clone()
                    .map_err(|e| Error::io("Duplicating the terminal", e))?,
            );
            *lock(&self.stdin) = Some(writer);
            *lock(&self.pty_master) = Some(master);
            self.stderr.close();
            self.pump_output(reader, true);
        } else {
            if let Some(stdin) = child.stdin.take() {
                *lock(&self.stdin) = Some(File::from(OwnedFd::from(stdin)));
            }
            if let Some(stdout) = child.stdout.take() {
                self.pump_output(stdout, true);
            }
            if let Some(stderr) = child.stderr.take() {
                self.pump_output(stderr, false);
            }
        }
        // Dropping `child` neither waits nor kills: the reaper owns the exit status.
        drop(child);
        Ok(pid)
    }

    fn pump_output(self: &Arc<Self>, source: impl io::Read + Send + 'static, stdout: bool) {
        let process = Arc::clone(self);
        std::thread::spawn(move || {
            let buffer = if stdout {
                &process.stdout
            } else {
                &process.stderr
            };
            buffer.fill_from(source);
        });
    }

    fn set_exited(&self, mut exit: ExitInfo) {
        if let Some(watch) = lock(&self.oom).as_ref() {
            exit.oom_killed = was_oom_killed(
                watch.before,
                watch.counter.read(),
                exit.signal,
                watch.container_scope,
            );
        }
        let mut status = lock(&self.status);
        status.state = State::Exited(exit);
        self.changed.notify_all();
    }

    /// Blocks until the process has exited.
    pub fn wait(&self) -> Result<ExitInfo> {
        let mut status = lock(&self.status);
        loop {
            if status.deleted {
                return Err(self.not_found());
            }
            if let State::Exited(exit) = status.state {
                return Ok(exit);
            }
            status = self
                .changed
                .wait(status)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Sends `signal` to the process.
    pub fn signal(&self, signal: Signal) -> Result<()> {
        match self.state() {
            State::Running(pid) => send_signal(pid, signal),
            other => Err(self.wrong_state("running", other)),
        }
    }

    /// Writes to the process's standard input.
    pub fn write_stdin(&self, data: &[u8]) -> Result<usize> {
        let mut stdin = lock(&self.stdin);
        let Some(file) = stdin.as_mut() else {
            return Err(self.wrong_state("running with an open stdin", self.state()));
        };
        file.write_all(data)
            .map_err(|e| Error::io("Writing to the process's stdin", e))?;
        Ok(data.len())
    }

    /// Closes standard input (on a terminal: sends end-of-file, ^D).
    pub fn close_stdin(&self) -> Result<()> {
        let mut stdin = lock(&self.stdin);
        // A pty has no half-close: EOT at the start of a line is end-of-file.
        if self.spec.terminal
            && let Some(file) = stdin.as_mut()
        {
            file.write_all(&[4])
                .map_err(|e| Error::io("Writing to the terminal", e))?;
        }
        stdin.take();
        Ok(())
    }

    /// Sets the terminal size.
    pub fn resize(&self, size: ConsoleSize) -> Result<()> {
        let master = lock(&self.pty_master);
        let Some(master) = master.as_ref() else {
            return Err(Error::invalid("the process has no terminal"));
        };
        let ws = winsize(size);
        // SAFETY: TIOCSWINSZ reads one `winsize` from the pointer, which is valid for
        // the duration of the call; the fd is an open pty master.
        let rc = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
        if rc < 0 {
            return Err(Error::io(
                "Resizing the terminal",
                io::Error::last_os_error(),
            ));
        }
        Ok(())
    }

    /// Forgets the process: wakes waiters and readers, drops buffered output.
    pub fn mark_deleted(&self) {
        lock(&self.status).deleted = true;
        self.changed.notify_all();
        self.stdout.discard();
        self.stderr.discard();
        lock(&self.stdin).take();
        lock(&self.pty_master).take();
    }
}

/// How a process run to its end went ([`Process::run_to_completion`]).
#[derive(Debug)]
pub struct Finished {
    /// Its exit.
    pub exit: ExitInfo,
    /// Its standard output.
    pub stdout: Vec<u8>,
    /// Its standard error.
    pub stderr: Vec<u8>,
}

impl Process {
    /// Starts the process (no cgroup), collects its output and waits for its exit;
    /// after `timeout` it is SIGKILLed and the call fails. For the agent's own short
    /// helpers (the GPU check, `ldconfig`); the reaper, not `waitpid`, sees the exit.
    pub fn run_to_completion(
        self: &Arc<Self>,
        launch: Launch<'_>,
        timeout: Duration,
    ) -> Result<Finished> {
        let deadline = std::time::Instant::now() + timeout;
        let pid = self.start(launch, None)?;
        let result = self.collect(pid, deadline);
        // Unblocks output pumps stuck on a full buffer (a process that printed more
        // than a buffer holds before the deadline).
        self.stdout.discard();
        self.stderr.discard();
        result
    }

    fn collect(&self, pid: u32, deadline: std::time::Instant) -> Result<Finished> {
        let drain = |buffer: &OutputBuffer| {
            let mut out = Vec::new();
            loop {
                let chunk = buffer.read(0, Duration::from_millis(200));
                out.extend(chunk.data);
                if chunk.eof || std::time::Instant::now() >= deadline {
                    break out;
                }
            }
        };
        let stdout = drain(&self.stdout);
        let stderr = drain(&self.stderr);
        let mut status = lock(&self.status);
        loop {
            if let State::Exited(exit) = status.state {
                return Ok(Finished {
                    exit,
                    stdout,
                    stderr,
                });
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                drop(status);
                send_signal(pid, Signal::SIGKILL)?;
                return Err(Error::io(
                    format!("Running {}", self.spec.args[0]),
                    io::Error::from(io::ErrorKind::TimedOut),
                ));
            }
            status = self
                .changed
                .wait_timeout(status, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

/// Sends a signal to a pid, ignoring a process that is already gone.
pub fn send_signal(pid: u32, signal: Signal) -> Result<()> {
    let raw = i32::try_from(pid).map_err(|_| Error::invalid("the pid is out of range"))?;
    match kill(Pid::from_raw(raw), signal) {
        Ok(()) | Err(Errno::ESRCH) => Ok(()),
        Err(e) => Err(Error::io(format!("Sending {signal} to pid {pid}"), e)),
    }
}

fn winsize(size: ConsoleSize) -> nix::pty::Winsize {
    nix::pty::Winsize {
        ws_row: size.rows,
        ws_col: size.columns,
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

fn set_cloexec(fd: &OwnedFd) -> Result<()> {
    fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))
        .map(drop)
        .map_err(|e| Error::io("Setting close-on-exec", e))
}

/// glibc's `execvp` search path when `PATH` is unset.
const DEFAULT_EXEC_PATH: &str = "/bin:/usr/bin";

/// Whether `execvp` could find the program, judged from the agent's view of the
/// container root. Only used to explain an ENOENT from the child.
fn program_exists(root: &Path, spec: &ProcessSpec) -> bool {
    let program = &spec.args[0];
    let candidates: Vec<PathBuf> = if program.contains('/') {
        let inside = spec.cwd.join(program);
        vec![join_in_root(root, &inside)]
    } else {
        spec.path_env()
            .unwrap_or(DEFAULT_EXEC_PATH)
            .split(':')
            .map(|dir| {
                join_in_root(
                    root,
                    &Path::new(if dir.is_empty() { "." } else { dir }).join(program),
                )
            })
            .collect()
    };
    candidates
        .iter()
        .any(|path| path.symlink_metadata().is_ok())
}

fn cstring(path: &Path) -> Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| Error::invalid(format!("the path {} contains a NUL byte", path.display())))
}

fn optional_cstring(value: &str) -> Result<Option<CString>> {
    if value.is_empty() {
        return Ok(None);
    }
    CString::new(value)
        .map(Some)
        .map_err(|_| Error::invalid(format!("{value:?} contains a NUL byte")))
}

/// A planned mount step as C strings, ready for the child. Paths are relative to
/// the container's rootfs and resolved in the child with `openat2(RESOLVE_IN_ROOT)`
/// from a descriptor of the rootfs, so a symlink in the image (even an absolute one,
/// or `..`) can never make the agent create, change or mount over anything outside
/// the rootfs: it resolves as if the rootfs were `/` (what runc's securejoin does).
#[derive(Debug)]
enum ChildStep {
    MakeDir(InRoot),
    MakeFile(InRoot),
    Mount {
        source: Option<CString>,
        target: InRoot,
        fstype: Option<CString>,
        flags: MsFlags,
        data: Option<CString>,
    },
    Remount {
        target: InRoot,
        flags: MsFlags,
    },
    CharDevice {
        path: InRoot,
        dev: libc::dev_t,
    },
    Symlink {
        target: CString,
        link: InRoot,
    },
}

/// A path inside the rootfs: the whole (relative) path, and split into the parent
/// directory and the last component for the calls that create an entry.
#[derive(Debug)]
struct InRoot {
    path: CString,
    parent: CString,
    name: CString,
}

impl InRoot {
    fn new(rootfs: &Path, path: &Path) -> Result<Self> {
        let relative = path.strip_prefix(rootfs).map_err(|_| {
            Error::invalid(format!(
                "the mount path {} is outside the rootfs {}",
                path.display(),
                rootfs.display()
            ))
        })?;
        let parent = relative
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let name = relative.file_name().ok_or_else(|| {
            Error::invalid(format!("the mount path {} has no name", path.display()))
        })?;
        Ok(Self {
            path: cstring(relative)?,
            parent: cstring(parent)?,
            name: cstring(Path::new(name))?,
        })
    }
}

/// `/proc/self/fd/<fd>` in a stack buffer: the child may not allocate.
struct FdPath([u8; 32]);

impl FdPath {
    fn of(fd: &OwnedFd) -> Self {
        const PREFIX: &[u8] = b"/proc/self/fd/";
        let mut buf = [0u8; 32];
        buf[..PREFIX.len()].copy_from_slice(PREFIX);
        let mut digits = [0u8; 12];
        let mut n = u32::try_from(fd.as_raw_fd()).unwrap_or(0);
        let mut len = 0;
        loop {
            digits[len] = b'0' + (n % 10) as u8;
            len += 1;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        for (i, digit) in digits[..len].iter().rev().enumerate() {
            buf[PREFIX.len() + i] = *digit;
        }
        Self(buf)
    }

    fn as_c_str(&self) -> &std::ffi::CStr {
        std::ffi::CStr::from_bytes_until_nul(&self.0).unwrap_or(c"/proc/self/fd/")
    }
}

fn errno(e: rustix::io::Errno) -> Errno {
    Errno::from_raw(e.raw_os_error())
}

/// In the child: opens `path` under `root` as if `root` were `/`.
fn open_in_root(
    root: &OwnedFd,
    path: &std::ffi::CStr,
    flags: rustix::fs::OFlags,
    mode: rustix::fs::Mode,
) -> nix::Result<OwnedFd> {
    use rustix::fs::{OFlags, ResolveFlags};
    rustix::fs::openat2(
        root,
        path,
        flags | OFlags::CLOEXEC,
        mode,
        ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
    )
    .map_err(errno)
}

/// In the child: an `O_PATH` descriptor of the entry at `path`, for the calls that
/// take a path (mount, chmod), through `/proc/self/fd`.
fn open_path(root: &OwnedFd, path: &std::ffi::CStr) -> nix::Result<OwnedFd> {
    open_in_root(
        root,
        path,
        rustix::fs::OFlags::PATH,
        rustix::fs::Mode::empty(),
    )
}

fn open_parent(root: &OwnedFd, at: &InRoot) -> nix::Result<OwnedFd> {
    open_in_root(
        root,
        &at.parent,
        rustix::fs::OFlags::PATH | rustix::fs::OFlags::DIRECTORY,
        rustix::fs::Mode::empty(),
    )
}

impl ChildStep {
    fn from_step(rootfs: &Path, step: &Step) -> Result<Self> {
        let in_root = |path: &Path| InRoot::new(rootfs, path);
        Ok(match step {
            Step::MakeDir(path) => Self::MakeDir(in_root(path)?),
            Step::MakeFile(path) => Self::MakeFile(in_root(path)?),
            Step::Mount {
                source,
                target,
                fstype,
                flags,
                data,
            } => Self::Mount {
                source: optional_cstring(source.as_deref().unwrap_or(""))?,
                target: in_root(target)?,
                fstype: optional_cstring(fstype.as_deref().unwrap_or(""))?,
                flags: *flags,
                data: optional_cstring(data)?,
            },
            Step::RemountReadOnly { target, flags } => Self::Remount {
                target: in_root(target)?,
                flags: MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY | *flags,
            },
            Step::Propagation { target, flags } => Self::Remount {
                target: in_root(target)?,
                flags: *flags,
            },
            Step::CharDevice { path, major, minor } => Self::CharDevice {
                path: in_root(path)?,
                dev: nix::sys::stat::makedev(*major, *minor),
            },
            Step::Symlink { target, link } => Self::Symlink {
                target: cstring(target)?,
                link: in_root(link)?,
            },
        })
    }

    /// Runs in the child: system calls only, on values prepared before the fork.
    /// `root` is a descriptor of the (bind-mounted) rootfs.
    fn run(&self, root: &OwnedFd) -> nix::Result<()> {
        const NONE: Option<&'static std::ffi::CStr> = None;
        let existing_is_fine = |result: nix::Result<()>| match result {
            Err(Errno::EEXIST) => Ok(()),
            other => other,
        };
        match self {
            Self::MakeDir(at) => {
                let parent = open_parent(root, at)?;
                existing_is_fine(nix::sys::stat::mkdirat(
                    &parent,
                    at.name.as_c_str(),
                    Mode::from_bits_truncate(0o755),
                ))
            }
            Self::MakeFile(at) => open_in_root(
                root,
                &at.path,
                rustix::fs::OFlags::CREATE | rustix::fs::OFlags::WRONLY,
                rustix::fs::Mode::from_bits_truncate(0o644),
            )
            .map(drop),
            Self::Mount {
                source,
                target,
                fstype,
                flags,
                data,
            } => {
                let target = open_path(root, &target.path)?;
                mount(
                    source.as_deref(),
                    FdPath::of(&target).as_c_str(),
                    fstype.as_deref(),
                    *flags,
                    data.as_deref(),
                )
            }
            Self::Remount { target, flags } => {
                // Opened now, after the mount, so the descriptor names the mount.
                let target = open_path(root, &target.path)?;
                mount(NONE, FdPath::of(&target).as_c_str(), NONE, *flags, NONE)
            }
            Self::CharDevice { path, dev } => {
                let mode = Mode::from_bits_truncate(0o666);
                let parent = open_parent(root, path)?;
                existing_is_fine(nix::sys::stat::mknodat(
                    &parent,
                    path.name.as_c_str(),
                    nix::sys::stat::SFlag::S_IFCHR,
                    mode,
                    *dev,
                ))?;
                // mknod applies the umask. chmod through the in-root descriptor:
                // the name may be a symlink the image planted.
                let node = open_path(root, &path.path)?;
                nix::sys::stat::fchmodat(
                    nix::fcntl::AT_FDCWD,
                    FdPath::of(&node).as_c_str(),
                    mode,
                    nix::sys::stat::FchmodatFlags::FollowSymlink,
                )
            }
            Self::Symlink { target, link } => {
                let parent = open_parent(root, link)?;
                existing_is_fine(nix::unistd::symlinkat(
                    target.as_c_str(),
                    &parent,
                    link.name.as_c_str(),
                ))
            }
        }
    }
}

#[derive(Debug)]
enum Root {
    Guest,
    New {
        rootfs: CString,
        steps: Vec<ChildStep>,
        readonly: bool,
    },
    Join {
        mnt_ns: OwnedFd,
        root: OwnedFd,
    },
}

/// A stage of the child's setup, reported to the parent when it fails.
#[derive(Debug, Clone, Copy)]
enum Phase {
    Session = 0,
    Terminal,
    Cgroup,
    MountNamespace,
    RootfsBind,
    EnterRoot,
    ReadOnlyRoot,
    JoinContainer,
    Rlimits,
    Groups,
    Credentials,
    WorkingDirectory,
    NoNewPrivileges,
    Seccomp,
    CapabilityBounding,
    Capabilities,
}

impl Phase {
    const ALL: [Phase; 16] = [
        Phase::Session,
        Phase::Terminal,
        Phase::Cgroup,
        Phase::MountNamespace,
        Phase::RootfsBind,
        Phase::EnterRoot,
        Phase::ReadOnlyRoot,
        Phase::JoinContainer,
        Phase::Rlimits,
        Phase::Groups,
        Phase::Credentials,
        Phase::WorkingDirectory,
        Phase::NoNewPrivileges,
        Phase::Seccomp,
        Phase::CapabilityBounding,
        Phase::Capabilities,
    ];

    fn describe(self, spec: &ProcessSpec) -> String {
        match self {
            Self::Session => "Starting a session".into(),
            Self::Terminal => "Taking the terminal".into(),
            Self::Cgroup => "Joining the container's cgroup".into(),
            Self::MountNamespace => "Creating the mount namespace".into(),
            Self::RootfsBind => "Bind-mounting the rootfs".into(),
            Self::EnterRoot => "Entering the rootfs".into(),
            Self::ReadOnlyRoot => "Making the rootfs read-only".into(),
            Self::JoinContainer => "Joining the container's mount namespace".into(),
            Self::Rlimits => "Setting the resource limits".into(),
            Self::Groups => "Setting the supplementary groups".into(),
            Self::Credentials => format!("Switching to uid {} gid {}", spec.uid, spec.gid),
            Self::WorkingDirectory => {
                format!("Changing to the working directory {}", spec.cwd.display())
            }
            Self::NoNewPrivileges => "Setting no_new_privs".into(),
            Self::Seccomp => "Loading the seccomp filter".into(),
            Self::CapabilityBounding => "Dropping capabilities from the bounding set".into(),
            Self::Capabilities => "Setting the capabilities".into(),
        }
    }
}

/// In the child: drops every capability not in `keep` from the bounding set.
fn drop_bounding(keep: u64) -> io::Result<()> {
    use rustix::thread::{CapabilitySet, remove_capability_from_bounding_set};
    for bit in 0..64 {
        let cap = 1u64 << bit;
        if keep & cap != 0 {
            continue;
        }
        match remove_capability_from_bounding_set(CapabilitySet::from_bits_retain(cap)) {
            // Numbers past the kernel's last capability.
            Ok(()) | Err(rustix::io::Errno::INVAL) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// In the child: sets the effective, permitted and inheritable sets, then the
/// ambient set (a capability the kernel refuses there is skipped, as runc does).
fn set_capabilities(caps: &CapabilitySets) -> io::Result<()> {
    use rustix::thread::{
        CapabilitySet, clear_ambient_capability_set, configure_capability_in_ambient_set,
    };
    rustix::thread::set_capabilities(
        None,
        rustix::thread::CapabilitySets {
            effective: CapabilitySet::from_bits_retain(caps.effective),
            permitted: CapabilitySet::from_bits_retain(caps.permitted),
            inheritable: CapabilitySet::from_bits_retain(caps.inheritable),
        },
    )?;
    clear_ambient_capability_set()?;
    for bit in 0..64 {
        let cap = 1u64 << bit;
        if caps.ambient & cap != 0 {
            let _ = configure_capability_in_ambient_set(CapabilitySet::from_bits_retain(cap), true);
        }
    }
    Ok(())
}

/// In the child: loads the compiled filters, in order.
fn load_seccomp(filters: &SeccompFilters) -> io::Result<()> {
    for program in &filters.programs {
        let len =
            u16::try_from(program.len()).map_err(|_| io::Error::from_raw_os_error(libc::E2BIG))?;
        let fprog = libc::sock_fprog {
            len,
            // seccompiler's `sock_filter` is `#[repr(C)]` with the kernel's layout.
            filter: program.as_ptr().cast::<libc::sock_filter>().cast_mut(),
        };
        // SAFETY: seccomp(2) reads `fprog` and the `len` instructions it points to,
        // which live in `filters` for the duration of the call; the kernel copies them.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                libc::c_ulong::from(filters.flags),
                &raw const fprog,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Set in a failure report for a mount step (the rest is its index).
const STEP_REPORT: u32 = 1 << 31;

/// Everything the child does between fork and exec, prepared in the parent.
#[derive(Debug)]
struct ChildSetup {
    root: Root,
    /// `cgroup.procs` of the container's group, written before anything else.
    cgroup_procs: Option<OwnedFd>,
    /// Write end of the pipe on which a failing child names the step that failed.
    report: OwnedFd,
    rlimits: Vec<crate::spec::Rlimit>,
    groups: Vec<Gid>,
    uid: Uid,
    gid: Gid,
    cwd: CString,
    umask: Mode,
    capabilities: Option<CapabilitySets>,
    no_new_privileges: bool,
    seccomp: Option<SeccompFilters>,
}

/// A prepared child, and the parent's means to explain its failure.
#[derive(Debug)]
struct Prepared {
    setup: ChildSetup,
    /// The container root as the agent sees it.
    host_root: PathBuf,
    failures: FailureReport,
    /// Namespaces the spawning thread enters before the fork.
    namespaces: ThreadNamespaces,
}

/// The pid, ipc and uts namespaces a child is forked into.
///
/// A new (or joined) pid namespace only applies to the children of the caller, so
/// it cannot be entered in the child between fork and exec: a short-lived thread
/// enters the namespaces and forks the child. Namespaces are per thread, so the
/// agent's other threads never see them.
#[derive(Debug)]
struct ThreadNamespaces {
    unshare: CloneFlags,
    join: Vec<(OwnedFd, CloneFlags)>,
}

impl Default for ThreadNamespaces {
    fn default() -> Self {
        Self {
            unshare: CloneFlags::empty(),
            join: Vec::new(),
        }
    }
}

fn clone_flag(kind: &str) -> CloneFlags {
    match kind {
        "pid" => CloneFlags::CLONE_NEWPID,
        "ipc" => CloneFlags::CLONE_NEWIPC,
        _ => CloneFlags::CLONE_NEWUTS,
    }
}

fn open_namespace(path: &Path) -> Result<OwnedFd> {
    open(path, OFlag::O_RDONLY | OFlag::O_CLOEXEC, Mode::empty())
        .map_err(|e| Error::io(format!("Opening the namespace {}", path.display()), e))
}

impl ThreadNamespaces {
    /// A new container's: new ones, or the ones at the given paths.
    fn for_container(namespaces: &Namespaces) -> Result<Self> {
        let mut out = Self::default();
        for (kind, mode) in [
            ("pid", &namespaces.pid),
            ("ipc", &namespaces.ipc),
            ("uts", &namespaces.uts),
        ] {
            match mode {
                NamespaceMode::Shared => {}
                NamespaceMode::New => out.unshare |= clone_flag(kind),
                NamespaceMode::Join(path) => {
                    out.join.push((open_namespace(path)?, clone_flag(kind)))
                }
            }
        }
        Ok(out)
    }

    /// An exec's: those of the container's init process that are not the guest's.
    fn of_init(init_pid: u32, namespaces: &Namespaces) -> Result<Self> {
        let mut out = Self::default();
        for (kind, mode) in [
            ("pid", &namespaces.pid),
            ("ipc", &namespaces.ipc),
            ("uts", &namespaces.uts),
        ] {
            if *mode != NamespaceMode::Shared {
                let path = PathBuf::from(format!("/proc/{init_pid}/ns/{kind}"));
                out.join.push((open_namespace(&path)?, clone_flag(kind)));
            }
        }
        Ok(out)
    }

    /// Runs `spawn` on a thread inside the namespaces (on this one if there are none).
    fn run<T: Send>(&self, spawn: impl FnOnce() -> T + Send) -> Result<T> {
        if self.unshare.is_empty() && self.join.is_empty() {
            return Ok(spawn());
        }
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    for (fd, kind) in &self.join {
                        setns(fd.as_fd(), *kind)
                            .map_err(|e| Error::io("Joining the container's namespaces", e))?;
                    }
                    unshare(self.unshare)
                        .map_err(|e| Error::io("Creating the container's namespaces", e))?;
                    Ok(spawn())
                })
                .join()
                .unwrap_or_else(|_| {
                    Err(Error::io(
                        "Spawning in the container's namespaces",
                        io::Error::other("the spawning thread panicked"),
                    ))
                })
        })
    }
}

/// The parent's side of the failure report pipe.
#[derive(Debug)]
struct FailureReport {
    /// What each mount step does, for error messages.
    step_names: Vec<String>,
    /// Read end of the pipe (non-blocking).
    report: OwnedFd,
}

impl FailureReport {
    /// The step that failed in the child, if it reported one.
    fn failed_step(&self, spec: &ProcessSpec) -> Option<String> {
        let mut code = [0u8; 4];
        match nix::unistd::read(&self.report, &mut code) {
            Ok(4) => {}
            _ => return None,
        }
        let code = u32::from_ne_bytes(code);
        if code & STEP_REPORT != 0 {
            let index = usize::try_from(code & !STEP_REPORT).ok()?;
            return self.step_names.get(index).cloned();
        }
        let phase = Phase::ALL.get(usize::try_from(code).ok()?)?;
        Some(phase.describe(spec))
    }
}

impl ChildSetup {
    /// Prepares the child's setup in the parent.
    fn prepare(spec: &ProcessSpec, launch: &Launch<'_>, cgroup: Option<&Path>) -> Result<Prepared> {
        let mut step_names = Vec::new();
        let namespaces = match launch {
            Launch::Guest(_) => ThreadNamespaces::default(),
            Launch::NewContainer(container) => {
                ThreadNamespaces::for_container(&container.namespaces)?
            }
            Launch::JoinContainer {
                init_pid,
                container,
            } => ThreadNamespaces::of_init(*init_pid, &container.namespaces)?,
        };
        let (root, host_root) = match launch {
            Launch::Guest(_) => (Root::Guest, PathBuf::from("/")),
            Launch::NewContainer(container) => match &container.rootfs {
                None => (Root::Guest, PathBuf::from("/")),
                Some(rootfs) => {
                    if !rootfs.is_dir() {
                        return Err(Error::invalid(format!(
                            "the rootfs {} is not a directory in the guest",
                            rootfs.display()
                        )));
                    }
                    let mut mounts = container.mounts.clone();
                    if let Some(gpu) = &container.gpu {
                        mounts.extend(gpu.mounts.iter().cloned());
                    }
                    let mut plan =
                        plan_mounts(rootfs, &mounts, &GuestMounts::probe(), SourceKind::of)?;
                    if let Some(gpu) = &container.gpu {
                        gpu.add_steps(rootfs, &container.mounts, &mut plan);
                    }
                    for warning in &plan.warnings {
                        tracing::warn!("{warning}");
                    }
                    step_names = plan.steps.iter().map(ToString::to_string).collect();
                    let steps = plan
                        .steps
                        .iter()
                        .map(|step| ChildStep::from_step(rootfs, step))
                        .collect::<Result<_>>()?;
                    (
                        Root::New {
                            rootfs: cstring(rootfs)?,
                            steps,
                            readonly: container.readonly_rootfs,
                        },
                        rootfs.clone(),
                    )
                }
            },
            Launch::JoinContainer { container, .. } if container.rootfs.is_none() => {
                (Root::Guest, PathBuf::from("/"))
            }
            Launch::JoinContainer { init_pid, .. } => {
                let proc_dir = PathBuf::from(format!("/proc/{init_pid}"));
                let open_dir = |path: &Path, flags: OFlag| {
                    open(path, flags | OFlag::O_CLOEXEC, Mode::empty())
                        .map_err(|e| Error::io(format!("Opening {}", path.display()), e))
                };
                let mnt_ns = open_dir(&proc_dir.join("ns/mnt"), OFlag::O_RDONLY)?;
                let root = open_dir(&proc_dir.join("root"), OFlag::O_RDONLY | OFlag::O_DIRECTORY)?;
                (Root::Join { mnt_ns, root }, proc_dir.join("root"))
            }
        };
        let cgroup_procs = cgroup
            .map(|dir| {
                let procs = dir.join("cgroup.procs");
                open(&procs, OFlag::O_WRONLY | OFlag::O_CLOEXEC, Mode::empty())
                    .map_err(|e| Error::io(format!("Opening {}", procs.display()), e))
            })
            .transpose()?;
        let (report_read, report_write) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)
            .map_err(|e| Error::io("Creating a pipe", e))?;
        let setup = Self {
            root,
            cgroup_procs,
            report: report_write,
            rlimits: spec.rlimits.clone(),
            groups: spec
                .additional_gids
                .iter()
                .map(|g| Gid::from_raw(*g))
                .collect(),
            uid: Uid::from_raw(spec.uid),
            gid: Gid::from_raw(spec.gid),
            cwd: cstring(&spec.cwd)?,
            // runc's default when the spec has none.
            umask: Mode::from_bits_truncate(spec.umask.unwrap_or(0o022)),
            capabilities: spec.capabilities,
            no_new_privileges: spec.no_new_privileges,
            seccomp: launch.container().seccomp.clone(),
        };
        Ok(Prepared {
            setup,
            host_root,
            failures: FailureReport {
                step_names,
                report: report_read,
            },
            namespaces,
        })
    }

    /// In the child: tells the parent which step failed, then passes the error on.
    fn report(&self, code: u32, error: impl Into<io::Error>) -> io::Error {
        let bytes = code.to_ne_bytes();
        // SAFETY: write(2) reads 4 bytes from a live stack array; the fd is the open
        // write end of the report pipe. No allocation, as `pre_exec` requires.
        let _ = unsafe { libc::write(self.report.as_raw_fd(), bytes.as_ptr().cast(), bytes.len()) };
        error.into()
    }

    fn phase<T, E: Into<io::Error>>(
        &self,
        phase: Phase,
        result: std::result::Result<T, E>,
    ) -> io::Result<T> {
        result.map_err(|e| self.report(phase as u32, e))
    }

    /// Runs in the forked child: cgroup, session, root, limits, credentials, cwd.
    fn run_in_child(&self, terminal: bool) -> io::Result<()> {
        if let Some(procs) = &self.cgroup_procs {
            // "0" moves the writing process itself.
            self.phase(Phase::Cgroup, nix::unistd::write(procs, b"0"))?;
        }
        self.phase(Phase::Session, setsid())?;
        if terminal {
            // SAFETY: TIOCSCTTY takes an integer argument; fd 0 is the pty slave.
            if unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) } < 0 {
                return Err(self.report(Phase::Terminal as u32, io::Error::last_os_error()));
            }
        }
        match &self.root {
            Root::Guest => {}
            Root::New {
                rootfs,
                steps,
                readonly,
            } => self.enter_new_root(rootfs, steps, *readonly)?,
            Root::Join { mnt_ns, root } => {
                self.phase(
                    Phase::JoinContainer,
                    setns(mnt_ns.as_fd(), CloneFlags::CLONE_NEWNS),
                )?;
                self.phase(Phase::JoinContainer, fchdir(root))?;
                self.phase(Phase::JoinContainer, chroot("."))?;
            }
        }
        // runc sets the umask once the rootfs is ready.
        nix::sys::stat::umask(self.umask);
        for limit in &self.rlimits {
            self.phase(
                Phase::Rlimits,
                setrlimit(limit.resource, limit.soft, limit.hard),
            )?;
        }
        // From here on, runc's order (libcontainer standard_init_linux.go and
        // finalizeNamespace): no_new_privs; seccomp now if no_new_privs is off,
        // because loading a filter then needs CAP_SYS_ADMIN, which is about to go;
        // the bounding set drop while still root; setgroups/setgid/setuid with
        // PR_SET_KEEPCAPS so the permitted set survives the uid change; the working
        // directory as the new user; the effective/permitted/inheritable and ambient
        // sets; seccomp last when no_new_privs is on, so the filter judges as little
        // of the agent's own setup as possible (only what exec needs).
        if self.no_new_privileges {
            self.phase(
                Phase::NoNewPrivileges,
                rustix::thread::set_no_new_privs(true),
            )?;
        }
        if let Some(seccomp) = &self.seccomp
            && !self.no_new_privileges
        {
            self.phase(Phase::Seccomp, load_seccomp(seccomp))?;
        }
        if let Some(caps) = &self.capabilities {
            self.phase(Phase::CapabilityBounding, drop_bounding(caps.bounding))?;
            self.phase(
                Phase::Capabilities,
                rustix::thread::set_keep_capabilities(true),
            )?;
        }
        self.phase(Phase::Groups, setgroups(&self.groups))?;
        self.phase(Phase::Credentials, setresgid(self.gid, self.gid, self.gid))?;
        self.phase(Phase::Credentials, setresuid(self.uid, self.uid, self.uid))?;
        self.phase(Phase::WorkingDirectory, chdir(self.cwd.as_c_str()))?;
        if let Some(caps) = &self.capabilities {
            self.phase(
                Phase::Capabilities,
                rustix::thread::set_keep_capabilities(false),
            )?;
            self.phase(Phase::Capabilities, set_capabilities(caps))?;
        }
        if let Some(seccomp) = &self.seccomp
            && self.no_new_privileges
        {
            self.phase(Phase::Seccomp, load_seccomp(seccomp))?;
        }
        Ok(())
    }

    /// In the child: a private mount namespace with `rootfs` as `/`.
    fn enter_new_root(
        &self,
        rootfs: &CString,
        steps: &[ChildStep],
        readonly: bool,
    ) -> io::Result<()> {
        const NONE: Option<&'static std::ffi::CStr> = None;
        self.phase(Phase::MountNamespace, unshare(CloneFlags::CLONE_NEWNS))?;
        self.phase(
            Phase::MountNamespace,
            mount(
                NONE,
                c"/",
                NONE,
                MsFlags::MS_REC | MsFlags::MS_PRIVATE,
                NONE,
            ),
        )?;
        self.phase(
            Phase::RootfsBind,
            mount(
                Some(rootfs.as_c_str()),
                rootfs.as_c_str(),
                NONE,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                NONE,
            ),
        )?;
        // A descriptor of the bind mount just made (not of the directory under it),
        // from which every step resolves its paths inside the rootfs.
        let root = self.phase(
            Phase::RootfsBind,
            open(
                rootfs.as_c_str(),
                OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
                Mode::empty(),
            ),
        )?;
        for (index, step) in steps.iter().enumerate() {
            let code = STEP_REPORT | u32::try_from(index).unwrap_or(0);
            step.run(&root).map_err(|e| self.report(code, e))?;
        }
        drop(root);
        self.phase(Phase::EnterRoot, chdir(rootfs.as_c_str()))?;
        match pivot_root(".", ".") {
            Ok(()) => self.phase(Phase::EnterRoot, umount2(".", MntFlags::MNT_DETACH))?,
            // The guest's root is the initramfs, which pivot_root refuses: move the
            // rootfs over `/` and chroot into it instead (what switch_root does).
            Err(Errno::EINVAL) => {
                self.phase(
                    Phase::EnterRoot,
                    mount(Some(c"."), c"/", NONE, MsFlags::MS_MOVE, NONE),
                )?;
                self.phase(Phase::EnterRoot, chroot("."))?;
            }
            Err(e) => return Err(self.report(Phase::EnterRoot as u32, e)),
        }
        self.phase(Phase::EnterRoot, chdir(c"/"))?;
        if readonly {
            self.phase(
                Phase::ReadOnlyRoot,
                mount(
                    NONE,
                    c"/",
                    NONE,
                    MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY,
                    NONE,
                ),
            )?;
        }
        Ok(())
    }
}

/// Collects the exit status of every child of the agent.
///
/// The agent is PID 1 in the guest, so orphans are reparented to it and must be
/// reaped too; one `waitpid(-1)` loop does both. A process is registered under the
/// same lock the reaper takes, so a child that exits at once is never missed.
#[derive(Debug, Default)]
pub struct Reaper {
    tracked: Mutex<HashMap<u32, Arc<Process>>>,
    children_started: Condvar,
}

/// The process-wide reaper; starts its thread on first use.
pub fn reaper() -> &'static Reaper {
    static REAPER: OnceLock<&'static Reaper> = OnceLock::new();
    REAPER.get_or_init(|| {
        let reaper: &'static Reaper = Box::leak(Box::default());
        std::thread::Builder::new()
            .name("reaper".into())
            .spawn(|| reaper.run())
            .map(drop)
            .unwrap_or_else(|e| tracing::error!("starting the reaper failed: {e}"));
        reaper
    })
}

impl Reaper {
    /// Spawns a child under the reaper's lock and registers it.
    fn track(
        &self,
        process: &Arc<Process>,
        spawn: impl FnOnce() -> io::Result<std::process::Child>,
    ) -> io::Result<std::process::Child> {
        let mut tracked = lock(&self.tracked);
        let child = spawn()?;
        tracked.insert(child.id(), Arc::clone(process));
        self.children_started.notify_all();
        Ok(child)
    }

    fn run(&self) {
        loop {
            // Peek first and reap under the lock that `track` holds across `spawn`:
            // when exec fails, std waits for that child itself, and a concurrent
            // `waitpid(-1)` would take the status from it (std then panics).
            match waitid(Id::All, WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT) {
                Ok(peeked) => {
                    let Some(pid) = peeked.pid() else {
                        continue;
                    };
                    let mut tracked = lock(&self.tracked);
                    let Ok(status) = waitpid(pid, Some(WaitPidFlag::WNOHANG)) else {
                        // std already collected a child whose exec failed.
                        continue;
                    };
                    let exited_at = SystemTime::now();
                    let Some(exit) = ExitInfo::from_wait_status(status, exited_at) else {
                        continue;
                    };
                    let process = tracked.remove(&exit.pid);
                    drop(tracked);
                    if let Some(process) = process {
                        process.set_exited(exit);
                    }
                }
                Err(Errno::EINTR) => {}
                Err(_) => {
                    // No children right now: sleep until one is started. The timeout
                    // covers children the agent did not start itself.
                    let tracked = lock(&self.tracked);
                    let _ = self
                        .children_started
                        .wait_timeout(tracked, Duration::from_secs(1));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_info_from_wait_status() {
        let now = SystemTime::now();
        let exited =
            ExitInfo::from_wait_status(WaitStatus::Exited(Pid::from_raw(5), 3), now).unwrap();
        assert_eq!((exited.pid, exited.exit_status, exited.signal), (5, 3, 0));
        let killed = ExitInfo::from_wait_status(
            WaitStatus::Signaled(Pid::from_raw(6), Signal::SIGKILL, false),
            now,
        )
        .unwrap();
        assert_eq!((killed.exit_status, killed.signal), (137, 9));
        assert!(ExitInfo::from_wait_status(WaitStatus::StillAlive, now).is_none());
    }

    #[test]
    fn a_helper_runs_to_completion_or_is_killed_at_its_deadline() {
        let guest = ContainerSpec::default();
        let spec = |script: &str| ProcessSpec {
            args: vec!["/bin/sh".into(), "-c".into(), script.into()],
            cwd: PathBuf::from("/"),
            ..ProcessSpec::default()
        };
        let done = Process::new("helper", "", spec("echo out; echo err >&2; exit 3"))
            .run_to_completion(Launch::Guest(&guest), Duration::from_secs(30))
            .unwrap();
        assert_eq!(
            (
                done.stdout.as_slice(),
                done.stderr.as_slice(),
                done.exit.exit_status
            ),
            (&b"out\n"[..], &b"err\n"[..], 3)
        );
        let started = std::time::Instant::now();
        let err = Process::new("helper", "", spec("exec sleep 30"))
            .run_to_completion(Launch::Guest(&guest), Duration::from_millis(300))
            .unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(10));
        assert!(
            crate::error::chain(&err).starts_with("Running /bin/sh failed: timed out"),
            "{err}"
        );
    }

    #[test]
    fn program_lookup_follows_path_without_following_symlinks() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("bin")).unwrap();
        std::os::unix::fs::symlink("/does/not/exist/busybox", root.path().join("bin/sh")).unwrap();
        let spec = |args: &[&str], path: Option<&str>| ProcessSpec {
            args: args.iter().map(|s| s.to_string()).collect(),
            env: path
                .map(|p| ("PATH".to_string(), p.to_string()))
                .into_iter()
                .collect(),
            cwd: PathBuf::from("/"),
            uid: 0,
            gid: 0,
            additional_gids: vec![],
            rlimits: vec![],
            terminal: false,
            console_size: None,
            capabilities: None,
            no_new_privileges: false,
            umask: None,
        };
        assert!(program_exists(root.path(), &spec(&["sh"], None)));
        assert!(program_exists(
            root.path(),
            &spec(&["/bin/sh"], Some("/nowhere"))
        ));
        assert!(!program_exists(
            root.path(),
            &spec(&["sh"], Some("/usr/bin"))
        ));
        assert!(!program_exists(root.path(), &spec(&["nope"], None)));
    }
}
