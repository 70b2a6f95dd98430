//! Workloads that live and die between two walks: learnt of from the kernel's cgroup mkdir and
//! rmdir records, and billed the CPU time their tasks used, counted as each task ended.
//!
//! A cgroup made and removed between two walks is never listed. Its creation record carries its
//! id and path, so it still resolves to a workload after its directory is gone; it gets a row,
//! exited from the start, and every per-cgroup-id counter (network, TCP, disk) recorded under
//! its id lands there, as if a tick had seen it.
//!
//! CPU time has no such counter while a cgroup lives: the collector reads it from the cgroup's
//! files each tick, and a gone cgroup has none. What its tasks used is counted as they end
//! (`EXIT_CPU`), and a workload that is no longer listed has its CPU counter raised to that sum
//! where it is higher than the last reading. The sum is complete for a cgroup born after the
//! agent started (every task that ran in it has ended before it could be removed), so the two
//! never add up: the figure is the larger of two counts of the same time.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use tally_ebpf::lifecycle::{Lifecycle, LifecycleLost};
use tally_error_chain::chain;
use tally_exporters::Family;

use super::keys::KEYS;
use super::{Owner, Owners, COLLECTOR};
use crate::catalogue::agent;
use crate::errors::ErrorCounts;
use crate::host::path::{self, PathIdentity};
use crate::host::Discovery;
use crate::identity::{Identity, Workload};
use crate::ledger::Ledger;

/// Ticks a gone cgroup's id stays known after it went: a socket can outlive its cgroup and still
/// send, and a task's last CPU is counted when it is freed, after it was reaped, which for an
/// orphan is whenever init gets to it.
pub(super) const LATE_TICKS: u32 = 30;

/// Ticks a made cgroup waits to be listed by a walk or removed; one that is neither by then is
/// somewhere the walk does not look, and its record is dropped.
const MADE_TICKS: u64 = 3;

/// Workloads of cgroups that lived and died between walks, by id, with ticks since they went.
pub(super) type Gone = HashMap<u64, (Owner, u32)>;

/// What the agent keeps of the lifecycle programs between ticks.
#[derive(Debug)]
pub(super) struct Churn {
    source: Lifecycle,
    /// Where the walked hierarchy's root is in the whole cgroup v2 hierarchy (`/` for all of it):
    /// the records name every cgroup of the node by its path from the real root, and only those
    /// below this one are the agent's, relative to it. `None` where that is not known (a mount
    /// of a subtree seen from another cgroup namespace): every record is taken as it comes.
    within: Option<String>,
    tick: u64,
    /// Cgroups made that no walk has listed yet, by id: their path (`None`: unreadable) and the
    /// tick their record came in.
    made: HashMap<u64, (Option<String>, u64)>,
    /// `EXIT_CPU` entries, by id.
    exits: Exits,
    /// Gone between walks with a path the kernel could not copy (too long).
    path_unreadable: u64,
    lost: LifecycleLost,
}

/// The path of `dir` (canonical) in the whole cgroup v2 hierarchy, from the cgroup2 mount that
/// holds it in `mountinfo` (`/proc/self/mountinfo`): the mount's root there, joined with `dir`'s
/// place below the mount point. `None` without such a mount, or where the mount's root is not a
/// plain path (`/../..` from inside another cgroup namespace).
fn hierarchy_path(dir: &Path, mountinfo: &str) -> Option<String> {
    let dir = dir.to_str()?;
    let mut best: Option<(&str, &str)> = None;
    for line in mountinfo.lines() {
        let (mount, fs) = line.split_once(" - ")?;
        if fs.split_whitespace().next() != Some("cgroup2") {
            continue;
        }
        let mut fields = mount.split_whitespace().skip(3);
        let (root, point) = (fields.next()?, fields.next()?);
        let below = point == "/" || dir == point || dir.starts_with(&format!("{point}/"));
        if below && best.is_none_or(|(_, p)| point.len() > p.len()) {
            best = Some((root, point));
        }
    }
    let (root, point) = best?;
    if !root.starts_with('/') || root.split('/').any(|c| c == "..") {
        return None;
    }
    let rest = dir[point.len()..].trim_start_matches('/');
    let joined = format!("{}/{rest}", root.trim_end_matches('/'));
    Some(if joined.len() > 1 {
        joined.trim_end_matches('/').to_owned()
    } else {
        "/".to_owned()
    })
}

