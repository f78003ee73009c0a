//! Named network namespaces (`/run/netns/<name>`, the iproute2 convention, so `ip netns exec`
//! works on them) and running code inside a namespace.
//!
//! A namespace is entered by a fresh OS thread that `setns`es itself: the switch is per thread,
//! so the agent's own threads (and tokio's pool) never leave the agent's namespace. Netlink
//! sockets and other sockets opened on such a thread stay bound to that namespace.

use std::{
    fs::{File, OpenOptions},
    io,
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use nix::{
    mount::{MntFlags, MsFlags, mount, umount2},
    sched::{CloneFlags, setns, unshare},
};

/// Where iproute2 keeps named namespaces.
pub const NETNS_RUN_DIR: &str = "/run/netns";

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("network namespace {0} already exists")]
    Exists(PathBuf),
    #[error("network namespace {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("thread inside network namespace {0} panicked")]
    Panicked(PathBuf),
}

fn io_err(path: &Path) -> impl FnOnce(nix::Error) -> NetnsError + '_ {
    move |errno| NetnsError::Io {
        path: path.to_owned(),
        source: errno.into(),
    }
}

pub fn path_of(name: &str) -> PathBuf {
    Path::new(NETNS_RUN_DIR).join(name)
}

/// Makes `/run/netns` a shared mount point, as `ip netns add` does, so namespaces mounted later
/// also appear in mount namespaces copied earlier (`ip netns exec` makes one per command).
fn prepare_run_dir() -> Result<(), NetnsError> {
    let dir = Path::new(NETNS_RUN_DIR);
    std::fs::create_dir_all(dir).map_err(|source| NetnsError::Io {
        path: dir.into(),
        source,
    })?;
    let shared = MsFlags::MS_SHARED | MsFlags::MS_REC;
    if mount(None::<&str>, dir, None::<&str>, shared, None::<&str>).is_ok() {
        return Ok(());
    }
    // Not a mount point yet: bind it onto itself, then share it.
    mount(
        Some(dir),
        dir,
        Some("none"),
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(io_err(dir))?;
    mount(None::<&str>, dir, None::<&str>, shared, None::<&str>).map_err(io_err(dir))
}

/// Creates the named namespace `/run/netns/<name>`; fails if it exists.
pub fn create(name: &str) -> Result<PathBuf, NetnsError> {
    prepare_run_dir()?;
    let path = path_of(name);
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|source| match source.kind() {
            io::ErrorKind::AlreadyExists => NetnsError::Exists(path.clone()),
            _ => NetnsError::Io {
                path: path.clone(),
                source,
            },
        })?;
    let target = path.clone();
    let made = std::thread::spawn(move || -> Result<(), NetnsError> {
        unshare(CloneFlags::CLONE_NEWNET).map_err(io_err(&target))?;
        mount(
            Some("/proc/thread-self/ns/net"),
            &target,
            Some("none"),
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(io_err(&target))
    })
    .join()
    .map_err(|_| NetnsError::Panicked(path.clone()))?;
    if let Err(e) = made {
        let _ = std::fs::remove_file(&path);
        return Err(e);
    }
    Ok(path)
}

/// Deletes a named namespace made by [`create`]. The namespace itself goes when its last user
/// (process or mount) goes. A missing namespace is not an error.
pub fn delete(path: &Path) -> Result<(), NetnsError> {
    if !path.exists() {
        return Ok(());
    }
    // EINVAL: not mounted (a half-made namespace); the file is removed all the same.
    match umount2(path, MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::Error::EINVAL) | Err(nix::Error::ENOENT) => {}
        Err(e) => return Err(io_err(path)(e)),
    }
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(NetnsError::Io {
            path: path.into(),
            source,
        }),
    }
}

/// Opens a namespace file, checking that it is one.
pub fn open(path: &Path) -> Result<File, NetnsError> {
    let file = File::open(path).map_err(|source| NetnsError::Io {
        path: path.into(),
        source,
    })?;
    // setns with a zero nstype would accept any namespace; ask the kernel what this is.
    let fs = nix::sys::statfs::fstatfs(&file).map_err(io_err(path))?;
    // nsfs for bind-mounted namespaces, procfs for /proc/PID/ns/net.
    let magic = fs.filesystem_type();
    if magic != nix::sys::statfs::NSFS_MAGIC && magic != nix::sys::statfs::PROC_SUPER_MAGIC {
        return Err(NetnsError::Io {
            path: path.into(),
            source: io::Error::new(io::ErrorKind::InvalidInput, "not a network namespace"),
        });
    }
    Ok(file)
}

/// Runs `f` on a fresh thread inside the network namespace at `path`, and returns its result.
/// Blocks the calling thread until `f` is done: call from `spawn_blocking` in async code.
pub fn run_in<T, F>(path: &Path, f: F) -> Result<T, NetnsError>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let ns = open(path)?;
    let owned = path.to_owned();
    std::thread::spawn(move || -> Result<T, NetnsError> {
        setns(ns.as_fd(), CloneFlags::CLONE_NEWNET).map_err(io_err(&owned))?;
        Ok(f())
    })
    .join()
    .map_err(|_| NetnsError::Panicked(path.to_owned()))?
}
