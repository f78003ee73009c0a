//! Published ports: validated completely before anything changes, recorded with their
//! endpoint, then installed in the data plane (the allow list before the port).

use std::net::Ipv4Addr;

use log::{info, warn};
use net_ebpf_common::{ENDPOINT_F_PUBLISHED, PublishKey, PublishTarget};

use super::{Agent, AgentError, Result};
use crate::{
    api::{self, PortSpec},
    datapath::PublishedEntry,
    publish,
    store::{Change, EndpointRecord, Mode, PublishedRecord, Transaction},
};

impl Agent {
    /// The published ports `specs` would add to `record`, checked against every endpoint's
    /// (`endpoints`), the masquerade port range and the host's own listeners. Changes nothing:
    /// their ids are 0 until [`number_published`] gives them theirs in the transaction that
    /// records them.
    pub(super) fn plan_publish(
        &self,
        record: &EndpointRecord,
        endpoints: &[EndpointRecord],
        specs: &[PortSpec],
        allow: &[String],
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
        let taken: Vec<(&str, &PublishedRecord)> = endpoints
            .iter()
            .chain(std::iter::once(record))
            .flat_map(|e| e.published.iter().map(move |p| (e.name.as_str(), p)))
            .collect();
        let sockets = publish::HostSockets::read()?;
        let mut planned: Vec<PublishedRecord> = Vec::new();
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
                if let Some((owner, _)) = taken
                    .iter()
                    .find(|(_, p)| publish::clashes(side, (p.host_ip, p.host_port, p.proto)))
                {
                    return Err(AgentError::InUse(format!(
                        "cannot publish {shown}: already published by endpoint {owner}"
                    )));
                }
                if planned
                    .iter()
                    .any(|p| publish::clashes(side, (p.host_ip, p.host_port, p.proto)))
                {
                    return Err(AgentError::Invalid(format!("{shown} is given twice")));
                }
                if sockets.listens(spec.host_ip, host_port, spec.proto) {
                    return Err(AgentError::InUse(format!(
                        "cannot publish {shown}: a program on the host listens on that port"
                    )));
                }
                planned.push(PublishedRecord {
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
        Ok(planned)
    }

    /// Reserves every published host port against the host's own ephemeral ports (see
    /// `publish::merge_reserved`), releasing the ones no longer published; the host's other
    /// reservations stay.
    pub(super) fn sync_reserved_ports(&mut self, endpoints: &[EndpointRecord]) -> Result<()> {
        let now: std::collections::BTreeSet<u16> = endpoints
            .iter()
            .flat_map(|e| e.published.iter().map(|p| p.host_port))
            .collect();
        let io_err =
            |e: std::io::Error| AgentError::Invalid(format!("{}: {e}", publish::RESERVED_PORTS));
        let current = std::fs::read_to_string(publish::RESERVED_PORTS).map_err(io_err)?;
        let merged = publish::merge_reserved(&current, &self.reserved_ports, &now)
            .map_err(|e| AgentError::Invalid(format!("{}: {e}", publish::RESERVED_PORTS)))?;
        // With a line end: an empty write would leave the list as it is, not empty it.
        std::fs::write(publish::RESERVED_PORTS, format!("{merged}\n")).map_err(io_err)?;
        self.reserved_ports = now;
        Ok(())
    }

    /// Installs `published` in the data plane and marks their endpoint address.
    pub(super) fn install_published(&mut self, published: &[PublishedRecord]) -> Result<()> {
        for (n, p) in published.iter().enumerate() {
            if let Err(e) = self.datapath.maps().publish(&entry(p)) {
                self.uninstall_published(&published[..n]);
                return Err(e.into());
            }
            self.published_ips.insert(p.ip);
            self.datapath
                .maps()
                .set_endpoint_flag(p.ip, ENDPOINT_F_PUBLISHED, true)?;
        }
        Ok(())
    }

    /// Removes `published` from the data plane; best effort (absent entries are fine).
    pub(super) fn uninstall_published(&mut self, published: &[PublishedRecord]) {
        for p in published {
            self.datapath.maps().unpublish(&entry(p));
        }
    }

    /// Recomputes which endpoint addresses have published ports, from `endpoints`, and fixes
    /// their map entries' flag.
    pub(super) fn refresh_published_flags(&mut self, endpoints: &[EndpointRecord]) {
        let now: std::collections::HashSet<Ipv4Addr> = endpoints
            .iter()
            .flat_map(|e| e.published.iter().map(|p| p.ip))
            .collect();
        let gone: Vec<Ipv4Addr> = self.published_ips.difference(&now).copied().collect();
        for ip in gone {
            if let Err(e) = self
                .datapath
                .maps()
                .set_endpoint_flag(ip, ENDPOINT_F_PUBLISHED, false)
            {
                warn!("{ip}: clearing the published flag: {e}");
            }
        }
        self.published_ips = now;
    }

    /// Makes the data plane's published ports match the store: installs every recorded one
    /// and removes what no record accounts for (left by an interrupted removal).
    pub(super) fn reconcile_published(&mut self, endpoints: &[EndpointRecord]) -> Result<()> {
        let wanted: Vec<PublishedEntry> = endpoints
            .iter()
            .flat_map(|e| e.published.iter().map(entry))
            .collect();
        for present in self.datapath.maps().list_published()? {
            if !wanted.iter().any(|w| w.key == present.key) {
                warn!(
                    "removing orphaned published port {}",
                    u16::from_be_bytes(present.key.port)
                );
                self.datapath.maps().unpublish(&present);
            }
        }
        let ids: Vec<u32> = wanted.iter().map(|w| w.target.id).collect();
        self.datapath.maps().remove_orphaned_allow(&ids);
        for w in &wanted {
            self.datapath.maps().publish(w)?;
        }
        self.published_ips = endpoints
            .iter()
            .flat_map(|e| e.published.iter().map(|p| p.ip))
            .collect();
        // What a previous run reserved is what the store publishes (or published until a
        // removal a crash interrupted, which the data plane no longer has either).
        self.reserved_ports = endpoints
            .iter()
            .flat_map(|e| e.published.iter().map(|p| p.host_port))
            .collect();
        self.sync_reserved_ports(endpoints)
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
        let mut record = self.endpoint(endpoint)?;
        let others: Vec<EndpointRecord> = self
            .store
            .endpoints()?
            .into_iter()
            .filter(|e| e.name != endpoint)
            .collect();
        let planned = self.plan_publish(&record, &others, specs, allow)?;
        record.published.extend(planned);
        // One commit: the ports' ids and the record that holds them.
        let txn = self.store.begin()?;
        let added = number_published(&txn, &mut record.published)?;
        txn.apply(&[Change::PutEndpoint(&record)])?;
        txn.commit()?;
        let installed = self.install_published(&added).and_then(|()| {
            let endpoints = self.store.endpoints()?;
            self.sync_reserved_ports(&endpoints)
        });
        if let Err(e) = installed {
            self.uninstall_published(&added);
            // All or nothing: forget them again.
            record.published.retain(|p| !added.contains(p));
            self.store.apply(&[Change::PutEndpoint(&record)])?;
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
        let mut record = self.endpoint(endpoint)?;
        let mut removed = Vec::new();
        for spec in specs {
            for host_port in spec.host_ports.0..=spec.host_ports.1 {
                let Some(position) = record.published.iter().position(|p| {
                    p.host_ip == spec.host_ip && p.host_port == host_port && p.proto == spec.proto
                }) else {
                    return Err(AgentError::NotFound {
                        kind: "published port",
                        name: format!(
                            "{} of endpoint {endpoint}",
                            host_side(spec.host_ip, host_port, spec.proto)
                        ),
                    });
                };
                removed.push(record.published.remove(position));
            }
        }
        self.store.apply(&[Change::PutEndpoint(&record)])?;
        // Existing connections keep their conntrack entries until they end, as with iptables;
        // new ones find no port.
        self.uninstall_published(&removed);
        let endpoints = self.store.endpoints()?;
        self.refresh_published_flags(&endpoints);
        self.sync_reserved_ports(&endpoints)?;
        for p in &removed {
            info!("endpoint {endpoint}: unpublished {}", describe(p));
        }
        Ok(removed.iter().map(|p| view(endpoint, p)).collect())
    }

    pub fn port_list(&self, endpoint: Option<&str>) -> Result<Vec<api::PublishedPort>> {
        let endpoints = match endpoint {
            Some(name) => vec![self.endpoint(name)?],
            None => self.store.endpoints()?,
        };
        let mut ports: Vec<api::PublishedPort> = endpoints
            .iter()
            .flat_map(|e| e.published.iter().map(|p| view(&e.name, p)))
            .collect();
        ports.sort_by_key(|p| (p.host_port, p.proto, p.host_ip));
        Ok(ports)
    }
}

/// The counter of published ports' ids, which name their allow lists in the data plane.
const PUBLISHED_IDS: &str = "published";

/// Gives the ports of `published` that `plan_publish` planned (id 0; recorded ones have theirs)
/// their ids, in `txn`, the transaction that records them: an id is durable with its port's
/// record or was never handed out, and the data plane sees it only after that commit. Returns
/// the ports it numbered.
pub(super) fn number_published(
    txn: &Transaction,
    published: &mut [PublishedRecord],
) -> Result<Vec<PublishedRecord>> {
    let mut numbered = Vec::new();
    for p in published.iter_mut().filter(|p| p.id == 0) {
        p.id = txn.next_id(PUBLISHED_IDS)?;
        numbered.push(p.clone());
    }
    Ok(numbered)
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
