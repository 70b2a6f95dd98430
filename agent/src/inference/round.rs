//! The round thread: finds the servers, scrapes each once from inside its network namespace,
//! and leaves the round for the tick. Nothing here runs on the tick or the scrape path.

use super::*;

/// The round thread: a round every interval until the source is dropped.
pub(super) fn rounds(mut settings: Settings, control: mpsc::Receiver<Settings>, shared: &Shared) {
    let mut scanner = discover::Scanner::new(&settings.proc_root);
    let mut state = RoundState::default();
    // Clock ticks since boot, comparable with every process's start time.
    let agent_start = discover::start_time(std::path::Path::new("/proc/self")).unwrap_or(0);
    let mut seq = 0;
    loop {
        let started = Instant::now();
        let mut round = one_round(&settings, &mut scanner, &mut state, shared, agent_start);
        seq += 1;
        round.seq = seq;
        if let Ok(mut slot) = shared.round.lock() {
            *slot = round;
        }
        let wait = settings.interval.saturating_sub(started.elapsed());
        match control.recv_timeout(wait) {
            Ok(new) => {
                if new.proc_root != settings.proc_root {
                    scanner = discover::Scanner::new(&new.proc_root);
                }
                settings = new;
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        }
    }
}

/// A scrape's answer: the address that answered and what it said, or why none did.
type Answer = Result<(SocketAddr, &'static Engine, Readings), Failure>;

/// The reason of an annotated server's answer that is no engine's metrics: not an error, and
/// not a server.
const NO_ENGINE: &str = "no_engine";

/// Processes of an annotated container looked at for the one that listens on its port.
const MAX_ANNOTATED_PIDS: usize = 64;

/// Whether process `pid`'s cgroups name one of `containers` (their ids are in the cgroup path
/// on every runtime and cgroup driver).
fn in_containers(proc_root: &std::path::Path, pid: u32, containers: &HashSet<String>) -> bool {
    if containers.is_empty() {
        return false;
    }
    let Ok(text) = std::fs::read_to_string(proc_root.join(pid.to_string()).join("cgroup")) else {
        return false;
    };
    containers.iter().any(|id| text.contains(id.as_str()))
}

/// One server to scrape.
#[derive(Debug)]
struct Target {
    instance: Instance,
    /// Its engine, from its command line; `None` for an annotated server, told by its body.
    engine: Option<&'static Engine>,
    /// The metrics path.
    path: String,
    /// The model its command line names, for engines whose series carry none.
    model: String,
    /// Its command line, for an annotated server (the model, once the engine is known).
    argv: Option<String>,
    /// Its network namespace, where that is not the agent's.
    netns: Option<PathBuf>,
    /// The addresses to try, in order.
    tries: Vec<SocketAddr>,
}

/// What the round thread remembers between rounds.
#[derive(Debug, Default)]
struct RoundState {
    /// The address each server answered on last.
    preferred: HashMap<Instance, SocketAddr>,
    /// The server process found for each annotated container.
    by_annotation: HashMap<String, Instance>,
    /// Each server's network namespace and listeners, as last read.
    sockets: HashMap<Instance, (u64, Vec<SocketAddr>)>,
    /// Annotated processes that serve no engine's metrics.
    not_inference: HashSet<Instance>,
}

fn one_round(
    settings: &Settings,
    scanner: &mut discover::Scanner,
    state: &mut RoundState,
    shared: &Shared,
    agent_start: u64,
) -> Round {
    let started = Instant::now();
    let mut round = Round::default();
    let candidates = match scanner.scan() {
        Ok(c) => c,
        Err(e) => {
            round.errors.push(Failure {
                reason: "proc",
                detail: format!("listing {}: {e}", settings.proc_root.display()),
            });
            Vec::new()
        }
    };
    let skip = match shared.skip.lock() {
        Ok(mut skip) => {
            // Opted-out servers that are gone are forgotten.
            skip.retain(|i| {
                candidates
                    .iter()
                    .any(|c| c.pid == i.pid && c.start == i.start)
            });
            skip.clone()
        }
        Err(_) => HashSet::new(),
    };
    state.not_inference.retain(|i| {
        discover::start_time(&settings.proc_root.join(i.pid.to_string())) == Some(i.start)
    });
    let opted_out = shared
        .opted_out
        .lock()
        .map(|s| s.clone())
        .unwrap_or_default();
    let own_netns = discover::netns_inode(std::path::Path::new("/proc"), std::process::id()).ok();
    let mut claimed: BTreeSet<(u64, SocketAddr)> = BTreeSet::new();
    let mut targets = Vec::new();
    let mut tables = discover::Tables::default();
    let mut seen = HashSet::new();
    for c in candidates {
        let instance = Instance {
            pid: c.pid,
            start: c.start,
        };
        if skip.contains(&instance) || in_containers(&settings.proc_root, c.pid, &opted_out) {
            continue;
        }
        // A process gone since the scan, or not listening yet (loading its model): not a
        // server this round.
        seen.insert(instance);
        // A server that answered last round is where it was: its sockets are not read again
        // (a server that moves port fails a scrape first).
        if let Some((ns, listeners)) = state
            .sockets
            .get(&instance)
            .filter(|_| state.preferred.contains_key(&instance))
            .cloned()
        {
            if !listeners.iter().any(|l| claimed.contains(&(ns, *l))) {
                claimed.extend(listeners.iter().map(|l| (ns, *l)));
                targets.push(cmdline_target(
                    settings, state, &c, instance, ns, own_netns, listeners,
                ));
            }
            continue;
        }
        let read = discover::netns_inode(&settings.proc_root, c.pid)
            .and_then(|ns| Ok((ns, tables.listening(&settings.proc_root, c.pid, ns)?)));
        let (ns, listeners) = match read {
            Ok(found) => found,
            Err(e) => {
                // Gone since the scan: nothing to count. Anything else hides a server.
                if e.kind() != std::io::ErrorKind::NotFound {
                    round.errors.push(Failure {
                        reason: "proc",
                        detail: format!("the sockets of {} server {}: {e}", c.engine.name, c.pid),
                    });
                }
                continue;
            }
        };
        // Where the process's own sockets are unknown, the port its command line names is its;
        // else, in a pod's namespace, the namespace's listeners are its pod's, and in the
        // node's only the engine's default port can be taken for its own.
        let only = |port: u16| -> Vec<SocketAddr> {
            listeners
                .addrs
                .iter()
                .copied()
                .filter(|a| a.port() == port)
                .collect()
        };
        let listeners: Vec<SocketAddr> = match (listeners.own, c.port, Some(ns) != own_netns) {
            (true, _, _) => listeners.addrs,
            (false, Some(port), _) => only(port),
            (false, None, true) => listeners.addrs,
            (false, None, false) => only(c.engine.default_port),
        };
        if listeners.is_empty() {
            continue;
        }
        // Workers of one server (a parent and its children) share its listening socket: the
        // first (lowest pid) is the server.
        if listeners.iter().any(|l| claimed.contains(&(ns, *l))) {
            continue;
        }
        claimed.extend(listeners.iter().map(|l| (ns, *l)));
        state.sockets.insert(instance, (ns, listeners.clone()));
        targets.push(cmdline_target(
            settings, state, &c, instance, ns, own_netns, listeners,
        ));
    }
    state.sockets.retain(|i, _| seen.contains(i));
    let annotated = shared
        .annotated
        .lock()
        .map(|a| a.clone())
        .unwrap_or_default();
    state
        .by_annotation
        .retain(|id, _| annotated.iter().any(|a| &a.container_id == id));
    for a in annotated.iter() {
        if let Some(t) = annotated_target(
            settings,
            state,
            (a, &skip, &mut tables),
            &mut claimed,
            own_netns,
        ) {
            targets.push(t);
        }
    }
    round.discovery = started.elapsed();
    let scraping = Instant::now();
    let results = scrape_all(&targets, settings);
    round.scrape = scraping.elapsed();
    state.preferred.clear();
    for (target, result) in targets.into_iter().zip(results) {
        let (engine, result) = match result {
            Ok((addr, engine, readings)) => {
                state.preferred.insert(target.instance, addr);
                (engine.name, Ok(readings))
            }
            // An annotated server that serves no engine's metrics (an exporter): not looked
            // at again while its process lives.
            Err(f) if f.reason == NO_ENGINE => {
                state.not_inference.insert(target.instance);
                continue;
            }
            Err(f) => (target.engine.map_or("unknown", |e| e.name), Err(f)),
        };
        round.servers.push(Scraped {
            instance: target.instance,
            before_agent: target.instance.start < agent_start,
            engine,
            result,
        });
    }
    round
}

/// The target of a server found by its command line, listening on `listeners` in namespace
/// `ns`: the address that answered last first.
fn cmdline_target(
    settings: &Settings,
    state: &RoundState,
    c: &discover::Candidate,
    instance: Instance,
    ns: u64,
    own_netns: Option<u64>,
    listeners: Vec<SocketAddr>,
) -> Target {
    let mut tries: Vec<SocketAddr> = discover::in_preference(c.engine, c.port, listeners)
        .into_iter()
        .map(discover::connect_address)
        .collect();
    tries.dedup();
    if let Some(p) = state.preferred.get(&instance) {
        if let Some(i) = tries.iter().position(|a| a == p) {
            let a = tries.remove(i);
            tries.insert(0, a);
        }
    }
    tries.truncate(MAX_TRIES);
    Target {
        instance,
        engine: Some(c.engine),
        path: c.engine.path.to_owned(),
        model: c.model.clone(),
        argv: None,
        netns: (Some(ns) != own_netns)
            .then(|| settings.proc_root.join(c.pid.to_string()).join("ns/net")),
        tries,
    }
}

/// The server of an annotated pod's container: its process that listens on the annotated port
/// (the one found before, while it lives), unless a server found by its command line has that
/// socket already, or it is known to serve no engine's metrics.
fn annotated_target(
    settings: &Settings,
    state: &mut RoundState,
    (a, skip, tables): (&Annotated, &HashSet<Instance>, &mut discover::Tables),
    claimed: &mut BTreeSet<(u64, SocketAddr)>,
    own_netns: Option<u64>,
) -> Option<Target> {
    let proc_root = &settings.proc_root;
    let text = std::fs::read_to_string(&a.procs).ok()?;
    let mut pids: Vec<u32> = text.lines().filter_map(|l| l.trim().parse().ok()).collect();
    // The process found before first; a container's first processes are likelier servers
    // than the helpers they start.
    if let Some(known) = state.by_annotation.get(&a.container_id) {
        if let Some(i) = pids.iter().position(|p| *p == known.pid) {
            pids.swap(0, i);
        }
    }
    for pid in pids.into_iter().take(MAX_ANNOTATED_PIDS) {
        let dir = proc_root.join(pid.to_string());
        let Some(start) = discover::start_time(&dir) else {
            continue;
        };
        let instance = Instance { pid, start };
        if skip.contains(&instance) || state.not_inference.contains(&instance) {
            return None;
        }
        let Ok(ns) = discover::netns_inode(proc_root, pid) else {
            continue;
        };
        let Ok(listeners) = tables.listening(proc_root, pid, ns) else {
            continue;
        };
        let Some(listen) = listeners.addrs.into_iter().find(|l| l.port() == a.port) else {
            continue;
        };
        if !claimed.insert((ns, listen)) {
            return None;
        }
        state.by_annotation.insert(a.container_id.clone(), instance);
        let argv = std::fs::read(dir.join("cmdline"))
            .map(|raw| String::from_utf8_lossy(&raw).into_owned())
            .unwrap_or_default();
        return Some(Target {
            instance,
            engine: None,
            path: a.path.clone(),
            model: String::new(),
            argv: Some(argv),
            netns: (Some(ns) != own_netns).then(|| dir.join("ns/net")),
            tries: vec![discover::connect_address(listen)],
        });
    }
    None
}

/// Scrapes every target, at most `max_concurrent` at once, each on a thread of its own (which
/// may join another network namespace and is gone after).
fn scrape_all(targets: &[Target], settings: &Settings) -> Vec<Answer> {
    let next = AtomicUsize::new(0);
    let results: Vec<Mutex<Option<Answer>>> = targets.iter().map(|_| Mutex::new(None)).collect();
    let workers = settings.max_concurrent.min(targets.len());
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(target) = targets.get(i) else { break };
                let result = std::thread::scope(|inner| {
                    inner
                        .spawn(|| scrape_one(target, settings.limits))
                        .join()
                        .unwrap_or_else(|_| {
                            Err(Failure {
                                reason: "panic",
                                detail: "the scrape thread panicked".to_owned(),
                            })
                        })
                });
                if let Ok(mut slot) = results[i].lock() {
                    *slot = Some(result);
                }
            });
        }
    });
    results
        .into_iter()
        .map(|slot| {
            slot.into_inner().ok().flatten().unwrap_or_else(|| {
                Err(Failure {
                    reason: "panic",
                    detail: "no answer recorded".to_owned(),
                })
            })
        })
        .collect()
}

