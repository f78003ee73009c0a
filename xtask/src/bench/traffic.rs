//! Part 2's load generators: one-byte TCP request/response (TCP_RR), connect-request-close
//! (TCP_CRR), and iperf3 for throughput.
//!
//! RR and CRR run in this process, like netperf's tests of the same names: a server thread and a
//! client thread, each moved into its namespace (setns) and pinned to its own CPU before it makes
//! a socket, TCP_NODELAY on both ends, one transaction in flight. Sockets block, as netperf's
//! do, except in the busy-polling RR variant (see [`Wait`]). Each measurement first runs a tenth
//! of its duration unmeasured, so ARP, caches and the CPU frequency have settled when counting
//! starts.

use std::{
    fs,
    io::{self, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    os::unix::process::CommandExt as _,
    path::Path,
    process::Stdio,
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use nix::sys::{
    socket::{self, setsockopt, sockopt},
    time::{TimeVal, TimeValLike as _},
};

use super::{
    report::Metric,
    sys::{self, ChildGuard},
};
use crate::exec::{cmd, display, probe};

const RR_PORT: u16 = 5301;
const CRR_PORT: u16 = 5302;
const CHECK_PORT: u16 = 5303;
const IPERF_PORT: u16 = 5201;
/// A blocked read, write or accept longer than this means the path is broken, not slow.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a CRR connection may take. A path that drops a SYN (a NAT with no free port refuses
/// the new flow) still connects after TCP's retransmissions at 1, 3, 7 and 15 s: that is a slow
/// connection to count, not a broken path to fail the bench for.
const SLOW_CONNECT: Duration = Duration::from_secs(20);
/// How long a server waits for its next connection.
const ACCEPT_TIMEOUT: Duration = Duration::from_secs(30);
/// The byte a CRR client sends on its last connection to stop the server.
const QUIT: u8 = b'Q';

/// A client namespace and a server namespace that can reach each other.
#[derive(Clone, Copy)]
pub struct Pair<'a> {
    pub client_ns: &'a str,
    pub server_ns: &'a str,
    /// Where the server listens.
    pub server_ip: Ipv4Addr,
    pub via: Via,
}

/// How the client reaches the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// At the server's own address, on each test's own port.
    Direct,
    /// Through a published port: the client connects to `host:host_port`, something in between
    /// translates that to the server's address and `port`, where every test listens in turn.
    Published {
        host: Ipv4Addr,
        host_port: u16,
        port: u16,
    },
}

impl Pair<'_> {
    /// Where the server of a test whose own port is `port` binds, and where its client
    /// connects.
    fn addrs(&self, port: u16) -> (SocketAddr, SocketAddr) {
        match self.via {
            Via::Direct => {
                let addr = SocketAddr::V4(SocketAddrV4::new(self.server_ip, port));
                (addr, addr)
            }
            Via::Published {
                host,
                host_port,
                port,
            } => (
                SocketAddr::V4(SocketAddrV4::new(self.server_ip, port)),
                SocketAddr::V4(SocketAddrV4::new(host, host_port)),
            ),
        }
    }
}

/// The CPU of each side; different CPUs when the machine has two.
#[derive(Clone, Copy)]
pub struct Cpus {
    pub client: usize,
    pub server: usize,
}

pub struct Throughput {
    pub gbit_per_s: f64,
    /// Busy CPU time of the whole machine during the transfer, per gigabit moved.
    pub cpu_ms_per_gbit: f64,
    /// Segments the sender retransmitted, per gigabyte it sent: on these loss-free paths, what
    /// TCP took for losses when packets arrived out of order.
    pub retransmits_per_gb: f64,
}

/// How the RR client and server wait for the peer's byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    /// Blocking reads, as netperf's TCP_RR: each byte wakes a sleeping thread on the other CPU.
    Block,
    /// Non-blocking reads retried without sleeping: both threads keep their CPUs, so a byte finds
    /// its reader running. What is left per transaction is the stacks and the path between them,
    /// without the CPU wake-ups, which on a VM can cost more than everything else together.
    Spin,
}

/// The request/response measurement `metric` names (TCP_RR or TCP_CRR, blocking or
/// busy-polling) over `pair`; an error for any other metric.
pub fn transactions(
    metric: Metric,
    pair: Pair<'_>,
    cpus: Cpus,
    duration: Duration,
) -> Result<Transactions> {
    match metric {
        Metric::Rr => tcp_rr(pair, cpus, duration, Wait::Block),
        Metric::RrSpin => tcp_rr(pair, cpus, duration, Wait::Spin),
        Metric::Crr => tcp_crr(pair, cpus, duration, Wait::Block),
        Metric::CrrSpin => tcp_crr(pair, cpus, duration, Wait::Spin),
        other => bail!("{} is not a request/response measurement", other.name()),
    }
}

