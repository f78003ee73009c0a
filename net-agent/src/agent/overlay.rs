//! The cross-host overlay, as Flannel runs its control plane: overlay networks are defined once
//! in the cluster store; every agent leases one subnet of each network's pool for its host,
//! keeps it renewed, and turns the other hosts' leases into `REMOTE_ROUTES` entries (subnet ->
//! VTEP and VNI) for the data plane. [`Agent::cluster_sync`] does all of it and runs whenever
//! the store says something changed and once a second; when the store cannot be reached it
//! changes nothing, so existing routes and traffic carry on, and it catches up once the store
//! answers again.
//!
//! Names travel the same way: each agent publishes the names of its endpoints on each overlay
//! network ([`HostNames`]) and reads everyone else's, so that an endpoint's name resolves on
//! every host of its network. A host's names are trusted only while it holds a lease on the
//! network, and only for addresses in its subnet ([`trusted_names`]).

use std::{collections::BTreeMap, net::Ipv4Addr, time::Duration};

use ipnetwork::Ipv4Network;
use log::{debug, info, warn};
use net_ebpf_common::{OVERLAY_NETWORK_ID, RouteInfo, VXLAN_OVERHEAD};

use super::{Agent, AgentError, Result, network_view};
use crate::{
    api,
    cluster::{ClusterError, EndpointName, HostNames, Lease, OverlayNetwork},
    ipam,
    store::{Change, NetworkRecord, OverlayRecord},
};

/// Leases are renewed once this fraction of their TTL is left (a third: two chances to renew
/// before they run out, also with a store that answers slowly).
const RENEW_WHEN_LEFT: u32 = 3;

impl Agent {
    /// The VXLAN device's name: one per agent, so agents sharing a machine never collide.
    fn vxlan_name(&self) -> String {
        format!("{}-vxlan", self.config.name_prefix)
    }

    /// `network create --driver overlay`: defines the network in the cluster store (or finds
    /// it defined as asked) and brings it up on this host.
    pub async fn overlay_create(
        &mut self,
        name: &str,
        pool: &str,
        subnet_len: Option<u8>,
        mtu: Option<u32>,
    ) -> Result<api::Network> {
        ipam::check_name("network", name).map_err(AgentError::Invalid)?;
        let pool = ipam::parse_subnet(pool)?;
        if let Some(mtu) = mtu {
            ipam::check_mtu(mtu).map_err(AgentError::Invalid)?;
        }
        let store = self.cluster_store()?;
        if self.nat.is_none() {
            return Err(AgentError::Invalid(
                "an overlay network needs the host's uplink address as its VTEP: start the \
                 agent with --uplink (or a default route)"
                    .into(),
            ));
        }
        if let Some(existing) = self.networks()?.get(name)
            && existing.overlay.is_none()
        {
            return Err(AgentError::Exists {
                kind: "network",
                name: name.to_owned(),
            });
        }
        let subnet_len = subnet_len.unwrap_or(crate::cluster::DEFAULT_SUBNET_LEN);
        store
            .define_network(name, pool, subnet_len, mtu)
            .await
            .map_err(cluster_err)?;
        self.cluster_sync().await?;
        let network = self.network(name)?;
        let endpoints = self.store.endpoints()?;
        Ok(network_view(
            &network,
            super::endpoints_on(&endpoints, name),
        ))
    }

    /// `network rm` of an overlay network: refused while this host has endpoints on it;
    /// otherwise it goes from the cluster (every host's lease with it) and from this host.
    pub async fn overlay_remove(&mut self, name: &str) -> Result<()> {
        let store = self.cluster_store()?;
        let leases = store.leases(name).await.map_err(cluster_err)?;
        for lease in &leases {
            store.release_lease(lease).await.map_err(cluster_err)?;
        }
        store.remove_network(name).await.map_err(cluster_err)?;
        self.leases.remove(name);
        self.store.apply(&[Change::DeleteNetwork(name)])?;
        self.cluster_sync().await?;
        info!("overlay network {name} removed from the cluster");
        Ok(())
    }

