//! A parser of the Prometheus text exposition format (0.0.4, and OpenMetrics text as far as
//! samples go), for what inference servers serve. Only the samples a caller wants are kept;
//! comments (`# HELP`, `# TYPE`, `# EOF`) are skipped. A line that is not a sample is an error
//! naming its line number: a body that is not exposition text is garbage, not a partial answer.

use std::borrow::Cow;

/// One sample line.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample<'a> {
    pub name: &'a str,
    pub labels: Vec<(&'a str, Cow<'a, str>)>,
    pub value: f64,
}

impl Sample<'_> {
    /// The value of label `name`, if the sample has it.
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_ref())
    }
}

/// Why a body is not exposition text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {what}")]
pub struct ParseError {
    pub line: usize,
    pub what: &'static str,
}

/// Every sample of `text` whose name `want` accepts, in order.
pub fn parse<'a>(
    text: &'a str,
    mut want: impl FnMut(&str) -> bool,
) -> Result<Vec<Sample<'a>>, ParseError> {
    let mut samples = Vec::new();
    for (i, line) in text.lines().enumerate() {
        match parse_line(line) {
            Ok(Some(sample)) if want(sample.name) => samples.push(sample),
            Ok(_) => {}
            Err(what) => return Err(ParseError { line: i + 1, what }),
        }
    }
    Ok(samples)
}

/// One line: a sample, `None` for a comment or a blank line, or what is wrong with it.
pub fn parse_line(line: &str) -> Result<Option<Sample<'_>>, &'static str> {
    let line = line.trim_start();
    if line.is_empty() || line.starts_with('#') {
        return Ok(None);
    }
    let name_end = line
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .unwrap_or(line.len());
    let name = &line[..name_end];
    if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
        return Err("no metric name");
    }
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(after) = rest.strip_prefix('{') {
        rest = parse_labels(after, &mut labels)?;
    }
    if !rest.starts_with([' ', '\t']) {
        return Err("no value after the name");
    }
    let mut fields = rest.split_ascii_whitespace();
    let value = fields
        .next()
        .and_then(parse_value)
        .ok_or("the value is not a number")?;
    // An optional timestamp (an integer, or OpenMetrics' float seconds), then nothing.
    if let Some(ts) = fields.next() {
        if ts.parse::<f64>().is_err() {
            return Err("the timestamp is not a number");
        }
    }
    if fields.next().is_some() {
        return Err("text after the timestamp");
    }
    Ok(Some(Sample {
        name,
        labels,
        value,
    }))
}

/// Parses `name="value",…}` and returns what follows the closing brace.
fn parse_labels<'a>(
    mut s: &'a str,
    labels: &mut Vec<(&'a str, Cow<'a, str>)>,
) -> Result<&'a str, &'static str> {
    loop {
        s = s.trim_start();
        if let Some(rest) = s.strip_prefix('}') {
            return Ok(rest);
        }
        let end = s
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .ok_or("an unterminated label set")?;
        let name = &s[..end];
        if name.is_empty() {
            return Err("an empty label name");
        }
        s = s[end..].trim_start();
        s = s.strip_prefix('=').ok_or("a label without `=`")?;
        s = s.trim_start();
        s = s.strip_prefix('"').ok_or("a label value without quotes")?;
        let (value, rest) = quoted(s)?;
        labels.push((name, value));
        s = rest.trim_start();
        if let Some(rest) = s.strip_prefix(',') {
            s = rest;
        } else if !s.starts_with('}') {
            return Err("labels not separated by `,`");
        }
    }
}

/// A label value up to its closing quote, unescaped (`\\`, `\"`, `\n`), and what follows.
fn quoted(s: &str) -> Result<(Cow<'_, str>, &str), &'static str> {
    let bytes = s.as_bytes();
    let mut i = 0;
    let mut owned: Option<String> = None;
    while i < bytes.len() {
        match bytes[i] {
            b'"' => {
                let value = match owned {
                    Some(o) => Cow::Owned(o),
                    None => Cow::Borrowed(&s[..i]),
                };
                return Ok((value, &s[i + 1..]));
            }
            b'\\' => {
                let o = owned.get_or_insert_with(|| s[..i].to_owned());
                match bytes.get(i + 1) {
                    Some(b'n') => o.push('\n'),
                    Some(b'\\') => o.push('\\'),
                    Some(b'"') => o.push('"'),
                    _ => return Err("a bad escape in a label value"),
                }
                i += 2;
            }
            _ => {
                // Whole characters: `i` only ever stops on ASCII bytes.
                let len = s[i..].chars().next().map_or(1, char::len_utf8);
                if let Some(o) = &mut owned {
                    o.push_str(&s[i..i + len]);
                }
                i += len;
            }
        }
    }
    Err("an unterminated label value")
}

/// A sample value: a float, `NaN`, `+Inf` or `-Inf`.
fn parse_value(s: &str) -> Option<f64> {
    match s {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ => s.parse().ok(),
    }
}
