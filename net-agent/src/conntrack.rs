//! Connection tracking as user space sees it: decoding `CONNTRACK` entries into flows,
//! filtering them, and deciding which have expired. Pure logic; the map access is in
//! [`crate::datapath`].
//!
//! A translated flow (masqueraded, or to a published port) has two entries (original and
//! reply direction), each holding the tuple its packets are rewritten to. They are judged
//! together: a flow is expired when neither direction has seen a packet within the timeout of
//! the flow's state, and then both entries go. A live flow is never removed.

use std::{net::Ipv4Addr, time::Duration};

use net_ebpf_common::{
    CT_DIR_ORIGINAL, CT_KIND_PUBLISHED, CT_STATE_ESTABLISHED, CT_STATE_FIN_ORIGINAL,
    CT_STATE_FIN_REPLY, CT_STATE_RST, CtEntry, CtKey,
};
use serde::{Deserialize, Serialize};

/// How long a flow may stay idle, by state (Linux's nf_conntrack defaults, shortened where
/// they are days).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// TCP before the reply direction was seen (SYN sent, no answer).
    pub tcp_syn: Duration,
    pub tcp_established: Duration,
    /// TCP after FIN both ways, or a RST.
    pub tcp_closing: Duration,
    /// UDP before / after the reply direction was seen.
    pub udp: Duration,
    pub udp_established: Duration,
    pub icmp: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            tcp_syn: Duration::from_secs(60),
            tcp_established: Duration::from_secs(2 * 3600),
            tcp_closing: Duration::from_secs(10),
            udp: Duration::from_secs(30),
            udp_established: Duration::from_secs(120),
            icmp: Duration::from_secs(30),
        }
    }
}

impl Timeouts {
    /// Parses `name=SECONDS,...` over the defaults (names as the fields).
    pub fn parse(spec: &str) -> Result<Self, String> {
        let mut t = Self::default();
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, secs) = part.split_once('=').ok_or_else(|| {
                format!("invalid conntrack timeout {part:?}: expected NAME=SECONDS")
            })?;
            let secs: u64 = secs.parse().map_err(|_| {
                format!("invalid conntrack timeout {part:?}: {secs:?} is not a number of seconds")
            })?;
            let value = Duration::from_secs(secs);
            match name {
                "tcp_syn" => t.tcp_syn = value,
                "tcp_established" => t.tcp_established = value,
                "tcp_closing" => t.tcp_closing = value,
                "udp" => t.udp = value,
                "udp_established" => t.udp_established = value,
                "icmp" => t.icmp = value,
                other => {
                    return Err(format!(
                        "unknown conntrack timeout {other:?}: use tcp_syn, tcp_established, tcp_closing, udp, udp_established or icmp"
                    ));
                }
            }
        }
        Ok(t)
    }

    fn for_flow(&self, proto: u8, state: u8) -> Duration {
        let established = state & CT_STATE_ESTABLISHED != 0;
        match proto {
            6 => {
                let closed_both =
                    state & CT_STATE_FIN_ORIGINAL != 0 && state & CT_STATE_FIN_REPLY != 0;
                if state & CT_STATE_RST != 0 || closed_both {
                    self.tcp_closing
                } else if established {
                    self.tcp_established
                } else {
                    self.tcp_syn
                }
            }
            17 if established => self.udp_established,
            17 => self.udp,
            _ => self.icmp,
        }
    }
}

/// One tracked flow, both directions joined, as `netctl bpf ct list` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Flow {
    /// `masquerade` (an endpoint's flow out) or `published` (a connection to a published port).
    pub kind: String,
    pub proto: String,
    /// The first packet as it came (ports: ICMP echo identifier).
    pub source: Ipv4Addr,
    pub source_port: u16,
    pub destination: Ipv4Addr,
    pub destination_port: u16,
    /// The same packet after translation.
    pub new_source: Ipv4Addr,
    pub new_source_port: u16,
    pub new_destination: Ipv4Addr,
    pub new_destination_port: u16,
    pub state: String,
    /// Seconds since either direction last saw a packet.
    pub idle_secs: u64,
    pub packets_original: u64,
    pub packets_reply: u64,
    pub bytes_original: u64,
    pub bytes_reply: u64,
}

