//! Seccomp profiles: parse an OCI `LinuxSeccomp` profile, compile it to BPF before clone, and
//! install it as the last step of init's setup; every process init starts inherits it.
//!
//! Profiles are plain OCI runtime-spec JSON, plus one extra field: `"comment"` (a string or a list
//! of strings) at the top level and on any syscall entry. oci-spec ignores unknown fields, so we
//! check the field names ourselves first and reject everything else: a profile written for
//! Docker's own format (`includes`, `excludes`, `archMap`) would otherwise be read as if its
//! conditional allows were unconditional, and a typo like `"arg"` would drop a condition silently.
//!
//! One program per action (seccompiler's model: a program has a single match action), so:
//! - every rule whose action is not ALLOW becomes a program of its own, "that action if the rule
//!   matches, else ALLOW", installed first, in profile order;
//! - the main program, "ALLOW if any rule matches, else the default action", is installed last.
//!   It also allows what the other programs match, so for those the specific action decides: the
//!   kernel runs every program and keeps the most severe answer, and ERRNO/KILL/TRAP/LOG all
//!   outrank ALLOW. Nothing depends on the kernel's tie-break between equal actions, and the
//!   earlier programs can be installed whether or not the profile allows `seccomp(2)`.
//! - when the default action is ERRNO, the main program answers ENOSYS (not the default errno)
//!   for syscall numbers above every syscall we know, so libc falls back from calls newer than
//!   this build (as runc does); a deliberate deny stays EPERM.
//!
//! Each program dispatches on the syscall number with a binary search (see [`program`]); the
//! argument conditions are seccompiler's code.
//!
//! Only the build architecture is compiled (x86_64 or aarch64). The architecture check
//! kills the process on any other syscall ABI (i386 `int 0x80`); x32 syscall numbers are above
//! every native one, so they get ENOSYS (or the default action, if that is not ERRNO).
//! Syscall names the architecture does not have are skipped and listed in
//! [`CompiledSeccomp::unknown_syscalls`].
//!
//! The unsafe seccomp(2)/prctl(2) calls live in seccompiler (`apply_filter`), which sets
//! no_new_privs before each program; this module has no `unsafe` of its own.

use oci_spec::runtime::{
    Arch, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompArg, LinuxSeccompFilterFlag,
    LinuxSeccompOperator,
};
use seccompiler::{
    sock_filter, BackendError, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp,
    SeccompCondition, SeccompRule,
};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// The built-in profile (`seccomp-profiles/default.json`).
const DEFAULT_PROFILE: &str = include_str!("../../seccomp-profiles/default.json");
/// How errors name the built-in profile.
const DEFAULT_ORIGIN: &str = "built-in default profile";

/// Which profile a sandbox runs under.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum SeccompProfile {
    /// `seccomp-profiles/default.json`, compiled into the binary.
    #[default]
    Default,
    /// No filter at all.
    Unconfined,
    /// An OCI `LinuxSeccomp` JSON file.
    File(PathBuf),
}

/// Compiled BPF programs, installed in order. Serializable so it crosses to the helper process.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CompiledSeccomp {
    /// The programs in install order (each instruction as `[code, jt, jf, k]` in JSON).
    #[serde(serialize_with = "ser_programs", deserialize_with = "de_programs")]
    programs: Vec<BpfProgram>,
    /// `SECCOMP_FILTER_FLAG_TSYNC` was asked for (a no-op in a single-threaded process).
    tsync: bool,
    /// Names in the profile this architecture does not have; their rules were skipped.
    unknown_syscalls: Vec<String>,
}

/// Why a profile could not be compiled or installed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("failed to read seccomp profile {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to parse seccomp profile {origin}")]
    Parse {
        origin: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("seccomp profile {origin}: unknown field {field:?} in {location}")]
    UnknownField {
        origin: String,
        location: String,
        field: String,
    },
    #[error("seccomp profile {origin} does not list this machine's architecture {arch}")]
    ArchNotListed { origin: String, arch: &'static str },
    #[error("seccomp profile {origin}: {what} is not supported")]
    Unsupported { origin: String, what: String },
    #[error("seccomp profile {origin}: bad argument condition on {syscalls:?}")]
    Condition {
        origin: String,
        syscalls: Vec<String>,
        #[source]
        source: BackendError,
    },
    #[error("seccomp profile {origin}: failed to build the program for action {action:?}")]
    Build {
        origin: String,
        action: SeccompAction,
        #[source]
        source: BackendError,
    },
    #[error("seccomp profile {origin}: the program for action {action:?} has {len} instructions, more than the kernel's {max}")]
    TooLong {
        origin: String,
        action: SeccompAction,
        len: usize,
        max: usize,
    },
    #[error("failed to install seccomp program {index} of {count}")]
    Install {
        index: usize,
        count: usize,
        #[source]
        source: seccompiler::Error,
    },
}

/// Compile a profile; `Ok(None)` for `Unconfined`.
pub fn compile(profile: &SeccompProfile) -> Result<Option<CompiledSeccomp>, SeccompError> {
    match profile {
        SeccompProfile::Unconfined => Ok(None),
        SeccompProfile::Default => {
            // The embedded profile never changes: compile it once per process (~0.3 ms saved on
            // every spawn).
            static DEFAULT: std::sync::OnceLock<CompiledSeccomp> = std::sync::OnceLock::new();
            if let Some(c) = DEFAULT.get() {
                return Ok(Some(c.clone()));
            }
            let c = compile_text(DEFAULT_ORIGIN, DEFAULT_PROFILE)?;
            Ok(Some(DEFAULT.get_or_init(|| c).clone()))
        }
        SeccompProfile::File(path) => {
            let text = std::fs::read_to_string(path).map_err(|source| SeccompError::Read {
                path: path.clone(),
                source,
            })?;
            compile_text(&path.display().to_string(), &text).map(Some)
        }
    }
}

impl CompiledSeccomp {
    /// Install every program on the calling thread (sets no_new_privs). Init calls it as the
    /// last step of its setup; every process it starts inherits the filter.
    ///
    /// Allocates nothing, so it is safe in a child forked from a multi-threaded process.
    pub fn install(&self) -> Result<(), SeccompError> {
        let count = self.programs.len();
        for (index, program) in self.programs.iter().enumerate() {
            let installed = if self.tsync {
                seccompiler::apply_filter_all_threads(program)
            } else {
                seccompiler::apply_filter(program)
            };
            installed.map_err(|source| SeccompError::Install {
                index,
                count,
                source,
            })?;
        }
        Ok(())
    }

    /// Syscall names in the profile that this architecture does not have (their rules were
    /// skipped): worth a warning for a user's profile, where it may be a typo.
    pub fn unknown_syscalls(&self) -> &[String] {
        &self.unknown_syscalls
    }
}

/// Parse and compile profile text; `origin` names it in errors.
fn compile_text(origin: &str, text: &str) -> Result<CompiledSeccomp, SeccompError> {
    let parse_err = |source| SeccompError::Parse {
        origin: origin.to_string(),
        source,
    };
    let value: serde_json::Value = serde_json::from_str(text).map_err(parse_err)?;
    check_fields(origin, &value)?;
    let spec: LinuxSeccomp = serde_json::from_value(value).map_err(parse_err)?;
    build(origin, &spec)
}