/// One-byte request, one-byte response, back to back on one connection.
pub fn tcp_rr(pair: Pair<'_>, cpus: Cpus, duration: Duration, wait: Wait) -> Result<Transactions> {
    let (bind, addr) = pair.addrs(RR_PORT);
    with_server(
        pair,
        cpus,
        bind,
        move |listener| {
            let (mut stream, _) = listener.accept().context("accepting the RR connection")?;
            prepare(&stream, wait)?;
            let mut byte = [0u8; 1];
            loop {
                if read_one(&mut stream, &mut byte, wait)? == 0 {
                    return Ok(());
                }
                write_one(&mut stream, &byte, wait).context("RR server write")?;
            }
        },
        move || {
            let mut stream = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)
                .with_context(|| format!("connecting to {addr}"))?;
            prepare(&stream, wait)?;
            let mut byte = [0u8; 1];
            timed(duration, || {
                write_one(&mut stream, b"x", wait).context("RR client write")?;
                if read_one(&mut stream, &mut byte, wait)? == 0 {
                    bail!("the RR server closed the connection");
                }
                Ok(())
            })
        },
    )
}

fn read_one(stream: &mut TcpStream, byte: &mut [u8; 1], wait: Wait) -> Result<usize> {
    match wait {
        Wait::Block => read_byte(stream, byte),
        Wait::Spin => spin("reading from the peer", IO_TIMEOUT, || stream.read(byte)),
    }
}

fn write_one(stream: &mut TcpStream, byte: &[u8; 1], wait: Wait) -> Result<()> {
    write_within(stream, byte, wait, IO_TIMEOUT)
}

/// Writes one byte; busy-polling, retries for up to `limit` (the first write on a socket still
/// connecting waits for the handshake).
fn write_within(stream: &mut TcpStream, byte: &[u8; 1], wait: Wait, limit: Duration) -> Result<()> {
    match wait {
        Wait::Block => stream.write_all(byte).context("writing to the peer"),
        Wait::Spin => match spin("writing to the peer", limit, || stream.write(byte))? {
            1 => Ok(()),
            _ => bail!("writing to the peer: the socket took no data"),
        },
    }
}

/// Retries a non-blocking socket call until it completes, never sleeping; gives up after
/// `limit` or on Ctrl-C.
fn spin<T>(what: &str, limit: Duration, mut call: impl FnMut() -> io::Result<T>) -> Result<T> {
    let start = Instant::now();
    let mut tries: u32 = 0;
    loop {
        match call() {
            Ok(value) => return Ok(value),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                tries = tries.wrapping_add(1);
                // Looking at the clock costs more than one retry; every few thousand is enough.
                if tries.is_multiple_of(4096) {
                    if start.elapsed() > limit {
                        bail!("{what}: nothing for {limit:?}");
                    }
                    sys::check_interrupted()?;
                }
                std::hint::spin_loop();
            }
            Err(e) => return Err(e).context(what.to_owned()),
        }
    }
}

/// Connections, each: connect, one-byte request, one-byte response, close. The server
/// closes first (as netperf's TCP_CRR server does), so its namespace gets the TIME_WAIT sockets,
/// which `tcp_max_tw_buckets = 0` there disposes of (KERNEL-NOTES: otherwise reused client ports
/// meet them and connections stall 10-15 ms). With [`Wait::Spin`], every step (connect, accept,
/// reads, writes) is retried without sleeping, as in the busy-polling RR.
pub fn tcp_crr(pair: Pair<'_>, cpus: Cpus, duration: Duration, wait: Wait) -> Result<Transactions> {
    let (bind, addr) = pair.addrs(CRR_PORT);
    let transaction = move |request: u8| -> Result<()> {
        let mut stream = connect(addr, wait)?;
        write_within(&mut stream, &[request], wait, SLOW_CONNECT).context("CRR client write")?;
        let mut byte = [0u8; 1];
        if read_one(&mut stream, &mut byte, wait).context("CRR client read")? == 0 {
            bail!("the CRR server closed the connection without answering");
        }
        // Wait for the server's FIN, so the next connection starts after this one has ended.
        if read_one(&mut stream, &mut byte, wait)? != 0 {
            bail!("the CRR server sent more than one byte");
        }
        Ok(())
    };
    with_server(
        pair,
        cpus,
        bind,
        move |listener| {
            if wait == Wait::Spin {
                listener
                    .set_nonblocking(true)
                    .context("making the listener non-blocking")?;
            }
            let mut byte = [0u8; 1];
            loop {
                let (mut stream, _) = match wait {
                    Wait::Block => listener.accept().context("accepting a CRR connection")?,
                    Wait::Spin => spin("accepting a CRR connection", ACCEPT_TIMEOUT, || {
                        listener.accept()
                    })?,
                };
                prepare(&stream, wait)?;
                if read_one(&mut stream, &mut byte, wait).context("CRR server read")? == 0 {
                    bail!("a CRR client closed the connection without a request");
                }
                write_one(&mut stream, &byte, wait).context("CRR server write")?;
                drop(stream);
                if byte[0] == QUIT {
                    return Ok(());
                }
            }
        },
        move || {
            let rate = timed(duration, || transaction(b'x'));
            // Stop the server also when the loop failed, so it does not sit out its accept
            // timeout.
            let quit = transaction(QUIT);
            let rate = rate?;
            quit.context("stopping the CRR server")?;
            Ok(rate)
        },
    )
}

