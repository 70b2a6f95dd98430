//! The nldev messages Tally sends, the answers it reads, and (in [`answer`]) the kernel's side of
//! the same conversation, for responders that stand in for the kernel.
//!
//! Layouts follow `drivers/infiniband/core/nldev.c`: every answer starts with the device handle
//! (`fill_nldev_handle`: `DEV_INDEX`, `DEV_NAME`); a dump answer then holds one table
//! (`nla_nest_start_noflag`) of entries (`nla_nest_start_noflag`), each entry's inner tables
//! (`RES_QP` of a counter, `STAT_HWCOUNTERS`) opened with `nla_nest_start`, which sets
//! `NLA_F_NESTED`. The decoder accepts either form of every nest.

use super::consts::{attr, cmd, mode, nl, nl_type, RDMA_NL_NLDEV};
use super::wire::{Attr, DecodeError, Message, MessageWriter};

/// The netlink message type of nldev command `op`.
pub const fn nldev(op: u16) -> u16 {
    nl_type(RDMA_NL_NLDEV, op)
}

/// An RDMA device as nldev lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// The kernel's device index (the handle of every other request).
    pub index: u32,
    pub name: String,
    /// Ports are numbered 1..=ports.
    pub ports: u32,
}

/// A port's QP counter mode (`rdma statistic qp mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CounterMode {
    /// `enum rdma_nl_counter_mode`.
    pub mode: u32,
    /// `enum rdma_nl_counter_mask`, meaningful in auto mode.
    pub mask: u32,
}

impl CounterMode {
    pub const NONE: CounterMode = CounterMode {
        mode: mode::NONE,
        mask: 0,
    };

    /// Auto mode with one counter per process: every counter belongs to one pid.
    pub fn is_auto_pid(&self) -> bool {
        self.mode == mode::AUTO && self.mask & super::consts::mask::PID != 0
    }

    /// How `rdma statistic qp mode` words it.
    pub fn describe(&self) -> String {
        match self.mode {
            mode::NONE => "qp auto off".to_owned(),
            mode::AUTO if self.mask == 0 => "qp auto off".to_owned(),
            mode::AUTO => {
                let mut parts = Vec::new();
                if self.mask & super::consts::mask::QP_TYPE != 0 {
                    parts.push("type");
                }
                if self.mask & super::consts::mask::PID != 0 {
                    parts.push("pid");
                }
                format!("qp auto {} on", parts.join(","))
            }
            mode::MANUAL => "qp manual".to_owned(),
            other => format!("qp mode {other}"),
        }
    }
}

/// One QP counter (`rdma statistic qp show`): the QPs bound to it and its values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QpCounter {
    pub device_index: u32,
    pub device: String,
    pub port: u32,
    pub id: u32,
    pub mode: u32,
    /// The process the counter was created for (auto mode with the pid criterion).
    pub pid: Option<u32>,
    /// The kernel owner of a counter created for a kernel QP.
    pub kernel_name: Option<String>,
    /// The QP type criterion (auto mode by type).
    pub qp_type: Option<u8>,
    /// Local QP numbers bound to the counter.
    pub qps: Vec<u32>,
    /// The counter's values by name, in the driver's order.
    pub values: Vec<(String, u64)>,
}

/// One queue pair (`rdma resource show qp`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qp {
    pub device_index: u32,
    /// Absent until the QP is bound to a port (modified to INIT).
    pub port: Option<u32>,
    pub lqpn: u32,
    pub pid: Option<u32>,
    pub kernel_name: Option<String>,
    pub qp_type: Option<u8>,
    pub state: Option<u8>,
}

/// `RDMA_NLDEV_CMD_GET` dump: every device.
pub fn devices_request(seq: u32) -> Vec<u8> {
    MessageWriter::new(nldev(cmd::GET), nl::NLM_F_REQUEST | nl::NLM_F_DUMP, seq).finish()
}