/// Field names we accept: the OCI ones plus `comment`.
const TOP_FIELDS: &[&str] = &[
    "comment",
    "defaultAction",
    "defaultErrnoRet",
    "architectures",
    "flags",
    "listenerPath",
    "listenerMetadata",
    "syscalls",
];
const SYSCALL_FIELDS: &[&str] = &["comment", "names", "action", "errnoRet", "args"];
const ARG_FIELDS: &[&str] = &["index", "value", "valueTwo", "op"];

/// Reject fields oci-spec would silently ignore (see the module comment). Shapes other than
/// objects and arrays are left for oci-spec to report.
fn check_fields(origin: &str, profile: &serde_json::Value) -> Result<(), SeccompError> {
    fn check(
        origin: &str,
        value: &serde_json::Value,
        allowed: &[&str],
        location: &dyn Fn() -> String,
    ) -> Result<(), SeccompError> {
        let Some(object) = value.as_object() else {
            return Ok(());
        };
        match object.keys().find(|k| !allowed.contains(&k.as_str())) {
            Some(field) => Err(SeccompError::UnknownField {
                origin: origin.to_string(),
                location: location(),
                field: field.clone(),
            }),
            None => Ok(()),
        }
    }
    check(origin, profile, TOP_FIELDS, &|| "the top level".to_string())?;
    let entries = profile.get("syscalls").and_then(|s| s.as_array());
    for (i, entry) in entries.into_iter().flatten().enumerate() {
        check(origin, entry, SYSCALL_FIELDS, &|| format!("syscalls[{i}]"))?;
        let args = entry.get("args").and_then(|a| a.as_array());
        for (j, arg) in args.into_iter().flatten().enumerate() {
            check(origin, arg, ARG_FIELDS, &|| {
                format!("syscalls[{i}].args[{j}]")
            })?;
        }
    }
    Ok(())
}

/// The syscalls one program matches: per syscall number, either always or when any rule matches.
type Matches = BTreeMap<i64, Chain>;

/// What a program matches for one syscall.
#[derive(Default)]
struct Chain {
    /// An entry without `args` matched this syscall: the rules do not matter.
    always: bool,
    /// Alternatives (OR); each rule's conditions must all hold (AND).
    rules: Vec<SeccompRule>,
}

impl Chain {
    fn add(&mut self, rule: Option<&SeccompRule>) {
        match rule {
            Some(rule) => self.rules.push(rule.clone()),
            None => self.always = true,
        }
    }
}

/// Turn a parsed profile into BPF programs (see the module comment for the layout).
fn build(origin: &str, spec: &LinuxSeccomp) -> Result<CompiledSeccomp, SeccompError> {
    let unsupported = |what: String| SeccompError::Unsupported {
        origin: origin.to_string(),
        what,
    };
    if let Some(arches) = spec.architectures() {
        let native = arches
            .iter()
            .any(|a| *a == native::OCI_ARCH || *a == Arch::ScmpArchNative);
        if !arches.is_empty() && !native {
            return Err(SeccompError::ArchNotListed {
                origin: origin.to_string(),
                arch: native::NAME,
            });
        }
    }
    let mut tsync = false;
    for flag in spec.flags().iter().flatten() {
        match flag {
            LinuxSeccompFilterFlag::SeccompFilterFlagTsync => tsync = true,
            other => return Err(unsupported(format!("flag {other}"))),
        }
    }
    if spec.listener_path().is_some() {
        return Err(unsupported("listenerPath (SCMP_ACT_NOTIFY)".to_string()));
    }

    let default = action(
        origin,
        "defaultAction",
        spec.default_action(),
        spec.default_errno_ret(),
    )?;
    // The main program's matches, and one (action, matches) per other action in profile order.
    let mut allowed = Matches::new();
    let mut others: Vec<(SeccompAction, Matches)> = Vec::new();
    let mut unknown = Vec::new();
    for entry in spec.syscalls().iter().flatten() {
        let names = entry.names();
        let act = action(origin, &names.join(","), entry.action(), entry.errno_ret())?;
        let conditions = entry
            .args()
            .iter()
            .flatten()
            .map(condition)
            .collect::<Result<Vec<_>, _>>();
        // Several `args` on one entry must all hold: one rule with several conditions.
        let rule = conditions
            .and_then(|c| (!c.is_empty()).then(|| SeccompRule::new(c)).transpose())
            .map_err(|source| SeccompError::Condition {
                origin: origin.to_string(),
                syscalls: names.clone(),
                source,
            })?;
        for name in names {
            let Some(nr) = syscall_number(name) else {
                unknown.push(name.clone());
                continue;
            };
            allowed.entry(nr).or_default().add(rule.as_ref());
            if act != SeccompAction::Allow {
                let at = match others.iter().position(|(a, _)| *a == act) {
                    Some(at) => at,
                    None => {
                        others.push((act.clone(), Matches::new()));
                        others.len() - 1
                    }
                };
                others[at].1.entry(nr).or_default().add(rule.as_ref());
            }
        }
    }
    unknown.sort();
    unknown.dedup();

    let mut programs = Vec::new();
    for (act, matches) in others {
        programs.push(program(origin, matches, SeccompAction::Allow, act, &[])?);
    }
    // With an ALLOW default the main program would allow everything: leave it out.
    if default != SeccompAction::Allow {
        let prefix = match default {
            SeccompAction::Errno(_) => enosys_above(max_syscall_number()),
            _ => Vec::new(),
        };
        programs.push(program(
            origin,
            allowed,
            default,
            SeccompAction::Allow,
            &prefix,
        )?);
    }
    Ok(CompiledSeccomp {
        programs,
        tsync,
        unknown_syscalls: unknown,
    })
}

