//! Process-wide tweaks the agent makes to itself through libc: scheduling priority, heap trimming
//! and the open-file limit. A leaf: the runtime, the tick and the samplers call it, and it calls
//! nothing of theirs.

/// Gives the calling thread a lower scheduling priority (nice 5) than the HTTP server's, so a
/// scrape arriving during a long tick is served first on a busy node. Failure is harmless.
pub(crate) fn lower_priority() {
    // SAFETY: gettid and setpriority take and return plain integers.
    unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 5);
    }
}

/// `struct sched_attr` as far as `SCHED_ATTR_SIZE_VER0` (include/uapi/linux/sched/types.h).
#[repr(C)]
struct SchedAttr {
    size: u32,
    sched_policy: u32,
    sched_flags: u64,
    sched_nice: i32,
    sched_priority: u32,
    sched_runtime: u64,
    sched_deadline: u64,
    sched_period: u64,
}

/// The time slice asked for the threads that answer scrapes: the shortest the kernel allows.
const SERVING_SLICE_NS: u64 = 100_000;

/// Asks for a short time slice for the calling thread (kept at `SCHED_OTHER`, nice 0), so that
/// when it wakes to answer a scrape it runs before a thread that has been running longer (the
/// tick): EEVDF gives a shorter slice an earlier deadline (kernel 6.12 and later read
/// `sched_runtime` of a fair thread as its slice; earlier kernels ignore it). Measured with
/// bench/foundation.sh at 1,000 workloads. Failure is harmless.
pub(crate) fn short_slice() {
    let attr = SchedAttr {
        size: std::mem::size_of::<SchedAttr>() as u32,
        sched_policy: libc::SCHED_OTHER as u32,
        sched_flags: 0,
        sched_nice: 0,
        sched_priority: 0,
        sched_runtime: SERVING_SLICE_NS,
        sched_deadline: 0,
        sched_period: 0,
    };
    // SAFETY: `attr` is a valid sched_attr of the size it states; pid 0 is the calling thread.
    unsafe {
        libc::syscall(libc::SYS_sched_setattr, 0, &attr as *const SchedAttr, 0);
    }
}

/// Hands the allocator's free heap pages back to the system, after a burst of allocations that
/// will not come again (kept otherwise as resident memory).
pub(crate) fn trim_heap() {
    // SAFETY: malloc_trim only releases free heap pages; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Lifts the soft open-file limit to the hard one, and returns the soft limit now in force.
/// A refused raise leaves the limit as it was; an error means the limit could not be read.
pub(crate) fn raise_fd_limit() -> std::io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
    }
    Ok(limit.rlim_cur)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_soft_fd_limit_is_raised_to_the_hard_one() {
        let soft = super::raise_fd_limit().unwrap();
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit only writes the struct we pass.
        assert_eq!(
            unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) },
            0
        );
        // Raising the soft limit up to the hard one needs no privilege.
        assert_eq!(soft, limit.rlim_max);
        assert_eq!(limit.rlim_cur, limit.rlim_max);
    }

    /// The slice the kernel keeps for the calling thread (`se.slice` in its sched file, kernel
    /// 6.6 and later), in nanoseconds.
    fn own_slice() -> Option<u64> {
        let sched = std::fs::read_to_string("/proc/thread-self/sched").ok()?;
        let line = sched.lines().find(|l| l.starts_with("se.slice"))?;
        line.rsplit(':').next()?.trim().parse().ok()
    }

    #[test]
    fn a_serving_thread_asks_for_the_shortest_slice() {
        let (before, after) = std::thread::spawn(|| {
            let before = own_slice();
            super::short_slice();
            (before, own_slice())
        })
        .join()
        .unwrap();
        // Custom slices of fair threads came with kernel 6.12; CI's kernel has them.
        if before.is_none() || before == after {
            eprintln!("SKIPPED a_serving_thread_asks_for_the_shortest_slice: slice {before:?}");
            assert!(
                std::env::var("TALLY_TEST_STRICT").map_or(true, |v| v != "1"),
                "skipped under TALLY_TEST_STRICT=1: the kernel kept slice {before:?}"
            );
            return;
        }
        assert_eq!(after, Some(super::SERVING_SLICE_NS));
    }
}
