//! The agent's configuration: one TOML file of serde structs, every field with a default, so an
//! empty file (or none) runs the agent on its embedded defaults.

pub mod admission;
pub mod cluster;
pub mod labels;
pub mod policy;
mod validate;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use validate::{ConfigError, ConfigErrors};

/// Where `tally agent` and `tally validate` look when `--config` is not given.
pub const DEFAULT_PATH: &str = "/etc/tally/tally.toml";

/// The default listen address. 9100 (node_exporter) and 9400 (dcgm-exporter) are taken on GPU
/// nodes; 9811 is not in the Prometheus default port allocations.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:9811";

/// The whole configuration file.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The daemon itself: listen address, tick, logging.
    pub agent: AgentConfig,
    /// Host filesystem roots, so a container can mount the host's under `/host`.
    pub paths: PathsConfig,
    /// How long the ledger keeps what exited workloads used.
    pub ledger: LedgerConfig,
    /// How often workloads' cgroup files are read.
    pub cgroupfs: CgroupfsConfig,
    /// The container runtime's CRI socket, for pod and container names.
    pub cri: CriConfig,
    /// Pod and namespace labels promoted to labels of every per-workload series (teams,
    /// projects, cost centres).
    pub tenants: TenantsConfig,
    /// NVML.
    pub gpu: GpuConfig,
    /// RDMA: port counters from sysfs, per-process QP counters through RDMA netlink.
    pub rdma: RdmaConfig,
    /// Inference servers inside workloads: tokens, requests and KV cache per model.
    pub inference: InferenceConfig,
    /// eBPF sources: which load, and their map sizes.
    pub ebpf: EbpfConfig,
    /// Destination scopes of network traffic.
    pub network: NetworkConfig,
    /// OTLP push of the same metrics `/metrics` serves.
    pub otlp: OtlpConfig,
    /// Budget enforcement: where its state lives, the policy file, the freeze cycle.
    pub enforcement: EnforcementConfig,
    /// Where budget alerts go.
    pub alerts: AlertsConfig,
    /// The Prometheus query API that `span = "cluster"` budgets read the cluster's usage from.
    pub cluster: ClusterConfig,
    /// The container runtime's admission hook (NRI): spent budgets refuse or throttle new
    /// containers at creation.
    pub admission: admission::AdmissionConfig,
    /// Prices for `cost` budgets (a policy file's `[prices]` replaces these).
    pub prices: policy::Prices,
    /// Budgets (`[[budget]]`), or those of `enforcement.policy_file`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub budget: Vec<policy::Budget>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EnforcementConfig {
    /// Apply throttles at all. Off: budgets are still evaluated, logged and alerted, as if every
    /// one were `dry_run`.
    pub enabled: bool,
    /// A separate policy file (`[[budget]]`, `[prices]`), e.g. from a Kubernetes ConfigMap.
    /// Read at start and on every reload; its errors refuse the reload like the config's.
    pub policy_file: Option<PathBuf>,
    /// Where throttles are recorded before they are applied, and window consumption is kept
    /// across restarts (`state.json`).
    pub state_dir: PathBuf,
    /// Length of one freeze duty cycle in milliseconds (20–10000). A cgroup is never left
    /// frozen longer than this after the agent dies.
    pub freeze_period_ms: u64,
    /// Namespaces whose workloads `admission = "deny"` budgets never hold (system pods must
    /// start whatever a tenant spent); the agent's own, from `POD_NAMESPACE`, is added.
    pub admission_exempt_namespaces: Vec<String>,
}

impl Default for EnforcementConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            policy_file: None,
            state_dir: PathBuf::from("/var/lib/tally"),
            freeze_period_ms: 100,
            admission_exempt_namespaces: vec!["kube-system".to_owned()],
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertsConfig {
    /// Alertmanager base URLs (`http://alertmanager:9093`); each gets every alert through
    /// `/api/v2/alerts`.
    pub alertmanager_urls: Vec<String>,
    /// Generic JSON webhooks (Alertmanager's webhook payload shape).
    pub webhook_urls: Vec<String>,
    /// Deadline of one delivery attempt in milliseconds (10–60000).
    pub timeout_ms: u64,
    /// Attempts per alert and URL before it is counted as failed (1–20).
    pub max_attempts: u32,
    /// Seconds between re-sends of a firing alert (Alertmanager resolves alerts not re-sent
    /// within its `resolve_timeout`), 10–3600.
    pub resend_interval_secs: u64,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        Self {
            alertmanager_urls: Vec::new(),
            webhook_urls: Vec::new(),
            timeout_ms: 5000,
            max_attempts: 5,
            resend_interval_secs: 60,
        }
    }
}