/// One program: `on_match` for what `matches` matches, `otherwise` for the rest, with `prefix`
/// run first.
///
/// Layout: the architecture check (any other syscall ABI kills the process), then a binary
/// search over the syscall number. Numbers 0..=max split into maximal intervals that share one
/// outcome (match, no match, or a rule chain for one syscall); the search compares against the
/// interval starts, so a syscall costs ~log2(intervals) comparisons and the whole program is a
/// few hundred instructions. seccompiler's own layout tests every syscall in turn (~5
/// instructions each, ~1,750 for the default profile), and the kernel's cost of loading a filter
/// grows with its length: ~1 ms for that one against ~0.1 ms for this. Rule chains (argument
/// conditions) are seccompiler's code, spliced in unchanged.
fn program(
    origin: &str,
    matches: Matches,
    otherwise: SeccompAction,
    on_match: SeccompAction,
    prefix: &[sock_filter],
) -> Result<BpfProgram, SeccompError> {
    let max = max_syscall_number().max(matches.keys().copied().max().unwrap_or(0));
    // Maximal intervals [start, next start) of one outcome.
    let mut intervals: Vec<(u32, Outcome)> = Vec::new();
    let mut push = |nr: u32, o: Outcome| match intervals.last() {
        Some((_, last)) if *last == o && !matches!(o, Outcome::Rules(_)) => {}
        _ => intervals.push((nr, o)),
    };
    let mut chains = matches.into_iter().peekable();
    for nr in 0..=max {
        let outcome = match chains.peek() {
            Some((n, _)) if *n == nr => {
                let (_, chain) = chains.next().expect("peeked");
                if chain.always {
                    Outcome::Match
                } else {
                    Outcome::Rules(chain.rules)
                }
            }
            _ => Outcome::NoMatch,
        };
        push(u32::try_from(nr).unwrap_or(u32::MAX), outcome);
    }
    // Numbers above every known syscall: no match (the ERRNO prefix answers ENOSYS first).
    push(u32::try_from(max + 1).unwrap_or(u32::MAX), Outcome::NoMatch);
    let on_match_k = u32::from(on_match.clone());
    let otherwise_k = u32::from(otherwise);
    let mut program = prefix.to_vec();
    program.extend([
        insn(LD_W_ABS, 0, 0, ARCH_OFFSET),
        insn(JEQ_K, 1, 0, native::AUDIT_ARCH),
        insn(RET_K, 0, 0, libc::SECCOMP_RET_KILL_PROCESS),
        insn(LD_W_ABS, 0, 0, NR_OFFSET),
    ]);
    program.extend(search(&intervals, on_match_k, otherwise_k));
    // BPF_MAXINSNS: the kernel refuses longer programs.
    const MAX: usize = 4096;
    if program.len() > MAX {
        return Err(SeccompError::TooLong {
            origin: origin.to_string(),
            action: on_match,
            len: program.len(),
            max: MAX,
        });
    }
    Ok(program)
}

/// What a program answers for the syscalls of one interval.
#[derive(PartialEq)]
enum Outcome {
    Match,
    NoMatch,
    /// One syscall whose match depends on its arguments: any rule (OR) whose conditions all
    /// hold (AND).
    Rules(Vec<SeccompRule>),
}

// Classic BPF opcodes (linux/bpf_common.h) and `struct seccomp_data` offsets.
const LD_W_ABS: u16 = 0x20;
const JEQ_K: u16 = 0x15;
const JGT_K: u16 = 0x25;
const JGE_K: u16 = 0x35;
const JA: u16 = 0x05;
const RET_K: u16 = 0x06;
const NR_OFFSET: u32 = 0;
const ARCH_OFFSET: u32 = 4;

fn insn(code: u16, jt: u8, jf: u8, k: u32) -> sock_filter {
    sock_filter { code, jt, jf, k }
}

/// Binary search over `intervals` (sorted by start; the syscall number is in A). Jumps of more
/// than 255 instructions go through a `JA`, whose offset is 32 bits.
fn search(intervals: &[(u32, Outcome)], on_match: u32, otherwise: u32) -> Vec<sock_filter> {
    if let [(_, outcome)] = intervals {
        return match outcome {
            Outcome::Match => vec![insn(RET_K, 0, 0, on_match)],
            Outcome::NoMatch => vec![insn(RET_K, 0, 0, otherwise)],
            Outcome::Rules(rules) => {
                let mut out = Vec::new();
                for rule in rules {
                    // seccompiler's rule code falls through when every condition holds and
                    // jumps past its end otherwise; conditions load the arguments themselves.
                    out.extend(BpfProgram::from(rule.clone()));
                    out.push(insn(RET_K, 0, 0, on_match));
                }
                out.push(insn(RET_K, 0, 0, otherwise));
                out
            }
        };
    }
    let mid = intervals.len() / 2;
    let left = search(&intervals[..mid], on_match, otherwise);
    let right = search(&intervals[mid..], on_match, otherwise);
    // A still holds the number here: only leaves (which all return) run rule code.
    let mut out = Vec::new();
    match u8::try_from(left.len()) {
        Ok(skip) => out.push(insn(JGE_K, skip, 0, intervals[mid].0)),
        Err(_) => {
            out.push(insn(JGE_K, 0, 1, intervals[mid].0));
            out.push(insn(
                JA,
                0,
                0,
                u32::try_from(left.len()).unwrap_or(u32::MAX),
            ));
        }
    }
    out.extend(left);
    out.extend(right);
    out
}

/// A program prefix answering ENOSYS for native syscall numbers above `max` (prepended, so the
/// relative jumps of the program after it are untouched; foreign ABIs fall through to its
/// architecture check).
fn enosys_above(max: i64) -> Vec<sock_filter> {
    let max = u32::try_from(max).unwrap_or(u32::MAX);
    vec![
        insn(LD_W_ABS, 0, 0, ARCH_OFFSET),
        insn(JEQ_K, 0, 3, native::AUDIT_ARCH),
        insn(LD_W_ABS, 0, 0, NR_OFFSET),
        insn(JGT_K, 0, 1, max),
        insn(
            RET_K,
            0,
            0,
            u32::from(SeccompAction::Errno(libc::ENOSYS as u32)),
        ),
    ]
}

/// The seccompiler action for an OCI action (`what` names the entry in errors).
fn action(
    origin: &str,
    what: &str,
    action: LinuxSeccompAction,
    errno_ret: Option<u32>,
) -> Result<SeccompAction, SeccompError> {
    let errno = errno_ret.unwrap_or(libc::EPERM as u32);
    Ok(match action {
        LinuxSeccompAction::ScmpActAllow => SeccompAction::Allow,
        LinuxSeccompAction::ScmpActErrno => SeccompAction::Errno(errno),
        // libseccomp's SCMP_ACT_KILL is KILL_THREAD.
        LinuxSeccompAction::ScmpActKill | LinuxSeccompAction::ScmpActKillThread => {
            SeccompAction::KillThread
        }
        LinuxSeccompAction::ScmpActKillProcess => SeccompAction::KillProcess,
        LinuxSeccompAction::ScmpActTrap => SeccompAction::Trap,
        LinuxSeccompAction::ScmpActLog => SeccompAction::Log,
        LinuxSeccompAction::ScmpActTrace => SeccompAction::Trace(errno),
        LinuxSeccompAction::ScmpActNotify => {
            return Err(SeccompError::Unsupported {
                origin: origin.to_string(),
                what: format!("action {action} (for {what})"),
            })
        }
    })
}

/// One argument condition. Compares all 64 bits, as libseccomp does on 64-bit architectures.
/// For MASKED_EQ the OCI `value` is the mask and `valueTwo` the expected result.
fn condition(arg: &LinuxSeccompArg) -> Result<SeccompCondition, BackendError> {
    let index = u8::try_from(arg.index()).map_err(|_| BackendError::InvalidArgumentNumber)?;
    let (op, value) = match arg.op() {
        LinuxSeccompOperator::ScmpCmpEq => (SeccompCmpOp::Eq, arg.value()),
        LinuxSeccompOperator::ScmpCmpNe => (SeccompCmpOp::Ne, arg.value()),
        LinuxSeccompOperator::ScmpCmpLt => (SeccompCmpOp::Lt, arg.value()),
        LinuxSeccompOperator::ScmpCmpLe => (SeccompCmpOp::Le, arg.value()),
        LinuxSeccompOperator::ScmpCmpGt => (SeccompCmpOp::Gt, arg.value()),
        LinuxSeccompOperator::ScmpCmpGe => (SeccompCmpOp::Ge, arg.value()),
        LinuxSeccompOperator::ScmpCmpMaskedEq => (
            SeccompCmpOp::MaskedEq(arg.value()),
            arg.value_two().unwrap_or(0),
        ),
    };
    SeccompCondition::new(index, SeccompCmpArgLen::Qword, op, value)
}

