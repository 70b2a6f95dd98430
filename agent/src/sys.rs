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
}
