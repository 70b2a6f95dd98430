//! `tally top`: a live terminal view of a running agent, read from its `/metrics` endpoint (the
//! same numbers Prometheus gets): workloads by GPU-seconds rate, with CPU, network, disk, GPU
//! memory, cost, their highest budget usage and the throttles in force; or the same summed by
//! one label (`--by team`, `--by namespace`) for showback.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read as _, Write as _};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use tally_exporters::Metric;

use crate::catalogue::{self, budget, cost, inference, workload};
use crate::inference::exposition;

/// One series: name, labels, value.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Parses the Prometheus text format (comments skipped, escapes in label values decoded); a
/// line that is not a sample is skipped.
pub fn parse(text: &str) -> Vec<Series> {
    text.lines()
        .filter_map(|l| exposition::parse_line(l).ok().flatten())
        .map(|s| Series {
            name: s.name.to_owned(),
            labels: s
                .labels
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.into_owned()))
                .collect(),
            value: s.value,
        })
        .collect()
}

/// A workload's row.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Row {
    pub name: String,
    pub gpu_seconds: f64,
    pub cpu_seconds: f64,
    pub tx_bytes: f64,
    pub rx_bytes: f64,
    pub disk_bytes: f64,
    pub gpu_memory_bytes: f64,
    pub memory_bytes: f64,
    /// What its use cost, in the configured currency (a rate per second in a view).
    pub cost: f64,
    /// Prompt and generation tokens its inference servers processed (a rate in a view).
    pub tokens: f64,
    /// Workloads summed into the row (1 without `--by`).
    pub workloads: usize,
    pub budget_ratio: Option<f64>,
    pub throttles: Vec<String>,
}

/// The budget families whose rows are a budget's subjects (one workload, or all those of a shared
/// budget or of one `per` group).
const SUBJECT_FAMILIES: [&Metric; 4] = [
    &budget::USAGE_RATIO,
    &budget::USAGE,
    &budget::ENFORCEMENT_ACTIVE,
    &budget::ENFORCEMENT_FREEZE_SHARE_RATIO,
];

/// The name of the group a label value stands for when a workload has none.
pub const NO_VALUE: &str = "(none)";

fn workload_name(labels: &BTreeMap<String, String>) -> Option<String> {
    let get = |k: &str| labels.get(k).map(String::as_str).unwrap_or("");
    if !get("pod").is_empty() {
        return Some(format!(
            "{}/{}/{}",
            get("namespace"),
            get("pod"),
            get("container")
        ));
    }
    if !get("unit").is_empty() {
        return Some(get("unit").to_owned());
    }
    if !get("container_id").is_empty() {
        // The first 12 characters (not bytes: the label comes from the scraped text).
        let id: String = get("container_id").chars().take(12).collect();
        return Some(format!("container {id}"));
    }
    (labels.contains_key("pod_uid") && labels.contains_key("unit")).then(|| "(host)".to_owned())
}

/// Totals per workload from one scrape.
pub fn rows(series: &[Series]) -> BTreeMap<String, Row> {
    rows_by(series, None)
}

/// Totals per workload, or per value of the label `by` (workloads without it under
/// [`NO_VALUE`]), from one scrape.
pub fn rows_by(series: &[Series], by: Option<&str>) -> BTreeMap<String, Row> {
    let mut rows: BTreeMap<String, Row> = BTreeMap::new();
    let mut members: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for s in series {
        let Some(workload) = workload_name(&s.labels) else {
            continue;
        };
        let name = match by {
            None => workload.clone(),
            Some(label) => s
                .labels
                .get(label)
                .filter(|v| !v.is_empty())
                .cloned()
                .unwrap_or_else(|| NO_VALUE.to_owned()),
        };
        let row = rows.entry(name.clone()).or_insert_with(|| Row {
            name: name.clone(),
            ..Row::default()
        });
        let Some(metric) = catalogue::find(&s.name) else {
            continue;
        };
        // A budget's rows are about its subjects: those of shared and `per` budgets carry no
        // workload's labels, and are no workload.
        if !SUBJECT_FAMILIES.contains(&metric) {
            let set = members.entry(name).or_default();
            set.insert(workload);
            row.workloads = set.len();
        }
        if metric == &workload::GPU_SECONDS {
            row.gpu_seconds += s.value;
        } else if metric == &workload::CPU_SECONDS {
            row.cpu_seconds += s.value;
        } else if metric == &workload::NETWORK_TRANSMIT_BYTES {
            row.tx_bytes += s.value;
        } else if metric == &workload::NETWORK_RECEIVE_BYTES {
            row.rx_bytes += s.value;
        } else if metric == &workload::DISK_READ_BYTES || metric == &workload::DISK_WRITE_BYTES {
            row.disk_bytes += s.value;
        } else if metric == &workload::GPU_MEMORY_BYTES {
            row.gpu_memory_bytes += s.value;
        } else if metric == &workload::MEMORY_BYTES {
            row.memory_bytes += s.value;
        } else if metric == &cost::WORKLOAD_COST {
            row.cost += s.value;
        } else if metric == &inference::TOKENS
            && s.labels
                .get("kind")
                .is_some_and(|k| k == "prompt" || k == "generation")
        {
            row.tokens += s.value;
        } else if metric == &budget::USAGE_RATIO {
            row.budget_ratio = Some(row.budget_ratio.unwrap_or(0.0).max(s.value));
        } else if metric == &budget::ENFORCEMENT_ACTIVE && s.value >= 1.0 {
            let action = s.labels.get("action").cloned().unwrap_or_default();
            let dry = s.labels.get("dry_run").is_some_and(|d| d == "true");
            row.throttles.push(if dry {
                format!("{action}(dry)")
            } else {
                action
            });
        }
    }
    rows
}

