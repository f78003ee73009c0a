//! The cluster store in etcd (v3 API), for a cluster of hosts.
//!
//! Keys, all under [`PREFIX`]:
//!
//! - `networks/<name>`: JSON [`OverlayNetwork`].
//! - `leases/<network>/<a.b.c.d>-<len>`: JSON [`Lease`], attached to an etcd lease with the
//!   lease's TTL, so that etcd deletes the key by itself when the host stops renewing.
//! - `names/<network>/<host>`: JSON [`HostNames`], with no etcd lease: readers trust it only
//!   while the host holds a lease on the network, so a record left behind is harmless and an
//!   agent that restarts within its lease keeps its names visible. Written only in a transaction
//!   that finds the network's key; deleted with the host's lease on release and with the
//!   network on removal.
//!
//! Every decision is read, decide ([`super::alloc`]), then a transaction that writes only if what
//! was read still holds (compare-and-swap), retried when it does not: a subnet is taken only if
//! its key was never created (`create_revision == 0`), so two hosts never get one subnet; a
//! network is defined only if no network key changed since the read, which keeps VNIs unique
//! and pools apart. Renewal grants a fresh etcd lease and moves the key onto it in one
//! transaction (the key never disappears in between), then revokes the old one; the record's
//! `expires_unix_ms` stays true, at the cost of one watch event per renewal (watchers re-read
//! and find nothing changed).
//!
//! All network I/O runs on a thread of the store's own, with a single-threaded Tokio runtime,
//! started by [`EtcdStore::open`]: its connections live in the network namespace of the thread
//! that opened the store, and callers can await the store from any runtime. etcd being down
//! never takes the agent down: calls fail after bounded timeouts ([`REQUEST_TIMEOUT`],
//! [`OPERATION_TIMEOUT`]), the watch retries with backoff, and when etcd is back the watch
//! notifies so that watchers catch up.

use std::{
    fmt::Display,
    future::Future,
    net::Ipv4Addr,
    sync::Arc,
    thread::{self, JoinHandle},
    time::Duration,
};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, GetOptions, KeyValue, PutOptions,
    Txn, TxnOp, WatchOptions,
};
use futures::future::BoxFuture;
use ipnetwork::Ipv4Network;
use serde::{Serialize, de::DeserializeOwned};
use tokio::sync::{Notify, OnceCell, mpsc, oneshot, watch};

use super::{
    Changes, ClusterError, ClusterStore, HostNames, Lease, OverlayNetwork, Result,
    alloc::{self, Definition, LeasePlan},
    now_unix_ms,
};

/// Every key the store writes starts with this; the version lets a later layout live beside.
pub const PREFIX: &str = "/net-agent/v1/";
const NETWORKS: &str = "/net-agent/v1/networks/";
const LEASES: &str = "/net-agent/v1/leases/";
const NAMES: &str = "/net-agent/v1/names/";

/// Giving up on connecting to an endpoint.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Giving up on one request (etcd answers in milliseconds when it is up).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Giving up on a whole operation (several requests, retried transactions).
pub const OPERATION_TIMEOUT: Duration = Duration::from_secs(20);
/// HTTP/2 pings on a connection with a watch open: a peer that stopped answering is noticed
/// within interval + timeout. Not below etcd's `--grpc-keepalive-min-time` (5 s by default),
/// or etcd hangs up for "too many pings".
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Transactions that lost a race are retried this many times before giving up.
const MAX_ATTEMPTS: u32 = 32;
/// Waits between attempts to re-establish the watch.
const WATCH_RETRY_MIN: Duration = Duration::from_millis(100);
const WATCH_RETRY_MAX: Duration = Duration::from_secs(5);

type Job = Box<dyn FnOnce(Etcd) -> BoxFuture<'static, ()> + Send>;

/// A handle on the cluster store in an etcd cluster.
pub struct EtcdStore {
    /// `None` only while dropping, to stop the store's thread.
    jobs: Option<mpsc::UnboundedSender<Job>>,
    changes: Arc<watch::Sender<u64>>,
    /// The watch starts when someone first asks for it.
    start_watching: Arc<Notify>,
    thread: Option<JoinHandle<()>>,
}

