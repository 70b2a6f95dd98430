//! Golden nldev messages: byte arrays written by hand from the kernel's UAPI constants
//! (include/uapi/rdma/rdma_netlink.h, include/uapi/linux/netlink.h) and the layouts of
//! drivers/infiniband/core/nldev.c, checked byte for byte against our encoder and decoded to the
//! expected per-pid counters. Then every truncation of a valid dump, and corrupted ones, must be
//! rejected with an error, never a panic.
//!
//! Netlink is host byte order; the arrays are little-endian, as on x86-64 and arm64.
#![cfg(target_endian = "little")]

use tally_rdma::netlink::consts::{attr, cmd, mask, mode, nl, NETLINK_RDMA, RDMA_NL_NLDEV};
use tally_rdma::netlink::nldev::{self, answer, CounterMode, DeviceInfo, Qp, QpCounter};
use tally_rdma::netlink::wire::{self, DecodeError, Message};

/// `RDMA_NLDEV_CMD_STAT_GET` mode query for device 1, port 1, seq 5 (what `rdma statistic qp
/// mode link mlx5_0/1` sends).
const MODE_REQUEST: [u8; 48] = [
    0x30, 0x00, 0x00, 0x00, // nlmsg_len 48
    0x11, 0x14, // nlmsg_type RDMA_NL_GET_TYPE(RDMA_NL_NLDEV 5, STAT_GET 17) = 5 << 10 | 17
    0x05, 0x00, // NLM_F_REQUEST | NLM_F_ACK
    0x05, 0x00, 0x00, 0x00, // seq 5
    0x00, 0x00, 0x00, 0x00, // port id 0
    0x08, 0x00, 0x01, 0x00, 0x01, 0x00, 0x00, 0x00, // DEV_INDEX (1) = 1
    0x08, 0x00, 0x03, 0x00, 0x01, 0x00, 0x00, 0x00, // PORT_INDEX (3) = 1
    0x08, 0x00, 0x4a, 0x00, 0x02, 0x00, 0x00, 0x00, // STAT_MODE (74) = MANUAL 2: "mode only"
    0x08, 0x00, 0x4b, 0x00, 0x13, 0x00, 0x00, 0x00, // STAT_RES (75) = RES_QP 19
];

/// `RDMA_NLDEV_CMD_STAT_SET`: auto mode by pid on device 1, port 1, seq 6 (`rdma statistic qp
/// set link mlx5_0/1 auto type pid on`, which iproute2 sends as mask PID).
const AUTO_PID_REQUEST: [u8; 56] = [
    0x38, 0x00, 0x00, 0x00, // nlmsg_len 56
    0x10, 0x14, // 5 << 10 | STAT_SET 16
    0x05, 0x00, // NLM_F_REQUEST | NLM_F_ACK
    0x06, 0x00, 0x00, 0x00, // seq 6
    0x00, 0x00, 0x00, 0x00, //
    0x08, 0x00, 0x01, 0x00, 0x01, 0x00, 0x00, 0x00, // DEV_INDEX = 1
    0x08, 0x00, 0x03, 0x00, 0x01, 0x00, 0x00, 0x00, // PORT_INDEX = 1
    0x08, 0x00, 0x4b, 0x00, 0x13, 0x00, 0x00, 0x00, // STAT_RES = RES_QP 19
    0x08, 0x00, 0x4a, 0x00, 0x01, 0x00, 0x00, 0x00, // STAT_MODE = AUTO 1
    0x08, 0x00, 0x4c, 0x00, 0x02, 0x00, 0x00, 0x00, // STAT_AUTO_MODE_MASK (76) = PID 2
];

