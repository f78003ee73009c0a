//! The embedded DNS server: endpoint names and aliases resolve for endpoints on the same
//! user-defined network (on an overlay network, also those of the other hosts), everything else
//! is forwarded to the host's resolvers.
//!
//! Each endpoint namespace gets its own listener on 127.0.0.11:53 (UDP and TCP), opened inside
//! that namespace and served by the agent, as Docker's embedded resolver does but with no
//! iptables redirect: the socket a query arrives on tells which endpoint asked, and so which
//! networks' names it may see. Messages are parsed and built with hickory-proto.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::Duration,
};

use hickory_proto::{
    op::{Message, MessageType, OpCode, ResponseCode},
    rr::{Name, RData, Record, RecordType, rdata::A, rdata::PTR},
};
use log::{debug, warn};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream, UdpSocket},
    sync::Semaphore,
    task::JoinHandle,
};

use crate::netns;

/// Where every endpoint finds its resolver, inside its own namespace (Docker's address).
pub const RESOLVER_ADDR: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 11), 53);
/// Answers for endpoint names are as fresh as the state; a short TTL keeps caches honest.
const TTL: u32 = 10;
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(3);
/// One endpoint must not be able to starve the agent (its descriptors, its API, everyone
/// else's DNS): each listener serves at most this many TCP connections and UDP forwards at a
/// time, and a TCP connection that sends nothing for `TCP_IDLE_TIMEOUT` is closed (RFC 7766
/// asks servers to close idle connections).
const MAX_TCP_CONNECTIONS: usize = 16;
const MAX_UDP_FORWARDS: usize = 64;
const TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// After a failed accept (EMFILE and the like), wait before retrying instead of spinning.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// One endpoint interface as name resolution sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsInterface {
    pub network: String,
    pub ip: Ipv4Addr,
    pub aliases: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsEndpoint {
    pub name: String,
    pub interfaces: Vec<DnsInterface>,
}

/// Everything name resolution needs, rebuilt from the store after every change, so a removed
/// endpoint stops resolving at once.
#[derive(Debug, Clone, Default)]
pub struct DnsView {
    pub endpoints: Vec<DnsEndpoint>,
    /// Networks with name resolution (user-defined ones; not `default`, as in Docker).
    pub dns_networks: Vec<String>,
    /// Endpoints of other hosts on this host's overlay networks: they resolve like the local
    /// ones, but ask nothing here (no query arrives from them), so they widen no one's scope.
    pub remote: Vec<DnsEndpoint>,
    /// Internal networks: an endpoint on these alone may not reach past the host, so its
    /// queries for other names are refused rather than forwarded (as Docker's resolver does).
    pub internal_networks: Vec<String>,
}

/// What to do with a query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    /// Ours: these addresses (empty for a known name asked for another record type).
    Addresses(Vec<Ipv4Addr>),
    /// Ours: a PTR answer.
    Pointer(String),
    /// Not ours: ask upstream.
    Forward,
    /// Not ours, and the asker is on internal networks only: no upstream for it.
    Refused,
}

impl DnsView {
    /// Networks the asker may resolve names on.
    fn scope(&self, asker: &str) -> Vec<&str> {
        self.endpoints
            .iter()
            .filter(|e| e.name == asker)
            .flat_map(|e| e.interfaces.iter())
            .map(|i| i.network.as_str())
            .filter(|n| self.dns_networks.iter().any(|d| d == n))
            .collect()
    }

    /// What becomes of a query that is not about our names: forwarded, unless every network
    /// the asker is on is internal, or the view does not know the asker yet (an endpoint being
    /// made in a namespace that already runs, until the view catches up): refused, failing
    /// closed.
    fn not_ours(&self, asker: &str) -> Resolution {
        let known = self.endpoints.iter().any(|e| e.name == asker);
        if !known || self.confined(asker) {
            Resolution::Refused
        } else {
            Resolution::Forward
        }
    }

