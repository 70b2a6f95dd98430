//! An inference server as the agent finds it: a process whose command line is an engine's (the
//! test starts it with the engine's argv[0] and arguments) and that serves `/metrics` on the
//! port its `--port` names, on `--host` (default 127.0.0.1).
//!
//! What it serves comes from the environment:
//! - `FAKE_ENGINE_BODY`: a file whose content is served, read on every request (the test
//!   rewrites it to move the counters);
//! - `FAKE_ENGINE_MODE`: `serve` (the default), `hang` (accepts and never answers), `huge`
//!   (streams 100 MB of valid exposition lines without a length) or `garbage` (answers 200 with
//!   bytes that are not exposition text);
//! - `FAKE_ENGINE_READY`: a file it creates once it listens;
//! - `FAKE_ENGINE_HITS`: a file it appends each request's line and User-Agent to, one line
//!   each.
#![expect(
    clippy::expect_used,
    reason = "a test server: a setup failure ends it with its message"
)]

use std::io::{Read as _, Write as _};
use std::net::{TcpListener, TcpStream};

fn arg(args: &[String], flag: &str) -> Option<String> {
    args.iter().enumerate().find_map(|(i, a)| {
        if a == flag {
            args.get(i + 1).cloned()
        } else {
            a.strip_prefix(flag)?.strip_prefix('=').map(str::to_owned)
        }
    })
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let port: u16 = arg(&args, "--port")
        .expect("--port")
        .parse()
        .expect("--port is a number");
    let host = arg(&args, "--host").unwrap_or_else(|| "127.0.0.1".to_owned());
    let listener = TcpListener::bind((host.as_str(), port)).expect("bind");
    if let Ok(ready) = std::env::var("FAKE_ENGINE_READY") {
        std::fs::write(ready, b"").expect("ready file");
    }
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        std::thread::spawn(move || answer(conn));
    }
}

fn answer(mut conn: TcpStream) {
    let mut request = Vec::new();
    let mut buf = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => request.extend_from_slice(&buf[..n]),
        }
    }
    if let Ok(hits) = std::env::var("FAKE_ENGINE_HITS") {
        use std::io::Write as _;
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(hits)
        {
            // The request's line and User-Agent, one line per request.
            let text = String::from_utf8_lossy(&request);
            let line = text.lines().next().unwrap_or("-");
            let agent = text
                .lines()
                .find_map(|l| l.strip_prefix("User-Agent: "))
                .unwrap_or("-");
            let _ = writeln!(f, "{line} {agent}");
        }
    }
    let mode = std::env::var("FAKE_ENGINE_MODE").unwrap_or_else(|_| "serve".to_owned());
    match mode.as_str() {
        "hang" => std::thread::sleep(std::time::Duration::from_secs(3600)),
        "huge" => {
            let _ = conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n");
            let line = b"vllm:prompt_tokens_total{model_name=\"flood\"} 1\n";
            let mut sent = 0;
            while sent < 100_000_000 {
                if conn.write_all(line).is_err() {
                    return;
                }
                sent += line.len();
            }
        }
        "garbage" => {
            let body = b"<html><body>\x00\x01 this is not exposition text</body></html>\n";
            let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len());
            let _ = conn.write_all(head.as_bytes());
            let _ = conn.write_all(body);
        }
        _ => {
            let path = std::env::var("FAKE_ENGINE_BODY").expect("FAKE_ENGINE_BODY");
            let body = std::fs::read(path).unwrap_or_default();
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\n\r\n",
                body.len()
            );
            let _ = conn.write_all(head.as_bytes());
            let _ = conn.write_all(&body);
        }
    }
}
