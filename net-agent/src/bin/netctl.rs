//! netctl: see and steer net-agent. Listings take `-o json`; `netctl bpf ...` reads the pinned
//! maps directly, so it works with the agent stopped.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use net_agent::{
    api::{
        self, BpfCounters, BpfDrops, BpfEndpointEntry, BpfNatEvent, BpfTraffic, Counter, Endpoint,
        EndpointStats, Network, PortSpec, PublishedPort, Request, Status,
    },
    client, conntrack,
    datapath::Maps,
    publish,
};
use serde::Serialize;

#[derive(Parser)]
#[command(version, about = "Control and inspect net-agent")]
struct Cli {
    /// The agent's API socket.
    #[arg(long, global = true, env = "NETCTL_SOCKET", default_value = api::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// The agent's bpffs directory (for `netctl bpf`).
    #[arg(long, global = true, env = "NETCTL_BPFFS_DIR", default_value = api::DEFAULT_BPFFS_DIR)]
    bpffs_dir: PathBuf,
    /// Output format.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Output::Text)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// The agent's state at a glance.
    Status,
    /// User-defined networks.
    #[command(subcommand)]
    Network(NetworkCmd),
    /// Endpoints: a namespace with a veth on a network.
    #[command(subcommand)]
    Endpoint(EndpointCmd),
    /// Published ports: host ports forwarded to endpoints.
    #[command(subcommand)]
    Port(PortCmd),
    /// Hosts of the cluster: their overlay subnet leases.
    #[command(subcommand)]
    Host(HostCmd),
    /// iptables compatibility: import an `iptables-save` nat table, export the data plane's NAT.
    #[command(subcommand)]
    Nat(NatCmd),
    /// Read the pinned BPF maps directly (works while the agent is stopped).
    #[command(subcommand)]
    Bpf(BpfCmd),
    /// Run a command in a new endpoint, as `docker run` does: stdin, stdout, stderr and the
    /// exit status pass through, and the endpoint is removed when the command exits.
    Run(RunArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    /// A network name, or a mode: bridge (the `default` network), none, host, container:NAME.
    #[arg(long = "network", visible_alias = "net", value_name = "NETWORK|MODE")]
    network: Option<String>,
    /// Endpoint name (default: run-<random>).
    #[arg(long)]
    name: Option<String>,
    /// Address on the network (default: the lowest free one).
    #[arg(long)]
    ip: Option<String>,
    /// Further names on the network (repeatable).
    #[arg(long = "alias")]
    aliases: Vec<String>,
    #[command(flatten)]
    ports: PublishArgs,
    /// Keep the endpoint and the command running in the background; print the endpoint name.
    #[arg(long, short = 'd')]
    detach: bool,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<String>,
}

/// `--publish` and `--allow`, as `endpoint create` and `run` take them.
#[derive(clap::Args)]
struct PublishArgs {
    /// Publish a port: [HOSTIP:]HOSTPORT:PORT[/tcp|/udp], ranges as 8000-8010:80-90
    /// (repeatable).
    #[arg(long, short = 'p', value_name = "SPEC", value_parser = parse_publish)]
    publish: Vec<PortSpec>,
    /// Only sources in this CIDR may reach the published ports (repeatable; default: anyone).
    #[arg(long, value_name = "CIDR")]
    allow: Vec<String>,
}

fn parse_publish(input: &str) -> Result<PortSpec, String> {
    publish::parse_spec(input).map_err(|e| e.reason)
}

fn parse_unpublish(input: &str) -> Result<PortSpec, String> {
    publish::parse_host_spec(input).map_err(|e| e.reason)
}

#[derive(Subcommand)]
enum HostCmd {
    /// Every host's lease on every overlay network: subnet, VTEP, expiry.
    #[command(alias = "list")]
    Ls,
}

#[derive(Subcommand)]
enum NatCmd {
    /// Install the published ports and masquerade of an `iptables-save` nat table (Docker's,
    /// kube-proxy's or hand-written); every rule left out is listed with the reason.
    Import {
        /// The `iptables-save` output; `-` or nothing: standard input.
        file: Option<PathBuf>,
        /// Print the plan and change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Print the data plane's NAT as an `iptables-save` nat table.
    Export,
}

#[derive(Subcommand)]
enum PortCmd {
    /// Publish ports of a running endpoint (all or none).
    Publish {
        endpoint: String,
        /// [HOSTIP:]HOSTPORT:PORT[/tcp|/udp], ranges as 8000-8010:80-90.
        #[arg(required = true, value_name = "SPEC", value_parser = parse_publish)]
        ports: Vec<PortSpec>,
        /// Only sources in this CIDR may reach these ports (repeatable; default: anyone).
        #[arg(long, value_name = "CIDR")]
        allow: Vec<String>,
    },
    /// Withdraw published ports (all or none); connections under way finish.
    Unpublish {
        endpoint: String,
        /// [HOSTIP:]HOSTPORT[/tcp|/udp] (or the whole publish spec).
        #[arg(required = true, value_name = "SPEC", value_parser = parse_unpublish)]
        ports: Vec<PortSpec>,
    },
    /// List published ports, of one endpoint or of all.
    #[command(alias = "list")]
    Ls { endpoint: Option<String> },
}

#[derive(Subcommand)]
enum NetworkCmd {
    /// Create a network.
    Create {
        name: String,
        /// IPv4 subnet in canonical form, e.g. 10.10.0.0/24; for an overlay network, the
        /// cluster-wide pool each host leases its subnet from, e.g. 10.244.0.0/16.
        #[arg(long)]
        subnet: String,
        /// bridge (this host only; the default) or overlay (across the cluster, VXLAN).
        #[arg(long, short = 'd')]
        driver: Option<String>,
        /// Overlay networks: the prefix length of each host's subnet (default 24).
        #[arg(long)]
        subnet_len: Option<u8>,
        /// Gateway address (default: the subnet's first host).
        #[arg(long)]
        gateway: Option<String>,
        /// MTU of the endpoints' interfaces (default 1500).
        #[arg(long)]
        mtu: Option<u32>,
        /// Do not masquerade traffic from this network's endpoints leaving through the uplink.
        #[arg(long)]
        no_masquerade: bool,
        /// Do not let this network's endpoints talk to each other (Docker's
        /// `enable_icc=false`); the gateway, the host, the outside and published ports stay
        /// reachable. Bridge networks only.
        #[arg(long)]
        no_icc: bool,
        /// Keep this network to itself (Docker's `--internal`): its endpoints reach each other
        /// and the host, nothing the host would forward, and nothing forwarded reaches them; no
        /// masquerade, no published ports. Bridge networks only.
        #[arg(long)]
        internal: bool,
    },
    /// List networks.
    #[command(alias = "list")]
    Ls,
    /// Show one network.
    Inspect { name: String },
    /// Remove a network (refused while endpoints are attached).
    #[command(alias = "remove")]
    Rm { name: String },
    /// Give a running endpoint a further interface and address on NETWORK.
    Connect {
        network: String,
        endpoint: String,
        #[arg(long)]
        ip: Option<String>,
        /// Further names on this network (repeatable).
        #[arg(long = "alias")]
        aliases: Vec<String>,
    },
    /// Remove an endpoint's interface on NETWORK.
    Disconnect { network: String, endpoint: String },
}

#[derive(Subcommand)]
enum EndpointCmd {
    /// Create an endpoint: a namespace (made, or adopted with --netns), a veth, its address and
    /// default route.
    Create {
        name: String,
        /// Network of a bridge-mode endpoint (default: `default`).
        #[arg(long)]
        network: Option<String>,
        /// bridge (default), none, host or container:NAME.
        #[arg(long)]
        mode: Option<String>,
        /// Address to use (default: the lowest free one).
        #[arg(long)]
        ip: Option<String>,
        /// Adopt an existing network namespace (a path like /run/netns/NAME) instead of making one.
        #[arg(long)]
        netns: Option<String>,
        /// Further names on the network (repeatable).
        #[arg(long = "alias")]
        aliases: Vec<String>,
        #[command(flatten)]
        ports: PublishArgs,
    },
    /// List endpoints.
    #[command(alias = "list")]
    Ls,
    /// Show one endpoint.
    Inspect { name: String },
    /// Remove an endpoint (and its namespace, if the agent made it).
    #[command(alias = "remove")]
    Rm {
        name: String,
        /// Also when other endpoints share its namespace (container mode).
        #[arg(long, short = 'f')]
        force: bool,
    },
    /// Packets, bytes and drops by reason.
    Stats { name: String },
}

#[derive(Subcommand)]
enum BpfCmd {
    /// The ENDPOINTS map: endpoint address -> interface, network, MACs.
    #[command(subcommand)]
    Endpoints(BpfList),
    /// The CONNTRACK map: translated flows (masquerade, published ports), both directions
    /// joined.
    #[command(subcommand)]
    Ct(CtCmd),
    /// The PUBLISHED and PUBLISHED_ALLOW maps: published ports and their allow lists.
    #[command(subcommand)]
    Nat(BpfList),
    /// The REMOTE_ROUTES map: other hosts' overlay subnets -> VTEP and VNI.
    #[command(subcommand)]
    Routes(BpfList),
    /// The counter maps: ENDPOINT_TRAFFIC (by the slot ENDPOINT_SLOTS gives each endpoint
    /// veth), ENDPOINT_DROPS, NAT_STATS, and the OVERLAY settings.
    #[command(subcommand)]
    Counters(BpfList),
}

#[derive(Subcommand)]
enum CtCmd {
    /// List tracked flows.
    #[command(alias = "ls")]
    List(CtFilterArgs),
    /// Remove tracked flows (all, or those matching the filter); their next packet starts a
    /// new flow.
    Flush(CtFilterArgs),
}

#[derive(clap::Args)]
struct CtFilterArgs {
    /// Flows with this address on any side, before or after translation.
    #[arg(long)]
    addr: Option<std::net::Ipv4Addr>,
    /// Flows with this port on any side.
    #[arg(long)]
    port: Option<u16>,
    /// tcp, udp or icmp.
    #[arg(long)]
    proto: Option<String>,
}

impl CtFilterArgs {
    fn filter(&self) -> anyhow::Result<conntrack::Filter> {
        Ok(conntrack::Filter {
            addr: self.addr,
            port: self.port,
            proto: self
                .proto
                .as_deref()
                .map(conntrack::Filter::parse_proto)
                .transpose()
                .map_err(anyhow::Error::msg)?,
        })
    }
}

#[derive(Subcommand)]
enum BpfList {
    #[command(alias = "ls")]
    List,
}

fn main() {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Run(args) => run_command(&cli, args),
        _ => run(&cli).map(|()| 0),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    }
}

fn run(cli: &Cli) -> anyhow::Result<()> {
    let call = |request: Request| -> anyhow::Result<serde_json::Value> {
        client::call(&cli.socket, &request)
    };
    let out = cli.output;
    match &cli.command {
        Command::Status => {
            let status: Status = serde_json::from_value(call(Request::Status)?)?;
            emit(out, &status, |s| {
                let mut text = format!(
                    "agent {}\nnetworks:  {}\nendpoints: {}\nstate:     {}\nbpffs:     {}\nprograms:  {}\n",
                    s.version,
                    s.networks,
                    s.endpoints,
                    s.state_dir,
                    s.bpffs_dir,
                    s.programs.join(", ")
                );
                match &s.nat {
                    Some(nat) => {
                        text += &format!(
                            "masquerade: through {} as {}, ports {}-{}\nconntrack: {} of {} entries ({:.1}% full)\nnat flows: {} created, {} port retries, {} dropped (no free port), {} dropped (table full)\n",
                            nat.uplink,
                            nat.host_ip,
                            nat.port_min,
                            nat.port_max,
                            nat.conntrack_entries,
                            nat.conntrack_capacity,
                            100.0 * nat.conntrack_entries as f64
                                / f64::from(nat.conntrack_capacity.max(1)),
                            nat.flows_created,
                            nat.port_retries,
                            nat.ports_exhausted,
                            nat.table_full
                        );
                        text += &format!(
                            "published: {} ports, {} connections\nclosed TCP tuples reused: {}\n",
                            nat.published_ports, nat.published_flows, nat.closed_reused
                        );
                        for (place, drops) in [
                            ("uplink", &nat.uplink_drops),
                            ("loopback", &nat.loopback_drops),
                        ] {
                            for d in drops {
                                text += &format!(
                                    "{place} drops: {} ({}): {} packets, {} bytes\n",
                                    d.reason, d.code, d.packets, d.bytes
                                );
                            }
                        }
                    }
                    None => text += "masquerade: off (no uplink)\n",
                }
                if let Some(o) = &s.overlay {
                    text += &format!(
                        "cluster:   host {} in store {}{}\n",
                        o.host_name,
                        o.store,
                        o.vxlan
                            .as_ref()
                            .map_or(String::new(), |v| format!(", VXLAN device {v}"))
                    );
                    if let Some(rx) = o.vxlan_rx_packets {
                        text += &format!(
                            "overlay:   {rx} packets left to the VXLAN device by the uplink, \
                             which decapsulates the others itself\n"
                        );
                    }
                    for d in &o.drops {
                        text += &format!(
                            "overlay drops: {} ({}): {} packets, {} bytes\n",
                            d.reason, d.code, d.packets, d.bytes
                        );
                    }
                }
                text
            })
        }
        Command::Network(cmd) => match cmd {
            NetworkCmd::Create {
                name,
                subnet,
                driver,
                subnet_len,
                gateway,
                mtu,
                no_masquerade,
                no_icc,
                internal,
            } => {
                let network: Network = serde_json::from_value(call(Request::NetworkCreate {
                    name: name.clone(),
                    subnet: subnet.clone(),
                    driver: driver.clone(),
                    subnet_len: *subnet_len,
                    gateway: gateway.clone(),
                    mtu: *mtu,
                    masquerade: no_masquerade.then_some(false),
                    icc: no_icc.then_some(false),
                    internal: internal.then_some(true),
                })?)?;
                // An agent older than `--no-icc` ignores it: say so rather than leave a
                // network whose endpoints reach each other when they should not.
                if *no_icc && network.icc {
                    anyhow::bail!(
                        "the agent made network {name} but ignored --no-icc (it predates it): \
                         remove the network, upgrade the agent and create it again"
                    );
                }
                if *internal && !network.internal {
                    anyhow::bail!(
                        "the agent made network {name} but ignored --internal (it predates it): \
                         remove the network, upgrade the agent and create it again"
                    );
                }
                emit(out, &network, |n| networks_table(std::slice::from_ref(n)))
            }
            NetworkCmd::Ls => {
                let networks: Vec<Network> = serde_json::from_value(call(Request::NetworkList)?)?;
                emit(out, &networks, |n| networks_table(n))
            }
            NetworkCmd::Inspect { name } => {
                let network: Network =
                    serde_json::from_value(call(Request::NetworkInspect { name: name.clone() })?)?;
                emit(out, &network, network_detail)
            }
            NetworkCmd::Rm { name } => {
                call(Request::NetworkRemove { name: name.clone() })?;
                emit(out, &serde_json::json!({ "removed": name }), |_| {
                    format!("{name}\n")
                })
            }
            NetworkCmd::Connect {
                network,
                endpoint,
                ip,
                aliases,
            } => {
                let endpoint: Endpoint = serde_json::from_value(call(Request::NetworkConnect {
                    network: network.clone(),
                    endpoint: endpoint.clone(),
                    ip: ip.clone(),
                    aliases: aliases.clone(),
                })?)?;
                emit(out, &endpoint, endpoint_detail)
            }
            NetworkCmd::Disconnect { network, endpoint } => {
                let endpoint: Endpoint =
                    serde_json::from_value(call(Request::NetworkDisconnect {
                        network: network.clone(),
                        endpoint: endpoint.clone(),
                    })?)?;
                emit(out, &endpoint, endpoint_detail)
            }
        },
        Command::Endpoint(cmd) => match cmd {
            EndpointCmd::Create {
                name,
                network,
                mode,
                ip,
                netns,
                aliases,
                ports,
            } => {
                let endpoint: Endpoint = serde_json::from_value(call(Request::EndpointCreate {
                    name: name.clone(),
                    mode: mode.clone(),
                    network: network.clone(),
                    ip: ip.clone(),
                    netns: netns.clone(),
                    aliases: aliases.clone(),
                    publish: ports.publish.clone(),
                    allow: ports.allow.clone(),
                })?)?;
                emit(out, &endpoint, |e| endpoints_table(std::slice::from_ref(e)))
            }
            EndpointCmd::Ls => {
                let endpoints: Vec<Endpoint> =
                    serde_json::from_value(call(Request::EndpointList)?)?;
                emit(out, &endpoints, |e| endpoints_table(e))
            }
            EndpointCmd::Inspect { name } => {
                let endpoint: Endpoint =
                    serde_json::from_value(call(Request::EndpointInspect { name: name.clone() })?)?;
                emit(out, &endpoint, endpoint_detail)
            }
            EndpointCmd::Rm { name, force } => {
                call(Request::EndpointRemove {
                    name: name.clone(),
                    force: *force,
                })?;
                emit(out, &serde_json::json!({ "removed": name }), |_| {
                    format!("{name}\n")
                })
            }
            EndpointCmd::Stats { name } => {
                let stats: EndpointStats =
                    serde_json::from_value(call(Request::EndpointStats { name: name.clone() })?)?;
                emit(out, &stats, stats_text)
            }
        },
        Command::Bpf(BpfCmd::Endpoints(BpfList::List)) => {
            let maps = pinned_maps(cli)?;
            let entries = maps.list_endpoints()?;
            emit(out, &entries, |e| bpf_endpoints_table(e))
        }
        Command::Bpf(BpfCmd::Ct(cmd)) => {
            let mut maps = pinned_maps(cli)?;
            let now = conntrack::monotonic_now_ns();
            let (args, flush) = match cmd {
                CtCmd::List(args) => (args, false),
                CtCmd::Flush(args) => (args, true),
            };
            let filter = args.filter()?;
            let joined = conntrack::join(&maps.conntrack_entries());
            let selected: Vec<_> = joined
                .iter()
                .map(|j| (j, j.describe(now)))
                .filter(|(_, flow)| filter.matches(flow))
                .collect();
            if flush {
                for (j, _) in &selected {
                    maps.conntrack_remove(&[j.original_key, j.reply_key]);
                }
                let flushed = selected.len();
                return emit(out, &serde_json::json!({ "flushed": flushed }), |_| {
                    format!("{flushed} flows removed\n")
                });
            }
            let flows: Vec<conntrack::Flow> = selected.into_iter().map(|(_, f)| f).collect();
            emit(out, &flows, |f| ct_table(f))
        }
        Command::Port(cmd) => {
            let (request, verb) = match cmd {
                PortCmd::Publish {
                    endpoint,
                    ports,
                    allow,
                } => (
                    Request::PortPublish {
                        endpoint: endpoint.clone(),
                        ports: ports.clone(),
                        allow: allow.clone(),
                    },
                    Some("published"),
                ),
                PortCmd::Unpublish { endpoint, ports } => (
                    Request::PortUnpublish {
                        endpoint: endpoint.clone(),
                        ports: ports.clone(),
                    },
                    Some("unpublished"),
                ),
                PortCmd::Ls { endpoint } => (
                    Request::PortList {
                        endpoint: endpoint.clone(),
                    },
                    None,
                ),
            };
            let ports: Vec<PublishedPort> = serde_json::from_value(call(request)?)?;
            emit(out, &ports, |p| match verb {
                Some(verb) => p
                    .iter()
                    .map(|p| format!("{verb} {}\n", port_line(p)))
                    .collect(),
                None => ports_table(p),
            })
        }
        Command::Nat(NatCmd::Import { file, dry_run }) => {
            let rules = match file {
                Some(path) if path.as_os_str() != "-" => std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?,
                _ => std::io::read_to_string(std::io::stdin()).context("reading standard input")?,
            };
            let report: api::NatImport = serde_json::from_value(call(Request::NatImport {
                rules,
                dry_run: *dry_run,
            })?)?;
            emit(out, &report, nat_import_text)
        }
        Command::Nat(NatCmd::Export) => {
            let text: String = serde_json::from_value(call(Request::NatExport)?)?;
            match out {
                Output::Json => emit(out, &text, |_| String::new()),
                Output::Text => {
                    print!("{text}");
                    Ok(())
                }
            }
        }
        Command::Host(HostCmd::Ls) => {
            let hosts: Vec<api::HostLease> = serde_json::from_value(call(Request::HostList)?)?;
            emit(out, &hosts, |h| hosts_table(h))
        }
        Command::Bpf(BpfCmd::Counters(BpfList::List)) => {
            let maps = pinned_maps(cli)?;
            let counter = |packets, bytes| Counter { packets, bytes };
            let counters = BpfCounters {
                traffic: maps
                    .traffic_by_slot()?
                    .into_iter()
                    .map(|(ifindex, slot, t)| BpfTraffic {
                        ifindex,
                        slot,
                        from_endpoint: counter(t.from_endpoint_packets, t.from_endpoint_bytes),
                        to_endpoint: counter(t.to_endpoint_packets, t.to_endpoint_bytes),
                    })
                    .collect(),
                drops: maps
                    .drops_by_ifindex()?
                    .into_iter()
                    .flat_map(|(ifindex, drops)| {
                        drops.into_iter().map(move |d| BpfDrops {
                            ifindex,
                            reason: d.reason,
                            code: d.code,
                            packets: d.packets,
                            bytes: d.bytes,
                        })
                    })
                    .collect(),
                nat: maps
                    .nat_events()?
                    .into_iter()
                    .map(|(name, count)| BpfNatEvent {
                        name: name.to_owned(),
                        count,
                    })
                    .collect(),
                vxlan_ifindex: maps.vxlan_ifindex()?,
            };
            emit(out, &counters, bpf_counters_text)
        }
        Command::Bpf(BpfCmd::Routes(BpfList::List)) => {
            let maps = pinned_maps(cli)?;
            let routes: Vec<api::BpfRouteEntry> = maps
                .list_routes()?
                .into_iter()
                .map(|(subnet, info)| api::BpfRouteEntry {
                    subnet: subnet.to_string(),
                    vtep: Some(std::net::Ipv4Addr::from(info.vtep))
                        .filter(|ip| !ip.is_unspecified()),
                    vni: info.vni,
                })
                .collect();
            emit(out, &routes, |r| routes_table(r))
        }
        Command::Bpf(BpfCmd::Nat(BpfList::List)) => {
            let maps = pinned_maps(cli)?;
            let entries: Vec<api::BpfPublishedEntry> = maps
                .list_published()?
                .iter()
                .map(api::BpfPublishedEntry::from)
                .collect();
            emit(out, &entries, |e| bpf_nat_table(e))
        }
        Command::Run(_) => unreachable!("handled by run_command"),
    }
}

/// `netctl run`: create the endpoint, run the command inside it, remove the endpoint after.
/// Returns the command's exit code (128 + signal number when a signal ended it, as shells do).
fn run_command(cli: &Cli, args: &RunArgs) -> anyhow::Result<i32> {
    let target = args.network.as_deref().unwrap_or("bridge");
    let (mode, network) = match target {
        "bridge" => ("bridge", None),
        "none" | "host" => (target, None),
        t if t.starts_with("container:") => (t, None),
        t if t.contains(':') => anyhow::bail!(
            "unknown network mode {t:?}: use a network name, bridge, none, host or container:NAME"
        ),
        network => ("bridge", Some(network.to_owned())),
    };
    if !args.ports.publish.is_empty() && mode == "host" {
        anyhow::bail!(
            "--publish does not apply with --net host: the command uses the host's own ports directly"
        );
    }
    let name = args.name.clone().unwrap_or_else(random_name);
    let endpoint: Endpoint = serde_json::from_value(client::call(
        &cli.socket,
        &Request::EndpointCreate {
            name: name.clone(),
            mode: Some(mode.to_owned()),
            network,
            ip: args.ip.clone(),
            netns: None,
            aliases: args.aliases.clone(),
            publish: args.ports.publish.clone(),
            allow: args.ports.allow.clone(),
        },
    )?)?;

    let mut command = command_in(&endpoint, &args.command);
    if args.detach {
        use std::os::unix::process::CommandExt as _;
        // Its own process group: the terminal's signals are not its business any more.
        command
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .process_group(0);
        match command.spawn() {
            Ok(_) => {
                println!("{name}");
                return Ok(0);
            }
            Err(e) => {
                remove_endpoint(&cli.socket, &name);
                anyhow::bail!("starting {:?}: {e}", args.command[0]);
            }
        }
    }
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => {
            remove_endpoint(&cli.socket, &name);
            anyhow::bail!("starting {:?}: {e}", args.command[0]);
        }
    };
    // The command shares the terminal and gets ^C itself; netctl must outlive it to clean up.
    // Ignoring after the spawn leaves the command's own dispositions at their defaults.
    for signal in [
        nix::sys::signal::Signal::SIGINT,
        nix::sys::signal::Signal::SIGTERM,
        nix::sys::signal::Signal::SIGQUIT,
        nix::sys::signal::Signal::SIGHUP,
    ] {
        // SAFETY: SIG_IGN installs no handler code.
        let _ = unsafe { nix::sys::signal::signal(signal, nix::sys::signal::SigHandler::SigIgn) };
    }
    let status = child.wait().context("waiting for the command")?;
    remove_endpoint(&cli.socket, &name);
    use std::os::unix::process::ExitStatusExt as _;
    Ok(status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1))
}

