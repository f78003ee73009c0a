//! The agent's persistent state: networks, endpoints, published ports and id counters in an
//! embedded, crash-safe store (redb: copy-on-write B-trees, a commit is durable once `commit`
//! returns). The store is the source of truth: on start the agent makes the kernel match it.

use std::{net::Ipv4Addr, ops::RangeInclusive, path::Path};

use ipnetwork::Ipv4Network;
use redb::{
    Database, MultimapTableDefinition, ReadableDatabase as _, ReadableTable as _, TableDefinition,
};
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
    /// Its endpoints may talk to each other (Docker's `enable_icc`); off, only to the gateway,
    /// the host, the outside and published ports.
    #[serde(default = "icc_default")]
    pub icc: bool,
    /// Internal (Docker's `--internal`): its endpoints reach each other and the host itself,
    /// nothing beyond; no masquerade, no published ports.
    #[serde(default)]
    pub internal: bool,
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

fn icc_default() -> bool {
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
}

impl EndpointRecord {
    /// Its addresses, one per interface: where its published ports go.
    pub fn addresses(&self) -> Vec<Ipv4Addr> {
        self.interfaces.iter().map(|i| i.ip).collect()
    }
}

/// One published port: connections to `host_ip:host_port/proto` go to `ip:port`. Recorded in a
/// table of its own, not in its endpoint's record, so that publishing one more port costs the
/// same however many the host has (a lookup per clash check and one insert).
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
/// Published ports by host side ([`port_key`]); the value names the endpoint.
const PORTS: TableDefinition<u64, &[u8]> = TableDefinition::new("published_ports");
/// Endpoint address -> the host sides of the ports published to it: an endpoint's ports, and
/// whether an address has any, without reading every port. A port always goes to an address of
/// its own endpoint (disconnecting that interface is refused while it has ports).
const PORTS_BY_TARGET: MultimapTableDefinition<u32, u64> =
    MultimapTableDefinition::new("published_ports_by_target");

/// The key of a published port's host side: protocol, port, address (0: every address), in
/// that order, so that the ports that could clash with one are a single key range.
pub fn port_key(proto: Proto, host_port: u16, host_ip: Option<Ipv4Addr>) -> u64 {
    (u64::from(proto.number()) << 48)
        | (u64::from(host_port) << 32)
        | u64::from(u32::from(host_ip.unwrap_or(Ipv4Addr::UNSPECIFIED)))
}

/// The keys of every host side on `host_port/proto`, whatever the address.
pub fn port_keys_on(proto: Proto, host_port: u16) -> RangeInclusive<u64> {
    port_key(proto, host_port, None)..=port_key(proto, host_port, Some(Ipv4Addr::BROADCAST))
}

/// The address part of a [`port_key`] (`None`: every address).
pub fn port_key_addr(key: u64) -> Option<Ipv4Addr> {
    Some(Ipv4Addr::from(key as u32)).filter(|ip| !ip.is_unspecified())
}

/// A published port as the store holds it: with the endpoint it belongs to.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PortRecord {
    pub endpoint: String,
    #[serde(flatten)]
    pub port: PublishedRecord,
}

