//! Part 1: what each program path costs per packet, through `BPF_PROG_TEST_RUN`, next to an empty
//! classifier measured the same way in the same run.
//!
//! Method:
//! - The object is the one the agent embeds (the build script's output), loaded with private maps
//!   as an agent with an uplink loads it (the host's address set, so NAT is on), and ENDPOINTS
//!   holding the endpoints of the packet fixtures (see [`frames`]). The masquerade range is one
//!   port, so that translated frames are known in advance.
//! - Every call is `repeat = 1`, and the figure is the kernel's own ns for that run, averaged over
//!   many calls. A larger `repeat` would run the program again on the buffer it has just
//!   rewritten (the forward path would then measure a spoofed-MAC drop), and using `repeat = 1`
//!   for every path, the no-op included, gives every row the same fixed timer overhead, which the
//!   no-op row shows and "over no-op" takes away.
//! - Paths that need state get it before their calls: an established flow is made by sending its
//!   first packet through the programs; a full table is filled from user space. A first-packet
//!   path names the conntrack entries each call must create, and they are removed (from user
//!   space, between calls, outside the timed run) after every call, so every call is a first
//!   packet; a call that did not create them fails the bench.
//! - Every call's verdict is checked, the first call's output frame too, and after each path the
//!   counter maps must hold exactly the calls made under exactly the expected keys: a path that
//!   quietly took another branch (a drop instead of a forward) fails the bench instead of
//!   reporting the wrong branch's cost. Counters and flows are cleared before each path.
//! - Test runs happen in a thread inside the bench's own namespace (whose loopback is the skb's
//!   device), pinned to one CPU; paths are visited in a rotating order, round after round.
//! - NAT scale: the two DNAT paths again with 1 to 100,000 published ports in the map, the
//!   measured one among them; mapping counts are visited in a rotating order, round after round.

mod frames;
mod nat;
mod overlay;

use std::{borrow::Cow, collections::BTreeMap, os::fd::OwnedFd, path::Path, thread};

use anyhow::{Context as _, Result, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{
        HashMap, LpmTrie, MapData, PerCpuArray, PerCpuHashMap, PerCpuValues,
        lpm_trie::Key as LpmKey,
    },
    programs::{SchedClassifier, TestRun as _, TestRunOptions, loaded_programs},
};
use net_ebpf_common::{
    AllowKey, CtEntry, CtKey, DropCounters, DropKey, DropReason, EndpointInfo, EndpointKey,
    PublishKey, PublishTarget, TrafficCounters, global_names, map_names, program_names,
};

use crate::exec::{cmd, exec};

use self::frames::{
    A, ARP_OP_REPLY, ARP_OP_REQUEST, B, BROADCAST_MAC, C, ETH_LEN, Endpoint, HOST_IP, I, NAT_PORT,
    OUTSIDE_IP, Q, R, ROUTER_IP, ROUTER_MAC, STRANGER_MAC, TEST_RUN_IFINDEX, UNKNOWN_IP,
    UPLINK_NAME, arp_frame, ipv6_frame, tcp_frame,
};
use super::{
    report::{Backend, ScaleSample},
    rotation, scale,
    sys::{self, NOOP_NAME},
};

// Verdicts from include/uapi/linux/pkt_cls.h.
const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;

/// The ingress device of the packets a path has the host forward: any number but 0 (a packet
/// the host made), as the test run keeps it without looking it up.
const FORWARDED_FROM: u32 = 2;

/// Drop reasons with no path to measure under a test run. (`RedirectFailed` is measured where the
/// program refuses before redirecting, a published port whose endpoint is gone: a redirect
/// itself cannot fail in a test run, which only records it.)
const UNMEASURABLE: &[DropReason] = &[
    // Needs tunnel metadata on the skb, which a test run cannot attach (see `overlay`).
    DropReason::OverlayNoEndpoint,
];

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
    /// Numbers of published ports for the scale rows; empty: no scale rows.
    pub mappings: &'a [u32],
}