/// `path` relative to `within` (both from the hierarchy's root), starting with `/`; `None` when
/// it is not below it.
fn relative_to(path: &str, within: &str) -> Option<String> {
    if within == "/" {
        return Some(path.to_owned());
    }
    let rest = path.strip_prefix(within)?;
    (rest.is_empty() || rest.starts_with('/')).then(|| format!("/{}", rest.trim_start_matches('/')))
}

/// The `EXIT_CPU` entries the agent follows, by id.
#[derive(Debug, Default)]
struct Exits(HashMap<u64, Exit>);

impl Exits {
    /// Takes this tick's cumulative figures. An id whose owner is not decided yet is looked up
    /// (`known`); it is decided once known or `listed`. An id that is not `present` (listed, or
    /// made and not removed) counts a tick gone; gone while its workload is `live`, it is
    /// forgotten by that workload (a cgroup below it, or an earlier cgroup of it: its time is in
    /// the workload's own reading). An id counted before the walk that first lists it is present
    /// all along, never gone.
    fn update(
        &mut self,
        entries: impl IntoIterator<Item = (u64, u64)>,
        present: impl Fn(u64) -> bool,
        listed: impl Fn(u64) -> bool,
        known: impl Fn(u64) -> Option<Owner>,
        live: &HashSet<&PathIdentity>,
    ) {
        for (id, cpu_ns) in entries {
            let exit = self.0.entry(id).or_insert_with(|| Exit {
                owner: None,
                settled: false,
                cpu_ns: 0,
                gone_ticks: 0,
            });
            if !exit.settled {
                exit.owner = known(id);
                tracing::trace!(
                    id,
                    owner = ?exit.owner.as_ref().map(|o| (&o.workload.identity, o.cgroup)),
                    cpu_ns,
                    "ended tasks' CPU of a cgroup"
                );
                exit.settled = exit.owner.is_some() || listed(id);
            }
            exit.cpu_ns = cpu_ns;
        }
        for (id, exit) in &mut self.0 {
            if present(*id) {
                exit.gone_ticks = 0;
                continue;
            }
            exit.gone_ticks += 1;
            let live_again = exit
                .owner
                .as_ref()
                .is_some_and(|owner| live.contains(&owner.workload.identity));
            if live_again {
                exit.owner = None;
            }
        }
    }

    /// For every workload that is not `live`, and each cgroup of it: what its ended tasks used
    /// there and below, in nanoseconds.
    fn gone_workloads(&self, live: &HashSet<&PathIdentity>) -> Vec<(Arc<Workload>, u64, u64)> {
        let mut sums: HashMap<(&PathIdentity, u64), (&Arc<Workload>, u64)> = HashMap::new();
        for exit in self.0.values() {
            let Some(owner) = &exit.owner else { continue };
            let workload = &owner.workload;
            if !live.contains(&workload.identity) {
                let key = (&workload.identity, owner.cgroup);
                sums.entry(key).or_insert((workload, 0)).1 += exit.cpu_ns;
            }
        }
        sums.into_iter()
            .map(|((_, cgroup), (workload, ns))| (workload.clone(), cgroup, ns))
            .collect()
    }

    /// Ids gone for more than [`LATE_TICKS`].
    fn expired(&self) -> Vec<u64> {
        let old = self
            .0
            .iter()
            .filter(|(_, exit)| exit.gone_ticks > LATE_TICKS);
        old.map(|(id, _)| *id).collect()
    }

    fn forget(&mut self, ids: &[u64]) {
        for id in ids {
            self.0.remove(id);
        }
    }
}