    /// Change notifications of the cluster store, if there is one.
    pub fn cluster_changes(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        self.cluster.as_ref().map(|c| c.watch())
    }

    /// Notified when the background cluster sync should run before its next tick.
    pub fn sync_wanted(&self) -> std::sync::Arc<tokio::sync::Notify> {
        self.sync_wanted.clone()
    }

    fn cluster_store(&self) -> Result<std::sync::Arc<dyn crate::cluster::ClusterStore>> {
        self.cluster
            .clone()
            .ok_or_else(|| AgentError::Invalid("this agent has no cluster store".into()))
    }

    /// Brings this host in line with the cluster store (see `ClusterPlan::fetch` and
    /// [`Agent::apply_cluster`]), holding the agent throughout: for requests that changed the
    /// cluster and want the result at once. The background loop fetches without the agent, so
    /// that a slow or unreachable store never holds up the API.
    pub async fn cluster_sync(&mut self) -> Result<()> {
        let Some(plan) = self.cluster_plan()? else {
            return Ok(());
        };
        let view = plan.fetch().await?;
        self.apply_cluster(view).await
    }

    /// What a fetch from the store needs to know of this agent; `None` without a store or an
    /// uplink (no VTEP).
    pub fn cluster_plan(&self) -> Result<Option<ClusterPlan>> {
        let (Some(store), Some(vtep)) = (self.cluster.clone(), self.nat.as_ref().map(|u| u.ip))
        else {
            return Ok(None);
        };
        let overlays: BTreeMap<String, Ipv4Network> = self
            .networks()?
            .into_values()
            .filter(|n| n.overlay.is_some())
            .map(|n| (n.name, n.subnet))
            .collect();
        let mut names: BTreeMap<String, Vec<EndpointName>> =
            overlays.keys().map(|n| (n.clone(), Vec::new())).collect();
        for e in self.store.endpoints()? {
            for i in &e.interfaces {
                if let Some(list) = names.get_mut(&i.network) {
                    list.push(EndpointName {
                        name: e.name.clone(),
                        aliases: i.aliases.clone(),
                        ip: i.ip,
                    });
                }
            }
        }
        for list in names.values_mut() {
            list.sort();
        }
        Ok(Some(ClusterPlan {
            store,
            host: self.config.host_name.clone(),
            vtep,
            ttl: self.config.lease_ttl,
            leases: self.leases.clone(),
            local_subnets: overlays,
            names,
            generation: self.cluster_generation,
        }))
    }

    /// Applies what `ClusterPlan::fetch` found: a local network for every overlay network,
    /// local networks of removed ones gone (unless endpoints still use them), and
    /// `REMOTE_ROUTES` holding exactly the leases.
    pub async fn apply_cluster(&mut self, view: ClusterView) -> Result<()> {
        if view.generation != self.cluster_generation {
            // Fetched before another view was applied (a request's own sync): it may not know
            // what that request did. Fetch again instead.
            debug!("dropping a cluster view older than the one applied");
            self.sync_wanted.notify_one();
            return Ok(());
        }
        // Counted before any change: a view applied only in part still outdates older ones.
        self.cluster_generation += 1;
        let mut local = self.networks()?;
        for (def, lease) in view.defs.iter().zip(&view.own) {
            self.leases.insert(def.name.clone(), lease.clone());
            if let Err(e) = self.ensure_overlay_network(def, lease, &mut local).await {
                warn!("overlay network {}: {e}", def.name);
            }
        }
        // Networks the cluster no longer defines.
        let gone: Vec<NetworkRecord> = local
            .values()
            .filter(|n| n.overlay.is_some() && !view.defs.iter().any(|d| d.name == n.name))
            .cloned()
            .collect();
        if !gone.is_empty() {
            let endpoints = self.store.endpoints()?;
            for n in gone {
                let users = super::endpoints_on(&endpoints, &n.name);
                if users.is_empty() {
                    self.store.apply(&[Change::DeleteNetwork(&n.name)])?;
                    local.remove(&n.name);
                    self.leases.remove(&n.name);
                    info!("overlay network {} left the cluster: removed here", n.name);
                } else {
                    warn!(
                        "overlay network {} left the cluster, but endpoints {} still use it here",
                        n.name,
                        users.join(", ")
                    );
                }
            }
        }
        let routes = routes_for(&view.defs, &view.leases);
        self.datapath.maps().sync_routes(&routes)?;
        // This host's overlay networks as they now are (`local` follows every change above).
        let overlays: Vec<String> = local
            .into_values()
            .filter(|n| n.overlay.is_some())
            .map(|n| n.name)
            .collect();
        let remote = trusted_names(&view.names, &view.leases, &self.config.host_name, &overlays);
        if remote != self.remote_names {
            self.remote_names = remote;
            // Other hosts' names changed, not this host's: no sync to wake.
            self.rebuild_dns_view()?;
        }
        Ok(())
    }

