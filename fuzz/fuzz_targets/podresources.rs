//! The kubelet's pod-resources `List` answer, decoded and turned into device assignments.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use tally_agent::identity::podresources::{assignments, device_uuid, proto};

fuzz_target!(|data: &[u8]| {
    let Ok(response) = proto::ListPodResourcesResponse::decode(data) else {
        return;
    };
    for (uuid, holders) in assignments(&response) {
        assert_eq!(device_uuid(&uuid), uuid);
        assert!(!holders.is_empty());
    }
});