/// A CRR connection to `addr`, prepared for `wait`, given [`SLOW_CONNECT`]. Busy-polling, the
/// connect does not wait either: a non-blocking socket's first write fails with EAGAIN until the
/// handshake is done, so the request's write is retried until the connection is up.
fn connect(addr: SocketAddr, wait: Wait) -> Result<TcpStream> {
    let stream = match (wait, addr) {
        (Wait::Block, _) | (_, SocketAddr::V6(_)) => {
            TcpStream::connect_timeout(&addr, SLOW_CONNECT)
                .with_context(|| format!("connecting to {addr}"))?
        }
        (Wait::Spin, SocketAddr::V4(v4)) => {
            let fd = socket::socket(
                socket::AddressFamily::Inet,
                socket::SockType::Stream,
                socket::SockFlag::SOCK_NONBLOCK | socket::SockFlag::SOCK_CLOEXEC,
                None,
            )
            .context("making a TCP socket")?;
            match socket::connect(fd.as_raw_fd(), &socket::SockaddrIn::from(v4)) {
                Ok(()) | Err(nix::errno::Errno::EINPROGRESS) => {}
                Err(e) => return Err(e).with_context(|| format!("connecting to {addr}")),
            }
            TcpStream::from(fd)
        }
    };
    prepare(&stream, wait)?;
    Ok(stream)
}

/// Waits until the client namespace can open a TCP connection to the server namespace and
/// exchange a byte: the topology forwards (bridge ports forwarding, programs attached, routes in
/// place), and neighbour entries are warm before anything is measured.
pub fn wait_reachable(pair: Pair<'_>, cpus: Cpus, timeout: Duration) -> Result<()> {
    let (bind, addr) = pair.addrs(CHECK_PORT);
    with_server(
        pair,
        cpus,
        bind,
        |listener| {
            let (mut stream, _) = listener
                .accept()
                .context("accepting the check connection")?;
            let mut byte = [0u8; 1];
            stream.read_exact(&mut byte).context("check server read")?;
            stream.write_all(&byte).context("check server write")
        },
        move || {
            let deadline = Instant::now() + timeout;
            loop {
                // A short connect timeout: a first SYN lost while the path comes up would
                // otherwise wait out TCP's 1 s retransmission.
                let attempt = TcpStream::connect_timeout(&addr, Duration::from_millis(200))
                    .and_then(|mut stream| {
                        stream.set_read_timeout(Some(IO_TIMEOUT))?;
                        stream.write_all(b"x")?;
                        let mut byte = [0u8; 1];
                        stream.read_exact(&mut byte)
                    });
                match attempt {
                    Ok(()) => return Ok(()),
                    Err(e) if Instant::now() >= deadline => {
                        return Err(e).with_context(|| {
                            format!(
                                "{} cannot reach {addr} in {} within {timeout:?}",
                                pair.client_ns, pair.server_ns
                            )
                        });
                    }
                    Err(_) => sys::check_interrupted()?,
                }
            }
        },
    )
}

