//! The cgroup path classifier, on any path a process's `/proc/<pid>/cgroup` line or a directory
//! name (anyone with a delegated subtree chooses those) can hold.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tally_agent::host::path::{self, Names, PathIdentity};
use tally_agent::identity::Workload;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (identity, len) = path::resolve(text);
    // The workload's own cgroup is a prefix of the path, cut on a character boundary, and
    // names the same workload.
    let prefix = &text[..len];
    if identity != PathIdentity::Host {
        assert_eq!(path::resolve(prefix), (identity.clone(), len), "{text:?}");
    }
    let _ = identity.to_string();
    let _ = Workload::new(identity, Names::default()).labels();
});
