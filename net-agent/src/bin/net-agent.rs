//! net-agent: the long-running daemon. Loads the data plane, restores state, serves the API.

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use anyhow::Context as _;
use clap::Parser;
use log::info;
use net_agent::{
    agent::{Agent, Config},
    api, server,
};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::Mutex,
};

#[derive(Parser)]
#[command(version, about = "Container networking data plane agent (eBPF)")]
struct Args {
    /// Directory of the persistent state store.
    #[arg(long, env = "NET_AGENT_STATE_DIR", default_value = api::DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// bpffs directory where maps and links are pinned (survive agent restarts).
    #[arg(long, env = "NET_AGENT_BPFFS_DIR", default_value = api::DEFAULT_BPFFS_DIR)]
    bpffs_dir: PathBuf,
    /// Unix socket of the API (root only).
    #[arg(long, env = "NET_AGENT_SOCKET", default_value = api::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Prefix for the host veths (<prefix><id>) and namespaces (<prefix>-<endpoint>) this agent
    /// makes; distinct agents on one machine need distinct prefixes.
    #[arg(long, env = "NET_AGENT_NAME_PREFIX", default_value = api::DEFAULT_NAME_PREFIX)]
    name_prefix: String,
    /// Subnet of the `default` network, made on first start (Docker's `bridge`).
    #[arg(long, env = "NET_AGENT_DEFAULT_SUBNET", default_value = api::DEFAULT_NETWORK_SUBNET)]
    default_subnet: String,
    /// Resolver the embedded DNS forwards other names to, IP or IP:PORT; repeatable
    /// (default: the nameservers of /etc/resolv.conf).
    #[arg(
        long = "dns-upstream",
        env = "NET_AGENT_DNS_UPSTREAM",
        value_delimiter = ','
    )]
    dns_upstreams: Vec<String>,
    /// Uplink to masquerade endpoint traffic through (default: the default route's interface;
    /// without either, masquerade is off).
    #[arg(long, env = "NET_AGENT_UPLINK")]
    uplink: Option<String>,
    /// Source ports for masqueraded flows, MIN-MAX; keep it outside the host's own ephemeral
    /// range (net.ipv4.ip_local_port_range).
    #[arg(long, env = "NET_AGENT_NAT_PORTS", default_value = "61000-65535")]
    nat_ports: String,
    /// Conntrack capacity in entries (two per flow). Applies when the table is first made.
    #[arg(long, env = "NET_AGENT_CONNTRACK_ENTRIES", default_value_t = net_ebpf_common::DEFAULT_CONNTRACK_ENTRIES)]
    conntrack_entries: u32,
    /// Idle timeouts, NAME=SECONDS,... over the defaults (tcp_syn=60, tcp_established=7200,
    /// tcp_closing=10, udp=30, udp_established=120, icmp=30).
    #[arg(long, env = "NET_AGENT_CONNTRACK_TIMEOUTS", default_value = "")]
    conntrack_timeouts: String,
    /// Seconds between conntrack garbage collections.
    #[arg(long, env = "NET_AGENT_CONNTRACK_GC_INTERVAL", default_value_t = 5)]
    conntrack_gc_interval: u64,
    /// Cluster store for overlay networks: `embedded` (files under --cluster-dir; one host, or
    /// agents on one machine sharing the directory) or `etcd://HOST:PORT[,HOST:PORT...]`.
    #[arg(long, env = "NET_AGENT_STORE", default_value = "embedded")]
    store: String,
    /// Directory of the embedded cluster store (default: <state-dir>/cluster).
    #[arg(long, env = "NET_AGENT_CLUSTER_DIR")]
    cluster_dir: Option<PathBuf>,
    /// This host's name in the cluster (default: the machine's host name, with the name prefix
    /// when it is not the default, so agents sharing a machine differ).
    #[arg(long, env = "NET_AGENT_HOST_NAME")]
    host_name: Option<String>,
    /// Seconds a subnet lease lasts unless renewed (renewed when a third is left).
    #[arg(long, env = "NET_AGENT_LEASE_TTL", default_value_t = 60)]
    lease_ttl: u64,
}

/// The machine's host name, or `localhost` when it has none.
fn system_host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

/// `MIN-MAX`.
fn parse_port_range(s: &str) -> anyhow::Result<(u16, u16)> {
    let bad = || anyhow::anyhow!("invalid --nat-ports {s:?}: expected MIN-MAX, e.g. 61000-65535");
    let (min, max) = s.split_once('-').ok_or_else(bad)?;
    Ok((
        min.trim().parse().map_err(|_| bad())?,
        max.trim().parse().map_err(|_| bad())?,
    ))
}

