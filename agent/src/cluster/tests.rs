use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::http::{base64, percent_encode, Client};
use super::query::{parse, Failure};
use super::*;
use crate::config::cluster::{build, endpoint, Endpoint};
use crate::config::{ClusterConfig, Config};

fn budget_config(budget: &str) -> Config {
    Config::parse(&format!(
        "[cluster]\nquery_url = 'http://127.0.0.1:9'\ninterval_secs = 1\ntimeout_ms = 500\nmax_staleness_secs = 2\n\
         [tenants]\nlabels = ['team', 'cost-center']\n\
         [prices]\ncpu_core_second = 0.001\n\
         [[budget]]\nname = 'b'\nspan = 'cluster'\n{budget}"
    ))
    .unwrap_or_else(|e| panic!("{e}"))
}

fn built(budget: &str) -> String {
    let config = budget_config(budget);
    build(&config.budget[0], &config.tenants).unwrap()
}

#[test]
fn built_queries_ask_every_node_for_what_the_budget_selects() {
    assert_eq!(
        built("resource = 'cost'\nlimit = 100.0\nwindow = '1d'\nselect.labels = { team = 'search' }\n"),
        "sum (increase(tally_workload_cost_total{team=\"search\"}[86400s]))"
    );
    assert_eq!(
        built("resource = 'cpu_seconds'\nlimit = 10.0\nwindow = '5m'\nper = 'cost-center'\naction = 'cpu'\nthrottle.cpu_cores = 0.5\n"),
        "sum by (cost_center) (increase(tally_workload_cpu_seconds_total{}[300s]))"
    );
    assert_eq!(
        built("resource = 'network_egress_bytes'\nscope = 'internet'\nlimit = 1e9\nwindow = '1h'\nselect = { namespace = 'ml', pod = 'train-*.x', unit = 'a\"b' }\nper = 'namespace'\n"),
        "sum by (namespace) (increase(tally_workload_network_transmit_bytes_total{scope=\"internet\",namespace=\"ml\",pod=~\"train-.*\\\\.x\",unit=\"a\\\"b\"}[3600s]))"
    );
    assert_eq!(
        built("resource = 'disk_bytes'\nlimit = 1e9\nwindow = '60s'\n"),
        "sum (increase({__name__=~\"tally_workload_disk_read_bytes_total|tally_workload_disk_write_bytes_total\",method=\"cgroupfs\"}[60s]))"
    );
    assert_eq!(
        built("resource = 'gpu_memory_bytes'\nlimit = 1e9\n"),
        "sum (tally_workload_gpu_memory_bytes{})"
    );
    assert_eq!(
        built("resource = 'gpu_seconds'\nlimit = 10.0\nquery = 'sum(my:recorded)'\n"),
        "sum(my:recorded)"
    );
}

#[test]
fn cluster_budgets_that_cannot_ask_are_refused_with_the_key() {
    let refused = |text: &str| {
        Config::parse(text)
            .expect_err("accepted")
            .0
            .iter()
            .map(|e| format!("{}: {}", e.path, e.message))
            .collect::<Vec<_>>()
    };
    let budget = "[[budget]]\nname = 'b'\nspan = 'cluster'\nresource = 'cpu_seconds'\nlimit = 1.0\nwindow = '1h'\n";
    assert_eq!(
        refused(budget),
        ["budget.0.span: a cluster budget needs `cluster.query_url`"]
    );
    let with_url = |rest: &str| format!("[cluster]\nquery_url = 'http://p:9090'\n{budget}{rest}");
    assert_eq!(
        refused(&with_url("select.labels = { team = 'a' }\n")),
        ["budget.0.select.labels.team: no series carries `team`: list it in `tenants.labels`, or give `query`"]
    );
    assert_eq!(
        refused(&with_url("per = 'team'\n")),
        ["budget.0.per: no series carries `team`: list it in `tenants.labels`, or give `query`"]
    );
    assert_eq!(
        refused(&with_url("select.cgroup = '/a/*'\n")),
        ["budget.0.select.cgroup: no series carries the cgroup path, so the cluster query cannot select on it; give `query`"]
    );
    assert_eq!(
        refused(&with_url("action = 'cpu'\n")),
        ["budget.0.action: a cluster budget's `cpu` action needs `throttle.cpu_cores`: the cluster's rate says nothing about one node's share"]
    );
    assert_eq!(
        refused(&with_url("action = 'freeze'\n")),
        ["budget.0.action: a cluster budget's `freeze` action needs `throttle.share`: the cluster's rate says nothing about one node's share"]
    );
    assert_eq!(
        refused("[[budget]]\nname = 'b'\nresource = 'cpu_seconds'\nlimit = 1.0\nwindow = '1h'\nquery = 'x'\n"),
        ["budget.0.query: `query` applies to `span = \"cluster\"` budgets only"]
    );
    assert_eq!(
        refused("[cluster]\nquery_url = 'ftp://p'\ninterval_secs = 10\nmax_staleness_secs = 5\nbearer_token_file = '/t'\nbasic_auth_username = 'u'\nbasic_auth_password_file = '/p'\n"),
        [
            "cluster.query_url: `ftp://p` must start with http:// or https://",
            "cluster.max_staleness_secs: 5 is shorter than `cluster.interval_secs` (10): every answer would be stale before the next",
            "cluster.bearer_token_file: set a bearer token or basic auth, not both",
        ]
    );
}

