//! The Kubernetes manifests render, validate against the API schemas and agree with the unit.

use super::unit::*;
use super::*;

/// The YAML documents of `path` as JSON, through PyYAML (kubernetes-validate's dependency), or a
/// skip.
pub(super) fn yaml_docs(test: &str, path: &Path) -> Option<Vec<serde_json::Value>> {
    let out = output(Command::new("python3").args([
        "-c",
        "import json, sys, yaml; json.dump([d for d in yaml.safe_load_all(open(sys.argv[1])) if d is not None], sys.stdout)",
    ]).arg(path));
    if !out.status.success() && text(&out.stderr).contains("No module named 'yaml'") {
        require::skip(
            test,
            "python3 has no `yaml` module (PyYAML; dev/deps --test installs it)",
        );
        return None;
    }
    assert!(
        out.status.success(),
        "{}: {}",
        path.display(),
        text(&out.stderr)
    );
    Some(serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}")))
}

/// `kubectl kustomize dir`, written to `into`.
pub(super) fn kustomize(kubectl: &Path, dir: &str, into: &Path) -> PathBuf {
    let rendered = run_ok(Command::new(kubectl).arg("kustomize").arg(root().join(dir)));
    let file = into.join(format!("{}.yaml", dir.replace('/', "_")));
    std::fs::write(&file, rendered).unwrap_or_else(|e| panic!("{e}"));
    file
}

pub(super) fn of_kind<'a>(docs: &'a [serde_json::Value], kind: &str) -> &'a serde_json::Value {
    let found: Vec<_> = docs.iter().filter(|d| d["kind"] == kind).collect();
    assert_eq!(found.len(), 1, "one {kind} expected");
    found[0]
}

/// Whether every label of `selector` is in `labels`.
pub(super) fn selects(selector: &serde_json::Value, labels: &serde_json::Value) -> bool {
    selector
        .as_object()
        .is_some_and(|s| !s.is_empty() && s.iter().all(|(k, v)| labels[k] == *v))
}

/// The Kubernetes versions the manifests are validated against: the oldest still commonly run
/// and the newest kubernetes-validate knows.
pub(super) const KUBERNETES_VERSIONS: [&str; 2] = ["1.30.0", "1.37.0"];

