//! Links, addresses and routes, over rtnetlink.
//!
//! [`Netlink`] works in the agent's own namespace (host-side veths, host routes);
//! [`configure_endpoint`] runs inside an endpoint's namespace (address, default route, MTU).

use std::{
    fs::File,
    net::{IpAddr, Ipv4Addr},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use futures::TryStreamExt as _;
use ipnetwork::Ipv4Network;
use netlink_packet_route::{
    address::AddressAttribute,
    link::{InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkMessage},
    route::{RouteAttribute, RouteProtocol},
    rule::{RuleAction, RuleAttribute, RuleMessage},
};
use rtnetlink::{Handle, LinkMessageBuilder, LinkUnspec, LinkVeth, LinkVxlan, RouteMessageBuilder};

use crate::netns::{self, NetnsError};

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("{what}: {source}")]
    Netlink {
        what: String,
        source: rtnetlink::Error,
    },
    #[error("opening a netlink socket: {0}")]
    Socket(std::io::Error),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("link {0} not found after creating it")]
    Vanished(String),
}

type Result<T> = std::result::Result<T, LinkError>;

fn nl(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> LinkError {
    let what = what.into();
    move |source| LinkError::Netlink { what, source }
}

/// A link as the agent needs to know it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkSummary {
    pub name: String,
    pub index: u32,
    pub mtu: u32,
    /// Administratively up (`IFF_UP`).
    pub up: bool,
}

/// Everything the host side of an endpoint veth needs.
#[derive(Debug, Clone)]
pub struct VethSpec<'a> {
    pub host_ifname: &'a str,
    pub host_mac: [u8; 6],
    /// Namespace the peer is created in, named `peer_ifname` there.
    pub peer_netns: &'a Path,
    pub peer_ifname: &'a str,
    pub peer_mac: [u8; 6],
    pub mtu: u32,
}

/// Address configuration of an endpoint's interface, applied inside its namespace.
#[derive(Debug, Clone)]
pub struct EndpointAddressing {
    pub netns: PathBuf,
    pub ifname: String,
    pub ip: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: Ipv4Addr,
    /// Install the default route via the gateway (the endpoint's first interface only).
    pub default_route: bool,
}

/// rtnetlink in the namespace of the calling thread. Needs a tokio runtime.
#[derive(Clone)]
pub struct Netlink {
    handle: Handle,
}

impl Netlink {
    pub fn new() -> Result<Self> {
        let (connection, handle, _) = rtnetlink::new_connection().map_err(LinkError::Socket)?;
        tokio::spawn(connection);
        Ok(Self { handle })
    }

