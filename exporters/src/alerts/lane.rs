//! One delivery lane per target URL: its own bounded queue, its own task, its own retries, so a
//! dead or slow receiver never holds up another.

use std::collections::hash_map::RandomState;
use std::collections::VecDeque;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::header::{CONTENT_TYPE, USER_AGENT};
use hyper::{Request, StatusCode, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tally_error_chain::chain;
use tokio::sync::{watch, Notify};
use tracing::{debug, info, warn};

use super::{AlertStats, TargetKind};

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// Builds the HTTP/1.1 client every lane shares (plain `http://`, pooled connections).
pub fn http_client() -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .pool_timer(TokioTimer::new())
        .build(connector)
}

/// How a lane retries; shared by all lanes and replaced on reload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub timeout: Duration,
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

/// A request body ready to POST, and what it carries (for logs).
#[derive(Debug, Clone)]
pub struct Batch {
    pub body: Bytes,
    pub what: &'static str,
}

#[derive(Debug)]
struct Queue {
    batches: VecDeque<Batch>,
    capacity: usize,
    in_flight: bool,
}

/// The half of a lane the worker keeps: push batches in, ask whether it is idle.
#[derive(Debug)]
pub struct Lane {
    pub kind: TargetKind,
    /// The URL as configured, the name in stats and logs.
    pub url: String,
    uri: Uri,
    queue: Mutex<Queue>,
    wake: Notify,
    closing: AtomicBool,
}

