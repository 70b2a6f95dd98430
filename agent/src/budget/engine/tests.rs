use super::*;
use crate::errors::ErrorCounts;

use crate::ledger::Key;
use crate::source::Facts;

fn unit(name: &str, labels: &[(&str, &str)]) -> Arc<Workload> {
    let names = Names {
        labels: Arc::new(
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        ),
        ..Names::default()
    };
    Arc::new(Workload::new(PathIdentity::Unit(name.into()), names))
}

fn engine(policy: &str, state: &std::path::Path) -> Engine {
    let mut config = Config::parse(policy).unwrap();
    config.enforcement.state_dir = state.to_path_buf();
    Engine::new(&config)
}

/// Feeds the ledger `cpu` seconds per workload and runs one engine tick.
fn tick(engine: &mut Engine, ledger: &mut Ledger, layout: &Layout, cpu: &[(&Arc<Workload>, f64)]) {
    let mut placements = HashMap::new();
    for (i, (w, v)) in cpu.iter().enumerate() {
        ledger.see(w, i as u64 + 1, true);
        let cpu = Key::new(&crate::catalogue::workload::CPU_SECONDS, Vec::new());
        ledger.observe(w, &cpu, *v);
        placements.insert(
            w.identity.clone(),
            Placement {
                rel: format!("/system.slice/{}", subject_key(&w.identity)),
                v2_id: None,
            },
        );
    }
    ledger.end_tick(Instant::now());
    engine.tick(
        Inputs {
            ledger,
            placements: &placements,
            layout,
            facts: &Facts::default(),
            tick_started: Instant::now(),
        },
        &mut ErrorCounts::default(),
    );
}

fn layout(dir: &std::path::Path) -> Layout {
    std::fs::write(dir.join("cgroup.controllers"), "").unwrap();
    Layout::detect(dir).unwrap()
}

#[test]
fn a_shared_budget_sums_its_workloads_and_selects_by_label_and_cgroup() {
    let dir = tempfile::tempdir().unwrap();
    let layout = layout(dir.path());
    let mut engine = engine(
        "[[budget]]\nname = 'team'\nresource = 'cpu_seconds'\nlimit = 10.0\nperiod = 'day'\nshared = true\nselect.labels = { team = 'ml' }\n\
         [[budget]]\nname = 'one'\nresource = 'cpu_seconds'\nlimit = 10.0\nperiod = 'day'\nselect.cgroup = '/system.slice/unit:b*'\n",
        &dir.path().join("state"),
    );
    let mut ledger = Ledger::new(Duration::from_secs(60));
    let a = unit("a.service", &[("team", "ml")]);
    let b = unit("b.service", &[("team", "ml")]);
    let c = unit("c.service", &[("team", "web")]);
    // The first tick is a baseline: what ran before the agent is not this window's.
    tick(
        &mut engine,
        &mut ledger,
        &layout,
        &[(&a, 100.0), (&b, 50.0), (&c, 7.0)],
    );
    tick(
        &mut engine,
        &mut ledger,
        &layout,
        &[(&a, 103.0), (&b, 54.0), (&c, 9.0)],
    );
    let usage = |budget: &str, subject: &str| {
        engine
            .subjects
            .get(&(budget.to_owned(), subject.to_owned()))
            .map(|s| s.usage)
    };
    assert_eq!(usage("team", SHARED), Some(7.0));
    assert_eq!(usage("one", "unit:b.service"), Some(4.0));
    assert_eq!(usage("one", "unit:a.service"), None);
    // Past the limit together (a 6 s more, b 1 s more): one enforcement of the shared row.
    tick(
        &mut engine,
        &mut ledger,
        &layout,
        &[(&a, 109.0), (&b, 55.0), (&c, 9.0)],
    );
    let shared = &engine.subjects[&("team".to_owned(), SHARED.to_owned())];
    assert!(shared.enforcing, "{shared:?}");
    assert_eq!(shared.members.len(), 2);
    assert_eq!(
        engine.actions.get(&("team".to_owned(), "alert", "enforce")),
        Some(&1)
    );
}