    /// The local network of overlay network `def` on `lease`'s subnet, and the VXLAN device.
    async fn ensure_overlay_network(
        &mut self,
        def: &OverlayNetwork,
        lease: &Lease,
        local: &mut BTreeMap<String, NetworkRecord>,
    ) -> Result<()> {
        let uplink_mtu = self.uplink_mtu().await?;
        let mtu = def.mtu.unwrap_or(uplink_mtu.saturating_sub(VXLAN_OVERHEAD));
        self.ensure_vxlan(uplink_mtu.saturating_sub(VXLAN_OVERHEAD))
            .await?;
        match local.get(&def.name) {
            Some(n) if n.overlay.is_none() => Err(AgentError::Exists {
                kind: "local network with the overlay network's name",
                name: def.name.clone(),
            }),
            Some(n) if n.subnet != lease.subnet => Err(AgentError::InUse(format!(
                "this host's lease moved from {} to {}: its endpoints keep their addresses \
                 until they are recreated",
                n.subnet, lease.subnet
            ))),
            Some(_) => Ok(()),
            None => {
                if let Some((other, other_subnet)) = ipam::overlapping(
                    lease.subnet,
                    local.values().map(|n| (n.name.as_str(), n.subnet)),
                ) {
                    return Err(AgentError::Invalid(format!(
                        "leased subnet {} overlaps subnet {other_subnet} of network {other}",
                        lease.subnet
                    )));
                }
                let gateway = ipam::choose_gateway(lease.subnet, None)?;
                let record = NetworkRecord {
                    name: def.name.clone(),
                    id: OVERLAY_NETWORK_ID | def.vni,
                    subnet: lease.subnet,
                    gateway,
                    mtu,
                    masquerade: true,
                    icc: true,
                    internal: false,
                    overlay: Some(OverlayRecord {
                        pool: def.pool,
                        vni: def.vni,
                    }),
                };
                self.store.apply(&[Change::PutNetwork(&record)])?;
                info!(
                    "overlay network {} here: {} gateway {gateway} mtu {mtu} vni {}",
                    def.name, lease.subnet, def.vni
                );
                local.insert(record.name.clone(), record);
                Ok(())
            }
        }
    }

    async fn uplink_mtu(&self) -> Result<u32> {
        let Some(super::Uplink { name: uplink, .. }) = &self.nat else {
            return Err(AgentError::Invalid("no uplink".into()));
        };
        let link = self
            .netlink
            .link_by_name(uplink)
            .await?
            .ok_or_else(|| AgentError::Invalid(format!("uplink {uplink} is gone")))?;
        Ok(link.mtu)
    }

