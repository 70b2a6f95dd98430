//! The budget policy: what operators declare, as it reads in TOML, and the checks serde cannot
//! express. A policy lives in the configuration file (`[[budget]]`, `[prices]`) or in a separate
//! file named by `enforcement.policy_file` (what a Kubernetes ConfigMap carries); both are merged.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use check::check;

mod check;

/// A separate policy file: the same `[[budget]]` and `[prices]` tables the configuration accepts.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyFile {
    pub prices: Option<Prices>,
    pub budget: Vec<Budget>,
}

/// What each resource costs: `tally_workload_cost_total` and `resource = "cost"` budgets. Amounts
/// are in `currency`, whatever the operator bills in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Prices {
    /// The currency of every price, as a label on `tally_price` (e.g. an ISO 4217 code).
    pub currency: String,
    /// Per core-second of CPU.
    pub cpu_core_second: f64,
    /// Per GPU-second of attributed busy time, by GPU model name as NVML reports it
    /// (`"NVIDIA H200"`); `default` for models not listed.
    pub gpu_second: BTreeMap<String, f64>,
    /// Per kWh of attributed GPU energy.
    pub gpu_energy_kwh: f64,
    /// Per GB (10^9 bytes) of egress, by destination scope (`node`, `cluster`, `zone`, `region`,
    /// `internet`); scopes not listed are free.
    pub network_egress_gb: BTreeMap<String, f64>,
    /// Per GB (10^9 bytes) read or written to block devices.
    pub disk_gb: f64,
    /// Per GB-hour (10^9 bytes held for an hour) of memory charged to the workload's cgroup.
    pub memory_gb_hour: f64,
}

fn default_currency() -> String {
    "USD".to_owned()
}

impl Default for Prices {
    fn default() -> Self {
        Self {
            currency: default_currency(),
            cpu_core_second: 0.0,
            gpu_second: BTreeMap::new(),
            gpu_energy_kwh: 0.0,
            network_egress_gb: BTreeMap::new(),
            disk_gb: 0.0,
            memory_gb_hour: 0.0,
        }
    }
}

impl Prices {
    /// Whether nothing has a price: every amount zero, whatever the currency.
    pub fn is_free(&self) -> bool {
        [
            self.cpu_core_second,
            self.gpu_energy_kwh,
            self.disk_gb,
            self.memory_gb_hour,
        ]
        .into_iter()
        .chain(self.gpu_second.values().copied())
        .chain(self.network_egress_gb.values().copied())
        .all(|p| p == 0.0)
    }
}

/// One budget.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Budget {
    /// Unique; the `budget` label of every metric and alert about it.
    pub name: String,
    /// What is counted.
    pub resource: Resource,
    /// For `network_egress_bytes`: only traffic to this destination scope; all scopes when unset.
    #[serde(default)]
    pub scope: Option<String>,
    /// For `tokens`: only tokens of this kind (`prompt`, `generation`, `cached`); prompt and
    /// generation tokens when unset (cached ones are part of the prompt).
    #[serde(default)]
    pub kind: Option<String>,
    /// The budget, in the resource's base unit (seconds, bytes, joules, currency).
    pub limit: f64,
    /// A sliding window (`"60s"`, `"5m"`, `"1h"`): `limit` per window, a rate.
    #[serde(default)]
    pub window: Option<String>,
    /// A calendar quota that resets at the start of each UTC hour or day.
    #[serde(default)]
    pub period: Option<Period>,
    /// Warn (log, metric, alert) at this fraction of the limit (0 < warn_at ≤ 1).
    #[serde(default = "default_warn_at")]
    pub warn_at: f64,
    /// An enforced budget is released when usage falls below this fraction of the limit
    /// (hysteresis, 0 < release_below < 1).
    #[serde(default = "default_release_below")]
    pub release_below: f64,
    /// What enforcing does.
    #[serde(default)]
    pub action: Action,
    /// Decide, log and alert, but touch nothing.
    #[serde(default)]
    pub dry_run: bool,
    /// One budget shared by every workload the selector matches (summed usage, throttles split
    /// among them); per workload when false.
    #[serde(default)]
    pub shared: bool,
    /// One shared budget per value of this pod label (a namespace label too where `[tenants]`
    /// promotes it), or per Kubernetes namespace with `"namespace"`: `per = "team"` holds each
    /// team to `limit` on its own. Workloads without a value are not selected. Implies `shared`.
    #[serde(default)]
    pub per: Option<String>,
    /// Whose use counts: `node` (this node's workloads, metered here) or `cluster` (every
    /// node's, as `[cluster]`'s Prometheus sums it). A cluster budget is enforced on this node's
    /// selected workloads, shared among them (or per group with `per`).
    #[serde(default)]
    pub span: Span,
    /// A cluster budget's PromQL, answering its usage in the resource's base unit: one series,
    /// or one per value of `per` labelled with it. Built from the budget when unset.
    #[serde(default)]
    pub query: Option<String>,
    /// What a cluster budget does while its query has no answer younger than
    /// `cluster.max_staleness_secs`.
    #[serde(default)]
    pub on_unavailable: OnUnavailable,
    /// What happens to a workload that starts while its shared, `per` or cluster budget is
    /// enforced: `none` (it is throttled with the others from its first tick), `deny` (refused
    /// by the NRI plugin, or held frozen from its first tick until the budget is released) or
    /// `throttle` (an `action = "cpu"` budget: created under its CPU throttle through NRI).
    #[serde(default)]
    pub admission: Admission,
    /// Which workloads the budget applies to; every field set must match.
    #[serde(default)]
    pub select: Selector,
    /// Actuator settings; where unset, derived from the budget when its resource is the one the
    /// actuator limits (a `cpu_seconds` rate for `cpu`, and so on).
    #[serde(default)]
    pub throttle: ThrottleParams,
}

