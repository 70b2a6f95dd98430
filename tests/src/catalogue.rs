//! What `/metrics` may contain: the agent's metric catalogue as its golden file shows it
//! (`agent/src/catalogue/golden.txt`: the HELP and TYPE lines of every family and one series with
//! its label names). Every scrape the tests take is checked against it.

use std::collections::HashMap;

use std::sync::OnceLock;
use tally_agent::catalogue::WORKLOAD_LABELS;

/// A family as the golden file declares it.
#[derive(Debug)]
struct Declared {
    help: String,
    kind: String,
    /// Label names in order (`le` of histogram buckets left out).
    labels: Vec<String>,
}

fn declared() -> &'static HashMap<String, Declared> {
    static DECLARED: OnceLock<HashMap<String, Declared>> = OnceLock::new();
    DECLARED.get_or_init(|| {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../agent/src/catalogue/golden.txt"
        );
        let text = std::fs::read_to_string(path).expect("agent/src/catalogue/golden.txt");
        let mut families: HashMap<String, Declared> = HashMap::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, help) = rest.split_once(' ').expect("HELP line");
                families.insert(
                    name.to_owned(),
                    Declared {
                        help: help.to_owned(),
                        kind: String::new(),
                        labels: Vec::new(),
                    },
                );
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("TYPE line");
                families.get_mut(name).expect("TYPE after HELP").kind = kind.to_owned();
            } else {
                let (name, labels) = series(line);
                let family = family_of(&families, &name).expect("golden series of a family");
                families.get_mut(&family).expect("family").labels = labels;
            }
        }
        families
    })
}

/// A series line's metric name and label names (without `le`).
fn series(line: &str) -> (String, Vec<String>) {
    let name_end = line.find(['{', ' ']).unwrap_or(line.len());
    let name = line[..name_end].to_owned();
    let mut labels = Vec::new();
    if line[name_end..].starts_with('{') {
        let mut rest = &line[name_end + 1..];
        while let Some(eq) = rest.find("=\"") {
            let label = rest[..eq].trim_start_matches(',');
            if label != "le" {
                labels.push(label.to_owned());
            }
            // Skip the quoted value, escapes included.
            let mut chars = rest[eq + 2..].char_indices();
            let mut end = rest.len() - eq - 2;
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => {
                        chars.next();
                    }
                    '"' => {
                        end = i;
                        break;
                    }
                    _ => {}
                }
            }
            rest = &rest[eq + 2 + end + 1..];
            if rest.starts_with('}') {
                break;
            }
        }
    }
    (name, labels)
}

/// The family a series name belongs to (a histogram's `_bucket`, `_sum` and `_count` series
/// belong to the histogram).
fn family_of(families: &HashMap<String, Declared>, name: &str) -> Option<String> {
    if families.contains_key(name) {
        return Some(name.to_owned());
    }
    ["_bucket", "_sum", "_count"]
        .iter()
        .filter_map(|suffix| name.strip_suffix(suffix))
        .find(|base| families.get(*base).is_some_and(|f| f.kind == "histogram"))
        .map(str::to_owned)
}

