//! Egress rate: a token bucket per cgroup (and scope) in the `cgroup_skb` egress program's map,
//! which this actuator owns once the network programs hand it over.

use std::collections::{HashMap, HashSet};

use tally_ebpf::throttle::EgressLimits;
use tally_ebpf_common::MAX_LIMIT_LEVEL;

use super::{Actuator, ActuatorError, Plan, Site};
use crate::budget::state::{Egress, Throttle};

/// Burst of a network throttle: this many seconds of its rate. A TCP sender whose every
/// segment was dropped waits for its probe timer (200 ms at least) before it sends again, so a
/// bucket holding less than that starves it well below the rate.
const BURST_SECS: f64 = 0.25;
/// Smallest burst: a few full-size packets, or nothing gets through.
const MIN_BURST: f64 = 64.0 * 1024.0;

/// The BPF map egress limits are set in: the seam unit tests replace.
pub trait EgressMap: std::fmt::Debug + Send {
    fn set(
        &mut self,
        cgroup_id: u64,
        level: u32,
        scope: Option<u32>,
        bytes_per_sec: u64,
        burst_bytes: u64,
    ) -> Result<(), tally_ebpf::Error>;
    fn clear(&mut self, cgroup_id: u64, scope: Option<u32>) -> Result<(), tally_ebpf::Error>;
    /// Packets dropped over a limit since load, per cgroup id.
    fn dropped_packets(&self) -> Result<HashMap<u64, u64>, tally_ebpf::Error>;
}

impl EgressMap for EgressLimits {
    fn set(
        &mut self,
        cgroup_id: u64,
        level: u32,
        scope: Option<u32>,
        bytes_per_sec: u64,
        burst_bytes: u64,
    ) -> Result<(), tally_ebpf::Error> {
        EgressLimits::set(self, cgroup_id, level, scope, bytes_per_sec, burst_bytes)
    }

    fn clear(&mut self, cgroup_id: u64, scope: Option<u32>) -> Result<(), tally_ebpf::Error> {
        EgressLimits::clear(self, cgroup_id, scope)
    }

    fn dropped_packets(&self) -> Result<HashMap<u64, u64>, tally_ebpf::Error> {
        Ok(self
            .drops()?
            .into_iter()
            .map(|(id, packets, _)| (id, packets))
            .collect())
    }
}

#[derive(Debug, Default)]
pub(super) struct EgressLimit {
    /// `None` where the network programs did not load.
    map: Option<Box<dyn EgressMap>>,
    /// Dropped packets per cgroup id, as read at the last refresh.
    drops: HashMap<u64, u64>,
    /// The limits this process put in the map. The map is the network programs' and starts
    /// empty with them, so a throttle a restart adopted from the state file is not in it.
    in_map: HashSet<(u64, Option<u32>)>,
}

impl EgressLimit {
    pub(super) fn set_map(&mut self, map: Box<dyn EgressMap>) {
        self.map = Some(map);
    }
}

impl Actuator for EgressLimit {
    fn plan(&self, site: Site<'_>, _: f64) -> Result<Plan, ActuatorError> {
        let cgroup_id = site.v2_id.ok_or(ActuatorError::NoCgroup2)?;
        if self.map.is_none() {
            return Err(ActuatorError::NoNetworkPrograms);
        }
        // The cgroup2 hierarchy's level: the root is 0, `/system.slice` 1. Paths are below the
        // hierarchy's root as mounted at `paths.cgroup_root`, which must be the host's root (as
        // it is for a DaemonSet mounting the host's /sys/fs/cgroup) for the level to be the
        // kernel's.
        let level = site.rel.split('/').filter(|c| !c.is_empty()).count();
        if level > MAX_LIMIT_LEVEL as usize {
            return Err(ActuatorError::TooDeep(level));
        }
        Ok(Plan {
            egress: Some(Egress {
                cgroup_id,
                level: Some(level as u32),
                scope: site.scope,
            }),
            ..Plan::default()
        })
    }

    fn apply(
        &mut self,
        t: &Throttle,
        setting: f64,
        _: Option<Site<'_>>,
    ) -> Result<(), ActuatorError> {
        let (Some(e), Some(map)) = (t.egress, &mut self.map) else {
            return Err(ActuatorError::NoNetworkPrograms);
        };
        let level = e.level.ok_or(ActuatorError::NoCgroupLevel)?;
        let rate = setting.max(1.0);
        let burst = (rate * BURST_SECS).max(MIN_BURST);
        map.set(e.cgroup_id, level, e.scope, rate as u64, burst as u64)?;
        self.in_map.insert((e.cgroup_id, e.scope));
        Ok(())
    }

    fn needs_reapply(&self, t: &Throttle, _setting: f64) -> bool {
        let in_map = |e: Egress| self.in_map.contains(&(e.cgroup_id, e.scope));
        self.map.is_some() && t.egress.is_some_and(|e| !in_map(e))
    }

