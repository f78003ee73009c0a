//! Simulated hosts on a simulated underlay.
//!
//! ```text
//!   <tag>-h1 (uplink0 198.18.0.1/24) ---- h1 \
//!   <tag>-h2 (uplink0 198.18.0.2/24) ---- h2 -- br0 in <tag>-sw (the physical network)
//!   <tag>-out (uplink0 198.18.0.254/24) - out /
//! ```
//!
//! Each host is one network namespace; an agent started on it (see [`Host::start_agent`]) makes
//! its endpoints' host-side veths there. The switch is a plain Linux bridge: it stands for the
//! physical network between machines, not for our data plane. Every veth is created from inside
//! the switch namespace with its other end moved straight into the host namespace, so nothing is
//! ever created in the machine's own namespace.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::{Mutex, Once},
};

use crate::{
    agent::Agent,
    cmd::run_ok,
    names::{BPFFS, cleanup_tag, ensure_bpffs, new_tag, sweep_stale},
    netns::{add_netns, netns_path},
};

/// The underlay subnet: host `n` is 198.18.0.n, the outside is [`OUTSIDE_IP`] (RFC 2544
/// benchmarking range, never routed anywhere real).
pub const UNDERLAY_PREFIX_LEN: u8 = 24;
pub const OUTSIDE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 254);
/// Name of a host's underlay interface inside its namespace.
pub const UPLINK: &str = "uplink0";

/// Building namespaces is serialised within the process: the very first `ip netns add` on a
/// machine sets up the `/run/netns` mount, which two concurrent calls could do twice.
static BUILD: Mutex<()> = Mutex::new(());
static SETUP: Once = Once::new();

/// A set of simulated hosts; deleting it deletes everything the test made (see module docs).
pub struct Topology {
    tag: String,
    dir: PathBuf,
    switch: String,
    outside: String,
    hosts: Vec<Host>,
}

/// One simulated host: a network namespace attached to the underlay.
pub struct Host {
    index: usize,
    tag: String,
    netns: String,
    underlay_ip: Ipv4Addr,
    dir: PathBuf,
}

impl Topology {
    /// Builds `hosts` hosts (1 to 9), the switch and the outside namespace.
    pub fn new(hosts: usize) -> Topology {
        assert!(
            (1..=9).contains(&hosts),
            "a topology has 1 to 9 hosts, not {hosts}"
        );
        assert!(
            nix::unistd::geteuid().is_root(),
            "the integration tests make network namespaces and load eBPF programs: run them as \
             root (cargo xtask test), ideally inside `unshare -n -m`"
        );
        SETUP.call_once(|| {
            sweep_stale();
            ensure_bpffs();
        });
        let (tag, dir) = new_tag();
        // From here on, Drop cleans up whatever was made, also if building fails half way.
        let mut topo = Topology {
            switch: format!("{tag}-sw"),
            outside: format!("{tag}-out"),
            tag,
            dir,
            hosts: Vec::new(),
        };
        let _guard = BUILD.lock().unwrap_or_else(|e| e.into_inner());
        add_netns(&topo.switch);
        ip(
            &topo.switch,
            &["link", "add", "name", "br0", "type", "bridge"],
        );
        ip(&topo.switch, &["link", "set", "br0", "up"]);
        for index in 1..=hosts {
            let host = Host {
                index,
                tag: topo.tag.clone(),
                netns: format!("{}-h{index}", topo.tag),
                underlay_ip: Ipv4Addr::new(198, 18, 0, index as u8),
                dir: topo.dir.join(format!("h{index}")),
            };
            std::fs::create_dir_all(&host.dir)
                .unwrap_or_else(|e| panic!("creating {}: {e}", host.dir.display()));
            topo.attach(&host.netns, &format!("h{index}"), host.underlay_ip);
            topo.hosts.push(host);
        }
        let outside = topo.outside.clone();
        topo.attach(&outside, "out", OUTSIDE_IP);
        topo
    }

