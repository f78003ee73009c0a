//! Unique, recognisable names for everything a test makes, and cleanup by name.
//!
//! A test's tag is `nt` + 5 hex digits (7 characters, all tags the same length so that no tag is a
//! prefix of another). Its namespaces are `<tag>-h1`, `<tag>-sw`, ...; the agent on host `n` gets
//! the name prefix `<tag><n>` (8 characters, the agent's limit), so the endpoint namespaces it makes,
//! `/run/netns/<tag><n>-<endpoint>`, also start with the tag and agents on different hosts never
//! collide; their resolver files, `/etc/netns/<tag><n>-<endpoint>/`, too. Pin directories are
//! `/sys/fs/bpf/<tag>-h<n>` and the temporary directory is `/tmp/net-tests/<tag>`, which also
//! records the owning process so that a later run can sweep what a killed test process left
//! behind.

use std::{
    collections::hash_map::DefaultHasher,
    fs::{self, File, OpenOptions},
    hash::{Hash, Hasher},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
    time::SystemTime,
};

use crate::netns::{del_netns, kill_processes_in, list_netns, netns_id};

/// Every test's temporary directory lives under this one.
pub const TMP_ROOT: &str = "/tmp/net-tests";
/// Where bpffs is (or gets) mounted; agents pin under `<BPFFS>/<tag>-<host>`.
pub const BPFFS: &str = "/sys/fs/bpf";
/// Where `ip netns exec <name>` finds per-namespace files such as `resolv.conf`.
pub const ETC_NETNS: &str = "/etc/netns";
/// Length of every tag.
pub const TAG_LEN: usize = 7;
const TAG_START: &str = "nt";

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A fresh tag whose temporary directory has been created (which is what reserves the tag).
/// Returns the tag and that directory.
pub fn new_tag() -> (String, PathBuf) {
    fs::create_dir_all(TMP_ROOT).unwrap_or_else(|e| panic!("creating {TMP_ROOT}: {e}"));
    for _ in 0..1000 {
        let mut h = DefaultHasher::new();
        std::process::id().hash(&mut h);
        COUNTER.fetch_add(1, Ordering::Relaxed).hash(&mut h);
        SystemTime::now().hash(&mut h);
        let tag = format!("{TAG_START}{:05x}", h.finish() & 0xf_ffff);
        debug_assert_eq!(tag.len(), TAG_LEN);
        if !list_netns(&tag).is_empty() {
            continue;
        }
        let dir = Path::new(TMP_ROOT).join(&tag);
        match fs::create_dir(&dir) {
            Ok(()) => {
                fs::write(
                    dir.join("owner"),
                    owner_id(std::process::id()).unwrap_or_default(),
                )
                .unwrap_or_else(|e| panic!("writing {}/owner: {e}", dir.display()));
                return (tag, dir);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => panic!("creating {}: {e}", dir.display()),
        }
    }
    panic!("could not find a free test tag under {TMP_ROOT}");
}

/// "pid starttime" of a live process, which identifies it even if the pid is reused later.
fn owner_id(pid: u32) -> Option<String> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Field 22 (starttime); the command name (field 2) may contain spaces, so count after ')'.
    let after = &stat[stat.rfind(')')? + 1..];
    let start = after.split_whitespace().nth(19)?;
    Some(format!("{pid} {start}"))
}

fn is_tag(name: &str) -> bool {
    name.len() == TAG_LEN
        && name.starts_with(TAG_START)
        && name[TAG_START.len()..]
            .chars()
            .all(|c| c.is_ascii_hexdigit())
}