/// `RDMA_NLDEV_CMD_STAT_GET` dump of device 3's QP counters, seq 7.
const COUNTER_DUMP_REQUEST: [u8; 32] = [
    0x20, 0x00, 0x00, 0x00, // nlmsg_len 32
    0x11, 0x14, // STAT_GET
    0x01, 0x03, // NLM_F_REQUEST | NLM_F_DUMP (0x300)
    0x07, 0x00, 0x00, 0x00, // seq 7
    0x00, 0x00, 0x00, 0x00, //
    0x08, 0x00, 0x01, 0x00, 0x03, 0x00, 0x00, 0x00, // DEV_INDEX = 3
    0x08, 0x00, 0x4b, 0x00, 0x13, 0x00, 0x00, 0x00, // STAT_RES = RES_QP
];

/// `RDMA_NLDEV_CMD_RES_QP_GET` dump of device 3, seq 8.
const QP_DUMP_REQUEST: [u8; 24] = [
    0x18, 0x00, 0x00, 0x00, // nlmsg_len 24
    0x0a, 0x14, // 5 << 10 | RES_QP_GET 10
    0x01, 0x03, // NLM_F_REQUEST | NLM_F_DUMP
    0x08, 0x00, 0x00, 0x00, // seq 8
    0x00, 0x00, 0x00, 0x00, //
    0x08, 0x00, 0x01, 0x00, 0x03, 0x00, 0x00, 0x00, // DEV_INDEX = 3
];

/// `RDMA_NLDEV_CMD_GET` dump of every device, seq 9.
const DEVICE_DUMP_REQUEST: [u8; 16] = [
    0x10, 0x00, 0x00, 0x00, 0x01, 0x14, 0x01, 0x03, 0x09, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
];

/// One message of the kernel's QP counter dump for mlx5_0 (index 1), to port id 4321, seq 7:
/// counter 3 on port 1, auto mode by pid, pid 4242, QP 0x2a5, optional counters
/// `rdma_tx_bytes` 1000 and `rdma_rx_bytes` 2000. Table and entry nests without `NLA_F_NESTED`
/// (`nla_nest_start_noflag` in `res_get_common_dumpit`), inner ones with it (`nla_nest_start`).
const COUNTER_MESSAGE: [u8; 168] = [
    0xa8, 0x00, 0x00, 0x00, // nlmsg_len 168
    0x11, 0x14, // STAT_GET
    0x02, 0x00, // NLM_F_MULTI
    0x07, 0x00, 0x00, 0x00, // seq 7
    0xe1, 0x10, 0x00, 0x00, // port id 4321
    0x08, 0x00, 0x01, 0x00, 0x01, 0x00, 0x00, 0x00, // DEV_INDEX = 1
    0x0b, 0x00, 0x02, 0x00, b'm', b'l', b'x', b'5', b'_', b'0', 0x00, 0x00, // DEV_NAME, pad 1
    0x84, 0x00, 0x4d, 0x00, // STAT_COUNTER (77), 132 bytes
    0x80, 0x00, 0x4e, 0x00, //   STAT_COUNTER_ENTRY (78), 128 bytes
    0x08, 0x00, 0x03, 0x00, 0x01, 0x00, 0x00, 0x00, //     PORT_INDEX = 1
    0x08, 0x00, 0x4f, 0x00, 0x03, 0x00, 0x00, 0x00, //     STAT_COUNTER_ID (79) = 3
    0x08, 0x00, 0x4a, 0x00, 0x01, 0x00, 0x00, 0x00, //     STAT_MODE = AUTO
    0x08, 0x00, 0x1c, 0x00, 0x92, 0x10, 0x00, 0x00, //     RES_PID (28) = 4242
    0x10, 0x00, 0x13, 0x80, //     RES_QP (19) | NLA_F_NESTED, 16 bytes
    0x0c, 0x00, 0x14, 0x80, //       RES_QP_ENTRY (20) | NLA_F_NESTED, 12 bytes
    0x08, 0x00, 0x15, 0x00, 0xa5, 0x02, 0x00, 0x00, //         RES_LQPN (21) = 0x2a5
    0x4c, 0x00, 0x50, 0x80, //     STAT_HWCOUNTERS (80) | NLA_F_NESTED, 76 bytes
    0x24, 0x00, 0x51, 0x80, //       STAT_HWCOUNTER_ENTRY (81) | NLA_F_NESTED, 36 bytes
    0x12, 0x00, 0x52, 0x00, //         ENTRY_NAME (82), 14 bytes + NUL... padded to 20
    b'r', b'd', b'm', b'a', b'_', b't', b'x', b'_', b'b', b'y', b't', b'e', b's', 0x00, 0x00,
    0x00, //
    0x0c, 0x00, 0x53, 0x00, 0xe8, 0x03, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, // VALUE (83) = 1000
    0x24, 0x00, 0x51, 0x80, //       STAT_HWCOUNTER_ENTRY, 36 bytes
    0x12, 0x00, 0x52, 0x00, //
    b'r', b'd', b'm', b'a', b'_', b'r', b'x', b'_', b'b', b'y', b't', b'e', b's', 0x00, 0x00,
    0x00, //
    0x0c, 0x00, 0x53, 0x00, 0xd0, 0x07, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // VALUE = 2000
];

