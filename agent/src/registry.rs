//! The one list of sources: adding a source is its module plus one line here.

use tally_ebpf::throttle::EgressLimits;

use crate::config::Config;
use crate::host::layout::Layout;
use crate::source::Source;

/// The sources, and the handles some of them give the budget engine's actuators.
#[derive(Debug)]
pub struct Built {
    /// Every source, in the order a tick collects them (and `tally_probe_up` lists their probes).
    pub sources: Vec<Box<dyn Source>>,
    /// The network programs' egress limit maps, for the egress actuator.
    pub egress_limits: Option<EgressLimits>,
}

/// `open_file_limit` is the soft `RLIMIT_NOFILE` the agent runs with, which sizes how many cgroup
/// files the cgroupfs collector keeps open (`None`: unknown).
pub fn build(config: &Config, layout: &Layout, open_file_limit: Option<u64>) -> Built {
    let mut bpf = crate::bpf::BpfSources::start(config, layout);
    let egress_limits = bpf.take_egress_limits();
    Built {
        sources: vec![
            Box::new(crate::cgroupfs::Collector::new(
                config,
                layout.clone(),
                open_file_limit,
            )),
            Box::new(bpf),
            Box::new(crate::gpu::GpuSource::start(config, config.tick_interval())),
            Box::new(crate::rdma::RdmaSource::start(config)),
            Box::new(crate::inference::InferenceSource::start(config)),
        ],
        egress_limits,
    }
}
