//! Real traffic between namespaces, with what was carried verified.
//!
//! Sockets are made inside a namespace with [`in_netns`] and then used from ordinary threads.
//! Every socket has bounded timeouts, so a broken data plane fails a test instead of hanging it,
//! and every server stops and is joined in `Drop`.

use std::{
    io::{self, ErrorKind, Read, Write},
    net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use crate::{
    netns::in_netns,
    wait::{POLL, TIMEOUT, restarting, wait_until},
};

/// Read/write timeout of every data socket: longer than any pause a healthy data plane causes,
/// short enough that a broken one fails the test soon.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Connect timeout where a connection is expected to work.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// `ip:port`.
pub fn sock(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(ip, port))
}

/// Length and FNV-1a hash of a byte stream, fed in pieces of any size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Digest {
    pub bytes: u64,
    pub fnv1a: u64,
}

impl Default for Digest {
    fn default() -> Self {
        Self::new()
    }
}

impl Digest {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;

    pub fn new() -> Self {
        Self {
            bytes: 0,
            fnv1a: Self::OFFSET,
        }
    }

    pub fn update(&mut self, data: &[u8]) {
        let mut h = self.fnv1a;
        for &b in data {
            h ^= u64::from(b);
            h = h.wrapping_mul(Self::PRIME);
        }
        self.fnv1a = h;
        self.bytes += data.len() as u64;
    }

    pub fn of(data: &[u8]) -> Self {
        let mut d = Self::new();
        d.update(data);
        d
    }
}

/// Deterministic pseudo-random bytes (xorshift64*), so corruption cannot hide in a pattern.
pub struct Pattern(u64);

impl Pattern {
    pub fn new(seed: u64) -> Self {
        Self(seed | 1)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let v = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }

    pub fn bytes(seed: u64, n: usize) -> Vec<u8> {
        let mut v = vec![0; n];
        Self::new(seed).fill(&mut v);
        v
    }
}

fn set_timeouts(stream: &TcpStream) -> io::Result<()> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))
}

/// Binds a listener in `netns`, retrying while the address is not usable yet (an address just
/// configured can be tentative for a moment).
fn listen(netns: &str, addr: SocketAddr) -> TcpListener {
    in_netns(netns, || {
        let start = Instant::now();
        loop {
            match TcpListener::bind(addr) {
                Ok(l) => return l,
                Err(e) if e.kind() == ErrorKind::AddrNotAvailable && start.elapsed() < TIMEOUT => {
                    thread::sleep(POLL)
                }
                Err(e) => panic!("binding a TCP listener to {addr} in {netns}: {e}"),
            }
        }
    })
}

/// Accepts one connection, polling so that `stop` is honoured; `None` when stopped or when
/// nothing came within `timeout`.
fn accept(listener: &TcpListener, stop: &AtomicBool, timeout: Duration) -> Option<TcpStream> {
    listener
        .set_nonblocking(true)
        .expect("making the listener non-blocking");
    let start = Instant::now();
    while !stop.load(Ordering::Relaxed) && start.elapsed() < timeout {
        match restarting(|| listener.accept()) {
            Ok((s, _)) => {
                s.set_nonblocking(false)
                    .expect("making a connection blocking");
                return Some(s);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => thread::sleep(POLL),
            Err(e) => panic!("accepting on {:?}: {e}", listener.local_addr()),
        }
    }
    None
}

/// Opens a TCP connection from inside `netns`.
pub fn tcp_connect(netns: &str, to: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    in_netns(netns, || TcpStream::connect_timeout(&to, timeout)).inspect(|s| {
        let _ = set_timeouts(s);
    })
}

/// A TCP server that echoes everything back and reports a [`Digest`] of each connection.
pub struct TcpEchoServer {
    addr: SocketAddr,
    netns: String,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
    reports: mpsc::Receiver<io::Result<Digest>>,
}

/// Starts a [`TcpEchoServer`] listening on `addr` inside `netns`.
pub fn tcp_echo_server(netns: &str, addr: SocketAddr) -> TcpEchoServer {
    let listener = listen(netns, addr);
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, reports) = mpsc::channel();
    let acceptor = {
        let stop = stop.clone();
        thread::spawn(move || {
            let mut workers = Vec::new();
            while let Some(conn) = accept(&listener, &stop, Duration::MAX) {
                let tx = tx.clone();
                workers.push(thread::spawn(move || {
                    let _ = tx.send(echo(conn));
                }));
            }
            for w in workers {
                let _ = w.join();
            }
        })
    };
    TcpEchoServer {
        addr,
        netns: netns.to_owned(),
        stop,
        acceptor: Some(acceptor),
        reports,
    }
}

