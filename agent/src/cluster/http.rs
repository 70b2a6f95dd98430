//! One instant query against the Prometheus HTTP API: a fresh connection per query (a query
//! every interval needs no pool), TLS that verifies the server against `cluster.ca_file` or the
//! system's bundle, credentials read from their files at each query, and everything under one
//! deadline with a bounded answer.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt as _, Empty, Limited};
use hyper::body::Bytes;
use hyper::header::{ACCEPT, AUTHORIZATION, HOST, USER_AGENT};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::TlsConnector;

use super::query::Failure;
use crate::config::cluster::{endpoint, Endpoint};
use crate::config::{ClusterConfig, SYSTEM_CA_BUNDLE};

/// How a query authenticates.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Auth {
    None,
    Bearer(PathBuf),
    Basic { user: String, password: PathBuf },
}

/// The query client for one `[cluster]` configuration.
#[derive(Clone)]
pub struct Client {
    endpoint: Endpoint,
    /// The TLS connector of an `https://` endpoint, or why there is none (an unreadable CA
    /// file): every query then fails with it, counted.
    tls: Option<Result<TlsConnector, String>>,
    auth: Auth,
    timeout: Duration,
    max_bytes: usize,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("endpoint", &self.endpoint)
            .field("auth", &self.auth)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// A client for `config`; `None` without a `query_url` (validation checked it parses).
    pub fn new(config: &ClusterConfig) -> Option<Client> {
        let endpoint = endpoint(&config.query_url).ok()?;
        let tls = endpoint.https.then(|| {
            let ca = config
                .ca_file
                .clone()
                .unwrap_or_else(|| PathBuf::from(SYSTEM_CA_BUNDLE));
            tls_connector(&ca)
        });
        let auth = match (&config.bearer_token_file, &config.basic_auth_password_file) {
            (Some(token), _) => Auth::Bearer(token.clone()),
            (None, Some(password)) => Auth::Basic {
                user: config.basic_auth_username.clone(),
                password: password.clone(),
            },
            (None, None) => Auth::None,
        };
        Some(Client {
            endpoint,
            tls,
            auth,
            timeout: Duration::from_millis(config.timeout_ms),
            max_bytes: config.max_response_bytes,
        })
    }

    /// Asks `promql` at the current time; the answer's body.
    pub async fn query(&self, promql: &str) -> Result<Vec<u8>, Failure> {
        match tokio::time::timeout(self.timeout, self.exchange(promql)).await {
            Ok(result) => result,
            Err(_) => Err(Failure::Timeout),
        }
    }

    async fn exchange(&self, promql: &str) -> Result<Vec<u8>, Failure> {
        let e = &self.endpoint;
        let authorization = self.authorization()?;
        let tcp = tokio::net::TcpStream::connect((e.host.as_str(), e.port))
            .await
            .map_err(|err| Failure::Unreachable(format!("{}:{}: {err}", e.host, e.port)))?;
        let _ = tcp.set_nodelay(true);
        match &self.tls {
            None => self.send(tcp, promql, authorization).await,
            Some(Err(why)) => Err(Failure::Tls(why.clone())),
            Some(Ok(connector)) => {
                let name = ServerName::try_from(e.host.clone())
                    .map_err(|err| Failure::Tls(format!("`{}`: {err}", e.host)))?;
                let stream = connector
                    .connect(name, tcp)
                    .await
                    .map_err(|err| Failure::Tls(tally_error_chain::chain(&err).to_string()))?;
                self.send(stream, promql, authorization).await
            }
        }
    }

    async fn send<S>(
        &self,
        stream: S,
        promql: &str,
        authorization: Option<String>,
    ) -> Result<Vec<u8>, Failure>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let e = &self.endpoint;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|err| Failure::Unreachable(err.to_string()))?;
        let driver = tokio::spawn(connection);
        let default_port = if e.https { 443 } else { 80 };
        let host = match (e.port == default_port, e.host.contains(':')) {
            (true, false) => e.host.clone(),
            (true, true) => format!("[{}]", e.host),
            (false, false) => format!("{}:{}", e.host, e.port),
            (false, true) => format!("[{}]:{}", e.host, e.port),
        };
        let uri = format!("{}/api/v1/query?query={}", e.prefix, percent_encode(promql));
        let mut request = Request::get(uri)
            .header(HOST, host)
            .header(USER_AGENT, concat!("tally/", env!("CARGO_PKG_VERSION")))
            .header(ACCEPT, "application/json");
        if let Some(value) = authorization {
            request = request.header(AUTHORIZATION, value);
        }
        let request = request
            .body(Empty::<Bytes>::new())
            .map_err(|err| Failure::Decode(format!("building the request: {err}")))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|err| Failure::Unreachable(err.to_string()))?;
        let status = response.status();
        let body = Limited::new(response.into_body(), self.max_bytes)
            .collect()
            .await
            .map_err(|err| {
                if err.is::<http_body_util::LengthLimitError>() {
                    Failure::TooLarge
                } else {
                    Failure::Unreachable(err.to_string())
                }
            })?
            .to_bytes();
        driver.abort();
        // The API answers errors as JSON with 400, 422 and 503: the body says more than the
        // status.
        let api_error = matches!(status.as_u16(), 400 | 422 | 503)
            && body.starts_with(b"{")
            && serde_json::from_slice::<serde_json::Value>(&body).is_ok();
        if status != StatusCode::OK && !api_error {
            return Err(Failure::Http(status.as_u16()));
        }
        Ok(body.to_vec())
    }

    /// The `Authorization` header, read from its file now.
    fn authorization(&self) -> Result<Option<String>, Failure> {
        let read = |path: &Path| {
            std::fs::read_to_string(path)
                .map(|s| s.trim_end_matches(['\n', '\r']).to_owned())
                .map_err(|err| Failure::Credentials(format!("{}: {err}", path.display())))
        };
        Ok(match &self.auth {
            Auth::None => None,
            Auth::Bearer(file) => Some(format!("Bearer {}", read(file)?)),
            Auth::Basic { user, password } => {
                let password = read(password)?;
                Some(format!(
                    "Basic {}",
                    base64(format!("{user}:{password}").as_bytes())
                ))
            }
        })
    }
}

/// A connector that verifies servers against the PEM certificates in `ca`.
fn tls_connector(ca: &Path) -> Result<TlsConnector, String> {
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(ca)
        .map_err(|e| format!("{}: {e}", ca.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {e}", ca.display()))?;
    let (added, _) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(format!("{}: no usable certificate", ca.display()));
    }
    #[expect(
        deprecated,
        reason = "ring has no post-quantum key exchange; aws-lc-rs, which has, needs cmake and a \
                  C toolchain to build, and a usage query carries no long-lived secret"
    )]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(TlsConnector::from(Arc::new(config)))
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
pub(super) fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len() * 3);
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Standard base64 with padding.
pub(super) fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}
