//! RDMA netlink (nldev) answers as the kernel, or a relay on a unix socket, sends them: every
//! decoder on every message, and the dump reader on the whole buffer.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tally_rdma::netlink::{nldev, wire};

fuzz_target!(|data: &[u8]| {
    for message in wire::messages(data) {
        let Ok(message) = message else { break };
        let _ = nldev::decode_device(&message);
        let _ = nldev::decode_qp_mode(&message);
        let _ = nldev::decode_qp_counters(&message);
        let _ = nldev::decode_qps(&message);
        let _ = nldev::decode_error(&message);
        let _ = nldev::decode_done(&message);
    }
    let _ = nldev::decode_dump(data, nldev::decode_qp_counters);
    let _ = nldev::decode_dump(data, nldev::decode_qps);
    let _ = nldev::decode_dump(data, |m| nldev::decode_device(m).map(|d| vec![d]));
});