impl Flow {
    /// Every address of the flow, before and after translation.
    pub fn addresses(&self) -> [Ipv4Addr; 4] {
        [
            self.source,
            self.destination,
            self.new_source,
            self.new_destination,
        ]
    }

    pub fn ports(&self) -> [u16; 4] {
        [
            self.source_port,
            self.destination_port,
            self.new_source_port,
            self.new_destination_port,
        ]
    }
}

pub fn proto_name(proto: u8) -> String {
    match proto {
        1 => "icmp".into(),
        6 => "tcp".into(),
        17 => "udp".into(),
        n => n.to_string(),
    }
}

fn state_name(proto: u8, state: u8) -> String {
    if proto != 6 {
        return if state & CT_STATE_ESTABLISHED != 0 {
            "replied"
        } else {
            "unreplied"
        }
        .into();
    }
    if state & CT_STATE_RST != 0 {
        "reset"
    } else if state & CT_STATE_FIN_ORIGINAL != 0 && state & CT_STATE_FIN_REPLY != 0 {
        "closed"
    } else if state & (CT_STATE_FIN_ORIGINAL | CT_STATE_FIN_REPLY) != 0 {
        "closing"
    } else if state & CT_STATE_ESTABLISHED != 0 {
        "established"
    } else {
        "syn-sent"
    }
    .into()
}

/// A flow assembled from its entries: the original-direction key and entry, and the reply
/// entry if present.
pub struct Joined {
    pub original_key: CtKey,
    pub original: CtEntry,
    pub reply_key: CtKey,
    pub reply: Option<CtEntry>,
    /// One entry without its partner (see `CtEntry::partner_key`): a reply entry whose original
    /// is missing or another's (`original` is then rebuilt from it), or an original entry whose
    /// reply entry is (`reply` is then `None`).
    pub orphan: bool,
}

/// Joins entries into flows, each entry with its partner. An entry without one (a flow being
/// made, or an orphan) comes back as a flow of its own, so that it can expire too.
pub fn join(entries: &[(CtKey, CtEntry)]) -> Vec<Joined> {
    // Keyed lookups: the table holds up to a few hundred thousand entries.
    let by_key: std::collections::HashMap<CtKey, CtEntry> = entries.iter().copied().collect();
    let mut flows = Vec::new();
    for (key, entry) in entries {
        // The other entry's key (for ICMP echo the identifier stands in both port fields, so
        // this holds there too), and the entry there if it is this one's partner.
        let partner_key = entry.partner_key(key.proto);
        let partner = by_key
            .get(&partner_key)
            .filter(|p| p.points_back_to(key))
            .copied();
        if entry.direction == CT_DIR_ORIGINAL {
            flows.push(Joined {
                original_key: *key,
                original: *entry,
                reply_key: partner_key,
                reply: partner,
                orphan: partner.is_none(),
            });
        } else if partner.is_none() {
            flows.push(Joined {
                original_key: partner_key,
                original: CtEntry {
                    direction: CT_DIR_ORIGINAL,
                    ..*entry
                },
                reply_key: *key,
                reply: Some(*entry),
                orphan: true,
            });
        }
    }
    flows
}

impl Joined {
    fn state(&self) -> u8 {
        self.original.state | self.reply.map_or(0, |r| r.state)
    }

    fn last_seen_ns(&self) -> u64 {
        self.original
            .last_seen_ns
            .max(self.reply.map_or(0, |r| r.last_seen_ns))
    }

