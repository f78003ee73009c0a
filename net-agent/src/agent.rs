//! The agent's operations on networks and endpoints.
//!
//! The store is the source of truth. A change is validated completely before anything is made.
//! An endpoint is first recorded as pending, then plumbed (namespace, veth, addresses, routes,
//! programs, map entry), then recorded as an endpoint in the transaction that clears the pending
//! record; any failure on the way undoes what was made. Removal forgets the endpoint and records
//! it as pending in one transaction, then tears down. So whatever a crash interrupts is in the
//! pending table, and [`Agent::start`] tears exactly that down; it then makes the kernel match
//! the recorded endpoints, rebuilding missing plumbing, while pinned links and maps keep existing
//! flows running throughout.

use std::{
    collections::{BTreeMap, HashMap},
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use log::{info, warn};
use net_ebpf_common::EndpointInfo;

use crate::{
    api::{self, format_mac},
    datapath::{Datapath, DatapathError},
    ipam::{self, IpamError, Pool},
    link::{self, EndpointAddressing, LinkError, Netlink, VethSpec},
    netns::{self, NetnsError},
    store::{Change, EndpointRecord, NetworkRecord, Store, StoreError},
};

/// Interface name inside an endpoint's namespace.
pub const ENDPOINT_IFNAME: &str = "eth0";
pub const DEFAULT_MTU: u32 = 1500;
/// Longest `--name-prefix`: host veths are `<prefix><id>` and must fit IFNAMSIZ (15).
pub const MAX_PREFIX_LEN: usize = 8;

#[derive(Debug, Clone)]
pub struct Config {
    pub state_dir: PathBuf,
    pub bpffs_dir: PathBuf,
    pub socket: PathBuf,
    pub name_prefix: String,
}

impl Config {
    pub fn check(&self) -> Result<()> {
        let p = &self.name_prefix;
        if p.is_empty()
            || p.len() > MAX_PREFIX_LEN
            || !p
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
            || !p.starts_with(|c: char| c.is_ascii_lowercase())
        {
            return Err(AgentError::Invalid(format!(
                "invalid --name-prefix {p:?}: use 1-{MAX_PREFIX_LEN} characters a-z, 0-9, starting with a letter"
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
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error(transparent)]
    Netns(#[from] NetnsError),
}

type Result<T> = std::result::Result<T, AgentError>;

pub struct Agent {
    config: Config,
    store: Store,
    datapath: Datapath,
    netlink: Netlink,
    /// Host veth ifindex of each endpoint, learnt when plumbing or on start (not stored: the
    /// kernel assigns it, and a rebuilt veth gets a new one).
    host_ifindex: HashMap<String, u32>,
}

impl Agent {
    /// Opens the store and the data plane, then reconciles the kernel with the store.
    pub async fn start(config: Config) -> Result<Self> {
        config.check()?;
        let store = Store::open(&config.state_dir)?;
        let datapath = Datapath::open(&config.bpffs_dir)?;
        let netlink = Netlink::new()?;
        let mut agent = Self {
            config,
            store,
            datapath,
            netlink,
            host_ifindex: HashMap::new(),
        };
        agent.reconcile().await?;
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
            .networks()?
            .into_iter()
            .find(|n| n.name == name)
            .ok_or_else(|| AgentError::NotFound {
                kind: "network",
                name: name.to_owned(),
            })
    }

    fn endpoint(&self, name: &str) -> Result<EndpointRecord> {
        self.store
            .endpoints()?
            .into_iter()
            .find(|e| e.name == name)
            .ok_or_else(|| AgentError::NotFound {
                kind: "endpoint",
                name: name.to_owned(),
            })
    }

    // ---- networks ----

    pub fn network_create(
        &mut self,
        name: &str,
        subnet: &str,
        gateway: Option<&str>,
        mtu: Option<u32>,
    ) -> Result<api::Network> {
        ipam::check_name("network", name).map_err(AgentError::Invalid)?;
        let subnet = ipam::parse_subnet(subnet)?;
        let gateway = gateway
            .map(|g| ipam::parse_addr(g, "--gateway"))
            .transpose()?;
        let gateway = ipam::choose_gateway(subnet, gateway)?;
        let mtu = mtu.unwrap_or(DEFAULT_MTU);
        ipam::check_mtu(mtu).map_err(AgentError::Invalid)?;
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
        let record = NetworkRecord {
            name: name.to_owned(),
            id: self.store.next_id("network")?,
            subnet,
            gateway,
            mtu,
        };
        self.store.apply(&[Change::PutNetwork(&record)])?;
        info!("network {name} created: {subnet} gateway {gateway} mtu {mtu}");
        Ok(network_view(&record, Vec::new()))
    }

    pub fn network_list(&self) -> Result<Vec<api::Network>> {
        let endpoints = self.store.endpoints()?;
        Ok(self
            .store
            .networks()?
            .iter()
            .map(|n| network_view(n, endpoints_of(&endpoints, &n.name)))
            .collect())
    }

    pub fn network_inspect(&self, name: &str) -> Result<api::Network> {
        let network = self.network(name)?;
        let endpoints = self.store.endpoints()?;
        Ok(network_view(&network, endpoints_of(&endpoints, name)))
    }

    pub fn network_remove(&mut self, name: &str) -> Result<()> {
        self.network(name)?;
        let attached = endpoints_of(&self.store.endpoints()?, name);
        if !attached.is_empty() {
            return Err(AgentError::InUse(format!(
                "network {name} has endpoints attached ({}); remove them first",
                attached.join(", ")
            )));
        }
        self.store.apply(&[Change::DeleteNetwork(name)])?;
        info!("network {name} removed");
        Ok(())
    }

    // ---- endpoints ----

    pub async fn endpoint_create(
        &mut self,
        name: &str,
        network: &str,
        ip: Option<&str>,
        adopt_netns: Option<&str>,
    ) -> Result<api::Endpoint> {
        ipam::check_name("endpoint", name).map_err(AgentError::Invalid)?;
        let net = self.network(network)?;
        let endpoints = self.store.endpoints()?;
        if endpoints.iter().any(|e| e.name == name) {
            return Err(AgentError::Exists {
                kind: "endpoint",
                name: name.to_owned(),
            });
        }
        let requested = ip.map(|ip| ipam::parse_addr(ip, "--ip")).transpose()?;
        let used: Vec<(Ipv4Addr, String)> = endpoints
            .iter()
            .filter(|e| e.network == network)
            .map(|e| (e.ip, e.name.clone()))
            .collect();
        let ip = Pool {
            network,
            subnet: net.subnet,
            gateway: net.gateway,
            used: &used,
        }
        .allocate(requested)?;

        let (netns_path, netns_owned) = match adopt_netns {
            Some(path) => {
                let path = Path::new(path);
                link::check_netns(path)
                    .map_err(|e| AgentError::Invalid(format!("--netns {}: {e}", path.display())))?;
                let path_text = path.to_string_lossy().into_owned();
                if let Some(user) = endpoints.iter().find(|e| e.netns == path_text) {
                    return Err(AgentError::InUse(format!(
                        "network namespace {path_text} is already used by endpoint {}",
                        user.name
                    )));
                }
                let owned = path.to_owned();
                let clash = tokio::task::spawn_blocking(move || {
                    link::interface_exists(&owned, ENDPOINT_IFNAME)
                })
                .await
                .expect("namespace inspection thread panicked")?;
                if clash {
                    return Err(AgentError::InUse(format!(
                        "network namespace {path_text} already has an interface {ENDPOINT_IFNAME}"
                    )));
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
        };

        let id = self.store.next_id("endpoint")?;
        let record = EndpointRecord {
            name: name.to_owned(),
            id,
            network: network.to_owned(),
            ip,
            mac: ipam::endpoint_mac(ip),
            netns: netns_path,
            netns_owned,
            ifname: ENDPOINT_IFNAME.to_owned(),
            host_ifname: format!("{}{id}", self.config.name_prefix),
            host_mac: ipam::host_mac(ip),
        };
        self.store.apply(&[Change::PutPending(&record)])?;
        let made = match self.plumb(&record, &net).await {
            Ok(()) => self
                .store
                .apply(&[Change::DeletePending(name), Change::PutEndpoint(&record)])
                .map_err(AgentError::from),
            Err(e) => Err(e),
        };
        if let Err(e) = made {
            self.unplumb(&record).await;
            self.store.apply(&[Change::DeletePending(name)])?;
            return Err(e);
        }
        info!(
            "endpoint {name} created on {network}: {ip} via {}",
            record.host_ifname
        );
        Ok(self.endpoint_view(&record, &net))
    }

    pub fn endpoint_list(&self) -> Result<Vec<api::Endpoint>> {
        let networks: BTreeMap<String, NetworkRecord> = self
            .store
            .networks()?
            .into_iter()
            .map(|n| (n.name.clone(), n))
            .collect();
        Ok(self
            .store
            .endpoints()?
            .iter()
            .filter_map(|e| networks.get(&e.network).map(|n| self.endpoint_view(e, n)))
            .collect())
    }

    pub fn endpoint_inspect(&self, name: &str) -> Result<api::Endpoint> {
        let record = self.endpoint(name)?;
        let network = self.network(&record.network)?;
        Ok(self.endpoint_view(&record, &network))
    }

    pub async fn endpoint_remove(&mut self, name: &str) -> Result<()> {
        let record = self.endpoint(name)?;
        self.store
            .apply(&[Change::DeleteEndpoint(name), Change::PutPending(&record)])?;
        self.unplumb(&record).await;
        self.store.apply(&[Change::DeletePending(name)])?;
        info!("endpoint {name} removed");
        Ok(())
    }

    pub fn endpoint_stats(&mut self, name: &str) -> Result<api::EndpointStats> {
        let record = self.endpoint(name)?;
        let ifindex = self.host_ifindex.get(name).copied().unwrap_or(0);
        let (from_endpoint, to_endpoint, drops) =
            self.datapath.maps().endpoint_counters(ifindex)?;
        Ok(api::EndpointStats {
            name: record.name,
            from_endpoint,
            to_endpoint,
            drops,
        })
    }

    pub fn status(&self) -> Result<api::Status> {
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
        })
    }

    fn endpoint_view(&self, e: &EndpointRecord, net: &NetworkRecord) -> api::Endpoint {
        api::Endpoint {
            name: e.name.clone(),
            id: e.id,
            network: e.network.clone(),
            ip: e.ip,
            prefix_len: net.subnet.prefix(),
            gateway: net.gateway,
            mac: format_mac(e.mac),
            netns: e.netns.clone(),
            netns_owned: e.netns_owned,
            ifname: e.ifname.clone(),
            host_ifname: e.host_ifname.clone(),
            host_ifindex: self.host_ifindex.get(&e.name).copied().unwrap_or(0),
            host_mac: format_mac(e.host_mac),
        }
    }

    // ---- plumbing ----

    /// Makes everything an endpoint needs, undoing it all if any step fails.
    async fn plumb(&mut self, e: &EndpointRecord, net: &NetworkRecord) -> Result<()> {
        let made_netns = e.netns_owned && !Path::new(&e.netns).exists();
        if made_netns {
            netns::create(&self.netns_name(&e.name))?;
        }
        let result = self.plumb_links(e, net).await;
        if result.is_err() {
            self.unplumb_links(e).await;
            if made_netns {
                let _ = netns::delete(Path::new(&e.netns));
            }
        }
        result
    }

    async fn plumb_links(&mut self, e: &EndpointRecord, net: &NetworkRecord) -> Result<()> {
        let ifindex = self
            .netlink
            .create_veth(&VethSpec {
                host_ifname: &e.host_ifname,
                host_mac: e.host_mac,
                peer_netns: Path::new(&e.netns),
                peer_ifname: &e.ifname,
                peer_mac: e.mac,
                mtu: net.mtu,
            })
            .await?;
        self.host_ifindex.insert(e.name.clone(), ifindex);
        let addressing = EndpointAddressing {
            netns: PathBuf::from(&e.netns),
            ifname: e.ifname.clone(),
            ip: e.ip,
            prefix_len: net.subnet.prefix(),
            gateway: net.gateway,
        };
        tokio::task::spawn_blocking(move || link::configure_endpoint(&addressing))
            .await
            .expect("endpoint configuration thread panicked")?;
        self.activate(e, net, ifindex).await
    }

    /// The host-side half, also all a restart needs for an intact endpoint: host route,
    /// programs (swapped into pinned links), and the map entry.
    async fn activate(
        &mut self,
        e: &EndpointRecord,
        net: &NetworkRecord,
        ifindex: u32,
    ) -> Result<()> {
        self.netlink.replace_host_route(e.ip, ifindex).await?;
        self.datapath.attach_endpoint(&e.host_ifname)?;
        self.datapath.maps().upsert_endpoint(
            e.ip,
            EndpointInfo {
                ifindex,
                network_id: net.id,
                gateway: net.gateway.octets(),
                mac: e.mac,
                host_mac: e.host_mac,
            },
        )?;
        Ok(())
    }

    /// Tears an endpoint down; best effort, every step tolerates what is already gone.
    async fn unplumb(&mut self, e: &EndpointRecord) {
        self.unplumb_links(e).await;
        if e.netns_owned
            && let Err(err) = netns::delete(Path::new(&e.netns))
        {
            warn!("endpoint {}: deleting namespace: {err}", e.name);
        }
    }

    async fn unplumb_links(&mut self, e: &EndpointRecord) {
        let ifindex = self.host_ifindex.remove(&e.name);
        // Only remove the map entry if it is still this endpoint's (an address can be reused).
        if let Some(ifindex) = ifindex
            && let Err(err) = self.datapath.maps().remove_endpoint(e.ip, ifindex)
        {
            warn!("endpoint {}: removing map entry: {err}", e.name);
        }
        if let Err(err) = self.datapath.detach_endpoint(&e.host_ifname) {
            warn!("endpoint {}: detaching programs: {err}", e.name);
        }
        // Deleting the host side deletes the peer and the host route with it.
        match self.netlink.link_by_name(&e.host_ifname).await {
            Ok(Some(link)) => {
                if let Err(err) = self.netlink.delete_link(link.index, &link.name).await {
                    warn!("endpoint {}: {err}", e.name);
                }
            }
            Ok(None) => {}
            Err(err) => warn!("endpoint {}: {err}", e.name),
        }
    }

    /// Makes the kernel match the store (see the module docs).
    async fn reconcile(&mut self) -> Result<()> {
        let networks: BTreeMap<String, NetworkRecord> = self
            .store
            .networks()?
            .into_iter()
            .map(|n| (n.name.clone(), n))
            .collect();
        let endpoints = self.store.endpoints()?;

        // Work a crash interrupted: tear it down completely (a half-made endpoint was never
        // acknowledged; a half-removed one was already forgotten).
        for e in self.store.pending()? {
            warn!(
                "endpoint {}: finishing interrupted work: tearing it down",
                e.name
            );
            if !endpoints
                .iter()
                .any(|known| known.host_ifname == e.host_ifname)
            {
                self.unplumb(&e).await;
            }
            self.store.apply(&[Change::DeletePending(&e.name)])?;
        }
        // Pins and map entries live in this agent's own bpffs directory and maps, so anything
        // there that no endpoint accounts for is ours to remove.
        let known_ifnames: Vec<&str> = endpoints.iter().map(|e| e.host_ifname.as_str()).collect();
        for ifname in self.datapath.pinned_link_ifnames()? {
            if !known_ifnames.contains(&ifname.as_str()) {
                warn!("removing orphaned link pins of {ifname}");
                self.datapath.detach_endpoint(&ifname)?;
            }
        }
        let known_ips: Vec<Ipv4Addr> = endpoints.iter().map(|e| e.ip).collect();
        for entry in self.datapath.maps().list_endpoints()? {
            if !known_ips.contains(&entry.ip) {
                warn!("removing orphaned map entry for {}", entry.ip);
                self.datapath
                    .maps()
                    .remove_endpoint(entry.ip, entry.ifindex)?;
            }
        }

        // Every recorded endpoint: keep what is intact (swapping in this process's programs
        // without a gap), rebuild what is missing.
        for e in &endpoints {
            let Some(net) = networks.get(&e.network) else {
                warn!(
                    "endpoint {} refers to unknown network {}",
                    e.name, e.network
                );
                continue;
            };
            let netns_present = Path::new(&e.netns).exists();
            let link = self.netlink.link_by_name(&e.host_ifname).await?;
            match (link, netns_present) {
                (Some(link), true) => {
                    self.host_ifindex.insert(e.name.clone(), link.index);
                    self.activate(e, net, link.index).await?;
                }
                (_, false) if !e.netns_owned => {
                    warn!(
                        "endpoint {}: its namespace {} is gone; it stays recorded and is rebuilt when the namespace is back (or remove it)",
                        e.name, e.netns
                    );
                }
                (link, _) => {
                    info!("endpoint {}: rebuilding missing plumbing", e.name);
                    if let Some(link) = link {
                        self.netlink.delete_link(link.index, &link.name).await?;
                    }
                    self.datapath.detach_endpoint(&e.host_ifname)?;
                    self.plumb(e, net).await?;
                }
            }
        }
        info!(
            "state restored: {} networks, {} endpoints",
            networks.len(),
            endpoints.len()
        );
        Ok(())
    }
}

fn endpoints_of(endpoints: &[EndpointRecord], network: &str) -> Vec<String> {
    let mut names: Vec<String> = endpoints
        .iter()
        .filter(|e| e.network == network)
        .map(|e| e.name.clone())
        .collect();
    names.sort();
    names
}

fn network_view(n: &NetworkRecord, endpoints: Vec<String>) -> api::Network {
    api::Network {
        name: n.name.clone(),
        id: n.id,
        subnet: n.subnet.to_string(),
        gateway: n.gateway,
        mtu: n.mtu,
        endpoints,
    }
}
