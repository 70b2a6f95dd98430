//! A fake RDMA node for one agent: a sysfs tree (a copy of a fixture in
//! `rdma/tests/fixtures/`) whose counters the test advances, and an nldev responder on a unix
//! seqpacket socket that plays the kernel's side from a script — device list, QP counter mode
//! (changed by `STAT_SET` as the kernel would), counter dumps whose values advance on every dump,
//! QP dumps. The agent reaches both through its normal paths: `[paths] sys_root` and
//! `[rdma] netlink_socket`.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use tally_rdma::netlink::consts::{attr, cmd, mode, nl, nl_op};
use tally_rdma::netlink::nldev::{answer, CounterMode, DeviceInfo, Qp, QpCounter};
use tally_rdma::netlink::wire;

/// A sysfs tree in a temp dir.
#[derive(Debug)]
pub struct FakeSysfs {
    pub dir: tempfile::TempDir,
}

impl FakeSysfs {
    /// A copy of `rdma/tests/fixtures/<fixture>` (`mlx5` or `plain`).
    pub fn new(fixture: &str) -> FakeSysfs {
        let src = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../rdma/tests/fixtures")
            .join(fixture);
        let dir = tempfile::tempdir().expect("tempdir");
        copy_tree(&src, dir.path());
        FakeSysfs { dir }
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    fn counter_path(&self, device: &str, port: u32, kind: &str, counter: &str) -> PathBuf {
        self.root().join(format!(
            "class/infiniband/{device}/ports/{port}/{kind}/{counter}"
        ))
    }

    pub fn get(&self, device: &str, port: u32, kind: &str, counter: &str) -> u64 {
        let path = self.counter_path(device, port, kind, counter);
        std::fs::read_to_string(&path)
            .expect("read counter")
            .trim()
            .parse()
            .expect("counter value")
    }

    /// Writes a counter the way the kernel shows it (one number, a newline).
    pub fn set(&self, device: &str, port: u32, kind: &str, counter: &str, value: u64) {
        let path = self.counter_path(device, port, kind, counter);
        std::fs::write(path, format!("{value}\n")).expect("write counter");
    }

    pub fn add(&self, device: &str, port: u32, kind: &str, counter: &str, delta: u64) {
        let now = self.get(device, port, kind, counter);
        self.set(device, port, kind, counter, now + delta);
    }
}

fn copy_tree(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).expect("mkdir");
    for entry in std::fs::read_dir(src).expect("fixture dir") {
        let entry = entry.expect("dir entry");
        let (from, to) = (entry.path(), dst.join(entry.file_name()));
        let kind = entry.file_type().expect("file type");
        if kind.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&from).expect("readlink"), &to)
                .expect("symlink");
        } else if kind.is_dir() {
            copy_tree(&from, &to);
        } else {
            std::fs::copy(&from, &to).expect("copy");
        }
    }
}

/// A QP counter in the script: its values after `n` dumps of its device are `n × per_dump`.
#[derive(Debug, Clone)]
pub struct ScriptCounter {
    pub device_index: u32,
    pub port: u32,
    pub id: u32,
    /// Set for auto mode by pid; `None` for a manually bound counter (attributed through its QPs).
    pub pid: Option<u32>,
    pub qps: Vec<u32>,
    /// (`rdma_tx_bytes`, `rdma_rx_bytes`, `rdma_tx_packets`, `rdma_rx_packets`) per dump.
    pub per_dump: [u64; 4],
}

/// What the fake kernel knows.
#[derive(Debug, Clone, Default)]
pub struct Script {
    pub devices: Vec<DeviceInfo>,
    /// (device index, port) → mode; absent ports are off.
    pub modes: Vec<((u32, u32), CounterMode)>,
    pub counters: Vec<ScriptCounter>,
    pub qps: Vec<Qp>,
}

#[derive(Debug, Default)]
struct State {
    script: Script,
    /// Counter dumps served, per device index.
    dumps: HashMap<u32, u64>,
    /// Values stop advancing at this many dumps.
    frozen: Option<HashMap<u32, u64>>,
    /// `STAT_SET` requests: (device index, port, mask).
    sets: Vec<(u32, u32, u32)>,
}

const NAMES: [&str; 4] = [
    "rdma_tx_bytes",
    "rdma_rx_bytes",
    "rdma_tx_packets",
    "rdma_rx_packets",
];

impl State {
    fn mode(&self, device: u32, port: u32) -> CounterMode {
        self.script
            .modes
            .iter()
            .find(|(k, _)| *k == (device, port))
            .map_or(CounterMode::NONE, |(_, m)| *m)
    }

    fn name(&self, device: u32) -> Option<String> {
        self.script
            .devices
            .iter()
            .find(|d| d.index == device)
            .map(|d| d.name.clone())
    }