    /// Whether the flow has been idle past its state's timeout at `now_ns` (see
    /// [`monotonic_now_ns`]). An orphan carries no connection (its packets would be translated
    /// one way only), so it waits no longer than a closed flow, whatever its state says: it
    /// would otherwise hold its tuple and port for hours.
    pub fn expired(&self, now_ns: u64, timeouts: &Timeouts) -> bool {
        let idle = now_ns.saturating_sub(self.last_seen_ns());
        let mut timeout = timeouts.for_flow(self.original_key.proto, self.state());
        if self.orphan {
            timeout = timeout.min(timeouts.tcp_closing);
        }
        idle > timeout.as_nanos() as u64
    }

    /// The flow's entries as they stand in the table (an orphan has one).
    pub fn entries(&self) -> impl Iterator<Item = (CtKey, CtEntry)> + '_ {
        let original =
            (!(self.orphan && self.reply.is_some())).then_some((self.original_key, self.original));
        let reply = self.reply.map(|reply| (self.reply_key, reply));
        original.into_iter().chain(reply)
    }

    pub fn describe(&self, now_ns: u64) -> Flow {
        let proto = self.original_key.proto;
        let (key, new) = (&self.original_key, &self.original);
        Flow {
            kind: if new.kind == CT_KIND_PUBLISHED {
                "published"
            } else {
                "masquerade"
            }
            .into(),
            proto: proto_name(proto),
            source: Ipv4Addr::from(key.saddr),
            source_port: u16::from_be_bytes(key.sport),
            destination: Ipv4Addr::from(key.daddr),
            destination_port: u16::from_be_bytes(key.dport),
            new_source: Ipv4Addr::from(new.new_saddr),
            new_source_port: u16::from_be_bytes(new.new_sport),
            new_destination: Ipv4Addr::from(new.new_daddr),
            new_destination_port: u16::from_be_bytes(new.new_dport),
            state: state_name(proto, self.state()),
            idle_secs: now_ns.saturating_sub(self.last_seen_ns()) / 1_000_000_000,
            packets_original: self.original.packets,
            packets_reply: self.reply.map_or(0, |r| r.packets),
            bytes_original: self.original.bytes,
            bytes_reply: self.reply.map_or(0, |r| r.bytes),
        }
    }
}

/// Which flows a `netctl bpf ct list|flush` acts on. Empty fields match everything; an address
/// or port matches any side, before or after translation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    pub addr: Option<Ipv4Addr>,
    pub port: Option<u16>,
    pub proto: Option<u8>,
}

impl Filter {
    pub fn parse_proto(name: &str) -> Result<u8, String> {
        match name {
            "tcp" => Ok(6),
            "udp" => Ok(17),
            "icmp" => Ok(1),
            other => Err(format!("unknown protocol {other:?}: use tcp, udp or icmp")),
        }
    }

    pub fn matches(&self, flow: &Flow) -> bool {
        let addr_ok = self.addr.is_none_or(|a| flow.addresses().contains(&a));
        let port_ok = self.port.is_none_or(|p| flow.ports().contains(&p));
        let proto_ok = self.proto.is_none_or(|p| proto_name(p) == flow.proto);
        addr_ok && port_ok && proto_ok
    }
}

/// CLOCK_MONOTONIC_COARSE now, in ns: the clock the data plane stamps flows with
/// (`bpf_ktime_get_coarse_ns`), so that an idle time is never negative.
pub fn monotonic_now_ns() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC_COARSE)
        .expect("CLOCK_MONOTONIC_COARSE is always available on Linux");
    ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64
}

#[cfg(test)]
mod tests {
    use net_ebpf_common::CT_DIR_REPLY;

    use super::*;

    const SEC: u64 = 1_000_000_000;

