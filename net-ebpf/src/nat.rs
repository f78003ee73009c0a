//! Masquerade: source NAT for endpoint traffic leaving through the uplink, and the reverse
//! translation of replies (including the ICMP errors about a flow, so path-MTU discovery works
//! through NAT), with connection tracking in `CONNTRACK`.
//!
//! Translation happens at the uplink: after the host stack routed the endpoint's packet (egress)
//! and before the host stack sees a reply (ingress). Rewriting at the endpoint veth instead
//! would hand the stack packets whose source is one of its own addresses, which it drops as
//! martians.

use aya_ebpf::{
    helpers::generated::bpf_get_prandom_u32, helpers::generated::bpf_ktime_get_ns,
    programs::TcContext,
};
use net_ebpf_common::{
    CT_DIR_ORIGINAL, CT_DIR_REPLY, CT_STATE_ESTABLISHED, CT_STATE_FIN_ORIGINAL, CT_STATE_FIN_REPLY,
    CT_STATE_RST, CtEntry, CtKey, DropReason, nat_stat,
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
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// How many ports to try for a new flow before declaring the range exhausted towards this
/// destination. Bounded for the verifier; with random starting points a collision chain this
/// long means the range is nearly full.
const PORT_TRIES: u32 = 16;

/// `-EEXIST` from a map insert with `BPF_NOEXIST`.
const EEXIST: i32 = -17;
const BPF_NOEXIST: u64 = 1;

/// Byte offsets of an IPv4 packet's fields, after the Ethernet header.
#[derive(Clone, Copy)]
pub struct Ipv4Offsets {
    pub ip: usize,
    pub l4: usize,
}

impl Ipv4Offsets {
    pub const fn check(&self) -> usize {
        self.ip + 10
    }
    pub const fn saddr(&self) -> usize {
        self.ip + 12
    }
    pub const fn daddr(&self) -> usize {
        self.ip + 16
    }
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

fn now() -> u64 {
    // SAFETY: plain helper call.
    unsafe { bpf_ktime_get_ns() }
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

/// Masquerades one packet of `flow` (source: an endpoint) to `host`: finds or creates its
/// conntrack entries and rewrites the source address and port.
pub fn masquerade(
    ctx: &TcContext,
    off: Ipv4Offsets,
    flow: &Flow,
    host: [u8; 4],
    ifindex: u32,
    port_min: u16,
    port_max: u16,
) -> Result<(), DropReason> {
    let key = flow.key();
    let (nat_addr, nat_port) = match CONNTRACK.get_ptr_mut(key) {
        Some(entry) => {
            touch(entry, flow, ctx.len());
            // SAFETY: live map value.
            unsafe { ((*entry).xlate_addr, (*entry).xlate_port) }
        }
        None => create_flow(flow, key, host, ifindex, port_min, port_max, ctx.len())?,
    };
    csum::rewrite_addr(
        ctx,
        off.saddr(),
        off.check(),
        flow.l4_csum_off,
        flow.l4,
        flow.saddr,
        nat_addr,
    )
    .map_err(|_| DropReason::Malformed)?;
    // For ICMP echo the identifier is the one "port" field.
    csum::rewrite_port(
        ctx,
        flow.sport_off,
        flow.l4_csum_off,
        flow.l4,
        flow.sport,
        nat_port,
    )
    .map_err(|_| DropReason::Malformed)
}

/// Records a new masqueraded flow: picks a source port no other flow uses towards the same
/// destination (the reply entry's key is the uniqueness check: inserted with NOEXIST), then the
/// original-direction entry.
fn create_flow(
    flow: &Flow,
    key: CtKey,
    host: [u8; 4],
    ifindex: u32,
    port_min: u16,
    port_max: u16,
    bytes: u32,
) -> Result<([u8; 4], [u8; 2]), DropReason> {
    let range = u32::from(port_max.saturating_sub(port_min)) + 1;
    // SAFETY: plain helper call.
    let start = unsafe { bpf_get_prandom_u32() };
    let now = now();
    let mut reply_key = CtKey {
        saddr: flow.daddr,
        daddr: host,
        sport: flow.dport,
        dport: [0; 2],
        proto: flow.proto,
        _pad: [0; 3],
    };
    if flow.proto == IPPROTO_ICMP {
        reply_key.sport = [0; 2];
    }
    let reply = CtEntry {
        last_seen_ns: now,
        packets: 0,
        bytes: 0,
        xlate_addr: flow.saddr,
        xlate_port: flow.sport,
        direction: CT_DIR_REPLY,
        state: 0,
        ifindex,
        _pad: 0,
    };
    let mut chosen = None;
    for attempt in 0..PORT_TRIES {
        let port = port_min as u32 + (start.wrapping_add(attempt.wrapping_mul(7919))) % range;
        let port = (port as u16).to_be_bytes();
        reply_key.dport = port;
        if flow.proto == IPPROTO_ICMP {
            // Echo replies carry the identifier in the one field both "ports" stand for.
            reply_key.sport = port;
        }
        match CONNTRACK.insert(reply_key, reply, BPF_NOEXIST) {
            Ok(()) => {
                if attempt > 0 {
                    count_nat(nat_stat::PORT_RETRIES);
                }
                chosen = Some(port);
                break;
            }
            Err(e) if e == EEXIST => continue,
            Err(_) => {
                count_nat(nat_stat::TABLE_FULL);
                return Err(DropReason::ConntrackFull);
            }
        }
    }
    let Some(port) = chosen else {
        count_nat(nat_stat::PORTS_EXHAUSTED);
        return Err(DropReason::NatPortsExhausted);
    };
    let original = CtEntry {
        last_seen_ns: now,
        packets: 1,
        bytes: u64::from(bytes),
        xlate_addr: host,
        xlate_port: port,
        direction: CT_DIR_ORIGINAL,
        state: next_state(0, CT_DIR_ORIGINAL, flow),
        ifindex,
        _pad: 0,
    };
    if let Err(e) = CONNTRACK.insert(key, original, BPF_NOEXIST) {
        let _ = CONNTRACK.remove(reply_key);
        if e == EEXIST {
            // Another CPU created this flow between our lookup and now: use its port.
            // SAFETY: read-only use of a live map value.
            return match unsafe { CONNTRACK.get(key) } {
                Some(existing) => Ok((existing.xlate_addr, existing.xlate_port)),
                None => Err(DropReason::ConntrackFull),
            };
        }
        count_nat(nat_stat::TABLE_FULL);
        return Err(DropReason::ConntrackFull);
    }
    count_nat(nat_stat::FLOWS_CREATED);
    Ok((host, port))
}

/// Where a translated reply goes: the endpoint's address.
pub struct Delivery {
    pub addr: [u8; 4],
}

/// Translates a reply of a masqueraded flow back to its endpoint. `Ok(None)`: not ours (the
/// host's own traffic).
pub fn unmasquerade(
    ctx: &TcContext,
    off: Ipv4Offsets,
    flow: &Flow,
) -> Result<Option<Delivery>, DropReason> {
    let Some(entry) = CONNTRACK.get_ptr_mut(flow.key()) else {
        return Ok(None);
    };
    touch(entry, flow, ctx.len());
    // SAFETY: live map value.
    let (addr, port) = unsafe { ((*entry).xlate_addr, (*entry).xlate_port) };
    csum::rewrite_addr(
        ctx,
        off.daddr(),
        off.check(),
        flow.l4_csum_off,
        flow.l4,
        flow.daddr,
        addr,
    )
    .map_err(|_| DropReason::Malformed)?;
    csum::rewrite_port(
        ctx,
        flow.dport_off,
        flow.l4_csum_off,
        flow.l4,
        flow.dport,
        port,
    )
    .map_err(|_| DropReason::Malformed)?;
    Ok(Some(Delivery { addr }))
}

/// Translates an ICMP error about a masqueraded flow (destination unreachable, including
/// "fragmentation needed", time exceeded, parameter problem): the outer destination and the
/// quoted packet's source go back to the endpoint. `Ok(None)`: not about one of our flows.
pub fn unmasquerade_icmp_error(
    ctx: &TcContext,
    off: Ipv4Offsets,
    outer_daddr: [u8; 4],
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
    let (addr, port) = (entry.xlate_addr, entry.xlate_port);

    // Outer destination: only the IP header checksum covers it (ICMP has no pseudo-header).
    csum::rewrite_addr(
        ctx,
        off.daddr(),
        off.check(),
        0,
        L4Csum::None,
        outer_daddr,
        addr,
    )
    .map_err(|_| DropReason::Malformed)?;
    // The quoted header's source, its own checksum, and the quoted port: all ICMP payload, so
    // each change is also folded into the ICMP checksum.
    let inner_check = ptr_at::<[u8; 2]>(ctx, inner_off.check())?;
    // SAFETY: bounds-checked.
    let old_inner_check = unsafe { *inner_check };
    let new_inner_check = csum::incremental(old_inner_check, &inner.saddr, &addr);
    let icmp = L4Csum::Icmp;
    ctx.l4_csum_replace(
        icmp_csum_off,
        u32::from_ne_bytes(inner.saddr) as u64,
        u32::from_ne_bytes(addr) as u64,
        4,
    )
    .and_then(|()| ctx.store(inner_off.saddr(), &addr, 0))
    .and_then(|()| {
        ctx.l4_csum_replace(
            icmp_csum_off,
            u16::from_ne_bytes(old_inner_check) as u64,
            u16::from_ne_bytes(new_inner_check) as u64,
            2,
        )
    })
    .and_then(|()| ctx.store(inner_off.check(), &new_inner_check, 0))
    .and_then(|()| csum::rewrite_port(ctx, inner.sport_off, icmp_csum_off, icmp, inner.sport, port))
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