/// The paths' costs and the scale rows.
pub struct Measured {
    pub paths: Vec<PathCost>,
    pub scale: Vec<ScaleSample>,
}

/// Gives the namespace the programs run in an uplink: one end of a veth pair (this kernel has
/// no dummy devices) with the host's address and a default route through a router
/// whose neighbour entry is permanent, so that `tc_from_endpoint` can route the replies of flows
/// translated at the uplink out of it (`bpf_fib_lookup`; under a test run the redirect is only
/// recorded, nothing is sent).
pub fn add_uplink(netns: &str) -> Result<()> {
    let ip = |args: &[&str]| exec(cmd("ip").args(["-n", netns]).args(args));
    ip(&[
        "link",
        "add",
        UPLINK_NAME,
        "type",
        "veth",
        "peer",
        "name",
        "router",
    ])?;
    ip(&["link", "set", "router", "up"])?;
    ip(&["addr", "add", &format!("{HOST_IP}/24"), "dev", UPLINK_NAME])?;
    ip(&["link", "set", UPLINK_NAME, "up"])?;
    let router_mac = ROUTER_MAC.map(|b| format!("{b:02x}")).join(":");
    ip(&[
        "neigh",
        "add",
        &ROUTER_IP.to_string(),
        "lladdr",
        &router_mac,
        "dev",
        UPLINK_NAME,
        "nud",
        "permanent",
    ])?;
    ip(&[
        "route",
        "add",
        "default",
        "via",
        &ROUTER_IP.to_string(),
        "dev",
        UPLINK_NAME,
    ])
}

/// Measures every path, `rounds` times each, then the scale rows.
pub fn measure(plan: &Plan<'_>) -> Result<Measured> {
    let netns = plan.netns;
    let cpu = plan.cpu;
    thread::scope(|s| {
        let handle = s.spawn(move || -> Result<Measured> {
            sys::enter(netns, Some(cpu))?;
            let mut bench = Bench::load(plan.object)?;
            let paths = bench.paths(plan.rounds, plan.calls)?;
            let scale = bench.scale(plan.rounds, plan.calls, plan.mappings)?;
            Ok(Measured { paths, scale })
        });
        sys::joined("measuring the program paths", handle)
    })
}

/// The loaded object, the no-op and the maps.
struct Bench {
    ebpf: Ebpf,
    noop: Noop,
    maps: Maps,
}

impl Bench {
    fn load(object: &Path) -> Result<Self> {
        let host = u32::from_ne_bytes(HOST_IP.octets());
        let uplink = nix::net::if_::if_nametoindex(UPLINK_NAME)
            .with_context(|| format!("the bench's uplink {UPLINK_NAME} (see add_uplink)"))?;
        let mut ebpf = EbpfLoader::new()
            .override_global(global_names::HOST_IPV4, &host, true)
            .override_global(global_names::UPLINK_IFINDEX, &uplink, true)
            .override_global(global_names::NAT_PORT_MIN, &NAT_PORT, true)
            .override_global(global_names::NAT_PORT_MAX, &NAT_PORT, true)
            .load_file(object)
            .with_context(|| {
                format!(
                    "loading the eBPF object {}: was it built by this checkout's net-agent build \
                     script?",
                    object.display()
                )
            })?;
        // Every program: loading is what shows the object is whole.
        for name in program_names::ALL {
            classifier(&mut ebpf, name)?
                .load()
                .with_context(|| format!("loading program {name} from {}", object.display()))?;
        }
        let noop = Noop::load()?;
        let mut maps = Maps::take(&mut ebpf)?;
        for endpoint in [&A, &B, &C, &Q, &R, &I] {
            maps.add_endpoint(endpoint)?;
        }
        nat::publish(&mut maps)?;
        overlay::install(&mut ebpf, &mut maps)?;
        Ok(Self { ebpf, noop, maps })
    }

    fn program(&mut self, program: Program) -> Result<&SchedClassifier> {
        Ok(match program {
            Program::Noop => &self.noop.program,
            Program::Named(name) => &*classifier(&mut self.ebpf, name)?,
        })
    }