    fn pair(
        proto: u8,
        state_o: u8,
        state_r: u8,
        seen_o: u64,
        seen_r: u64,
    ) -> Vec<(CtKey, CtEntry)> {
        let ep = [10, 1, 0, 2];
        let remote = [198, 18, 0, 254];
        let host = [198, 18, 0, 1];
        let original_key = CtKey {
            saddr: ep,
            daddr: remote,
            sport: 40000u16.to_be_bytes(),
            dport: 80u16.to_be_bytes(),
            proto,
            _pad: [0; 3],
        };
        let reply_key = CtKey {
            saddr: remote,
            daddr: host,
            sport: 80u16.to_be_bytes(),
            dport: 61000u16.to_be_bytes(),
            proto,
            _pad: [0; 3],
        };
        // Each entry's translation is the other's key, reversed.
        let entry = |direction, state, seen, other: &CtKey| CtEntry {
            last_seen_ns: seen,
            packets: 1,
            bytes: 60,
            new_saddr: other.daddr,
            new_daddr: other.saddr,
            new_sport: other.dport,
            new_dport: other.sport,
            direction,
            state,
            kind: 0,
            flags: 0,
            ifindex: 7,
            _pad: 0,
        };
        vec![
            (
                original_key,
                entry(CT_DIR_ORIGINAL, state_o, seen_o, &reply_key),
            ),
            (
                reply_key,
                entry(CT_DIR_REPLY, state_r, seen_r, &original_key),
            ),
        ]
    }

    #[test]
    fn directions_join_into_one_flow() {
        let flows = join(&pair(6, 0, CT_STATE_ESTABLISHED, 5 * SEC, 6 * SEC));
        assert_eq!(flows.len(), 1);
        let flow = flows[0].describe(10 * SEC);
        assert_eq!(flow.kind, "masquerade");
        assert_eq!(flow.source, Ipv4Addr::new(10, 1, 0, 2));
        assert_eq!(flow.new_source, Ipv4Addr::new(198, 18, 0, 1));
        assert_eq!(flow.new_source_port, 61000);
        assert_eq!(flow.destination_port, 80);
        assert_eq!(flow.new_destination_port, 80);
        assert_eq!(flow.state, "established");
        assert_eq!(flow.idle_secs, 4);
    }

    #[test]
    fn expiry_follows_state_and_the_fresher_direction() {
        let t = Timeouts::default();
        // Established TCP, reply seen recently: live even though the original is old.
        let live = join(&pair(6, 0, CT_STATE_ESTABLISHED, 0, 7000 * SEC));
        assert!(!live[0].expired(7100 * SEC, &t));
        // Unanswered SYN: 60 s.
        let syn = join(&pair(6, 0, 0, 0, 0));
        assert!(!syn[0].expired(59 * SEC, &t));
        assert!(syn[0].expired(61 * SEC, &t));
        // Closed both ways: 10 s.
        let closed = join(&pair(
            6,
            CT_STATE_FIN_ORIGINAL,
            CT_STATE_ESTABLISHED | CT_STATE_FIN_REPLY,
            0,
            0,
        ));
        assert!(closed[0].expired(11 * SEC, &t));
        // UDP replied: 120 s; unreplied: 30 s.
        assert!(!join(&pair(17, 0, CT_STATE_ESTABLISHED, 0, 0))[0].expired(100 * SEC, &t));
        assert!(join(&pair(17, 0, 0, 0, 0))[0].expired(31 * SEC, &t));
    }

    #[test]
    fn icmp_echo_directions_join() {
        let ep = [10, 1, 0, 2];
        let remote = [198, 18, 0, 254];
        let host = [198, 18, 0, 1];
        let (id, nat_id) = (7u16.to_be_bytes(), 61000u16.to_be_bytes());
        let original_key = CtKey {
            saddr: ep,
            daddr: remote,
            sport: id,
            dport: id,
            proto: 1,
            _pad: [0; 3],
        };
        let reply_key = CtKey {
            saddr: remote,
            daddr: host,
            sport: nat_id,
            dport: nat_id,
            proto: 1,
            _pad: [0; 3],
        };
        let mut entries = pair(1, 0, 0, 0, 0);
        entries[0].0 = original_key;
        (entries[0].1.new_sport, entries[0].1.new_dport) = (nat_id, nat_id);
        entries[1].0 = reply_key;
        (entries[1].1.new_sport, entries[1].1.new_dport) = (id, id);
        assert_eq!(entries[0].1.partner_key(entries[0].0.proto), reply_key);
        assert_eq!(entries[1].1.partner_key(entries[1].0.proto), original_key);
        assert_eq!(join(&entries).len(), 1);
    }