    /// Makes namespace `netns` and plugs it into the switch as `port`, with `ip` on its uplink.
    fn attach(&self, netns: &str, port: &str, ip_addr: Ipv4Addr) {
        add_netns(netns);
        ip(
            &self.switch,
            &[
                "link", "add", "name", port, "type", "veth", "peer", "name", UPLINK, "netns", netns,
            ],
        );
        ip(&self.switch, &["link", "set", port, "master", "br0", "up"]);
        let cidr = format!("{ip_addr}/{UNDERLAY_PREFIX_LEN}");
        ip(netns, &["addr", "add", &cidr, "dev", UPLINK]);
        ip(netns, &["link", "set", UPLINK, "up"]);
    }

    /// The test's unique tag (every name the test makes starts with it).
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// Host `n`, counting from 1 like the names (`<tag>-h1`).
    pub fn host(&self, n: usize) -> &Host {
        assert!(
            (1..=self.hosts.len()).contains(&n),
            "host {n} does not exist: this topology has hosts 1 to {}",
            self.hosts.len()
        );
        &self.hosts[n - 1]
    }

    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// The namespace standing for the rest of the network (198.18.0.254 on the underlay).
    pub fn outside(&self) -> &str {
        &self.outside
    }

    /// The underlay switch's namespace.
    pub fn switch(&self) -> &str {
        &self.switch
    }

    /// A namespace name for the test's own use (`<tag>-<suffix>`), deleted with the topology.
    pub fn netns_name(&self, suffix: &str) -> String {
        format!("{}-{suffix}", self.tag)
    }

    /// The test's temporary directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        let problems = cleanup_tag(&self.tag, &self.dir);
        if !problems.is_empty() {
            let report = problems.join("\n");
            if std::thread::panicking() {
                eprintln!("cleaning up topology {}:\n{report}", self.tag);
            } else {
                panic!("cleaning up topology {}:\n{report}", self.tag);
            }
        }
    }
}

impl Host {
    /// Host number, counting from 1.
    pub fn index(&self) -> usize {
        self.index
    }

    /// The host's namespace name (`<tag>-h<n>`).
    pub fn netns(&self) -> &str {
        &self.netns
    }

    pub fn netns_path(&self) -> PathBuf {
        netns_path(&self.netns)
    }

    /// The host's address on the underlay (uplink0).
    pub fn underlay_ip(&self) -> Ipv4Addr {
        self.underlay_ip
    }

    /// How many IPv4 packets the host's stack has forwarded (`Ip: ForwDatagrams` of its
    /// `/proc/net/snmp`): what the data plane routes itself never shows here.
    pub fn forwarded_packets(&self) -> u64 {
        let snmp = crate::in_netns(&self.netns, || std::fs::read_to_string("/proc/net/snmp"))
            .expect("reading /proc/net/snmp");
        let mut ip = snmp.lines().filter(|l| l.starts_with("Ip: "));
        let (names, values) = (ip.next().expect("Ip header"), ip.next().expect("Ip values"));
        let at = names
            .split_whitespace()
            .position(|n| n == "ForwDatagrams")
            .expect("an Ip: ForwDatagrams column");
        values
            .split_whitespace()
            .nth(at)
            .and_then(|v| v.parse().ok())
            .expect("an Ip: ForwDatagrams value")
    }

    /// The `--name-prefix` of this host's agent: `<tag><n>`.
    pub fn agent_prefix(&self) -> String {
        format!("{}{}", self.tag, self.index)
    }

    /// The agent's `--bpffs-dir`: `/sys/fs/bpf/<tag>-h<n>`.
    pub fn bpffs_dir(&self) -> PathBuf {
        Path::new(BPFFS).join(&self.netns)
    }