fn echo(mut conn: TcpStream) -> io::Result<Digest> {
    set_timeouts(&conn)?;
    let mut digest = Digest::new();
    let mut buf = vec![0; 64 * 1024];
    loop {
        let n = restarting(|| conn.read(&mut buf))?;
        if n == 0 {
            conn.shutdown(Shutdown::Write)?;
            return Ok(digest);
        }
        digest.update(&buf[..n]);
        conn.write_all(&buf[..n])?;
    }
}

impl TcpEchoServer {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// What the server received on its next finished connection.
    pub fn next_report(&self, timeout: Duration) -> Digest {
        match self.reports.recv_timeout(timeout) {
            Ok(Ok(d)) => d,
            Ok(Err(e)) => panic!("echo server {} in {}: {e}", self.addr, self.netns),
            Err(e) => panic!(
                "echo server {} in {} reported no finished connection within {timeout:?}: {e}",
                self.addr, self.netns
            ),
        }
    }
}

impl Drop for TcpEchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
    }
}

/// Connects from `client_netns` to `server`, sends `n` pseudo-random bytes while reading the echo,
/// and checks that the server received exactly them (its digest) and that exactly they came back.
pub fn tcp_send_verify(client_netns: &str, server: &TcpEchoServer, n: usize) -> Digest {
    let to = server.addr();
    let what = format!("TCP from {client_netns} to {to}");
    let conn = tcp_connect(client_netns, to, CONNECT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{what}: connect: {e}"));
    let data = Pattern::bytes(n as u64 ^ 0x5eed, n);
    let sent = Digest::of(&data);
    let mut writer = conn.try_clone().expect("cloning the client socket");
    let received = thread::scope(|s| {
        let w = s.spawn(|| -> io::Result<()> {
            for chunk in data.chunks(32 * 1024) {
                writer.write_all(chunk)?;
            }
            writer.shutdown(Shutdown::Write)
        });
        let mut reader = &conn;
        let mut got = Digest::new();
        let mut buf = vec![0; 64 * 1024];
        let read = loop {
            match restarting(|| reader.read(&mut buf)) {
                Ok(0) => break Ok(got),
                Ok(k) => got.update(&buf[..k]),
                Err(e) => break Err(e),
            }
        };
        let written = w.join().expect("writer thread");
        written.unwrap_or_else(|e| panic!("{what}: sending after {} bytes echoed: {e}", got.bytes));
        read.unwrap_or_else(|e| panic!("{what}: reading the echo after {} bytes: {e}", got.bytes))
    });
    let at_server = server.next_report(IO_TIMEOUT);
    assert_eq!(
        at_server, sent,
        "{what}: the server received other bytes than were sent"
    );
    assert_eq!(
        received, sent,
        "{what}: the echo differs from what was sent"
    );
    sent
}

/// A UDP server that echoes datagrams and remembers who sent them.
pub struct UdpEchoServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
    senders: Arc<Mutex<Vec<SocketAddr>>>,
}

/// Starts a [`UdpEchoServer`] on `addr` inside `netns`.
pub fn udp_echo_server(netns: &str, addr: SocketAddr) -> UdpEchoServer {
    let socket = in_netns(netns, || UdpSocket::bind(addr))
        .unwrap_or_else(|e| panic!("binding a UDP socket to {addr} in {netns}: {e}"));
    socket
        .set_read_timeout(Some(POLL))
        .expect("setting a UDP read timeout");
    let stop = Arc::new(AtomicBool::new(false));
    let senders = Arc::new(Mutex::new(Vec::new()));
    let handle = {
        let (stop, senders) = (stop.clone(), senders.clone());
        thread::spawn(move || {
            let mut buf = vec![0; 65536];
            while !stop.load(Ordering::Relaxed) {
                match restarting(|| socket.recv_from(&mut buf)) {
                    Ok((n, from)) => {
                        senders.lock().expect("senders lock").push(from);
                        let _ = socket.send_to(&buf[..n], from);
                    }
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                    Err(e) => panic!("UDP echo server on {addr}: {e}"),
                }
            }
        })
    };
    UdpEchoServer {
        addr,
        stop,
        handle: Some(handle),
        senders,
    }
}

impl UdpEchoServer {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Datagrams received from `ip` so far.
    pub fn received_from(&self, ip: Ipv4Addr) -> usize {
        self.senders
            .lock()
            .expect("senders lock")
            .iter()
            .filter(|a| a.ip() == ip)
            .count()
    }

    /// The source address and port of every datagram received so far, in order.
    pub fn senders(&self) -> Vec<SocketAddr> {
        self.senders.lock().expect("senders lock").clone()
    }