#[test]
fn a_per_team_budget_holds_each_team_to_its_limit_and_skips_workloads_without_one() {
    let dir = tempfile::tempdir().unwrap();
    let layout = layout(dir.path());
    let mut engine = engine(
        "[[budget]]\nname = 'teams'\nresource = 'cpu_seconds'\nlimit = 10.0\nperiod = 'day'\nper = 'team'\n",
        &dir.path().join("state"),
    );
    let mut ledger = Ledger::new(Duration::from_secs(60));
    let a = unit("a.service", &[("team", "ml")]);
    let b = unit("b.service", &[("team", "ml")]);
    let c = unit("c.service", &[("team", "web")]);
    let d = unit("d.service", &[]);
    tick(
        &mut engine,
        &mut ledger,
        &layout,
        &[(&a, 100.0), (&b, 50.0), (&c, 7.0), (&d, 1.0)],
    );
    // ml: 6 + 5 = 11 s, over; web: 9 s, under; d has no team.
    tick(
        &mut engine,
        &mut ledger,
        &layout,
        &[(&a, 106.0), (&b, 55.0), (&c, 16.0), (&d, 30.0)],
    );
    let subject = |name: &str| engine.subjects.get(&("teams".to_owned(), name.to_owned()));
    let ml = subject("per:ml").expect("ml's row");
    let web = subject("per:web").expect("web's row");
    assert_eq!((ml.usage, ml.enforcing, ml.members.len()), (11.0, true, 2));
    assert_eq!(
        (web.usage, web.enforcing, web.members.len()),
        (9.0, false, 1)
    );
    assert_eq!(engine.subjects.len(), 2, "{:?}", engine.subjects.keys());
    let team = |s: &Subject| {
        s.labels
            .iter()
            .find(|(k, _)| *k == "team")
            .map(|(_, v)| v.to_string())
    };
    assert_eq!(team(ml).as_deref(), Some("ml"));
    assert!(
        ml.labels.iter().take(6).all(|(_, v)| v.is_empty()),
        "{:?}",
        ml.labels
    );
    assert_eq!(
        engine
            .actions
            .get(&("teams".to_owned(), "alert", "enforce")),
        Some(&1)
    );
}

#[test]
fn hysteresis_releases_only_below_the_release_fraction() {
    let dir = tempfile::tempdir().unwrap();
    let layout = layout(dir.path());
    let mut engine = engine(
        "[[budget]]\nname = 'b'\nresource = 'cpu_seconds'\nlimit = 10.0\nwindow = '1h'\n",
        &dir.path().join("state"),
    );
    let mut ledger = Ledger::new(Duration::from_secs(60));
    let a = unit("a.service", &[]);
    tick(&mut engine, &mut ledger, &layout, &[(&a, 0.0)]);
    tick(&mut engine, &mut ledger, &layout, &[(&a, 8.5)]);
    let key = ("b".to_owned(), "unit:a.service".to_owned());
    assert!(engine.subjects[&key].warning && !engine.subjects[&key].enforcing);
    tick(&mut engine, &mut ledger, &layout, &[(&a, 10.5)]);
    assert!(engine.subjects[&key].enforcing);
    // A smaller limit on reload keeps the window; a larger one releases.
    let mut config = Config::parse(
        "[[budget]]\nname = 'b'\nresource = 'cpu_seconds'\nlimit = 11.0\nwindow = '1h'\n",
    )
    .unwrap();
    config.enforcement.state_dir = dir.path().join("state");
    engine.reconfigure(&config);
    tick(&mut engine, &mut ledger, &layout, &[(&a, 10.5)]);
    assert!(
        engine.subjects[&key].enforcing,
        "0.95 is above release_below"
    );
    config.budget[0].limit = 20.0;
    engine.reconfigure(&config);
    tick(&mut engine, &mut ledger, &layout, &[(&a, 10.5)]);
    assert!(!engine.subjects[&key].enforcing);
    assert!(
        !engine.subjects[&key].warning,
        "released at 0.525, below warn_at: no warning left either"
    );
}