/// The query endpoint of cluster-wide budgets: Prometheus, or anything that serves its HTTP
/// API (Thanos Query, Mimir, VictoriaMetrics). Credentials are read from files at each query,
/// so a rotated token is used without a reload and no secret sits in this file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// Base URL of the API, `http://` or `https://` (`/api/v1/query` is appended; include any
    /// path prefix, e.g. Mimir's `/prometheus`). Empty: no cluster budgets.
    pub query_url: String,
    /// Seconds between evaluations of every cluster budget (1–3600).
    pub interval_secs: u64,
    /// Deadline of one query in milliseconds, connection and TLS included (10–60000).
    pub timeout_ms: u64,
    /// An answer older than this many seconds is no answer: the budget is unavailable and does
    /// what its `on_unavailable` says (at least `interval_secs`).
    pub max_staleness_secs: u64,
    /// A file holding a bearer token sent as `Authorization: Bearer`.
    pub bearer_token_file: Option<PathBuf>,
    /// Basic auth user name; its password is read from `basic_auth_password_file`.
    pub basic_auth_username: String,
    pub basic_auth_password_file: Option<PathBuf>,
    /// PEM certificates an `https://` server must chain to; the system's bundle when unset.
    pub ca_file: Option<PathBuf>,
    /// Largest answer read, in bytes (1 KiB–64 MiB); a larger one is a counted failure.
    pub max_response_bytes: usize,
}

/// Where an `https://` server's certificate is verified when `cluster.ca_file` is unset.
pub const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            query_url: String::new(),
            interval_secs: 30,
            timeout_ms: 5000,
            max_staleness_secs: 120,
            bearer_token_file: None,
            basic_auth_username: String::new(),
            basic_auth_password_file: None,
            ca_file: None,
            max_response_bytes: 1 << 20,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OtlpConfig {
    /// Collector endpoint, `http://host:4317` (gRPC) or `http://host:4318` (HTTP; `/v1/metrics`
    /// is appended). Empty disables the push.
    pub endpoint: String,
    /// `grpc` or `http/protobuf`.
    pub protocol: OtlpProtocol,
    /// Seconds between pushes (1–3600).
    pub interval_secs: u64,
    /// Deadline of one export in milliseconds (10–60000).
    pub timeout_ms: u64,
    /// Batches kept while the collector is unreachable (1–1000); beyond, the oldest is dropped
    /// and counted.
    pub queue_batches: usize,
    /// Attempts per batch and push (1–10).
    pub max_attempts: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum OtlpProtocol {
    #[serde(rename = "grpc")]
    Grpc,
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
}

impl Default for OtlpConfig {
    fn default() -> Self {
        Self {
            endpoint: String::new(),
            protocol: OtlpProtocol::Grpc,
            interval_secs: 10,
            timeout_ms: 5000,
            queue_batches: 16,
            max_attempts: 3,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EbpfConfig {
    /// Load the eBPF sources at all. Off: network and TCP metrics are absent, cgroupfs still works.
    pub enabled: bool,
    /// Entries of the network counter map: one per cgroup × direction × scope seen between two
    /// ticks (64–4194304). When full, updates are counted in `tally_ebpf_map_updates_lost_total`.
    pub max_net_entries: u32,
    /// Entries of the per-cgroup TCP and disk counter maps (64–4194304).
    pub max_cgroup_entries: u32,
    /// Attach methods never to use, e.g. `["tp_btf"]` to force the fallback
    /// (`fentry`, `tp_btf`, `raw_tracepoint`, `tracepoint`, `kprobe`, `cgroup_skb`).
    pub disabled_methods: Vec<String>,
    /// When the kernel's `bpf_stats` (run count and time of every BPF program, for
    /// `tally_ebpf_program_*`) is on: `sampled` for one tick every `program_stats_every_secs`,
    /// `always`, or `off`. While on, every BPF program on the node pays two clock reads per run.
    pub program_stats: ProgramStatsMode,
    /// The sampling period of `program_stats = "sampled"`, in seconds (1–3600).
    pub program_stats_every_secs: u64,
}

impl Default for EbpfConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            max_net_entries: 16384,
            max_cgroup_entries: 16384,
            disabled_methods: Vec::new(),
            program_stats: ProgramStatsMode::Sampled,
            program_stats_every_secs: 30,
        }
    }
}

/// See [`EbpfConfig::program_stats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProgramStatsMode {
    Sampled,
    Always,
    Off,
}

