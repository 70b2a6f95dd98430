//! CRI answers (`ListPodSandbox`, `ListContainers`) as a runtime's socket sends them, decoded
//! and joined into names. The first two bytes split the input between the two messages.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use tally_agent::identity::cri::{join_names, proto};

fuzz_target!(|data: &[u8]| {
    let (split, rest) = match data {
        [a, b, rest @ ..] => (usize::from(u16::from_le_bytes([*a, *b])), rest),
        _ => return,
    };
    let (sandboxes, containers) = rest.split_at(split.min(rest.len()));
    let sandboxes = proto::ListPodSandboxResponse::decode(sandboxes).unwrap_or_default();
    let containers = proto::ListContainersResponse::decode(containers).unwrap_or_default();
    let names = join_names(&sandboxes.items, &containers.containers);
    assert!(names.len() <= sandboxes.items.len() + containers.containers.len());
});