#[test]
fn a_restart_resumes_windows_and_baselines_from_the_state_file() {
    let dir = tempfile::tempdir().unwrap();
    let layout = layout(dir.path());
    let policy = "[[budget]]\nname = 'b'\nresource = 'cpu_seconds'\nlimit = 10.0\nwindow = '1h'\n\
                  [[budget]]\nname = 'team'\nresource = 'cpu_seconds'\nlimit = 10.0\nwindow = '1h'\nshared = true\n";
    let mut engine = engine(policy, &dir.path().join("state"));
    let mut ledger = Ledger::new(Duration::from_secs(60));
    let a = unit("a.service", &[]);
    tick(&mut engine, &mut ledger, &layout, &[(&a, 100.0)]);
    tick(&mut engine, &mut ledger, &layout, &[(&a, 103.0)]);
    engine.shutdown(&mut ErrorCounts::default());

    let mut restarted = self::engine(policy, &dir.path().join("state"));
    let key = ("b".to_owned(), "unit:a.service".to_owned());
    assert!(restarted.subjects.get(&key).is_some());
    assert!(restarted
        .subjects
        .get(&("team".to_owned(), SHARED.to_owned()))
        .is_some());
    // The ledger starts over with the agent: the restored baseline (103) is above it, so what
    // ran meanwhile is unknown; from there on, usage adds to the restored window.
    let mut ledger = Ledger::new(Duration::from_secs(60));
    tick(&mut restarted, &mut ledger, &layout, &[(&a, 1.0)]);
    tick(&mut restarted, &mut ledger, &layout, &[(&a, 2.5)]);
    assert_eq!(restarted.subjects[&key].usage, 4.5);
    assert_eq!(
        restarted.subjects[&("team".to_owned(), SHARED.to_owned())].usage,
        4.5
    );
}

#[test]
fn enforcement_failures_show_from_zero_for_the_budgets_that_act() {
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(
        "[[budget]]\nname = 'cap'\nresource = 'cpu_seconds'\nlimit = 1.0\nwindow = '1h'\naction = 'cpu'\n\
         [[budget]]\nname = 'watch'\nresource = 'cpu_seconds'\nlimit = 1.0\nwindow = '1h'\n",
        &dir.path().join("state"),
    );
    let mut errors = ErrorCounts::default();
    errors.count(
        &crate::catalogue::budget::ENFORCEMENT_ERRORS,
        &["gone", "cpu", "apply"],
    );
    engine.expect_errors(&mut errors);
    let rows: Vec<String> = errors
        .families()
        .iter()
        .flat_map(|f| &f.samples)
        .map(|s| {
            let values: Vec<&str> = s.extra.iter().map(|(_, v)| v.as_ref()).collect();
            format!("{} {}", values.join("/"), s.value)
        })
        .collect();
    // The alert-only budget touches nothing, so it cannot fail to; a counted row stays.
    assert_eq!(
        rows,
        [
            "/state/save 0",
            "/state/unreadable 0",
            "cap/cpu/apply 0",
            "cap/cpu/release 0",
            "cap/cpu/unavailable 0",
            "gone/cpu/apply 1"
        ]
    );
}

#[test]
fn an_unreadable_state_file_is_kept_aside_and_counted_once() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::write(state.join("state.json"), "{\"version\": 99}").unwrap();
    let mut engine = engine(
        "[[budget]]\nname = 'cap'\nresource = 'cpu_seconds'\nlimit = 1.0\nwindow = '1h'\naction = 'cpu'\n",
        &state,
    );
    let kept: Vec<String> = std::fs::read_dir(&state)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert!(kept[0].starts_with("state.json.unreadable-"), "{kept:?}");
    let cgroups = tempfile::tempdir().unwrap();
    let layout = layout(cgroups.path());
    let mut errors = ErrorCounts::default();
    for _ in 0..2 {
        let mut ledger = Ledger::new(std::time::Duration::from_secs(60));
        engine.tick(
            Inputs {
                ledger: &mut ledger,
                placements: &HashMap::new(),
                layout: &layout,
                facts: &Facts::default(),
                tick_started: Instant::now(),
            },
            &mut errors,
        );
    }
    // Counted once over two ticks: one more count makes it 2.
    let labels = ["", "state", "unreadable"];
    assert_eq!(
        errors.count(&crate::catalogue::budget::ENFORCEMENT_ERRORS, &labels),
        2
    );
}