/// The command, set to run inside the endpoint's namespace. Named namespaces go through
/// `ip netns exec`, which also mounts `/etc/netns/<name>/resolv.conf` (the embedded DNS).
fn command_in(endpoint: &Endpoint, argv: &[String]) -> std::process::Command {
    let netns = std::path::Path::new(&endpoint.netns);
    if endpoint.netns.is_empty() {
        let mut command = std::process::Command::new(&argv[0]);
        command.args(&argv[1..]);
        return command;
    }
    match netns.strip_prefix(net_agent::netns::NETNS_RUN_DIR) {
        Ok(name) => {
            let mut command = std::process::Command::new("ip");
            command.args(["netns", "exec"]).arg(name).args(argv);
            command
        }
        Err(_) => {
            let mut command = std::process::Command::new("nsenter");
            command
                .arg(format!("--net={}", endpoint.netns))
                .arg("--")
                .args(argv);
            command
        }
    }
}

fn remove_endpoint(socket: &std::path::Path, name: &str) {
    let removed: anyhow::Result<serde_json::Value> = client::call(
        socket,
        &Request::EndpointRemove {
            name: name.to_owned(),
            force: false,
        },
    );
    if let Err(e) = removed {
        eprintln!("netctl: warning: endpoint {name} was not removed: {e:#}");
    }
}

