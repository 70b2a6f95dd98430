//! A cluster budget's answer: the Prometheus query API's JSON read into one value per group,
//! each way it can be wrong named. The question is the budget's (`config::cluster`).

use serde::Deserialize;

/// Why a query gave no usable answer: a fixed set, the `reason` label of
/// `tally_cluster_query_failures_total`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Failure {
    #[error("cannot connect: {0}")]
    Unreachable(String),
    #[error("no answer within the timeout")]
    Timeout,
    #[error("TLS: {0}")]
    Tls(String),
    #[error("credentials: {0}")]
    Credentials(String),
    #[error("HTTP status {0}")]
    Http(u16),
    #[error("the answer is larger than cluster.max_response_bytes")]
    TooLarge,
    #[error("the server answered an error: {0}")]
    Error(String),
    #[error("the answer is not the query API's JSON: {0}")]
    Decode(String),
    #[error("the answer has no series")]
    Empty,
    #[error("{0}")]
    Series(String),
    #[error("a value is not a finite number: `{0}`")]
    Value(String),
}

/// Every [`Failure::reason`], in a fixed order (each shown from zero).
pub const REASONS: [&str; 11] = [
    "unreachable",
    "timeout",
    "tls",
    "credentials",
    "http",
    "too_large",
    "error",
    "decode",
    "empty",
    "series",
    "value",
];

impl Failure {
    pub fn reason(&self) -> &'static str {
        match self {
            Failure::Unreachable(_) => "unreachable",
            Failure::Timeout => "timeout",
            Failure::Tls(_) => "tls",
            Failure::Credentials(_) => "credentials",
            Failure::Http(_) => "http",
            Failure::TooLarge => "too_large",
            Failure::Error(_) => "error",
            Failure::Decode(_) => "decode",
            Failure::Empty => "empty",
            Failure::Series(_) => "series",
            Failure::Value(_) => "value",
        }
    }
}

#[derive(Deserialize)]
struct Response {
    status: String,
    #[serde(default)]
    data: Option<Data>,
    #[serde(default)]
    error: Option<String>,
    #[serde(default, rename = "errorType")]
    error_type: Option<String>,
}

#[derive(Deserialize)]
struct Data {
    #[serde(rename = "resultType")]
    result_type: String,
    result: serde_json::Value,
}

#[derive(Deserialize)]
struct Series {
    #[serde(default)]
    metric: std::collections::BTreeMap<String, String>,
    value: (serde_json::Value, serde_json::Value),
}

/// Reads an instant query's answer: one value per value of `group` (`""` for an ungrouped
/// query, which must answer exactly one series or a scalar).
pub fn parse(body: &[u8], group: Option<&str>) -> Result<Vec<(String, f64)>, Failure> {
    let response: Response =
        serde_json::from_slice(body).map_err(|e| Failure::Decode(e.to_string()))?;
    if response.status != "success" {
        return Err(Failure::Error(format!(
            "{}: {}",
            response.error_type.unwrap_or_default(),
            response.error.unwrap_or_default()
        )));
    }
    let data = response
        .data
        .ok_or_else(|| Failure::Decode("`data` is missing".to_owned()))?;
    let decode = |e: serde_json::Error| Failure::Decode(e.to_string());
    let series: Vec<Series> = match data.result_type.as_str() {
        "vector" => serde_json::from_value(data.result).map_err(decode)?,
        "scalar" if group.is_none() => {
            let value: (serde_json::Value, serde_json::Value) =
                serde_json::from_value(data.result).map_err(decode)?;
            vec![Series {
                metric: Default::default(),
                value,
            }]
        }
        other => {
            return Err(Failure::Series(format!(
                "the answer is a {other}, not an instant vector{}",
                if group.is_some() { "" } else { " or scalar" }
            )))
        }
    };
    if series.is_empty() {
        return Err(Failure::Empty);
    }
    if group.is_none() && series.len() > 1 {
        return Err(Failure::Series(format!(
            "{} series where one total was expected (aggregate with sum)",
            series.len()
        )));
    }
    let mut values: Vec<(String, f64)> = Vec::with_capacity(series.len());
    for s in series {
        let key = group
            .map(|g| s.metric.get(g).cloned().unwrap_or_default())
            .unwrap_or_default();
        let text = match &s.value.1 {
            serde_json::Value::String(t) => t.clone(),
            other => return Err(Failure::Value(other.to_string())),
        };
        let value: f64 = text
            .parse()
            .ok()
            .filter(|v: &f64| v.is_finite())
            .ok_or(Failure::Value(text))?;
        if values.iter().any(|(k, _)| *k == key) {
            return Err(Failure::Series(format!(
                "two series for {}=\"{key}\" (aggregate by it alone)",
                group.unwrap_or("")
            )));
        }
        values.push((key, value));
    }
    Ok(values)
}