/// The build architecture, as seccompiler, oci-spec and the kernel name it.
#[cfg(target_arch = "x86_64")]
mod native {
    pub const OCI_ARCH: oci_spec::runtime::Arch = oci_spec::runtime::Arch::ScmpArchX86_64;
    pub const NAME: &str = "SCMP_ARCH_X86_64";
    /// AUDIT_ARCH_X86_64: EM_X86_64 | __AUDIT_ARCH_64BIT | __AUDIT_ARCH_LE.
    pub const AUDIT_ARCH: u32 = 62 | 0x8000_0000 | 0x4000_0000;
}
#[cfg(target_arch = "aarch64")]
mod native {
    pub const OCI_ARCH: oci_spec::runtime::Arch = oci_spec::runtime::Arch::ScmpArchAarch64;
    pub const NAME: &str = "SCMP_ARCH_AARCH64";
    /// AUDIT_ARCH_AARCH64: EM_AARCH64 | __AUDIT_ARCH_64BIT | __AUDIT_ARCH_LE.
    pub const AUDIT_ARCH: u32 = 183 | 0x8000_0000 | 0x4000_0000;
}
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
compile_error!("sbx's seccomp support covers x86_64 and aarch64 only");

/// `("SYS_name", number)` pairs from libc's constants.
macro_rules! syscall_table {
    ($($sys:ident)*) => {
        &[$((stringify!($sys), libc::$sys)),*]
    };
}

/// Syscalls libc (glibc and musl targets) names on both x86_64 and aarch64.
const COMMON: &[(&str, libc::c_long)] = syscall_table!(
    SYS_accept SYS_accept4 SYS_acct SYS_add_key SYS_adjtimex SYS_bind SYS_bpf SYS_brk SYS_capget
    SYS_capset SYS_chdir SYS_chroot SYS_clock_adjtime SYS_clock_getres SYS_clock_gettime
    SYS_clock_nanosleep SYS_clock_settime SYS_clone SYS_clone3 SYS_close SYS_close_range
    SYS_connect SYS_copy_file_range SYS_delete_module SYS_dup SYS_dup3 SYS_epoll_create1
    SYS_epoll_ctl SYS_epoll_pwait SYS_epoll_pwait2 SYS_eventfd2 SYS_execve SYS_execveat SYS_exit
    SYS_exit_group SYS_faccessat SYS_faccessat2 SYS_fadvise64 SYS_fallocate SYS_fanotify_init
    SYS_fanotify_mark SYS_fchdir SYS_fchmod SYS_fchmodat SYS_fchown SYS_fchownat SYS_fcntl
    SYS_fdatasync SYS_fgetxattr SYS_finit_module SYS_flistxattr SYS_flock SYS_fremovexattr
    SYS_fsconfig SYS_fsetxattr SYS_fsmount SYS_fsopen SYS_fspick SYS_fstat SYS_fstatfs SYS_fsync
    SYS_ftruncate SYS_futex SYS_futex_waitv SYS_get_mempolicy SYS_get_robust_list SYS_getcpu
    SYS_getcwd SYS_getdents64 SYS_getegid SYS_geteuid SYS_getgid SYS_getgroups SYS_getitimer
    SYS_getpeername SYS_getpgid SYS_getpid SYS_getppid SYS_getpriority SYS_getrandom
    SYS_getresgid SYS_getresuid SYS_getrusage SYS_getsid SYS_getsockname SYS_getsockopt
    SYS_gettid SYS_gettimeofday SYS_getuid SYS_getxattr SYS_init_module SYS_inotify_add_watch
    SYS_inotify_init1 SYS_inotify_rm_watch SYS_io_cancel SYS_io_destroy SYS_io_getevents
    SYS_io_setup SYS_io_submit SYS_io_uring_enter SYS_io_uring_register SYS_io_uring_setup
    SYS_ioctl SYS_ioprio_get SYS_ioprio_set SYS_kcmp SYS_kexec_load SYS_keyctl SYS_kill
    SYS_landlock_add_rule SYS_landlock_create_ruleset SYS_landlock_restrict_self SYS_lgetxattr
    SYS_linkat SYS_listen SYS_listxattr SYS_llistxattr SYS_lookup_dcookie SYS_lremovexattr
    SYS_lseek SYS_lsetxattr SYS_madvise SYS_mbind SYS_membarrier SYS_memfd_create SYS_memfd_secret
    SYS_migrate_pages SYS_mincore SYS_mkdirat SYS_mknodat SYS_mlock SYS_mlock2 SYS_mlockall
    SYS_mmap SYS_mount SYS_mount_setattr SYS_move_mount SYS_move_pages SYS_mprotect
    SYS_mq_getsetattr SYS_mq_notify SYS_mq_open SYS_mq_timedreceive SYS_mq_timedsend
    SYS_mq_unlink SYS_mremap SYS_mseal SYS_msgctl SYS_msgget SYS_msgrcv SYS_msgsnd
    SYS_msync SYS_munlock SYS_munlockall SYS_munmap SYS_name_to_handle_at SYS_nanosleep
    SYS_newfstatat SYS_nfsservctl SYS_open_by_handle_at SYS_open_tree SYS_openat SYS_openat2
    SYS_perf_event_open SYS_personality SYS_pidfd_getfd SYS_pidfd_open SYS_pidfd_send_signal
    SYS_pipe2 SYS_pivot_root SYS_pkey_alloc SYS_pkey_free SYS_pkey_mprotect SYS_ppoll SYS_prctl
    SYS_pread64 SYS_preadv SYS_preadv2 SYS_prlimit64 SYS_process_madvise SYS_process_mrelease
    SYS_process_vm_readv SYS_process_vm_writev SYS_pselect6 SYS_ptrace SYS_pwrite64 SYS_pwritev
    SYS_pwritev2 SYS_quotactl SYS_quotactl_fd SYS_read SYS_readahead SYS_readlinkat
    SYS_readv SYS_reboot SYS_recvfrom SYS_recvmmsg SYS_recvmsg SYS_remap_file_pages
    SYS_removexattr SYS_renameat2 SYS_request_key SYS_restart_syscall SYS_rseq
    SYS_rt_sigaction SYS_rt_sigpending SYS_rt_sigprocmask SYS_rt_sigqueueinfo SYS_rt_sigreturn
    SYS_rt_sigsuspend SYS_rt_sigtimedwait SYS_rt_tgsigqueueinfo SYS_sched_get_priority_max
    SYS_sched_get_priority_min SYS_sched_getaffinity SYS_sched_getattr SYS_sched_getparam
    SYS_sched_getscheduler SYS_sched_rr_get_interval SYS_sched_setaffinity SYS_sched_setattr
    SYS_sched_setparam SYS_sched_setscheduler SYS_sched_yield SYS_seccomp SYS_semctl SYS_semget
    SYS_semop SYS_semtimedop SYS_sendfile SYS_sendmmsg SYS_sendmsg SYS_sendto SYS_set_mempolicy
    SYS_set_mempolicy_home_node SYS_set_robust_list SYS_set_tid_address SYS_setdomainname
    SYS_setfsgid SYS_setfsuid SYS_setgid SYS_setgroups SYS_sethostname SYS_setitimer SYS_setns
    SYS_setpgid SYS_setpriority SYS_setregid SYS_setresgid SYS_setresuid SYS_setreuid SYS_setsid
    SYS_setsockopt SYS_settimeofday SYS_setuid SYS_setxattr SYS_shmat SYS_shmctl SYS_shmdt
    SYS_shmget SYS_shutdown SYS_sigaltstack SYS_signalfd4 SYS_socket SYS_socketpair SYS_splice
    SYS_statfs SYS_statx SYS_swapoff SYS_swapon SYS_symlinkat SYS_sync SYS_syncfs SYS_sysinfo
    SYS_syslog SYS_tee SYS_tgkill SYS_timer_create SYS_timer_delete SYS_timer_getoverrun
    SYS_timer_gettime SYS_timer_settime SYS_timerfd_create SYS_timerfd_gettime SYS_timerfd_settime
    SYS_times SYS_tkill SYS_truncate SYS_umask SYS_umount2 SYS_uname SYS_unlinkat SYS_unshare
    SYS_userfaultfd SYS_utimensat SYS_vhangup SYS_vmsplice SYS_wait4 SYS_waitid SYS_write
    SYS_writev
);

