//! Published ports: validated completely before anything changes, recorded (each in the
//! store's table of ports, naming its endpoint), then installed in the data plane (the allow
//! list before the port).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::Ipv4Addr,
};

use log::{info, warn};
use net_ebpf_common::{ENDPOINT_F_PUBLISHED, PublishKey, PublishTarget};

use super::{Agent, AgentError, Result};
use crate::{
    api::{self, PortSpec},
    datapath::PublishedEntry,
    publish::{self, PortSet},
    store::{
        Change, EndpointRecord, Mode, PortRecord, PublishedRecord, Transaction, port_key,
        port_key_addr, port_keys_on,
    },
};

/// Host sides planned in one request but not recorded yet, by [`port_key`], with the endpoint
/// each is for: what later ports of the same request must not clash with.
pub(super) type PlannedSides = BTreeMap<u64, String>;

impl Agent {
    /// The published ports `specs` would add to `record`, checked against every recorded port,
    /// those `planned` earlier in the same request, the masquerade port range and the host's
    /// own listeners (`sockets`, read once per request). Changes nothing: their ids are 0 until
    /// [`number_published`] gives them theirs in the transaction that records them. Each check
    /// is a lookup, so the cost does not grow with the ports the host has.
    pub(super) fn plan_publish(
        &self,
        record: &EndpointRecord,
        specs: &[PortSpec],
        allow: &[String],
        planned: &PlannedSides,
        sockets: &publish::HostSockets,
    ) -> Result<Vec<PublishedRecord>> {
        if specs.is_empty() {
            if !allow.is_empty() {
                return Err(AgentError::Invalid(
                    "--allow limits who may reach published ports; give --publish too".into(),
                ));
            }
            return Ok(Vec::new());
        }
        let target = match &record.mode {
            Mode::Host => {
                return Err(AgentError::Invalid(format!(
                    "endpoint {} uses the host's network stack (--net host): its ports are the \
                     host's already; --publish does not apply",
                    record.name
                )));
            }
            Mode::Container { owner } => {
                return Err(AgentError::Invalid(format!(
                    "endpoint {} shares the namespace of {owner}: publish the ports on {owner}",
                    record.name
                )));
            }
            Mode::None | Mode::Bridge => match record.interfaces.first() {
                Some(iface) if self.network(&iface.network)?.internal => {
                    return Err(AgentError::Invalid(format!(
                        "endpoint {}'s address {} is on internal network {}, which nothing \
                         outside the host reaches: ports cannot be published to it",
                        record.name, iface.ip, iface.network
                    )));
                }
                Some(iface) => iface.ip,
                None => {
                    return Err(AgentError::Invalid(format!(
                        "endpoint {} is on no network: there is no address to publish to",
                        record.name
                    )));
                }
            },
        };
        let allow = publish::parse_allow(allow).map_err(AgentError::Invalid)?;
        let (nat_min, nat_max) = self.config.nat_ports;
        let recorded = self.store.ports_view()?;
        let mut mine = PlannedSides::new();
        let mut out: Vec<PublishedRecord> = Vec::new();
        for spec in specs {
            for (host_port, port) in publish::expand(spec) {
                let side = (spec.host_ip, host_port, spec.proto);
                let shown = host_side(spec.host_ip, host_port, spec.proto);
                if (nat_min..=nat_max).contains(&host_port) {
                    return Err(AgentError::InUse(format!(
                        "cannot publish {shown}: host port {host_port} is in the masquerade \
                         source-port range {nat_min}-{nat_max} (agent flag --nat-ports)"
                    )));
                }
                if host_port == net_ebpf_common::VXLAN_PORT && spec.proto == api::Proto::Udp {
                    return Err(AgentError::InUse(format!(
                        "cannot publish {shown}: UDP port {host_port} carries the overlay's VXLAN \
                         traffic to this host"
                    )));
                }
                let owner = match recorded.on(spec.proto, host_port)?.into_iter().find(|p| {
                    publish::clashes(side, (p.port.host_ip, p.port.host_port, p.port.proto))
                }) {
                    Some(p) => Some(p.endpoint),
                    None => planned_clash(planned, side).map(str::to_owned),
                };
                if let Some(owner) = owner {
                    return Err(AgentError::InUse(format!(
                        "cannot publish {shown}: already published by endpoint {owner}"
                    )));
                }
                if planned_clash(&mine, side).is_some() {
                    return Err(AgentError::Invalid(format!("{shown} is given twice")));
                }
                if sockets.listens(spec.host_ip, host_port, spec.proto) {
                    return Err(AgentError::InUse(format!(
                        "cannot publish {shown}: a program on the host listens on that port"
                    )));
                }
                mine.insert(
                    port_key(spec.proto, host_port, spec.host_ip),
                    record.name.clone(),
                );
                out.push(PublishedRecord {
                    host_ip: spec.host_ip,
                    host_port,
                    proto: spec.proto,
                    ip: target,
                    port,
                    allow: allow.clone(),
                    id: 0,
                });
            }
        }
        Ok(out)
    }