    pub async fn link_by_name(&self, name: &str) -> Result<Option<LinkSummary>> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_owned())
            .execute();
        match links.try_next().await {
            Ok(Some(msg)) => Ok(Some(summary(&msg))),
            Ok(None) => Ok(None),
            // The kernel answers ENODEV for a name it does not know.
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
            Err(e) => Err(nl(format!("looking up link {name}"))(e)),
        }
    }

    /// Packets link `index` has received (its 64-bit counter), or `None` if it is gone.
    pub async fn rx_packets(&self, index: u32, name: &str) -> Result<Option<u64>> {
        let mut links = self.handle.link().get().match_index(index).execute();
        match links.try_next().await {
            Ok(Some(msg)) => Ok(msg.attributes.iter().find_map(|a| match a {
                LinkAttribute::Stats64(stats) => Some(stats.rx_packets),
                _ => None,
            })),
            Ok(None) => Ok(None),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
            Err(e) => Err(nl(format!("reading the counters of link {name}"))(e)),
        }
    }

    /// Every link whose name starts with `prefix`.
    pub async fn links_with_prefix(&self, prefix: &str) -> Result<Vec<LinkSummary>> {
        let msgs: Vec<LinkMessage> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(nl("listing links"))?;
        Ok(msgs
            .iter()
            .map(summary)
            .filter(|l| l.name.starts_with(prefix))
            .collect())
    }

    /// Creates a veth pair whose peer is born inside the endpoint's namespace, with IPv6 off on
    /// the host side (the data plane is IPv4; IPv6 neighbour discovery would only be dropped).
    /// The host side stays down: the caller brings it up once its programs are attached, so no
    /// packet of the endpoint ever reaches the host stack unchecked. Returns its ifindex.
    pub async fn create_veth(&self, spec: &VethSpec<'_>) -> Result<u32> {
        let ns = netns::open(spec.peer_netns)?;
        let peer = LinkMessageBuilder::<LinkUnspec>::new()
            .name(spec.peer_ifname.to_owned())
            .address(spec.peer_mac.to_vec())
            .mtu(spec.mtu)
            .setns_by_fd(ns.as_raw_fd())
            .build();
        let message = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
            .name(spec.host_ifname.to_owned())
            .address(spec.host_mac.to_vec())
            .mtu(spec.mtu)
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
            .build();
        self.handle
            .link()
            .add(message)
            .execute()
            .await
            .map_err(nl(format!("creating veth {}", spec.host_ifname)))?;
        drop(ns);
        let link = self
            .link_by_name(spec.host_ifname)
            .await?
            .ok_or_else(|| LinkError::Vanished(spec.host_ifname.to_owned()))?;
        disable_ipv6(spec.host_ifname)?;
        Ok(link.index)
    }

    /// The host's VXLAN device in collect-metadata mode (`ip link add NAME type vxlan external
    /// dstport 4789`): one device for every overlay network and remote host, the data plane
    /// giving each packet its VTEP and VNI. Returns its ifindex; an existing one is reused.
    pub async fn ensure_vxlan(&self, name: &str, mtu: u32) -> Result<u32> {
        if let Some(link) = self.link_by_name(name).await? {
            return Ok(link.index);
        }
        let message = LinkMessageBuilder::<LinkVxlan>::new(name)
            .port(net_ebpf_common::VXLAN_PORT)
            .collect_metadata(true)
            .learning(false)
            .mtu(mtu)
            .build();
        self.handle
            .link()
            .add(message)
            .execute()
            .await
            .map_err(nl(format!("creating VXLAN device {name}")))?;
        let link = self
            .link_by_name(name)
            .await?
            .ok_or_else(|| LinkError::Vanished(name.to_owned()))?;
        disable_ipv6(name)?;
        self.set_up(link.index, name).await?;
        Ok(link.index)
    }

    /// `ip rule add from SUBNET pref 1 unreachable protocol 110`: whatever an internal
    /// network's endpoint sends (its source is in the subnet; the data plane drops any other)
    /// that is not for the host itself (the `local` table's rule, at 0, comes first) finds no
    /// route, also once the host's netfilter has rewritten its destination, out of any device,
    /// whatever `forwarding` says. One rule per network, so route lookups do not grow with its
    /// endpoints. The host's own packets to the endpoints, and its replies, come from its own
    /// addresses and do not match. Already there: fine.
    pub async fn add_unroutable_rule(&self, subnet: Ipv4Network) -> Result<()> {
        let mut request = self
            .handle
            .rule()
            .add()
            .v4()
            .source_prefix(subnet.network(), subnet.prefix())
            .priority(UNROUTABLE_RULE_PRIORITY)
            .action(RuleAction::Unreachable);
        request
            .message_mut()
            .attributes
            .push(RuleAttribute::Protocol(RouteProtocol::Other(
                UNROUTABLE_RULE_PROTOCOL,
            )));
        ignore_exists(request.execute().await)
            .map_err(nl(format!("adding the unreachable rule for {subnet}")))
    }

    /// The subnets [`Netlink::add_unroutable_rule`] made rules for (the agent's, by their
    /// protocol).
    pub async fn unroutable_rule_subnets(&self) -> Result<Vec<Ipv4Network>> {
        Ok(self
            .unroutable_rules()
            .await?
            .into_iter()
            .map(|(subnet, _)| subnet)
            .collect())
    }

    /// Removes the rule [`Netlink::add_unroutable_rule`] made for `subnet`; none is fine.
    pub async fn remove_unroutable_rule(&self, subnet: Ipv4Network) -> Result<()> {
        for (_, rule) in self
            .unroutable_rules()
            .await?
            .into_iter()
            .filter(|(s, _)| *s == subnet)
        {
            self.handle
                .rule()
                .del(rule)
                .execute()
                .await
                .map_err(nl(format!("removing the unreachable rule for {subnet}")))?;
        }
        Ok(())
    }

    /// Every IPv4 routing rule of the namespace.
    async fn rules(&self) -> Result<Vec<RuleMessage>> {
        self.handle
            .rule()
            .get(rtnetlink::IpVersion::V4)
            .execute()
            .try_collect()
            .await
            .map_err(nl("listing routing rules"))
    }

    async fn unroutable_rules(&self) -> Result<Vec<(Ipv4Network, RuleMessage)>> {
        Ok(self
            .rules()
            .await?
            .into_iter()
            .filter(|rule| {
                rule.header.action == RuleAction::Unreachable
                    && rule.attributes.iter().any(|a| {
                        matches!(a, RuleAttribute::Protocol(RouteProtocol::Other(p))
                            if *p == UNROUTABLE_RULE_PROTOCOL)
                    })
            })
            .filter_map(|rule| {
                let source = rule.attributes.iter().find_map(|a| match a {
                    RuleAttribute::Source(IpAddr::V4(addr)) => Some(*addr),
                    _ => None,
                })?;
                let subnet = Ipv4Network::new(source, rule.header.src_len).ok()?;
                Some((subnet, rule))
            })
            .collect())
    }

    pub async fn set_up(&self, index: u32, name: &str) -> Result<()> {
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(nl(format!("setting {name} up")))
    }

    /// Deletes a link; a link that is already gone is fine.
    pub async fn delete_link(&self, index: u32, name: &str) -> Result<()> {
        match self.handle.link().del(index).execute().await {
            Ok(()) => Ok(()),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(()),
            Err(e) => Err(nl(format!("deleting link {name}"))(e)),
        }
    }

    /// The first IPv4 address of the link `index`.
    pub async fn ipv4_of(&self, index: u32, name: &str) -> Result<Option<Ipv4Addr>> {
        let addresses: Vec<_> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .map_err(nl(format!("listing addresses of {name}")))?;
        Ok(addresses.iter().find_map(|msg| {
            msg.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(IpAddr::V4(ip))
                | AddressAttribute::Address(IpAddr::V4(ip)) => Some(*ip),
                _ => None,
            })
        }))
    }

    /// The link of the main table's IPv4 default route, if there is one: the uplink.
    pub async fn default_route_link(&self) -> Result<Option<LinkSummary>> {
        let routes: Vec<_> = self
            .handle
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute()
            .try_collect()
            .await
            .map_err(nl("listing routes"))?;
        let oif = routes
            .iter()
            .filter(|r| {
                r.header.destination_prefix_length == 0 && r.header.table == libc::RT_TABLE_MAIN
            })
            .find_map(|r| {
                r.attributes.iter().find_map(|a| match a {
                    RouteAttribute::Oif(index) => Some(*index),
                    _ => None,
                })
            });
        let Some(index) = oif else {
            return Ok(None);
        };
        let links: Vec<LinkMessage> = self
            .handle
            .link()
            .get()
            .match_index(index)
            .execute()
            .try_collect()
            .await
            .map_err(nl(format!("looking up link {index}")))?;
        Ok(links.first().map(summary))
    }

    /// `ip route replace <ip>/32 dev <index>`: how the host reaches an endpoint.
    pub async fn replace_host_route(&self, ip: Ipv4Addr, index: u32) -> Result<()> {
        let route = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(ip, 32)
            .output_interface(index)
            .build();
        self.handle
            .route()
            .add(route)
            .replace()
            .execute()
            .await
            .map_err(nl(format!("adding host route to {ip}")))
    }
}

