//! One bounded HTTP/1.1 GET of a server's metrics, from inside the server's network namespace.
//!
//! Every request runs on a thread of its own that joins the target's network namespace
//! (`setns`) before it opens the socket (a socket belongs to the namespace it was made in), so
//! a server bound to loopback inside a pod is reached where it listens. The request has one
//! deadline for connect, request and the whole response, and the body a size limit: a server
//! that hangs, trickles or sends without end costs at most the deadline.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// What to fetch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// `/proc/<pid>/ns/net` of a process in the server's namespace; `None`: the agent's own.
    pub netns: Option<PathBuf>,
    pub addr: SocketAddr,
    pub path: String,
}

/// Limits of one request.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub timeout: Duration,
    pub max_body: usize,
}

/// Why a request failed; `reason()` is its `reason` label.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("joining the network namespace of {path}")]
    Netns {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("connecting to {addr}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("no complete answer within {0:?}")]
    Timeout(Duration),
    #[error("reading the answer")]
    Io(#[source] std::io::Error),
    #[error("HTTP status {0}")]
    Status(u16),
    #[error("the body is larger than {0} bytes")]
    TooLarge(usize),
    #[error("a malformed HTTP answer: {0}")]
    Malformed(&'static str),
}

impl Error {
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Netns { .. } => "netns",
            Error::Connect { .. } => "connect",
            Error::Timeout(_) => "timeout",
            Error::Io(_) => "io",
            Error::Status(_) => "status",
            Error::TooLarge(_) => "too_large",
            Error::Malformed(_) => "malformed",
        }
    }
}

/// Joins the network namespace at `path` for the calling thread.
pub fn enter_netns(path: &std::path::Path) -> Result<(), Error> {
    let fail = |source| Error::Netns {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(fail)?;
    // SAFETY: setns with a valid namespace file descriptor only changes the calling thread's
    // namespace; the descriptor outlives the call.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(fail(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Fetches `request.path` and returns the body. Call on a thread that may change namespace.
pub fn get(request: &Request, limits: Limits) -> Result<Vec<u8>, Error> {
    let deadline = Instant::now() + limits.timeout;
    if let Some(ns) = &request.netns {
        enter_netns(ns)?;
    }
    let left = |deadline: Instant| {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or(Error::Timeout(limits.timeout))
    };
    let mut stream = TcpStream::connect_timeout(&request.addr, left(deadline)?).map_err(
        |source| match source.kind() {
            std::io::ErrorKind::TimedOut => Error::Timeout(limits.timeout),
            _ => Error::Connect {
                addr: request.addr,
                source,
            },
        },
    )?;
    let host = match request.addr {
        SocketAddr::V4(a) => format!("{}:{}", a.ip(), a.port()),
        SocketAddr::V6(a) => format!("[{}]:{}", a.ip(), a.port()),
    };
    // The agent's pid in its User-Agent: a server's log tells which node agent asked.
    let head = format!(
        "GET {} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: tally/{} (pid {})\r\nAccept: text/plain;version=0.0.4\r\nAccept-Encoding: identity\r\nConnection: close\r\n\r\n",
        request.path,
        env!("CARGO_PKG_VERSION"),
        std::process::id()
    );
    stream
        .set_write_timeout(Some(left(deadline)?))
        .map_err(Error::Io)?;
    stream
        .write_all(head.as_bytes())
        .map_err(|e| io(e, limits))?;
    // Headers are small; the body is bounded by the limit, plus room for chunk framing.
    let cap = limits.max_body + 64 * 1024;
    let mut raw = Vec::with_capacity(16 * 1024);
    let mut buf = [0u8; 16 * 1024];
    let mut parsed: Option<Head> = None;
    loop {
        stream
            .set_read_timeout(Some(left(deadline)?))
            .map_err(Error::Io)?;
        let n = match stream.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io(e, limits)),
        };
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&buf[..n]);
        if parsed.is_none() {
            parsed = parse_head(&raw)?;
            if let Some(h) = &parsed {
                if h.status != 200 {
                    return Err(Error::Status(h.status));
                }
                if h.content_length.is_some_and(|l| l > limits.max_body) {
                    return Err(Error::TooLarge(limits.max_body));
                }
            } else if raw.len() > 64 * 1024 {
                return Err(Error::Malformed("headers longer than 64 KiB"));
            }
        }
        if let Some(h) = &parsed {
            let body = &raw[h.len..];
            if h.content_length.is_some_and(|l| body.len() >= l) {
                break;
            }
            if h.chunked && chunked_complete(body) {
                break;
            }
        }
        if raw.len() > cap {
            return Err(Error::TooLarge(limits.max_body));
        }
    }
    let head = parsed.ok_or(Error::Malformed("the connection closed before the headers"))?;
    let body = &raw[head.len..];
    let body = if head.chunked {
        dechunk(body)?
    } else if let Some(l) = head.content_length {
        if body.len() < l {
            return Err(Error::Malformed(
                "the connection closed before the body's end",
            ));
        }
        body[..l].to_vec()
    } else {
        body.to_vec()
    };
    if body.len() > limits.max_body {
        return Err(Error::TooLarge(limits.max_body));
    }
    Ok(body)
}

