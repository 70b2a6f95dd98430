//! A distribution kernel's probes: where the development hosts refuse fentry and kprobes, the
//! test node's stock Debian kernel loads both, and each counts exactly. (Which method a kernel
//! loads is not assumed anywhere else: the `probes` suite, run here too, takes every method that
//! loads and checks that the agent picks the first of them.)

use std::path::Path;

use tally_tests::tcp_probe::{
    agent_with_only, counts_through, retransmits_equal_the_kernels, tcp_up,
};

use crate::on_the_node;

#[test]
fn vm_fentry_and_kprobe_load_on_the_distribution_kernel_and_count_exactly() {
    on_the_node("vm_fentry_and_kprobe_load_on_the_distribution_kernel_and_count_exactly");
    let unified = Path::new("/sys/fs/cgroup");
    for method in ["fentry", "kprobe"] {
        // Connections opened and closed: exactly 7 each.
        assert!(
            counts_through(unified, method),
            "the TCP probe did not load through {method} on the distribution kernel"
        );
        // Retransmits, which the kernel makes in softirq: exactly what it counted.
        let agent = agent_with_only(method);
        assert!(tcp_up(&agent, method), "{method}");
        let n = retransmits_equal_the_kernels(unified, &agent, method);
        eprintln!("{method}: {n} retransmitted segments, as many as the kernel counted");
    }
}
