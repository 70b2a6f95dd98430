//! Kubernetes label keys as Prometheus label names, for `[tenants]` and budgets' `per`.

/// The Prometheus label name of a Kubernetes label key: every character outside
/// `[A-Za-z0-9_]` becomes `_` (`example.com/cost-center` → `example_com_cost_center`), and a
/// leading digit gets a `_` before it.
pub fn label_name(key: &str) -> String {
    let mut name: String = key
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    if name.starts_with(|c: char| c.is_ascii_digit()) {
        name.insert(0, '_');
    }
    name
}

/// A label name for the life of the process: label sets hold `&'static str` names. Each
/// distinct name is leaked once, however often the configuration is reloaded.
pub fn intern(name: &str) -> &'static str {
    static NAMES: std::sync::Mutex<Vec<&'static str>> = std::sync::Mutex::new(Vec::new());
    let mut names = NAMES
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(n) = names.iter().find(|n| **n == name) {
        return n;
    }
    let leaked: &'static str = Box::leak(name.to_owned().into_boxed_str());
    names.push(leaked);
    leaked
}
