//! A loopback TCP receiver that counts what arrives, for tests that measure a sender's rate.

use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Bytes received on `127.0.0.1:port`, over every connection.
#[derive(Debug)]
pub struct Receiver {
    pub port: u16,
    total: Arc<AtomicU64>,
}

impl Receiver {
    pub fn start() -> Receiver {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a receiver");
        let port = listener.local_addr().expect("the receiver's port").port();
        let total = Arc::new(AtomicU64::new(0));
        let counter = total.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let counter = counter.clone();
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 1 << 16];
                    while let Ok(n) = stream.read(&mut buf) {
                        if n == 0 {
                            return;
                        }
                        counter.fetch_add(n as u64, Ordering::Relaxed);
                    }
                });
            }
        });
        Receiver { port, total }
    }

    /// Bytes per second received over the next `secs`.
    pub fn rate_over(&self, secs: f64) -> f64 {
        let before = self.total.load(Ordering::Relaxed);
        let t0 = Instant::now();
        std::thread::sleep(Duration::from_secs_f64(secs));
        let after = self.total.load(Ordering::Relaxed);
        (after - before) as f64 / t0.elapsed().as_secs_f64()
    }
}