    /// Datagrams received so far.
    pub fn received(&self) -> usize {
        self.senders.lock().expect("senders lock").len()
    }
}

impl Drop for UdpEchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

static UDP_SEQ: AtomicU64 = AtomicU64::new(1);

/// A UDP socket in `netns`, bound to `source` (port chosen by the kernel) if given.
pub fn udp_socket(netns: &str, source: Option<Ipv4Addr>) -> UdpSocket {
    let bind = SocketAddrV4::new(source.unwrap_or(Ipv4Addr::UNSPECIFIED), 0);
    in_netns(netns, || UdpSocket::bind(bind))
        .unwrap_or_else(|e| panic!("binding a UDP socket to {bind} in {netns}: {e}"))
}

/// Sends a request from `netns` (from `source` if given) to `to` and waits for the same bytes to
/// come back; retries `attempts` times, waiting `per_try` each. True when a reply came.
pub fn udp_roundtrip(
    netns: &str,
    source: Option<Ipv4Addr>,
    to: SocketAddr,
    attempts: u32,
    per_try: Duration,
) -> bool {
    let socket = udp_socket(netns, source);
    socket
        .set_read_timeout(Some(per_try))
        .expect("setting a UDP read timeout");
    let payload = format!("net-tests {}", UDP_SEQ.fetch_add(1, Ordering::Relaxed)).into_bytes();
    let mut buf = vec![0; 2048];
    for _ in 0..attempts {
        if let Err(e) = socket.send_to(&payload, to) {
            // EPERM/EHOSTUNREACH etc. from a failed neighbour lookup: count as a lost try.
            if !matches!(
                e.kind(),
                ErrorKind::HostUnreachable | ErrorKind::NetworkUnreachable
            ) {
                eprintln!("UDP send from {netns} to {to}: {e}");
            }
            thread::sleep(per_try);
            continue;
        }
        let deadline = Instant::now() + per_try;
        while Instant::now() < deadline {
            match restarting(|| socket.recv_from(&mut buf)) {
                Ok((n, from)) if from == to && buf[..n] == payload[..] => return true,
                Ok(_) => {}
                Err(_) => break,
            }
        }
    }
    false
}

/// Sends `count` datagrams from `netns` (from `source` if given) to `to`, ignoring send errors
/// (a dropped ARP shows up as one); for traffic that is expected to be dropped.
pub fn udp_blast(netns: &str, source: Option<Ipv4Addr>, to: SocketAddr, count: usize) {
    let socket = udp_socket(netns, source);
    for i in 0..count {
        let _ = socket.send_to(format!("blast {i}").as_bytes(), to);
        thread::sleep(Duration::from_millis(10));
    }
}

/// A long-running TCP stream from a client namespace to a server namespace: the client writes
/// pseudo-random data (paced, so it does not starve a two-core machine) until stopped, the
/// server reads and hashes it; [`TcpStreamFlow::finish`] checks both sides saw the same bytes.
pub struct TcpStreamFlow {
    what: String,
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    received: Arc<AtomicU64>,
    client: Option<JoinHandle<io::Result<Digest>>>,
    server: Option<JoinHandle<io::Result<Digest>>>,
}

/// Bytes per write of a [`TcpStreamFlow`], and the pause after each: at most ~8 MiB/s.
const FLOW_CHUNK: usize = 16 * 1024;
const FLOW_PAUSE: Duration = Duration::from_millis(2);