impl Lane {
    pub fn new(kind: TargetKind, url: String, uri: Uri, capacity: usize) -> Arc<Lane> {
        Arc::new(Lane {
            kind,
            url,
            uri,
            queue: Mutex::new(Queue {
                batches: VecDeque::new(),
                capacity,
                in_flight: false,
            }),
            wake: Notify::new(),
            closing: AtomicBool::new(false),
        })
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        // A panic elsewhere cannot leave the queue half-updated: every critical section is a
        // single VecDeque operation or a field store.
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues a batch; when the queue is full the oldest batch is dropped (and counted): newer
    /// batches carry newer state, and periodic re-sends carry all of it.
    pub fn push(&self, batch: Batch, stats: &AlertStats) {
        let dropped = {
            let mut q = self.queue();
            let mut dropped = 0;
            while q.batches.len() >= q.capacity.max(1) {
                q.batches.pop_front();
                dropped += 1;
            }
            q.batches.push_back(batch);
            dropped
        };
        if dropped > 0 {
            stats.dropped_batches.fetch_add(dropped, Ordering::Relaxed);
            stats.bump(self.kind, &self.url, |c| c.dropped_batches += dropped);
            debug!(kind = self.kind.as_str(), url = %self.url, dropped, "alert queue full, dropped oldest");
        }
        self.wake.notify_one();
    }

    pub fn set_capacity(&self, capacity: usize) {
        self.queue().capacity = capacity;
    }

    /// Nothing queued and nothing in flight.
    pub fn idle(&self) -> bool {
        let q = self.queue();
        q.batches.is_empty() && !q.in_flight
    }

    /// Asks the lane's task to deliver what is queued and then end.
    pub fn close(&self) {
        self.closing.store(true, Ordering::Relaxed);
        self.wake.notify_one();
    }
}

/// Everything a lane's task needs besides its lane.
#[derive(Debug, Clone)]
pub struct Shared {
    pub client: HttpClient,
    pub policy: watch::Receiver<Policy>,
    pub stats: Arc<AlertStats>,
    /// Notified whenever a lane runs out of work (what `flush` waits on).
    pub idle: Arc<Notify>,
}

/// The lane's task: deliver batches in order, each with bounded retries.
pub async fn run(lane: Arc<Lane>, shared: Shared) {
    let mut healthy = true;
    loop {
        let next = {
            let mut q = lane.queue();
            let next = q.batches.pop_front();
            q.in_flight = next.is_some();
            next
        };
        match next {
            Some(batch) => {
                deliver(&lane, &shared, &batch, &mut healthy).await;
                lane.queue().in_flight = false;
            }
            None => {
                shared.idle.notify_waiters();
                if lane.closing.load(Ordering::Relaxed) {
                    return;
                }
                // `notify_one` leaves a permit when nobody waits, so a push between the check
                // above and this await is not lost.
                lane.wake.notified().await;
            }
        }
    }
}

async fn deliver(lane: &Lane, shared: &Shared, batch: &Batch, healthy: &mut bool) {
    let stats = &shared.stats;
    let mut attempt = 1;
    loop {
        let policy = shared.policy.borrow().clone();
        match post(
            &shared.client,
            &lane.uri,
            batch.body.clone(),
            policy.timeout,
        )
        .await
        {
            Ok(()) => {
                stats.sent.fetch_add(1, Ordering::Relaxed);
                stats.bump(lane.kind, &lane.url, |c| c.sent += 1);
                if !*healthy {
                    info!(kind = lane.kind.as_str(), url = %lane.url, "alert delivery works again");
                    *healthy = true;
                }
                return;
            }
            Err(error) => {
                stats.failed_attempts.fetch_add(1, Ordering::Relaxed);
                stats.bump(lane.kind, &lane.url, |c| c.failed_attempts += 1);
                let last = !error.retryable() || attempt >= policy.max_attempts.max(1);
                if last {
                    stats.failed.fetch_add(1, Ordering::Relaxed);
                    stats.bump(lane.kind, &lane.url, |c| c.failed += 1);
                    // One warning when a target starts failing, not one per alert.
                    if *healthy {
                        warn!(kind = lane.kind.as_str(), url = %lane.url, what = batch.what, attempts = attempt, error = %chain(&error), "alert delivery failed, giving up on this batch");
                        *healthy = false;
                    } else {
                        debug!(kind = lane.kind.as_str(), url = %lane.url, what = batch.what, attempts = attempt, error = %chain(&error), "alert delivery failed, giving up on this batch");
                    }
                    return;
                }
                let delay = jitter(
                    backoff(policy.initial_backoff, policy.max_backoff, attempt),
                    random(),
                );
                debug!(kind = lane.kind.as_str(), url = %lane.url, attempt, ?delay, error = %chain(&error), "alert delivery attempt failed, retrying");
                tokio::time::sleep(delay).await;
                attempt += 1;
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PostError {
    #[error("building the request")]
    Build(#[source] hyper::http::Error),
    #[error("sending the request")]
    Send(#[source] hyper_util::client::legacy::Error),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("receiver answered {status}: {body}")]
    Status { status: StatusCode, body: String },
}

impl PostError {
    /// Whether trying again can help: not for a request the receiver rejected as malformed.
    fn retryable(&self) -> bool {
        match self {
            PostError::Build(_) => false,
            PostError::Send(_) | PostError::Timeout(_) => true,
            PostError::Status { status, .. } => {
                status.is_server_error()
                    || *status == StatusCode::TOO_MANY_REQUESTS
                    || *status == StatusCode::REQUEST_TIMEOUT
            }
        }
    }
}

/// Answers larger than this are cut when read (an error body is only for the log).
const MAX_ANSWER: usize = 64 * 1024;

async fn post(
    client: &HttpClient,
    uri: &Uri,
    body: Bytes,
    timeout: Duration,
) -> Result<(), PostError> {
    let request = Request::post(uri.clone())
        .header(CONTENT_TYPE, "application/json")
        .header(USER_AGENT, concat!("tally/", env!("CARGO_PKG_VERSION")))
        .body(Full::new(body))
        .map_err(PostError::Build)?;
    let exchange = async {
        let response = client.request(request).await.map_err(PostError::Send)?;
        let status = response.status();
        // Reading the answer to its end lets the connection go back to the pool.
        let answer = Limited::new(response.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        if status.is_success() {
            Ok(())
        } else {
            let text = String::from_utf8_lossy(&answer[..answer.len().min(256)])
                .trim()
                .to_owned();
            Err(PostError::Status { status, body: text })
        }
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| PostError::Timeout(timeout))?
}

/// The wait after failed attempt number `attempt` (1-based): `initial` doubling per attempt, at
/// most `max`.
pub fn backoff(initial: Duration, max: Duration, attempt: u32) -> Duration {
    let factor = 1_u32
        .checked_shl(attempt.saturating_sub(1))
        .unwrap_or(u32::MAX);
    initial.saturating_mul(factor).min(max)
}

/// Half of `delay` fixed, the other half spread by `random`, so the agents of many nodes that
/// lost the same Alertmanager do not retry in lockstep.
pub fn jitter(delay: Duration, random: u64) -> Duration {
    let half = delay / 2;
    let spread = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX);
    if spread == 0 {
        return delay;
    }
    half + Duration::from_nanos(random % spread.saturating_add(1)).min(delay - half)
}

/// A random number from the standard library's randomly keyed hasher (enough for jitter).
fn random() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    RandomState::new().hash_one(COUNTER.fetch_add(1, Ordering::Relaxed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let ms = Duration::from_millis;
        let got: Vec<Duration> = (1..=8).map(|a| backoff(ms(100), ms(2000), a)).collect();
        assert_eq!(
            got,
            [100, 200, 400, 800, 1600, 2000, 2000, 2000]
                .map(ms)
                .to_vec()
        );
        // Huge attempt numbers saturate instead of overflowing.
        assert_eq!(backoff(ms(100), ms(2000), 40), ms(2000));
        assert_eq!(backoff(ms(100), ms(2000), u32::MAX), ms(2000));
        assert_eq!(
            backoff(Duration::MAX, Duration::from_secs(5), 3),
            Duration::from_secs(5)
        );
        assert_eq!(backoff(ms(0), ms(2000), 5), ms(0));
    }

    #[test]
    fn jitter_stays_between_half_and_full() {
        let d = Duration::from_millis(800);
        for r in [0, 1, 399_999_999, 400_000_000, 400_000_001, u64::MAX] {
            let j = jitter(d, r);
            assert!(j >= d / 2 && j <= d, "{r}: {j:?}");
        }
        assert_eq!(jitter(d, 0), d / 2);
        assert_eq!(jitter(d, 400_000_000), d);
        let spread: std::collections::BTreeSet<Duration> =
            (0..64).map(|_| jitter(d, random())).collect();
        assert!(spread.len() > 32, "jitter barely varies: {spread:?}");
        assert_eq!(jitter(Duration::ZERO, 7), Duration::ZERO);
        assert_eq!(jitter(Duration::from_nanos(1), 7), Duration::from_nanos(1));
    }

    #[test]
    fn only_transient_failures_are_retried() {
        let status = |s| PostError::Status {
            status: s,
            body: String::new(),
        };
        assert!(status(StatusCode::SERVICE_UNAVAILABLE).retryable());
        assert!(status(StatusCode::INTERNAL_SERVER_ERROR).retryable());
        assert!(status(StatusCode::TOO_MANY_REQUESTS).retryable());
        assert!(!status(StatusCode::BAD_REQUEST).retryable());
        assert!(!status(StatusCode::NOT_FOUND).retryable());
        assert!(PostError::Timeout(Duration::from_secs(1)).retryable());
    }
}