/// `RDMA_NLDEV_CMD_STAT_GET` of one port's QP counter mode. `STAT_MODE` is present only so the
/// kernel answers with the mode rather than the counters (`stat_get_doit_qp` wants it; its value
/// is not read).
pub fn qp_mode_request(seq: u32, device_index: u32, port: u32) -> Vec<u8> {
    let mut w = MessageWriter::new(nldev(cmd::STAT_GET), nl::NLM_F_REQUEST | nl::NLM_F_ACK, seq);
    w.u32(attr::DEV_INDEX, device_index)
        .u32(attr::PORT_INDEX, port)
        .u32(attr::STAT_MODE, mode::MANUAL)
        .u32(attr::STAT_RES, u32::from(attr::RES_QP));
    w.finish()
}

/// `RDMA_NLDEV_CMD_STAT_SET`: auto mode with `mask` on one port (`rdma statistic qp set link
/// DEV/PORT auto type pid on` is mask `PID`; mask 0 turns auto mode off). `optional_counters`
/// adds `STAT_OPCOUNTER_ENABLED`.
pub fn set_auto_mode_request(
    seq: u32,
    device_index: u32,
    port: u32,
    mask: u32,
    optional_counters: Option<bool>,
) -> Vec<u8> {
    let mut w = MessageWriter::new(nldev(cmd::STAT_SET), nl::NLM_F_REQUEST | nl::NLM_F_ACK, seq);
    w.u32(attr::DEV_INDEX, device_index)
        .u32(attr::PORT_INDEX, port)
        .u32(attr::STAT_RES, u32::from(attr::RES_QP))
        .u32(attr::STAT_MODE, mode::AUTO)
        .u32(attr::STAT_AUTO_MODE_MASK, mask);
    if let Some(on) = optional_counters {
        w.u8(attr::STAT_OPCOUNTER_ENABLED, u8::from(on));
    }
    w.finish()
}

/// `RDMA_NLDEV_CMD_STAT_GET` dump of every QP counter of one device (the kernel dumps per
/// device: `res_get_common_dumpit` wants `DEV_INDEX`).
pub fn qp_counters_request(seq: u32, device_index: u32) -> Vec<u8> {
    let mut w = MessageWriter::new(
        nldev(cmd::STAT_GET),
        nl::NLM_F_REQUEST | nl::NLM_F_DUMP,
        seq,
    );
    w.u32(attr::DEV_INDEX, device_index)
        .u32(attr::STAT_RES, u32::from(attr::RES_QP));
    w.finish()
}

/// `RDMA_NLDEV_CMD_RES_QP_GET` dump of every QP of one device.
pub fn qps_request(seq: u32, device_index: u32) -> Vec<u8> {
    let mut w = MessageWriter::new(
        nldev(cmd::RES_QP_GET),
        nl::NLM_F_REQUEST | nl::NLM_F_DUMP,
        seq,
    );
    w.u32(attr::DEV_INDEX, device_index);
    w.finish()
}

fn expect_type(msg: &Message<'_>, op: u16) -> Result<(), DecodeError> {
    if msg.header.kind != nldev(op) {
        return Err(DecodeError::UnexpectedType {
            kind: msg.header.kind,
            expected: op,
        });
    }
    Ok(())
}

fn missing(name: &'static str) -> DecodeError {
    DecodeError::Missing { name }
}

/// The device handle every answer starts with.
#[derive(Default)]
struct Handle {
    index: Option<u32>,
    name: Option<String>,
}

impl Handle {
    /// Takes `a` when it is part of the handle.
    fn take(&mut self, a: &Attr<'_>) -> Result<bool, DecodeError> {
        match a.kind {
            attr::DEV_INDEX => self.index = Some(a.u32("DEV_INDEX")?),
            attr::DEV_NAME => self.name = Some(a.string("DEV_NAME")?.to_owned()),
            _ => return Ok(false),
        }
        Ok(true)
    }

    fn done(self) -> Result<(u32, String), DecodeError> {
        Ok((
            self.index.ok_or_else(|| missing("DEV_INDEX"))?,
            self.name.ok_or_else(|| missing("DEV_NAME"))?,
        ))
    }
}

