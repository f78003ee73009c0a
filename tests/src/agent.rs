//! A `net-agent` process running in one simulated host, and `netctl` pointed at it.

use std::{
    fs::{self, OpenOptions},
    io::Write,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use serde::de::DeserializeOwned;

use crate::{
    api::{BpfEndpointEntry, Endpoint, EndpointStats, Network, Status},
    cmd::{COMMAND_TIMEOUT, CmdOutput, cmdline, run_command_input, run_command_timeout},
    names::ETC_NETNS,
    netns::{links, list_netns, routes, set_netns},
    topology::{Host, OUTSIDE_IP},
    wait::{POLL, TIMEOUT},
};

/// Environment variable naming the agent binary (set by `cargo xtask test`).
pub const NET_AGENT_BIN: &str = "NET_AGENT_BIN";
/// Environment variable naming the netctl binary (set by `cargo xtask test`).
pub const NETCTL_BIN: &str = "NETCTL_BIN";

/// How much of the agent's log to print when a test fails.
const LOG_TAIL: usize = 64 * 1024;

/// A binary from `$var`, or `<dir of the test binary>/../<name>` (cargo puts test binaries in
/// `target/<profile>/deps` and the workspace's binaries in `target/<profile>`).
pub fn binary(var: &str, name: &str) -> PathBuf {
    let path = match std::env::var_os(var) {
        Some(path) => PathBuf::from(path),
        None => {
            let exe = std::env::current_exe().expect("path of the running test binary");
            exe.parent()
                .and_then(Path::parent)
                .map(|dir| dir.join(name))
                .unwrap_or_else(|| PathBuf::from(name))
        }
    };
    assert!(
        path.is_file(),
        "{name} binary not found at {}: build it (`cargo build --bins`) or set {var}",
        path.display()
    );
    path
}

/// How long an agent that is expected to refuse its arguments may take to exit.
const ONE_SHOT_TIMEOUT: Duration = Duration::from_secs(15);

/// `bin args...` set up to run in `host`'s network namespace and only there: the child switches
/// only its network namespace before exec (`ip netns exec` would also give it a private mount
/// namespace with a fresh /sys, hiding its pins and namespaces from everyone else), and dies
/// with the thread that started it (PR_SET_PDEATHSIG) so that a test process killed without
/// unwinding takes its agents along.
fn agent_command(bin: &Path, args: &[String], host: &Host) -> Command {
    let mut command = Command::new(bin);
    command
        .args(args)
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        )
        // anyhow's error backtraces bury the message; panics keep theirs (RUST_BACKTRACE).
        .env("RUST_LIB_BACKTRACE", "0");
    set_netns(&mut command, host.netns());
    command
}

/// Runs the agent binary with `args` in `host`'s network namespace, for command lines it must
/// refuse; panics if it is still running after a few seconds.
pub fn run_agent_once(host: &Host, args: &[&str]) -> CmdOutput {
    let bin = binary(NET_AGENT_BIN, "net-agent");
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let mut command = agent_command(&bin, &args, host);
    run_command_timeout(&mut command, cmdline(&bin, &args), ONE_SHOT_TIMEOUT)
}

/// A running (or stopped) agent of one host. Killed in `Drop`; its log is printed if the test is
/// failing. Borrows the host so it cannot outlive the topology that cleans up after it.
pub struct Agent<'t> {
    host: &'t Host,
    bin: PathBuf,
    netctl: PathBuf,
    state_dir: PathBuf,
    socket: PathBuf,
    bpffs_dir: PathBuf,
    log: PathBuf,
    pid_file: PathBuf,
    /// Arguments after the harness's own (`--dns-upstream ...`), kept across restarts.
    extra_args: Vec<String>,
    child: Option<Child>,
    starts: u32,
}