/// Rates between two scrapes `secs` apart; levels from the later one.
pub fn rates(before: &BTreeMap<String, Row>, after: &BTreeMap<String, Row>, secs: f64) -> Vec<Row> {
    let secs = secs.max(1e-3);
    let mut out: Vec<Row> = after
        .values()
        .map(|a| {
            let b = before.get(&a.name).cloned().unwrap_or_default();
            let rate = |x: f64, y: f64| ((x - y) / secs).max(0.0);
            Row {
                gpu_seconds: rate(a.gpu_seconds, b.gpu_seconds),
                cpu_seconds: rate(a.cpu_seconds, b.cpu_seconds),
                tx_bytes: rate(a.tx_bytes, b.tx_bytes),
                rx_bytes: rate(a.rx_bytes, b.rx_bytes),
                disk_bytes: rate(a.disk_bytes, b.disk_bytes),
                cost: rate(a.cost, b.cost),
                tokens: rate(a.tokens, b.tokens),
                ..a.clone()
            }
        })
        .collect();
    out.sort_by(|x, y| {
        y.cost
            .total_cmp(&x.cost)
            .then(y.gpu_seconds.total_cmp(&x.gpu_seconds))
            .then(y.cpu_seconds.total_cmp(&x.cpu_seconds))
            .then(x.name.cmp(&y.name))
    });
    out
}

fn bytes(v: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = v;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1}{}", UNITS[unit])
}

/// The view as text.
pub fn render(rows: &[Row], limit: usize, agent: &str) -> String {
    render_by(rows, limit, agent, None)
}

/// The view as text, its rows named by the label `by` when grouped.
pub fn render_by(rows: &[Row], limit: usize, agent: &str, by: Option<&str>) -> String {
    let (what, first) = match by {
        None => ("workloads".to_owned(), "WORKLOAD".to_owned()),
        Some(label) => (
            format!(
                "values of {label}, {} workloads",
                rows.iter().map(|r| r.workloads).sum::<usize>()
            ),
            label.to_uppercase(),
        ),
    };
    let mut out = format!(
        "tally top — {agent} — {} {what}\n{:<48} {:>9} {:>7} {:>8} {:>6} {:>10} {:>10} {:>10} {:>9} {:>9} {:>6}  {}\n",
        rows.len(),
        first,
        "COST/h",
        "GPU s/s",
        "TOK/s",
        "CPU",
        "NET TX/s",
        "NET RX/s",
        "DISK/s",
        "GPU MEM",
        "MEM",
        "BUDGET",
        "THROTTLES"
    );
    for r in rows.iter().take(limit) {
        let name: String = r.name.chars().take(48).collect();
        let budget = r
            .budget_ratio
            .map_or_else(|| "-".to_owned(), |b| format!("{:.0}%", b * 100.0));
        out.push_str(&format!(
            "{name:<48} {:>9.4} {:>7.2} {:>8.1} {:>6.2} {:>10} {:>10} {:>10} {:>9} {:>9} {:>6}  {}\n",
            r.cost * 3600.0,
            r.gpu_seconds,
            r.tokens,
            r.cpu_seconds,
            bytes(r.tx_bytes),
            bytes(r.rx_bytes),
            bytes(r.disk_bytes),
            bytes(r.gpu_memory_bytes),
            bytes(r.memory_bytes),
            budget,
            r.throttles.join(",")
        ));
    }
    out
}

