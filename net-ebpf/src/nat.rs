//! Connection tracking in `CONNTRACK` and the translation it drives: masquerade (source NAT
//! for endpoint traffic leaving through the uplink) and published ports (destination NAT to an
//! endpoint), with the reverse translation of replies and of the ICMP errors about a flow (so
//! path-MTU discovery works through NAT).
//!
//! Every translated flow is two entries, each holding the whole tuple its direction's packets
//! are rewritten to, so one lookup and one rewrite serve every kind of flow.
//!
//! Translation towards the outside happens at the uplink: after the host stack routed the
//! endpoint's packet (egress) and before the host stack sees a reply (ingress). Rewriting at
//! the endpoint veth instead would hand the stack packets whose source is one of its own
//! addresses, which it drops as martians. Flows that never leave the host (hairpin, the host's
//! own connections to published ports) are translated where they enter and delivered directly.

use aya_ebpf::{
    helpers::generated::bpf_get_prandom_u32, helpers::generated::bpf_ktime_get_coarse_ns,
    programs::TcContext,
};
use net_ebpf_common::{
    CT_DIR_ORIGINAL, CT_DIR_REPLY, CT_F_AT_ENDPOINT, CT_KIND_MASQUERADE, CT_KIND_PUBLISHED,
    CT_STATE_ESTABLISHED, CT_STATE_FIN_ORIGINAL, CT_STATE_FIN_REPLY, CT_STATE_RST, CtEntry, CtKey,
    DropReason, nat_stat,
};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

use crate::{
    csum::{self, L4Csum},
    maps::{CONNTRACK, count_nat},
    parse::ptr_at,
};

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_ECHO_REQUEST: u8 = 8;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAM_PROBLEM: u8 = 12;

const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// How many ports to try for a new flow before declaring the range exhausted towards this
/// destination. Bounded for the verifier; with random starting points a collision chain this
/// long means the range is nearly full.
const PORT_TRIES: u32 = 16;

/// `-EEXIST` from a map insert with `BPF_NOEXIST`.
const EEXIST: i32 = -17;
const BPF_NOEXIST: u64 = 1;

/// Byte offsets of an IPv4 header and of its payload, from the start of the frame.
#[derive(Clone, Copy)]
pub struct Ipv4Offsets {
    pub ip: usize,
    pub l4: usize,
}

/// A flow's addressing as read from a packet (or from the packet quoted in an ICMP error).
#[derive(Clone, Copy)]
pub struct Flow {
    pub proto: u8,
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    /// Ports, or the ICMP echo identifier in both.
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    /// Offsets of the source and destination "port" fields.
    pub sport_off: usize,
    pub dport_off: usize,
    pub l4_csum_off: usize,
    pub l4: L4Csum,
    pub tcp_flags: u8,
}

impl Flow {
    pub fn key(&self) -> CtKey {
        CtKey {
            saddr: self.saddr,
            daddr: self.daddr,
            sport: self.sport,
            dport: self.dport,
            proto: self.proto,
            _pad: [0; 3],
        }
    }
}

/// The IPv4 header at `ip_off`, checked, with where its payload starts. Fragments other than
/// a first fragment carry no ports, so they are reported as such.
#[inline(always)]
pub fn ipv4_at(
    ctx: &TcContext,
    ip_off: usize,
) -> Result<(*mut Ipv4Hdr, Ipv4Offsets, bool), DropReason> {
    let ip = ptr_at::<Ipv4Hdr>(ctx, ip_off)?;
    // SAFETY: bounds-checked by ptr_at.
    let (vihl, frags) = unsafe { ((*ip).vihl, (*ip).frags) };
    let ihl = usize::from(vihl & 0x0f) * 4;
    if ihl < Ipv4Hdr::LEN {
        return Err(DropReason::Malformed);
    }
    // More-fragments flag or a non-zero offset.
    let fragment = (u16::from_be_bytes(frags) & 0x3fff) != 0;
    Ok((
        ip,
        Ipv4Offsets {
            ip: ip_off,
            l4: ip_off + ihl,
        },
        fragment,
    ))
}

/// Which ICMP echo message a direction tracks: the endpoint's requests go out, their replies
/// come in. The other one in each direction is not ours (a request to the host is the host's).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum EchoDirection {
    Outgoing,
    Incoming,
}

