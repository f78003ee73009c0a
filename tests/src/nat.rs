//! Helpers for masquerade tests: the conntrack table and NAT counters as netctl shows them, a
//! TCP echo server that reports who connected, clients bound to a chosen source port, an ICMP
//! sniffer, routes' path MTU, and the descriptor limit for tests with many sockets.

use std::{
    io::{self, ErrorKind, Read, Write},
    net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use nix::sys::{
    socket::{
        AddressFamily, Backlog, SockFlag, SockType, SockaddrIn, bind, connect, listen, setsockopt,
        socket, sockopt,
    },
    time::TimeVal,
};

pub use net_agent::conntrack::Flow;

use crate::{
    agent::Agent,
    api::NatStatus,
    netns::{exec_in_ok, in_netns},
    traffic::{CONNECT_TIMEOUT, Digest, IO_TIMEOUT, Pattern},
    wait::{POLL, TIMEOUT, restarting},
};

/// netctl's view of masquerade.
pub trait NatExt {
    /// `netctl bpf ct list [filter...]` (read from the pins: works with the agent down).
    fn ct_list(&self, filter: &[&str]) -> Vec<Flow>;
    /// `netctl bpf ct flush [filter...]`: how many flows it removed.
    fn ct_flush(&self, filter: &[&str]) -> u64;
    /// `status`'s NAT part; panics if the agent says masquerade is off.
    fn nat_status(&self) -> NatStatus;
}

impl NatExt for Agent<'_> {
    fn ct_list(&self, filter: &[&str]) -> Vec<Flow> {
        let mut args = vec!["bpf", "ct", "list"];
        args.extend_from_slice(filter);
        self.netctl_json(&args)
    }

    fn ct_flush(&self, filter: &[&str]) -> u64 {
        let mut args = vec!["bpf", "ct", "flush"];
        args.extend_from_slice(filter);
        let reply: serde_json::Value = self.netctl_json(&args);
        reply["flushed"]
            .as_u64()
            .unwrap_or_else(|| panic!("`netctl bpf ct flush` answered {reply}"))
    }

    fn nat_status(&self) -> NatStatus {
        let status = self.status();
        match status.nat {
            Some(nat) => nat,
            None => panic!("`netctl status` says masquerade is off: {status:#?}"),
        }
    }
}