/// Runs `f` holding an exclusive lock shared by every test process, for machine-wide steps
/// (mounting bpffs, sweeping stale tags).
pub fn with_global_lock<T>(f: impl FnOnce() -> T) -> T {
    fs::create_dir_all(TMP_ROOT).unwrap_or_else(|e| panic!("creating {TMP_ROOT}: {e}"));
    let path = Path::new(TMP_ROOT).join(".lock");
    let file: File = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    // SAFETY: flock on a file descriptor we own; released when `file` is closed.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
    assert_eq!(
        rc,
        0,
        "locking {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    let value = f();
    drop(file);
    value
}

/// Mounts bpffs on `/sys/fs/bpf` unless it is there already. Agents would do it themselves, but
/// two agents starting at once could both mount it and hide each other's pins.
pub fn ensure_bpffs() {
    with_global_lock(|| {
        let mounted = nix::sys::statfs::statfs(BPFFS)
            .map(|fs| fs.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC)
            .unwrap_or(false);
        if !mounted {
            nix::mount::mount(
                Some("bpf"),
                BPFFS,
                Some("bpf"),
                nix::mount::MsFlags::empty(),
                None::<&str>,
            )
            .unwrap_or_else(|e| panic!("mounting bpffs on {BPFFS}: {e}"));
        }
    })
}

/// Deletes the tagged test namespaces of test processes that no longer exist (killed without
/// unwinding), with their agents, pins and temporary directories.
pub fn sweep_stale() {
    with_global_lock(|| {
        let Ok(entries) = fs::read_dir(TMP_ROOT) else {
            return;
        };
        for entry in entries.filter_map(|e| e.ok()) {
            let tag = entry.file_name().to_string_lossy().into_owned();
            if !is_tag(&tag) {
                continue;
            }
            let owner = fs::read_to_string(entry.path().join("owner")).unwrap_or_default();
            let pid: Option<u32> = owner.split_whitespace().next().and_then(|p| p.parse().ok());
            let alive = pid.and_then(owner_id).is_some_and(|id| id == owner.trim());
            if !alive {
                eprintln!("net-tests: sweeping {tag}, left behind by process {owner:?}");
                for problem in cleanup_tag(&tag, &entry.path()) {
                    eprintln!("net-tests: sweeping {tag}: {problem}");
                }
            }
        }
    })
}

/// Deletes everything carrying `tag`: agents recorded in `dir`, namespaces, pin directories, and
/// `dir` itself. Best effort; returns the problems met, for the caller to report.
pub fn cleanup_tag(tag: &str, dir: &Path) -> Vec<String> {
    let mut problems = Vec::new();
    kill_recorded_agents(tag, dir);
    // What tests started inside their namespaces (detached `netctl run` commands, ...) goes
    // first: a process keeps its namespace alive after the name is deleted.
    for name in list_netns(tag) {
        if let Some(id) = netns_id(&name) {
            kill_processes_in(id);
        }
    }
    // Pins first: unpinning the links detaches the programs before their interfaces go away.
    if let Ok(entries) = fs::read_dir(BPFFS) {
        for entry in entries.filter_map(|e| e.ok()) {
            if entry.file_name().to_string_lossy().starts_with(tag)
                && let Err(e) = fs::remove_dir_all(entry.path())
            {
                problems.push(format!("removing {}: {e}", entry.path().display()));
            }
        }
    }
    for name in list_netns(tag) {
        if let Some(problem) = del_netns(&name) {
            problems.push(format!("deleting namespace {name}: {problem}"));
        }
    }
    // The resolv.conf files agents write for the namespaces they make (`ip netns exec` reads
    // them); an agent killed before removing its endpoints leaves them behind.
    if let Ok(entries) = fs::read_dir(ETC_NETNS) {
        for entry in entries.filter_map(|e| e.ok()) {
            if entry.file_name().to_string_lossy().starts_with(tag)
                && let Err(e) = fs::remove_dir_all(entry.path())
            {
                problems.push(format!("removing {}: {e}", entry.path().display()));
            }
        }
    }
    if let Err(e) = fs::remove_dir_all(dir)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        problems.push(format!("removing {}: {e}", dir.display()));
    }
    problems
}

/// Kills agents whose pid files are under `dir` (`<dir>/<host>/agent.pid`) if the process with
/// that pid is still an agent of this tag.
fn kill_recorded_agents(tag: &str, dir: &Path) {
    let Ok(hosts) = fs::read_dir(dir) else {
        return;
    };
    for host in hosts.filter_map(|e| e.ok()) {
        let Ok(pid) = fs::read_to_string(host.path().join("agent.pid")) else {
            continue;
        };
        let Ok(pid) = pid.trim().parse::<i32>() else {
            continue;
        };
        let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(tag) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}