/// Runs `serve` on a listener in the server namespace and, once it listens, `client` in the
/// client namespace; returns the client's result, or the first error of either side.
fn with_server<T: Send>(
    pair: Pair<'_>,
    cpus: Cpus,
    bind: SocketAddr,
    serve: impl FnOnce(TcpListener) -> Result<()> + Send,
    client: impl FnOnce() -> Result<T> + Send,
) -> Result<T> {
    let (ready_tx, ready_rx) = mpsc::channel::<()>();
    thread::scope(|s| {
        let server = s.spawn(move || -> Result<()> {
            sys::enter(pair.server_ns, Some(cpus.server))?;
            let listener = TcpListener::bind(bind)
                .with_context(|| format!("binding {bind} in {}", pair.server_ns))?;
            // accept() honours SO_RCVTIMEO: a client that never comes fails the bench instead of
            // hanging it.
            setsockopt(
                &listener,
                sockopt::ReceiveTimeout,
                &TimeVal::seconds(ACCEPT_TIMEOUT.as_secs() as i64),
            )
            .context("setting the listener's accept timeout")?;
            // The receiver only goes away when the scope is already failing.
            let _ = ready_tx.send(());
            serve(listener)
        });
        let server_what = format!("the server thread in {}", pair.server_ns);
        if ready_rx.recv_timeout(IO_TIMEOUT).is_err() {
            sys::joined(&server_what, server)?;
            bail!("the server in {} never started listening", pair.server_ns);
        }
        let client = s.spawn(move || -> Result<T> {
            sys::enter(pair.client_ns, Some(cpus.client))?;
            client()
        });
        let client_result = sys::joined(&format!("the client in {}", pair.client_ns), client);
        let server_result = sys::joined(&server_what, server);
        let value = client_result?;
        server_result?;
        Ok(value)
    })
}

fn prepare(stream: &TcpStream, wait: Wait) -> Result<()> {
    stream.set_nodelay(true).context("setting TCP_NODELAY")?;
    match wait {
        Wait::Block => stream
            .set_read_timeout(Some(IO_TIMEOUT))
            .context("setting a read timeout"),
        Wait::Spin => stream
            .set_nonblocking(true)
            .context("making the socket non-blocking"),
    }
}

/// One read of at most one byte, retried on EINTR (a Ctrl-C lands in some thread).
fn read_byte(stream: &mut TcpStream, byte: &mut [u8; 1]) -> Result<usize> {
    loop {
        match stream.read(byte) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other.context("reading from the peer"),
        }
    }
}

/// What a request/response measurement counted.
#[derive(Clone, Copy, Debug)]
pub struct Transactions {
    /// Completed per second over the counted part.
    pub per_second: f64,
    /// Completed in all, the unmeasured warm-up included: the transactions whose packets
    /// anything counted over the whole call (such as the kernel's program run counts) saw.
    pub total: u64,
}

/// Runs `transaction` back to back: a tenth of `duration` unmeasured, then `duration` counted.
fn timed(duration: Duration, mut transaction: impl FnMut() -> Result<()>) -> Result<Transactions> {
    let count_from = Instant::now() + duration / 10;
    let mut first: Option<Instant> = None;
    let mut count: u64 = 0;
    let mut total: u64 = 0;
    loop {
        transaction()?;
        total += 1;
        let now = Instant::now();
        match first {
            None if now >= count_from => first = Some(now),
            None => {}
            Some(start) => {
                count += 1;
                let elapsed = now - start;
                if elapsed >= duration {
                    return Ok(Transactions {
                        per_second: count as f64 / elapsed.as_secs_f64(),
                        total,
                    });
                }
            }
        }
        sys::check_interrupted()?;
    }
}