    /// Dumps that count for values (frozen or not).
    fn effective_dumps(&self, device: u32) -> u64 {
        let n = self.dumps.get(&device).copied().unwrap_or(0);
        match &self.frozen {
            Some(f) => n.min(f.get(&device).copied().unwrap_or(0)),
            None => n,
        }
    }

    fn answer(&mut self, req: &[u8]) -> Vec<Vec<u8>> {
        let Some(Ok(message)) = wire::messages(req).next() else {
            return Vec::new();
        };
        let h = message.header;
        let seq = h.seq;
        let attrs: HashMap<u16, u32> = message
            .attrs()
            .filter_map(Result::ok)
            .filter_map(|a| a.u32("attr").ok().map(|v| (a.kind, v)))
            .collect();
        let einval = || vec![answer::error(PORT_ID, req, -libc::EINVAL)];
        let dump = h.flags & nl::NLM_F_DUMP == nl::NLM_F_DUMP;
        match (nl_op(h.kind), dump) {
            (cmd::GET, true) => {
                let mut out: Vec<Vec<u8>> = self
                    .script
                    .devices
                    .iter()
                    .map(|d| answer::device(seq, PORT_ID, d))
                    .collect();
                out.push(answer::done(seq, PORT_ID, 0));
                out
            }
            (cmd::STAT_GET, false) => {
                // The kernel answers the mode only when STAT_MODE is present (stat_get_doit_qp).
                let (Some(dev), Some(port), Some(_)) = (
                    attrs.get(&attr::DEV_INDEX),
                    attrs.get(&attr::PORT_INDEX),
                    attrs.get(&attr::STAT_MODE),
                ) else {
                    return einval();
                };
                let Some(name) = self.name(*dev) else {
                    return einval();
                };
                vec![
                    answer::qp_mode(seq, PORT_ID, *dev, &name, *port, self.mode(*dev, *port)),
                    answer::error(PORT_ID, req, 0),
                ]
            }
            (cmd::STAT_SET, false) => {
                let (Some(dev), Some(port), Some(m)) = (
                    attrs.get(&attr::DEV_INDEX),
                    attrs.get(&attr::PORT_INDEX),
                    attrs.get(&attr::STAT_MODE),
                ) else {
                    return einval();
                };
                let Some(name) = self.name(*dev) else {
                    return einval();
                };
                if *m != mode::AUTO {
                    return einval();
                }
                let mask = attrs.get(&attr::STAT_AUTO_MODE_MASK).copied().unwrap_or(0);
                self.sets.push((*dev, *port, mask));
                let new = if mask == 0 {
                    CounterMode::NONE
                } else {
                    CounterMode {
                        mode: mode::AUTO,
                        mask,
                    }
                };
                self.script.modes.retain(|(k, _)| *k != (*dev, *port));
                self.script.modes.push(((*dev, *port), new));
                vec![
                    answer::stat_set(seq, PORT_ID, *dev, &name, *port),
                    answer::error(PORT_ID, req, 0),
                ]
            }
            (cmd::STAT_GET, true) => {
                let Some(dev) = attrs.get(&attr::DEV_INDEX).copied() else {
                    return einval();
                };
                let Some(name) = self.name(dev) else {
                    return einval();
                };
                *self.dumps.entry(dev).or_default() += 1;
                let n = self.effective_dumps(dev);
                let counters: Vec<QpCounter> = self
                    .script
                    .counters
                    .iter()
                    .filter(|c| c.device_index == dev)
                    .map(|c| QpCounter {
                        device_index: dev,
                        device: name.clone(),
                        port: c.port,
                        id: c.id,
                        mode: if c.pid.is_some() {
                            mode::AUTO
                        } else {
                            mode::MANUAL
                        },
                        pid: c.pid,
                        kernel_name: None,
                        qp_type: None,
                        qps: c.qps.clone(),
                        values: std::iter::once(("out_of_sequence".to_owned(), 0))
                            .chain(
                                NAMES
                                    .iter()
                                    .zip(c.per_dump)
                                    .map(|(k, v)| ((*k).to_owned(), v * n)),
                            )
                            .collect(),
                    })
                    .collect();
                // One counter per message, two messages per datagram, DONE on its own: the
                // reader must join a dump across datagrams.
                let messages: Vec<Vec<u8>> = counters
                    .chunks(1)
                    .map(|c| answer::qp_counters(seq, PORT_ID, c))
                    .collect();
                let mut out: Vec<Vec<u8>> = messages.chunks(2).map(<[Vec<u8>]>::concat).collect();
                out.push(answer::done(seq, PORT_ID, 0));
                out
            }
            (cmd::RES_QP_GET, true) => {
                let Some(dev) = attrs.get(&attr::DEV_INDEX).copied() else {
                    return einval();
                };
                let Some(name) = self.name(dev) else {
                    return einval();
                };
                let qps: Vec<Qp> = self
                    .script
                    .qps
                    .iter()
                    .filter(|q| q.device_index == dev)
                    .cloned()
                    .collect();
                vec![
                    answer::qps(seq, PORT_ID, &name, &qps),
                    answer::done(seq, PORT_ID, 0),
                ]
            }
            _ => vec![answer::error(PORT_ID, req, -libc::EOPNOTSUPP)],
        }
    }
}

