//! Numbers of the RDMA netlink ABI.
//!
//! From the kernel's UAPI headers `include/uapi/linux/netlink.h` and
//! `include/uapi/rdma/rdma_netlink.h`. The nldev enums are ABI ("don't change the order or add
//! anything between, this is ABI!"), so each value is written out with the enumerator it comes
//! from; `tests/golden.rs` checks them against the installed header when there is one.

/// `NETLINK_RDMA` (linux/netlink.h): the protocol of RDMA netlink sockets.
pub const NETLINK_RDMA: i32 = 20;

/// `RDMA_NL_NLDEV`: the nldev client (RDMA device interface) of RDMA netlink.
pub const RDMA_NL_NLDEV: u16 = 5;

/// `RDMA_NL_GET_TYPE(client, op)`: `(client << 10) + op`.
pub const fn nl_type(client: u16, op: u16) -> u16 {
    (client << 10) + op
}

/// `RDMA_NL_GET_CLIENT(type)`: bits 10..16.
pub const fn nl_client(kind: u16) -> u16 {
    (kind >> 10) & 0x3f
}

/// `RDMA_NL_GET_OP(type)`: bits 0..10.
pub const fn nl_op(kind: u16) -> u16 {
    kind & 0x3ff
}

/// `enum rdma_nldev_command`.
pub mod cmd {
    /// `RDMA_NLDEV_CMD_GET` (can dump): devices.
    pub const GET: u16 = 1;
    /// `RDMA_NLDEV_CMD_PORT_GET` (can dump).
    pub const PORT_GET: u16 = 5;
    /// `RDMA_NLDEV_CMD_RES_QP_GET` (can dump): queue pairs and the pids that created them.
    pub const RES_QP_GET: u16 = 10;
    /// `RDMA_NLDEV_CMD_STAT_SET`: counter mode (auto / manual binding). Needs CAP_NET_ADMIN.
    pub const STAT_SET: u16 = 16;
    /// `RDMA_NLDEV_CMD_STAT_GET` (can dump): counter mode, or the counters and their values.
    pub const STAT_GET: u16 = 17;
}

/// `enum rdma_nldev_attr`, the attributes Tally reads or writes.
pub mod attr {
    /// `RDMA_NLDEV_ATTR_PAD` (= `RDMA_NLDEV_ATTR_UNSPEC`): padding before 64-bit values.
    pub const PAD: u16 = 0;
    /// `RDMA_NLDEV_ATTR_DEV_INDEX`, u32.
    pub const DEV_INDEX: u16 = 1;
    /// `RDMA_NLDEV_ATTR_DEV_NAME`, string.
    pub const DEV_NAME: u16 = 2;
    /// `RDMA_NLDEV_ATTR_PORT_INDEX`, u32 (in a device answer: the number of ports).
    pub const PORT_INDEX: u16 = 3;
    /// `RDMA_NLDEV_ATTR_RES_QP`, nested table.
    pub const RES_QP: u16 = 19;
    /// `RDMA_NLDEV_ATTR_RES_QP_ENTRY`, nested.
    pub const RES_QP_ENTRY: u16 = 20;
    /// `RDMA_NLDEV_ATTR_RES_LQPN`, u32: local QP number.
    pub const RES_LQPN: u16 = 21;
    /// `RDMA_NLDEV_ATTR_RES_TYPE`, u8: QP type.
    pub const RES_TYPE: u16 = 26;
    /// `RDMA_NLDEV_ATTR_RES_STATE`, u8: QP state.
    pub const RES_STATE: u16 = 27;
    /// `RDMA_NLDEV_ATTR_RES_PID`, u32: the creating process, in the reader's pid namespace.
    pub const RES_PID: u16 = 28;
    /// `RDMA_NLDEV_ATTR_RES_KERN_NAME`, string: the owner of a kernel resource (no pid).
    pub const RES_KERN_NAME: u16 = 29;
    /// `RDMA_NLDEV_ATTR_STAT_MODE`, u32: `enum rdma_nl_counter_mode`.
    pub const STAT_MODE: u16 = 74;
    /// `RDMA_NLDEV_ATTR_STAT_RES`, u32: the resource counted (`RES_QP`).
    pub const STAT_RES: u16 = 75;
    /// `RDMA_NLDEV_ATTR_STAT_AUTO_MODE_MASK`, u32: `enum rdma_nl_counter_mask`.
    pub const STAT_AUTO_MODE_MASK: u16 = 76;
    /// `RDMA_NLDEV_ATTR_STAT_COUNTER`, nested table.
    pub const STAT_COUNTER: u16 = 77;
    /// `RDMA_NLDEV_ATTR_STAT_COUNTER_ENTRY`, nested.
    pub const STAT_COUNTER_ENTRY: u16 = 78;
    /// `RDMA_NLDEV_ATTR_STAT_COUNTER_ID`, u32.
    pub const STAT_COUNTER_ID: u16 = 79;
    /// `RDMA_NLDEV_ATTR_STAT_HWCOUNTERS`, nested table.
    pub const STAT_HWCOUNTERS: u16 = 80;
    /// `RDMA_NLDEV_ATTR_STAT_HWCOUNTER_ENTRY`, nested.
    pub const STAT_HWCOUNTER_ENTRY: u16 = 81;
    /// `RDMA_NLDEV_ATTR_STAT_HWCOUNTER_ENTRY_NAME`, string.
    pub const STAT_HWCOUNTER_ENTRY_NAME: u16 = 82;
    /// `RDMA_NLDEV_ATTR_STAT_HWCOUNTER_ENTRY_VALUE`, u64.
    pub const STAT_HWCOUNTER_ENTRY_VALUE: u16 = 83;
    /// `RDMA_NLDEV_ATTR_STAT_OPCOUNTER_ENABLED`, u8: bind the port's optional counters (on mlx5
    /// `rdma_tx_bytes` and friends) to auto-mode QP counters too. Added in Linux 6.15
    /// ("RDMA/core: Add support to optional-counters binding configuration"), after
    /// `RDMA_NLDEV_ATTR_RES_SUBTYPE` (98), `DEV_TYPE`, `PARENT_NAME`, `NAME_ASSIGN_TYPE`,
    /// `EVENT_TYPE` and `SYS_ATTR_MONITOR_MODE`. Older kernels parse requests liberally and
    /// ignore it.
    pub const STAT_OPCOUNTER_ENABLED: u16 = 104;
}