/// `run-` and eight hex digits, from the standard library's randomly keyed hasher.
fn random_name() -> String {
    use std::hash::{BuildHasher as _, Hasher as _};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    format!("run-{:08x}", hasher.finish() as u32)
}

fn emit<T: Serialize>(
    out: Output,
    value: &T,
    text: impl FnOnce(&T) -> String,
) -> anyhow::Result<()> {
    match out {
        Output::Json => println!("{}", serde_json::to_string_pretty(value)?),
        Output::Text => print!("{}", text(value)),
    }
    Ok(())
}

/// Left-aligned columns, two spaces apart.
fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<String>| -> String {
        let mut s = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ");
        s.truncate(s.trim_end().len());
        s + "\n"
    };
    let mut out = line(header.iter().map(|h| (*h).to_owned()).collect());
    for row in rows {
        out += &line(row);
    }
    out
}

fn networks_table(networks: &[Network]) -> String {
    table(
        &[
            "NAME",
            "DRIVER",
            "ID",
            "SUBNET",
            "GATEWAY",
            "MTU",
            "MASQUERADE",
            "ENDPOINTS",
        ],
        networks
            .iter()
            .map(|n| {
                vec![
                    n.name.clone(),
                    n.driver.clone(),
                    n.id.to_string(),
                    n.subnet.clone(),
                    n.gateway.to_string(),
                    n.mtu.to_string(),
                    if n.masquerade { "yes" } else { "no" }.to_owned(),
                    n.endpoints.len().to_string(),
                ]
            })
            .collect(),
    )
}