impl EtcdStore {
    /// A store on `endpoints` (`http://HOST:PORT` each). Connects lazily: etcd need not be up.
    pub fn open(endpoints: Vec<String>) -> Result<Self> {
        let etcd = Etcd {
            display: endpoints
                .iter()
                .map(|e| e.trim_start_matches("http://"))
                .collect::<Vec<_>>()
                .join(",")
                .into(),
            endpoints: endpoints.into(),
            client: Arc::new(OnceCell::new()),
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| etcd.error("starting the client runtime", e))?;
        let (jobs, queue) = mpsc::unbounded_channel::<Job>();
        let (changes, _) = watch::channel(0u64);
        let changes = Arc::new(changes);
        let start_watching = Arc::new(Notify::new());
        let thread = {
            let (served, changes, start) = (
                etcd.clone(),
                Arc::clone(&changes),
                Arc::clone(&start_watching),
            );
            thread::Builder::new()
                .name("cluster-etcd".into())
                .spawn(move || serve(&runtime, served, queue, changes, start))
                .map_err(|e| etcd.error("starting the client thread", e))?
        };
        Ok(Self {
            jobs: Some(jobs),
            changes,
            start_watching,
            thread: Some(thread),
        })
    }

    /// Runs `op` on the store's thread (bounded by [`OPERATION_TIMEOUT`]) and waits for it.
    fn run<T, F, Fut>(&self, what: String, op: F) -> BoxFuture<'_, Result<T>>
    where
        T: Send + 'static,
        F: FnOnce(Etcd) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T>> + Send + 'static,
    {
        Box::pin(async move {
            let (reply, answer) = oneshot::channel();
            let job: Job = Box::new(move |etcd| {
                Box::pin(async move {
                    let result = tokio::time::timeout(OPERATION_TIMEOUT, op(etcd.clone()))
                        .await
                        .unwrap_or_else(|_| {
                            Err(etcd
                                .error(&what, format!("no answer within {OPERATION_TIMEOUT:?}")))
                        });
                    // The caller may have given up waiting: nobody to tell then.
                    let _ = reply.send(result);
                })
            });
            self.jobs
                .as_ref()
                .ok_or(ClusterError::Closed)?
                .send(job)
                .map_err(|_| ClusterError::Closed)?;
            answer.await.map_err(|_| ClusterError::Closed)?
        })
    }
}

