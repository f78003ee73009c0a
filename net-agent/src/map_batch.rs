//! Batched reads and deletes of BPF hash maps (`BPF_MAP_LOOKUP_BATCH`, `BPF_MAP_DELETE_BATCH`,
//! Linux 5.6), which aya does not wrap. Walking a map key by key costs two system calls per
//! entry (next key, then its value); the conntrack collector walks the whole table every few
//! seconds, so on a busy host that is hundreds of thousands of calls a pass. A batch moves
//! thousands of entries per call.
//!
//! Also `BPF_MAP_LOOKUP_AND_DELETE_ELEM` ([`take`]), which aya does not wrap for hash maps
//! either: a removal that returns what it removed, so that the collector can tell an entry it
//! judged from one the data plane has taken up since.

use std::{
    io,
    mem::size_of,
    os::fd::{AsRawFd as _, BorrowedFd},
};

use aya::Pod;

const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;
/// Update flag: only if the key is not there yet.
pub const BPF_NOEXIST: u64 = 1;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

/// Entries asked for per call.
const CHUNK: usize = 4096;

/// The kernel's own "operation not supported" (`ENOTSUPP`, not `EOPNOTSUPP`), which reaches
/// user space from the BPF system call.
const ENOTSUPP: i32 = 524;

/// The `batch` member of the kernel's `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// The element-operation members of the kernel's `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// One `bpf(2)` call. `Attr` is `BatchAttr` or `ElemAttr`.
fn bpf<Attr>(cmd: libc::c_long, attr: &mut Attr) -> io::Result<()> {
    // SAFETY: `attr` is a valid, fully initialised `bpf_attr` prefix of the size passed; the
    // pointers in it point into buffers the caller keeps alive and sized for what `cmd` reads
    // or writes (`count` entries for a batch, one key and value for an element).
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut Attr,
            size_of::<Attr>() as libc::c_uint,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Every entry of the hash map `fd` whose keys are `K` and values `V`, `CHUNK` per call.
/// Entries added or removed meanwhile may or may not be seen, as with a key-by-key walk.
/// `Unsupported` (no batch operations in this kernel, or not for this map type): the caller
/// falls back to walking the map.
pub fn lookup_all<K: Pod, V: Pod>(fd: BorrowedFd<'_>) -> io::Result<Vec<(K, V)>> {
    let mut out = Vec::new();
    let mut chunk = CHUNK;
    let mut keys: Vec<u8> = Vec::new();
    let mut values: Vec<u8> = Vec::new();
    // Hash maps use a bucket index as the position; 8 bytes leave room for any map's.
    let (mut position, mut next) = ([0u8; 8], [0u8; 8]);
    let mut started = false;
    loop {
        keys.resize(chunk * size_of::<K>(), 0);
        values.resize(chunk * size_of::<V>(), 0);
        let mut attr = BatchAttr {
            in_batch: if started { position.as_ptr() as u64 } else { 0 },
            out_batch: next.as_mut_ptr() as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: chunk as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        let result = bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
        let done = match result {
            Ok(()) => false,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => true,
            // One bucket holds more entries than asked for: ask for more, from the same place.
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => {
                chunk *= 2;
                continue;
            }
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | ENOTSUPP)) => {
                return Err(io::Error::new(io::ErrorKind::Unsupported, e));
            }
            Err(e) => return Err(e),
        };
        let filled = (attr.count as usize).min(chunk);
        for i in 0..filled {
            // SAFETY: the kernel filled `filled` keys and values, each of the map's key and
            // value size, which are `K`'s and `V`'s; `Pod` types are valid for any bytes.
            let entry = unsafe {
                (
                    std::ptr::read_unaligned(keys.as_ptr().add(i * size_of::<K>()).cast::<K>()),
                    std::ptr::read_unaligned(values.as_ptr().add(i * size_of::<V>()).cast::<V>()),
                )
            };
            out.push(entry);
        }
        if done {
            return Ok(out);
        }
        position = next;
        started = true;
    }
}

/// Deletes `keys` from the hash map `fd`, `CHUNK` per call; keys already gone are skipped.
/// Returns how many were deleted.
pub fn delete<K: Pod>(fd: BorrowedFd<'_>, keys: &[K]) -> io::Result<usize> {
    let mut deleted = 0;
    let mut rest = keys;
    while !rest.is_empty() {
        let n = rest.len().min(CHUNK);
        let mut attr = BatchAttr {
            keys: rest.as_ptr() as u64,
            count: n as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        match bpf(BPF_MAP_DELETE_BATCH, &mut attr) {
            Ok(()) => {
                deleted += n;
                rest = &rest[n..];
            }
            // Stopped at a key that is not there: the ones before it went; skip it.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                let done = (attr.count as usize).min(n);
                deleted += done;
                rest = &rest[(done + 1).min(rest.len())..];
            }
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | ENOTSUPP)) => {
                return Err(io::Error::new(io::ErrorKind::Unsupported, e));
            }
            Err(e) => return Err(e),
        }
    }
    Ok(deleted)
}

/// Removes `key` from the hash map `fd` and returns the value it held, in one step (hash maps:
/// Linux 5.14), so nothing can change the entry between the read and the removal. `Ok(None)`:
/// no such key. `Unsupported`: this kernel cannot; the caller reads, then deletes.
pub fn take<K: Pod, V: Pod>(fd: BorrowedFd<'_>, key: &K) -> io::Result<Option<V>> {
    let mut value = std::mem::MaybeUninit::<V>::zeroed();
    let mut attr = ElemAttr {
        map_fd: fd.as_raw_fd() as u32,
        key: std::ptr::from_ref(key) as u64,
        value: value.as_mut_ptr() as u64,
        ..ElemAttr::default()
    };
    match bpf(BPF_MAP_LOOKUP_AND_DELETE_ELEM, &mut attr) {
        // SAFETY: the kernel wrote the map's value size, `V`'s; `Pod` types are valid for any
        // bytes (and zeroed ones before that).
        Ok(()) => Ok(Some(unsafe { value.assume_init() })),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | ENOTSUPP)) => {
            Err(io::Error::new(io::ErrorKind::Unsupported, e))
        }
        Err(e) => Err(e),
    }
}