/// The flows as readable lines, for failure messages.
pub fn flows_text(flows: &[Flow]) -> String {
    if flows.is_empty() {
        return "(no flows)".to_owned();
    }
    flows
        .iter()
        .map(|f| {
            format!(
                "{} {} {}:{} -> {}:{} as {}:{} -> {}:{} {} idle {}s pkts {}/{}",
                f.kind,
                f.proto,
                f.source,
                f.source_port,
                f.destination,
                f.destination_port,
                f.new_source,
                f.new_source_port,
                f.new_destination,
                f.new_destination_port,
                f.state,
                f.idle_secs,
                f.packets_original,
                f.packets_reply
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Raises this process's soft RLIMIT_NOFILE to its hard limit and checks that at least `needed`
/// descriptors are allowed.
pub fn raise_nofile(needed: u64) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit(RLIMIT_NOFILE)");
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).expect("raising RLIMIT_NOFILE");
    }
    assert!(
        hard >= needed,
        "this test needs {needed} file descriptors; the hard limit is {hard} (raise it with \
         `ulimit -Hn`)"
    );
}

/// A TCP echo server that reports, for each connection, the peer it saw and a [`Digest`] of
/// what it received; it also lists the peers accepted so far (while they are still open).
pub struct PeerEchoServer {
    addr: SocketAddr,
    netns: String,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
    peers: Arc<Mutex<Vec<SocketAddr>>>,
    reports: mpsc::Receiver<(SocketAddr, io::Result<Digest>)>,
}

/// Starts a [`PeerEchoServer`] on `addr` inside `netns`. Its accept queue holds 1024
/// connections (std's listeners get 128), for tests that open many at once.
pub fn peer_echo_server(netns: &str, addr: SocketAddrV4) -> PeerEchoServer {
    let listener = in_netns(netns, || {
        let start = Instant::now();
        loop {
            match listen_backlog(addr, 1024) {
                Ok(l) => return l,
                // Not yet available: the address is still being configured. In use: the
                // previous server on this address closed its listener, but a child that another
                // test forked at that moment still holds a copy of the descriptor until its
                // exec closes it (close-on-exec), so the listener lingers for a moment.
                Err(e)
                    if matches!(e.kind(), ErrorKind::AddrNotAvailable | ErrorKind::AddrInUse)
                        && start.elapsed() < TIMEOUT =>
                {
                    thread::sleep(POLL)
                }
                Err(e) => panic!("binding a TCP listener to {addr} in {netns}: {e}"),
            }
        }
    });
    let addr = SocketAddr::V4(addr);
    listener
        .set_nonblocking(true)
        .expect("making the listener non-blocking");
    let stop = Arc::new(AtomicBool::new(false));
    let peers = Arc::new(Mutex::new(Vec::new()));
    let (tx, reports) = mpsc::channel();
    let acceptor = {
        let (stop, peers) = (stop.clone(), peers.clone());
        thread::spawn(move || {
            let mut workers = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                match restarting(|| listener.accept()) {
                    Ok((conn, peer)) => {
                        peers.lock().expect("peers lock").push(peer);
                        let tx = tx.clone();
                        workers.push(thread::spawn(move || {
                            let _ = tx.send((peer, echo(conn)));
                        }));
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_millis(2))
                    }
                    Err(e) => panic!("accepting on {addr}: {e}"),
                }
            }
            for w in workers {
                let _ = w.join();
            }
        })
    };
    PeerEchoServer {
        addr,
        netns: netns.to_owned(),
        stop,
        acceptor: Some(acceptor),
        peers,
        reports,
    }
}

fn listen_backlog(addr: SocketAddrV4, backlog: i32) -> io::Result<TcpListener> {
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    bind(fd.as_raw_fd(), &SockaddrIn::from(addr))?;
    listen(&fd, Backlog::new(backlog)?)?;
    Ok(TcpListener::from(fd))
}

fn echo(conn: TcpStream) -> io::Result<Digest> {
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(IO_TIMEOUT))?;
    conn.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut conn = conn;
    let mut digest = Digest::new();
    let mut buf = vec![0; 16 * 1024];
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

impl PeerEchoServer {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Peers accepted so far, in order.
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.peers.lock().expect("peers lock").clone()
    }

    /// The peer and digest of the next connection that finished; panics after `timeout` or if
    /// the connection failed on the server's side.
    pub fn next_report(&self, timeout: Duration) -> (SocketAddr, Digest) {
        match self.reports.recv_timeout(timeout) {
            Ok((peer, Ok(d))) => (peer, d),
            Ok((peer, Err(e))) => panic!(
                "echo server {} in {}: connection from {peer}: {e}",
                self.addr, self.netns
            ),
            Err(e) => panic!(
                "echo server {} in {} reported no finished connection within {timeout:?}: {e}",
                self.addr, self.netns
            ),
        }
    }
}

impl Drop for PeerEchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
    }
}

