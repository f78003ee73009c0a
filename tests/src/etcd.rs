//! A real etcd for the cluster-store tests, on the simulated underlay, and the little the tests
//! need to drive `net_agent::cluster` stores.
//!
//! etcd runs in a namespace of its own, `<tag>-etcd`, plugged into the topology's switch like a
//! host, listening only on [`ETCD_IP`] there: it is reachable from the simulated hosts and from
//! nothing else, and the machine's own interfaces are never involved. Its data directory is
//! under the topology's temporary directory (deleted with it); the process dies with the thread
//! that started it (PR_SET_PDEATHSIG), is killed when [`Etcd`] is dropped, and the topology's
//! cleanup kills anything still in its namespace.

use std::{
    fs::{self, OpenOptions},
    future::Future,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    path::{Path, PathBuf},
    pin::pin,
    process::{Child, Command, ExitStatus, Stdio},
    sync::Arc,
    task::{Context, Poll, Wake, Waker},
    thread::{self, Thread},
    time::{Duration, Instant},
};

use net_agent::cluster::{self, ClusterStore};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use crate::{
    cmd::run_ok,
    netns::{add_netns, in_netns, set_netns},
    topology::{Host, Topology, UNDERLAY_PREFIX_LEN, UPLINK},
    wait::{POLL, TIMEOUT},
};

/// Debian's etcd (package etcd-server, installed by `cargo xtask setup`).
pub const ETCD_BIN: &str = "/usr/bin/etcd";
/// etcd's address on the underlay (hosts are 198.18.0.1-9, the outside 198.18.0.254).
pub const ETCD_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 250);
pub const CLIENT_PORT: u16 = 2379;
pub const PEER_PORT: u16 = 2380;
/// The switch's port for etcd, in `<tag>-sw`.
const SWITCH_PORT: &str = "etcd";
/// How much of etcd's log to print when a test fails.
const LOG_TAIL: usize = 32 * 1024;

/// A single-member etcd cluster on the topology's underlay. Killed in `Drop` (its log printed if
/// the test is failing); borrows the topology so it cannot outlive the cleanup.
pub struct Etcd<'t> {
    topo: &'t Topology,
    netns: String,
    data_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    starts: u32,
}