    #[test]
    fn orphaned_reply_entries_still_expire() {
        let mut entries = pair(17, 0, 0, 0, 0);
        entries.remove(0);
        let flows = join(&entries);
        assert_eq!(flows.len(), 1);
        assert!(flows[0].expired(31 * SEC, &Timeouts::default()));
        assert_eq!(flows[0].reply_key, entries[0].0);
    }

    /// Flow X's reply entry went (the collector raced the data plane) and flow Y took its
    /// port: X's original entry now points at Y's reply entry, which is not its partner.
    #[test]
    fn an_entry_pairs_only_with_its_partner() {
        let x = pair(6, CT_STATE_ESTABLISHED, 0, 0, 0);
        let mut y = pair(6, CT_STATE_ESTABLISHED, CT_STATE_ESTABLISHED, 0, 0);
        // Y: the endpoint's next port, the same NAT port.
        y[0].0.sport = 40001u16.to_be_bytes();
        y[1].1.new_dport = 40001u16.to_be_bytes();
        let entries = vec![x[0], y[0], y[1]];
        let flows = join(&entries);
        assert_eq!(flows.len(), 2);
        let (orphan, whole) = (&flows[0], &flows[1]);
        assert!(orphan.orphan && orphan.reply.is_none());
        assert_eq!(orphan.entries().collect::<Vec<_>>(), vec![x[0]]);
        assert!(!whole.orphan);
        assert_eq!(whole.entries().collect::<Vec<_>>(), vec![y[0], y[1]]);
        // Established, the orphan still goes after the closing timeout; the whole flow not.
        let t = Timeouts::default();
        assert!(orphan.expired(11 * SEC, &t));
        assert!(!whole.expired(11 * SEC, &t));
        // Y's reply entry alone (its original gone too) is an orphan of its own, not X's.
        let flows = join(&[x[0], y[1]]);
        assert_eq!(flows.len(), 2);
        assert!(flows.iter().all(|f| f.orphan));
        assert_eq!(flows[1].entries().collect::<Vec<_>>(), vec![y[1]]);
    }

    #[test]
    fn filters_match_any_side() {
        let flow = join(&pair(6, 0, 0, 0, 0))[0].describe(0);
        assert!(Filter::default().matches(&flow));
        assert!(
            Filter {
                addr: Some(Ipv4Addr::new(198, 18, 0, 1)),
                ..Default::default()
            }
            .matches(&flow)
        );
        assert!(
            Filter {
                port: Some(61000),
                proto: Some(6),
                ..Default::default()
            }
            .matches(&flow)
        );
        assert!(
            !Filter {
                proto: Some(17),
                ..Default::default()
            }
            .matches(&flow)
        );
        assert!(
            !Filter {
                addr: Some(Ipv4Addr::new(1, 2, 3, 4)),
                ..Default::default()
            }
            .matches(&flow)
        );
    }

    #[test]
    fn timeouts_parse() {
        let t = Timeouts::parse("udp=1, tcp_established=5").unwrap();
        assert_eq!(t.udp, Duration::from_secs(1));
        assert_eq!(t.tcp_established, Duration::from_secs(5));
        assert_eq!(t.icmp, Timeouts::default().icmp);
        assert!(Timeouts::parse("udp").is_err());
        assert!(Timeouts::parse("sctp=3").is_err());
        assert!(Timeouts::parse("udp=x").is_err());
    }
}