/// Scrapes one server: its addresses in order until one answers with exposition text.
fn scrape_one(target: &Target, limits: scrape::Limits) -> Answer {
    let mut last = Failure {
        reason: "connect",
        detail: "no address to try".to_owned(),
    };
    let path = &target.path;
    for addr in &target.tries {
        let request = scrape::Request {
            netns: target.netns.clone(),
            addr: *addr,
            path: path.clone(),
        };
        let body = match scrape::get(&request, limits) {
            Ok(body) => body,
            Err(e) => {
                let stop = matches!(
                    e,
                    scrape::Error::Timeout(_)
                        | scrape::Error::TooLarge(_)
                        | scrape::Error::Netns { .. }
                );
                last = Failure {
                    reason: e.reason(),
                    detail: format!("{addr}{path}: {}", tally_error_chain::chain(&e)),
                };
                // A server that hangs or floods costs its deadline once, not once per port.
                if stop {
                    break;
                }
                continue;
            }
        };
        let Ok(text) = String::from_utf8(body) else {
            last = Failure {
                reason: "parse",
                detail: format!("{addr}{path}: the body is not UTF-8"),
            };
            continue;
        };
        let parsed = match target.engine {
            Some(engine) => exposition::parse(&text, |name| engine.wants(name))
                .map(|samples| (engine, samples, target.model.clone())),
            // An annotated server: the engine whose names the body has.
            None => exposition::parse(&text, |name| engines::ENGINES.iter().any(|e| e.wants(name)))
                .map(|samples| {
                    let engine = engines::detect(&samples);
                    let argv = target.argv.as_deref().unwrap_or("");
                    let argv: Vec<&str> = argv.trim_end_matches('\0').split('\0').collect();
                    let model = engine
                        .and_then(|e| e.model_from_cmdline(&argv))
                        .unwrap_or_default();
                    (engine, samples, model)
                })
                .and_then(|(engine, samples, model)| match engine {
                    Some(engine) => Ok((engine, samples, model)),
                    None => Err(exposition::ParseError {
                        line: 0,
                        what: NO_ENGINE,
                    }),
                }),
        };
        match parsed {
            Ok((engine, samples, model)) => {
                let samples: Vec<_> = samples
                    .into_iter()
                    .filter(|s| engine.wants(s.name))
                    .collect();
                return Ok((*addr, engine, engine.convert(&samples, &model)));
            }
            Err(e) if e.what == NO_ENGINE => {
                return Err(Failure {
                    reason: NO_ENGINE,
                    detail: format!("{addr}{path}: no inference engine's metrics"),
                });
            }
            Err(e) => {
                last = Failure {
                    reason: "parse",
                    detail: format!("{addr}{path}: not Prometheus exposition text: {e}"),
                };
            }
        }
    }
    Err(last)
}
