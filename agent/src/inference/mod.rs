//! Inference metering: the tokens, requests and KV cache of the inference servers that run
//! inside workloads, per model, in one schema whatever the engine.
//!
//! A thread of its own, off the tick, runs one round every `inference.interval_secs`: it finds
//! the servers (`discover`: processes whose command line runs an engine of the table, and the
//! ports they listen on inside their network namespace), scrapes each once (`scrape`: a bounded
//! GET from inside the server's namespace, several at once), and converts what each said
//! (`exposition`, then `engines`). The tick takes the last round, if it is new: it charges each
//! server's counters to the workload of its process, as increments, so a server that restarts
//! (its counters from zero) keeps the workload's counters monotonic, and sets the gauges. A
//! slow, hanging, huge or garbage endpoint costs the round at most its deadline and never the
//! tick; it is counted in `tally_collector_errors_total{collector="inference"}` and logged once.
//!
//! A pod annotated `tally.io/inference: "off"` is not scraped: the tick tells the round thread
//! its containers' ids, and a server whose cgroup names one is left alone.

pub mod discover;
pub mod engines;
pub mod exposition;
mod round;
pub mod scrape;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tally_exporters::Family;

use crate::catalogue::inference as metrics;
use crate::config::{Config, InferenceConfig};
use crate::errors::ErrorCounts;
use crate::host::layout::Layout;
use crate::identity::{PathIdentity, PidError, Workload};
use crate::ledger::{Key, Ledger};
use crate::source::{Source, TickCtx};
use engines::{Engine, Readings, TOKEN_KINDS};
use round::rounds;

/// The `collector` label of its errors.
pub const COLLECTOR: &str = "inference";

/// The pod annotation that keeps a pod's servers from being scraped (value `off`).
pub const OPT_OUT_ANNOTATION: &str = "tally.io/inference";

/// Listeners tried per server before it counts as failed.
const MAX_TRIES: usize = 4;

/// One server process: its pid and start time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Instance {
    pub pid: u32,
    pub start: u64,
}

/// A failed scrape, as counted.
#[derive(Debug, Clone)]
struct Failure {
    reason: &'static str,
    detail: String,
}

/// One server's answer in one round.
#[derive(Debug)]
struct Scraped {
    instance: Instance,
    /// The process started before the agent: what it counted until now is history.
    before_agent: bool,
    /// The engine's name (`unknown` for an annotated server whose body was never read).
    engine: &'static str,
    result: Result<Readings, Failure>,
}

/// What a round found, for the tick.
#[derive(Debug, Default)]
struct Round {
    seq: u64,
    servers: Vec<Scraped>,
    /// Failures outside any one server's scrape (listing `/proc`).
    errors: Vec<Failure>,
    discovery: Duration,
    scrape: Duration,
}

/// What the round thread and the tick share.
#[derive(Debug, Default)]
struct Shared {
    round: Mutex<Round>,
    /// Servers in opted-out pods: not scraped.
    skip: Mutex<HashSet<Instance>>,
    /// The container ids of opted-out pods' containers, as the tick last saw them: a server
    /// whose cgroup names one is not scraped, not even once.
    opted_out: Mutex<Arc<HashSet<String>>>,
    /// Containers of pods whose `prometheus.io/port` annotation points at their metrics.
    annotated: Mutex<Arc<Vec<Annotated>>>,
}

/// A container of a pod annotated with `prometheus.io/port` (and `path`): a server of any
/// engine, told by what it serves.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Annotated {
    container_id: String,
    /// Its `cgroup.procs`, to find the process that listens on the port.
    procs: PathBuf,
    port: u16,
    path: String,
}

/// The settings a round runs with.
#[derive(Debug, Clone)]
struct Settings {
    proc_root: PathBuf,
    interval: Duration,
    limits: scrape::Limits,
    max_concurrent: usize,
}

impl Settings {
    fn of(config: &Config) -> Self {
        let i: &InferenceConfig = &config.inference;
        Settings {
            proc_root: config.paths.proc_root.clone(),
            interval: i.interval(),
            limits: scrape::Limits {
                timeout: i.timeout(),
                max_body: usize::try_from(i.max_body_bytes).unwrap_or(usize::MAX),
            },
            max_concurrent: i.max_concurrent,
        }
    }
}