/// Reads the flow of a TCP, UDP or ICMP echo packet whose IPv4 header is at `off`.
/// `Ok(None)` for other protocols and other ICMP messages.
#[inline(always)]
pub fn flow_at(
    ctx: &TcContext,
    ip: *const Ipv4Hdr,
    off: Ipv4Offsets,
    echo: EchoDirection,
) -> Result<Option<Flow>, DropReason> {
    // SAFETY: the caller bounds-checked the header.
    let (proto, saddr, daddr) = unsafe { ((*ip).proto, (*ip).src_addr, (*ip).dst_addr) };
    let l4 = off.l4;
    let flow = |sport_off, dport_off, l4_csum_off, kind, sport, dport, tcp_flags| Flow {
        proto,
        saddr,
        daddr,
        sport,
        dport,
        sport_off,
        dport_off,
        l4_csum_off,
        l4: kind,
        tcp_flags,
    };
    match proto {
        IPPROTO_TCP => {
            // The whole fixed header (ports, seq, ack, offset, flags, window, checksum at 16):
            // everything translation will touch is checked before any state is recorded.
            let ports = ptr_at::<[u8; 20]>(ctx, l4)?;
            // SAFETY: bounds-checked.
            let p = unsafe { *ports };
            Ok(Some(flow(
                l4,
                l4 + 2,
                l4 + 16,
                L4Csum::Tcp,
                [p[0], p[1]],
                [p[2], p[3]],
                p[13],
            )))
        }
        IPPROTO_UDP => {
            let hdr = ptr_at::<[u8; 8]>(ctx, l4)?;
            // SAFETY: bounds-checked.
            let h = unsafe { *hdr };
            let kind = if h[6] == 0 && h[7] == 0 {
                L4Csum::None
            } else {
                L4Csum::Udp
            };
            Ok(Some(flow(
                l4,
                l4 + 2,
                l4 + 6,
                kind,
                [h[0], h[1]],
                [h[2], h[3]],
                0,
            )))
        }
        IPPROTO_ICMP => {
            let hdr = ptr_at::<[u8; 8]>(ctx, l4)?;
            // SAFETY: bounds-checked.
            let h = unsafe { *hdr };
            let wanted = match echo {
                EchoDirection::Outgoing => ICMP_ECHO_REQUEST,
                EchoDirection::Incoming => ICMP_ECHO_REPLY,
            };
            if h[0] != wanted {
                return Ok(None);
            }
            let id = [h[4], h[5]];
            Ok(Some(flow(l4 + 4, l4 + 4, l4 + 2, L4Csum::Icmp, id, id, 0)))
        }
        _ => Ok(None),
    }
}