fn default_warn_at() -> f64 {
    0.8
}

fn default_release_below() -> f64 {
    0.9
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Resource {
    CpuSeconds,
    GpuSeconds,
    /// GPU memory held now (a gauge: no window or period).
    GpuMemoryBytes,
    GpuEnergyJoules,
    NetworkEgressBytes,
    DiskBytes,
    DiskReadBytes,
    DiskWriteBytes,
    /// Priced from `[prices]`.
    Cost,
    /// Tokens the workloads' inference servers processed (`kind`: one kind; prompt and
    /// generation tokens when unset).
    Tokens,
    /// The fullest KV cache of the workloads' inference servers, a fraction (a level).
    KvCacheRatio,
}

impl Resource {
    pub fn as_str(self) -> &'static str {
        match self {
            Resource::CpuSeconds => "cpu_seconds",
            Resource::GpuSeconds => "gpu_seconds",
            Resource::GpuMemoryBytes => "gpu_memory_bytes",
            Resource::GpuEnergyJoules => "gpu_energy_joules",
            Resource::NetworkEgressBytes => "network_egress_bytes",
            Resource::DiskBytes => "disk_bytes",
            Resource::DiskReadBytes => "disk_read_bytes",
            Resource::DiskWriteBytes => "disk_write_bytes",
            Resource::Cost => "cost",
            Resource::Tokens => "tokens",
            Resource::KvCacheRatio => "kv_cache_ratio",
        }
    }

    /// A level rather than an amount: compared as it is, not summed over a window.
    pub fn is_gauge(self) -> bool {
        matches!(self, Resource::GpuMemoryBytes | Resource::KvCacheRatio)
    }

    /// The names a budget's sub-selection may take: `scope` of egress, `kind` of tokens.
    pub fn parts(self) -> &'static [&'static str] {
        match self {
            Resource::NetworkEgressBytes => &SCOPES,
            Resource::Tokens => &crate::catalogue::inference::TOKEN_KINDS,
            _ => &[],
        }
    }
}

/// Whether a spent budget lets new workloads start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Admission {
    #[default]
    None,
    /// Refused at creation where the NRI plugin runs (`admission.nri_socket`); held frozen from
    /// the first tick that sees it otherwise, while the budget is enforced.
    Deny,
    /// Created under the budget's CPU throttle where the NRI plugin runs (its share of the
    /// budget's cores, as `cpu.max` from the start); throttled from the first tick otherwise.
    Throttle,
}

/// Whose use a budget counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Span {
    #[default]
    Node,
    Cluster,
}

/// A cluster budget's state while the cluster's usage is unknown.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnUnavailable {
    /// Keep enforcing, or not, as at the last answer.
    #[default]
    Hold,
    /// Release: nothing is throttled without an answer that says so.
    Open,
    /// Enforce: nothing runs unthrottled without an answer that allows it.
    Closed,
}

