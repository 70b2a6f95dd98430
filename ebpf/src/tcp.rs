//! TCP health per cgroup: segments retransmitted, connections opened (active and passive) and
//! closed, counted against the socket's cgroup by `ebpf/c/tcp.bpf.c`.
//!
//! Attach methods, best first: `fentry` (fexit `__tcp_retransmit_skb`, fentry `tcp_set_state`),
//! `tp_btf`, `raw_tracepoint` and `tracepoint` (`tcp:tcp_retransmit_skb`,
//! `sock:inet_sock_set_state`), and `kprobe` (kprobe and kretprobe `__tcp_retransmit_skb`, kprobe
//! `tcp_set_state`: the fentry hooks through kprobes, where neither BTF nor the tracepoints are).

use tally_ebpf_common::TcpValue;

use crate::source::{Counters, Hook, Method, Source};
use crate::{Error, ProbeStatus, ProgramStats, TCP_OBJECT};

const STATS: &str = "TCP_STATS";
const LOST: &str = "TCP_LOST";

static SOURCE: Source = Source {
    probe: "tcp",
    object_name: "tcp.bpf.o",
    object: TCP_OBJECT,
    methods: &[
        Method {
            name: "fentry",
            programs: &[
                ("tcp_retransmit_fexit", Hook::FExit("__tcp_retransmit_skb")),
                ("tcp_state_fentry", Hook::FEntry("tcp_set_state")),
            ],
        },
        Method {
            name: "tp_btf",
            programs: &[
                (
                    "tcp_retransmit_btf",
                    Hook::BtfTracePoint("tcp_retransmit_skb"),
                ),
                ("tcp_state_btf", Hook::BtfTracePoint("inet_sock_set_state")),
            ],
        },
        Method {
            name: "raw_tracepoint",
            programs: &[
                (
                    "tcp_retransmit_raw",
                    Hook::RawTracePoint("tcp_retransmit_skb"),
                ),
                ("tcp_state_raw", Hook::RawTracePoint("inet_sock_set_state")),
            ],
        },
        Method {
            name: "tracepoint",
            programs: &[
                (
                    "tcp_retransmit_tp",
                    Hook::TracePoint("tcp", "tcp_retransmit_skb"),
                ),
                (
                    "tcp_state_tp",
                    Hook::TracePoint("sock", "inet_sock_set_state"),
                ),
            ],
        },
        Method {
            name: "kprobe",
            programs: &[
                (
                    "tcp_retransmit_kprobe",
                    Hook::KProbe("__tcp_retransmit_skb"),
                ),
                (
                    "tcp_retransmit_kretprobe",
                    Hook::KRetProbe("__tcp_retransmit_skb"),
                ),
                ("tcp_state_kprobe", Hook::KProbe("tcp_set_state")),
            ],
        },
    ],
};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpConfig {
    /// Entries of `TCP_STATS`: one per cgroup that owned a TCP socket since its entry was last
    /// removed. Updates beyond it are dropped and counted ([`Tcp::lost`]).
    pub max_entries: u32,
    /// Attach methods not to try (names from [`crate::ATTACH_METHODS`]).
    pub disabled_methods: Vec<String>,
}

/// The loaded and attached TCP programs of one method. Dropping it detaches them and frees
/// the maps; nothing is pinned.
#[derive(Debug)]
pub struct Tcp(Counters<TcpValue>);

impl Tcp {
    /// Tries the attach methods best first (`fentry`, `tp_btf`, `raw_tracepoint`, `tracepoint`,
    /// `kprobe`), skipping disabled ones. Returns the
    /// loaded source with its status (the method in use; `error` lists what failed before it),
    /// or no source and the status of total failure.
    pub fn load(config: &TcpConfig) -> (Option<Tcp>, ProbeStatus) {
        let (counters, status) = Counters::load(
            &SOURCE,
            (STATS, LOST),
            config.max_entries,
            &config.disabled_methods,
        );
        (counters.map(Tcp), status)
    }

    /// The attach method in use.
    pub fn method(&self) -> &'static str {
        self.0.method()
    }

    /// Every cgroup's counters, summed over CPUs: cumulative since the entry was created.
    pub fn read(&self) -> Result<Vec<(u64, TcpValue)>, Error> {
        self.0.read(|sum, v| {
            sum.retransmits = sum.retransmits.wrapping_add(v.retransmits);
            sum.active_opens = sum.active_opens.wrapping_add(v.active_opens);
            sum.passive_opens = sum.passive_opens.wrapping_add(v.passive_opens);
            sum.closes = sum.closes.wrapping_add(v.closes);
        })
    }

    /// Deletes the entries of cgroups that no longer exist, after their final values were read.
    pub fn remove(&mut self, cgroup_ids: &[u64]) -> Result<(), Error> {
        self.0.remove(cgroup_ids)
    }

    /// Updates dropped because the stats map was full, since load.
    pub fn lost(&self) -> Result<u64, Error> {
        self.0.lost()
    }

    pub fn program_stats(&self) -> Vec<ProgramStats> {
        self.0.program_stats()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_method_names_programs_the_object_has() {
        crate::source::tests::assert_table_matches_object(&super::SOURCE);
    }
}
