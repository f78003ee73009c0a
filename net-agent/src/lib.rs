//! net-agent: loads the eBPF data plane, owns its pinned maps, keeps the user's networks and
//! endpoints in a crash-safe store, and serves the API that `netctl` uses.
//!
//! - [`agent`]: the operations on networks and endpoints, and start-up reconciliation.
//! - [`api`]: request and reply types of the Unix-socket API (also `netctl -o json` output).
//! - [`client`] / [`server`]: the two ends of the API socket.
//! - [`cluster`]: the store the hosts of a cluster share for the overlay (networks, VNIs, each
//!   host's subnet lease), embedded or in etcd, behind one interface.
//! - [`datapath`]: the embedded eBPF object, pinned maps and tcx links.
//! - [`dns`]: the embedded resolver, one listener inside each endpoint namespace.
//! - [`ipam`]: address allocation and input validation (pure logic).
//! - [`iptables`]: NAT rules from `iptables-save` output into a plan, and back (pure logic).
//! - [`link`] / [`netns`]: veths, addresses and routes over rtnetlink; named namespaces.
//! - [`map_batch`]: reading and deleting BPF map entries thousands per system call.
//! - [`publish`]: published-port specs as users write them, and the checks before installing one.
//! - [`sock_diag`]: the host's listening and bound sockets, from the kernel's socket diagnostics.
//! - [`store`]: the embedded crash-safe state store.
pub mod agent;
pub mod api;
pub mod client;
pub mod cluster;
pub mod conntrack;
pub mod datapath;
pub mod dns;
pub mod ipam;
pub mod iptables;
pub mod link;
pub mod map_batch;
pub mod netns;
pub mod publish;
pub mod server;
pub mod sock_diag;
pub mod store;