/// Writes `data` on `conn` while reading the echo back; returns what came back (its digest).
/// The connection stays open.
pub fn echo_exchange(conn: &TcpStream, data: &[u8]) -> io::Result<Digest> {
    let mut writer = conn.try_clone()?;
    thread::scope(|s| {
        let w = s.spawn(move || -> io::Result<()> {
            for chunk in data.chunks(32 * 1024) {
                writer.write_all(chunk)?;
            }
            Ok(())
        });
        let mut reader = conn;
        let mut got = Digest::new();
        let mut buf = vec![0; 64 * 1024];
        let read = loop {
            if got.bytes >= data.len() as u64 {
                break Ok(got);
            }
            let want = (data.len() as u64 - got.bytes).min(buf.len() as u64) as usize;
            match restarting(|| reader.read(&mut buf[..want])) {
                Ok(0) => {
                    break Err(io::Error::new(
                        ErrorKind::UnexpectedEof,
                        format!("the echo ended after {} bytes", got.bytes),
                    ));
                }
                Ok(k) => got.update(&buf[..k]),
                Err(e) => {
                    break Err(io::Error::new(
                        e.kind(),
                        format!("reading the echo after {} bytes: {e}", got.bytes),
                    ));
                }
            }
        };
        let written = w.join().expect("writer thread");
        written?;
        read
    })
}

/// Closes the sending side of `conn` and reads until the peer closes too (the echo server
/// reports the connection then). Returns the bytes that still came.
pub fn close_echo(conn: &TcpStream) -> io::Result<u64> {
    conn.shutdown(Shutdown::Write)?;
    let mut rest = 0;
    let mut buf = [0; 4096];
    let mut reader = conn;
    loop {
        match restarting(|| reader.read(&mut buf))? {
            0 => return Ok(rest),
            n => rest += n as u64,
        }
    }
}