impl Drop for EtcdStore {
    fn drop(&mut self) {
        // Closing the queue ends the thread; its runtime cancels what is still running.
        self.jobs = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The store's thread: each job runs as a task, the watch as another, until the store is
/// dropped.
fn serve(
    runtime: &tokio::runtime::Runtime,
    etcd: Etcd,
    mut queue: mpsc::UnboundedReceiver<Job>,
    changes: Arc<watch::Sender<u64>>,
    start_watching: Arc<Notify>,
) {
    runtime.block_on(async move {
        let watcher = tokio::spawn(watch_loop(etcd.clone(), changes, start_watching));
        while let Some(job) = queue.recv().await {
            tokio::spawn(job(etcd.clone()));
        }
        watcher.abort();
    });
}

/// Keeps a watch on [`PREFIX`] and bumps `changes` on every event, and once each time the watch
/// is (re)established; re-establishes it with backoff whenever it ends.
async fn watch_loop(etcd: Etcd, changes: Arc<watch::Sender<u64>>, start: Arc<Notify>) {
    start.notified().await;
    let mut pause = WATCH_RETRY_MIN;
    loop {
        let (established, reason) = watch_once(&etcd, &changes).await;
        if established {
            pause = WATCH_RETRY_MIN;
        }
        log::warn!(
            "cluster store watch on etcd at {}: {reason}; retrying in {pause:?}",
            etcd.display
        );
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(WATCH_RETRY_MAX);
    }
}

/// One watch, on a connection of its own (no per-request timeout: the stream lives long).
/// Returns whether it was established, and why it ended.
async fn watch_once(etcd: &Etcd, changes: &watch::Sender<u64>) -> (bool, String) {
    let options = etcd.options();
    let connect = Client::connect(etcd.endpoints.as_ref(), Some(options));
    let mut client = match tokio::time::timeout(REQUEST_TIMEOUT, connect).await {
        Ok(Ok(client)) => client,
        Ok(Err(e)) => return (false, format!("connecting: {e}")),
        Err(_) => {
            return (
                false,
                format!("connecting: no answer in {REQUEST_TIMEOUT:?}"),
            );
        }
    };
    let start = client.watch(PREFIX, Some(WatchOptions::new().with_prefix()));
    let mut stream = match tokio::time::timeout(REQUEST_TIMEOUT, start).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => return (false, format!("starting the watch: {e}")),
        Err(_) => {
            return (
                false,
                format!("starting the watch: no answer in {REQUEST_TIMEOUT:?}"),
            );
        }
    };
    match tokio::time::timeout(REQUEST_TIMEOUT, stream.message()).await {
        Ok(Ok(Some(response))) if response.created() && !response.canceled() => {}
        Ok(Ok(Some(response))) => {
            return (
                false,
                format!("watch refused: {}", response.cancel_reason()),
            );
        }
        Ok(Ok(None)) => return (false, "watch closed before it started".into()),
        Ok(Err(e)) => return (false, format!("starting the watch: {e}")),
        Err(_) => return (false, format!("watch not confirmed in {REQUEST_TIMEOUT:?}")),
    }
    // Whatever happened while there was no watch, watchers re-read now.
    bump(changes);
    loop {
        match stream.message().await {
            Ok(Some(response)) if response.canceled() => {
                return (
                    true,
                    format!("watch cancelled: {}", response.cancel_reason()),
                );
            }
            Ok(Some(response)) => {
                if !response.events().is_empty() {
                    bump(changes);
                }
            }
            Ok(None) => return (true, "watch closed by etcd".into()),
            Err(e) => return (true, format!("watch ended: {e}")),
        }
    }
}

fn bump(changes: &watch::Sender<u64>) {
    changes.send_modify(|n| *n = n.wrapping_add(1));
}

/// A value decoded from etcd, with what compare-and-swap needs.
struct Stored<T> {
    value: T,
    mod_revision: i64,
    version: i64,
    /// The etcd lease the key is attached to (0: none).
    lease: i64,
}

/// The connection, shared by the operations running on the store's thread.
#[derive(Clone)]
struct Etcd {
    endpoints: Arc<[String]>,
    /// `HOST:PORT,...` for messages.
    display: Arc<str>,
    client: Arc<OnceCell<Client>>,
}

impl Etcd {
    fn error(&self, op: &str, message: impl Display) -> ClusterError {
        ClusterError::Etcd {
            endpoints: self.display.to_string(),
            op: op.to_owned(),
            message: message.to_string(),
        }
    }

    fn options(&self) -> ConnectOptions {
        ConnectOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_keep_alive(KEEP_ALIVE_INTERVAL, KEEP_ALIVE_TIMEOUT)
            .with_tcp_keepalive(KEEP_ALIVE_INTERVAL)
    }

    /// The client for operations. Connecting only sets up the channel (it reconnects by
    /// itself), so this fails only on a bad endpoint, not on etcd being down.
    async fn client(&self) -> Result<Client> {
        let options = self.options().with_timeout(REQUEST_TIMEOUT);
        self.client
            .get_or_try_init(|| Client::connect(self.endpoints.as_ref(), Some(options)))
            .await
            .cloned()
            .map_err(|e| self.error("connecting", e))
    }