/// CLOCK_MONOTONIC_COARSE, the time of the last scheduler tick: what a flow's idle time is
/// measured in (timeouts are seconds, a tick at most a few ms). Read on every translated packet,
/// it costs no clock-source read, which in a VM is tens of ns (`read_tsc` under `perf`).
fn now() -> u64 {
    // SAFETY: plain helper call.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// Accounts a packet on a conntrack entry and folds its TCP flags into the flow state.
#[inline(always)]
fn touch(entry: *mut CtEntry, flow: &Flow, bytes: u32) {
    // SAFETY: a live map value; concurrent updates from two CPUs may lose a count, never corrupt
    // the entry (each field is written whole).
    let entry = unsafe { &mut *entry };
    entry.last_seen_ns = now();
    entry.packets += 1;
    entry.bytes += u64::from(bytes);
    entry.state = next_state(entry.state, entry.direction, flow);
}

/// The state bits of one direction's entry after a packet of `flow` went that way.
#[inline(always)]
fn next_state(mut state: u8, direction: u8, flow: &Flow) -> u8 {
    if direction == CT_DIR_REPLY {
        state |= CT_STATE_ESTABLISHED;
    }
    if flow.proto == IPPROTO_TCP {
        // A new SYN on a closing flow: the endpoint reuses the 4-tuple; start over.
        if flow.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN && direction == CT_DIR_ORIGINAL {
            state &= !(CT_STATE_FIN_ORIGINAL | CT_STATE_FIN_REPLY | CT_STATE_RST);
        }
        if flow.tcp_flags & TCP_RST != 0 {
            state |= CT_STATE_RST;
        }
        if flow.tcp_flags & TCP_FIN != 0 {
            state |= if direction == CT_DIR_REPLY {
                CT_STATE_FIN_REPLY
            } else {
                CT_STATE_FIN_ORIGINAL
            };
        }
    }
    state
}

/// A packet's addressing: what a conntrack entry rewrites a packet to.
#[derive(Clone, Copy)]
pub struct Tuple {
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    pub sport: [u8; 2],
    pub dport: [u8; 2],
}

impl Tuple {
    /// The key under which packets coming back the other way are found.
    fn reply_key(&self, proto: u8) -> CtKey {
        CtKey {
            saddr: self.daddr,
            daddr: self.saddr,
            sport: self.dport,
            dport: self.sport,
            proto,
            _pad: [0; 3],
        }
    }
}

impl Flow {
    pub fn tuple(&self) -> Tuple {
        Tuple {
            saddr: self.saddr,
            daddr: self.daddr,
            sport: self.sport,
            dport: self.dport,
        }
    }
}

/// The conntrack entry of a packet's direction, found but not yet accounted for the packet.
pub struct Found {
    entry: *mut CtEntry,
    /// Translated by `tc_from_endpoint` (`CT_F_AT_ENDPOINT`) rather than at the uplink or
    /// loopback.
    pub at_endpoint: bool,
    pub new: Tuple,
}

impl Found {
    /// Accounts the packet on the entry. Each entry's packets are accounted, like translated,
    /// at exactly one place: where the packet is translated.
    #[inline(always)]
    pub fn account(&self, ctx: &TcContext, flow: &Flow) {
        touch(self.entry, flow, ctx.len());
    }
}

/// The conntrack entry of `flow`'s direction, wherever it is translated.
#[inline(always)]
pub fn find(flow: &Flow) -> Option<Found> {
    let key = flow.key();
    let entry = CONNTRACK.get_ptr_mut(key)?;
    if opens_tcp(flow) && !restart(&key, entry) {
        return None;
    }
    // SAFETY: live map value.
    let e = unsafe { &*entry };
    Some(Found {
        entry,
        at_endpoint: e.flags & CT_F_AT_ENDPOINT != 0,
        new: Tuple {
            saddr: e.new_saddr,
            daddr: e.new_daddr,
            sport: e.new_sport,
            dport: e.new_dport,
        },
    })
}

/// The tuple the conntrack entry of `flow`'s direction rewrites it to, with the packet accounted
/// on the entry, if the uplink or loopback translates it (entries not marked
/// `CT_F_AT_ENDPOINT`; `tc_from_endpoint` looks its own up with [`find`]).
#[inline(always)]
pub fn lookup(ctx: &TcContext, flow: &Flow) -> Option<Tuple> {
    let found = find(flow)?;
    if found.at_endpoint {
        return None;
    }
    found.account(ctx, flow);
    Some(found.new)
}

/// Rewrites the packet of `flow` to `new`, fixing every checksum; fields that do not change
/// are not touched. The header fields and the IPv4 checksum are written directly, then the L4
/// checksum is fixed through the kernel's helper (see `csum`): a DNAT costs two helper calls, not
/// five. The direct writes come first, as the helper calls end the packet pointers' validity.
#[inline(always)]
pub fn translate(
    ctx: &TcContext,
    off: Ipv4Offsets,
    flow: &Flow,
    new: &Tuple,
) -> Result<(), DropReason> {
    let ip = ptr_at::<Ipv4Hdr>(ctx, off.ip)?;
    let sport = ptr_at::<[u8; 2]>(ctx, flow.sport_off)?;
    let dport = ptr_at::<[u8; 2]>(ctx, flow.dport_off)?;
    // SAFETY: all three bounds-checked just above, and no helper called since.
    unsafe {
        let check = core::ptr::addr_of_mut!((*ip).check);
        if new.saddr != flow.saddr {
            csum::set_ipv4_addr(check, core::ptr::addr_of_mut!((*ip).src_addr), new.saddr);
        }
        if new.daddr != flow.daddr {
            csum::set_ipv4_addr(check, core::ptr::addr_of_mut!((*ip).dst_addr), new.daddr);
        }
        *sport = new.sport;
        // For ICMP echo both "ports" are the one identifier field, written just above.
        if flow.proto != IPPROTO_ICMP {
            *dport = new.dport;
        }
    }
    let fix = |result: Result<(), i64>| result.map_err(|_| DropReason::Malformed);
    if new.saddr != flow.saddr {
        fix(csum::l4_pseudo_addr(
            ctx,
            flow.l4_csum_off,
            flow.l4,
            flow.saddr,
            new.saddr,
        ))?;
    }
    if new.daddr != flow.daddr {
        fix(csum::l4_pseudo_addr(
            ctx,
            flow.l4_csum_off,
            flow.l4,
            flow.daddr,
            new.daddr,
        ))?;
    }
    if new.sport != flow.sport {
        fix(csum::l4_field(
            ctx,
            flow.l4_csum_off,
            flow.l4,
            flow.sport,
            new.sport,
        ))?;
    }
    if new.dport != flow.dport && flow.proto != IPPROTO_ICMP {
        fix(csum::l4_field(
            ctx,
            flow.l4_csum_off,
            flow.l4,
            flow.dport,
            new.dport,
        ))?;
    }
    Ok(())
}

/// How a new flow's translated source port is chosen.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum SourcePort {
    /// From the NAT port range (masquerade: the host's address is shared by every endpoint).
    FromRange,
    /// The packet's own port, unless another flow already uses the translated tuple; then one
    /// from the NAT port range (connections to published ports keep the client's port).
    KeepOrFromRange,
}

