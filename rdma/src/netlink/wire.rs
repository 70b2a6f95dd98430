//! Netlink framing: `struct nlmsghdr` and `struct nlattr` (linux/netlink.h), in host byte order,
//! every message and attribute padded to 4 bytes (`NLMSG_ALIGN`, `NLA_ALIGN`).
//!
//! The decoder trusts no length: a message or attribute that claims more bytes than its container
//! holds, a length shorter than its own header, or trailing bytes too short for a header are
//! errors, never a panic or an out-of-bounds read.

use super::consts::nl;

/// `sizeof(struct nlmsghdr)`.
pub const HEADER_LEN: usize = 16;
/// `sizeof(struct nlattr)`.
pub const ATTR_HEADER_LEN: usize = 4;

/// `NLMSG_ALIGN` / `NLA_ALIGN`.
pub const fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// Why bytes are not a well-formed nldev message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("{have} bytes left, too short for a {what} header")]
    ShortHeader { what: &'static str, have: usize },
    #[error("{what} length {len} is shorter than its header")]
    LengthTooSmall { what: &'static str, len: usize },
    #[error("{what} length {len} exceeds the {have} bytes left")]
    Truncated {
        what: &'static str,
        len: usize,
        have: usize,
    },
    #[error("attribute {name} has {len} payload bytes, expected {expected}")]
    BadSize {
        name: &'static str,
        len: usize,
        expected: usize,
    },
    #[error("attribute {name} is not a NUL-terminated UTF-8 string")]
    BadString { name: &'static str },
    #[error("required attribute {name} is missing")]
    Missing { name: &'static str },
    #[error("message type {kind:#06x} is not nldev command {expected}")]
    UnexpectedType { kind: u16, expected: u16 },
    #[error("error message too short ({len} bytes)")]
    ShortError { len: usize },
    #[error("the datagram was {len} bytes, more than the {capacity}-byte buffer")]
    DatagramTruncated { len: usize, capacity: usize },
    #[error("the dump ended without NLMSG_DONE")]
    NoDone,
    #[error("the dump holds an error message (code {code})")]
    Refused { code: i32 },
}

/// A `struct nlmsghdr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub len: u32,
    pub kind: u16,
    pub flags: u16,
    pub seq: u32,
    pub port_id: u32,
}

impl Header {
    fn read(b: &[u8]) -> Header {
        Header {
            len: u32_at(b, 0),
            kind: u16::from_ne_bytes([b[4], b[5]]),
            flags: u16::from_ne_bytes([b[6], b[7]]),
            seq: u32_at(b, 8),
            port_id: u32_at(b, 12),
        }
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// One message: its header and the bytes after it, up to `nlmsg_len`.
#[derive(Debug, Clone, Copy)]
pub struct Message<'a> {
    pub header: Header,
    pub payload: &'a [u8],
}

impl<'a> Message<'a> {
    /// The message's top-level attributes (nldev messages have no family header).
    pub fn attrs(&self) -> Attrs<'a> {
        attrs(self.payload)
    }
}

/// The messages of one datagram, in order. After the first error it yields nothing more.
pub fn messages(buf: &[u8]) -> Messages<'_> {
    Messages { rest: buf }
}

#[derive(Debug, Clone)]
pub struct Messages<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for Messages<'a> {
    type Item = Result<Message<'a>, DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let have = self.rest.len();
        let result = (|| {
            if have < HEADER_LEN {
                return Err(DecodeError::ShortHeader {
                    what: "nlmsghdr",
                    have,
                });
            }
            let header = Header::read(self.rest);
            let len = header.len as usize;
            if len < HEADER_LEN {
                return Err(DecodeError::LengthTooSmall { what: "nlmsg", len });
            }
            if len > have {
                return Err(DecodeError::Truncated {
                    what: "nlmsg",
                    len,
                    have,
                });
            }
            let payload = &self.rest[HEADER_LEN..len];
            self.rest = &self.rest[align4(len).min(have)..];
            Ok(Message { header, payload })
        })();
        if result.is_err() {
            self.rest = &[];
        }
        Some(result)
    }
}

/// One attribute; `kind` without the nested and byte-order flags.
#[derive(Debug, Clone, Copy)]
pub struct Attr<'a> {
    pub kind: u16,
    /// `NLA_F_NESTED` was set (the kernel sets it on some nests and not on others).
    pub nested_flag: bool,
    pub payload: &'a [u8],
}

