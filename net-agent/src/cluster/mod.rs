//! The cluster store: what every host's agent must agree on to build the cross-host overlay
//! (Flannel's model). An overlay network is defined once for the cluster (name, address pool,
//! per-host subnet length, VNI, MTU); each host leases one subnet of its pool, naming its
//! underlay (VTEP) address, and renews the lease well before its TTL runs out. A lease that
//! expires returns its subnet to the pool. Agents watch the store and rebuild their view of the
//! other hosts when it changes.
//!
//! One interface, [`ClusterStore`], two implementations chosen by [`open`]'s spec:
//!
//! - `embedded` (the default): no server; files in a local directory that several agents on one
//!   machine can share ([`embedded`]).
//! - `etcd://ADDR[,ADDR...]`: an etcd v3 cluster ([`etcd`]).
//!
//! Both make the same decisions from the same pure logic ([`alloc`]): which VNI a new network
//! gets, whether a definition conflicts with what is stored, which subnet a host gets.
//!
//! The futures the store returns need no particular executor: each store runs its I/O on a
//! thread of its own and the futures only wait for its answer, so they can be awaited from any
//! Tokio runtime, or from a plain `block_on`.

pub mod alloc;
pub mod embedded;
pub mod etcd;

use std::{
    net::Ipv4Addr,
    path::Path,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use futures::future::BoxFuture;
/// Re-exported: pools and subnets in this API are `ipnetwork`'s.
pub use ipnetwork::Ipv4Network;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// The per-host subnet length when none is given (a /24 per host, as Flannel's default).
pub const DEFAULT_SUBNET_LEN: u8 = 24;

/// An overlay network as the cluster defines it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct OverlayNetwork {
    pub name: String,
    /// Every host's subnet is carved out of this.
    pub pool: Ipv4Network,
    /// Prefix length of each host's subnet.
    pub subnet_len: u8,
    /// VXLAN network identifier, unique among the cluster's overlay networks (1 to 2^24 - 1).
    pub vni: u32,
    /// MTU of the overlay's interfaces; `None`: the agent derives it from the underlay.
    pub mtu: Option<u32>,
}

/// One host's hold on one subnet of an overlay network.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Lease {
    /// Name of the overlay network.
    pub network: String,
    pub subnet: Ipv4Network,
    /// The host's name, which identifies it across restarts.
    pub host: String,
    /// The host's underlay address, where the other hosts send this subnet's VXLAN traffic.
    pub vtep: Ipv4Addr,
    /// When the lease runs out unless renewed (Unix time, milliseconds).
    pub expires_unix_ms: u64,
}

impl Lease {
    /// Whether the lease has run out at `now_unix_ms`.
    pub fn expired_at(&self, now_unix_ms: u64) -> bool {
        self.expires_unix_ms <= now_unix_ms
    }
}

/// The names one host's endpoints go by on one overlay network: what the other hosts' embedded
/// DNS resolves for their endpoints on that network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostNames {
    /// Name of the overlay network.
    pub network: String,
    /// The publishing host's name (as in its [`Lease`]).
    pub host: String,
    /// In [`EndpointName`]'s order (by name first), as the publishing agent sorts them, so that
    /// a record compares equal to the last one published when nothing changed.
    pub names: Vec<EndpointName>,
}

/// One endpoint's interface on an overlay network, as name resolution sees it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct EndpointName {
    /// The endpoint's name.
    pub name: String,
    /// Its further names on this network (`--alias`).
    pub aliases: Vec<String>,
    /// Its address on this network.
    pub ip: Ipv4Addr,
}