/// Where remote addresses are, for `tally_workload_network_*{scope}`. Loopback and the node's
/// own addresses are always `node`; an address no range matches is `internet`. The most specific
/// range wins.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkConfig {
    /// Extra `node` ranges (`addr/len`), besides loopback and the interfaces' addresses.
    pub node_cidrs: Vec<String>,
    /// Pod and service CIDRs.
    pub cluster_cidrs: Vec<String>,
    /// The zone's ranges: traffic here is cheap.
    pub zone_cidrs: Vec<String>,
    /// The region's ranges: cross-zone traffic, billed.
    pub region_cidrs: Vec<String>,
}

/// The method names `ebpf.disabled_methods` accepts.
pub const ATTACH_METHODS: [&str; 6] = [
    "fentry",
    "tp_btf",
    "raw_tracepoint",
    "tracepoint",
    "kprobe",
    "cgroup_skb",
];

/// An `addr/len` range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: std::net::IpAddr,
    pub prefix_len: u8,
}

impl std::str::FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, len) = s
            .split_once('/')
            .ok_or_else(|| format!("`{s}` is not a CIDR (addr/len)"))?;
        let addr: std::net::IpAddr = addr
            .parse()
            .map_err(|e| format!("`{s}`: bad address: {e}"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix_len: u8 = len
            .parse()
            .ok()
            .filter(|l| *l <= max)
            .ok_or_else(|| format!("`{s}`: prefix length must be 0..={max}"))?;
        Ok(Cidr { addr, prefix_len })
    }
}