impl<'a> Attr<'a> {
    pub fn u8(&self, name: &'static str) -> Result<u8, DecodeError> {
        match self.payload {
            [v] => Ok(*v),
            p => Err(bad_size(name, p.len(), 1)),
        }
    }

    pub fn u32(&self, name: &'static str) -> Result<u32, DecodeError> {
        match self.payload {
            [a, b, c, d] => Ok(u32::from_ne_bytes([*a, *b, *c, *d])),
            p => Err(bad_size(name, p.len(), 4)),
        }
    }

    pub fn u64(&self, name: &'static str) -> Result<u64, DecodeError> {
        let bytes: [u8; 8] = self
            .payload
            .try_into()
            .map_err(|_| bad_size(name, self.payload.len(), 8))?;
        Ok(u64::from_ne_bytes(bytes))
    }

    /// A `NLA_NUL_STRING`: the bytes up to the terminating NUL, which must be there.
    pub fn string(&self, name: &'static str) -> Result<&'a str, DecodeError> {
        let bad = || DecodeError::BadString { name };
        let end = self.payload.iter().position(|b| *b == 0).ok_or_else(bad)?;
        std::str::from_utf8(&self.payload[..end]).map_err(|_| bad())
    }

    /// The attributes nested in this one.
    pub fn nested(&self) -> Attrs<'a> {
        attrs(self.payload)
    }
}

fn bad_size(name: &'static str, len: usize, expected: usize) -> DecodeError {
    DecodeError::BadSize {
        name,
        len,
        expected,
    }
}

/// The attributes in `buf`, in order. After the first error it yields nothing more.
pub fn attrs(buf: &[u8]) -> Attrs<'_> {
    Attrs { rest: buf }
}

#[derive(Debug, Clone)]
pub struct Attrs<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for Attrs<'a> {
    type Item = Result<Attr<'a>, DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let have = self.rest.len();
        let result = (|| {
            if have < ATTR_HEADER_LEN {
                return Err(DecodeError::ShortHeader {
                    what: "nlattr",
                    have,
                });
            }
            let len = u16::from_ne_bytes([self.rest[0], self.rest[1]]) as usize;
            let raw_kind = u16::from_ne_bytes([self.rest[2], self.rest[3]]);
            if len < ATTR_HEADER_LEN {
                return Err(DecodeError::LengthTooSmall {
                    what: "nlattr",
                    len,
                });
            }
            if len > have {
                return Err(DecodeError::Truncated {
                    what: "nlattr",
                    len,
                    have,
                });
            }
            let attr = Attr {
                kind: raw_kind & nl::NLA_TYPE_MASK,
                nested_flag: raw_kind & nl::NLA_F_NESTED != 0,
                payload: &self.rest[ATTR_HEADER_LEN..len],
            };
            self.rest = &self.rest[align4(len).min(have)..];
            Ok(attr)
        })();
        if result.is_err() {
            self.rest = &[];
        }
        Some(result)
    }
}

/// Builds one message: header, then attributes, each padded; `finish` writes `nlmsg_len`.
#[derive(Debug, Clone)]
pub struct MessageWriter {
    buf: Vec<u8>,
}

/// An open nest: where its header starts.
#[derive(Debug)]
#[must_use = "a nest must be closed with end_nested"]
pub struct Nest(usize);

impl MessageWriter {
    pub fn new(kind: u16, flags: u16, seq: u32) -> Self {
        Self::with_port_id(kind, flags, seq, 0)
    }

    /// A message as the kernel addresses it to a socket (`port_id` is the receiver's).
    pub fn with_port_id(kind: u16, flags: u16, seq: u32, port_id: u32) -> Self {
        let mut buf = Vec::with_capacity(256);
        buf.extend_from_slice(&0u32.to_ne_bytes());
        buf.extend_from_slice(&kind.to_ne_bytes());
        buf.extend_from_slice(&flags.to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&port_id.to_ne_bytes());
        Self { buf }
    }

    /// Raw payload bytes (the error code of an `NLMSG_ERROR` or `NLMSG_DONE`), padded.
    pub fn raw(&mut self, bytes: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(bytes);
        self.pad();
        self
    }

    pub fn attr(&mut self, kind: u16, payload: &[u8]) -> &mut Self {
        let len = ATTR_HEADER_LEN + payload.len();
        // An attribute longer than u16 cannot be framed; nothing Tally writes comes near it.
        let len = u16::try_from(len).unwrap_or(u16::MAX);
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(payload);
        self.pad();
        self
    }