    /// Whether every network the asker is on is internal (and it is on one).
    fn confined(&self, asker: &str) -> bool {
        let mut networks = self
            .endpoints
            .iter()
            .filter(|e| e.name == asker)
            .flat_map(|e| e.interfaces.iter())
            .map(|i| i.network.as_str())
            .peekable();
        networks.peek().is_some() && networks.all(|n| self.internal_networks.iter().any(|i| i == n))
    }

    /// Resolves `qname` (any case, with or without the trailing dot) for endpoint `asker`.
    /// `name` and `name.network` both resolve, for names and aliases alike.
    pub fn resolve(&self, asker: &str, qname: &str, qtype: RecordType) -> Resolution {
        match self.resolve_ours(asker, qname, qtype) {
            Resolution::Forward => self.not_ours(asker),
            resolution => resolution,
        }
    }

    fn resolve_ours(&self, asker: &str, qname: &str, qtype: RecordType) -> Resolution {
        let scope = self.scope(asker);
        if scope.is_empty() {
            return Resolution::Forward;
        }
        let qname = qname.trim_end_matches('.').to_ascii_lowercase();
        if qtype == RecordType::PTR {
            return match reverse_name_to_ip(&qname) {
                Some(ip) => self
                    .endpoints
                    .iter()
                    .chain(&self.remote)
                    .find(|e| {
                        e.interfaces
                            .iter()
                            .any(|i| i.ip == ip && scope.contains(&i.network.as_str()))
                    })
                    .map(|e| Resolution::Pointer(e.name.clone()))
                    .unwrap_or(Resolution::Forward),
                None => Resolution::Forward,
            };
        }
        let mut addresses = Vec::new();
        for endpoint in self.endpoints.iter().chain(&self.remote) {
            for iface in &endpoint.interfaces {
                if !scope.contains(&iface.network.as_str()) {
                    continue;
                }
                let names = std::iter::once(&endpoint.name).chain(&iface.aliases);
                let matches = names.into_iter().any(|n| {
                    let n = n.to_ascii_lowercase();
                    qname == n || qname == format!("{n}.{}", iface.network.to_ascii_lowercase())
                });
                if matches && !addresses.contains(&iface.ip) {
                    addresses.push(iface.ip);
                }
            }
        }
        if addresses.is_empty() {
            return Resolution::Forward;
        }
        match qtype {
            RecordType::A | RecordType::ANY => Resolution::Addresses(addresses),
            // The name is ours but has no such record: an empty answer, not a forward that
            // could return someone else's data for our name.
            _ => Resolution::Addresses(Vec::new()),
        }
    }
}

/// `4.3.2.1.in-addr.arpa` -> 1.2.3.4
fn reverse_name_to_ip(name: &str) -> Option<Ipv4Addr> {
    let rest = name.strip_suffix(".in-addr.arpa")?;
    let mut octets: Vec<u8> = rest
        .split('.')
        .map(|o| o.parse().ok())
        .collect::<Option<Vec<u8>>>()?;
    if octets.len() != 4 {
        return None;
    }
    octets.reverse();
    Some(Ipv4Addr::new(octets[0], octets[1], octets[2], octets[3]))
}

/// The resolver service: the shared view, the upstreams, and one listener task set per
/// endpoint namespace.
pub struct DnsServer {
    view: Arc<RwLock<DnsView>>,
    upstreams: Arc<Vec<SocketAddr>>,
    listeners: HashMap<String, Vec<JoinHandle<()>>>,
}

impl DnsServer {
    pub fn new(upstreams: Vec<SocketAddr>) -> Self {
        Self {
            view: Arc::default(),
            upstreams: Arc::new(upstreams),
            listeners: HashMap::new(),
        }
    }

    pub fn set_view(&self, view: DnsView) {
        *self.view.write().expect("DNS view lock poisoned") = view;
    }