impl<'t> Etcd<'t> {
    /// Makes `<tag>-etcd`, plugs it into the switch with [`ETCD_IP`], starts etcd there and
    /// waits until it reports healthy. Start it from the test's own thread: etcd dies with the
    /// thread that started it.
    pub fn start(topo: &'t Topology) -> Etcd<'t> {
        assert!(
            Path::new(ETCD_BIN).is_file(),
            "{ETCD_BIN} not found: install Debian's etcd-server (cargo xtask setup does)"
        );
        let netns = topo.netns_name("etcd");
        add_netns(&netns);
        let switch = topo.switch();
        run_ok(
            "ip",
            &[
                "-n",
                switch,
                "link",
                "add",
                "name",
                SWITCH_PORT,
                "type",
                "veth",
                "peer",
                "name",
                UPLINK,
                "netns",
                &netns,
            ],
        );
        // br0 is the topology's switch bridge.
        run_ok(
            "ip",
            &[
                "-n",
                switch,
                "link",
                "set",
                SWITCH_PORT,
                "master",
                "br0",
                "up",
            ],
        );
        let cidr = format!("{ETCD_IP}/{UNDERLAY_PREFIX_LEN}");
        run_ok("ip", &["-n", &netns, "addr", "add", &cidr, "dev", UPLINK]);
        run_ok("ip", &["-n", &netns, "link", "set", UPLINK, "up"]);
        let mut etcd = Etcd {
            topo,
            netns,
            data_dir: topo.dir().join("etcd-data"),
            log: topo.dir().join("etcd.log"),
            child: None,
            starts: 0,
        };
        etcd.spawn();
        etcd
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddrV4 {
        SocketAddrV4::new(ETCD_IP, CLIENT_PORT)
    }

    /// The `--store` spec an agent is given: `etcd://198.18.0.250:2379`.
    pub fn spec(&self) -> String {
        format!("etcd://{}", self.addr())
    }

    /// etcd's own namespace.
    pub fn netns(&self) -> &str {
        &self.netns
    }

    fn spawn(&mut self) {
        assert!(
            self.child.is_none(),
            "etcd in {} is already running",
            self.netns
        );
        self.starts += 1;
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap_or_else(|e| panic!("opening {}: {e}", self.log.display()));
        writeln!(log, "===== net-tests: etcd start #{} =====", self.starts)
            .expect("writing the etcd log");
        let client_url = format!("http://{ETCD_IP}:{CLIENT_PORT}");
        let peer_url = format!("http://{ETCD_IP}:{PEER_PORT}");
        let data_dir = self.data_dir.display().to_string();
        let initial_cluster = format!("{}={peer_url}", self.netns);
        let args = [
            "--name",
            &self.netns,
            "--data-dir",
            &data_dir,
            "--listen-client-urls",
            &client_url,
            "--advertise-client-urls",
            &client_url,
            "--listen-peer-urls",
            &peer_url,
            "--initial-advertise-peer-urls",
            &peer_url,
            "--initial-cluster",
            &initial_cluster,
            "--initial-cluster-token",
            self.topo.tag(),
            "--initial-cluster-state",
            "new",
            "--logger",
            "zap",
            "--log-outputs",
            "stderr",
        ];
        let mut command = Command::new(ETCD_BIN);
        command.args(args);
        // etcd reads every ETCD_* variable as a flag: none of the environment's may leak in.
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("ETCD_") {
                command.env_remove(name);
            }
        }
        command
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("duplicating the etcd log fd"))
            .stderr(log);
        set_netns(&mut command, &self.netns);
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("starting {ETCD_BIN} in {}: {e}", self.netns));
        self.child = Some(child);
        self.wait_healthy();
    }

    /// Waits until etcd answers `/health` with `"health":"true"` (it has a leader and serves).
    fn wait_healthy(&mut self) {
        let start = Instant::now();
        let addr = SocketAddr::V4(self.addr());
        loop {
            if let Some(status) = self.try_wait() {
                panic!(
                    "etcd in {} exited with {status} before it was healthy\n{}",
                    self.netns,
                    self.log_tail()
                );
            }
            if in_netns(&self.netns, || healthy(addr)) {
                return;
            }
            if start.elapsed() > TIMEOUT {
                panic!(
                    "etcd in {} not healthy after {TIMEOUT:?}\n{}",
                    self.netns,
                    self.log_tail()
                );
            }
            thread::sleep(POLL);
        }
    }

    fn try_wait(&mut self) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let status = child.try_wait().expect("waiting for etcd")?;
        self.child = None;
        Some(status)
    }

    pub fn is_running(&mut self) -> bool {
        self.child.is_some() && self.try_wait().is_none()
    }

    /// SIGTERM, then waits for it to exit (SIGKILL after the harness deadline). Its data stays.
    pub fn stop(&mut self) {
        let Some(child) = self.child.as_mut() else {
            panic!("etcd in {} is not running", self.netns);
        };
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
        let start = Instant::now();
        while self.try_wait().is_none() {
            if start.elapsed() > TIMEOUT {
                self.kill9();
                panic!(
                    "etcd in {} still running {TIMEOUT:?} after SIGTERM; killed it\n{}",
                    self.netns,
                    self.log_tail()
                );
            }
            thread::sleep(POLL);
        }
    }

    /// SIGKILL, then reap.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts etcd again on the same data directory (stopping it first if it runs) and waits
    /// until it is healthy.
    pub fn restart(&mut self) {
        if self.is_running() {
            self.stop();
        }
        self.spawn();
    }

    /// Cuts etcd off the underlay (its switch port down: packets to it are dropped, nothing
    /// is refused) or plugs it back; etcd itself keeps running.
    pub fn set_reachable(&self, reachable: bool) {
        let state = if reachable { "up" } else { "down" };
        run_ok(
            "ip",
            &["-n", self.topo.switch(), "link", "set", SWITCH_PORT, state],
        );
    }

    /// Everything etcd logged so far.
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
            "----- etcd log ({}) -----\n{tail}\n----- end of etcd log -----",
            self.log.display()
        )
    }
}

impl Drop for Etcd<'_> {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!("{}", self.log_tail());
        }
        self.kill9();
    }
}

/// One `GET /health` (etcd serves it on the client port): true when etcd says it is healthy.
fn healthy(addr: SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(2)));
    if stream
        .write_all(b"GET /health HTTP/1.0\r\nHost: etcd\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut reply = String::new();
    let _ = stream.read_to_string(&mut reply);
    reply.contains("\"health\":\"true\"")
}

/// Opens the cluster store `spec` as the agent on `host` would: from inside the host's network
/// namespace (the store's connections are made by a thread it starts there), with its local
/// directory under the host's.
pub fn open_store(host: &Host, spec: &str) -> Box<dyn ClusterStore> {
    let dir = host.dir().join("cluster");
    in_netns(host.netns(), || cluster::open(spec, &dir))
        .unwrap_or_else(|e| panic!("opening cluster store {spec} on {}: {e}", host.netns()))
}

/// Runs a future to completion on the calling thread.
///
/// The cluster stores do their I/O on threads of their own and their futures only wait for
/// the answer, so no async runtime is needed to drive them: parking the thread until a waker
/// fires is enough.
pub fn block_on<F: Future>(future: F) -> F::Output {
    struct Unpark(Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(Unpark(thread::current())));
    let mut context = Context::from_waker(&waker);
    let mut future = pin!(future);
    loop {
        if let Poll::Ready(value) = future.as_mut().poll(&mut context) {
            return value;
        }
        thread::park();
    }
}