/// What a new flow is translated to and how its entries are marked.
pub struct NewFlow {
    /// The translated tuple; its source port is a first choice or ignored (see `port`).
    pub new: Tuple,
    pub port: SourcePort,
    pub kind: u8,
    /// `CT_F_*` of the original and of the reply direction.
    pub original_flags: u8,
    pub reply_flags: u8,
    /// The endpoint's host-side veth.
    pub ifindex: u32,
}

/// Records a new translated flow and returns the tuple its packets are rewritten to. The source
/// port is chosen so that no other flow has the same translated tuple: the reply entry's key is
/// that tuple reversed and is inserted with NOEXIST, which is the uniqueness check. Then the
/// original-direction entry.
///
/// With `RECLAIM_CLOSED`, a new TCP connection may take over the tuple of a closed one (see
/// `reclaim_closed`): masquerade, where many connections share the host's address and the NAT
/// port range. Published ports keep the client's own port, so their tuples collide only when a
/// client reuses its own, and the code stays out of `tc_from_endpoint`, whose stack it would
/// push past the verifier's limit.
pub fn create_flow<const RECLAIM_CLOSED: bool>(
    ctx: &TcContext,
    flow: &Flow,
    spec: NewFlow,
) -> Result<Tuple, DropReason> {
    let (port_min, port_max) = crate::config::nat_ports();
    let range = u32::from(port_max.saturating_sub(port_min)) + 1;
    // SAFETY: plain helper call.
    let start = unsafe { bpf_get_prandom_u32() };
    let now = now();
    let key = flow.key();
    let mut new = spec.new;
    let reply = CtEntry {
        last_seen_ns: now,
        packets: 0,
        bytes: 0,
        new_saddr: flow.daddr,
        new_daddr: flow.saddr,
        new_sport: flow.dport,
        new_dport: flow.sport,
        direction: CT_DIR_REPLY,
        state: 0,
        kind: spec.kind,
        flags: spec.reply_flags,
        ifindex: spec.ifindex,
        _pad: 0,
    };
    let mut chosen = false;
    for attempt in 0..PORT_TRIES {
        if attempt > 0 || spec.port == SourcePort::FromRange {
            let port = port_min as u32 + (start.wrapping_add(attempt.wrapping_mul(7919))) % range;
            new.sport = (port as u16).to_be_bytes();
        }
        if flow.proto == IPPROTO_ICMP {
            // Echo replies carry the identifier in the one field both "ports" stand for.
            new.dport = new.sport;
        }
        match CONNTRACK.insert(new.reply_key(flow.proto), reply, BPF_NOEXIST) {
            Ok(()) => {
                if attempt > 0 {
                    count_nat(nat_stat::PORT_RETRIES);
                }
                chosen = true;
                break;
            }
            Err(e) if e == EEXIST => {
                // Taken. By a TCP flow that has closed, a new connection may have the tuple,
                // as Linux reuses a tuple in TIME_WAIT: freed and taken at once. Without this,
                // closed flows hold their ports until the collector removes them, and a client
                // opening many short connections through masquerade runs out: once closed
                // flows fill the range, every port tried is taken.
                if RECLAIM_CLOSED
                    && opens_tcp(flow)
                    && reclaim_closed(&new.reply_key(flow.proto))
                    && CONNTRACK
                        .insert(new.reply_key(flow.proto), reply, BPF_NOEXIST)
                        .is_ok()
                {
                    if attempt > 0 {
                        count_nat(nat_stat::PORT_RETRIES);
                    }
                    chosen = true;
                    break;
                }
                continue;
            }
            Err(_) => {
                count_nat(nat_stat::TABLE_FULL);
                return Err(DropReason::ConntrackFull);
            }
        }
    }
    if !chosen {
        count_nat(nat_stat::PORTS_EXHAUSTED);
        return Err(DropReason::NatPortsExhausted);
    }
    let original = CtEntry {
        last_seen_ns: now,
        packets: 1,
        bytes: u64::from(ctx.len()),
        new_saddr: new.saddr,
        new_daddr: new.daddr,
        new_sport: new.sport,
        new_dport: new.dport,
        direction: CT_DIR_ORIGINAL,
        state: next_state(0, CT_DIR_ORIGINAL, flow),
        kind: spec.kind,
        flags: spec.original_flags,
        ifindex: spec.ifindex,
        _pad: 0,
    };
    if let Err(e) = CONNTRACK.insert(key, original, BPF_NOEXIST) {
        let _ = CONNTRACK.remove(new.reply_key(flow.proto));
        if e == EEXIST {
            // Another CPU created this flow between our lookup and now: use its translation.
            // SAFETY: read-only use of a live map value.
            return match unsafe { CONNTRACK.get(key) } {
                Some(existing) => Ok(Tuple {
                    saddr: existing.new_saddr,
                    daddr: existing.new_daddr,
                    sport: existing.new_sport,
                    dport: existing.new_dport,
                }),
                None => Err(DropReason::ConntrackFull),
            };
        }
        count_nat(nat_stat::TABLE_FULL);
        return Err(DropReason::ConntrackFull);
    }
    count_nat(if spec.kind == CT_KIND_PUBLISHED {
        nat_stat::PUBLISHED_FLOWS
    } else {
        nat_stat::FLOWS_CREATED
    });
    Ok(new)
}