fn network_detail(n: &Network) -> String {
    let mut detail = format!(
        "name:       {}\ndriver:     {}{}\nid:         {}\nsubnet:     {}\ngateway:    {}\nmtu:        {}\nmasquerade: {}\nicc:        {}\ninternal:   {}\nendpoints:  {}\n",
        n.name,
        n.driver,
        match (&n.pool, n.vni) {
            (Some(pool), Some(vni)) => format!(" (pool {pool}, vni {vni})"),
            _ => String::new(),
        },
        n.id,
        n.subnet,
        n.gateway,
        n.mtu,
        if n.masquerade { "yes" } else { "no" },
        if n.icc {
            "yes"
        } else {
            "no (endpoints cannot reach each other)"
        },
        if n.internal {
            "yes (endpoints reach each other and the host only)"
        } else {
            "no"
        },
        if n.endpoints.is_empty() {
            "-".to_owned()
        } else {
            n.endpoints.join(", ")
        }
    );
    if n.driver == "overlay" {
        let remote: Vec<String> = n
            .remote_endpoints
            .iter()
            .map(|e| {
                let aliases = if e.aliases.is_empty() {
                    String::new()
                } else {
                    format!(" (alias {})", e.aliases.join(", "))
                };
                format!("{} {} on {}{aliases}", e.name, e.ip, e.host)
            })
            .collect();
        detail.push_str(&format!(
            "remote:     {}\n",
            if remote.is_empty() {
                "-".to_owned()
            } else {
                remote.join("; ")
            }
        ));
    }
    detail
}

