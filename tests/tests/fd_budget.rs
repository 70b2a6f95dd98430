//! The agent under a low open-file limit, as on a node whose `LimitNOFILE` is small for the
//! workloads it runs: more workloads than a third of the limit (three cgroup files each), every
//! one still with its CPU and memory values exact, the cgroup files kept open up to the budget and
//! the rest read by path each tick.
//!
//! The agent is pointed (`paths.cgroup_root`) at the test's own part of each real hierarchy, so
//! the workloads it sees are exactly the test's, whatever else runs on the node.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tally_agent::host::layout::{Layout, Mode};
use tally_tests::agent::{sample, Agent};
use tally_tests::cgroup::{random_hex, remove_parents, TestCgroup};
use tally_tests::require;

/// The file path these tests are about: without the BPF iterator, three files a workload.
const FILES_ONLY: &str = "[cgroupfs]\nbpf_iterator = false\n";

/// The agent's open-file limit, soft and hard.
const LIMIT: u64 = 1024;
/// Cgroup files it may keep open under it: 1024 less a reserve of 256 (an eighth, at least 256).
const BUDGET: usize = 768;
/// More than `LIMIT / 3`, so that their files cannot all stay open.
const WORKLOADS: usize = 400;

/// The test's scope in each hierarchy (`/<name>` under its root), its workloads
/// (`/<name>/system.slice/fd-<i>.service`, one sleeping process each), and the root the agent
/// is given: the scope itself on a cgroup v2 node, else a directory of links to the scope in each
/// hierarchy, named as under `/sys/fs/cgroup`.
struct Scope {
    name: String,
    /// Link name (`unified`, `cpuacct`, `memory`, `blkio`; empty on v2) and hierarchy root.
    hierarchies: Vec<(&'static str, PathBuf)>,
    root: PathBuf,
    _links: Option<tempfile::TempDir>,
    workloads: Vec<TestCgroup>,
}

impl Scope {
    #[expect(clippy::expect_used, reason = "test helper")]
    fn create(layout: &Layout) -> Scope {
        let name = format!("tally-fd-{}", random_hex(8));
        let hierarchies: Vec<(&'static str, PathBuf)> = match layout.mode {
            Mode::V2 => vec![("", layout.unified.clone().expect("v2 root"))],
            Mode::Hybrid | Mode::V1 => [
                ("unified", &layout.unified),
                ("cpuacct", &layout.cpuacct),
                ("memory", &layout.memory),
                ("blkio", &layout.blkio),
            ]
            .into_iter()
            .filter_map(|(link, root)| Some((link, root.clone()?)))
            .collect(),
        };
        let roots: Vec<PathBuf> = hierarchies.iter().map(|(_, r)| r.clone()).collect();
        // The slice first, with the v2 controllers its children need for `memory.current` and
        // `io.stat` (where the node's root delegates them).
        for root in &roots {
            let slice = root.join(&name).join("system.slice");
            std::fs::create_dir_all(&slice).expect("mkdir the test slice");
            for dir in [root.join(&name), slice] {
                let wanted = std::fs::read_to_string(dir.join("cgroup.controllers"));
                for controller in wanted.unwrap_or_default().split_whitespace() {
                    if ["cpu", "memory", "io"].contains(&controller) {
                        let _ = std::fs::write(
                            dir.join("cgroup.subtree_control"),
                            format!("+{controller}"),
                        );
                    }
                }
            }
        }
        let (root, links) = match layout.mode {
            Mode::V2 => (roots[0].join(&name), None),
            Mode::Hybrid | Mode::V1 => {
                let links = tempfile::tempdir().expect("tempdir");
                for (link, root) in &hierarchies {
                    std::os::unix::fs::symlink(root.join(&name), links.path().join(link))
                        .expect("symlink");
                }
                (links.path().to_path_buf(), Some(links))
            }
        };
        Scope {
            name,
            hierarchies,
            root,
            _links: links,
            workloads: Vec::new(),
        }
    }