    /// Puts `case`'s state in place (flows, a full table) on clear maps, runs it `warmup +
    /// calls` times and checks what it counted; returns the mean ns of the timed calls.
    fn measure_case(&mut self, case: &Case, warmup: u32, calls: u32) -> Result<f64> {
        self.maps.clear_flows()?;
        if case.before.full_conntrack {
            self.maps.fill_conntrack()?;
        }
        for packet in &case.before.packets {
            let program = self.program(packet.program)?;
            let (verdict, _, _) = run_once(program, &packet.frame, 0)
                .with_context(|| format!("preparing path {}", case.name))?;
            if verdict != packet.verdict {
                bail!(
                    "path {}: the packet that prepares it ({}) returned {} instead of {}",
                    case.name,
                    packet.program.name(),
                    verdict_name(verdict),
                    verdict_name(packet.verdict)
                );
            }
        }
        self.maps.clear_counters()?;
        // A dropped packet leaves no flow behind (a full table is left as it is).
        let drop = matches!(case.counted, Counted::Drop(_)) && !case.before.full_conntrack;
        let flows_before = if drop {
            Some(self.maps.flow_count()?)
        } else {
            None
        };
        let mut total_ns: u128 = 0;
        for call in 0..warmup + calls {
            let program = self.program(case.program)?;
            let (verdict, output, duration) = run_once(program, &case.frame, case.ingress_ifindex)
                .with_context(|| {
                    format!(
                        "BPF_PROG_TEST_RUN of {} on path {}",
                        case.program.name(),
                        case.name
                    )
                })?;
            if verdict != case.verdict {
                bail!(
                    "path {} ({}): call {call} returned {} instead of {}: the program no longer \
                     takes this path for this frame; update the bench case with the program",
                    case.name,
                    case.program.name(),
                    verdict_name(verdict),
                    verdict_name(case.verdict)
                );
            }
            if call == 0
                && let Some(expected) = &case.output
                && output != *expected
            {
                bail!(
                    "path {} ({}): the frame left behind is not the expected one\n  expected \
                     {expected:02x?}\n  actual   {output:02x?}",
                    case.name,
                    case.program.name()
                );
            }
            for key in &case.creates {
                self.maps.conntrack.remove(key).with_context(|| {
                    format!(
                        "path {} ({}): call {call} did not create the conntrack entry {key:?} \
                         a first packet of this path creates",
                        case.name,
                        case.program.name()
                    )
                })?;
            }
            if call >= warmup {
                total_ns += duration;
            }
        }
        self.maps.check_counted(case, u64::from(warmup + calls))?;
        if let Some(before) = flows_before {
            let after = self.maps.flow_count()?;
            if after != before {
                bail!(
                    "path {} ({}): the dropped packets changed CONNTRACK from {before} to {after} \
                     entries: a drop must leave no flow behind",
                    case.name,
                    case.program.name()
                );
            }
        }
        if case.before.full_conntrack {
            self.maps.clear_flows()?;
        }
        Ok(total_ns as f64 / f64::from(calls))
    }