fn endpoints_table(endpoints: &[Endpoint]) -> String {
    let mut rows = Vec::new();
    for e in endpoints {
        let netns = if e.netns.is_empty() {
            "-".to_owned()
        } else {
            e.netns.clone()
        };
        if e.interfaces.is_empty() {
            rows.push(vec![
                e.name.clone(),
                e.mode.clone(),
                "-".into(),
                "-".into(),
                "-".into(),
                netns,
            ]);
            continue;
        }
        for (n, i) in e.interfaces.iter().enumerate() {
            let (name, mode, netns) = if n == 0 {
                (e.name.clone(), e.mode.clone(), netns.clone())
            } else {
                (String::new(), String::new(), String::new())
            };
            rows.push(vec![
                name,
                mode,
                i.network.clone(),
                format!("{}/{}", i.ip, i.prefix_len),
                i.host_ifname.clone(),
                netns,
            ]);
        }
    }
    table(&["NAME", "MODE", "NETWORK", "IP", "HOST IF", "NETNS"], rows)
}

fn endpoint_detail(e: &Endpoint) -> String {
    let mut out = format!(
        "name:   {}\nmode:   {}\nnetns:  {}{}\n",
        e.name,
        e.mode,
        if e.netns.is_empty() {
            "- (host)"
        } else {
            &e.netns
        },
        if e.netns_owned || e.netns.is_empty() {
            ""
        } else {
            " (not made by the agent)"
        },
    );
    for i in &e.interfaces {
        out += &format!(
            "{}:\n  network:   {}\n  address:   {}/{} gateway {}\n  mac:       {}\n  host veth: {} (ifindex {}, mac {})\n  aliases:   {}\n",
            i.ifname,
            i.network,
            i.ip,
            i.prefix_len,
            i.gateway,
            i.mac,
            i.host_ifname,
            i.host_ifindex,
            i.host_mac,
            if i.aliases.is_empty() {
                "-".to_owned()
            } else {
                i.aliases.join(", ")
            }
        );
    }
    out
}