/// Opens `count` TCP connections from inside `netns` to `to`, from `openers` threads at once
/// (so that flows are created concurrently on every CPU), all left open with the harness's I/O
/// timeouts. Panics naming the first connection that failed.
pub fn open_concurrently(
    netns: &str,
    to: SocketAddr,
    count: usize,
    openers: usize,
) -> Vec<TcpStream> {
    let per_opener = count.div_ceil(openers);
    let conns: Vec<TcpStream> = thread::scope(|s| {
        let handles: Vec<_> = (0..openers)
            .map(|t| {
                let n = per_opener.min(count.saturating_sub(t * per_opener));
                s.spawn(move || {
                    in_netns(netns, || {
                        (0..n)
                            .map(|i| {
                                TcpStream::connect_timeout(&to, CONNECT_TIMEOUT).map_err(|e| {
                                    format!(
                                        "connection {i} of opener {t} from {netns} to {to}: {e}"
                                    )
                                })
                            })
                            .collect::<Result<Vec<_>, _>>()
                    })
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| {
                h.join()
                    .expect("opener thread")
                    .unwrap_or_else(|e| panic!("{e}"))
            })
            .collect()
    });
    for c in &conns {
        c.set_read_timeout(Some(IO_TIMEOUT)).expect("read timeout");
        c.set_write_timeout(Some(IO_TIMEOUT))
            .expect("write timeout");
    }
    conns
}

/// Sends `per_conn` distinct pseudo-random bytes on every connection at once (from `threads`
/// threads) and checks each echo; returns what each one sent, in order.
pub fn echo_on_all(conns: &[TcpStream], per_conn: usize, threads: usize) -> Vec<Digest> {
    let chunk = conns.len().div_ceil(threads).max(1);
    thread::scope(|s| {
        let workers: Vec<_> = conns
            .chunks(chunk)
            .enumerate()
            .map(|(t, part)| {
                s.spawn(move || {
                    part.iter()
                        .enumerate()
                        .map(|(i, c)| {
                            let n = t * chunk + i;
                            let data = Pattern::bytes(n as u64 + 1, per_conn);
                            let digest = Digest::of(&data);
                            let echoed = echo_exchange(c, &data)
                                .unwrap_or_else(|e| panic!("connection {n}: {e}"));
                            assert_eq!(echoed, digest, "connection {n}: the echo differs");
                            digest
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().expect("exchange thread"))
            .collect()
    })
}

/// Closes every connection and checks that `server` received on them exactly `sent` (in any
/// order).
pub fn close_all_and_check(conns: &[TcpStream], server: &PeerEchoServer, sent: &[Digest]) {
    for (n, c) in conns.iter().enumerate() {
        close_echo(c).unwrap_or_else(|e| panic!("closing connection {n}: {e}"));
    }
    let mut at_server: Vec<(u64, u64)> = (0..conns.len())
        .map(|_| {
            let (_, d) = server.next_report(IO_TIMEOUT);
            (d.bytes, d.fnv1a)
        })
        .collect();
    let mut expected: Vec<(u64, u64)> = sent.iter().map(|d| (d.bytes, d.fnv1a)).collect();
    at_server.sort_unstable();
    expected.sort_unstable();
    assert_eq!(
        at_server, expected,
        "the server received other bytes than were sent"
    );
}

/// Opens a TCP connection from inside `netns`, bound to `local` (SO_REUSEADDR), giving up after
/// `timeout`; the stream gets the harness's I/O timeouts.
pub fn tcp_connect_from(
    netns: &str,
    local: SocketAddrV4,
    to: SocketAddrV4,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let fd: OwnedFd = in_netns(netns, || {
        socket(
            AddressFamily::Inet,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
    })?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    bind(fd.as_raw_fd(), &SockaddrIn::from(local))?;
    // A blocking connect honours SO_SNDTIMEO: it fails with EINPROGRESS when it runs out.
    setsockopt(
        &fd,
        sockopt::SendTimeout,
        &TimeVal::from(timeval_of(timeout)),
    )?;
    match connect(fd.as_raw_fd(), &SockaddrIn::from(to)) {
        Ok(()) => {}
        Err(nix::errno::Errno::EINPROGRESS) => {
            return Err(io::Error::new(
                ErrorKind::TimedOut,
                format!("connecting from {local} to {to} in {netns}: no answer within {timeout:?}"),
            ));
        }
        Err(e) => return Err(e.into()),
    }
    let stream = TcpStream::from(fd);
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(stream)
}

fn timeval_of(d: Duration) -> libc::timeval {
    libc::timeval {
        tv_sec: d.as_secs() as libc::time_t,
        tv_usec: libc::suseconds_t::from(d.subsec_micros()),
    }
}

/// One ICMP message an [`IcmpSniffer`] saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IcmpSeen {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub icmp_type: u8,
    pub code: u8,
    /// Bytes 4-5 of the ICMP header: the echo identifier for echo messages.
    pub id: u16,
}

/// Records every ICMP message arriving in a namespace (a raw IPPROTO_ICMP socket gets a copy of
/// each), until dropped.
pub struct IcmpSniffer {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<IcmpSeen>>>,
    handle: Option<JoinHandle<()>>,
}

/// A socket of `kind` (domain, type, protocol) opened inside `netns`, with a short receive
/// timeout so that a sniffer's thread notices when it is told to stop.
fn capture_socket(netns: &str, kind: (i32, i32, i32), what: &str) -> OwnedFd {
    let (domain, ty, protocol) = kind;
    let fd = in_netns(netns, || {
        // SAFETY: plain system call; the result is checked before it is owned.
        let raw = unsafe { libc::socket(domain, ty | libc::SOCK_CLOEXEC, protocol) };
        assert!(
            raw >= 0,
            "opening {what} in {netns}: {}",
            io::Error::last_os_error()
        );
        // SAFETY: a fresh descriptor nobody else owns.
        unsafe { OwnedFd::from_raw_fd(raw) }
    });
    setsockopt(
        &fd,
        sockopt::ReceiveTimeout,
        &TimeVal::from(timeval_of(Duration::from_millis(100))),
    )
    .unwrap_or_else(|e| panic!("setting a receive timeout on {what}: {e}"));
    fd
}

/// Starts an [`IcmpSniffer`] in `netns`.
pub fn icmp_sniffer(netns: &str) -> IcmpSniffer {
    let fd = capture_socket(
        netns,
        (libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP),
        "a raw ICMP socket",
    );
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let handle = {
        let (stop, seen) = (stop.clone(), seen.clone());
        thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::Relaxed) {
                // SAFETY: reading into a buffer we own, of the length given.
                let n =
                    unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
                if n < 0 {
                    continue;
                }
                let pkt = &buf[..n as usize];
                if pkt.len() < 20 {
                    continue;
                }
                let ihl = usize::from(pkt[0] & 0x0f) * 4;
                if pkt.len() < ihl + 8 {
                    continue;
                }
                let icmp = &pkt[ihl..];
                seen.lock().expect("sniffer lock").push(IcmpSeen {
                    src: Ipv4Addr::new(pkt[12], pkt[13], pkt[14], pkt[15]),
                    dst: Ipv4Addr::new(pkt[16], pkt[17], pkt[18], pkt[19]),
                    icmp_type: icmp[0],
                    code: icmp[1],
                    id: u16::from_be_bytes([icmp[4], icmp[5]]),
                });
            }
        })
    };
    IcmpSniffer {
        stop,
        seen,
        handle: Some(handle),
    }
}

impl IcmpSniffer {
    /// Everything seen so far.
    pub fn seen(&self) -> Vec<IcmpSeen> {
        self.seen.lock().expect("sniffer lock").clone()
    }
}

impl Drop for IcmpSniffer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// The path MTU `ip route get <dst> [from <src>]` reports in `netns` (the route cache's
/// `mtu N`), if any. Give `from` where routing depends on the source (policy rules): the
/// learnt MTU belongs to the route a socket with that source uses.
pub fn route_mtu(netns: &str, dst: Ipv4Addr, from: Option<Ipv4Addr>) -> Option<u32> {
    let dst = dst.to_string();
    let from = from.map(|f| f.to_string());
    let mut args = vec!["ip", "route", "get", dst.as_str()];
    if let Some(from) = &from {
        args.extend(["from", from.as_str()]);
    }
    let out = exec_in_ok(netns, &args);
    let words: Vec<&str> = out.split_whitespace().collect();
    words
        .windows(2)
        .find(|w| w[0] == "mtu")
        .and_then(|w| w[1].parse().ok())
}

/// One IPv4 packet an [`Ipv4Sniffer`] saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Seen {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub proto: u8,
    /// More-fragments set or a non-zero fragment offset.
    pub fragment: bool,
    /// DF set: no router may fragment it.
    pub dont_fragment: bool,
    /// IP total length (of a GSO packet: the whole, before segmentation).
    pub len: u16,
    /// Sent by the namespace rather than received.
    pub outgoing: bool,
}

/// Records every IPv4 packet on every interface of a namespace, both ways, until dropped. The
/// `AF_PACKET` socket takes every protocol and filters IPv4 itself: only such a socket sees a
/// packet arriving before the tc programs do (which may redirect it elsewhere), and one leaving.
/// Either way before reassembly and before any socket lookup.
pub struct Ipv4Sniffer {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<Ipv4Seen>>>,
    handle: Option<JoinHandle<()>>,
}

/// Starts an [`Ipv4Sniffer`] in `netns`.
pub fn ipv4_sniffer(netns: &str) -> Ipv4Sniffer {
    let eth_p_ip = (libc::ETH_P_IP as u16).to_be();
    let eth_p_all = (libc::ETH_P_ALL as u16).to_be();
    let fd = capture_socket(
        netns,
        (libc::AF_PACKET, libc::SOCK_DGRAM, i32::from(eth_p_all)),
        "a packet socket",
    );
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let handle = {
        let (stop, seen) = (stop.clone(), seen.clone());
        thread::spawn(move || {
            let mut buf = [0u8; 128];
            while !stop.load(Ordering::Relaxed) {
                // SAFETY: zeroed plain-old-data, filled by recvfrom.
                let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
                let mut from_len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
                // SAFETY: buffers we own, with their lengths. Longer packets are truncated,
                // which is fine: only the header is read.
                let n = unsafe {
                    libc::recvfrom(
                        fd.as_raw_fd(),
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                        0,
                        (&mut from as *mut libc::sockaddr_ll).cast(),
                        &mut from_len,
                    )
                };
                if n < 20 || from.sll_protocol != eth_p_ip {
                    continue;
                }
                let frags = u16::from_be_bytes([buf[6], buf[7]]);
                seen.lock().expect("sniffer lock").push(Ipv4Seen {
                    src: Ipv4Addr::new(buf[12], buf[13], buf[14], buf[15]),
                    dst: Ipv4Addr::new(buf[16], buf[17], buf[18], buf[19]),
                    proto: buf[9],
                    fragment: frags & 0x3fff != 0,
                    dont_fragment: frags & 0x4000 != 0,
                    len: u16::from_be_bytes([buf[2], buf[3]]),
                    outgoing: from.sll_pkttype == libc::PACKET_OUTGOING,
                });
            }
        })
    };
    Ipv4Sniffer {
        stop,
        seen,
        handle: Some(handle),
    }
}

impl Ipv4Sniffer {
    /// Everything seen so far.
    pub fn seen(&self) -> Vec<Ipv4Seen> {
        self.seen.lock().expect("sniffer lock").clone()
    }
}

impl Drop for Ipv4Sniffer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Sends one ICMP echo request from `netns` to `to` with identifier `id` and waits up to
/// `wait` for its reply, through an ICMP datagram ("ping") socket bound to that identifier
/// (the namespace's `net.ipv4.ping_group_range` must admit root). Returns the payload of the
/// reply, if one came.
pub fn ping_with_id(
    netns: &str,
    to: Ipv4Addr,
    id: u16,
    payload: &[u8],
    wait: Duration,
) -> Option<Vec<u8>> {
    let fd = in_netns(netns, || {
        // SAFETY: plain system call; the result is checked before it is owned.
        let raw = unsafe {
            libc::socket(
                libc::AF_INET,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                libc::IPPROTO_ICMP,
            )
        };
        assert!(
            raw >= 0,
            "opening an ICMP datagram socket in {netns} (ping_group_range?): {}",
            io::Error::last_os_error()
        );
        // SAFETY: a fresh descriptor nobody else owns.
        unsafe { OwnedFd::from_raw_fd(raw) }
    });
    // For a ping socket the "port" is the echo identifier.
    bind(fd.as_raw_fd(), &SockaddrIn::new(0, 0, 0, 0, id))
        .unwrap_or_else(|e| panic!("binding a ping socket to identifier {id} in {netns}: {e}"));
    setsockopt(
        &fd,
        sockopt::ReceiveTimeout,
        &TimeVal::from(timeval_of(wait)),
    )
    .expect("setting a receive timeout on the ping socket");
    // Type 8 (echo request), code 0; the kernel fills in the identifier and the checksum.
    let mut request = vec![8u8, 0, 0, 0, 0, 0, 0, 1];
    request.extend_from_slice(payload);
    let dest = SockaddrIn::from(SocketAddrV4::new(to, 0));
    nix::sys::socket::sendto(
        fd.as_raw_fd(),
        &request,
        &dest,
        nix::sys::socket::MsgFlags::empty(),
    )
    .unwrap_or_else(|e| panic!("sending an echo request from {netns} to {to}: {e}"));
    let mut buf = [0u8; 2048];
    let deadline = Instant::now() + wait;
    while Instant::now() < deadline {
        // SAFETY: a buffer we own, with its length.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            if io::Error::last_os_error().kind() == ErrorKind::Interrupted {
                continue;
            }
            return None;
        }
        let reply = &buf[..n as usize];
        // Echo reply (type 0) carrying our payload.
        if reply.len() >= 8 && reply[0] == 0 && &reply[8..] == payload {
            return Some(reply[8..].to_vec());
        }
    }
    None
}