    /// Serves `endpoint`'s queries on 127.0.0.11:53 inside `netns`. A namespace whose port 53
    /// is taken gets no resolver; the endpoint works regardless, so this only warns.
    pub fn listen(&mut self, endpoint: &str, netns: &Path) {
        self.stop(endpoint);
        let sockets = netns::run_in(netns, || -> std::io::Result<_> {
            let udp = std::net::UdpSocket::bind(RESOLVER_ADDR)?;
            udp.set_nonblocking(true)?;
            let tcp = std::net::TcpListener::bind(RESOLVER_ADDR)?;
            tcp.set_nonblocking(true)?;
            Ok((udp, tcp))
        });
        let (udp, tcp) = match sockets {
            Ok(Ok(sockets)) => sockets,
            Ok(Err(e)) => {
                warn!(
                    "endpoint {endpoint}: no embedded DNS: binding {RESOLVER_ADDR} in {}: {e}",
                    netns.display()
                );
                return;
            }
            Err(e) => {
                warn!("endpoint {endpoint}: no embedded DNS: {e}");
                return;
            }
        };
        let (udp, tcp) = match (UdpSocket::from_std(udp), TcpListener::from_std(tcp)) {
            (Ok(udp), Ok(tcp)) => (udp, tcp),
            (Err(e), _) | (_, Err(e)) => {
                warn!("endpoint {endpoint}: no embedded DNS: {e}");
                return;
            }
        };
        let ctx = QueryContext {
            asker: endpoint.to_owned(),
            view: self.view.clone(),
            upstreams: self.upstreams.clone(),
        };
        let udp_task = tokio::spawn(serve_udp(udp, ctx.clone()));
        let tcp_task = tokio::spawn(serve_tcp(tcp, ctx));
        self.listeners
            .insert(endpoint.to_owned(), vec![udp_task, tcp_task]);
    }

    /// Closes `endpoint`'s listeners.
    pub fn stop(&mut self, endpoint: &str) {
        for task in self.listeners.remove(endpoint).unwrap_or_default() {
            task.abort();
        }
    }
}

#[derive(Clone)]
struct QueryContext {
    asker: String,
    view: Arc<RwLock<DnsView>>,
    upstreams: Arc<Vec<SocketAddr>>,
}

async fn serve_udp(socket: UdpSocket, ctx: QueryContext) {
    let socket = Arc::new(socket);
    let forwards = Arc::new(Semaphore::new(MAX_UDP_FORWARDS));
    let mut buf = vec![0u8; 4096];
    loop {
        let (len, peer) = match socket.recv_from(&mut buf).await {
            Ok(received) => received,
            Err(e) => {
                debug!("DNS for {}: {e}", ctx.asker);
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let Ok(permit) = forwards.clone().try_acquire_owned() else {
            // Too many queries in flight from this endpoint: drop this one (the client retries).
            continue;
        };
        let query = buf[..len].to_vec();
        let (socket, ctx) = (socket.clone(), ctx.clone());
        tokio::spawn(async move {
            if let Some(reply) = answer(&ctx, &query, Transport::Udp).await {
                let _ = socket.send_to(&reply, peer).await;
            }
            drop(permit);
        });
    }
}

async fn serve_tcp(listener: TcpListener, ctx: QueryContext) {
    let connections = Arc::new(Semaphore::new(MAX_TCP_CONNECTIONS));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                debug!("DNS for {}: accept: {e}", ctx.asker);
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        // Over the limit: close at once rather than queue.
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            continue;
        };
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let _ = serve_tcp_connection(stream, ctx).await;
            drop(permit);
        });
    }
}

/// DNS over TCP: each message is preceded by its length (RFC 1035 4.2.2). The connection is
/// closed when the client is idle for `TCP_IDLE_TIMEOUT`.
async fn serve_tcp_connection(mut stream: TcpStream, ctx: QueryContext) -> std::io::Result<()> {
    loop {
        let Ok(len) = tokio::time::timeout(TCP_IDLE_TIMEOUT, stream.read_u16()).await else {
            return Ok(());
        };
        let mut query = vec![0u8; usize::from(len?)];
        if tokio::time::timeout(TCP_IDLE_TIMEOUT, stream.read_exact(&mut query))
            .await
            .is_err()
        {
            return Ok(());
        }
        let Some(reply) = answer(&ctx, &query, Transport::Tcp).await else {
            return Ok(());
        };
        let Ok(reply_len) = u16::try_from(reply.len()) else {
            return Ok(());
        };
        stream.write_u16(reply_len).await?;
        stream.write_all(&reply).await?;
    }
}

