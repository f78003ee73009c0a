//! netctl: see and steer net-agent. Listings take `-o json`; `netctl bpf ...` reads the pinned
//! maps directly, so it works with the agent stopped.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use net_agent::{
    api::{self, BpfEndpointEntry, Endpoint, EndpointStats, Network, Request, Status},
    client,
    datapath::Maps,
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
    /// Read the pinned BPF maps directly (works while the agent is stopped).
    #[command(subcommand)]
    Bpf(BpfCmd),
}

#[derive(Subcommand)]
enum NetworkCmd {
    /// Create a network.
    Create {
        name: String,
        /// IPv4 subnet in canonical form, e.g. 10.10.0.0/24.
        #[arg(long)]
        subnet: String,
        /// Gateway address (default: the subnet's first host).
        #[arg(long)]
        gateway: Option<String>,
        /// MTU of the endpoints' interfaces (default 1500).
        #[arg(long)]
        mtu: Option<u32>,
    },
    /// List networks.
    #[command(alias = "list")]
    Ls,
    /// Show one network.
    Inspect { name: String },
    /// Remove a network (refused while endpoints are attached).
    #[command(alias = "remove")]
    Rm { name: String },
}

#[derive(Subcommand)]
enum EndpointCmd {
    /// Create an endpoint: a namespace (made, or adopted with --netns), a veth, its address and
    /// default route.
    Create {
        name: String,
        #[arg(long)]
        network: String,
        /// Address to use (default: the lowest free one).
        #[arg(long)]
        ip: Option<String>,
        /// Adopt an existing network namespace (a path like /run/netns/NAME) instead of making one.
        #[arg(long)]
        netns: Option<String>,
    },
    /// List endpoints.
    #[command(alias = "list")]
    Ls,
    /// Show one endpoint.
    Inspect { name: String },
    /// Remove an endpoint (and its namespace, if the agent made it).
    #[command(alias = "remove")]
    Rm { name: String },
    /// Packets, bytes and drops by reason.
    Stats { name: String },
}

#[derive(Subcommand)]
enum BpfCmd {
    /// The ENDPOINTS map: endpoint address -> interface, network, MACs.
    #[command(subcommand)]
    Endpoints(BpfList),
}

#[derive(Subcommand)]
enum BpfList {
    #[command(alias = "ls")]
    List,
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(&cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
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
                format!(
                    "agent {}\nnetworks:  {}\nendpoints: {}\nstate:     {}\nbpffs:     {}\nprograms:  {}\n",
                    s.version,
                    s.networks,
                    s.endpoints,
                    s.state_dir,
                    s.bpffs_dir,
                    s.programs.join(", ")
                )
            })
        }
        Command::Network(cmd) => match cmd {
            NetworkCmd::Create {
                name,
                subnet,
                gateway,
                mtu,
            } => {
                let network: Network = serde_json::from_value(call(Request::NetworkCreate {
                    name: name.clone(),
                    subnet: subnet.clone(),
                    gateway: gateway.clone(),
                    mtu: *mtu,
                })?)?;
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
        },
        Command::Endpoint(cmd) => match cmd {
            EndpointCmd::Create {
                name,
                network,
                ip,
                netns,
            } => {
                let endpoint: Endpoint = serde_json::from_value(call(Request::EndpointCreate {
                    name: name.clone(),
                    network: network.clone(),
                    ip: ip.clone(),
                    netns: netns.clone(),
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
            EndpointCmd::Rm { name } => {
                call(Request::EndpointRemove { name: name.clone() })?;
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
            let maps = Maps::open_pinned(&cli.bpffs_dir).with_context(|| {
                format!("opening the pinned maps under {}", cli.bpffs_dir.display())
            })?;
            let entries = maps.list_endpoints()?;
            emit(out, &entries, |e| bpf_endpoints_table(e))
        }
    }
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
        &["NAME", "ID", "SUBNET", "GATEWAY", "MTU", "ENDPOINTS"],
        networks
            .iter()
            .map(|n| {
                vec![
                    n.name.clone(),
                    n.id.to_string(),
                    n.subnet.clone(),
                    n.gateway.to_string(),
                    n.mtu.to_string(),
                    n.endpoints.len().to_string(),
                ]
            })
            .collect(),
    )
}

fn network_detail(n: &Network) -> String {
    format!(
        "name:      {}\nid:        {}\nsubnet:    {}\ngateway:   {}\nmtu:       {}\nendpoints: {}\n",
        n.name,
        n.id,
        n.subnet,
        n.gateway,
        n.mtu,
        if n.endpoints.is_empty() {
            "-".to_owned()
        } else {
            n.endpoints.join(", ")
        }
    )
}

fn endpoints_table(endpoints: &[Endpoint]) -> String {
    table(
        &["NAME", "NETWORK", "IP", "MAC", "HOST IF", "NETNS"],
        endpoints
            .iter()
            .map(|e| {
                vec![
                    e.name.clone(),
                    e.network.clone(),
                    format!("{}/{}", e.ip, e.prefix_len),
                    e.mac.clone(),
                    e.host_ifname.clone(),
                    e.netns.clone(),
                ]
            })
            .collect(),
    )
}

fn endpoint_detail(e: &Endpoint) -> String {
    format!(
        "name:       {}\nnetwork:    {}\naddress:    {}/{}\ngateway:    {}\nmac:        {}\nnetns:      {}{}\ninterface:  {}\nhost veth:  {} (ifindex {}, mac {})\n",
        e.name,
        e.network,
        e.ip,
        e.prefix_len,
        e.gateway,
        e.mac,
        e.netns,
        if e.netns_owned { "" } else { " (adopted)" },
        e.ifname,
        e.host_ifname,
        e.host_ifindex,
        e.host_mac
    )
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

fn bpf_endpoints_table(entries: &[BpfEndpointEntry]) -> String {
    table(
        &["IP", "IFINDEX", "NETWORK ID", "GATEWAY", "MAC", "HOST MAC"],
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
                ]
            })
            .collect(),
    )
}
