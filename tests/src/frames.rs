//! Hand-made Ethernet frames sent through an AF_PACKET socket: for what a normal socket cannot
//! send (forged ARP, a foreign source address without configuring it, truncated headers, IPv6
//! on an endpoint that has it switched off).

use std::{
    ffi::CString,
    io,
    net::Ipv4Addr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use crate::netns::in_netns;

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const BROADCAST: [u8; 6] = [0xff; 6];

/// `aa:bb:cc:dd:ee:ff` as bytes; panics on anything else.
pub fn mac(text: &str) -> [u8; 6] {
    let bytes: Vec<u8> = text
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).unwrap_or_else(|e| panic!("MAC {text:?}: {e}")))
        .collect();
    bytes
        .try_into()
        .unwrap_or_else(|_| panic!("MAC {text:?} does not have 6 bytes"))
}

fn ethernet(dst: [u8; 6], src: [u8; 6], ether_type: u16) -> Vec<u8> {
    let mut f = Vec::with_capacity(64);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ether_type.to_be_bytes());
    f
}

/// An ARP frame (Ethernet/IPv4). `op` 1 is a request, 2 a reply.
pub struct Arp {
    pub eth_src: [u8; 6],
    pub eth_dst: [u8; 6],
    pub op: u16,
    pub sender_mac: [u8; 6],
    pub sender_ip: Ipv4Addr,
    pub target_mac: [u8; 6],
    pub target_ip: Ipv4Addr,
}

impl Arp {
    /// "Who has `target_ip`? Tell `sender_ip`", broadcast, everything consistent with `mac`.
    pub fn request(mac: [u8; 6], sender_ip: Ipv4Addr, target_ip: Ipv4Addr) -> Arp {
        Arp {
            eth_src: mac,
            eth_dst: BROADCAST,
            op: 1,
            sender_mac: mac,
            sender_ip,
            target_mac: [0; 6],
            target_ip,
        }
    }

    pub fn frame(&self) -> Vec<u8> {
        let mut f = ethernet(self.eth_dst, self.eth_src, ETH_P_ARP);
        f.extend_from_slice(&1u16.to_be_bytes()); // hardware: Ethernet
        f.extend_from_slice(&ETH_P_IP.to_be_bytes());
        f.extend_from_slice(&[6, 4]);
        f.extend_from_slice(&self.op.to_be_bytes());
        f.extend_from_slice(&self.sender_mac);
        f.extend_from_slice(&self.sender_ip.octets());
        f.extend_from_slice(&self.target_mac);
        f.extend_from_slice(&self.target_ip.octets());
        f
    }
}

/// An Ethernet/IPv4/UDP frame with a correct IPv4 header checksum (UDP checksum 0: none).
pub struct Udp4 {
    pub eth_src: [u8; 6],
    pub eth_dst: [u8; 6],
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub src_port: u16,
    pub dst_port: u16,
    pub payload: Vec<u8>,
}

impl Udp4 {
    pub fn frame(&self) -> Vec<u8> {
        let udp_len = 8 + self.payload.len();
        let total = 20 + udp_len;
        let mut ip = Vec::with_capacity(total);
        ip.extend_from_slice(&[0x45, 0]);
        ip.extend_from_slice(&(total as u16).to_be_bytes());
        ip.extend_from_slice(&[0, 0, 0x40, 0]); // id 0, don't fragment
        ip.extend_from_slice(&[64, 17, 0, 0]); // ttl, UDP, checksum placeholder
        ip.extend_from_slice(&self.src.octets());
        ip.extend_from_slice(&self.dst.octets());
        let csum = ipv4_checksum(&ip);
        ip[10..12].copy_from_slice(&csum.to_be_bytes());
        ip.extend_from_slice(&self.src_port.to_be_bytes());
        ip.extend_from_slice(&self.dst_port.to_be_bytes());
        ip.extend_from_slice(&(udp_len as u16).to_be_bytes());
        ip.extend_from_slice(&[0, 0]);
        ip.extend_from_slice(&self.payload);
        let mut f = ethernet(self.eth_dst, self.eth_src, ETH_P_IP);
        f.extend_from_slice(&ip);
        f
    }
}

fn ipv4_checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = header
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An Ethernet frame of `ether_type` carrying `payload` as it is (for truncated or foreign
/// protocols).
pub fn raw_frame(eth_src: [u8; 6], eth_dst: [u8; 6], ether_type: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = ethernet(eth_dst, eth_src, ether_type);
    f.extend_from_slice(payload);
    f
}

/// Sends `frame` as it is out of interface `ifname` in namespace `netns`.
pub fn send_frame(netns: &str, ifname: &str, frame: &[u8]) {
    in_netns(netns, || -> io::Result<()> {
        let name = CString::new(ifname).expect("interface name without NUL");
        // SAFETY: plain libc calls on a C string we own and a descriptor we own.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if ifindex == 0 {
            return Err(io::Error::last_os_error());
        }
        // Protocol 0: this socket only sends.
        // SAFETY: socket(2) with constant arguments; the result is checked.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_ll is plain old data; all-zero is a valid start.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = ifindex as i32;
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&frame[..6]);
        // SAFETY: `frame` and `addr` outlive the call; the lengths are theirs.
        let sent = unsafe {
            libc::sendto(
                fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&raw const addr).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        assert_eq!(sent as usize, frame.len(), "short raw send");
        Ok(())
    })
    .unwrap_or_else(|e| panic!("sending a raw frame out of {ifname} in {netns}: {e}"));
}