impl OnUnavailable {
    pub fn as_str(self) -> &'static str {
        match self {
            OnUnavailable::Hold => "hold",
            OnUnavailable::Open => "open",
            OnUnavailable::Closed => "closed",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Period {
    Hour,
    Day,
}

impl Period {
    pub fn secs(self) -> u64 {
        match self {
            Period::Hour => 3600,
            Period::Day => 86_400,
        }
    }
}

#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Log, metric and alert only.
    #[default]
    Alert,
    /// CPU bandwidth: `cpu.max` (v2) or `cpu.cfs_quota_us` (v1).
    Cpu,
    /// Egress rate: a token bucket in the `cgroup_skb` egress program.
    Network,
    /// Block I/O rate: `io.max` (v2) or `blkio.throttle.*_bps_device` (v1).
    Disk,
    /// Duty-cycle freezing (`cgroup.freeze` v2, `freezer.state` v1): holds any resource's rate,
    /// GPU time included, to the budget.
    Freeze,
    /// SIGTERM to every process of the workload. Opt-in: only a budget that names it does it.
    Terminate,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Alert => "alert",
            Action::Cpu => "cpu",
            Action::Network => "network",
            Action::Disk => "disk",
            Action::Freeze => "freeze",
            Action::Terminate => "terminate",
        }
    }

    /// Whether it changes the workload (and so can conflict with another budget's doing so).
    pub fn actuates(self) -> bool {
        self != Action::Alert
    }
}

/// Which workloads a budget selects. Globs take `*` (any run of characters) and `?` (one).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Selector {
    /// Kubernetes namespace (exact).
    pub namespace: Option<String>,
    /// Pod name glob.
    pub pod: Option<String>,
    /// Container name (exact).
    pub container: Option<String>,
    /// systemd unit name glob.
    pub unit: Option<String>,
    /// Glob of the workload's cgroup path, relative to the hierarchy root (`/kubepods.slice/*`).
    pub cgroup: Option<String>,
    /// Pod labels that must all be present with these values (when the runtime provides them).
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ThrottleParams {
    /// `cpu`: cores allowed while enforced.
    pub cpu_cores: Option<f64>,
    /// `network`: egress bytes per second while enforced.
    pub egress_bytes_per_sec: Option<f64>,
    /// `disk`: read and write bytes per second per device while enforced.
    pub disk_bytes_per_sec: Option<f64>,
    /// `freeze`: a fixed fraction of each cycle the workload runs; without it, the fraction is
    /// steered so the resource's rate stays at `limit / window`.
    pub share: Option<f64>,
}

/// Why a `window` text is not a duration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("`{text}` has no unit (s, m, h or d)")]
    NoUnit { text: String },
    #[error("`{text}` does not start with a whole number")]
    NoNumber {
        text: String,
        #[source]
        source: std::num::ParseIntError,
    },
    #[error("`{text}`: unknown unit `{unit}` (s, m, h or d)")]
    UnknownUnit { text: String, unit: String },
}

/// `"90s"`, `"5m"`, `"2h"`, `"1d"` → a duration.
pub fn parse_duration(text: &str) -> Result<Duration, DurationError> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| DurationError::NoUnit {
            text: text.to_owned(),
        })?;
    let (number, unit) = text.split_at(split);
    let n: u64 = number.parse().map_err(|source| DurationError::NoNumber {
        text: text.to_owned(),
        source,
    })?;
    let secs = match unit {
        "s" => n,
        "m" => n.saturating_mul(60),
        "h" => n.saturating_mul(3600),
        "d" => n.saturating_mul(86_400),
        _ => {
            return Err(DurationError::UnknownUnit {
                text: text.to_owned(),
                unit: unit.to_owned(),
            })
        }
    };
    Ok(Duration::from_secs(secs))
}

/// Shell-style glob over a whole string: `*` any run, `?` any one character.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti) = (0, 0);
    // Where the last `*` was, and the text position it currently swallows up to.
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// Whether two globs can match a common string, judged by their literal prefixes (up to the
/// first wildcard): `None` patterns match everything. Errs towards "may overlap".
fn may_overlap(a: Option<&str>, b: Option<&str>) -> bool {
    let (Some(a), Some(b)) = (a, b) else {
        return true;
    };
    let literal = |s: &str| {
        s.find(['*', '?'])
            .map_or((s.to_owned(), true), |i| (s[..i].to_owned(), false))
    };
    let ((pa, exact_a), (pb, exact_b)) = (literal(a), literal(b));
    match (exact_a, exact_b) {
        (true, true) => pa == pb,
        (true, false) => glob_match(b, &pa),
        (false, true) => glob_match(a, &pb),
        (false, false) => pa.starts_with(&pb) || pb.starts_with(&pa),
    }
}

impl Selector {
    /// Whether some workload could match both selectors.
    pub fn may_overlap(&self, other: &Selector) -> bool {
        let exact = |a: &Option<String>, b: &Option<String>| match (a, b) {
            (Some(a), Some(b)) => a == b,
            _ => true,
        };
        let labels = self
            .labels
            .iter()
            .all(|(k, v)| other.labels.get(k).is_none_or(|w| w == v));
        exact(&self.namespace, &other.namespace)
            && exact(&self.container, &other.container)
            && may_overlap(self.pod.as_deref(), other.pod.as_deref())
            && may_overlap(self.unit.as_deref(), other.unit.as_deref())
            && may_overlap(self.cgroup.as_deref(), other.cgroup.as_deref())
            && labels
    }
}