    /// Reserves the host ports of `added` against the host's own ephemeral ports (see
    /// `publish::merge_reserved`) and releases those of `removed` that no recorded port uses
    /// any more (call it after the store has forgotten them); the host's other reservations
    /// stay. Writes only when the set changes.
    pub(super) fn update_reserved_ports(
        &mut self,
        added: &[PublishedRecord],
        removed: &[PublishedRecord],
    ) -> Result<()> {
        let mut now = self.reserved_ports.clone();
        for p in added {
            now.insert(p.host_port);
        }
        if !removed.is_empty() {
            let recorded = self.store.ports_view()?;
            for p in removed {
                if !recorded.port_in_use(p.host_port)? {
                    now.remove(p.host_port);
                }
            }
        }
        if now == self.reserved_ports {
            return Ok(());
        }
        self.write_reserved_ports(now)
    }

    /// Makes `ours` the host ports this agent reserves, keeping the host's other reservations.
    fn write_reserved_ports(&mut self, ours: PortSet) -> Result<()> {
        let io_err =
            |e: std::io::Error| AgentError::Invalid(format!("{}: {e}", publish::RESERVED_PORTS));
        let current = std::fs::read_to_string(publish::RESERVED_PORTS).map_err(io_err)?;
        let merged = publish::merge_reserved(&current, &self.reserved_ports, &ours)
            .map_err(|e| AgentError::Invalid(format!("{}: {e}", publish::RESERVED_PORTS)))?;
        // With a line end: an empty write would leave the list as it is, not empty it.
        std::fs::write(publish::RESERVED_PORTS, format!("{merged}\n")).map_err(io_err)?;
        self.reserved_ports = ours;
        Ok(())
    }

    /// Installs `published` in the data plane and marks their endpoint address.
    pub(super) fn install_published(&mut self, published: &[PublishedRecord]) -> Result<()> {
        for (n, p) in published.iter().enumerate() {
            if let Err(e) = self.datapath.maps().publish(&entry(p)) {
                self.uninstall_published(&published[..n]);
                return Err(e.into());
            }
            if self.published_ips.insert(p.ip) {
                self.datapath
                    .maps()
                    .set_endpoint_flag(p.ip, ENDPOINT_F_PUBLISHED, true)?;
            }
        }
        Ok(())
    }

    /// Removes `published` from the data plane; best effort (absent entries are fine).
    pub(super) fn uninstall_published(&mut self, published: &[PublishedRecord]) {
        for p in published {
            self.datapath.maps().unpublish(&entry(p));
        }
    }

