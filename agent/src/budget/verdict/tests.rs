use super::*;
use std::collections::BTreeMap;

fn verdict(name: &str, admission: Admission, per: Option<Per>) -> BudgetVerdict {
    BudgetVerdict {
        name: Arc::from(name),
        admission,
        select: Selector {
            namespace: Some("team-a".to_owned()),
            ..Selector::default()
        },
        per,
        resource: Resource::CpuSeconds,
        limit: 100.0,
        cpu_cores: Some(0.5),
        spent: HashMap::new(),
    }
}

fn spent(usage: f64, release_in: Option<f64>, members: usize) -> Spent {
    Spent {
        usage,
        release_in,
        members,
    }
}

fn candidate(namespace: &str, labels: &[(&str, &str)]) -> Candidate {
    Candidate {
        namespace: namespace.to_owned(),
        pod: "train-0".to_owned(),
        container: "main".to_owned(),
        labels: labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
    }
}

fn fresh(budgets: Vec<BudgetVerdict>) -> (Verdicts, Instant) {
    let now = Instant::now();
    let v = Verdicts {
        at: Some(now),
        exempt: HashSet::from(["kube-system".to_owned()]),
        budgets,
        namespace_labels: NamespaceLabels::default(),
    };
    (v, now)
}

const AGE: Duration = Duration::from_secs(5);

#[test]
fn a_spent_deny_budget_refuses_with_its_usage_limit_and_release() {
    let mut b = verdict("gpu-hours", Admission::Deny, None);
    b.spent
        .insert(String::new(), spent(123.4567, Some(250.2), 2));
    let (v, now) = fresh(vec![b]);
    assert_eq!(
        v.decide(&candidate("team-a", &[]), now, AGE),
        Decision::Deny {
            budget: Arc::from("gpu-hours"),
            subject: String::new(),
            message: "tally: budget gpu-hours is spent (123.457 cpu_seconds of 100); it releases in about 5 min".to_owned(),
        }
    );
    // Not selected: another namespace.
    assert_eq!(
        v.decide(&candidate("team-b", &[]), now, AGE),
        Decision::Admit
    );
}

#[test]
fn a_per_budget_refuses_only_the_spent_group() {
    let per = Per::Label {
        key: "team".to_owned(),
        name: "team",
    };
    let mut b = verdict("teams", Admission::Deny, Some(per));
    b.select = Selector::default();
    b.spent.insert("search".to_owned(), spent(150.0, None, 1));
    let (v, now) = fresh(vec![b]);
    let Decision::Deny { message, .. } = v.decide(&candidate("x", &[("team", "search")]), now, AGE)
    else {
        panic!("not denied");
    };
    assert_eq!(message, "tally: budget teams for team=search is spent (150 cpu_seconds of 100); it releases once its usage falls below the release threshold");
    assert_eq!(
        v.decide(&candidate("x", &[("team", "ads")]), now, AGE),
        Decision::Admit
    );
    // No value: not selected by a `per` budget.
    assert_eq!(v.decide(&candidate("x", &[]), now, AGE), Decision::Admit);
}

#[test]
fn a_throttle_budget_shares_its_cores_with_the_new_container_and_deny_wins() {
    let mut t = verdict("slow", Admission::Throttle, None);
    t.spent.insert(String::new(), spent(150.0, None, 3));
    let (v, now) = fresh(vec![t.clone()]);
    assert_eq!(
        v.decide(&candidate("team-a", &[]), now, AGE),
        Decision::Throttle {
            budget: Arc::from("slow"),
            quota_us: 12_500,
            period_us: 100_000
        }
    );
    // The tightest of two throttles.
    let mut tighter = t.clone();
    tighter.name = Arc::from("tighter");
    tighter.cpu_cores = Some(0.004);
    let (v, now) = fresh(vec![t.clone(), tighter]);
    assert_eq!(
        v.decide(&candidate("team-a", &[]), now, AGE),
        Decision::Throttle {
            budget: Arc::from("tighter"),
            quota_us: 1000,
            period_us: 100_000
        }
    );
    let mut d = verdict("hard", Admission::Deny, None);
    d.spent.insert(String::new(), spent(101.0, Some(30.0), 1));
    let (v, now) = fresh(vec![t, d]);
    assert_eq!(
        v.decide(&candidate("team-a", &[]), now, AGE).as_str(),
        "deny"
    );
}

