//! Part 1: what each program path costs per packet, through `BPF_PROG_TEST_RUN`, next to an empty
//! classifier measured the same way in the same run.
//!
//! Method:
//! - The object is the one the agent embeds (the build script's output), loaded with private maps
//!   and ENDPOINTS holding the endpoints of the packet fixtures (`tests/tests/bpf_fixtures.rs`):
//!   A behind the test run's ifindex (1, loopback), its peer B and C on another network.
//! - Every call is `repeat = 1`, and the figure is the kernel's own ns for that run, averaged over
//!   many calls. A larger `repeat` would run the program again on the buffer it has just
//!   rewritten (the forward path would then measure a spoofed-MAC drop), and using `repeat = 1`
//!   for every path, the no-op included, gives every row the same fixed timer overhead, which the
//!   no-op row shows and "over no-op" takes away.
//! - Every call's verdict is checked, the first call's output frame too, and after each path the
//!   counter maps must hold exactly the calls made under exactly the expected keys: a path that
//!   quietly took another branch (a drop instead of a forward) fails the bench instead of
//!   reporting the wrong branch's cost. Counters are cleared before each path.
//! - Test runs happen in a thread inside the bench's own namespace (whose loopback is the skb's
//!   device), pinned to one CPU; paths are visited in a rotating order, round after round.

use std::{borrow::Cow, collections::BTreeMap, net::Ipv4Addr, os::fd::OwnedFd, path::Path, thread};

use anyhow::{Context as _, Result, bail};
use aya::{
    Ebpf,
    maps::{HashMap, MapData, PerCpuHashMap},
    programs::{SchedClassifier, TestRun as _, TestRunOptions, loaded_programs},
};
use net_ebpf_common::{
    DropCounters, DropKey, DropReason, EndpointInfo, EndpointKey, TrafficCounters, map_names,
    program_names,
};

use super::sys::{self, NOOP_NAME};

// Verdicts from include/uapi/linux/pkt_cls.h.
const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;

/// The ifindex the program sees under `BPF_PROG_TEST_RUN`: the loopback of the caller's namespace.
const TEST_RUN_IFINDEX: u32 = 1;

/// `bpf_redirect_peer`/`bpf_redirect` cannot fail under a test run (the redirect is only
/// recorded), so this reason has no path to measure.
const UNMEASURABLE: &[DropReason] = &[DropReason::RedirectFailed];

/// The masquerade programs on the uplink, and the reasons only they drop for, have no rows yet:
/// they come with the NAT part of the bench. Any other program or reason without a row fails the
/// bench, so a new path cannot go unmeasured by accident.
const NOT_YET: &[DropReason] = &[
    DropReason::ConntrackFull,
    DropReason::NatPortsExhausted,
    DropReason::Fragment,
];

/// What part 1 leaves out, for the report.
pub fn not_measured() -> String {
    format!(
        "Not measured yet: {} (masquerade at the uplink) and the drops only they make; they come \
         with the NAT rows of the bench.",
        program_names::UPLINK
            .iter()
            .map(|p| format!("`{p}`"))
            .collect::<Vec<_>>()
            .join(" and ")
    )
}

/// One program path's cost: the mean kernel-reported ns per packet of each round.
pub struct PathCost {
    pub name: &'static str,
    pub what: &'static str,
    pub program: &'static str,
    pub verdict: &'static str,
    pub ns_per_packet: Vec<f64>,
}

/// What `measure` needs: the object, where and how much to run.
pub struct Plan<'a> {
    pub object: &'a Path,
    pub netns: &'a str,
    pub cpu: usize,
    pub rounds: u32,
    pub calls: u32,
}

/// Measures every path, `rounds` times each.
pub fn measure(plan: &Plan<'_>) -> Result<Vec<PathCost>> {
    let object = plan.object.to_owned();
    let (netns, cpu, rounds, calls) = (plan.netns, plan.cpu, plan.rounds, plan.calls);
    thread::scope(|s| {
        let handle = s.spawn(move || -> Result<Vec<PathCost>> {
            sys::enter(netns, Some(cpu))?;
            run_all(&object, rounds, calls)
        });
        sys::joined("measuring the program paths", handle)
    })
}

