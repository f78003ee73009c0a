//! The data plane as user space sees it: the embedded eBPF object, its pinned maps and the tcx
//! links that attach its programs to endpoint veths.
//!
//! Pin layout under the agent's bpffs directory (`--bpffs-dir`):
//!
//! ```text
//! <bpffs-dir>/v<PIN_LAYOUT_VERSION>/maps/<MAP NAME>
//! <bpffs-dir>/v<PIN_LAYOUT_VERSION>/links/<host veth>-from_endpoint   (tcx ingress)
//! <bpffs-dir>/v<PIN_LAYOUT_VERSION>/links/<host veth>-to_endpoint     (tcx egress)
//! <bpffs-dir>/v<PIN_LAYOUT_VERSION>/links/<uplink>-from_netdev / -to_netdev
//! <bpffs-dir>/v<PIN_LAYOUT_VERSION>/links/lo-from_host                  (tcx ingress)
//! ```
//!
//! (bpffs refuses names with a dot, "reserved for future use", hence the dash.)
//!
//! Maps and links are pinned, so forwarding goes on while the agent is down. A starting agent
//! reuses the pinned maps and swaps its freshly loaded programs into the pinned links atomically
//! (`bpf_link_update`), so an established flow never sees a gap.

use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    net::Ipv4Addr,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        HashMap, IterableMap as _, LpmTrie, Map, MapData, PerCpuArray, PerCpuHashMap, PerCpuValues,
        lpm_trie::Key as LpmKey,
    },
    programs::{
        LinkOrder, SchedClassifier, TcAttachType,
        links::{FdLink, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
    },
};
use ipnetwork::Ipv4Network;
use net_ebpf_common::{
    AllowKey, CtEntry, CtKey, DEFAULT_CONNTRACK_ENTRIES, DEFAULT_NAT_PORT_MAX,
    DEFAULT_NAT_PORT_MIN, DropCounters, DropKey, DropReason, EndpointInfo, EndpointKey,
    MAX_ENDPOINTS, PIN_LAYOUT_VERSION, PUBLISH_F_ALLOW_LIST, PublishKey, PublishTarget, RouteInfo,
    RouteKey, TrafficCounters, global_names, map_names, nat_stat, overlay_slot, program_names,
};

use crate::{
    api::{BpfEndpointEntry, Counter, DropCount, format_mac},
    conntrack, map_batch,
};

/// The compiled `net-ebpf` object, built by `build.rs` through aya-build.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/net-ebpf"));

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("map {0} is missing from the eBPF object")]
    MissingMap(&'static str),
    #[error("link pin {path}: {message}")]
    Link { path: PathBuf, message: String },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(
        "no pinned data plane under {0}: is the agent's --bpffs-dir right, and has the agent run?"
    )]
    NotPinned(PathBuf),
    #[error(
        "{0} is not on a bpffs: --bpffs-dir must be under a bpf filesystem such as /sys/fs/bpf"
    )]
    NotBpffs(PathBuf),
    #[error("every one of the {0} endpoint counter slots is taken: no room for another endpoint")]
    SlotsFull(u32),
}

type Result<T> = std::result::Result<T, DatapathError>;

/// The hooks each endpoint veth gets, with the program for each.
const ENDPOINT_HOOKS: [(&str, TcAttachType); 2] = [
    (program_names::TC_FROM_ENDPOINT, TcAttachType::Ingress),
    (program_names::TC_TO_ENDPOINT, TcAttachType::Egress),
];

/// The hooks the host's uplink gets (masquerade).
const UPLINK_HOOKS: [(&str, TcAttachType); 2] = [
    (program_names::TC_FROM_NETDEV, TcAttachType::Ingress),
    (program_names::TC_TO_NETDEV, TcAttachType::Egress),
];

/// The hook the host's loopback gets (the host's own connections to published ports).
const LOOPBACK_HOOKS: [(&str, TcAttachType); 1] =
    [(program_names::TC_FROM_HOST, TcAttachType::Ingress)];

/// The hook the host's VXLAN device gets (decapsulated overlay traffic).
const OVERLAY_HOOKS: [(&str, TcAttachType); 1] =
    [(program_names::TC_FROM_OVERLAY, TcAttachType::Ingress)];

/// The host's loopback, where every packet the host sends to itself arrives.
pub const LOOPBACK: &str = "lo";

/// One published port as the data plane holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishedEntry {
    pub key: PublishKey,
    pub target: PublishTarget,
    /// Allowed source prefixes; empty: anyone.
    pub allow: Vec<Ipv4Network>,
}

/// Paths of everything pinned under one agent's bpffs directory.
#[derive(Debug, Clone)]
pub struct PinLayout {
    root: PathBuf,
}

