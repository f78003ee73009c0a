//! Read-only globals the agent sets at load (`EbpfLoader::set_global`), named in
//! `net_ebpf_common::global_names`. Zero (the compiled-in value) means "not configured".

/// The uplink's IPv4 address, raw network byte order (`u32::from_ne_bytes(octets)`).
#[unsafe(no_mangle)]
static HOST_IPV4: u32 = 0;
#[unsafe(no_mangle)]
static UPLINK_IFINDEX: u32 = 0;
#[unsafe(no_mangle)]
static NAT_PORT_MIN: u16 = net_ebpf_common::DEFAULT_NAT_PORT_MIN;
#[unsafe(no_mangle)]
static NAT_PORT_MAX: u16 = net_ebpf_common::DEFAULT_NAT_PORT_MAX;

// Volatile reads: the loader patches these values into the object after compilation, so the
// compiler must not fold the compiled-in defaults.

#[inline(always)]
pub fn host_ipv4() -> [u8; 4] {
    // SAFETY: a plain read of a static.
    unsafe { core::ptr::read_volatile(&HOST_IPV4) }.to_ne_bytes()
}

#[inline(always)]
pub fn nat_ports() -> (u16, u16) {
    // SAFETY: plain reads of statics.
    unsafe {
        (
            core::ptr::read_volatile(&NAT_PORT_MIN),
            core::ptr::read_volatile(&NAT_PORT_MAX),
        )
    }
}

#[inline(always)]
pub fn uplink_ifindex() -> u32 {
    // SAFETY: a plain read of a static.
    unsafe { core::ptr::read_volatile(&UPLINK_IFINDEX) }
}
