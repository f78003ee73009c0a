//! Starting a `net-agent` inside a simulated host's network namespace, and reading its log
//! afterwards: what the demo and the bench's setups share.

use std::{
    ffi::OsStr,
    fs,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Stdio},
};

use anyhow::{Context as _, Result};

use crate::exec::{cmd, display};

/// Where iproute2 keeps named network namespaces.
pub const NETNS_DIR: &str = "/run/netns";

/// An agent to start: where it runs and keeps its files.
pub struct AgentLaunch<'a> {
    pub agent_bin: &'a Path,
    /// The named network namespace it runs in.
    pub netns: &'a str,
    pub state_dir: PathBuf,
    pub bpffs_dir: &'a Path,
    pub socket: &'a Path,
    /// Its stdout and stderr.
    pub log: &'a Path,
    /// Stop the agent (SIGTERM) if xtask dies without cleaning up, e.g. by SIGKILL; what it made
    /// is then swept by the next run.
    pub die_with_parent: bool,
}

impl AgentLaunch<'_> {
    /// Spawns the agent with `args` after the paths, in a process group of its own: Ctrl-C
    /// reaches only xtask, which then removes the endpoints through the still-running agent
    /// before stopping it.
    pub fn spawn<S: AsRef<OsStr>>(&self, args: &[S]) -> Result<Child> {
        let log = fs::File::create(self.log)
            .with_context(|| format!("creating {}", self.log.display()))?;
        let err_log = log
            .try_clone()
            .with_context(|| format!("reopening {}", self.log.display()))?;
        // nsenter switches only the network namespace: `ip netns exec` would also give the agent
        // a fresh /sys, which hides the bpffs mounted at /sys/fs/bpf where it pins.
        let mut agent = cmd("nsenter");
        agent
            .arg(format!(
                "--net={}",
                Path::new(NETNS_DIR).join(self.netns).display()
            ))
            .arg(self.agent_bin)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--bpffs-dir")
            .arg(self.bpffs_dir)
            .arg("--socket")
            .arg(self.socket)
            .args(args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err_log)
            .process_group(0);
        if self.die_with_parent {
            // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
            unsafe {
                agent.pre_exec(|| {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let line = display(&agent);
        println!("$ {line} &  # log: {}", self.log.display());
        agent
            .spawn()
            .with_context(|| format!("could not start `{line}`"))
    }
}

/// Prints the last lines of an agent's log (after a failure); nothing if there is none.
pub fn show_log_tail(path: &Path) {
    let Ok(log) = fs::read_to_string(path) else {
        return;
    };
    let lines: Vec<&str> = log.lines().collect();
    let tail = &lines[lines.len().saturating_sub(30)..];
    println!("--- last {} lines of {}", tail.len(), path.display());
    for line in tail {
        println!("{line}");
    }
    println!("---");
}