impl PinLayout {
    pub fn new(bpffs_dir: &Path) -> Self {
        Self {
            root: bpffs_dir.join(format!("v{PIN_LAYOUT_VERSION}")),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn maps_dir(&self) -> PathBuf {
        self.root.join("maps")
    }

    pub fn links_dir(&self) -> PathBuf {
        self.root.join("links")
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.maps_dir().join(name)
    }

    /// Pin of the link attaching `program` to `host_ifname`.
    pub fn link(&self, host_ifname: &str, program: &str) -> PathBuf {
        let hook = program.trim_start_matches("tc_");
        self.links_dir().join(format!("{host_ifname}-{hook}"))
    }
}

/// What the programs are told at load time (read-only globals and map sizes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadSettings {
    /// The uplink's address, the source of masqueraded traffic; `None` leaves NAT off.
    pub host_ipv4: Option<Ipv4Addr>,
    /// The uplink's ifindex: replies to flows translated there are sent out of it directly.
    pub uplink_ifindex: Option<u32>,
    /// Source ports for masqueraded flows, inclusive.
    pub nat_ports: (u16, u16),
    /// Capacity of the conntrack table (two entries per flow). Applies when the map is
    /// created: a pinned table keeps the size it was made with.
    pub conntrack_entries: u32,
}

impl Default for LoadSettings {
    fn default() -> Self {
        Self {
            host_ipv4: None,
            uplink_ifindex: None,
            nat_ports: (DEFAULT_NAT_PORT_MIN, DEFAULT_NAT_PORT_MAX),
            conntrack_entries: DEFAULT_CONNTRACK_ENTRIES,
        }
    }
}

/// Loads the object and every program into the kernel. With `pins`, maps are pinned there (and
/// existing pins reused); without, the maps are private to the returned `Ebpf` (tests).
pub fn load(pins: Option<&PinLayout>, settings: &LoadSettings) -> Result<Ebpf> {
    let mut loader = EbpfLoader::new();
    let paths: Vec<(&str, PathBuf)> = match pins {
        Some(pins) => map_names::ALL.iter().map(|n| (*n, pins.map(n))).collect(),
        None => Vec::new(),
    };
    for (name, path) in &paths {
        loader.map_pin_path(name, path.as_path());
    }
    // Raw network byte order, as the programs compare it with packet bytes.
    let host = u32::from_ne_bytes(settings.host_ipv4.map_or([0; 4], |ip| ip.octets()));
    let uplink = settings.uplink_ifindex.unwrap_or(0);
    let (port_min, port_max) = settings.nat_ports;
    loader
        .override_global(global_names::HOST_IPV4, &host, true)
        .override_global(global_names::UPLINK_IFINDEX, &uplink, true)
        .override_global(global_names::NAT_PORT_MIN, &port_min, true)
        .override_global(global_names::NAT_PORT_MAX, &port_max, true)
        .map_max_entries(map_names::CONNTRACK, settings.conntrack_entries);
    let mut ebpf = loader.load(EBPF_OBJECT)?;
    for name in program_names::ALL {
        program(&mut ebpf, name)?
            .load()
            .map_err(|source| DatapathError::Program { name, source })?;
    }
    Ok(ebpf)
}

/// A loaded classifier of the object, by name.
pub fn program<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut SchedClassifier> {
    let program = ebpf.program_mut(name).ok_or(DatapathError::Program {
        name,
        source: aya::programs::ProgramError::NotLoaded,
    })?;
    program
        .try_into()
        .map_err(|source| DatapathError::Program { name, source })
}

/// Removes the pins of other map layouts (`v<N>` beside this build's) from the agent's bpffs
/// directory: an agent of another version left them. Their links must go, not only be left
/// unused: each holds that version's programs on an endpoint's or the uplink's hook, where they
/// would go on running in front of or behind this version's, against maps nothing updates any
/// more. Unpinning a link detaches its program. The agent's store rebuilds all of it in this
/// layout; forwarding pauses from here until it has.
pub fn remove_other_layouts(bpffs_dir: &Path) -> Result<()> {
    let io_err = |path: &Path| {
        let path = path.to_owned();
        move |source| DatapathError::Io { path, source }
    };
    let ours = format!("v{PIN_LAYOUT_VERSION}");
    for entry in std::fs::read_dir(bpffs_dir).map_err(io_err(bpffs_dir))? {
        let entry = entry.map_err(io_err(bpffs_dir))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            continue;
        };
        if name == ours || !is_layout_dir_name(name) {
            continue;
        }
        let path = entry.path();
        log::warn!(
            "removing {}: pins of map layout {name}, left by an agent of another version; \
             endpoints and ports are rebuilt from the store in layout {ours}",
            path.display()
        );
        std::fs::remove_dir_all(&path).map_err(io_err(&path))?;
    }
    Ok(())
}

