//! What `/metrics` may contain: the agent's metric catalogue as its golden file shows it
//! (`agent/src/catalogue/golden.txt`: the HELP and TYPE lines of every family and one series with
//! its label names). Every scrape the tests take is checked against it.

use std::collections::HashMap;
use std::sync::OnceLock;

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

/// Panics unless every family in `text` (a `/metrics` exposition) is declared in the catalogue
/// with the same HELP and TYPE, and every series carries exactly the declared label names.
pub fn assert_declared(text: &str) {
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
            assert_eq!(
                families[&family].labels, labels,
                "labels of {line} against the catalogue's {family}"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
