//! The API client `netctl` uses: one request, one reply, over the agent's socket.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream,
    path::Path,
};

use anyhow::{Context as _, anyhow};
use serde::de::DeserializeOwned;

use crate::api::{Reply, Request};

pub fn call<T: DeserializeOwned>(socket: &Path, request: &Request) -> anyhow::Result<T> {
    let mut stream = UnixStream::connect(socket).with_context(|| {
        format!(
            "cannot reach net-agent at {} (is it running, and are you root?)",
            socket.display()
        )
    })?;
    // A stuck agent must not hang scripts forever; real requests take well under a second.
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(60)))
        .context("setting the API timeout")?;
    let mut line = serde_json::to_vec(request)?;
    line.push(b'\n');
    stream
        .write_all(&line)
        .with_context(|| format!("sending to {}", socket.display()))?;
    let mut reply = String::new();
    BufReader::new(&stream)
        .read_line(&mut reply)
        .with_context(|| format!("reading the reply from {}", socket.display()))?;
    if reply.is_empty() {
        return Err(anyhow!("net-agent closed the connection without replying"));
    }
    let reply: Reply = serde_json::from_str(&reply).context("decoding the agent's reply")?;
    match reply.error {
        Some(error) => Err(anyhow!(error)),
        // A request with nothing to return (a removal) answers `"ok": null`.
        None => serde_json::from_value(reply.ok.unwrap_or(serde_json::Value::Null))
            .context("decoding the agent's reply"),
    }
}