impl<'t> Agent<'t> {
    pub(crate) fn start(host: &'t Host, extra_args: &[&str]) -> Agent<'t> {
        let dir = host.dir();
        let mut agent = Agent {
            host,
            bin: binary(NET_AGENT_BIN, "net-agent"),
            netctl: binary(NETCTL_BIN, "netctl"),
            state_dir: dir.join("state"),
            socket: dir.join("agent.sock"),
            bpffs_dir: host.bpffs_dir(),
            log: dir.join("agent.log"),
            pid_file: dir.join("agent.pid"),
            extra_args: extra_args.iter().map(|a| a.to_string()).collect(),
            child: None,
            starts: 0,
        };
        agent.spawn();
        agent
    }

    fn spawn(&mut self) {
        assert!(
            self.child.is_none(),
            "agent on {} is already running",
            self.host.netns()
        );
        fs::create_dir_all(&self.state_dir)
            .unwrap_or_else(|e| panic!("creating {}: {e}", self.state_dir.display()));
        self.starts += 1;
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap_or_else(|e| panic!("opening {}: {e}", self.log.display()));
        writeln!(log, "===== net-tests: agent start #{} =====", self.starts)
            .expect("writing the agent log");
        let args = self.agent_args();
        let mut command = agent_command(&self.bin, &args, self.host);
        command
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("duplicating the agent log fd"))
            .stderr(log);
        let child = command.spawn().unwrap_or_else(|e| {
            panic!(
                "starting `{}` in {}: {e}",
                cmdline(&self.bin, &args),
                self.host.netns()
            )
        });
        fs::write(&self.pid_file, child.id().to_string())
            .unwrap_or_else(|e| panic!("writing {}: {e}", self.pid_file.display()));
        self.child = Some(child);
        self.wait_ready();
    }

    /// Runs a second agent with exactly this agent's arguments (same socket, state and pin
    /// directories) and returns what it did; it is expected to refuse and exit (it is killed
    /// and the test fails if it is still running after a few seconds).
    pub fn run_duplicate(&self) -> CmdOutput {
        let args = self.agent_args();
        let mut command = agent_command(&self.bin, &args, self.host);
        run_command_timeout(&mut command, cmdline(&self.bin, &args), ONE_SHOT_TIMEOUT)
    }

    fn agent_args(&self) -> Vec<String> {
        let mut args: Vec<String> = vec![
            "--state-dir".into(),
            self.state_dir.display().to_string(),
            "--bpffs-dir".into(),
            self.bpffs_dir.display().to_string(),
            "--socket".into(),
            self.socket.display().to_string(),
            "--name-prefix".into(),
            self.host.agent_prefix(),
        ];
        // Never a real resolver: unless the test names one, upstream is the topology's outside
        // namespace, where nothing answers unless the test starts a fake upstream there.
        if !self
            .extra_args
            .iter()
            .any(|a| a.starts_with("--dns-upstream"))
        {
            args.extend(["--dns-upstream".into(), OUTSIDE_IP.to_string()]);
        }
        args.extend(self.extra_args.iter().cloned());
        args
    }

