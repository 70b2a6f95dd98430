//! Parsers for the cgroup files the collector reads. Each returns `None` on malformed content so
//! the caller can count it; none of them panics.

/// Reads `usage_usec` from a cgroup v2 `cpu.stat` as seconds.
pub fn cpu_stat_seconds(text: &str) -> Option<f64> {
    keyed(text, "usage_usec").map(|usec| usec as f64 / 1e6)
}

/// Reads a v1 `cpuacct.usage` (nanoseconds) as seconds.
pub fn cpuacct_usage_seconds(text: &str) -> Option<f64> {
    single(text).map(|ns| ns as f64 / 1e9)
}

/// A single unsigned integer file (`memory.current`, `memory.usage_in_bytes`).
pub fn single(text: &str) -> Option<u64> {
    text.trim().parse().ok()
}

/// Bytes read and written, summed over the devices `stacked` says no, from a cgroup v2
/// `io.stat`: `8:0 rbytes=1 wbytes=2 rios=3 wios=4 dbytes=0 dios=0` per line. Every line is
/// checked, counted or not.
pub fn io_stat_bytes(text: &str, mut stacked: impl FnMut(&str) -> bool) -> Option<(u64, u64)> {
    let (mut read, mut write) = (0u64, 0u64);
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let mut fields = line.split_whitespace();
        let dev = fields.next().filter(|dev| dev.contains(':'))?;
        let (mut r, mut w) = (0u64, 0u64);
        for field in fields {
            let (key, value) = field.split_once('=')?;
            match key {
                "rbytes" => r = value.parse().ok()?,
                "wbytes" => w = value.parse().ok()?,
                _ => {}
            }
        }
        if !stacked(dev) {
            read = read.checked_add(r)?;
            write = write.checked_add(w)?;
        }
    }
    Some((read, write))
}

/// Bytes read and written, summed over the devices `stacked` says no, from a v1
/// `blkio.throttle.io_service_bytes`: `8:0 Read 4096` lines and a final `Total N`.
pub fn blkio_bytes(text: &str, mut stacked: impl FnMut(&str) -> bool) -> Option<(u64, u64)> {
    let (mut read, mut write) = (0u64, 0u64);
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields.as_slice() {
            ["Total", total] => {
                total.parse::<u64>().ok()?;
            }
            [dev, op, value] if dev.contains(':') => {
                let value: u64 = value.parse().ok()?;
                if stacked(dev) {
                    continue;
                }
                match *op {
                    "Read" => read = read.checked_add(value)?,
                    "Write" => write = write.checked_add(value)?,
                    _ => {}
                }
            }
            _ => return None,
        }
    }
    Some((read, write))
}

fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (k, v) = line.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_v2_files() {
        let cpu = "usage_usec 2500000\nuser_usec 2000000\nsystem_usec 500000\n";
        assert_eq!(cpu_stat_seconds(cpu), Some(2.5));
        assert_eq!(cpu_stat_seconds("user_usec 1\n"), None);
        assert_eq!(cpu_stat_seconds("usage_usec lots\n"), None);
        let io = "8:0 rbytes=4096 wbytes=8192 rios=1 wios=2 dbytes=0 dios=0\n\
                  253:1 rbytes=1 wbytes=2 rios=1 wios=1 dbytes=0 dios=0\n";
        assert_eq!(io_stat_bytes(io, |_| false), Some((4097, 8194)));
        assert_eq!(io_stat_bytes("", |_| false), Some((0, 0)));
        assert_eq!(io_stat_bytes("8:0 rbytes=x\n", |_| false), None);
        assert_eq!(io_stat_bytes("garbage\n", |_| false), None);
        // A stacked device's line is still checked.
        assert_eq!(io_stat_bytes("253:0 rbytes=x\n", |_| true), None);
        assert_eq!(single("123\n"), Some(123));
        assert_eq!(single("max\n"), None);
    }

    /// A cgroup that wrote 1 MiB through dm-0 (253:0, on sda 8:0), 4 KiB to sdb (8:16)
    /// directly and read 8 KiB through md0 (9:0, a RAID0 of sda and sdb): each stack's bytes are
    /// listed on every layer, and count once, at the bottom.
    #[test]
    fn stacked_devices_count_once() {
        let io = "253:0 rbytes=0 wbytes=1048576 rios=0 wios=1 dbytes=0 dios=0\n\
                  8:0 rbytes=4096 wbytes=1048576 rios=1 wios=1 dbytes=0 dios=0\n\
                  8:16 rbytes=4096 wbytes=4096 rios=1 wios=1 dbytes=0 dios=0\n\
                  9:0 rbytes=8192 wbytes=0 rios=1 wios=0 dbytes=0 dios=0\n";
        let stacked = |dev: &str| ["253:0", "9:0"].contains(&dev);
        assert_eq!(io_stat_bytes(io, stacked), Some((8192, 1048576 + 4096)));
    }

    #[test]
    fn parses_v1_files() {
        assert_eq!(cpuacct_usage_seconds("1500000000\n"), Some(1.5));
        let blkio = "8:0 Read 4096\n8:0 Write 512\n8:0 Sync 0\n8:0 Async 4608\n8:0 Discard 0\n8:0 Total 4608\n\
                     8:16 Read 1\n8:16 Write 1\nTotal 4610\n";
        assert_eq!(blkio_bytes(blkio, |_| false), Some((4097, 513)));
        assert_eq!(blkio_bytes(blkio, |d| d == "8:16"), Some((4096, 512)));
        assert_eq!(blkio_bytes("Total 0\n", |_| false), Some((0, 0)));
        assert_eq!(blkio_bytes("8:0 Read many\n", |_| false), None);
        assert_eq!(blkio_bytes("what is this\n", |_| false), None);
    }
}
