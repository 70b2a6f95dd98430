//! What the C CO-RE sources (`tcp`, `disk`) share: loading by the best attach method the kernel
//! allows, falling back to the next, and reading their per-CPU, per-cgroup maps.
//!
//! Each object carries the same logic once per attach method (`ebpf/c/*.bpf.c`). An attempt loads
//! the object afresh (new maps), then loads and attaches only that method's programs; if any of
//! them fails, the attempt is dropped whole (links detached, maps freed) and the next method is
//! tried. Production kernels usually take the first; the development VMs refuse fentry (EPERM).

use aya::maps::{MapData, PerCpuArray, PerCpuHashMap, PerCpuValues};
use aya::programs::{BtfTracePoint, FEntry, FExit, KProbe, Program, RawTracePoint, TracePoint};
use aya::{Btf, Ebpf, EbpfLoader, Pod};
use tally_ebpf_common::LOST_SLOT;

use tally_error_chain::chain;

use crate::{Error, ProbeStatus, ProgramStats};

/// Where one program attaches.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Hook {
    /// Kernel function, entry (`fentry/…`).
    FEntry(&'static str),
    /// Kernel function, return (`fexit/…`).
    FExit(&'static str),
    /// Tracepoint with BTF-typed arguments (`tp_btf/…`).
    BtfTracePoint(&'static str),
    /// Raw tracepoint (`raw_tp/…`).
    RawTracePoint(&'static str),
    /// Tracepoint through perf (`tracepoint/<category>/<name>`).
    TracePoint(&'static str, &'static str),
    /// Kernel function through kprobes, entry (`kprobe/…`).
    KProbe(&'static str),
    /// Kernel function through kprobes, return (`kretprobe/…`).
    KRetProbe(&'static str),
}

/// One attach method: the programs it needs, all of which must load and attach.
#[derive(Debug)]
pub(crate) struct Method {
    /// One of [`crate::ATTACH_METHODS`].
    pub name: &'static str,
    pub programs: &'static [(&'static str, Hook)],
}

/// A BPF object and its methods, best first.
pub(crate) struct Source {
    /// `ProbeStatus::probe`.
    pub probe: &'static str,
    pub object_name: &'static str,
    pub object: &'static [u8],
    pub methods: &'static [Method],
}

impl Source {
    /// Loads and attaches the first method that works, skipping `disabled` ones. Sizes the maps
    /// named in `max_entries`. Returns the loaded object and its method with the status, or the
    /// status of total failure; the status's error lists every failed method, in order.
    pub(crate) fn load(
        &self,
        max_entries: &[(&'static str, u32)],
        disabled: &[String],
    ) -> (Option<(Ebpf, &'static Method)>, ProbeStatus) {
        let enabled: Vec<&'static Method> = self
            .methods
            .iter()
            .filter(|m| !disabled.iter().any(|d| d == m.name))
            .collect();
        let Some(best) = enabled.first() else {
            return (
                None,
                ProbeStatus {
                    probe: self.probe,
                    method: "none",
                    up: false,
                    error: Some("every attach method is disabled".to_owned()),
                },
            );
        };
        // Without the kernel's BTF nothing can be relocated, and an object compiled against
        // another kernel's layouts would read the wrong fields: every method is down.
        let btf = match Btf::from_sys_fs() {
            Ok(btf) => btf,
            Err(source) => {
                let status = ProbeStatus {
                    probe: self.probe,
                    method: best.name,
                    up: false,
                    error: Some(chain(&Error::KernelBtf { source })),
                };
                return (None, status);
            }
        };
        let mut failures = Vec::new();
        for method in enabled.iter().copied() {
            match self.attempt(method, &btf, max_entries) {
                Ok(ebpf) => {
                    let status = ProbeStatus {
                        probe: self.probe,
                        method: method.name,
                        up: true,
                        error: (!failures.is_empty()).then(|| failures.join("; ")),
                    };
                    return (Some((ebpf, method)), status);
                }
                Err(e) => {
                    let text = chain(&e);
                    tracing::debug!(
                        probe = self.probe,
                        method = method.name,
                        error = %text,
                        "attach method failed"
                    );
                    failures.push(format!("{}: {}", method.name, shorten(&text)));
                }
            }
        }
        let status = ProbeStatus {
            probe: self.probe,
            method: best.name,
            up: false,
            error: Some(failures.join("; ")),
        };
        (None, status)
    }

    fn attempt(
        &self,
        method: &Method,
        btf: &Btf,
        max_entries: &[(&'static str, u32)],
    ) -> Result<Ebpf, Error> {
        let mut loader = EbpfLoader::new();
        loader.btf(Some(btf));
        // Maps aya has no type for (the lifecycle programs' task storage) are still created;
        // only the programs use them.
        loader.allow_unsupported_maps();
        for (map, size) in max_entries {
            loader.map_max_entries(map, *size);
        }
        let mut ebpf = loader.load(self.object).map_err(|source| Error::Load {
            object: self.object_name,
            source,
        })?;
        for (name, hook) in method.programs {
            let program = ebpf.program_mut(name).ok_or(Error::MissingProgram {
                object: self.object_name,
                program: name,
            })?;
            attach(program, name, *hook, btf)?;
        }
        Ok(ebpf)
    }

    /// The kernel's statistics of the method's programs.
    pub(crate) fn program_stats(ebpf: &Ebpf, method: &Method) -> Vec<ProgramStats> {
        method
            .programs
            .iter()
            .filter_map(|(name, _)| crate::stats::program_stats(name, ebpf.program(name)?))
            .collect()
    }
}

fn attach(program: &mut Program, name: &'static str, hook: Hook, btf: &Btf) -> Result<(), Error> {
    let failed = |action: &'static str| {
        move |source| Error::Program {
            program: name,
            action,
            source,
        }
    };
    match hook {
        Hook::FEntry(function) => {
            let p: &mut FEntry = program.try_into().map_err(failed("not fentry"))?;
            p.load(function, btf).map_err(failed("loading"))?;
            p.attach().map_err(failed("attaching"))?;
        }
        Hook::FExit(function) => {
            let p: &mut FExit = program.try_into().map_err(failed("not fexit"))?;
            p.load(function, btf).map_err(failed("loading"))?;
            p.attach().map_err(failed("attaching"))?;
        }
        Hook::BtfTracePoint(tracepoint) => {
            let p: &mut BtfTracePoint = program.try_into().map_err(failed("not tp_btf"))?;
            p.load(tracepoint, btf).map_err(failed("loading"))?;
            p.attach().map_err(failed("attaching"))?;
        }
        Hook::RawTracePoint(tracepoint) => {
            let p: &mut RawTracePoint = program.try_into().map_err(failed("not raw_tp"))?;
            p.load().map_err(failed("loading"))?;
            p.attach(tracepoint).map_err(failed("attaching"))?;
        }
        Hook::TracePoint(category, tracepoint) => {
            let p: &mut TracePoint = program.try_into().map_err(failed("not tracepoint"))?;
            p.load().map_err(failed("loading"))?;
            p.attach(category, tracepoint)
                .map_err(failed("attaching"))?;
        }
        Hook::KProbe(function) | Hook::KRetProbe(function) => {
            // The section (`kprobe/` or `kretprobe/`) made the program entry or return.
            let p: &mut KProbe = program.try_into().map_err(failed("not kprobe"))?;
            p.load().map_err(failed("loading"))?;
            p.attach(function, 0).map_err(failed("attaching"))?;
        }
    }
    Ok(())
}

/// An error chain short enough for a status line: a verifier log keeps only its last lines,
/// which say what it refused (the whole log is in the debug log).
fn shorten(text: &str) -> String {
    const LIMIT: usize = 600;
    if text.len() <= LIMIT {
        return text.to_owned();
    }
    let mut start = text.len() - LIMIT;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    format!("…{}", &text[start..])
}

/// Takes a map out of `ebpf` as `T`.
/// A loaded per-cgroup counter source: its programs (attached with one method), its stats map
/// keyed by cgroup id and its lost-update counter. Dropping it detaches everything; nothing is
/// pinned.
pub(crate) struct Counters<V: Pod> {
    ebpf: Ebpf,
    method: &'static Method,
    source: &'static Source,
    stats_name: &'static str,
    lost_name: &'static str,
    stats: PerCpuHashMap<MapData, u64, V>,
    lost: PerCpuArray<MapData, u64>,
}

impl<V: Pod + Default> Counters<V> {
    /// Loads `source` with its best method (see [`Source::load`]) and takes its two maps.
    pub(crate) fn load(
        source: &'static Source,
        (stats_name, lost_name): (&'static str, &'static str),
        max_entries: u32,
        disabled: &[String],
    ) -> (Option<Self>, ProbeStatus) {
        let (loaded, mut status) = source.load(&[(stats_name, max_entries)], disabled);
        let Some((mut ebpf, method)) = loaded else {
            return (None, status);
        };
        let maps = take_map(&mut ebpf, source.object_name, stats_name)
            .and_then(|stats| Ok((stats, take_map(&mut ebpf, source.object_name, lost_name)?)));
        match maps {
            Ok((stats, lost)) => (
                Some(Counters {
                    ebpf,
                    method,
                    source,
                    stats_name,
                    lost_name,
                    stats,
                    lost,
                }),
                status,
            ),
            Err(e) => {
                status.up = false;
                status.error = Some(chain(&e));
                (None, status)
            }
        }
    }

    pub(crate) fn method(&self) -> &'static str {
        self.method.name
    }

    /// Every cgroup's counters, summed over CPUs with `add`.
    pub(crate) fn read(&self, add: impl Fn(&mut V, &V)) -> Result<Vec<(u64, V)>, Error> {
        read_summed(&self.stats, self.stats_name, add)
    }

    pub(crate) fn remove(&mut self, cgroup_ids: &[u64]) -> Result<(), Error> {
        remove_keys(&mut self.stats, self.stats_name, cgroup_ids)
    }

    pub(crate) fn lost(&self) -> Result<u64, Error> {
        read_lost(&self.lost, self.lost_name)
    }

    pub(crate) fn program_stats(&self) -> Vec<ProgramStats> {
        Source::program_stats(&self.ebpf, self.method)
    }
}

impl<V: Pod> std::fmt::Debug for Counters<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Counters")
            .field("object", &self.source.object_name)
            .field("method", &self.method.name)
            .finish_non_exhaustive()
    }
}

pub(crate) fn take_map<T>(
    ebpf: &mut Ebpf,
    object: &'static str,
    name: &'static str,
) -> Result<T, Error>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or(Error::MissingMap { object, map: name })?;
    T::try_from(map).map_err(|source| Error::Map {
        map: name,
        action: "unexpected type",
        source,
    })
}

/// Every entry of a per-CPU map keyed by cgroup id, summed over CPUs with `add`.
pub(crate) fn read_summed<K: Pod, V: Pod + Default>(
    map: &PerCpuHashMap<MapData, K, V>,
    name: &'static str,
    add: impl Fn(&mut V, &V),
) -> Result<Vec<(K, V)>, Error> {
    let mut out = Vec::new();
    for item in map.iter() {
        let (cgroup_id, per_cpu): (K, PerCpuValues<V>) = item.map_err(|source| Error::Map {
            map: name,
            action: "reading",
            source,
        })?;
        let mut sum = V::default();
        for v in per_cpu.iter() {
            add(&mut sum, v);
        }
        out.push((cgroup_id, sum));
    }
    Ok(out)
}

/// Deletes the entries of `cgroup_ids` (absent ones are fine).
pub(crate) fn remove_keys<K: Pod, V: Pod>(
    map: &mut PerCpuHashMap<MapData, K, V>,
    name: &'static str,
    cgroup_ids: &[K],
) -> Result<(), Error> {
    for id in cgroup_ids {
        match map.remove(id) {
            Ok(()) => {}
            // aya reports a missing key as the syscall's ENOENT.
            Err(aya::maps::MapError::SyscallError(e))
                if e.io_error.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(Error::Map {
                    map: name,
                    action: "deleting a removed cgroup's entry",
                    source,
                })
            }
        }
    }
    Ok(())
}

/// The per-CPU lost-update counter, summed.
pub(crate) fn read_lost(map: &PerCpuArray<MapData, u64>, name: &'static str) -> Result<u64, Error> {
    let per_cpu = map.get(&LOST_SLOT, 0).map_err(|source| Error::Map {
        map: name,
        action: "reading",
        source,
    })?;
    Ok(per_cpu.iter().copied().fold(0u64, u64::wrapping_add))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn contains(object: &[u8], text: &str) -> bool {
        object
            .windows(text.len())
            .any(|window| window == text.as_bytes())
    }

    /// What a source's table promises about its object, checked without loading it (no root):
    /// every program exists under its ELF section for its hook, and the methods are named and
    /// ordered as `ATTACH_METHODS`.
    pub(crate) fn assert_table_matches_object(source: &Source) {
        assert_eq!(&source.object[..4], b"\x7fELF");
        let mut last = 0;
        for method in source.methods {
            let rank = crate::ATTACH_METHODS
                .iter()
                .position(|m| *m == method.name)
                .unwrap_or_else(|| panic!("unknown method {}", method.name));
            assert!(rank >= last, "{} is out of order", method.name);
            last = rank;
            for (program, hook) in method.programs {
                let section = match hook {
                    Hook::FEntry(f) => format!("fentry/{f}"),
                    Hook::FExit(f) => format!("fexit/{f}"),
                    Hook::BtfTracePoint(tp) => format!("tp_btf/{tp}"),
                    Hook::RawTracePoint(tp) => format!("raw_tp/{tp}"),
                    Hook::TracePoint(category, name) => format!("tracepoint/{category}/{name}"),
                    Hook::KProbe(f) => format!("kprobe/{f}"),
                    Hook::KRetProbe(f) => format!("kretprobe/{f}"),
                };
                assert!(contains(source.object, program), "no program {program}");
                assert!(contains(source.object, &section), "no section {section}");
            }
        }
    }

    #[test]
    fn status_lines_keep_the_end_of_long_errors() {
        assert_eq!(shorten("short"), "short");
        let long = format!("{}the verifier's verdict", "x".repeat(2000));
        let short = shorten(&long);
        assert!(short.len() < 700);
        assert!(short.ends_with("the verifier's verdict"));
        assert!(short.starts_with('…'));
    }
}
