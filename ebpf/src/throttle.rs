//! Egress rate limits per cgroup, and per destination scope where one is set: the token buckets
//! `net_egress` checks (`ebpf/programs/src/throttle.rs`), written here, and the drops it counts.
//! [`crate::net::Net`] loads them and hands the one [`EgressLimits`] over to whoever enforces
//! ([`crate::net::Net::take_egress_limits`]).

use std::collections::BTreeMap;

use aya::maps::{Array, HashMap, MapData, MapError, PerCpuHashMap};
use tally_ebpf_common::{
    limit_bit, scope, CgroupKey, EgressLimit, EgressLimitKey, NetValue, ACTIVE_SLOT, ALL_SCOPES,
    COST_SHIFT, LEVELS_SLOT, MAX_LIMIT_LEVEL,
};

use crate::Error;

/// Entries of `EGRESS_LIMITS` (the program's definition): one per cgroup × scope limited.
pub const MAX_EGRESS_LIMITS: u32 = 4096;

/// The lowest rate a limit may have. Below it a byte's cost (ns × 2^16) would pass 2^40, and the
/// program's `len × cost` could overflow for a 16 MiB skb (the largest, BIG TCP's, are 512 KiB).
pub const MIN_EGRESS_BYTES_PER_SEC: u64 = 64;

const LIMITS: &str = "EGRESS_LIMITS";
const ACTIVE: &str = "EGRESS_LIMITS_ACTIVE";
const DROPS: &str = "EGRESS_DROPS";
const NS_PER_SEC: u128 = 1_000_000_000;

/// One egress limit as set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EgressLimitSetting {
    pub cgroup_id: u64,
    /// The cgroup's level in the cgroup2 hierarchy (0: the root).
    pub level: u32,
    /// The destination scope (one of `tally_ebpf_common::scope`'s values), or `None` for all
    /// of the cgroup's egress together.
    pub scope: Option<u32>,
    pub bytes_per_sec: u64,
    pub burst_bytes: u64,
}

/// The limit maps of a loaded `tally.bpf.o`, and what this process put in them. They stay in the
/// kernel while this handle lives, and take effect while the [`crate::net::Net`] that loaded
/// them keeps its programs attached.
pub struct EgressLimits {
    limits: HashMap<MapData, EgressLimitKey, EgressLimit>,
    active: Array<MapData, u32>,
    drops: PerCpuHashMap<MapData, CgroupKey, NetValue>,
    /// (cgroup id, scope) → (rate, burst, level) of every limit in `limits`.
    installed: BTreeMap<(u64, u32), (u64, u64, u32)>,
    /// The masks last written to `active`: scopes, levels.
    masks: (u32, u32),
}

impl EgressLimits {
    pub(crate) fn new(
        limits: HashMap<MapData, EgressLimitKey, EgressLimit>,
        active: Array<MapData, u32>,
        drops: PerCpuHashMap<MapData, CgroupKey, NetValue>,
    ) -> EgressLimits {
        EgressLimits {
            limits,
            active,
            drops,
            installed: BTreeMap::new(),
            masks: (0, 0),
        }
    }