    /// Every key under `prefix`, decoded, with the revision the read saw.
    async fn list<T: DeserializeOwned>(
        &self,
        client: &mut Client,
        prefix: &str,
        what: &str,
    ) -> Result<(Vec<Stored<T>>, i64)> {
        let response = client
            .get(prefix, Some(GetOptions::new().with_prefix()))
            .await
            .map_err(|e| self.error(&format!("reading {what}"), e))?;
        let revision = response.header().map_or(0, |h| h.revision());
        let values = response
            .kvs()
            .iter()
            .map(decode)
            .collect::<Result<Vec<_>>>()?;
        Ok((values, revision))
    }

    async fn get<T: DeserializeOwned>(
        &self,
        client: &mut Client,
        key: &str,
        what: &str,
    ) -> Result<Option<Stored<T>>> {
        let response = client
            .get(key, None)
            .await
            .map_err(|e| self.error(&format!("reading {what}"), e))?;
        response.kvs().first().map(decode).transpose()
    }

    async fn network(&self, client: &mut Client, name: &str) -> Result<Stored<OverlayNetwork>> {
        self.get(
            client,
            &network_key(name),
            &format!("overlay network {name}"),
        )
        .await?
        .ok_or_else(|| ClusterError::NetworkNotFound {
            name: name.to_owned(),
        })
    }

    async fn txn(&self, client: &mut Client, txn: Txn, what: &str) -> Result<bool> {
        let response = client.txn(txn).await.map_err(|e| self.error(what, e))?;
        Ok(response.succeeded())
    }

    async fn define_network(
        &self,
        name: String,
        pool: Ipv4Network,
        subnet_len: u8,
        mtu: Option<u32>,
    ) -> Result<OverlayNetwork> {
        let mut client = self.client().await?;
        for _ in 0..MAX_ATTEMPTS {
            let (stored, revision) = self
                .list::<OverlayNetwork>(&mut client, NETWORKS, "overlay networks")
                .await?;
            let existing: Vec<OverlayNetwork> = stored.into_iter().map(|s| s.value).collect();
            let network = match alloc::define(&existing, &name, pool, subnet_len, mtu)? {
                Definition::Stored(network) => return Ok(network),
                Definition::New(network) => network,
            };
            let key = network_key(&name);
            // Written only if no network was defined or changed since the read: the VNI and
            // the overlap check were decided on what is still there.
            let txn = Txn::new()
                .when([
                    Compare::create_revision(key.clone(), CompareOp::Equal, 0),
                    Compare::mod_revision(NETWORKS, CompareOp::Less, revision + 1).with_prefix(),
                ])
                .and_then([TxnOp::put(key, encode(&network), None)]);
            if self
                .txn(
                    &mut client,
                    txn,
                    &format!("defining overlay network {name}"),
                )
                .await?
            {
                return Ok(network);
            }
        }
        Err(contended(format!("defining overlay network {name}")))
    }

    async fn networks(&self) -> Result<Vec<OverlayNetwork>> {
        let mut client = self.client().await?;
        let (stored, _) = self.list(&mut client, NETWORKS, "overlay networks").await?;
        let mut networks: Vec<OverlayNetwork> = stored.into_iter().map(|s| s.value).collect();
        networks.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(networks)
    }

    async fn remove_network(&self, name: String) -> Result<()> {
        let mut client = self.client().await?;
        for _ in 0..MAX_ATTEMPTS {
            let network = self.network(&mut client, &name).await?;
            let (leases, revision) = self
                .list::<Lease>(&mut client, &lease_prefix(&name), "leases")
                .await?;
            if !leases.is_empty() {
                return Err(ClusterError::NetworkInUse {
                    name,
                    hosts: sorted(leases).into_iter().map(|l| l.host).collect(),
                });
            }
            // Deleted only if no lease was taken since the read. The names go in the same
            // transaction: put_names writes only while the network's key exists, so none can
            // be left behind.
            let key = network_key(&name);
            let txn = Txn::new()
                .when([
                    Compare::version(key.clone(), CompareOp::Equal, network.version),
                    Compare::mod_revision(lease_prefix(&name), CompareOp::Less, revision + 1)
                        .with_prefix(),
                ])
                .and_then([
                    TxnOp::delete(key, None),
                    TxnOp::delete(
                        names_prefix(&name),
                        Some(DeleteOptions::new().with_prefix()),
                    ),
                ]);
            if self
                .txn(
                    &mut client,
                    txn,
                    &format!("removing overlay network {name}"),
                )
                .await?
            {
                return Ok(());
            }
        }
        Err(contended(format!("removing overlay network {name}")))
    }

