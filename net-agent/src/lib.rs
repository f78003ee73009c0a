//! net-agent: loads the eBPF data plane, owns its pinned maps, keeps the user's networks and
//! endpoints in a crash-safe store, and serves the API that `netctl` uses.
//!
//! - [`api`]: request and reply types of the Unix-socket API (also `netctl -o json` output).
//! - [`datapath`]: the embedded eBPF object, pinned maps and tcx links.
pub mod api;
pub mod datapath;