/// One message of the `RDMA_NLDEV_CMD_GET` dump.
pub fn decode_device(msg: &Message<'_>) -> Result<DeviceInfo, DecodeError> {
    expect_type(msg, cmd::GET)?;
    let mut handle = Handle::default();
    let mut ports = None;
    for a in msg.attrs() {
        let a = a?;
        if !handle.take(&a)? && a.kind == attr::PORT_INDEX {
            ports = Some(a.u32("PORT_INDEX")?);
        }
    }
    let (index, name) = handle.done()?;
    Ok(DeviceInfo {
        index,
        name,
        ports: ports.ok_or_else(|| missing("PORT_INDEX"))?,
    })
}

/// The answer to [`qp_mode_request`]: device index, port and mode.
pub fn decode_qp_mode(msg: &Message<'_>) -> Result<(u32, u32, CounterMode), DecodeError> {
    expect_type(msg, cmd::STAT_GET)?;
    let mut handle = Handle::default();
    let (mut port, mut mode, mut mask) = (None, None, None);
    for a in msg.attrs() {
        let a = a?;
        if handle.take(&a)? {
            continue;
        }
        match a.kind {
            attr::PORT_INDEX => port = Some(a.u32("PORT_INDEX")?),
            attr::STAT_MODE => mode = Some(a.u32("STAT_MODE")?),
            attr::STAT_AUTO_MODE_MASK => mask = Some(a.u32("STAT_AUTO_MODE_MASK")?),
            _ => {}
        }
    }
    let (index, _) = handle.done()?;
    let mode = mode.ok_or_else(|| missing("STAT_MODE"))?;
    Ok((
        index,
        port.ok_or_else(|| missing("PORT_INDEX"))?,
        CounterMode {
            mode,
            mask: mask.unwrap_or(0),
        },
    ))
}

/// One message of the `RDMA_NLDEV_CMD_STAT_GET` dump: the counters it holds.
pub fn decode_qp_counters(msg: &Message<'_>) -> Result<Vec<QpCounter>, DecodeError> {
    expect_type(msg, cmd::STAT_GET)?;
    let mut handle = Handle::default();
    let mut tables = Vec::new();
    for a in msg.attrs() {
        let a = a?;
        if !handle.take(&a)? && a.kind == attr::STAT_COUNTER {
            tables.push(a);
        }
    }
    let (device_index, device) = handle.done()?;
    let mut out = Vec::new();
    for table in tables {
        for entry in table.nested() {
            let entry = entry?;
            if entry.kind != attr::STAT_COUNTER_ENTRY {
                continue;
            }
            out.push(decode_counter_entry(&entry, device_index, &device)?);
        }
    }
    Ok(out)
}

fn decode_counter_entry(
    entry: &Attr<'_>,
    device_index: u32,
    device: &str,
) -> Result<QpCounter, DecodeError> {
    let (mut port, mut id, mut counter_mode) = (None, None, None);
    let mut c = QpCounter {
        device_index,
        device: device.to_owned(),
        port: 0,
        id: 0,
        mode: 0,
        pid: None,
        kernel_name: None,
        qp_type: None,
        qps: Vec::new(),
        values: Vec::new(),
    };
    for a in entry.nested() {
        let a = a?;
        match a.kind {
            attr::PORT_INDEX => port = Some(a.u32("PORT_INDEX")?),
            attr::STAT_COUNTER_ID => id = Some(a.u32("STAT_COUNTER_ID")?),
            attr::STAT_MODE => counter_mode = Some(a.u32("STAT_MODE")?),
            attr::RES_TYPE => c.qp_type = Some(a.u8("RES_TYPE")?),
            attr::RES_PID => c.pid = Some(a.u32("RES_PID")?),
            attr::RES_KERN_NAME => c.kernel_name = Some(a.string("RES_KERN_NAME")?.to_owned()),
            attr::RES_QP => {
                for qp in a.nested() {
                    let qp = qp?;
                    if qp.kind != attr::RES_QP_ENTRY {
                        continue;
                    }
                    let mut lqpn = None;
                    for q in qp.nested() {
                        let q = q?;
                        if q.kind == attr::RES_LQPN {
                            lqpn = Some(q.u32("RES_LQPN")?);
                        }
                    }
                    c.qps.push(lqpn.ok_or_else(|| missing("RES_LQPN"))?);
                }
            }
            attr::STAT_HWCOUNTERS => {
                for e in a.nested() {
                    let e = e?;
                    if e.kind != attr::STAT_HWCOUNTER_ENTRY {
                        continue;
                    }
                    let (mut name, mut value) = (None, None);
                    for v in e.nested() {
                        let v = v?;
                        match v.kind {
                            attr::STAT_HWCOUNTER_ENTRY_NAME => {
                                name = Some(v.string("STAT_HWCOUNTER_ENTRY_NAME")?)
                            }
                            attr::STAT_HWCOUNTER_ENTRY_VALUE => {
                                value = Some(v.u64("STAT_HWCOUNTER_ENTRY_VALUE")?)
                            }
                            // PAD before the u64 on architectures that align it.
                            _ => {}
                        }
                    }
                    c.values.push((
                        name.ok_or_else(|| missing("STAT_HWCOUNTER_ENTRY_NAME"))?
                            .to_owned(),
                        value.ok_or_else(|| missing("STAT_HWCOUNTER_ENTRY_VALUE"))?,
                    ));
                }
            }
            _ => {}
        }
    }
    c.port = port.ok_or_else(|| missing("PORT_INDEX"))?;
    c.id = id.ok_or_else(|| missing("STAT_COUNTER_ID"))?;
    c.mode = counter_mode.ok_or_else(|| missing("STAT_MODE"))?;
    Ok(c)
}

