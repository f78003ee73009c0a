//! Checksum fix-ups for rewritten headers.
//!
//! Addresses and ports are passed as they stand in the packet (network byte order, read as raw
//! bytes): the helpers and the one's-complement arithmetic below are byte-order agnostic, so no
//! swapping is needed (RFC 1624 incremental update).

use aya_ebpf::{bindings::BPF_F_PSEUDO_HDR, programs::TcContext};

/// `BPF_F_MARK_MANGLED_0`: a UDP checksum that becomes 0 is written as 0xffff, since 0 means
/// "no checksum" for UDP.
const BPF_F_MARK_MANGLED_0: u64 = 1 << 5;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum L4Csum {
    /// TCP: the checksum covers a pseudo-header with the addresses.
    Tcp,
    /// UDP with a checksum (a zero checksum means none and must stay zero).
    Udp,
    /// ICMP: no pseudo-header; only its own fields count.
    Icmp,
    /// Nothing to fix (UDP without a checksum).
    None,
}

/// Sets the 4-byte address at `addr` (the source or destination of the IPv4 header whose
/// checksum is at `check`) to `new`, fixing that checksum by arithmetic. The IPv4 header checksum
/// always stands complete in the packet (no offload ever leaves it to the device), so unlike the
/// L4 checksum it needs no helper, and a direct write spares the helper calls' writability checks.
///
/// # Safety
/// Both pointers must be bounds-checked packet pointers, valid (no packet-changing helper called
/// since they were taken).
#[inline(always)]
pub unsafe fn set_ipv4_addr(check: *mut [u8; 2], addr: *mut [u8; 4], new: [u8; 4]) {
    // SAFETY: the caller's guarantee.
    unsafe {
        let old = *addr;
        *check = incremental(*check, &old, &new);
        *addr = new;
    }
}

/// Folds a changed IPv4 address into the L4 checksum at `l4_csum_off` through its pseudo-header
/// (TCP, UDP; ICMP has none), with the kernel's helper: it knows whether the checksum in the
/// packet is complete or a pseudo-header sum left for offload to finish (CHECKSUM_PARTIAL, as
/// for every TCP packet a local socket sends), which a program cannot see.
#[inline(always)]
pub fn l4_pseudo_addr(
    ctx: &TcContext,
    l4_csum_off: usize,
    l4: L4Csum,
    old: [u8; 4],
    new: [u8; 4],
) -> Result<(), i64> {
    let (old_raw, new_raw) = (
        u32::from_ne_bytes(old) as u64,
        u32::from_ne_bytes(new) as u64,
    );
    match l4 {
        L4Csum::Tcp => {
            ctx.l4_csum_replace(l4_csum_off, old_raw, new_raw, BPF_F_PSEUDO_HDR as u64 | 4)
        }
        L4Csum::Udp => ctx.l4_csum_replace(
            l4_csum_off,
            old_raw,
            new_raw,
            BPF_F_PSEUDO_HDR as u64 | BPF_F_MARK_MANGLED_0 | 4,
        ),
        L4Csum::Icmp | L4Csum::None => Ok(()),
    }
}

/// Folds a changed 2-byte field the L4 checksum covers (a port, the ICMP echo identifier) into
/// that checksum, with the kernel's helper (see [`l4_pseudo_addr`]); the field itself is written
/// by the caller.
#[inline(always)]
pub fn l4_field(
    ctx: &TcContext,
    l4_csum_off: usize,
    l4: L4Csum,
    old: [u8; 2],
    new: [u8; 2],
) -> Result<(), i64> {
    let (old_raw, new_raw) = (
        u16::from_ne_bytes(old) as u64,
        u16::from_ne_bytes(new) as u64,
    );
    match l4 {
        L4Csum::Tcp | L4Csum::Icmp => ctx.l4_csum_replace(l4_csum_off, old_raw, new_raw, 2),
        L4Csum::Udp => ctx.l4_csum_replace(l4_csum_off, old_raw, new_raw, BPF_F_MARK_MANGLED_0 | 2),
        L4Csum::None => Ok(()),
    }
}

/// One's-complement 16-bit checksum after replacing `old` with `new` in the covered data
/// (RFC 1624, eqn. 3), for the checksums a program keeps itself: the IPv4 header's, and the
/// IP header quoted in an ICMP error.
#[inline(always)]
pub fn incremental(csum: [u8; 2], old: &[u8; 4], new: &[u8; 4]) -> [u8; 2] {
    let mut sum = !u16::from_ne_bytes(csum) as u32;
    sum += !u16::from_ne_bytes([old[0], old[1]]) as u32;
    sum += !u16::from_ne_bytes([old[2], old[3]]) as u32;
    sum += u16::from_ne_bytes([new[0], new[1]]) as u32;
    sum += u16::from_ne_bytes([new[2], new[3]]) as u32;
    fold(sum)
}

/// [`incremental`] for one 16-bit word.
#[inline(always)]
pub fn incremental16(csum: [u8; 2], old: [u8; 2], new: [u8; 2]) -> [u8; 2] {
    let mut sum = !u16::from_ne_bytes(csum) as u32;
    sum += !u16::from_ne_bytes(old) as u32;
    sum += u16::from_ne_bytes(new) as u32;
    fold(sum)
}

/// The one's-complement of a 32-bit sum of 16-bit words folded to 16 bits.
#[inline(always)]
fn fold(mut sum: u32) -> [u8; 2] {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    (!(sum as u16)).to_ne_bytes()
}