#[derive(Debug)]
struct Exit {
    /// The workload the id belongs to; `None` for the host, while unknown, and once the workload
    /// is live again after the id went (a new cgroup of the same workload).
    owner: Option<Owner>,
    /// Whether `owner` is decided. An id can be counted before its cgroup's records are read
    /// (made after the walk, its task freed before the removal's record came): it is looked up
    /// again each tick until it is known or listed.
    settled: bool,
    cpu_ns: u64,
    /// Ticks since the id's cgroup was last listed or known to exist (0 while it is).
    gone_ticks: u32,
}

impl Churn {
    /// `unified` is the cgroup v2 hierarchy the agent walks (`paths.cgroup_root`'s).
    pub(super) fn new(source: Lifecycle, unified: Option<&Path>) -> Churn {
        let within = unified.and_then(|u| {
            let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
            hierarchy_path(&std::fs::canonicalize(u).ok()?, &mountinfo)
        });
        Churn {
            source,
            within,
            tick: 0,
            made: HashMap::new(),
            exits: Exits::default(),
            path_unreadable: 0,
            lost: LifecycleLost::default(),
        }
    }

    pub(super) fn source(&self) -> &Lifecycle {
        &self.source
    }

    /// Cgroups made since the last walk that are neither listed nor removed yet.
    pub(super) fn pending(&self) -> HashSet<u64> {
        self.made.keys().copied().collect()
    }

    /// Reads the cgroup records since the last tick. Every cgroup that was made and removed
    /// without a walk listing it, and whose path names a workload, gets that workload's row and
    /// joins `gone` (by id: the workload, and ticks since it went; the caller keeps it
    /// [`LATE_TICKS`] so late counts under the id are still its). Run after the walk, before the
    /// per-cgroup-id maps are read.
    pub(super) fn learn(
        &mut self,
        gone: &mut Gone,
        discovery: &Discovery,
        identity: &mut Identity,
        ledger: &mut Ledger,
        errors: &mut ErrorCounts,
    ) {
        self.tick += 1;
        let (changes, bad) = self.source.drain();
        if bad > 0 {
            errors.record(COLLECTOR, "event", || {
                format!("{bad} cgroup records of an unexpected size")
            });
        }
        let mut vanished = Vec::new();
        for mut change in changes {
            let id = change.cgroup_id;
            if let (Some(within), Some(path)) = (&self.within, &change.path) {
                match relative_to(path, within) {
                    Some(rel) => change.path = Some(rel),
                    // Another part of the node than the one walked.
                    None => continue,
                }
            }
            tracing::trace!(
                ?change,
                listed = discovery.v2_ids.contains_key(&id),
                "cgroup record"
            );
            if discovery.v2_ids.contains_key(&id) {
                continue;
            }
            if change.made {
                // Only a workload's cgroup (or one below it) is worth waiting for.
                let names_workload = change
                    .path
                    .as_deref()
                    .is_none_or(|p| path::resolve(p).0 != PathIdentity::Host);
                if names_workload {
                    self.made.insert(id, (change.path, self.tick));
                }
                continue;
            }
            match self.made.remove(&id) {
                Some((Some(path), _)) => vanished.push((id, path)),
                Some((None, _)) => self.path_unreadable += 1,
                // Made before the agent started, or listed by a walk: not churn.
                None => {}
            }
        }
        // A workload's own cgroup first, so the cgroups below it know which cgroup of the
        // workload they were in.
        if vanished.is_empty() {
            return self.expire_made(discovery);
        }
        let listed: HashSet<&PathIdentity> = discovery.found.iter().map(|f| &f.identity).collect();
        let mut own: HashMap<String, u64> = HashMap::new();
        let mut below = Vec::new();
        for (id, path) in vanished {
            let (who, end) = path::resolve(&path);
            if end == path.len() && !listed.contains(&who) {
                let workload = identity.workload(id, who);
                // Made now, exited at this tick's end: the row shows even if nothing was
                // counted under the cgroup, and counts from zero if the workload had an
                // earlier cgroup.
                ledger.born(&workload, id);
                gone.insert(
                    id,
                    (
                        Owner {
                            workload,
                            cgroup: id,
                        },
                        0,
                    ),
                );
                own.insert(path, id);
            } else {
                below.push((id, path, who, end));
            }
        }
        for (id, path, who, end) in below {
            let rel = &path[..end];
            let cgroup = own.get(rel).copied().or_else(|| {
                let found = discovery.found.iter().find(|f| f.rel == rel)?;
                Some(found.cgroup_id)
            });
            let workload = identity.workload(id, who);
            ledger.row(&workload);
            let owner = Owner {
                workload,
                cgroup: cgroup.unwrap_or(0),
            };
            gone.insert(id, (owner, 0));
        }
        self.expire_made(discovery);
    }

