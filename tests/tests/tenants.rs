//! Tenants: pod labels (from a fake CRI over a real socket) and namespace labels (from a
//! `kubectl get namespaces -o json` file) promoted to labels of every per-workload series of
//! real cgroups, the cap on distinct values folding the rest into `other`, and a `per = "team"`
//! budget holding one row per team.

use std::path::PathBuf;
use std::time::Duration;

use tally_tests::agent::{sample, Agent};
use tally_tests::cgroup::{random_hex, random_uid, remove_parents, TestCgroup};
use tally_tests::fake_cri::{FakeCri, FakePod};
use tally_tests::require;

struct Pod {
    pod: FakePod,
    cgroup: TestCgroup,
    rel: String,
}

fn pod(roots: &[PathBuf], namespace: &str, name: &str, labels: &[(&str, &str)]) -> Pod {
    let (uid, id) = (random_uid(), random_hex(64));
    let rel = format!(
        "/kubepods.slice/kubepods-pod{}.slice/cri-containerd-{id}.scope",
        uid.replace('-', "_")
    );
    let mut cgroup = TestCgroup::create(roots, &rel);
    cgroup.burn();
    let mut pod = FakePod::new(namespace, name, &[(&id, "main")]);
    pod.uid = uid;
    pod.labels = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    Pod { pod, cgroup, rel }
}

/// The start of the `per = "team"` budget's usage row for `team`.
fn budget_row(team: &str) -> String {
    format!(
        "tally_budget_usage{{namespace=\"\",pod=\"\",pod_uid=\"\",container=\"\",container_id=\"\",unit=\"\",team=\"{team}\",budget=\"per-team\",resource=\"cpu_seconds\"}} "
    )
}

/// The CPU series of a pod's one container, by its whole label set.
fn cpu_series(p: &Pod, tenant: &str) -> String {
    format!(
        "tally_workload_cpu_seconds_total{{namespace=\"{}\",pod=\"{}\",pod_uid=\"{}\",container=\"main\",container_id=\"{}\",unit=\"\",{tenant}}}",
        p.pod.namespace, p.pod.name, p.pod.uid, p.pod.containers[0].0
    )
}

