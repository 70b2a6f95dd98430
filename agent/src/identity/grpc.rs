//! gRPC over a node-local unix socket (the CRI runtime, the kubelet's pod-resources API).

use std::path::Path;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

/// A channel to the gRPC server listening on the unix socket at `path`.
pub async fn unix_channel(
    path: &Path,
    timeout: Duration,
) -> Result<Channel, tonic::transport::Error> {
    let socket = path.to_path_buf();
    let connector = tower::service_fn(move |_: Uri| {
        let socket = socket.clone();
        async move {
            tokio::net::UnixStream::connect(socket)
                .await
                .map(TokioIo::new)
        }
    });
    // The URI is required by the HTTP/2 client but never resolved: the connector above ignores it
    // and dials the socket.
    Endpoint::from_static("http://[::]:50051")
        .connect_timeout(timeout)
        .connect_with_connector(connector)
        .await
}