/// A round's gauge values, per workload.
type Levels = HashMap<PathIdentity, (Arc<Workload>, BTreeMap<Key, f64>)>;

/// What the tick keeps about a server between rounds.
#[derive(Debug)]
struct Server {
    workload: Arc<Workload>,
    /// Its next answer is a baseline, not use (it ran before the agent started).
    baseline: bool,
    /// The last cumulative value of each counter series, to charge increments.
    last: BTreeMap<Key, f64>,
}

/// The source.
#[derive(Debug)]
pub struct InferenceSource {
    enabled: bool,
    shared: Arc<Shared>,
    /// Sends the round thread new settings; dropping it stops the thread.
    control: Option<mpsc::Sender<Settings>>,
    interval: Duration,
    seen_seq: u64,
    servers: HashMap<Instance, Server>,
    /// The gauge series set at the last round, per workload.
    gauges: HashMap<PathIdentity, (Arc<Workload>, Vec<Key>)>,
    /// Servers per engine and whether their last scrape answered.
    up: BTreeMap<(&'static str, bool), usize>,
    last_discovery: Duration,
    last_scrape: Duration,
}

impl InferenceSource {
    /// Starts the round thread, unless `inference.enabled` is off.
    pub fn start(config: &Config) -> InferenceSource {
        let mut source = InferenceSource {
            enabled: false,
            shared: Arc::new(Shared::default()),
            control: None,
            interval: config.inference.interval(),
            seen_seq: 0,
            servers: HashMap::new(),
            gauges: HashMap::new(),
            up: BTreeMap::new(),
            last_discovery: Duration::ZERO,
            last_scrape: Duration::ZERO,
        };
        if config.inference.enabled {
            source.spawn(Settings::of(config));
        }
        source
    }

    fn spawn(&mut self, settings: Settings) {
        let (tx, rx) = mpsc::channel();
        let shared = self.shared.clone();
        let spawned = std::thread::Builder::new()
            .name("tally-inference".into())
            .spawn(move || rounds(settings, rx, &shared));
        match spawned {
            Ok(_) => {
                self.enabled = true;
                self.control = Some(tx);
            }
            Err(e) => {
                tracing::warn!(error = %e, "the inference thread could not start: inference metering off");
            }
        }
    }

    /// Tells the round thread which containers belong to opted-out pods, and which pods'
    /// annotations point at metrics, when that changed.
    fn publish_pods(&mut self, ctx: &TickCtx<'_>) {
        let now: HashSet<String> = ctx
            .workloads
            .iter()
            .filter(|w| opted_out(w))
            .filter_map(|w| w.container_id().map(str::to_owned))
            .collect();
        if let Ok(mut slot) = self.shared.opted_out.lock() {
            if **slot != now {
                *slot = Arc::new(now);
            }
        }
        let layout = ctx.identity.layout();
        let mut annotated = Vec::new();
        for (found, w) in ctx.discovery.found.iter().zip(ctx.workloads) {
            let (Some(id), Some(port)) = (w.container_id(), annotated_port(w)) else {
                continue;
            };
            let rel = found.rel.trim_start_matches('/');
            let Some(dir) = layout
                .unified
                .iter()
                .map(PathBuf::as_path)
                .chain(layout.roots())
                .map(|root| root.join(rel))
                .find(|d| d.is_dir())
            else {
                continue;
            };
            let path = w
                .names
                .annotations
                .get(ANNOTATION_PATH)
                .cloned()
                .unwrap_or_else(|| "/metrics".to_owned());
            annotated.push(Annotated {
                container_id: id.to_owned(),
                procs: dir.join("cgroup.procs"),
                port,
                path,
            });
        }
        if let Ok(mut slot) = self.shared.annotated.lock() {
            if **slot != annotated {
                *slot = Arc::new(annotated);
            }
        }
    }