impl PortRecord {
    fn key(&self) -> u64 {
        port_key(self.port.proto, self.port.host_port, self.port.host_ip)
    }
}

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
    PutPort(&'a PortRecord),
    DeletePort(&'a PortRecord),
    /// Every port published to these addresses (an endpoint's, as it goes).
    DeletePortsTo(&'a [Ipv4Addr]),
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
        txn.open_table(PORTS)?;
        txn.open_multimap_table(PORTS_BY_TARGET)?;
        move_ports_out_of_endpoints(&txn)?;
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

    pub fn network(&self, name: &str) -> Result<Option<NetworkRecord>> {
        self.read_one(NETWORKS, name)
    }

    pub fn endpoint(&self, name: &str) -> Result<Option<EndpointRecord>> {
        self.read_one(ENDPOINTS, name)
    }

    /// A view of the published ports as they are now, for many lookups in a row.
    pub fn ports_view(&self) -> Result<PortsView> {
        let txn = self.db.begin_read()?;
        Ok(PortsView {
            ports: txn.open_table(PORTS)?,
        })
    }

    /// Every published port, ordered by protocol, port and address.
    pub fn ports(&self) -> Result<Vec<PortRecord>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(PORTS)?;
        let mut out = Vec::new();
        for item in table.iter()? {
            let (key, value) = item?;
            out.push(decode_port(key.value(), value.value())?);
        }
        Ok(out)
    }

    /// The ports published to any of `targets` (an endpoint's addresses), ordered by protocol,
    /// port and address.
    pub fn ports_to(&self, targets: &[Ipv4Addr]) -> Result<Vec<PortRecord>> {
        let txn = self.db.begin_read()?;
        let by_target = txn.open_multimap_table(PORTS_BY_TARGET)?;
        let ports = txn.open_table(PORTS)?;
        let mut out = Vec::new();
        for target in targets {
            for key in by_target.get(u32::from(*target))? {
                let key = key?.value();
                if let Some(value) = ports.get(key)? {
                    out.push(decode_port(key, value.value())?);
                }
            }
        }
        out.sort_by_key(PortRecord::key);
        Ok(out)
    }

    /// Whether any port is published to `target`.
    pub fn has_ports_to(&self, target: Ipv4Addr) -> Result<bool> {
        let txn = self.db.begin_read()?;
        let by_target = txn.open_multimap_table(PORTS_BY_TARGET)?;
        Ok(by_target.get(u32::from(target))?.next().is_some())
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
            out.push(decode(key.value(), value.value())?);
        }
        Ok(out)
    }

    fn read_one<T: for<'de> Deserialize<'de>>(
        &self,
        table: TableDefinition<&str, &[u8]>,
        name: &str,
    ) -> Result<Option<T>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(table)?;
        match table.get(name)? {
            Some(value) => Ok(Some(decode(name, value.value())?)),
            None => Ok(None),
        }
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

/// The published ports of one read transaction.
pub struct PortsView {
    ports: redb::ReadOnlyTable<u64, &'static [u8]>,
}

impl PortsView {
    /// The ports published on `host_port/proto`, on any address: those a new one there could
    /// clash with.
    pub fn on(&self, proto: Proto, host_port: u16) -> Result<Vec<PortRecord>> {
        let mut out = Vec::new();
        for item in self.ports.range(port_keys_on(proto, host_port))? {
            let (key, value) = item?;
            out.push(decode_port(key.value(), value.value())?);
        }
        Ok(out)
    }

    /// The port published on exactly this host side ([`port_key`]).
    pub fn get(&self, key: u64) -> Result<Option<PortRecord>> {
        match self.ports.get(key)? {
            Some(value) => Ok(Some(decode_port(key, value.value())?)),
            None => Ok(None),
        }
    }

    /// Whether any port is published on `host_port`, whatever the protocol and address.
    pub fn port_in_use(&self, host_port: u16) -> Result<bool> {
        for proto in [Proto::Tcp, Proto::Udp] {
            if self
                .ports
                .range(port_keys_on(proto, host_port))?
                .next()
                .is_some()
            {
                return Ok(true);
            }
        }
        Ok(false)
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
        Ok(self.next_ids(counter, 1)?.start)
    }

    /// Takes the next `count` values of a named id counter at once.
    pub fn next_ids(&self, counter: &str, count: u32) -> Result<std::ops::Range<u32>> {
        let mut table = self.txn.open_table(COUNTERS)?;
        let last = table.get(counter)?.map(|v| v.value()).unwrap_or(0);
        let next = last + u64::from(count);
        table.insert(counter, next)?;
        let overflow = || StoreError::Db(format!("id counter {counter} overflowed"));
        Ok(u32::try_from(last + 1).map_err(|_| overflow())?
            ..u32::try_from(next + 1).map_err(|_| overflow())?)
    }

    /// Applies `changes`; they persist at [`Transaction::commit`] with the rest of it.
    pub fn apply(&self, changes: &[Change<'_>]) -> Result<()> {
        let mut networks = self.txn.open_table(NETWORKS)?;
        let mut endpoints = self.txn.open_table(ENDPOINTS)?;
        let mut pending = self.txn.open_table(PENDING)?;
        let mut ports = self.txn.open_table(PORTS)?;
        let mut by_target = self.txn.open_multimap_table(PORTS_BY_TARGET)?;
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
                Change::PutPort(p) => put_port(&mut ports, &mut by_target, p)?,
                Change::DeletePort(p) => {
                    let key = p.key();
                    ports.remove(key)?;
                    by_target.remove(u32::from(p.port.ip), key)?;
                }
                Change::DeletePortsTo(targets) => {
                    for target in *targets {
                        for key in by_target.remove_all(u32::from(*target))? {
                            ports.remove(key?.value())?;
                        }
                    }
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

fn decode<T: for<'de> Deserialize<'de>>(key: &str, value: &[u8]) -> Result<T> {
    serde_json::from_slice(value).map_err(|source| StoreError::Decode {
        key: key.to_owned(),
        source,
    })
}

fn decode_port(key: u64, value: &[u8]) -> Result<PortRecord> {
    decode(&format!("published port {key:#x}"), value)
}

/// Records `p` in the table of ports and in the index by target.
fn put_port(
    ports: &mut redb::Table<u64, &[u8]>,
    by_target: &mut redb::MultimapTable<u32, u64>,
    p: &PortRecord,
) -> Result<()> {
    let key = p.key();
    // A port moved to another target leaves the old one's index.
    if let Some(old) = ports.insert(key, encode(p).as_slice())? {
        let old = decode_port(key, old.value())?;
        by_target.remove(u32::from(old.port.ip), key)?;
    }
    by_target.insert(u32::from(p.port.ip), key)?;
    Ok(())
}

/// The layout this code writes, in `COUNTERS`: 2 since published ports have a table of their
/// own. A store without it is older.
const SCHEMA: &str = "schema";
const SCHEMA_VERSION: u64 = 2;

/// Stores written before ports had a table of their own kept them in their endpoint's record
/// (field `published`). Moves them out, once, in the transaction that opens the store: each
/// port to the table, and the endpoint's record rewritten without them.
fn move_ports_out_of_endpoints(txn: &redb::WriteTransaction) -> Result<()> {
    #[derive(Deserialize)]
    struct Legacy {
        #[serde(default)]
        published: Vec<PublishedRecord>,
    }
    let mut counters = txn.open_table(COUNTERS)?;
    if counters.get(SCHEMA)?.map(|v| v.value()) >= Some(SCHEMA_VERSION) {
        return Ok(());
    }
    let mut endpoints = txn.open_table(ENDPOINTS)?;
    let mut moved: Vec<(String, EndpointRecord, Vec<PublishedRecord>)> = Vec::new();
    for item in endpoints.iter()? {
        let (key, value) = item?;
        let name = key.value().to_owned();
        let legacy: Legacy = decode(&name, value.value())?;
        if !legacy.published.is_empty() {
            let record = decode(&name, value.value())?;
            moved.push((name, record, legacy.published));
        }
    }
    let mut ports = txn.open_table(PORTS)?;
    let mut by_target = txn.open_multimap_table(PORTS_BY_TARGET)?;
    for (name, record, published) in moved {
        for port in published {
            let p = PortRecord {
                endpoint: name.clone(),
                port,
            };
            put_port(&mut ports, &mut by_target, &p)?;
        }
        endpoints.insert(name.as_str(), encode(&record).as_slice())?;
    }
    counters.insert(SCHEMA, SCHEMA_VERSION)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An id taken in a transaction of its own.
    fn next_id(store: &Store, counter: &str) -> u32 {
        let txn = store.begin().unwrap();
        let id = txn.next_id(counter).unwrap();
        txn.commit().unwrap();
        id
    }

    fn network(name: &str, id: u32) -> NetworkRecord {
        NetworkRecord {
            name: name.into(),
            id,
            subnet: "10.1.0.0/24".parse().unwrap(),
            gateway: "10.1.0.1".parse().unwrap(),
            mtu: 1500,
            masquerade: true,
            icc: true,
            internal: false,
            overlay: None,
        }
    }

    #[test]
    fn records_and_counters_survive_reopen() {
        let dir = std::env::temp_dir().join(format!("net-agent-store-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        {
            let store = Store::open(&dir).unwrap();
            assert_eq!(next_id(&store, "network"), 1);
            assert_eq!(next_id(&store, "network"), 2);
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
        assert_eq!(next_id(&store, "network"), 3);
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
        assert_eq!(next_id(&store, "network"), 3);
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn port(host_ip: Option<&str>, host_port: u16, proto: Proto, ip: &str) -> PublishedRecord {
        PublishedRecord {
            host_ip: host_ip.map(|a| a.parse().unwrap()),
            host_port,
            proto,
            ip: ip.parse().unwrap(),
            port: 80,
            allow: Vec::new(),
            id: u32::from(host_port),
        }
    }

    fn owned(endpoint: &str, port: PublishedRecord) -> PortRecord {
        PortRecord {
            endpoint: endpoint.into(),
            port,
        }
    }

    fn temp_dir(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("net-agent-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn ports_are_found_by_host_side_and_by_target() {
        let dir = temp_dir("ports-test");
        let store = Store::open(&dir).unwrap();
        let web_any = owned("web", port(None, 8080, Proto::Tcp, "10.1.0.2"));
        let web_udp = owned("web", port(None, 8080, Proto::Udp, "10.1.0.2"));
        let db_one = owned("db", port(Some("192.0.2.1"), 8080, Proto::Tcp, "10.1.0.3"));
        let db_next = owned("db", port(None, 8081, Proto::Tcp, "10.1.0.3"));
        store
            .apply(&[
                Change::PutPort(&web_any),
                Change::PutPort(&web_udp),
                Change::PutPort(&db_one),
                Change::PutPort(&db_next),
            ])
            .unwrap();
        let view = store.ports_view().unwrap();
        // 8080/tcp on every address and on one: both, and nothing of 8081 or of UDP.
        assert_eq!(
            view.on(Proto::Tcp, 8080).unwrap(),
            vec![web_any.clone(), db_one.clone()]
        );
        assert_eq!(view.on(Proto::Udp, 8080).unwrap(), vec![web_udp.clone()]);
        assert!(view.on(Proto::Tcp, 8079).unwrap().is_empty());
        assert_eq!(
            view.get(port_key(
                Proto::Tcp,
                8080,
                Some("192.0.2.1".parse().unwrap())
            ))
            .unwrap(),
            Some(db_one.clone())
        );
        assert_eq!(
            view.get(port_key(
                Proto::Tcp,
                8081,
                Some("192.0.2.1".parse().unwrap())
            ))
            .unwrap(),
            None
        );
        assert!(view.port_in_use(8081).unwrap());
        assert!(!view.port_in_use(8082).unwrap());
        drop(view);
        let db_ip: Ipv4Addr = "10.1.0.3".parse().unwrap();
        let web_ip: Ipv4Addr = "10.1.0.2".parse().unwrap();
        assert_eq!(
            store.ports_to(&[db_ip]).unwrap(),
            vec![db_one.clone(), db_next.clone()]
        );
        // One port gone: the index forgets it too.
        store.apply(&[Change::DeletePort(&db_next)]).unwrap();
        assert_eq!(store.ports_to(&[db_ip]).unwrap(), vec![db_one.clone()]);
        // An endpoint's ports go with its addresses; the other's stay.
        store.apply(&[Change::DeletePortsTo(&[web_ip])]).unwrap();
        assert!(!store.has_ports_to(web_ip).unwrap());
        assert!(store.has_ports_to(db_ip).unwrap());
        assert_eq!(store.ports().unwrap(), vec![db_one.clone()]);
        // A port recorded again for another target moves in the index.
        let moved = owned("web", port(Some("192.0.2.1"), 8080, Proto::Tcp, "10.1.0.2"));
        store.apply(&[Change::PutPort(&moved)]).unwrap();
        assert!(!store.has_ports_to(db_ip).unwrap());
        assert_eq!(store.ports_to(&[web_ip]).unwrap(), vec![moved]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn ports_kept_in_endpoint_records_move_to_their_table() {
        let dir = temp_dir("migrate-test");
        std::fs::create_dir_all(&dir).unwrap();
        let published = vec![
            port(None, 8080, Proto::Tcp, "10.1.0.2"),
            port(Some("192.0.2.1"), 5353, Proto::Udp, "10.1.0.2"),
        ];
        let record = EndpointRecord {
            name: "web".into(),
            id: 1,
            mode: Mode::Bridge,
            netns: "/run/netns/web".into(),
            netns_owned: true,
            interfaces: Vec::new(),
        };
        // A record as an agent before the ports table wrote it.
        let mut old = serde_json::to_value(&record).unwrap();
        old["published"] = serde_json::to_value(&published).unwrap();
        {
            let db = Database::create(dir.join("state.redb")).unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(ENDPOINTS)
                .unwrap()
                .insert("web", serde_json::to_vec(&old).unwrap().as_slice())
                .unwrap();
            txn.commit().unwrap();
        }
        for _ in 0..2 {
            // Moved once; opening again changes nothing.
            let store = Store::open(&dir).unwrap();
            assert_eq!(store.endpoints().unwrap(), vec![record.clone()]);
            let mut expected: Vec<PortRecord> =
                published.iter().map(|p| owned("web", p.clone())).collect();
            expected.sort_by_key(PortRecord::key);
            assert_eq!(store.ports().unwrap(), expected);
            assert_eq!(
                store.ports_to(&["10.1.0.2".parse().unwrap()]).unwrap(),
                expected
            );
            let raw = {
                let txn = store.db.begin_read().unwrap();
                let table = txn.open_table(ENDPOINTS).unwrap();
                let value = table.get("web").unwrap().unwrap();
                serde_json::from_slice::<serde_json::Value>(value.value()).unwrap()
            };
            assert!(raw.get("published").is_none(), "{raw}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
