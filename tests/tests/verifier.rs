//! Every program of the embedded object must pass the kernel verifier in every configuration the
//! agent ships. A rejected program fails here with its name and the tail of the verifier log,
//! rather than later as an agent that will not start.
//!
//! Needs root (CAP_BPF); without it the test says why and passes.

use aya::{Ebpf, programs::ProgramError};
use net_agent::datapath::{self, DatapathError};
use net_ebpf_common::program_names;

/// How much of a verifier log to show: the rejection and the instructions leading to it are at
/// the end; the whole log of a large program runs to thousands of lines.
const VERIFIER_LOG_TAIL_LINES: usize = 60;

/// One way the agent loads the object.
struct Configuration {
    name: &'static str,
    load: fn() -> Result<Ebpf, DatapathError>,
}

/// Every shipped configuration. Map pinning (`load(Some(..))`) changes where maps live, not what
/// the verifier sees, so private maps stand for it. The globals are constants to the verifier,
/// so NAT off (no host address: the uplink programs return at once) and NAT on are verified
/// separately, as are the smallest and largest port ranges the agent accepts.
const CONFIGURATIONS: &[Configuration] = &[
    Configuration {
        name: "defaults: NAT off",
        load: || datapath::load(None, &datapath::LoadSettings::default()),
    },
    Configuration {
        name: "NAT on, default port range",
        load: || {
            datapath::load(
                None,
                &datapath::LoadSettings {
                    host_ipv4: Some(std::net::Ipv4Addr::new(198, 18, 0, 1)),
                    ..Default::default()
                },
            )
        },
    },
    Configuration {
        name: "NAT on, one port, small table",
        load: || {
            datapath::load(
                None,
                &datapath::LoadSettings {
                    host_ipv4: Some(std::net::Ipv4Addr::new(198, 18, 0, 1)),
                    uplink_ifindex: Some(2),
                    nat_ports: (40_000, 40_000),
                    conntrack_entries: 16,
                },
            )
        },
    },
];

/// The last `lines` lines of `log`.
fn log_tail(log: &str, lines: usize) -> String {
    let all: Vec<&str> = log.lines().collect();
    let skipped = all.len().saturating_sub(lines);
    let mut tail = String::new();
    if skipped > 0 {
        tail.push_str(&format!("... ({skipped} earlier lines left out)\n"));
    }
    tail.push_str(&all[skipped..].join("\n"));
    tail
}

/// A failed load explained: the program and the verifier's last words when it is a rejection.
fn explain_load_failure(configuration: &str, error: &DatapathError) -> String {
    match error {
        DatapathError::Program {
            name,
            source:
                ProgramError::LoadError {
                    io_error,
                    verifier_log,
                },
        } => format!(
            "configuration \"{configuration}\": the verifier rejected program {name} \
             (BPF_PROG_LOAD: {io_error}); last {VERIFIER_LOG_TAIL_LINES} lines of its log:\n{}",
            log_tail(&verifier_log.to_string(), VERIFIER_LOG_TAIL_LINES)
        ),
        other => format!("configuration \"{configuration}\": loading failed: {other}"),
    }
}

#[test]
fn every_program_passes_the_verifier() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!(
            "SKIPPED every_program_passes_the_verifier: loading programs needs root (CAP_BPF); \
             CI runs this as root"
        );
        return;
    }
    for Configuration {
        name: configuration,
        load,
    } in CONFIGURATIONS
    {
        let mut ebpf =
            load().unwrap_or_else(|e| panic!("{}", explain_load_failure(configuration, &e)));

        // `load` stops at the first program that fails, so also check each listed program really
        // holds a kernel fd, and print what the verifier spent on it.
        for name in program_names::ALL {
            let program = datapath::program(&mut ebpf, name).unwrap_or_else(|e| {
                panic!("configuration \"{configuration}\": program {name}: {e}")
            });
            let info = program.info().unwrap_or_else(|e| {
                panic!("configuration \"{configuration}\": program {name} is not loaded: {e}")
            });
            eprintln!(
                "ok   {configuration}: {name}: {} instructions verified",
                info.verified_instruction_count()
                    .map_or_else(|| "?".to_owned(), |n| n.to_string())
            );
        }

        // A program in the object but missing from `program_names::ALL` would never be loaded
        // by the agent, nor verified here.
        let unlisted: Vec<&str> = ebpf
            .programs()
            .map(|(name, _)| name)
            .filter(|name| !program_names::ALL.contains(name))
            .collect();
        assert!(
            unlisted.is_empty(),
            "configuration \"{configuration}\": programs in the object but not in \
             net_ebpf_common::program_names::ALL (never loaded, never verified): {unlisted:?}"
        );
    }
}

/// The tail helper: a failure report that cut the wrong end of the log would hide the reason.
#[test]
fn log_tail_keeps_the_last_lines() {
    let log: String = (1..=100).map(|n| format!("line {n}\n")).collect();
    let tail = log_tail(&log, 3);
    assert_eq!(
        tail,
        "... (97 earlier lines left out)\nline 98\nline 99\nline 100"
    );
    assert_eq!(log_tail("only\n", 3), "only");
}

/// The memory builtins that `bpf-linker` exports into the object: compiler_builtins' portable
/// versions, loops of single-byte loads and stores.
const MEMORY_BUILTINS: &[&str] = &["memset", "memcpy", "memmove", "memcmp", "bcmp"];

/// Every call from the object's code to a memory builtin, as "section+offset: name".
fn memory_builtin_calls(object_bytes: &[u8]) -> Vec<String> {
    use object::{Object as _, ObjectSection as _, ObjectSymbol as _, RelocationTarget};

    let file = object::File::parse(object_bytes).expect("the embedded eBPF object is an ELF file");
    let mut calls = Vec::new();
    for section in file.sections() {
        let section_name = section.name().unwrap_or("?");
        for (offset, relocation) in section.relocations() {
            let RelocationTarget::Symbol(index) = relocation.target() else {
                continue;
            };
            let Ok(name) = file.symbol_by_index(index).and_then(|symbol| symbol.name()) else {
                continue;
            };
            if MEMORY_BUILTINS.contains(&name) {
                calls.push(format!("{section_name}+{offset:#x}: {name}"));
            }
        }
    }
    calls
}

/// A zeroed struct or a padding field must compile to a few word stores, not to a call to a
/// byte loop: with `bpf-linker`'s default (`--bpf-expand-memcpy-in-order`), clearing one
/// `bpf_fib_lookup` took 64 iterations on every routed reply, and every conntrack key's three
/// padding bytes a call. `net-ebpf/build.rs` turns that default off; this keeps it off.
#[test]
fn no_program_calls_a_byte_loop_memory_builtin() {
    let calls = memory_builtin_calls(datapath::EBPF_OBJECT);
    assert!(
        calls.is_empty(),
        "the eBPF object calls memory builtins (byte loops) at {} places, first: {:?}; \
         is `--disable-expand-memcpy-in-order` still passed to bpf-linker (net-ebpf/build.rs)?",
        calls.len(),
        &calls[..calls.len().min(5)]
    );
}
