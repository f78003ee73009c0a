//! Empty on purpose: `net-agent`'s build script depends on this crate so that cargo rebuilds the
//! agent when the eBPF sources change; the programs themselves live in the `net-ebpf` binary.
#![no_std]