    /// Waits until `netctl status` succeeds; panics with the agent's log if the agent exits or
    /// the deadline passes.
    fn wait_ready(&mut self) {
        let start = Instant::now();
        let mut last = None;
        loop {
            if let Some(status) = self.try_wait() {
                panic!(
                    "agent on {} exited with {status} before answering `netctl status`; agent log below",
                    self.host.netns(),
                );
            }
            if self.socket.exists() {
                let out = self.netctl(&["status"]);
                if out.success() {
                    return;
                }
                last = Some(out);
            }
            if start.elapsed() > TIMEOUT {
                let last =
                    last.map_or_else(|| "socket never appeared".to_owned(), |o| o.to_string());
                panic!(
                    "agent on {} not ready after {TIMEOUT:?}; last `netctl status`:\n{last}\n(agent log below)",
                    self.host.netns(),
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// The exit status if the agent process has exited (and reaps it).
    fn try_wait(&mut self) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let status = child.try_wait().expect("waiting for the agent")?;
        self.child = None;
        let _ = fs::remove_file(&self.pid_file);
        Some(status)
    }

    /// Whether the agent process is running.
    pub fn is_running(&mut self) -> bool {
        self.child.is_some() && self.try_wait().is_none()
    }

    /// The agent's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL, then reap. The data plane must survive this (pinned maps and links).
    pub fn kill9(&mut self) {
        let child = self
            .child
            .as_mut()
            .unwrap_or_else(|| panic!("agent on {} is not running", self.host.netns()));
        let _ = child.kill();
        child.wait().expect("reaping the killed agent");
        self.child = None;
        let _ = fs::remove_file(&self.pid_file);
    }

    /// SIGTERM, then wait for a clean exit; panics with the log if it takes longer than the
    /// harness deadline (then kills it) or exits unsuccessfully.
    pub fn stop(&mut self) -> ExitStatus {
        let pid = self
            .pid()
            .unwrap_or_else(|| panic!("agent on {} is not running", self.host.netns()));
        kill(Pid::from_raw(pid as i32), Signal::SIGTERM).expect("sending SIGTERM to the agent");
        let start = Instant::now();
        loop {
            if let Some(status) = self.try_wait() {
                assert!(
                    status.success(),
                    "agent on {} exited with {status} after SIGTERM; agent log below",
                    self.host.netns(),
                );
                return status;
            }
            if start.elapsed() > TIMEOUT {
                self.kill9();
                panic!(
                    "agent on {} still running {TIMEOUT:?} after SIGTERM; killed it; agent log below",
                    self.host.netns(),
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// Starts the agent again with the same state, socket and pin directories (stopping it with
    /// SIGTERM first if it is still running) and waits until it answers.
    pub fn restart(&mut self) {
        if self.is_running() {
            self.stop();
        }
        self.spawn();
    }

    pub fn host(&self) -> &'t Host {
        self.host
    }

    /// The agent's `--name-prefix`.
    pub fn prefix(&self) -> String {
        self.host.agent_prefix()
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn bpffs_dir(&self) -> &Path {
        &self.bpffs_dir
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// The namespace name the agent gives an endpoint it makes: `<prefix>-<endpoint>`.
    pub fn endpoint_netns(&self, endpoint: &str) -> String {
        format!("{}-{endpoint}", self.prefix())
    }

    /// Everything the agent wrote so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_else(|e| format!("(no log: {e})"))
    }

    fn log_tail(&self) -> String {
        let log = self.log();
        let tail = match log.char_indices().rev().nth(LOG_TAIL) {
            Some((i, _)) => format!("[...]\n{}", &log[i..]),
            None => log,
        };
        format!(
            "----- agent log ({}) -----\n{tail}\n----- end of agent log -----",
            self.log.display()
        )
    }

    /// Runs `netctl --socket S --bpffs-dir D <args>`; the caller looks at the result.
    pub fn netctl(&self, args: &[&str]) -> CmdOutput {
        self.netctl_handle().run(args)
    }

    /// A handle that runs netctl against this agent from any thread (for example while the test
    /// thread kills the agent).
    pub fn netctl_handle(&self) -> Netctl {
        Netctl {
            bin: self.netctl.clone(),
            socket: self.socket.clone(),
            bpffs_dir: self.bpffs_dir.clone(),
        }
    }

    /// `netctl <args>`, panicking with the command's output and the agent's log unless it
    /// succeeded; returns stdout.
    pub fn netctl_ok(&self, args: &[&str]) -> String {
        let out = self.netctl(args);
        assert!(out.success(), "netctl failed (agent log below)\n{out}");
        out.stdout
    }

    /// `netctl -o json <args>`, parsed as `T`.
    pub fn netctl_json<T: DeserializeOwned>(&self, args: &[&str]) -> T {
        let mut full = vec!["-o", "json"];
        full.extend_from_slice(args);
        let out = self.netctl(&full);
        assert!(out.success(), "netctl failed (agent log below)\n{out}");
        serde_json::from_str(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "parsing the output of netctl as {}: {e}\n{out}",
                std::any::type_name::<T>()
            )
        })
    }

    /// `netctl <args>` that must fail: non-zero exit, a message on stderr starting with
    /// `error:`, nothing on stdout. Returns stderr.
    pub fn netctl_err(&self, args: &[&str]) -> String {
        let out = self.netctl(args);
        assert!(!out.success(), "netctl was expected to fail\n{out}");
        assert!(
            out.stderr.trim_start().starts_with("error:"),
            "netctl's error message should start with `error:`\n{out}"
        );
        out.stderr
    }

    /// A command the agent must refuse: it fails with an `error:` message that mentions each of
    /// `mentions` (case-insensitively), and the agent's state, namespaces, host interfaces,
    /// routes and map entries are exactly as before. Returns the message.
    pub fn assert_refused(&self, args: &[&str], mentions: &[&str]) -> String {
        let before = self.snapshot();
        let message = self.netctl_err(args);
        let after = self.snapshot();
        let lower = message.to_lowercase();
        let mut problems: Vec<String> = mentions
            .iter()
            .filter(|m| !lower.contains(&m.to_lowercase()))
            .map(|m| format!("the message does not mention {m:?}"))
            .collect();
        if before != after {
            problems.push(format!(
                "state changed:\nbefore: {before:#?}\nafter: {after:#?}"
            ));
        }
        assert!(
            problems.is_empty(),
            "`netctl {}` was refused with: {}\n{}",
            args.join(" "),
            message.trim(),
            problems.join("\n")
        );
        message
    }

    pub fn status(&self) -> Status {
        self.netctl_json(&["status"])
    }

    /// `network create NAME --subnet CIDR [extra...]`.
    pub fn network_create(&self, name: &str, subnet: &str, extra: &[&str]) -> Network {
        let mut args = vec!["network", "create", name, "--subnet", subnet];
        args.extend_from_slice(extra);
        self.netctl_json(&args)
    }

    pub fn network_inspect(&self, name: &str) -> Network {
        self.netctl_json(&["network", "inspect", name])
    }

    pub fn networks(&self) -> Vec<Network> {
        self.netctl_json(&["network", "ls"])
    }

    /// `endpoint create NAME --network NET [extra...]`.
    pub fn endpoint_create(&self, name: &str, network: &str, extra: &[&str]) -> Endpoint {
        let mut args = vec!["--network", network];
        args.extend_from_slice(extra);
        self.endpoint_create_with(name, &args)
    }

    /// `endpoint create NAME [args...]`, for modes (`--mode none`) and the `default` network.
    pub fn endpoint_create_with(&self, name: &str, args: &[&str]) -> Endpoint {
        let mut full = vec!["endpoint", "create", name];
        full.extend_from_slice(args);
        self.netctl_json(&full)
    }

    /// `network connect NET EP [extra...]`: the endpoint as it is afterwards.
    pub fn network_connect(&self, network: &str, endpoint: &str, extra: &[&str]) -> Endpoint {
        let mut args = vec!["network", "connect", network, endpoint];
        args.extend_from_slice(extra);
        self.netctl_json(&args)
    }

    /// `network disconnect NET EP`: the endpoint as it is afterwards.
    pub fn network_disconnect(&self, network: &str, endpoint: &str) -> Endpoint {
        self.netctl_json(&["network", "disconnect", network, endpoint])
    }

    pub fn endpoint_inspect(&self, name: &str) -> Endpoint {
        self.netctl_json(&["endpoint", "inspect", name])
    }

    pub fn endpoint_rm(&self, name: &str) {
        self.netctl_ok(&["endpoint", "rm", name]);
    }

    /// `endpoint rm --force NAME`: also when container-mode endpoints share its namespace.
    pub fn endpoint_rm_force(&self, name: &str) {
        self.netctl_ok(&["endpoint", "rm", "--force", name]);
    }

    /// `netctl run <args>` run from the test's own namespace, with `input` on its stdin (none:
    /// /dev/null). The caller looks at the result.
    pub fn netctl_run(&self, args: &[&str], input: Option<&[u8]>) -> CmdOutput {
        let mut full = vec!["run"];
        full.extend_from_slice(args);
        self.netctl_handle().run_with(&full, None, input)
    }

    /// `netctl <args>` run from inside this agent's host namespace, as a user on that host
    /// would (what `--net host` means is where netctl itself runs).
    pub fn netctl_on_host(&self, args: &[&str]) -> CmdOutput {
        self.netctl_handle()
            .run_with(args, Some(self.host.netns()), None)
    }

    pub fn endpoints(&self) -> Vec<Endpoint> {
        self.netctl_json(&["endpoint", "ls"])
    }

    pub fn endpoint_stats(&self, name: &str) -> EndpointStats {
        self.netctl_json(&["endpoint", "stats", name])
    }

    /// `bpf endpoints list`: the pinned map, read without the agent.
    pub fn bpf_endpoints(&self) -> Vec<BpfEndpointEntry> {
        self.netctl_json(&["bpf", "endpoints", "list"])
    }

    /// Everything a refused command must leave unchanged.
    pub fn snapshot(&self) -> Snapshot {
        let host = self.host.netns();
        Snapshot {
            networks: self.networks(),
            endpoints: self.endpoints(),
            bpf_endpoints: self.bpf_endpoints(),
            bpf_published: self.netctl_json(&["bpf", "nat", "list"]),
            namespaces: list_netns(self.host.tag()),
            resolver_dirs: self.resolver_dirs(),
            host_links: links(host).into_iter().map(|l| l.name).collect(),
            host_routes: routes(host),
        }
    }

    /// This agent's entries under `/etc/netns` (`<prefix>-<endpoint>`, holding the resolv.conf
    /// of a namespace it made), sorted.
    pub fn resolver_dirs(&self) -> Vec<String> {
        let prefix = format!("{}-", self.prefix());
        let mut dirs: Vec<String> = match fs::read_dir(ETC_NETNS) {
            Ok(entries) => entries
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&prefix))
                .collect(),
            Err(_) => Vec::new(),
        };
        dirs.sort();
        dirs
    }
}

impl Drop for Agent<'_> {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            let _ = fs::remove_file(&self.pid_file);
        }
        if std::thread::panicking() {
            eprintln!(
                "agent on {} (the test failed):\n{}",
                self.host.netns(),
                self.log_tail()
            );
        }
    }
}