    /// Forgets made cgroups a walk has listed, and those waited for long enough.
    fn expire_made(&mut self, discovery: &Discovery) {
        let tick = self.tick;
        self.made
            .retain(|id, (_, at)| !discovery.v2_ids.contains_key(id) && tick - *at <= MADE_TICKS);
    }

    /// Reads what ended tasks used and raises the CPU counter of every workload that is no longer
    /// listed to the sum over its cgroups, where that is higher. Deletes entries of cgroups gone
    /// for [`LATE_TICKS`]. `live` holds the workloads listed this tick.
    pub(super) fn bill_exits(
        &mut self,
        discovery: &Discovery,
        live: &HashSet<&PathIdentity>,
        owners: &mut Owners<'_>,
        ledger: &mut Ledger,
        errors: &mut ErrorCounts,
    ) {
        match self.source.exit_cpu() {
            Ok(entries) => {
                let present =
                    |id: u64| discovery.v2_ids.contains_key(&id) || self.made.contains_key(&id);
                let listed = |id: u64| discovery.v2_ids.contains_key(&id);
                let entries = entries.into_iter().map(|(id, v)| (id, v.cpu_ns));
                self.exits
                    .update(entries, present, listed, |id| owners.known(id), live);
            }
            Err(e) => errors.record(COLLECTOR, "map", || chain(&e)),
        }
        for (workload, cgroup, ns) in self.exits.gone_workloads(live) {
            // An earlier cgroup of a workload whose row has moved on to a later one is not
            // billed again.
            let current = ledger.cgroup_of(&workload.identity);
            if cgroup == 0 || current == Some(cgroup) {
                ledger.row(&workload).raise(&KEYS.cpu, ns as f64 / 1e9);
            }
        }
        let expired = self.exits.expired();
        if expired.is_empty() {
            return;
        }
        match self.source.remove(&expired) {
            Ok(()) => self.exits.forget(&expired),
            Err(e) => errors.record(COLLECTOR, "map", || chain(&e)),
        }
    }

    /// Reads the programs' drop counters.
    pub(super) fn read_lost(&mut self, errors: &mut ErrorCounts) -> u64 {
        match self.source.lost() {
            Ok(lost) => self.lost = lost,
            Err(e) => errors.record(COLLECTOR, "map", || chain(&e)),
        }
        self.lost.charges
    }