fn summary(msg: &LinkMessage) -> LinkSummary {
    let name = msg
        .attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::IfName(name) => Some(name.clone()),
            _ => None,
        })
        .unwrap_or_default();
    let mtu = msg
        .attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::Mtu(mtu) => Some(*mtu),
            _ => None,
        })
        .unwrap_or(0);
    LinkSummary {
        name,
        index: msg.header.index,
        mtu,
        up: msg.header.flags.contains(LinkFlags::Up),
    }
}

/// Makes the host stack drop source-routed IPv4 packets that arrive on `ifname` (an endpoint's
/// host veth), whatever `net.ipv4.conf.all.accept_source_route` says: the kernel honours the
/// option only if both that and the device's own setting allow it, and a packet an endpoint sends
/// to a host address goes to the host stack, which would otherwise forward it on to the route's
/// next address, past network isolation and `--no-icc`.
pub fn refuse_source_routes(ifname: &str) -> Result<()> {
    write_sysctl(
        &format!("/proc/sys/net/ipv4/conf/{ifname}/accept_source_route"),
        "0",
    )
}

/// Makes the host stack forward nothing that arrives on `ifname` (the host veth of an internal
/// network's endpoint), not even a packet the host's own netfilter rewrote to another
/// destination after the data plane let it through to a host address (a Docker or kube-proxy
/// DNAT): the kernel checks the device's `forwarding` after PREROUTING, and `bc_forwarding`
/// (directed broadcasts) needs it too. Turning `ip_forward` or `all.forwarding` on later turns
/// every device's on; the agent looks every second and turns it off again.
pub fn refuse_forwarding(ifname: &str) -> Result<()> {
    write_sysctl(&format!("/proc/sys/net/ipv4/conf/{ifname}/forwarding"), "0")?;
    write_sysctl(
        &format!("/proc/sys/net/ipv4/conf/{ifname}/bc_forwarding"),
        "0",
    )
}