/// `v` and a number: a directory [`PinLayout`] names.
fn is_layout_dir_name(name: &str) -> bool {
    name.strip_prefix('v')
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Makes sure `/sys/fs/bpf` is a bpffs (it is not mounted on every machine) and creates the
/// agent's pin directories.
pub fn prepare_bpffs(pins: &PinLayout) -> Result<()> {
    let sys_fs_bpf = Path::new("/sys/fs/bpf");
    let mounted = nix::sys::statfs::statfs(sys_fs_bpf)
        .map(|fs| fs.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC)
        .unwrap_or(false);
    if !mounted && pins.root().starts_with(sys_fs_bpf) {
        std::fs::create_dir_all(sys_fs_bpf).map_err(|source| DatapathError::Io {
            path: sys_fs_bpf.into(),
            source,
        })?;
        nix::mount::mount(
            Some("bpf"),
            sys_fs_bpf,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|errno| DatapathError::Io {
            path: sys_fs_bpf.into(),
            source: errno.into(),
        })?;
    }
    for dir in [pins.maps_dir(), pins.links_dir()] {
        std::fs::create_dir_all(&dir).map_err(|source| DatapathError::Io { path: dir, source })?;
    }
    // Pinning anywhere else fails deep inside the loader with a bare EPERM; say what is wrong.
    let on_bpffs = nix::sys::statfs::statfs(pins.root())
        .is_ok_and(|fs| fs.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC);
    if !on_bpffs {
        return Err(DatapathError::NotBpffs(pins.root().to_owned()));
    }
    Ok(())
}

/// The agent's handle on the data plane: loaded programs and the pinned maps.
pub struct Datapath {
    ebpf: Ebpf,
    pins: PinLayout,
    maps: Maps,
}

impl Datapath {
    /// Loads the programs, pinning (or reusing) the maps under `bpffs_dir`. What an agent of
    /// another map layout pinned there goes first (see [`remove_other_layouts`]).
    pub fn open(bpffs_dir: &Path, settings: &LoadSettings) -> Result<Self> {
        let pins = PinLayout::new(bpffs_dir);
        prepare_bpffs(&pins)?;
        remove_other_layouts(bpffs_dir)?;
        let mut ebpf = load(Some(&pins), settings)?;
        let maps = Maps::take(&mut ebpf)?;
        Ok(Self { ebpf, pins, maps })
    }

    pub fn pins(&self) -> &PinLayout {
        &self.pins
    }

    /// Attaches the endpoint programs to `host_ifname`, or, when links are already pinned for
    /// it (the agent restarted), swaps this process's programs into them without a gap.
    pub fn attach_endpoint(&mut self, host_ifname: &str) -> Result<()> {
        self.attach(host_ifname, &ENDPOINT_HOOKS)
    }

    /// Detaches the endpoint programs from `host_ifname`. Idempotent.
    pub fn detach_endpoint(&mut self, host_ifname: &str) -> Result<()> {
        self.detach(host_ifname, &ENDPOINT_HOOKS)
    }

    /// Attaches (or swaps in) the masquerade programs on the uplink.
    pub fn attach_uplink(&mut self, ifname: &str) -> Result<()> {
        self.attach(ifname, &UPLINK_HOOKS)
    }

    /// Detaches the masquerade programs from `ifname`. Idempotent.
    pub fn detach_uplink(&mut self, ifname: &str) -> Result<()> {
        self.detach(ifname, &UPLINK_HOOKS)
    }

    /// Attaches (or swaps in) the overlay program on the VXLAN device `ifname`.
    pub fn attach_overlay(&mut self, ifname: &str) -> Result<()> {
        self.attach(ifname, &OVERLAY_HOOKS)
    }

    /// Attaches (or swaps in) the loopback program: the host's own connections to published
    /// ports.
    pub fn attach_loopback(&mut self) -> Result<()> {
        self.attach(LOOPBACK, &LOOPBACK_HOOKS)
    }

    fn attach(&mut self, ifname: &str, hooks: &[(&'static str, TcAttachType)]) -> Result<()> {
        for &(name, attach_type) in hooks {
            let pin = self.pins.link(ifname, name);
            let program = program(&mut self.ebpf, name)?;
            let program_err = |source| DatapathError::Program { name, source };
            let link_err = |message: String| DatapathError::Link {
                path: pin.clone(),
                message,
            };
            let link_id = match PinnedLink::from_pin(&pin) {
                Ok(pinned) => {
                    let link = SchedClassifierLink::try_from(FdLink::from(pinned))
                        .map_err(|e| link_err(e.to_string()))?;
                    program.attach_to_link(link).map_err(program_err)?
                }
                Err(_) if !pin.exists() => program
                    .attach_with_options(
                        ifname,
                        attach_type,
                        TcAttachOptions::TcxOrder(LinkOrder::default()),
                    )
                    .map_err(program_err)?,
                Err(e) => return Err(link_err(e.to_string())),
            };
            let link = program.take_link(link_id).map_err(program_err)?;
            let link = FdLink::try_from(link).map_err(|e| link_err(e.to_string()))?;
            if !pin.exists() {
                link.pin(&pin).map_err(|e| link_err(e.to_string()))?;
            }
            // Dropping our fd leaves the link alive through its pin.
        }
        Ok(())
    }

    /// Detaches by removing the link pins (a link goes with its last reference). Missing pins
    /// are not an error: removal is idempotent.
    fn detach(&mut self, ifname: &str, hooks: &[(&'static str, TcAttachType)]) -> Result<()> {
        for &(name, _) in hooks {
            let pin = self.pins.link(ifname, name);
            match std::fs::remove_file(&pin) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => return Err(DatapathError::Io { path: pin, source }),
            }
        }
        Ok(())
    }

    /// Interfaces with pinned links of the given hooks, from the pin names.
    fn pinned_ifnames(&self, hooks: &[(&'static str, TcAttachType)]) -> Result<Vec<String>> {
        let dir = self.pins.links_dir();
        let entries = std::fs::read_dir(&dir).map_err(|source| DatapathError::Io {
            path: dir.clone(),
            source,
        })?;
        let suffixes: Vec<String> = hooks
            .iter()
            .map(|(name, _)| format!("-{}", name.trim_start_matches("tc_")))
            .collect();
        let mut names: Vec<String> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                suffixes
                    .iter()
                    .find_map(|suffix| name.strip_suffix(suffix.as_str()).map(str::to_owned))
            })
            .collect();
        names.sort();
        names.dedup();
        Ok(names)
    }

    /// Endpoint veths that have pinned links.
    pub fn pinned_link_ifnames(&self) -> Result<Vec<String>> {
        self.pinned_ifnames(&ENDPOINT_HOOKS)
    }

    /// Uplinks that have pinned masquerade links.
    pub fn pinned_uplinks(&self) -> Result<Vec<String>> {
        self.pinned_ifnames(&UPLINK_HOOKS)
    }

    pub fn maps(&mut self) -> &mut Maps {
        &mut self.maps
    }

    pub fn maps_ref(&self) -> &Maps {
        &self.maps
    }
}

/// Typed handles on the maps, from a loaded object or from the pins.
pub struct Maps {
    pub endpoints: HashMap<MapData, EndpointKey, EndpointInfo>,
    pub traffic: PerCpuArray<MapData, TrafficCounters>,
    pub slots: HashMap<MapData, u32, u32>,
    pub drops: PerCpuHashMap<MapData, DropKey, DropCounters>,
    pub conntrack: HashMap<MapData, CtKey, CtEntry>,
    pub nat_stats: PerCpuArray<MapData, u64>,
    pub published: HashMap<MapData, PublishKey, PublishTarget>,
    pub published_allow: LpmTrie<MapData, AllowKey, u8>,
    pub remote_routes: LpmTrie<MapData, RouteKey, RouteInfo>,
    pub overlay: aya::maps::Array<MapData, u32>,
    /// Capacity of CONNTRACK as the map was created (a pinned map keeps its size).
    pub conntrack_capacity: u32,
    /// The slots `ENDPOINT_SLOTS` holds: read from the map when the first slot is handed out,
    /// kept in step after (the agent is the map's only writer). Reading the map for every
    /// allocation would make rebuilding n endpoints after a reboot n² map reads.
    taken_slots: Option<BTreeSet<u32>>,
}

impl Maps {
    /// Takes the maps out of a loaded object.
    pub fn take(ebpf: &mut Ebpf) -> Result<Self> {
        Self::from_source(|name| ebpf.take_map(name).ok_or(DatapathError::MissingMap(name)))
    }

    /// Opens the pinned maps without loading anything: this is how `netctl bpf` reads the data
    /// plane, also while the agent is stopped.
    pub fn open_pinned(bpffs_dir: &Path) -> Result<Self> {
        let pins = PinLayout::new(bpffs_dir);
        if !pins.maps_dir().exists() {
            return Err(DatapathError::NotPinned(pins.maps_dir()));
        }
        Self::from_source(|name| {
            let data = MapData::from_pin(pins.map(name))
                .map_err(|source| DatapathError::Map { name, source })?;
            Map::from_map_data(data).map_err(|source| DatapathError::Map { name, source })
        })
    }

    fn from_source(mut get: impl FnMut(&'static str) -> Result<Map>) -> Result<Self> {
        let mut typed_map = |name: &'static str| -> Result<_> { Ok((name, get(name)?)) };
        let (n, m) = typed_map(map_names::ENDPOINTS)?;
        let endpoints = typed(n, m)?;
        let (n, m) = typed_map(map_names::ENDPOINT_TRAFFIC)?;
        let traffic = typed(n, m)?;
        let (n, m) = typed_map(map_names::ENDPOINT_SLOTS)?;
        let slots = typed(n, m)?;
        let (n, m) = typed_map(map_names::ENDPOINT_DROPS)?;
        let drops = typed(n, m)?;
        let (n, m) = typed_map(map_names::CONNTRACK)?;
        let conntrack_capacity = match &m {
            Map::HashMap(data) => data
                .info()
                .map_err(|source| DatapathError::Map { name: n, source })?
                .max_entries(),
            _ => 0,
        };
        let conntrack = typed(n, m)?;
        let (n, m) = typed_map(map_names::NAT_STATS)?;
        let nat_stats = typed(n, m)?;
        let (n, m) = typed_map(map_names::PUBLISHED)?;
        let published = typed(n, m)?;
        let (n, m) = typed_map(map_names::PUBLISHED_ALLOW)?;
        let published_allow = typed(n, m)?;
        let (n, m) = typed_map(map_names::REMOTE_ROUTES)?;
        let remote_routes = typed(n, m)?;
        let (n, m) = typed_map(map_names::OVERLAY)?;
        let overlay = typed(n, m)?;
        Ok(Self {
            endpoints,
            traffic,
            slots,
            drops,
            conntrack,
            nat_stats,
            published,
            published_allow,
            remote_routes,
            overlay,
            conntrack_capacity,
            taken_slots: None,
        })
    }

    /// Every conntrack entry, read in batches (key by key where the kernel has no batches).
    /// Entries removed while reading are skipped, not errors.
    pub fn conntrack_entries(&self) -> Vec<(CtKey, CtEntry)> {
        match map_batch::lookup_all(self.conntrack.map().fd().as_fd()) {
            Ok(entries) => entries,
            Err(e) => {
                if e.kind() != std::io::ErrorKind::Unsupported {
                    log::warn!(
                        "reading {} in batches: {e}; reading it entry by entry",
                        map_names::CONNTRACK
                    );
                }
                self.conntrack.iter().filter_map(|item| item.ok()).collect()
            }
        }
    }

    /// Removes conntrack entries, in batches; ones already gone are fine.
    pub fn conntrack_remove(&mut self, keys: &[CtKey]) {
        if let Err(e) = map_batch::delete(self.conntrack.map().fd().as_fd(), keys) {
            if e.kind() != std::io::ErrorKind::Unsupported {
                log::warn!(
                    "deleting from {} in batches: {e}; deleting entry by entry",
                    map_names::CONNTRACK
                );
            }
            for key in keys {
                let _ = self.conntrack.remove(key);
            }
        }
    }

    /// Removes every flow of the endpoint address `ip`, its own and those to its published
    /// ports (it is going away; a later endpoint with the same address must not inherit its
    /// flows). Returns how many flows went.
    pub fn conntrack_forget(&mut self, ip: Ipv4Addr) -> usize {
        let ip = ip.octets();
        self.remove_flows(|f| f.original_key.saddr == ip || f.original.new_daddr == ip)
    }

    /// Removes every flow `doomed` picks (its entries, in one batch); returns how many.
    fn remove_flows(&mut self, doomed: impl Fn(&conntrack::Joined) -> bool) -> usize {
        let flows = conntrack::join(&self.conntrack_entries());
        let doomed: Vec<&conntrack::Joined> = flows.iter().filter(|f| doomed(f)).collect();
        let keys: Vec<CtKey> = doomed
            .iter()
            .flat_map(|f| f.entries().map(|(key, _)| key))
            .collect();
        self.conntrack_remove(&keys);
        doomed.len()
    }

    /// Removes every flow that expired by `now_ns` (its entries); returns how many flows went.
    /// Live flows are never touched.
    ///
    /// The data plane may take an expired flow up again between the read and the removal: a
    /// new connection on a closed flow's tuple starts over on its entries, a new flow takes
    /// over a closed flow's port. Removing those entries would cut the new connection off, or
    /// leave its other entry an orphan that sends its replies to another connection. So each
    /// entry goes only if it is still as read; one the data plane changed is put back.
    pub fn conntrack_gc(&mut self, now_ns: u64, timeouts: &conntrack::Timeouts) -> usize {
        let flows = conntrack::join(&self.conntrack_entries());
        let mut removed = 0;
        for flow in flows.iter().filter(|f| f.expired(now_ns, timeouts)) {
            let mut gone = false;
            for (key, read) in flow.entries() {
                gone |= self.conntrack_remove_unchanged(key, read);
            }
            removed += usize::from(gone);
        }
        removed
    }

    /// Removes the conntrack entry at `key` if it is still `read`; true when it did. One the data
    /// plane changed stays, as it is now.
    pub fn conntrack_remove_unchanged(&mut self, key: CtKey, read: CtEntry) -> bool {
        match map_batch::take::<CtKey, CtEntry>(self.conntrack.map().fd().as_fd(), &key) {
            Ok(Some(taken)) if taken == read => true,
            Ok(Some(taken)) => {
                // Taken up meanwhile. Unless the data plane made the key anew in the moment
                // it was gone (then its entry is newer), it goes back.
                let _ = self.conntrack.insert(key, taken, map_batch::BPF_NOEXIST);
                false
            }
            Ok(None) => false,
            Err(e) => {
                if e.kind() != std::io::ErrorKind::Unsupported {
                    log::warn!("removing from {}: {e}", map_names::CONNTRACK);
                }
                // Read, then remove: only the moment between the two is unguarded.
                let unchanged = self.conntrack.get(&key, 0).is_ok_and(|now| now == read);
                unchanged && self.conntrack.remove(&key).is_ok()
            }
        }
    }

    /// NAT event counters by name ([`NAT_EVENT_NAMES`]), summed over CPUs.
    pub fn nat_events(&self) -> Result<Vec<(&'static str, u64)>> {
        Ok(NAT_EVENT_NAMES.into_iter().zip(self.nat_stats()?).collect())
    }

    /// NAT event counters (`nat_stat::*`), summed over CPUs.
    pub fn nat_stats(&self) -> Result<[u64; nat_stat::COUNT as usize]> {
        let mut totals = [0u64; nat_stat::COUNT as usize];
        for (index, total) in totals.iter_mut().enumerate() {
            let per_cpu =
                self.nat_stats
                    .get(&(index as u32), 0)
                    .map_err(|source| DatapathError::Map {
                        name: map_names::NAT_STATS,
                        source,
                    })?;
            *total = per_cpu.iter().sum();
        }
        Ok(totals)
    }

    /// Writes the entry of endpoint address `ip`. Its `slot` is set here, not by the caller:
    /// the counter slot its veth holds already (so the counts go on across an agent restart),
    /// or a free one, zeroed. A veth the address had before (the interface was rebuilt)
    /// gives its slot back.
    pub fn upsert_endpoint(&mut self, ip: Ipv4Addr, mut info: EndpointInfo) -> Result<()> {
        let key = EndpointKey { addr: ip.octets() };
        if let Ok(before) = self.endpoints.get(&key, 0)
            && before.ifindex != info.ifindex
        {
            self.release_slot(before.ifindex)?;
        }
        info.slot = self.slot_of(info.ifindex)?;
        self.endpoints
            .insert(key, info, 0)
            .map_err(|source| DatapathError::Map {
                name: map_names::ENDPOINTS,
                source,
            })
    }

    /// The counter slot of host-side veth `ifindex`: the one it holds, or the lowest free one,
    /// its counters zeroed and recorded in `ENDPOINT_SLOTS` for `tc_to_endpoint`.
    fn slot_of(&mut self, ifindex: u32) -> Result<u32> {
        let slots_err = |source| DatapathError::Map {
            name: map_names::ENDPOINT_SLOTS,
            source,
        };
        match self.slots.get(&ifindex, 0) {
            Ok(slot) => return Ok(slot),
            Err(aya::maps::MapError::KeyNotFound) => {}
            Err(source) => return Err(slots_err(source)),
        }
        if self.taken_slots.is_none() {
            let held = self.held_slots()?;
            self.taken_slots = Some(held.into_iter().map(|(_, slot)| slot).collect());
        }
        let taken = self.taken_slots.get_or_insert_default();
        let slot = lowest_free_slot(taken).ok_or(DatapathError::SlotsFull(MAX_ENDPOINTS))?;
        self.zero_traffic(slot)?;
        self.slots.insert(ifindex, slot, 0).map_err(slots_err)?;
        self.taken_slots.get_or_insert_default().insert(slot);
        Ok(slot)
    }

    /// Every (veth ifindex, slot) pair of `ENDPOINT_SLOTS`.
    fn held_slots(&self) -> Result<Vec<(u32, u32)>> {
        self.slots
            .iter()
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|source| DatapathError::Map {
                name: map_names::ENDPOINT_SLOTS,
                source,
            })
    }

    /// Frees the counter slot of host-side veth `ifindex`, if it holds one.
    fn release_slot(&mut self, ifindex: u32) -> Result<()> {
        if let Ok(slot) = self.slots.get(&ifindex, 0) {
            self.zero_traffic(slot)?;
            let _ = self.slots.remove(&ifindex);
            if let Some(taken) = &mut self.taken_slots {
                taken.remove(&slot);
            }
        }
        Ok(())
    }

    fn zero_traffic(&mut self, slot: u32) -> Result<()> {
        let err = |source| DatapathError::Map {
            name: map_names::ENDPOINT_TRAFFIC,
            source,
        };
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| err(aya::maps::MapError::IoError(e)))?;
        let zeros = PerCpuValues::try_from(vec![TrafficCounters::default(); cpus])
            .map_err(|e| err(aya::maps::MapError::IoError(e)))?;
        self.traffic.set(slot, zeros, 0).map_err(err)
    }

    /// Frees the counter slots whose veth no `ENDPOINTS` entry names: left by an agent that
    /// stopped between the two writes, or by a map entry removed as an orphan.
    pub fn release_orphaned_slots(&mut self) -> Result<()> {
        // Errors stop it rather than skip an entry: a veth missed here would lose its counts.
        let named = self
            .endpoints
            .iter()
            .map(|item| item.map(|(_, info)| info.ifindex))
            .collect::<std::result::Result<BTreeSet<u32>, _>>()
            .map_err(|source| DatapathError::Map {
                name: map_names::ENDPOINTS,
                source,
            })?;
        let orphans: Vec<u32> = self
            .held_slots()?
            .into_iter()
            .map(|(ifindex, _)| ifindex)
            .filter(|ifindex| !named.contains(ifindex))
            .collect();
        for ifindex in orphans {
            self.release_slot(ifindex)?;
        }
        Ok(())
    }

    /// Sets or clears `flag` on the entry of endpoint address `ip`, if it has one.
    pub fn set_endpoint_flag(&mut self, ip: Ipv4Addr, flag: u32, on: bool) -> Result<()> {
        let key = EndpointKey { addr: ip.octets() };
        let Ok(mut info) = self.endpoints.get(&key, 0) else {
            return Ok(());
        };
        if on {
            info.flags |= flag;
        } else {
            info.flags &= !flag;
        }
        self.upsert_endpoint(ip, info)
    }

    /// Removes the endpoint's entry and its counters. Absent entries are fine.
    pub fn remove_endpoint(&mut self, ip: Ipv4Addr, ifindex: u32) -> Result<()> {
        let _ = self.endpoints.remove(&EndpointKey { addr: ip.octets() });
        self.release_slot(ifindex)?;
        let stale: Vec<DropKey> = self
            .drops
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| k.ifindex == ifindex)
            .collect();
        for key in stale {
            let _ = self.drops.remove(&key);
        }
        Ok(())
    }

    /// Installs a published port: its allow list first, so the port never opens wider than
    /// asked, then the port.
    pub fn publish(&mut self, entry: &PublishedEntry) -> Result<()> {
        let allow_err = |source| DatapathError::Map {
            name: map_names::PUBLISHED_ALLOW,
            source,
        };
        for net in &entry.allow {
            self.published_allow
                .insert(&allow_key(entry.target.id, *net), 1, 0)
                .map_err(allow_err)?;
        }
        let mut target = entry.target;
        if entry.allow.is_empty() {
            target.flags &= !PUBLISH_F_ALLOW_LIST;
        } else {
            target.flags |= PUBLISH_F_ALLOW_LIST;
        }
        self.published
            .insert(entry.key, target, 0)
            .map_err(|source| DatapathError::Map {
                name: map_names::PUBLISHED,
                source,
            })
    }

    /// Removes a published port, then its allow list. Absent entries are fine.
    pub fn unpublish(&mut self, entry: &PublishedEntry) {
        let _ = self.published.remove(&entry.key);
        for net in &entry.allow {
            let _ = self
                .published_allow
                .remove(&allow_key(entry.target.id, *net));
        }
    }

    /// Every published port in the data plane, with its allow list, sorted by port.
    pub fn list_published(&self) -> Result<Vec<PublishedEntry>> {
        let map_err = |name| move |source| DatapathError::Map { name, source };
        let mut allow: BTreeMap<u32, Vec<Ipv4Network>> = BTreeMap::new();
        for item in self.published_allow.iter() {
            let (key, _) = item.map_err(map_err(map_names::PUBLISHED_ALLOW))?;
            let data = key.data();
            let prefix = key.prefix_len().saturating_sub(32).min(32) as u8;
            if let Ok(net) = Ipv4Network::new(Ipv4Addr::from(data.addr), prefix) {
                allow
                    .entry(u32::from_be_bytes(data.id))
                    .or_default()
                    .push(net);
            }
        }
        let mut entries = Vec::new();
        for item in self.published.iter() {
            let (key, target) = item.map_err(map_err(map_names::PUBLISHED))?;
            entries.push(PublishedEntry {
                key,
                target,
                allow: allow.get(&target.id).cloned().unwrap_or_default(),
            });
        }
        entries.sort_by_key(|e| (u16::from_be_bytes(e.key.port), e.key.proto, e.key.addr));
        Ok(entries)
    }

    /// Removes every allow-list prefix whose port is gone (left by an interrupted removal).
    pub fn remove_orphaned_allow(&mut self, live_ids: &[u32]) {
        let stale: Vec<LpmKey<AllowKey>> = self
            .published_allow
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| !live_ids.contains(&u32::from_be_bytes(k.data().id)))
            .collect();
        for key in stale {
            let _ = self.published_allow.remove(&key);
        }
    }

    /// Tells the data plane where encapsulated packets go.
    pub fn set_vxlan_ifindex(&mut self, ifindex: u32) -> Result<()> {
        self.overlay
            .set(overlay_slot::VXLAN_IFINDEX, ifindex, 0)
            .map_err(|source| DatapathError::Map {
                name: map_names::OVERLAY,
                source,
            })
    }

    /// Makes REMOTE_ROUTES hold exactly `wanted`: updated in place first (so a route never
    /// disappears while it changes), then what is no longer wanted goes.
    pub fn sync_routes(&mut self, wanted: &[(Ipv4Network, RouteInfo)]) -> Result<()> {
        let map_err = |source| DatapathError::Map {
            name: map_names::REMOTE_ROUTES,
            source,
        };
        for (net, info) in wanted {
            self.remote_routes
                .insert(&route_key(*net), *info, 0)
                .map_err(map_err)?;
        }
        let present = self.list_routes()?;
        for (net, _) in present {
            if !wanted.iter().any(|(w, _)| *w == net) {
                let _ = self.remote_routes.remove(&route_key(net));
            }
        }
        Ok(())
    }

    /// Every entry of REMOTE_ROUTES, decoded, sorted by subnet.
    pub fn list_routes(&self) -> Result<Vec<(Ipv4Network, RouteInfo)>> {
        let mut routes = Vec::new();
        for item in self.remote_routes.iter() {
            let (key, info) = item.map_err(|source| DatapathError::Map {
                name: map_names::REMOTE_ROUTES,
                source,
            })?;
            let prefix = key.prefix_len().min(32) as u8;
            if let Ok(net) = Ipv4Network::new(Ipv4Addr::from(key.data().addr), prefix) {
                routes.push((net, info));
            }
        }
        routes.sort_by_key(|(net, _)| (net.network(), net.prefix()));
        Ok(routes)
    }

    /// Every entry of ENDPOINTS, decoded, sorted by address.
    pub fn list_endpoints(&self) -> Result<Vec<BpfEndpointEntry>> {
        let mut entries = Vec::new();
        for item in self.endpoints.iter() {
            let (key, info) = item.map_err(|source| DatapathError::Map {
                name: map_names::ENDPOINTS,
                source,
            })?;
            entries.push(BpfEndpointEntry {
                ip: Ipv4Addr::from(key.addr),
                ifindex: info.ifindex,
                network_id: info.network_id,
                gateway: Ipv4Addr::from(info.gateway),
                mac: format_mac(info.mac),
                host_mac: format_mac(info.host_mac),
                slot: info.slot,
                flags: endpoint_flag_names(info.flags),
            });
        }
        entries.sort_by_key(|e| e.ip);
        Ok(entries)
    }

    /// The traffic counters of slot `slot`, summed over CPUs.
    fn traffic_of_slot(&self, slot: u32) -> Result<TrafficCounters> {
        let per_cpu = self
            .traffic
            .get(&slot, 0)
            .map_err(|source| DatapathError::Map {
                name: map_names::ENDPOINT_TRAFFIC,
                source,
            })?;
        let mut sum = TrafficCounters::default();
        for c in per_cpu.iter() {
            sum.from_endpoint_packets += c.from_endpoint_packets;
            sum.from_endpoint_bytes += c.from_endpoint_bytes;
            sum.to_endpoint_packets += c.to_endpoint_packets;
            sum.to_endpoint_bytes += c.to_endpoint_bytes;
        }
        Ok(sum)
    }

    /// The traffic of every veth that holds a counter slot, summed over CPUs, by ifindex.
    pub fn traffic_by_veth(&self) -> Result<BTreeMap<u32, TrafficCounters>> {
        Ok(self
            .traffic_by_slot()?
            .into_iter()
            .map(|(ifindex, _, traffic)| (ifindex, traffic))
            .collect())
    }

    /// The traffic of every veth that holds a counter slot: (ifindex, slot, counters), by
    /// ifindex.
    pub fn traffic_by_slot(&self) -> Result<Vec<(u32, u32, TrafficCounters)>> {
        let mut held = self.held_slots()?;
        held.sort_unstable();
        held.into_iter()
            .map(|(ifindex, slot)| Ok((ifindex, slot, self.traffic_of_slot(slot)?)))
            .collect()
    }

    /// Every drop counted, summed over CPUs, by the interface that dropped, then reason.
    pub fn drops_by_ifindex(&self) -> Result<BTreeMap<u32, Vec<DropCount>>> {
        let mut sums: BTreeMap<(u32, u32), Counter> = BTreeMap::new();
        for item in self.drops.iter() {
            let (key, per_cpu) = item.map_err(|source| DatapathError::Map {
                name: map_names::ENDPOINT_DROPS,
                source,
            })?;
            let total = sums.entry((key.ifindex, key.reason)).or_default();
            for c in per_cpu.iter() {
                total.packets += c.packets;
                total.bytes += c.bytes;
            }
        }
        let mut by_ifindex: BTreeMap<u32, Vec<DropCount>> = BTreeMap::new();
        for ((ifindex, code), c) in sums {
            by_ifindex.entry(ifindex).or_default().push(DropCount {
                reason: drop_reason_name(code),
                code,
                packets: c.packets,
                bytes: c.bytes,
            });
        }
        Ok(by_ifindex)
    }

    /// The VXLAN device's ifindex as the programs see it; 0 before an overlay network.
    pub fn vxlan_ifindex(&self) -> Result<u32> {
        self.overlay
            .get(&overlay_slot::VXLAN_IFINDEX, 0)
            .map_err(|source| DatapathError::Map {
                name: map_names::OVERLAY,
                source,
            })
    }

    /// Traffic through the endpoint veth `ifindex`, summed over CPUs: (from, to, drops).
    pub fn endpoint_counters(&self, ifindex: u32) -> Result<(Counter, Counter, Vec<DropCount>)> {
        let slot = match self.slots.get(&ifindex, 0) {
            Ok(slot) => Some(slot),
            Err(aya::maps::MapError::KeyNotFound) => None,
            Err(source) => {
                return Err(DatapathError::Map {
                    name: map_names::ENDPOINT_SLOTS,
                    source,
                });
            }
        };
        let traffic = match slot {
            Some(slot) => self.traffic_of_slot(slot)?,
            None => TrafficCounters::default(),
        };
        let from = Counter {
            packets: traffic.from_endpoint_packets,
            bytes: traffic.from_endpoint_bytes,
        };
        let to = Counter {
            packets: traffic.to_endpoint_packets,
            bytes: traffic.to_endpoint_bytes,
        };
        let drops = self
            .drops_by_ifindex()?
            .remove(&ifindex)
            .unwrap_or_default();
        Ok((from, to, drops))
    }
}

/// The names of the `ENDPOINT_F_*` bits set in `flags`; bits this build does not know stay
/// visible.
pub fn endpoint_flag_names(flags: u32) -> Vec<String> {
    const NAMES: [(u32, &str); 5] = [
        (net_ebpf_common::ENDPOINT_F_MASQUERADE, "masquerade"),
        (net_ebpf_common::ENDPOINT_F_PUBLISHED, "published"),
        (net_ebpf_common::ENDPOINT_F_OVERLAY, "overlay"),
        (net_ebpf_common::ENDPOINT_F_NO_ICC, "no-icc"),
        (net_ebpf_common::ENDPOINT_F_INTERNAL, "internal"),
    ];
    let known = NAMES.iter().fold(0, |all, (bit, _)| all | bit);
    let mut names: Vec<String> = NAMES
        .iter()
        .filter(|(bit, _)| flags & bit != 0)
        .map(|(_, name)| (*name).to_owned())
        .collect();
    if flags & !known != 0 {
        names.push(format!("unknown-{:#x}", flags & !known));
    }
    names
}

/// The names of the NAT event counters, by `nat_stat` index: as `netctl status` names them.
pub const NAT_EVENT_NAMES: [&str; nat_stat::COUNT as usize] = {
    let mut names = [""; nat_stat::COUNT as usize];
    names[nat_stat::FLOWS_CREATED as usize] = "flows_created";
    names[nat_stat::PORT_RETRIES as usize] = "port_retries";
    names[nat_stat::PORTS_EXHAUSTED as usize] = "ports_exhausted";
    names[nat_stat::TABLE_FULL as usize] = "table_full";
    names[nat_stat::PUBLISHED_FLOWS as usize] = "published_flows";
    names[nat_stat::CLOSED_REUSED as usize] = "closed_reused";
    names
};

/// The stable name of a drop reason code; codes this build does not know stay visible.
pub fn drop_reason_name(code: u32) -> String {
    match DropReason::from_u32(code) {
        Some(reason) => reason.name().to_owned(),
        None => format!("unknown-{code}"),
    }
}

fn route_key(net: Ipv4Network) -> LpmKey<RouteKey> {
    LpmKey::new(
        u32::from(net.prefix()),
        RouteKey {
            addr: net.network().octets(),
        },
    )
}

/// The `PUBLISHED_ALLOW` key of one allowed prefix of port `id`.
fn allow_key(id: u32, net: Ipv4Network) -> LpmKey<AllowKey> {
    LpmKey::new(
        32 + u32::from(net.prefix()),
        AllowKey {
            id: id.to_be_bytes(),
            addr: net.network().octets(),
        },
    )
}

/// The lowest counter slot not in `taken`, if one below `MAX_ENDPOINTS` is free.
fn lowest_free_slot(taken: &BTreeSet<u32>) -> Option<u32> {
    (0..MAX_ENDPOINTS).find(|slot| !taken.contains(slot))
}

fn typed<T>(name: &'static str, map: Map) -> Result<T>
where
    T: TryFrom<Map, Error = aya::maps::MapError>,
{
    T::try_from(map).map_err(|source| DatapathError::Map { name, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_flags_are_named_and_unknown_bits_stay_visible() {
        assert!(endpoint_flag_names(0).is_empty());
        assert_eq!(
            endpoint_flag_names(
                net_ebpf_common::ENDPOINT_F_MASQUERADE | net_ebpf_common::ENDPOINT_F_NO_ICC | 0x100
            ),
            ["masquerade", "no-icc", "unknown-0x100"]
        );
    }

    #[test]
    fn layout_directories_are_v_and_a_number() {
        assert!(is_layout_dir_name("v4"));
        assert!(is_layout_dir_name("v12"));
        for other in ["v", "vx", "v4x", "maps", "4", ""] {
            assert!(!is_layout_dir_name(other), "{other}");
        }
    }

    #[test]
    fn the_lowest_free_counter_slot_is_handed_out() {
        assert_eq!(lowest_free_slot(&BTreeSet::new()), Some(0));
        assert_eq!(lowest_free_slot(&BTreeSet::from([0, 1, 3])), Some(2));
        assert_eq!(lowest_free_slot(&BTreeSet::from([1, 2])), Some(0));
        let all: BTreeSet<u32> = (0..MAX_ENDPOINTS).collect();
        assert_eq!(lowest_free_slot(&all), None);
    }
}