/// A TCP SYN (no ACK): the first packet of a new connection.
#[inline(always)]
fn opens_tcp(flow: &Flow) -> bool {
    flow.proto == IPPROTO_TCP && flow.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
}

/// Removes the flow whose reply-direction entry is at `reply_key` if it is a TCP flow that has
/// closed (reset, or finished both ways); true when it did. Out of line, reading fields in
/// place rather than copying entries: the callers' stack is near the verifier's limit.
#[inline(never)]
fn reclaim_closed(reply_key: &CtKey) -> bool {
    let Some(reply) = CONNTRACK.get_ptr(*reply_key) else {
        return false;
    };
    // SAFETY: a live map value, read field by field.
    let (direction, state, original_key) = unsafe {
        (
            (*reply).direction,
            (*reply).state,
            (*reply).partner_key(reply_key.proto),
        )
    };
    if direction != CT_DIR_REPLY {
        return false;
    }
    // The entry at the original key counts, and goes, only if it is this entry's partner: an
    // orphan reply entry's tuple may meanwhile carry a new connection, translated otherwise.
    let original = CONNTRACK.get_ptr(original_key).filter(|original| {
        // SAFETY: as above.
        unsafe { (**original).points_back_to(reply_key) }
    });
    // SAFETY: as above.
    let state = state | original.map_or(0, |original| unsafe { (*original).state });
    let finished = CT_STATE_FIN_ORIGINAL | CT_STATE_FIN_REPLY;
    if state & CT_STATE_RST == 0 && state & finished != finished {
        return false;
    }
    if original.is_some() {
        let _ = CONNTRACK.remove(original_key);
    }
    let _ = CONNTRACK.remove(*reply_key);
    count_nat(nat_stat::CLOSED_REUSED);
    true
}

