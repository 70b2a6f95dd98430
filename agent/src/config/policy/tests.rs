use super::*;

fn budget(text: &str) -> Budget {
    toml::from_str(text).unwrap()
}

#[test]
fn globs() {
    assert!(glob_match("trainer-*", "trainer-0"));
    assert!(glob_match("*", ""));
    assert!(glob_match("a?c*", "abcdef"));
    assert!(glob_match("/kubepods*/pod*/*", "/kubepods.slice/pod12/abc"));
    assert!(!glob_match("trainer-*", "eval-0"));
    assert!(!glob_match("a?c", "ac"));
    assert!(glob_match("*x*y", "axbxy"));
}

#[test]
fn durations() {
    assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
    assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
    assert!(parse_duration("5").is_err());
    assert!(parse_duration("m").is_err());
    assert!(parse_duration("5w").is_err());
}

#[test]
fn typed_errors_read_as_the_messages_validation_prints() {
    let text = |d: &str| parse_duration(d).unwrap_err().to_string();
    assert_eq!(text("5"), "`5` has no unit (s, m, h or d)");
    assert_eq!(text("m"), "`m` does not start with a whole number");
    assert_eq!(text("5w"), "`5w`: unknown unit `w` (s, m, h or d)");
    let b = budget("name='a'\nresource='cpu_seconds'\nlimit=1.0\nperiod='day'\naction='disk'");
    assert_eq!(
        actuator_target(&b).unwrap_err().to_string(),
        "`disk` needs `throttle.disk_bytes_per_sec` unless the budget is a `window` rate of disk bytes"
    );
    let b = budget("name='a'\nresource='cpu_seconds'\nlimit=1.0\nperiod='day'\naction='freeze'");
    assert_eq!(
        actuator_target(&b),
        Err(TargetError::NoFreezeShare),
        "a quota is no rate to steer to"
    );
}

#[test]
fn selectors_overlap_unless_provably_disjoint() {
    let s = |ns: Option<&str>, pod: Option<&str>| Selector {
        namespace: ns.map(str::to_owned),
        pod: pod.map(str::to_owned),
        ..Selector::default()
    };
    assert!(s(None, None).may_overlap(&s(Some("a"), None)));
    assert!(!s(Some("a"), None).may_overlap(&s(Some("b"), None)));
    assert!(s(Some("a"), Some("train-*")).may_overlap(&s(Some("a"), Some("train-7"))));
    assert!(!s(Some("a"), Some("train-*")).may_overlap(&s(Some("a"), Some("eval-*"))));
    assert!(s(None, Some("t*")).may_overlap(&s(None, Some("train*"))));
}

#[test]
fn targets_are_derived_from_matching_rates() {
    let b = budget("name='a'\nresource='cpu_seconds'\nlimit=3.0\nwindow='10s'\naction='cpu'");
    assert_eq!(actuator_target(&b), Ok(Target::CpuCores(0.3)));
    let b = budget("name='a'\nresource='gpu_seconds'\nlimit=3.0\nperiod='hour'\naction='cpu'");
    assert!(actuator_target(&b)
        .unwrap_err()
        .to_string()
        .contains("throttle.cpu_cores"));
    let b = budget("name='a'\nresource='gpu_seconds'\nlimit=6.0\nwindow='1m'\naction='freeze'");
    assert_eq!(actuator_target(&b), Ok(Target::FreezeRate(0.1)));
}

#[test]
fn every_error_is_listed() {
    let budgets: Vec<(usize, Budget)> = vec![
        budget("name='a'\nresource='cpu_seconds'\nlimit=-1.0\nwindow='10s'\naction='cpu'"),
        budget("name='b'\nresource='cpu_seconds'\nlimit=1.0\nwindow='10q'\naction='cpu'\nthrottle.cpu_cores=0.5"),
        budget("name='c'\nresource='gpu_memory_bytes'\nlimit=1.0\nperiod='day'"),
    ]
    .into_iter()
    .enumerate()
    .collect();
    let errors = check(&budgets, &Prices::default());
    let paths: Vec<&str> = errors.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(
        paths,
        [
            "budget.0.limit",
            "budget.1.window",
            "budget.2.window",
            "budget.1.action"
        ],
        "{errors:#?}"
    );
    assert!(errors[3].1.contains("`a` and `b`"), "{}", errors[3].1);
}