    async fn acquire_lease(
        &self,
        asked: OverlayNetwork,
        host: String,
        vtep: Ipv4Addr,
        prefer: Option<Ipv4Network>,
        ttl: Duration,
    ) -> Result<Lease> {
        alloc::check_host(&host)?;
        let mut client = self.client().await?;
        for _ in 0..MAX_ATTEMPTS {
            let network = self.network(&mut client, &asked.name).await?;
            alloc::check_same_network(&network.value, &asked)?;
            let (leases, _) = self
                .list::<Lease>(&mut client, &lease_prefix(&asked.name), "leases")
                .await?;
            let live: Vec<Lease> = leases.iter().map(|s| s.value.clone()).collect();
            let (subnet, guards, old) =
                match alloc::plan_lease(&network.value, &live, &host, prefer)? {
                    LeasePlan::Keep(current) => {
                        let stored = leases
                            .iter()
                            .find(|s| s.value.subnet == current.subnet)
                            .expect("the plan keeps a lease that was read");
                        let key = lease_key(&asked.name, current.subnet);
                        let guard =
                            Compare::mod_revision(key, CompareOp::Equal, stored.mod_revision);
                        (current.subnet, vec![guard], Some(stored.lease))
                    }
                    LeasePlan::Take(subnet) => {
                        let key = lease_key(&asked.name, subnet);
                        let guards = vec![
                            Compare::create_revision(key, CompareOp::Equal, 0),
                            Compare::version(
                                network_key(&asked.name),
                                CompareOp::Equal,
                                network.version,
                            ),
                        ];
                        (subnet, guards, None)
                    }
                };
            let lease = Lease {
                network: asked.name.clone(),
                subnet,
                host: host.clone(),
                vtep,
                expires_unix_ms: 0,
            };
            if let Some(lease) = self
                .write_lease(&mut client, lease, ttl, guards, old)
                .await?
            {
                return Ok(lease);
            }
        }
        Err(contended(format!(
            "leasing a subnet of overlay network {} for host {host}",
            asked.name
        )))
    }

    async fn renew_lease(&self, lease: Lease, ttl: Duration) -> Result<Lease> {
        let mut client = self.client().await?;
        let key = lease_key(&lease.network, lease.subnet);
        let what = format!(
            "lease of {} on overlay network {}",
            lease.subnet, lease.network
        );
        for _ in 0..MAX_ATTEMPTS {
            let (guards, old) = match self.get::<Lease>(&mut client, &key, &what).await? {
                Some(current) if current.value.host == lease.host => (
                    vec![Compare::mod_revision(
                        key.clone(),
                        CompareOp::Equal,
                        current.mod_revision,
                    )],
                    Some(current.lease),
                ),
                Some(current) => return Err(lost(&lease, Some(current.value.host))),
                // Expired, and nobody took it: taken back if it still belongs to the network.
                None => {
                    let network = self.network(&mut client, &lease.network).await?;
                    let pool = (network.value.pool, network.value.subnet_len);
                    if !alloc::is_pool_subnet(pool.0, pool.1, lease.subnet) {
                        return Err(lost(&lease, None));
                    }
                    let guards = vec![
                        Compare::create_revision(key.clone(), CompareOp::Equal, 0),
                        Compare::version(
                            network_key(&lease.network),
                            CompareOp::Equal,
                            network.version,
                        ),
                    ];
                    (guards, None)
                }
            };
            if let Some(renewed) = self
                .write_lease(&mut client, lease.clone(), ttl, guards, old)
                .await?
            {
                return Ok(renewed);
            }
        }
        Err(contended(format!("renewing the {what}")))
    }

