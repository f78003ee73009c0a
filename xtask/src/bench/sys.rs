//! Plumbing for the bench: interrupts, deadlines, threads that live inside a network namespace on
//! one CPU, child processes that are always reaped, and the two raw bpf(2) calls aya does not
//! offer.

use std::{
    fs::{self, File},
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::process::CommandExt as _,
    },
    path::Path,
    process::{Child, Command},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use nix::{
    sched::{CloneFlags, CpuSet, sched_getaffinity, sched_setaffinity, setns},
    sys::signal::{self, Signal},
    unistd::Pid,
};

pub use crate::sim_agent::NETNS_DIR;

/// How long a child gets to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

use crate::exec::cmd;
pub use crate::interrupt::{catch_interrupts, check_interrupted, interrupted, wait_for};

/// The CPUs this process may run on, in order.
pub fn allowed_cpus() -> Result<Vec<usize>> {
    let set = sched_getaffinity(Pid::from_raw(0)).context("sched_getaffinity")?;
    let cpus: Vec<usize> = (0..CpuSet::count())
        .filter(|&cpu| set.is_set(cpu).unwrap_or(false))
        .collect();
    if cpus.is_empty() {
        bail!("sched_getaffinity reported no CPU this process may run on");
    }
    Ok(cpus)
}

/// Moves the calling thread into the named network namespace and, if given, onto `cpu`. Only the
/// calling thread moves: setns(CLONE_NEWNET) and sched_setaffinity(0) are per thread, so the main
/// thread never leaves the machine's own namespace.
pub fn enter(netns: &str, cpu: Option<usize>) -> Result<()> {
    let path = Path::new(NETNS_DIR).join(netns);
    let file = File::open(&path)
        .with_context(|| format!("opening network namespace {}", path.display()))?;
    setns(&file, CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("setns into network namespace {}", path.display()))?;
    let Some(cpu) = cpu else {
        return Ok(());
    };
    let mut set = CpuSet::new();
    set.set(cpu)
        .with_context(|| format!("CPU {cpu} is out of range"))?;
    sched_setaffinity(Pid::from_raw(0), &set)
        .with_context(|| format!("pinning a thread to CPU {cpu}"))?;
    Ok(())
}

/// A command for `program` that runs in the network namespace `netns` and nowhere else: the
/// child switches before exec and fails to start if it cannot. Unlike `ip netns exec`, nothing
/// else runs first and no mount namespace is made, so timing the command times the program.
pub fn in_netns(netns: &str, program: &str) -> Command {
    let path = Path::new(NETNS_DIR).join(netns);
    let mut command = cmd(program);
    // Opened in the child: an fd opened here would have to outlive every spawn of the command.
    let path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap_or_default();
    // SAFETY: open, setns and close are async-signal-safe, and the closure only reads its own
    // C string.
    unsafe {
        command.pre_exec(move || {
            let fd = libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let entered = libc::setns(fd, libc::CLONE_NEWNET);
            let error = std::io::Error::last_os_error();
            libc::close(fd);
            if entered != 0 {
                return Err(error);
            }
            Ok(())
        });
    }
    command
}

/// The result of a scoped thread, with a panic turned into an error naming the thread.
pub fn joined<T>(what: &str, handle: thread::ScopedJoinHandle<'_, Result<T>>) -> Result<T> {
    match handle.join() {
        Ok(result) => result.with_context(|| what.to_owned()),
        Err(panic) => {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic without a message".to_owned());
            bail!("{what} panicked: {message}")
        }
    }
}

/// A child process that is stopped (SIGTERM, then SIGKILL) when dropped, so no error path or
/// panic leaves it running.
pub struct ChildGuard {
    what: String,
    child: Option<Child>,
}

impl ChildGuard {
    pub fn new(what: impl Into<String>, child: Child) -> Self {
        Self {
            what: what.into(),
            child: Some(child),
        }
    }

    pub fn child(&mut self) -> Result<&mut Child> {
        self.child
            .as_mut()
            .with_context(|| format!("{} was already stopped", self.what))
    }

    /// Whether it has exited, and how.
    pub fn try_wait(&mut self) -> Result<Option<std::process::ExitStatus>> {
        let what = self.what.clone();
        self.child()?
            .try_wait()
            .with_context(|| format!("waiting for {what}"))
    }