/// `NLMSG_DONE` closing that dump: error code 0.
const DONE: [u8; 20] = [
    0x14, 0x00, 0x00, 0x00, 0x03, 0x00, 0x02, 0x00, 0x07, 0x00, 0x00, 0x00, 0xe1, 0x10, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00,
];

/// One message of the kernel's QP dump of mlx5_0 with everything `fill_res_qp_entry` writes for
/// a user RC QP: port 1, LQPN 0x2a5, PDN 2, pid 4242, RQPN, RQ/SQ PSN, path migration state,
/// type RC (2), state RTS (3). Tally reads port, LQPN, pid, type and state and skips the rest.
const QP_MESSAGE: [u8; 124] = [
    0x7c, 0x00, 0x00, 0x00, // nlmsg_len 124
    0x0a, 0x14, // RES_QP_GET
    0x02, 0x00, // NLM_F_MULTI
    0x08, 0x00, 0x00, 0x00, // seq 8
    0xe1, 0x10, 0x00, 0x00, //
    0x08, 0x00, 0x01, 0x00, 0x01, 0x00, 0x00, 0x00, // DEV_INDEX = 1
    0x0b, 0x00, 0x02, 0x00, b'm', b'l', b'x', b'5', b'_', b'0', 0x00, 0x00, // DEV_NAME
    0x58, 0x00, 0x13, 0x00, // RES_QP (19), 88 bytes
    0x54, 0x00, 0x14, 0x00, //   RES_QP_ENTRY (20), 84 bytes
    0x08, 0x00, 0x03, 0x00, 0x01, 0x00, 0x00, 0x00, //     PORT_INDEX = 1
    0x08, 0x00, 0x15, 0x00, 0xa5, 0x02, 0x00, 0x00, //     RES_LQPN = 0x2a5
    0x08, 0x00, 0x3c, 0x00, 0x02, 0x00, 0x00, 0x00, //     RES_PDN (60) = 2
    0x08, 0x00, 0x1c, 0x00, 0x92, 0x10, 0x00, 0x00, //     RES_PID = 4242
    0x08, 0x00, 0x16, 0x00, 0xa6, 0x02, 0x00, 0x00, //     RES_RQPN (22) = 0x2a6
    0x08, 0x00, 0x17, 0x00, 0x10, 0x00, 0x00, 0x00, //     RES_RQ_PSN (23) = 16
    0x08, 0x00, 0x18, 0x00, 0x20, 0x00, 0x00, 0x00, //     RES_SQ_PSN (24) = 32
    0x05, 0x00, 0x19, 0x00, 0x00, 0x00, 0x00, 0x00, //     RES_PATH_MIG_STATE (25) = 0, pad 3
    0x05, 0x00, 0x1a, 0x00, 0x02, 0x00, 0x00, 0x00, //     RES_TYPE (26) = RC 2
    0x05, 0x00, 0x1b, 0x00, 0x03, 0x00, 0x00, 0x00, //     RES_STATE (27) = RTS 3
];

