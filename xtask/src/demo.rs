//! `cargo xtask demo`: a whole host in network namespaces. A "host" namespace with an uplink to
//! an "outside" namespace runs a real `net-agent` on the embedded store; `netctl` makes a network
//! and two endpoints, and real traffic (ping, a TCP transfer) flows between them through the eBPF
//! programs. Nothing touches this machine's own interfaces, and everything the demo makes is
//! removed at the end, also when a step fails or the user presses Ctrl-C.

use std::{
    fs,
    os::unix::{fs::DirBuilderExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use nix::{
    sys::signal::{self, Signal},
    unistd::Pid,
};

use crate::{
    Workspace,
    exec::{cmd, display, exec, exec_output, probe},
    interrupt::{catch_interrupts, check_interrupted, interrupted, wait_for},
};

const NETNS_DIR: &str = "/run/netns";
const NETWORK: &str = "demo";
const SUBNET: &str = "10.88.0.0/24";
const HOST_UPLINK: (&str, &str) = ("eth0", "198.18.0.1/24");
const OUTSIDE_UPLINK: (&str, &str) = ("to-host", "198.18.0.254/24");
const OUTSIDE_GATEWAY: &str = "198.18.0.254";
const IPERF_PORT: &str = "5201";
/// The host's address on its uplink, where the published port is reached from the outside.
const HOST_IP: &str = "198.18.0.1";
/// The host port published to web's iperf3 port.
const PUBLISHED_PORT: &str = "8080";
const AGENT_READY_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

fn section(title: &str) {
    println!("\n== {title}");
}

pub fn run(ws: &Workspace) -> Result<()> {
    ws.build_bins()?;
    let agent_bin = ws.debug_bin("net-agent")?;
    let netctl_bin = ws.debug_bin("netctl")?;
    catch_interrupts()?;

    let mut demo = Demo::new(agent_bin, netctl_bin);
    let result = demo.run().map_err(|e| {
        // A step that failed because Ctrl-C killed its command should say so.
        if interrupted() {
            e.context("interrupted")
        } else {
            e
        }
    });
    if let Err(e) = &result {
        println!("\ndemo failed: {e:#}");
        demo.show_agent_log();
    }
    let cleanup = demo.cleanup();
    match (result, cleanup) {
        (Ok(()), Ok(())) => {
            println!("\ndemo finished; everything it made is gone");
            Ok(())
        }
        (Err(e), Ok(())) => Err(e),
        (Ok(()), Err(c)) => Err(c.context("the demo ran, but cleaning up failed")),
        (Err(e), Err(c)) => Err(e.context(format!("and cleaning up failed too: {c:#}"))),
    }
}

/// One endpoint as `netctl -o json endpoint inspect` describes it.
struct EndpointInfo {
    ip: String,
    netns: PathBuf,
}

/// The demo and everything it has made so far; [`Demo::cleanup`] (also run on drop) undoes it.
struct Demo {
    agent_bin: PathBuf,
    netctl_bin: PathBuf,
    host_ns: String,
    outside_ns: String,
    /// Names the agent gives its veths and namespaces: unique to this demo.
    prefix: String,
    tmp_dir: PathBuf,
    pin_dir: PathBuf,
    socket: PathBuf,

    tmp_dir_made: bool,
    namespaces: Vec<String>,
    agent: Option<Child>,
    iperf_server: Option<Child>,
    network_created: bool,
    endpoints: Vec<String>,
    cleaned: bool,
}

impl Demo {
    fn new(agent_bin: PathBuf, netctl_bin: PathBuf) -> Self {
        let pid = std::process::id();
        let tmp_dir = PathBuf::from(format!("/tmp/net-demo-{pid}"));
        Self {
            agent_bin,
            netctl_bin,
            host_ns: format!("demo-{pid}-host"),
            outside_ns: format!("demo-{pid}-out"),
            // "dm" and the pid in base 36: at most 8 characters (the agent's limit) for any pid.
            prefix: format!("dm{}", base36(pid)),
            socket: tmp_dir.join("agent.sock"),
            tmp_dir,
            pin_dir: PathBuf::from(format!("/sys/fs/bpf/net-demo-{pid}")),
            tmp_dir_made: false,
            namespaces: Vec::new(),
            agent: None,
            iperf_server: None,
            network_created: false,
            endpoints: Vec::new(),
            cleaned: false,
        }
    }

    fn run(&mut self) -> Result<()> {
        section("a simulated host: namespaces and an uplink");
        self.make_host()?;
        check_interrupted()?;

        section("net-agent in the host namespace");
        self.start_agent()?;
        self.netctl(&["status"])?;
        check_interrupted()?;

        section("a network and two endpoints");
        self.netctl(&["network", "create", NETWORK, "--subnet", SUBNET])?;
        self.network_created = true;
        for name in ["web", "client"] {
            self.netctl(&["endpoint", "create", name, "--network", NETWORK])?;
            self.endpoints.push(name.to_owned());
        }
        self.netctl(&["network", "ls"])?;
        self.netctl(&["endpoint", "ls"])?;
        let web = self.inspect("web")?;
        let client = self.inspect("client")?;
        check_interrupted()?;

        section("traffic: client -> web, forwarded by bpf_redirect_peer");
        exec(
            in_netns(&client.netns, "ping")
                .args(["-c", "3", "-i", "0.2", "-W", "2"])
                .arg(&web.ip),
        )?;
        check_interrupted()?;
        self.tcp_exchange(&web, &client.netns, &web.ip, IPERF_PORT)?;
        check_interrupted()?;

        section("netctl run: a one-off endpoint on the network finds web by name");
        // The embedded DNS answers on 127.0.0.11 inside the new endpoint's namespace, and the
        // endpoint is removed again when the command exits.
        self.netctl(&[
            "run",
            "--network",
            NETWORK,
            "--name",
            "probe",
            "--",
            "sh",
            "-c",
            "echo \"web is $(dig +short +time=2 +tries=2 web)\"; ping -c 2 -i 0.2 -W 2 web",
        ])?;
        check_interrupted()?;

        section("masquerade: client reaches the outside as the host");
        // The agent masquerades through the host's default-route interface: the outside
        // namespace sees 198.18.0.1, and the conntrack table shows the translation.
        exec(
            in_netns(&client.netns, "ping")
                .args(["-c", "2", "-i", "0.2", "-W", "2"])
                .arg(OUTSIDE_GATEWAY),
        )?;
        self.netctl(&["bpf", "ct", "list"])?;
        check_interrupted()?;

        section("a published port: the outside reaches web through the host's address");
        // DNAT in eBPF at the uplink: no iptables rule and no proxy process. Only the outside
        // namespace's address may connect.
        let spec = format!("{PUBLISHED_PORT}:{IPERF_PORT}");
        let allow = format!("{OUTSIDE_GATEWAY}/32");
        self.netctl(&["port", "publish", "web", &spec, "--allow", &allow])?;
        self.netctl(&["port", "ls"])?;
        let outside = Path::new(NETNS_DIR).join(&self.outside_ns);
        self.tcp_exchange(&web, &outside, HOST_IP, PUBLISHED_PORT)?;
        self.netctl(&["bpf", "nat", "list"])?;
        self.netctl(&["bpf", "ct", "list", "--port", PUBLISHED_PORT])?;
        check_interrupted()?;

        section("what the data plane counted and holds");
        self.netctl(&["endpoint", "stats", "web"])?;
        self.check_counted("web")?;
        self.netctl(&["bpf", "endpoints", "list"])?;
        Ok(())
    }

    /// The traffic above must have gone through the programs: a ping that worked while the
    /// counters stayed at zero would mean the host stack forwarded it, and the demo showed
    /// nothing.
    fn check_counted(&self, name: &str) -> Result<()> {
        let json = exec_output(&mut self.netctl_cmd(&["-o", "json", "endpoint", "stats", name]))?;
        let stats: serde_json::Value = serde_json::from_str(&json).with_context(|| {
            format!("`netctl -o json endpoint stats {name}` is not JSON: {json}")
        })?;
        let packets = |direction: &str| {
            stats
                .get(direction)
                .and_then(|c| c.get("packets"))
                .and_then(serde_json::Value::as_u64)
                .with_context(|| format!("no {direction}.packets in {name}'s stats: {json}"))
        };
        let (to, from) = (packets("to_endpoint")?, packets("from_endpoint")?);
        if to == 0 || from == 0 {
            bail!(
                "{name} exchanged traffic but the programs counted {to} packets to it and {from}                  from it: are tc_from_endpoint/tc_to_endpoint attached to its host veth?"
            );
        }
        println!("{name}: the programs forwarded {to} packets to it and {from} from it");
        Ok(())
    }

    /// The host and outside namespaces, joined by a veth made directly inside them (so not even
    /// for an instant in this machine's own namespace).
    fn make_host(&mut self) -> Result<()> {
        for ns in [&self.host_ns, &self.outside_ns] {
            let path = Path::new(NETNS_DIR).join(ns);
            if path.exists() {
                bail!(
                    "{} exists already: a demo with this pid was interrupted hard; remove it \
                     with `ip netns del {ns}`",
                    path.display()
                );
            }
        }
        if self.tmp_dir.exists() {
            bail!(
                "{} exists already: a demo with this pid was interrupted hard; remove it",
                self.tmp_dir.display()
            );
        }
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&self.tmp_dir)
            .with_context(|| format!("creating {}", self.tmp_dir.display()))?;
        self.tmp_dir_made = true;

        for ns in [self.host_ns.clone(), self.outside_ns.clone()] {
            exec(cmd("ip").args(["netns", "add", &ns]))?;
            self.namespaces.push(ns.clone());
            exec(cmd("ip").args(["-n", &ns, "link", "set", "lo", "up"]))?;
        }
        let (host_if, host_addr) = HOST_UPLINK;
        let (out_if, out_addr) = OUTSIDE_UPLINK;
        exec(cmd("ip").args([
            "-n",
            &self.host_ns,
            "link",
            "add",
            host_if,
            "type",
            "veth",
            "peer",
            "name",
            out_if,
            "netns",
            &self.outside_ns,
        ]))?;
        for (ns, ifname, addr) in [
            (&self.host_ns, host_if, host_addr),
            (&self.outside_ns, out_if, out_addr),
        ] {
            exec(cmd("ip").args(["-n", ns, "addr", "add", addr, "dev", ifname]))?;
            exec(cmd("ip").args(["-n", ns, "link", "set", ifname, "up"]))?;
        }
        exec(cmd("ip").args([
            "-n",
            &self.host_ns,
            "route",
            "add",
            "default",
            "via",
            OUTSIDE_GATEWAY,
        ]))
    }

    fn agent_log(&self) -> PathBuf {
        self.tmp_dir.join("agent.log")
    }

    /// Starts the agent in the host namespace and waits until it answers.
    fn start_agent(&mut self) -> Result<()> {
        let log_path = self.agent_log();
        let log = fs::File::create(&log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;
        let err_log = log
            .try_clone()
            .with_context(|| format!("reopening {}", log_path.display()))?;
        // nsenter switches only the network namespace: `ip netns exec` would also give the agent
        // a fresh /sys, which hides the bpffs mounted at /sys/fs/bpf where it pins.
        let mut agent = cmd("nsenter");
        agent
            .arg(format!(
                "--net={}",
                Path::new(NETNS_DIR).join(&self.host_ns).display()
            ))
            .arg(&self.agent_bin)
            .arg("--state-dir")
            .arg(self.tmp_dir.join("state"))
            .arg("--bpffs-dir")
            .arg(&self.pin_dir)
            .arg("--socket")
            .arg(&self.socket)
            .args(["--name-prefix", &self.prefix])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err_log)
            // Its own process group: Ctrl-C reaches only xtask, which then removes the endpoints
            // through the still-running agent before stopping it.
            .process_group(0);
        let line = display(&agent);
        println!("$ {line} &  # log: {}", log_path.display());
        let child = agent
            .spawn()
            .with_context(|| format!("could not start `{line}`"))?;
        self.agent = Some(child);

        let socket = self.socket.clone();
        let mut status = self.netctl_cmd(&["status"]);
        wait_for(
            "the agent to answer `netctl status`",
            AGENT_READY_TIMEOUT,
            || {
                if let Some(agent) = self.agent.as_mut()
                    && let Some(exit) = agent.try_wait().context("waiting for the agent")?
                {
                    bail!(
                        "net-agent exited ({exit}) before it answered on {}",
                        socket.display()
                    );
                }
                Ok(probe(&mut status).map(|_| ()))
            },
        )
    }

    fn netctl_cmd(&self, args: &[&str]) -> Command {
        let mut netctl = cmd(&self.netctl_bin);
        netctl
            .arg("--socket")
            .arg(&self.socket)
            .arg("--bpffs-dir")
            .arg(&self.pin_dir)
            .args(args);
        netctl
    }

    fn netctl(&self, args: &[&str]) -> Result<()> {
        exec(&mut self.netctl_cmd(args))
    }

    fn inspect(&self, name: &str) -> Result<EndpointInfo> {
        let json = exec_output(&mut self.netctl_cmd(&["-o", "json", "endpoint", "inspect", name]))?;
        let value: serde_json::Value = serde_json::from_str(&json).with_context(|| {
            format!("`netctl -o json endpoint inspect {name}` is not JSON: {json}")
        })?;
        // JSON pointers: the address is that of the first interface (eth0).
        let field = |pointer: &str| {
            value
                .pointer(pointer)
                .and_then(|v| v.as_str())
                .map(str::to_owned)
                .with_context(|| {
                    format!("no string at `{pointer}` in endpoint {name}'s JSON: {json}")
                })
        };
        let info = EndpointInfo {
            ip: field("/interfaces/0/ip")?,
            netns: PathBuf::from(field("/netns")?),
        };
        println!("{name}: {} in {}", info.ip, info.netns.display());
        Ok(info)
    }

    /// iperf3 for two seconds from the namespace `client` to `to_ip:to_port`, which leads to an
    /// iperf3 server in web: a real TCP exchange, both ways (data one way, acks the other)
    /// through the programs.
    fn tcp_exchange(
        &mut self,
        web: &EndpointInfo,
        client: &Path,
        to_ip: &str,
        to_port: &str,
    ) -> Result<()> {
        let log_path = self.tmp_dir.join("iperf3-server.log");
        let log = fs::File::create(&log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;
        let mut server = in_netns(&web.netns, "iperf3");
        server
            .args(["-s", "-1", "-p", IPERF_PORT, "-B"])
            .arg(&web.ip)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(Stdio::inherit());
        let line = display(&server);
        println!("$ {line} &");
        self.iperf_server = Some(
            server
                .spawn()
                .with_context(|| format!("could not start `{line}`"))?,
        );

        let listening = format!("sport = :{IPERF_PORT}");
        wait_for("iperf3 to listen in web's namespace", STOP_TIMEOUT, || {
            if let Some(server) = self.iperf_server.as_mut()
                && let Some(status) = server.try_wait().context("waiting for iperf3")?
            {
                bail!("`{line}` exited ({status}) before listening");
            }
            let out = probe(in_netns(&web.netns, "ss").args(["-Hltn", &listening]));
            Ok(out.filter(|o| !o.trim().is_empty()).map(|_| ()))
        })?;

        exec(in_netns(client, "iperf3").args([
            "-c",
            to_ip,
            "-p",
            to_port,
            "-t",
            "2",
            "--connect-timeout",
            "3000",
        ]))?;

        let mut server = self
            .iperf_server
            .take()
            .context("iperf3 server went missing")?;
        let status = wait_child(&mut server, STOP_TIMEOUT)?;
        if !status {
            bail!(
                "`{line}` did not finish after the client did; its log: {}",
                log_path.display()
            );
        }
        Ok(())
    }

    fn show_agent_log(&self) {
        let path = self.agent_log();
        let Ok(log) = fs::read_to_string(&path) else {
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

    /// Undoes everything, step by step, going on past failures; fails if any step failed.
    fn cleanup(&mut self) -> Result<()> {
        if self.cleaned {
            return Ok(());
        }
        self.cleaned = true;
        section("cleaning up");
        let mut failures: Vec<String> = Vec::new();
        let mut note = |result: Result<()>| {
            if let Err(e) = result {
                println!("cleanup: {e:#}");
                failures.push(format!("{e:#}"));
            }
        };

        if let Some(mut server) = self.iperf_server.take() {
            note(stop(&mut server, "iperf3 server"));
        }

        let agent_exit = self.agent.as_mut().map(Child::try_wait);
        let agent_running = matches!(agent_exit, Some(Ok(None)));
        if let Some(Ok(Some(status))) = agent_exit {
            println!(
                "cleanup: net-agent had already exited ({status}); removing what it made directly"
            );
        }
        if agent_running {
            // Through the agent, so it removes its own veths, namespaces and map entries.
            for name in self.endpoints.drain(..).rev().collect::<Vec<_>>() {
                note(self.netctl(&["endpoint", "rm", &name]));
            }
            if self.network_created {
                note(self.netctl(&["network", "rm", NETWORK]));
            }
        }
        if let Some(mut agent) = self.agent.take() {
            note(stop(&mut agent, "net-agent"));
        }

        // Namespaces the agent made and did not remove (it failed, or died first). The prefix is
        // unique to this demo, so this only ever finds the demo's own.
        match leftover_namespaces(&format!("{}-", self.prefix)) {
            Ok(leftovers) => {
                for ns in leftovers {
                    if agent_running {
                        println!("cleanup: the agent left namespace {ns} behind; deleting it");
                    }
                    note(exec(cmd("ip").args(["netns", "del", &ns])));
                    // The resolver configuration the agent wrote for that namespace.
                    let resolv_dir = std::path::Path::new("/etc/netns").join(&ns);
                    if resolv_dir.exists() {
                        note(
                            std::fs::remove_dir_all(&resolv_dir)
                                .with_context(|| format!("removing {}", resolv_dir.display())),
                        );
                    }
                }
            }
            Err(e) => note(Err(e)),
        }
        // Deleting the host namespace deletes the uplink and the endpoints' host-side veths, so
        // the tcx links on them go too.
        for ns in self.namespaces.drain(..).rev().collect::<Vec<_>>() {
            note(exec(cmd("ip").args(["netns", "del", &ns])));
        }
        if self.pin_dir.exists() {
            println!("$ rm -r {}", self.pin_dir.display());
            note(
                fs::remove_dir_all(&self.pin_dir)
                    .with_context(|| format!("removing the pins under {}", self.pin_dir.display())),
            );
        }
        if self.tmp_dir_made {
            println!("$ rm -r {}", self.tmp_dir.display());
            note(
                fs::remove_dir_all(&self.tmp_dir)
                    .with_context(|| format!("removing {}", self.tmp_dir.display())),
            );
        }

        if !failures.is_empty() {
            bail!(
                "{} cleanup step(s) failed:\n  - {}",
                failures.len(),
                failures.join("\n  - ")
            );
        }
        Ok(())
    }
}

impl Drop for Demo {
    /// A panic in the middle of the demo still removes what it made.
    fn drop(&mut self) {
        if let Err(e) = self.cleanup() {
            eprintln!("demo cleanup: {e:#}");
        }
    }
}

/// A command run in the namespace at `netns`: `ip netns exec` for named namespaces (the
/// iproute2 convention), `nsenter` for any other path.
fn in_netns(netns: &Path, program: &str) -> Command {
    match (netns.parent(), netns.file_name()) {
        (Some(dir), Some(name)) if dir == Path::new(NETNS_DIR) => {
            let mut c = cmd("ip");
            c.args(["netns", "exec"]).arg(name).arg(program);
            c
        }
        _ => {
            let mut c = cmd("nsenter");
            c.arg(format!("--net={}", netns.display())).arg(program);
            c
        }
    }
}

/// Whether `child` exited 0 within `timeout`.
fn wait_child(child: &mut Child, timeout: Duration) -> Result<bool> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().context("waiting for a child process")? {
            return Ok(status.success());
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// SIGTERM, then SIGKILL if it has not exited within [`STOP_TIMEOUT`].
fn stop(child: &mut Child, what: &str) -> Result<()> {
    if child
        .try_wait()
        .context("waiting for a child process")?
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
            .context("waiting for a child process")?
            .is_some()
        {
            return Ok(());
        }
        thread::sleep(Duration::from_millis(50));
    }
    child
        .kill()
        .with_context(|| format!("sending SIGKILL to {what}"))?;
    child.wait().with_context(|| format!("reaping {what}"))?;
    bail!("{what} (pid {pid}) ignored SIGTERM for {STOP_TIMEOUT:?} and was killed")
}

fn leftover_namespaces(prefix: &str) -> Result<Vec<String>> {
    let entries = match fs::read_dir(NETNS_DIR) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("listing {NETNS_DIR}")),
    };
    Ok(entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|name| name.starts_with(prefix))
        .collect())
}

fn base36(mut n: u32) -> String {
    let mut digits = Vec::new();
    loop {
        digits.push(char::from_digit(n % 36, 36).unwrap_or('0'));
        n /= 36;
        if n == 0 {
            break;
        }
    }
    digits.iter().rev().collect()
}

#[cfg(test)]
mod tests {
    use super::base36;

    #[test]
    fn prefix_fits_the_agent_limit_for_any_pid() {
        assert_eq!(base36(0), "0");
        assert_eq!(base36(35), "z");
        assert_eq!(base36(36), "10");
        // Linux pids are at most 2^22 (PID_MAX_LIMIT): "dm" + 5 digits, within 8.
        assert_eq!(base36(1 << 22).len(), 5);
    }
}
