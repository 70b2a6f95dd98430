//! Test support: a transport answering from a closure (the kernel's side played by the test),
//! request readers, and a unix seqpacket server for the socket transport.
#![allow(dead_code, reason = "each test binary uses a different part")]
#![expect(
    clippy::unwrap_used,
    reason = "test harness: a failed setup step fails the test"
)]

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Mutex};

use tally_rdma::netlink::consts::attr;
use tally_rdma::netlink::wire;
use tally_rdma::netlink::Transport;

/// Answers each request with the datagrams `answer` returns; records every request.
pub struct Scripted<F> {
    answer: F,
    pending: VecDeque<Vec<u8>>,
    pub sent: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl<F: FnMut(&[u8]) -> Vec<Vec<u8>>> Scripted<F> {
    pub fn new(answer: F) -> Self {
        Self {
            answer,
            pending: VecDeque::new(),
            sent: Arc::default(),
        }
    }
}

impl<F: FnMut(&[u8]) -> Vec<Vec<u8>>> Transport for Scripted<F> {
    fn send(&mut self, request: &[u8]) -> io::Result<()> {
        self.sent.lock().unwrap().push(request.to_vec());
        let answer = (self.answer)(request);
        self.pending.extend(answer);
        Ok(())
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(datagram) = self.pending.pop_front() else {
            return Err(io::Error::from(io::ErrorKind::WouldBlock));
        };
        let n = datagram.len().min(buf.len());
        buf[..n].copy_from_slice(&datagram[..n]);
        Ok(datagram.len())
    }
}

/// The sequence number of a request.
pub fn seq(request: &[u8]) -> u32 {
    u32::from_ne_bytes(request[8..12].try_into().unwrap())
}

/// The nldev op of a request (`RDMA_NL_GET_OP`).
pub fn op(request: &[u8]) -> u16 {
    tally_rdma::netlink::consts::nl_op(u16::from_ne_bytes([request[4], request[5]]))
}

/// A top-level u32 attribute of a request.
pub fn u32_attr(request: &[u8], kind: u16) -> Option<u32> {
    let message = wire::messages(request).next()?.ok()?;
    message
        .attrs()
        .filter_map(Result::ok)
        .find(|a| a.kind == kind)
        .and_then(|a| a.u32("attr").ok())
}

pub fn device_index(request: &[u8]) -> Option<u32> {
    u32_attr(request, attr::DEV_INDEX)
}

/// Rewrites the sequence number of every message in a recorded datagram.
pub fn with_seq(datagram: &[u8], seq: u32) -> Vec<u8> {
    let mut out = datagram.to_vec();
    let mut at = 0;
    while at + 16 <= out.len() {
        let len = u32::from_ne_bytes(out[at..at + 4].try_into().unwrap()) as usize;
        out[at + 8..at + 12].copy_from_slice(&seq.to_ne_bytes());
        if len < 16 {
            break;
        }
        at += wire::align4(len);
    }
    out
}

/// A unix seqpacket server on `path` answering one connection with `answer`.
pub fn serve_seqpacket(
    path: &std::path::Path,
    mut answer: impl FnMut(&[u8]) -> Vec<Vec<u8>> + Send + 'static,
) -> std::thread::JoinHandle<()> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    // SAFETY: plain libc calls on descriptors this function owns; addr is a valid sockaddr_un.
    let listener = unsafe {
        let fd = libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0);
        let fd = OwnedFd::from_raw_fd(fd);
        let mut addr: libc::sockaddr_un = std::mem::zeroed();
        addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
        let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
        for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
            *d = *s as libc::c_char;
        }
        let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
        assert_eq!(
            libc::bind(fd.as_raw_fd(), std::ptr::addr_of!(addr).cast(), len),
            0
        );
        assert_eq!(libc::listen(fd.as_raw_fd(), 4), 0);
        fd
    };
    std::thread::spawn(move || {
        // SAFETY: accept/recv/send on descriptors owned here, into buffers of the given sizes.
        unsafe {
            let conn = libc::accept(
                listener.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            );
            if conn < 0 {
                return;
            }
            let conn = OwnedFd::from_raw_fd(conn);
            let mut buf = vec![0u8; 65536];
            loop {
                let n = libc::recv(conn.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0);
                if n <= 0 {
                    return;
                }
                for datagram in answer(&buf[..n as usize]) {
                    libc::send(
                        conn.as_raw_fd(),
                        datagram.as_ptr().cast(),
                        datagram.len(),
                        libc::MSG_NOSIGNAL,
                    );
                }
            }
        }
    })
}

/// A copy of `rdma/tests/fixtures/<name>` in a temp dir, whose counters tests rewrite.
pub struct Fixture {
    pub dir: tempfile::TempDir,
}

impl Fixture {
    pub fn new(name: &str) -> Fixture {
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name);
        let dir = tempfile::tempdir().unwrap();
        copy_tree(&src, dir.path());
        Fixture { dir }
    }

    pub fn root(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// Writes `value` into `ports/<port>/<kind>/<counter>` of `device`.
    pub fn set(&self, device: &str, port: u32, kind: &str, counter: &str, value: u64) {
        let path = self.root().join(format!(
            "class/infiniband/{device}/ports/{port}/{kind}/{counter}"
        ));
        std::fs::write(path, format!("{value}\n")).unwrap();
    }
}

/// Copies a tree, keeping symbolic links as links.
pub fn copy_tree(src: &std::path::Path, dst: &std::path::Path) {
    std::fs::create_dir_all(dst).unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let entry = entry.unwrap();
        let (from, to) = (entry.path(), dst.join(entry.file_name()));
        let kind = entry.file_type().unwrap();
        if kind.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&from).unwrap(), &to).unwrap();
        } else if kind.is_dir() {
            copy_tree(&from, &to);
        } else {
            std::fs::copy(&from, &to).unwrap();
        }
    }
}
