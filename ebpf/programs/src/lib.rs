//! What Tally's BPF objects share. Each object is one binary of this package, in one file:
//! `tally` (`src/main.rs`, `tally.bpf.o`, what every node loads) and `bench` (`src/bench.rs`,
//! `bench.bpf.o`, the benchmark's reference programs, loaded only by `bench_attach`). Maps are
//! declared in the binaries, never here: an object gets exactly the maps its own programs use.
#![no_std]

pub mod counter;
pub mod verdict;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: BPF programs cannot panic; the verifier rejects any path that reaches this.
    unsafe { core::hint::unreachable_unchecked() }
}
