//! The agent's operations on networks and endpoints.
//!
//! The store is the source of truth. A change is validated completely before anything is made.
//! New plumbing is first recorded as pending, then made (namespace, veth, addresses, routes,
//! programs, map entry), then recorded for good in the transaction that clears the pending
//! record; any failure on the way undoes what was made. Removal forgets and records as pending
//! in one transaction, then tears down. So whatever a crash interrupts is in the pending table,
//! and [`Agent::start`] tears exactly that down; it then makes the kernel match the recorded
//! endpoints, rebuilding missing plumbing, while pinned links and maps keep existing flows
//! running throughout.

mod nat_rules;
mod overlay;
mod ports;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
};

use log::{debug, info, warn};
use net_ebpf_common::{ENDPOINT_F_MASQUERADE, ENDPOINT_F_PUBLISHED, EndpointInfo, nat_stat};

use crate::{
    api::{self, DEFAULT_NETWORK, format_mac},
    conntrack,
    datapath::{Datapath, DatapathError, LoadSettings},
    dns::{self, DnsEndpoint, DnsInterface, DnsServer, DnsView},
    ipam::{self, IpamError, Pool},
    link::{self, EndpointAddressing, LinkError, Netlink, VethSpec},
    netns::{self, NetnsError},
    store::{
        Change, EndpointRecord, InterfaceRecord, Mode, NetworkRecord, PublishedRecord, Store,
        StoreError, Transaction,
    },
};

pub const DEFAULT_MTU: u32 = 1500;
/// The loopback's ifindex, the same in every network namespace.
const LOOPBACK_IFINDEX: u32 = 1;
/// Longest `--name-prefix`: host veths are `<prefix><id>` and must fit IFNAMSIZ (15).
pub const MAX_PREFIX_LEN: usize = 8;

#[derive(Debug, Clone)]
pub struct Config {
    pub state_dir: PathBuf,
    pub bpffs_dir: PathBuf,
    pub socket: PathBuf,
    pub name_prefix: String,
    /// Subnet of the `default` network made on first start.
    pub default_subnet: String,
    /// Where the embedded DNS forwards names it does not own.
    pub dns_upstreams: Vec<SocketAddr>,
    /// The host's uplink, where masquerade happens; `None`: the interface of the default
    /// route, if any (without one, NAT is off).
    pub uplink: Option<String>,
    /// Source ports for masqueraded flows, inclusive.
    pub nat_ports: (u16, u16),
    pub conntrack_entries: u32,
    pub conntrack_timeouts: conntrack::Timeouts,
    /// The cluster store: `embedded` (files in `cluster_dir`) or `etcd://ADDR[,ADDR...]`.
    pub store: String,
    /// Where the embedded cluster store keeps its files; agents sharing it share a cluster.
    pub cluster_dir: PathBuf,
    /// This host's name in the cluster: its leases are found by it after a restart.
    pub host_name: String,
    /// How long a subnet lease lasts unless renewed.
    pub lease_ttl: std::time::Duration,
}