impl NetworkConfig {
    /// Every configured range with its scope name, in config order; invalid ones are skipped
    /// (validation reports them).
    pub fn ranges(&self) -> Vec<(&'static str, Cidr)> {
        [
            ("node", &self.node_cidrs),
            ("cluster", &self.cluster_cidrs),
            ("zone", &self.zone_cidrs),
            ("region", &self.region_cidrs),
        ]
        .into_iter()
        .flat_map(|(scope, list)| {
            list.iter()
                .filter_map(move |s| s.parse::<Cidr>().ok().map(|c| (scope, c)))
        })
        .collect()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// Address of the HTTP endpoint (`/metrics`, `/healthz`, `/readyz`), `host:port`.
    /// `--listen` and `TALLY_LISTEN` override it.
    pub listen: String,
    /// How often sources are read and the snapshot is rendered, in milliseconds (100–60000).
    pub tick_interval_ms: u64,
    /// Log filter in `tracing` syntax (`info`, `tally=debug`); `RUST_LOG` overrides it.
    pub log_level: String,
    /// `text` or `json`.
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PathsConfig {
    /// procfs mount point (`/host/proc` in a DaemonSet).
    pub proc_root: PathBuf,
    /// sysfs mount point.
    pub sys_root: PathBuf,
    /// Where cgroup hierarchies are mounted: a cgroup2 mount (pure v2), or a directory holding
    /// `unified/` and the v1 controllers (hybrid, v1).
    pub cgroup_root: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LedgerConfig {
    /// Seconds an exited workload's final values stay exported before its series disappear.
    pub grace_period_secs: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CgroupfsConfig {
    /// How often the cgroup files (CPU, memory, disk) of a workload that no budget selects are
    /// read, in milliseconds (0..=300000); 0 reads them every tick. Workloads a budget selects,
    /// and new ones, are read every tick. Between reads such a workload's series keep their last
    /// values; CPU time of its tasks that end is still billed exactly at exit (the lifecycle
    /// probe), but its cgroup disk bytes since its last read are not.
    pub read_interval_ms: u64,
    /// Read every workload's CPU and memory with one walk of a BPF cgroup iterator a tick
    /// (kernel 6.1 and later, with `ebpf.enabled`) instead of two cgroup files each; the files
    /// stay the fallback. Its size is `ebpf.max_cgroup_entries` cgroups; those beyond are read
    /// from files and counted. Every tick, whatever `read_interval_ms` says.
    pub bpf_iterator: bool,
}

impl Default for CgroupfsConfig {
    fn default() -> Self {
        Self {
            read_interval_ms: 0,
            bpf_iterator: true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CriConfig {
    /// CRI sockets tried in order; the first that answers is used. Empty disables CRI lookups.
    pub endpoints: Vec<PathBuf>,
    /// Seconds between two listings while every container is already known (a new container id
    /// triggers one at once, rate-limited to one a second).
    pub refresh_interval_secs: u64,
    /// Deadline of one CRI call in milliseconds.
    pub timeout_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TenantsConfig {
    /// Label keys (`team`, `cost-center`) promoted to labels of every series of a pod's
    /// workloads, spelled as Prometheus labels (`cost_center`): the pod's own label, else its
    /// namespace's (from `namespace_labels_file`), else empty. As kube-state-metrics'
    /// `--metric-labels-allowlist`. Empty: none.
    pub labels: Vec<String>,
    /// Namespace labels as `kubectl get namespaces -o json` prints them (a `NamespaceList`), e.g.
    /// from a ConfigMap a cluster job keeps current. Read again when it changes. Unset: pod
    /// labels only.
    pub namespace_labels_file: Option<PathBuf>,
    /// Distinct values each promoted label may take (1..=10000), first come first kept; a value
    /// beyond them is exported as `other`, and counted in `tally_tenant_values_folded_total`.
    pub max_values_per_label: usize,
}

impl Default for TenantsConfig {
    fn default() -> Self {
        Self {
            labels: Vec::new(),
            namespace_labels_file: None,
            max_values_per_label: 100,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GpuConfig {
    /// Path of `libnvidia-ml.so.1`; unset lets the dynamic loader find it.
    pub nvml_library: Option<PathBuf>,
    /// The kubelet's pod-resources socket, which says which pod container holds which GPU even
    /// when its processes are invisible (no hostPID). Empty disables it.
    pub pod_resources_socket: PathBuf,
}

impl Default for GpuConfig {
    fn default() -> Self {
        Self {
            nvml_library: None,
            pod_resources_socket: PathBuf::from("/var/lib/kubelet/pod-resources/kubelet.sock"),
        }
    }
}

/// RDMA metering: port counters from `<paths.sys_root>/class/infiniband`, per-process traffic
/// from QP counters read through RDMA netlink (nldev), and the port counters of devices the
/// kubelet assigned to a pod (`gpu.pod_resources_socket`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RdmaConfig {
    /// Meter RDMA at all. Off: no `tally_rdma_*` or `tally_workload_rdma_*` families.
    pub enabled: bool,
    /// Read per-process QP counters through RDMA netlink. Off: port counters only.
    pub netlink: bool,
    /// Where nldev requests go: empty for the kernel (`NETLINK_RDMA`), or the path of a unix
    /// seqpacket socket that relays the same messages (a proxy, a responder replaying dumps).
    pub netlink_socket: PathBuf,
    /// Deadline of one nldev exchange in milliseconds (10–60000).
    pub netlink_timeout_ms: u64,
    /// Turn QP counter auto mode by pid on (`rdma statistic qp set link DEV/PORT auto type pid
    /// on`) where it is off, and back off at exit. It changes device state for every user of
    /// the port, so it is off by default: per-process counters then work only on ports where
    /// an operator turned auto mode on.
    pub allow_qp_counter_auto_mode: bool,
    /// With auto mode turned on by Tally: bind the port's optional counters to the per-process
    /// counters too (Linux 6.15+; on mlx5 that is where per-QP byte and packet counts are).
    pub qp_optional_counters: bool,
}

impl Default for RdmaConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            netlink: true,
            netlink_socket: PathBuf::new(),
            netlink_timeout_ms: 1000,
            allow_qp_counter_auto_mode: false,
            qp_optional_counters: false,
        }
    }
}

/// `[inference]`: finding the inference servers inside workloads and reading their metrics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InferenceConfig {
    /// Find and scrape inference servers at all. Off: no inference families.
    pub enabled: bool,
    /// Seconds between two rounds of discovery and scrapes (1–3600): one request per server
    /// per round, off the tick.
    pub interval_secs: u64,
    /// Deadline of one scrape, connect to last byte, in milliseconds (10–60000).
    pub timeout_ms: u64,
    /// Largest metrics body read (1 KiB–256 MiB); a larger one is refused and counted.
    pub max_body_bytes: u64,
    /// Scrapes in flight at once (1–64), each on its own thread.
    pub max_concurrent: usize,
}

impl Default for InferenceConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            interval_secs: 5,
            timeout_ms: 2000,
            max_body_bytes: 4 << 20,
            max_concurrent: 8,
        }
    }
}

impl InferenceConfig {
    pub fn interval(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.interval_secs)
    }

    pub fn timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.timeout_ms)
    }
}