    /// The host's temporary directory (agent state, socket and log).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Starts `net-agent` in this host's network namespace and waits until it answers. The agent
    /// dies with the thread that started it (PR_SET_PDEATHSIG), so start and restart it from the
    /// test's own thread.
    pub fn start_agent(&self) -> Agent<'_> {
        Agent::start(self, &[])
    }

    /// [`Host::start_agent`] with further agent arguments (for example
    /// `["--dns-upstream", "198.18.0.254"]`), used again on every restart.
    pub fn start_agent_with(&self, extra_args: &[&str]) -> Agent<'_> {
        Agent::start(self, extra_args)
    }

    pub(crate) fn tag(&self) -> &str {
        &self.tag
    }
}

fn ip(netns: &str, args: &[&str]) {
    let mut full = vec!["-n", netns];
    full.extend_from_slice(args);
    run_ok("ip", &full);
}

#[cfg(test)]
mod tests {
    use std::panic::{AssertUnwindSafe, catch_unwind};

    use super::*;
    use crate::{
        names::TMP_ROOT,
        netns::{link, list_netns, ping},
        wait::{TIMEOUT, wait_until},
    };

    fn assert_gone(tag: &str) {
        assert_eq!(
            list_netns(tag),
            Vec::<String>::new(),
            "namespaces left behind"
        );
        assert!(
            !Path::new(TMP_ROOT).join(tag).exists(),
            "temporary directory left behind"
        );
    }

    #[test]
    fn hosts_reach_the_outside_and_each_other_and_everything_is_deleted() {
        let tag;
        {
            let topo = Topology::new(2);
            tag = topo.tag().to_owned();
            assert_eq!(tag.len(), crate::names::TAG_LEN);
            let expected: Vec<String> = ["h1", "h2", "out", "sw"]
                .iter()
                .map(|s| format!("{tag}-{s}"))
                .collect();
            assert_eq!(list_netns(&tag), expected);
            for host in topo.hosts() {
                assert!(
                    link(host.netns(), UPLINK).up,
                    "uplink of {} is down",
                    host.netns()
                );
                wait_until(
                    TIMEOUT,
                    format!("{} to ping the outside", host.netns()),
                    || ping(host.netns(), OUTSIDE_IP),
                );
            }
            wait_until(TIMEOUT, "h1 to ping h2 over the underlay", || {
                ping(topo.host(1).netns(), topo.host(2).underlay_ip())
            });
        }
        assert_gone(&tag);
    }

    #[test]
    fn everything_is_deleted_when_the_test_panics() {
        let mut tag = String::new();
        let mut left_running = None;
        let result = catch_unwind(AssertUnwindSafe(|| {
            let topo = Topology::new(1);
            tag = topo.tag().to_owned();
            let extra = topo.netns_name("extra");
            crate::netns::add_netns(&extra);
            // What an agent writes for a namespace it makes, and a command left running in a
            // namespace (as `netctl run --detach` leaves one).
            let resolver_dir = Path::new(crate::names::ETC_NETNS).join(format!("{tag}1-x"));
            std::fs::create_dir_all(&resolver_dir).expect("creating a resolver directory");
            std::fs::write(resolver_dir.join("resolv.conf"), "nameserver 127.0.0.11\n")
                .expect("writing a resolv.conf");
            let child = std::process::Command::new("ip")
                .args(["netns", "exec", &extra, "sleep", "300"])
                .spawn()
                .expect("starting sleep in the extra namespace");
            let id = crate::netns::netns_id(&extra).expect("the extra namespace");
            let pid = child.id() as i32;
            left_running = Some(child);
            wait_until(TIMEOUT, "sleep to run in the extra namespace", || {
                crate::netns::pids_in(id).contains(&pid)
            });
            panic!("deliberate");
        }));
        assert!(result.is_err());
        assert_gone(&tag);
        let mut child = left_running.expect("the command was started");
        // Killed by the cleanup (SIGKILL), not by the end of its sleep.
        let status = child.wait().expect("reaping the command");
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(9),
            "the command in the deleted namespace ended with {status}"
        );
        let leftover: Vec<String> = std::fs::read_dir(crate::names::ETC_NETNS)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with(&tag))
                    .collect()
            })
            .unwrap_or_default();
        assert!(
            leftover.is_empty(),
            "resolver directories left behind: {leftover:?}"
        );
    }
}