/// What went wrong in a cluster store operation. Messages name the network, subnet, host or
/// address concerned.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(
        "invalid cluster store {spec:?}: {reason} (use \"embedded\" or \"etcd://HOST:PORT[,HOST:PORT...]\")"
    )]
    InvalidSpec { spec: String, reason: String },
    #[error("invalid overlay network {name:?}: {reason}")]
    InvalidNetwork { name: String, reason: String },
    #[error("overlay network {name} is already defined differently: {differences}")]
    NetworkConflict { name: String, differences: String },
    #[error(
        "pool {pool} of overlay network {name} overlaps pool {other_pool} of overlay network {other}"
    )]
    PoolOverlap {
        name: String,
        pool: Ipv4Network,
        other: String,
        other_pool: Ipv4Network,
    },
    #[error(
        "no VNI left for overlay network {name}: all of 1 to {} are in use",
        alloc::MAX_VNI
    )]
    VniExhausted { name: String },
    #[error("no overlay network {name} in the cluster store")]
    NetworkNotFound { name: String },
    #[error(
        "overlay network {name} was redefined: the store has pool {stored_pool} /{stored_subnet_len} VNI {stored_vni}, the caller pool {pool} /{subnet_len} VNI {vni}"
    )]
    NetworkChanged {
        name: String,
        stored_pool: Ipv4Network,
        stored_subnet_len: u8,
        stored_vni: u32,
        pool: Ipv4Network,
        subnet_len: u8,
        vni: u32,
    },
    #[error("overlay network {name} still has leases (hosts {}); they must be released or expire first", hosts.join(", "))]
    NetworkInUse { name: String, hosts: Vec<String> },
    #[error(
        "pool exhausted: overlay network {network} has no free /{subnet_len} left in {pool} ({leased} leased)"
    )]
    PoolExhausted {
        network: String,
        pool: Ipv4Network,
        subnet_len: u8,
        leased: usize,
    },
    #[error("invalid host name {host:?}: {reason}")]
    InvalidHost { host: String, reason: String },
    #[error("lease of {subnet} on overlay network {network} by host {host} was lost: {}", match held_by {
        Some(other) => format!("it expired and host {other} holds it now"),
        None => "it is no longer in the store".to_owned(),
    })]
    LeaseLost {
        network: String,
        subnet: Ipv4Network,
        host: String,
        held_by: Option<String>,
    },
    #[error("{what}: still conflicting with concurrent changes after {attempts} attempts")]
    Contended { what: String, attempts: u32 },
    #[error("cluster store record {key}: {source}")]
    Decode {
        key: String,
        source: serde_json::Error,
    },
    #[error("embedded cluster store {path}: {message}")]
    Embedded { path: String, message: String },
    #[error("etcd at {endpoints}: {op}: {message}")]
    Etcd {
        endpoints: String,
        op: String,
        message: String,
    },
    #[error("cluster store is shut down")]
    Closed,
}

pub type Result<T, E = ClusterError> = std::result::Result<T, E>;

/// What [`ClusterStore::watch`] returns: a counter that moves when the store may have changed
/// (`has_changed`, `changed().await`, then `borrow_and_update` to mark it seen).
pub type Changes = watch::Receiver<u64>;

/// The cluster's shared state: overlay networks and the hosts' leases on their subnets.
///
/// The methods return boxed futures so that the trait stays object safe (`Box<dyn
/// ClusterStore>`, chosen at run time from a spec) without a macro crate.
pub trait ClusterStore: Send + Sync {
    /// Defines overlay network `name` if it is absent, giving it the lowest VNI not in use
    /// (from 1), and returns the stored definition. Defining it again with the same pool and
    /// subnet length returns the stored definition as it is (`mtu: None` accepts any stored
    /// MTU); any other difference is an error naming it, as is a pool that overlaps another
    /// network's.
    fn define_network<'a>(
        &'a self,
        name: &'a str,
        pool: Ipv4Network,
        subnet_len: u8,
        mtu: Option<u32>,
    ) -> BoxFuture<'a, Result<OverlayNetwork>>;

    /// Every overlay network, by name.
    fn networks(&self) -> BoxFuture<'_, Result<Vec<OverlayNetwork>>>;

    /// Removes an overlay network; refused while any host holds a lease on it.
    fn remove_network<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<()>>;

    /// This host's lease on `network` for `ttl`: the lease it already holds (its VTEP updated
    /// to `vtep`), else `prefer` if that subnet of the pool is free (how a restarting agent
    /// that remembers its subnet gets it back even after its lease expired), else the lowest
    /// free subnet of the pool. [`ClusterError::PoolExhausted`] when none is free. A `prefer`
    /// outside the pool or of another length is ignored: it is what an agent remembers from
    /// before a network was redefined.
    fn acquire_lease<'a>(
        &'a self,
        network: &'a OverlayNetwork,
        host: &'a str,
        vtep: Ipv4Addr,
        prefer: Option<Ipv4Network>,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Lease>>;

    /// Extends `lease` to `ttl` from now. An expired lease whose subnet nobody took is taken
    /// back; one another host took is [`ClusterError::LeaseLost`].
    fn renew_lease<'a>(&'a self, lease: &'a Lease, ttl: Duration) -> BoxFuture<'a, Result<Lease>>;

    /// Gives the subnet back to the pool. Releasing a lease that is gone, or that another host
    /// holds by now, does nothing.
    fn release_lease<'a>(&'a self, lease: &'a Lease) -> BoxFuture<'a, Result<()>>;

    /// The unexpired leases on `network`, by subnet.
    fn leases<'a>(&'a self, network: &'a str) -> BoxFuture<'a, Result<Vec<Lease>>>;

    /// Every unexpired lease, by network then subnet.
    fn all_leases(&self) -> BoxFuture<'_, Result<Vec<Lease>>>;

    /// Makes `names.names` what `names.host` publishes of its endpoints' names on
    /// `names.network`, replacing what it published before; an empty list removes the record.
    /// [`ClusterError::NetworkNotFound`] when the store does not define the network.
    fn put_names<'a>(&'a self, names: &'a HostNames) -> BoxFuture<'a, Result<()>>;

    /// Every host's published names, by network then host. A record outlives a host that
    /// stopped without releasing its lease, so readers trust a host's names on a network only
    /// while it holds an unexpired lease there, and only for addresses in the leased subnet.
    /// [`ClusterStore::release_lease`] removes the releasing host's record of that network, and
    /// [`ClusterStore::remove_network`] every record of the network.
    fn all_names(&self) -> BoxFuture<'_, Result<Vec<HostNames>>>;

    /// A receiver whose value changes whenever the networks, leases or names may have changed,
    /// including when a lease expires: the holder re-reads what it needs. It also changes once
    /// when watching starts and whenever the store reconnects, so that a watcher catches up
    /// with what happened before or in between. Expect spurious changes, never missed ones.
    fn watch(&self) -> Changes;
}