/// Whether the host stack forwards what arrives on `ifname` (see [`refuse_forwarding`]).
pub fn forwarding_on(ifname: &str) -> Result<bool> {
    let path = format!("/proc/sys/net/ipv4/conf/{ifname}/forwarding");
    let value = std::fs::read_to_string(&path).map_err(|source| LinkError::Io {
        what: format!("reading {path}"),
        source,
    })?;
    Ok(value.trim() != "0")
}

/// Writes `value` to the `/proc/sys` file `path` (of the calling thread's namespace).
fn write_sysctl(path: &str, value: &str) -> Result<()> {
    std::fs::write(path, value).map_err(|source| LinkError::Io {
        what: format!("writing {path}"),
        source,
    })
}

/// Turns IPv6 off on one interface of the calling thread's namespace (`/proc/sys/net` follows
/// the namespace of the thread that opens it). A kernel without IPv6 has nothing to turn off.
fn disable_ipv6(ifname: &str) -> Result<()> {
    if !Path::new("/proc/sys/net/ipv6").exists() {
        return Ok(());
    }
    write_sysctl(
        &format!("/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6"),
        "1",
    )
}

/// Runs `work` with a netlink handle inside the namespace at `netns`, on a thread of its own
/// (see [`netns::run_in`]) with a runtime of its own.
fn in_netns<T, F, Fut>(netns: &Path, work: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce(Netlink) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<T>>,
{
    netns::run_in(netns, move || -> Result<T> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|source| LinkError::Io {
                what: "starting a runtime inside the endpoint namespace".into(),
                source,
            })?;
        runtime.block_on(async move { work(Netlink::new()?).await })
    })?
}

async fn loopback_up(netlink: &Netlink) -> Result<()> {
    if let Some(lo) = netlink.link_by_name("lo").await? {
        netlink.set_up(lo.index, "lo").await?;
    }
    Ok(())
}

