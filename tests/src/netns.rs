//! Running code and commands inside network namespaces.

use std::{
    fs::File,
    os::{fd::AsRawFd, linux::fs::MetadataExt, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::Command,
    thread,
};

use nix::sched::{CloneFlags, setns};

use crate::cmd::{CmdOutput, run, run_ok};

/// Where `ip netns` keeps its named namespaces.
pub const NETNS_DIR: &str = "/run/netns";

/// `/run/netns/<name>`.
pub fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// The `ip netns` name of a namespace given by name or by a path under [`NETNS_DIR`].
pub fn netns_name(netns: &str) -> &str {
    match netns.strip_prefix(NETNS_DIR) {
        Some(rest) => rest.trim_start_matches('/'),
        None => {
            assert!(
                !netns.contains('/'),
                "{netns} is neither a namespace name nor a path under {NETNS_DIR}"
            );
            netns
        }
    }
}

/// A namespace given by name or path, as a path.
fn as_path(netns: &str) -> PathBuf {
    if netns.contains('/') {
        PathBuf::from(netns)
    } else {
        netns_path(netns)
    }
}

/// Runs `f` on a fresh thread that has switched into the network namespace `netns` (a name under
/// `/run/netns` or a path). Sockets created in `f` stay in that namespace and can be used from any
/// thread afterwards. A panic in `f` is propagated.
pub fn in_netns<T: Send>(netns: &str, f: impl FnOnce() -> T + Send) -> T {
    let path = as_path(netns);
    thread::scope(|s| {
        let handle = s.spawn(|| {
            let file = File::open(&path)
                .unwrap_or_else(|e| panic!("opening network namespace {}: {e}", path.display()));
            setns(&file, CloneFlags::CLONE_NEWNET)
                .unwrap_or_else(|e| panic!("setns into network namespace {}: {e}", path.display()));
            f()
        });
        match handle.join() {
            Ok(value) => value,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// Runs `args` in the namespace through `ip netns exec` (for ping, ip, ...).
pub fn exec_in(netns: &str, args: &[&str]) -> CmdOutput {
    let mut full = vec!["netns", "exec", netns_name(netns)];
    full.extend_from_slice(args);
    run("ip", &full)
}

/// [`exec_in`], panicking with the full output unless the command succeeded; returns stdout.
pub fn exec_in_ok(netns: &str, args: &[&str]) -> String {
    let out = exec_in(netns, args);
    assert!(out.success(), "command in namespace {netns} failed\n{out}");
    out.stdout
}

/// `ip -n <netns> -j <args>` parsed as JSON.
pub fn ip_json(netns: &str, args: &[&str]) -> serde_json::Value {
    let mut full = vec!["-n", netns_name(netns), "-j"];
    full.extend_from_slice(args);
    let stdout = run_ok("ip", &full);
    serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "parsing `ip {}` output as JSON: {e}\n{stdout}",
            full.join(" ")
        )
    })
}

/// One interface as `ip -j link show` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkInfo {
    pub name: String,
    pub index: u32,
    pub mtu: u32,
    pub mac: String,
    pub up: bool,
}

/// The interfaces of a namespace, sorted by name.
pub fn links(netns: &str) -> Vec<LinkInfo> {
    let json = ip_json(netns, &["link", "show"]);
    let mut links: Vec<LinkInfo> = json
        .as_array()
        .expect("ip -j link show prints an array")
        .iter()
        .map(|l| LinkInfo {
            name: l["ifname"].as_str().unwrap_or_default().to_owned(),
            index: l["ifindex"].as_u64().unwrap_or_default() as u32,
            mtu: l["mtu"].as_u64().unwrap_or_default() as u32,
            mac: l["address"].as_str().unwrap_or_default().to_owned(),
            up: l["flags"]
                .as_array()
                .is_some_and(|f| f.iter().any(|f| f == "UP")),
        })
        .collect();
    links.sort_by(|a, b| a.name.cmp(&b.name));
    links
}

/// One interface of a namespace; panics listing what is there if it is missing.
pub fn link(netns: &str, name: &str) -> LinkInfo {
    let all = links(netns);
    all.iter()
        .find(|l| l.name == name)
        .cloned()
        .unwrap_or_else(|| panic!("no interface {name} in namespace {netns}; found {all:?}"))
}

/// Lines of `ip -n <netns> route show` (IPv4), sorted.
pub fn routes(netns: &str) -> Vec<String> {
    let mut lines: Vec<String> = run_ok("ip", &["-n", netns_name(netns), "-4", "route", "show"])
        .lines()
        .map(|l| l.trim().to_owned())
        .filter(|l| !l.is_empty())
        .collect();
    lines.sort();
    lines
}

/// Names under `/run/netns` starting with `prefix`, sorted.
pub fn list_netns(prefix: &str) -> Vec<String> {
    let mut names: Vec<String> = match std::fs::read_dir(NETNS_DIR) {
        Ok(entries) => entries
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(prefix))
            .collect(),
        Err(_) => Vec::new(),
    };
    names.sort();
    names
}

