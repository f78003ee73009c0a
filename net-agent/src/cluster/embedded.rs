//! The embedded cluster store: no server, two files in a local directory (`cluster.redb`, the
//! data, and `cluster.lock`), for one host or several agents on one machine that share the
//! directory.
//!
//! redb gives crash-safe transactions but lets only one handle have a database file open at a
//! time (it locks the file; a second open, from this process or another, fails with
//! `DatabaseAlreadyOpen`). So no handle keeps the database open: each operation takes an
//! exclusive `flock` on `cluster.lock` (per open file, so it excludes other handles of this
//! process as well as other processes), opens the database, runs one transaction, closes it and
//! unlocks. Waiting for the lock is bounded ([`LOCK_TIMEOUT`]), so a stuck peer makes calls fail
//! with an error instead of hanging the agent.
//!
//! Expiry is by timestamps: a lease past its `expires_unix_ms` is free, and the write
//! transactions that touch a network drop its expired records. Nothing pushes changes between
//! processes, so [`EmbeddedStore::watch`] polls ([`POLL_INTERVAL`]) a fingerprint of the
//! networks and the unexpired leases, which also catches leases expiring.
//!
//! All of this is blocking file I/O, done on one worker thread per handle; the futures only wait
//! for its answer.

use std::{
    collections::hash_map::DefaultHasher,
    fs::{self, File},
    hash::{Hash as _, Hasher as _},
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::{Arc, mpsc},
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use futures::future::BoxFuture;
use ipnetwork::Ipv4Network;
use nix::{
    errno::Errno,
    fcntl::{Flock, FlockArg},
};
use redb::{Database, ReadOnlyDatabase, ReadableDatabase, ReadableTable as _, TableDefinition};
use serde::{Serialize, de::DeserializeOwned};
use tokio::sync::{oneshot, watch};

use super::{
    Changes, ClusterError, ClusterStore, HostNames, Lease, OverlayNetwork, Result,
    alloc::{self, Definition, LeasePlan},
    now_unix_ms,
};

/// How long an operation waits for the other handles sharing the directory before it fails.
pub const LOCK_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a watched store looks for changes made by other handles, and for expiries.
pub const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// Name of the database file in the store's directory.
pub const DB_FILE: &str = "cluster.redb";
/// Name of the lock file in the store's directory.
pub const LOCK_FILE: &str = "cluster.lock";

/// Network name -> JSON [`OverlayNetwork`].
const NETWORKS: TableDefinition<&str, &[u8]> = TableDefinition::new("overlay_networks");
/// `<network>/<subnet key>` -> JSON [`Lease`], expired ones included until a write drops them.
const LEASES: TableDefinition<&str, &[u8]> = TableDefinition::new("overlay_leases");
/// `<network>/<host>` -> JSON [`HostNames`].
const NAMES: TableDefinition<&str, &[u8]> = TableDefinition::new("overlay_names");

type Job = Box<dyn FnOnce(&Files) + Send>;

/// A handle on the embedded store in one directory. Any number of handles, in any number of
/// processes, may share the directory. Dropping a handle waits for the operation its worker is
/// running, if any (at most [`LOCK_TIMEOUT`] plus one transaction).
pub struct EmbeddedStore {
    dir: PathBuf,
    /// `None` only while dropping, to stop the worker.
    jobs: Option<mpsc::Sender<Job>>,
    changes: Arc<watch::Sender<u64>>,
    worker: Option<JoinHandle<()>>,
}

impl EmbeddedStore {
    /// Opens (creating if need be) the store in `dir`, checking that its database can be used.
    pub fn open(dir: &Path) -> Result<Self> {
        fs::create_dir_all(dir).map_err(|e| ClusterError::Embedded {
            path: dir.display().to_string(),
            message: format!("creating the directory: {e}"),
        })?;
        let files = Files {
            db: dir.join(DB_FILE),
            lock: dir.join(LOCK_FILE),
        };
        // Creates the tables, so that reads of a fresh store find them, and surfaces a bad
        // directory or a damaged file now rather than at the first lease.
        files.write(|_| Ok(()))?;
        let (jobs, queue) = mpsc::channel::<Job>();
        let (changes, _) = watch::channel(0u64);
        let changes = Arc::new(changes);
        let worker = {
            let changes = Arc::clone(&changes);
            thread::Builder::new()
                .name("cluster-embedded".into())
                .spawn(move || worker(&files, &queue, &changes))
                .map_err(|e| ClusterError::Embedded {
                    path: dir.display().to_string(),
                    message: format!("starting its worker thread: {e}"),
                })?
        };
        Ok(Self {
            dir: dir.to_owned(),
            jobs: Some(jobs),
            changes,
            worker: Some(worker),
        })
    }

    /// The directory the store lives in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Runs `op` on the worker thread and waits for its result.
    fn run<T: Send + 'static>(
        &self,
        op: impl FnOnce(&Files) -> Result<T> + Send + 'static,
    ) -> BoxFuture<'_, Result<T>> {
        Box::pin(async move {
            let (reply, answer) = oneshot::channel();
            let job: Job = Box::new(move |files| {
                // The caller may have given up waiting: nobody to tell then.
                let _ = reply.send(op(files));
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

impl Drop for EmbeddedStore {
    fn drop(&mut self) {
        // Closing the queue ends the worker after the job it is running, if any.
        self.jobs = None;
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }
}

/// Serves jobs in order and, while anyone watches, polls for changes between them.
fn worker(files: &Files, queue: &mpsc::Receiver<Job>, changes: &watch::Sender<u64>) {
    // The fingerprint last seen; `None` when nobody watched, so that a new watcher gets a
    // first notification once its baseline is taken (it may have missed changes before).
    let mut seen: Option<u64> = None;
    let mut next_poll = Instant::now();
    loop {
        match queue.recv_timeout(next_poll.saturating_duration_since(Instant::now())) {
            Ok(job) => job(files),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        }
        let now = Instant::now();
        if now < next_poll {
            continue;
        }
        next_poll = now + POLL_INTERVAL;
        if changes.receiver_count() == 0 {
            seen = None;
            continue;
        }
        match files.fingerprint() {
            Ok(fingerprint) if seen != Some(fingerprint) => {
                seen = Some(fingerprint);
                changes.send_modify(|n| *n = n.wrapping_add(1));
            }
            Ok(_) => {}
            // Passing (a peer holding the lock too long): the next poll tries again.
            Err(e) => log::warn!("watching the cluster store: {e}"),
        }
    }
}

/// The store's files, and every operation on them (run on the worker thread).
struct Files {
    db: PathBuf,
    lock: PathBuf,
}

impl Files {
    fn error(&self, message: impl std::fmt::Display) -> ClusterError {
        ClusterError::Embedded {
            path: self.db.display().to_string(),
            message: message.to_string(),
        }
    }

    /// Runs `attempt` with the directory locked (see the module docs), again while it returns
    /// `None` (the database file was open elsewhere), until [`LOCK_TIMEOUT`].
    fn locked<T>(&self, mut attempt: impl FnMut() -> Option<Result<T>>) -> Result<T> {
        let deadline = Instant::now() + LOCK_TIMEOUT;
        let mut pause = Duration::from_millis(1);
        loop {
            let file = File::options()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&self.lock)
                .map_err(|e| self.error(format!("opening {}: {e}", self.lock.display())))?;
            let held = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                // The lock is released when `_locked` is dropped, after `attempt` closed the
                // database.
                Ok(_locked) => match attempt() {
                    Some(result) => return result,
                    // Only a program that opens the file without taking the lock gets here.
                    None => "the database file",
                },
                Err((_, Errno::EWOULDBLOCK)) => "the lock file",
                Err((_, e)) => {
                    return Err(self.error(format!("locking {}: {e}", self.lock.display())));
                }
            };
            if Instant::now() >= deadline {
                return Err(self.error(format!(
                    "another handle kept {held} locked for {LOCK_TIMEOUT:?}"
                )));
            }
            thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(16));
        }
    }

    /// One write transaction: `f` reads and changes the tables, and all of it commits or none.
    fn write<T>(&self, f: impl FnOnce(&mut Tables<'_>) -> Result<T>) -> Result<T> {
        let mut f = Some(f);
        self.locked(|| {
            let db = match Database::create(&self.db) {
                Ok(db) => db,
                Err(redb::DatabaseError::DatabaseAlreadyOpen) => return None,
                Err(e) => return Some(Err(self.error(e))),
            };
            let f = f
                .take()
                .expect("a write runs once: it returns after opening");
            Some(self.closed(self.write_txn(&db, f), db.close()))
        })
    }

    /// `result`, unless closing the database failed.
    fn closed<T>(&self, result: Result<T>, close: Result<(), redb::DatabaseError>) -> Result<T> {
        let close = close.map_err(|e| self.error(e));
        result.and_then(|value| close.map(|()| value))
    }

    fn write_txn<T>(
        &self,
        db: &Database,
        f: impl FnOnce(&mut Tables<'_>) -> Result<T>,
    ) -> Result<T> {
        let txn = db.begin_write().map_err(|e| self.error(e))?;
        let value = {
            let mut tables = Tables {
                files: self,
                networks: txn.open_table(NETWORKS).map_err(|e| self.error(e))?,
                leases: txn.open_table(LEASES).map_err(|e| self.error(e))?,
                names: txn.open_table(NAMES).map_err(|e| self.error(e))?,
            };
            f(&mut tables)?
        };
        txn.commit().map_err(|e| self.error(e))?;
        Ok(value)
    }

    /// Every network, lease (expired ones too) and names record, from one read transaction.
    ///
    /// The database is opened read-only: a writable open and close each rewrite the file's
    /// header and sync it, which a watcher polling five times a second should not cost. A file
    /// left needing repair by a crashed writer cannot be opened read-only; a writable open
    /// repairs it.
    fn read(&self) -> Result<Snapshot> {
        self.locked(|| {
            match ReadOnlyDatabase::open(&self.db) {
                Ok(db) => return Some(self.closed(self.read_txn(&db), db.close())),
                Err(redb::DatabaseError::DatabaseAlreadyOpen) => return None,
                // Needs repair (or is missing): the writable open below deals with it.
                Err(_) => {}
            }
            match Database::create(&self.db) {
                Ok(db) => Some(self.closed(self.read_txn(&db), db.close())),
                Err(redb::DatabaseError::DatabaseAlreadyOpen) => None,
                Err(e) => Some(Err(self.error(e))),
            }
        })
    }

    fn read_txn(&self, db: &impl ReadableDatabase) -> Result<Snapshot> {
        let txn = db.begin_read().map_err(|e| self.error(e))?;
        let networks = txn.open_table(NETWORKS).map_err(|e| self.error(e))?;
        let leases = txn.open_table(LEASES).map_err(|e| self.error(e))?;
        // Absent in a store written before names were published.
        let names = match txn.open_table(NAMES) {
            Ok(names) => self.decode_names(&names)?,
            Err(redb::TableError::TableDoesNotExist(_)) => Vec::new(),
            Err(e) => return Err(self.error(e)),
        };
        Ok(Snapshot {
            networks: self.decode_all(&networks)?,
            leases: self.decode_all(&leases)?,
            names,
        })
    }

    fn decode_all<T: DeserializeOwned>(
        &self,
        table: &impl redb::ReadableTable<&'static str, &'static [u8]>,
    ) -> Result<Vec<T>> {
        let mut out = Vec::new();
        for item in table.iter().map_err(|e| self.error(e))? {
            let (key, value) = item.map_err(|e| self.error(e))?;
            out.push(decode(key.value(), value.value())?);
        }
        Ok(out)
    }

    /// The names records that decode. Names are advice for the DNS, which any host may write: one
    /// bad record is skipped with a warning rather than failing the networks and leases read with
    /// it.
    fn decode_names(
        &self,
        table: &impl redb::ReadableTable<&'static str, &'static [u8]>,
    ) -> Result<Vec<HostNames>> {
        let mut out = Vec::new();
        for item in table.iter().map_err(|e| self.error(e))? {
            let (key, value) = item.map_err(|e| self.error(e))?;
            match decode(key.value(), value.value()) {
                Ok(record) => out.push(record),
                Err(e) => log::warn!("cluster store: skipping names record: {e}"),
            }
        }
        Ok(out)
    }

    /// What a watcher must notice: the networks, who holds which subnet through which VTEP, as
    /// of now (so an expiry changes it; a renewal, which changes only the expiry, does not), and
    /// the names the hosts publish.
    fn fingerprint(&self) -> Result<u64> {
        let snapshot = self.read()?;
        let now = now_unix_ms();
        let mut hasher = DefaultHasher::new();
        snapshot.networks.hash(&mut hasher);
        for lease in snapshot.leases.iter().filter(|l| !l.expired_at(now)) {
            (&lease.network, lease.subnet, &lease.host, lease.vtep).hash(&mut hasher);
        }
        for record in &snapshot.names {
            (&record.network, &record.host, &record.names).hash(&mut hasher);
        }
        Ok(hasher.finish())
    }
}

/// The whole store, as one read transaction saw it.
struct Snapshot {
    networks: Vec<OverlayNetwork>,
    /// Expired ones too.
    leases: Vec<Lease>,
    names: Vec<HostNames>,
}

/// The tables inside one write transaction.
struct Tables<'t> {
    files: &'t Files,
    networks: redb::Table<'t, &'static str, &'static [u8]>,
    leases: redb::Table<'t, &'static str, &'static [u8]>,
    names: redb::Table<'t, &'static str, &'static [u8]>,
}

impl Tables<'_> {
    fn networks(&self) -> Result<Vec<OverlayNetwork>> {
        self.files.decode_all(&self.networks)
    }

    fn network(&self, name: &str) -> Result<OverlayNetwork> {
        let value = self
            .networks
            .get(name)
            .map_err(|e| self.files.error(e))?
            .ok_or_else(|| ClusterError::NetworkNotFound {
                name: name.to_owned(),
            })?;
        decode(name, value.value())
    }

    fn put_network(&mut self, network: &OverlayNetwork) -> Result<()> {
        self.networks
            .insert(network.name.as_str(), encode(network).as_slice())
            .map_err(|e| self.files.error(e))?;
        Ok(())
    }

    fn lease(&self, network: &str, subnet: Ipv4Network) -> Result<Option<Lease>> {
        let key = lease_key(network, subnet);
        let value = self
            .leases
            .get(key.as_str())
            .map_err(|e| self.files.error(e))?;
        value.map(|v| decode(&key, v.value())).transpose()
    }

    fn put_lease(&mut self, lease: &Lease) -> Result<()> {
        let key = lease_key(&lease.network, lease.subnet);
        self.leases
            .insert(key.as_str(), encode(lease).as_slice())
            .map_err(|e| self.files.error(e))?;
        Ok(())
    }

    fn delete_lease(&mut self, network: &str, subnet: Ipv4Network) -> Result<()> {
        self.leases
            .remove(lease_key(network, subnet).as_str())
            .map_err(|e| self.files.error(e))?;
        Ok(())
    }

    fn put_names(&mut self, record: &HostNames) -> Result<()> {
        let key = names_key(&record.network, &record.host);
        self.names
            .insert(key.as_str(), encode(record).as_slice())
            .map_err(|e| self.files.error(e))?;
        Ok(())
    }

    fn delete_names(&mut self, network: &str, host: &str) -> Result<()> {
        self.names
            .remove(names_key(network, host).as_str())
            .map_err(|e| self.files.error(e))?;
        Ok(())
    }

    /// The unexpired leases on `network`; its expired records are dropped on the way.
    fn live_leases(&mut self, network: &str, now: u64) -> Result<Vec<Lease>> {
        let all: Vec<Lease> = self.files.decode_all(&self.leases)?;
        let mut live = Vec::new();
        for lease in all.into_iter().filter(|l| l.network == network) {
            if lease.expired_at(now) {
                self.delete_lease(network, lease.subnet)?;
            } else {
                live.push(lease);
            }
        }
        Ok(live)
    }
}

fn lease_key(network: &str, subnet: Ipv4Network) -> String {
    format!("{network}/{}", alloc::subnet_key(subnet))
}

/// Network and host names hold no `/` (both are checked before anything is stored).
fn names_key(network: &str, host: &str) -> String {
    format!("{network}/{host}")
}

fn encode<T: Serialize>(record: &T) -> Vec<u8> {
    serde_json::to_vec(record).expect("records are plain data and always serialize")
}

fn decode<T: DeserializeOwned>(key: &str, value: &[u8]) -> Result<T> {
    serde_json::from_slice(value).map_err(|source| ClusterError::Decode {
        key: key.to_owned(),
        source,
    })
}

/// `now + ttl` in Unix milliseconds.
fn expiry(now: u64, ttl: Duration) -> u64 {
    now.saturating_add(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX))
}

fn sorted(mut leases: Vec<Lease>) -> Vec<Lease> {
    leases.sort_by(|a, b| (&a.network, a.subnet).cmp(&(&b.network, b.subnet)));
    leases
}

impl ClusterStore for EmbeddedStore {
    fn define_network<'a>(
        &'a self,
        name: &'a str,
        pool: Ipv4Network,
        subnet_len: u8,
        mtu: Option<u32>,
    ) -> BoxFuture<'a, Result<OverlayNetwork>> {
        let name = name.to_owned();
        self.run(move |files| {
            files.write(|tables| {
                match alloc::define(&tables.networks()?, &name, pool, subnet_len, mtu)? {
                    Definition::Stored(network) => Ok(network),
                    Definition::New(network) => {
                        tables.put_network(&network)?;
                        Ok(network)
                    }
                }
            })
        })
    }

    fn networks(&self) -> BoxFuture<'_, Result<Vec<OverlayNetwork>>> {
        self.run(|files| {
            let mut networks = files.read()?.networks;
            networks.sort_by(|a, b| a.name.cmp(&b.name));
            Ok(networks)
        })
    }

    fn remove_network<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<()>> {
        let name = name.to_owned();
        self.run(move |files| {
            files.write(|tables| {
                tables.network(&name)?;
                let live = tables.live_leases(&name, now_unix_ms())?;
                if !live.is_empty() {
                    return Err(ClusterError::NetworkInUse {
                        name,
                        hosts: sorted(live).into_iter().map(|l| l.host).collect(),
                    });
                }
                tables
                    .networks
                    .remove(name.as_str())
                    .map_err(|e| files.error(e))?;
                let records: Vec<HostNames> = files.decode_all(&tables.names)?;
                for record in records.iter().filter(|r| r.network == name) {
                    tables.delete_names(&name, &record.host)?;
                }
                Ok(())
            })
        })
    }

    fn acquire_lease<'a>(
        &'a self,
        network: &'a OverlayNetwork,
        host: &'a str,
        vtep: Ipv4Addr,
        prefer: Option<Ipv4Network>,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Lease>> {
        let asked = network.clone();
        let host = host.to_owned();
        self.run(move |files| {
            alloc::check_host(&host)?;
            files.write(|tables| {
                let stored = tables.network(&asked.name)?;
                alloc::check_same_network(&stored, &asked)?;
                let now = now_unix_ms();
                let live = tables.live_leases(&stored.name, now)?;
                let subnet = match alloc::plan_lease(&stored, &live, &host, prefer)? {
                    LeasePlan::Keep(current) => current.subnet,
                    LeasePlan::Take(subnet) => subnet,
                };
                let lease = Lease {
                    network: stored.name,
                    subnet,
                    host,
                    vtep,
                    expires_unix_ms: expiry(now, ttl),
                };
                tables.put_lease(&lease)?;
                Ok(lease)
            })
        })
    }

    fn renew_lease<'a>(&'a self, lease: &'a Lease, ttl: Duration) -> BoxFuture<'a, Result<Lease>> {
        let lease = lease.clone();
        self.run(move |files| {
            files.write(|tables| {
                let now = now_unix_ms();
                match tables.lease(&lease.network, lease.subnet)? {
                    Some(current) if current.host != lease.host && !current.expired_at(now) => {
                        return Err(ClusterError::LeaseLost {
                            network: lease.network,
                            subnet: lease.subnet,
                            host: lease.host,
                            held_by: Some(current.host),
                        });
                    }
                    Some(current) if current.host == lease.host => {}
                    // Expired and free: taken back, if it still belongs to its network.
                    _ => {
                        let network = tables.network(&lease.network)?;
                        if !alloc::is_pool_subnet(network.pool, network.subnet_len, lease.subnet) {
                            return Err(ClusterError::LeaseLost {
                                network: lease.network,
                                subnet: lease.subnet,
                                host: lease.host,
                                held_by: None,
                            });
                        }
                    }
                }
                let renewed = Lease {
                    expires_unix_ms: expiry(now, ttl),
                    ..lease
                };
                tables.put_lease(&renewed)?;
                Ok(renewed)
            })
        })
    }

    fn release_lease<'a>(&'a self, lease: &'a Lease) -> BoxFuture<'a, Result<()>> {
        let lease = lease.clone();
        self.run(move |files| {
            files.write(|tables| {
                if let Some(current) = tables.lease(&lease.network, lease.subnet)?
                    && current.host == lease.host
                {
                    tables.delete_lease(&lease.network, lease.subnet)?;
                    tables.delete_names(&lease.network, &lease.host)?;
                }
                Ok(())
            })
        })
    }

    fn leases<'a>(&'a self, network: &'a str) -> BoxFuture<'a, Result<Vec<Lease>>> {
        let network = network.to_owned();
        self.run(move |files| {
            let leases = files.read()?.leases;
            let now = now_unix_ms();
            Ok(sorted(
                leases
                    .into_iter()
                    .filter(|l| l.network == network && !l.expired_at(now))
                    .collect(),
            ))
        })
    }

    fn all_leases(&self) -> BoxFuture<'_, Result<Vec<Lease>>> {
        self.run(|files| {
            let leases = files.read()?.leases;
            let now = now_unix_ms();
            Ok(sorted(
                leases.into_iter().filter(|l| !l.expired_at(now)).collect(),
            ))
        })
    }

    fn put_names<'a>(&'a self, names: &'a HostNames) -> BoxFuture<'a, Result<()>> {
        let record = names.clone();
        self.run(move |files| {
            alloc::check_host(&record.host)?;
            files.write(|tables| {
                tables.network(&record.network)?;
                if record.names.is_empty() {
                    tables.delete_names(&record.network, &record.host)
                } else {
                    tables.put_names(&record)
                }
            })
        })
    }

    fn all_names(&self) -> BoxFuture<'_, Result<Vec<HostNames>>> {
        self.run(|files| {
            let mut names = files.read()?.names;
            names.sort_by(|a, b| (&a.network, &a.host).cmp(&(&b.network, &b.host)));
            Ok(names)
        })
    }

    fn watch(&self) -> Changes {
        self.changes.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use std::{
        collections::BTreeSet,
        sync::{Arc, Barrier},
    };

    use futures::executor::block_on;

    use super::*;

    /// A fresh directory, deleted when dropped.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir().join(format!(
                "net-agent-cluster-{name}-{}-{}",
                std::process::id(),
                now_unix_ms()
            ));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).expect("creating a test directory");
            Self(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn net(s: &str) -> Ipv4Network {
        s.parse().unwrap()
    }

    fn ip(n: u8) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, 0, n)
    }

    const LONG: Duration = Duration::from_secs(600);

    /// Polls `cond` until it holds, failing after `timeout`.
    fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
        let start = Instant::now();
        while !cond() {
            assert!(
                start.elapsed() < timeout,
                "timed out after {timeout:?} waiting for {what}"
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn networks_are_defined_once_with_the_lowest_free_vni() {
        let dir = TempDir::new("define");
        let store = EmbeddedStore::open(&dir.0).unwrap();
        let a = block_on(store.define_network("a", net("10.244.0.0/16"), 24, None)).unwrap();
        let b = block_on(store.define_network("b", net("10.245.0.0/16"), 26, Some(1400))).unwrap();
        assert_eq!((a.vni, b.vni), (1, 2));
        assert_eq!(b.mtu, Some(1400));
        // Idempotent, from another handle too.
        let other = EmbeddedStore::open(&dir.0).unwrap();
        assert_eq!(
            block_on(other.define_network("a", net("10.244.0.0/16"), 24, None)).unwrap(),
            a
        );
        let err = block_on(other.define_network("a", net("10.244.0.0/16"), 25, None)).unwrap_err();
        assert!(
            matches!(err, ClusterError::NetworkConflict { .. }) && err.to_string().contains("/25"),
            "{err}"
        );
        let err = block_on(other.define_network("c", net("10.245.3.0/24"), 24, None)).unwrap_err();
        assert!(matches!(err, ClusterError::PoolOverlap { .. }), "{err}");
        assert_eq!(block_on(store.networks()).unwrap(), vec![a.clone(), b]);
        // The lowest free VNI is reused once its network is gone.
        block_on(store.remove_network("a")).unwrap();
        let c = block_on(store.define_network("c", net("10.246.0.0/16"), 24, None)).unwrap();
        assert_eq!(c.vni, 1);
        let err = block_on(store.remove_network("a")).unwrap_err();
        assert!(matches!(err, ClusterError::NetworkNotFound { .. }), "{err}");
    }

    #[test]
    fn competing_handles_never_get_the_same_subnet() {
        let dir = TempDir::new("compete");
        let setup = EmbeddedStore::open(&dir.0).unwrap();
        // 16 subnets for 2 x 10 hosts: 16 get one, 4 find the pool exhausted.
        let network = block_on(setup.define_network("ov", net("10.244.0.0/20"), 24, None)).unwrap();
        let start = Arc::new(Barrier::new(2));
        let results: Vec<Vec<Result<Lease>>> = thread::scope(|s| {
            let workers: Vec<_> = (0..2u8)
                .map(|side| {
                    let (dir, network, start) = (&dir.0, &network, Arc::clone(&start));
                    s.spawn(move || {
                        let store = EmbeddedStore::open(dir).unwrap();
                        start.wait();
                        (0..10)
                            .map(|n| {
                                let host = format!("side{side}-host{n}");
                                block_on(store.acquire_lease(network, &host, ip(n), None, LONG))
                            })
                            .collect()
                    })
                })
                .collect();
            workers.into_iter().map(|w| w.join().unwrap()).collect()
        });
        let granted: Vec<&Lease> = results
            .iter()
            .flatten()
            .filter_map(|r| r.as_ref().ok())
            .collect();
        let subnets: BTreeSet<Ipv4Network> = granted.iter().map(|l| l.subnet).collect();
        assert_eq!(granted.len(), 16, "{results:?}");
        assert_eq!(subnets.len(), 16, "a subnet was given twice: {granted:?}");
        for err in results.iter().flatten().filter_map(|r| r.as_ref().err()) {
            assert!(matches!(err, ClusterError::PoolExhausted { .. }), "{err}");
        }
        let stored = block_on(setup.leases("ov")).unwrap();
        assert_eq!(stored.len(), 16);
        assert_eq!(
            stored.iter().map(|l| l.subnet).collect::<BTreeSet<_>>(),
            subnets
        );
    }

    #[test]
    fn expiry_frees_a_subnet_and_a_host_gets_its_own_back() {
        let dir = TempDir::new("expiry");
        let store = EmbeddedStore::open(&dir.0).unwrap();
        let network = block_on(store.define_network("ov", net("10.244.0.0/23"), 24, None)).unwrap();
        let a = block_on(store.acquire_lease(&network, "a", ip(1), None, LONG)).unwrap();
        assert_eq!(a.subnet, net("10.244.0.0/24"));
        // Asking again, with another VTEP and another preference: the same lease, new VTEP.
        let again =
            block_on(store.acquire_lease(&network, "a", ip(9), Some(net("10.244.1.0/24")), LONG))
                .unwrap();
        assert_eq!((again.subnet, again.vtep), (a.subnet, ip(9)));
        // A restarted agent (a new handle) gets its subnet back.
        drop(store);
        let store = EmbeddedStore::open(&dir.0).unwrap();
        let back = block_on(store.acquire_lease(&network, "a", ip(9), None, LONG)).unwrap();
        assert_eq!(back.subnet, a.subnet);

        let short = Duration::from_millis(300);
        let b = block_on(store.acquire_lease(&network, "b", ip(2), None, short)).unwrap();
        assert_eq!(b.subnet, net("10.244.1.0/24"));
        let err = block_on(store.acquire_lease(&network, "c", ip(3), None, LONG)).unwrap_err();
        assert!(matches!(err, ClusterError::PoolExhausted { .. }), "{err}");
        wait_until(Duration::from_secs(30), "b's lease to expire", || {
            block_on(store.leases("ov")).unwrap().len() == 1
        });
        let c = block_on(store.acquire_lease(&network, "c", ip(3), None, LONG)).unwrap();
        assert_eq!(c.subnet, b.subnet);
        let err = block_on(store.renew_lease(&b, LONG)).unwrap_err();
        assert!(
            matches!(&err, ClusterError::LeaseLost { held_by: Some(h), .. } if h == "c"),
            "{err}"
        );
        // b's release must not free c's lease.
        block_on(store.release_lease(&b)).unwrap();
        assert_eq!(block_on(store.leases("ov")).unwrap().len(), 2);

        // An expired lease nobody took is renewed; one remembered subnet is taken back by
        // preference after expiry.
        let d = block_on(store.renew_lease(&c, short)).unwrap();
        wait_until(Duration::from_secs(30), "c's lease to expire", || {
            block_on(store.leases("ov")).unwrap().len() == 1
        });
        let renewed = block_on(store.renew_lease(&d, LONG)).unwrap();
        assert_eq!(renewed.subnet, c.subnet);
        block_on(store.release_lease(&renewed)).unwrap();
        let e = block_on(store.acquire_lease(&network, "e", ip(5), None, LONG)).unwrap();
        assert_eq!(e.subnet, c.subnet, "the released subnet is free again");
    }

    #[test]
    fn a_network_with_leases_cannot_be_removed() {
        let dir = TempDir::new("remove");
        let store = EmbeddedStore::open(&dir.0).unwrap();
        let network = block_on(store.define_network("ov", net("10.244.0.0/16"), 24, None)).unwrap();
        let lease = block_on(store.acquire_lease(&network, "node1", ip(1), None, LONG)).unwrap();
        let err = block_on(store.remove_network("ov")).unwrap_err();
        assert!(
            matches!(err, ClusterError::NetworkInUse { .. }) && err.to_string().contains("node1"),
            "{err}"
        );
        block_on(store.release_lease(&lease)).unwrap();
        block_on(store.remove_network("ov")).unwrap();
        let err = block_on(store.acquire_lease(&network, "node1", ip(1), None, LONG)).unwrap_err();
        assert!(matches!(err, ClusterError::NetworkNotFound { .. }), "{err}");
        // Redefined with another pool: the caller's old definition is refused.
        block_on(store.define_network("ov", net("10.250.0.0/16"), 24, None)).unwrap();
        let err = block_on(store.acquire_lease(&network, "node1", ip(1), None, LONG)).unwrap_err();
        assert!(matches!(err, ClusterError::NetworkChanged { .. }), "{err}");
        let err =
            block_on(store.acquire_lease(&network, "no such/host", ip(1), None, LONG)).unwrap_err();
        assert!(matches!(err, ClusterError::InvalidHost { .. }), "{err}");
    }

    #[test]
    fn names_follow_their_network_and_the_hosts_lease() {
        let dir = TempDir::new("names");
        let store = EmbeddedStore::open(&dir.0).unwrap();
        let peer = EmbeddedStore::open(&dir.0).unwrap();
        // What the watch compares between polls.
        let files = Files {
            db: dir.0.join(DB_FILE),
            lock: dir.0.join(LOCK_FILE),
        };
        let record = |network: &str, host: &str, names: &[(&str, u8)]| HostNames {
            network: network.to_owned(),
            host: host.to_owned(),
            names: names
                .iter()
                .map(|(name, last)| super::super::EndpointName {
                    name: (*name).to_owned(),
                    aliases: vec![format!("{name}-alias")],
                    ip: Ipv4Addr::new(10, 244, 1, *last),
                })
                .collect(),
        };
        let err = block_on(store.put_names(&record("ov", "node1", &[("web", 2)]))).unwrap_err();
        assert!(matches!(err, ClusterError::NetworkNotFound { .. }), "{err}");
        assert!(
            block_on(store.all_names()).unwrap().is_empty(),
            "nothing written"
        );

        let network = block_on(store.define_network("ov", net("10.244.0.0/16"), 24, None)).unwrap();
        let lease1 = block_on(store.acquire_lease(&network, "node1", ip(1), None, LONG)).unwrap();
        block_on(store.acquire_lease(&network, "node2", ip(2), None, LONG)).unwrap();
        block_on(store.define_network("other", net("10.245.0.0/16"), 24, None)).unwrap();
        let web = record("ov", "node1", &[("web", 2)]);
        let db = record("ov", "node2", &[("db", 3)]);
        let other = record("other", "node1", &[("cache", 4)]);
        let before = files.fingerprint().unwrap();
        for r in [&web, &db, &other] {
            block_on(store.put_names(r)).unwrap();
        }
        assert_ne!(
            files.fingerprint().unwrap(),
            before,
            "names alone must move what the watch sees"
        );
        assert_eq!(
            block_on(peer.all_names()).unwrap(),
            vec![other.clone(), web.clone(), db.clone()]
        );

        // Replaced, then removed by an empty list.
        let web2 = record("ov", "node1", &[("api", 5), ("web", 2)]);
        block_on(store.put_names(&web2)).unwrap();
        assert_eq!(
            block_on(store.all_names()).unwrap(),
            vec![other.clone(), web2, db.clone()]
        );
        block_on(store.put_names(&record("ov", "node1", &[]))).unwrap();
        assert_eq!(
            block_on(store.all_names()).unwrap(),
            vec![other.clone(), db.clone()]
        );

        // A released lease takes its host's names on that network along, no one else's.
        block_on(store.put_names(&web)).unwrap();
        block_on(store.release_lease(&lease1)).unwrap();
        assert_eq!(
            block_on(store.all_names()).unwrap(),
            vec![other.clone(), db]
        );
        // A removed network takes every record of it along.
        let leases = block_on(store.leases("ov")).unwrap();
        for lease in &leases {
            block_on(store.release_lease(lease)).unwrap();
        }
        block_on(store.put_names(&record("ov", "node3", &[("late", 9)]))).unwrap();
        block_on(store.remove_network("ov")).unwrap();
        assert_eq!(block_on(store.all_names()).unwrap(), vec![other]);
    }

    #[test]
    fn a_names_record_that_does_not_decode_is_skipped_not_fatal() {
        let dir = TempDir::new("bad-names");
        let store = EmbeddedStore::open(&dir.0).unwrap();
        let network = block_on(store.define_network("ov", net("10.244.0.0/16"), 24, None)).unwrap();
        block_on(store.acquire_lease(&network, "node1", ip(1), None, LONG)).unwrap();
        let good = HostNames {
            network: "ov".into(),
            host: "node1".into(),
            names: vec![super::super::EndpointName {
                name: "web".into(),
                aliases: Vec::new(),
                ip: Ipv4Addr::new(10, 244, 0, 2),
            }],
        };
        block_on(store.put_names(&good)).unwrap();
        let files = Files {
            db: dir.0.join(DB_FILE),
            lock: dir.0.join(LOCK_FILE),
        };
        files
            .write(|tables| {
                tables
                    .names
                    .insert("ov/node2", b"not json".as_slice())
                    .map_err(|e| files.error(e))?;
                Ok(())
            })
            .unwrap();
        assert_eq!(block_on(store.all_names()).unwrap(), vec![good]);
        assert_eq!(block_on(store.leases("ov")).unwrap().len(), 1);
        files.fingerprint().unwrap();
    }

    #[test]
    fn watch_notices_peers_and_expiry() {
        let dir = TempDir::new("watch");
        let watcher = EmbeddedStore::open(&dir.0).unwrap();
        let peer = EmbeddedStore::open(&dir.0).unwrap();
        let mut changes = watcher.watch();
        let mut notified = |what: &str, timeout: Duration| {
            wait_until(timeout, what, || changes.has_changed().unwrap());
            changes.borrow_and_update();
        };
        notified("the first notification", Duration::from_secs(30));
        let network = block_on(peer.define_network("ov", net("10.244.0.0/16"), 24, None)).unwrap();
        notified("a network defined by a peer", Duration::from_secs(1));
        let lease = block_on(peer.acquire_lease(&network, "node2", ip(2), None, LONG)).unwrap();
        notified("a peer's lease", Duration::from_secs(1));
        let moved = block_on(peer.acquire_lease(&network, "node2", ip(7), None, LONG)).unwrap();
        assert_eq!(moved.subnet, lease.subnet);
        notified("a peer's new VTEP", Duration::from_secs(1));
        assert_eq!(block_on(watcher.leases("ov")).unwrap()[0].vtep, ip(7));
        block_on(peer.renew_lease(&moved, Duration::from_millis(500))).unwrap();
        notified("a peer's lease expiring", Duration::from_secs(30));
        assert!(block_on(watcher.leases("ov")).unwrap().is_empty());
    }
}
