use super::*;

fn config(labels: &[&str], file: Option<&Path>, max: usize) -> TenantsConfig {
    TenantsConfig {
        labels: labels.iter().map(|l| (*l).to_owned()).collect(),
        namespace_labels_file: file.map(Path::to_path_buf),
        max_values_per_label: max,
    }
}

fn pod(labels: &[(&str, &str)]) -> Arc<BTreeMap<String, String>> {
    Arc::new(
        labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
    )
}

fn pairs(labels: &TenantLabels) -> Vec<(&str, &str)> {
    labels.iter().map(|(k, v)| (*k, &**v)).collect()
}

#[test]
fn label_keys_become_prometheus_label_names() {
    assert_eq!(label_name("team"), "team");
    assert_eq!(label_name("cost-center"), "cost_center");
    assert_eq!(label_name("example.com/team"), "example_com_team");
    assert_eq!(label_name("1st"), "_1st");
}

#[test]
fn the_pods_label_wins_then_the_namespaces_then_empty() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("namespaces.json");
    std::fs::write(
        &file,
        r#"{"apiVersion":"v1","kind":"NamespaceList","items":[
            {"metadata":{"name":"search","labels":{"team":"search","cost-center":"cc-7"}}},
            {"metadata":{"name":"bare"}}]}"#,
    )
    .unwrap();
    let mut t = Tenants::new(&config(&["team", "cost-center"], Some(&file), 10));
    t.refresh().unwrap();
    let own = pod(&[("team", "ranking"), ("app", "x")]);
    let (labels, selectable) = t.resolve("search", &own);
    assert_eq!(
        pairs(&labels),
        [("team", "ranking"), ("cost_center", "cc-7")]
    );
    // Budgets select on the pod's labels plus the namespace's promoted ones it lacks.
    assert_eq!(
        *selectable,
        [("app", "x"), ("cost-center", "cc-7"), ("team", "ranking")]
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect::<BTreeMap<_, _>>()
    );
    let (labels, selectable) = t.resolve("bare", &pod(&[]));
    assert_eq!(pairs(&labels), [("team", ""), ("cost_center", "")]);
    assert!(selectable.is_empty());
    // What admission selects on before a pod exists: the promoted keys of each namespace.
    let by_namespace = t.promoted_by_namespace();
    assert_eq!(by_namespace.len(), 1);
    assert_eq!(
        by_namespace["search"],
        BTreeMap::from([
            ("cost-center".to_owned(), "cc-7".to_owned()),
            ("team".to_owned(), "search".to_owned())
        ])
    );
    // A key no longer promoted is no longer offered.
    t.configure(&config(&["team"], Some(&file), 10));
    assert_eq!(
        t.promoted_by_namespace()["search"],
        BTreeMap::from([("team".to_owned(), "search".to_owned())])
    );
}

#[test]
fn values_beyond_the_cap_are_other_and_each_is_counted_once() {
    let mut t = Tenants::new(&config(&["team"], None, 2));
    for (team, want) in [
        ("a", "a"),
        ("b", "b"),
        ("c", OTHER),
        ("a", "a"),
        ("c", OTHER),
        ("d", OTHER),
    ] {
        let (labels, _) = t.resolve("ns", &pod(&[("team", team)]));
        assert_eq!(pairs(&labels), [("team", want)], "team {team}");
    }
    assert_eq!(t.folded(), [("team", 2)]);
    // A reload keeping the label keeps what it admitted.
    t.configure(&config(&["team", "project"], None, 2));
    let (labels, _) = t.resolve("ns", &pod(&[("team", "b"), ("project", "p")]));
    assert_eq!(pairs(&labels), [("team", "b"), ("project", "p")]);
    assert_eq!(t.folded(), [("team", 2), ("project", 0)]);
}

#[test]
fn a_changed_file_is_read_again_and_a_bad_one_keeps_the_last_labels() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("namespaces.json");
    let write = |team: &str| {
        std::fs::write(
            &file,
            format!(r#"{{"items":[{{"metadata":{{"name":"ml","labels":{{"team":"{team}"}}}}}}]}}"#),
        )
        .unwrap();
    };
    write("one");
    let mut t = Tenants::new(&config(&["team"], Some(&file), 10));
    t.refresh().unwrap();
    assert_eq!(pairs(&t.resolve("ml", &pod(&[])).0), [("team", "one")]);
    // A different length: seen as changed whatever the clock's resolution.
    write("three");
    t.refresh().unwrap();
    assert_eq!(pairs(&t.resolve("ml", &pod(&[])).0), [("team", "three")]);
    std::fs::write(&file, "not json").unwrap();
    let e = t.refresh().unwrap_err();
    assert!(
        matches!(e, NamespaceFileError::Parse { .. }) && e.to_string().contains("namespaces.json"),
        "{e}"
    );
    // Reported once per change; the last good labels stay.
    t.refresh().unwrap();
    assert_eq!(pairs(&t.resolve("ml", &pod(&[])).0), [("team", "three")]);
    std::fs::remove_file(&file).unwrap();
    assert!(matches!(
        t.refresh().unwrap_err(),
        NamespaceFileError::Read { .. }
    ));
    t.refresh().unwrap();
    assert_eq!(pairs(&t.resolve("ml", &pod(&[])).0), [("team", "three")]);
}