/// One message of the kernel's device dump: mlx5_0, index 1, 1 port, with the attributes
/// `fill_dev_info` adds (capability flags u64, firmware, node GUID, node type, protocol).
const DEVICE_MESSAGE: [u8; 96] = [
    0x60, 0x00, 0x00, 0x00, // nlmsg_len 96
    0x01, 0x14, // 5 << 10 | GET 1
    0x02, 0x00, // NLM_F_MULTI
    0x09, 0x00, 0x00, 0x00, // seq 9
    0xe1, 0x10, 0x00, 0x00, //
    0x08, 0x00, 0x01, 0x00, 0x01, 0x00, 0x00, 0x00, // DEV_INDEX = 1
    0x0b, 0x00, 0x02, 0x00, b'm', b'l', b'x', b'5', b'_', b'0', 0x00, 0x00, // DEV_NAME
    0x08, 0x00, 0x03, 0x00, 0x01, 0x00, 0x00, 0x00, // PORT_INDEX = 1 (port count)
    0x0c, 0x00, 0x04, 0x00, 0x36, 0x14, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // CAP_FLAGS u64
    0x0c, 0x00, 0x05, 0x00, b'2', b'8', b'.', b'3', b'9', b'.', b'1', 0x00, // FW_VERSION
    0x0c, 0x00, 0x06, 0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, // NODE_GUID u64
    0x05, 0x00, 0x0e, 0x00, 0x01, 0x00, 0x00, 0x00, // DEV_NODE_TYPE (14) = CA 1
    0x07, 0x00, 0x43, 0x00, b'i', b'b', 0x00, 0x00, // DEV_PROTOCOL (67) = "ib"
];

/// The kernel's answer to MODE_REQUEST: auto mode by pid.
const MODE_ANSWER: [u8; 60] = [
    0x3c, 0x00, 0x00, 0x00, // nlmsg_len 60
    0x11, 0x14, // STAT_GET
    0x00, 0x00, // no flags
    0x05, 0x00, 0x00, 0x00, // seq 5
    0xe1, 0x10, 0x00, 0x00, //
    0x08, 0x00, 0x01, 0x00, 0x01, 0x00, 0x00, 0x00, // DEV_INDEX = 1
    0x0b, 0x00, 0x02, 0x00, b'm', b'l', b'x', b'5', b'_', b'0', 0x00, 0x00, // DEV_NAME
    0x08, 0x00, 0x03, 0x00, 0x01, 0x00, 0x00, 0x00, // PORT_INDEX = 1
    0x08, 0x00, 0x4a, 0x00, 0x01, 0x00, 0x00, 0x00, // STAT_MODE = AUTO
    0x08, 0x00, 0x4c, 0x00, 0x02, 0x00, 0x00, 0x00, // STAT_AUTO_MODE_MASK = PID
];

fn counter() -> QpCounter {
    QpCounter {
        device_index: 1,
        device: "mlx5_0".into(),
        port: 1,
        id: 3,
        mode: mode::AUTO,
        pid: Some(4242),
        kernel_name: None,
        qp_type: None,
        qps: vec![0x2a5],
        values: vec![
            ("rdma_tx_bytes".into(), 1000),
            ("rdma_rx_bytes".into(), 2000),
        ],
    }
}

#[expect(clippy::expect_used, reason = "test helper")]
fn one(buf: &[u8]) -> Message<'_> {
    let mut it = wire::messages(buf);
    let m = it.next().expect("a message").expect("well-formed");
    assert!(it.next().is_none());
    m
}

fn dump() -> Vec<u8> {
    [&COUNTER_MESSAGE[..], &DONE[..]].concat()
}

