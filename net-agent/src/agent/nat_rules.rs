//! iptables compatibility: importing an `iptables-save` nat table as published ports and
//! masquerade (resolved against this agent's endpoints and networks), and exporting the data
//! plane's NAT as one.

use log::info;

use super::{Agent, AgentError, Result, ports};
use crate::{
    api::{self, PortSpec},
    iptables::{self, PlannedMasquerade, PlannedPublish, SkippedRule},
    store::{Change, EndpointRecord, NetworkRecord, PortRecord, PublishedRecord, port_key},
};

impl Agent {
    /// Plans `rules` against the agent's state and, unless `dry_run`, applies the plan: every
    /// port and masquerade in it, or none (all are validated before the first is made). Rules
    /// the data plane cannot express, or that name addresses and subnets the agent does not
    /// have, are listed with the reason and left out.
    pub fn nat_import(&mut self, rules: &str, dry_run: bool) -> Result<api::NatImport> {
        let host_ip = self.nat.as_ref().map(|u| u.ip);
        let plan = iptables::parse_iptables_save(rules, host_ip)
            .map_err(|e| AgentError::Invalid(format!("not iptables-save output: {e}")))?;
        let endpoints = self.store.endpoints()?;
        let networks = self.networks()?;
        let mut report = api::NatImport {
            dry_run,
            publish: Vec::new(),
            masquerade: Vec::new(),
            covered: plan.covered.clone(),
            skipped: plan.skipped.clone(),
        };

        // Ports: resolve the address to an endpoint and check the port as `port publish` does,
        // against everything recorded and everything planned so far.
        let mut planned_sides = ports::PlannedSides::new();
        let sockets = crate::publish::HostSockets::read()?;
        let mut added: Vec<PortRecord> = Vec::new();
        for planned in &plan.publish {
            match self.resolve_publish(planned, &endpoints, &planned_sides, &sockets)? {
                Resolved::Skip(reason) => report.skipped.push(skipped(planned, reason)),
                Resolved::AlreadyThere => report.covered.push(SkippedRule {
                    line: planned.line,
                    rule: planned.rule.clone(),
                    reason: "already published".into(),
                }),
                Resolved::Add(endpoint, records) => {
                    for mut r in records {
                        r.ip = planned.to;
                        report.publish.push(published_line(planned, endpoint, &r));
                        planned_sides.insert(
                            port_key(r.proto, r.host_port, r.host_ip),
                            endpoint.to_owned(),
                        );
                        added.push(PortRecord {
                            endpoint: endpoint.to_owned(),
                            port: r,
                        });
                    }
                }
            }
        }

        // Masquerade: the network whose subnet the rule's source is.
        let mut switch_on: Vec<NetworkRecord> = Vec::new();
        for planned in &plan.masquerade {
            match networks.values().find(|n| n.subnet == planned.source) {
                None => report.skipped.push(SkippedRule {
                    line: planned.line,
                    rule: planned.rule.clone(),
                    reason: format!("no network has the subnet {}", planned.source),
                }),
                Some(n) if n.masquerade || switch_on.iter().any(|s| s.name == n.name) => {
                    report.covered.push(SkippedRule {
                        line: planned.line,
                        rule: planned.rule.clone(),
                        reason: format!("network {} masquerades already", n.name),
                    });
                }
                Some(n) => {
                    report.masquerade.push(masquerade_line(planned, &n.name));
                    switch_on.push(NetworkRecord {
                        masquerade: true,
                        ..n.clone()
                    });
                }
            }
        }
        report.skipped.sort_by_key(|s| s.line);
        report.covered.sort_by_key(|s| s.line);
        if dry_run {
            return Ok(report);
        }

        // One transaction for everything (the new ports' ids with them), then the data plane.
        let txn = self.store.begin()?;
        for p in &mut added {
            ports::number_published(&txn, std::slice::from_mut(&mut p.port))?;
        }
        let mut changes: Vec<Change<'_>> = added.iter().map(Change::PutPort).collect();
        changes.extend(switch_on.iter().map(Change::PutNetwork));
        txn.apply(&changes)?;
        txn.commit()?;
        let added: Vec<PublishedRecord> = added.into_iter().map(|p| p.port).collect();
        self.install_published(&added)?;
        self.update_reserved_ports(&added, &[])?;
        for network in &switch_on {
            self.refresh_network_flags(network)?;
        }
        info!(
            "nat import: {} ports published, {} networks masquerading, {} rules left out",
            report.publish.len(),
            report.masquerade.len(),
            report.skipped.len()
        );
        Ok(report)
    }