    pub fn u8(&mut self, kind: u16, v: u8) -> &mut Self {
        self.attr(kind, &[v])
    }

    pub fn u32(&mut self, kind: u16, v: u32) -> &mut Self {
        self.attr(kind, &v.to_ne_bytes())
    }

    /// A u64 as `nla_put_u64_64bit` writes it on architectures with efficient unaligned access
    /// (x86-64, arm64): no `PAD` attribute before it.
    pub fn u64(&mut self, kind: u16, v: u64) -> &mut Self {
        self.attr(kind, &v.to_ne_bytes())
    }

    /// A `NLA_NUL_STRING`, as `nla_put_string` writes it: the bytes and a NUL.
    pub fn string(&mut self, kind: u16, s: &str) -> &mut Self {
        let mut payload = Vec::with_capacity(s.len() + 1);
        payload.extend_from_slice(s.as_bytes());
        payload.push(0);
        self.attr(kind, &payload)
    }

    /// Opens a nest; `flag` sets `NLA_F_NESTED` (the kernel's `nla_nest_start`) or not
    /// (`nla_nest_start_noflag`).
    pub fn begin_nested(&mut self, kind: u16, flag: bool) -> Nest {
        let at = self.buf.len();
        let kind = if flag { kind | nl::NLA_F_NESTED } else { kind };
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        Nest(at)
    }

    pub fn end_nested(&mut self, nest: Nest) -> &mut Self {
        let len = u16::try_from(self.buf.len() - nest.0).unwrap_or(u16::MAX);
        self.buf[nest.0..nest.0 + 2].copy_from_slice(&len.to_ne_bytes());
        self
    }

    pub fn finish(mut self) -> Vec<u8> {
        let len = u32::try_from(self.buf.len()).unwrap_or(u32::MAX);
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf
    }

    fn pad(&mut self) {
        self.buf.resize(align4(self.buf.len()), 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_round_trip_with_padding() {
        let mut w = MessageWriter::new(0x1401, nl::NLM_F_REQUEST, 7);
        w.u32(1, 42).string(2, "mlx5_0").u8(26, 2);
        let nest = w.begin_nested(80, true);
        w.u64(83, u64::MAX);
        w.end_nested(nest);
        let bytes = w.finish();
        assert_eq!(bytes.len() % 4, 0);
        let msgs: Vec<_> = messages(&bytes).collect::<Result<_, _>>().unwrap();
        assert_eq!(msgs.len(), 1);
        assert_eq!(msgs[0].header.seq, 7);
        let attrs: Vec<_> = msgs[0].attrs().collect::<Result<_, _>>().unwrap();
        assert_eq!(attrs[0].u32("a").unwrap(), 42);
        assert_eq!(attrs[1].string("b").unwrap(), "mlx5_0");
        assert_eq!(attrs[2].u8("c").unwrap(), 2);
        assert!(attrs[3].nested_flag);
        assert_eq!(attrs[3].kind, 80);
        let inner: Vec<_> = attrs[3].nested().collect::<Result<_, _>>().unwrap();
        assert_eq!(inner[0].u64("d").unwrap(), u64::MAX);
    }

    #[test]
    fn lengths_that_lie_are_errors() {
        // nlmsg_len smaller than the header.
        let mut b = MessageWriter::new(1, 0, 0).finish();
        b[0] = 8;
        assert!(matches!(
            messages(&b).next(),
            Some(Err(DecodeError::LengthTooSmall { .. }))
        ));
        // An attribute claiming more than the message holds.
        assert!(matches!(
            attrs(&[8, 0, 1, 0, 0, 0]).next(),
            Some(Err(DecodeError::Truncated { .. }))
        ));
        // Two stray bytes after the last attribute.
        let mut it = attrs(&[5, 0, 26, 0, 1, 0, 0, 0, 9, 9]);
        assert!(it.next().unwrap().is_ok());
        assert!(matches!(
            it.next(),
            Some(Err(DecodeError::ShortHeader { .. }))
        ));
        assert!(it.next().is_none());
        // A string without its NUL.
        let a = Attr {
            kind: 2,
            nested_flag: false,
            payload: b"mlx5",
        };
        assert!(a.string("name").is_err());
    }
}