    /// The VXLAN device, with the overlay program attached and its ifindex in the data plane.
    async fn ensure_vxlan(&mut self, mtu: u32) -> Result<()> {
        if self.vxlan_ifindex.is_some() {
            return Ok(());
        }
        let name = self.vxlan_name();
        let ifindex = self.netlink.ensure_vxlan(&name, mtu).await?;
        self.datapath.attach_overlay(&name)?;
        self.datapath.maps().set_vxlan_ifindex(ifindex)?;
        self.vxlan_ifindex = Some(ifindex);
        Ok(())
    }

    pub(super) async fn overlay_status(&self) -> Result<api::OverlayStatus> {
        let (drops, vxlan_rx_packets) = match self.vxlan_ifindex {
            Some(ifindex) => (
                self.datapath.maps_ref().endpoint_counters(ifindex)?.2,
                self.netlink.rx_packets(ifindex, &self.vxlan_name()).await?,
            ),
            None => (Vec::new(), None),
        };
        Ok(api::OverlayStatus {
            host_name: self.config.host_name.clone(),
            store: self.config.store.clone(),
            vxlan: self.vxlan_ifindex.map(|_| self.vxlan_name()),
            vxlan_rx_packets,
            drops,
        })
    }

    /// `netctl host ls`: every host's leases.
    pub async fn host_list(&self) -> Result<Vec<api::HostLease>> {
        let store = self.cluster_store()?;
        let now = crate::cluster::now_unix_ms();
        let mut hosts: Vec<api::HostLease> = store
            .all_leases()
            .await
            .map_err(cluster_err)?
            .into_iter()
            .map(|l| api::HostLease {
                this_host: l.host == self.config.host_name,
                host: l.host,
                network: l.network,
                subnet: l.subnet.to_string(),
                vtep: l.vtep,
                expires_in_secs: l.expires_unix_ms.saturating_sub(now) / 1000,
            })
            .collect();
        hosts.sort_by(|a, b| (&a.host, &a.network).cmp(&(&b.host, &b.network)));
        Ok(hosts)
    }
}

/// Everything a fetch from the cluster store needs, taken from the agent so that the store can
/// be asked without holding the agent.
pub struct ClusterPlan {
    store: std::sync::Arc<dyn crate::cluster::ClusterStore>,
    host: String,
    vtep: Ipv4Addr,
    ttl: Duration,
    /// This host's leases as last known, by network.
    leases: std::collections::HashMap<String, Lease>,
    /// The subnets of this host's overlay networks, by name: what to ask for again.
    local_subnets: BTreeMap<String, Ipv4Network>,
    /// The names of this host's endpoints on each of its overlay networks, sorted.
    names: BTreeMap<String, Vec<EndpointName>>,
    /// `Agent::cluster_generation` when the plan was taken.
    generation: u64,
}

/// What the cluster store says, for [`Agent::apply_cluster`].
pub struct ClusterView {
    pub defs: Vec<OverlayNetwork>,
    /// This host's lease on each of `defs`, in order.
    pub own: Vec<Lease>,
    /// Every unexpired lease.
    pub leases: Vec<Lease>,
    /// Every host's published names, this one's as written by this fetch.
    pub names: Vec<HostNames>,
    /// The plan's generation (see `Agent::cluster_generation`).
    generation: u64,
}

