//! Tally's kernel-side programs written in Rust (aya-ebpf). Kept thin: each entry point calls a
//! `try_` function and turns its result into the verdict.
#![no_std]
#![no_main]
// `core::intrinsics::atomic_xadd`: `AtomicU64::fetch_add` does not exist on bpfel.
#![feature(core_intrinsics)]
#![expect(internal_features, reason = "core_intrinsics, for the atomic add")]

mod net;
mod throttle;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: BPF programs cannot panic; the verifier rejects any path that reaches this.
    unsafe { core::hint::unreachable_unchecked() }
}

/// The license the kernel checks before offering GPL-only helpers.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