fn stats_text(s: &EndpointStats) -> String {
    let mut out = table(
        &["DIRECTION", "PACKETS", "BYTES"],
        vec![
            vec![
                "from endpoint".into(),
                s.from_endpoint.packets.to_string(),
                s.from_endpoint.bytes.to_string(),
            ],
            vec![
                "to endpoint".into(),
                s.to_endpoint.packets.to_string(),
                s.to_endpoint.bytes.to_string(),
            ],
        ],
    );
    out += "\n";
    if s.drops.is_empty() {
        out += "no drops\n";
    } else {
        out += &table(
            &["DROP REASON", "CODE", "PACKETS", "BYTES"],
            s.drops
                .iter()
                .map(|d| {
                    vec![
                        d.reason.clone(),
                        d.code.to_string(),
                        d.packets.to_string(),
                        d.bytes.to_string(),
                    ]
                })
                .collect(),
        );
    }
    out
}

fn ct_table(flows: &[conntrack::Flow]) -> String {
    table(
        &[
            "KIND",
            "PROTO",
            "SOURCE",
            "DESTINATION",
            "NEW SOURCE",
            "NEW DESTINATION",
            "STATE",
            "IDLE",
            "PACKETS",
            "BYTES",
        ],
        flows
            .iter()
            .map(|f| {
                vec![
                    f.kind.clone(),
                    f.proto.clone(),
                    format!("{}:{}", f.source, f.source_port),
                    format!("{}:{}", f.destination, f.destination_port),
                    format!("{}:{}", f.new_source, f.new_source_port),
                    format!("{}:{}", f.new_destination, f.new_destination_port),
                    f.state.clone(),
                    format!("{}s", f.idle_secs),
                    format!("{}/{}", f.packets_original, f.packets_reply),
                    format!("{}/{}", f.bytes_original, f.bytes_reply),
                ]
            })
            .collect(),
    )
}

