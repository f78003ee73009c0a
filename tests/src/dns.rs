//! DNS for the tests: a fake upstream resolver that the agents forward to (so no test ever asks a
//! real one), and a client that asks a resolver from inside a namespace and decodes the reply.
//! Messages are built and parsed with hickory-proto, as the agent's own server does.

use std::{
    collections::BTreeMap,
    fmt,
    io::{self, ErrorKind, Read, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

pub use hickory_proto::{op::ResponseCode, rr::RecordType};
use hickory_proto::{
    op::{Message, MessageType, OpCode, Query},
    rr::{Name, RData, Record, rdata::A},
};

use crate::{
    netns::in_netns,
    wait::{POLL, TIMEOUT, restarting},
};

/// Where every endpoint's embedded resolver listens, inside the endpoint's namespace.
pub const RESOLVER: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 11), 53));
/// How long one query waits for its reply: longer than the agent's own wait for an upstream
/// (3 s), so that a silent upstream shows up as the agent's SERVFAIL rather than as our timeout.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(6);
/// UDP queries are sent this many times before giving up.
const UDP_ATTEMPTS: usize = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

/// What a resolver answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsReply {
    pub rcode: ResponseCode,
    pub authoritative: bool,
    /// A records of the answer section.
    pub a: Vec<Ipv4Addr>,
    /// PTR targets of the answer section, without the trailing dot.
    pub ptr: Vec<String>,
}

impl fmt::Display for DnsReply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} aa={} A={:?} PTR={:?}",
            self.rcode, self.authoritative, self.a, self.ptr
        )
    }
}

/// `name` as an absolute DNS name.
fn fqdn(name: &str) -> Name {
    let absolute = if name.ends_with('.') {
        name.to_owned()
    } else {
        format!("{name}.")
    };
    Name::from_ascii(&absolute).unwrap_or_else(|e| panic!("DNS name {name:?}: {e}"))
}

/// `d.c.b.a.in-addr.arpa` for a.b.c.d.
pub fn reverse_name(ip: Ipv4Addr) -> String {
    let [a, b, c, d] = ip.octets();
    format!("{d}.{c}.{b}.{a}.in-addr.arpa")
}

/// A name without its trailing dot, lowercase.
fn plain(name: &Name) -> String {
    name.to_ascii().trim_end_matches('.').to_ascii_lowercase()
}

/// Asks `server` for `name`/`rtype` from inside `netns`, over `transport`. UDP is retried a few
/// times; an error means no reply came (or an unreadable one), with what was tried.
pub fn query(
    netns: &str,
    server: SocketAddr,
    name: &str,
    rtype: RecordType,
    transport: Transport,
) -> io::Result<DnsReply> {
    let mut message = Message::query();
    message.metadata.recursion_desired = true;
    message.add_query(Query::query(fqdn(name), rtype));
    let id = message.metadata.id;
    let bytes = message.to_vec().map_err(io::Error::other)?;
    let reply = match transport {
        Transport::Udp => {
            let socket = in_netns(netns, || UdpSocket::bind("0.0.0.0:0"))?;
            socket.connect(server)?;
            socket.set_read_timeout(Some(QUERY_TIMEOUT / UDP_ATTEMPTS as u32))?;
            let mut buf = vec![0; 65_535];
            let mut reply = None;
            for _ in 0..UDP_ATTEMPTS {
                socket.send(&bytes)?;
                match restarting(|| socket.recv(&mut buf)) {
                    Ok(n) => {
                        let message = Message::from_vec(&buf[..n]).map_err(io::Error::other)?;
                        if message.metadata.id == id {
                            reply = Some(message);
                            break;
                        }
                    }
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                    Err(e) => return Err(e),
                }
            }
            reply.ok_or_else(|| {
                io::Error::new(
                    ErrorKind::TimedOut,
                    format!("no UDP reply from {server} in {netns} after {UDP_ATTEMPTS} tries"),
                )
            })?
        }
        Transport::Tcp => {
            let mut stream =
                in_netns(netns, || TcpStream::connect_timeout(&server, QUERY_TIMEOUT))?;
            stream.set_read_timeout(Some(QUERY_TIMEOUT))?;
            stream.set_write_timeout(Some(QUERY_TIMEOUT))?;
            let len = u16::try_from(bytes.len()).map_err(io::Error::other)?;
            stream.write_all(&len.to_be_bytes())?;
            stream.write_all(&bytes)?;
            let mut len = [0; 2];
            stream.read_exact(&mut len)?;
            let mut buf = vec![0; usize::from(u16::from_be_bytes(len))];
            stream.read_exact(&mut buf)?;
            Message::from_vec(&buf).map_err(io::Error::other)?
        }
    };
    if reply.metadata.id != id || reply.metadata.message_type != MessageType::Response {
        return Err(io::Error::other(format!(
            "{server} sent a reply that does not answer the query: {reply:?}"
        )));
    }
    let mut out = DnsReply {
        rcode: reply.metadata.response_code,
        authoritative: reply.metadata.authoritative,
        a: Vec::new(),
        ptr: Vec::new(),
    };
    for record in &reply.answers {
        match &record.data {
            RData::A(a) => out.a.push(a.0),
            RData::PTR(p) => out.ptr.push(plain(&p.0)),
            _ => {}
        }
    }
    Ok(out)
}