/// One message of the `RDMA_NLDEV_CMD_RES_QP_GET` dump: the QPs it holds.
pub fn decode_qps(msg: &Message<'_>) -> Result<Vec<Qp>, DecodeError> {
    expect_type(msg, cmd::RES_QP_GET)?;
    let mut handle = Handle::default();
    let mut tables = Vec::new();
    for a in msg.attrs() {
        let a = a?;
        if !handle.take(&a)? && a.kind == attr::RES_QP {
            tables.push(a);
        }
    }
    let (device_index, _) = handle.done()?;
    let mut out = Vec::new();
    for table in tables {
        for entry in table.nested() {
            let entry = entry?;
            if entry.kind != attr::RES_QP_ENTRY {
                continue;
            }
            let mut qp = Qp {
                device_index,
                port: None,
                lqpn: 0,
                pid: None,
                kernel_name: None,
                qp_type: None,
                state: None,
            };
            let mut lqpn = None;
            for a in entry.nested() {
                let a = a?;
                match a.kind {
                    attr::PORT_INDEX => qp.port = Some(a.u32("PORT_INDEX")?),
                    attr::RES_LQPN => lqpn = Some(a.u32("RES_LQPN")?),
                    attr::RES_PID => qp.pid = Some(a.u32("RES_PID")?),
                    attr::RES_KERN_NAME => {
                        qp.kernel_name = Some(a.string("RES_KERN_NAME")?.to_owned())
                    }
                    attr::RES_TYPE => qp.qp_type = Some(a.u8("RES_TYPE")?),
                    attr::RES_STATE => qp.state = Some(a.u8("RES_STATE")?),
                    _ => {}
                }
            }
            qp.lqpn = lqpn.ok_or_else(|| missing("RES_LQPN"))?;
            out.push(qp);
        }
    }
    Ok(out)
}

/// An `NLMSG_ERROR` message: the error code (0 is an ack) and the extended ack's text.
pub fn decode_error(msg: &Message<'_>) -> Result<(i32, Option<String>), DecodeError> {
    let p = msg.payload;
    if p.len() < 4 {
        return Err(DecodeError::ShortError { len: p.len() });
    }
    let code = i32::from_ne_bytes([p[0], p[1], p[2], p[3]]);
    Ok((code, extack_message(msg)))
}

/// The `NLMSGERR_ATTR_MSG` text after the echoed request, when the kernel sent one; best effort
/// (the error code is what matters, so a garbled extension is ignored).
fn extack_message(msg: &Message<'_>) -> Option<String> {
    if msg.header.flags & nl::NLM_F_ACK_TLVS == 0 {
        return None;
    }
    let echoed = msg.payload.get(4..)?;
    let skip = if msg.header.flags & nl::NLM_F_CAPPED != 0 {
        super::wire::HEADER_LEN
    } else {
        let len = u32::from_ne_bytes(echoed.get(0..4)?.try_into().ok()?) as usize;
        super::wire::align4(len)
    };
    let tlvs = echoed.get(skip..)?;
    super::wire::attrs(tlvs)
        .map_while(Result::ok)
        .find(|a| a.kind == nl::NLMSGERR_ATTR_MSG)
        .and_then(|a| a.string("NLMSGERR_ATTR_MSG").ok().map(str::to_owned))
}