/// The legacy calls x86_64 has and aarch64 (a newer ABI) does not.
#[cfg(target_arch = "x86_64")]
const ARCH_ONLY: &[(&str, libc::c_long)] = syscall_table!(
    SYS__sysctl SYS_access SYS_afs_syscall SYS_alarm SYS_arch_prctl SYS_chmod SYS_chown SYS_creat
    SYS_dup2 SYS_epoll_create SYS_epoll_ctl_old SYS_epoll_wait SYS_epoll_wait_old SYS_eventfd
    SYS_fork SYS_futimesat SYS_get_thread_area SYS_getdents SYS_getpgrp SYS_getpmsg
    SYS_getrlimit SYS_inotify_init SYS_ioperm SYS_iopl SYS_kexec_file_load SYS_lchown SYS_link
    SYS_lstat SYS_mkdir SYS_mknod SYS_modify_ldt SYS_open SYS_pause SYS_pipe SYS_poll SYS_putpmsg
    SYS_readlink SYS_rename SYS_renameat SYS_rmdir SYS_security SYS_select SYS_set_thread_area
    SYS_setrlimit SYS_signalfd SYS_stat SYS_symlink SYS_sync_file_range SYS_sysfs SYS_time
    SYS_tuxcall SYS_unlink SYS_uselib SYS_ustat SYS_utime SYS_utimes SYS_vfork SYS_vserver
);
#[cfg(target_arch = "aarch64")]
const ARCH_ONLY: &[(&str, libc::c_long)] = &[];

/// Calls newer than libc 0.2.191 knows. Numbers from 424 up are the same on every architecture
/// (the kernel's unified syscall table), so one list serves both.
const UNIFIED: &[(&str, libc::c_long)] = &[
    ("SYS_cachestat", 451),
    ("SYS_fchmodat2", 452),
    ("SYS_map_shadow_stack", 453),
    ("SYS_futex_wake", 454),
    ("SYS_futex_wait", 455),
    ("SYS_futex_requeue", 456),
    ("SYS_statmount", 457),
    ("SYS_listmount", 458),
    ("SYS_lsm_get_self_attr", 459),
    ("SYS_lsm_set_self_attr", 460),
    ("SYS_lsm_list_modules", 461),
];

fn known_syscalls() -> impl Iterator<Item = &'static (&'static str, libc::c_long)> {
    COMMON.iter().chain(ARCH_ONLY).chain(UNIFIED)
}

/// The number of a syscall on the build architecture; `None` if it has no such call.
fn syscall_number(name: &str) -> Option<i64> {
    known_syscalls()
        .find(|(sys, _)| sys.strip_prefix("SYS_") == Some(name))
        .map(|&(_, nr)| nr)
}

/// The highest syscall number we know: anything above is newer than this build.
fn max_syscall_number() -> i64 {
    known_syscalls().map(|&(_, nr)| nr).max().unwrap_or(0)
}

/// Programs as nested arrays of `[code, jt, jf, k]` (seccompiler's `sock_filter` has no serde).
fn ser_programs<S: Serializer>(programs: &[BpfProgram], s: S) -> Result<S::Ok, S::Error> {
    let raw: Vec<Vec<(u16, u8, u8, u32)>> = programs
        .iter()
        .map(|p| p.iter().map(|i| (i.code, i.jt, i.jf, i.k)).collect())
        .collect();
    raw.serialize(s)
}