    /// What goes with ports the store has forgotten (and the data plane no longer has): the
    /// published mark of addresses no recorded port goes to any more, and the reservation of
    /// host ports none uses.
    pub(super) fn forget_published(&mut self, forgotten: &[PublishedRecord]) -> Result<()> {
        self.unmark_published(forgotten);
        self.update_reserved_ports(&[], forgotten)
    }

    /// Clears the published mark of those addresses of `published` that no recorded port goes
    /// to any more (call it after the store has forgotten them).
    fn unmark_published(&mut self, published: &[PublishedRecord]) {
        let ips: BTreeSet<Ipv4Addr> = published.iter().map(|p| p.ip).collect();
        for ip in ips {
            match self.store.has_ports_to(ip) {
                Ok(true) => continue,
                Ok(false) => {}
                Err(e) => {
                    warn!("{ip}: reading its published ports: {e}");
                    continue;
                }
            }
            self.published_ips.remove(&ip);
            if let Err(e) = self
                .datapath
                .maps()
                .set_endpoint_flag(ip, ENDPOINT_F_PUBLISHED, false)
            {
                warn!("{ip}: clearing the published flag: {e}");
            }
        }
    }

    /// Makes the data plane's published ports match the store: installs every recorded one
    /// and removes what no record accounts for (left by an interrupted removal).
    pub(super) fn reconcile_published(&mut self) -> Result<()> {
        let recorded = self.store.ports()?;
        let wanted: HashMap<PublishKey, PublishedEntry> = recorded
            .iter()
            .map(|p| {
                let e = entry(&p.port);
                (e.key, e)
            })
            .collect();
        for present in self.datapath.maps().list_published()? {
            if !wanted.contains_key(&present.key) {
                warn!(
                    "removing orphaned published port {}",
                    u16::from_be_bytes(present.key.port)
                );
                self.datapath.maps().unpublish(&present);
            }
        }
        let ids: Vec<u32> = wanted.values().map(|w| w.target.id).collect();
        self.datapath.maps().remove_orphaned_allow(&ids);
        for w in wanted.values() {
            self.datapath.maps().publish(w)?;
        }
        self.published_ips = recorded.iter().map(|p| p.port.ip).collect();
        // What a previous run reserved is what the store publishes (or published until a
        // removal a crash interrupted, which the data plane no longer has either).
        self.reserved_ports = recorded.iter().map(|p| p.port.host_port).collect();
        let ours = self.reserved_ports.clone();
        self.write_reserved_ports(ours)
    }

    pub fn port_publish(
        &mut self,
        endpoint: &str,
        specs: &[PortSpec],
        allow: &[String],
    ) -> Result<Vec<api::PublishedPort>> {
        if specs.is_empty() {
            return Err(AgentError::Invalid(
                "give at least one port to publish".into(),
            ));
        }
        let record = self.endpoint(endpoint)?;
        let sockets = publish::HostSockets::read()?;
        let mut added = self.plan_publish(&record, specs, allow, &PlannedSides::new(), &sockets)?;
        // One commit: the ports' ids and their records.
        let txn = self.store.begin()?;
        number_published(&txn, &mut added)?;
        let records = port_records(endpoint, &added);
        txn.apply(&records.iter().map(Change::PutPort).collect::<Vec<_>>())?;
        txn.commit()?;
        let installed = self
            .install_published(&added)
            .and_then(|()| self.update_reserved_ports(&added, &[]));
        if let Err(e) = installed {
            self.uninstall_published(&added);
            // All or nothing: forget them again.
            self.store
                .apply(&records.iter().map(Change::DeletePort).collect::<Vec<_>>())?;
            // The request's own error is what the caller needs to see.
            if let Err(cleanup) = self.forget_published(&added) {
                warn!("undoing a refused publish: {cleanup}");
            }
            return Err(e);
        }
        for p in &added {
            info!("endpoint {endpoint}: published {}", describe(p));
        }
        Ok(added.iter().map(|p| view(endpoint, p)).collect())
    }

