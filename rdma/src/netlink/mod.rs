//! RDMA netlink (nldev): our own codec and a small client.
//!
//! [`wire`] frames messages and attributes, [`nldev`] builds the requests and decodes the answers
//! Tally needs (devices, QP counter mode, QP counters, QPs), [`Client`] runs the exchanges over a
//! [`Transport`]: the kernel's `NETLINK_RDMA` socket or a unix seqpacket socket relaying the same
//! bytes.

pub mod consts;
pub mod nldev;
mod transport;
pub mod wire;

use std::io;
use std::path::PathBuf;
use std::time::{Duration, Instant};

pub use nldev::{CounterMode, DeviceInfo, Qp, QpCounter};
pub use transport::{Endpoint, Socket, Transport};
pub use wire::DecodeError;

use consts::nl;
use wire::Message;

/// Why an nldev exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// `socket`, `bind` or `connect` of the netlink socket failed (`EPROTONOSUPPORT`: a kernel
    /// without RDMA netlink; `EPERM`, `EACCES`: not permitted).
    #[error("opening an RDMA netlink socket failed")]
    Open {
        #[source]
        source: io::Error,
    },
    /// Connecting to a unix socket endpoint failed.
    #[error("connecting to {} failed", path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("sending {op} failed")]
    Send {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    /// Receiving failed; `WouldBlock` / `TimedOut` when no answer came in time.
    #[error("receiving the answer to {op} failed")]
    Recv {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("the peer closed the socket during {op}")]
    Closed { op: &'static str },
    #[error("{op}: no complete answer within {} ms", timeout.as_millis())]
    Deadline { op: &'static str, timeout: Duration },
    /// The kernel (or the endpoint) answered with an error code.
    #[error("{op} was refused: {}{}", io::Error::from_raw_os_error(*errno), message.as_deref().map(|m| format!(" ({m})")).unwrap_or_default())]
    Kernel {
        op: &'static str,
        errno: i32,
        message: Option<String>,
    },
    #[error("malformed answer to {op}")]
    Decode {
        op: &'static str,
        #[source]
        source: DecodeError,
    },
}

/// What a failure means for the feature.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Availability {
    /// RDMA netlink does not exist here (no `CONFIG_INFINIBAND`, no endpoint).
    Unsupported,
    /// It exists but this process may not use it.
    NotPermitted,
    /// It exists and failed this time.
    Failed,
}

impl NetlinkError {
    pub fn availability(&self) -> Availability {
        let errno = match self {
            NetlinkError::Open { source } | NetlinkError::Connect { source, .. } => {
                source.raw_os_error()
            }
            NetlinkError::Kernel { errno, .. } => Some(*errno),
            _ => None,
        };
        match (self, errno) {
            (_, Some(libc::EPERM | libc::EACCES)) => Availability::NotPermitted,
            (
                NetlinkError::Open { .. },
                Some(libc::EPROTONOSUPPORT | libc::EAFNOSUPPORT | libc::ENOENT),
            ) => Availability::Unsupported,
            (NetlinkError::Connect { .. }, Some(libc::ENOENT | libc::ECONNREFUSED)) => {
                Availability::Unsupported
            }
            _ => Availability::Failed,
        }
    }

    /// A label-safe reason: `unsupported`, `not_permitted`, `timeout`, `refused`, `malformed`,
    /// `closed`, `io`.
    pub fn reason(&self) -> &'static str {
        match self.availability() {
            Availability::Unsupported => return "unsupported",
            Availability::NotPermitted => return "not_permitted",
            Availability::Failed => {}
        }
        match self {
            NetlinkError::Recv { source, .. }
                if matches!(
                    source.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                "timeout"
            }
            NetlinkError::Deadline { .. } => "timeout",
            NetlinkError::Kernel { .. } => "refused",
            NetlinkError::Decode { .. } => "malformed",
            NetlinkError::Closed { .. } => "closed",
            _ => "io",
        }
    }
}

/// The largest datagram accepted: the kernel sizes dump messages to the reader's buffer, up to
/// 32 KiB (`netlink_dump`), so twice that always fits.
const RECV_BUFFER: usize = 64 * 1024;

/// nldev requests over a [`Transport`], one at a time.
#[derive(Debug)]
pub struct Client<T = Socket> {
    transport: T,
    seq: u32,
    buf: Vec<u8>,
    deadline: Duration,
}

impl Client<Socket> {
    /// Connects to `endpoint`; one exchange (all datagrams of a dump) may take `timeout`.
    pub fn connect(endpoint: &Endpoint, timeout: Duration) -> Result<Self, NetlinkError> {
        Ok(Client::new(Socket::open(endpoint, timeout)?, timeout))
    }
}

impl<T: Transport> Client<T> {
    pub fn new(transport: T, deadline: Duration) -> Self {
        Self {
            transport,
            // Sequence numbers only need to tell our exchanges apart.
            seq: 1,
            buf: vec![0; RECV_BUFFER],
            deadline,
        }
    }