#[test]
fn endpoints_parse_with_their_ports_and_prefixes() {
    let e = |https, host: &str, port, prefix: &str| Endpoint {
        https,
        host: host.to_owned(),
        port,
        prefix: prefix.to_owned(),
    };
    assert_eq!(endpoint("http://p:9090"), Ok(e(false, "p", 9090, "")));
    assert_eq!(
        endpoint("https://mimir.example/prometheus/"),
        Ok(e(true, "mimir.example", 443, "/prometheus"))
    );
    assert_eq!(endpoint("http://[::1]:9"), Ok(e(false, "::1", 9, "")));
    assert_eq!(endpoint("https://[::1]"), Ok(e(true, "::1", 443, "")));
    assert!(endpoint("http://u:pw@p:1")
        .unwrap_err()
        .contains("credentials go in files"));
    assert!(endpoint("http://p:x")
        .unwrap_err()
        .contains("`x` is not a port"));
    assert!(endpoint("http://p/?q").unwrap_err().contains("no query"));
}

#[test]
fn encodings_are_the_standard_ones() {
    assert_eq!(base64(b"user:pass"), "dXNlcjpwYXNz");
    assert_eq!(base64(b"a"), "YQ==");
    assert_eq!(base64(b"ab"), "YWI=");
    assert_eq!(base64(b""), "");
    assert_eq!(
        percent_encode("sum(x{a=\"b c\"})[1s]"),
        "sum%28x%7Ba%3D%22b%20c%22%7D%29%5B1s%5D"
    );
}

fn vector(series: &str) -> Vec<u8> {
    format!(
        "{{\"status\":\"success\",\"data\":{{\"resultType\":\"vector\",\"result\":[{series}]}}}}"
    )
    .into_bytes()
}