    /// The data plane's NAT as an `iptables-save` nat table.
    pub fn nat_export(&self) -> Result<String> {
        let ports = self.port_list(None)?;
        let masquerade: Vec<_> = self
            .networks()?
            .values()
            .filter(|n| n.masquerade)
            .map(|n| n.subnet)
            .collect();
        Ok(iptables::render_iptables_save(
            &ports,
            &masquerade,
            &format!("net-agent {}", env!("CARGO_PKG_VERSION")),
        ))
    }

    fn resolve_publish<'e>(
        &self,
        planned: &PlannedPublish,
        endpoints: &'e [EndpointRecord],
        planned_sides: &ports::PlannedSides,
        sockets: &crate::publish::HostSockets,
    ) -> Result<Resolved<'e>> {
        let Some(endpoint) = endpoints
            .iter()
            .find(|e| e.interfaces.iter().any(|i| i.ip == planned.to))
        else {
            return Ok(Resolved::Skip(format!(
                "no endpoint has the address {} the rule translates to",
                planned.to
            )));
        };
        let recorded = self.store.ports_view()?;
        let mut present = true;
        for (host_port, port) in
            (planned.host_ports.0..=planned.host_ports.1).zip(planned.ports.0..=planned.ports.1)
        {
            let same = recorded
                .get(port_key(planned.proto, host_port, planned.host_ip))?
                .is_some_and(|p| {
                    p.endpoint == endpoint.name
                        && p.port.ip == planned.to
                        && p.port.port == port
                        && p.port.allow == planned.allow
                });
            if !same {
                present = false;
                break;
            }
        }
        if present {
            return Ok(Resolved::AlreadyThere);
        }
        let spec = PortSpec {
            host_ip: planned.host_ip,
            host_ports: planned.host_ports,
            ports: planned.ports,
            proto: planned.proto,
        };
        let allow: Vec<String> = planned.allow.iter().map(|n| n.to_string()).collect();
        Ok(
            match self.plan_publish(endpoint, &[spec], &allow, planned_sides, sockets) {
                Ok(records) => Resolved::Add(&endpoint.name, records),
                Err(e) => Resolved::Skip(e.to_string()),
            },
        )
    }

    /// Rewrites the map entries of a network's endpoints after its masquerade setting changed.
    fn refresh_network_flags(&mut self, network: &NetworkRecord) -> Result<()> {
        let endpoints = self.store.endpoints()?;
        for e in &endpoints {
            for iface in e.interfaces.iter().filter(|i| i.network == network.name) {
                self.datapath.maps().set_endpoint_flag(
                    iface.ip,
                    net_ebpf_common::ENDPOINT_F_MASQUERADE,
                    network.masquerade,
                )?;
            }
        }
        Ok(())
    }
}

enum Resolved<'e> {
    Skip(String),
    AlreadyThere,
    /// The endpoint's name, and its new published ports.
    Add(&'e str, Vec<PublishedRecord>),
}

fn skipped(planned: &PlannedPublish, reason: String) -> SkippedRule {
    SkippedRule {
        line: planned.line,
        rule: planned.rule.clone(),
        reason,
    }
}

fn published_line(
    planned: &PlannedPublish,
    endpoint: &str,
    record: &PublishedRecord,
) -> api::NatImportLine {
    api::NatImportLine {
        line: planned.line,
        rule: planned.rule.clone(),
        action: format!(
            "publish {}{}/{} -> {} {}:{}{}",
            record.host_ip.map_or(String::new(), |ip| format!("{ip}:")),
            record.host_port,
            record.proto.name(),
            endpoint,
            record.ip,
            record.port,
            if record.allow.is_empty() {
                String::new()
            } else {
                format!(
                    " allow {}",
                    record
                        .allow
                        .iter()
                        .map(|n| n.to_string())
                        .collect::<Vec<_>>()
                        .join(",")
                )
            }
        ),
        note: planned.note.clone(),
    }
}

fn masquerade_line(planned: &PlannedMasquerade, network: &str) -> api::NatImportLine {
    api::NatImportLine {
        line: planned.line,
        rule: planned.rule.clone(),
        action: format!("masquerade network {network} ({})", planned.source),
        note: planned.note.clone(),
    }
}