#[test]
fn requests_are_byte_exact() {
    assert_eq!(nldev::qp_mode_request(5, 1, 1), MODE_REQUEST);
    assert_eq!(
        nldev::set_auto_mode_request(6, 1, 1, mask::PID, None),
        AUTO_PID_REQUEST
    );
    assert_eq!(nldev::qp_counters_request(7, 3), COUNTER_DUMP_REQUEST);
    assert_eq!(nldev::qps_request(8, 3), QP_DUMP_REQUEST);
    assert_eq!(nldev::devices_request(9), DEVICE_DUMP_REQUEST);
    // Turning auto mode off is the same request with mask 0.
    let off = nldev::set_auto_mode_request(6, 1, 1, 0, None);
    assert_eq!(off[..52], AUTO_PID_REQUEST[..52]);
    assert_eq!(off[52..], [0, 0, 0, 0]);
    // With optional counters: STAT_OPCOUNTER_ENABLED (104) u8 1, padded.
    let opt = nldev::set_auto_mode_request(6, 1, 1, mask::PID, Some(true));
    assert_eq!(opt[0], 64);
    assert_eq!(opt[56..], [0x05, 0x00, 0x68, 0x00, 0x01, 0x00, 0x00, 0x00]);
}

#[test]
fn kernel_answers_are_byte_exact() {
    assert_eq!(answer::qp_counters(7, 4321, &[counter()]), COUNTER_MESSAGE);
    assert_eq!(answer::done(7, 4321, 0), DONE);
    let mode = CounterMode {
        mode: mode::AUTO,
        mask: mask::PID,
    };
    assert_eq!(answer::qp_mode(5, 4321, 1, "mlx5_0", 1, mode), MODE_ANSWER);
}

#[test]
fn golden_counter_dump_decodes_to_the_per_pid_counters() {
    let counters = nldev::decode_dump(&dump(), nldev::decode_qp_counters).unwrap();
    assert_eq!(counters, vec![counter()]);
    let traffic = tally_rdma::Traffic::from_values(&counters[0].values);
    assert_eq!(traffic.transmit_bytes, Some(1000));
    assert_eq!(traffic.receive_bytes, Some(2000));
    assert_eq!(traffic.transmit_packets, None);
}

#[test]
fn golden_qp_device_and_mode_answers_decode() {
    let qps = nldev::decode_qps(&one(&QP_MESSAGE)).unwrap();
    assert_eq!(
        qps,
        vec![Qp {
            device_index: 1,
            port: Some(1),
            lqpn: 0x2a5,
            pid: Some(4242),
            kernel_name: None,
            qp_type: Some(2),
            state: Some(3),
        }]
    );
    assert_eq!(
        nldev::decode_device(&one(&DEVICE_MESSAGE)).unwrap(),
        DeviceInfo {
            index: 1,
            name: "mlx5_0".into(),
            ports: 1
        }
    );
    let (index, port, m) = nldev::decode_qp_mode(&one(&MODE_ANSWER)).unwrap();
    assert_eq!((index, port), (1, 1));
    assert!(m.is_auto_pid());
    assert_eq!(m.describe(), "qp auto pid on");
}

#[test]
fn a_pad_attribute_before_a_u64_is_skipped() {
    // On architectures without efficient unaligned access nla_put_u64_64bit inserts an empty
    // RDMA_NLDEV_ATTR_PAD (0) before the value. Rebuild the counter with one.
    let mut w =
        wire::MessageWriter::with_port_id(nldev::nldev(cmd::STAT_GET), nl::NLM_F_MULTI, 7, 0);
    w.u32(attr::DEV_INDEX, 1).string(attr::DEV_NAME, "mlx5_0");
    let t = w.begin_nested(attr::STAT_COUNTER, false);
    let e = w.begin_nested(attr::STAT_COUNTER_ENTRY, false);
    w.u32(attr::PORT_INDEX, 1)
        .u32(attr::STAT_COUNTER_ID, 9)
        .u32(attr::STAT_MODE, mode::AUTO)
        .u32(attr::RES_PID, 77);
    let hw = w.begin_nested(attr::STAT_HWCOUNTERS, true);
    let entry = w.begin_nested(attr::STAT_HWCOUNTER_ENTRY, true);
    w.string(attr::STAT_HWCOUNTER_ENTRY_NAME, "rdma_tx_packets")
        .attr(attr::PAD, &[])
        .u64(attr::STAT_HWCOUNTER_ENTRY_VALUE, 12);
    w.end_nested(entry);
    w.end_nested(hw);
    w.end_nested(e);
    w.end_nested(t);
    let bytes = w.finish();
    let c = nldev::decode_qp_counters(&one(&bytes)).unwrap();
    assert_eq!(c[0].pid, Some(77));
    assert_eq!(c[0].values, vec![("rdma_tx_packets".to_owned(), 12)]);
}