/// The label names a configuration adds to per-workload series: its `[tenants] labels` and its
/// budgets' `per` labels, spelled as Prometheus labels (`cost-center` → `cost_center`).
pub fn promoted_labels(config: &str) -> Vec<String> {
    let Ok(value) = config.parse::<toml::Table>() else {
        return Vec::new();
    };
    let strings = |v: Option<&toml::Value>| -> Vec<String> {
        v.and_then(toml::Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut keys = strings(value.get("tenants").and_then(|t| t.get("labels")));
    for budget in value
        .get("budget")
        .and_then(toml::Value::as_array)
        .into_iter()
        .flatten()
    {
        if let Some(per) = budget.get("per").and_then(toml::Value::as_str) {
            if per != "namespace" {
                keys.push(per.to_owned());
            }
        }
    }
    keys.iter()
        .map(|k| {
            let name: String = k
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
                .collect();
            if name.starts_with(|c: char| c.is_ascii_digit()) {
                format!("_{name}")
            } else {
                name
            }
        })
        .collect()
}

/// Whether `labels` are the `declared` ones, with (in a per-workload family) some of the
/// `promoted` labels, in order, right after the workload labels.
fn labels_match(declared: &[String], labels: &[String], promoted: &[String]) -> bool {
    if declared == labels {
        return true;
    }
    let per_workload = declared.len() >= WORKLOAD_LABELS.len()
        && declared.iter().zip(WORKLOAD_LABELS).all(|(d, w)| d == w);
    if !per_workload || labels.len() < declared.len() || promoted.is_empty() {
        return false;
    }
    let n = WORKLOAD_LABELS.len();
    let extra = labels.len() - declared.len();
    let inserted = &labels[n..n + extra];
    let mut wanted = promoted.iter();
    labels[..n] == declared[..n]
        && labels[n + extra..] == declared[n..]
        && inserted.iter().all(|l| wanted.any(|p| p == l))
}

/// Panics unless every family in `text` (a `/metrics` exposition) is declared in the catalogue
/// with the same HELP and TYPE, and every series carries exactly the declared label names.
pub fn assert_declared(text: &str) {
    assert_declared_with(text, &[]);
}

/// As [`assert_declared`], where per-workload series may also carry the `promoted` labels
/// ([`promoted_labels`]) after the workload labels.
pub fn assert_declared_with(text: &str, promoted: &[String]) {
    let families = declared();
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            let family = families
                .get(name)
                .unwrap_or_else(|| panic!("{name} is not in the catalogue:\n{text}"));
            assert_eq!(family.help, help, "HELP of {name}");
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, ""));
            let family = families
                .get(name)
                .unwrap_or_else(|| panic!("{name} is not in the catalogue"));
            assert_eq!(family.kind, kind, "TYPE of {name}");
        } else if !line.starts_with('#') {
            let (name, labels) = series(line);
            let family = family_of(families, &name)
                .unwrap_or_else(|| panic!("{name} is not in the catalogue: {line}"));
            assert!(
                labels_match(&families[&family].labels, &labels, promoted),
                "labels of {line} against the catalogue's {family}: {:?} (promoted: {promoted:?})",
                families[&family].labels
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn promoted_labels_go_right_after_the_workload_labels_and_nowhere_else() {
        let v = |l: &[&str]| l.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let mut declared = v(&WORKLOAD_LABELS);
        declared.push("gpu".to_owned());
        let promoted = promoted_labels(
            "[tenants]\nlabels = [\"team\", \"cost-center\"]\n[[budget]]\nper = \"1x\"\n",
        );
        assert_eq!(promoted, ["team", "cost_center", "_1x"]);
        let with = |extra: &[&str]| {
            let mut l = declared[..6].to_vec();
            l.extend(v(extra));
            l.push("gpu".to_owned());
            l
        };
        assert!(labels_match(&declared, &declared, &promoted));
        assert!(labels_match(
            &declared,
            &with(&["team", "cost_center"]),
            &promoted
        ));
        assert!(labels_match(&declared, &with(&["cost_center"]), &promoted));
        assert!(!labels_match(
            &declared,
            &with(&["cost_center", "team"]),
            &promoted
        ));
        assert!(!labels_match(&declared, &with(&["other"]), &promoted));
        assert!(!labels_match(&declared, &with(&["team"]), &[]));
        let mut after = declared.clone();
        after.push("team".to_owned());
        assert!(!labels_match(&declared, &after, &promoted));
    }

    #[test]
    fn series_labels_skip_quoted_values_and_le() {
        assert_eq!(
            series(r#"a_bucket{x="1,y=\"2\"",z="",le="+Inf"} 3"#),
            ("a_bucket".to_owned(), vec!["x".to_owned(), "z".to_owned()])
        );
        assert_eq!(series("b 1"), ("b".to_owned(), Vec::new()));
    }

    #[test]
    fn a_served_label_the_catalogue_lacks_fails() {
        let ok = "# HELP tally_probe_up Whether a measurement source works (1) or not (0), by probe and the method in use.\n# TYPE tally_probe_up gauge\ntally_probe_up{probe=\"cgroupfs\",method=\"v2\"} 1\n";
        assert_declared(ok);
        let extra = ok.replace("method=\"v2\"", "method=\"v2\",extra=\"1\"");
        assert!(std::panic::catch_unwind(|| assert_declared(&extra)).is_err());
        let undeclared = "tally_nothing 1\n";
        assert!(std::panic::catch_unwind(|| assert_declared(undeclared)).is_err());
    }
}