    /// Adds workloads up to `n` in all, with no process yet.
    fn fill(&mut self, n: usize) {
        let roots: Vec<PathBuf> = self.hierarchies.iter().map(|(_, r)| r.clone()).collect();
        let name = &self.name;
        let workloads = (self.workloads.len()..n)
            .map(|i| TestCgroup::create(&roots, &format!("/{name}/system.slice/fd-{i}.service")));
        self.workloads.extend(workloads);
    }

    /// Starts a sleeping process inside each workload, so each has CPU time and memory of its
    /// own.
    fn start(&mut self) {
        for cg in &mut self.workloads {
            cg.start("sleep", &["600"]);
        }
    }

    /// Workload `i`'s directory in the hierarchy linked as `link` (`unified` is the v2 one).
    fn dir(&self, link: &str, i: usize) -> Option<PathBuf> {
        let v2 = self.hierarchies.len() == 1 && self.hierarchies[0].0.is_empty();
        self.hierarchies
            .iter()
            .find(|(l, _)| *l == link || (v2 && link == "unified"))
            .map(|(_, root)| {
                root.join(&self.name)
                    .join(format!("system.slice/fd-{i}.service"))
            })
    }

    /// The files the agent reads for workload `i`, by its rules: CPU from v1 `cpuacct.usage`
    /// where there is one, else `cpu.stat` (always `cpu.stat` with the BPF iterator, `v2_cpu`);
    /// memory from `memory.current`, else v1 `memory.usage_in_bytes`; disk from `io.stat`, else
    /// v1 blkio.
    fn files(&self, i: usize, v2_cpu: bool) -> [Option<PathBuf>; 3] {
        let first = |candidates: [(&str, &str); 2]| {
            candidates
                .into_iter()
                .find_map(|(link, file)| Some(self.dir(link, i)?.join(file)).filter(|p| p.exists()))
        };
        let cpu = if v2_cpu {
            self.dir("unified", i)
                .map(|d| d.join("cpu.stat"))
                .filter(|p| p.exists())
        } else {
            first([("cpuacct", "cpuacct.usage"), ("unified", "cpu.stat")])
        };
        [
            cpu,
            first([
                ("unified", "memory.current"),
                ("memory", "memory.usage_in_bytes"),
            ]),
            first([
                ("unified", "io.stat"),
                ("blkio", "blkio.throttle.io_service_bytes"),
            ]),
        ]
    }
}

impl Drop for Scope {
    fn drop(&mut self) {
        self.workloads.clear();
        let roots: Vec<PathBuf> = self.hierarchies.iter().map(|(_, r)| r.clone()).collect();
        remove_parents(&roots, &format!("/{}/system.slice/x", self.name), 2);
    }
}

/// The kernel's CPU seconds (`cpuacct.usage` or `cpu.stat`) and memory bytes of a workload.
fn kernel_values(cpu: &Path, memory: &Path) -> Option<(f64, f64)> {
    let text = std::fs::read_to_string(cpu).ok()?;
    let cpu = match text.lines().find_map(|l| l.strip_prefix("usage_usec ")) {
        Some(usec) => usec.trim().parse::<u64>().ok()? as f64 / 1e6,
        None => text.trim().parse::<u64>().ok()? as f64 / 1e9,
    };
    let memory = std::fs::read_to_string(memory).ok()?.trim().parse().ok()?;
    Some((cpu, memory))
}

/// Per-workload values in a scrape: (family, unit) → value, disk bytes by cgroupfs only.
fn by_unit(text: &str) -> HashMap<(&str, &str), f64> {
    let mut values = HashMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((family, rest)) = line.split_once('{') else {
            continue;
        };
        if family.starts_with("tally_workload_disk") && !rest.contains("method=\"cgroupfs\"") {
            continue;
        }
        let unit = rest
            .split_once("unit=\"")
            .and_then(|(_, u)| u.split_once('"'))
            .map(|(u, _)| u);
        let value = line.rsplit(' ').next().and_then(|v| v.parse().ok());
        if let (Some(unit), Some(value)) = (unit, value) {
            values.insert((family, unit), value);
        }
    }
    values
}