fn default_listen() -> String {
    DEFAULT_LISTEN.to_owned()
}
fn default_tick_interval_ms() -> u64 {
    1000
}
fn default_log_level() -> String {
    "info".to_owned()
}
fn default_grace_period_secs() -> u64 {
    300
}
fn default_cri_endpoints() -> Vec<PathBuf> {
    vec![
        PathBuf::from("/run/containerd/containerd.sock"),
        PathBuf::from("/run/crio/crio.sock"),
    ]
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            tick_interval_ms: default_tick_interval_ms(),
            log_level: default_log_level(),
            log_format: LogFormat::Text,
        }
    }
}

impl Default for PathsConfig {
    fn default() -> Self {
        Self {
            proc_root: PathBuf::from("/proc"),
            sys_root: PathBuf::from("/sys"),
            cgroup_root: PathBuf::from("/sys/fs/cgroup"),
        }
    }
}

impl Default for LedgerConfig {
    fn default() -> Self {
        Self {
            grace_period_secs: default_grace_period_secs(),
        }
    }
}

impl Default for CriConfig {
    fn default() -> Self {
        Self {
            endpoints: default_cri_endpoints(),
            refresh_interval_secs: 10,
            timeout_ms: 2000,
        }
    }
}

impl Config {
    /// Parses and validates `text`; every problem is reported, not only the first.
    pub fn parse(text: &str) -> Result<Config, ConfigErrors> {
        validate::parse(text)
    }

    /// Reads and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors(vec![ConfigError {
                file: None,
                path: String::new(),
                line: None,
                message: format!("cannot read {}: {e}", path.display()),
            }])
        })?;
        Self::parse(&text)?.with_policy_file()
    }

    /// Parses and validates the text of the policy file `file` (named in errors).
    pub fn parse_policy(text: &str, file: &Path) -> Result<policy::PolicyFile, ConfigErrors> {
        validate::parse_policy(text, file)
    }

    /// Reads `enforcement.policy_file`, when set, into `budget` and `prices`.
    pub fn with_policy_file(mut self) -> Result<Config, ConfigErrors> {
        let Some(path) = self.enforcement.policy_file.clone() else {
            return Ok(self);
        };
        let text = std::fs::read_to_string(&path).map_err(|e| {
            ConfigErrors(vec![ConfigError {
                file: None,
                path: "enforcement.policy_file".to_owned(),
                line: None,
                message: format!("cannot read {}: {e}", path.display()),
            }])
        })?;
        let policy = Self::parse_policy(&text, &path)?;
        self.budget = policy.budget;
        if let Some(prices) = policy.prices {
            self.prices = prices;
        }
        // What a cluster budget asks depends on this file's `[cluster]` and `[tenants]`.
        let errors: Vec<ConfigError> = cluster::check(&self)
            .into_iter()
            .map(|(key, message)| ConfigError {
                file: Some(path.clone()),
                path: key,
                line: None,
                message,
            })
            .collect();
        if !errors.is_empty() {
            return Err(ConfigErrors(errors));
        }
        Ok(self)
    }

    /// The listen address; validation guarantees it parses.
    pub fn listen_addr(&self) -> Result<SocketAddr, std::net::AddrParseError> {
        self.agent.listen.parse()
    }

    /// The host's name, from `paths.proc_root`; empty when unreadable.
    pub fn hostname(&self) -> String {
        std::fs::read_to_string(self.paths.proc_root.join("sys/kernel/hostname"))
            .map(|h| h.trim().to_owned())
            .unwrap_or_default()
    }

    /// The node's name for labels: `NODE_NAME` (the DaemonSet's downward API), else the host's
    /// name (inside a pod the hostname is the pod's).
    pub fn node_name(&self) -> String {
        std::env::var("NODE_NAME")
            .ok()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| self.hostname())
    }

    pub fn tick_interval(&self) -> Duration {
        Duration::from_millis(self.agent.tick_interval_ms)
    }

    pub fn grace_period(&self) -> Duration {
        Duration::from_secs(self.ledger.grace_period_secs)
    }
}