#[test]
fn every_truncation_of_a_dump_is_an_error() {
    let full = dump();
    for len in 0..full.len() {
        let got = nldev::decode_dump(&full[..len], nldev::decode_qp_counters);
        assert!(got.is_err(), "prefix of {len} bytes decoded: {got:?}");
    }
    // Truncated inside the message with nlmsg_len rewritten to match: the nested lengths still
    // overrun. Only a cut exactly between two top-level attributes leaves a well-formed (if
    // incomplete) message, which then must not invent a counter.
    let top_level = [16usize, 24, 35, 36];
    for len in wire::HEADER_LEN..COUNTER_MESSAGE.len() {
        let mut cut = COUNTER_MESSAGE[..len].to_vec();
        cut[0..4].copy_from_slice(&(len as u32).to_ne_bytes());
        let got = nldev::decode_qp_counters(&one(&cut));
        if top_level.contains(&len) {
            assert!(got.as_ref().map_or(true, Vec::is_empty), "{len}: {got:?}");
        } else {
            assert!(got.is_err(), "cut at {len} decoded: {got:?}");
        }
    }
    for (name, golden) in [
        ("qp", &QP_MESSAGE[..]),
        ("device", &DEVICE_MESSAGE[..]),
        ("mode", &MODE_ANSWER[..]),
    ] {
        for len in 1..golden.len() {
            let first = wire::messages(&golden[..len]).next();
            assert!(
                matches!(first, Some(Err(_))),
                "{name}: a {len}-byte prefix framed as a message"
            );
        }
    }
}

#[test]
fn malformed_messages_are_rejected() {
    let decode = |bytes: &[u8]| nldev::decode_dump(bytes, nldev::decode_qp_counters);
    let patch = |at: usize, bytes: &[u8]| {
        let mut d = dump();
        d[at..at + bytes.len()].copy_from_slice(bytes);
        d
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("nlmsg_len beyond the buffer", patch(0, &[0xff])),
        ("nlmsg_len overlapping the next message", patch(0, &[0xac])),
        ("nlmsg_len below the header", patch(0, &[0x0c])),
        ("table longer than the message", patch(36, &[0x88])),
        ("attribute length below its header", patch(40, &[0x02])),
        ("u32 attribute of 5 bytes", patch(44, &[0x09])),
        ("device name without its NUL", patch(34, b"x")),
        ("u64 value of 4 bytes", patch(120, &[0x08])),
        ("counter id missing", patch(54, &[0x7f])),
        ("wrong nldev command", patch(4, &[0x0a])),
        ("done without its error code", {
            let mut d = dump();
            d.truncate(d.len() - 4);
            let l = d.len() - 16;
            d[l..l + 4].copy_from_slice(&[0x12, 0, 0, 0]);
            d.extend_from_slice(&[0, 0]);
            d
        }),
        ("an error in the dump", {
            let mut d = COUNTER_MESSAGE.to_vec();
            d.extend(answer::error(4321, &COUNTER_DUMP_REQUEST, -libc_einval()));
            d
        }),
    ];
    for (what, bytes) in cases {
        let got = decode(&bytes);
        assert!(got.is_err(), "{what}: decoded {got:?}");
    }
    assert_eq!(
        decode(&COUNTER_MESSAGE),
        Err(DecodeError::NoDone),
        "a dump without NLMSG_DONE"
    );
}

fn libc_einval() -> i32 {
    22
}

/// xorshift64*: deterministic, so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