/// Opens the cluster store `spec` names: `embedded` (or an empty spec) keeps it in
/// `local_dir`; `etcd://HOST:PORT[,HOST:PORT...]` talks to an etcd cluster. An etcd store
/// connects from the network namespace of the thread that calls this (its connections are
/// made by a thread started here), and never fails for etcd being down: its calls do.
pub fn open(spec: &str, local_dir: &Path) -> Result<Box<dyn ClusterStore>> {
    let spec = spec.trim();
    if spec.is_empty() || spec == "embedded" {
        return Ok(Box::new(embedded::EmbeddedStore::open(local_dir)?));
    }
    let invalid = |reason: String| ClusterError::InvalidSpec {
        spec: spec.to_owned(),
        reason,
    };
    let Some(list) = spec.strip_prefix("etcd://") else {
        return Err(invalid("unknown kind of store".into()));
    };
    let endpoints = list
        .split(',')
        .map(|addr| parse_endpoint(addr.trim()).map_err(&invalid))
        .collect::<Result<Vec<_>>>()?;
    Ok(Box::new(etcd::EtcdStore::open(endpoints)?))
}

/// `HOST:PORT` of one etcd endpoint, checked; returned as the URL the client wants.
fn parse_endpoint(addr: &str) -> Result<String, String> {
    let (host, port) = addr
        .rsplit_once(':')
        .ok_or_else(|| format!("endpoint {addr:?} is not HOST:PORT"))?;
    let host_ok = !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '[' | ']' | ':'));
    if !host_ok {
        return Err(format!("endpoint {addr:?} has no valid host"));
    }
    match port.parse::<u16>() {
        Ok(p) if p != 0 => Ok(format!("http://{host}:{port}")),
        _ => Err(format!("endpoint {addr:?} has no valid port")),
    }
}

/// Now, in Unix milliseconds (what lease expiry is written in).
pub(crate) fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_are_checked() {
        assert_eq!(
            parse_endpoint("198.18.0.250:2379").unwrap(),
            "http://198.18.0.250:2379"
        );
        assert_eq!(
            parse_endpoint("etcd-1.example:2379").unwrap(),
            "http://etcd-1.example:2379"
        );
        for bad in ["198.18.0.250", ":2379", "h:0", "h:x", "h:70000", "a/b:1"] {
            assert!(parse_endpoint(bad).is_err(), "{bad} accepted");
        }
        let dir = std::env::temp_dir();
        for bad in ["etcd://", "etcd://h:1,", "consul://h:1", "etcd:/h:1"] {
            let err = open(bad, &dir).err().expect("refused");
            assert!(
                matches!(err, ClusterError::InvalidSpec { .. }),
                "{bad}: {err}"
            );
            assert!(err.to_string().contains(bad.trim()), "{err}");
        }
    }
}