impl Config {
    pub fn check(&self) -> Result<()> {
        let p = &self.name_prefix;
        if p.is_empty()
            || p.len() > MAX_PREFIX_LEN
            || !p
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        {
            return Err(AgentError::Invalid(format!(
                "invalid --name-prefix {p:?}: use 1-{MAX_PREFIX_LEN} characters a-z, 0-9"
            )));
        }
        ipam::parse_subnet(&self.default_subnet)?;
        let (min, max) = self.nat_ports;
        if min == 0 || min > max {
            return Err(AgentError::Invalid(format!(
                "invalid NAT port range {min}-{max}: expected MIN-MAX with 1 <= MIN <= MAX"
            )));
        }
        if self.conntrack_entries < 2 {
            return Err(AgentError::Invalid(format!(
                "invalid conntrack capacity {}: a flow takes two entries",
                self.conntrack_entries
            )));
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{0}")]
    Invalid(String),
    #[error("{kind} {name} not found")]
    NotFound { kind: &'static str, name: String },
    #[error("{kind} {name} already exists")]
    Exists { kind: &'static str, name: String },
    #[error("{0}")]
    InUse(String),
    #[error(transparent)]
    Ipam(#[from] IpamError),
    #[error("cluster store: {0}")]
    Cluster(crate::cluster::ClusterError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error(transparent)]
    HostSockets(#[from] crate::sock_diag::SockDiagError),
}

type Result<T> = std::result::Result<T, AgentError>;

/// What `endpoint create` asks for, validated.
#[derive(Debug, Clone, Default)]
pub struct EndpointSpec<'a> {
    pub name: &'a str,
    /// `bridge` (default), `none`, `host`, `container:<endpoint>`.
    pub mode: Option<&'a str>,
    pub network: Option<&'a str>,
    pub ip: Option<&'a str>,
    pub netns: Option<&'a str>,
    pub aliases: &'a [String],
    pub publish: &'a [api::PortSpec],
    pub allow: &'a [String],
}

/// What `network create` may set on a bridge network; `None` takes the default.
#[derive(Debug, Clone, Default)]
pub struct BridgeOptions<'a> {
    /// Default: the subnet's first host.
    pub gateway: Option<&'a str>,
    pub mtu: Option<u32>,
    /// Default: yes (no for an internal network, which refuses yes).
    pub masquerade: Option<bool>,
    /// Endpoints may talk to each other; default: yes.
    pub icc: Option<bool>,
    /// Endpoints reach each other and the host, nothing beyond; default: no.
    pub internal: Option<bool>,
}

pub struct Agent {
    config: Config,
    store: Store,
    datapath: Datapath,
    netlink: Netlink,
    dns: DnsServer,
    /// The uplink and its address when masquerade is on.
    nat: Option<Uplink>,
    /// ifindex of each host veth by name, learnt when plumbing or on start (not stored: the
    /// kernel assigns it, and a rebuilt veth gets a new one).
    host_ifindex: HashMap<String, u32>,
    /// Host veths of internal networks' endpoints, whose `forwarding` the agent keeps off (see
    /// [`Agent::keep_internal_veths_unforwarded`]).
    internal_veths: BTreeSet<String>,
    /// Endpoint addresses that published ports go to (their map entries carry
    /// `ENDPOINT_F_PUBLISHED`); derived from the store.
    published_ips: HashSet<Ipv4Addr>,
    /// The cluster store, for overlay networks.
    cluster: Option<std::sync::Arc<dyn crate::cluster::ClusterStore>>,
    /// This host's lease on each overlay network, by network name.
    leases: HashMap<String, crate::cluster::Lease>,
    /// The names other hosts publish on the overlay networks, as far as they are trusted
    /// (`overlay::trusted_names`): resolved by the embedded DNS beside the local endpoints.
    remote_names: Vec<crate::cluster::HostNames>,
    /// Wakes the background cluster sync before its next tick: the local names changed (the
    /// other hosts should learn them at once), or a view it fetched was dropped as stale.
    sync_wanted: std::sync::Arc<tokio::sync::Notify>,
    /// Counts the cluster views applied. A view fetched without holding the agent is applied
    /// only if none was applied since its plan was taken: otherwise it may predate a change a
    /// request made and synced meanwhile (a network it just defined would look removed).
    cluster_generation: u64,
    /// The VXLAN device, once an overlay network needs it.
    vxlan_ifindex: Option<u32>,
    /// Host ports this agent reserved in `net.ipv4.ip_local_reserved_ports`.
    reserved_ports: crate::publish::PortSet,
}

impl Agent {
    /// Opens the store and the data plane, then reconciles the kernel with the store.
    pub async fn start(config: Config) -> Result<Self> {
        config.check()?;
        let store = Store::open(&config.state_dir)?;
        let netlink = Netlink::new()?;
        let nat = find_uplink(&netlink, config.uplink.as_deref()).await?;
        let settings = LoadSettings {
            host_ipv4: nat.as_ref().map(|u| u.ip),
            uplink_ifindex: nat.as_ref().map(|u| u.index),
            nat_ports: config.nat_ports,
            conntrack_entries: config.conntrack_entries,
        };
        let mut datapath = Datapath::open(&config.bpffs_dir, &settings)?;
        // An uplink this agent masqueraded on before, but no longer: detach it.
        for old in datapath.pinned_uplinks()? {
            if nat.as_ref().is_none_or(|u| u.name != old) {
                warn!("masquerade moves away from {old}");
                datapath.detach_uplink(&old)?;
            }
        }
        let capacity = datapath.maps().conntrack_capacity;
        if capacity != config.conntrack_entries {
            warn!(
                "the pinned conntrack table holds {capacity} entries, not --conntrack-entries {}: \
                 a pinned table keeps its size (remove {} to resize, which forgets every flow)",
                config.conntrack_entries,
                datapath
                    .pins()
                    .map(net_ebpf_common::map_names::CONNTRACK)
                    .display()
            );
        }
        match &nat {
            Some(Uplink {
                name: uplink, ip, ..
            }) => {
                datapath.attach_uplink(uplink)?;
                link::enable_ip_forwarding()?;
                info!("masquerading through {uplink} as {ip}");
            }
            None => info!("no uplink (no --uplink and no default route): masquerade is off"),
        }
        // The host's own connections to published ports arrive on its loopback.
        datapath.attach_loopback()?;
        link::accept_replies_on_loopback()?;
        let dns = DnsServer::new(config.dns_upstreams.clone());
        let cluster: Option<std::sync::Arc<dyn crate::cluster::ClusterStore>> = Some(
            crate::cluster::open(&config.store, &config.cluster_dir)
                .map_err(AgentError::Cluster)?
                .into(),
        );
        let mut agent = Self {
            config,
            store,
            datapath,
            netlink,
            dns,
            nat,
            host_ifindex: HashMap::new(),
            internal_veths: BTreeSet::new(),
            published_ips: HashSet::new(),
            reserved_ports: crate::publish::PortSet::default(),
            cluster,
            leases: HashMap::new(),
            remote_names: Vec::new(),
            sync_wanted: std::sync::Arc::default(),
            cluster_generation: 0,
            vxlan_ifindex: None,
        };
        agent.ensure_default_network().await?;
        // Before `reconcile` starts the endpoints' resolvers: they must know from their first
        // query who asks (an endpoint on internal networks only may not be forwarded).
        agent.rebuild_dns_view()?;
        agent.reconcile().await?;
        // Without the store the overlay keeps its pinned routes; the sync loop catches up.
        if let Err(e) = agent.cluster_sync().await {
            warn!("overlay: {e}; keeping the routes in place and retrying");
        }
        Ok(agent)
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    fn netns_name(&self, endpoint: &str) -> String {
        format!("{}-{endpoint}", self.config.name_prefix)
    }

    fn network(&self, name: &str) -> Result<NetworkRecord> {
        self.store
            .network(name)?
            .ok_or_else(|| AgentError::NotFound {
                kind: "network",
                name: name.to_owned(),
            })
    }

    fn networks(&self) -> Result<BTreeMap<String, NetworkRecord>> {
        Ok(self
            .store
            .networks()?
            .into_iter()
            .map(|n| (n.name.clone(), n))
            .collect())
    }

    fn endpoint(&self, name: &str) -> Result<EndpointRecord> {
        self.store
            .endpoint(name)?
            .ok_or_else(|| AgentError::NotFound {
                kind: "endpoint",
                name: name.to_owned(),
            })
    }

    // ---- networks ----

    /// The `default` network, as Docker's `bridge`: made on first start, never removed.
    async fn ensure_default_network(&mut self) -> Result<()> {
        if self
            .store
            .networks()?
            .iter()
            .any(|n| n.name == DEFAULT_NETWORK)
        {
            return Ok(());
        }
        let subnet = self.config.default_subnet.clone();
        self.network_create(DEFAULT_NETWORK, &subnet, &BridgeOptions::default())
            .await?;
        Ok(())
    }

    pub async fn network_create(
        &mut self,
        name: &str,
        subnet: &str,
        options: &BridgeOptions<'_>,
    ) -> Result<api::Network> {
        ipam::check_name("network", name).map_err(AgentError::Invalid)?;
        let subnet = ipam::parse_subnet(subnet)?;
        let gateway = options
            .gateway
            .map(|g| ipam::parse_addr(g, "--gateway"))
            .transpose()?;
        let gateway = ipam::choose_gateway(subnet, gateway)?;
        let mtu = options.mtu.unwrap_or(DEFAULT_MTU);
        ipam::check_mtu(mtu).map_err(AgentError::Invalid)?;
        let internal = options.internal.unwrap_or(false);
        if internal && options.masquerade == Some(true) {
            return Err(AgentError::Invalid(
                "an internal network does not masquerade: nothing of it leaves the host".into(),
            ));
        }
        let networks = self.store.networks()?;
        if networks.iter().any(|n| n.name == name) {
            return Err(AgentError::Exists {
                kind: "network",
                name: name.to_owned(),
            });
        }
        if let Some((other, other_subnet)) =
            ipam::overlapping(subnet, networks.iter().map(|n| (n.name.as_str(), n.subnet)))
        {
            return Err(AgentError::Invalid(format!(
                "subnet {subnet} overlaps subnet {other_subnet} of network {other}"
            )));
        }
        // The id and the record in one commit.
        let txn = self.store.begin()?;
        let record = NetworkRecord {
            name: name.to_owned(),
            id: txn.next_id("network")?,
            subnet,
            gateway,
            mtu,
            masquerade: !internal && options.masquerade.unwrap_or(true),
            icc: options.icc.unwrap_or(true),
            internal,
            overlay: None,
        };
        txn.apply(&[Change::PutNetwork(&record)])?;
        // The rule before the record: a network the store has is never without it.
        if internal {
            self.netlink.add_unroutable_rule(subnet).await?;
        }
        if let Err(err) = txn.commit() {
            if internal && let Err(rule_err) = self.netlink.remove_unroutable_rule(subnet).await {
                warn!("network {name}: {rule_err}");
            }
            return Err(err.into());
        }
        info!("network {name} created: {subnet} gateway {gateway} mtu {mtu}");
        Ok(network_view(&record, Vec::new()))
    }

    pub fn network_list(&self) -> Result<Vec<api::Network>> {
        let endpoints = self.store.endpoints()?;
        Ok(self
            .store
            .networks()?
            .iter()
            .map(|n| api::Network {
                remote_endpoints: self.remote_endpoints(&n.name),
                ..network_view(n, endpoints_on(&endpoints, &n.name))
            })
            .collect())
    }

    pub fn network_inspect(&self, name: &str) -> Result<api::Network> {
        let network = self.network(name)?;
        let endpoints = self.store.endpoints()?;
        Ok(api::Network {
            remote_endpoints: self.remote_endpoints(name),
            ..network_view(&network, endpoints_on(&endpoints, name))
        })
    }

    /// The other hosts' endpoints on overlay network `network` that the DNS resolves.
    fn remote_endpoints(&self, network: &str) -> Vec<api::RemoteEndpoint> {
        self.remote_names
            .iter()
            .filter(|r| r.network == network)
            .flat_map(|r| {
                r.names.iter().map(|n| api::RemoteEndpoint {
                    name: n.name.clone(),
                    ip: n.ip,
                    aliases: n.aliases.clone(),
                    host: r.host.clone(),
                })
            })
            .collect()
    }

    pub async fn network_remove(&mut self, name: &str) -> Result<()> {
        let network = self.network(name)?;
        if name == DEFAULT_NETWORK {
            return Err(AgentError::InUse(format!(
                "{DEFAULT_NETWORK} is a pre-defined network and cannot be removed"
            )));
        }
        let attached = endpoints_on(&self.store.endpoints()?, name);
        if !attached.is_empty() {
            return Err(AgentError::InUse(format!(
                "network {name} has endpoints attached ({}); remove or disconnect them first",
                attached.join(", ")
            )));
        }
        if network.overlay.is_some() {
            return self.overlay_remove(name).await;
        }
        self.store.apply(&[Change::DeleteNetwork(name)])?;
        if network.internal
            && let Err(err) = self.netlink.remove_unroutable_rule(network.subnet).await
        {
            // The next start sweeps it.
            warn!("network {name}: {err}");
        }
        info!("network {name} removed");
        Ok(())
    }

    // ---- endpoints ----

    pub async fn endpoint_create(&mut self, spec: EndpointSpec<'_>) -> Result<api::Endpoint> {
        let name = spec.name;
        ipam::check_name("endpoint", name).map_err(AgentError::Invalid)?;
        for alias in spec.aliases {
            ipam::check_name("alias", alias).map_err(AgentError::Invalid)?;
        }
        let endpoints = self.store.endpoints()?;
        if endpoints.iter().any(|e| e.name == name) {
            return Err(AgentError::Exists {
                kind: "endpoint",
                name: name.to_owned(),
            });
        }
        let mode = parse_mode(spec.mode.unwrap_or("bridge"))?;
        let wants_interface = mode == Mode::Bridge;
        if !wants_interface {
            let mode_name = mode_name(&mode);
            for (flag, given) in [
                ("--network", spec.network.is_some()),
                ("--ip", spec.ip.is_some()),
                ("--alias", !spec.aliases.is_empty()),
            ] {
                if given {
                    return Err(AgentError::Invalid(format!(
                        "{flag} does not apply to network mode {mode_name}"
                    )));
                }
            }
        }
        if spec.netns.is_some() && matches!(mode, Mode::Host | Mode::Container { .. }) {
            return Err(AgentError::Invalid(format!(
                "--netns does not apply to network mode {}",
                mode_name(&mode)
            )));
        }

        let (netns_path, netns_owned) = match &mode {
            Mode::Host => (String::new(), false),
            Mode::Container { owner } => {
                let owner = endpoints.iter().find(|e| &e.name == owner).ok_or_else(|| {
                    AgentError::NotFound {
                        kind: "container",
                        name: owner.clone(),
                    }
                })?;
                match &owner.mode {
                    Mode::Host => {
                        return Err(AgentError::Invalid(format!(
                            "endpoint {} uses the host's network stack; use --net host instead",
                            owner.name
                        )));
                    }
                    Mode::Container { owner: root } => {
                        return Err(AgentError::Invalid(format!(
                            "endpoint {} itself shares the namespace of {root}; join {root} instead",
                            owner.name
                        )));
                    }
                    Mode::Bridge | Mode::None => (owner.netns.clone(), false),
                }
            }
            Mode::Bridge | Mode::None => match spec.netns {
                Some(path) => {
                    let path = Path::new(path);
                    link::check_netns(path).map_err(|e| {
                        AgentError::Invalid(format!("--netns {}: {e}", path.display()))
                    })?;
                    let path_text = path.to_string_lossy().into_owned();
                    if let Some(user) = endpoints.iter().find(|e| e.netns == path_text) {
                        return Err(AgentError::InUse(format!(
                            "network namespace {path_text} is already used by endpoint {}",
                            user.name
                        )));
                    }
                    // A bridge endpoint's first interface is eth0; say so if it is taken,
                    // rather than surface netlink's EEXIST naming the host veth.
                    if mode == Mode::Bridge {
                        let owned = path.to_owned();
                        let clash = tokio::task::spawn_blocking(move || {
                            link::interface_exists(&owned, "eth0")
                        })
                        .await
                        .expect("namespace inspection thread panicked")?;
                        if clash {
                            return Err(AgentError::InUse(format!(
                                "network namespace {path_text} already has an interface eth0"
                            )));
                        }
                    }
                    (path_text, false)
                }
                None => {
                    let path = netns::path_of(&self.netns_name(name));
                    if path.exists() {
                        return Err(AgentError::Exists {
                            kind: "network namespace",
                            name: path.display().to_string(),
                        });
                    }
                    (path.to_string_lossy().into_owned(), true)
                }
            },
        };

        // Every id the endpoint takes (its own, its interface's, its ports') is taken in the
        // transaction that records it as pending: a request refused on the way takes none.
        let txn = self.store.begin()?;
        let interfaces = if wants_interface {
            let network = spec.network.unwrap_or(DEFAULT_NETWORK);
            let net = self.network(network)?;
            vec![self.new_interface(&txn, &endpoints, &net, &[], spec.ip, spec.aliases)?]
        } else {
            Vec::new()
        };
        let record = EndpointRecord {
            name: name.to_owned(),
            id: txn.next_id("endpoint")?,
            mode,
            netns: netns_path,
            netns_owned,
            interfaces,
        };
        let mut published = self.plan_publish(
            &record,
            spec.publish,
            spec.allow,
            &ports::PlannedSides::new(),
            &crate::publish::HostSockets::read()?,
        )?;

        // The ports are recorded with the pending endpoint (their ids with them): a crash
        // before it is recorded for good tears both down.
        ports::number_published(&txn, &mut published)?;
        let port_records = ports::port_records(name, &published);
        let mut changes = vec![Change::PutPending(&record)];
        changes.extend(port_records.iter().map(Change::PutPort));
        txn.apply(&changes)?;
        txn.commit()?;
        self.published_ips.extend(published.iter().map(|p| p.ip));
        let made = match self.plumb_endpoint(&record).await {
            Ok(()) => self
                .install_published(&published)
                .and_then(|()| self.update_reserved_ports(&published, &[]))
                .and_then(|()| {
                    self.store
                        .apply(&[Change::DeletePending(name), Change::PutEndpoint(&record)])
                        .map_err(AgentError::from)
                }),
            Err(e) => Err(e),
        };
        if let Err(e) = made {
            self.unplumb_endpoint(&record, &published).await;
            self.store.apply(&[
                Change::DeletePending(name),
                Change::DeletePortsTo(&record.addresses()),
            ])?;
            self.forget_published(&published)?;
            return Err(e);
        }
        self.refresh_dns()?;
        info!("endpoint {name} created ({})", mode_name(&record.mode));
        self.endpoint_view(&record)
    }

    /// A new interface record on `net` for an endpoint that has `existing` interfaces; its id
    /// (which names the host veth) is taken in `txn`.
    fn new_interface(
        &self,
        txn: &Transaction,
        endpoints: &[EndpointRecord],
        net: &NetworkRecord,
        existing: &[InterfaceRecord],
        ip: Option<&str>,
        aliases: &[String],
    ) -> Result<InterfaceRecord> {
        let requested = ip.map(|ip| ipam::parse_addr(ip, "--ip")).transpose()?;
        let used: Vec<(Ipv4Addr, String)> = endpoints
            .iter()
            .flat_map(|e| {
                e.interfaces
                    .iter()
                    .filter(|i| i.network == net.name)
                    .map(|i| (i.ip, e.name.clone()))
            })
            .collect();
        let ip = Pool {
            network: &net.name,
            subnet: net.subnet,
            gateway: net.gateway,
            used: &used,
        }
        .allocate(requested)?;
        let ifname = (0..)
            .map(|n| format!("eth{n}"))
            .find(|candidate| existing.iter().all(|i| &i.ifname != candidate))
            .expect("an unused ethN exists");
        let host_ifname = format!("{}{}", self.config.name_prefix, txn.next_id("interface")?);
        Ok(InterfaceRecord {
            network: net.name.clone(),
            ip,
            mac: ipam::endpoint_mac(ip),
            ifname,
            host_ifname,
            host_mac: ipam::host_mac(ip),
            aliases: aliases.to_vec(),
        })
    }

    pub fn endpoint_list(&self) -> Result<Vec<api::Endpoint>> {
        self.store
            .endpoints()?
            .iter()
            .map(|e| self.endpoint_view(e))
            .collect()
    }

    pub fn endpoint_inspect(&self, name: &str) -> Result<api::Endpoint> {
        let record = self.endpoint(name)?;
        self.endpoint_view(&record)
    }

    pub async fn endpoint_remove(&mut self, name: &str, force: bool) -> Result<()> {
        let record = self.endpoint(name)?;
        let joiners: Vec<EndpointRecord> = self
            .store
            .endpoints()?
            .into_iter()
            .filter(|e| matches!(&e.mode, Mode::Container { owner } if owner == name))
            .collect();
        if !joiners.is_empty() && !force {
            return Err(AgentError::InUse(format!(
                "endpoint {name} shares its namespace with {}; remove them first or force",
                joiners
                    .iter()
                    .map(|j| j.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        let published: Vec<PublishedRecord> = self
            .ports_of(&record)?
            .into_iter()
            .map(|p| p.port)
            .collect();
        let ips = record.addresses();
        let mut changes: Vec<Change<'_>> = joiners
            .iter()
            .map(|j| Change::DeleteEndpoint(&j.name))
            .collect();
        // Its ports go with it, in the same transaction.
        changes.push(Change::DeleteEndpoint(name));
        changes.push(Change::DeletePortsTo(&ips));
        changes.push(Change::PutPending(&record));
        self.store.apply(&changes)?;
        self.refresh_dns()?;
        self.unplumb_endpoint(&record, &published).await;
        self.store.apply(&[Change::DeletePending(name)])?;
        self.forget_published(&published)?;
        info!("endpoint {name} removed");
        Ok(())
    }

    pub async fn network_connect(
        &mut self,
        network: &str,
        endpoint: &str,
        ip: Option<&str>,
        aliases: &[String],
    ) -> Result<api::Endpoint> {
        for alias in aliases {
            ipam::check_name("alias", alias).map_err(AgentError::Invalid)?;
        }
        let mut record = self.endpoint(endpoint)?;
        let net = self.network(network)?;
        match &record.mode {
            Mode::Host => {
                return Err(AgentError::Invalid(format!(
                    "endpoint {endpoint} uses the host's network stack and cannot be connected to networks"
                )));
            }
            Mode::Container { owner } => {
                return Err(AgentError::Invalid(format!(
                    "endpoint {endpoint} shares the namespace of {owner}; connect {owner} instead"
                )));
            }
            Mode::Bridge | Mode::None => {}
        }
        if record.interfaces.iter().any(|i| i.network == network) {
            return Err(AgentError::Exists {
                kind: "connection of endpoint",
                name: format!("{endpoint} to network {network}"),
            });
        }
        let endpoints = self.store.endpoints()?;
        let txn = self.store.begin()?;
        let iface = self.new_interface(&txn, &endpoints, &net, &record.interfaces, ip, aliases)?;
        // Pending: only the new interface, and never the namespace, is torn down on failure.
        let pending = EndpointRecord {
            netns_owned: false,
            interfaces: vec![iface.clone()],
            ..record.clone()
        };
        let networks = self.networks()?;
        record.interfaces.push(iface.clone());
        sort_interfaces(&mut record.interfaces);
        // A reconnected eth0 takes the default route back, as does the first interface that is
        // not internal from interfaces that all are.
        let default_route =
            default_route_ifname(&record.interfaces, &networks) == Some(iface.ifname.as_str());
        // The interface's id with the pending record, in one commit.
        txn.apply(&[Change::PutPending(&pending)])?;
        txn.commit()?;
        let plumbed = self
            .plumb_interface(Path::new(&record.netns), &iface, &net, default_route)
            .await;
        let made = plumbed.and_then(|()| {
            self.store
                .apply(&[
                    Change::DeletePending(endpoint),
                    Change::PutEndpoint(&record),
                ])
                .map_err(AgentError::from)
        });
        if let Err(e) = made {
            self.unplumb_interface(&iface).await;
            // The default route went with the interface that had taken it: back to the one
            // that had it before.
            if default_route {
                record.interfaces.retain(|i| i.ifname != iface.ifname);
                let netns_path = PathBuf::from(&record.netns);
                if let Err(err) = self
                    .put_default_route(&netns_path, &record.interfaces, &networks)
                    .await
                {
                    warn!("endpoint {endpoint}: restoring its default route: {err}");
                }
            }
            self.store.apply(&[Change::DeletePending(endpoint)])?;
            return Err(e);
        }
        self.refresh_dns()?;
        info!(
            "endpoint {endpoint} connected to {network}: {} on {}",
            iface.ip, iface.ifname
        );
        self.endpoint_view(&record)
    }

    pub async fn network_disconnect(
        &mut self,
        network: &str,
        endpoint: &str,
    ) -> Result<api::Endpoint> {
        let mut record = self.endpoint(endpoint)?;
        self.network(network)?;
        let Some(position) = record.interfaces.iter().position(|i| i.network == network) else {
            return Err(AgentError::NotFound {
                kind: "connection of endpoint",
                name: format!("{endpoint} to network {network}"),
            });
        };
        if let Some(p) = self
            .store
            .ports_to(&[record.interfaces[position].ip])?
            .into_iter()
            .map(|p| p.port)
            .next()
        {
            return Err(AgentError::InUse(format!(
                "endpoint {endpoint} has ports published on its address {} on network {network} \
                 (host port {}/{}): unpublish them first",
                p.ip,
                p.host_port,
                p.proto.name()
            )));
        }
        let networks = self.networks()?;
        let carried_default_route = default_route_ifname(&record.interfaces, &networks)
            == Some(record.interfaces[position].ifname.as_str());
        let iface = record.interfaces.remove(position);
        let pending = EndpointRecord {
            netns_owned: false,
            interfaces: vec![iface.clone()],
            ..record.clone()
        };
        self.store
            .apply(&[Change::PutEndpoint(&record), Change::PutPending(&pending)])?;
        self.refresh_dns()?;
        let netns_path = PathBuf::from(&record.netns);
        let removed_ifname = iface.ifname.clone();
        let rule_netns = netns_path.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || {
            link::remove_source_rule(&rule_netns, &removed_ifname)
        })
        .await
        .expect("namespace thread panicked")
        {
            warn!("endpoint {endpoint}: {e}");
        }
        self.unplumb_interface(&iface).await;
        // The default route went with its interface: the next one in line takes it over.
        if carried_default_route {
            self.put_default_route(&netns_path, &record.interfaces, &networks)
                .await?;
        }
        self.store.apply(&[Change::DeletePending(endpoint)])?;
        info!("endpoint {endpoint} disconnected from {network}");
        self.endpoint_view(&record)
    }

    pub fn endpoint_stats(&mut self, name: &str) -> Result<api::EndpointStats> {
        let record = self.endpoint(name)?;
        let mut stats = api::EndpointStats {
            name: record.name.clone(),
            from_endpoint: api::Counter::default(),
            to_endpoint: api::Counter::default(),
            drops: Vec::new(),
        };
        for iface in &record.interfaces {
            let Some(ifindex) = self.host_ifindex.get(&iface.host_ifname).copied() else {
                continue;
            };
            let (from, to, drops) = self.datapath.maps().endpoint_counters(ifindex)?;
            stats.from_endpoint.packets += from.packets;
            stats.from_endpoint.bytes += from.bytes;
            stats.to_endpoint.packets += to.packets;
            stats.to_endpoint.bytes += to.bytes;
            for drop in drops {
                match stats.drops.iter_mut().find(|d| d.code == drop.code) {
                    Some(total) => {
                        total.packets += drop.packets;
                        total.bytes += drop.bytes;
                    }
                    None => stats.drops.push(drop),
                }
            }
        }
        stats.drops.sort_by_key(|d| d.code);
        Ok(stats)
    }

    pub async fn status(&self) -> Result<api::Status> {
        Ok(api::Status {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            networks: self.store.networks()?.len(),
            endpoints: self.store.endpoints()?.len(),
            state_dir: self.config.state_dir.display().to_string(),
            bpffs_dir: self.config.bpffs_dir.display().to_string(),
            programs: net_ebpf_common::program_names::ALL
                .iter()
                .map(|p| (*p).to_owned())
                .collect(),
            nat: self.nat_status().await?,
            overlay: Some(self.overlay_status().await?),
        })
    }

    async fn nat_status(&self) -> Result<Option<api::NatStatus>> {
        let Some(Uplink {
            name: uplink,
            ip: host_ip,
            ..
        }) = &self.nat
        else {
            return Ok(None);
        };
        let maps = self.datapath.maps_ref();
        let stats = maps.nat_stats()?;
        let uplink_drops = match self.netlink.link_by_name(uplink).await? {
            Some(link) => maps.endpoint_counters(link.index)?.2,
            None => Vec::new(),
        };
        Ok(Some(api::NatStatus {
            uplink: uplink.clone(),
            host_ip: *host_ip,
            port_min: self.config.nat_ports.0,
            port_max: self.config.nat_ports.1,
            conntrack_entries: maps.conntrack_entries().len(),
            conntrack_capacity: maps.conntrack_capacity,
            flows_created: stats[nat_stat::FLOWS_CREATED as usize],
            port_retries: stats[nat_stat::PORT_RETRIES as usize],
            ports_exhausted: stats[nat_stat::PORTS_EXHAUSTED as usize],
            table_full: stats[nat_stat::TABLE_FULL as usize],
            uplink_drops,
            published_ports: maps.list_published()?.len(),
            published_flows: stats[nat_stat::PUBLISHED_FLOWS as usize],
            closed_reused: stats[nat_stat::CLOSED_REUSED as usize],
            loopback_drops: maps.endpoint_counters(LOOPBACK_IFINDEX)?.2,
        }))
    }

    /// Turns `forwarding` off again on every internal network's veth where something turned it
    /// on: turning on `net.ipv4.ip_forward` or `conf.all.forwarding` (a firewall or container
    /// runtime starting, a sysctl reload) turns on every device's. Returns the veths it mended.
    pub fn keep_internal_veths_unforwarded(&mut self) -> Vec<String> {
        let mut mended = Vec::new();
        let mut gone = Vec::new();
        for ifname in &self.internal_veths {
            match link::forwarding_on(ifname) {
                Ok(false) => {}
                Ok(true) => match link::refuse_forwarding(ifname) {
                    Ok(()) => mended.push(ifname.clone()),
                    Err(err) => warn!("{ifname}: {err}"),
                },
                // Deleted by someone else: nothing arrives on it any more; the next start
                // rebuilds it.
                Err(err) => {
                    debug!("{ifname}: {err}");
                    gone.push(ifname.clone());
                }
            }
        }
        for ifname in gone {
            self.internal_veths.remove(&ifname);
        }
        mended
    }

    /// Removes expired flows from the conntrack table (never a live one); returns how many.
    pub fn conntrack_gc(&mut self) -> usize {
        let timeouts = self.config.conntrack_timeouts;
        self.datapath
            .maps()
            .conntrack_gc(conntrack::monotonic_now_ns(), &timeouts)
    }

    fn endpoint_view(&self, e: &EndpointRecord) -> Result<api::Endpoint> {
        let networks = self.networks()?;
        let interfaces = e
            .interfaces
            .iter()
            .filter_map(|i| {
                let net = networks.get(&i.network)?;
                Some(api::Interface {
                    network: i.network.clone(),
                    ip: i.ip,
                    prefix_len: net.subnet.prefix(),
                    gateway: net.gateway,
                    mac: format_mac(i.mac),
                    ifname: i.ifname.clone(),
                    host_ifname: i.host_ifname.clone(),
                    host_ifindex: self.host_ifindex.get(&i.host_ifname).copied().unwrap_or(0),
                    host_mac: format_mac(i.host_mac),
                    aliases: i.aliases.clone(),
                })
            })
            .collect();
        Ok(api::Endpoint {
            name: e.name.clone(),
            id: e.id,
            mode: mode_name(&e.mode),
            netns: e.netns.clone(),
            netns_owned: e.netns_owned,
            interfaces,
            published: ports::listed(self.ports_of(e)?),
        })
    }

    /// Rebuilds the DNS view from the store, and wakes the cluster sync to publish this host's
    /// names; called after every change to endpoints.
    fn refresh_dns(&mut self) -> Result<()> {
        self.rebuild_dns_view()?;
        if self.cluster.is_some() {
            self.sync_wanted.notify_one();
        }
        Ok(())
    }

    /// Rebuilds the DNS view from the store and the other hosts' names.
    fn rebuild_dns_view(&mut self) -> Result<()> {
        let endpoints = self.store.endpoints()?;
        let networks = self.store.networks()?;
        let view = DnsView {
            endpoints: endpoints
                .iter()
                .map(|e| DnsEndpoint {
                    name: e.name.clone(),
                    interfaces: e
                        .interfaces
                        .iter()
                        .map(|i| DnsInterface {
                            network: i.network.clone(),
                            ip: i.ip,
                            aliases: i.aliases.clone(),
                        })
                        .collect(),
                })
                .collect(),
            dns_networks: networks
                .iter()
                .map(|n| n.name.clone())
                .filter(|n| n != DEFAULT_NETWORK)
                .collect(),
            internal_networks: networks
                .iter()
                .filter(|n| n.internal)
                .map(|n| n.name.clone())
                .collect(),
            remote: self
                .remote_names
                .iter()
                .flat_map(|r| {
                    r.names.iter().map(|n| DnsEndpoint {
                        name: n.name.clone(),
                        interfaces: vec![DnsInterface {
                            network: r.network.clone(),
                            ip: n.ip,
                            aliases: n.aliases.clone(),
                        }],
                    })
                })
                .collect(),
        };
        self.dns.set_view(view);
        Ok(())
    }

    // ---- plumbing ----

    /// Makes everything an endpoint needs, undoing it all if any step fails.
    async fn plumb_endpoint(&mut self, e: &EndpointRecord) -> Result<()> {
        if matches!(e.mode, Mode::Host | Mode::Container { .. }) {
            return Ok(());
        }
        let netns_path = PathBuf::from(&e.netns);
        let made_netns = e.netns_owned && !netns_path.exists();
        if made_netns {
            netns::create(&self.netns_name(&e.name))?;
        }
        let result = self.plumb_endpoint_inside(e, &netns_path).await;
        if result.is_err() {
            for iface in &e.interfaces {
                self.unplumb_interface(iface).await;
            }
            if made_netns {
                let _ = netns::delete(&netns_path);
            }
        }
        result
    }

    async fn plumb_endpoint_inside(&mut self, e: &EndpointRecord, netns_path: &Path) -> Result<()> {
        let networks = self.networks()?;
        let path = netns_path.to_owned();
        tokio::task::spawn_blocking(move || link::bring_up_loopback(&path))
            .await
            .expect("loopback thread panicked")?;
        let route_via = default_route_ifname(&e.interfaces, &networks).map(str::to_owned);
        for iface in &e.interfaces {
            let net = networks
                .get(&iface.network)
                .ok_or_else(|| AgentError::NotFound {
                    kind: "network",
                    name: iface.network.clone(),
                })?;
            let default_route = route_via.as_deref() == Some(iface.ifname.as_str());
            self.plumb_interface(netns_path, iface, net, default_route)
                .await?;
        }
        if e.netns_owned {
            let name = self.netns_name(&e.name);
            dns::write_netns_resolv_conf(&name).map_err(|source| LinkError::Io {
                what: format!("writing /etc/netns/{name}/resolv.conf"),
                source,
            })?;
        }
        self.dns.listen(&e.name, netns_path);
        Ok(())
    }

    async fn plumb_interface(
        &mut self,
        netns_path: &Path,
        iface: &InterfaceRecord,
        net: &NetworkRecord,
        default_route: bool,
    ) -> Result<()> {
        let result = self
            .plumb_interface_steps(netns_path, iface, net, default_route)
            .await;
        if result.is_err() {
            self.unplumb_interface(iface).await;
        }
        result
    }

    async fn plumb_interface_steps(
        &mut self,
        netns_path: &Path,
        iface: &InterfaceRecord,
        net: &NetworkRecord,
        default_route: bool,
    ) -> Result<()> {
        let ifindex = self
            .netlink
            .create_veth(&VethSpec {
                host_ifname: &iface.host_ifname,
                host_mac: iface.host_mac,
                peer_netns: netns_path,
                peer_ifname: &iface.ifname,
                peer_mac: iface.mac,
                mtu: net.mtu,
            })
            .await?;
        self.host_ifindex.insert(iface.host_ifname.clone(), ifindex);
        let addressing = EndpointAddressing {
            netns: netns_path.to_owned(),
            ifname: iface.ifname.clone(),
            ip: iface.ip,
            prefix_len: net.subnet.prefix(),
            gateway: net.gateway,
            default_route,
        };
        tokio::task::spawn_blocking(move || link::configure_endpoint(&addressing))
            .await
            .expect("endpoint configuration thread panicked")?;
        self.activate(iface, net, ifindex).await
    }

    /// The host-side half of an interface, also all a restart needs for an intact one: programs
    /// (swapped into pinned links), the map entry, the link up, and the host route. A new veth
    /// comes up only after its programs and entry are in place: up before, the endpoint's
    /// packets would meet the host stack alone, which forwards them past isolation.
    async fn activate(
        &mut self,
        iface: &InterfaceRecord,
        net: &NetworkRecord,
        ifindex: u32,
    ) -> Result<()> {
        // Also on every start: a veth made by an agent that did not set it yet gets it here.
        crate::link::refuse_source_routes(&iface.host_ifname)?;
        // The network's unreachable rule is there already: made with the network, and at
        // start before any endpoint.
        if net.internal {
            crate::link::refuse_forwarding(&iface.host_ifname)?;
            self.internal_veths.insert(iface.host_ifname.clone());
        }
        self.datapath.attach_endpoint(&iface.host_ifname)?;
        self.datapath.maps().upsert_endpoint(
            iface.ip,
            EndpointInfo {
                ifindex,
                network_id: net.id,
                gateway: net.gateway.octets(),
                mac: iface.mac,
                host_mac: iface.host_mac,
                flags: if net.masquerade {
                    ENDPOINT_F_MASQUERADE
                } else {
                    0
                } | if self.published_ips.contains(&iface.ip) {
                    ENDPOINT_F_PUBLISHED
                } else {
                    0
                } | if net.overlay.is_some() {
                    net_ebpf_common::ENDPOINT_F_OVERLAY
                } else {
                    0
                } | if net.icc {
                    0
                } else {
                    net_ebpf_common::ENDPOINT_F_NO_ICC
                } | if net.internal {
                    net_ebpf_common::ENDPOINT_F_INTERNAL
                } else {
                    0
                },
                // Set by `upsert_endpoint`: the slot the veth holds, or a free one.
                slot: 0,
            },
        )?;
        // The host route needs the link up (a route through a down device is refused).
        self.netlink.set_up(ifindex, &iface.host_ifname).await?;
        self.netlink.replace_host_route(iface.ip, ifindex).await?;
        Ok(())
    }

    /// Tears an endpoint down; best effort, every step tolerates what is already gone.
    async fn unplumb_endpoint(&mut self, e: &EndpointRecord, published: &[PublishedRecord]) {
        // Ports first: no new connection may head for an endpoint being torn down.
        self.uninstall_published(published);
        self.dns.stop(&e.name);
        for iface in &e.interfaces {
            self.unplumb_interface(iface).await;
        }
        if e.netns_owned {
            dns::remove_netns_resolv_conf(&self.netns_name(&e.name));
            if let Err(err) = netns::delete(Path::new(&e.netns)) {
                warn!("endpoint {}: deleting namespace: {err}", e.name);
            }
        }
    }

    async fn unplumb_interface(&mut self, iface: &InterfaceRecord) {
        let ifname = &iface.host_ifname;
        // The link first, the programs after: the other way round, the endpoint's packets would
        // meet the host stack alone for as long as the rest takes (the conntrack scan can take
        // a while), which forwards them past isolation. Deleting the host side deletes the peer
        // and the host route with it, and detaches the programs.
        let deleted = match self.netlink.link_by_name(ifname).await {
            Ok(Some(link)) => self.netlink.delete_link(link.index, &link.name).await,
            Ok(None) => Ok(()),
            Err(err) => Err(err),
        };
        if let Err(err) = deleted {
            // Its programs, entry and watch stay: a veth without them would be the stack's
            // alone. The next start removes what no endpoint accounts for.
            warn!("{ifname}: {err}; leaving its programs on it");
            return;
        }
        self.internal_veths.remove(ifname);
        if let Some(ifindex) = self.host_ifindex.remove(ifname)
            && let Err(err) = self.datapath.maps().remove_endpoint(iface.ip, ifindex)
        {
            warn!("{ifname}: removing map entry: {err}");
        }
        if let Err(err) = self.datapath.detach_endpoint(ifname) {
            warn!("{ifname}: unpinning the programs' links: {err}");
        }
        self.datapath.maps().conntrack_forget(iface.ip);
    }

    /// Points the default route of the namespace at `netns` through the interface of
    /// `interfaces` that [`default_route_ifname`] picks (none: nothing to do). A replace:
    /// where it is right already, nothing changes.
    async fn put_default_route(
        &self,
        netns: &Path,
        interfaces: &[InterfaceRecord],
        networks: &BTreeMap<String, NetworkRecord>,
    ) -> Result<()> {
        let Some((ifname, gateway)) = default_route_ifname(interfaces, networks).and_then(|via| {
            let iface = interfaces.iter().find(|i| i.ifname == via)?;
            Some((via.to_owned(), networks.get(&iface.network)?.gateway))
        }) else {
            return Ok(());
        };
        let netns = netns.to_owned();
        tokio::task::spawn_blocking(move || link::set_default_route(&netns, &ifname, gateway))
            .await
            .expect("namespace thread panicked")?;
        Ok(())
    }

    /// Makes the kernel match the store (see the module docs).
    async fn reconcile(&mut self) -> Result<()> {
        let networks = self.networks()?;
        let endpoints = self.store.endpoints()?;
        let known_ifnames: Vec<&str> = endpoints
            .iter()
            .flat_map(|e| e.interfaces.iter().map(|i| i.host_ifname.as_str()))
            .collect();

        // Each internal network's unreachable rule, before any of its endpoints' veths comes
        // up, also of one without endpoints; and none of a network that is gone (its removal
        // was cut short).
        let internal: BTreeSet<ipnetwork::Ipv4Network> = networks
            .values()
            .filter(|n| n.internal)
            .map(|n| n.subnet)
            .collect();
        for subnet in self.netlink.unroutable_rule_subnets().await? {
            if !internal.contains(&subnet) {
                info!("{subnet}: removing the unreachable rule of a network that is gone");
                self.netlink.remove_unroutable_rule(subnet).await?;
            }
        }
        for subnet in internal {
            self.netlink.add_unroutable_rule(subnet).await?;
        }

        // Work a crash interrupted: tear it down completely (half-made plumbing was never
        // acknowledged; half-removed plumbing was already forgotten). Only what no recorded
        // endpoint uses: a pending connect names an existing endpoint's namespace.
        for pending in self.store.pending()? {
            warn!("endpoint {}: tearing down interrupted work", pending.name);
            for iface in &pending.interfaces {
                if !known_ifnames.contains(&iface.host_ifname.as_str()) {
                    self.unplumb_interface(iface).await;
                }
            }
            let netns_in_use = endpoints.iter().any(|e| e.netns == pending.netns);
            if pending.netns_owned && !netns_in_use {
                dns::remove_netns_resolv_conf(&self.netns_name(&pending.name));
                netns::delete(Path::new(&pending.netns))?;
            }
            // Ports recorded with an endpoint that was never made (the data plane's copies go
            // below, as orphans).
            let unused: Vec<Ipv4Addr> = pending
                .interfaces
                .iter()
                .map(|i| i.ip)
                .filter(|ip| {
                    !endpoints
                        .iter()
                        .any(|e| e.interfaces.iter().any(|i| i.ip == *ip))
                })
                .collect();
            self.store.apply(&[
                Change::DeletePending(&pending.name),
                Change::DeletePortsTo(&unused),
            ])?;
        }
        // Pins and map entries live in this agent's own bpffs directory and maps, so anything
        // there that no interface accounts for is ours to remove.
        for ifname in self.datapath.pinned_link_ifnames()? {
            if !known_ifnames.contains(&ifname.as_str()) {
                warn!("removing orphaned link pins of {ifname}");
                self.datapath.detach_endpoint(&ifname)?;
            }
        }
        let known_ips: Vec<Ipv4Addr> = endpoints
            .iter()
            .flat_map(|e| e.interfaces.iter().map(|i| i.ip))
            .collect();
        for entry in self.datapath.maps().list_endpoints()? {
            if !known_ips.contains(&entry.ip) {
                warn!("removing orphaned map entry for {}", entry.ip);
                self.datapath
                    .maps()
                    .remove_endpoint(entry.ip, entry.ifindex)?;
            }
        }
        self.datapath.maps().release_orphaned_slots()?;

        self.reconcile_published()?;

        // Every recorded endpoint: keep what is intact (swapping in this process's programs
        // without a gap), rebuild what is missing.
        for e in &endpoints {
            if matches!(e.mode, Mode::Host | Mode::Container { .. }) {
                continue;
            }
            let netns_path = PathBuf::from(&e.netns);
            if !netns_path.exists() {
                if e.netns_owned {
                    info!("endpoint {}: namespace gone, rebuilding", e.name);
                    for iface in &e.interfaces {
                        self.unplumb_interface(iface).await;
                    }
                    self.plumb_endpoint(e).await?;
                } else {
                    warn!(
                        "endpoint {}: its namespace {} is gone; it stays recorded (remove it, or restart the agent once the namespace is back)",
                        e.name, e.netns
                    );
                }
                continue;
            }
            let route_via = default_route_ifname(&e.interfaces, &networks).map(str::to_owned);
            for iface in &e.interfaces {
                let Some(net) = networks.get(&iface.network) else {
                    warn!(
                        "endpoint {} refers to unknown network {}",
                        e.name, iface.network
                    );
                    continue;
                };
                let link = self.netlink.link_by_name(&iface.host_ifname).await?;
                // A veth comes up only once complete, so one still down was left by an agent
                // stopped while making it (also by this rebuild, which records no pending
                // work). With its address on the endpoint's side, only the host's side is
                // missing, which `activate` does; without, it is made again.
                let complete = match &link {
                    Some(link) if link.up => true,
                    Some(_) => {
                        let (path, ifname, ip) =
                            (netns_path.clone(), iface.ifname.clone(), iface.ip);
                        tokio::task::spawn_blocking(move || link::has_ipv4(&path, &ifname, ip))
                            .await
                            .expect("namespace thread panicked")?
                    }
                    None => false,
                };
                match link {
                    Some(link) if complete => {
                        self.host_ifindex
                            .insert(iface.host_ifname.clone(), link.index);
                        self.activate(iface, net, link.index).await?;
                    }
                    half_made => {
                        info!("endpoint {}: rebuilding interface {}", e.name, iface.ifname);
                        if let Some(link) = half_made {
                            self.netlink.delete_link(link.index, &link.name).await?;
                        }
                        self.datapath.detach_endpoint(&iface.host_ifname)?;
                        let default_route = route_via.as_deref() == Some(iface.ifname.as_str());
                        self.plumb_interface(&netns_path, iface, net, default_route)
                            .await?;
                    }
                }
            }
            // The default route where it belongs, also after a crash cut a connect or a
            // disconnect short (the route had moved to an interface since torn down).
            self.put_default_route(&netns_path, &e.interfaces, &networks)
                .await?;
            self.dns.listen(&e.name, &netns_path);
        }
        info!(
            "state restored: {} networks, {} endpoints",
            networks.len(),
            endpoints.len()
        );
        Ok(())
    }
}

/// The interface that carries an endpoint's default route: the first (lowest ethN) whose network
/// is not internal, as Docker picks a container's gateway, so that an endpoint on an internal
/// network and another one goes out through the other; on internal networks only, the first
/// (the host's own addresses are reached through it).
fn default_route_ifname<'a>(
    interfaces: &'a [InterfaceRecord],
    networks: &BTreeMap<String, NetworkRecord>,
) -> Option<&'a str> {
    interfaces
        .iter()
        .find(|i| networks.get(&i.network).is_some_and(|n| !n.internal))
        .or_else(|| interfaces.first())
        .map(|i| i.ifname.as_str())
}

/// Orders interfaces by their number (eth0, eth1, ..., eth10), the order
/// [`default_route_ifname`] picks in.
fn sort_interfaces(interfaces: &mut [InterfaceRecord]) {
    interfaces.sort_by_key(|i| {
        i.ifname
            .trim_start_matches("eth")
            .parse::<u32>()
            .unwrap_or(u32::MAX)
    });
}

/// Parses a network mode: `bridge`, `none`, `host` or `container:<endpoint>`.
pub fn parse_mode(mode: &str) -> Result<Mode> {
    match mode {
        "bridge" => Ok(Mode::Bridge),
        "none" => Ok(Mode::None),
        "host" => Ok(Mode::Host),
        other => match other.strip_prefix("container:") {
            Some("") => Err(AgentError::Invalid(
                "network mode container: needs an endpoint name (container:NAME)".into(),
            )),
            Some(owner) => Ok(Mode::Container {
                owner: owner.to_owned(),
            }),
            None => Err(AgentError::Invalid(format!(
                "unknown network mode {other:?}: use bridge, none, host or container:NAME"
            ))),
        },
    }
}

pub fn mode_name(mode: &Mode) -> String {
    match mode {
        Mode::Bridge => "bridge".into(),
        Mode::None => "none".into(),
        Mode::Host => "host".into(),
        Mode::Container { owner } => format!("container:{owner}"),
    }
}

/// Names of the endpoints with an interface on `network`, sorted.
fn endpoints_on(endpoints: &[EndpointRecord], network: &str) -> Vec<String> {
    let mut names: Vec<String> = endpoints
        .iter()
        .filter(|e| e.interfaces.iter().any(|i| i.network == network))
        .map(|e| e.name.clone())
        .collect();
    names.sort();
    names
}

/// The uplink to masquerade through and its address: the one named, or the default route's.
/// The host's interface to the outside: where published ports are reached and masqueraded
/// traffic leaves, and whose address is the overlay's VTEP.
#[derive(Clone, Debug)]
pub(crate) struct Uplink {
    pub name: String,
    pub index: u32,
    pub ip: Ipv4Addr,
}

async fn find_uplink(netlink: &Netlink, named: Option<&str>) -> Result<Option<Uplink>> {
    let link =
        match named {
            Some(name) => Some(netlink.link_by_name(name).await?.ok_or_else(|| {
                AgentError::Invalid(format!("--uplink {name}: no such interface"))
            })?),
            None => netlink.default_route_link().await?,
        };
    let Some(link) = link else {
        return Ok(None);
    };
    match netlink.ipv4_of(link.index, &link.name).await? {
        Some(ip) => Ok(Some(Uplink {
            name: link.name,
            index: link.index,
            ip,
        })),
        None => Err(AgentError::Invalid(format!(
            "uplink {} has no IPv4 address to masquerade with",
            link.name
        ))),
    }
}

fn network_view(n: &NetworkRecord, endpoints: Vec<String>) -> api::Network {
    api::Network {
        name: n.name.clone(),
        id: n.id,
        driver: if n.overlay.is_some() {
            "overlay"
        } else {
            "bridge"
        }
        .to_owned(),
        subnet: n.subnet.to_string(),
        gateway: n.gateway,
        mtu: n.mtu,
        masquerade: n.masquerade,
        icc: n.icc,
        internal: n.internal,
        pool: n.overlay.as_ref().map(|o| o.pool.to_string()),
        vni: n.overlay.as_ref().map(|o| o.vni),
        endpoints,
        remote_endpoints: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_route_goes_through_the_first_network_that_is_not_internal() {
        let network = |name: &str, internal: bool| NetworkRecord {
            name: name.to_owned(),
            id: 1,
            subnet: "10.1.0.0/24".parse().unwrap(),
            gateway: "10.1.0.1".parse().unwrap(),
            mtu: DEFAULT_MTU,
            masquerade: !internal,
            icc: true,
            internal,
            overlay: None,
        };
        let networks: BTreeMap<String, NetworkRecord> = [
            network("int1", true),
            network("int2", true),
            network("pub1", false),
            network("pub2", false),
        ]
        .into_iter()
        .map(|n| (n.name.clone(), n))
        .collect();
        let on = |nets: &[&str]| -> Vec<InterfaceRecord> {
            nets.iter()
                .enumerate()
                .map(|(n, net)| InterfaceRecord {
                    network: (*net).to_owned(),
                    ip: "10.1.0.2".parse().unwrap(),
                    mac: [2, 0, 0, 0, 0, 2],
                    ifname: format!("eth{n}"),
                    host_ifname: format!("veth{n}"),
                    host_mac: [2, 0, 0, 0, 1, 2],
                    aliases: Vec::new(),
                })
                .collect()
        };
        let via = |nets: &[&str]| default_route_ifname(&on(nets), &networks).map(str::to_owned);
        assert_eq!(via(&["pub1", "pub2"]).as_deref(), Some("eth0"));
        assert_eq!(via(&["int1", "pub1", "pub2"]).as_deref(), Some("eth1"));
        assert_eq!(via(&["int1", "int2", "pub2"]).as_deref(), Some("eth2"));
        assert_eq!(via(&["pub1", "int1"]).as_deref(), Some("eth0"));
        assert_eq!(via(&["int1", "int2"]).as_deref(), Some("eth0"));
        assert_eq!(via(&[]), None);
        // An interface on a network the agent no longer knows never wins over a known one.
        assert_eq!(via(&["gone", "pub1"]).as_deref(), Some("eth1"));
    }

    #[test]
    fn modes_parse_and_print_back() {
        for mode in ["bridge", "none", "host", "container:web"] {
            assert_eq!(mode_name(&parse_mode(mode).unwrap()), mode);
        }
        for bad in ["container:", "bridged", "container", ""] {
            let err = parse_mode(bad).unwrap_err().to_string();
            assert!(err.contains("mode"), "{bad:?}: {err}");
        }
    }
}
