use super::*;

#[test]
fn empty_file_is_the_embedded_defaults() {
    assert_eq!(parse("").unwrap(), Config::default());
}

#[test]
fn every_error_is_reported_with_path_and_line() {
    let text = "\
[agent]
listen = \"nonsense\"
tick_interval_ms = \"fast\"
colour = \"blue\"

[ledger]
grace_period_secs = 1

[paths]
proc_root = \"relative/proc\"

[nonsense]
x = 1
";
    let errors = parse(text).unwrap_err().0;
    let found: Vec<(String, Option<usize>)> =
        errors.iter().map(|e| (e.path.clone(), e.line)).collect();
    assert_eq!(
        found,
        vec![
            ("agent.listen".to_owned(), Some(2)),
            ("agent.tick_interval_ms".to_owned(), Some(3)),
            ("agent.colour".to_owned(), Some(4)),
            ("paths.proc_root".to_owned(), Some(10)),
            ("nonsense".to_owned(), Some(12)),
        ],
        "{errors:#?}"
    );
    assert!(errors[1].message.contains("invalid type"), "{}", errors[1]);
    assert!(errors[2].message.contains("unknown field `colour`"));
    assert_eq!(
        errors[0].to_string().lines().next().unwrap(),
        errors[0].to_string()
    );
}

#[test]
fn syntax_errors_name_the_line() {
    let errors = parse("[agent]\nlisten = \n").unwrap_err().0;
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].line, Some(2));
}

#[test]
fn out_of_range_values_are_refused() {
    let errors = parse("[agent]\ntick_interval_ms = 0\n[cri]\ntimeout_ms = 1\n")
        .unwrap_err()
        .0;
    let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(paths, ["agent.tick_interval_ms", "cri.timeout_ms"]);
    assert_eq!(errors[0].line, Some(2));
}

#[test]
fn errors_inside_arrays_are_located() {
    let errors = parse("[cri]\nendpoints = [\"/a\", 3]\n").unwrap_err().0;
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].path, "cri.endpoints.1");
    assert_eq!(errors[0].line, Some(2));
}

#[test]
fn rdma_settings_are_checked_together() {
    let text = "[rdma]\nnetlink_socket = \"relative.sock\"\nnetlink_timeout_ms = 5\nqp_optional_counters = true\n";
    let errors = parse(text).unwrap_err().0;
    let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "rdma.netlink_socket",
            "rdma.netlink_timeout_ms",
            "rdma.qp_optional_counters"
        ],
        "{errors:#?}"
    );
    let ok = parse("[rdma]\nnetlink_socket = \"/run/nldev.sock\"\nallow_qp_counter_auto_mode = true\nqp_optional_counters = true\n").unwrap();
    assert!(ok.rdma.allow_qp_counter_auto_mode);
    assert_eq!(parse("").unwrap().rdma, super::super::RdmaConfig::default());
}

#[test]
fn tenant_labels_and_per_are_checked() {
    let text = "\
[tenants]
labels = [\"team\", \"gpu\", \"cost-center\", \"cost_center\", \"-bad\"]
max_values_per_label = 0

[[budget]]
name = \"b\"
resource = \"cpu_seconds\"
limit = 1.0
window = \"1m\"
per = \"pod\"
";
    let errors = parse(text).unwrap_err().0;
    let found: Vec<(&str, &str)> = errors
        .iter()
        .map(|e| (e.path.as_str(), e.message.as_str()))
        .collect();
    assert_eq!(
        found,
        vec![
            (
                "tenants.labels.1",
                "`gpu` would be the label `gpu`, which Tally's series already use"
            ),
            (
                "tenants.labels.3",
                "`cost_center` and `cost-center` would both be the label `cost_center`"
            ),
            (
                "tenants.labels.4",
                "`-bad` is not a Kubernetes label key ([prefix/]name, name of 1 to 63 of [A-Za-z0-9._-], alphanumeric at both ends)"
            ),
            (
                "tenants.max_values_per_label",
                "0 is out of range 1..=10000"
            ),
            (
                "budget.0.per",
                "`pod` would be the label `pod`, which Tally's series already use"
            ),
        ],
        "{errors:#?}"
    );
    let ok = parse(
        "[tenants]\nlabels = [\"example.com/team\"]\n\
         [[budget]]\nname = \"b\"\nresource = \"cpu_seconds\"\nlimit = 1.0\nwindow = \"1m\"\nper = \"namespace\"\n",
    )
    .unwrap();
    assert_eq!(ok.tenants.labels, ["example.com/team"]);
    assert_eq!(ok.budget[0].per.as_deref(), Some("namespace"));
}
