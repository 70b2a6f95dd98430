//! The agent under the unit's sandbox (capability bounding set, no_new_privs, an emulation of
//! its system call filter) works as it does without it.

use super::unit::*;
use super::*;
use std::os::unix::fs::PermissionsExt as _;
use tally_tests::fake_engine;

/// The agent under the unit's sandbox: its capability bounding set and no_new_privs (setpriv),
/// its `SystemCallFilter=` expanded with `systemd-analyze syscall-filter`, its
/// `RestrictAddressFamilies=` and `MemoryDenyWriteExecute=` (seccomp, through libseccomp's
/// Python binding: stacked filters, the strictest answer wins, as systemd installs them).
pub(super) const SANDBOX: &str = r#"
import errno, os, sys, seccomp
allowed_file, families, mdwe = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
argv = sys.argv[4:]
deny = seccomp.ERRNO(errno.EPERM)
extra = seccomp.SyscallFilter(seccomp.ALLOW)
if mdwe:
    PROT_WRITE, PROT_EXEC, SHM_EXEC = 0x2, 0x4, 0o100000
    both = PROT_WRITE | PROT_EXEC
    extra.add_rule(deny, "mmap", seccomp.Arg(2, seccomp.MASKED_EQ, both, both))
    extra.add_rule(deny, "mprotect", seccomp.Arg(2, seccomp.MASKED_EQ, PROT_EXEC, PROT_EXEC))
    extra.add_rule(deny, "pkey_mprotect", seccomp.Arg(2, seccomp.MASKED_EQ, PROT_EXEC, PROT_EXEC))
    extra.add_rule(deny, "shmat", seccomp.Arg(2, seccomp.MASKED_EQ, SHM_EXEC, SHM_EXEC))
if families:
    allowed_families = sorted(int(f) for f in families.split(","))
    nofamily = seccomp.ERRNO(errno.EAFNOSUPPORT)
    for family in range(allowed_families[-1]):
        if family not in allowed_families:
            extra.add_rule(nofamily, "socket", seccomp.Arg(0, seccomp.EQ, family))
    extra.add_rule(nofamily, "socket", seccomp.Arg(0, seccomp.GT, allowed_families[-1]))
extra.load()
calls = seccomp.SyscallFilter(deny)
for name in open(allowed_file).read().split() + ["execve", "exit", "exit_group", "rt_sigreturn"]:
    try:
        calls.add_rule(seccomp.ALLOW, name)
    except Exception:
        pass  # not a system call of this architecture or libseccomp
calls.load()
os.execv(argv[0], argv)
"#;

/// `systemd-analyze syscall-filter`'s groups (`@name` → members, groups or calls).
pub(super) fn syscall_groups(analyze: &Path) -> BTreeMap<String, Vec<String>> {
    let listing = run_ok(Command::new(analyze).arg("syscall-filter"));
    let mut groups: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut current = None;
    for line in listing.lines() {
        if line.starts_with('@') {
            current = Some(line.trim().to_owned());
            groups.entry(line.trim().to_owned()).or_default();
        } else if let Some(group) = &current {
            let item = line.trim();
            if !item.is_empty() && !item.starts_with('#') {
                groups
                    .entry(group.clone())
                    .or_default()
                    .push(item.to_owned());
            }
        }
    }
    groups
}

pub(super) fn expand(
    groups: &BTreeMap<String, Vec<String>>,
    item: &str,
    into: &mut BTreeSet<String>,
) {
    match groups.get(item) {
        Some(members) if item.starts_with('@') => {
            for member in members {
                expand(groups, member, into);
            }
        }
        _ => {
            assert!(!item.starts_with('@'), "unknown system call group {item}");
            into.insert(item.to_owned());
        }
    }
}

/// How to run a program under the unit's sandbox: the program goes after the returned command's
/// arguments. Files the sandbox needs are written to `dir`.
pub(super) struct Sandbox {
    caps: BTreeSet<String>,
    no_new_privs: bool,
    allowed_file: PathBuf,
    families: String,
    mdwe: bool,
    script: PathBuf,
}