    /// Charges one round's answers to the workloads of their servers.
    fn take_round(&mut self, ctx: &mut TickCtx<'_>, ledger: &mut Ledger) {
        let round = {
            let Ok(mut round) = self.shared.round.lock() else {
                return;
            };
            if round.seq == self.seen_seq {
                return;
            }
            self.seen_seq = round.seq;
            Round {
                seq: round.seq,
                servers: std::mem::take(&mut round.servers),
                errors: std::mem::take(&mut round.errors),
                discovery: round.discovery,
                scrape: round.scrape,
            }
        };
        self.last_discovery = round.discovery;
        self.last_scrape = round.scrape;
        for f in round.errors {
            ctx.errors.record(COLLECTOR, f.reason, || f.detail);
        }
        self.up.clear();
        let mut present = HashSet::new();
        let mut levels: Levels = HashMap::new();
        for s in round.servers {
            let Some(server) = server_for(&mut self.servers, s.instance, s.before_agent, ctx)
            else {
                continue;
            };
            if opted_out(&server.workload) {
                tracing::info!(
                    pid = s.instance.pid,
                    engine = s.engine,
                    "inference server in a pod annotated {OPT_OUT_ANNOTATION}=off: not scraped"
                );
                if let Ok(mut skip) = self.shared.skip.lock() {
                    skip.insert(s.instance);
                }
                self.servers.remove(&s.instance);
                continue;
            }
            present.insert(s.instance);
            let readings = match s.result {
                Ok(r) => r,
                Err(f) => {
                    *self.up.entry((s.engine, false)).or_default() += 1;
                    let (pid, engine) = (s.instance.pid, s.engine);
                    ctx.errors.record(COLLECTOR, f.reason, || {
                        format!("{engine} server (pid {pid}): {}", f.detail)
                    });
                    continue;
                }
            };
            *self.up.entry((s.engine, true)).or_default() += 1;
            let engine: Arc<str> = Arc::from(s.engine);
            let mut row = ledger.row(&server.workload);
            let baseline = std::mem::take(&mut server.baseline);
            for (model, r) in &readings {
                for (key, value) in counters(&engine, model, r) {
                    let delta = match server.last.get(&key) {
                        Some(last) if value >= *last => value - last,
                        // The server's counter went back: it restarted from zero.
                        Some(_) => value,
                        // A server that ran before the agent: counted from the agent's start,
                        // as the network programs count (a window must not be charged a
                        // history of days).
                        None if baseline => 0.0,
                        None => value,
                    };
                    row.add(&key, delta);
                    server.last.insert(key, value);
                }
                let base = vec![("engine", engine.clone()), ("model", model.clone())];
                let (_, series) = levels
                    .entry(server.workload.identity.clone())
                    .or_insert_with(|| (server.workload.clone(), BTreeMap::new()));
                // Two servers of one model in one workload: the fuller cache, both capacities.
                if let Some(u) = r.kv_usage {
                    let key = Key::new(&metrics::KV_CACHE_USAGE_RATIO, base.clone());
                    let v = series.entry(key).or_insert(0.0);
                    *v = v.max(u);
                }
                if let Some(c) = r.kv_capacity {
                    let key = Key::new(&metrics::KV_CACHE_CAPACITY_TOKENS, base);
                    *series.entry(key).or_insert(0.0) += c;
                }
            }
        }
        // Servers gone (or opted out) are forgotten; what they were charged stays.
        self.servers.retain(|i, _| present.contains(i));
        self.set_gauges(levels, ledger);
    }

    /// Sets this round's gauges and removes those of servers that no longer said them.
    fn set_gauges(&mut self, levels: Levels, ledger: &mut Ledger) {
        let mut now: HashMap<PathIdentity, (Arc<Workload>, Vec<Key>)> = HashMap::new();
        for (identity, (workload, series)) in levels {
            let mut row = ledger.row(&workload);
            for (key, value) in &series {
                row.set(key, *value);
            }
            now.insert(identity, (workload, series.into_keys().collect()));
        }
        for (identity, (workload, keys)) in self.gauges.drain() {
            let kept = now.get(&identity).map(|(_, k)| k.as_slice()).unwrap_or(&[]);
            let mut row = ledger.row(&workload);
            for key in keys.iter().filter(|k| !kept.contains(k)) {
                row.unset(key);
            }
        }
        self.gauges = now;
    }
}

/// The tick's record of a server, made on first sight (its workload resolved from its pid).
fn server_for<'a>(
    servers: &'a mut HashMap<Instance, Server>,
    instance: Instance,
    before_agent: bool,
    ctx: &mut TickCtx<'_>,
) -> Option<&'a mut Server> {
    use std::collections::hash_map::Entry;
    let slot = match servers.entry(instance) {
        Entry::Occupied(o) => return Some(o.into_mut()),
        Entry::Vacant(v) => v,
    };
    let workload = match ctx.identity.resolve_pid(instance.pid) {
        Ok(w) => w,
        Err(PidError::Gone { .. }) => return None,
        Err(e @ PidError::Read { .. }) => {
            ctx.errors
                .record(COLLECTOR, "proc", || tally_error_chain::chain(&e));
            return None;
        }
    };
    let workload = if workload.identity == PathIdentity::Host {
        ctx.host.clone()
    } else {
        workload
    };
    Some(slot.insert(Server {
        workload,
        baseline: before_agent,
        last: BTreeMap::new(),
    }))
}