fn de_programs<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<BpfProgram>, D::Error> {
    let raw = Vec::<Vec<(u16, u8, u8, u32)>>::deserialize(d)?;
    Ok(raw
        .into_iter()
        .map(|p| {
            p.into_iter()
                .map(|(code, jt, jf, k)| sock_filter { code, jt, jf, k })
                .collect()
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CString;

    fn temp_file(name: &str, contents: &str) -> PathBuf {
        let path = std::env::temp_dir().join(format!("sbx-seccomp-{}-{name}", std::process::id()));
        std::fs::write(&path, contents).expect("write temp profile");
        path
    }

    fn compiled(profile: &SeccompProfile) -> CompiledSeccomp {
        compile(profile)
            .expect("profile compiles")
            .expect("not unconfined")
    }

    /// A classic-BPF interpreter for the instructions seccomp programs use here, run against a
    /// `struct seccomp_data` (nr, arch, ip, args).
    fn run_bpf(prog: &[sock_filter], nr: u32, arch: u32, args: [u64; 6]) -> u32 {
        let mut data = [0u32; 16];
        data[0] = nr;
        data[1] = arch;
        for (i, a) in args.iter().enumerate() {
            data[4 + 2 * i] = *a as u32;
            data[5 + 2 * i] = (*a >> 32) as u32;
        }
        let (mut a, mut pc) = (0u32, 0usize);
        loop {
            let i = &prog[pc];
            pc += 1;
            match i.code {
                0x20 => a = data[i.k as usize / 4],
                0x54 => a &= i.k,
                0x05 => pc += i.k as usize,
                0x15 | 0x25 | 0x35 | 0x45 => {
                    let t = match i.code {
                        0x15 => a == i.k,
                        0x25 => a > i.k,
                        0x35 => a >= i.k,
                        _ => a & i.k != 0,
                    };
                    pc += if t { i.jt } else { i.jf } as usize;
                }
                0x06 => return i.k,
                other => panic!("opcode {other:#x} not interpreted"),
            }
        }
    }

    /// What the profile answers for a call: every program runs, the most severe action wins
    /// (lower action values are more severe; the kernel compares SECCOMP_RET_ACTION_FULL).
    fn verdict(c: &CompiledSeccomp, nr: u32, args: [u64; 6]) -> u32 {
        let action = |r: u32| r & 0xffff_0000;
        let mut best: Option<u32> = None;
        for p in c.programs.iter().rev() {
            let r = run_bpf(p, nr, native::AUDIT_ARCH, args);
            if best.is_none_or(|b| (action(r) as i32) < (action(b) as i32)) {
                best = Some(r);
            }
        }
        best.expect("at least one program")
    }

    /// The same rules through seccompiler's own linear layout: the reference for our search.
    fn reference_program(
        matches: &Matches,
        otherwise: SeccompAction,
        on_match: SeccompAction,
    ) -> BpfProgram {
        let rules = matches
            .iter()
            .map(|(nr, c)| {
                (
                    *nr,
                    if c.always {
                        Vec::new()
                    } else {
                        c.rules.clone()
                    },
                )
            })
            .collect();
        let target = if cfg!(target_arch = "x86_64") {
            seccompiler::TargetArch::x86_64
        } else {
            seccompiler::TargetArch::aarch64
        };
        let f = seccompiler::SeccompFilter::new(rules, otherwise, on_match, target).unwrap();
        BpfProgram::try_from(f).unwrap()
    }

    #[test]
    fn search_layout_answers_like_a_linear_scan_for_every_syscall() {
        // A profile with every shape: unconditional allows, an AND of two conditions, OR of
        // rules, masked and ordered comparisons, and gaps between numbers.
        let mut matches = Matches::new();
        for nr in [0, 1, 2, 3, 7, 8, 9, 60, 61, 200, 231, 300, 301, 302, 450] {
            matches.entry(nr).or_default().add(None);
        }
        let c = |i, op, v| SeccompCondition::new(i, SeccompCmpArgLen::Qword, op, v).unwrap();
        let and = SeccompRule::new(vec![
            c(0, SeccompCmpOp::Gt, 5),
            c(1, SeccompCmpOp::Lt, 1 << 40),
        ])
        .unwrap();
        let masked = SeccompRule::new(vec![c(0, SeccompCmpOp::MaskedEq(0x7e02_0000), 0)]).unwrap();
        let ge = SeccompRule::new(vec![c(2, SeccompCmpOp::Ge, u64::MAX - 1)]).unwrap();
        matches.entry(56).or_default().add(Some(&masked));
        matches.entry(41).or_default().add(Some(&and));
        matches.entry(41).or_default().add(Some(&ge));
        let eperm = SeccompAction::Errno(libc::EPERM as u32);
        let ours = program(
            "test",
            copy(&matches),
            eperm.clone(),
            SeccompAction::Allow,
            &[],
        )
        .unwrap();
        let reference = reference_program(&matches, eperm, SeccompAction::Allow);
        let argsets = [
            [0u64; 6],
            [6, 1, 0, 0, 0, 0],
            [6, 1 << 41, 0, 0, 0, 0],
            [0x1000_0000, 0, u64::MAX, 0, 0, 0],
            [0x0002_0000 | 0x11, 0, 0, 0, 0, 0],
            [u64::MAX, u64::MAX, u64::MAX - 1, 0, 0, 0],
        ];
        for nr in 0..600u32 {
            for args in argsets {
                assert_eq!(
                    run_bpf(&ours, nr, native::AUDIT_ARCH, args),
                    run_bpf(&reference, nr, native::AUDIT_ARCH, args),
                    "syscall {nr} args {args:x?}"
                );
            }
        }
        // Another ABI is killed, as seccompiler's layout does.
        assert_eq!(
            run_bpf(&ours, 1, 0x4000_0003, [0; 6]),
            libc::SECCOMP_RET_KILL_PROCESS
        );
    }

    fn copy(m: &Matches) -> Matches {
        m.iter()
            .map(|(nr, c)| {
                (
                    *nr,
                    Chain {
                        always: c.always,
                        rules: c.rules.clone(),
                    },
                )
            })
            .collect()
    }

    #[test]
    fn default_profile_verdicts() {
        let c = compiled(&SeccompProfile::Default);
        let nr = |name: &str| syscall_number(name).unwrap() as u32;
        let eperm = libc::SECCOMP_RET_ERRNO | libc::EPERM as u32;
        for denied in [
            "mount",
            "unshare",
            "setns",
            "keyctl",
            "bpf",
            "reboot",
            "kexec_load",
        ] {
            assert_eq!(verdict(&c, nr(denied), [0; 6]), eperm, "{denied}");
        }
        for allowed in [
            "read",
            "write",
            "openat",
            "execve",
            "exit_group",
            "futex",
            "getpid",
        ] {
            assert_eq!(
                verdict(&c, nr(allowed), [0; 6]),
                libc::SECCOMP_RET_ALLOW,
                "{allowed}"
            );
        }
        // clone: allowed without namespace flags, denied with CLONE_NEWUSER.
        assert_eq!(
            verdict(&c, nr("clone"), [libc::SIGCHLD as u64, 0, 0, 0, 0, 0]),
            libc::SECCOMP_RET_ALLOW
        );
        assert_eq!(
            verdict(&c, nr("clone"), [libc::CLONE_NEWUSER as u64, 0, 0, 0, 0, 0]),
            eperm
        );
        assert_eq!(
            verdict(&c, nr("clone3"), [0; 6]),
            libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32
        );
        // Past every known syscall: ENOSYS, so libc falls back.
        assert_eq!(
            verdict(&c, 1000, [0; 6]),
            libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32
        );
        // Short programs load fast; the longest stays well under the kernel's 4096.
        let longest = c.programs.iter().map(Vec::len).max().unwrap();
        assert!(longest < 400, "main program is {longest} instructions");
    }

    #[test]
    fn default_profile_parses_and_compiles() {
        let filter = compiled(&SeccompProfile::Default);
        // Explicit deny, clone3 ENOSYS, main.
        assert_eq!(filter.programs.len(), 3);
        if cfg!(target_arch = "x86_64") {
            assert!(
                filter.unknown_syscalls().is_empty(),
                "unknown names in the default profile: {:?}",
                filter.unknown_syscalls()
            );
        }
        // It crosses a process boundary as JSON.
        let json = serde_json::to_string(&filter).expect("serialize");
        let back: CompiledSeccomp = serde_json::from_str(&json).expect("deserialize");
        assert_eq!(back.programs, filter.programs);
        assert!(
            json.len() < 64 * 1024,
            "compiled profile is {} bytes",
            json.len()
        );
    }

    #[test]
    fn unconfined_compiles_to_nothing() {
        assert!(compile(&SeccompProfile::Unconfined)
            .expect("compiles")
            .is_none());
    }

    #[test]
    fn unknown_syscall_names_are_skipped_and_reported() {
        let filter = compile_text(
            "test",
            r#"{"defaultAction": "SCMP_ACT_ERRNO",
                "syscalls": [{"names": ["getpid", "no_such_syscall"], "action": "SCMP_ACT_ALLOW"}]}"#,
        )
        .expect("compiles");
        assert_eq!(filter.unknown_syscalls(), ["no_such_syscall"]);
    }

    #[test]
    fn missing_file_error_names_the_file() {
        let path = PathBuf::from("/nonexistent/sbx-profile.json");
        let err = compile(&SeccompProfile::File(path)).expect_err("missing file");
        assert!(matches!(err, SeccompError::Read { .. }));
        assert!(
            err.to_string().contains("/nonexistent/sbx-profile.json"),
            "{err}"
        );
    }

    #[test]
    fn invalid_json_error_names_the_file() {
        let path = temp_file("invalid.json", "{ \"defaultAction\": ");
        let err = compile(&SeccompProfile::File(path.clone())).expect_err("invalid json");
        let _ = std::fs::remove_file(&path);
        assert!(matches!(err, SeccompError::Parse { .. }));
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
    }

    #[test]
    fn docker_only_fields_are_rejected() {
        let err = compile_text(
            "docker.json",
            r#"{"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [{"names": ["mount"],
                "action": "SCMP_ACT_ALLOW", "includes": {"caps": ["CAP_SYS_ADMIN"]}}]}"#,
        )
        .expect_err("includes is not OCI");
        assert!(
            err.to_string().contains("\"includes\"") && err.to_string().contains("syscalls[0]"),
            "{err}"
        );
    }

    #[test]
    fn foreign_architecture_and_notify_are_rejected() {
        let err = compile_text(
            "t",
            r#"{"defaultAction": "SCMP_ACT_ERRNO", "architectures": ["SCMP_ARCH_S390X"]}"#,
        )
        .expect_err("no native arch");
        assert!(matches!(err, SeccompError::ArchNotListed { .. }), "{err}");
        let err = compile_text(
            "t",
            r#"{"defaultAction": "SCMP_ACT_ALLOW",
                "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_NOTIFY"}]}"#,
        )
        .expect_err("notify");
        assert!(err.to_string().contains("SCMP_ACT_NOTIFY"), "{err}");
    }

    /// Fork; the child installs `filter`, runs `call`, and exits 0 if it returned >= 0, else
    /// with its errno (100 if the install failed). Returns the child's exit status.
    ///
    /// The child only makes raw syscalls between fork and `_exit` (install allocates nothing),
    /// which keeps it sound although the test harness is multi-threaded.
    fn in_child(filter: &CompiledSeccomp, call: impl FnOnce() -> i64) -> i32 {
        // SAFETY: the child runs only async-signal-safe code (see above) and leaves by _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            if filter.install().is_err() {
                // SAFETY: _exit ends the child without running the parent's destructors.
                unsafe { libc::_exit(100) };
            }
            let ret = call();
            let code = if ret >= 0 {
                0
            } else {
                std::io::Error::last_os_error().raw_os_error().unwrap_or(99)
            };
            // SAFETY: as above.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waits for our own child, writing into a local.
        let waited = unsafe { libc::waitpid(pid, &mut status, 0) };
        assert_eq!(waited, pid);
        assert!(libc::WIFEXITED(status), "child died: status {status:#x}");
        libc::WEXITSTATUS(status)
    }

    /// A call for a child to make.
    type Call<'a> = Box<dyn FnOnce() -> i64 + 'a>;

    /// A raw syscall with up to five integer arguments.
    fn sys(nr: libc::c_long, args: [libc::c_long; 5]) -> i64 {
        // SAFETY: callers pass only integer or NULL arguments, or pointers to live locals.
        unsafe { libc::syscall(nr, args[0], args[1], args[2], args[3], args[4]) }
    }

    #[test]
    fn default_profile_denies_escapes_and_allows_ordinary_calls() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root to show that the calls fail because of the filter");
            return;
        }
        let filter = compiled(&SeccompProfile::Default);
        let eperm = libc::EPERM;
        let target = CString::new("/nonexistent-sbx-mount-target").expect("no NUL");
        let tmpfs = CString::new("tmpfs").expect("no NUL");
        let denied: Vec<(&str, Call)> = vec![
            (
                "unshare(CLONE_NEWUSER)",
                Box::new(|| sys(libc::SYS_unshare, [libc::CLONE_NEWUSER as _, 0, 0, 0, 0])),
            ),
            ("unshare(0)", Box::new(|| sys(libc::SYS_unshare, [0; 5]))),
            (
                "clone(CLONE_NEWNS)",
                Box::new(|| {
                    sys(
                        libc::SYS_clone,
                        [(libc::CLONE_NEWNS | libc::SIGCHLD) as _, 0, 0, 0, 0],
                    )
                }),
            ),
            (
                "setns",
                Box::new(|| sys(libc::SYS_setns, [0, libc::CLONE_NEWNET as _, 0, 0, 0])),
            ),
            // KEYCTL_GET_KEYRING_ID of the session keyring.
            (
                "keyctl",
                Box::new(|| sys(libc::SYS_keyctl, [0, -3, 0, 0, 0])),
            ),
            ("bpf", Box::new(|| sys(libc::SYS_bpf, [0, 0, 0, 0, 0]))),
            (
                "perf_event_open",
                Box::new(|| sys(libc::SYS_perf_event_open, [0; 5])),
            ),
            // Without the filter this fails with ENOENT (no such mount point).
            (
                "mount",
                Box::new(|| {
                    sys(
                        libc::SYS_mount,
                        [
                            tmpfs.as_ptr() as _,
                            target.as_ptr() as _,
                            tmpfs.as_ptr() as _,
                            0,
                            0,
                        ],
                    )
                }),
            ),
            (
                "umount2",
                Box::new(|| sys(libc::SYS_umount2, [target.as_ptr() as _, 0, 0, 0, 0])),
            ),
            (
                "pivot_root",
                Box::new(|| {
                    sys(
                        libc::SYS_pivot_root,
                        [target.as_ptr() as _, target.as_ptr() as _, 0, 0, 0],
                    )
                }),
            ),
            (
                "socket(AF_VSOCK)",
                Box::new(|| {
                    sys(
                        libc::SYS_socket,
                        [libc::AF_VSOCK as _, libc::SOCK_STREAM as _, 0, 0, 0],
                    )
                }),
            ),
            (
                "personality(ADDR_NO_RANDOMIZE)",
                Box::new(|| {
                    sys(
                        libc::SYS_personality,
                        [libc::ADDR_NO_RANDOMIZE as _, 0, 0, 0, 0],
                    )
                }),
            ),
            (
                "io_uring_setup",
                Box::new(|| sys(libc::SYS_io_uring_setup, [0; 5])),
            ),
            (
                "userfaultfd",
                Box::new(|| sys(libc::SYS_userfaultfd, [0; 5])),
            ),
            // Needs CAP_SYS_PTRACE in Docker's profile; ours does not grant it. KCMP_FILE.
            ("kcmp", Box::new(|| sys(libc::SYS_kcmp, [0, 0, 0, 0, 0]))),
            // SYSLOG_ACTION_SIZE_BUFFER: harmless, and works as root without the filter.
            (
                "syslog",
                Box::new(|| sys(libc::SYS_syslog, [10, 0, 0, 0, 0])),
            ),
        ];
        for (name, call) in denied {
            assert_eq!(
                in_child(&filter, call),
                eperm,
                "{name} should fail with EPERM"
            );
        }

        // clone3 and syscalls newer than we know: ENOSYS, so libc falls back.
        assert_eq!(
            in_child(&filter, || sys(libc::SYS_clone3, [0; 5])),
            libc::ENOSYS,
            "clone3"
        );
        assert_eq!(
            in_child(&filter, || sys(1000, [0; 5])),
            libc::ENOSYS,
            "syscall 1000"
        );

        let devnull = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/null")
            .expect("open /dev/null");
        let fd = std::os::fd::AsRawFd::as_raw_fd(&devnull) as libc::c_long;
        let byte = b"x";
        let allowed: Vec<(&str, Call)> = vec![
            ("getpid", Box::new(|| sys(libc::SYS_getpid, [0; 5]))),
            (
                "write",
                Box::new(move || sys(libc::SYS_write, [fd, byte.as_ptr() as _, 1, 0, 0])),
            ),
            (
                "socket(AF_UNIX)",
                Box::new(|| {
                    sys(
                        libc::SYS_socket,
                        [libc::AF_UNIX as _, libc::SOCK_STREAM as _, 0, 0, 0],
                    )
                }),
            ),
            (
                "personality(query)",
                Box::new(|| sys(libc::SYS_personality, [0xffff_ffff, 0, 0, 0, 0])),
            ),
            // fork: clone without namespace flags.
            (
                "fork",
                Box::new(|| {
                    // SAFETY: the grandchild only calls _exit.
                    let pid = unsafe { libc::fork() };
                    if pid == 0 {
                        // SAFETY: leaves the grandchild at once.
                        unsafe { libc::_exit(0) };
                    }
                    if pid > 0 {
                        // SAFETY: reaps our own child; NULL status is allowed.
                        unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
                    }
                    pid.into()
                }),
            ),
            // A thread: glibc tries clone3, gets ENOSYS and falls back to clone.
            (
                "pthread_create",
                Box::new(|| {
                    extern "C" fn noop(_: *mut libc::c_void) -> *mut libc::c_void {
                        std::ptr::null_mut()
                    }
                    let mut thread: libc::pthread_t = 0;
                    // SAFETY: thread is a live local; noop is a valid start routine; default attrs.
                    let rc = unsafe {
                        libc::pthread_create(
                            &mut thread,
                            std::ptr::null(),
                            noop,
                            std::ptr::null_mut(),
                        )
                    };
                    if rc != 0 {
                        // SAFETY: sets this thread's errno so the parent sees the cause.
                        unsafe { *libc::__errno_location() = rc };
                        return -1;
                    }
                    // SAFETY: joins the thread we just created.
                    unsafe { libc::pthread_join(thread, std::ptr::null_mut()) };
                    0
                }),
            ),
        ];
        for (name, call) in allowed {
            assert_eq!(in_child(&filter, call), 0, "{name} should work");
        }
    }

    /// What ordinary payloads do; each tool is skipped when the host does not have it.
    const ORDINARY_WORK: &str = r#"