#[test]
fn releasing_every_throttle_restores_the_files_and_the_next_tick_throttles_again() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("cgroup.controllers"), "cpu").unwrap();
    let layout = Layout::detect(dir.path()).unwrap();
    let cgroup = dir.path().join("system.slice/unit:a.service");
    std::fs::create_dir_all(&cgroup).unwrap();
    let cpu_max = cgroup.join("cpu.max");
    std::fs::write(&cpu_max, "max 100000\n").unwrap();
    let mut engine = engine(
        "[[budget]]\nname = 'b'\nresource = 'cpu_seconds'\nlimit = 10.0\nwindow = '1h'\naction = 'cpu'\nthrottle = { cpu_cores = 0.5 }\n",
        &dir.path().join("state"),
    );
    let mut ledger = Ledger::new(Duration::from_secs(60));
    let a = unit("a.service", &[]);
    tick(&mut engine, &mut ledger, &layout, &[(&a, 0.0)]);
    tick(&mut engine, &mut ledger, &layout, &[(&a, 11.0)]);
    assert_eq!(std::fs::read_to_string(&cpu_max).unwrap(), "50000 100000");

    let released = engine.release_all(&mut ErrorCounts::default());
    assert_eq!(released, 1);
    assert_eq!(std::fs::read_to_string(&cpu_max).unwrap(), "max 100000");
    assert!(engine.throttles.is_empty());

    // Still over its budget: the next tick that runs throttles it again.
    tick(&mut engine, &mut ledger, &layout, &[(&a, 11.5)]);
    assert_eq!(std::fs::read_to_string(&cpu_max).unwrap(), "50000 100000");
}

#[test]
fn each_block_device_refusing_its_rule_is_counted_as_a_device_failure() {
    use crate::budget::actuator::{ActuatorError, CgroupError};
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(
        "[[budget]]\nname = 'io'\nresource = 'disk_bytes'\nlimit = 1.0\nwindow = '1h'\naction = 'disk'\n",
        &dir.path().join("state"),
    );
    let mut errors = ErrorCounts::default();
    engine.expect_errors(&mut errors);
    let refused = |dev: &str| CgroupError::Write {
        path: "/sys/fs/cgroup/w/io.max".into(),
        value: format!("{dev} rbps=1 wbps=1"),
        source: std::io::Error::from_raw_os_error(libc::ENODEV),
    };
    let e = ActuatorError::Devices {
        failed: vec![refused("252:0"), refused("43:0")],
        of: 3,
    };
    engine.fail_apply(&mut errors, "io", Action::Disk, &e);
    let metric = &crate::catalogue::budget::ENFORCEMENT_ERRORS;
    // One more count each: the device failures were 2, the whole-throttle ones 0.
    assert_eq!(errors.count(metric, &["io", "disk", "device"]), 3);
    assert_eq!(errors.count(metric, &["io", "disk", "apply"]), 1);
}

/// A `cost` budget charges the cost counter: a reload that lowers a price prices later use only,
/// and the counter's value, lower than a total priced anew would be, is never taken for a
/// restart that charges it all again.
#[test]
fn a_cost_budget_charges_the_cost_counter_across_a_price_reload() {
    let dir = tempfile::tempdir().unwrap();
    let layout = layout(dir.path());
    let policy = |price: f64| {
        let mut config = Config::parse(&format!(
            "[prices]\ncpu_core_second = {price}\n\
             [[budget]]\nname = 'spend'\nresource = 'cost'\nlimit = 100.0\nperiod = 'day'\n"
        ))
        .unwrap();
        config.enforcement.state_dir = dir.path().join("state");
        config
    };
    let mut engine = Engine::new(&policy(1.0));
    let mut meter = crate::cost::Meter::new(&policy(1.0).prices);
    let mut ledger = Ledger::new(Duration::from_secs(60));
    let a = unit("a.service", &[]);
    let placements: HashMap<PathIdentity, Placement> = [(
        a.identity.clone(),
        Placement {
            rel: "/system.slice/a.service".to_owned(),
            v2_id: None,
        },
    )]
    .into();
    let mut tick = |engine: &mut Engine, meter: &mut crate::cost::Meter, cpu: f64| {
        ledger.see(&a, 1, true);
        let key = Key::new(&crate::catalogue::workload::CPU_SECONDS, Vec::new());
        ledger.observe(&a, &key, cpu);
        ledger.end_tick(Instant::now());
        meter.accrue(&mut ledger, &HashMap::new(), 0.2);
        engine.tick(
            Inputs {
                ledger: &ledger,
                placements: &placements,
                layout: &layout,
                facts: &Facts::default(),
                tick_started: Instant::now(),
            },
            &mut ErrorCounts::default(),
        );
    };
    let key = ("spend".to_owned(), "unit:a.service".to_owned());
    // The first tick is the baseline; then 2 s at 1.0.
    tick(&mut engine, &mut meter, 10.0);
    tick(&mut engine, &mut meter, 12.0);
    assert_eq!(engine.subjects[&key].usage, 2.0);
    // Half the price: 2 s more cost 1.0, and the 12.0 already accrued stays.
    let cheaper = policy(0.5);
    engine.reconfigure(&cheaper);
    // The meter was priced before, so the reload needs no ledger to start it from.
    meter.reprice(
        &cheaper.prices,
        &mut Ledger::new(Duration::from_secs(60)),
        &HashMap::new(),
    );
    tick(&mut engine, &mut meter, 14.0);
    assert_eq!(engine.subjects[&key].usage, 3.0);
}