    /// Waits up to `timeout` for the child to exit by itself; kills it if it does not.
    pub fn wait_within(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                self.child = None;
                return Ok(status);
            }
            if interrupted() {
                self.stop()?;
                bail!("interrupted while waiting for {}", self.what);
            }
            if Instant::now() >= deadline {
                self.stop()?;
                bail!(
                    "{} did not finish within {timeout:?} and was stopped",
                    self.what
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then SIGKILL if it has not exited within [`STOP_TIMEOUT`].
    pub fn stop(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let what = &self.what;
        if child
            .try_wait()
            .with_context(|| format!("waiting for {what}"))?
            .is_some()
        {
            return Ok(());
        }
        let pid = Pid::from_raw(i32::try_from(child.id()).context("pid out of range")?);
        println!("$ kill -TERM {pid}  # {what}");
        signal::kill(pid, Signal::SIGTERM).with_context(|| format!("sending SIGTERM to {what}"))?;
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if child
                .try_wait()
                .with_context(|| format!("waiting for {what}"))?
                .is_some()
            {
                return Ok(());
            }
            thread::sleep(Duration::from_millis(20));
        }
        child
            .kill()
            .with_context(|| format!("sending SIGKILL to {what}"))?;
        child.wait().with_context(|| format!("reaping {what}"))?;
        bail!("{what} (pid {pid}) ignored SIGTERM for {STOP_TIMEOUT:?} and was killed")
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!("bench cleanup: {e:#}");
        }
    }
}

/// Microseconds that some task has waited for a CPU since boot (PSI, `/proc/pressure/cpu`), or
/// None where the kernel has no PSI. Growth while the bench measures means something else wanted
/// the CPUs the client and server were pinned to.
pub fn cpu_pressure_us() -> Option<u64> {
    let pressure = fs::read_to_string("/proc/pressure/cpu").ok()?;
    pressure
        .lines()
        .find(|l| l.starts_with("some "))?
        .split_whitespace()
        .find_map(|field| field.strip_prefix("total="))?
        .parse()
        .ok()
}

/// `<pid> <start time>`: identifies a process across pid reuse (field 22 of `/proc/<pid>/stat`).
pub fn process_identity(pid: u32) -> Option<String> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses: count from the last ')'.
    let after = &stat[stat.rfind(')')? + 1..];
    let start = after.split_whitespace().nth(19)?;
    Some(format!("{pid} {start}"))
}

// ---------------------------------------------------------------------------------------------
// bpf(2) by hand. aya loads programs only from an ELF object; the no-op baseline must not live in
// the shipped object (the agent would load it and the verifier test requires every program there
// to be one the agent attaches), and building a second object would need the eBPF toolchain at
// bench time. Two instructions are easier to load directly.

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;

/// The `BPF_PROG_LOAD` part of `union bpf_attr` up to `expected_attach_type`; the kernel takes a
/// shorter attr and treats the rest as zero.
#[repr(C)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// The `BPF_OBJ_GET_INFO_BY_FD` part of `union bpf_attr`.
#[repr(C)]
struct InfoByFdAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// Name of the no-op program as bpftool and `loaded_programs` show it.
pub const NOOP_NAME: &str = "bench_noop";

/// Loads a classifier that does nothing: `r0 = 0 (TC_ACT_OK); exit`. Returns its fd and id.
pub fn load_noop_classifier() -> Result<(OwnedFd, u32)> {
    // struct bpf_insn as little-endian u64s: code, dst/src registers, offset, immediate.
    const MOV64_R0_0: u64 = 0xb7; // BPF_ALU64 | BPF_MOV | BPF_K, dst r0, imm 0
    const EXIT: u64 = 0x95; // BPF_JMP | BPF_EXIT
    let insns: [u64; 2] = [MOV64_R0_0, EXIT];
    let license = c"GPL";
    let mut log = vec![0u8; 4096];
    let mut name = [0u8; 16];
    name[..NOOP_NAME.len()].copy_from_slice(NOOP_NAME.as_bytes());
    let attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_SCHED_CLS,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 1,
        log_size: log.len() as u32,
        log_buf: log.as_mut_ptr() as u64,
        kern_version: 0,
        prog_flags: 0,
        prog_name: name,
        prog_ifindex: 0,
        expected_attach_type: 0,
    };
    // SAFETY: `attr` is a valid BPF_PROG_LOAD attr whose pointers (instructions, license, log
    // buffer) outlive the call; the kernel reads at most `size_of::<ProgLoadAttr>()` bytes.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_LOAD,
            &attr as *const ProgLoadAttr,
            size_of::<ProgLoadAttr>(),
        )
    };
    if fd < 0 {
        let error = std::io::Error::last_os_error();
        let log = String::from_utf8_lossy(&log);
        bail!(
            "BPF_PROG_LOAD of the two-instruction no-op classifier failed: {error}; verifier log: \
             {}",
            log.trim_end_matches('\0').trim()
        );
    }
    let fd = i32::try_from(fd).context("bpf(2) returned an fd out of range")?;
    // SAFETY: the kernel just returned this fd and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };

    // struct bpf_prog_info begins with `type`, then `id`; the kernel copies as much as asked.
    let mut info = [0u32; 2];
    let attr = InfoByFdAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: size_of_val(&info) as u32,
        info: info.as_mut_ptr() as u64,
    };
    // SAFETY: a valid BPF_OBJ_GET_INFO_BY_FD attr; the kernel writes at most `info_len` bytes
    // into `info`, which outlives the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            &attr as *const InfoByFdAttr,
            size_of::<InfoByFdAttr>(),
        )
    };
    if ret < 0 {
        bail!(
            "BPF_OBJ_GET_INFO_BY_FD on the no-op classifier failed: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok((fd, info[1]))
}