#[test]
fn admission_needs_a_group_and_holds_as_a_freeze_does() {
    let messages = |texts: &[&str]| -> Vec<String> {
        let budgets: Vec<(usize, Budget)> = texts.iter().map(|t| budget(t)).enumerate().collect();
        check(&budgets, &Prices::default())
            .into_iter()
            .map(|(path, message)| format!("{path}: {message}"))
            .collect()
    };
    let base = "resource='cpu_seconds'\nlimit=1.0\nwindow='10s'\nadmission='deny'";
    assert_eq!(
        messages(&[&format!("name='a'\n{base}")]),
        ["budget.0.admission: a budget per workload starts each workload with a fresh window, so nothing is spent when it starts: `admission` needs `shared`, `per` or `span = \"cluster\"`"]
    );
    assert!(messages(&[&format!("name='a'\n{base}\nper='team'")]).is_empty());
    // Its hold and another budget's freeze would both drive one workload's freezer.
    assert_eq!(
        messages(&[
            &format!("name='a'\n{base}\nshared=true"),
            "name='b'\nresource='cpu_seconds'\nlimit=1.0\nwindow='10s'\naction='freeze'",
        ]),
        ["budget.1.action: budgets `a` and `b` both enforce `freeze` on selectors that can match the same workload; make the selectors disjoint, merge them, or set `dry_run` on one"]
    );
    assert!(messages(&[
        &format!("name='a'\n{base}\nshared=true\nselect.unit='a*'"),
        "name='b'\nresource='cpu_seconds'\nlimit=1.0\nwindow='10s'\naction='freeze'\nselect.unit='b*'",
    ])
    .is_empty());
}

#[test]
fn prices_are_checked_and_a_currency_alone_prices_nothing() {
    let cost = budget("name='spend'\nresource='cost'\nlimit=10.0\nperiod='day'");
    let errors = |prices: Prices| -> Vec<String> {
        check(&[(0, cost.clone())], &prices)
            .into_iter()
            .map(|(path, message)| format!("{path}: {message}"))
            .collect()
    };
    let eur = Prices {
        currency: "EUR".to_owned(),
        ..Prices::default()
    };
    assert!(eur.is_free());
    assert_eq!(
        errors(eur),
        ["budget.0.resource: a `cost` budget needs a `[prices]` table with a price above zero"]
    );
    let memory = Prices {
        memory_gb_hour: 0.01,
        ..Prices::default()
    };
    assert!(!memory.is_free());
    assert_eq!(errors(memory), Vec::<String>::new());
    let bad = Prices {
        currency: " ".to_owned(),
        memory_gb_hour: -1.0,
        cpu_core_second: 1.0,
        ..Prices::default()
    };
    assert_eq!(
        errors(bad),
        [
            "prices.memory_gb_hour: -1 must be zero or positive",
            "prices.currency: ` `: a currency is a non-empty name, e.g. \"USD\""
        ]
    );
}

#[test]
fn token_budgets_take_a_kind_and_the_kv_cache_is_a_level() {
    let budgets: Vec<(usize, Budget)> = vec![
        budget("name='gen'\nresource='tokens'\nkind='generation'\nlimit=2e6\nperiod='hour'"),
        budget("name='all'\nresource='tokens'\nlimit=1e6\nwindow='1h'"),
        budget("name='moon'\nresource='tokens'\nkind='moon'\nlimit=1.0\nwindow='1h'"),
        budget("name='cpu'\nresource='cpu_seconds'\nkind='prompt'\nlimit=1.0\nwindow='1h'"),
        budget("name='kv'\nresource='kv_cache_ratio'\nlimit=0.9"),
        budget("name='kv-window'\nresource='kv_cache_ratio'\nlimit=0.9\nwindow='1m'"),
    ]
    .into_iter()
    .enumerate()
    .collect();
    let errors = check(&budgets, &Prices::default());
    assert_eq!(
        errors,
        [
            (
                "budget.2.kind".to_owned(),
                "unknown token kind `moon`, expected one of prompt, generation, cached".to_owned()
            ),
            (
                "budget.3.kind".to_owned(),
                "`kind` applies to `tokens` budgets only".to_owned()
            ),
            (
                "budget.5.window".to_owned(),
                "`kv_cache_ratio` is a level, compared as it is: it takes no window or period"
                    .to_owned()
            ),
        ],
        "{errors:#?}"
    );
    assert!(Resource::KvCacheRatio.is_gauge() && !Resource::Tokens.is_gauge());
    // A window of tokens freezes to its rate; a level cannot.
    let b = budget("name='r'\nresource='tokens'\nlimit=600.0\nwindow='60s'\naction='freeze'");
    assert_eq!(actuator_target(&b), Ok(Target::FreezeRate(10.0)));
}