#[test]
fn a_cluster_budget_follows_the_clusters_total_and_its_on_unavailable_without_one() {
    for mode in ["hold", "open", "closed"] {
        let dir = tempfile::tempdir().unwrap();
        let layout = layout(dir.path());
        let text = format!(
            "[cluster]\nquery_url = 'http://127.0.0.1:9'\ninterval_secs = 1\ntimeout_ms = 500\nmax_staleness_secs = 1\n\
             [tenants]\nlabels = ['team']\n\
             [[budget]]\nname = 'fleet'\nspan = 'cluster'\nresource = 'cpu_seconds'\nlimit = 100.0\nwindow = '1h'\nper = 'team'\non_unavailable = '{mode}'\n"
        );
        let mut config = Config::parse(&text).unwrap();
        config.enforcement.state_dir = dir.path().join("state");
        let mut engine = Engine::new(&config);
        let cluster = crate::cluster::ClusterHandle::idle(&config);
        engine.set_cluster(cluster.clone());
        let mut ledger = Ledger::new(Duration::from_secs(60));
        let a = unit("a.service", &[("team", "ml")]);
        let b = unit("b.service", &[("team", "ml")]);
        let mut cpu = 0.0;
        let mut step = |engine: &mut Engine| {
            // This node's own use is far under the limit: only the cluster's total counts.
            cpu += 1.0;
            tick(engine, &mut ledger, &layout, &[(&a, cpu), (&b, cpu)]);
            let s = &engine.subjects[&("fleet".to_owned(), "per:ml".to_owned())];
            (s.enforcing, s.usage, s.members.len())
        };
        // Not asked yet: nothing is known and nothing changes, in every mode.
        assert_eq!(step(&mut engine), (false, 0.0, 2), "{mode}");
        // Asked and unanswered.
        cluster.answer(
            "fleet",
            Err(crate::cluster::Failure::Unreachable("refused".to_owned())),
        );
        assert_eq!(step(&mut engine), (mode == "closed", 0.0, 2), "{mode}");
        cluster.answer(
            "fleet",
            Ok(vec![("ml".to_owned(), 120.0), ("web".to_owned(), 5.0)]),
        );
        assert_eq!(step(&mut engine), (true, 120.0, 2), "{mode}");
        // Between release_below and the limit: still enforced.
        cluster.answer("fleet", Ok(vec![("ml".to_owned(), 95.0)]));
        assert_eq!(step(&mut engine), (true, 95.0, 2), "{mode}");
        cluster.answer("fleet", Ok(vec![("ml".to_owned(), 80.0)]));
        assert_eq!(step(&mut engine), (false, 80.0, 2), "{mode}");
        cluster.answer("fleet", Ok(vec![("ml".to_owned(), 99.0)]));
        assert_eq!(step(&mut engine), (false, 99.0, 2), "{mode}");
        cluster.answer("fleet", Ok(vec![("ml".to_owned(), 100.0)]));
        assert_eq!(step(&mut engine), (true, 100.0, 2), "{mode}");
        // A failed query leaves the last answer in use while it is fresh.
        cluster.answer("fleet", Err(crate::cluster::Failure::Empty));
        assert_eq!(step(&mut engine), (true, 100.0, 2), "{mode}");
        std::thread::sleep(Duration::from_millis(1100));
        let (enforcing, usage, _) = step(&mut engine);
        assert_eq!(enforcing, mode != "open", "{mode}");
        assert_eq!(usage, 100.0, "{mode}: the last known usage stays on show");
        let events = |event: &'static str| {
            engine
                .actions
                .get(&("fleet".to_owned(), "alert", event))
                .copied()
        };
        let (enforces, releases) = match mode {
            "hold" => (2, 1),
            "open" => (2, 2),
            _ => (2, 1),
        };
        assert_eq!(
            (events("enforce"), events("release")),
            (Some(enforces), Some(releases)),
            "{mode}"
        );
    }
}

