use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tally_exporters::{Family, Histogram, Kind, LabelSet, Snapshot};

use super::ALL;

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn names_follow_prometheus_conventions() {
    let mut seen = BTreeSet::new();
    for m in ALL {
        assert!(seen.insert(m.name), "{} declared twice", m.name);
        assert!(
            m.name.starts_with("tally_")
                && m.name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
            "{}: not a tally_ snake_case name",
            m.name
        );
        assert_eq!(
            m.name.ends_with("_total"),
            m.kind == Kind::Counter,
            "{}: counters and only counters end in _total",
            m.name
        );
        let stem = m.name.strip_suffix("_total").unwrap_or(m.name);
        if !m.unit.is_empty() {
            assert!(
                stem.ends_with(&format!("_{}", m.unit)),
                "{}: unit {} is not the name's suffix",
                m.name,
                m.unit
            );
        }
        assert!(
            m.help.ends_with('.') && !m.help.contains('\n'),
            "{}: help is one sentence ending in a period",
            m.name
        );
        if m.name.starts_with("tally_workload_") {
            assert!(m.per_workload, "{}: per-workload name", m.name);
        }
        let labels: BTreeSet<_> = m.labels.iter().collect();
        assert_eq!(labels.len(), m.labels.len(), "{}: label twice", m.name);
    }
    assert_eq!(ALL.len(), 108);
}

/// One series per family, with the declared labels, through the real text encoder: its `#` lines
/// are what `/metrics` shows for each family.
fn exposition() -> String {
    let workload: LabelSet = Arc::from(
        super::WORKLOAD_LABELS
            .iter()
            .map(|&name| (name, Arc::from("")))
            .collect::<Vec<_>>(),
    );
    let none: LabelSet = Arc::from([]);
    let families = ALL
        .iter()
        .map(|m| {
            let mut family = Family::new(m);
            let labels = if m.per_workload { &workload } else { &none };
            let extra = m.labels.iter().map(|&l| (l, Arc::from("x"))).collect();
            if m.kind == Kind::Histogram {
                let histogram = Histogram {
                    buckets: vec![(1.0, 0)],
                    sum: 0.0,
                    count: 0,
                };
                family.push_histogram(labels, extra, histogram);
            } else {
                family.samples.push(tally_exporters::Sample {
                    labels: labels.clone(),
                    extra,
                    value: 0.0,
                    histogram: None,
                });
            }
            family
        })
        .collect();
    let rendered = tally_exporters::prometheus_text::render(&Snapshot { families }, false).unwrap();
    String::from_utf8(rendered.text).unwrap()
}

/// `catalogue/golden.txt` holds the HELP and TYPE lines of every family and one series with its
/// label names; a change to a name, a help text, a type or a label shows in review as a change to
/// that file, and the integration tests check what the agent serves against it.
/// `TALLY_BLESS=1` rewrites it.
#[test]
fn the_exposition_matches_the_golden_file() {
    let lines = exposition();
    let golden = crate_dir().join("src/catalogue/golden.txt");
    if std::env::var_os("TALLY_BLESS").is_some() {
        std::fs::write(&golden, &lines).unwrap();
    }
    let expected = std::fs::read_to_string(&golden).unwrap();
    assert!(
        lines == expected,
        "HELP/TYPE lines differ from {} (TALLY_BLESS=1 to accept):\n{}",
        golden.display(),
        line_diff(&expected, &lines)
    );
}

fn line_diff(old: &str, new: &str) -> String {
    let old: BTreeSet<&str> = old.lines().collect();
    let new: BTreeSet<&str> = new.lines().collect();
    let gone = old.difference(&new).map(|l| format!("- {l}\n"));
    let came = new.difference(&old).map(|l| format!("+ {l}\n"));
    gone.chain(came).collect()
}

