//! The API server: a Unix socket only root can use (mode 0600, and the peer's uid checked), one
//! JSON request line in, one JSON reply line out. Requests are handled one at a time, so every
//! change sees the state the previous one left.

use std::{os::unix::fs::PermissionsExt as _, path::Path, sync::Arc};

use log::{debug, warn};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    sync::Mutex,
};

use crate::{
    agent::{Agent, AgentError, BridgeOptions, EndpointSpec},
    api::{Reply, Request},
};

/// Binds the socket, replacing a stale one left by a crashed agent, and refusing to start
/// when another agent is answering on it.
pub async fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    use anyhow::Context as _;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            anyhow::bail!(
                "another agent is listening on {}; stop it or choose another --socket",
                path.display()
            );
        }
        std::fs::remove_file(path).with_context(|| format!("removing stale {}", path.display()))?;
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting {} to root", path.display()))?;
    Ok(listener)
}

pub async fn serve(listener: UnixListener, agent: Arc<Mutex<Agent>>) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                warn!("accepting an API connection: {e}");
                // EMFILE and the like do not clear by retrying at once.
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let agent = agent.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(stream, agent).await {
                debug!("API connection: {e}");
            }
        });
    }
}

async fn handle(stream: UnixStream, agent: Arc<Mutex<Agent>>) -> std::io::Result<()> {
    let uid = stream.peer_cred()?.uid();
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    while let Some(line) = lines.next_line().await? {
        let reply = if uid != 0 {
            error_reply(format!(
                "permission denied: the agent API is for root only (uid {uid})"
            ))
        } else {
            match serde_json::from_str::<Request>(&line) {
                Ok(request) => dispatch(&mut *agent.lock().await, request).await,
                Err(e) => error_reply(format!("malformed request: {e}")),
            }
        };
        let mut out = serde_json::to_vec(&reply).expect("replies always serialize");
        out.push(b'\n');
        write.write_all(&out).await?;
    }
    Ok(())
}

fn error_reply(message: String) -> Reply {
    Reply {
        ok: None,
        error: Some(message),
    }
}

fn ok_reply<T: serde::Serialize>(value: Result<T, AgentError>) -> Reply {
    match value {
        Ok(value) => Reply {
            ok: Some(serde_json::to_value(value).expect("API types always serialize")),
            error: None,
        },
        Err(e) => error_reply(e.to_string()),
    }
}

async fn dispatch(agent: &mut Agent, request: Request) -> Reply {
    match request {
        Request::Status => ok_reply(agent.status().await),
        Request::NetworkCreate {
            name,
            subnet,
            driver,
            subnet_len,
            gateway,
            mtu,
            masquerade,
            icc,
            internal,
        } => match driver.as_deref().unwrap_or("bridge") {
            "bridge" if subnet_len.is_some() => ok_reply::<()>(Err(AgentError::Invalid(
                "--subnet-len applies to overlay networks only".into(),
            ))),
            "bridge" => ok_reply(
                agent
                    .network_create(
                        &name,
                        &subnet,
                        &BridgeOptions {
                            gateway: gateway.as_deref(),
                            mtu,
                            masquerade,
                            icc,
                            internal,
                        },
                    )
                    .await,
            ),
            "overlay" if internal == Some(true) => ok_reply::<()>(Err(AgentError::Invalid(
                "--internal applies to bridge networks only (an overlay network reaches other \
                 hosts by definition)"
                    .into(),
            ))),
            "overlay" if icc == Some(false) => ok_reply::<()>(Err(AgentError::Invalid(
                "--no-icc applies to bridge networks only (an overlay network's endpoints on \
                 other hosts could not be told apart from the outside)"
                    .into(),
            ))),
            "overlay" if gateway.is_some() || masquerade.is_some() => {
                ok_reply::<()>(Err(AgentError::Invalid(
                    "--gateway and --no-masquerade do not apply to overlay networks (each \
                     host's gateway is the first address of its subnet)"
                        .into(),
                )))
            }
            "overlay" => ok_reply(agent.overlay_create(&name, &subnet, subnet_len, mtu).await),
            other => ok_reply::<()>(Err(AgentError::Invalid(format!(
                "unknown network driver {other:?}: use bridge or overlay"
            )))),
        },
        Request::NetworkList => ok_reply(agent.network_list()),
        Request::NetworkInspect { name } => ok_reply(agent.network_inspect(&name)),
        Request::NetworkRemove { name } => ok_reply(agent.network_remove(&name).await),
        Request::EndpointCreate {
            name,
            mode,
            network,
            ip,
            netns,
            aliases,
            publish,
            allow,
        } => ok_reply(
            agent
                .endpoint_create(EndpointSpec {
                    name: &name,
                    mode: mode.as_deref(),
                    network: network.as_deref(),
                    ip: ip.as_deref(),
                    netns: netns.as_deref(),
                    aliases: &aliases,
                    publish: &publish,
                    allow: &allow,
                })
                .await,
        ),
        Request::EndpointList => ok_reply(agent.endpoint_list()),
        Request::EndpointInspect { name } => ok_reply(agent.endpoint_inspect(&name)),
        Request::EndpointRemove { name, force } => {
            ok_reply(agent.endpoint_remove(&name, force).await)
        }
        Request::EndpointStats { name } => ok_reply(agent.endpoint_stats(&name)),
        Request::NetworkConnect {
            network,
            endpoint,
            ip,
            aliases,
        } => ok_reply(
            agent
                .network_connect(&network, &endpoint, ip.as_deref(), &aliases)
                .await,
        ),
        Request::PortPublish {
            endpoint,
            ports,
            allow,
        } => ok_reply(agent.port_publish(&endpoint, &ports, &allow)),
        Request::PortUnpublish { endpoint, ports } => {
            ok_reply(agent.port_unpublish(&endpoint, &ports))
        }
        Request::PortList { endpoint } => ok_reply(agent.port_list(endpoint.as_deref())),
        Request::NatImport { rules, dry_run } => ok_reply(agent.nat_import(&rules, dry_run)),
        Request::NatExport => ok_reply(agent.nat_export()),
        Request::HostList => ok_reply(agent.host_list().await),
        Request::NetworkDisconnect { network, endpoint } => {
            ok_reply(agent.network_disconnect(&network, &endpoint).await)
        }
    }
}
