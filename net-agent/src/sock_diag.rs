//! The kernel's socket diagnostics (`NETLINK_SOCK_DIAG`, inet_diag: what `ss` uses): the local
//! addresses of the TCP and UDP sockets of the caller's network namespace, asked for by state
//! so that the kernel walks only the tables that can hold them.
//!
//! Why not `/proc/net/tcp`: reading it walks the kernel's whole established hash (one table
//! for every namespace, 262,144 buckets here) however few sockets the namespace has, ~1.3 ms
//! per file. A dump that asks for TCP_LISTEN alone walks only the listening hash: the kernel's
//! TCP dump (`inet_diag_dump_icsk`) returns before the established hash when
//! `!(idiag_states & ~TCPF_LISTEN)`. The request and reply formats are in `man 7 sock_diag`.

use std::{io, net::SocketAddr};

use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_sock_diag::{
    SockDiagMessage,
    constants::{AF_INET, AF_INET6, IPPROTO_TCP, IPPROTO_UDP},
    inet::{ExtensionFlags, InetRequest, SocketId, StateFlags, nlas::Nla},
};
use netlink_sys::{Socket, SocketAddr as NetlinkAddr, protocols::NETLINK_SOCK_DIAG};
use thiserror::Error;

/// A dump's datagrams are at most 32 KiB (the kernel caps a dump skb at
/// `SKB_WITH_OVERHEAD(32768)`, see `netlink_dump`); twice that leaves room.
const RECEIVE_BUFFER: usize = 64 * 1024;

#[derive(Debug, Error)]
#[error("listing the host's {what} through NETLINK_SOCK_DIAG: {source}")]
pub struct SockDiagError {
    what: &'static str,
    source: io::Error,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    fn number(self) -> u8 {
        match self {
            Family::V4 => AF_INET,
            Family::V6 => AF_INET6,
        }
    }
}

/// A socket's local address, as the kernel lists it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bound {
    pub addr: SocketAddr,
    /// An IPv6 socket with `IPV6_V6ONLY`: on `::` it takes no IPv4 traffic. The kernel says so
    /// for sockets in LISTEN and CLOSE (bound UDP) state, the only ones asked for here.
    pub v6_only: bool,
}

/// A `NETLINK_SOCK_DIAG` socket. It answers for the network namespace it was opened in.
pub struct SockDiag {
    socket: Socket,
    buffer: Vec<u8>,
    sequence: u32,
}

impl SockDiag {
    pub fn open() -> Result<Self, SockDiagError> {
        let fail = |source| SockDiagError {
            what: "sockets (opening the netlink socket)",
            source,
        };
        let socket = Socket::new(NETLINK_SOCK_DIAG).map_err(fail)?;
        // To the kernel (port 0); the kernel gives this socket a port on the first send.
        socket.connect(&NetlinkAddr::new(0, 0)).map_err(fail)?;
        Ok(Self {
            socket,
            buffer: vec![0; RECEIVE_BUFFER],
            sequence: 0,
        })
    }

    /// The local addresses of the TCP sockets of `family` in LISTEN state.
    pub fn tcp_listeners(&mut self, family: Family) -> Result<Vec<Bound>, SockDiagError> {
        let what = match family {
            Family::V4 => "listening TCP sockets",
            Family::V6 => "listening TCP6 sockets",
        };
        self.dump(family, IPPROTO_TCP, StateFlags::LISTEN, what)
    }

    /// The local addresses of the UDP sockets of `family` that hold a port: bound ones
    /// (TCP_CLOSE in the kernel's terms) and connected ones (TCP_ESTABLISHED), as
    /// `/proc/net/udp` lists them. A socket that was never bound is in no table.
    pub fn udp_sockets(&mut self, family: Family) -> Result<Vec<Bound>, SockDiagError> {
        let what = match family {
            Family::V4 => "UDP sockets",
            Family::V6 => "UDP6 sockets",
        };
        self.dump(family, IPPROTO_UDP, StateFlags::all(), what)
    }

    /// One `SOCK_DIAG_BY_FAMILY` dump request and its replies, to the end.
    fn dump(
        &mut self,
        family: Family,
        protocol: u8,
        states: StateFlags,
        what: &'static str,
    ) -> Result<Vec<Bound>, SockDiagError> {
        let fail = |source| SockDiagError { what, source };
        self.sequence = self.sequence.wrapping_add(1);
        let sequence = self.sequence;
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        header.sequence_number = sequence;
        let mut request = NetlinkMessage::new(
            header,
            SockDiagMessage::InetRequest(InetRequest {
                family: family.number(),
                protocol,
                extensions: ExtensionFlags::empty(),
                states,
                socket_id: match family {
                    Family::V4 => SocketId::new_v4(),
                    Family::V6 => SocketId::new_v6(),
                },
            })
            .into(),
        );
        request.finalize();
        let mut bytes = vec![0; request.buffer_len()];
        request.serialize(&mut bytes);
        self.socket.send(&bytes, 0).map_err(fail)?;

        let mut found = Vec::new();
        loop {
            // MSG_TRUNC: the datagram's real length, so a short buffer is an error, not a
            // silently cut reply.
            let len = self
                .socket
                .recv(&mut &mut self.buffer[..], libc::MSG_TRUNC)
                .map_err(fail)?;
            if len > self.buffer.len() {
                return Err(fail(io::Error::other(format!(
                    "a reply of {len} bytes does not fit the {} byte buffer",
                    self.buffer.len()
                ))));
            }
            let mut at = 0;
            while at < len {
                let message = NetlinkMessage::<SockDiagMessage>::deserialize(&self.buffer[at..len])
                    .map_err(|e| fail(io::Error::new(io::ErrorKind::InvalidData, e.to_string())))?;
                let size = message.header.length as usize;
                if size == 0 {
                    return Err(fail(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "a reply message of length 0",
                    )));
                }
                // Netlink messages are 4-byte aligned.
                at += size.next_multiple_of(4);
                if message.header.sequence_number != sequence {
                    continue;
                }
                match message.payload {
                    NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(response)) => {
                        let id = &response.header.socket_id;
                        let v6_only = response
                            .nlas
                            .iter()
                            .any(|nla| matches!(nla, Nla::SkV6Only(true)));
                        found.push(Bound {
                            addr: SocketAddr::new(id.source_address, id.source_port),
                            v6_only,
                        });
                    }
                    NetlinkPayload::Done(done) if done.code < 0 => {
                        return Err(fail(kernel_error(-done.code)));
                    }
                    NetlinkPayload::Done(_) => return Ok(found),
                    NetlinkPayload::Error(error) => {
                        if let Some(code) = error.code {
                            return Err(fail(kernel_error(code.get().abs())));
                        }
                    }
                    NetlinkPayload::Overrun(_) => {
                        return Err(fail(io::Error::other("the kernel reported an overrun")));
                    }
                    _ => {}
                }
            }
        }
    }
}

/// The kernel's refusal as an error, with the usual cause of ENOENT: no diag handler for the
/// protocol.
fn kernel_error(errno: i32) -> io::Error {
    let error = io::Error::from_raw_os_error(errno);
    if errno == libc::ENOENT {
        return io::Error::new(
            error.kind(),
            format!(
                "{error}: the kernel has no socket diagnostics for this protocol (it needs \
                 CONFIG_INET_DIAG with CONFIG_INET_TCP_DIAG and CONFIG_INET_UDP_DIAG, or the \
                 tcp_diag and udp_diag modules)"
            ),
        );
    }
    error
}
