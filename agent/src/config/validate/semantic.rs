//! The checks serde cannot express: ranges, addresses, paths, and what one section needs of
//! another.

use crate::config::Config;

/// Range and format checks serde cannot express.
pub(super) fn semantic_errors(config: &Config) -> Vec<(&'static str, String)> {
    let mut errors = Vec::new();
    if let Err(e) = config.agent.listen.parse::<std::net::SocketAddr>() {
        errors.push((
            "agent.listen",
            format!(
                "`{}` is not a socket address (host:port): {e}",
                config.agent.listen
            ),
        ));
    }
    if !(100..=60_000).contains(&config.agent.tick_interval_ms) {
        errors.push((
            "agent.tick_interval_ms",
            format!(
                "{} is out of range 100..=60000",
                config.agent.tick_interval_ms
            ),
        ));
    }
    if config.cgroupfs.read_interval_ms > 300_000 {
        errors.push((
            "cgroupfs.read_interval_ms",
            format!(
                "{} is out of range 0..=300000",
                config.cgroupfs.read_interval_ms
            ),
        ));
    }
    if let Err(e) = tracing_subscriber::EnvFilter::try_new(&config.agent.log_level) {
        errors.push(("agent.log_level", format!("invalid log filter: {e}")));
    }
    if config.ledger.grace_period_secs > 7 * 24 * 3600 {
        errors.push((
            "ledger.grace_period_secs",
            format!(
                "{} is out of range 0..=604800 (one week)",
                config.ledger.grace_period_secs
            ),
        ));
    }
    if !(1..=3600).contains(&config.cri.refresh_interval_secs) {
        errors.push((
            "cri.refresh_interval_secs",
            format!(
                "{} is out of range 1..=3600",
                config.cri.refresh_interval_secs
            ),
        ));
    }
    if !(10..=60_000).contains(&config.cri.timeout_ms) {
        errors.push((
            "cri.timeout_ms",
            format!("{} is out of range 10..=60000", config.cri.timeout_ms),
        ));
    }
    if !(64..=4_194_304).contains(&config.ebpf.max_net_entries) {
        errors.push((
            "ebpf.max_net_entries",
            format!(
                "{} is out of range 64..=4194304",
                config.ebpf.max_net_entries
            ),
        ));
    }
    if !(64..=4_194_304).contains(&config.ebpf.max_cgroup_entries) {
        errors.push((
            "ebpf.max_cgroup_entries",
            format!(
                "{} is out of range 64..=4194304",
                config.ebpf.max_cgroup_entries
            ),
        ));
    }
    if !(1..=3600).contains(&config.ebpf.program_stats_every_secs) {
        errors.push((
            "ebpf.program_stats_every_secs",
            format!(
                "{} is out of range 1..=3600",
                config.ebpf.program_stats_every_secs
            ),
        ));
    }
    for method in &config.ebpf.disabled_methods {
        if !crate::config::ATTACH_METHODS.contains(&method.as_str()) {
            errors.push((
                "ebpf.disabled_methods",
                format!(
                    "unknown attach method `{method}`, expected one of {}",
                    crate::config::ATTACH_METHODS.join(", ")
                ),
            ));
        }
    }
    for (name, list) in [
        ("network.node_cidrs", &config.network.node_cidrs),
        ("network.cluster_cidrs", &config.network.cluster_cidrs),
        ("network.zone_cidrs", &config.network.zone_cidrs),
        ("network.region_cidrs", &config.network.region_cidrs),
    ] {
        for cidr in list {
            if let Err(e) = cidr.parse::<crate::config::Cidr>() {
                errors.push((name, e));
            }
        }
    }
    let otlp = &config.otlp;
    let scheme_ok = ["http://", "https://"]
        .iter()
        .any(|scheme| otlp.endpoint.starts_with(scheme));
    if !otlp.endpoint.is_empty() && !scheme_ok {
        errors.push((
            "otlp.endpoint",
            format!("`{}` must start with http:// or https://", otlp.endpoint),
        ));
    }
    errors.extend(out_of_range([
        ("otlp.interval_secs", otlp.interval_secs, 1..=3600),
        ("otlp.timeout_ms", otlp.timeout_ms, 10..=60_000),
        ("otlp.queue_batches", otlp.queue_batches as u64, 1..=1000),
        ("otlp.max_attempts", u64::from(otlp.max_attempts), 1..=10),
    ]));
    errors.extend(cluster_errors(&config.cluster));
    if !(20..=10_000).contains(&config.enforcement.freeze_period_ms) {
        errors.push((
            "enforcement.freeze_period_ms",
            format!(
                "{} is out of range 20..=10000",
                config.enforcement.freeze_period_ms
            ),
        ));
    }
    let alerts = &config.alerts;
    for (name, urls) in [
        ("alerts.alertmanager_urls", &alerts.alertmanager_urls),
        ("alerts.webhook_urls", &alerts.webhook_urls),
    ] {
        for url in urls {
            if !url.starts_with("http://") {
                errors.push((name, format!("`{url}` must start with http://")));
            }
        }
    }
    for (name, value, range) in [
        ("alerts.timeout_ms", alerts.timeout_ms, 10..=60_000),
        (
            "alerts.max_attempts",
            u64::from(alerts.max_attempts),
            1..=20,
        ),
        (
            "alerts.resend_interval_secs",
            alerts.resend_interval_secs,
            10..=3600,
        ),
    ] {
        if !range.contains(&value) {
            errors.push((
                name,
                format!(
                    "{value} is out of range {}..={}",
                    range.start(),
                    range.end()
                ),
            ));
        }
    }
    if let Some(path) = &config.enforcement.policy_file {
        if !path.is_absolute() {
            errors.push((
                "enforcement.policy_file",
                format!("`{}` is not an absolute path", path.display()),
            ));
        }
    }
    for (name, path) in [
        ("enforcement.state_dir", &config.enforcement.state_dir),
        ("paths.proc_root", &config.paths.proc_root),
        ("paths.sys_root", &config.paths.sys_root),
        ("paths.cgroup_root", &config.paths.cgroup_root),
    ] {
        if !path.is_absolute() {
            errors.push((
                name,
                format!("`{}` is not an absolute path", path.display()),
            ));
        }
    }
    errors.extend(rdma_errors(&config.rdma));
    errors.extend(inference_errors(&config.inference));
    errors
}