impl Sandbox {
    fn from_unit(analyze: &Path, dir: &Path) -> Sandbox {
        let unit = read(UNIT);
        let groups = syscall_groups(analyze);
        let mut allowed = BTreeSet::new();
        for line in unit_values(&unit, "SystemCallFilter") {
            let (deny, list) = match line.strip_prefix('~') {
                Some(rest) => (true, rest),
                None => (false, line.as_str()),
            };
            let mut calls = BTreeSet::new();
            for item in list.split_whitespace() {
                expand(&groups, item, &mut calls);
            }
            if deny {
                allowed.retain(|c| !calls.contains(c));
            } else {
                allowed.extend(calls);
            }
        }
        let allowed_file = dir.join("allowed-syscalls");
        std::fs::write(
            &allowed_file,
            allowed.into_iter().collect::<Vec<_>>().join("\n"),
        )
        .unwrap_or_else(|e| panic!("{}: {e}", allowed_file.display()));
        let families = unit_values(&unit, "RestrictAddressFamilies")
            .iter()
            .flat_map(|v| v.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
            .map(|name| {
                match name.as_str() {
                    "AF_UNIX" => libc::AF_UNIX,
                    "AF_INET" => libc::AF_INET,
                    "AF_INET6" => libc::AF_INET6,
                    "AF_NETLINK" => libc::AF_NETLINK,
                    other => panic!("add {other} to the test's address family names"),
                }
                .to_string()
            })
            .collect::<Vec<_>>()
            .join(",");
        let script = dir.join("sandbox.py");
        std::fs::write(&script, SANDBOX).unwrap_or_else(|e| panic!("{}: {e}", script.display()));
        Sandbox {
            caps: unit_capabilities(&unit),
            no_new_privs: unit_value(&unit, "NoNewPrivileges").as_deref() == Some("yes"),
            allowed_file,
            families,
            mdwe: unit_value(&unit, "MemoryDenyWriteExecute").as_deref() == Some("yes"),
            script,
        }
    }

    /// `program args…` under the sandbox.
    fn command(&self, program: &Path, args: &[&str]) -> Command {
        let caps: Vec<String> = self
            .caps
            .iter()
            .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_ascii_lowercase()))
            .collect();
        let mut command = Command::new("setpriv");
        if self.no_new_privs {
            command.arg("--no-new-privs");
        }
        command
            .arg("--bounding-set")
            .arg(format!("-all,{}", caps.join(",")))
            .args(["--inh-caps", "-all", "/usr/bin/python3"])
            .arg(&self.script)
            .arg(&self.allowed_file)
            .arg(&self.families)
            .arg(if self.mdwe { "1" } else { "0" })
            .arg(program)
            .args(args);
        command
    }

    /// CapBnd as /proc/<pid>/status shows it.
    fn bounding_mask(&self) -> u64 {
        self.caps
            .iter()
            .map(|c| match c.as_str() {
                "CAP_NET_ADMIN" => 12,
                "CAP_SYS_ADMIN" => 21,
                "CAP_SYS_PTRACE" => 19,
                "CAP_PERFMON" => 38,
                "CAP_BPF" => 39,
                "CAP_KILL" => 5,
                other => panic!("add {other} to the test's capability numbers"),
            })
            .fold(0u64, |mask, bit| mask | 1 << bit)
    }
}