    /// `tally_workloads_missed_total`.
    pub(super) fn missed(&self) -> Family {
        let mut missed = Family::new(&agent::WORKLOADS_MISSED);
        for (reason, n) in [
            ("event_lost", self.lost.events),
            ("path_unreadable", self.path_unreadable),
        ] {
            missed.push_labeled(vec![("reason", Arc::from(reason))], n as f64);
        }
        missed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Names;

    fn owner(name: &str, cgroup: u64) -> Owner {
        let identity = PathIdentity::Unit(name.to_owned());
        let workload = Arc::new(Workload::new(identity, Names::default()));
        Owner { workload, cgroup }
    }

    /// A cgroup made after a walk, whose first tasks ended before the next walk listed it, is
    /// still its workload's when the workload goes. (Counting that first tick as gone, and
    /// never resetting it, once dropped such an id's owner when the next walk listed it live.)
    #[test]
    fn an_id_counted_before_its_first_listing_stays_its_workloads() {
        let w = owner("job.service", 7);
        let mut exits = Exits::default();
        let nobody = HashSet::new();
        // Tick 1: made since the walk (present), not listed, owner not known yet.
        exits.update([(7, 1_000_000)], |_| true, |_| false, |_| None, &nobody);
        assert!(exits.gone_workloads(&nobody).is_empty());
        // Tick 2: listed, live.
        let live: HashSet<&PathIdentity> = [&w.workload.identity].into_iter().collect();
        let known = |_| Some(w.clone());
        exits.update([(7, 3_000_000)], |_| true, |_| true, known, &live);
        assert!(exits.gone_workloads(&live).is_empty());
        // Tick 3: gone, with everything its tasks used.
        exits.update([(7, 9_000_000)], |_| false, |_| false, known, &nobody);
        let gone = exits.gone_workloads(&nobody);
        assert_eq!(gone.len(), 1);
        assert_eq!((gone[0].1, gone[0].2), (7, 9_000_000));
        assert_eq!(gone[0].0.identity, w.workload.identity);
    }

    #[test]
    fn records_are_taken_relative_to_the_walked_root_and_others_left_out() {
        let mountinfo = "\
24 1 0:22 / /sys/fs/cgroup rw - tmpfs tmpfs rw
30 24 0:26 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw
31 24 0:27 / /sys/fs/cgroup/cpuacct rw - cgroup cgroup rw,cpuacct
";
        let at = |dir: &str| hierarchy_path(Path::new(dir), mountinfo);
        assert_eq!(at("/sys/fs/cgroup/unified").as_deref(), Some("/"));
        assert_eq!(at("/sys/fs/cgroup/unified/t-1").as_deref(), Some("/t-1"));
        assert_eq!(at("/sys/fs/cgroup/unifiedx"), None);
        assert_eq!(at("/sys/fs/cgroup/cpuacct"), None);
        let in_namespace = "30 24 0:26 /../.. /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            hierarchy_path(Path::new("/sys/fs/cgroup"), in_namespace),
            None
        );
        let bind = "30 24 0:26 /kubepods.slice /host/cgroup rw - cgroup2 cgroup2 rw\n";
        let sub = hierarchy_path(Path::new("/host/cgroup/a"), bind);
        assert_eq!(sub.as_deref(), Some("/kubepods.slice/a"));

        assert_eq!(
            relative_to("/system.slice/a.service", "/").as_deref(),
            Some("/system.slice/a.service")
        );
        assert_eq!(
            relative_to("/t-1/system.slice/a.service", "/t-1").as_deref(),
            Some("/system.slice/a.service")
        );
        assert_eq!(relative_to("/t-10/a.service", "/t-1"), None);
        assert_eq!(relative_to("/system.slice/a.service", "/t-1"), None);
    }

    #[test]
    fn a_child_gone_under_a_live_workload_is_dropped_and_ids_expire() {
        let w = owner("svc.service", 1);
        let live: HashSet<&PathIdentity> = [&w.workload.identity].into_iter().collect();
        let mut exits = Exits::default();
        let known = |_| Some(w.clone());
        exits.update([(2, 5)], |id| id != 2, |id| id != 2, known, &live);
        // The child is gone while its workload lives: its time is in the workload's reading,
        // and stays out once the workload goes too.
        exits.update([], |_| false, |_| false, known, &HashSet::new());
        assert!(exits.gone_workloads(&HashSet::new()).is_empty());
        for _ in 1..LATE_TICKS {
            assert!(exits.expired().is_empty());
            exits.update([], |_| false, |_| false, known, &live);
        }
        assert_eq!(exits.expired(), vec![2]);
        exits.forget(&[2]);
        assert!(exits.0.is_empty());
    }
}
