//! An error and its sources as one line, `a: b: c`.
//!
//! Tally's error types keep their cause as a `#[source]` and leave it out of their own message, so
//! no cause is printed twice; this joins them back for a log field, a status line or `tally
//! check`. Its own crate because the crates that need it (the eBPF loader, RDMA, the exporters,
//! the agent) depend on none of each other.

use std::error::Error;

/// `e`'s message followed by each of its sources', `: `-separated.
pub fn chain(e: &dyn Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::chain;

    #[derive(Debug)]
    struct Layer(&'static str, Option<Box<Layer>>);

    impl std::fmt::Display for Layer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }

    impl std::error::Error for Layer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|l| l as _)
        }
    }

    #[test]
    fn every_source_follows_its_error_once() {
        let root = Layer("permission denied", None);
        assert_eq!(chain(&root), "permission denied");
        let e = Layer(
            "loading tcp",
            Some(Box::new(Layer(
                "reading /sys/kernel/btf/vmlinux",
                Some(Box::new(root)),
            ))),
        );
        assert_eq!(
            chain(&e),
            "loading tcp: reading /sys/kernel/btf/vmlinux: permission denied"
        );
    }
}