/// An agent started by a command of ours; killed on drop.
pub(super) struct Spawned {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Spawned {
    fn start(mut command: Command, port: u16, log: PathBuf) -> Spawned {
        let stderr = std::fs::File::create(&log).unwrap_or_else(|e| panic!("{e}"));
        let child = command
            .env("RUST_LOG", "info")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("TALLY_LISTEN")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {command:?}: {e}"));
        let spawned = Spawned { child, port, log };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if http_get(port, "/readyz", &[]).is_ok_and(|r| r.status == 200) {
                return spawned;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("sandboxed agent not ready; log:\n{}", spawned.log());
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn scrape(&self) -> String {
        let r = http_get(self.port, "/metrics", &[]).unwrap_or_else(|e| panic!("scrape: {e}"));
        assert_eq!(r.status, 200);
        text(&r.body)
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(super) fn probes(metrics: &str) -> BTreeSet<String> {
    metrics
        .lines()
        .filter(|l| l.starts_with("tally_probe_up{"))
        .map(str::to_owned)
        .collect()
}

/// `tally check --json`'s item statuses.
pub(super) fn check_statuses(out: &Output) -> BTreeMap<String, String> {
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("check --json: {e}: {}", text(&out.stdout)));
    report["items"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|i| {
            (
                i["name"].as_str().unwrap_or_default().to_owned(),
                i["status"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

/// Sends `count` UDP datagrams of `size` bytes to `host:port`.
pub(super) const UDP_SENDER: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(int(sys.argv[3])):
    s.sendto(b"u" * int(sys.argv[4]), (sys.argv[1], int(sys.argv[2])))
"#;

/// Traffic from a cgroup to this node's non-loopback address reads `node` scope in both agents.
/// Without a routable address (no default route) there is nothing to compare: a loud skip, and a
/// failure under the strict mode CI sets.
#[expect(clippy::unwrap_used, reason = "test helper")]
pub(super) fn node_scope_is_the_same(unified: &Path, reference: &Agent, sandboxed: &Spawned) {
    let probe = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
    let Ok(node_addr) = probe
        .connect("192.0.2.1:9")
        .and_then(|()| probe.local_addr())
        .map(|a| a.ip())
    else {
        require::skip(
            "agent_under_the_units_sandbox_works_as_without_it (node scope)",
            "no default route, so no routable node address to compare scopes on",
        );
        return;
    };
    let listener = std::net::UdpSocket::bind((node_addr, 0)).unwrap();
    let port = listener.local_addr().unwrap().port().to_string();
    let unit = format!("tally-pkg-{}.service", random_hex(8));
    let cg = TestCgroup::create(
        std::slice::from_ref(&unified.to_path_buf()),
        &format!("/system.slice/{unit}"),
    );
    let out = cg.run(
        "python3",
        &["-c", UDP_SENDER, &node_addr.to_string(), &port, "5", "100"],
    );
    assert!(out.status.success(), "sender: {}", text(&out.stderr));
    let label = format!("unit=\"{unit}\"");
    let scopes = |metrics: &str| -> BTreeSet<String> {
        metrics
            .lines()
            .filter(|l| {
                l.starts_with("tally_workload_network_transmit_bytes_total{") && l.contains(&label)
            })
            .filter_map(|l| {
                l.split("scope=\"")
                    .nth(1)?
                    .split('"')
                    .next()
                    .map(str::to_owned)
            })
            .collect()
    };
    reference.scrape_until(
        Duration::from_secs(5),
        "reference: the unit's traffic",
        |t| !scopes(t).is_empty(),
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while scopes(&sandboxed.scrape()).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let want: BTreeSet<String> = ["node".to_owned()].into();
    assert_eq!(scopes(&reference.scrape()), want, "{node_addr} unconfined");
    assert_eq!(
        scopes(&sandboxed.scrape()),
        want,
        "{node_addr} under the sandbox; log:\n{}",
        sandboxed.log()
    );
}

#[test]
fn agent_under_the_units_sandbox_works_as_without_it() {
    const TEST: &str = "agent_under_the_units_sandbox_works_as_without_it";
    if !require::root(TEST) {
        return;
    }
    let Some(analyze) = require::binary(TEST, "systemd-analyze") else {
        return;
    };
    if require::binary(TEST, "setpriv").is_none() {
        return;
    }
    let seccomp = output(Command::new("/usr/bin/python3").args(["-c", "import seccomp"]));
    if !seccomp.status.success() {
        require::skip(
            TEST,
            "/usr/bin/python3 cannot import seccomp (Debian package python3-seccomp)",
        );
        return;
    }
    let Some(unified) = require::unified(TEST) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let sandbox = Sandbox::from_unit(&analyze, dir.path());
    let config_text = format!(
        "[agent]\ntick_interval_ms = 200\n[cri]\nendpoints = [\"{}\"]\n",
        dir.path().join("no-runtime.sock").display()
    );

    // The reference: the same binary and configuration, unconfined.
    let reference = Agent::start(&config_text);

    // Budgets the sandboxed agent enforces, on two units that burn a CPU: one duty-cycled by
    // freezing (its freeze guard is the agent executing itself), one terminated — its loop runs
    // as `nobody`, so the SIGTERM needs the unit's CAP_KILL.
    let roots = every_hierarchy(unified.clone());
    let freeze_unit = format!("tally-pkg-freeze-{}.service", random_hex(8));
    let mut freeze_cg = TestCgroup::create(&roots, &format!("/system.slice/{freeze_unit}"));
    freeze_cg.burn();
    let term_unit = format!("tally-pkg-term-{}.service", random_hex(8));
    let mut term_cg = TestCgroup::create(&roots, &format!("/system.slice/{term_unit}"));
    let victim = term_cg.spawn(
        "exec setpriv --reuid=65534 --regid=65534 --clear-groups sh -c 'while :; do :; done'",
    );
    // An inference server of another user, bound to loopback in a network namespace of its
    // own: finding its socket and joining its namespace need the unit's CAP_SYS_PTRACE and
    // CAP_SYS_ADMIN.
    let engine_unit = format!("tally-pkg-llm-{}.service", random_hex(8));
    let mut engine_cg = TestCgroup::create(&roots, &format!("/system.slice/{engine_unit}"));
    let engine_dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(engine_dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let engine_body = engine_dir.path().join("vllm.prom");
    fake_engine::write_body(
        &engine_body,
        &fake_engine::vllm_body(&[("m", 7.0, 3.0, 0.0, 0.5)]),
    );
    std::fs::set_permissions(&engine_body, std::fs::Permissions::from_mode(0o644)).unwrap();
    fake_engine::start_as(
        env!("CARGO_BIN_EXE_fake-engine"),
        &mut engine_cg,
        &["vllm", "serve", "m", "--port", "8000"],
        &engine_body,
        fake_engine::Mode::Serve,
        true,
        Some(65534),
    );
    let state = tempfile::tempdir().unwrap();
    let budget = |name: &str, unit: &str, action: &str| {
        format!(
            "[[budget]]\nname = \"{name}\"\nresource = \"cpu_seconds\"\nlimit = 0.05\nwindow = \"1h\"\naction = \"{action}\"\nselect.unit = \"{unit}\"\n"
        )
    };

    let port = free_port();
    let config = dir.path().join("tally.toml");
    std::fs::write(
        &config,
        format!(
            "{}[enforcement]\nstate_dir = \"{}\"\n{}throttle.share = 0.5\n{}",
            config_text.replace(
                "[agent]\n",
                &format!("[agent]\nlisten = \"127.0.0.1:{port}\"\n"),
            ),
            state.path().display(),
            budget("sandbox-freeze", &freeze_unit, "freeze"),
            budget("sandbox-terminate", &term_unit, "terminate"),
        ),
    )
    .unwrap();
    let config_arg = config.display().to_string();
    let mut agent = Spawned::start(
        sandbox.command(&tally_bin(), &["agent", "--config", &config_arg]),
        port,
        dir.path().join("sandboxed.log"),
    );

    // The sandbox is real: the unit's bounding set, no_new_privs, two seccomp filters.
    let status = std::fs::read_to_string(format!("/proc/{}/status", agent.child.id())).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
            .unwrap_or_default()
            .to_owned()
    };
    assert_eq!(
        u64::from_str_radix(&field("CapBnd:"), 16).unwrap(),
        sandbox.bounding_mask(),
        "{status}"
    );
    assert_eq!(field("NoNewPrivs:"), "1");
    assert_eq!(field("Seccomp:"), "2");
    assert_eq!(field("Seccomp_filters:"), "2");

    // Every probe comes up (or not) exactly as it does unconfined.
    let sandboxed = agent.scrape();
    assert_eq!(
        probes(&sandboxed),
        probes(&reference.scrape()),
        "sandboxed log:\n{}",
        agent.log()
    );
    assert_eq!(
        sample(
            &sandboxed,
            "tally_probe_up",
            &["probe=\"network\"", "method=\"cgroup_skb\""]
        ),
        Some(1.0),
        "{sandboxed}\n{}",
        agent.log()
    );
    // bpf_stats (CAP_SYS_ADMIN) works inside.
    assert!(
        !agent.log().contains("bpf_stats unavailable"),
        "{}",
        agent.log()
    );
    assert!(serves(&sandboxed, "tally_ebpf_program_run_seconds_total"));
    assert!(!agent.log().contains("Bad system call"), "{}", agent.log());

    // The node's own address is `node` scope inside too: the agent learns it through
    // getifaddrs(3), a netlink socket (RestrictAddressFamilies= must keep AF_NETLINK).
    node_scope_is_the_same(&unified, &reference, &agent);

    // The other user's inference server, found and scraped inside: what it counted before
    // the agent started is history (0), then what it counts after.
    let tokens = |t: &str| {
        sample(
            t,
            "tally_workload_tokens_total",
            &[&format!("unit=\"{engine_unit}\""), "kind=\"generation\""],
        )
    };
    let until = |what: &str, want: f64| {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let text = agent.scrape();
            if tokens(&text) == Some(want) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: {:?}\n{text}\n{}",
                tokens(&text),
                agent.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    until("the server found", 0.0);
    fake_engine::write_body(
        &engine_body,
        &fake_engine::vllm_body(&[("m", 7.0, 10.0, 0.0, 0.5)]),
    );
    until("its tokens since", 7.0);

    // ExecStartPre's `tally validate`, and `tally check`, under the sandbox too.
    let shipped = root().join("packaging/config/tally.toml");
    run_ok(&mut sandbox.command(&tally_bin(), &["validate", &shipped.display().to_string()]));
    let inside =
        output(&mut sandbox.command(&tally_bin(), &["check", "--json", "--config", &config_arg]));
    let outside =
        output(Command::new(tally_bin()).args(["check", "--json", "--config", &config_arg]));
    assert_eq!(inside.status.code(), outside.status.code());
    assert_eq!(check_statuses(&inside), check_statuses(&outside));

    // Enforcement works inside: the freeze is in force, the SIGTERM reached another user's
    // process, and nothing failed.
    let deadline = Instant::now() + Duration::from_secs(15);
    let enforced = loop {
        let text = agent.scrape();
        let enforcing = |budget: &str| {
            sample(
                &text,
                "tally_enforcement_actions_total",
                &[&format!("budget=\"{budget}\""), "event=\"enforce\""],
            )
            .is_some_and(|n| n >= 1.0)
        };
        if enforcing("sandbox-freeze") && enforcing("sandbox-terminate") && !running(victim) {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "budgets not enforced under the sandbox (victim running: {});\n{text}\nlog:\n{}",
            running(victim),
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(
        sample(
            &enforced,
            "tally_enforcement_active",
            &["budget=\"sandbox-freeze\""]
        ),
        Some(1.0)
    );
    // Every error counter is exported from zero; none may have moved.
    let errors: Vec<&str> = enforced
        .lines()
        .filter(|l| l.starts_with("tally_enforcement_errors_total{") && !l.ends_with(" 0"))
        .collect();
    assert!(errors.is_empty(), "{errors:?}\nlog:\n{}", agent.log());

    // SIGKILL mid-cycle: the freeze guard thaws the cgroup; then ExecStopPost's `tally release`,
    // under the sandbox, lifts what the state file still records.
    let _ = agent.child.kill();
    let _ = agent.child.wait();
    let events = freeze_cg.dirs[0].join("cgroup.events");
    let frozen = || {
        std::fs::read_to_string(&events)
            .unwrap_or_else(|e| panic!("{}: {e}", events.display()))
            .lines()
            .any(|l| l == "frozen 1")
    };
    let deadline = Instant::now() + Duration::from_secs(2);
    while frozen() {
        assert!(
            Instant::now() < deadline,
            "still frozen 2 s after the agent was killed; log:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let release = unit_values(&read(UNIT), "ExecStopPost")
        .pop()
        .unwrap_or_default()
        .replace("/usr/bin/tally", &tally_bin().display().to_string())
        .replace("/etc/tally/tally.toml", &config_arg);
    let words: Vec<&str> = release.split_whitespace().collect();
    let released = run_ok(&mut sandbox.command(Path::new(words[0]), &words[1..]));
    assert!(released.contains("released freeze on "), "{released}");
    assert!(!frozen());
}

/// Whether `pid` is alive (a zombie, killed and not yet reaped, is not).
pub(super) fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z'))
    })
}

// ---------------------------------------------------------------------------------------------
// Debian package