/// A TCP SYN found the entry at `key`: a new connection on the tuple of an earlier one (or the
/// same SYN again). It starts over on the flow's entries: the reply entry's state bits go too
/// (the SYN's own entry sheds its FIN and RST bits in `touch`), so that the earlier
/// connection's FIN or RST cannot make the new one look closed, which would let
/// `reclaim_closed` hand its port to another flow while it runs. False, with the entry
/// removed: it is an orphan (its partner is missing or belongs to another flow), whose
/// translation would send the connection's replies elsewhere; the SYN opens a new flow
/// instead. Out of line, for the callers' stack, like `reclaim_closed`.
#[inline(never)]
fn restart(key: &CtKey, entry: *mut CtEntry) -> bool {
    // SAFETY: a live map value, read field by field.
    let (direction, partner_key) = unsafe { ((*entry).direction, (*entry).partner_key(key.proto)) };
    if direction != CT_DIR_ORIGINAL {
        // A SYN from the far side to a translated address: not a new connection of this flow.
        return true;
    }
    match CONNTRACK.get_ptr_mut(partner_key) {
        // SAFETY: as above.
        Some(partner) if unsafe { (*partner).points_back_to(key) } => {
            // SAFETY: a live map value; one byte, written whole.
            unsafe { (*partner).state = 0 };
            true
        }
        _ => {
            let _ = CONNTRACK.remove(*key);
            false
        }
    }
}

/// Masquerades the first packet of `flow` (source: an endpoint) to `host`.
pub fn masquerade(
    ctx: &TcContext,
    off: Ipv4Offsets,
    flow: &Flow,
    host: [u8; 4],
    ifindex: u32,
) -> Result<(), DropReason> {
    let new = create_flow::<true>(
        ctx,
        flow,
        NewFlow {
            new: Tuple {
                saddr: host,
                ..flow.tuple()
            },
            port: SourcePort::FromRange,
            kind: CT_KIND_MASQUERADE,
            original_flags: 0,
            reply_flags: 0,
            ifindex,
        },
    )?;
    translate(ctx, off, flow, &new)
}

/// Where a translated packet goes: the endpoint's address.
pub struct Delivery {
    pub addr: [u8; 4],
}

/// Translates an ICMP error about a translated flow (destination unreachable, including
/// "fragmentation needed", time exceeded, parameter problem) that reached the host's address:
/// the outer destination and the quoted packet's source go back to the endpoint, whether the
/// flow was masqueraded or came in through a published port (either way the quoted packet is
/// one the host sent, and the entry of its reverse says where it came from). `Ok(None)`: not
/// about one of our flows.
pub fn translate_icmp_error(
    ctx: &TcContext,
    off: Ipv4Offsets,
) -> Result<Option<Delivery>, DropReason> {
    let icmp = ptr_at::<[u8; 8]>(ctx, off.l4)?;
    // SAFETY: bounds-checked.
    let icmp_type = unsafe { (*icmp)[0] };
    if !matches!(
        icmp_type,
        ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAM_PROBLEM
    ) {
        return Ok(None);
    }
    let icmp_csum_off = off.l4 + 2;
    // The quoted packet: what we sent, so its source is the host and the lookup key is the
    // reply direction of its flow.
    let (inner_ip, inner_off, _) = ipv4_at(ctx, off.l4 + 8)?;
    let Some(inner) = quoted_flow_at(ctx, inner_ip, inner_off)? else {
        return Ok(None);
    };
    let reply_key = CtKey {
        saddr: inner.daddr,
        daddr: inner.saddr,
        sport: inner.dport,
        dport: inner.sport,
        proto: inner.proto,
        _pad: [0; 3],
    };
    // SAFETY: read-only use of a live map value.
    let Some(entry) = (unsafe { CONNTRACK.get(reply_key) }) else {
        return Ok(None);
    };
    // The reply entry's translation: the flow's original source.
    let (addr, port) = (entry.new_daddr, entry.new_dport);

    // Outer destination: only the IP header checksum covers it (ICMP has no pseudo-header).
    // The quoted header's source, its own checksum, and the quoted port: all ICMP payload, so
    // each change is also folded into the ICMP checksum. Direct writes first, then the helper.
    let outer = ptr_at::<Ipv4Hdr>(ctx, off.ip)?;
    let quoted = ptr_at::<Ipv4Hdr>(ctx, inner_off.ip)?;
    let quoted_port = ptr_at::<[u8; 2]>(ctx, inner.sport_off)?;
    // SAFETY: all three bounds-checked just above, and no helper called since.
    let (old_inner_check, new_inner_check) = unsafe {
        csum::set_ipv4_addr(
            core::ptr::addr_of_mut!((*outer).check),
            core::ptr::addr_of_mut!((*outer).dst_addr),
            addr,
        );
        let old_check = (*quoted).check;
        csum::set_ipv4_addr(
            core::ptr::addr_of_mut!((*quoted).check),
            core::ptr::addr_of_mut!((*quoted).src_addr),
            addr,
        );
        *quoted_port = port;
        (old_check, (*quoted).check)
    };
    let icmp = L4Csum::Icmp;
    ctx.l4_csum_replace(
        icmp_csum_off,
        u32::from_ne_bytes(inner.saddr) as u64,
        u32::from_ne_bytes(addr) as u64,
        4,
    )
    .and_then(|()| csum::l4_field(ctx, icmp_csum_off, icmp, old_inner_check, new_inner_check))
    .and_then(|()| csum::l4_field(ctx, icmp_csum_off, icmp, inner.sport, port))
    .map_err(|_| DropReason::Malformed)?;
    Ok(Some(Delivery { addr }))
}

