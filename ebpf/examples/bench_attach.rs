//! Loads Tally's production object (`tally.bpf.o`, for `net_egress` and `net_ingress`) and the
//! benchmark's object (`bench.bpf.o`, for the reference programs `bench_empty` and
//! `bench_counter`), attaches the named `cgroup_skb` programs at a cgroup v2 root and, when told
//! to stop, prints each program's `bpf_stats` (run count and run time). Used by `bench/ebpf.sh` to
//! compare the agent's hot-path programs with the references under the same traffic. An object
//! is loaded only when a named program is in it; the agent itself never loads `bench.bpf.o`.
//!
//! ```text
//! bench_attach [--cgroup /sys/fs/cgroup/unified] net_egress net_ingress bench_empty bench_counter
//! ```
//!
//! It prints `ready` on stdout once everything is attached, then waits until stdin reaches EOF or
//! it gets SIGTERM/SIGINT, prints one line per program:
//!
//! ```text
//! program=<name> runs=<n> run_ns=<total> avg_ns=<avg>
//! ```
//!
//! and exits, which detaches everything (nothing is pinned).
//!
//! With `--toggle` it loads the programs but attaches nothing, prints `ready`, then reads one
//! command per line from stdin: `attach` turns `bpf_stats` on (as the agent holds it) and attaches
//! every named program, `detach` detaches them and turns `bpf_stats` off again; each is answered
//! with `attached` / `detached` once done. At EOF it prints the stats lines above (runs and time
//! accumulate over the attached periods only) and exits. `--no-stats` leaves `bpf_stats` off
//! throughout, to measure what holding it on costs (the stats lines then read 0).
//! `bench/ebpf_toggle.py` uses this to switch the programs on and off many times within one
//! iperf3 stream.
//!
//! The scope tries get the same loopback ranges the agent installs (127.0.0.0/8 and ::1/128 are
//! `node`), so `net_egress` / `net_ingress` take their real lookup path on loopback traffic. Must
//! run as root.

use std::error::Error;
use std::fs::File;
use std::io::{BufRead, Write};
use std::net::Ipv6Addr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::programs::cgroup_skb::{CgroupSkbAttachType, CgroupSkbLinkId};
use aya::programs::{CgroupAttachMode, CgroupSkb};
use aya::{Ebpf, EbpfLoader};
use tally_ebpf::stats::{program_stats, StatsGuard};
use tally_ebpf::{scope, TALLY_OBJECT};

type Result<T> = std::result::Result<T, Box<dyn Error>>;

/// The benchmark's reference programs (`ebpf/programs/src/bench.rs`), built by `ebpf/build.sh`.
/// Embedded here, not in the `tally_ebpf` library, so the agent does not carry them.
static BENCH_OBJECT: &[u8] = aya::include_bytes_aligned!("../bpf/bench.bpf.o");

/// The object a program is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Object {
    /// `tally.bpf.o`, what the agent loads.
    Tally,
    /// `bench.bpf.o`.
    Bench,
}

impl Object {
    fn file(self) -> &'static str {
        match self {
            Object::Tally => "tally.bpf.o",
            Object::Bench => "bench.bpf.o",
        }
    }
}

