//! `tally.bpf.o`, the object every node loads: the network metering (`net`) and egress limit
//! (`throttle`) programs, written in Rust (aya-ebpf). `net` uses `throttle`, and both use the
//! leaf helpers of the library (`counter`, `verdict`), never the other way round. The
//! benchmark's reference programs are in their own object (`src/bench.rs`), so no node creates
//! their maps.
#![no_std]
#![no_main]
// `core::intrinsics::atomic_xadd`: `AtomicU64::fetch_add` does not exist on bpfel.
#![feature(core_intrinsics)]
#![expect(internal_features, reason = "core_intrinsics, for the atomic add")]

mod net;
mod throttle;

/// The license the kernel checks before offering GPL-only helpers.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