    /// Grants an etcd lease of `ttl` and writes `lease` attached to it if `guards` hold;
    /// `None` if they did not (someone else changed the key or the network first). The etcd
    /// lease that ends up unused (the new one, or `old` after a successful move) is revoked.
    async fn write_lease(
        &self,
        client: &mut Client,
        lease: Lease,
        ttl: Duration,
        guards: Vec<Compare>,
        old: Option<i64>,
    ) -> Result<Option<Lease>> {
        let what = format!(
            "writing the lease of {} on overlay network {} for host {}",
            lease.subnet, lease.network, lease.host
        );
        let grant = client
            .lease_grant(ttl_seconds(ttl), None)
            .await
            .map_err(|e| self.error(&what, e))?;
        // etcd may grant more than asked (its minimum TTL); the record says what it gave.
        let granted_ms = u64::try_from(grant.ttl()).unwrap_or(0).saturating_mul(1000);
        let lease = Lease {
            expires_unix_ms: now_unix_ms().saturating_add(granted_ms),
            ..lease
        };
        let txn = Txn::new().when(guards).and_then([TxnOp::put(
            lease_key(&lease.network, lease.subnet),
            encode(&lease),
            Some(PutOptions::new().with_lease(grant.id())),
        )]);
        // On an error the outcome is unknown: the new etcd lease is left to expire rather than
        // revoked, since revoking it would delete the key if the write did happen.
        let committed = self.txn(client, txn, &what).await?;
        let unused = if committed { old } else { Some(grant.id()) };
        if let Some(id) = unused.filter(|id| *id != 0)
            && let Err(e) = client.lease_revoke(id).await
        {
            // It has no key attached (any more) and expires by itself.
            log::debug!("revoking unused etcd lease {id:x}: {e}");
        }
        Ok(committed.then_some(lease))
    }

    async fn release_lease(&self, lease: Lease) -> Result<()> {
        let mut client = self.client().await?;
        let key = lease_key(&lease.network, lease.subnet);
        let what = format!(
            "releasing the lease of {} on overlay network {}",
            lease.subnet, lease.network
        );
        for _ in 0..MAX_ATTEMPTS {
            let current = match self.get::<Lease>(&mut client, &key, &what).await? {
                Some(current) if current.value.host == lease.host => current,
                // Gone, or another host's by now: nothing of ours to release.
                _ => return Ok(()),
            };
            // The host's names on the network go with its lease, in one transaction: a host
            // that stopped without releasing leaves them behind, one that released never does.
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    key.clone(),
                    CompareOp::Equal,
                    current.mod_revision,
                )])
                .and_then([
                    TxnOp::delete(key.clone(), None),
                    TxnOp::delete(names_key(&lease.network, &lease.host), None),
                ]);
            if self.txn(&mut client, txn, &what).await? {
                if current.lease != 0
                    && let Err(e) = client.lease_revoke(current.lease).await
                {
                    log::debug!("revoking released etcd lease {:x}: {e}", current.lease);
                }
                return Ok(());
            }
        }
        Err(contended(what))
    }

    async fn leases(&self, prefix: String) -> Result<Vec<Lease>> {
        let mut client = self.client().await?;
        let (leases, _) = self.list(&mut client, &prefix, "leases").await?;
        Ok(sorted(leases))
    }

    async fn put_names(&self, names: HostNames) -> Result<()> {
        alloc::check_host(&names.host)?;
        let mut client = self.client().await?;
        let key = names_key(&names.network, &names.host);
        let write = if names.names.is_empty() {
            TxnOp::delete(key, None)
        } else {
            TxnOp::put(key, encode(&names), None)
        };
        // One transaction with the check, so that a concurrent remove_network either deletes
        // the record with the network or makes this write fail: no record of a removed network.
        let txn = Txn::new()
            .when([Compare::version(
                network_key(&names.network),
                CompareOp::Greater,
                0,
            )])
            .and_then([write]);
        let what = format!(
            "writing the names of host {} on overlay network {}",
            names.host, names.network
        );
        if self.txn(&mut client, txn, &what).await? {
            Ok(())
        } else {
            Err(ClusterError::NetworkNotFound {
                name: names.network,
            })
        }
    }

    async fn all_names(&self) -> Result<Vec<HostNames>> {
        let mut client = self.client().await?;
        let response = client
            .get(NAMES, Some(GetOptions::new().with_prefix()))
            .await
            .map_err(|e| self.error("reading names", e))?;
        // Names are advice for the DNS, which any host may write: one bad record is skipped
        // with a warning rather than failing the whole sync (leases and routes with it).
        let mut names: Vec<HostNames> = response
            .kvs()
            .iter()
            .filter_map(|kv| match decode::<HostNames>(kv) {
                Ok(stored) => Some(stored.value),
                Err(e) => {
                    log::warn!("cluster store: skipping names record: {e}");
                    None
                }
            })
            .collect();
        names.sort_by(|a, b| (&a.network, &a.host).cmp(&(&b.network, &b.host)));
        Ok(names)
    }
}