#[test]
fn a_workload_starting_under_a_spent_deny_budget_is_held_until_the_budget_is_released() {
    let dir = tempfile::tempdir().unwrap();
    let layout = layout(dir.path());
    let mut engine = engine(
        "[[budget]]\nname = 'team'\nresource = 'cpu_seconds'\nlimit = 10.0\nwindow = '2s'\nshared = true\nadmission = 'deny'\nselect.labels = { team = 'ml' }\n",
        &dir.path().join("state"),
    );
    let mut ledger = Ledger::new(Duration::from_secs(60));
    let a = unit("a.service", &[("team", "ml")]);
    let b = unit("b.service", &[("team", "ml")]);
    let c = unit("c.service", &[("team", "ml")]);
    let web = unit("web.service", &[("team", "web")]);
    // A system pod of the same team: exempt by its namespace.
    let system = Arc::new(Workload::new(
        PathIdentity::Unit("coredns.service".into()),
        Names {
            namespace: "kube-system".into(),
            ..unit("x", &[("team", "ml")]).names.clone()
        },
    ));
    let decisions = |engine: &Engine| {
        admission::DECISIONS.map(|d| {
            engine
                .admissions
                .get(&("team".to_owned(), d))
                .copied()
                .unwrap_or(0)
        })
    };
    let held = |engine: &Engine| -> Vec<String> {
        engine
            .holds
            .keys()
            .map(|k| k.workload.to_string())
            .collect()
    };
    // Running when the agent starts: never a decision, whatever the budget says later.
    tick(&mut engine, &mut ledger, &layout, &[(&a, 100.0)]);
    tick(&mut engine, &mut ledger, &layout, &[(&a, 111.0)]);
    assert!(engine.subjects[&("team".to_owned(), SHARED.to_owned())].enforcing);
    assert_eq!(decisions(&engine), [0, 0, 0]);
    // b starts while the budget is spent: held. A workload of another team is no decision, and
    // one of kube-system is exempt.
    tick(
        &mut engine,
        &mut ledger,
        &layout,
        &[(&a, 111.0), (&b, 1.0), (&web, 1.0), (&system, 0.0)],
    );
    assert_eq!(held(&engine), ["unit:b.service"]);
    assert_eq!(decisions(&engine), [0, 1, 1]);
    // Its hold is a whole freeze; a's throttle (alert only here) is not touched.
    let want = engine.desired();
    let hold = &want[&ThrottleKey {
        budget: Arc::from("team"),
        workload: WorkloadKey::from("unit:b.service"),
    }];
    assert_eq!((hold.action, hold.setting), (Action::Freeze, 0.0));
    assert_eq!(want.len(), 1);
    // Still held while the budget is enforced; lifted once the window lets it go.
    tick(&mut engine, &mut ledger, &layout, &[(&a, 111.0), (&b, 1.0)]);
    assert_eq!(held(&engine), ["unit:b.service"]);
    // The 2 s window in 1 s buckets interpolates inside its oldest bucket: 2.1 s later up to
    // 90 % of the burst could still count (above the release threshold, 9 of 10), so wait until
    // the burst's bucket has left the window whole.
    std::thread::sleep(Duration::from_millis(3100));
    tick(&mut engine, &mut ledger, &layout, &[(&a, 111.0), (&b, 1.0)]);
    assert!(!engine.subjects[&("team".to_owned(), SHARED.to_owned())].enforcing);
    assert!(held(&engine).is_empty());
    // A workload starting now, the budget released, is admitted.
    tick(
        &mut engine,
        &mut ledger,
        &layout,
        &[(&a, 111.0), (&b, 1.0), (&c, 0.5)],
    );
    assert!(held(&engine).is_empty());
    assert_eq!(decisions(&engine), [1, 1, 1]);
}