impl ClusterPlan {
    /// Reads the networks, renews or takes this host's lease on each, reads every lease, and
    /// brings this host's names records in line with its endpoints.
    pub async fn fetch(self) -> Result<ClusterView> {
        let defs = self.store.networks().await.map_err(cluster_err)?;
        let mut own = Vec::with_capacity(defs.len());
        for def in &defs {
            own.push(self.own_lease(def).await?);
        }
        let leases = self.store.all_leases().await.map_err(cluster_err)?;
        let mut names = self.store.all_names().await.map_err(cluster_err)?;
        // What the store holds of this host decides what to write, not what this agent last
        // wrote: a record can go from under it (a released lease takes it along; a request's
        // sync can overtake this one), and it must come back.
        for def in &defs {
            let Some(mine) = self.names.get(&def.name) else {
                // Not made here yet: `apply_cluster` makes the network, the next fetch its names.
                continue;
            };
            let stored = names
                .iter()
                .position(|r| r.network == def.name && r.host == self.host);
            if stored.map_or(mine.is_empty(), |i| &names[i].names == mine) {
                continue;
            }
            let record = HostNames {
                network: def.name.clone(),
                host: self.host.clone(),
                names: mine.clone(),
            };
            match self.store.put_names(&record).await {
                Ok(()) => {}
                // Removed since it was read: nothing to name there any more.
                Err(ClusterError::NetworkNotFound { .. }) => continue,
                Err(e) => return Err(cluster_err(e)),
            }
            match (stored, mine.is_empty()) {
                (Some(i), true) => {
                    names.remove(i);
                }
                (Some(i), false) => names[i] = record,
                (None, _) => names.push(record),
            }
        }
        Ok(ClusterView {
            defs,
            own,
            leases,
            names,
            generation: self.generation,
        })
    }

    /// This host's lease on `def`: the one held, renewed once a third of its TTL is left (or
    /// taken again if it was lost), or a new one, preferring the subnet the local network
    /// already has (a restarting agent gets its own subnet back).
    async fn own_lease(&self, def: &OverlayNetwork) -> Result<Lease> {
        let (store, host, vtep, ttl) = (&self.store, &self.host, self.vtep, self.ttl);
        let now = crate::cluster::now_unix_ms();
        let renew_at = (ttl / RENEW_WHEN_LEFT).as_millis() as u64;
        match self.leases.get(&def.name) {
            Some(l) if l.vtep == vtep && l.expires_unix_ms > now + renew_at => Ok(l.clone()),
            Some(l) if l.vtep == vtep => match store.renew_lease(l, ttl).await {
                Ok(renewed) => Ok(renewed),
                Err(ClusterError::LeaseLost { .. }) => {
                    warn!(
                        "lease of {} on {} was lost; leasing again",
                        l.subnet, def.name
                    );
                    store
                        .acquire_lease(def, host, vtep, Some(l.subnet), ttl)
                        .await
                        .map_err(cluster_err)
                }
                Err(e) => Err(cluster_err(e)),
            },
            _ => {
                let prefer = self.local_subnets.get(&def.name).copied();
                let lease = store
                    .acquire_lease(def, host, vtep, prefer, ttl)
                    .await
                    .map_err(cluster_err)?;
                info!(
                    "overlay network {}: leased {} for {host} at {vtep}",
                    def.name, lease.subnet
                );
                Ok(lease)
            }
        }
    }
}

/// The names of `all` that this host (`own_host`) may resolve: other hosts' names on one of
/// this host's `overlays` where they hold one of `leases` (unexpired), and of those only the
/// addresses in the leased subnet. A record outlives a host that stopped without releasing its
/// lease, and any host may write any record; neither may put a name on an address that is not
/// that host's to give. And a bridge network here that has the name of an overlay network
/// elsewhere (which is then not made here) sees none of its names.
pub fn trusted_names(
    all: &[HostNames],
    leases: &[Lease],
    own_host: &str,
    overlays: &[String],
) -> Vec<HostNames> {
    all.iter()
        .filter(|r| r.host != own_host && overlays.contains(&r.network))
        .filter_map(|r| {
            let subnet = leases
                .iter()
                .find(|l| l.network == r.network && l.host == r.host)?
                .subnet;
            let names: Vec<EndpointName> = r
                .names
                .iter()
                .filter(|n| subnet.contains(n.ip))
                .cloned()
                .collect();
            (!names.is_empty()).then(|| HostNames { names, ..r.clone() })
        })
        .collect()
}