/// What a budget's `per` groups by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Per {
    /// The Kubernetes namespace.
    Namespace,
    /// A pod label (or promoted namespace label), by its key, and the label name its budget rows
    /// carry.
    Label { key: String, name: &'static str },
}

/// `per`, checked: `namespace`, or a label key whose label name no series uses already.
pub fn per_label(per: &str) -> Result<Per, String> {
    if per == "namespace" {
        return Ok(Per::Namespace);
    }
    if !super::validate::valid_label_key(per) {
        return Err(format!(
            "`{per}` is neither `namespace` nor a Kubernetes label key"
        ));
    }
    let name = super::labels::label_name(per);
    if super::validate::reserved_label_names().contains(name.as_str()) || name.starts_with("__") {
        return Err(format!(
            "`{per}` would be the label `{name}`, which Tally's series already use"
        ));
    }
    Ok(Per::Label {
        key: per.to_owned(),
        name: super::labels::intern(&name),
    })
}

/// The network scopes a budget's `scope` may name.
pub const SCOPES: [&str; 5] = ["node", "cluster", "zone", "region", "internet"];

/// What an enforcing budget sets its actuator to.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Target {
    None,
    CpuCores(f64),
    EgressBytesPerSec(f64),
    DiskBytesPerSec(f64),
    /// A fixed running fraction of each freeze cycle.
    FreezeShare(f64),
    /// Steer the running fraction so the resource's rate stays at this many units per second.
    FreezeRate(f64),
    Terminate,
}

/// The budget's rate in units per second, when it is a sliding-window budget.
pub fn rate(b: &Budget) -> Option<f64> {
    let secs = parse_duration(b.window.as_deref()?).ok()?.as_secs_f64();
    (secs > 0.0).then(|| b.limit / secs)
}

/// Why an enforcing budget has no actuator setting.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    /// The action's `throttle` parameter is unset and the budget is not a rate of what the
    /// action limits.
    #[error("`{}` needs `throttle.{param}` unless the budget is a `window` rate of {what}", action.as_str())]
    NoSetting {
        action: Action,
        param: &'static str,
        what: &'static str,
    },
    #[error("`freeze` needs `throttle.share` unless the budget is a `window` rate")]
    NoFreezeShare,
    /// A cluster budget's rate is the cluster's: it says nothing about what this node may use.
    #[error("a cluster budget's `{}` action needs `throttle.{param}`: the cluster's rate says nothing about one node's share", action.as_str())]
    ClusterSetting { action: Action, param: &'static str },
}

/// The actuator setting a budget enforces, or why it has none.
pub fn actuator_target(b: &Budget) -> Result<Target, TargetError> {
    let cluster = b.span == Span::Cluster;
    let derived =
        |resources: &[Resource]| rate(b).filter(|_| !cluster && resources.contains(&b.resource));
    let need = |param: &'static str, what: &'static str| match cluster {
        true => TargetError::ClusterSetting {
            action: b.action,
            param,
        },
        false => TargetError::NoSetting {
            action: b.action,
            param,
            what,
        },
    };
    Ok(match b.action {
        Action::Alert => Target::None,
        Action::Terminate => Target::Terminate,
        Action::Cpu => Target::CpuCores(
            b.throttle
                .cpu_cores
                .or_else(|| derived(&[Resource::CpuSeconds]))
                .ok_or_else(|| need("cpu_cores", "`cpu_seconds`"))?,
        ),
        Action::Network => Target::EgressBytesPerSec(
            b.throttle
                .egress_bytes_per_sec
                .or_else(|| derived(&[Resource::NetworkEgressBytes]))
                .ok_or_else(|| need("egress_bytes_per_sec", "`network_egress_bytes`"))?,
        ),
        Action::Disk => Target::DiskBytesPerSec(
            b.throttle
                .disk_bytes_per_sec
                .or_else(|| {
                    derived(&[
                        Resource::DiskBytes,
                        Resource::DiskReadBytes,
                        Resource::DiskWriteBytes,
                    ])
                })
                .ok_or_else(|| need("disk_bytes_per_sec", "disk bytes"))?,
        ),
        Action::Freeze => match (b.throttle.share, rate(b)) {
            (Some(share), _) => Target::FreezeShare(share),
            (None, Some(rate)) if !b.resource.is_gauge() && !cluster => Target::FreezeRate(rate),
            _ if cluster => return Err(need("share", "")),
            _ => return Err(TargetError::NoFreezeShare),
        },
    })
}

#[cfg(test)]
mod tests;