#[test]
fn kubernetes_manifests_render_validate_and_agree_with_the_unit() {
    const TEST: &str = "kubernetes_manifests_render_validate_and_agree_with_the_unit";
    let Some(kubectl) = require::binary(TEST, "kubectl") else {
        return;
    };
    let Some(validator) = require::binary(TEST, "kubernetes-validate") else {
        return;
    };
    if require::binary(TEST, "python3").is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let unit_caps: BTreeSet<String> = unit_capabilities(&read(UNIT))
        .iter()
        .map(|c| c.trim_start_matches("CAP_").to_owned())
        .collect();

    for overlay in [
        "packaging/kubernetes/base",
        "packaging/kubernetes/overlays/gpu",
    ] {
        let file = kustomize(&kubectl, overlay, dir.path());
        let Some(docs) = yaml_docs(TEST, &file) else {
            return;
        };
        let kinds: BTreeSet<(String, String)> = docs
            .iter()
            .map(|d| {
                (
                    d["apiVersion"].as_str().unwrap_or_default().to_owned(),
                    d["kind"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect();
        let want: BTreeSet<(String, String)> = [
            ("v1", "Namespace"),
            ("v1", "ServiceAccount"),
            ("v1", "ConfigMap"),
            ("v1", "Service"),
            ("apps/v1", "DaemonSet"),
            ("monitoring.coreos.com/v1", "ServiceMonitor"),
            ("monitoring.coreos.com/v1", "PrometheusRule"),
        ]
        .iter()
        .map(|(a, k)| ((*a).to_owned(), (*k).to_owned()))
        .collect();
        assert_eq!(kinds, want, "{overlay}");

        // Every built-in object against the API's schemas, unknown fields rejected. The two
        // prometheus-operator kinds have no schema there: checked below and by promtool.
        let builtin = docs
            .iter()
            .filter(|d| d["apiVersion"] != "monitoring.coreos.com/v1")
            .count();
        for version in KUBERNETES_VERSIONS {
            let out = output(
                Command::new(&validator)
                    .args(["--strict", "-k", version])
                    .arg(&file),
            );
            let report = format!("{}{}", text(&out.stdout), text(&out.stderr));
            assert!(
                out.status.success(),
                "{overlay} against {version}:\n{report}"
            );
            assert_eq!(
                report.matches("passed for resource").count(),
                builtin,
                "{overlay} against {version}:\n{report}"
            );
        }

        let daemonset = of_kind(&docs, "DaemonSet");
        let pod = &daemonset["spec"]["template"]["spec"];
        let container = &pod["containers"][0];
        let security = &container["securityContext"];
        let added: BTreeSet<String> = security["capabilities"]["add"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c.as_str().map(str::to_owned))
            .collect();
        assert_eq!(
            added, unit_caps,
            "{overlay}: the DaemonSet's capabilities must be the unit's"
        );
        assert_eq!(security["capabilities"]["drop"], serde_json::json!(["ALL"]));
        assert_eq!(security["privileged"], false);
        assert_eq!(security["readOnlyRootFilesystem"], true);
        assert_eq!(security["runAsUser"], 0);
        assert_eq!(pod["hostPID"], true);
        assert_eq!(pod["automountServiceAccountToken"], false);
        assert_eq!(pod["priorityClassName"], "system-node-critical");
        assert_eq!(
            daemonset["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"],
            "10%"
        );
        assert_eq!(
            container["ports"][0],
            serde_json::json!({"name": "metrics", "containerPort": 9811, "protocol": "TCP"})
        );
        assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
        assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
        let env = |name: &str| {
            container["env"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|e| e["name"] == name)
                .cloned()
        };
        assert_eq!(
            env("NODE_NAME").map(|e| e["valueFrom"]["fieldRef"]["fieldPath"].clone()),
            Some("spec.nodeName".into())
        );

        // Mounts: every one has its volume; host paths by mount path.
        let volumes: BTreeMap<String, serde_json::Value> = pod["volumes"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|v| (v["name"].as_str().unwrap_or_default().to_owned(), v.clone()))
            .collect();
        let mut host_paths = BTreeMap::new();
        let mut mounts = BTreeMap::new();
        for mount in container["volumeMounts"].as_array().into_iter().flatten() {
            let name = mount["name"].as_str().unwrap_or_default();
            let volume = volumes
                .get(name)
                .unwrap_or_else(|| panic!("{overlay}: no volume {name}"));
            let path = mount["mountPath"].as_str().unwrap_or_default().to_owned();
            if let Some(host) = volume["hostPath"]["path"].as_str() {
                host_paths.insert(path.clone(), host.to_owned());
            }
            mounts.insert(path, (mount.clone(), volume.clone()));
        }

        // The configuration and the budget policy: two generated ConfigMaps projected into the
        // directory --config points into; valid together, the policy's examples too.
        let configmap = |key: &str| {
            let found: Vec<_> = docs
                .iter()
                .filter(|d| d["kind"] == "ConfigMap" && d["data"][key].is_string())
                .collect();
            assert_eq!(found.len(), 1, "{overlay}: one ConfigMap holding {key}");
            found[0]
        };
        let (config_map, policy_map) = (configmap("tally.toml"), configmap("policy.toml"));
        assert_eq!(
            docs.iter().filter(|d| d["kind"] == "ConfigMap").count(),
            2,
            "{overlay}"
        );
        let (etc_mount, etc_volume) = &mounts["/etc/tally"];
        assert_eq!(etc_mount["readOnly"], true);
        let sources: Vec<&serde_json::Value> = etc_volume["projected"]["sources"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|s| &s["configMap"]["name"])
            .collect();
        assert_eq!(
            sources,
            [
                &config_map["metadata"]["name"],
                &policy_map["metadata"]["name"]
            ],
            "{overlay}: /etc/tally"
        );
        assert_eq!(
            container["args"],
            serde_json::json!(["--config", "/etc/tally/tally.toml"])
        );
        let toml = config_map["data"]["tally.toml"].as_str().unwrap();
        let config = Config::parse(toml).unwrap();
        let policy_path = Path::new("/etc/tally/policy.toml");
        assert_eq!(config.enforcement.policy_file.as_deref(), Some(policy_path));
        let policy = policy_map["data"]["policy.toml"].as_str().unwrap();
        let examples: Vec<&str> = policy
            .lines()
            .map(|l| match l.strip_prefix('#') {
                Some(rest) if rest.starts_with(|c: char| c == '[' || c.is_ascii_lowercase()) => {
                    rest
                }
                _ => l,
            })
            .collect();
        for (name, text, shipped) in [
            ("policy.toml", policy.to_owned(), true),
            ("policy-examples.toml", examples.join("\n"), false),
        ] {
            let policy_file = dir.path().join(name);
            std::fs::write(&policy_file, text).unwrap();
            let config_file = dir.path().join(format!("config-{name}"));
            std::fs::write(
                &config_file,
                toml.replace(
                    &policy_path.display().to_string(),
                    &policy_file.display().to_string(),
                ),
            )
            .unwrap();
            run_ok(Command::new(tally_bin()).arg("validate").arg(&config_file));
            let budgets = Config::load(&config_file).unwrap().budget;
            assert_eq!(
                budgets.is_empty(),
                shipped,
                "{overlay}: {name} ships no budget, its examples are budgets: {budgets:?}"
            );
        }

        // Enforcement writes the host's cgroupfs, and keeps its state on the node.
        let (cgroup_mount, _) = &mounts[&config.paths.cgroup_root.display().to_string()];
        assert_ne!(cgroup_mount["readOnly"], true, "{overlay}: cgroupfs");
        let state_dir = config.enforcement.state_dir.display().to_string();
        assert_eq!(
            host_paths.get(&state_dir).map(String::as_str),
            Some("/var/lib/tally"),
            "{overlay}: enforcement.state_dir must be the node's"
        );
        let (state_mount, state_volume) = &mounts[&state_dir];
        assert_ne!(state_mount["readOnly"], true, "{overlay}: {state_dir}");
        assert_eq!(state_volume["hostPath"]["type"], "DirectoryOrCreate");
        for (root, host) in [
            (&config.paths.proc_root, "/proc"),
            (&config.paths.cgroup_root, "/sys/fs/cgroup"),
        ] {
            assert_eq!(
                host_paths
                    .get(&root.display().to_string())
                    .map(String::as_str),
                Some(host),
                "{overlay}: {}",
                root.display()
            );
        }
        for endpoint in &config.cri.endpoints {
            let parent = endpoint.parent().unwrap().display().to_string();
            assert_eq!(
                host_paths.get(&parent),
                Some(&parent),
                "{overlay}: CRI socket directory {parent} must be the host's"
            );
        }
        assert_eq!(config.listen_addr().unwrap().port(), 9811);

        // Service → pods, ServiceMonitor → Service.
        let service = of_kind(&docs, "Service");
        assert_eq!(service["spec"]["clusterIP"], "None");
        assert_eq!(service["spec"]["ports"][0]["name"], "metrics");
        assert_eq!(service["spec"]["ports"][0]["port"], 9811);
        assert!(selects(
            &service["spec"]["selector"],
            &daemonset["spec"]["template"]["metadata"]["labels"]
        ));
        let monitor = of_kind(&docs, "ServiceMonitor");
        assert!(selects(
            &monitor["spec"]["selector"]["matchLabels"],
            &service["metadata"]["labels"]
        ));
        assert_eq!(monitor["spec"]["endpoints"][0]["port"], "metrics");
        assert_eq!(
            of_kind(&docs, "ServiceAccount")["automountServiceAccountToken"],
            false
        );
        assert_eq!(
            of_kind(&docs, "Namespace")["metadata"]["labels"]["pod-security.kubernetes.io/enforce"],
            "privileged"
        );

        if overlay.ends_with("gpu") {
            assert_eq!(pod["nodeSelector"]["nvidia.com/gpu.present"], "true");
            assert_eq!(pod["runtimeClassName"], "nvidia");
            assert!(pod["tolerations"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|t| t["key"] == "nvidia.com/gpu" && t["effect"] == "NoSchedule"));
            assert_eq!(
                env("NVIDIA_VISIBLE_DEVICES").map(|e| e["value"].clone()),
                Some("all".into())
            );
            assert_eq!(
                env("NVIDIA_DRIVER_CAPABILITIES").map(|e| e["value"].clone()),
                Some("utility".into())
            );
        } else {
            assert!(pod["runtimeClassName"].is_null());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Alert rules and the dashboard
