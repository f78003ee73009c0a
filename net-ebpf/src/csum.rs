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

/// Replaces a 4-byte address at `addr_off`, fixing the IP header checksum (at `ip_csum_off`)
/// and, for TCP/UDP, the L4 checksum (at `l4_csum_off`) through its pseudo-header.
#[inline(always)]
pub fn rewrite_addr(
    ctx: &TcContext,
    addr_off: usize,
    ip_csum_off: usize,
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
            ctx.l4_csum_replace(l4_csum_off, old_raw, new_raw, BPF_F_PSEUDO_HDR as u64 | 4)?
        }
        L4Csum::Udp => ctx.l4_csum_replace(
            l4_csum_off,
            old_raw,
            new_raw,
            BPF_F_PSEUDO_HDR as u64 | BPF_F_MARK_MANGLED_0 | 4,
        )?,
        L4Csum::Icmp | L4Csum::None => {}
    }
    ctx.l3_csum_replace(ip_csum_off, old_raw, new_raw, 4)?;
    ctx.store(addr_off, &new, 0)
}

/// Replaces a 2-byte port (or ICMP echo identifier) at `port_off`, fixing the L4 checksum.
#[inline(always)]
pub fn rewrite_port(
    ctx: &TcContext,
    port_off: usize,
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
        L4Csum::Tcp | L4Csum::Icmp => ctx.l4_csum_replace(l4_csum_off, old_raw, new_raw, 2)?,
        L4Csum::Udp => {
            ctx.l4_csum_replace(l4_csum_off, old_raw, new_raw, BPF_F_MARK_MANGLED_0 | 2)?
        }
        L4Csum::None => {}
    }
    ctx.store(port_off, &new, 0)
}

/// One's-complement 16-bit checksum after replacing `old` with `new` in the covered data
/// (RFC 1624, eqn. 3), for checksums no helper knows about (the IP header quoted in an ICMP
/// error).
#[inline(always)]
pub fn incremental(csum: [u8; 2], old: &[u8; 4], new: &[u8; 4]) -> [u8; 2] {
    let mut sum = !u16::from_ne_bytes(csum) as u32;
    sum += !u16::from_ne_bytes([old[0], old[1]]) as u32;
    sum += !u16::from_ne_bytes([old[2], old[3]]) as u32;
    sum += u16::from_ne_bytes([new[0], new[1]]) as u32;
    sum += u16::from_ne_bytes([new[2], new[3]]) as u32;
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    (!(sum as u16)).to_ne_bytes()
}