fn network_key(name: &str) -> String {
    format!("{NETWORKS}{name}")
}

fn lease_prefix(network: &str) -> String {
    format!("{LEASES}{network}/")
}

fn lease_key(network: &str, subnet: Ipv4Network) -> String {
    format!("{}{}", lease_prefix(network), alloc::subnet_key(subnet))
}

fn names_prefix(network: &str) -> String {
    format!("{NAMES}{network}/")
}

fn names_key(network: &str, host: &str) -> String {
    format!("{}{host}", names_prefix(network))
}

/// etcd TTLs are whole seconds: rounded up, at least one.
fn ttl_seconds(ttl: Duration) -> i64 {
    let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    i64::try_from(secs.max(1)).unwrap_or(i64::MAX)
}

fn encode<T: Serialize>(record: &T) -> Vec<u8> {
    serde_json::to_vec(record).expect("records are plain data and always serialize")
}

fn decode<T: DeserializeOwned>(kv: &KeyValue) -> Result<Stored<T>> {
    let value = serde_json::from_slice(kv.value()).map_err(|source| ClusterError::Decode {
        key: String::from_utf8_lossy(kv.key()).into_owned(),
        source,
    })?;
    Ok(Stored {
        value,
        mod_revision: kv.mod_revision(),
        version: kv.version(),
        lease: kv.lease(),
    })
}

fn sorted(leases: Vec<Stored<Lease>>) -> Vec<Lease> {
    let mut leases: Vec<Lease> = leases.into_iter().map(|s| s.value).collect();
    leases.sort_by(|a, b| (&a.network, a.subnet).cmp(&(&b.network, b.subnet)));
    leases
}

fn lost(lease: &Lease, held_by: Option<String>) -> ClusterError {
    ClusterError::LeaseLost {
        network: lease.network.clone(),
        subnet: lease.subnet,
        host: lease.host.clone(),
        held_by,
    }
}

fn contended(what: String) -> ClusterError {
    ClusterError::Contended {
        what,
        attempts: MAX_ATTEMPTS,
    }
}