#[derive(Clone, Copy)]
enum Transport {
    Udp,
    Tcp,
}

/// The reply to one query message, or None for garbage not worth answering.
async fn answer(ctx: &QueryContext, query_bytes: &[u8], transport: Transport) -> Option<Vec<u8>> {
    let query = Message::from_vec(query_bytes).ok()?;
    if query.metadata.message_type != MessageType::Query {
        return None;
    }
    let id = query.metadata.id;
    let Some(question) = query.queries.first().cloned() else {
        return Message::error_msg(id, query.metadata.op_code, ResponseCode::FormErr)
            .to_vec()
            .ok();
    };
    let resolution = if query.metadata.op_code == OpCode::Query && query.queries.len() == 1 {
        let view = ctx.view.read().expect("DNS view lock poisoned");
        view.resolve(
            &ctx.asker,
            &question.name().to_ascii(),
            question.query_type(),
        )
    } else {
        let view = ctx.view.read().expect("DNS view lock poisoned");
        view.not_ours(&ctx.asker)
    };
    let mut reply = Message::response(id, query.metadata.op_code);
    reply.metadata.recursion_desired = query.metadata.recursion_desired;
    reply.metadata.recursion_available = true;
    reply.add_query(question.clone());
    match resolution {
        Resolution::Addresses(addresses) => {
            reply.metadata.authoritative = true;
            for ip in addresses {
                reply.add_answer(Record::from_rdata(
                    question.name().clone(),
                    TTL,
                    RData::A(A(ip)),
                ));
            }
        }
        Resolution::Pointer(target) => {
            reply.metadata.authoritative = true;
            let target = Name::from_ascii(format!("{target}.")).ok()?;
            reply.add_answer(Record::from_rdata(
                question.name().clone(),
                TTL,
                RData::PTR(PTR(target)),
            ));
        }
        Resolution::Refused => {
            reply.metadata.response_code = ResponseCode::Refused;
        }
        Resolution::Forward => {
            return match forward(&ctx.upstreams, query_bytes, transport).await {
                Some(upstream_reply) => Some(upstream_reply),
                None => {
                    reply.metadata.response_code = ResponseCode::ServFail;
                    reply.to_vec().ok()
                }
            };
        }
    }
    reply.to_vec().ok()
}

/// Relays the query unchanged to the first upstream that answers in time. The forwarding
/// sockets live in the agent's namespace, so the host's own resolvers (even a loopback stub
/// such as 127.0.0.53) are reachable.
async fn forward(upstreams: &[SocketAddr], query: &[u8], transport: Transport) -> Option<Vec<u8>> {
    for upstream in upstreams {
        let attempt = async {
            match transport {
                Transport::Udp => {
                    let bind: SocketAddr = if upstream.is_ipv4() {
                        "0.0.0.0:0".parse().expect("literal")
                    } else {
                        "[::]:0".parse().expect("literal")
                    };
                    let socket = UdpSocket::bind(bind).await?;
                    socket.connect(upstream).await?;
                    socket.send(query).await?;
                    let mut buf = vec![0u8; 65_535];
                    let len = socket.recv(&mut buf).await?;
                    buf.truncate(len);
                    Ok::<_, std::io::Error>(buf)
                }
                Transport::Tcp => {
                    let mut stream = TcpStream::connect(upstream).await?;
                    let len = u16::try_from(query.len()).map_err(std::io::Error::other)?;
                    stream.write_u16(len).await?;
                    stream.write_all(query).await?;
                    let len = stream.read_u16().await?;
                    let mut buf = vec![0u8; usize::from(len)];
                    stream.read_exact(&mut buf).await?;
                    Ok(buf)
                }
            }
        };
        match tokio::time::timeout(UPSTREAM_TIMEOUT, attempt).await {
            Ok(Ok(reply)) => return Some(reply),
            Ok(Err(e)) => debug!("DNS upstream {upstream}: {e}"),
            Err(_) => debug!("DNS upstream {upstream}: no answer in {UPSTREAM_TIMEOUT:?}"),
        }
    }
    None
}