set -e
grep -q '^Seccomp:.*2' /proc/self/status
grep -q '^NoNewPrivs:.*1' /proc/self/status
echo hello | tr a-z A-Z | grep -q HELLO
ls / | sort | head -n 1 >/dev/null
d=$(mktemp -d)
trap 'rm -rf "$d"' EXIT
if command -v python3 >/dev/null; then
python3 - <<'PY'
import multiprocessing, os, socket, sqlite3, subprocess, tempfile, threading
t = threading.Thread(target=lambda: None); t.start(); t.join()
assert subprocess.run(["true"]).returncode == 0
with tempfile.TemporaryDirectory() as d:
    p = os.path.join(d, "f")
    with open(p, "w") as f:
        f.write("x")
    os.chmod(p, 0o600); os.rename(p, p + "2"); os.symlink(p + "2", p)
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(); s.close()
with multiprocessing.Pool(2) as pool:
    assert pool.map(abs, [-1, -2]) == [1, 2]
sqlite3.connect(":memory:").execute("select 1")
os.urandom(8)
PY
python3 -m pip --version >/dev/null
fi
if command -v cc >/dev/null; then
printf '#include <stdio.h>\nint main(void) { puts("hi"); return 0; }\n' > "$d/h.c"
cc -O2 -o "$d/h" "$d/h.c"
"$d/h" | grep -q hi
fi
"#;

    #[test]
    fn ordinary_programs_run_under_the_default_profile() {
        let filter = compiled(&SeccompProfile::Default);
        let cstr = |s: &str| CString::new(s).expect("no NUL");
        let sh = cstr("/bin/sh");
        let argv = [sh.clone(), cstr("-c"), cstr(ORDINARY_WORK)];
        let argv: Vec<*const libc::c_char> = argv
            .iter()
            .map(|a| a.as_ptr())
            .chain([std::ptr::null()])
            .collect();
        let env: Vec<CString> = std::env::vars()
            .map(|(k, v)| cstr(&format!("{k}={v}")))
            .collect();
        let env: Vec<*const libc::c_char> = env
            .iter()
            .map(|e| e.as_ptr())
            .chain([std::ptr::null()])
            .collect();
        let status = in_child(&filter, || {
            // SAFETY: argv and env are NULL-terminated arrays of live C strings.
            unsafe { libc::execve(sh.as_ptr(), argv.as_ptr(), env.as_ptr()) };
            -1
        });
        assert_eq!(
            status, 0,
            "ordinary work failed under the default profile (see stderr)"
        );
    }

    #[test]
    fn args_on_one_entry_are_anded_and_errno_rules_override_allow_default() {
        // Default ALLOW; getpriority(PRIO_PROCESS, 12345) alone gets EACCES.
        let filter = compile_text(
            "t",
            r#"{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{
                "names": ["getpriority"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13,
                "args": [{"index": 0, "value": 0, "op": "SCMP_CMP_EQ"},
                         {"index": 1, "value": 12345, "op": "SCMP_CMP_EQ"}]}]}"#,
        )
        .expect("compiles");
        assert_eq!(
            filter.programs.len(),
            1,
            "an ALLOW default needs no main program"
        );
        let both = in_child(&filter, || sys(libc::SYS_getpriority, [0, 12345, 0, 0, 0]));
        assert_eq!(both, libc::EACCES);
        let one = in_child(&filter, || sys(libc::SYS_getpriority, [0, 0, 0, 0, 0]));
        assert_eq!(one, 0);
    }
}
