//! What the BPF_PROG_TEST_RUN fixture suites share: tc verdicts, checksums computed from
//! scratch (never copied from a program's output), and readable MACs for failure reports.

use std::net::Ipv4Addr;

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