#[test]
fn the_encoder_shows_each_declared_label() {
    let text = exposition();
    for m in ALL {
        let line = text
            .lines()
            .find(|l| l.starts_with(m.name) && !l.starts_with(&format!("{}_", m.name)))
            .or_else(|| {
                text.lines()
                    .find(|l| l.starts_with(&format!("{}_count", m.name)))
            })
            .unwrap_or_else(|| panic!("{} not in the exposition", m.name));
        for label in m.labels {
            assert!(line.contains(&format!("{label}=\"x\"")), "{line}");
        }
    }
}

/// `tally_a_{b,c}_total{x,y}` in a README cell: the names it stands for and their labels.
fn expand(token: &str) -> Vec<(String, Vec<String>)> {
    let (name, labels) = match token.rfind('{') {
        Some(i) if token.ends_with('}') && !token[..i].ends_with('_') => {
            let labels = token[i + 1..token.len() - 1]
                .split(',')
                .map(str::to_owned)
                .collect();
            (&token[..i], labels)
        }
        _ => (token, Vec::new()),
    };
    let mut names = vec![String::new()];
    let mut rest = name;
    while let Some(open) = rest.find('{') {
        let close = rest[open..]
            .find('}')
            .map(|c| open + c)
            .unwrap_or(rest.len());
        let options: Vec<&str> = rest[open + 1..close].split(',').collect();
        names = names
            .iter()
            .flat_map(|n| {
                options
                    .iter()
                    .map(move |o| format!("{n}{}{o}", &rest[..open]))
            })
            .collect();
        rest = rest.get(close + 1..).unwrap_or("");
    }
    names
        .into_iter()
        .map(|n| (format!("{n}{rest}"), labels.clone()))
        .collect()
}

#[test]
fn readme_brace_expansion() {
    assert_eq!(
        expand("tally_a_{tx,rx}_{b,p}_total{device,port}"),
        [
            "tally_a_tx_b_total",
            "tally_a_tx_p_total",
            "tally_a_rx_b_total",
            "tally_a_rx_p_total"
        ]
        .map(|n| (n.to_owned(), vec!["device".to_owned(), "port".to_owned()]))
    );
    assert_eq!(expand("tally_x"), [("tally_x".to_owned(), Vec::new())]);
}

/// The README's metric table names every family with its labels, and nothing else.
#[test]
fn the_readme_metric_table_matches_the_catalogue() {
    let readme = std::fs::read_to_string(crate_dir().join("../README.md")).unwrap();
    let mut documented = BTreeMap::new();
    for row in readme.lines().filter(|l| l.starts_with("| `tally_")) {
        let cell = row.split('|').nth(1).unwrap_or("");
        for token in cell.split('`').skip(1).step_by(2) {
            for (name, labels) in expand(token) {
                documented.insert(name, labels);
            }
        }
    }
    let declared: BTreeMap<String, Vec<String>> = ALL
        .iter()
        .map(|m| {
            let labels = m.labels.iter().map(|&l| l.to_owned()).collect();
            (m.name.to_owned(), labels)
        })
        .collect();
    assert_eq!(documented, declared);
}

/// Non-test code of the agent spells no metric name outside this module.
#[test]
fn no_metric_name_is_spelled_outside_the_catalogue() {
    let mut found = Vec::new();
    scan(&crate_dir().join("src"), &mut found);
    assert!(
        found.is_empty(),
        "metric names outside the catalogue:\n{}",
        found.join("\n")
    );
}

fn scan(dir: &Path, found: &mut Vec<String>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            if !path.ends_with("catalogue") {
                scan(&path, found);
            }
            continue;
        }
        if path.extension().is_none_or(|e| e != "rs") || path.ends_with("tests.rs") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let code = text.split("#[cfg(test)]").next().unwrap_or("");
        for (i, line) in code.lines().enumerate() {
            if line.contains("\"tally_") && !line.trim_start().starts_with("//") {
                found.push(format!("{}:{}: {}", path.display(), i + 1, line.trim()));
            }
        }
    }
}