/// What is wrong with workload `i` in `values`, if anything.
fn mismatch(
    values: &HashMap<(&str, &str), f64>,
    scope: &Scope,
    i: usize,
    v2_cpu: bool,
) -> Option<String> {
    let unit = format!("fd-{i}.service");
    let [Some(cpu_file), Some(memory_file), io] = scope.files(i, v2_cpu) else {
        return Some(format!("{unit}: no CPU or memory file"));
    };
    let Some((cpu, memory)) = kernel_values(&cpu_file, &memory_file) else {
        return Some(format!("{unit}: kernel files unreadable"));
    };
    let got = |family| values.get(&(family, unit.as_str())).copied();
    let agent_cpu = got("tally_workload_cpu_seconds_total");
    if agent_cpu.is_none_or(|v| (v - cpu).abs() > 1e-9) {
        return Some(format!("{unit}: cpu {agent_cpu:?}, kernel {cpu}"));
    }
    let agent_memory = got("tally_workload_memory_bytes");
    if agent_memory != Some(memory) {
        return Some(format!("{unit}: memory {agent_memory:?}, kernel {memory}"));
    }
    if io.is_some()
        && (got("tally_workload_disk_read_bytes_total").is_none()
            || got("tally_workload_disk_write_bytes_total").is_none())
    {
        return Some(format!("{unit}: no disk series"));
    }
    None
}

#[test]
fn every_workload_is_read_exactly_beyond_the_open_file_budget() {
    const TEST: &str = "every_workload_is_read_exactly_beyond_the_open_file_budget";
    if !require::root(TEST) {
        return;
    }
    let layout = match Layout::detect(Path::new("/sys/fs/cgroup")) {
        Ok(layout) => layout,
        Err(e) => return require::skip(TEST, &e.to_string()),
    };
    if require::binary(TEST, "sleep").is_none() {
        return;
    }
    let mut scope = Scope::create(&layout);
    scope.fill(WORKLOADS);
    scope.start();
    let files: usize = (0..WORKLOADS)
        .map(|i| scope.files(i, false).iter().flatten().count())
        .sum();
    assert!(
        files > BUDGET,
        "{files} cgroup files for {WORKLOADS} workloads: not beyond the budget"
    );

    let agent = Agent::start_with_open_file_limit(&config(&scope, FILES_ONLY), LIMIT, 0);
    let text = read_exactly(&agent, &scope, 0.0, false);
    let value = |family, needles: &[&str]| sample(&text, family, needles);
    // The test's workloads and no other (the row of what runs in no workload, which the eBPF
    // sources fill, aside).
    let workloads: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("tally_workload_info{"))
        .filter(|l| !l.contains("container_id=\"\",unit=\"\""))
        .collect();
    assert_eq!(workloads.len(), WORKLOADS, "{workloads:#?}");
    assert!(workloads.iter().all(|l| l.contains("unit=\"fd-")));
    assert_eq!(
        value("tally_cgroupfs_open_files_limit", &[]),
        Some(BUDGET as f64)
    );
    assert_eq!(value("tally_cgroupfs_open_files", &[]), Some(BUDGET as f64));
    // Every tick reads the files beyond the budget by path, from the first tick on.
    let ticks = value("tally_ticks_total", &[]).unwrap_or_default();
    assert!(ticks >= 1.0);
    assert_eq!(
        value("tally_cgroupfs_path_reads_total", &[]),
        Some((files - BUDGET) as f64 * ticks),
        "{files} files, {ticks} ticks"
    );
    // Again five ticks later: the files read by path are read again each tick, and exactly.
    let later = read_exactly(&agent, &scope, ticks + 5.0, false);
    let later_ticks = sample(&later, "tally_ticks_total", &[]).unwrap_or_default();
    assert_eq!(
        sample(&later, "tally_cgroupfs_path_reads_total", &[]),
        Some((files - BUDGET) as f64 * later_ticks),
        "{files} files, {later_ticks} ticks"
    );
    assert_eq!(
        sample(&later, "tally_cgroupfs_open_files", &[]),
        Some(BUDGET as f64)
    );
    assert_eq!(
        sample(&later, "tally_collector_errors_total", &[]),
        None,
        "the limit was never met, and nothing failed"
    );
    // The agent holds the kept files and stays under its limit.
    let held = std::fs::read_dir(format!("/proc/{}/fd", agent.child.id()))
        .expect("the agent's fds")
        .count();
    assert!(
        held >= BUDGET && held < LIMIT as usize,
        "{held} descriptors"
    );
    eprintln!("{WORKLOADS} workloads, {files} files, {later_ticks} ticks, {held} descriptors held");
}