/// `IP` or `IP:PORT` (port 53 by default).
fn parse_upstream(s: &str) -> anyhow::Result<SocketAddr> {
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let ip: std::net::IpAddr = s
        .parse()
        .with_context(|| format!("invalid --dns-upstream {s:?}: expected IP or IP:PORT"))?;
    Ok(SocketAddr::new(ip, 53))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args = Args::parse();
    if !nix::unistd::geteuid().is_root() {
        anyhow::bail!("net-agent loads eBPF programs and creates namespaces: run it as root");
    }
    // Every endpoint namespace holds DNS sockets and each API client a connection: use the
    // whole descriptor allowance, not the conservative soft limit.
    if let Ok((_, hard)) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
    {
        let _ =
            nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard);
    }
    let dns_upstreams = if args.dns_upstreams.is_empty() {
        net_agent::dns::upstreams_from_resolv_conf(std::path::Path::new("/etc/resolv.conf"))
    } else {
        args.dns_upstreams
            .iter()
            .map(|s| parse_upstream(s))
            .collect::<anyhow::Result<_>>()?
    };
    if args.lease_ttl < 2 {
        anyhow::bail!(
            "invalid --lease-ttl {}: must be at least 2 seconds",
            args.lease_ttl
        );
    }
    let host_name = args.host_name.clone().unwrap_or_else(|| {
        let host = system_host_name();
        if args.name_prefix == api::DEFAULT_NAME_PREFIX {
            host
        } else {
            format!("{host}-{}", args.name_prefix)
        }
    });
    let config = Config {
        cluster_dir: args
            .cluster_dir
            .clone()
            .unwrap_or_else(|| args.state_dir.join("cluster")),
        store: args.store.clone(),
        host_name,
        lease_ttl: std::time::Duration::from_secs(args.lease_ttl),
        state_dir: args.state_dir,
        bpffs_dir: args.bpffs_dir,
        socket: args.socket,
        name_prefix: args.name_prefix,
        default_subnet: args.default_subnet,
        dns_upstreams,
        uplink: args.uplink,
        nat_ports: parse_port_range(&args.nat_ports)?,
        conntrack_entries: args.conntrack_entries,
        conntrack_timeouts: net_agent::conntrack::Timeouts::parse(&args.conntrack_timeouts)
            .map_err(anyhow::Error::msg)?,
    };
    if args.conntrack_gc_interval == 0 {
        anyhow::bail!("invalid --conntrack-gc-interval 0: must be at least 1 second");
    }
    // Bind before touching the data plane, so a second agent on the same socket stops here.
    let listener = server::bind(&config.socket).await?;
    let agent = Agent::start(config.clone())
        .await
        .context("starting the agent")?;
    info!("listening on {}", config.socket.display());
    let agent = Arc::new(Mutex::new(agent));

    // Expired flows leave the conntrack table here, never in the data path; a live flow is
    // never removed, also not at start.
    let gc_agent = agent.clone();
    let gc_interval = std::time::Duration::from_secs(args.conntrack_gc_interval);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(gc_interval);
        loop {
            tick.tick().await;
            let removed = gc_agent.lock().await.conntrack_gc();
            if removed > 0 {
                log::debug!("conntrack: {removed} expired flows removed");
            }
        }
    });

    // Internal networks' veths must not forward; a write of the host-wide forwarding setting
    // turns every device's back on, so the agent looks every second.
    let guard_agent = agent.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        loop {
            tick.tick().await;
            for ifname in guard_agent.lock().await.keep_internal_veths_unforwarded() {
                log::warn!(
                    "{ifname}: forwarding was turned on (a write of net.ipv4.ip_forward or \
                     conf.all.forwarding?); an internal network's veth: off again"
                );
            }
        }
    });

    // The overlay follows the cluster store: at once when it reports a change, when the local
    // endpoints' names changed or a fetched view was dropped as stale, and once a second anyway (lease renewal; a store that was down
    // and is back).
    let mut changes = agent.lock().await.cluster_changes();
    let sync_wanted = agent.lock().await.sync_wanted();
    let sync_agent = agent.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        let mut failing = false;
        loop {
            match changes.as_mut() {
                Some(rx) => {
                    tokio::select! {
                        changed = rx.changed() => if changed.is_err() { changes = None },
                        () = sync_wanted.notified() => {}
                        _ = tick.tick() => {}
                    }
                }
                None => {
                    tokio::select! {
                        () = sync_wanted.notified() => {}
                        _ = tick.tick() => {}
                    }
                }
            }
            // Ask the store without holding the agent: a store that is slow or unreachable
            // must not hold up the API.
            let plan = sync_agent.lock().await.cluster_plan();
            let synced = match plan {
                Ok(Some(plan)) => match plan.fetch().await {
                    Ok(view) => sync_agent.lock().await.apply_cluster(view).await,
                    Err(e) => Err(e),
                },
                Ok(None) => Ok(()),
                Err(e) => Err(e),
            };
            match synced {
                Ok(()) if failing => {
                    info!("overlay: the cluster store answers again");
                    failing = false;
                }
                Ok(()) => {}
                Err(e) if !failing => {
                    log::warn!("overlay: {e}; keeping the routes in place and retrying");
                    failing = true;
                }
                Err(e) => log::debug!("overlay: {e}"),
            }
        }
    });

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        () = server::serve(listener, agent.clone()) => {}
        _ = term.recv() => info!("SIGTERM: stopping; the data plane stays in place"),
        _ = int.recv() => info!("SIGINT: stopping; the data plane stays in place"),
    }
    // Wait for a request in flight to finish before leaving.
    let _agent = agent.lock().await;
    let _ = std::fs::remove_file(&config.socket);
    Ok(())
}
