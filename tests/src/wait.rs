//! Waiting on conditions with deadlines. Tests never sleep for correctness: they poll a condition
//! and fail naming what they waited for.

use std::{
    fmt::Display,
    thread,
    time::{Duration, Instant},
};

/// Default deadline for anything the harness waits on (agent start, a flow to make progress, ...).
/// Generous because the suite runs on a loaded two-core machine; conditions usually hold within
/// milliseconds and the wait returns as soon as they do.
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// How often conditions are polled.
pub const POLL: Duration = Duration::from_millis(20);

/// Polls `cond` until it returns true; panics naming `what` after `timeout`.
pub fn wait_until(timeout: Duration, what: impl Display, mut cond: impl FnMut() -> bool) {
    wait_for(timeout, what, || cond().then_some(()))
}

/// Polls `probe` until it returns `Some`; panics naming `what` after `timeout`.
pub fn wait_for<T>(
    timeout: Duration,
    what: impl Display,
    mut probe: impl FnMut() -> Option<T>,
) -> T {
    let start = Instant::now();
    loop {
        if let Some(value) = probe() {
            return value;
        }
        if start.elapsed() >= timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        thread::sleep(POLL);
    }
}

/// Runs a socket call again for as long as it fails with EINTR.
///
/// On Linux a socket call with a timeout (SO_RCVTIMEO, SO_SNDTIMEO) fails with EINTR when the
/// process is stopped and continued (SIGSTOP, SIGCONT), even with no signal handler installed
/// (signal(7)), and a CI runner may do exactly that. std retries only inside `read_exact` and
/// `write_all`; every plain `read`, `recv` and `accept` of the harness goes through here.
pub fn restarting<T>(mut call: impl FnMut() -> std::io::Result<T>) -> std::io::Result<T> {
    loop {
        match call() {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}