/// The agent starts holding 255 descriptors it inherited (as from a parent that leaks them), so
/// with its own the rest of it holds about 300, 44 past the reserve: the collector's first tick
/// meets `EMFILE` while it opens the workloads' files. That is counted once, the tick's remaining
/// files are read through the spare descriptor, and the budget drops a reserve below what was
/// open, so the agent has descriptors free again; every workload is read exactly throughout.
#[test]
fn the_limit_met_through_other_descriptors_is_counted_once_and_given_back() {
    const TEST: &str = "the_limit_met_through_other_descriptors_is_counted_once_and_given_back";
    const INHERITED: u32 = 255;
    if !require::root(TEST) {
        return;
    }
    let layout = match Layout::detect(Path::new("/sys/fs/cgroup")) {
        Ok(layout) => layout,
        Err(e) => return require::skip(TEST, &e.to_string()),
    };
    if require::binary(TEST, "sleep").is_none() {
        return;
    }
    let mut scope = Scope::create(&layout);
    scope.fill(WORKLOADS);
    scope.start();
    let files: usize = (0..WORKLOADS)
        .map(|i| scope.files(i, false).iter().flatten().count())
        .sum();
    let agent = Agent::start_with_open_file_limit(&config(&scope, FILES_ONLY), LIMIT, INHERITED);
    let held = || {
        std::fs::read_dir(format!("/proc/{}/fd", agent.child.id()))
            .expect("the agent's fds")
            .count()
    };
    let text = read_exactly(&agent, &scope, 0.0, false);
    let value = |family, needles: &[&str]| sample(&text, family, needles);
    assert_eq!(
        value("tally_collector_errors_total", &["reason=\"fd_limit\""]),
        Some(1.0),
        "one event, counted once; log:\n{}",
        agent.log()
    );
    let budget = value("tally_cgroupfs_open_files_limit", &[]).unwrap_or_default() as usize;
    assert_eq!(value("tally_cgroupfs_open_files", &[]), Some(budget as f64));
    // The first tick kept what the others left, give or take the few descriptors open for a
    // moment (the walk's, a scrape's); the budget is now a reserve below that.
    let others = held() - budget;
    let most = LIMIT as usize - others - 256;
    assert!(
        (most - 8..=most + 8).contains(&budget),
        "budget {budget}, {others} descriptors held by others"
    );
    // Reads by path: the first tick's past the `budget + 256` it kept, through the spare
    // descriptor; every tick since, all files past the budget. Exact, now and five ticks later,
    // with the limit not met again.
    let path_reads = |text: &str| {
        let ticks = sample(text, "tally_ticks_total", &[]).unwrap_or_default();
        let expected = (files - budget - 256) as f64 + (ticks - 1.0) * (files - budget) as f64;
        (
            sample(text, "tally_cgroupfs_path_reads_total", &[]),
            expected,
            ticks,
        )
    };
    let (got, expected, ticks) = path_reads(&text);
    assert_eq!(got, Some(expected), "{files} files, {ticks} ticks");
    let later = read_exactly(&agent, &scope, ticks + 5.0, false);
    let (got, expected, ticks) = path_reads(&later);
    assert_eq!(got, Some(expected), "{files} files, {ticks} ticks");
    assert_eq!(
        sample(
            &later,
            "tally_collector_errors_total",
            &["reason=\"fd_limit\""]
        ),
        Some(1.0)
    );
    // The reserve is free again.
    let free = LIMIT as usize - held();
    assert!(free >= 256 - 8, "{free} descriptors free");
    eprintln!("{others} held by others, budget {budget}, {free} free, {ticks} ticks");
}