/// `NLMSG_DONE`'s payload: the dump's error code (0, or absent on old kernels, for success).
pub fn decode_done(msg: &Message<'_>) -> Result<i32, DecodeError> {
    match msg.payload {
        [] => Ok(0),
        [a, b, c, d, ..] => Ok(i32::from_ne_bytes([*a, *b, *c, *d])),
        p => Err(DecodeError::ShortError { len: p.len() }),
    }
}

/// A whole recorded dump (the datagrams of one answer, concatenated): each message decoded by
/// `decode`, up to `NLMSG_DONE`, which must be there. An error message is an error.
pub fn decode_dump<R>(
    buf: &[u8],
    mut decode: impl FnMut(&Message<'_>) -> Result<Vec<R>, DecodeError>,
) -> Result<Vec<R>, DecodeError> {
    let mut out = Vec::new();
    for message in super::wire::messages(buf) {
        let message = message?;
        match message.header.kind {
            nl::NLMSG_NOOP => {}
            nl::NLMSG_DONE => {
                let code = decode_done(&message)?;
                if code < 0 {
                    return Err(DecodeError::Refused { code });
                }
                return Ok(out);
            }
            nl::NLMSG_ERROR | nl::NLMSG_OVERRUN => {
                let (code, _) = decode_error(&message)?;
                return Err(DecodeError::Refused { code });
            }
            _ => out.extend(decode(&message)?),
        }
    }
    Err(DecodeError::NoDone)
}

/// The kernel's side: answers in the layout `nldev.c` writes, for a responder standing in for
/// the kernel and for the golden tests, which hold these to hand-written bytes.
pub mod answer {
    use super::*;

    fn handle(w: &mut MessageWriter, device_index: u32, device: &str) {
        w.u32(attr::DEV_INDEX, device_index)
            .string(attr::DEV_NAME, device);
    }

    /// One message of the `RDMA_NLDEV_CMD_GET` dump (the handle and the port count only; the
    /// kernel adds capability flags, GUIDs and more, which readers skip).
    pub fn device(seq: u32, port_id: u32, d: &DeviceInfo) -> Vec<u8> {
        let mut w = MessageWriter::with_port_id(nldev(cmd::GET), nl::NLM_F_MULTI, seq, port_id);
        handle(&mut w, d.index, &d.name);
        w.u32(attr::PORT_INDEX, d.ports);
        w.finish()
    }

    /// `stat_get_doit_qp`'s answer.
    pub fn qp_mode(
        seq: u32,
        port_id: u32,
        device_index: u32,
        device: &str,
        port: u32,
        m: CounterMode,
    ) -> Vec<u8> {
        let mut w = MessageWriter::with_port_id(nldev(cmd::STAT_GET), 0, seq, port_id);
        handle(&mut w, device_index, device);
        w.u32(attr::PORT_INDEX, port).u32(attr::STAT_MODE, m.mode);
        if m.mode == mode::AUTO {
            w.u32(attr::STAT_AUTO_MODE_MASK, m.mask);
        }
        w.finish()
    }

    /// `nldev_stat_set_doit`'s answer to a mode change.
    pub fn stat_set(seq: u32, port_id: u32, device_index: u32, device: &str, port: u32) -> Vec<u8> {
        let mut w = MessageWriter::with_port_id(nldev(cmd::STAT_SET), 0, seq, port_id);
        handle(&mut w, device_index, device);
        w.u32(attr::PORT_INDEX, port);
        w.finish()
    }

    /// One message of the counter dump (`res_get_common_dumpit` with
    /// `fill_res_counter_entry`); all counters must be of one device.
    pub fn qp_counters(seq: u32, port_id: u32, counters: &[QpCounter]) -> Vec<u8> {
        let mut w =
            MessageWriter::with_port_id(nldev(cmd::STAT_GET), nl::NLM_F_MULTI, seq, port_id);
        if let Some(first) = counters.first() {
            handle(&mut w, first.device_index, &first.device);
        }
        let table = w.begin_nested(attr::STAT_COUNTER, false);
        for c in counters {
            let entry = w.begin_nested(attr::STAT_COUNTER_ENTRY, false);
            w.u32(attr::PORT_INDEX, c.port)
                .u32(attr::STAT_COUNTER_ID, c.id)
                .u32(attr::STAT_MODE, c.mode);
            if let Some(t) = c.qp_type {
                w.u8(attr::RES_TYPE, t);
            }
            if let Some(name) = &c.kernel_name {
                w.string(attr::RES_KERN_NAME, name);
            } else if let Some(pid) = c.pid {
                w.u32(attr::RES_PID, pid);
            }
            let qps = w.begin_nested(attr::RES_QP, true);
            for q in &c.qps {
                let e = w.begin_nested(attr::RES_QP_ENTRY, true);
                w.u32(attr::RES_LQPN, *q);
                w.end_nested(e);
            }
            w.end_nested(qps);
            let hw = w.begin_nested(attr::STAT_HWCOUNTERS, true);
            for (name, value) in &c.values {
                let e = w.begin_nested(attr::STAT_HWCOUNTER_ENTRY, true);
                w.string(attr::STAT_HWCOUNTER_ENTRY_NAME, name)
                    .u64(attr::STAT_HWCOUNTER_ENTRY_VALUE, *value);
                w.end_nested(e);
            }
            w.end_nested(hw);
            w.end_nested(entry);
        }
        w.end_nested(table);
        w.finish()
    }

    /// One message of the QP dump (`fill_res_qp_entry`, without the per-type extras the
    /// kernel adds: RQPN, PSNs, PDN).
    pub fn qps(seq: u32, port_id: u32, device: &str, qps: &[Qp]) -> Vec<u8> {
        let mut w =
            MessageWriter::with_port_id(nldev(cmd::RES_QP_GET), nl::NLM_F_MULTI, seq, port_id);
        if let Some(first) = qps.first() {
            handle(&mut w, first.device_index, device);
        }
        let table = w.begin_nested(attr::RES_QP, false);
        for q in qps {
            let entry = w.begin_nested(attr::RES_QP_ENTRY, false);
            if let Some(p) = q.port {
                w.u32(attr::PORT_INDEX, p);
            }
            w.u32(attr::RES_LQPN, q.lqpn);
            if let Some(name) = &q.kernel_name {
                w.string(attr::RES_KERN_NAME, name);
            } else if let Some(pid) = q.pid {
                w.u32(attr::RES_PID, pid);
            }
            if let Some(t) = q.qp_type {
                w.u8(attr::RES_TYPE, t);
            }
            if let Some(s) = q.state {
                w.u8(attr::RES_STATE, s);
            }
            w.end_nested(entry);
        }
        w.end_nested(table);
        w.finish()
    }

    /// `NLMSG_DONE` closing a dump, with its error code.
    pub fn done(seq: u32, port_id: u32, code: i32) -> Vec<u8> {
        let mut w = MessageWriter::with_port_id(nl::NLMSG_DONE, nl::NLM_F_MULTI, seq, port_id);
        w.raw(&code.to_ne_bytes());
        w.finish()
    }

    /// `NLMSG_ERROR`: an ack (code 0) or a failure (`-errno`), echoing the request's header
    /// only (`NETLINK_CAP_ACK`).
    pub fn error(port_id: u32, request: &[u8], code: i32) -> Vec<u8> {
        let seq = request
            .get(8..12)
            .and_then(|b| b.try_into().ok())
            .map_or(0, u32::from_ne_bytes);
        let mut w = MessageWriter::with_port_id(nl::NLMSG_ERROR, nl::NLM_F_CAPPED, seq, port_id);
        w.raw(&code.to_ne_bytes());
        let mut echoed = [0u8; super::super::wire::HEADER_LEN];
        let n = request.len().min(echoed.len());
        echoed[..n].copy_from_slice(&request[..n]);
        w.raw(&echoed);
        w.finish()
    }
}