/// `REMOTE_ROUTES` for `defs` and `leases`: each pool as unreachable, and each leased subnet to
/// its holder's VTEP (this host's own too: the data plane leaves traffic to its own VTEP's
/// subnet to the host, so the pool's "unreachable" does not cover it).
pub fn routes_for(defs: &[OverlayNetwork], leases: &[Lease]) -> Vec<(Ipv4Network, RouteInfo)> {
    let mut routes = Vec::new();
    for def in defs {
        routes.push((
            def.pool,
            RouteInfo {
                vtep: [0; 4],
                vni: def.vni,
            },
        ));
        for lease in leases.iter().filter(|l| l.network == def.name) {
            routes.push((
                lease.subnet,
                RouteInfo {
                    vtep: lease.vtep.octets(),
                    vni: def.vni,
                },
            ));
        }
    }
    routes
}

fn cluster_err(e: ClusterError) -> AgentError {
    AgentError::Cluster(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_trusted_from_lease_holders_for_their_subnet_only() {
        let name = |name: &str, ip: &str| EndpointName {
            name: name.into(),
            aliases: Vec::new(),
            ip: ip.parse().unwrap(),
        };
        let record = |network: &str, host: &str, names: Vec<EndpointName>| HostNames {
            network: network.into(),
            host: host.into(),
            names,
        };
        let lease = |network: &str, host: &str, subnet: &str| Lease {
            network: network.into(),
            subnet: subnet.parse().unwrap(),
            host: host.into(),
            vtep: "192.0.2.1".parse().unwrap(),
            expires_unix_ms: u64::MAX,
        };
        let leases = [
            lease("ov", "me", "10.244.0.0/24"),
            lease("ov", "two", "10.244.1.0/24"),
            lease("other", "three", "10.245.3.0/24"),
        ];
        let all = [
            // Our own: resolved from the local store, not from here.
            record("ov", "me", vec![name("mine", "10.244.0.2")]),
            // One address in its subnet, one claiming a neighbour's.
            record(
                "ov",
                "two",
                vec![name("web", "10.244.1.2"), name("spoof", "10.244.0.2")],
            ),
            // No lease on ov (gone, or never held): nothing.
            record("ov", "three", vec![name("stale", "10.244.3.2")]),
            record("other", "three", vec![name("db", "10.245.3.2")]),
        ];
        let overlays = ["ov".to_owned(), "other".to_owned()];
        assert_eq!(
            trusted_names(&all, &leases, "me", &overlays),
            vec![
                record("ov", "two", vec![name("web", "10.244.1.2")]),
                record("other", "three", vec![name("db", "10.245.3.2")]),
            ]
        );
        // "other" is a bridge network here: nothing of the overlay network of that name.
        assert_eq!(
            trusted_names(&all, &leases, "me", &overlays[..1]),
            vec![record("ov", "two", vec![name("web", "10.244.1.2")])]
        );
    }

    #[test]
    fn routes_cover_the_pool_and_every_hosts_subnet() {
        let def = OverlayNetwork {
            name: "ov".into(),
            pool: "10.244.0.0/16".parse().unwrap(),
            subnet_len: 24,
            vni: 7,
            mtu: None,
        };
        let lease = |host: &str, subnet: &str, vtep: [u8; 4]| Lease {
            network: "ov".into(),
            subnet: subnet.parse().unwrap(),
            host: host.into(),
            vtep: Ipv4Addr::from(vtep),
            expires_unix_ms: u64::MAX,
        };
        let leases = [
            lease("h1", "10.244.0.0/24", [198, 18, 0, 1]),
            lease("h2", "10.244.1.0/24", [198, 18, 0, 2]),
        ];
        let routes = routes_for(&[def], &leases);
        assert_eq!(
            routes
                .iter()
                .map(|(n, r)| (n.to_string(), r.vtep, r.vni))
                .collect::<Vec<_>>(),
            [
                ("10.244.0.0/16".to_string(), [0, 0, 0, 0], 7),
                ("10.244.0.0/24".to_string(), [198, 18, 0, 1], 7),
                ("10.244.1.0/24".to_string(), [198, 18, 0, 2], 7),
            ]
        );
    }
}
