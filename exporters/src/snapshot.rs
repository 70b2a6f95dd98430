use std::sync::Arc;

/// Ordered label names and values of one series. Values are shared so that the per-workload label
/// set is built once per workload, not once per series and tick.
pub type LabelSet = Arc<[(&'static str, Arc<str>)]>;

/// Whether a family is a monotonic counter, a gauge or a histogram (Prometheus `TYPE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    /// Every sample carries a [`Histogram`]; `value` is unused.
    Histogram,
}

/// A cumulative histogram: counts of observations at or below each upper bound.
#[derive(Debug, Clone, PartialEq)]
pub struct Histogram {
    /// `(upper bound, cumulative count)`, bounds ascending; `+Inf` is implied by `count`.
    pub buckets: Vec<(f64, u64)>,
    pub sum: f64,
    pub count: u64,
}

impl Histogram {
    /// An empty histogram with these upper bounds (ascending).
    pub fn with_bounds(bounds: &[f64]) -> Histogram {
        Histogram {
            buckets: bounds.iter().map(|b| (*b, 0)).collect(),
            sum: 0.0,
            count: 0,
        }
    }

    /// Counts one observation.
    pub fn observe(&mut self, value: f64) {
        for (bound, count) in &mut self.buckets {
            if value <= *bound {
                *count += 1;
            }
        }
        self.sum += value;
        self.count += 1;
    }
}

/// One series: a label set and its value at the end of the tick.
#[derive(Debug, Clone)]
pub struct Sample {
    /// Labels shared by every family of the same workload (may be empty).
    pub labels: LabelSet,
    /// Labels of this family only (`collector`, `reason`, `state`...), appended after `labels`.
    pub extra: Vec<(&'static str, Arc<str>)>,
    pub value: f64,
    /// Set on histogram families only.
    pub histogram: Option<Histogram>,
}

/// A metric family's declaration: everything about it but its series. The agent declares each of
/// its families once, in its catalogue; a [`Family`] is built from one.
#[derive(Debug, PartialEq)]
pub struct Metric {
    pub name: &'static str,
    /// One sentence, ending with a period (the `HELP` line).
    pub help: &'static str,
    pub kind: Kind,
    /// The base unit the name ends with (`seconds`, `bytes`, `joules`, `ratio`...), or empty for
    /// counts.
    pub unit: &'static str,
    /// Whether every series starts with the workload's labels.
    pub per_workload: bool,
    /// The family's own label names, in order, after the workload's.
    pub labels: &'static [&'static str],
}

/// A metric family: one name, one help text, one type, many series.
#[derive(Debug, Clone)]
pub struct Family {
    pub name: &'static str,
    pub help: &'static str,
    pub kind: Kind,
    pub samples: Vec<Sample>,
}

impl Family {
    pub fn new(metric: &'static Metric) -> Self {
        Self {
            name: metric.name,
            help: metric.help,
            kind: metric.kind,
            samples: Vec::new(),
        }
    }

    /// Adds a series with the shared label set and no family-specific labels.
    pub fn push(&mut self, labels: &LabelSet, value: f64) {
        self.samples.push(Sample {
            labels: labels.clone(),
            extra: Vec::new(),
            value,
            histogram: None,
        });
    }

    /// Adds a histogram series with the shared label set and extra labels.
    pub fn push_histogram(
        &mut self,
        labels: &LabelSet,
        extra: Vec<(&'static str, Arc<str>)>,
        histogram: Histogram,
    ) {
        self.samples.push(Sample {
            labels: labels.clone(),
            extra,
            value: 0.0,
            histogram: Some(histogram),
        });
    }

    /// Orders the series by their labels, so that output does not depend on map order.
    pub fn sort_samples(&mut self) {
        self.samples
            .sort_by(|a, b| a.labels.cmp(&b.labels).then_with(|| a.extra.cmp(&b.extra)));
    }

    /// Adds a series with family-specific labels only.
    pub fn push_labeled(&mut self, extra: Vec<(&'static str, Arc<str>)>, value: f64) {
        self.samples.push(Sample {
            labels: Arc::from([]),
            extra,
            value,
            histogram: None,
        });
    }
}

/// Everything one tick measured, ready to be encoded.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub families: Vec<Family>,
}

impl Snapshot {
    pub fn family(&self, name: &str) -> Option<&Family> {
        self.families.iter().find(|f| f.name == name)
    }
}