/// One iperf3 TCP transfer from client to server, `seconds` long (iperf3 3.12 takes whole
/// seconds), client and server pinned like the RR threads. CPU time comes from /proc/stat over
/// the client's run: the whole machine's, because the forwarding work happens in softirq context
/// on whichever CPU, not in the iperf3 processes.
pub fn throughput(pair: Pair<'_>, cpus: Cpus, seconds: u32, log_dir: &Path) -> Result<Throughput> {
    let (bind, connect) = pair.addrs(IPERF_PORT);
    let (ip, port) = (bind.ip().to_string(), bind.port().to_string());
    let server_log = log_dir.join(format!("iperf3-server-{}.log", pair.server_ns));
    let log = fs::File::create(&server_log)
        .with_context(|| format!("creating {}", server_log.display()))?;
    let err_log = log
        .try_clone()
        .with_context(|| format!("reopening {}", server_log.display()))?;
    let mut server = in_netns(pair.server_ns, "iperf3");
    server
        .args(["-s", "-1", "-B", &ip, "-p", &port, "-A"])
        .arg(cpus.server.to_string())
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err_log)
        // Its own process group: Ctrl-C reaches only xtask, which then stops it in order.
        .process_group(0);
    let line = display(&server);
    println!("$ {line} &");
    let mut server = ChildGuard::new(
        format!("iperf3 server in {}", pair.server_ns),
        server
            .spawn()
            .with_context(|| format!("could not start `{line}`"))?,
    );
    let listening = format!("sport = :{port}");
    sys::wait_for(
        &format!("iperf3 to listen in {}", pair.server_ns),
        IO_TIMEOUT,
        || {
            if let Some(status) = server.try_wait()? {
                bail!(
                    "`{line}` exited ({status}) before listening; its log: {}",
                    server_log.display()
                );
            }
            let out = probe(in_netns(pair.server_ns, "ss").args(["-Hltn", &listening]));
            Ok(out.filter(|o| !o.trim().is_empty()).map(|_| ()))
        },
    )?;

    let client_out = log_dir.join(format!("iperf3-client-{}.json", pair.client_ns));
    let out = fs::File::create(&client_out)
        .with_context(|| format!("creating {}", client_out.display()))?;
    let mut client = in_netns(pair.client_ns, "iperf3");
    client
        .args([
            "-c",
            &connect.ip().to_string(),
            "-p",
            &connect.port().to_string(),
        ])
        .args(["-J", "--connect-timeout", "3000"])
        .arg("-t")
        .arg(seconds.to_string())
        .arg("-A")
        .arg(cpus.client.to_string())
        .stdin(Stdio::null())
        .stdout(out)
        .process_group(0);
    let client_line = display(&client);
    println!("$ {client_line}");
    let before = busy_cpu_seconds()?;
    let mut client = ChildGuard::new(
        format!("iperf3 client in {}", pair.client_ns),
        client
            .spawn()
            .with_context(|| format!("could not start `{client_line}`"))?,
    );
    let status = client.wait_within(Duration::from_secs(u64::from(seconds)) + IO_TIMEOUT)?;
    let busy = busy_cpu_seconds()? - before;
    let json = fs::read_to_string(&client_out)
        .with_context(|| format!("reading {}", client_out.display()))?;
    if !status.success() {
        bail!("`{client_line}` failed ({status}): {}", json.trim());
    }
    let server_status = server.wait_within(IO_TIMEOUT)?;
    if !server_status.success() {
        bail!(
            "`{line}` failed ({server_status}); its log: {}",
            server_log.display()
        );
    }

    let report: serde_json::Value = serde_json::from_str(&json)
        .with_context(|| format!("`{client_line}` did not print JSON: {json}"))?;
    if let Some(error) = report.get("error") {
        bail!("`{client_line}` reported an error: {error}");
    }
    let received = report
        .pointer("/end/sum_received")
        .with_context(|| format!("no end.sum_received in the output of `{client_line}`"))?;
    let number = |key: &str| {
        received
            .get(key)
            .and_then(serde_json::Value::as_f64)
            .with_context(|| format!("no end.sum_received.{key} in the output of `{client_line}`"))
    };
    let (bytes, bits_per_second) = (number("bytes")?, number("bits_per_second")?);
    if bytes <= 0.0 {
        bail!("`{client_line}` moved no data");
    }
    let sent = report
        .pointer("/end/sum_sent")
        .with_context(|| format!("no end.sum_sent in the output of `{client_line}`"))?;
    let sent_number = |key: &str| {
        sent.get(key)
            .and_then(serde_json::Value::as_f64)
            .with_context(|| format!("no end.sum_sent.{key} in the output of `{client_line}`"))
    };
    let (sent_bytes, retransmits) = (sent_number("bytes")?, sent_number("retransmits")?);
    if sent_bytes < bytes {
        bail!("`{client_line}` reported {sent_bytes} bytes sent but {bytes} received");
    }
    let gbit = bytes * 8.0 / 1e9;
    Ok(Throughput {
        gbit_per_s: bits_per_second / 1e9,
        cpu_ms_per_gbit: busy * 1000.0 / gbit,
        retransmits_per_gb: retransmits / (sent_bytes / 1e9),
    })
}

fn in_netns(netns: &str, program: &str) -> std::process::Command {
    let mut c = cmd("ip");
    c.args(["netns", "exec", netns, program]);
    c
}

/// Seconds all CPUs together have spent busy since boot: user, nice, system, irq and softirq
/// (idle, iowait and the time the hypervisor stole are not ours).
fn busy_cpu_seconds() -> Result<f64> {
    let stat = fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let line = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .context("no aggregate `cpu` line in /proc/stat")?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let busy: u64 = [0, 1, 2, 5, 6]
        .iter()
        .map(|&i| fields.get(i).copied().unwrap_or(0))
        .sum();
    // SAFETY: sysconf only reads a configuration value.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks <= 0 {
        bail!("sysconf(_SC_CLK_TCK) failed");
    }
    Ok(busy as f64 / ticks as f64)
}
