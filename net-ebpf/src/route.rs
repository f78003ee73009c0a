//! Routing out of the uplink from `tc_from_endpoint`, as the host's IP forwarding would do it
//! but without the trip through its stack (`ip_rcv`, `ip_forward`, the netfilter hooks, the
//! second program at the uplink): for the packets of flows translated at the uplink, such as a
//! published port's replies to an outside client.
//!
//! The route comes from the host's own FIB (`bpf_fib_lookup`), so policy and routes set by the
//! operator still hold, and the next hop's MAC from its neighbour table (`bpf_redirect_neigh`,
//! which resolves and confirms the neighbour as the stack does). Whatever this cannot do the
//! way the stack would (a route not through the uplink, a TTL about to expire, a packet too big
//! for the uplink), it leaves to the stack.

use aya_ebpf::{
    bindings::{
        __sk_buff, BPF_FIB_LKUP_RET_FWD_DISABLED, BPF_FIB_LKUP_RET_NOT_FWDED,
        BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LOOKUP_SKIP_NEIGH, TC_ACT_REDIRECT,
        bpf_fib_lookup as FibLookup, bpf_redir_neigh as RedirNeigh,
    },
    helpers::generated::{bpf_fib_lookup, bpf_redirect_neigh},
};

use network_types::ip::Ipv4Hdr;

use crate::{config, csum, deliver::LOOPBACK_IFINDEX};

const AF_INET: u8 = 2;

/// The lowest TTL a forwarded packet may arrive with: it leaves with one less, and the host
/// stack answers a packet that would leave with 0 (ICMP time exceeded).
pub const MIN_FORWARD_TTL: u8 = 2;

/// Whether the IPv4 packet at `ip` may be forwarded: its TTL leaves at least 1 after the hop.
///
/// # Safety
/// `ip` must be a bounds-checked, valid packet pointer.
#[inline(always)]
pub unsafe fn forwardable(ip: *const Ipv4Hdr) -> bool {
    // SAFETY: the caller's guarantee.
    unsafe { (*ip).ttl >= MIN_FORWARD_TTL }
}

/// Takes one hop off the IPv4 packet at `ip`, as a router does: TTL one less, with the header
/// checksum fixed (TTL and protocol share one of its 16-bit words). The caller has checked
/// [`forwardable`].
///
/// # Safety
/// `ip` must be a bounds-checked, valid packet pointer.
#[inline(always)]
pub unsafe fn take_hop(ip: *mut Ipv4Hdr) {
    // SAFETY: the caller's guarantee.
    unsafe {
        let (ttl, proto) = ((*ip).ttl, (*ip).proto);
        let ttl_after = ttl.wrapping_sub(1);
        (*ip).check = csum::incremental16((*ip).check, [ttl, proto], [ttl_after, proto]);
        (*ip).ttl = ttl_after;
    }
}

/// The host's FIB lookup of a packet from `saddr` to `daddr` arriving on `ifindex`, as its
/// stack's routing would do it: `bpf_fib_lookup`'s verdict, with the lookup structure filled
/// in (after success, `ifindex` is the egress device and `ipv4_dst` the next hop).
#[inline(always)]
fn fib_lookup(
    skb: *mut __sk_buff,
    ifindex: u32,
    saddr: u32,
    daddr: u32,
    tos: u8,
) -> (i64, FibLookup) {
    // SAFETY: a plain C struct of integers and unions of integers; all zeros is valid.
    let mut fib: FibLookup = unsafe { core::mem::zeroed() };
    fib.family = AF_INET;
    fib.ifindex = ifindex;
    // `tot_len` stays 0: the kernel then checks the packet (GSO-aware) against the egress
    // device's MTU and fails the lookup for one too big.
    fib.__bindgen_anon_2.tos = tos;
    fib.__bindgen_anon_3.ipv4_src = saddr;
    fib.__bindgen_anon_4.ipv4_dst = daddr;
    // SAFETY: helper call with a pointer to a live, correctly sized structure.
    let ret = unsafe {
        bpf_fib_lookup(
            skb.cast(),
            &mut fib,
            core::mem::size_of::<FibLookup>() as i32,
            BPF_FIB_LOOKUP_SKIP_NEIGH,
        )
    };
    (ret, fib)
}

/// Whether the host would route a packet to `daddr` on, by its own FIB, as for a packet of its
/// own: input on the loopback, from no address in particular. The agent leaves an internal
/// network's veths without forwarding, and its subnet with an `unreachable` rule; both stop the
/// stack, but this lookup should still tell a host address from one beyond, so it is asked
/// past them. False only when the lookup says the host keeps the packet or has no route for
/// it: a local address, a broadcast or multicast address with no route that covers it, no
/// route at all, or forwarding off on the host. Everything else counts as routed on, also a
/// failed lookup, so that a caller enforcing "nothing beyond the host" fails closed.
///
/// Not inlined, for the caller's stack, like [`redirect_out_of_uplink`].
#[inline(never)]
pub fn host_would_route_on(skb: *mut __sk_buff, daddr: u32, tos: u8) -> bool {
    let (ret, _) = fib_lookup(skb, LOOPBACK_IFINDEX, 0, daddr, tos);
    ret != i64::from(BPF_FIB_LKUP_RET_NOT_FWDED) && ret != i64::from(BPF_FIB_LKUP_RET_FWD_DISABLED)
}

/// Looks the route from `saddr` to `daddr` up as for a packet arriving on `ifindex` and, if it
/// leaves through the uplink, makes the program's verdict a redirect to its next hop (the
/// redirect happens after the program returns, so the caller may still rewrite the packet).
/// `false`: no uplink configured, or another route; nothing was set.
///
/// Not inlined: its lookup structure would otherwise sit in `tc_from_endpoint`'s own stack
/// frame, which is close to the verifier's limit.
#[inline(never)]
pub fn redirect_out_of_uplink(
    skb: *mut __sk_buff,
    ifindex: u32,
    saddr: u32,
    daddr: u32,
    tos: u8,
) -> bool {
    let uplink = config::uplink_ifindex();
    if uplink == 0 {
        return false;
    }
    let (ret, fib) = fib_lookup(skb, ifindex, saddr, daddr, tos);
    if ret != i64::from(BPF_FIB_LKUP_RET_SUCCESS) || fib.ifindex != uplink {
        return false;
    }
    // SAFETY: as above.
    let mut next_hop: RedirNeigh = unsafe { core::mem::zeroed() };
    next_hop.nh_family = u32::from(AF_INET);
    // After the lookup `ipv4_dst` holds the next hop: the gateway, or `daddr` itself on link.
    // SAFETY: the lookup wrote the IPv4 member.
    next_hop.__bindgen_anon_1.ipv4_nh = unsafe { fib.__bindgen_anon_4.ipv4_dst };
    // SAFETY: helper call with a pointer to a live, correctly sized structure.
    let verdict = unsafe {
        bpf_redirect_neigh(
            uplink,
            &mut next_hop,
            core::mem::size_of::<RedirNeigh>() as i32,
            0,
        )
    };
    verdict == i64::from(TC_ACT_REDIRECT)
}
