//! A container process's security, translated from its OCI description: capability
//! sets, the seccomp filter and the pid/ipc/uts namespaces.
//!
//! Translation is pure and done once per request; the child only loads the results
//! with plain system calls (see `process.rs` for the order, which follows runc).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::str::FromStr;

use gpuvm_protocol::agent;
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch, sock_filter,
};

use crate::error::{Error, Result};

/// The five capability sets of a process, as bit masks (bit N is capability N).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CapabilitySets {
    /// Capabilities the process (and its children, through exec) can ever gain.
    pub bounding: u64,
    /// Capabilities in effect.
    pub effective: u64,
    /// Capabilities the process may make effective.
    pub permitted: u64,
    /// Capabilities kept across exec for programs with file capabilities.
    pub inheritable: u64,
    /// Capabilities kept across exec of any program (must be permitted and inheritable).
    pub ambient: u64,
}

/// Translates OCI capability names. Names that are not capabilities this agent
/// knows are returned separately, to be logged and skipped (what runc does).
pub fn capability_sets(caps: &agent::Capabilities) -> (CapabilitySets, Vec<String>) {
    let mut unknown = Vec::new();
    let mut mask = |names: &[String]| {
        names
            .iter()
            .fold(0u64, |mask, name| match caps::Capability::from_str(name) {
                Ok(cap) => mask | cap.bitmask(),
                Err(_) => {
                    if !unknown.contains(name) {
                        unknown.push(name.clone());
                    }
                    mask
                }
            })
    };
    let sets = CapabilitySets {
        bounding: mask(&caps.bounding),
        effective: mask(&caps.effective),
        permitted: mask(&caps.permitted),
        inheritable: mask(&caps.inheritable),
        ambient: mask(&caps.ambient),
    };
    (sets, unknown)
}

/// How a container gets one kind of namespace.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum NamespaceMode {
    /// The guest's own, which all containers of the pod share (the sandbox's).
    #[default]
    Shared,
    /// A new one of its own.
    New,
    /// The one at this guest path (`/proc/<pid>/ns/<type>`).
    Join(PathBuf),
}

/// The pid, ipc and uts namespaces of a container.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Namespaces {
    /// Process ids: a new one makes the container's init pid 1 and hides other
    /// containers' processes from its `/proc`.
    pub pid: NamespaceMode,
    /// System V IPC and POSIX message queues.
    pub ipc: NamespaceMode,
    /// Host and domain name.
    pub uts: NamespaceMode,
}

impl Namespaces {
    /// Whether the container needs anything but the guest's namespaces.
    pub fn is_shared(&self) -> bool {
        *self == Self::default()
    }
}

/// Validates OCI `linux.namespaces`: only pid, ipc and uts are per container (the
/// mount namespace always is); the network, the cgroup tree and the user ids belong
/// to the VM, which is the pod.
pub fn namespaces(list: &[agent::Namespace]) -> Result<Namespaces> {
    let mut out = Namespaces::default();
    let mut seen = Vec::new();
    for ns in list {
        if seen.contains(&ns.type_.as_str()) {
            return Err(Error::invalid(format!(
                "the {} namespace is listed twice",
                ns.type_
            )));
        }
        seen.push(ns.type_.as_str());
        let mode = if ns.path.is_empty() {
            NamespaceMode::New
        } else if !ns.path.starts_with('/') || ns.path.contains('\0') {
            return Err(Error::invalid(format!(
                "the path {:?} of the {} namespace is not an absolute path",
                ns.path, ns.type_
            )));
        } else {
            NamespaceMode::Join(PathBuf::from(&ns.path))
        };
        let slot = match ns.type_.as_str() {
            "pid" => &mut out.pid,
            "ipc" => &mut out.ipc,
            "uts" => &mut out.uts,
            "mount" if mode == NamespaceMode::New => continue,
            "mount" => {
                return Err(Error::invalid(
                    "joining a mount namespace is not supported: every container gets its own",
                ));
            }
            other => {
                return Err(Error::invalid(format!(
                    "the {other:?} namespace cannot be set per container in the guest \
                     (only pid, ipc, uts and mount can; the VM is the pod's)"
                )));
            }
        };
        *slot = mode;
    }
    Ok(out)
}

