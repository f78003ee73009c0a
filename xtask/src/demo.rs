//! `cargo xtask demo`: two hosts in network namespaces. Each "host" namespace has an uplink to an
//! "outside" namespace, which routes between the hosts as the network between two machines would,
//! and runs a real `net-agent`; the two agents share an embedded cluster store. On host1, `netctl`
//! makes a network and endpoints, and real traffic (ping, a TCP transfer, masquerade, a published
//! port) flows through the eBPF programs; then an overlay network spans both hosts and an endpoint
//! on each reaches the other over VXLAN, by name. Nothing touches this machine's own interfaces, and
//! everything the demo makes is removed at the end, also when a step fails or the user presses
//! Ctrl-C.

use std::{
    ffi::OsStr,
    fs,
    os::unix::fs::DirBuilderExt as _,
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
    cleanup::Failures,
    exec::{cmd, display, exec, exec_output, probe},
    interrupt::{catch_interrupts, check_interrupted, interrupted, wait_for},
    sim_agent::{AgentLaunch, NETNS_DIR, show_log_tail},
};

const NETWORK: &str = "demo";
const SUBNET: &str = "10.88.0.0/24";
/// An internal network: its endpoints reach each other and the host, nothing beyond.
const INTERNAL_NETWORK: &str = "vault";
const INTERNAL_SUBNET: &str = "10.89.0.0/24";
/// The overlay network spanning both hosts, and the pool each host leases a /24 of.
const OVERLAY: &str = "ov";
const OVERLAY_POOL: &str = "10.244.0.0/16";
/// Every host's uplink, in its own namespace; the outside's end is `to-<host>`.
const UPLINK: &str = "eth0";
const UPLINK_PREFIX_LEN: u8 = 24;
const IPERF_PORT: &str = "5201";
/// The host port published to web's iperf3 port.
const PUBLISHED_PORT: &str = "8080";
const AGENT_READY_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an overlay network and the routes to the other host's subnet may take to reach a
/// host: agents follow the store on every change it reports (the embedded store looks every
/// 200 ms) and once a second anyway, so this is generous.
const OVERLAY_TIMEOUT: Duration = Duration::from_secs(10);

/// A simulated host: its name in the cluster and its uplink, a /24 of its own to the outside
/// namespace in RFC 2544's benchmarking range (never routed anywhere real).
struct HostSpec {
    name: &'static str,
    /// The host's address on its uplink: where the outside reaches it, and its VTEP.
    ip: &'static str,
    /// The outside namespace's address on the same link: the host's default gateway.
    gateway: &'static str,
}

static HOSTS: [HostSpec; 2] = [
    HostSpec {
        name: "host1",
        ip: "198.18.0.1",
        gateway: "198.18.0.254",
    },
    HostSpec {
        name: "host2",
        ip: "198.18.1.1",
        gateway: "198.18.1.254",
    },
];

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
        for host in &demo.hosts {
            host.show_agent_log();
        }
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
    name: String,
    ip: String,
    netns: PathBuf,
}

/// The demo and everything it has made so far; [`Demo::cleanup`] (also run on drop) undoes it.
struct Demo {
    agent_bin: PathBuf,
    outside_ns: String,
    tmp_dir: PathBuf,
    hosts: [SimHost; 2],

    tmp_dir_made: bool,
    namespaces: Vec<String>,
    iperf_server: Option<Child>,
    cleaned: bool,
}

/// One simulated host and the agent running in it: its namespace, the agent's name prefix,
/// socket, pins and state, and the networks and endpoints made through it.
struct SimHost {
    spec: &'static HostSpec,
    ns: String,
    /// Names the agent gives its veths and namespaces: unique to this host of this demo.
    prefix: String,
    /// The agent's socket, log and state directory.
    dir: PathBuf,
    pin_dir: PathBuf,
    netctl_bin: PathBuf,

    /// Set once the agent was started: from then on the pin directory and the namespaces named
    /// with the prefix are this demo's own.
    agent_started: bool,
    agent: Option<Child>,
    networks: Vec<String>,
    endpoints: Vec<String>,
}