/// Brings loopback up inside a namespace (all a `none`-mode endpoint gets).
pub fn bring_up_loopback(netns: &Path) -> Result<()> {
    in_netns(netns, |netlink| async move { loopback_up(&netlink).await })
}

/// Configures one endpoint interface inside its namespace: loopback up, IPv6 off on the
/// interface, the address with the network's prefix, the interface up, and (for the first
/// interface) the default route via the gateway. Idempotent (used again when the agent rebuilds
/// an endpoint on start).
pub fn configure_endpoint(addressing: &EndpointAddressing) -> Result<()> {
    let addressing = addressing.clone();
    let netns = addressing.netns.clone();
    in_netns(&netns, move |netlink| async move {
        loopback_up(&netlink).await?;
        configure_endpoint_here(&netlink, &addressing).await
    })
}

/// Priority of the rule that consults the main table (without its default route) before the
/// per-address tables.
const MAIN_FIRST_PRIORITY: u32 = 99;

/// Rules are not replaceable: one that is already there (a rebuild after a restart) is fine.
fn ignore_exists(
    result: std::result::Result<(), rtnetlink::Error>,
) -> std::result::Result<(), rtnetlink::Error> {
    match result {
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EEXIST => Ok(()),
        other => other,
    }
}

/// Priority of the rules that leave an internal network no route beyond the host: right after
/// the `local` table's (0), so that no other rule routes its packets anywhere.
pub const UNROUTABLE_RULE_PRIORITY: u32 = 1;
/// The `protocol` the agent's unreachable rules carry (`ip rule show` prints it as 110), so
/// that the agent knows its own from anyone else's.
pub const UNROUTABLE_RULE_PROTOCOL: u8 = 110;

/// Routing table (and rule priority) for the addresses of interface `ethN`: 100 + N. Each
/// interface's own address routes through its own table, so a reply from a second interface's
/// address leaves through that interface (the data plane drops a source address arriving on
/// another interface as spoofed).
fn source_table(ifname: &str) -> u32 {
    100 + ifname.trim_start_matches("eth").parse::<u32>().unwrap_or(0)
}

async fn configure_endpoint_here(netlink: &Netlink, a: &EndpointAddressing) -> Result<()> {
    let link = netlink
        .link_by_name(&a.ifname)
        .await?
        .ok_or_else(|| LinkError::Vanished(a.ifname.clone()))?;
    disable_ipv6(&a.ifname)?;
    netlink
        .handle
        .address()
        .add(link.index, IpAddr::V4(a.ip), a.prefix_len)
        .replace()
        .execute()
        .await
        .map_err(nl(format!(
            "adding {}/{} to {}",
            a.ip, a.prefix_len, a.ifname
        )))?;
    netlink.set_up(link.index, &a.ifname).await?;
    // Source routing: from this address, via this interface's gateway.
    let table = source_table(&a.ifname);
    netlink
        .handle
        .route()
        .add(
            RouteMessageBuilder::<Ipv4Addr>::new()
                .gateway(a.gateway)
                .output_interface(link.index)
                .table_id(table)
                .build(),
        )
        .replace()
        .execute()
        .await
        .map_err(nl(format!("adding the default route of table {table}")))?;
    // Connected routes of the main table first (suppress_prefixlength 0 skips only its default
    // route, as wg-quick does), then each address's own table for everything else.
    let mut main_first = netlink
        .handle
        .rule()
        .add()
        .v4()
        .table_id(libc::RT_TABLE_MAIN as u32)
        .priority(MAIN_FIRST_PRIORITY)
        .action(RuleAction::ToTable);
    main_first
        .message_mut()
        .attributes
        .push(RuleAttribute::SuppressPrefixLen(0));
    ignore_exists(main_first.execute().await)
        .map_err(nl("adding the main-table rule for source routing"))?;
    let source_rule = netlink
        .handle
        .rule()
        .add()
        .v4()
        .source_prefix(a.ip, 32)
        .table_id(table)
        .priority(table)
        .action(RuleAction::ToTable)
        .execute()
        .await;
    ignore_exists(source_rule).map_err(nl(format!("adding the source rule for {}", a.ip)))?;
    if a.default_route {
        netlink.replace_default_route(link.index, a.gateway).await?;
    }
    Ok(())
}