/// `netctl` pointed at one agent's socket and pin directory.
#[derive(Debug, Clone)]
pub struct Netctl {
    bin: PathBuf,
    socket: PathBuf,
    bpffs_dir: PathBuf,
}

impl Netctl {
    /// The same netctl pointed at another pin directory.
    pub fn with_bpffs_dir(mut self, dir: impl Into<PathBuf>) -> Netctl {
        self.bpffs_dir = dir.into();
        self
    }

    /// Runs `netctl --socket S --bpffs-dir D <args>`; the caller looks at the result.
    pub fn run(&self, args: &[&str]) -> CmdOutput {
        self.run_with(args, None, None)
    }

    /// [`Netctl::run`] inside the network namespace `netns` (default: the test's own) with
    /// `input` on its stdin (default: /dev/null).
    pub fn run_with(&self, args: &[&str], netns: Option<&str>, input: Option<&[u8]>) -> CmdOutput {
        let mut full: Vec<String> = vec![
            "--socket".into(),
            self.socket.display().to_string(),
            "--bpffs-dir".into(),
            self.bpffs_dir.display().to_string(),
        ];
        full.extend(args.iter().map(|a| a.to_string()));
        let mut command = Command::new(&self.bin);
        command.args(&full);
        let mut line = cmdline(&self.bin, &full);
        if let Some(netns) = netns {
            set_netns(&mut command, netns);
            line = format!("(in {netns}) {line}");
        }
        run_command_input(&mut command, line, COMMAND_TIMEOUT, input)
    }
}

/// The state an agent shows, for before/after comparisons.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub networks: Vec<Network>,
    pub endpoints: Vec<Endpoint>,
    pub bpf_endpoints: Vec<BpfEndpointEntry>,
    /// The PUBLISHED map as `netctl bpf nat list` decodes it.
    pub bpf_published: Vec<net_agent::api::BpfPublishedEntry>,
    /// `/run/netns` entries of the test (hosts, switch, endpoints, adopted namespaces).
    pub namespaces: Vec<String>,
    /// The agent's `/etc/netns` entries (resolv.conf of the namespaces it made).
    pub resolver_dirs: Vec<String>,
    /// Interfaces in the agent's host namespace.
    pub host_links: Vec<String>,
    /// IPv4 routes in the agent's host namespace.
    pub host_routes: Vec<String>,
}

/// Packets dropped for `reason`, as `endpoint stats` reports them (0 when not listed).
pub fn drop_count(stats: &EndpointStats, reason: crate::DropReason) -> u64 {
    stats
        .drops
        .iter()
        .filter(|d| d.reason == reason.name())
        .map(|d| d.packets)
        .sum()
}
