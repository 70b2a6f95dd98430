//! Where nldev messages go: the kernel's `NETLINK_RDMA` socket, or a unix seqpacket socket that
//! relays the same datagrams (a proxy in another network namespace, or a responder replaying
//! recorded dumps). The client does not know which; [`Transport`] is the seam.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::time::Duration;

use super::consts::{nl, NETLINK_RDMA};
use super::NetlinkError;

/// One request out, datagrams back.
pub trait Transport {
    /// Sends one request datagram.
    fn send(&mut self, request: &[u8]) -> io::Result<()>;
    /// Receives one datagram into `buf` and returns its full length, which is more than
    /// `buf.len()` when it did not fit (the rest is lost). 0 means the peer closed.
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize>;
}

/// The peer that answers nldev requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// The kernel, through `socket(AF_NETLINK, SOCK_RAW, NETLINK_RDMA)`.
    Kernel,
    /// A `SOCK_SEQPACKET` unix socket speaking the same datagrams.
    Unix(PathBuf),
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Kernel => f.write_str("NETLINK_RDMA"),
            Endpoint::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// A connected socket to an [`Endpoint`].
#[derive(Debug)]
pub struct Socket {
    fd: OwnedFd,
}

impl Socket {
    /// Opens and connects; every receive gives up after `timeout`.
    pub fn open(endpoint: &Endpoint, timeout: Duration) -> Result<Socket, NetlinkError> {
        let socket = match endpoint {
            Endpoint::Kernel => Self::kernel()?,
            Endpoint::Unix(path) => Self::unix(path)?,
        };
        socket
            .set_timeout(timeout)
            .map_err(|source| NetlinkError::Open { source })?;
        Ok(socket)
    }

    fn new(domain: i32, kind: i32, protocol: i32) -> Result<Socket, NetlinkError> {
        // SAFETY: socket(2) takes plain integers; a non-negative result is a descriptor we own.
        let fd = unsafe { libc::socket(domain, kind | libc::SOCK_CLOEXEC, protocol) };
        if fd < 0 {
            return Err(NetlinkError::Open {
                source: io::Error::last_os_error(),
            });
        }
        // SAFETY: fd was just returned by socket(2) and nothing else owns it.
        Ok(Socket {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    fn kernel() -> Result<Socket, NetlinkError> {
        let socket = Self::new(libc::AF_NETLINK, libc::SOCK_RAW, NETLINK_RDMA)?;
        // Echo only the request's header in errors, and send the kernel's error text; both are
        // optional (older kernels), so failures are ignored.
        for option in [nl::NETLINK_CAP_ACK, nl::NETLINK_EXT_ACK] {
            let _ = socket.set_int(nl::SOL_NETLINK, option, 1);
        }
        // SAFETY: sockaddr_nl is plain data; all-zero is a valid value.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // nl_pid 0: the kernel is the peer (and, for bind, picks our port id).
        let len = std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t;
        let ptr = std::ptr::addr_of!(addr).cast::<libc::sockaddr>();
        // SAFETY: addr is a valid sockaddr_nl of `len` bytes for both calls.
        let rc = unsafe { libc::bind(socket.fd.as_raw_fd(), ptr, len) };
        if rc != 0 {
            return Err(NetlinkError::Open {
                source: io::Error::last_os_error(),
            });
        }
        // SAFETY: as above.
        let rc = unsafe { libc::connect(socket.fd.as_raw_fd(), ptr, len) };
        if rc != 0 {
            return Err(NetlinkError::Open {
                source: io::Error::last_os_error(),
            });
        }
        Ok(socket)
    }

    fn unix(path: &std::path::Path) -> Result<Socket, NetlinkError> {
        let connect_error = |source| NetlinkError::Connect {
            path: path.to_path_buf(),
            source,
        };
        // SAFETY: sockaddr_un is plain data; all-zero is a valid value.
        let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
        addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
        let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
        if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
            return Err(connect_error(io::Error::new(
                io::ErrorKind::InvalidInput,
                "socket path too long or holds a NUL",
            )));
        }
        for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
            *dst = *src as libc::c_char;
        }
        let socket = Self::new(libc::AF_UNIX, libc::SOCK_SEQPACKET, 0)?;
        let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
        // SAFETY: addr is a valid, NUL-terminated sockaddr_un of `len` bytes.
        let rc = unsafe {
            libc::connect(
                socket.fd.as_raw_fd(),
                std::ptr::addr_of!(addr).cast::<libc::sockaddr>(),
                len,
            )
        };
        if rc != 0 {
            return Err(connect_error(io::Error::last_os_error()));
        }
        Ok(socket)
    }

    fn set_int(&self, level: i32, option: i32, value: i32) -> io::Result<()> {
        // SAFETY: the option value is a valid c_int of the length passed.
        let rc = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                level,
                option,
                std::ptr::addr_of!(value).cast(),
                std::mem::size_of::<i32>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    fn set_timeout(&self, timeout: Duration) -> io::Result<()> {
        let tv = libc::timeval {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_usec: libc::suseconds_t::from(timeout.subsec_micros()),
        };
        // SAFETY: tv is a valid timeval of the length passed.
        let rc = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                std::ptr::addr_of!(tv).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

impl Transport for Socket {
    fn send(&mut self, request: &[u8]) -> io::Result<()> {
        loop {
            // SAFETY: request is a valid buffer of its length.
            let n = unsafe {
                libc::send(
                    self.fd.as_raw_fd(),
                    request.as_ptr().cast(),
                    request.len(),
                    libc::MSG_NOSIGNAL,
                )
            };
            if n >= 0 {
                return if n as usize == request.len() {
                    Ok(())
                } else {
                    Err(io::Error::new(io::ErrorKind::WriteZero, "short send"))
                };
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            // SAFETY: buf is a valid, writable buffer of its length. MSG_TRUNC makes the result
            // the datagram's real length (netlink and unix seqpacket sockets both honour it).
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_TRUNC,
                )
            };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}