fn run_all(object: &Path, rounds: u32, calls: u32) -> Result<Vec<PathCost>> {
    let mut ebpf = Ebpf::load_file(object).with_context(|| {
        format!(
            "loading the eBPF object {}: was it built by this checkout's net-agent build script?",
            object.display()
        )
    })?;
    // Every program, the uplink's too: loading is what shows the object is whole.
    for name in program_names::ALL {
        classifier(&mut ebpf, name)?
            .load()
            .with_context(|| format!("loading program {name} from {}", object.display()))?;
    }
    let noop = Noop::load()?;
    let mut maps = Maps::take(&mut ebpf)?;
    for endpoint in [&A, &B, &C] {
        maps.endpoints
            .insert(
                EndpointKey {
                    addr: endpoint.ip.octets(),
                },
                endpoint.info(),
                0,
            )
            .context("filling ENDPOINTS")?;
    }

    let cases = cases();
    check_coverage(&cases)?;
    let warmup = (calls / 10).max(10);
    let mut costs: Vec<PathCost> = cases
        .iter()
        .map(|c| PathCost {
            name: c.name,
            what: c.what,
            program: c.program.name(),
            verdict: verdict_name(c.verdict),
            ns_per_packet: Vec::new(),
        })
        .collect();
    for round in 0..rounds {
        // Rotating the order keeps any drift within a round (the CPU warming up, a neighbour
        // starting) from always landing on the same paths.
        let start = round as usize % cases.len();
        for index in (0..cases.len()).map(|i| (start + i) % cases.len()) {
            sys::check_interrupted()?;
            let case = &cases[index];
            let program = match case.program {
                Program::Noop => &noop.program,
                Program::Named(name) => &*classifier(&mut ebpf, name)?,
            };
            maps.clear_counters()?;
            let ns = run_case(program, case, warmup, calls)?;
            maps.check_counted(case, u64::from(warmup + calls))?;
            costs[index].ns_per_packet.push(ns);
        }
        println!(
            "program paths, round {}/{rounds}: {}",
            round + 1,
            costs
                .iter()
                .map(|c| format!(
                    "{} {:.1}",
                    c.name,
                    c.ns_per_packet.last().copied().unwrap_or(f64::NAN)
                ))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(costs)
}

/// `warmup` calls, then `calls` timed calls; returns the mean kernel-reported ns per run of the
/// timed calls.
fn run_case(program: &SchedClassifier, case: &Case, warmup: u32, calls: u32) -> Result<f64> {
    let mut out = vec![0u8; 512];
    let mut total_ns: u128 = 0;
    for call in 0..warmup + calls {
        let result = program
            .test_run(TestRunOptions {
                data_in: Some(&case.frame),
                data_out: Some(&mut out),
                repeat: 1,
                ..TestRunOptions::default()
            })
            .with_context(|| {
                format!(
                    "BPF_PROG_TEST_RUN of {} on path {}",
                    case.program.name(),
                    case.name
                )
            })?;
        if result.return_value != case.verdict {
            bail!(
                "path {} ({}): call {call} returned {} instead of {}: the program no longer \
                 takes this path for this frame; update the bench case with the program",
                case.name,
                case.program.name(),
                verdict_name(result.return_value),
                verdict_name(case.verdict)
            );
        }
        if call == 0
            && let Some(expected) = &case.output
        {
            let len = usize::try_from(result.data_size_out).unwrap_or(usize::MAX);
            let actual = out.get(..len).unwrap_or(&out);
            if actual != expected.as_slice() {
                bail!(
                    "path {} ({}): the frame left behind is not the expected one\n  expected \
                     {expected:02x?}\n  actual   {actual:02x?}",
                    case.name,
                    case.program.name()
                );
            }
        }
        if call >= warmup {
            total_ns += result.duration.as_nanos();
        }
    }
    Ok(total_ns as f64 / f64::from(calls))
}

/// Every program the agent attaches and every drop reason that can happen under a test run has
/// a path here; anything new fails the bench until it gets one.
fn check_coverage(cases: &[Case]) -> Result<()> {
    for name in program_names::ALL {
        let measured = cases.iter().any(|c| c.program.name() == *name);
        if !measured && !program_names::UPLINK.contains(name) {
            bail!("program {name} has no path in the bench: add one to bench/programs.rs");
        }
    }
    for reason in DropReason::ALL {
        let measured = cases
            .iter()
            .any(|c| matches!(c.counted, Counted::Drop(r) if r == *reason));
        if !measured && !UNMEASURABLE.contains(reason) && !NOT_YET.contains(reason) {
            bail!(
                "drop reason {} has no path in the bench: add one to bench/programs.rs",
                reason.name()
            );
        }
    }
    Ok(())
}

fn classifier<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut SchedClassifier> {
    ebpf.program_mut(name)
        .with_context(|| format!("program {name} is not in the eBPF object"))?
        .try_into()
        .with_context(|| format!("program {name} is not a classifier"))
}

fn verdict_name(verdict: u32) -> &'static str {
    match verdict {
        TC_ACT_OK => "TC_ACT_OK",
        TC_ACT_SHOT => "TC_ACT_SHOT",
        TC_ACT_REDIRECT => "TC_ACT_REDIRECT",
        _ => "unexpected",
    }
}

/// The empty classifier, loaded by hand and wrapped as an aya program so that it is timed through
/// exactly the same calls as the others.
struct Noop {
    program: SchedClassifier,
    /// Our own reference; the aya program holds another, opened by id.
    _fd: OwnedFd,
}

impl Noop {
    fn load() -> Result<Self> {
        let (fd, id) = sys::load_noop_classifier()?;
        let info = loaded_programs()
            .filter_map(Result::ok)
            .find(|p| p.id() == id)
            .with_context(|| {
                format!("the no-op classifier (id {id}) is loaded but not listed by the kernel")
            })?;
        let program = SchedClassifier::from_program_info(info, Cow::Borrowed(NOOP_NAME))
            .context("opening the no-op classifier as an aya program")?;
        Ok(Self { program, _fd: fd })
    }
}

#[derive(Clone, Copy)]
enum Program {
    Noop,
    Named(&'static str),
}

impl Program {
    fn name(self) -> &'static str {
        match self {
            Program::Noop => NOOP_NAME,
            Program::Named(name) => name,
        }
    }
}

/// What a path leaves in the counter maps: exactly one packet per call under these keys.
enum Counted {
    Nothing,
    Traffic {
        from: &'static [u32],
        to: &'static [u32],
    },
    Drop(DropReason),
}

struct Case {
    name: &'static str,
    what: &'static str,
    program: Program,
    frame: Vec<u8>,
    verdict: u32,
    /// The frame the program must leave in the buffer, checked on the first call.
    output: Option<Vec<u8>>,
    counted: Counted,
}

fn cases() -> Vec<Case> {
    let from = Program::Named(program_names::TC_FROM_ENDPOINT);
    let a_to_b = tcp_frame(A.mac, A.host_mac, A.ip, B.ip);
    let a_to_outside = tcp_frame(A.mac, A.host_mac, A.ip, OUTSIDE_IP);
    let host_to_a = tcp_frame(A.host_mac, A.mac, OUTSIDE_IP, A.ip);
    let arp_for_gateway = arp_frame(
        BROADCAST_MAC,
        A.mac,
        ARP_OP_REQUEST,
        (A.mac, A.ip),
        ([0; 6], A.gateway),
    );
    let arp_reply = arp_frame(
        A.mac,
        A.host_mac,
        ARP_OP_REPLY,
        (A.host_mac, A.gateway),
        (A.mac, A.ip),
    );
    let arp_for_unknown = arp_frame(
        BROADCAST_MAC,
        A.mac,
        ARP_OP_REQUEST,
        (A.mac, A.ip),
        ([0; 6], UNKNOWN_IP),
    );
    let mut forwarded = a_to_b.clone();
    forwarded[0..6].copy_from_slice(&B.mac);
    forwarded[6..12].copy_from_slice(&B.host_mac);
    const FROM_A: Counted = Counted::Traffic {
        from: &[TEST_RUN_IFINDEX],
        to: &[],
    };
    let drop = |name, what, frame: Vec<u8>, reason| Case {
        name,
        what,
        program: from,
        frame,
        verdict: TC_ACT_SHOT,
        output: None,
        counted: Counted::Drop(reason),
    };
    vec![
        Case {
            name: "noop",
            what: "no-op classifier (baseline: returns TC_ACT_OK, touches nothing)",
            program: Program::Noop,
            frame: a_to_b.clone(),
            verdict: TC_ACT_OK,
            output: Some(a_to_b.clone()),
            counted: Counted::Nothing,
        },
        Case {
            name: "to_endpoint",
            what: "host to endpoint (counted, passed)",
            program: Program::Named(program_names::TC_TO_ENDPOINT),
            frame: host_to_a.clone(),
            verdict: TC_ACT_OK,
            output: Some(host_to_a),
            counted: Counted::Traffic {
                from: &[],
                to: &[TEST_RUN_IFINDEX],
            },
        },
        Case {
            name: "forward",
            what: "endpoint to endpoint (MACs rewritten, bpf_redirect_peer)",
            program: from,
            frame: a_to_b.clone(),
            verdict: TC_ACT_REDIRECT,
            output: Some(forwarded),
            counted: Counted::Traffic {
                from: &[TEST_RUN_IFINDEX],
                to: &[B.ifindex],
            },
        },
        Case {
            name: "arp_reply",
            what: "ARP request for the gateway (answered in place, bpf_redirect)",
            program: from,
            frame: arp_for_gateway,
            verdict: TC_ACT_REDIRECT,
            output: Some(arp_reply),
            counted: FROM_A,
        },
        Case {
            name: "host_bound",
            what: "endpoint to the outside (passed to the host stack)",
            program: from,
            frame: a_to_outside.clone(),
            verdict: TC_ACT_OK,
            output: Some(a_to_outside),
            counted: FROM_A,
        },
        drop(
            "drop_isolation",
            "drop: destination on another network",
            tcp_frame(A.mac, A.host_mac, A.ip, C.ip),
            DropReason::NetworkIsolation,
        ),
        drop(
            "drop_spoofed_ip",
            "drop: source IP of another endpoint",
            tcp_frame(A.mac, A.host_mac, B.ip, OUTSIDE_IP),
            DropReason::SpoofedSourceIp,
        ),
        drop(
            "drop_spoofed_mac",
            "drop: source MAC not the endpoint's",
            tcp_frame(STRANGER_MAC, A.host_mac, A.ip, B.ip),
            DropReason::SpoofedSourceMac,
        ),
        drop(
            "drop_arp_unknown",
            "drop: ARP for an address nobody owns",
            arp_for_unknown.clone(),
            DropReason::ArpTargetUnknown,
        ),
        drop(
            "drop_unsupported",
            "drop: neither IPv4 nor ARP (IPv6)",
            ipv6_frame(A.mac, A.host_mac),
            DropReason::UnsupportedProtocol,
        ),
        // The kernel refuses IPv4 frames shorter than their header before the program runs
        // (see the fixtures), but not ARP: a cut-off ARP request reaches the bounds check.
        drop(
            "drop_malformed",
            "drop: truncated ARP header",
            arp_for_unknown[..ETH_LEN + 20].to_vec(),
            DropReason::Malformed,
        ),
    ]
}

// ---------------------------------------------------------------------------------------------
// The maps.

struct Maps {
    endpoints: HashMap<MapData, EndpointKey, EndpointInfo>,
    traffic: PerCpuHashMap<MapData, u32, TrafficCounters>,
    drops: PerCpuHashMap<MapData, DropKey, DropCounters>,
}

impl Maps {
    fn take(ebpf: &mut Ebpf) -> Result<Self> {
        let mut take = |name: &str| {
            ebpf.take_map(name)
                .with_context(|| format!("map {name} is not in the eBPF object"))
        };
        Ok(Self {
            endpoints: take(map_names::ENDPOINTS)?
                .try_into()
                .context("map ENDPOINTS has an unexpected type")?,
            traffic: take(map_names::ENDPOINT_TRAFFIC)?
                .try_into()
                .context("map ENDPOINT_TRAFFIC has an unexpected type")?,
            drops: take(map_names::ENDPOINT_DROPS)?
                .try_into()
                .context("map ENDPOINT_DROPS has an unexpected type")?,
        })
    }

    fn clear_counters(&mut self) -> Result<()> {
        let traffic: Vec<u32> = self.traffic.keys().filter_map(Result::ok).collect();
        for key in traffic {
            self.traffic
                .remove(&key)
                .context("clearing ENDPOINT_TRAFFIC")?;
        }
        let drops: Vec<DropKey> = self.drops.keys().filter_map(Result::ok).collect();
        for key in drops {
            self.drops.remove(&key).context("clearing ENDPOINT_DROPS")?;
        }
        Ok(())
    }

    /// Packets counted, summed over CPUs, by a readable key; zero counts left out.
    fn counted(&self) -> Result<BTreeMap<String, u64>> {
        let mut counted = BTreeMap::new();
        for item in self.traffic.iter() {
            let (ifindex, per_cpu) = item.context("reading ENDPOINT_TRAFFIC")?;
            let from: u64 = per_cpu.iter().map(|c| c.from_endpoint_packets).sum();
            let to: u64 = per_cpu.iter().map(|c| c.to_endpoint_packets).sum();
            if from > 0 {
                counted.insert(format!("from_endpoint[{ifindex}]"), from);
            }
            if to > 0 {
                counted.insert(format!("to_endpoint[{ifindex}]"), to);
            }
        }
        for item in self.drops.iter() {
            let (key, per_cpu) = item.context("reading ENDPOINT_DROPS")?;
            let packets: u64 = per_cpu.iter().map(|c| c.packets).sum();
            if packets > 0 {
                counted.insert(
                    format!("drop[{}, {}]", key.ifindex, reason_name(key.reason)),
                    packets,
                );
            }
        }
        Ok(counted)
    }

    fn check_counted(&self, case: &Case, packets: u64) -> Result<()> {
        let mut expected = BTreeMap::new();
        match case.counted {
            Counted::Nothing => {}
            Counted::Traffic { from, to } => {
                for ifindex in from {
                    expected.insert(format!("from_endpoint[{ifindex}]"), packets);
                }
                for ifindex in to {
                    expected.insert(format!("to_endpoint[{ifindex}]"), packets);
                }
            }
            Counted::Drop(reason) => {
                expected.insert(
                    format!("drop[{TEST_RUN_IFINDEX}, {}]", reason.name()),
                    packets,
                );
            }
        }
        let actual = self.counted()?;
        if actual != expected {
            bail!(
                "path {} ({}): after {packets} calls the counters hold {actual:?}, expected \
                 {expected:?}: the program took another branch than the one this row measures",
                case.name,
                case.program.name()
            );
        }
        Ok(())
    }
}

fn reason_name(code: u32) -> String {
    DropReason::from_u32(code).map_or_else(|| format!("unknown-{code}"), |r| r.name().to_owned())
}

// ---------------------------------------------------------------------------------------------
// Endpoints and frames, as in the packet fixtures.

struct Endpoint {
    ip: Ipv4Addr,
    mac: [u8; 6],
    host_mac: [u8; 6],
    ifindex: u32,
    network_id: u32,
    gateway: Ipv4Addr,
}

impl Endpoint {
    fn info(&self) -> EndpointInfo {
        EndpointInfo {
            ifindex: self.ifindex,
            network_id: self.network_id,
            gateway: self.gateway.octets(),
            mac: self.mac,
            host_mac: self.host_mac,
            // No masquerade: the endpoint programs do not read it, the uplink's do.
            flags: 0,
        }
    }
}

/// The sender: behind the interface the test run uses.
const A: Endpoint = Endpoint {
    ip: Ipv4Addr::new(10, 1, 0, 2),
    mac: [0x02, 0, 0, 0, 0x0a, 0x02],
    host_mac: [0x02, 0, 0, 0, 0xaa, 0x02],
    ifindex: TEST_RUN_IFINDEX,
    network_id: 1,
    gateway: Ipv4Addr::new(10, 1, 0, 1),
};

/// A's peer on the same network (a made-up ifindex: the redirect is only recorded).
const B: Endpoint = Endpoint {
    ip: Ipv4Addr::new(10, 1, 0, 3),
    mac: [0x02, 0, 0, 0, 0x0b, 0x03],
    host_mac: [0x02, 0, 0, 0, 0xbb, 0x03],
    ifindex: 42,
    network_id: 1,
    gateway: Ipv4Addr::new(10, 1, 0, 1),
};

/// On another network: A must not reach it.
const C: Endpoint = Endpoint {
    ip: Ipv4Addr::new(10, 2, 0, 2),
    mac: [0x02, 0, 0, 0, 0x0c, 0x02],
    host_mac: [0x02, 0, 0, 0, 0xcc, 0x02],
    ifindex: 43,
    network_id: 2,
    gateway: Ipv4Addr::new(10, 2, 0, 1),
};

const STRANGER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x66, 0x66];
const UNKNOWN_IP: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 99);
const OUTSIDE_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const BROADCAST_MAC: [u8; 6] = [0xff; 6];
const ETH_LEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_ARP: u16 = 0x0806;
const ETH_P_IPV6: u16 = 0x86dd;
const ARP_OP_REQUEST: u16 = 1;
const ARP_OP_REPLY: u16 = 2;

fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn ethernet(dst: [u8; 6], src: [u8; 6], ether_type: u16, payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(ETH_LEN + payload.len());
    frame.extend_from_slice(&dst);
    frame.extend_from_slice(&src);
    frame.extend_from_slice(&ether_type.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// A TCP SYN from `src:40000` to `dst:80` (valid IPv4 and TCP checksums) in an Ethernet frame:
/// 54 bytes, the size of the packets request/response traffic is made of.
fn tcp_frame(src_mac: [u8; 6], dst_mac: [u8; 6], src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    let mut tcp = Vec::with_capacity(20);
    tcp.extend_from_slice(&40000u16.to_be_bytes());
    tcp.extend_from_slice(&80u16.to_be_bytes());
    tcp.extend_from_slice(&1u32.to_be_bytes());
    tcp.extend_from_slice(&0u32.to_be_bytes());
    tcp.extend_from_slice(&[5 << 4, 0x02]); // data offset 5, SYN
    tcp.extend_from_slice(&64240u16.to_be_bytes());
    tcp.extend_from_slice(&[0, 0, 0, 0]);
    let mut pseudo = Vec::with_capacity(32);
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, 6, 0, 20]);
    pseudo.extend_from_slice(&tcp);
    tcp[16..18].copy_from_slice(&checksum(&pseudo).to_be_bytes());

    let mut ip = vec![0x45, 0, 0, 40, 0x12, 0x34, 0x40, 0, 64, 6, 0, 0];
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let check = checksum(&ip);
    ip[10..12].copy_from_slice(&check.to_be_bytes());
    ip.extend_from_slice(&tcp);
    ethernet(dst_mac, src_mac, ETH_P_IP, &ip)
}