#[test]
fn pod_and_namespace_labels_label_every_series_and_the_cap_folds_into_other() {
    const TEST: &str = "pod_and_namespace_labels_label_every_series_and_the_cap_folds_into_other";
    if !require::root(TEST) {
        return;
    }
    let Some(unified) = require::unified(TEST) else {
        return;
    };
    let roots = vec![unified];
    let tag = random_hex(6);
    let (search_ns, ads_ns, misc_ns) = (
        format!("search-{tag}"),
        format!("ads-{tag}"),
        format!("misc-{tag}"),
    );
    // search's pod names its team (over its namespace's); ads's pod takes its namespace's.
    let search = pod(
        &roots,
        &search_ns,
        "ranker-0",
        &[("team", "search"), ("app", "ranker")],
    );
    let ads = pod(&roots, &ads_ns, "bidder-0", &[("app", "bidder")]);
    let dir = tempfile::tempdir().unwrap();
    let namespaces = dir.path().join("namespaces.json");
    std::fs::write(
        &namespaces,
        format!(
            r#"{{"apiVersion":"v1","kind":"NamespaceList","items":[
                {{"metadata":{{"name":"{search_ns}","labels":{{"team":"not-this","cost-center":"cc-1"}}}}}},
                {{"metadata":{{"name":"{ads_ns}","labels":{{"team":"ads","cost-center":"cc-2"}}}}}}]}}"#
        ),
    )
    .unwrap();
    let sockets = tempfile::tempdir().unwrap();
    let socket = sockets.path().join("containerd.sock");
    let cri = FakeCri::start(&socket, vec![search.pod.clone(), ads.pod.clone()]).unwrap();
    let agent = Agent::start(&format!(
        "[agent]\ntick_interval_ms = 250\n[cri]\nendpoints = [\"{}\"]\n\
         [tenants]\nlabels = [\"team\", \"cost-center\"]\nnamespace_labels_file = \"{}\"\nmax_values_per_label = 2\n\
         [[budget]]\nname = \"per-team\"\nresource = \"cpu_seconds\"\nlimit = 1000.0\nwindow = \"1h\"\nper = \"team\"\n",
        socket.display(),
        namespaces.display()
    ));
    let search_series = cpu_series(&search, "team=\"search\",cost_center=\"cc-1\"");
    let ads_series = cpu_series(&ads, "team=\"ads\",cost_center=\"cc-2\"");
    let text = agent.scrape_until(Duration::from_secs(15), "tenant labels", |t| {
        t.contains(&search_series) && t.contains(&ads_series)
    });
    // Every per-workload family carries them, not only CPU.
    let info = search_series
        .replace("tally_workload_cpu_seconds_total", "tally_workload_info")
        .replace("cost_center=\"cc-1\"}", "cost_center=\"cc-1\",runtime=\"containerd\",qos_class=\"guaranteed\",state=\"running\"} 1");
    assert!(text.contains(&info), "{info} in\n{text}");
    assert_eq!(
        sample(
            &text,
            "tally_tenant_values_folded_total",
            &["label=\"team\""]
        ),
        Some(0.0)
    );
    // One budget row per team, with no workload's labels but its team's.
    for team in ["search", "ads"] {
        assert!(
            text.contains(&budget_row(team)),
            "{} in\n{text}",
            budget_row(team)
        );
    }

    // A third team, past max_values_per_label = 2: exported as other, and counted once.
    let misc = pod(&roots, &misc_ns, "batch-0", &[("team", "misc")]);
    cri.set_pods(vec![search.pod.clone(), ads.pod.clone(), misc.pod.clone()]);
    let misc_series = cpu_series(&misc, "team=\"other\",cost_center=\"\"");
    let text = agent.scrape_until(Duration::from_secs(15), "the folded team", |t| {
        t.contains(&misc_series)
    });
    assert_eq!(
        sample(
            &text,
            "tally_tenant_values_folded_total",
            &["label=\"team\""]
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "tally_tenant_values_folded_total",
            &["label=\"cost_center\""]
        ),
        Some(0.0)
    );
    assert!(text.contains(&search_series) && text.contains(&ads_series));
    // The budget groups by the team itself, not by what the cap exports.
    let text = agent.scrape_until(Duration::from_secs(5), "misc's budget row", |t| {
        t.contains(&budget_row("misc"))
    });
    assert!(!text.contains(&budget_row("other")), "{text}");

    for p in [search, ads, misc] {
        drop(p.cgroup);
        remove_parents(&roots, &p.rel, 2);
    }
}

/// A file that is not a NamespaceList is a counted, logged failure; the pod labels still count.
#[test]
fn a_bad_namespace_file_is_counted_and_pod_labels_still_promote() {
    const TEST: &str = "a_bad_namespace_file_is_counted_and_pod_labels_still_promote";
    if !require::root(TEST) {
        return;
    }
    let Some(unified) = require::unified(TEST) else {
        return;
    };
    let roots = vec![unified];
    let p = pod(
        &roots,
        &format!("bad-{}", random_hex(6)),
        "web-0",
        &[("team", "web")],
    );
    let dir = tempfile::tempdir().unwrap();
    let namespaces = dir.path().join("namespaces.json");
    std::fs::write(&namespaces, "{ not json").unwrap();
    let sockets = tempfile::tempdir().unwrap();
    let socket = sockets.path().join("containerd.sock");
    let _cri = FakeCri::start(&socket, vec![p.pod.clone()]).unwrap();
    let agent = Agent::start(&format!(
        "[agent]\ntick_interval_ms = 250\n[cri]\nendpoints = [\"{}\"]\n\
         [tenants]\nlabels = [\"team\"]\nnamespace_labels_file = \"{}\"\n",
        socket.display(),
        namespaces.display()
    ));
    let series = cpu_series(&p, "team=\"web\"");
    let text = agent.scrape_until(Duration::from_secs(15), "pod labels", |t| {
        t.contains(&series)
    });
    // Once per change of the file, not once a tick.
    std::thread::sleep(Duration::from_millis(600));
    let text_later = agent.scrape();
    for t in [&text, &text_later] {
        assert_eq!(
            sample(
                t,
                "tally_collector_errors_total",
                &["collector=\"tenants\"", "reason=\"namespace_file\""]
            ),
            Some(1.0),
            "{t}"
        );
    }
    drop(p.cgroup);
    remove_parents(&roots, &p.rel, 2);
}