#[test]
fn exempt_stale_and_unselectable_verdicts() {
    let mut b = verdict("b", Admission::Deny, None);
    b.spent.insert(String::new(), spent(101.0, None, 1));
    b.select = Selector::default();
    let (mut v, now) = fresh(vec![b.clone()]);
    assert_eq!(
        v.decide(&candidate("kube-system", &[]), now, AGE),
        Decision::Exempt
    );
    assert_eq!(
        v.decide(&candidate("x", &[]), now + Duration::from_secs(6), AGE),
        Decision::Unknown
    );
    v.at = None;
    assert_eq!(v.decide(&candidate("x", &[]), now, AGE), Decision::Unknown);
    // A unit or cgroup selector never selects a container at creation.
    for select in [
        Selector {
            unit: Some("*".to_owned()),
            ..Selector::default()
        },
        Selector {
            cgroup: Some("*".to_owned()),
            ..Selector::default()
        },
    ] {
        let mut b = b.clone();
        b.select = select;
        let (v, now) = fresh(vec![b]);
        assert_eq!(v.decide(&candidate("x", &[]), now, AGE), Decision::Admit);
    }
    // Pod globs and labels.
    let mut b = b.clone();
    b.select = Selector {
        pod: Some("train-*".to_owned()),
        labels: BTreeMap::from([("team".to_owned(), "a".to_owned())]),
        ..Selector::default()
    };
    let (mut v, now) = fresh(vec![b]);
    assert_eq!(
        v.decide(&candidate("x", &[("team", "a")]), now, AGE)
            .as_str(),
        "deny"
    );
    assert_eq!(
        v.decide(&candidate("x", &[("team", "b")]), now, AGE),
        Decision::Admit
    );
    // A namespace's promoted label stands in for the pod's, never over it.
    v.namespace_labels = Arc::new(HashMap::from([(
        "x".to_owned(),
        BTreeMap::from([("team".to_owned(), "a".to_owned())]),
    )]));
    assert_eq!(v.decide(&candidate("x", &[]), now, AGE).as_str(), "deny");
    assert_eq!(
        v.decide(&candidate("x", &[("team", "b")]), now, AGE),
        Decision::Admit
    );
    assert_eq!(v.decide(&candidate("y", &[]), now, AGE), Decision::Admit);
}

#[test]
fn release_times_read_as_people_say_them() {
    assert_eq!(human_secs(0.2), "1 s");
    assert_eq!(human_secs(119.0), "119 s");
    assert_eq!(human_secs(120.5), "3 min");
    assert_eq!(human_secs(7300.0), "3 h");
}

#[test]
fn a_pod_refused_again_is_alerted_once_and_lifted_when_its_budget_lets_go() {
    let board = Board::default();
    let spent = |yes: bool| {
        let mut door = verdict("door", Admission::Deny, None);
        if yes {
            door.spent.insert(String::new(), spent(2.0, None, 1));
        }
        Verdicts {
            at: Some(Instant::now()),
            budgets: vec![door],
            ..Verdicts::default()
        }
    };
    let deny = Decision::Deny {
        budget: Arc::from("door"),
        subject: String::new(),
        message: "m".to_owned(),
    };
    let pod = |name: &str| Candidate {
        namespace: "a".to_owned(),
        pod: name.to_owned(),
        container: "main".to_owned(),
        labels: HashMap::new(),
    };
    // Two refusals of p (the kubelet retries) and one of q: two alerts.
    board.record(&deny, &pod("p"), Duration::ZERO);
    board.record(&deny, &pod("p"), Duration::ZERO);
    board.record(&deny, &pod("q"), Duration::ZERO);
    let (fired, lifted) = board.settle_denials(&spent(true));
    let keys: Vec<String> = fired.iter().map(Denial::key).collect();
    assert_eq!(keys, ["denied/door/a/p", "denied/door/a/q"]);
    assert!(lifted.is_empty());
    // Refused again while firing: nothing new.
    board.record(&deny, &pod("p"), Duration::ZERO);
    assert_eq!(board.settle_denials(&spent(true)), (Vec::new(), Vec::new()));
    // Released: both lifted, once.
    let (fired, lifted) = board.settle_denials(&spent(false));
    assert!(fired.is_empty());
    assert_eq!(lifted, ["denied/door/a/p", "denied/door/a/q"]);
    assert_eq!(
        board.settle_denials(&spent(false)),
        (Vec::new(), Vec::new())
    );
}