    pub fn port_unpublish(
        &mut self,
        endpoint: &str,
        specs: &[PortSpec],
    ) -> Result<Vec<api::PublishedPort>> {
        if specs.is_empty() {
            return Err(AgentError::Invalid(
                "give at least one port to unpublish".into(),
            ));
        }
        self.endpoint(endpoint)?;
        let recorded = self.store.ports_view()?;
        let mut removed: Vec<PortRecord> = Vec::new();
        let mut keys: HashSet<u64> = HashSet::new();
        for spec in specs {
            for host_port in spec.host_ports.0..=spec.host_ports.1 {
                let key = port_key(spec.proto, host_port, spec.host_ip);
                // Given twice in one request: the second finds it gone, as it will be.
                match recorded.get(key)?.filter(|_| keys.insert(key)) {
                    Some(p) if p.endpoint == endpoint => removed.push(p),
                    _ => {
                        return Err(AgentError::NotFound {
                            kind: "published port",
                            name: format!(
                                "{} of endpoint {endpoint}",
                                host_side(spec.host_ip, host_port, spec.proto)
                            ),
                        });
                    }
                }
            }
        }
        drop(recorded);
        self.store
            .apply(&removed.iter().map(Change::DeletePort).collect::<Vec<_>>())?;
        let removed: Vec<PublishedRecord> = removed.into_iter().map(|p| p.port).collect();
        // Existing connections keep their conntrack entries until they end, as with iptables;
        // new ones find no port.
        self.uninstall_published(&removed);
        self.forget_published(&removed)?;
        for p in &removed {
            info!("endpoint {endpoint}: unpublished {}", describe(p));
        }
        Ok(removed.iter().map(|p| view(endpoint, p)).collect())
    }

    pub fn port_list(&self, endpoint: Option<&str>) -> Result<Vec<api::PublishedPort>> {
        let recorded = match endpoint {
            Some(name) => self.ports_of(&self.endpoint(name)?)?,
            None => self.store.ports()?,
        };
        Ok(listed(recorded))
    }

    /// The ports published to `record`.
    pub(super) fn ports_of(&self, record: &EndpointRecord) -> Result<Vec<PortRecord>> {
        let mut ports = self.store.ports_to(&record.addresses())?;
        ports.retain(|p| p.endpoint == record.name);
        Ok(ports)
    }
}

/// Ports as `port ls` and `endpoint inspect` show them: by host port, then protocol and address.
pub(super) fn listed(recorded: Vec<PortRecord>) -> Vec<api::PublishedPort> {
    let mut ports: Vec<api::PublishedPort> = recorded
        .iter()
        .map(|p| view(&p.endpoint, &p.port))
        .collect();
    ports.sort_by_key(|p| (p.host_port, p.proto, p.host_ip));
    ports
}

/// The endpoint of a port in `planned` that `side` would clash with (by the rule recorded ports
/// follow, `publish::clashes`, among those on the same port number).
pub(super) fn planned_clash(
    planned: &PlannedSides,
    side: (Option<Ipv4Addr>, u16, api::Proto),
) -> Option<&str> {
    let (_, host_port, proto) = side;
    planned
        .range(port_keys_on(proto, host_port))
        .find(|(key, _)| publish::clashes(side, (port_key_addr(**key), host_port, proto)))
        .map(|(_, endpoint)| endpoint.as_str())
}

/// `published` as the store records them, for `endpoint`.
pub(super) fn port_records(endpoint: &str, published: &[PublishedRecord]) -> Vec<PortRecord> {
    published
        .iter()
        .map(|p| PortRecord {
            endpoint: endpoint.to_owned(),
            port: p.clone(),
        })
        .collect()
}

/// The counter of published ports' ids, which name their allow lists in the data plane.
const PUBLISHED_IDS: &str = "published";

