//! NRI's wire: one unix socket carrying two logical connections (containerd/nri
//! `pkg/net/multiplex`), each a ttrpc byte stream.
//!
//! - A trunk frame is `u32 connection id`, `u32 payload length` (big-endian), then the payload.
//!   Connection 1 carries the runtime's calls of the plugin's service, connection 2 the plugin's
//!   calls of the runtime's. No frame opens or closes a connection.
//! - A ttrpc message is `u32 length`, `u32 stream id`, `u8 type`, `u8 flags` (big-endian), then
//!   a `Request` or `Response`. One message may span several trunk frames, and one frame may hold
//!   more than one message, so each connection is reassembled as a byte stream.
//! - The Go side reads a frame into a 4 KiB buffer when it expects a message header, so frames
//!   Tally sends carry at most 4 KiB.
//!
//! Parsing is synchronous over byte buffers: the plugin's loop feeds it what the socket gave.

use thiserror::Error;

/// The runtime calls the plugin on this connection.
pub const PLUGIN_CONN: u32 = 1;
/// The plugin calls the runtime on this connection.
pub const RUNTIME_CONN: u32 = 2;

pub const TRUNK_HEADER: usize = 8;
pub const TTRPC_HEADER: usize = 10;
/// The largest trunk frame the runtime sends (its write limit).
pub const MAX_FRAME: usize = 1 << 24;
/// The largest ttrpc message either side accepts.
pub const MAX_MESSAGE: usize = 4 << 20;
/// The largest frame Tally writes.
pub const SEND_FRAME: usize = 4096;

pub const TYPE_REQUEST: u8 = 1;
pub const TYPE_RESPONSE: u8 = 2;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum WireError {
    #[error("a trunk frame of {0} bytes is over the runtime's limit of 16 MiB")]
    FrameTooLarge(usize),
    #[error("a ttrpc message of {0} bytes is over the 4 MiB limit")]
    MessageTooLarge(usize),
}

/// Frames `payload` for connection `conn`, cut into frames of at most [`SEND_FRAME`] bytes.
pub fn trunk_frames(conn: u32, payload: &[u8]) -> Vec<u8> {
    let mut out =
        Vec::with_capacity(payload.len() + TRUNK_HEADER * (1 + payload.len() / SEND_FRAME));
    for chunk in payload.chunks(SEND_FRAME) {
        out.extend_from_slice(&conn.to_be_bytes());
        out.extend_from_slice(&(chunk.len() as u32).to_be_bytes());
        out.extend_from_slice(chunk);
    }
    out
}

/// One ttrpc message: header and payload.
pub fn ttrpc_message(stream: u32, kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(TTRPC_HEADER + payload.len());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(&stream.to_be_bytes());
    out.push(kind);
    out.push(0);
    out.extend_from_slice(payload);
    out
}

/// A ttrpc message read from a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub stream: u32,
    pub kind: u8,
    pub flags: u8,
    pub payload: Vec<u8>,
}

/// Reassembles the trunk into each connection's ttrpc messages.
#[derive(Debug, Default)]
pub struct Demux {
    trunk: Vec<u8>,
    plugin: Vec<u8>,
    runtime: Vec<u8>,
}

impl Demux {
    /// Takes bytes read from the socket; returns every whole message they completed, with the
    /// connection it came on. Frames for other connections are dropped, as the runtime does.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Vec<(u32, Message)>, WireError> {
        self.trunk.extend_from_slice(bytes);
        let mut at = 0;
        while self.trunk.len() - at >= TRUNK_HEADER {
            let conn = be32(&self.trunk[at..]);
            let len = be32(&self.trunk[at + 4..]) as usize;
            if len > MAX_FRAME {
                return Err(WireError::FrameTooLarge(len));
            }
            if self.trunk.len() - at - TRUNK_HEADER < len {
                break;
            }
            let payload = &self.trunk[at + TRUNK_HEADER..at + TRUNK_HEADER + len];
            match conn {
                PLUGIN_CONN => self.plugin.extend_from_slice(payload),
                RUNTIME_CONN => self.runtime.extend_from_slice(payload),
                _ => {}
            }
            at += TRUNK_HEADER + len;
        }
        self.trunk.drain(..at);
        let mut out = Vec::new();
        for (conn, buf) in [
            (PLUGIN_CONN, &mut self.plugin),
            (RUNTIME_CONN, &mut self.runtime),
        ] {
            while let Some(m) = take_message(buf)? {
                out.push((conn, m));
            }
        }
        Ok(out)
    }
}

/// The first whole message in `buf`, removed from it.
fn take_message(buf: &mut Vec<u8>) -> Result<Option<Message>, WireError> {
    if buf.len() < TTRPC_HEADER {
        return Ok(None);
    }
    let len = be32(buf) as usize;
    if len > MAX_MESSAGE {
        return Err(WireError::MessageTooLarge(len));
    }
    if buf.len() < TTRPC_HEADER + len {
        return Ok(None);
    }
    let m = Message {
        stream: be32(&buf[4..]),
        kind: buf[8],
        flags: buf[9],
        payload: buf[TTRPC_HEADER..TTRPC_HEADER + len].to_vec(),
    };
    buf.drain(..TTRPC_HEADER + len);
    Ok(Some(m))
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