/// Each value outside its range, as `(key, message)`.
fn out_of_range<const N: usize>(
    checks: [(&'static str, u64, std::ops::RangeInclusive<u64>); N],
) -> impl Iterator<Item = (&'static str, String)> {
    checks
        .into_iter()
        .filter(|(_, value, range)| !range.contains(value))
        .map(|(name, value, range)| {
            (
                name,
                format!(
                    "{value} is out of range {}..={}",
                    range.start(),
                    range.end()
                ),
            )
        })
}

/// `[cluster]`: an endpoint that parses, one way to authenticate, and bounds.
fn cluster_errors(cluster: &crate::config::ClusterConfig) -> Vec<(&'static str, String)> {
    let mut errors = Vec::new();
    if !cluster.query_url.is_empty() {
        if let Err(e) = crate::config::cluster::endpoint(&cluster.query_url) {
            errors.push(("cluster.query_url", e));
        }
    }
    errors.extend(out_of_range([
        ("cluster.interval_secs", cluster.interval_secs, 1..=3600),
        ("cluster.timeout_ms", cluster.timeout_ms, 10..=60_000),
        (
            "cluster.max_response_bytes",
            cluster.max_response_bytes as u64,
            1024..=64 << 20,
        ),
    ]));
    if cluster.timeout_ms > cluster.interval_secs.saturating_mul(1000) {
        errors.push((
            "cluster.timeout_ms",
            format!(
                "{} ms is longer than `cluster.interval_secs` ({} s)",
                cluster.timeout_ms, cluster.interval_secs
            ),
        ));
    }
    if cluster.max_staleness_secs < cluster.interval_secs {
        errors.push((
            "cluster.max_staleness_secs",
            format!(
                "{} is shorter than `cluster.interval_secs` ({}): every answer would be stale before the next",
                cluster.max_staleness_secs, cluster.interval_secs
            ),
        ));
    }
    if cluster.bearer_token_file.is_some() && cluster.basic_auth_password_file.is_some() {
        errors.push((
            "cluster.bearer_token_file",
            "set a bearer token or basic auth, not both".to_owned(),
        ));
    }
    if cluster.basic_auth_password_file.is_some() && cluster.basic_auth_username.is_empty() {
        errors.push((
            "cluster.basic_auth_username",
            "basic auth needs a user name".to_owned(),
        ));
    }
    if !cluster.basic_auth_username.is_empty() && cluster.basic_auth_password_file.is_none() {
        errors.push((
            "cluster.basic_auth_password_file",
            "basic auth needs a password file".to_owned(),
        ));
    }
    errors
}

fn inference_errors(inference: &crate::config::InferenceConfig) -> Vec<(&'static str, String)> {
    let mut errors = Vec::new();
    let ranges: [(&'static str, u64, u64, u64); 4] = [
        ("inference.interval_secs", inference.interval_secs, 1, 3600),
        ("inference.timeout_ms", inference.timeout_ms, 10, 60_000),
        (
            "inference.max_body_bytes",
            inference.max_body_bytes,
            1024,
            256 << 20,
        ),
        (
            "inference.max_concurrent",
            inference.max_concurrent as u64,
            1,
            64,
        ),
    ];
    for (key, value, low, high) in ranges {
        if !(low..=high).contains(&value) {
            errors.push((key, format!("{value} is out of range {low}..={high}")));
        }
    }
    errors
}

fn rdma_errors(rdma: &crate::config::RdmaConfig) -> Vec<(&'static str, String)> {
    let mut errors = Vec::new();
    if !(10..=60_000).contains(&rdma.netlink_timeout_ms) {
        errors.push((
            "rdma.netlink_timeout_ms",
            format!("{} is out of range 10..=60000", rdma.netlink_timeout_ms),
        ));
    }
    let socket = &rdma.netlink_socket;
    if !socket.as_os_str().is_empty() && !socket.is_absolute() {
        errors.push((
            "rdma.netlink_socket",
            format!(
                "`{}` is not an absolute path (empty: the kernel)",
                socket.display()
            ),
        ));
    }
    if rdma.qp_optional_counters && !rdma.allow_qp_counter_auto_mode {
        errors.push((
            "rdma.qp_optional_counters",
            "has no effect without `rdma.allow_qp_counter_auto_mode = true`".to_owned(),
        ));
    }
    errors
}