fn arp_frame(
    eth_dst: [u8; 6],
    eth_src: [u8; 6],
    op: u16,
    (sha, spa): ([u8; 6], Ipv4Addr),
    (tha, tpa): ([u8; 6], Ipv4Addr),
) -> Vec<u8> {
    let mut arp = vec![0, 1, 0x08, 0x00, 6, 4];
    arp.extend_from_slice(&op.to_be_bytes());
    arp.extend_from_slice(&sha);
    arp.extend_from_slice(&spa.octets());
    arp.extend_from_slice(&tha);
    arp.extend_from_slice(&tpa.octets());
    ethernet(eth_dst, eth_src, ETH_P_ARP, &arp)
}

/// An IPv6 fixed header with no payload.
fn ipv6_frame(src_mac: [u8; 6], dst_mac: [u8; 6]) -> Vec<u8> {
    let mut ipv6 = vec![0x60, 0, 0, 0, 0, 0, 59, 64];
    ipv6.extend_from_slice(&[0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
    ipv6.extend_from_slice(&[0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    ethernet(dst_mac, src_mac, ETH_P_IPV6, &ipv6)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_carry_valid_checksums() {
        let frame = tcp_frame(A.mac, A.host_mac, A.ip, B.ip);
        assert_eq!(frame.len(), 54);
        assert_eq!(checksum(&frame[ETH_LEN..ETH_LEN + 20]), 0, "IPv4 header");
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&A.ip.octets());
        pseudo.extend_from_slice(&B.ip.octets());
        pseudo.extend_from_slice(&[0, 6, 0, 20]);
        pseudo.extend_from_slice(&frame[ETH_LEN + 20..]);
        assert_eq!(checksum(&pseudo), 0, "TCP over the pseudo-header");
    }

    #[test]
    fn every_program_and_drop_reason_has_a_path() {
        check_coverage(&cases()).expect("coverage");
    }
}