/// A compiled seccomp profile: BPF programs to load in order, and their flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeccompFilters {
    /// Each is loaded with `seccomp(SECCOMP_SET_MODE_FILTER)`; the kernel runs them
    /// all and takes the most restrictive result.
    pub programs: Vec<BpfProgram>,
    /// `SECCOMP_FILTER_FLAG_*` bits.
    pub flags: u32,
}

/// The kernel's limit on one filter (`BPF_MAXINSNS`).
const MAX_INSTRUCTIONS: usize = 4096;

/// The architecture the agent runs on, which is the guest's.
fn native_arch() -> Result<(TargetArch, &'static str)> {
    if cfg!(target_arch = "x86_64") {
        Ok((TargetArch::x86_64, "SCMP_ARCH_X86_64"))
    } else if cfg!(target_arch = "aarch64") {
        Ok((TargetArch::aarch64, "SCMP_ARCH_AARCH64"))
    } else if cfg!(target_arch = "riscv64") {
        Ok((TargetArch::riscv64, "SCMP_ARCH_RISCV64"))
    } else {
        Err(Error::invalid(
            "seccomp filters are not supported on this architecture",
        ))
    }
}

/// Translates one OCI seccomp action.
pub fn seccomp_action(name: &str, errno_ret: Option<u32>) -> Result<SeccompAction> {
    // libseccomp and runc return EPERM when a profile names no errno.
    let errno = errno_ret.unwrap_or(libc::EPERM as u32);
    Ok(match name {
        "SCMP_ACT_ALLOW" => SeccompAction::Allow,
        "SCMP_ACT_ERRNO" => SeccompAction::Errno(errno),
        "SCMP_ACT_KILL" | "SCMP_ACT_KILL_THREAD" => SeccompAction::KillThread,
        "SCMP_ACT_KILL_PROCESS" => SeccompAction::KillProcess,
        "SCMP_ACT_TRAP" => SeccompAction::Trap,
        "SCMP_ACT_LOG" => SeccompAction::Log,
        "SCMP_ACT_TRACE" => SeccompAction::Trace(errno),
        "SCMP_ACT_NOTIFY" => {
            return Err(Error::invalid(
                "the seccomp action SCMP_ACT_NOTIFY is not supported: the guest runs no seccomp agent",
            ));
        }
        other => {
            return Err(Error::invalid(format!(
                "the seccomp action {other:?} is not known"
            )));
        }
    })
}

fn seccomp_op(arg: &agent::SeccompArg) -> Result<(SeccompCmpOp, u64)> {
    Ok(match arg.op.as_str() {
        "SCMP_CMP_EQ" => (SeccompCmpOp::Eq, arg.value),
        "SCMP_CMP_NE" => (SeccompCmpOp::Ne, arg.value),
        "SCMP_CMP_LT" => (SeccompCmpOp::Lt, arg.value),
        "SCMP_CMP_LE" => (SeccompCmpOp::Le, arg.value),
        "SCMP_CMP_GT" => (SeccompCmpOp::Gt, arg.value),
        "SCMP_CMP_GE" => (SeccompCmpOp::Ge, arg.value),
        // OCI: `value` is the mask, `valueTwo` what the masked argument must equal.
        "SCMP_CMP_MASKED_EQ" => (SeccompCmpOp::MaskedEq(arg.value), arg.value_two),
        other => {
            return Err(Error::invalid(format!(
                "the seccomp comparison {other:?} is not known"
            )));
        }
    })
}

fn seccomp_flag(name: &str) -> Result<u32> {
    match name {
        "SECCOMP_FILTER_FLAG_LOG" => Ok(libc::SECCOMP_FILTER_FLAG_LOG as u32),
        "SECCOMP_FILTER_FLAG_SPEC_ALLOW" => Ok(libc::SECCOMP_FILTER_FLAG_SPEC_ALLOW as u32),
        other => Err(Error::invalid(format!(
            "the seccomp flag {other:?} is not supported"
        ))),
    }
}