/// `enum rdma_nl_counter_mode`.
pub mod mode {
    /// `RDMA_COUNTER_MODE_NONE`: QPs count into the port's default counter only.
    pub const NONE: u32 = 0;
    /// `RDMA_COUNTER_MODE_AUTO`: a QP is bound to a counter by the criteria of the mask.
    pub const AUTO: u32 = 1;
    /// `RDMA_COUNTER_MODE_MANUAL`: QPs were bound to counters explicitly.
    pub const MANUAL: u32 = 2;
}

/// `enum rdma_nl_counter_mask`.
pub mod mask {
    /// `RDMA_COUNTER_MASK_QP_TYPE`.
    pub const QP_TYPE: u32 = 1;
    /// `RDMA_COUNTER_MASK_PID`: one counter per process.
    pub const PID: u32 = 1 << 1;
}

/// Message types and flags from linux/netlink.h.
pub mod nl {
    pub const NLMSG_NOOP: u16 = 1;
    pub const NLMSG_ERROR: u16 = 2;
    pub const NLMSG_DONE: u16 = 3;
    pub const NLMSG_OVERRUN: u16 = 4;
    pub const NLM_F_REQUEST: u16 = 1;
    pub const NLM_F_MULTI: u16 = 2;
    pub const NLM_F_ACK: u16 = 4;
    /// `NLM_F_ROOT | NLM_F_MATCH`.
    pub const NLM_F_DUMP: u16 = 0x300;
    /// In an error message: the echoed request carries no payload.
    pub const NLM_F_CAPPED: u16 = 0x100;
    /// In an error message: extended-ack attributes follow the echoed request.
    pub const NLM_F_ACK_TLVS: u16 = 0x200;
    pub const NLA_F_NESTED: u16 = 0x8000;
    pub const NLA_F_NET_BYTEORDER: u16 = 0x4000;
    pub const NLA_TYPE_MASK: u16 = !(NLA_F_NESTED | NLA_F_NET_BYTEORDER);
    /// `NLMSGERR_ATTR_MSG`: the extended ack's error text.
    pub const NLMSGERR_ATTR_MSG: u16 = 1;
    pub const SOL_NETLINK: i32 = 270;
    pub const NETLINK_CAP_ACK: i32 = 10;
    pub const NETLINK_EXT_ACK: i32 = 11;
}