#[test]
fn random_corruption_never_panics() {
    let golden = dump();
    let mut rng = Rng(0x7a11_7a11);
    let (mut rejected, mut runs) = (0u32, 0u32);
    for _ in 0..50_000 {
        let mut d = golden.clone();
        for _ in 0..=(rng.next() % 4) {
            let at = (rng.next() % d.len() as u64) as usize;
            d[at] = rng.next() as u8;
        }
        if rng.next() % 8 == 0 {
            d.truncate((rng.next() % d.len() as u64) as usize);
        }
        runs += 1;
        if nldev::decode_dump(&d, nldev::decode_qp_counters).is_err() {
            rejected += 1;
        }
        let _ = nldev::decode_dump(&d, nldev::decode_qps);
        let _ = nldev::decode_dump(&d, |m| nldev::decode_device(m).map(|d| vec![d]));
    }
    eprintln!("{rejected} of {runs} corrupted dumps rejected");
    // Corrupting a value byte leaves a valid message; corrupting structure does not.
    assert!(rejected > runs / 4, "only {rejected} of {runs} rejected");
}

/// The constants against the installed kernel header, when there is one.
#[test]
fn constants_match_the_kernel_header() {
    let path = "/usr/include/rdma/rdma_netlink.h";
    let Ok(text) = std::fs::read_to_string(path) else {
        let strict = std::env::var("TALLY_TEST_STRICT").is_ok_and(|v| v == "1");
        assert!(
            !strict,
            "{path} missing (linux-libc-dev) and TALLY_TEST_STRICT=1"
        );
        eprintln!("\n!!!!!!!! SKIPPED constants_match_the_kernel_header: no {path} !!!!!!!!\n");
        return;
    };
    let values = enum_values(&text);
    let want: &[(&str, i64)] = &[
        ("RDMA_NL_NLDEV", i64::from(RDMA_NL_NLDEV)),
        ("RDMA_NLDEV_CMD_GET", cmd::GET.into()),
        ("RDMA_NLDEV_CMD_PORT_GET", cmd::PORT_GET.into()),
        ("RDMA_NLDEV_CMD_RES_QP_GET", cmd::RES_QP_GET.into()),
        ("RDMA_NLDEV_CMD_STAT_SET", cmd::STAT_SET.into()),
        ("RDMA_NLDEV_CMD_STAT_GET", cmd::STAT_GET.into()),
        ("RDMA_NLDEV_ATTR_PAD", attr::PAD.into()),
        ("RDMA_NLDEV_ATTR_DEV_INDEX", attr::DEV_INDEX.into()),
        ("RDMA_NLDEV_ATTR_DEV_NAME", attr::DEV_NAME.into()),
        ("RDMA_NLDEV_ATTR_PORT_INDEX", attr::PORT_INDEX.into()),
        ("RDMA_NLDEV_ATTR_RES_QP", attr::RES_QP.into()),
        ("RDMA_NLDEV_ATTR_RES_QP_ENTRY", attr::RES_QP_ENTRY.into()),
        ("RDMA_NLDEV_ATTR_RES_LQPN", attr::RES_LQPN.into()),
        ("RDMA_NLDEV_ATTR_RES_TYPE", attr::RES_TYPE.into()),
        ("RDMA_NLDEV_ATTR_RES_STATE", attr::RES_STATE.into()),
        ("RDMA_NLDEV_ATTR_RES_PID", attr::RES_PID.into()),
        ("RDMA_NLDEV_ATTR_RES_KERN_NAME", attr::RES_KERN_NAME.into()),
        ("RDMA_NLDEV_ATTR_STAT_MODE", attr::STAT_MODE.into()),
        ("RDMA_NLDEV_ATTR_STAT_RES", attr::STAT_RES.into()),
        (
            "RDMA_NLDEV_ATTR_STAT_AUTO_MODE_MASK",
            attr::STAT_AUTO_MODE_MASK.into(),
        ),
        ("RDMA_NLDEV_ATTR_STAT_COUNTER", attr::STAT_COUNTER.into()),
        (
            "RDMA_NLDEV_ATTR_STAT_COUNTER_ENTRY",
            attr::STAT_COUNTER_ENTRY.into(),
        ),
        (
            "RDMA_NLDEV_ATTR_STAT_COUNTER_ID",
            attr::STAT_COUNTER_ID.into(),
        ),
        (
            "RDMA_NLDEV_ATTR_STAT_HWCOUNTERS",
            attr::STAT_HWCOUNTERS.into(),
        ),
        (
            "RDMA_NLDEV_ATTR_STAT_HWCOUNTER_ENTRY",
            attr::STAT_HWCOUNTER_ENTRY.into(),
        ),
        (
            "RDMA_NLDEV_ATTR_STAT_HWCOUNTER_ENTRY_NAME",
            attr::STAT_HWCOUNTER_ENTRY_NAME.into(),
        ),
        (
            "RDMA_NLDEV_ATTR_STAT_HWCOUNTER_ENTRY_VALUE",
            attr::STAT_HWCOUNTER_ENTRY_VALUE.into(),
        ),
        ("RDMA_COUNTER_MODE_NONE", mode::NONE.into()),
        ("RDMA_COUNTER_MODE_AUTO", mode::AUTO.into()),
        ("RDMA_COUNTER_MODE_MANUAL", mode::MANUAL.into()),
        ("RDMA_COUNTER_MASK_QP_TYPE", mask::QP_TYPE.into()),
        ("RDMA_COUNTER_MASK_PID", mask::PID.into()),
    ];
    for (name, value) in want {
        assert_eq!(values.get(*name), Some(value), "{name} in {path}");
    }
    // Newer headers (Linux 6.15+) have the optional-counter attribute; older ones lack it.
    if let Some(v) = values.get("RDMA_NLDEV_ATTR_STAT_OPCOUNTER_ENABLED") {
        assert_eq!(*v, i64::from(attr::STAT_OPCOUNTER_ENABLED));
    }
    let netlink = std::fs::read_to_string("/usr/include/linux/netlink.h").unwrap_or_default();
    if !netlink.is_empty() {
        assert!(
            netlink.contains(&format!("#define NETLINK_RDMA\t\t{NETLINK_RDMA}")),
            "NETLINK_RDMA"
        );
    }
}