/// [`query`] to the endpoint's embedded resolver (127.0.0.11:53 in `netns`), panicking with
/// context if no reply comes.
pub fn ask(netns: &str, name: &str, rtype: RecordType, transport: Transport) -> DnsReply {
    query(netns, RESOLVER, name, rtype, transport).unwrap_or_else(|e| {
        panic!("asking the embedded resolver in {netns} for {name} {rtype} over {transport:?}: {e}")
    })
}

/// Asks `netns`'s embedded resolver for `name` until the answer is `expected`: the agent's own
/// answer with exactly those addresses, or for none NXDOMAIN (from a [`FakeUpstream`]). For
/// names that arrive from elsewhere (another host's endpoints), so not at once.
pub fn wait_resolves(netns: &str, name: &str, expected: &[Ipv4Addr]) {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let reply = ask(netns, name, RecordType::A, Transport::Udp);
        let done = if expected.is_empty() {
            reply.a.is_empty() && reply.rcode == ResponseCode::NXDomain
        } else {
            reply.rcode == ResponseCode::NoError && reply.authoritative && reply.a == expected
        };
        if done {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name} asked in {netns}: expected {expected:?} within {TIMEOUT:?}, still {reply}"
        );
        thread::sleep(POLL);
    }
}

/// A resolver standing for the world's DNS: answers A queries for its few names (any case),
/// NXDOMAIN for everything else, over UDP and TCP, and remembers every name it was asked.
pub struct FakeUpstream {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    asked: Arc<Mutex<Vec<String>>>,
    threads: Vec<JoinHandle<()>>,
}

/// Starts a [`FakeUpstream`] on `addr` (UDP and TCP) inside `netns`, knowing `records`.
pub fn fake_upstream(netns: &str, addr: SocketAddr, records: &[(&str, Ipv4Addr)]) -> FakeUpstream {
    let records: Arc<BTreeMap<String, Ipv4Addr>> = Arc::new(
        records
            .iter()
            .map(|(n, ip)| (n.trim_end_matches('.').to_ascii_lowercase(), *ip))
            .collect(),
    );
    let (udp, tcp) = in_netns(netns, || {
        let udp = UdpSocket::bind(addr)?;
        let tcp = TcpListener::bind(addr)?;
        Ok::<_, io::Error>((udp, tcp))
    })
    .unwrap_or_else(|e| panic!("binding the fake upstream resolver to {addr} in {netns}: {e}"));
    udp.set_read_timeout(Some(POLL)).expect("UDP read timeout");
    tcp.set_nonblocking(true).expect("non-blocking listener");
    let stop = Arc::new(AtomicBool::new(false));
    let asked = Arc::new(Mutex::new(Vec::new()));
    let udp_thread = {
        let (stop, asked, records) = (stop.clone(), asked.clone(), records.clone());
        thread::spawn(move || {
            let mut buf = vec![0; 65_535];
            while !stop.load(Ordering::Relaxed) {
                match restarting(|| udp.recv_from(&mut buf)) {
                    Ok((n, from)) => {
                        if let Some(reply) = upstream_answer(&buf[..n], &records, &asked) {
                            let _ = udp.send_to(&reply, from);
                        }
                    }
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                    Err(e) => panic!("fake upstream on {addr}/udp: {e}"),
                }
            }
        })
    };
    let tcp_thread = {
        let (stop, asked, records) = (stop.clone(), asked.clone(), records.clone());
        thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match restarting(|| tcp.accept()) {
                    Ok((conn, _)) => {
                        // One connection at a time is plenty for a test; a broken one is the
                        // client's business (the agent reports it as SERVFAIL).
                        let _ = serve_tcp(conn, &records, &asked);
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => thread::sleep(POLL),
                    Err(e) => panic!("fake upstream on {addr}/tcp: {e}"),
                }
            }
        })
    };
    FakeUpstream {
        addr,
        stop,
        asked,
        threads: vec![udp_thread, tcp_thread],
    }
}