/// The flow of a packet quoted in an ICMP error: only its first 8 bytes of L4 are guaranteed,
/// which hold the ports (TCP, UDP) or the echo identifier.
#[inline(always)]
fn quoted_flow_at(
    ctx: &TcContext,
    ip: *const Ipv4Hdr,
    off: Ipv4Offsets,
) -> Result<Option<Flow>, DropReason> {
    // SAFETY: bounds-checked by ipv4_at.
    let (proto, saddr, daddr) = unsafe { ((*ip).proto, (*ip).src_addr, (*ip).dst_addr) };
    let h = ptr_at::<[u8; 8]>(ctx, off.l4)?;
    // SAFETY: bounds-checked.
    let h = unsafe { *h };
    let (sport, dport, sport_off, dport_off) = match proto {
        IPPROTO_TCP | IPPROTO_UDP => ([h[0], h[1]], [h[2], h[3]], off.l4, off.l4 + 2),
        IPPROTO_ICMP if h[0] == ICMP_ECHO_REQUEST => {
            ([h[4], h[5]], [h[4], h[5]], off.l4 + 4, off.l4 + 4)
        }
        _ => return Ok(None),
    };
    Ok(Some(Flow {
        proto,
        saddr,
        daddr,
        sport,
        dport,
        sport_off,
        dport_off,
        l4_csum_off: 0,
        l4: L4Csum::None,
        tcp_flags: 0,
    }))
}

/// Offset of the IPv4 header in the frames the programs see.
pub const IP_OFF: usize = EthHdr::LEN;

/// An IPv4 packet at the uplink while masquerade is on.
pub struct UplinkPacket {
    /// The host's address (the masquerade source).
    pub host: [u8; 4],
    pub ip: *mut Ipv4Hdr,
    pub off: Ipv4Offsets,
    pub fragment: bool,
}

/// What both uplink programs start with: `None` when NAT is off (no host address configured)
/// or the frame is not IPv4, which they leave alone.
#[inline(always)]
pub fn uplink_packet(ctx: &TcContext) -> Result<Option<UplinkPacket>, DropReason> {
    let host = crate::config::host_ipv4();
    if host == [0; 4] {
        return Ok(None);
    }
    let eth = ptr_at::<EthHdr>(ctx, 0)?;
    // SAFETY: bounds-checked.
    if u16::from_be(unsafe { (*eth).ether_type }) != crate::parse::ETH_P_IP {
        return Ok(None);
    }
    let (ip, off, fragment) = ipv4_at(ctx, IP_OFF)?;
    Ok(Some(UplinkPacket {
        host,
        ip,
        off,
        fragment,
    }))
}