fn nat_import_text(report: &api::NatImport) -> String {
    let mut text = String::new();
    let verb = if report.dry_run {
        "would install (dry run: nothing changed)"
    } else {
        "installed"
    };
    let installed: Vec<&api::NatImportLine> =
        report.publish.iter().chain(&report.masquerade).collect();
    text += &format!("{verb}: {}\n", installed.len());
    for l in installed {
        text += &format!("  {}\n      line {}: {}\n", l.action, l.line, l.rule);
        if let Some(note) = &l.note {
            text += &format!("      note: {note}\n");
        }
    }
    for (title, rules) in [
        ("already in place", &report.covered),
        ("not imported", &report.skipped),
    ] {
        text += &format!("{title}: {}\n", rules.len());
        for r in rules {
            text += &format!("  line {}: {}\n      {}\n", r.line, r.rule, r.reason);
        }
    }
    text
}

/// `[HOSTIP:]HOSTPORT/PROTO -> IP:PORT (endpoint)`, one published port.
fn port_line(p: &PublishedPort) -> String {
    let host = match p.host_ip {
        Some(ip) => format!("{ip}:{}", p.host_port),
        None => format!("{}", p.host_port),
    };
    let allow = if p.allow.is_empty() {
        String::new()
    } else {
        format!(" allow {}", p.allow.join(","))
    };
    format!(
        "{host}/{} -> {}:{} ({}){allow}",
        p.proto.name(),
        p.ip,
        p.port,
        p.endpoint
    )
}

