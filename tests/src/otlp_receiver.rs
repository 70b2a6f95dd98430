//! An OTLP metrics receiver for tests: the real protobuf types over a real tonic gRPC server, or
//! an HTTP/protobuf endpoint (`POST /v1/metrics`), on loopback, on its own thread and runtime.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use prost::Message;

type Received = Arc<Mutex<Vec<ExportMetricsServiceRequest>>>;

/// A running receiver; dropping it stops it.
#[derive(Debug)]
pub struct Receiver {
    pub port: u16,
    received: Received,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Clone)]
struct Grpc(Received);

#[tonic::async_trait]
impl MetricsService for Grpc {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(request.into_inner());
        Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
    }
}

impl Receiver {
    /// OTLP/gRPC on a free loopback port.
    pub fn grpc() -> Receiver {
        Self::start(|listener, received, stop| {
            Box::pin(async move {
                let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
                let _ = tonic::transport::Server::builder()
                    .add_service(MetricsServiceServer::new(Grpc(received)))
                    .serve_with_incoming_shutdown(incoming, async {
                        let _ = stop.await;
                    })
                    .await;
            })
        })
    }

    /// OTLP/HTTP with protobuf bodies on a free loopback port.
    pub fn http() -> Receiver {
        Self::start(|listener, received, stop| {
            Box::pin(async move {
                let app = axum::Router::new().route(
                    "/v1/metrics",
                    axum::routing::post(move |body: axum::body::Bytes| {
                        let received = received.clone();
                        async move {
                            match ExportMetricsServiceRequest::decode(body) {
                                Ok(request) => {
                                    received
                                        .lock()
                                        .unwrap_or_else(|p| p.into_inner())
                                        .push(request);
                                    (
                                        axum::http::StatusCode::OK,
                                        [("content-type", "application/x-protobuf")],
                                        ExportMetricsServiceResponse::default().encode_to_vec(),
                                    )
                                }
                                Err(_) => (
                                    axum::http::StatusCode::BAD_REQUEST,
                                    [("content-type", "text/plain")],
                                    b"bad protobuf".to_vec(),
                                ),
                            }
                        }
                    }),
                );
                let _ = axum::serve(listener, app)
                    .with_graceful_shutdown(async {
                        let _ = stop.await;
                    })
                    .await;
            })
        })
    }

    fn start(
        serve: impl FnOnce(
                tokio::net::TcpListener,
                Received,
                tokio::sync::oneshot::Receiver<()>,
            ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>
            + Send
            + 'static,
    ) -> Receiver {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind receiver");
        listener.set_nonblocking(true).expect("nonblocking");
        let port = listener.local_addr().expect("local addr").port();
        let received: Received = Arc::default();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let shared = received.clone();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("receiver runtime");
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
                serve(listener, shared, stop_rx).await;
            });
        });
        Receiver {
            port,
            received,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Requests received so far.
    pub fn requests(&self) -> Vec<ExportMetricsServiceRequest> {
        self.received
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Waits until at least `n` requests arrived, or panics after `timeout`.
    pub fn wait_for(&self, n: usize, timeout: Duration) -> Vec<ExportMetricsServiceRequest> {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.requests();
            if got.len() >= n {
                return got;
            }
            assert!(
                Instant::now() < deadline,
                "{} OTLP requests within {timeout:?}, wanted {n}",
                got.len()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