/// Starts a [`TcpStreamFlow`] from `client_netns` to a server listening on `server_addr` in
/// `server_netns`.
pub fn start_stream(
    client_netns: &str,
    server_netns: &str,
    server_addr: SocketAddr,
) -> TcpStreamFlow {
    let what = format!("TCP stream from {client_netns} to {server_addr} in {server_netns}");
    let listener = listen(server_netns, server_addr);
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let received = Arc::new(AtomicU64::new(0));
    let server = {
        let (stop, received) = (stop.clone(), received.clone());
        thread::spawn(move || -> io::Result<Digest> {
            let mut conn = accept(&listener, &stop, TIMEOUT)
                .ok_or_else(|| io::Error::new(ErrorKind::TimedOut, "no connection came"))?;
            set_timeouts(&conn)?;
            let mut digest = Digest::new();
            let mut buf = vec![0; 64 * 1024];
            loop {
                let n = restarting(|| conn.read(&mut buf)).map_err(|e| {
                    io::Error::new(
                        e.kind(),
                        format!("reading after {} bytes: {e}", digest.bytes),
                    )
                })?;
                if n == 0 {
                    return Ok(digest);
                }
                digest.update(&buf[..n]);
                received.store(digest.bytes, Ordering::Relaxed);
            }
        })
    };
    let conn = tcp_connect(client_netns, server_addr, CONNECT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{what}: connect: {e}"));
    let client = {
        let (stop, sent) = (stop.clone(), sent.clone());
        thread::spawn(move || -> io::Result<Digest> {
            let mut conn = conn;
            let mut pattern = Pattern::new(0xf10e);
            let mut digest = Digest::new();
            let mut buf = vec![0; FLOW_CHUNK];
            while !stop.load(Ordering::Relaxed) {
                pattern.fill(&mut buf);
                conn.write_all(&buf).map_err(|e| {
                    io::Error::new(
                        e.kind(),
                        format!("writing after {} bytes: {e}", digest.bytes),
                    )
                })?;
                digest.update(&buf);
                sent.store(digest.bytes, Ordering::Relaxed);
                thread::sleep(FLOW_PAUSE);
            }
            conn.shutdown(Shutdown::Write)?;
            Ok(digest)
        })
    };
    TcpStreamFlow {
        what,
        stop,
        sent,
        received,
        client: Some(client),
        server: Some(server),
    }
}

impl TcpStreamFlow {
    /// Bytes the server has received so far.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// Bytes the client has written so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Waits until the server has received `at_least` more bytes than now; panics naming
    /// `during` if that does not happen within the harness deadline.
    pub fn wait_progress(&self, during: &str, at_least: u64) {
        let from = self.received();
        wait_until(
            TIMEOUT,
            format_args!(
                "{} to carry {at_least} more bytes {during} (stuck at {from} received, {} sent)",
                self.what,
                self.sent()
            ),
            || {
                self.ensure_alive();
                self.received() >= from + at_least
            },
        );
    }

    /// Panics early (with the error) if either side has already failed.
    fn ensure_alive(&self) {
        for (side, handle) in [("client", &self.client), ("server", &self.server)] {
            if handle.as_ref().is_some_and(JoinHandle::is_finished)
                && !self.stop.load(Ordering::Relaxed)
            {
                panic!(
                    "{}: the {side} ended while the stream should be running",
                    self.what
                );
            }
        }
    }

    /// Stops the client, waits for the server to read everything, and checks that the server
    /// received exactly what the client sent. Returns the digest.
    pub fn finish(mut self) -> Digest {
        self.stop.store(true, Ordering::Relaxed);
        let join = |h: Option<JoinHandle<io::Result<Digest>>>, side: &str| {
            h.expect("joined once")
                .join()
                .unwrap_or_else(|_| panic!("{}: the {side} thread panicked", self.what))
                .unwrap_or_else(|e| panic!("{}: {side}: {e}", self.what))
        };
        let sent = join(self.client.take(), "client");
        let received = join(self.server.take(), "server");
        assert_eq!(
            received, sent,
            "{}: the server received other bytes than the client sent",
            self.what
        );
        sent
    }
}

impl Drop for TcpStreamFlow {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for h in [self.client.take(), self.server.take()]
            .into_iter()
            .flatten()
        {
            let _ = h.join();
        }
    }
}

/// A TCP server for one connection that only reads: what a client sent until it closed, for
/// clients that cannot read an echo (a shell's `/dev/tcp`).
pub struct TcpSink {
    addr: SocketAddr,
    netns: String,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<io::Result<Vec<u8>>>>,
}

/// Starts a [`TcpSink`] listening on `addr` inside `netns`.
pub fn tcp_sink(netns: &str, addr: SocketAddr) -> TcpSink {
    let listener = listen(netns, addr);
    let stop = Arc::new(AtomicBool::new(false));
    let handle = {
        let stop = stop.clone();
        thread::spawn(move || -> io::Result<Vec<u8>> {
            let mut conn = accept(&listener, &stop, TIMEOUT)
                .ok_or_else(|| io::Error::new(ErrorKind::TimedOut, "no connection came"))?;
            set_timeouts(&conn)?;
            let mut data = Vec::new();
            conn.read_to_end(&mut data)?;
            Ok(data)
        })
    };
    TcpSink {
        addr,
        netns: netns.to_owned(),
        stop,
        handle: Some(handle),
    }
}

impl TcpSink {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Everything the one client sent, once it closed the connection; panics if none came
    /// within the harness deadline or reading failed.
    pub fn received(mut self) -> Vec<u8> {
        self.handle
            .take()
            .expect("joined once")
            .join()
            .unwrap_or_else(|_| panic!("TCP sink {} in {}: thread panicked", self.addr, self.netns))
            .unwrap_or_else(|e| panic!("TCP sink {} in {}: {e}", self.addr, self.netns))
    }
}

impl Drop for TcpSink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