    /// Limits the egress of `cgroup_id`, and of every cgroup below it, towards `scope` (one of `tally_ebpf_common::scope`'s
    /// values; `None`: all its egress together) to `bytes_per_sec`, with bursts of up to
    /// `burst_bytes`, counted from the IP header on. `level` is the cgroup's depth in the cgroup2
    /// hierarchy (0: the root, 1: `/system.slice`), by which the program finds it among a
    /// socket's ancestors; a socket's nearest limited ancestor's limits apply to it, and only
    /// those. A packet passes only when every limit that
    /// applies to it (its scope's and the all-scopes one) has room, and is charged to each.
    /// Packets over a limit are dropped: TCP is told it was congestion and sends them again
    /// later; UDP counts them in `SndbufErrors`, and `send()` fails with ENOBUFS only on a socket
    /// with IP_RECVERR. They are counted in [`EgressLimits::drops`], not as egress in
    /// [`crate::net::Net::read`].
    ///
    /// A new limit starts with a full bucket; setting the same limit again changes nothing, and
    /// changing a limit keeps its bucket's level. For TCP the burst should hold at least 200 ms
    /// of the rate: a segment dropped while nothing else is in flight (loopback, sub-millisecond
    /// paths, or low rates with 64 KiB segments) is sent again by the probe timer, after
    /// `TCP_RTO_MIN`, and a smaller bucket overflows meanwhile (measured on loopback at 10 MB/s:
    /// a 1 MB burst gives 4.7 MB/s, 2.5 MB gives 9.9-10.0 MB/s). Errors: a scope that does not
    /// exist, a level deeper than [`MAX_LIMIT_LEVEL`], a rate below
    /// [`MIN_EGRESS_BYTES_PER_SEC`], a zero burst, or [`Error::MapFull`] beyond
    /// [`MAX_EGRESS_LIMITS`] limits.
    pub fn set(
        &mut self,
        cgroup_id: u64,
        level: u32,
        scope: Option<u32>,
        bytes_per_sec: u64,
        burst_bytes: u64,
    ) -> Result<(), Error> {
        let key = key(cgroup_id, scope)?;
        let invalid = |reason| Error::InvalidEgressLimit {
            cgroup_id,
            scope,
            reason,
        };
        if level > MAX_LIMIT_LEVEL {
            return Err(invalid("the cgroup lies deeper than level 31"));
        }
        if bytes_per_sec < MIN_EGRESS_BYTES_PER_SEC {
            return Err(invalid("bytes_per_sec is below 64"));
        }
        if burst_bytes == 0 {
            return Err(invalid("burst_bytes is 0"));
        }
        let mut value = bucket(bytes_per_sec, burst_bytes)
            .ok_or_else(|| invalid("burst_bytes lasts longer than 2^62 ns at this rate"))?;
        match self.installed.get(&(key.cgroup_id, key.scope)) {
            // Setting the same limit again (every tick, say) keeps the bucket as it is.
            Some(&(rate, burst, at))
                if rate == bytes_per_sec && burst == burst_bytes && at == level =>
            {
                return Ok(())
            }
            Some(_) => {
                // A changed limit keeps the bucket's clock: a new rate does not refill it.
                // Packets charged between this read and the write below are forgotten.
                value.clock_ns = match self.limits.get(&key, 0) {
                    Ok(old) => old.clock_ns,
                    Err(e) if not_found(&e) => 0,
                    Err(source) => {
                        return Err(Error::Map {
                            map: LIMITS,
                            action: "reading a limit's bucket",
                            source,
                        })
                    }
                };
            }
            None if self.installed.len() >= MAX_EGRESS_LIMITS as usize => {
                return Err(Error::MapFull {
                    map: LIMITS,
                    max_entries: MAX_EGRESS_LIMITS,
                });
            }
            None => {}
        }
        self.limits
            .insert(key, value, 0)
            .map_err(|source| match source {
                // The kernel's answer for a full hash map (kernel/bpf/hashtab.c, `alloc_htab_elem()`).
                MapError::SyscallError(ref e) if e.io_error.raw_os_error() == Some(libc::E2BIG) => {
                    Error::MapFull {
                        map: LIMITS,
                        max_entries: MAX_EGRESS_LIMITS,
                    }
                }
                source => Error::Map {
                    map: LIMITS,
                    action: "setting a limit",
                    source,
                },
            })?;
        self.installed.insert(
            (key.cgroup_id, key.scope),
            (bytes_per_sec, burst_bytes, level),
        );
        self.sync_mask()
    }

    /// Removes the limit `set` set for `cgroup_id` and `scope`; nothing when none is set. Its
    /// drop counters stay until [`EgressLimits::remove_drops`].
    pub fn clear(&mut self, cgroup_id: u64, scope: Option<u32>) -> Result<(), Error> {
        let key = key(cgroup_id, scope)?;
        match self.limits.remove(&key) {
            Ok(()) => {}
            Err(e) if not_found(&e) => {}
            Err(source) => {
                return Err(Error::Map {
                    map: LIMITS,
                    action: "clearing a limit",
                    source,
                })
            }
        }
        self.installed.remove(&(key.cgroup_id, key.scope));
        self.sync_mask()
    }

    /// Every limit set, ordered by cgroup id, then scope (all scopes last).
    pub fn settings(&self) -> Vec<EgressLimitSetting> {
        self.installed
            .iter()
            .map(
                |(&(cgroup_id, scope), &(bytes_per_sec, burst_bytes, level))| EgressLimitSetting {
                    cgroup_id,
                    level,
                    scope: (scope != ALL_SCOPES).then_some(scope),
                    bytes_per_sec,
                    burst_bytes,
                },
            )
            .collect()
    }

    /// Packets and bytes dropped over a limit since load, per limited cgroup (whose limit dropped
    /// them, for sockets in it or below it): `(cgroup_id, packets, bytes)`, summed over CPUs.
    pub fn drops(&self) -> Result<Vec<(u64, u64, u64)>, Error> {
        let summed = crate::source::read_summed(&self.drops, DROPS, |sum, v| {
            sum.bytes = sum.bytes.wrapping_add(v.bytes);
            sum.packets = sum.packets.wrapping_add(v.packets);
        })?;
        Ok(summed
            .into_iter()
            .map(|(key, v)| (key.cgroup_id, v.packets, v.bytes))
            .collect())
    }

