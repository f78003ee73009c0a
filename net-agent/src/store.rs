//! The agent's persistent state: networks, endpoints and id counters in an embedded, crash-safe
//! store (redb: copy-on-write B-trees, a commit is durable once `commit` returns). The store is
//! the source of truth: on start the agent makes the kernel match it.

use std::{net::Ipv4Addr, path::Path};

use ipnetwork::Ipv4Network;
use redb::{Database, ReadableDatabase as _, ReadableTable as _, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::api::Proto;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state store: {0}")]
    Db(String),
    #[error("state store record {key}: {source}")]
    Decode {
        key: String,
        source: serde_json::Error,
    },
}

macro_rules! db_err {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Db(e.to_string())
            }
        }
    )*};
}
db_err!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

type Result<T> = std::result::Result<T, StoreError>;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NetworkRecord {
    pub name: String,
    pub id: u32,
    pub subnet: Ipv4Network,
    pub gateway: Ipv4Addr,
    pub mtu: u32,
    /// Traffic from its endpoints that leaves through the uplink gets the host's address.
    #[serde(default = "masquerade_default")]
    pub masquerade: bool,
    /// Set for this host's part of a cluster overlay network: `subnet` is its lease.
    #[serde(default)]
    pub overlay: Option<OverlayRecord>,
}

/// What a local network needs to know of the overlay network it is this host's part of.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct OverlayRecord {
    /// The cluster-wide pool every host's subnet comes from.
    pub pool: Ipv4Network,
    pub vni: u32,
}

fn masquerade_default() -> bool {
    true
}

/// How an endpoint is networked (Docker's network modes).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Mode {
    /// Its own namespace with a veth on each network it is connected to.
    Bridge,
    /// Its own namespace with only loopback (until connected to a network).
    None,
    /// No namespace of its own: the host's network stack.
    Host,
    /// Shares the namespace of endpoint `owner`.
    Container { owner: String },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct EndpointRecord {
    pub name: String,
    pub id: u32,
    pub mode: Mode,
    /// Path of the namespace; empty for host mode.
    pub netns: String,
    /// The agent made the namespace and deletes it with the endpoint.
    pub netns_owned: bool,
    /// One per network the endpoint is connected to, in the order connected (eth0 first).
    pub interfaces: Vec<InterfaceRecord>,
    /// Its published ports, kept with it so they come and go with the endpoint in one
    /// transaction.
    #[serde(default)]
    pub published: Vec<PublishedRecord>,
}

/// One published port: connections to `host_ip:host_port/proto` go to `ip:port`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PublishedRecord {
    /// `None`: every address of the host.
    pub host_ip: Option<Ipv4Addr>,
    pub host_port: u16,
    pub proto: Proto,
    /// The endpoint's address the port goes to (its first interface's when published).
    pub ip: Ipv4Addr,
    pub port: u16,
    /// Sources allowed to connect; empty: anyone.
    pub allow: Vec<Ipv4Network>,
    /// Names the port's allow list in the data plane.
    pub id: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct InterfaceRecord {
    pub network: String,
    pub ip: Ipv4Addr,
    pub mac: [u8; 6],
    /// Name inside the endpoint's namespace.
    pub ifname: String,
    pub host_ifname: String,
    pub host_mac: [u8; 6],
    /// Further names the endpoint answers to on this network.
    pub aliases: Vec<String>,
}

const NETWORKS: TableDefinition<&str, &[u8]> = TableDefinition::new("networks");
const ENDPOINTS: TableDefinition<&str, &[u8]> = TableDefinition::new("endpoints");
/// Endpoints being plumbed or torn down: recorded before the first kernel object is made (or
/// in the same transaction that forgets the endpoint), cleared when the work is done. What a
/// crash leaves here is exactly what the next start must clean up, with no guessing by name.
const PENDING: TableDefinition<&str, &[u8]> = TableDefinition::new("pending_endpoints");
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");

pub struct Store {
    db: Database,
}