/// The rules of a syscall within one action: `None` matches any arguments.
type SyscallRules = BTreeMap<i64, Option<Vec<SeccompRule>>>;

fn add_rules(rules: &mut SyscallRules, nr: i64, new: Option<Vec<SeccompRule>>) {
    let entry = rules.entry(nr).or_insert_with(|| Some(Vec::new()));
    match (entry.as_mut(), new) {
        (Some(existing), Some(mut more)) => existing.append(&mut more),
        // A rule without conditions matches every call of the syscall.
        _ => *entry = None,
    }
}

fn filter_rules(rules: &SyscallRules) -> BTreeMap<i64, Vec<SeccompRule>> {
    rules
        .iter()
        .map(|(nr, r)| (*nr, r.clone().unwrap_or_default()))
        .collect()
}

/// The conditions of one OCI syscall entry as seccompiler rules (OR-ed).
fn syscall_rules(args: &[agent::SeccompArg]) -> Result<Option<Vec<SeccompRule>>> {
    if args.is_empty() {
        return Ok(None);
    }
    let conditions = args
        .iter()
        .map(|arg| {
            let index = u8::try_from(arg.index)
                .ok()
                .filter(|i| *i <= 5)
                .ok_or_else(|| {
                    Error::invalid(format!(
                        "the seccomp argument index {} is out of range (0-5)",
                        arg.index
                    ))
                })?;
            let (op, value) = seccomp_op(arg)?;
            SeccompCondition::new(index, SeccompCmpArgLen::Qword, op, value)
                .map_err(|e| Error::invalid(format!("A seccomp condition is not valid: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let rule = |conditions: Vec<SeccompCondition>| {
        SeccompRule::new(conditions)
            .map_err(|e| Error::invalid(format!("A seccomp rule is not valid: {e}")))
    };
    // runc: when several conditions name the same argument, each becomes a rule of
    // its own (any may match) rather than an impossible conjunction.
    let mut indices: Vec<u32> = args.iter().map(|a| a.index).collect();
    indices.sort_unstable();
    let repeated = indices.windows(2).any(|w| w[0] == w[1]);
    if repeated {
        Ok(Some(
            conditions
                .into_iter()
                .map(|c| rule(vec![c]))
                .collect::<Result<_>>()?,
        ))
    } else {
        Ok(Some(vec![rule(conditions)?]))
    }
}

/// Compiles OCI `linux.seccomp` into BPF programs with seccompiler.
///
/// seccompiler builds filters with one action on match and one otherwise, so a
/// profile becomes one filter per distinct action (its syscalls → that action, else
/// allow) plus, when the default is not "allow", one filter that allows every listed
/// syscall and applies the default to the rest. The kernel runs every filter and
/// takes the most restrictive answer, which is the profile's answer whenever a call
/// matches one action; a call matching rules of two actions gets the stricter one.
/// Syscall names the architecture lacks are skipped, as libseccomp does; unknown
/// actions, comparisons and flags are errors.
pub fn seccomp_filters(profile: &agent::Seccomp) -> Result<SeccompFilters> {
    let (arch, arch_name) = native_arch()?;
    if !profile.architectures.is_empty() && !profile.architectures.iter().any(|a| a == arch_name) {
        return Err(Error::invalid(format!(
            "the seccomp profile's architectures {:?} do not include the guest's {arch_name}",
            profile.architectures
        )));
    }
    let flags = profile
        .flags
        .iter()
        .map(|f| seccomp_flag(f))
        .try_fold(0u32, |acc, f| f.map(|f| acc | f))?;
    let default = seccomp_action(&profile.default_action, profile.default_errno_ret)?;

    // Keyed by the action's return value so the order is stable.
    let mut by_action: BTreeMap<u32, (SeccompAction, SyscallRules)> = BTreeMap::new();
    let mut listed = SyscallRules::new();
    for entry in &profile.syscalls {
        let action = seccomp_action(&entry.action, entry.errno_ret)?;
        let rules = syscall_rules(&entry.args)?;
        if action == default {
            // runc skips rules that repeat the default action.
            continue;
        }
        for name in &entry.names {
            let Ok(sysno) = syscalls::Sysno::from_str(name) else {
                tracing::debug!("skipping the seccomp rule for {name}: no such syscall here");
                continue;
            };
            let nr = i64::from(sysno.id());
            add_rules(&mut listed, nr, rules.clone());
            if action != SeccompAction::Allow {
                let group = by_action
                    .entry(u32::from(action.clone()))
                    .or_insert_with(|| (action.clone(), SyscallRules::new()));
                add_rules(&mut group.1, nr, rules.clone());
            }
        }
    }

    let compile = |rules: BTreeMap<i64, Vec<SeccompRule>>,
                   mismatch: SeccompAction,
                   matched: SeccompAction|
     -> Result<BpfProgram> {
        let filter = SeccompFilter::new(rules, mismatch, matched, arch)
            .map_err(|e| Error::invalid(format!("The seccomp profile is not valid: {e}")))?;
        let program = BpfProgram::try_from(filter)
            .map_err(|e| Error::invalid(format!("Compiling the seccomp profile failed: {e}")))?;
        if program.len() > MAX_INSTRUCTIONS {
            return Err(Error::invalid(format!(
                "the seccomp profile compiles to {} BPF instructions, more than the kernel's {MAX_INSTRUCTIONS}",
                program.len()
            )));
        }
        Ok(program)
    };

    let mut programs = Vec::new();
    if arch == TargetArch::x86_64 {
        programs.push(x32_guard());
    }
    if default != SeccompAction::Allow {
        programs.push(compile(
            filter_rules(&listed),
            default.clone(),
            SeccompAction::Allow,
        )?);
    }
    for (action, rules) in by_action.into_values() {
        programs.push(compile(filter_rules(&rules), SeccompAction::Allow, action)?);
    }
    Ok(SeccompFilters { programs, flags })
}

/// x32 system calls carry the x86-64 audit arch with bit 30 set in their number, so
/// seccompiler's architecture check lets them through and no rule matches them: a
/// deny-list profile could be bypassed through that ABI. This filter kills such a
/// call, as seccompiler does for a foreign architecture.
fn x32_guard() -> BpfProgram {
    const X32_SYSCALL_BIT: u32 = 0x4000_0000;
    let stmt = |code: u32, k: u32| sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    };
    vec![
        stmt(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, 0),
        sock_filter {
            code: (libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K) as u16,
            jt: 0,
            jf: 1,
            k: X32_SYSCALL_BIT,
        },
        stmt(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_KILL_PROCESS),
        stmt(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_ALLOW),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The classic-BPF subset seccompiler emits, run the way the kernel runs it on
    /// `struct seccomp_data`.
    fn run_bpf(program: &[sock_filter], nr: u32, arch: u32, args: [u64; 6]) -> u32 {
        let mut data = Vec::with_capacity(64);
        data.extend_from_slice(&nr.to_ne_bytes());
        data.extend_from_slice(&arch.to_ne_bytes());
        data.extend_from_slice(&0u64.to_ne_bytes());
        for arg in args {
            data.extend_from_slice(&arg.to_ne_bytes());
        }
        let (mut acc, mut pc) = (0u32, 0usize);
        loop {
            let ins = &program[pc];
            let code = u32::from(ins.code);
            pc += 1;
            match code {
                c if c == libc::BPF_LD | libc::BPF_W | libc::BPF_ABS => {
                    let k = ins.k as usize;
                    acc = u32::from_ne_bytes(data[k..k + 4].try_into().unwrap());
                }
                c if c == libc::BPF_ALU | libc::BPF_AND | libc::BPF_K => acc &= ins.k,
                c if c == libc::BPF_JMP | libc::BPF_JA => pc += ins.k as usize,
                c if c & 0x07 == libc::BPF_JMP => {
                    let taken = match code & 0xf0 {
                        x if x == libc::BPF_JEQ => acc == ins.k,
                        x if x == libc::BPF_JGT => acc > ins.k,
                        x if x == libc::BPF_JGE => acc >= ins.k,
                        x if x == libc::BPF_JSET => acc & ins.k != 0,
                        other => panic!("unexpected jump {other:#x}"),
                    };
                    pc += usize::from(if taken { ins.jt } else { ins.jf });
                }
                c if c == libc::BPF_RET | libc::BPF_K => return ins.k,
                other => panic!("unexpected BPF instruction {other:#x}"),
            }
        }
    }

    /// What the kernel returns for a call: every filter runs, the most restrictive
    /// action wins (SECCOMP_RET_ACTION_FULL compared as signed).
    fn verdict(filters: &SeccompFilters, name: &str, args: [u64; 6]) -> u32 {
        let nr = syscalls::Sysno::from_str(name).unwrap().id() as u32;
        let arch = if cfg!(target_arch = "x86_64") {
            0xC000_003E
        } else {
            0xC000_00B7
        };
        verdict_raw(filters, nr, arch, args)
    }

    fn verdict_raw(filters: &SeccompFilters, nr: u32, arch: u32, args: [u64; 6]) -> u32 {
        filters
            .programs
            .iter()
            .map(|p| run_bpf(p, nr, arch, args))
            .min_by_key(|ret| (ret & libc::SECCOMP_RET_ACTION_FULL) as i32)
            .unwrap()
    }

    const ALLOW: u32 = libc::SECCOMP_RET_ALLOW;
    fn errno(e: i32) -> u32 {
        libc::SECCOMP_RET_ERRNO | e as u32
    }

    fn syscall(names: &[&str], action: &str, errno_ret: Option<u32>) -> agent::SeccompSyscall {
        agent::SeccompSyscall {
            names: names.iter().map(|s| s.to_string()).collect(),
            action: action.into(),
            errno_ret,
            ..Default::default()
        }
    }

    fn arg(index: u32, op: &str, value: u64, value_two: u64) -> agent::SeccompArg {
        agent::SeccompArg {
            index,
            value,
            value_two,
            op: op.into(),
            ..Default::default()
        }
    }

    #[test]
    fn deny_list_profile_denies_only_the_named_syscalls() {
        let profile = agent::Seccomp {
            default_action: "SCMP_ACT_ALLOW".into(),
            syscalls: vec![
                syscall(&["mkdir", "mkdirat"], "SCMP_ACT_ERRNO", None),
                syscall(&["clone3"], "SCMP_ACT_ERRNO", Some(38)),
                syscall(&["no_such_syscall"], "SCMP_ACT_ERRNO", None),
            ],
            ..Default::default()
        };
        let filters = seccomp_filters(&profile).unwrap();
        assert_eq!(verdict(&filters, "mkdirat", [0; 6]), errno(libc::EPERM));
        assert_eq!(verdict(&filters, "clone3", [0; 6]), errno(libc::ENOSYS));
        assert_eq!(verdict(&filters, "openat", [0; 6]), ALLOW);
        assert_eq!(verdict(&filters, "getpid", [0; 6]), ALLOW);
    }

    #[test]
    fn allow_list_profile_applies_the_default_to_the_rest() {
        let profile = agent::Seccomp {
            default_action: "SCMP_ACT_ERRNO".into(),
            default_errno_ret: Some(1),
            architectures: vec![native_arch().unwrap().1.into(), "SCMP_ARCH_X86".into()],
            syscalls: vec![
                syscall(&["read", "write", "exit_group"], "SCMP_ACT_ALLOW", None),
                syscall(&["kill"], "SCMP_ACT_KILL_PROCESS", None),
                agent::SeccompSyscall {
                    args: vec![arg(0, "SCMP_CMP_EQ", 0, 0)],
                    ..syscall(&["personality"], "SCMP_ACT_ALLOW", None)
                },
                agent::SeccompSyscall {
                    // clone without CLONE_NEWUSER (0x10000000), as Docker's profile.
                    args: vec![arg(0, "SCMP_CMP_MASKED_EQ", 0x1000_0000, 0)],
                    ..syscall(&["clone"], "SCMP_ACT_ALLOW", None)
                },
            ],
            ..Default::default()
        };
        let filters = seccomp_filters(&profile).unwrap();
        assert_eq!(verdict(&filters, "read", [0; 6]), ALLOW);
        assert_eq!(verdict(&filters, "openat", [0; 6]), errno(1));
        assert_eq!(
            verdict(&filters, "kill", [0; 6]),
            libc::SECCOMP_RET_KILL_PROCESS
        );
        assert_eq!(verdict(&filters, "personality", [0; 6]), ALLOW);
        assert_eq!(
            verdict(&filters, "personality", [8, 0, 0, 0, 0, 0]),
            errno(1)
        );
        assert_eq!(verdict(&filters, "clone", [0x11, 0, 0, 0, 0, 0]), ALLOW);
        assert_eq!(
            verdict(&filters, "clone", [0x1000_0011, 0, 0, 0, 0, 0]),
            errno(1)
        );
        // A 64-bit argument is compared whole, not just its low half.
        assert_eq!(
            verdict(&filters, "personality", [1 << 32, 0, 0, 0, 0, 0]),
            errno(1)
        );
    }

    #[test]
    fn conditions_on_one_argument_are_alternatives_as_in_runc() {
        let profile = agent::Seccomp {
            default_action: "SCMP_ACT_ALLOW".into(),
            syscalls: vec![agent::SeccompSyscall {
                args: vec![arg(1, "SCMP_CMP_EQ", 5, 0), arg(1, "SCMP_CMP_EQ", 7, 0)],
                ..syscall(&["kill"], "SCMP_ACT_ERRNO", None)
            }],
            ..Default::default()
        };
        let filters = seccomp_filters(&profile).unwrap();
        assert_eq!(verdict(&filters, "kill", [1, 5, 0, 0, 0, 0]), errno(1));
        assert_eq!(verdict(&filters, "kill", [1, 7, 0, 0, 0, 0]), errno(1));
        assert_eq!(verdict(&filters, "kill", [1, 9, 0, 0, 0, 0]), ALLOW);

        // Different arguments must all match.
        let profile = agent::Seccomp {
            default_action: "SCMP_ACT_ALLOW".into(),
            syscalls: vec![agent::SeccompSyscall {
                args: vec![arg(0, "SCMP_CMP_GE", 10, 0), arg(1, "SCMP_CMP_NE", 9, 0)],
                ..syscall(&["kill"], "SCMP_ACT_ERRNO", None)
            }],
            ..Default::default()
        };
        let filters = seccomp_filters(&profile).unwrap();
        assert_eq!(verdict(&filters, "kill", [10, 1, 0, 0, 0, 0]), errno(1));
        assert_eq!(verdict(&filters, "kill", [10, 9, 0, 0, 0, 0]), ALLOW);
        assert_eq!(verdict(&filters, "kill", [9, 1, 0, 0, 0, 0]), ALLOW);
    }

    #[test]
    fn foreign_architecture_and_x32_calls_are_killed() {
        let profile = agent::Seccomp {
            default_action: "SCMP_ACT_ALLOW".into(),
            syscalls: vec![syscall(&["mkdir"], "SCMP_ACT_ERRNO", None)],
            ..Default::default()
        };
        let filters = seccomp_filters(&profile).unwrap();
        // AUDIT_ARCH_I386.
        assert_eq!(
            verdict_raw(&filters, 39, 0x4000_0003, [0; 6]),
            libc::SECCOMP_RET_KILL_PROCESS
        );
        if cfg!(target_arch = "x86_64") {
            let mkdir = syscalls::Sysno::from_str("mkdir").unwrap().id() as u32;
            assert_eq!(
                verdict_raw(&filters, mkdir | 0x4000_0000, 0xC000_003E, [0; 6]),
                libc::SECCOMP_RET_KILL_PROCESS
            );
        }
    }

    #[test]
    fn unsupported_profiles_are_clear_errors() {
        let cases = [
            (
                agent::Seccomp {
                    default_action: "SCMP_ACT_NOTIFY".into(),
                    ..Default::default()
                },
                "SCMP_ACT_NOTIFY is not supported",
            ),
            (
                agent::Seccomp {
                    default_action: "SCMP_ACT_BOGUS".into(),
                    ..Default::default()
                },
                "not known",
            ),
            (
                agent::Seccomp {
                    default_action: "SCMP_ACT_ALLOW".into(),
                    syscalls: vec![agent::SeccompSyscall {
                        args: vec![arg(0, "SCMP_CMP_SOMETIMES", 0, 0)],
                        ..syscall(&["kill"], "SCMP_ACT_ERRNO", None)
                    }],
                    ..Default::default()
                },
                "comparison \"SCMP_CMP_SOMETIMES\"",
            ),
            (
                agent::Seccomp {
                    default_action: "SCMP_ACT_ALLOW".into(),
                    syscalls: vec![agent::SeccompSyscall {
                        args: vec![arg(6, "SCMP_CMP_EQ", 0, 0)],
                        ..syscall(&["kill"], "SCMP_ACT_ERRNO", None)
                    }],
                    ..Default::default()
                },
                "index 6 is out of range",
            ),
            (
                agent::Seccomp {
                    default_action: "SCMP_ACT_ALLOW".into(),
                    architectures: vec!["SCMP_ARCH_S390X".into()],
                    ..Default::default()
                },
                "do not include the guest's",
            ),
            (
                agent::Seccomp {
                    default_action: "SCMP_ACT_ALLOW".into(),
                    flags: vec!["SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV".into()],
                    ..Default::default()
                },
                "flag",
            ),
        ];
        for (profile, expected) in cases {
            let err = seccomp_filters(&profile).unwrap_err().to_string();
            assert!(
                err.contains(expected),
                "{err:?} should contain {expected:?}"
            );
        }
    }

    #[test]
    fn capability_names_become_masks_and_unknown_ones_are_reported() {
        let names = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let (sets, unknown) = capability_sets(&agent::Capabilities {
            bounding: names(&["CAP_CHOWN", "CAP_NET_BIND_SERVICE", "CAP_FLY"]),
            effective: names(&["CAP_CHOWN"]),
            permitted: names(&["CAP_CHOWN", "CAP_NET_BIND_SERVICE"]),
            inheritable: names(&[]),
            ambient: names(&["CAP_NET_BIND_SERVICE"]),
            ..Default::default()
        });
        assert_eq!(sets.bounding, (1 << 0) | (1 << 10));
        assert_eq!(sets.effective, 1);
        assert_eq!(sets.permitted, 1 | (1 << 10));
        assert_eq!(sets.inheritable, 0);
        assert_eq!(sets.ambient, 1 << 10);
        assert_eq!(unknown, vec!["CAP_FLY".to_string()]);
    }

    #[test]
    fn namespaces_follow_runc_rules() {
        let ns = |type_: &str, path: &str| agent::Namespace {
            type_: type_.into(),
            path: path.into(),
            ..Default::default()
        };
        assert!(namespaces(&[]).unwrap().is_shared());
        let got =
            namespaces(&[ns("pid", ""), ns("ipc", "/proc/7/ns/ipc"), ns("mount", "")]).unwrap();
        assert_eq!(got.pid, NamespaceMode::New);
        assert_eq!(got.ipc, NamespaceMode::Join("/proc/7/ns/ipc".into()));
        assert_eq!(got.uts, NamespaceMode::Shared);
        for (list, expected) in [
            (vec![ns("network", "")], "\"network\" namespace cannot"),
            (vec![ns("user", "")], "\"user\" namespace cannot"),
            (vec![ns("pid", ""), ns("pid", "")], "listed twice"),
            (vec![ns("uts", "relative")], "not an absolute path"),
            (vec![ns("mount", "/proc/1/ns/mnt")], "mount namespace"),
        ] {
            let err = namespaces(&list).unwrap_err().to_string();
            assert!(
                err.contains(expected),
                "{err:?} should contain {expected:?}"
            );
        }
    }
}