impl Netlink {
    /// `ip route replace default via <gateway> dev <index>` in the main table.
    async fn replace_default_route(&self, index: u32, gateway: Ipv4Addr) -> Result<()> {
        self.handle
            .route()
            .add(
                RouteMessageBuilder::<Ipv4Addr>::new()
                    .gateway(gateway)
                    .output_interface(index)
                    .build(),
            )
            .replace()
            .execute()
            .await
            .map_err(nl(format!("adding default route via {gateway}")))
    }
}

/// Whether `ifname` in the namespace at `netns` carries `ip`: the endpoint's side of a veth
/// has been configured.
pub fn has_ipv4(netns: &Path, ifname: &str, ip: Ipv4Addr) -> Result<bool> {
    let ifname = ifname.to_owned();
    in_netns(netns, move |netlink| async move {
        Ok(match netlink.link_by_name(&ifname).await? {
            Some(link) => netlink.ipv4_of(link.index, &ifname).await? == Some(ip),
            None => false,
        })
    })
}

/// Moves an endpoint's default route to `ifname` (its new first interface).
pub fn set_default_route(netns: &Path, ifname: &str, gateway: Ipv4Addr) -> Result<()> {
    let ifname = ifname.to_owned();
    in_netns(netns, move |netlink| async move {
        let link = netlink
            .link_by_name(&ifname)
            .await?
            .ok_or_else(|| LinkError::Vanished(ifname.clone()))?;
        netlink.replace_default_route(link.index, gateway).await
    })
}

/// Removes the source rule of an interface that is going away (its table's routes go with the
/// interface; the rule would stay).
pub fn remove_source_rule(netns: &Path, ifname: &str) -> Result<()> {
    let table = source_table(ifname);
    in_netns(netns, move |netlink| async move {
        for rule in netlink.rules().await? {
            let ours = rule
                .attributes
                .iter()
                .any(|a| matches!(a, RuleAttribute::Priority(p) if *p == table));
            if ours {
                netlink
                    .handle
                    .rule()
                    .del(rule)
                    .execute()
                    .await
                    .map_err(nl(format!("removing the source rule of table {table}")))?;
            }
        }
        Ok(())
    })
}

/// Opens `path` to check it is a network namespace (for `--netns` adoption).
pub fn check_netns(path: &Path) -> Result<File> {
    Ok(netns::open(path)?)
}

/// Whether the namespace at `netns` already has an interface called `ifname` (checked before
/// adopting a namespace, so the user hears about the clash rather than a netlink EEXIST).
pub fn interface_exists(netns: &Path, ifname: &str) -> Result<bool> {
    let ifname = ifname.to_owned();
    in_netns(netns, move |netlink| async move {
        Ok(netlink.link_by_name(&ifname).await?.is_some())
    })
}

/// Lets the host forward between its uplink and the endpoints (`net.ipv4.ip_forward`), in the
/// calling thread's namespace, as Docker does when it masquerades.
pub fn enable_ip_forwarding() -> Result<()> {
    write_sysctl("/proc/sys/net/ipv4/ip_forward", "1")
}

/// Lets the loopback take the replies the data plane hands it for the host's own connections
/// to published ports. They arrive without having been routed, with one of the host's
/// addresses as their source (martians without `accept_local`), or with a loopback source when
/// the host connected to 127.0.0.1 (martians without `route_localnet`). Both are set on the
/// loopback only, where nothing but the host itself sends.
pub fn accept_replies_on_loopback() -> Result<()> {
    for setting in ["accept_local", "route_localnet"] {
        write_sysctl(&format!("/proc/sys/net/ipv4/conf/lo/{setting}"), "1")?;
    }
    Ok(())
}