impl ClusterStore for EtcdStore {
    fn define_network<'a>(
        &'a self,
        name: &'a str,
        pool: Ipv4Network,
        subnet_len: u8,
        mtu: Option<u32>,
    ) -> BoxFuture<'a, Result<OverlayNetwork>> {
        let name = name.to_owned();
        self.run(
            format!("defining overlay network {name}"),
            move |etcd| async move { etcd.define_network(name, pool, subnet_len, mtu).await },
        )
    }

    fn networks(&self) -> BoxFuture<'_, Result<Vec<OverlayNetwork>>> {
        self.run("reading overlay networks".into(), |etcd| async move {
            etcd.networks().await
        })
    }

    fn remove_network<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<()>> {
        let name = name.to_owned();
        self.run(
            format!("removing overlay network {name}"),
            move |etcd| async move { etcd.remove_network(name).await },
        )
    }

    fn acquire_lease<'a>(
        &'a self,
        network: &'a OverlayNetwork,
        host: &'a str,
        vtep: Ipv4Addr,
        prefer: Option<Ipv4Network>,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Lease>> {
        let (network, host) = (network.clone(), host.to_owned());
        let what = format!(
            "leasing a subnet of overlay network {} for host {host}",
            network.name
        );
        self.run(what, move |etcd| async move {
            etcd.acquire_lease(network, host, vtep, prefer, ttl).await
        })
    }

    fn renew_lease<'a>(&'a self, lease: &'a Lease, ttl: Duration) -> BoxFuture<'a, Result<Lease>> {
        let lease = lease.clone();
        let what = format!(
            "renewing the lease of {} on overlay network {}",
            lease.subnet, lease.network
        );
        self.run(what, move |etcd| async move {
            etcd.renew_lease(lease, ttl).await
        })
    }

    fn release_lease<'a>(&'a self, lease: &'a Lease) -> BoxFuture<'a, Result<()>> {
        let lease = lease.clone();
        let what = format!(
            "releasing the lease of {} on overlay network {}",
            lease.subnet, lease.network
        );
        self.run(
            what,
            move |etcd| async move { etcd.release_lease(lease).await },
        )
    }

    fn leases<'a>(&'a self, network: &'a str) -> BoxFuture<'a, Result<Vec<Lease>>> {
        let prefix = lease_prefix(network);
        self.run(
            format!("reading the leases of {network}"),
            move |etcd| async move { etcd.leases(prefix).await },
        )
    }

    fn all_leases(&self) -> BoxFuture<'_, Result<Vec<Lease>>> {
        self.run("reading leases".into(), |etcd| async move {
            etcd.leases(LEASES.to_owned()).await
        })
    }

    fn put_names<'a>(&'a self, names: &'a HostNames) -> BoxFuture<'a, Result<()>> {
        let names = names.clone();
        let what = format!(
            "writing the names of host {} on overlay network {}",
            names.host, names.network
        );
        self.run(what, move |etcd| async move { etcd.put_names(names).await })
    }

    fn all_names(&self) -> BoxFuture<'_, Result<Vec<HostNames>>> {
        self.run("reading names".into(), |etcd| async move {
            etcd.all_names().await
        })
    }

    fn watch(&self) -> Changes {
        let receiver = self.changes.subscribe();
        self.start_watching.notify_one();
        receiver
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_ttls() {
        let subnet: Ipv4Network = "10.244.3.0/24".parse().unwrap();
        assert_eq!(
            lease_key("ov", subnet),
            "/net-agent/v1/leases/ov/10.244.3.0-24"
        );
        // One network's prefix never covers another's ("ov" and "ov2").
        assert!(!lease_key("ov2", subnet).starts_with(&lease_prefix("ov")));
        assert_eq!(network_key("ov"), "/net-agent/v1/networks/ov");
        assert_eq!(names_key("ov", "node1"), "/net-agent/v1/names/ov/node1");
        assert!(!names_key("ov2", "node1").starts_with(&names_prefix("ov")));
        // The watch covers every key.
        for key in [
            network_key("ov"),
            lease_key("ov", subnet),
            names_key("ov", "node1"),
        ] {
            assert!(key.starts_with(PREFIX), "{key}");
        }
        assert_eq!(ttl_seconds(Duration::from_millis(1)), 1);
        assert_eq!(ttl_seconds(Duration::from_millis(2500)), 3);
        assert_eq!(ttl_seconds(Duration::from_secs(60)), 60);
    }

    #[test]
    fn calls_fail_cleanly_when_nothing_listens() {
        // A port on loopback that nothing listens on: connection refused, every time.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let store = EtcdStore::open(vec![format!("http://{addr}")]).unwrap();
        let started = std::time::Instant::now();
        let err = futures::executor::block_on(store.networks()).unwrap_err();
        assert!(
            matches!(err, ClusterError::Etcd { .. }) && err.to_string().contains(&addr.to_string()),
            "{err}"
        );
        assert!(started.elapsed() < OPERATION_TIMEOUT + Duration::from_secs(5));
        drop(store);
    }
}