    /// Every path, `rounds` times.
    fn paths(&mut self, rounds: u32, calls: u32) -> Result<Vec<PathCost>> {
        let cases = cases();
        check_coverage(&cases)?;
        let warmup = warmup(calls);
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
            for index in rotation(round, cases.len()) {
                sys::check_interrupted()?;
                let ns = self.measure_case(&cases[index], warmup, calls)?;
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

    /// The DNAT paths (first packet, established) with each number of published ports in
    /// `mappings`, the measured port among them, and the no-op alongside.
    fn scale(&mut self, rounds: u32, calls: u32, mappings: &[u32]) -> Result<Vec<ScaleSample>> {
        if mappings.is_empty() {
            return Ok(Vec::new());
        }
        let paths = nat::scale_cases();
        let warmup = warmup(calls);
        nat::unpublish_extras(&mut self.maps)?;
        let mut fillers = scale::Fillers::new(B.ip, frames::SERVER_PORT);
        let mut samples = Vec::new();
        for round in 0..rounds {
            for index in rotation(round, mappings.len()) {
                sys::check_interrupted()?;
                let n = mappings[index];
                fillers.set(&mut self.maps.published, n.saturating_sub(1))?;
                for (quantity, case) in &paths {
                    let ns = self.measure_case(case, warmup, calls)?;
                    samples.push(ScaleSample {
                        quantity: *quantity,
                        backend: Backend::Ours,
                        mappings: n,
                        round,
                        value: ns,
                    });
                }
            }
            println!(
                "program paths with many published ports, round {}/{rounds}: {}",
                round + 1,
                samples
                    .iter()
                    .filter(|s| s.round == round)
                    .map(|s| format!("{} n={} {:.1}", s.quantity.name(), s.mappings, s.value))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        fillers.set(&mut self.maps.published, 0)?;
        Ok(samples)
    }
}

/// Unmeasured calls before the timed ones.
fn warmup(calls: u32) -> u32 {
    (calls / 10).max(10)
}

/// Offsets of `ingress_ifindex` and `ifindex` in `struct __sk_buff` (include/uapi/linux/bpf.h).
const SKB_INGRESS_IFINDEX_OFFSET: usize = 36;
const SKB_IFINDEX_OFFSET: usize = 40;

/// One `BPF_PROG_TEST_RUN` (`repeat = 1`) of `frame` on the loopback, as if it entered the
/// host on `ingress_ifindex` (0: made by the host): the verdict, the frame left behind and the
/// kernel's ns for the run.
fn run_once(
    program: &SchedClassifier,
    frame: &[u8],
    ingress_ifindex: u32,
) -> Result<(u32, Vec<u8>, u128)> {
    let mut out = vec![0u8; 512];
    // A context puts the packet on `ifindex` (0: the loopback) and wants every other field it
    // does not take zero; a shorter one is zero-extended.
    let ctx = (ingress_ifindex != 0).then(|| {
        let mut ctx = vec![0u8; SKB_IFINDEX_OFFSET + 4];
        ctx[SKB_INGRESS_IFINDEX_OFFSET..SKB_IFINDEX_OFFSET]
            .copy_from_slice(&ingress_ifindex.to_ne_bytes());
        ctx
    });
    let result = program.test_run(TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        repeat: 1,
        ctx_in: ctx.as_deref(),
        ..TestRunOptions::default()
    })?;
    let len = usize::try_from(result.data_size_out).unwrap_or(usize::MAX);
    out.truncate(len);
    Ok((result.return_value, out, result.duration.as_nanos()))
}

/// Every program the agent attaches and every drop reason that can happen under a test run has
/// a path here; anything new fails the bench until it gets one.
fn check_coverage(cases: &[Case]) -> Result<()> {
    for name in program_names::ALL {
        if !cases.iter().any(|c| c.program.name() == *name) {
            bail!("program {name} has no path in the bench: add one to bench/programs.rs");
        }
    }
    for reason in DropReason::ALL {
        let measured = cases
            .iter()
            .any(|c| matches!(c.counted, Counted::Drop(r) if r == *reason));
        if !measured && !UNMEASURABLE.contains(reason) {
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

/// A frame sent through a program to prepare a path, and the verdict it must get.
struct Packet {
    program: Program,
    frame: Vec<u8>,
    verdict: u32,
}

/// What a path needs in place before its calls.
#[derive(Default)]
struct Before {
    /// Sent through the programs first: the flows an established path finds.
    packets: Vec<Packet>,
    /// CONNTRACK filled to capacity with entries no packet matches.
    full_conntrack: bool,
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
    before: Before,
    /// Conntrack entries every call must create; removed after each call.
    creates: Vec<CtKey>,
    /// The device the packet entered the host on, for a packet the host forwards (the test
    /// run's `skb_iif`); 0 for one it made.
    ingress_ifindex: u32,
}

impl Case {
    /// A path that needs nothing in place and creates nothing.
    fn plain(
        name: &'static str,
        what: &'static str,
        program: Program,
        frame: Vec<u8>,
        verdict: u32,
        output: Option<Vec<u8>>,
        counted: Counted,
    ) -> Self {
        Self {
            name,
            what,
            program,
            frame,
            verdict,
            output,
            counted,
            before: Before::default(),
            creates: Vec::new(),
            ingress_ifindex: 0,
        }
    }

    fn drop(
        name: &'static str,
        what: &'static str,
        program: Program,
        frame: Vec<u8>,
        reason: DropReason,
    ) -> Self {
        Self::plain(
            name,
            what,
            program,
            frame,
            TC_ACT_SHOT,
            None,
            Counted::Drop(reason),
        )
    }
}

fn cases() -> Vec<Case> {
    let mut cases = endpoint_cases();
    cases.extend(nat::cases());
    cases.extend(overlay::cases());
    cases
}

/// The endpoint programs' paths, the no-op first.
fn endpoint_cases() -> Vec<Case> {
    let from = Program::Named(program_names::TC_FROM_ENDPOINT);
    let a_to_b = tcp_frame(A.mac, A.host_mac, A.ip, B.ip);
    let a_to_outside = tcp_frame(A.mac, A.host_mac, A.ip, OUTSIDE_IP);
    let host_to_a = tcp_frame(A.host_mac, A.mac, OUTSIDE_IP, A.ip);
    let outside_to_a = host_to_a.clone();
    let internal_to_host = tcp_frame(I.mac, I.host_mac, I.ip, HOST_IP);
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
    let drop = |name, what, frame, reason| Case::drop(name, what, from, frame, reason);
    vec![
        Case::plain(
            "noop",
            "no-op classifier (baseline: returns TC_ACT_OK, touches nothing)",
            Program::Noop,
            a_to_b.clone(),
            TC_ACT_OK,
            Some(a_to_b.clone()),
            Counted::Nothing,
        ),
        Case::plain(
            "to_endpoint",
            "host to endpoint (counted, passed)",
            Program::Named(program_names::TC_TO_ENDPOINT),
            host_to_a.clone(),
            TC_ACT_OK,
            Some(host_to_a),
            Counted::Traffic {
                from: &[],
                to: &[TEST_RUN_IFINDEX],
            },
        ),
        Case {
            ingress_ifindex: FORWARDED_FROM,
            ..Case::plain(
                "to_endpoint_forwarded",
                "host-forwarded packet to an endpoint (destination and source looked up, counted, \
                 passed)",
                Program::Named(program_names::TC_TO_ENDPOINT),
                outside_to_a.clone(),
                TC_ACT_OK,
                Some(outside_to_a),
                Counted::Traffic {
                    from: &[],
                    to: &[TEST_RUN_IFINDEX],
                },
            )
        },
        Case {
            ingress_ifindex: FORWARDED_FROM,
            ..Case::drop(
                "drop_internal_inbound",
                "drop: host-forwarded packet to an endpoint of an internal network",
                Program::Named(program_names::TC_TO_ENDPOINT),
                tcp_frame(I.host_mac, I.mac, OUTSIDE_IP, I.ip),
                DropReason::InternalNetwork,
            )
        },
        Case::plain(
            "forward",
            "endpoint to endpoint (MACs rewritten, bpf_redirect_peer)",
            from,
            a_to_b.clone(),
            TC_ACT_REDIRECT,
            Some(forwarded),
            Counted::Traffic {
                from: &[TEST_RUN_IFINDEX],
                to: &[B.ifindex],
            },
        ),
        Case::plain(
            "arp_reply",
            "ARP request for the gateway (answered in place, bpf_redirect)",
            from,
            arp_for_gateway,
            TC_ACT_REDIRECT,
            Some(arp_reply),
            FROM_A,
        ),
        Case::plain(
            "host_bound",
            "endpoint to the outside (passed to the host stack)",
            from,
            a_to_outside.clone(),
            TC_ACT_OK,
            Some(a_to_outside),
            FROM_A,
        ),
        drop(
            "drop_isolation",
            "drop: destination on another network",
            tcp_frame(A.mac, A.host_mac, A.ip, C.ip),
            DropReason::NetworkIsolation,
        ),
        drop(
            "drop_no_icc",
            "drop: another endpoint of a network without inter-endpoint traffic (`--no-icc`)",
            tcp_frame(Q.mac, Q.host_mac, Q.ip, R.ip),
            DropReason::IccDisabled,
        ),
        Case::plain(
            "internal_host_bound",
            "internal network's endpoint to a host address (FIB: not forwarded; passed)",
            from,
            internal_to_host.clone(),
            TC_ACT_OK,
            Some(internal_to_host),
            FROM_A,
        ),
        drop(
            "drop_internal",
            "drop: internal network's endpoint to the outside (FIB: forwarded)",
            tcp_frame(I.mac, I.host_mac, I.ip, OUTSIDE_IP),
            DropReason::InternalNetwork,
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

/// ENDPOINTS, as the bench fills it.
type EndpointsMap = HashMap<MapData, EndpointKey, EndpointInfo>;

struct Maps {
    endpoints: EndpointsMap,
    traffic: PerCpuArray<MapData, TrafficCounters>,
    slots: HashMap<MapData, u32, u32>,
    drops: PerCpuHashMap<MapData, DropKey, DropCounters>,
    conntrack: HashMap<MapData, CtKey, CtEntry>,
    conntrack_capacity: u32,
    published: HashMap<MapData, PublishKey, PublishTarget>,
    allow: LpmTrie<MapData, AllowKey, u8>,
}

impl Maps {
    fn take(ebpf: &mut Ebpf) -> Result<Self> {
        let mut take = |name: &str| {
            ebpf.take_map(name)
                .with_context(|| format!("map {name} is not in the eBPF object"))
        };
        let conntrack = take(map_names::CONNTRACK)?;
        let conntrack_capacity = match &conntrack {
            aya::maps::Map::HashMap(data) => data
                .info()
                .context("reading CONNTRACK's size")?
                .max_entries(),
            _ => bail!("map CONNTRACK has an unexpected type"),
        };
        Ok(Self {
            endpoints: take(map_names::ENDPOINTS)?
                .try_into()
                .context("map ENDPOINTS has an unexpected type")?,
            traffic: take(map_names::ENDPOINT_TRAFFIC)?
                .try_into()
                .context("map ENDPOINT_TRAFFIC has an unexpected type")?,
            slots: take(map_names::ENDPOINT_SLOTS)?
                .try_into()
                .context("map ENDPOINT_SLOTS has an unexpected type")?,
            drops: take(map_names::ENDPOINT_DROPS)?
                .try_into()
                .context("map ENDPOINT_DROPS has an unexpected type")?,
            conntrack: conntrack
                .try_into()
                .context("map CONNTRACK has an unexpected type")?,
            conntrack_capacity,
            published: take(map_names::PUBLISHED)?
                .try_into()
                .context("map PUBLISHED has an unexpected type")?,
            allow: take(map_names::PUBLISHED_ALLOW)?
                .try_into()
                .context("map PUBLISHED_ALLOW has an unexpected type")?,
        })
    }

    /// Puts `endpoint` in ENDPOINTS and its veth's counter slot in ENDPOINT_SLOTS, as the
    /// agent does.
    fn add_endpoint(&mut self, endpoint: &Endpoint) -> Result<()> {
        self.endpoints
            .insert(
                EndpointKey {
                    addr: endpoint.ip.octets(),
                },
                endpoint.info(),
                0,
            )
            .context("filling ENDPOINTS")?;
        self.slots
            .insert(endpoint.ifindex, endpoint.slot, 0)
            .context("filling ENDPOINT_SLOTS")
    }

    /// The counter slots in use, by veth ifindex.
    fn slots(&self) -> Result<Vec<(u32, u32)>> {
        self.slots
            .iter()
            .map(|item| item.context("reading ENDPOINT_SLOTS"))
            .collect()
    }

    fn clear_counters(&mut self) -> Result<()> {
        let cpus = aya::util::nr_cpus()
            .map_err(|(_, e)| e)
            .context("counting the CPUs")?;
        for (_, slot) in self.slots()? {
            let zeros = PerCpuValues::try_from(vec![TrafficCounters::default(); cpus])
                .context("per-CPU zeros")?;
            self.traffic
                .set(slot, zeros, 0)
                .context("clearing ENDPOINT_TRAFFIC")?;
        }
        let drops: Vec<DropKey> = self.drops.keys().filter_map(Result::ok).collect();
        for key in drops {
            self.drops.remove(&key).context("clearing ENDPOINT_DROPS")?;
        }
        Ok(())
    }

    /// How many conntrack entries there are.
    fn flow_count(&self) -> Result<usize> {
        let mut count = 0;
        for key in self.conntrack.keys() {
            key.context("reading CONNTRACK's keys")?;
            count += 1;
        }
        Ok(count)
    }

    /// Removes every conntrack entry.
    fn clear_flows(&mut self) -> Result<()> {
        let keys: Vec<CtKey> = self.conntrack.keys().filter_map(Result::ok).collect();
        for key in keys {
            self.conntrack.remove(&key).context("clearing CONNTRACK")?;
        }
        Ok(())
    }

    /// Fills CONNTRACK until the kernel refuses more: protocol 255 matches no packet.
    fn fill_conntrack(&mut self) -> Result<()> {
        let entry = CtEntry {
            last_seen_ns: 0,
            packets: 0,
            bytes: 0,
            new_saddr: [0; 4],
            new_daddr: [0; 4],
            new_sport: [0; 2],
            new_dport: [0; 2],
            direction: 0,
            state: 0,
            kind: 0,
            flags: 0,
            ifindex: 0,
            _pad: 0,
        };
        // A preallocated hash takes exactly its capacity; a few more tries show it is full.
        for i in 0..self.conntrack_capacity + 64 {
            let key = CtKey {
                saddr: i.to_be_bytes(),
                daddr: [0; 4],
                sport: [0; 2],
                dport: [0; 2],
                proto: 255,
                _pad: [0; 3],
            };
            if self.conntrack.insert(key, entry, 0).is_err() {
                if i < self.conntrack_capacity {
                    bail!(
                        "CONNTRACK refused entry {i} of its {}: it should take them all",
                        self.conntrack_capacity
                    );
                }
                return Ok(());
            }
        }
        bail!(
            "CONNTRACK took {} entries without refusing one: it should be full at {}",
            self.conntrack_capacity + 64,
            self.conntrack_capacity
        )
    }

    /// Packets counted, summed over CPUs, by a readable key; zero counts left out.
    fn counted(&self) -> Result<BTreeMap<String, u64>> {
        let mut counted = BTreeMap::new();
        for (ifindex, slot) in self.slots()? {
            let per_cpu = self
                .traffic
                .get(&slot, 0)
                .context("reading ENDPOINT_TRAFFIC")?;
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

    fn allow(&mut self, id: u32, prefix: (std::net::Ipv4Addr, u8)) -> Result<()> {
        let key = LpmKey::new(
            32 + u32::from(prefix.1),
            AllowKey {
                id: id.to_be_bytes(),
                addr: prefix.0.octets(),
            },
        );
        self.allow
            .insert(&key, 1, 0)
            .context("adding an allow-list prefix to PUBLISHED_ALLOW")
    }
}

fn reason_name(code: u32) -> String {
    DropReason::from_u32(code).map_or_else(|| format!("unknown-{code}"), |r| r.name().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_program_and_drop_reason_has_a_path() {
        check_coverage(&cases()).expect("coverage");
    }
}
