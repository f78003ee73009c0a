//! Bounds-checked access to packet headers. All header access goes through [`ptr_at`] so that
//! every read is proven in bounds to the verifier in one place.

use aya_ebpf::programs::TcContext;
use net_ebpf_common::DropReason;

/// No header the programs read starts further into a packet than this: an Ethernet header, an
/// IPv4 header with options (60 bytes), and in an ICMP error the quoted IPv4 header with options
/// and the 8 bytes after it.
const MAX_HEADER_OFFSET: usize = 256;

/// A pointer to a `T` at `offset` bytes into the packet's linear data, or `Malformed` when the
/// packet is too short. The pointer is valid until the next helper that may change the packet.
///
/// The offset is also held to `MAX_HEADER_OFFSET`: an offset the verifier has lost track of
/// (one read back from the stack) gets a bound here, which it needs before adding it to a
/// packet pointer. A constant offset makes the check disappear at compile time.
#[inline(always)]
pub fn ptr_at<T>(ctx: &TcContext, offset: usize) -> Result<*mut T, DropReason> {
    if offset > MAX_HEADER_OFFSET {
        return Err(DropReason::Malformed);
    }
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return Err(DropReason::Malformed);
    }
    Ok((start + offset) as *mut T)
}

/// The ifindex of the device the program runs on.
#[inline(always)]
pub fn ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: `skb` is the context pointer the kernel passed to the program.
    unsafe { (*ctx.skb.skb).ifindex }
}

/// The ifindex of the device the packet entered the host on; 0 for a packet the host made.
#[inline(always)]
pub fn ingress_ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: as in `ifindex`.
    unsafe { (*ctx.skb.skb).ingress_ifindex }
}

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ARP_OP_REQUEST: u16 = 1;
pub const ARP_OP_REPLY: u16 = 2;