/// Creates a named namespace with `lo` up.
pub fn add_netns(name: &str) {
    run_ok("ip", &["netns", "add", name]);
    run_ok("ip", &["-n", name, "link", "set", "lo", "up"]);
}

/// Deletes a named namespace (best effort: used in cleanup, where a failure must not hide the
/// test's own error). Returns what went wrong, if anything.
pub fn del_netns(name: &str) -> Option<String> {
    let out = run("ip", &["netns", "del", name]);
    if out.success() {
        return None;
    }
    // `ip netns del` failed (e.g. the bind mount is already gone): finish the job by hand.
    let path = netns_path(name);
    let _ = nix::mount::umount2(&path, nix::mount::MntFlags::MNT_DETACH);
    match std::fs::remove_file(&path) {
        Ok(()) => None,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => Some(format!("{out}\nremoving {}: {e}", path.display())),
    }
}

/// One ping from `netns` to `ip` (1 s timeout): true when it was answered.
pub fn ping(netns: &str, ip: std::net::Ipv4Addr) -> bool {
    exec_in(
        netns,
        &["ping", "-n", "-q", "-c", "1", "-W", "1", &ip.to_string()],
    )
    .success()
}

/// Sets `command` to run in the network namespace `netns` (a name under `/run/netns` or a path)
/// and only there: unlike `ip netns exec`, the child keeps the caller's mount namespace (so it
/// sees the same `/run/netns` and `/sys`), and it dies with the thread that started it
/// (PR_SET_PDEATHSIG), so a test process killed without unwinding takes it along.
pub fn set_netns(command: &mut Command, netns: &str) {
    let path = as_path(netns);
    let file = File::open(&path)
        .unwrap_or_else(|e| panic!("opening network namespace {}: {e}", path.display()));
    // SAFETY: the closure runs between fork and exec and only makes async-signal-safe system
    // calls; it owns the namespace file, so the descriptor stays open until exec (O_CLOEXEC
    // closes it there).
    unsafe {
        command.pre_exec(move || {
            if libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// The identity of a network namespace (device and inode of its nsfs file), as a process's
/// `/proc/PID/ns/net` shows it; `None` if `netns` does not exist.
pub fn netns_id(netns: &str) -> Option<(u64, u64)> {
    let meta = std::fs::metadata(as_path(netns)).ok()?;
    Some((meta.st_dev(), meta.st_ino()))
}

/// Processes (other than this one) whose network namespace is `id` (see [`netns_id`]).
pub fn pids_in(id: (u64, u64)) -> Vec<i32> {
    let me = std::process::id() as i32;
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids: Vec<i32> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            std::fs::metadata(format!("/proc/{pid}/ns/net"))
                .is_ok_and(|m| (m.st_dev(), m.st_ino()) == id)
        })
        .collect();
    pids.sort();
    pids
}

/// SIGKILLs every process (other than this one) in the network namespace `id`: what a test
/// started in a namespace (a detached `netctl run`, say) must not outlive it.
pub fn kill_processes_in(id: (u64, u64)) {
    for pid in pids_in(id) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// Kills, when dropped (also on panic), every process in one network namespace: for commands a
/// test leaves running there (`netctl run --detach`). The namespace is identified when the
/// guard is made, so this also works after its name was deleted.
pub struct ProcessReaper {
    netns: String,
    id: (u64, u64),
}

impl ProcessReaper {
    /// A guard for `netns`, which must exist.
    pub fn new(netns: &str) -> ProcessReaper {
        let id =
            netns_id(netns).unwrap_or_else(|| panic!("network namespace {netns} does not exist"));
        ProcessReaper {
            netns: netns.to_owned(),
            id,
        }
    }

    /// The processes in the namespace now.
    pub fn pids(&self) -> Vec<i32> {
        pids_in(self.id)
    }

    /// Kills them now and waits (with the harness deadline) until they are gone.
    pub fn kill_all(&self) {
        crate::wait::wait_until(
            crate::wait::TIMEOUT,
            format!("the processes in {} to die", self.netns),
            || {
                kill_processes_in(self.id);
                self.pids().is_empty()
            },
        );
    }
}

impl Drop for ProcessReaper {
    fn drop(&mut self) {
        kill_processes_in(self.id);
    }
}
