//! `net_agent::map_batch` against the kernel: a hash map of 30,000 entries read back whole in
//! batches, as a key-by-key walk reads it; a batch delete that meets keys already gone skips
//! them and deletes the rest; a removal returns what it removed.

use std::{collections::HashMap as StdHashMap, os::fd::AsFd as _};

use aya::maps::{HashMap, IterableMap as _, MapData};
use net_agent::map_batch;

const ENTRIES: u32 = 30_000;

fn filled() -> HashMap<MapData, u32, u64> {
    let mut map: HashMap<MapData, u32, u64> =
        HashMap::create(2 * ENTRIES, 0).expect("creating a hash map (needs root)");
    for k in 0..ENTRIES {
        map.insert(k, u64::from(k) * 3 + 1, 0)
            .unwrap_or_else(|e| panic!("inserting {k}: {e}"));
    }
    map
}

fn walked(map: &HashMap<MapData, u32, u64>) -> StdHashMap<u32, u64> {
    map.iter()
        .map(|item| item.expect("walking the map"))
        .collect()
}

#[test]
fn batches_read_what_a_walk_reads() {
    let map = filled();
    let batched: Vec<(u32, u64)> =
        map_batch::lookup_all(map.map().fd().as_fd()).expect("batch lookups on this kernel");
    assert_eq!(batched.len(), ENTRIES as usize, "no entry twice or missing");
    let batched: StdHashMap<u32, u64> = batched.into_iter().collect();
    assert_eq!(batched, walked(&map));

    let empty: HashMap<MapData, u32, u64> = HashMap::create(16, 0).expect("creating a hash map");
    let none: Vec<(u32, u64)> = map_batch::lookup_all(empty.map().fd().as_fd()).expect("empty");
    assert!(none.is_empty());
}

#[test]
fn batch_deletes_skip_keys_already_gone() {
    let map = filled();
    // Every even key, with keys that were never there among them and at the end.
    let mut doomed: Vec<u32> = (0..ENTRIES).filter(|k| k % 2 == 0).collect();
    doomed.insert(100, ENTRIES + 5);
    doomed.insert(5_000, ENTRIES + 6);
    doomed.push(ENTRIES + 7);
    let deleted = map_batch::delete(map.map().fd().as_fd(), &doomed).expect("batch deletes");
    assert_eq!(deleted, ENTRIES as usize / 2);
    let left = walked(&map);
    assert_eq!(left.len(), ENTRIES as usize / 2);
    assert!(
        left.iter()
            .all(|(k, v)| k % 2 == 1 && *v == u64::from(*k) * 3 + 1),
        "an odd key went or a value changed"
    );
}

#[test]
fn a_take_returns_what_it_removed() {
    let map = filled();
    let fd = map.map().fd().as_fd();
    assert_eq!(map_batch::take::<u32, u64>(fd, &7).expect("take"), Some(22));
    assert_eq!(map_batch::take::<u32, u64>(fd, &7).expect("take"), None);
    assert_eq!(
        map_batch::take::<u32, u64>(fd, &ENTRIES).expect("take"),
        None
    );
    let left = walked(&map);
    assert_eq!(left.len(), ENTRIES as usize - 1);
    assert!(!left.contains_key(&7));
}
