//! Finding inference servers on the node without the API server: processes whose command line
//! runs an engine of the table, and the TCP ports they listen on, from the process's own view
//! of its network namespace (`/proc/<pid>/net/tcp{,6}`) joined to the socket inodes among its
//! open files (`/proc/<pid>/fd`).
//!
//! A scan reads the command line of processes it has not seen before only: a process's command
//! line is read once in its life, so a node of thousands of processes costs one directory
//! listing of `/proc` per interval.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use super::engines::{self, Engine};

/// A process that runs an inference engine.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub pid: u32,
    /// Its start time (clock ticks since boot): with the pid, names this process and no other.
    pub start: u64,
    pub engine: &'static Engine,
    /// The model its command line names, for engines whose series carry none.
    pub model: String,
    /// The metrics port its command line names.
    pub port: Option<u16>,
}

/// What a scan knows of each process it listed.
#[derive(Debug, Default)]
pub struct Scanner {
    proc_root: PathBuf,
    /// pid → the candidate it is, or `None` for a process that runs no engine.
    known: HashMap<u32, Option<Candidate>>,
}

impl Scanner {
    pub fn new(proc_root: &Path) -> Self {
        Self {
            proc_root: proc_root.to_owned(),
            known: HashMap::new(),
        }
    }

    /// Every process that runs an engine now. A process seen before is not read again; one
    /// gone is forgotten.
    pub fn scan(&mut self) -> std::io::Result<Vec<Candidate>> {
        let mut live = HashSet::with_capacity(self.known.len());
        for entry in std::fs::read_dir(&self.proc_root)? {
            let Ok(entry) = entry else { continue };
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            live.insert(pid);
            if !self.known.contains_key(&pid) {
                let candidate = read_candidate(&self.proc_root, pid);
                self.known.insert(pid, candidate);
            }
        }
        self.known.retain(|pid, _| live.contains(pid));
        let mut out: Vec<Candidate> = self.known.values().flatten().cloned().collect();
        out.sort_by_key(|c| c.pid);
        Ok(out)
    }

    /// Forgets a process, so the next scan reads it again (its command line may have changed:
    /// a server that re-executes itself).
    pub fn forget(&mut self, pid: u32) {
        self.known.remove(&pid);
    }

    pub fn processes(&self) -> usize {
        self.known.len()
    }
}

/// The candidate process `pid` is, if it runs an engine (and is still there).
fn read_candidate(proc_root: &Path, pid: u32) -> Option<Candidate> {
    let dir = proc_root.join(pid.to_string());
    let raw = std::fs::read(dir.join("cmdline")).ok()?;
    if raw.is_empty() {
        return None; // a kernel thread, or a zombie
    }
    let text = String::from_utf8_lossy(&raw);
    let argv: Vec<&str> = text.trim_end_matches('\0').split('\0').collect();
    let engine = engines::recognise(&argv)?;
    let start = start_time(&dir)?;
    Some(Candidate {
        pid,
        start,
        engine,
        model: engine.model_from_cmdline(&argv).unwrap_or_default(),
        port: engine.port_from_cmdline(&argv),
    })
}

/// Field 22 of `/proc/<pid>/stat`: when the process started, in clock ticks since boot.
pub fn start_time(dir: &Path) -> Option<u64> {
    let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces and parentheses.
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_ascii_whitespace().nth(19)?.parse().ok()
}

/// The network namespace a process lives in: its inode, to tell namespaces apart.
pub fn netns_inode(proc_root: &Path, pid: u32) -> std::io::Result<u64> {
    Ok(std::fs::metadata(proc_root.join(pid.to_string()).join("ns/net"))?.ino())
}

/// The TCP sockets a process listens on, as seen inside its network namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listeners {
    /// In port order (IPv4 first within a port).
    pub addrs: Vec<SocketAddr>,
    /// Whether they are the process's own sockets (joined through `/proc/<pid>/fd`), or, where
    /// its open files cannot be listed (another user's process, without CAP_DAC_READ_SEARCH),
    /// every listening socket of its network namespace.
    pub own: bool,
}