fn ports_table(ports: &[PublishedPort]) -> String {
    table(
        &["HOST", "PROTO", "ENDPOINT", "TARGET", "ALLOW"],
        ports
            .iter()
            .map(|p| {
                vec![
                    format!(
                        "{}:{}",
                        p.host_ip.map_or("*".to_owned(), |ip| ip.to_string()),
                        p.host_port
                    ),
                    p.proto.name().to_owned(),
                    p.endpoint.clone(),
                    format!("{}:{}", p.ip, p.port),
                    if p.allow.is_empty() {
                        "any".to_owned()
                    } else {
                        p.allow.join(",")
                    },
                ]
            })
            .collect(),
    )
}

fn hosts_table(hosts: &[api::HostLease]) -> String {
    table(
        &["HOST", "NETWORK", "SUBNET", "VTEP", "EXPIRES IN"],
        hosts
            .iter()
            .map(|h| {
                vec![
                    if h.this_host {
                        format!("{} (this host)", h.host)
                    } else {
                        h.host.clone()
                    },
                    h.network.clone(),
                    h.subnet.clone(),
                    h.vtep.to_string(),
                    format!("{}s", h.expires_in_secs),
                ]
            })
            .collect(),
    )
}

fn routes_table(routes: &[api::BpfRouteEntry]) -> String {
    table(
        &["SUBNET", "VTEP", "VNI"],
        routes
            .iter()
            .map(|r| {
                vec![
                    r.subnet.clone(),
                    r.vtep
                        .map_or("unreachable (pool)".to_owned(), |v| v.to_string()),
                    r.vni.to_string(),
                ]
            })
            .collect(),
    )
}

fn bpf_nat_table(entries: &[api::BpfPublishedEntry]) -> String {
    table(
        &["HOST", "PROTO", "TARGET", "ID", "ALLOW"],
        entries
            .iter()
            .map(|e| {
                vec![
                    format!(
                        "{}:{}",
                        e.host_ip.map_or("*".to_owned(), |ip| ip.to_string()),
                        e.host_port
                    ),
                    e.proto.clone(),
                    format!("{}:{}", e.ip, e.port),
                    e.id.to_string(),
                    if e.allow.is_empty() {
                        "any".to_owned()
                    } else {
                        e.allow.join(",")
                    },
                ]
            })
            .collect(),
    )
}

/// The pinned maps under `--bpffs-dir`, read without the agent.
fn pinned_maps(cli: &Cli) -> anyhow::Result<Maps> {
    Maps::open_pinned(&cli.bpffs_dir)
        .with_context(|| format!("opening the pinned maps under {}", cli.bpffs_dir.display()))
}

fn bpf_counters_text(c: &BpfCounters) -> String {
    let mut text = String::from("traffic (ENDPOINT_TRAFFIC, by ENDPOINT_SLOTS):\n");
    text.push_str(&table(
        &[
            "IFINDEX",
            "SLOT",
            "FROM ENDPOINT PACKETS",
            "BYTES",
            "TO ENDPOINT PACKETS",
            "BYTES",
        ],
        c.traffic
            .iter()
            .map(|t| {
                vec![
                    t.ifindex.to_string(),
                    t.slot.to_string(),
                    t.from_endpoint.packets.to_string(),
                    t.from_endpoint.bytes.to_string(),
                    t.to_endpoint.packets.to_string(),
                    t.to_endpoint.bytes.to_string(),
                ]
            })
            .collect(),
    ));
    text.push_str("\ndrops (ENDPOINT_DROPS):\n");
    if c.drops.is_empty() {
        text.push_str("none\n");
    } else {
        text.push_str(&table(
            &["IFINDEX", "REASON", "PACKETS", "BYTES"],
            c.drops
                .iter()
                .map(|d| {
                    vec![
                        d.ifindex.to_string(),
                        d.reason.clone(),
                        d.packets.to_string(),
                        d.bytes.to_string(),
                    ]
                })
                .collect(),
        ));
    }
    text.push_str("\nNAT events (NAT_STATS):\n");
    text.push_str(&table(
        &["EVENT", "COUNT"],
        c.nat
            .iter()
            .map(|e| vec![e.name.clone(), e.count.to_string()])
            .collect(),
    ));
    text.push_str(&format!(
        "\nOVERLAY: VXLAN device ifindex {}\n",
        match c.vxlan_ifindex {
            0 => "- (no overlay network)".to_owned(),
            i => i.to_string(),
        }
    ));
    text
}

fn bpf_endpoints_table(entries: &[BpfEndpointEntry]) -> String {
    table(
        &[
            "IP",
            "IFINDEX",
            "NETWORK ID",
            "GATEWAY",
            "MAC",
            "HOST MAC",
            "COUNTER SLOT",
            "FLAGS",
        ],
        entries
            .iter()
            .map(|e| {
                vec![
                    e.ip.to_string(),
                    e.ifindex.to_string(),
                    e.network_id.to_string(),
                    e.gateway.to_string(),
                    e.mac.clone(),
                    e.host_mac.clone(),
                    e.slot.to_string(),
                    if e.flags.is_empty() {
                        "-".to_owned()
                    } else {
                        e.flags.join(",")
                    },
                ]
            })
            .collect(),
    )
}