/// One change, applied atomically by [`Store::apply`].
pub enum Change<'a> {
    PutNetwork(&'a NetworkRecord),
    DeleteNetwork(&'a str),
    PutEndpoint(&'a EndpointRecord),
    DeleteEndpoint(&'a str),
    PutPending(&'a EndpointRecord),
    DeletePending(&'a str),
}

impl Store {
    pub fn open(state_dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(state_dir)
            .map_err(|e| StoreError::Db(format!("creating {}: {e}", state_dir.display())))?;
        let db = Database::create(state_dir.join("state.redb"))?;
        // Create the tables so that reads of a fresh store find them.
        let txn = db.begin_write()?;
        txn.open_table(NETWORKS)?;
        txn.open_table(ENDPOINTS)?;
        txn.open_table(PENDING)?;
        txn.open_table(COUNTERS)?;
        txn.commit()?;
        Ok(Self { db })
    }

    pub fn networks(&self) -> Result<Vec<NetworkRecord>> {
        self.read_all(NETWORKS)
    }

    pub fn endpoints(&self) -> Result<Vec<EndpointRecord>> {
        self.read_all(ENDPOINTS)
    }

    /// Endpoints whose plumbing or teardown was interrupted.
    pub fn pending(&self) -> Result<Vec<EndpointRecord>> {
        self.read_all(PENDING)
    }

    fn read_all<T: for<'de> Deserialize<'de>>(
        &self,
        table: TableDefinition<&str, &[u8]>,
    ) -> Result<Vec<T>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(table)?;
        let mut out = Vec::new();
        for item in table.iter()? {
            let (key, value) = item?;
            let record =
                serde_json::from_slice(value.value()).map_err(|source| StoreError::Decode {
                    key: key.value().to_owned(),
                    source,
                })?;
            out.push(record);
        }
        Ok(out)
    }

    /// Takes the next value of a named id counter (starting at 1), durably, so an id is never
    /// handed out twice even across crashes.
    pub fn next_id(&self, counter: &str) -> Result<u32> {
        let txn = self.begin()?;
        let id = txn.next_id(counter)?;
        txn.commit()?;
        Ok(id)
    }

    /// Applies all `changes` in one transaction: all of them persist, or none.
    pub fn apply(&self, changes: &[Change<'_>]) -> Result<()> {
        let txn = self.begin()?;
        txn.apply(changes)?;
        txn.commit()
    }

    /// A write transaction, for ids and the records that use them in one commit (one
    /// `fdatasync`).
    pub fn begin(&self) -> Result<Transaction> {
        Ok(Transaction {
            txn: self.db.begin_write()?,
        })
    }
}

/// Id counters taken and changes applied in one write transaction persist together at
/// [`Transaction::commit`]; dropped uncommitted, none of them does (redb aborts it).
pub struct Transaction {
    txn: redb::WriteTransaction,
}

impl Transaction {
    /// Takes the next value of a named id counter (starting at 1). An id taken in a transaction
    /// that does not commit was never handed out.
    pub fn next_id(&self, counter: &str) -> Result<u32> {
        let mut table = self.txn.open_table(COUNTERS)?;
        let next = table.get(counter)?.map(|v| v.value()).unwrap_or(0) + 1;
        table.insert(counter, next)?;
        u32::try_from(next).map_err(|_| StoreError::Db(format!("id counter {counter} overflowed")))
    }

    /// Applies `changes`; they persist at [`Transaction::commit`] with the rest of it.
    pub fn apply(&self, changes: &[Change<'_>]) -> Result<()> {
        let mut networks = self.txn.open_table(NETWORKS)?;
        let mut endpoints = self.txn.open_table(ENDPOINTS)?;
        let mut pending = self.txn.open_table(PENDING)?;
        for change in changes {
            match change {
                Change::PutNetwork(n) => {
                    networks.insert(n.name.as_str(), encode(n).as_slice())?;
                }
                Change::DeleteNetwork(name) => {
                    networks.remove(*name)?;
                }
                Change::PutEndpoint(e) => {
                    endpoints.insert(e.name.as_str(), encode(e).as_slice())?;
                }
                Change::DeleteEndpoint(name) => {
                    endpoints.remove(*name)?;
                }
                Change::PutPending(e) => {
                    pending.insert(e.name.as_str(), encode(e).as_slice())?;
                }
                Change::DeletePending(name) => {
                    pending.remove(*name)?;
                }
            }
        }
        Ok(())
    }

    /// Makes everything in the transaction durable, at once.
    pub fn commit(self) -> Result<()> {
        self.txn.commit()?;
        Ok(())
    }
}

fn encode<T: Serialize>(record: &T) -> Vec<u8> {
    serde_json::to_vec(record).expect("records are plain data and always serialize")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn network(name: &str, id: u32) -> NetworkRecord {
        NetworkRecord {
            name: name.into(),
            id,
            subnet: "10.1.0.0/24".parse().unwrap(),
            gateway: "10.1.0.1".parse().unwrap(),
            mtu: 1500,
            masquerade: true,
            overlay: None,
        }
    }

    #[test]
    fn records_and_counters_survive_reopen() {
        let dir = std::env::temp_dir().join(format!("net-agent-store-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        {
            let store = Store::open(&dir).unwrap();
            assert_eq!(store.next_id("network").unwrap(), 1);
            assert_eq!(store.next_id("network").unwrap(), 2);
            store
                .apply(&[
                    Change::PutNetwork(&network("a", 1)),
                    Change::PutNetwork(&network("b", 2)),
                ])
                .unwrap();
            store.apply(&[Change::DeleteNetwork("a")]).unwrap();
        }
        let store = Store::open(&dir).unwrap();
        assert_eq!(store.networks().unwrap(), vec![network("b", 2)]);
        assert_eq!(store.next_id("network").unwrap(), 3);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_transaction_keeps_ids_and_records_together() {
        let dir = std::env::temp_dir().join(format!("net-agent-txn-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        {
            let store = Store::open(&dir).unwrap();
            // Dropped uncommitted: neither the id nor the record.
            let txn = store.begin().unwrap();
            let id = txn.next_id("network").unwrap();
            assert_eq!(id, 1);
            txn.apply(&[Change::PutNetwork(&network("a", id))]).unwrap();
            drop(txn);
            assert!(store.networks().unwrap().is_empty());
            // Committed: both.
            let txn = store.begin().unwrap();
            let id = txn.next_id("network").unwrap();
            assert_eq!(id, 1);
            assert_eq!(txn.next_id("network").unwrap(), 2);
            txn.apply(&[Change::PutNetwork(&network("a", id))]).unwrap();
            txn.commit().unwrap();
        }
        let store = Store::open(&dir).unwrap();
        assert_eq!(store.networks().unwrap(), vec![network("a", 1)]);
        assert_eq!(store.next_id("network").unwrap(), 3);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