#[test]
fn token_budgets_count_their_kind_and_a_shared_kv_cache_budget_its_fullest_cache() {
    let dir = tempfile::tempdir().unwrap();
    let layout = layout(dir.path());
    let mut engine = engine(
        "[[budget]]\nname = 'gen'\nresource = 'tokens'\nkind = 'generation'\nlimit = 100.0\nperiod = 'day'\nshared = true\nselect.labels = { team = 'ml' }\n\
         [[budget]]\nname = 'all'\nresource = 'tokens'\nlimit = 1000.0\nperiod = 'day'\nselect.unit = 'a.service'\n\
         [[budget]]\nname = 'kv'\nresource = 'kv_cache_ratio'\nlimit = 0.8\nshared = true\nselect.labels = { team = 'ml' }\n",
        &dir.path().join("state"),
    );
    let mut ledger = Ledger::new(Duration::from_secs(60));
    let a = unit("a.service", &[("team", "ml")]);
    let b = unit("b.service", &[("team", "ml")]);
    let tokens = |kind: &str| {
        Key::new(
            &crate::catalogue::inference::TOKENS,
            vec![
                ("engine", Arc::from("vllm")),
                ("model", Arc::from("m")),
                ("kind", Arc::from(kind)),
            ],
        )
    };
    let kv = Key::new(
        &crate::catalogue::inference::KV_CACHE_USAGE_RATIO,
        vec![("engine", Arc::from("vllm")), ("model", Arc::from("m"))],
    );
    let feed = |ledger: &mut Ledger, w: &Arc<Workload>, (p, g, c): (f64, f64, f64), level: f64| {
        let mut row = ledger.row(w);
        row.add(&tokens("prompt"), p);
        row.add(&tokens("generation"), g);
        row.add(&tokens("cached"), c);
        row.set(&kv, level);
    };
    // The first tick is a baseline.
    feed(&mut ledger, &a, (10.0, 5.0, 4.0), 0.3);
    feed(&mut ledger, &b, (10.0, 5.0, 4.0), 0.6);
    tick(&mut engine, &mut ledger, &layout, &[(&a, 1.0), (&b, 1.0)]);
    feed(&mut ledger, &a, (200.0, 30.0, 150.0), 0.3);
    feed(&mut ledger, &b, (0.0, 40.0, 0.0), 0.7);
    tick(&mut engine, &mut ledger, &layout, &[(&a, 1.0), (&b, 1.0)]);
    let usage = |engine: &Engine, budget: &str, subject: &str| {
        engine
            .subjects
            .get(&(budget.to_owned(), subject.to_owned()))
            .map(|s| s.usage)
    };
    // Generation only, summed over the team: 30 + 40.
    assert_eq!(usage(&engine, "gen", SHARED), Some(70.0));
    // Prompt and generation (cached tokens are part of the prompt): 200 + 30.
    assert_eq!(usage(&engine, "all", "unit:a.service"), Some(230.0));
    // A level: the fuller cache, not the sum of two fractions.
    assert_eq!(usage(&engine, "kv", SHARED), Some(0.7));
    assert!(!engine.subjects[&("kv".to_owned(), SHARED.to_owned())].enforcing);
    feed(&mut ledger, &b, (0.0, 0.0, 0.0), 0.85);
    tick(&mut engine, &mut ledger, &layout, &[(&a, 1.0), (&b, 1.0)]);
    assert_eq!(usage(&engine, "kv", SHARED), Some(0.85));
    assert!(engine.subjects[&("kv".to_owned(), SHARED.to_owned())].enforcing);
}