    /// Deletes the drop counters of cgroups that no longer exist, after their final values were
    /// read.
    pub fn remove_drops(&mut self, cgroup_ids: &[u64]) -> Result<(), Error> {
        let keys: Vec<CgroupKey> = cgroup_ids
            .iter()
            .map(|&cgroup_id| CgroupKey { cgroup_id })
            .collect();
        crate::source::remove_keys(&mut self.drops, DROPS, &keys)
    }

    /// Writes the scopes and the levels that have limits to `EGRESS_LIMITS_ACTIVE`, when they
    /// changed. Set after a limit is inserted and cleared after one is removed, so the program
    /// never skips a limit that is in the map.
    fn sync_mask(&mut self) -> Result<(), Error> {
        let masks = self.installed.iter().fold(
            (0, 0),
            |(scopes, levels), (&(_, scope), &(_, _, level))| {
                (scopes | limit_bit(scope), levels | (1 << level))
            },
        );
        for (slot, mask, old, action) in [
            (
                LEVELS_SLOT,
                masks.1,
                self.masks.1,
                "writing the limited levels",
            ),
            (
                ACTIVE_SLOT,
                masks.0,
                self.masks.0,
                "writing the active scopes",
            ),
        ] {
            if mask != old {
                self.active
                    .set(slot, mask, 0)
                    .map_err(|source| Error::Map {
                        map: ACTIVE,
                        action,
                        source,
                    })?;
            }
        }
        self.masks = masks;
        Ok(())
    }
}

impl std::fmt::Debug for EgressLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EgressLimits")
            .field("installed", &self.installed.len())
            .finish_non_exhaustive()
    }
}

fn key(cgroup_id: u64, scope: Option<u32>) -> Result<EgressLimitKey, Error> {
    let scope = match scope {
        None => ALL_SCOPES,
        Some(s) if (s as usize) < scope::COUNT => s,
        Some(_) => {
            return Err(Error::InvalidEgressLimit {
                cgroup_id,
                scope,
                reason: "no such scope",
            })
        }
    };
    Ok(EgressLimitKey {
        cgroup_id,
        scope,
        pad: 0,
    })
}

/// A full bucket of `burst_bytes` at `bytes_per_sec` (≥ [`MIN_EGRESS_BYTES_PER_SEC`]), in the
/// program's units; `None` when the burst would not fit them. A byte's cost is rounded up, so the
/// rate enforced is never above the one asked for.
fn bucket(bytes_per_sec: u64, burst_bytes: u64) -> Option<EgressLimit> {
    let rate = u128::from(bytes_per_sec);
    let scaled = (NS_PER_SEC << COST_SHIFT).div_ceil(rate);
    let burst_ns = u128::from(burst_bytes) * NS_PER_SEC / rate;
    if burst_ns > 1 << 62 {
        return None;
    }
    Some(EgressLimit {
        bytes_per_sec,
        burst_bytes,
        ns_per_byte_scaled: u64::try_from(scaled).ok()?,
        burst_ns: u64::try_from(burst_ns).ok()?,
        clock_ns: 0,
    })
}

fn not_found(e: &MapError) -> bool {
    match e {
        MapError::KeyNotFound => true,
        MapError::SyscallError(e) => e.io_error.kind() == std::io::ErrorKind::NotFound,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn costs_round_up_and_stay_in_range() {
        let b = bucket(10_000_000, 1_000_000).unwrap();
        // 100 ns a byte, exactly.
        assert_eq!(b.ns_per_byte_scaled, 100 << COST_SHIFT);
        assert_eq!(b.burst_ns, 100_000_000);
        // 1e9 × 2^16 / 3e9 is not whole: rounded up, so the enforced rate is a hair lower.
        let b = bucket(3_000_000_000, 1).unwrap();
        assert_eq!(b.ns_per_byte_scaled, 21846);
        let lowest = bucket(MIN_EGRESS_BYTES_PER_SEC, 1).unwrap();
        assert!(lowest.ns_per_byte_scaled <= 1 << 40);
        // A 16 MiB skb at the lowest rate does not overflow the program's multiplication.
        assert!((16u64 << 20)
            .checked_mul(lowest.ns_per_byte_scaled)
            .is_some());
        assert!(bucket(MIN_EGRESS_BYTES_PER_SEC, u64::MAX).is_none());
    }

    #[test]
    fn scopes_are_checked() {
        assert_eq!(key(7, None).unwrap().scope, ALL_SCOPES);
        assert_eq!(
            key(7, Some(scope::INTERNET)).unwrap().scope,
            scope::INTERNET
        );
        let err = key(7, Some(scope::COUNT as u32)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "egress limit of cgroup 7 on scope 5: no such scope"
        );
    }
}