fn serve_tcp(
    mut conn: TcpStream,
    records: &BTreeMap<String, Ipv4Addr>,
    asked: &Mutex<Vec<String>>,
) -> io::Result<()> {
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(QUERY_TIMEOUT))?;
    conn.set_write_timeout(Some(QUERY_TIMEOUT))?;
    loop {
        let mut len = [0; 2];
        match conn.read_exact(&mut len) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        let mut query = vec![0; usize::from(u16::from_be_bytes(len))];
        conn.read_exact(&mut query)?;
        let Some(reply) = upstream_answer(&query, records, asked) else {
            return Ok(());
        };
        let len = u16::try_from(reply.len()).map_err(io::Error::other)?;
        conn.write_all(&len.to_be_bytes())?;
        conn.write_all(&reply)?;
    }
}

fn upstream_answer(
    query: &[u8],
    records: &BTreeMap<String, Ipv4Addr>,
    asked: &Mutex<Vec<String>>,
) -> Option<Vec<u8>> {
    let query = Message::from_vec(query).ok()?;
    let question = query.queries.first()?.clone();
    let name = plain(question.name());
    asked.lock().expect("asked lock").push(name.clone());
    let mut reply = Message::response(query.metadata.id, OpCode::Query);
    reply.metadata.recursion_desired = query.metadata.recursion_desired;
    reply.metadata.recursion_available = true;
    reply.add_query(question.clone());
    match records.get(&name) {
        Some(ip) => {
            if question.query_type() == RecordType::A {
                reply.add_answer(Record::from_rdata(
                    question.name().clone(),
                    60,
                    RData::A(A(*ip)),
                ));
            }
        }
        None => reply.metadata.response_code = ResponseCode::NXDomain,
    }
    reply.to_vec().ok()
}

impl FakeUpstream {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// How many queries for `name` (any case, with or without the trailing dot) arrived.
    pub fn asked(&self, name: &str) -> usize {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        self.asked
            .lock()
            .expect("asked lock")
            .iter()
            .filter(|n| **n == name)
            .count()
    }

    /// Every name asked so far, in order.
    pub fn all_asked(&self) -> Vec<String> {
        self.asked.lock().expect("asked lock").clone()
    }
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::{OUTSIDE_IP, Topology};

    /// The fake upstream and the client agree with each other (and so with any resolver that
    /// speaks DNS), asked from a simulated host over the underlay, without an agent.
    #[test]
    fn the_fake_upstream_answers_its_names_over_udp_and_tcp() {
        let topo = Topology::new(1);
        let server = SocketAddr::V4(SocketAddrV4::new(OUTSIDE_IP, 53));
        let upstream = fake_upstream(
            topo.outside(),
            server,
            &[("known.example", Ipv4Addr::new(192, 0, 2, 1))],
        );
        let host = topo.host(1).netns();
        for transport in [Transport::Udp, Transport::Tcp] {
            let known = query(host, server, "KNOWN.example.", RecordType::A, transport)
                .unwrap_or_else(|e| panic!("asking the fake upstream over {transport:?}: {e}"));
            assert_eq!(
                (known.rcode, known.a.as_slice()),
                (ResponseCode::NoError, &[Ipv4Addr::new(192, 0, 2, 1)][..]),
                "{known}"
            );
            let unknown = query(host, server, "other.example", RecordType::A, transport)
                .unwrap_or_else(|e| panic!("asking the fake upstream over {transport:?}: {e}"));
            assert_eq!(unknown.rcode, ResponseCode::NXDomain, "{unknown}");
            assert!(unknown.a.is_empty(), "{unknown}");
        }
        assert_eq!(upstream.asked("known.example"), 2);
        assert_eq!(upstream.asked("other.example."), 2);
        assert_eq!(
            reverse_name(Ipv4Addr::new(10, 1, 2, 3)),
            "3.2.1.10.in-addr.arpa"
        );
    }
}