impl Demo {
    fn new(agent_bin: PathBuf, netctl_bin: PathBuf) -> Self {
        let pid = std::process::id();
        let tmp_dir = PathBuf::from(format!("/tmp/net-demo-{pid}"));
        let hosts =
            std::array::from_fn(|i| SimHost::new(&HOSTS[i], i + 1, pid, &tmp_dir, &netctl_bin));
        Self {
            agent_bin,
            outside_ns: format!("demo-{pid}-out"),
            tmp_dir,
            hosts,
            tmp_dir_made: false,
            namespaces: Vec::new(),
            iperf_server: None,
            cleaned: false,
        }
    }

    fn run(&mut self) -> Result<()> {
        section("two simulated hosts: namespaces, and uplinks routed through an outside namespace");
        self.make_hosts()?;
        check_interrupted()?;

        section("net-agent on each host, sharing an embedded cluster store");
        let cluster_dir = self.tmp_dir.join("cluster");
        for host in &mut self.hosts {
            host.start_agent(&self.agent_bin, &cluster_dir)?;
        }
        for host in &mut self.hosts {
            host.wait_ready()?;
        }
        self.hosts[0].netctl(&["status"])?;
        check_interrupted()?;

        section("a network and two endpoints on host1");
        let h1 = &mut self.hosts[0];
        h1.create_network(NETWORK, &["--subnet", SUBNET])?;
        for name in ["web", "client"] {
            h1.create_endpoint(name, NETWORK)?;
        }
        h1.netctl(&["network", "ls"])?;
        h1.netctl(&["endpoint", "ls"])?;
        let web = h1.inspect("web")?;
        let client = h1.inspect("client")?;
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
        self.hosts[0].netctl(&[
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

        let spec = self.hosts[0].spec;
        section("masquerade: client reaches the outside as host1");
        // The agent masquerades through the host's default-route interface: the outside
        // namespace sees host1's uplink address, and the conntrack table shows the translation.
        exec(
            in_netns(&client.netns, "ping")
                .args(["-c", "2", "-i", "0.2", "-W", "2"])
                .arg(spec.gateway),
        )?;
        self.hosts[0].netctl(&["bpf", "ct", "list"])?;
        check_interrupted()?;

        section("a published port: the outside reaches web through host1's address");
        // DNAT in eBPF at the uplink: no iptables rule and no proxy process. Only the outside
        // namespace's address on host1's link may connect.
        let port = format!("{PUBLISHED_PORT}:{IPERF_PORT}");
        let allow = format!("{}/32", spec.gateway);
        let h1 = &self.hosts[0];
        h1.netctl(&["port", "publish", "web", &port, "--allow", &allow])?;
        h1.netctl(&["port", "ls"])?;
        let outside = Path::new(NETNS_DIR).join(&self.outside_ns);
        self.tcp_exchange(&web, &outside, spec.ip, PUBLISHED_PORT)?;
        let h1 = &self.hosts[0];
        h1.netctl(&["bpf", "nat", "list"])?;
        h1.netctl(&["bpf", "ct", "list", "--port", PUBLISHED_PORT])?;
        check_interrupted()?;

        section("an internal network: its endpoints reach each other and the host, not beyond");
        let h1 = &mut self.hosts[0];
        h1.create_network(
            INTERNAL_NETWORK,
            &["--subnet", INTERNAL_SUBNET, "--internal"],
        )?;
        for name in ["db", "app"] {
            h1.create_endpoint(name, INTERNAL_NETWORK)?;
        }
        let db = h1.inspect("db")?;
        let app = h1.inspect("app")?;
        exec(
            in_netns(&app.netns, "ping")
                .args(["-c", "2", "-i", "0.2", "-W", "2"])
                .arg(&db.ip),
        )?;
        exec(
            in_netns(&app.netns, "ping")
                .args(["-c", "1", "-W", "2"])
                .arg(spec.ip),
        )?;
        // The outside namespace, which client reached above: dropped where app's packets
        // enter the host, and counted.
        let mut beyond = in_netns(&app.netns, "ping");
        beyond.args(["-c", "1", "-W", "1"]).arg(spec.gateway);
        println!("$ {}  # expected to fail", display(&beyond));
        if beyond.status()?.success() {
            bail!(
                "app, on an internal network, reached {} beyond the host",
                spec.gateway
            );
        }
        h1.netctl(&["endpoint", "stats", "app"])?;
        check_interrupted()?;

        section("what the data plane counted and holds");
        let h1 = &self.hosts[0];
        h1.netctl(&["endpoint", "stats", "web"])?;
        h1.check_counted("web")?;
        h1.netctl(&["bpf", "endpoints", "list"])?;
        h1.netctl(&["bpf", "counters", "list"])?;
        check_interrupted()?;

        self.overlay()
    }

    /// An overlay network defined once, on host1, in the cluster store: each host leases a
    /// subnet of its pool and routes the other's subnet to the other's uplink address (its
    /// VTEP), and an endpoint on each host reaches the other through VXLAN across the outside
    /// namespace.
    fn overlay(&mut self) -> Result<()> {
        section("an overlay network across two hosts: VXLAN through the outside namespace");
        let [h1, h2] = &mut self.hosts;
        h1.create_network(OVERLAY, &["--driver", "overlay", "--subnet", OVERLAY_POOL])?;
        h2.wait_for_network(OVERLAY)?;
        h1.create_endpoint("near", OVERLAY)?;
        h2.create_endpoint("far", OVERLAY)?;
        let near = h1.inspect("near")?;
        let far = h2.inspect("far")?;
        h1.wait_for_route_to(h2.spec)?;
        h2.wait_for_route_to(h1.spec)?;
        check_interrupted()?;

        // The name of host2's endpoint reaches host1's DNS through the cluster store.
        wait_for_name(&near.netns, "far", &far.ip)?;
        exec(
            in_netns(&near.netns, "ping")
                .args(["-c", "3", "-i", "0.2", "-W", "2"])
                .arg("far"),
        )?;
        check_interrupted()?;
        self.tcp_exchange(&far, &near.netns, &far.ip, IPERF_PORT)?;
        check_interrupted()?;

        let [h1, h2] = &self.hosts;
        h1.netctl(&["host", "ls"])?;
        h1.netctl(&["bpf", "routes", "list"])?;
        h1.netctl(&["network", "inspect", OVERLAY])?;
        h2.netctl(&["network", "inspect", OVERLAY])?;
        h1.check_counted("near")
    }

    /// The outside namespace and the hosts, each joined to the outside by a veth made directly
    /// inside the two namespaces (so not even for an instant in this machine's own namespace).
    /// The outside forwards between the hosts' links, as the network between two machines
    /// would; each host's default route goes through it.
    fn make_hosts(&mut self) -> Result<()> {
        let names: Vec<&String> = [&self.outside_ns]
            .into_iter()
            .chain(self.hosts.iter().map(|h| &h.ns))
            .collect();
        for ns in names {
            let path = Path::new(NETNS_DIR).join(ns);
            if path.exists() {
                bail!(
                    "{} exists already: a demo with this pid was interrupted hard; remove it \
                     with `ip netns del {ns}`",
                    path.display()
                );
            }
        }
        let dirs = [&self.tmp_dir]
            .into_iter()
            .chain(self.hosts.iter().map(|h| &h.pin_dir));
        for dir in dirs {
            if dir.exists() {
                bail!(
                    "{} exists already: a demo with this pid was interrupted hard; remove it",
                    dir.display()
                );
            }
        }
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&self.tmp_dir)
            .with_context(|| format!("creating {}", self.tmp_dir.display()))?;
        self.tmp_dir_made = true;
        for host in &self.hosts {
            fs::DirBuilder::new()
                .mode(0o700)
                .create(&host.dir)
                .with_context(|| format!("creating {}", host.dir.display()))?;
        }

        let outside = self.outside_ns.clone();
        self.add_netns(&outside)?;
        let hosts: Vec<(String, &'static HostSpec)> =
            self.hosts.iter().map(|h| (h.ns.clone(), h.spec)).collect();
        for (ns, spec) in hosts {
            self.add_netns(&ns)?;
            let outside_if = format!("to-{}", spec.name);
            exec(cmd("ip").args([
                "-n",
                &ns,
                "link",
                "add",
                UPLINK,
                "type",
                "veth",
                "peer",
                "name",
                &outside_if,
                "netns",
                &outside,
            ]))?;
            for (ns, ifname, addr) in [
                (&ns, UPLINK, spec.ip),
                (&outside, outside_if.as_str(), spec.gateway),
            ] {
                let cidr = format!("{addr}/{UPLINK_PREFIX_LEN}");
                exec(cmd("ip").args(["-n", ns, "addr", "add", &cidr, "dev", ifname]))?;
                exec(cmd("ip").args(["-n", ns, "link", "set", ifname, "up"]))?;
            }
            exec(cmd("ip").args(["-n", &ns, "route", "add", "default", "via", spec.gateway]))?;
        }
        // Forwarding in the outside namespace only (a namespace has its own copy of the
        // setting): the hosts' uplink addresses, their VTEPs, reach each other through it.
        exec(
            cmd("ip")
                .args(["netns", "exec", &outside, "sh", "-c"])
                .arg("echo 1 > /proc/sys/net/ipv4/ip_forward"),
        )?;
        let [h1, h2] = &self.hosts;
        exec(cmd("ip").args([
            "netns", "exec", &h1.ns, "ping", "-c", "1", "-W", "2", h2.spec.ip,
        ]))
        .context("host1 cannot reach host2's uplink address through the outside namespace")
    }

    fn add_netns(&mut self, ns: &str) -> Result<()> {
        // Recorded first, so that one whose `ip netns add` Ctrl-C interrupted half way is not
        // missed; cleanup deletes only what exists.
        self.namespaces.push(ns.to_owned());
        exec(cmd("ip").args(["netns", "add", ns]))?;
        exec(cmd("ip").args(["-n", ns, "link", "set", "lo", "up"]))
    }

    /// iperf3 for two seconds from the namespace `client` to `to_ip:to_port`, which leads to an
    /// iperf3 server in the endpoint `server`: a real TCP exchange, both ways (data one way,
    /// acks the other) through the programs.
    fn tcp_exchange(
        &mut self,
        server: &EndpointInfo,
        client: &Path,
        to_ip: &str,
        to_port: &str,
    ) -> Result<()> {
        let log_path = self.tmp_dir.join("iperf3-server.log");
        let log = fs::File::create(&log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;
        let mut command = in_netns(&server.netns, "iperf3");
        command
            .args(["-s", "-1", "-p", IPERF_PORT, "-B"])
            .arg(&server.ip)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(Stdio::inherit());
        let line = display(&command);
        println!("$ {line} &");
        self.iperf_server = Some(
            command
                .spawn()
                .with_context(|| format!("could not start `{line}`"))?,
        );

        let listening = format!("sport = :{IPERF_PORT}");
        let what = format!("iperf3 to listen in {}'s namespace", server.name);
        wait_for(&what, STOP_TIMEOUT, || {
            if let Some(child) = self.iperf_server.as_mut()
                && let Some(status) = child.try_wait().context("waiting for iperf3")?
            {
                bail!("`{line}` exited ({status}) before listening");
            }
            let out = probe(in_netns(&server.netns, "ss").args(["-Hltn", &listening]));
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

        let mut child = self
            .iperf_server
            .take()
            .context("iperf3 server went missing")?;
        let status = wait_child(&mut child, STOP_TIMEOUT)?;
        if !status {
            bail!(
                "`{line}` did not finish after the client did; its log: {}",
                log_path.display()
            );
        }
        Ok(())
    }

    /// Undoes everything, step by step, going on past failures; fails if any step failed.
    fn cleanup(&mut self) -> Result<()> {
        if self.cleaned {
            return Ok(());
        }
        self.cleaned = true;
        section("cleaning up");
        let mut failures = Failures::default();

        if let Some(mut server) = self.iperf_server.take() {
            failures.note(stop(&mut server, "iperf3 server"));
        }

        let running: Vec<bool> = self.hosts.iter_mut().map(SimHost::agent_running).collect();
        // Through the agents, so that each removes its own veths, namespaces and map entries.
        // The endpoints on every host first: an overlay network is removed from the cluster only
        // once no endpoint of the host removing it uses it.
        for (host, &running) in self.hosts.iter_mut().zip(&running) {
            if running {
                host.remove_endpoints(&mut failures);
            }
        }
        for (host, &running) in self.hosts.iter_mut().zip(&running) {
            if running {
                host.remove_networks(&mut failures);
            }
        }
        for host in &mut self.hosts {
            if let Some(mut agent) = host.agent.take() {
                failures.note(stop(&mut agent, &format!("{}'s net-agent", host.spec.name)));
            }
        }
        for (host, &running) in self.hosts.iter().zip(&running) {
            host.remove_leftover_namespaces(running, &mut failures);
        }
        // Deleting a host namespace deletes its uplink, its VXLAN device and the endpoints'
        // host-side veths, so the tcx links on them go too.
        for ns in self.namespaces.drain(..).rev().collect::<Vec<_>>() {
            if Path::new(NETNS_DIR).join(&ns).exists() {
                failures.note(exec(cmd("ip").args(["netns", "del", &ns])));
            }
        }
        for host in &self.hosts {
            if host.agent_started && host.pin_dir.exists() {
                println!("$ rm -r {}", host.pin_dir.display());
                failures.note(fs::remove_dir_all(&host.pin_dir).with_context(|| {
                    format!("removing the pins under {}", host.pin_dir.display())
                }));
            }
        }
        // The agents' state and sockets, and the cluster store they shared.
        if self.tmp_dir_made {
            println!("$ rm -r {}", self.tmp_dir.display());
            failures.note(
                fs::remove_dir_all(&self.tmp_dir)
                    .with_context(|| format!("removing {}", self.tmp_dir.display())),
            );
        }

        failures.into_result()
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

impl SimHost {
    /// Host `number` (from 1) of the demo with pid `pid`, whose temporary directory is
    /// `tmp_dir`.
    fn new(
        spec: &'static HostSpec,
        number: usize,
        pid: u32,
        tmp_dir: &Path,
        netctl_bin: &Path,
    ) -> Self {
        Self {
            spec,
            ns: format!("demo-{pid}-{}", spec.name),
            prefix: agent_prefix(pid, number),
            dir: tmp_dir.join(spec.name),
            pin_dir: PathBuf::from(format!("/sys/fs/bpf/net-demo-{pid}-{}", spec.name)),
            netctl_bin: netctl_bin.to_owned(),
            agent_started: false,
            agent: None,
            networks: Vec::new(),
            endpoints: Vec::new(),
        }
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("agent.sock")
    }

    fn agent_log(&self) -> PathBuf {
        self.dir.join("agent.log")
    }

    /// Starts the agent in the host's namespace, in the cluster whose embedded store is
    /// `cluster_dir`; [`SimHost::wait_ready`] waits until it answers.
    fn start_agent(&mut self, agent_bin: &Path, cluster_dir: &Path) -> Result<()> {
        let launch = AgentLaunch {
            agent_bin,
            netns: &self.ns,
            state_dir: self.dir.join("state"),
            bpffs_dir: &self.pin_dir,
            socket: &self.socket(),
            log: &self.agent_log(),
            die_with_parent: false,
        };
        self.agent_started = true;
        let child = launch.spawn(&[
            OsStr::new("--name-prefix"),
            OsStr::new(&self.prefix),
            OsStr::new("--store"),
            OsStr::new("embedded"),
            OsStr::new("--cluster-dir"),
            cluster_dir.as_os_str(),
            OsStr::new("--host-name"),
            OsStr::new(self.spec.name),
        ])?;
        self.agent = Some(child);
        Ok(())
    }

    /// Fails if the agent has exited.
    fn check_agent(&mut self) -> Result<()> {
        if let Some(agent) = self.agent.as_mut()
            && let Some(exit) = agent.try_wait().context("waiting for the agent")?
        {
            bail!(
                "{}'s net-agent exited ({exit}); its log: {}",
                self.spec.name,
                self.agent_log().display()
            );
        }
        Ok(())
    }

    fn wait_ready(&mut self) -> Result<()> {
        let mut status = self.netctl_cmd(&["status"]);
        let what = format!("{}'s agent to answer `netctl status`", self.spec.name);
        wait_for(&what, AGENT_READY_TIMEOUT, || {
            self.check_agent()?;
            Ok(probe(&mut status).map(|_| ()))
        })
    }

    /// Polls `netctl -o json network ls` until it lists `name`: an overlay network defined on
    /// another host.
    fn wait_for_network(&mut self, name: &str) -> Result<()> {
        let mut ls = self.netctl_cmd(&["-o", "json", "network", "ls"]);
        println!("$ {}  # until it lists {name}", display(&ls));
        let start = Instant::now();
        let what = format!("network {name} to reach {}", self.spec.name);
        wait_for(&what, OVERLAY_TIMEOUT, || {
            self.check_agent()?;
            let Some(json) = probe(&mut ls) else {
                return Ok(None);
            };
            let networks: serde_json::Value = serde_json::from_str(&json)
                .with_context(|| format!("`netctl -o json network ls` is not JSON: {json}"))?;
            let found = networks
                .as_array()
                .is_some_and(|n| n.iter().any(|n| n["name"] == name));
            Ok(found.then_some(()))
        })?;
        println!(
            "{}: has {name} after {:.1}s",
            self.spec.name,
            start.elapsed().as_secs_f64()
        );
        Ok(())
    }

    /// Polls `netctl -o json bpf routes list` until the data plane routes a subnet to
    /// `other`'s uplink address (its VTEP).
    fn wait_for_route_to(&mut self, other: &HostSpec) -> Result<()> {
        let mut list = self.netctl_cmd(&["-o", "json", "bpf", "routes", "list"]);
        println!(
            "$ {}  # until a route has VTEP {}",
            display(&list),
            other.ip
        );
        let what = format!("{} to route a subnet to {}", self.spec.name, other.name);
        let subnet = wait_for(&what, OVERLAY_TIMEOUT, || {
            self.check_agent()?;
            let Some(json) = probe(&mut list) else {
                return Ok(None);
            };
            let routes: serde_json::Value = serde_json::from_str(&json)
                .with_context(|| format!("`netctl -o json bpf routes list` is not JSON: {json}"))?;
            Ok(routes.as_array().and_then(|routes| {
                routes
                    .iter()
                    .find(|r| r["vtep"] == other.ip)
                    .and_then(|r| r["subnet"].as_str())
                    .map(str::to_owned)
            }))
        })?;
        println!(
            "{}: {subnet} via VTEP {} ({})",
            self.spec.name, other.ip, other.name
        );
        Ok(())
    }

    fn netctl_cmd(&self, args: &[&str]) -> Command {
        let mut netctl = cmd(&self.netctl_bin);
        netctl
            .arg("--socket")
            .arg(self.socket())
            .arg("--bpffs-dir")
            .arg(&self.pin_dir)
            .args(args);
        netctl
    }

    fn netctl(&self, args: &[&str]) -> Result<()> {
        exec(&mut self.netctl_cmd(args))
    }

    fn create_network(&mut self, name: &str, args: &[&str]) -> Result<()> {
        let mut create = vec!["network", "create", name];
        create.extend_from_slice(args);
        self.netctl(&create)?;
        self.networks.push(name.to_owned());
        Ok(())
    }

    fn create_endpoint(&mut self, name: &str, network: &str) -> Result<()> {
        self.netctl(&["endpoint", "create", name, "--network", network])?;
        self.endpoints.push(name.to_owned());
        Ok(())
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
            name: name.to_owned(),
            ip: field("/interfaces/0/ip")?,
            netns: PathBuf::from(field("/netns")?),
        };
        println!(
            "{name}: {} in {} on {}",
            info.ip,
            info.netns.display(),
            self.spec.name
        );
        Ok(info)
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
                "{name} exchanged traffic but the programs counted {to} packets to it and {from} \
                 from it: are tc_from_endpoint/tc_to_endpoint attached to its host veth?"
            );
        }
        println!("{name}: the programs forwarded {to} packets to it and {from} from it");
        Ok(())
    }

    fn show_agent_log(&self) {
        show_log_tail(&self.agent_log());
    }

    /// Whether the agent is still running (for cleanup); says so when it has exited on its own.
    fn agent_running(&mut self) -> bool {
        match self.agent.as_mut().map(Child::try_wait) {
            Some(Ok(None)) => true,
            Some(Ok(Some(status))) => {
                println!(
                    "cleanup: {}'s net-agent had already exited ({status}); removing what it \
                     made directly",
                    self.spec.name
                );
                false
            }
            Some(Err(_)) | None => false,
        }
    }

    fn remove_endpoints(&mut self, failures: &mut Failures) {
        for name in self.endpoints.drain(..).rev().collect::<Vec<_>>() {
            failures.note(self.netctl(&["endpoint", "rm", &name]));
        }
    }

    fn remove_networks(&mut self, failures: &mut Failures) {
        for name in self.networks.drain(..).rev().collect::<Vec<_>>() {
            failures.note(self.netctl(&["network", "rm", &name]));
        }
    }

    /// Namespaces the agent made and did not remove (it failed, or died first), and their
    /// resolver configuration. The prefix is unique to this host of this demo, so this only
    /// ever finds the demo's own; and only once its agent was started.
    fn remove_leftover_namespaces(&self, agent_was_running: bool, failures: &mut Failures) {
        if !self.agent_started {
            return;
        }
        let leftovers = match leftover_namespaces(&format!("{}-", self.prefix)) {
            Ok(leftovers) => leftovers,
            Err(e) => {
                failures.note(Err(e));
                return;
            }
        };
        for ns in leftovers {
            if agent_was_running {
                println!(
                    "cleanup: {}'s agent left namespace {ns} behind; deleting it",
                    self.spec.name
                );
            }
            failures.note(exec(cmd("ip").args(["netns", "del", &ns])));
            let resolv_dir = Path::new("/etc/netns").join(&ns);
            if resolv_dir.exists() {
                failures.note(
                    fs::remove_dir_all(&resolv_dir)
                        .with_context(|| format!("removing {}", resolv_dir.display())),
                );
            }
        }
    }
}
/// A command run in the namespace at `netns`: `ip netns exec` for named namespaces (the
/// iproute2 convention), `nsenter` for any other path.
/// Asks the embedded DNS in `netns` for `name` until it answers `ip`: another host's endpoint
/// is known once its agent has published the name and this host's agent has read it.
fn wait_for_name(netns: &Path, name: &str, ip: &str) -> Result<()> {
    let mut dig = in_netns(netns, "dig");
    dig.args(["+short", "+time=1", "+tries=1", name]);
    println!("$ {}  # until it answers {ip}", display(&dig));
    wait_for(&format!("{name} to resolve"), OVERLAY_TIMEOUT, || {
        Ok(probe(&mut dig)
            .filter(|out| out.lines().any(|l| l.trim() == ip))
            .map(|_| ()))
    })?;
    println!("{name} is {ip}");
    Ok(())
}

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

/// The name prefix of the agent on host `number` of the demo with pid `pid`: "dm", the pid in
/// base 36 and the host's number, at most 8 characters (the agent's limit) for any pid. The
/// number is always one digit, so no two (pid, host) pairs share a prefix.
fn agent_prefix(pid: u32, number: usize) -> String {
    format!("dm{}{number}", base36(pid))
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
    use super::{HOSTS, agent_prefix, base36};

    #[test]
    fn prefix_fits_the_agent_limit_for_any_pid() {
        assert_eq!(base36(0), "0");
        assert_eq!(base36(35), "z");
        assert_eq!(base36(36), "10");
        // Linux pids are at most 2^22 (PID_MAX_LIMIT): "dm" + 5 digits + the host's number.
        assert_eq!(base36(1 << 22).len(), 5);
        assert_eq!(agent_prefix(1 << 22, HOSTS.len()).len(), 8);
        assert_eq!(agent_prefix(36, 2), "dm102");
    }
}