/// The port id the fake kernel addresses its answers to (any; the agent does not check it).
const PORT_ID: u32 = 0x7a11;

/// The responder; dropping it stops it.
#[derive(Debug)]
pub struct Responder {
    pub dir: tempfile::TempDir,
    socket: PathBuf,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    listener: Arc<OwnedFd>,
    thread: Option<JoinHandle<()>>,
}

impl Responder {
    pub fn start(script: Script) -> Responder {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("nldev.sock");
        let listener = Arc::new(listen(&socket));
        let state = Arc::new(Mutex::new(State {
            script,
            ..State::default()
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (state, stop, listener) = (state.clone(), stop.clone(), listener.clone());
            std::thread::spawn(move || accept_loop(&listener, &state, &stop))
        };
        Responder {
            dir,
            socket,
            state,
            stop,
            listener,
            thread: Some(thread),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The `[rdma]` section pointing the agent here.
    pub fn config(&self, allow_auto_mode: bool) -> String {
        format!(
            "[rdma]\nnetlink_socket = \"{}\"\nallow_qp_counter_auto_mode = {allow_auto_mode}\n",
            self.socket.display()
        )
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `STAT_SET` requests so far: (device index, port, mask).
    pub fn sets(&self) -> Vec<(u32, u32, u32)> {
        self.state().sets.clone()
    }

    /// Counter dumps served for a device.
    pub fn dumps(&self, device_index: u32) -> u64 {
        self.state().dumps.get(&device_index).copied().unwrap_or(0)
    }

    /// Stops the values advancing; returns the dumps they stop at, per device.
    pub fn freeze(&self) -> HashMap<u32, u64> {
        let mut state = self.state();
        let at = state.dumps.clone();
        state.frozen = Some(at.clone());
        at
    }

    pub fn mode(&self, device_index: u32, port: u32) -> CounterMode {
        self.state().mode(device_index, port)
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // SAFETY: shutdown(2) on our own listening socket wakes the blocked accept.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn listen(path: &Path) -> OwnedFd {
    // SAFETY: plain socket calls on a descriptor owned here; addr is a valid sockaddr_un.
    unsafe {
        let fd = libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let fd = OwnedFd::from_raw_fd(fd);
        let mut addr: libc::sockaddr_un = std::mem::zeroed();
        addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
        let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
        assert!(bytes.len() < addr.sun_path.len(), "socket path too long");
        for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
            *d = *s as libc::c_char;
        }
        let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
        let rc = libc::bind(fd.as_raw_fd(), std::ptr::addr_of!(addr).cast(), len);
        assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
        assert_eq!(libc::listen(fd.as_raw_fd(), 8), 0);
        fd
    }
}

/// Serves every connection (the agent, `tally check`) on a thread of its own.
fn accept_loop(listener: &OwnedFd, state: &Arc<Mutex<State>>, stop: &Arc<AtomicBool>) {
    let mut connections = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: accept(2) on our listening socket; no address is asked for.
        let fd = unsafe {
            libc::accept4(
                listener.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        if fd < 0 {
            continue;
        }
        // SAFETY: fd was just returned by accept4 and nothing else owns it.
        let conn = unsafe { OwnedFd::from_raw_fd(fd) };
        let (state, stop) = (state.clone(), stop.clone());
        connections.push(std::thread::spawn(move || serve(&conn, &state, &stop)));
    }
    for c in connections {
        let _ = c.join();
    }
}

fn serve(conn: &OwnedFd, state: &Mutex<State>, stop: &AtomicBool) {
    let timeout = libc::timeval {
        tv_sec: 0,
        tv_usec: 200_000,
    };
    // SAFETY: setsockopt with a valid timeval of the length passed.
    unsafe {
        libc::setsockopt(
            conn.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            std::ptr::addr_of!(timeout).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        );
    }
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: recv into a buffer of the length passed.
        let n = unsafe { libc::recv(conn.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n == 0 {
            return;
        }
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
            ) {
                continue;
            }
            return;
        }
        let answers = state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .answer(&buf[..n as usize]);
        for datagram in answers {
            // SAFETY: send of a buffer of the length passed.
            let sent = unsafe {
                libc::send(
                    conn.as_raw_fd(),
                    datagram.as_ptr().cast(),
                    datagram.len(),
                    libc::MSG_NOSIGNAL,
                )
            };
            if sent < 0 {
                return;
            }
        }
    }
}