/// The nameservers of a resolv.conf, on port 53.
pub fn upstreams_from_resolv_conf(path: &Path) -> Vec<SocketAddr> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            (words.next() == Some("nameserver"))
                .then(|| words.next())
                .flatten()
        })
        .filter_map(|addr| addr.parse::<std::net::IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

/// `/etc/netns/<name>/resolv.conf`, which `ip netns exec <name>` mounts over /etc/resolv.conf.
pub fn netns_resolv_conf_dir(netns_name: &str) -> PathBuf {
    Path::new("/etc/netns").join(netns_name)
}

/// Points a named namespace's resolver at the embedded server.
pub fn write_netns_resolv_conf(netns_name: &str) -> std::io::Result<()> {
    let dir = netns_resolv_conf_dir(netns_name);
    std::fs::create_dir_all(&dir)?;
    std::fs::write(
        dir.join("resolv.conf"),
        format!(
            "# Written by net-agent: the embedded resolver of this endpoint.\nnameserver {}\noptions ndots:0\n",
            RESOLVER_ADDR.ip()
        ),
    )
}

pub fn remove_netns_resolv_conf(netns_name: &str) {
    let _ = std::fs::remove_dir_all(netns_resolv_conf_dir(netns_name));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iface(network: &str, ip: &str, aliases: &[&str]) -> DnsInterface {
        DnsInterface {
            network: network.into(),
            ip: ip.parse().unwrap(),
            aliases: aliases.iter().map(|a| (*a).to_owned()).collect(),
        }
    }

    fn view() -> DnsView {
        DnsView {
            endpoints: vec![
                DnsEndpoint {
                    name: "web".into(),
                    interfaces: vec![
                        iface("front", "10.1.0.2", &["www"]),
                        iface("back", "10.2.0.2", &["api"]),
                    ],
                },
                DnsEndpoint {
                    name: "client".into(),
                    interfaces: vec![iface("front", "10.1.0.3", &[])],
                },
                DnsEndpoint {
                    name: "db".into(),
                    interfaces: vec![iface("back", "10.2.0.3", &[])],
                },
                DnsEndpoint {
                    name: "plain".into(),
                    interfaces: vec![iface("default", "172.17.0.2", &[])],
                },
                DnsEndpoint {
                    name: "plain2".into(),
                    interfaces: vec![iface("default", "172.17.0.3", &[])],
                },
            ],
            dns_networks: vec!["front".into(), "back".into()],
            remote: Vec::new(),
            internal_networks: Vec::new(),
        }
    }

    #[test]
    fn endpoints_on_internal_networks_only_get_no_upstream() {
        let mut v = view();
        v.internal_networks = vec!["back".into()];
        // db is on back alone: its own names still resolve, nothing else goes upstream.
        assert_eq!(v.resolve("db", "web", RecordType::A), a(&["10.2.0.2"]));
        assert_eq!(v.resolve("db", "api", RecordType::A), a(&["10.2.0.2"]));
        assert_eq!(
            v.resolve("db", "example.com", RecordType::A),
            Resolution::Refused
        );
        assert_eq!(
            v.resolve("db", "4.3.2.1.in-addr.arpa", RecordType::PTR),
            Resolution::Refused
        );
        // web is also on front, which is not internal: it may reach beyond the host.
        assert_eq!(
            v.resolve("web", "example.com", RecordType::A),
            Resolution::Forward
        );
        // An asker the view does not know yet gets nothing forwarded either.
        assert_eq!(
            v.resolve("stranger", "example.com", RecordType::A),
            Resolution::Refused
        );
    }

    fn a(ips: &[&str]) -> Resolution {
        Resolution::Addresses(ips.iter().map(|i| i.parse().unwrap()).collect())
    }

    #[test]
    fn names_resolve_within_shared_networks_only() {
        let v = view();
        assert_eq!(v.resolve("client", "web", RecordType::A), a(&["10.1.0.2"]));
        assert_eq!(v.resolve("client", "WEB.", RecordType::A), a(&["10.1.0.2"]));
        assert_eq!(
            v.resolve("client", "web.front", RecordType::A),
            a(&["10.1.0.2"])
        );
        // db is only on back, which client is not on.
        assert_eq!(
            v.resolve("client", "db", RecordType::A),
            Resolution::Forward
        );
        assert_eq!(
            v.resolve("client", "web.back", RecordType::A),
            Resolution::Forward
        );
        // web is on both: it sees db, and client.
        assert_eq!(v.resolve("web", "db", RecordType::A), a(&["10.2.0.3"]));
        assert_eq!(v.resolve("db", "web", RecordType::A), a(&["10.2.0.2"]));
    }

    #[test]
    fn aliases_are_per_network() {
        let v = view();
        assert_eq!(v.resolve("client", "www", RecordType::A), a(&["10.1.0.2"]));
        assert_eq!(
            v.resolve("client", "api", RecordType::A),
            Resolution::Forward
        );
        assert_eq!(v.resolve("db", "api", RecordType::A), a(&["10.2.0.2"]));
    }

    #[test]
    fn default_network_has_no_names() {
        let v = view();
        assert_eq!(
            v.resolve("plain", "plain2", RecordType::A),
            Resolution::Forward
        );
    }

    #[test]
    fn other_types_for_our_names_are_empty_not_forwarded() {
        let v = view();
        assert_eq!(v.resolve("client", "web", RecordType::AAAA), a(&[]));
        assert_eq!(
            v.resolve("client", "example.org", RecordType::A),
            Resolution::Forward
        );
    }

    #[test]
    fn reverse_lookups() {
        let v = view();
        assert_eq!(
            v.resolve("client", "2.0.1.10.in-addr.arpa.", RecordType::PTR),
            Resolution::Pointer("web".into())
        );
        assert_eq!(
            v.resolve("client", "3.0.2.10.in-addr.arpa", RecordType::PTR),
            Resolution::Forward
        );
        assert_eq!(reverse_name_to_ip("1.2.3.in-addr.arpa"), None);
    }

    #[test]
    fn other_hosts_names_resolve_on_their_network_and_widen_no_scope() {
        let mut v = view();
        v.remote = vec![
            DnsEndpoint {
                name: "far".into(),
                interfaces: vec![iface("front", "10.1.1.2", &["faraway"])],
            },
            // A remote endpoint named like a local one: both addresses answer.
            DnsEndpoint {
                name: "web".into(),
                interfaces: vec![iface("front", "10.1.1.3", &[])],
            },
            // Named like the asker, on a network the asker is not on.
            DnsEndpoint {
                name: "client".into(),
                interfaces: vec![iface("back", "10.2.1.2", &[])],
            },
        ];
        assert_eq!(v.resolve("client", "far", RecordType::A), a(&["10.1.1.2"]));
        assert_eq!(
            v.resolve("client", "faraway.front", RecordType::A),
            a(&["10.1.1.2"])
        );
        assert_eq!(
            v.resolve("client", "web", RecordType::A),
            a(&["10.1.0.2", "10.1.1.3"])
        );
        assert_eq!(
            v.resolve("client", "2.1.1.10.in-addr.arpa", RecordType::PTR),
            Resolution::Pointer("far".into())
        );
        // The remote "client" does not put the local client on back.
        assert_eq!(
            v.resolve("client", "db", RecordType::A),
            Resolution::Forward
        );
        // Remote endpoints never ask: a query from a name only they have gets no scope (and,
        // from an asker no local endpoint is, nothing forwarded).
        assert_eq!(v.resolve("far", "web", RecordType::A), Resolution::Refused);
    }

    #[test]
    fn resolv_conf_nameservers() {
        let path = std::env::temp_dir().join(format!("net-agent-resolv-{}", std::process::id()));
        std::fs::write(
            &path,
            "# c\nsearch x\nnameserver 198.18.0.254\nnameserver ::1\nnameserver bogus\n",
        )
        .unwrap();
        let ups = upstreams_from_resolv_conf(&path);
        let _ = std::fs::remove_file(&path);
        assert_eq!(
            ups,
            vec![
                "198.18.0.254:53".parse().unwrap(),
                "[::1]:53".parse().unwrap()
            ]
        );
    }
}