/// Scrapes until a scrape of a tick numbered `after` or later has every workload with its values
/// as the kernel has them at the time (the sleeping processes' CPU and memory change little, so a
/// tick soon reads what the test reads), and returns it.
fn read_exactly(agent: &Agent, scope: &Scope, after: f64, v2_cpu: bool) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let text = agent.scrape();
        let ticks = sample(&text, "tally_ticks_total", &[]).unwrap_or_default();
        let values = by_unit(&text);
        let wrong = if ticks < after {
            Some(format!("tick {ticks}, waiting for {after}"))
        } else {
            (0..WORKLOADS).find_map(|i| mismatch(&values, scope, i, v2_cpu))
        };
        let Some(wrong) = wrong else {
            return text;
        };
        assert!(
            std::time::Instant::now() < deadline,
            "not every workload read exactly within 60 s: {wrong}\nlog:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// With the BPF iterator (the default), every workload's CPU and memory come from one walk a
/// tick: the agent opens a workload's cgroup files only for its disk bytes. The iterator is given
/// room for fewer cgroups than the node has, so the workloads beyond it are read from their
/// files, and that is counted: every workload's values stay exact either way. CPU is v2
/// `cpu.stat`'s count, which the kernel folds in from per-CPU counters only when asked: a
/// workload that just burnt CPU shows all of it at the next tick, before anyone else reads it.
#[test]
fn cpu_and_memory_come_from_the_iterator_and_what_it_has_no_room_for_from_files() {
    const TEST: &str =
        "cpu_and_memory_come_from_the_iterator_and_what_it_has_no_room_for_from_files";
    /// `ebpf.max_cgroup_entries`: the walk (the scope, its slice, then the workloads in the
    /// order they were made) keeps the first 256 cgroups.
    const ROOM: usize = 256;
    if !require::root(TEST) {
        return;
    }
    let layout = match Layout::detect(Path::new("/sys/fs/cgroup")) {
        Ok(layout) => layout,
        Err(e) => return require::skip(TEST, &e.to_string()),
    };
    if require::binary(TEST, "sleep").is_none() || require::binary(TEST, "sh").is_none() {
        return;
    }
    let mut scope = Scope::create(&layout);
    scope.fill(WORKLOADS);
    scope.start();
    let agent = Agent::start_with_open_file_limit(
        &config(&scope, &format!("[ebpf]\nmax_cgroup_entries = {ROOM}\n")),
        LIMIT,
        0,
    );
    let text = read_exactly(&agent, &scope, 0.0, true);
    let value = |family, needles: &[&str]| sample(&text, family, needles);
    assert_eq!(
        value("tally_probe_up", &["probe=\"cgroup_iterator\""]),
        Some(1.0),
        "log:\n{}",
        agent.log()
    );
    // Opened: each workload's disk file, and the CPU and memory files of those beyond the room.
    let beyond = WORKLOADS - (ROOM - 2);
    let disk_files = (0..WORKLOADS)
        .filter(|&i| scope.files(i, true)[2].is_some())
        .count();
    assert_eq!(
        value("tally_cgroupfs_open_files", &[]),
        Some((disk_files + 2 * beyond) as f64)
    );
    assert_eq!(value("tally_cgroupfs_path_reads_total", &[]), Some(0.0));
    // Every walk found more cgroups than its room: once a tick in each tree walked (v2, and the
    // v1 memory hierarchy of a hybrid node).
    let trees = 1 + usize::from(scope.dir("memory", 0).is_some() && layout.mode != Mode::V2);
    let ticks = value("tally_ticks_total", &[]).unwrap_or_default();
    assert_eq!(
        value(
            "tally_collector_errors_total",
            &["reason=\"iterator_full\""]
        ),
        Some(ticks * trees as f64),
        "{ticks} ticks"
    );

    // Workload 0 (in the walk) burns CPU; two ticks after it ended the agent shows the kernel's
    // count exactly, read before the test reads `cpu.stat` (a read that folds the count in too).
    let unit = "fd-0.service";
    let cpu_file = scope.files(0, true)[0].clone().expect("cpu.stat");
    let cpu_of = |text: &str| sample(text, "tally_workload_cpu_seconds_total", &[unit]);
    let before = cpu_of(&text).expect("workload 0's CPU");
    let out = scope.workloads[0].run(
        "sh",
        &["-c", "i=0; while [ $i -lt 300000 ]; do i=$((i+1)); done"],
    );
    assert!(out.status.success());
    let ended = sample(&agent.scrape(), "tally_ticks_total", &[]).unwrap_or_default();
    let burnt = loop {
        let now = agent.scrape();
        let ticks_now = sample(&now, "tally_ticks_total", &[]).unwrap_or_default();
        if ticks_now >= ended + 2.0 {
            break now;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let agent_cpu = cpu_of(&burnt).expect("workload 0's CPU");
    let (kernel_cpu, _) =
        kernel_values(&cpu_file, &scope.files(0, true)[1].clone().expect("memory"))
            .expect("kernel values");
    assert!(
        kernel_cpu - before > 0.05,
        "{before} s, then {kernel_cpu} s"
    );
    assert!(
        (agent_cpu - kernel_cpu).abs() < 1e-9,
        "agent {agent_cpu} s, kernel {kernel_cpu} s (before: {before} s)"
    );

    // Workload 1's cgroup made again at the same path: made last, it is beyond the room now,
    // and workload 254 within it, whose CPU and memory files (opened while it was beyond) are
    // closed.
    let old_cpu = cpu_of_unit(&burnt, 1);
    restart(&agent, &mut scope, 1);
    let restarted = two_ticks_after(&agent, &caught_up(&agent, &scope, 1, old_cpu));
    assert_eq!(held(&agent, &scope, 254), Vec::<PathBuf>::new());
    assert_eq!(held(&agent, &scope, 1).len(), 2);
    assert_eq!(
        sample(&restarted, "tally_cgroupfs_open_files", &[]),
        Some((disk_files + 2 * beyond) as f64)
    );
    drop(agent);

    // With room for every cgroup, a unit restarted between two ticks (the agent stopped
    // meanwhile) has new directories with new ids, which the collector takes up: it is read
    // from the walk, its only file open its disk file.
    let agent = Agent::start_with_open_file_limit(&config(&scope, ""), LIMIT, 0);
    let text = read_exactly(&agent, &scope, 0.0, true);
    assert_eq!(
        sample(&text, "tally_cgroupfs_open_files", &[]),
        Some(disk_files as f64)
    );
    let old_cpu = cpu_of_unit(&text, 2);
    restart(&agent, &mut scope, 2);
    let restarted = two_ticks_after(&agent, &caught_up(&agent, &scope, 2, old_cpu));
    assert_eq!(held(&agent, &scope, 2), Vec::<PathBuf>::new());
    assert_eq!(
        sample(&restarted, "tally_cgroupfs_open_files", &[]),
        Some(disk_files as f64)
    );
}

/// The agent's configuration: a 200 ms tick, the test's scope as its cgroup root, no CRI, then
/// `extra`.
fn config(scope: &Scope, extra: &str) -> String {
    format!(
        "[agent]\ntick_interval_ms = 200\n[paths]\ncgroup_root = \"{}\"\n[cri]\nendpoints = []\n{extra}",
        scope.root.display()
    )
}

/// Workload `i`'s CPU in a scrape.
#[expect(clippy::expect_used, reason = "test helper")]
fn cpu_of_unit(text: &str, i: usize) -> f64 {
    let unit = format!("unit=\"fd-{i}.service\"");
    sample(text, "tally_workload_cpu_seconds_total", &[&unit]).expect("the workload's CPU")
}

/// Removes workload `i`'s cgroups and makes them again at the same paths with a new sleeping
/// process, while the agent is stopped: between two of its ticks.
#[expect(clippy::expect_used, reason = "test helper")]
fn restart(agent: &Agent, scope: &mut Scope, i: usize) {
    let roots: Vec<PathBuf> = scope.hierarchies.iter().map(|(_, r)| r.clone()).collect();
    let rel = format!("/{}/system.slice/fd-{i}.service", scope.name);
    let at = scope
        .workloads
        .iter()
        .position(|w| w.dirs[0].ends_with(format!("fd-{i}.service")))
        .expect("the workload");
    agent.signal(libc::SIGSTOP);
    drop(scope.workloads.remove(at));
    let mut again = TestCgroup::create(&roots, &rel);
    again.start("sleep", &["600"]);
    scope.workloads.push(again);
    agent.signal(libc::SIGCONT);
}

/// The first scrape in which workload `i`'s CPU is its new cgroup's count on top of `old_cpu`,
/// the old cgroup's last reading (plus what its sleep's exit cost it, charged when the cgroup
/// was gone: at most a few milliseconds).
#[expect(clippy::expect_used, reason = "test helper")]
fn caught_up(agent: &Agent, scope: &Scope, i: usize, old_cpu: f64) -> String {
    let unit = format!("unit=\"fd-{i}.service\"");
    let [cpu_file, memory_file, _] = scope.files(i, true);
    let (cpu_file, memory_file) = (cpu_file.expect("cpu.stat"), memory_file.expect("memory"));
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let text = agent.scrape();
        let agent_cpu = sample(&text, "tally_workload_cpu_seconds_total", &[&unit]);
        let kernel = kernel_values(&cpu_file, &memory_file);
        let caught = kernel.is_some_and(|(cpu, _)| {
            agent_cpu.is_some_and(|v| v >= old_cpu + cpu - 1e-9 && v < old_cpu + cpu + 0.01)
        });
        if caught {
            return text;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "fd-{i} after its restart: {agent_cpu:?} s, old {old_cpu} s, kernel {kernel:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A scrape two ticks after `text`'s (a cgroup file of a removed cgroup is closed when a read
/// meets `ENODEV`, and the new one opened at the next read).
fn two_ticks_after(agent: &Agent, text: &str) -> String {
    let ticks = sample(text, "tally_ticks_total", &[]).unwrap_or_default();
    loop {
        let now = agent.scrape();
        if sample(&now, "tally_ticks_total", &[]).unwrap_or_default() >= ticks + 2.0 {
            return now;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The CPU and memory files of workload `i` the agent holds open.
#[expect(clippy::expect_used, reason = "test helper")]
fn held(agent: &Agent, scope: &Scope, i: usize) -> Vec<PathBuf> {
    let dirs = ["unified", "memory", "cpuacct"].map(|link| scope.dir(link, i));
    std::fs::read_dir(format!("/proc/{}/fd", agent.child.id()))
        .expect("the agent's fds")
        .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .filter(|path| {
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            !name.starts_with("io.")
                && !name.starts_with("blkio.")
                && dirs
                    .iter()
                    .flatten()
                    .any(|dir| path.parent() == Some(dir.as_path()))
        })
        .collect()
}
