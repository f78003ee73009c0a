//! What the BPF_PROG_TEST_RUN fixture suites share: tc verdicts, checksums computed from
//! scratch (never copied from a program's output), readable MACs for failure reports, and the
//! `__sk_buff` context and private network namespace that put a test packet on a chosen device.

use std::{net::Ipv4Addr, thread};

use nix::sched::{CloneFlags, unshare};

use crate::run_ok;

pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;
pub const TC_ACT_REDIRECT: u32 = 7;

pub fn verdict_name(verdict: u32) -> String {
    match verdict {
        TC_ACT_OK => "TC_ACT_OK (0)".to_owned(),
        TC_ACT_SHOT => "TC_ACT_SHOT (2)".to_owned(),
        TC_ACT_REDIRECT => "TC_ACT_REDIRECT (7)".to_owned(),
        other => format!("{} (unexpected)", other as i32),
    }
}

/// The RFC 1071 ones'-complement sum, folded and complemented.
pub fn internet_checksum(chunks: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    let mut odd: Option<u8> = None;
    for byte in chunks.iter().flat_map(|chunk| chunk.iter().copied()) {
        match odd.take() {
            Some(high) => sum += u32::from(u16::from_be_bytes([high, byte])),
            None => odd = Some(byte),
        }
    }
    if let Some(high) = odd {
        sum += u32::from(u16::from_be_bytes([high, 0]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The TCP/UDP checksum over the IPv4 pseudo-header and `segment` (whose checksum field must be
/// zero, or hold a checksum to verify: then a valid segment gives 0).
pub fn l4_checksum(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, segment: &[u8]) -> u16 {
    let len = u16::try_from(segment.len()).expect("test segment fits in an IPv4 packet");
    let pseudo_tail = [0, proto, (len >> 8) as u8, len as u8];
    internet_checksum(&[&src.octets(), &dst.octets(), &pseudo_tail, segment])
}

pub fn mac_text(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Offset of `ingress_ifindex` in `struct __sk_buff` (include/uapi/linux/bpf.h), after `len`,
/// `pkt_type`, `mark`, `queue_mapping`, `protocol`, `vlan_present`, `vlan_tci`, `vlan_proto`
/// and `priority`, each a `__u32`; `ifindex` follows it.
const SKB_INGRESS_IFINDEX_OFFSET: usize = 36;
const SKB_IFINDEX_OFFSET: usize = 40;

/// A `__sk_buff` context that puts the test packet on device `ifindex`: `bpf_prog_test_run_skb`
/// makes the device with that ifindex (which must exist in the caller's network namespace, see
/// [`in_private_netns_with_veths`]) `skb->dev`, and wants every field it does not take to be
/// zero; a context shorter than the struct is zero-extended.
pub fn skb_context(ifindex: u32) -> Vec<u8> {
    forwarded_skb_context(ifindex, 0)
}

/// [`skb_context`] for a packet that entered the host on `ingress_ifindex` (`skb->skb_iif`,
/// which the test run takes from the context): one the host forwards rather than makes.
pub fn forwarded_skb_context(ifindex: u32, ingress_ifindex: u32) -> Vec<u8> {
    let mut ctx = vec![0u8; SKB_IFINDEX_OFFSET + 4];
    ctx[SKB_INGRESS_IFINDEX_OFFSET..SKB_IFINDEX_OFFSET]
        .copy_from_slice(&ingress_ifindex.to_ne_bytes());
    ctx[SKB_IFINDEX_OFFSET..].copy_from_slice(&ifindex.to_ne_bytes());
    ctx
}

/// How far above its device's ifindex each veth's peer is put: well away from every ifindex a
/// suite asks for, so that no peer takes one of them.
const VETH_PEER_INDEX_OFFSET: u32 = 1000;

/// Runs `f` on a thread of its own in a fresh network namespace that holds a device (one end
/// of a veth) at each of `ifindexes`, so that test runs can name them in a [`skb_context`].
/// Only that thread switches namespace (`unshare` of a network namespace is per thread), and
/// the namespace and its devices go with it: nothing outside is touched.
pub fn in_private_netns_with_veths<T: Send>(ifindexes: &[u32], f: impl FnOnce() -> T + Send) -> T {
    thread::scope(|s| {
        let runner = s.spawn(|| {
            unshare(CloneFlags::CLONE_NEWNET)
                .unwrap_or_else(|e| panic!("unshare a private network namespace: {e}"));
            // A veth comes in pairs; the peer gets an index far from every one asked for. `ip`
            // runs in this thread's namespace: a child inherits it.
            for ifindex in ifindexes {
                let index = ifindex.to_string();
                let peer_index = (ifindex + VETH_PEER_INDEX_OFFSET).to_string();
                let (name, peer) = (format!("h{index}"), format!("e{index}"));
                #[rustfmt::skip]
                run_ok("ip", &[
                    "link", "add", &name, "index", &index,
                    "type", "veth", "peer", &peer, "index", &peer_index,
                ]);
            }
            f()
        });
        runner
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}