/// A `cgroup_skb` program this tool knows: its name, the hook it belongs on, its object.
type Known = (&'static str, CgroupSkbAttachType, Object);

const PROGRAMS: [Known; 4] = [
    ("net_egress", CgroupSkbAttachType::Egress, Object::Tally),
    ("net_ingress", CgroupSkbAttachType::Ingress, Object::Tally),
    ("bench_empty", CgroupSkbAttachType::Egress, Object::Bench),
    ("bench_counter", CgroupSkbAttachType::Egress, Object::Bench),
];

const USAGE: &str = "usage: bench_attach [--cgroup DIR] [--toggle] [--no-stats] PROGRAM...\n\
                     programs: net_egress net_ingress bench_empty bench_counter";

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_signal: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn main() {
    if let Err(e) = run() {
        eprintln!("bench_attach: {}", tally_error_chain::chain(e.as_ref()));
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let mut cgroup = PathBuf::from("/sys/fs/cgroup/unified");
    let mut wanted: Vec<Known> = Vec::new();
    let mut toggle = false;
    let mut with_stats = true;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--cgroup" => {
                cgroup = args
                    .next()
                    .ok_or_else(|| format!("--cgroup needs a directory\n{USAGE}"))?
                    .into();
            }
            "--toggle" => toggle = true,
            "--no-stats" => with_stats = false,
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            name => {
                let program = PROGRAMS
                    .iter()
                    .find(|(known, _, _)| *known == name)
                    .ok_or_else(|| format!("unknown program `{name}`\n{USAGE}"))?;
                if !wanted.iter().any(|(w, _, _)| *w == program.0) {
                    wanted.push(*program);
                }
            }
        }
    }
    if wanted.is_empty() {
        return Err(USAGE.into());
    }

    install_signal_handlers()?;
    let mut stats = if toggle || !with_stats {
        None
    } else {
        // Before loading: run times are only collected while stats are on.
        Some(StatsGuard::enable()?)
    };

    let started = Instant::now();
    let mut objects = Objects::load(&wanted)?;
    let dir = File::open(&cgroup).map_err(|e| format!("opening {}: {e}", cgroup.display()))?;
    for program in &wanted {
        let name = program.0;
        objects
            .cgroup_skb(program)?
            .load()
            .map_err(|e| format!("loading {name}: {e}"))?;
    }
    let mut links = if toggle {
        Vec::new()
    } else {
        attach(&mut objects, &wanted, &dir)?
    };
    eprintln!(
        "bench_attach: {} program(s) loaded{} at {} in {:.1} ms",
        wanted.len(),
        if toggle { "" } else { " and attached" },
        cgroup.display(),
        started.elapsed().as_secs_f64() * 1e3
    );

    let mut out = std::io::stdout().lock();
    writeln!(out, "ready")?;
    out.flush()?;

    if toggle {
        let mut commands = std::io::stdin().lock();
        let mut line = String::new();
        while !STOP.load(Ordering::SeqCst) {
            line.clear();
            match commands.read_line(&mut line) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(format!("reading a command: {e}").into()),
            }
            match line.trim() {
                "attach" if links.is_empty() => {
                    if with_stats {
                        stats = Some(StatsGuard::enable()?);
                    }
                    links = attach(&mut objects, &wanted, &dir)?;
                    writeln!(out, "attached")?;
                }
                "detach" if !links.is_empty() => {
                    detach(&mut objects, &mut links)?;
                    stats = None;
                    writeln!(out, "detached")?;
                }
                "attach" | "detach" => writeln!(out, "{}ed", line.trim())?,
                other => return Err(format!("unknown command `{other}`").into()),
            }
            out.flush()?;
        }
        detach(&mut objects, &mut links)?;
    } else {
        wait_for_stop()?;
    }

    for known in &wanted {
        let name = known.0;
        let stats = program_stats(name, objects.program(known)?)
            .ok_or_else(|| format!("no bpf_stats for `{name}`"))?;
        let avg = if stats.run_count == 0 {
            0.0
        } else {
            stats.run_time_ns as f64 / stats.run_count as f64
        };
        writeln!(
            out,
            "program={name} runs={} run_ns={} avg_ns={avg:.1}",
            stats.run_count, stats.run_time_ns
        )?;
    }
    out.flush()?;
    drop(stats);
    // Dropping the objects detaches the links and frees the programs and maps.
    drop(objects);
    Ok(())
}

/// The loaded objects; each only when a wanted program is in it.
struct Objects {
    tally: Option<Ebpf>,
    bench: Option<Ebpf>,
}

impl Objects {
    fn load(wanted: &[Known]) -> Result<Objects> {
        let load = |object: Object, data| -> Result<Option<Ebpf>> {
            if !wanted.iter().any(|(_, _, o)| *o == object) {
                return Ok(None);
            }
            let ebpf = EbpfLoader::new()
                .load(data)
                .map_err(|e| format!("loading {}: {e}", object.file()))?;
            Ok(Some(ebpf))
        };
        let mut tally = load(Object::Tally, TALLY_OBJECT)?;
        if let Some(ebpf) = &mut tally {
            fill_scopes(ebpf)?;
        }
        let bench = load(Object::Bench, BENCH_OBJECT)?;
        Ok(Objects { tally, bench })
    }

    fn program(&self, (name, _, object): &Known) -> Result<&aya::programs::Program> {
        let ebpf = match object {
            Object::Tally => self.tally.as_ref(),
            Object::Bench => self.bench.as_ref(),
        };
        Ok(ebpf
            .and_then(|ebpf| ebpf.program(name))
            .ok_or_else(|| format!("no program `{name}` loaded from {}", object.file()))?)
    }

