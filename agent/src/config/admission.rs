//! `[admission]`: Tally as an NRI plugin of the container runtime, which asks it on every
//! `CreateContainer` whether a container may start, and how.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::Config;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdmissionConfig {
    /// The runtime's NRI socket (containerd and CRI-O: `/var/run/nri/nri.sock`). Empty: no
    /// plugin, and `admission = "deny"` budgets hold new workloads at their first tick instead.
    pub nri_socket: PathBuf,
    /// The name Tally registers under (the runtime's logs and `required_plugins` use it).
    pub plugin_name: String,
    /// Two digits, `00`–`99`: where the runtime calls Tally among its plugins.
    pub plugin_index: String,
    /// Verdicts older than this many ticks are unknown: the agent's tick has stalled, and
    /// `on_unknown` decides (1–1000).
    pub max_verdict_age_ticks: u32,
    /// What a `CreateContainer` is told while the verdicts are unknown (before the first tick,
    /// or when the tick stalled): `admit` (the default; fail open) or `deny`.
    pub on_unknown: OnUnknown,
}

impl Default for AdmissionConfig {
    fn default() -> Self {
        Self {
            nri_socket: PathBuf::new(),
            plugin_name: "tally".to_owned(),
            plugin_index: "50".to_owned(),
            max_verdict_age_ticks: 5,
            on_unknown: OnUnknown::Admit,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnUnknown {
    #[default]
    Admit,
    Deny,
}

/// `[admission]`'s errors, as `(key, message)`.
pub fn check(config: &Config) -> Vec<(String, String)> {
    let a = &config.admission;
    let mut errors = Vec::new();
    let key = |k: &str| format!("admission.{k}");
    if a.plugin_name.is_empty() || a.plugin_name.contains(['/', ' ']) {
        errors.push((
            key("plugin_name"),
            format!(
                "`{}`: give a name without spaces or `/` (the runtime names the plugin `<index>-<name>`)",
                a.plugin_name
            ),
        ));
    }
    if a.plugin_index.len() != 2 || !a.plugin_index.bytes().all(|b| b.is_ascii_digit()) {
        errors.push((
            key("plugin_index"),
            format!(
                "`{}`: the runtime takes exactly two digits, `00` to `99`",
                a.plugin_index
            ),
        ));
    }
    if !(1..=1000).contains(&a.max_verdict_age_ticks) {
        errors.push((
            key("max_verdict_age_ticks"),
            format!("{} is out of range 1..=1000", a.max_verdict_age_ticks),
        ));
    }
    if !a.nri_socket.as_os_str().is_empty() && !a.nri_socket.is_absolute() {
        errors.push((
            key("nri_socket"),
            format!("`{}` is not an absolute path", a.nri_socket.display()),
        ));
    }
    errors
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_names_indexes_ages_and_paths_are_named() {
        let mut config = Config::default();
        assert!(check(&config).is_empty());
        config.admission = AdmissionConfig {
            nri_socket: PathBuf::from("nri.sock"),
            plugin_name: "a/b".to_owned(),
            plugin_index: "5".to_owned(),
            max_verdict_age_ticks: 0,
            on_unknown: OnUnknown::Deny,
        };
        let keys: Vec<String> = check(&config).into_iter().map(|(k, _)| k).collect();
        assert_eq!(
            keys,
            [
                "admission.plugin_name",
                "admission.plugin_index",
                "admission.max_verdict_age_ticks",
                "admission.nri_socket"
            ]
        );
        config.admission.plugin_index = "7x".to_owned();
        assert!(check(&config)
            .iter()
            .any(|(k, m)| k == "admission.plugin_index" && m.starts_with("`7x`: ")));
    }
}