fn io(e: std::io::Error, limits: Limits) -> Error {
    match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
            Error::Timeout(limits.timeout)
        }
        _ => Error::Io(e),
    }
}

/// A response's status line and the headers that frame its body.
#[derive(Debug)]
struct Head {
    status: u16,
    content_length: Option<usize>,
    chunked: bool,
    /// Bytes up to and including the blank line.
    len: usize,
}

/// The head of a response, once `raw` holds all of it.
fn parse_head(raw: &[u8]) -> Result<Option<Head>, Error> {
    let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok(None);
    };
    let text =
        std::str::from_utf8(&raw[..end]).map_err(|_| Error::Malformed("non-UTF-8 headers"))?;
    let mut lines = text.split("\r\n");
    let status = lines
        .next()
        .filter(|l| l.starts_with("HTTP/1."))
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or(Error::Malformed("no HTTP/1.x status line"))?;
    let mut head = Head {
        status,
        content_length: None,
        chunked: false,
        len: end + 4,
    };
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            head.content_length = Some(
                value
                    .parse()
                    .map_err(|_| Error::Malformed("a bad Content-Length"))?,
            );
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            head.chunked = value.to_ascii_lowercase().contains("chunked");
        } else if name.eq_ignore_ascii_case("content-encoding")
            && !value.eq_ignore_ascii_case("identity")
        {
            return Err(Error::Malformed("a compressed body (asked for identity)"));
        }
    }
    if head.chunked {
        head.content_length = None;
    }
    Ok(Some(head))
}

/// Whether a chunked body has its last (zero-length) chunk.
fn chunked_complete(body: &[u8]) -> bool {
    // Walked only once the body ends as a last chunk would, so a long body is not walked
    // again on every read.
    body.ends_with(b"\r\n\r\n") && matches!(walk_chunks(body), Ok((_, true)))
}

fn dechunk(body: &[u8]) -> Result<Vec<u8>, Error> {
    match walk_chunks(body)? {
        (out, true) => Ok(out),
        (_, false) => Err(Error::Malformed("the connection closed inside a chunk")),
    }
}

/// The data of a chunked body so far, and whether its last chunk arrived.
fn walk_chunks(mut body: &[u8]) -> Result<(Vec<u8>, bool), Error> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = body.windows(2).position(|w| w == b"\r\n") else {
            return Ok((out, false));
        };
        let size_text =
            std::str::from_utf8(&body[..eol]).map_err(|_| Error::Malformed("a bad chunk size"))?;
        let size_text = size_text.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| Error::Malformed("a bad chunk size"))?;
        let data = eol + 2;
        if size == 0 {
            return Ok((out, true));
        }
        let Some(end) = data.checked_add(size) else {
            return Err(Error::Malformed("a bad chunk size"));
        };
        if body.len() < end + 2 {
            return Ok((out, false));
        }
        out.extend_from_slice(&body[data..end]);
        body = &body[end + 2..];
    }
}