#[test]
fn answers_are_read_per_group_and_every_bad_one_has_its_reason() {
    let one = vector(r#"{"metric":{},"value":[1.5,"42.25"]}"#);
    assert_eq!(parse(&one, None), Ok(vec![(String::new(), 42.25)]));
    let teams = vector(
        r#"{"metric":{"team":"a"},"value":[1,"1"]},{"metric":{"team":"b"},"value":[1,"2e3"]},{"metric":{},"value":[1,"7"]}"#,
    );
    assert_eq!(
        parse(&teams, Some("team")),
        Ok(vec![
            ("a".to_owned(), 1.0),
            ("b".to_owned(), 2000.0),
            (String::new(), 7.0)
        ])
    );
    let scalar = br#"{"status":"success","data":{"resultType":"scalar","result":[1,"3"]}}"#;
    assert_eq!(parse(scalar, None), Ok(vec![(String::new(), 3.0)]));
    let reason = |body: &[u8], group| parse(body, group).unwrap_err().reason();
    let error = br#"{"status":"error","errorType":"bad_data","error":"parse error at char 4"}"#;
    assert_eq!(
        parse(error, None),
        Err(Failure::Error("bad_data: parse error at char 4".to_owned()))
    );
    assert_eq!(reason(&vector(""), None), "empty");
    assert_eq!(reason(&vector(""), Some("team")), "empty");
    assert_eq!(
        parse(&teams, None),
        Err(Failure::Series(
            "3 series where one total was expected (aggregate with sum)".to_owned()
        ))
    );
    assert_eq!(
        reason(
            &vector(
                r#"{"metric":{"team":"a"},"value":[1,"1"]},{"metric":{"team":"a","x":"y"},"value":[1,"1"]}"#
            ),
            Some("team")
        ),
        "series"
    );
    assert_eq!(reason(scalar, Some("team")), "series");
    let matrix = br#"{"status":"success","data":{"resultType":"matrix","result":[]}}"#;
    assert_eq!(reason(matrix, None), "series");
    for bad in [r#""NaN""#, r#""+Inf""#, r#""many""#, "12", "null"] {
        let body = vector(&format!(r#"{{"metric":{{}},"value":[1,{bad}]}}"#));
        assert_eq!(reason(&body, None), "value", "{bad}");
    }
    assert_eq!(reason(b"<html>", None), "decode");
    assert_eq!(reason(br#"{"status":"success"}"#, None), "decode");
}

/// A server that answers each connection with `respond(request)`, returning what it was sent.
async fn serve(
    respond: impl Fn(&str) -> Option<String> + Send + Sync + 'static,
) -> (
    std::net::SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<String>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let respond = std::sync::Arc::new(respond);
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            let (tx, respond) = (tx.clone(), respond.clone());
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buf = [0u8; 4096];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let request = String::from_utf8_lossy(&request).into_owned();
                let _ = tx.send(request.clone());
                match respond(&request) {
                    Some(response) => {
                        let _ = stream.write_all(response.as_bytes()).await;
                    }
                    // Never answers.
                    None => tokio::time::sleep(Duration::from_secs(60)).await,
                }
            });
        }
    });
    (addr, rx)
}

fn ok(body: &str) -> String {
    format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
}

fn client(url: String, tweak: impl FnOnce(&mut ClusterConfig)) -> Client {
    let mut config = ClusterConfig {
        query_url: url,
        timeout_ms: 500,
        ..ClusterConfig::default()
    };
    tweak(&mut config);
    Client::new(&config).unwrap()
}