/// Every enumerator of every `enum { ... }` in a C header: `NAME`, `NAME = number`,
/// `NAME = OTHER` and `NAME = 1 << n`.
fn enum_values(text: &str) -> std::collections::HashMap<String, i64> {
    let mut clean = String::new();
    let mut rest = text;
    while let Some(start) = rest.find("/*") {
        clean.push_str(&rest[..start]);
        rest = rest[start..]
            .find("*/")
            .map_or("", |end| &rest[start + end + 2..]);
    }
    clean.push_str(rest);
    let clean: String = clean
        .lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n");
    let mut values = std::collections::HashMap::new();
    let mut at = 0;
    while let Some(open) = clean[at..].find("enum") {
        let start = at + open;
        let (Some(brace), Some(close)) = (clean[start..].find('{'), clean[start..].find('}'))
        else {
            break;
        };
        if brace > close {
            at = start + 4;
            continue;
        }
        let body = &clean[start + brace + 1..start + close];
        // An enumerator this parser cannot evaluate leaves the ones after it unknown too.
        let mut next = Some(0i64);
        for item in body.split(',') {
            let item = item.trim();
            if item.is_empty() {
                continue;
            }
            let (name, value) = match item.split_once('=') {
                Some((name, expr)) => (name.trim(), eval(expr, &values)),
                None => (item, next),
            };
            if let Some(v) = value {
                values.insert(name.to_owned(), v);
            }
            next = value.map(|v| v + 1);
        }
        at = start + close + 1;
    }
    values
}

fn eval(expr: &str, known: &std::collections::HashMap<String, i64>) -> Option<i64> {
    let expr = expr
        .trim()
        .trim_start_matches('(')
        .trim_end_matches(')')
        .trim();
    if let Some((a, b)) = expr.split_once("<<") {
        return Some(eval(a, known)? << eval(b, known)?);
    }
    expr.parse().ok().or_else(|| known.get(expr).copied())
}
