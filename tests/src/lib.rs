//! Test harness for the data plane: simulated hosts as network namespaces, real `net-agent`
//! processes, real packets.
//!
//! Everything a test makes carries a unique tag (`nt` + 5 hex digits, see [`names`]) and is
//! deleted by RAII guards, also when the test panics:
//!
//! - [`Topology`] builds hosts (`<tag>-h1`, `<tag>-h2`, ...), an underlay switch (`<tag>-sw`) and an
//!   "outside" namespace (`<tag>-out`), and in `Drop` deletes every `/run/netns/<tag>*` entry
//!   (including the endpoint namespaces agents made, after killing any process still in them),
//!   the agents' pin directories under `/sys/fs/bpf`, their `/etc/netns/<tag>*` resolver files
//!   and its temporary directory.
//! - [`Agent`] runs `net-agent` inside one host's network namespace (only the network namespace is
//!   switched, see KERNEL-NOTES "Running one agent per simulated host") and drives it with
//!   `netctl`; it is killed in `Drop` and its log printed when the test failed.
//! - [`fixture`] holds what the BPF_PROG_TEST_RUN suites share (verdicts, checksums).
//! - [`frames`] sends hand-made Ethernet frames (forged ARP, truncated headers, ...).
//! - [`netns`] runs closures and commands inside namespaces; [`traffic`] has TCP/UDP servers and
//!   clients that verify what they carried; [`wait`] polls conditions with deadlines.
//! - [`check::assert_consistent`] compares what an agent lists with what the kernel has (namespaces,
//!   every interface, veths, routes, link pins, map entries, resolvers), in both directions.
//! - [`nat`] reads the conntrack table and NAT counters and has the sockets masquerade tests
//!   need (an echo server that reports its peers, clients bound to a port, an ICMP sniffer).
//! - [`kernel_nat`] builds Docker's way (Linux bridge, iptables DNAT and MASQUERADE) inside a
//!   simulated host, the reference our published ports and masquerade are compared with.
//! - [`etcd`] runs a real etcd in a namespace of its own on the underlay (`<tag>-etcd`,
//!   198.18.0.250), for the cluster-store tests, and opens stores from inside a host.
//! - [`overlay`] starts agents in a cluster and waits for what the cluster store tells them.
//! - [`dns`] has a fake upstream resolver (agents never forward to a real one: unless a test
//!   says otherwise, their upstream is the outside namespace) and a client that asks an
//!   endpoint's embedded resolver from inside its namespace.
//!
//! Nothing here touches the machine's own interfaces: every link is created inside a test
//! namespace (the switch's veths are created from inside `<tag>-sw`), and all addresses used are
//! inside the test namespaces. A test process that dies without unwinding (SIGKILL) leaves its
//! namespaces behind (its agents die with it: PR_SET_PDEATHSIG); the first [`Topology::new`] of a
//! later run sweeps them (see [`names::sweep_stale`]).

pub mod agent;
pub mod check;
pub mod cmd;
pub mod dns;
pub mod endpoint;
pub mod etcd;
pub mod fixture;
pub mod frames;
pub mod kernel_nat;
pub mod names;
pub mod nat;
pub mod netns;
pub mod overlay;
pub mod topology;
pub mod traffic;
pub mod wait;

pub use agent::{Agent, Netctl, Snapshot, drop_count};
pub use check::assert_consistent;
pub use cmd::{CmdOutput, run, run_ok};
pub use endpoint::EndpointExt;
pub use netns::{exec_in, exec_in_ok, in_netns, netns_path};
pub use topology::{Host, Topology};
pub use wait::{TIMEOUT, wait_for, wait_until};

// Re-exported so tests name the API types through one crate.
pub use net_agent::api;
pub use net_ebpf_common::DropReason;