/// Gives the ports `plan_publish` planned their ids, in `txn`, the transaction that records
/// them: an id is durable with its port's record or was never handed out, and the data plane
/// sees it only after that commit.
pub(super) fn number_published(txn: &Transaction, published: &mut [PublishedRecord]) -> Result<()> {
    let count = u32::try_from(published.len())
        .map_err(|_| AgentError::Invalid("too many ports in one request".into()))?;
    for (p, id) in published
        .iter_mut()
        .zip(txn.next_ids(PUBLISHED_IDS, count)?)
    {
        p.id = id;
    }
    Ok(())
}

/// The data plane's form of a published port.
fn entry(p: &PublishedRecord) -> PublishedEntry {
    PublishedEntry {
        key: PublishKey {
            addr: p.host_ip.unwrap_or(Ipv4Addr::UNSPECIFIED).octets(),
            port: p.host_port.to_be_bytes(),
            proto: p.proto.number(),
            _pad: 0,
        },
        target: PublishTarget {
            addr: p.ip.octets(),
            port: p.port.to_be_bytes(),
            flags: 0,
            _pad: 0,
            id: p.id,
        },
        allow: p.allow.clone(),
    }
}

pub(super) fn view(endpoint: &str, p: &PublishedRecord) -> api::PublishedPort {
    api::PublishedPort {
        endpoint: endpoint.to_owned(),
        host_ip: p.host_ip,
        host_port: p.host_port,
        proto: p.proto,
        ip: p.ip,
        port: p.port,
        allow: p.allow.iter().map(|n| n.to_string()).collect(),
    }
}

/// `[HOSTIP:]PORT/PROTO`, as users write the host side.
fn host_side(host_ip: Option<Ipv4Addr>, port: u16, proto: api::Proto) -> String {
    match host_ip {
        Some(ip) => format!("{ip}:{port}/{}", proto.name()),
        None => format!("{port}/{}", proto.name()),
    }
}

fn describe(p: &PublishedRecord) -> String {
    format!(
        "{} -> {}:{}",
        host_side(p.host_ip, p.host_port, p.proto),
        p.ip,
        p.port
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::Proto;

    #[test]
    fn planned_ports_clash_as_recorded_ones_do() {
        let one = Ipv4Addr::new(192, 0, 2, 1);
        let two = Ipv4Addr::new(192, 0, 2, 2);
        let mut planned = PlannedSides::new();
        planned.insert(port_key(Proto::Tcp, 8080, Some(one)), "web".into());
        planned.insert(port_key(Proto::Tcp, 9090, None), "api".into());
        // Every address clashes with one address's port, and the other way round.
        assert_eq!(
            planned_clash(&planned, (None, 8080, Proto::Tcp)),
            Some("web")
        );
        assert_eq!(
            planned_clash(&planned, (Some(two), 9090, Proto::Tcp)),
            Some("api")
        );
        // The same address clashes; another does not.
        assert_eq!(
            planned_clash(&planned, (Some(one), 8080, Proto::Tcp)),
            Some("web")
        );
        assert_eq!(planned_clash(&planned, (Some(two), 8080, Proto::Tcp)), None);
        // Another protocol or port never does.
        assert_eq!(planned_clash(&planned, (None, 8080, Proto::Udp)), None);
        assert_eq!(planned_clash(&planned, (None, 8081, Proto::Tcp)), None);
        assert_eq!(planned_clash(&planned, (Some(one), 9091, Proto::Tcp)), None);
        // The same rule as for recorded ports.
        for side in [
            (None, 8080, Proto::Tcp),
            (Some(one), 8080, Proto::Tcp),
            (Some(two), 8080, Proto::Tcp),
            (Some(two), 9090, Proto::Tcp),
            (None, 9090, Proto::Udp),
        ] {
            let by_rule = publish::clashes(side, (Some(one), 8080, Proto::Tcp))
                || publish::clashes(side, (None, 9090, Proto::Tcp));
            assert_eq!(planned_clash(&planned, side).is_some(), by_rule, "{side:?}");
        }
    }
}