    fn cgroup_skb(&mut self, (name, _, object): &Known) -> Result<&mut CgroupSkb> {
        let ebpf = match object {
            Object::Tally => self.tally.as_mut(),
            Object::Bench => self.bench.as_mut(),
        };
        Ok(ebpf
            .and_then(|ebpf| ebpf.program_mut(name))
            .ok_or_else(|| format!("no program `{name}` loaded from {}", object.file()))?
            .try_into()?)
    }
}

type Links = Vec<(Known, CgroupSkbLinkId)>;

/// Attaches every wanted (already loaded) program at `dir`, in order.
fn attach(objects: &mut Objects, wanted: &[Known], dir: &File) -> Result<Links> {
    let mut links = Vec::with_capacity(wanted.len());
    for known in wanted {
        let (name, attach_type, _) = *known;
        let link = objects
            .cgroup_skb(known)?
            .attach(dir, attach_type, attach_mode())
            .map_err(|e| format!("attaching {name}: {e}"))?;
        links.push((*known, link));
    }
    Ok(links)
}

/// Detaches what [`attach`] attached; the programs stay loaded.
fn detach(objects: &mut Objects, links: &mut Links) -> Result<()> {
    for (known, link) in links.drain(..) {
        let name = known.0;
        objects
            .cgroup_skb(&known)?
            .detach(link)
            .map_err(|e| format!("detaching {name}: {e}"))?;
    }
    Ok(())
}

/// The ranges the agent always installs: loopback is the node.
fn fill_scopes(ebpf: &mut Ebpf) -> Result<()> {
    let mut v4: LpmTrie<_, [u8; 4], u32> = LpmTrie::try_from(
        ebpf.map_mut("SCOPES_V4")
            .ok_or("no map SCOPES_V4 in the object")?,
    )?;
    v4.insert(&Key::new(8, [127, 0, 0, 0]), scope::NODE, 0)?;
    let mut v6: LpmTrie<_, [u8; 16], u32> = LpmTrie::try_from(
        ebpf.map_mut("SCOPES_V6")
            .ok_or("no map SCOPES_V6 in the object")?,
    )?;
    v6.insert(&Key::new(128, Ipv6Addr::LOCALHOST.octets()), scope::NODE, 0)?;
    Ok(())
}

/// As the agent does (`tally_ebpf::net`): from 5.7 aya attaches through `bpf_link_create`, whose
/// cgroup links always coexist and which refuses flags; before, `BPF_F_ALLOW_MULTI` is needed so
/// programs do not evict each other.
fn attach_mode() -> CgroupAttachMode {
    match aya::util::KernelVersion::current() {
        Ok(v) if v >= aya::util::KernelVersion::new(5, 7, 0) => CgroupAttachMode::Single,
        _ => CgroupAttachMode::AllowMultiple,
    }
}

/// SIGTERM and SIGINT set [`STOP`]; without `SA_RESTART`, so a blocked `read` returns `EINTR`.
fn install_signal_handlers() -> Result<()> {
    for signal in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: a zeroed `sigaction` is valid (empty mask, no flags); the handler only stores to
        // an atomic, which is async-signal-safe.
        let rc = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(format!("sigaction: {}", std::io::Error::last_os_error()).into());
        }
    }
    Ok(())
}

/// Reads stdin until EOF, or until a signal sets [`STOP`]. Polls with a timeout so a signal that
/// lands between the check and the wait is still seen.
fn wait_for_stop() -> Result<()> {
    let mut buf = [0u8; 4096];
    while !STOP.load(Ordering::SeqCst) {
        let mut pfd = libc::pollfd {
            fd: libc::STDIN_FILENO,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid `pollfd` for the duration of the call.
        let ready = unsafe { libc::poll(&mut pfd, 1, 200) };
        if ready == 0 {
            continue;
        }
        let n = if ready > 0 {
            // SAFETY: `buf` is valid for writes of its length for the duration of the call.
            unsafe { libc::read(libc::STDIN_FILENO, buf.as_mut_ptr().cast(), buf.len()) }
        } else {
            -1
        };
        if n == 0 {
            break;
        }
        if n < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() != std::io::ErrorKind::Interrupted {
                return Err(format!("waiting on stdin: {err}").into());
            }
        }
    }
    Ok(())
}