/// The pod annotations that point at a server's metrics.
const ANNOTATION_SCRAPE: &str = "prometheus.io/scrape";
const ANNOTATION_PORT: &str = "prometheus.io/port";
const ANNOTATION_PATH: &str = "prometheus.io/path";

/// The metrics port a workload's pod annotations name, unless they say not to scrape it or it
/// opted out of inference metering.
fn annotated_port(w: &Workload) -> Option<u16> {
    let a = &w.names.annotations;
    if a.get(ANNOTATION_SCRAPE).is_some_and(|v| v == "false") || opted_out(w) {
        return None;
    }
    a.get(ANNOTATION_PORT)?.trim().parse().ok()
}

/// Whether a workload's pod opted out of inference metering.
fn opted_out(workload: &Workload) -> bool {
    workload
        .names
        .annotations
        .get(OPT_OUT_ANNOTATION)
        .is_some_and(|v| v == "off")
}

/// A model's counter series and their cumulative values.
fn counters(engine: &Arc<str>, model: &Arc<str>, r: &engines::ModelReadings) -> Vec<(Key, f64)> {
    let base = || vec![("engine", engine.clone()), ("model", model.clone())];
    let mut out = Vec::new();
    for (kind, value) in TOKEN_KINDS.iter().zip(r.tokens) {
        if let Some(v) = value {
            let mut labels = base();
            labels.push(("kind", Arc::from(*kind)));
            out.push((Key::new(&metrics::TOKENS, labels), v));
        }
    }
    for (outcome, v) in &r.requests {
        let mut labels = base();
        labels.push(("outcome", Arc::from(*outcome)));
        out.push((Key::new(&metrics::REQUESTS, labels), *v));
    }
    if let Some(v) = r.prefix_hits {
        out.push((Key::new(&metrics::PREFIX_CACHE_HIT_TOKENS, base()), v));
    }
    out
}

impl Source for InferenceSource {
    fn name(&self) -> &'static str {
        "inference"
    }

    fn collect(&mut self, ctx: &mut TickCtx<'_>, ledger: &mut Ledger) {
        if self.enabled {
            self.publish_pods(ctx);
            self.take_round(ctx, ledger);
        }
    }

    fn families(&self) -> Vec<Family> {
        if !self.enabled {
            return Vec::new();
        }
        let mut servers = Family::new(&metrics::SERVERS);
        for ((engine, up), n) in &self.up {
            let up: Arc<str> = Arc::from(if *up { "1" } else { "0" });
            servers.push_labeled(vec![("engine", Arc::from(*engine)), ("up", up)], *n as f64);
        }
        let mut interval = Family::new(&metrics::INTERVAL_SECONDS);
        interval.push_labeled(Vec::new(), self.interval.as_secs_f64());
        let mut round = Family::new(&metrics::ROUND_SECONDS);
        for (phase, d) in [
            ("discovery", self.last_discovery),
            ("scrape", self.last_scrape),
        ] {
            round.push_labeled(vec![("phase", Arc::from(phase))], d.as_secs_f64());
        }
        vec![servers, interval, round]
    }

    fn reconfigure(&mut self, config: &Config, _layout: &Layout, _errors: &mut ErrorCounts) {
        self.interval = config.inference.interval();
        match (&self.control, config.inference.enabled) {
            (Some(tx), true) => {
                // The thread is gone only if it panicked; then metering stays off.
                let _ = tx.send(Settings::of(config));
            }
            (Some(_), false) => {
                self.control = None;
                self.enabled = false;
                self.up.clear();
            }
            (None, true) => self.spawn(Settings::of(config)),
            (None, false) => {}
        }
    }
}

#[cfg(test)]
mod tests;