    pub fn transport(&self) -> &T {
        &self.transport
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1).max(1);
        self.seq
    }

    /// Every RDMA device.
    pub fn devices(&mut self) -> Result<Vec<DeviceInfo>, NetlinkError> {
        const OP: &str = "RDMA_NLDEV_CMD_GET";
        let seq = self.next_seq();
        let mut out = Vec::new();
        self.exchange(OP, &nldev::devices_request(seq), seq, true, |m| {
            out.push(nldev::decode_device(m)?);
            Ok(())
        })?;
        Ok(out)
    }

    /// A port's QP counter mode.
    pub fn qp_mode(&mut self, device_index: u32, port: u32) -> Result<CounterMode, NetlinkError> {
        const OP: &str = "RDMA_NLDEV_CMD_STAT_GET (mode)";
        let seq = self.next_seq();
        let mut found = None;
        self.exchange(
            OP,
            &nldev::qp_mode_request(seq, device_index, port),
            seq,
            false,
            |m| {
                found = Some(nldev::decode_qp_mode(m)?.2);
                Ok(())
            },
        )?;
        found.ok_or(NetlinkError::Decode {
            op: OP,
            source: DecodeError::Missing { name: "STAT_MODE" },
        })
    }

    /// Sets auto mode with `mask` on a port (0: auto mode off). Needs CAP_NET_ADMIN.
    pub fn set_auto_mode(
        &mut self,
        device_index: u32,
        port: u32,
        mask: u32,
        optional_counters: Option<bool>,
    ) -> Result<(), NetlinkError> {
        const OP: &str = "RDMA_NLDEV_CMD_STAT_SET";
        let seq = self.next_seq();
        let request =
            nldev::set_auto_mode_request(seq, device_index, port, mask, optional_counters);
        self.exchange(OP, &request, seq, false, |_| Ok(()))
    }

    /// Every QP counter of a device, with its values.
    pub fn qp_counters(&mut self, device_index: u32) -> Result<Vec<QpCounter>, NetlinkError> {
        const OP: &str = "RDMA_NLDEV_CMD_STAT_GET (dump)";
        let seq = self.next_seq();
        let mut out = Vec::new();
        self.exchange(
            OP,
            &nldev::qp_counters_request(seq, device_index),
            seq,
            true,
            |m| {
                out.extend(nldev::decode_qp_counters(m)?);
                Ok(())
            },
        )?;
        Ok(out)
    }

    /// Every QP of a device, with the pid that created it.
    pub fn qps(&mut self, device_index: u32) -> Result<Vec<Qp>, NetlinkError> {
        const OP: &str = "RDMA_NLDEV_CMD_RES_QP_GET";
        let seq = self.next_seq();
        let mut out = Vec::new();
        self.exchange(OP, &nldev::qps_request(seq, device_index), seq, true, |m| {
            out.extend(nldev::decode_qps(m)?);
            Ok(())
        })?;
        Ok(out)
    }

    /// Sends `request` and feeds each answer message with sequence number `seq` to
    /// `on_message`, until `NLMSG_DONE` (a dump) or the ack (a request with `NLM_F_ACK`).
    /// Messages of other sequence numbers (late answers to an exchange that timed out) are
    /// skipped.
    fn exchange(
        &mut self,
        op: &'static str,
        request: &[u8],
        seq: u32,
        dump: bool,
        mut on_message: impl FnMut(&Message<'_>) -> Result<(), DecodeError>,
    ) -> Result<(), NetlinkError> {
        let decode = |source| NetlinkError::Decode { op, source };
        self.transport
            .send(request)
            .map_err(|source| NetlinkError::Send { op, source })?;
        let deadline = Instant::now() + self.deadline;
        loop {
            let n = self
                .transport
                .recv(&mut self.buf)
                .map_err(|source| NetlinkError::Recv { op, source })?;
            if n == 0 {
                return Err(NetlinkError::Closed { op });
            }
            if n > self.buf.len() {
                return Err(decode(DecodeError::DatagramTruncated {
                    len: n,
                    capacity: self.buf.len(),
                }));
            }
            for message in wire::messages(&self.buf[..n]) {
                let message = message.map_err(decode)?;
                if message.header.seq != seq {
                    continue;
                }
                match message.header.kind {
                    nl::NLMSG_NOOP => {}
                    nl::NLMSG_ERROR => {
                        let (code, text) = nldev::decode_error(&message).map_err(decode)?;
                        if code != 0 {
                            return Err(NetlinkError::Kernel {
                                op,
                                errno: code.saturating_neg(),
                                message: text,
                            });
                        }
                        if !dump {
                            return Ok(());
                        }
                    }
                    nl::NLMSG_DONE if dump => {
                        let code = nldev::decode_done(&message).map_err(decode)?;
                        if code < 0 {
                            return Err(NetlinkError::Kernel {
                                op,
                                errno: code.saturating_neg(),
                                message: None,
                            });
                        }
                        return Ok(());
                    }
                    nl::NLMSG_OVERRUN => {
                        return Err(NetlinkError::Kernel {
                            op,
                            errno: libc::ENOBUFS,
                            message: None,
                        })
                    }
                    _ => on_message(&message).map_err(decode)?,
                }
            }
            if Instant::now() > deadline {
                return Err(NetlinkError::Deadline {
                    op,
                    timeout: self.deadline,
                });
            }
        }
    }
}