#[tokio::test]
async fn a_query_is_an_authenticated_get_and_each_transport_failure_has_its_reason() {
    let body = String::from_utf8(vector(r#"{"metric":{},"value":[1,"5"]}"#)).unwrap();
    let (addr, mut sent) = serve(move |request| {
        if request.contains("big") {
            return Some(ok(&"x".repeat(4096)));
        }
        if request.contains("silent") {
            return None;
        }
        if request.contains("teapot") {
            return Some("HTTP/1.1 418 I'm a teapot\r\ncontent-length: 0\r\n\r\n".to_owned());
        }
        Some(ok(&body))
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "s3cret\n").unwrap();

    let bearer = client(format!("http://{addr}/prom/"), |c| {
        c.bearer_token_file = Some(token.clone());
    });
    let answer = bearer.query("sum(up{job=\"a b\"})").await.unwrap();
    assert_eq!(parse(&answer, None), Ok(vec![(String::new(), 5.0)]));
    let request = sent.recv().await.unwrap();
    let lines: Vec<&str> = request.lines().collect();
    assert_eq!(
        lines[0],
        "GET /prom/api/v1/query?query=sum%28up%7Bjob%3D%22a%20b%22%7D%29 HTTP/1.1"
    );
    let header = |name: &str| {
        lines
            .iter()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .map(str::to_owned)
    };
    assert_eq!(header("authorization").as_deref(), Some("Bearer s3cret"));
    assert_eq!(header("host"), Some(addr.to_string()));

    let password = dir.path().join("password");
    std::fs::write(&password, "pass").unwrap();
    let basic = client(format!("http://{addr}"), |c| {
        c.basic_auth_username = "user".to_owned();
        c.basic_auth_password_file = Some(password.clone());
    });
    basic.query("up").await.unwrap();
    let request = sent.recv().await.unwrap();
    assert!(
        request.contains("authorization: Basic dXNlcjpwYXNz\r\n"),
        "{request}"
    );

    let reason = |r: Result<Vec<u8>, Failure>| r.unwrap_err().reason();
    let small = client(format!("http://{addr}"), |c| c.max_response_bytes = 1024);
    assert_eq!(reason(small.query("big").await), "too_large");
    assert_eq!(reason(small.query("teapot").await), "http");
    let started = std::time::Instant::now();
    assert_eq!(reason(small.query("silent").await), "timeout");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(500) && waited < Duration::from_millis(1500),
        "{waited:?}"
    );
    std::fs::remove_file(&token).unwrap();
    assert_eq!(reason(bearer.query("up").await), "credentials");
    // TLS to a server that speaks plain HTTP: the handshake fails, counted as TLS.
    let tls = client(format!("https://127.0.0.1:{}", addr.port()), |c| {
        c.ca_file = Some(dir.path().join("missing.pem"));
    });
    assert_eq!(reason(tls.query("up").await), "tls");
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let refused = client(format!("http://127.0.0.1:{port}"), |_| {});
    assert_eq!(reason(refused.query("up").await), "unreachable");
}

fn text_of(handle: &ClusterHandle) -> String {
    let snapshot = tally_exporters::Snapshot {
        families: handle.families(),
    };
    let rendered = tally_exporters::prometheus_text::render(&snapshot, false).unwrap();
    String::from_utf8(rendered.text).unwrap()
}

#[test]
fn a_failure_keeps_the_last_answer_until_it_is_stale_and_every_reason_is_counted() {
    let config =
        budget_config("resource = 'cpu_seconds'\nlimit = 10.0\nwindow = '1h'\nper = 'team'\n");
    let handle = ClusterHandle::idle(&config);
    assert_eq!(handle.usage("b", "a"), Reading::Pending);
    handle.answer("b", Err(Failure::Timeout));
    assert_eq!(handle.usage("b", "a"), Reading::Unavailable);
    handle.answer("b", Ok(vec![("a".to_owned(), 12.0)]));
    assert_eq!(handle.usage("b", "a"), Reading::Fresh(12.0));
    // Absent from an answer that has others: nothing used anywhere.
    assert_eq!(handle.usage("b", "z"), Reading::Fresh(0.0));
    handle.answer("b", Err(Failure::Empty));
    handle.answer("b", Err(Failure::Value("NaN".to_owned())));
    handle.answer("b", Err(Failure::Empty));
    assert_eq!(handle.usage("b", "a"), Reading::Fresh(12.0));
    let text = text_of(&handle);
    for line in [
        "tally_cluster_budget_available{budget=\"b\",on_unavailable=\"hold\"} 1",
        "tally_cluster_queries_total{budget=\"b\"} 5",
        "tally_cluster_query_failures_total{budget=\"b\",reason=\"empty\"} 2",
        "tally_cluster_query_failures_total{budget=\"b\",reason=\"value\"} 1",
        "tally_cluster_query_failures_total{budget=\"b\",reason=\"timeout\"} 1",
        "tally_cluster_query_failures_total{budget=\"b\",reason=\"tls\"} 0",
    ] {
        assert!(text.lines().any(|l| l == line), "{line} not in\n{text}");
    }
    std::thread::sleep(Duration::from_millis(2100));
    assert_eq!(handle.usage("b", "a"), Reading::Unavailable);
    let text = text_of(&handle);
    assert!(
        text.lines()
            .any(|l| l == "tally_cluster_budget_available{budget=\"b\",on_unavailable=\"hold\"} 0"),
        "{text}"
    );
    // A reload that changes the question forgets the old answer.
    let changed =
        budget_config("resource = 'cpu_seconds'\nlimit = 10.0\nwindow = '2h'\nper = 'team'\n");
    handle.answer("b", Ok(vec![("a".to_owned(), 1.0)]));
    handle.update(&changed);
    assert_eq!(handle.usage("b", "a"), Reading::Pending);
}