    fn release(&mut self, t: &Throttle) -> Result<(), ActuatorError> {
        match (t.egress, &mut self.map) {
            (Some(e), Some(map)) => {
                map.clear(e.cgroup_id, e.scope)?;
                self.in_map.remove(&(e.cgroup_id, e.scope));
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn refresh(&mut self) {
        self.drops = self
            .map
            .as_ref()
            .and_then(|m| m.dropped_packets().ok())
            .unwrap_or_default();
    }

    fn held_back(&self, t: &Throttle) -> Option<u64> {
        t.egress.and_then(|e| self.drops.get(&e.cgroup_id).copied())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::budget::actuator::CgroupDirs;
    use crate::config::policy::Action;

    /// Limits set, by (cgroup id, scope): (level, rate, burst), shared with the test after the
    /// actuator took the map.
    type Limits = Arc<Mutex<BTreeMap<(u64, Option<u32>), (u32, u64, u64)>>>;

    #[derive(Debug, Default)]
    struct FakeMap {
        limits: Limits,
        drops: HashMap<u64, u64>,
    }

    impl EgressMap for FakeMap {
        fn set(
            &mut self,
            id: u64,
            level: u32,
            scope: Option<u32>,
            rate: u64,
            burst: u64,
        ) -> Result<(), tally_ebpf::Error> {
            self.limits
                .lock()
                .unwrap()
                .insert((id, scope), (level, rate, burst));
            Ok(())
        }

        fn clear(&mut self, id: u64, scope: Option<u32>) -> Result<(), tally_ebpf::Error> {
            self.limits.lock().unwrap().remove(&(id, scope));
            Ok(())
        }

        fn dropped_packets(&self) -> Result<HashMap<u64, u64>, tally_ebpf::Error> {
            Ok(self.drops.clone())
        }
    }

    fn throttle(plan: Plan, setting: f64) -> Throttle {
        Throttle {
            budget: "b".into(),
            subject: "unit:a.service".into(),
            action: Action::Network,
            setting,
            writes: plan.writes,
            freeze: plan.freeze,
            egress: plan.egress,
            applied_at: 0.0,
        }
    }

    #[test]
    fn limits_go_into_the_map_it_owns_with_a_tcp_sized_burst() {
        let dirs = CgroupDirs {
            unified: None,
            cpu: None,
            blkio: None,
            freezer: None,
        };
        let site = |v2_id| Site {
            dirs: &dirs,
            rel: "/kubepods.slice/kubepods-pod1.slice/cri-containerd-1.scope",
            v2_id,
            scope: Some(2),
        };
        let mut egress = EgressLimit::default();
        let err = egress.plan(site(Some(7)), 1e7).unwrap_err();
        assert!(matches!(err, ActuatorError::NoNetworkPrograms), "{err}");

        let limits = Limits::default();
        egress.set_map(Box::new(FakeMap {
            limits: limits.clone(),
            drops: HashMap::from([(7, 40)]),
        }));
        let err = egress.plan(site(None), 1e7).unwrap_err();
        assert!(matches!(err, ActuatorError::NoCgroup2), "{err}");
        let t = throttle(egress.plan(site(Some(7)), 1e7).unwrap(), 1e7);
        // A record this process did not apply (adopted from the state file after a restart)
        // is not in the map yet.
        assert!(egress.needs_reapply(&t, 1e7));
        egress.apply(&t, 1e7, Some(site(Some(7)))).unwrap();
        assert!(!egress.needs_reapply(&t, 1e7));
        assert_eq!(
            *limits.lock().unwrap(),
            BTreeMap::from([((7, Some(2)), (3, 10_000_000, 2_500_000))])
        );
        // A slow limit still gets a bucket of a few full-size packets.
        egress.apply(&t, 1000.0, None).unwrap();
        assert_eq!(limits.lock().unwrap()[&(7, Some(2))], (3, 1000, 65_536));

        assert_eq!(egress.held_back(&t), None, "nothing read before a refresh");
        egress.refresh();
        assert_eq!(egress.held_back(&t), Some(40));
        egress.release(&t).unwrap();
        assert!(limits.lock().unwrap().is_empty());
        assert!(egress.needs_reapply(&t, 1e7));

        // A record from before levels were kept is released but never applied at a guessed
        // level; a cgroup below level 31 cannot be found by the program.
        let mut old = t.clone();
        old.egress = Some(Egress {
            level: None,
            ..t.egress.unwrap()
        });
        let err = egress.apply(&old, 1e7, None).unwrap_err();
        assert!(matches!(err, ActuatorError::NoCgroupLevel), "{err}");
        assert!(limits.lock().unwrap().is_empty());
        let deep = "/a".repeat(32);
        let err = egress
            .plan(
                Site {
                    rel: &deep,
                    ..site(Some(7))
                },
                1e7,
            )
            .unwrap_err();
        assert!(matches!(err, ActuatorError::TooDeep(32)), "{err}");
        let top = egress
            .plan(
                Site {
                    rel: "/",
                    ..site(Some(1))
                },
                1e7,
            )
            .unwrap();
        assert_eq!(top.egress.unwrap().level, Some(0));
    }
}