/// The inodes of the sockets process `pid` has open, from `/proc/<pid>/fd`; `None` where that
/// is closed to the agent (another user's: mode 0500, the DAC check before ptrace's).
pub fn socket_inodes(proc_root: &Path, pid: u32) -> std::io::Result<Option<HashSet<u64>>> {
    let fds = match std::fs::read_dir(proc_root.join(pid.to_string()).join("fd")) {
        Ok(fds) => fds,
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut inodes = HashSet::new();
    for fd in fds {
        let Ok(fd) = fd else { continue };
        let Ok(target) = std::fs::read_link(fd.path()) else {
            continue;
        };
        if let Some(inode) = target
            .to_str()
            .and_then(|t| t.strip_prefix("socket:["))
            .and_then(|t| t.strip_suffix(']'))
            .and_then(|t| t.parse::<u64>().ok())
        {
            inodes.insert(inode);
        }
    }
    Ok(Some(inodes))
}

/// The listening TCP sockets of network namespaces, each namespace's read once: a read of
/// `/proc/<pid>/net/tcp` walks the kernel's whole established-socket hash, milliseconds on a
/// large node, so a round reads it once per namespace, not once per process.
#[derive(Debug, Default)]
pub struct Tables {
    by_ns: std::collections::HashMap<u64, Vec<(SocketAddr, u64)>>,
}

impl Tables {
    /// The TCP addresses process `pid` (in namespace `ns`) listens on, as seen inside its
    /// namespace: its own sockets where its open files can be listed, else every listener of
    /// the namespace.
    pub fn listening(&mut self, proc_root: &Path, pid: u32, ns: u64) -> std::io::Result<Listeners> {
        let inodes = socket_inodes(proc_root, pid)?;
        let table = self.by_ns.entry(ns).or_insert_with(|| {
            let dir = proc_root.join(pid.to_string());
            let mut table = Vec::new();
            for (file, v6) in [("net/tcp", false), ("net/tcp6", true)] {
                // A kernel without IPv6 has no tcp6.
                if let Ok(text) = std::fs::read_to_string(dir.join(file)) {
                    table.extend(parse_listen_table(&text, v6));
                }
            }
            table
        });
        let mut addrs: Vec<SocketAddr> = table
            .iter()
            .filter(|(_, inode)| inodes.as_ref().is_none_or(|set| set.contains(inode)))
            .map(|(addr, _)| *addr)
            .collect();
        addrs.sort_by_key(|a| (a.port(), a.is_ipv6()));
        addrs.dedup();
        Ok(Listeners {
            addrs,
            own: inodes.is_some(),
        })
    }
}

/// The listening sockets (state `0A`) of a `/proc/net/tcp{,6}` table whose inodes are in
/// `inodes` (all of them with `None`).
pub fn parse_listeners(text: &str, v6: bool, inodes: Option<&HashSet<u64>>) -> Vec<SocketAddr> {
    parse_listen_table(text, v6)
        .into_iter()
        .filter(|(_, inode)| inodes.is_none_or(|set| set.contains(inode)))
        .map(|(addr, _)| addr)
        .collect()
}

/// The listening sockets (state `0A`) of a `/proc/net/tcp{,6}` table and their inodes.
pub fn parse_listen_table(text: &str, v6: bool) -> Vec<(SocketAddr, u64)> {
    let mut out = Vec::new();
    for line in text.lines().skip(1) {
        let fields: Vec<&str> = line.split_ascii_whitespace().collect();
        // sl local rem st tx:rx tr:when retrnsmt uid timeout inode …
        let (Some(local), Some(state), Some(inode)) = (fields.get(1), fields.get(3), fields.get(9))
        else {
            continue;
        };
        let (Some(addr), Ok(inode)) = (parse_address(local, v6), inode.parse::<u64>()) else {
            continue;
        };
        if *state == "0A" {
            out.push((addr, inode));
        }
    }
    out
}

/// `0100007F:1F90` (IPv4) or 32 hex digits and a port (IPv6), as the kernel prints them: each
/// 32-bit word in host (little-endian) byte order.
fn parse_address(s: &str, v6: bool) -> Option<SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let ip = if v6 {
        if ip.len() != 32 {
            return None;
        }
        let mut bytes = [0u8; 16];
        for (w, chunk) in bytes.chunks_mut(4).enumerate() {
            let word = u32::from_str_radix(ip.get(w * 8..w * 8 + 8)?, 16).ok()?;
            chunk.copy_from_slice(&word.to_le_bytes());
        }
        IpAddr::V6(Ipv6Addr::from(bytes))
    } else {
        let word = u32::from_str_radix(ip, 16).ok()?;
        IpAddr::V4(Ipv4Addr::from(word.to_le_bytes()))
    };
    Some(SocketAddr::new(ip, port))
}

/// Where to connect to reach a listener from inside its namespace: a wildcard listener through
/// loopback.
pub fn connect_address(listen: SocketAddr) -> SocketAddr {
    match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), listen.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), listen.port())
        }
        _ => listen,
    }
}

/// The listeners in the order to try them for an engine's metrics: the port its command line
/// names, then its default port, then the rest in port order.
pub fn in_preference(
    engine: &Engine,
    cmdline_port: Option<u16>,
    mut listeners: Vec<SocketAddr>,
) -> Vec<SocketAddr> {
    listeners.sort_by_key(|a| {
        let rank = if Some(a.port()) == cmdline_port {
            0
        } else if a.port() == engine.default_port {
            1
        } else {
            2
        };
        (rank, a.port(), a.is_ipv6())
    });
    listeners
}