fn scrape(agent: &str) -> anyhow::Result<String> {
    let addr = agent
        .to_socket_addrs()
        .with_context(|| format!("`{agent}` is not host:port"))?
        .next()
        .with_context(|| format!("`{agent}` resolves to nothing"))?;
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .with_context(|| format!("connecting to the agent at {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: {agent}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("the agent's answer is not HTTP")?;
    let head = String::from_utf8_lossy(&response[..split]);
    let body = &response[split + 4..];
    if !head.starts_with("HTTP/1.1 200") {
        bail!(
            "the agent answered {}",
            head.lines().next().unwrap_or_default()
        );
    }
    // Chunk sizes count bytes, and a chunk may end inside a UTF-8 character: join the chunks
    // as bytes, then decode once.
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_vec()
    };
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// The body of an HTTP/1.1 chunked response; stops at the last chunk, or at the first malformed
/// or cut one.
pub fn dechunk(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = body;
    while let Some(line_end) = rest.windows(2).position(|w| w == b"\r\n") {
        let size = String::from_utf8_lossy(&rest[..line_end]);
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        let after = &rest[line_end + 2..];
        if n == 0 || after.len() < n {
            break;
        }
        out.extend_from_slice(&after[..n]);
        rest = after[n..].strip_prefix(b"\r\n").unwrap_or(&after[n..]);
    }
    out
}

/// Runs the view until interrupted (or once).
pub fn run(
    agent: &str,
    interval: f64,
    once: bool,
    limit: usize,
    by: Option<&str>,
) -> anyhow::Result<()> {
    if !interval.is_finite() {
        bail!("--interval must be a number of seconds (0.2 to 3600), not {interval}");
    }
    if let Some(label) = by {
        if label.is_empty() || !label.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            bail!("--by must be a label name (letters, digits and _, e.g. team), not `{label}`");
        }
    }
    let interval = Duration::from_secs_f64(interval.clamp(0.2, 3600.0));
    let mut previous = (Instant::now(), rows_by(&parse(&scrape(agent)?), by));
    loop {
        std::thread::sleep(interval);
        let now = Instant::now();
        let current = rows_by(&parse(&scrape(agent)?), by);
        let view = rates(
            &previous.1,
            &current,
            now.duration_since(previous.0).as_secs_f64(),
        );
        let text = render_by(&view, limit, agent, by);
        let mut stdout = std::io::stdout().lock();
        if once {
            stdout.write_all(text.as_bytes())?;
            return Ok(());
        }
        // Clear the screen and home the cursor, then draw.
        write!(stdout, "\x1b[2J\x1b[H{text}")?;
        stdout.flush()?;
        previous = (now, current);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chunk_may_end_inside_a_character() {
        // "é" is 0xC3 0xA9: the first chunk ends after 0xC3.
        let body = b"2\r\na\xc3\r\n2\r\n\xa9b\r\n0\r\n\r\n";
        assert_eq!(String::from_utf8(dechunk(body)).unwrap(), "a\u{e9}b");
    }

    #[test]
    fn a_nan_interval_is_an_error_not_a_panic() {
        let err = run("127.0.0.1:1", f64::NAN, true, 10, None).unwrap_err();
        assert_eq!(
            err.to_string(),
            "--interval must be a number of seconds (0.2 to 3600), not NaN"
        );
    }

    const LABELS: &str =
        r#"namespace="ml",pod="train-0",pod_uid="u",container="main",container_id="c",unit="""#;

    #[test]
    fn parses_and_rates_workload_rows() {
        let before = format!(
            "# TYPE x counter\ntally_workload_cpu_seconds_total{{{LABELS}}} 10\ntally_workload_gpu_seconds_total{{{LABELS},gpu=\"GPU-1\",method=\"sampled\"}} 5\n"
        );
        let after = format!(
            "tally_workload_cpu_seconds_total{{{LABELS}}} 12\ntally_workload_gpu_seconds_total{{{LABELS},gpu=\"GPU-1\",method=\"sampled\"}} 6\ntally_workload_tokens_total{{{LABELS},engine=\"vllm\",model=\"m\",kind=\"prompt\"}} 300\ntally_workload_tokens_total{{{LABELS},engine=\"vllm\",model=\"m\",kind=\"generation\"}} 100\ntally_workload_tokens_total{{{LABELS},engine=\"vllm\",model=\"m\",kind=\"cached\"}} 250\ntally_budget_usage_ratio{{{LABELS},budget=\"b\",resource=\"cpu_seconds\"}} 1.02\ntally_enforcement_active{{{LABELS},budget=\"b\",action=\"cpu\",dry_run=\"false\"}} 1\ntally_build_info{{version=\"0.1.0\"}} 1\n"
        );
        let view = rates(&rows(&parse(&before)), &rows(&parse(&after)), 2.0);
        assert_eq!(view.len(), 1, "{view:?}");
        let r = &view[0];
        assert_eq!(r.name, "ml/train-0/main");
        assert_eq!(r.cpu_seconds, 1.0);
        assert_eq!(r.gpu_seconds, 0.5);
        // Prompt and generation tokens (cached ones are part of the prompt), from none before.
        assert_eq!(r.tokens, 200.0);
        assert_eq!(r.budget_ratio, Some(1.02));
        assert_eq!(r.throttles, ["cpu"]);
        let text = render(&view, 10, "a");
        assert!(text.contains("ml/train-0/main"), "{text}");
        assert!(text.contains("102%"), "{text}");
        assert!(
            text.contains("TOK/s") && text.contains("   200.0 "),
            "{text}"
        );
    }

    #[test]
    fn grouped_by_a_label_rows_sum_their_workloads_and_cost() {
        let series = |cpu_a: f64, cost_a: f64, cpu_b: f64, cost_b: f64| {
            let w = |pod: &str, team: &str| {
                format!(
                    r#"namespace="ml",pod="{pod}",pod_uid="u-{pod}",container="main",container_id="c-{pod}",unit="",team="{team}""#
                )
            };
            format!(
                "tally_workload_cpu_seconds_total{{{a}}} {cpu_a}\n\
                 tally_workload_cost_total{{{a},resource=\"cpu\"}} {cost_a}\n\
                 tally_workload_cpu_seconds_total{{{b}}} {cpu_b}\n\
                 tally_workload_cost_total{{{b},resource=\"cpu\"}} {cost_b}\n\
                 tally_workload_cpu_seconds_total{{{c}}} 1\n\
                 tally_budget_usage_ratio{{namespace=\"\",pod=\"\",pod_uid=\"\",container=\"\",container_id=\"\",unit=\"\",team=\"search\",budget=\"teams\",resource=\"cost\"}} 0.5\n",
                a = w("a", "search"),
                b = w("b", "search"),
                c = w("c", ""),
            )
        };
        let before = rows_by(&parse(&series(10.0, 1.0, 20.0, 2.0)), Some("team"));
        let after = rows_by(&parse(&series(12.0, 1.5, 23.0, 2.25)), Some("team"));
        let view = rates(&before, &after, 2.0);
        let names: Vec<&str> = view.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["search", NO_VALUE]);
        let search = &view[0];
        assert_eq!(search.workloads, 2);
        assert_eq!(search.cpu_seconds, 2.5);
        assert_eq!(search.cost, 0.375);
        assert_eq!(search.budget_ratio, Some(0.5));
        assert_eq!((view[1].workloads, view[1].cost), (1, 0.0));
        let text = render_by(&view, 10, "a", Some("team"));
        assert!(text.contains("2 values of team, 3 workloads"), "{text}");
        assert!(
            text.lines().nth(1).is_some_and(|l| l.starts_with("TEAM ")),
            "{text}"
        );
        // 0.375 a second is 1350 an hour.
        assert!(text.contains("1350.0000"), "{text}");
        let err = run("127.0.0.1:1", 1.0, true, 10, Some("te am")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "--by must be a label name (letters, digits and _, e.g. team), not `te am`"
        );
    }

    /// Found by fuzzing (`fuzz/fuzz_targets/top.rs`): a container id cut at byte 12, inside a
    /// character, panicked.
    #[test]
    fn a_container_id_is_shortened_by_characters() {
        let text = "tally_workload_cpu_seconds_total{namespace=\"\",pod=\"\",pod_uid=\"\",container=\"\",container_id=\"abcdefghijk\u{e9}\u{e9}z\",unit=\"\"} 1\n";
        let names: Vec<String> = rows(&parse(text)).into_keys().collect();
        assert_eq!(names, ["container abcdefghijk\u{e9}"]);
    }

    #[test]
    fn label_values_with_escapes() {
        let s = parse(r#"m{a="x\"y,z",b="q\\"} 3"#);
        assert_eq!(s[0].labels["a"], "x\"y,z");
        assert_eq!(s[0].labels["b"], "q\\");
        assert_eq!(s[0].value, 3.0);
        assert!(parse("garbage{").is_empty());
    }
}
