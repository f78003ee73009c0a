//! Published ports: finding the endpoint behind a host port, and the allow list checked before
//! any translation (a published port must never be a hole in the host's firewall).

use aya_ebpf::{maps::lpm_trie::Key, programs::TcContext};
use net_ebpf_common::{
    AllowKey, CT_F_AT_ENDPOINT, CT_KIND_PUBLISHED, DropReason, EndpointKey, PUBLISH_F_ALLOW_LIST,
    PublishKey, PublishTarget,
};

use network_types::ip::Ipv4Hdr;

use crate::{
    maps::{ENDPOINTS, PUBLISHED, PUBLISHED_ALLOW},
    nat::{
        self, Flow, IPPROTO_TCP, IPPROTO_UDP, NewFlow, SourcePort, TCP_ACK, TCP_RST, TCP_SYN, Tuple,
    },
    parse::ptr_at,
    route,
};

/// The published port a new flow is addressed to: the entry for its exact destination
/// address first, then, when `to_host` says the destination is one of the host's own
/// addresses, the entry for every address. `None` for anything else (the host's own ports).
#[inline(always)]
pub fn target(flow: &Flow, to_host: bool) -> Option<PublishTarget> {
    if flow.proto != IPPROTO_TCP && flow.proto != IPPROTO_UDP {
        return None;
    }
    // Only a SYN opens a TCP connection to a published port. Anything else without a
    // conntrack entry belongs to the host: a reply to one of its own connections that happens
    // to use a published port as its source port.
    if flow.proto == IPPROTO_TCP && flow.tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST) != TCP_SYN {
        return None;
    }
    let mut key = PublishKey {
        addr: flow.daddr,
        port: flow.dport,
        proto: flow.proto,
        _pad: 0,
    };
    // SAFETY: read-only use of a map value, copied out.
    if let Some(target) = unsafe { PUBLISHED.get(key) } {
        return Some(*target);
    }
    if !to_host {
        return None;
    }
    key.addr = [0; 4];
    // SAFETY: as above.
    unsafe { PUBLISHED.get(key) }.copied()
}

/// Refuses a source outside the port's allow list, if it has one.
#[inline(always)]
pub fn check_allowed(target: &PublishTarget, saddr: [u8; 4]) -> Result<(), DropReason> {
    if target.flags & PUBLISH_F_ALLOW_LIST == 0 {
        return Ok(());
    }
    let key = Key::new(
        64,
        AllowKey {
            id: target.id.to_be_bytes(),
            addr: saddr,
        },
    );
    match PUBLISHED_ALLOW.get(key) {
        Some(_) => Ok(()),
        None => Err(DropReason::NotAllowed),
    }
}

/// Where a new connection to a published port comes from.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Client {
    /// Through the uplink. Both directions are translated at the uplink; the endpoint sees the
    /// client's own address.
    Outside,
    /// The host itself (through its loopback). Replies must come back to the host's stack, so
    /// they are translated where they leave the endpoint; a loopback source (127.0.0.0/8),
    /// which the endpoint would take as itself, becomes the endpoint's gateway.
    Host,
    /// An endpoint on this host connecting to a host address (hairpin). The endpoint behind the
    /// port sees its gateway as the source, as with Docker's default proxy, so that its replies
    /// come back through the host to be translated, also when it is the client itself.
    Endpoint,
}

/// Records a new connection to the published port `target`, after its allow list, and
/// returns the tuple its packets are rewritten to.
#[inline(always)]
pub fn connect(
    ctx: &TcContext,
    flow: &Flow,
    target: &PublishTarget,
    client: Client,
) -> Result<Tuple, DropReason> {
    check_allowed(target, flow.saddr)?;
    // The host forwards what comes from outside or from an endpoint, and a packet it may not
    // forward must leave no flow behind (its delivery would be refused after the flow was made).
    if client != Client::Host {
        let ip = ptr_at::<Ipv4Hdr>(ctx, nat::IP_OFF)?;
        // SAFETY: bounds-checked just above.
        if !unsafe { route::forwardable(ip) } {
            return Err(DropReason::TtlExpired);
        }
    }
    // SAFETY: read-only use of a map value.
    let Some(endpoint) = (unsafe { ENDPOINTS.get(EndpointKey { addr: target.addr }) }) else {
        // The agent removes a port before its endpoint; a stale entry must not leak the flow.
        return Err(DropReason::RedirectFailed);
    };
    let (saddr, original_flags, reply_flags) = match client {
        Client::Outside => (flow.saddr, 0, 0),
        Client::Host if flow.saddr[0] == 127 => (endpoint.gateway, 0, CT_F_AT_ENDPOINT),
        Client::Host => (flow.saddr, 0, CT_F_AT_ENDPOINT),
        Client::Endpoint => (endpoint.gateway, CT_F_AT_ENDPOINT, CT_F_AT_ENDPOINT),
    };
    nat::create_flow::<false>(
        ctx,
        flow,
        NewFlow {
            new: Tuple {
                saddr,
                daddr: target.addr,
                sport: flow.sport,
                dport: target.port,
            },
            port: SourcePort::KeepOrFromRange,
            kind: CT_KIND_PUBLISHED,
            original_flags,
            reply_flags,
            ifindex: endpoint.ifindex,
        },
    )
}
