//! What goes on the wire: Alertmanager's v2 `postableAlerts` array, the generic webhook message,
//! and RFC 3339 timestamps.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use super::Alert;

/// Whether an alert is still going on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Firing,
    Resolved,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Firing => "firing",
            Status::Resolved => "resolved",
        }
    }
}

/// One element of `POST /api/v2/alerts` (Alertmanager's `postableAlert`).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct PostableAlert<'a> {
    labels: &'a BTreeMap<String, String>,
    annotations: &'a BTreeMap<String, String>,
    starts_at: String,
    ends_at: String,
    #[serde(rename = "generatorURL", skip_serializing_if = "Option::is_none")]
    generator_url: Option<&'a str>,
}

/// The body of a generic webhook POST, shaped like Alertmanager's own webhook notification so
/// receivers written for one understand the other.
#[derive(Debug, Serialize)]
struct WebhookMessage<'a> {
    version: &'static str,
    status: Status,
    alerts: Vec<WebhookAlert<'a>>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct WebhookAlert<'a> {
    status: Status,
    labels: &'a BTreeMap<String, String>,
    annotations: &'a BTreeMap<String, String>,
    starts_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    ends_at: Option<String>,
    #[serde(rename = "generatorURL", skip_serializing_if = "Option::is_none")]
    generator_url: Option<&'a str>,
}

/// An Alertmanager batch. A firing alert without its own `ends_at` is sent valid until
/// `default_ends_at`: like Prometheus, Tally bounds every firing alert and re-sends it before the
/// bound, so an agent that dies stops asserting its alerts instead of leaving them to the
/// receiver's `resolve_timeout`. `endsAt` never precedes `startsAt` (Alertmanager rejects that).
pub fn alertmanager_body(
    alerts: &[Alert],
    default_ends_at: SystemTime,
) -> Result<Vec<u8>, serde_json::Error> {
    let postable: Vec<PostableAlert<'_>> = alerts
        .iter()
        .map(|a| PostableAlert {
            labels: &a.labels,
            annotations: &a.annotations,
            starts_at: rfc3339(a.starts_at),
            ends_at: rfc3339(a.ends_at.unwrap_or(default_ends_at).max(a.starts_at)),
            generator_url: a.generator_url.as_deref(),
        })
        .collect();
    serde_json::to_vec(&postable)
}

/// A webhook message about one state change: `{"version":"1","status":...,"alerts":[...]}`.
pub fn webhook_body(status: Status, alert: &Alert) -> Result<Vec<u8>, serde_json::Error> {
    let message = WebhookMessage {
        version: "1",
        status,
        alerts: vec![WebhookAlert {
            status,
            labels: &alert.labels,
            annotations: &alert.annotations,
            starts_at: rfc3339(alert.starts_at),
            ends_at: alert.ends_at.map(|t| rfc3339(t.max(alert.starts_at))),
            generator_url: alert.generator_url.as_deref(),
        }],
    };
    serde_json::to_vec(&message)
}

/// `t` in UTC as RFC 3339 with milliseconds (`2026-11-28T22:21:33.440Z`); times before the Unix
/// epoch are written as the epoch.
pub fn rfc3339(t: SystemTime) -> String {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    let secs = since.as_secs();
    // u64::MAX / 86_400 < 2^48, so the day count fits an i64.
    let days = i64::try_from(secs / 86_400).unwrap_or(i64::MAX / 2);
    let in_day = secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        in_day / 3600,
        in_day % 3600 / 60,
        in_day % 60,
        since.subsec_millis()
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian (year, month, day). Counting from 0000-03-01
/// puts each leap day at the end of its year, so a year's length only matters for the year
/// number: 146 097 days make a 400-year era, eras repeat exactly.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    const ERA_DAYS: i64 = 146_097;
    // 1970-01-01 is day 719 468 counted from 0000-03-01.
    let z = days + 719_468;
    let era = z.div_euclid(ERA_DAYS);
    let day_of_era = z.rem_euclid(ERA_DAYS);
    // Years of 365 days, corrected for the leap days of every 4th, 100th and 400th year.
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / (ERA_DAYS - 1)) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    // Months from March: 31,30,31,30,31,31,30,31,30,31,31,(28|29) repeat every 5 months of 153 days.
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    // Both are small by construction: month in 1..=12, day in 1..=31.
    (year, month as u32, day as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64, millis: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_millis(millis)
    }

    fn alert() -> Alert {
        Alert {
            labels: BTreeMap::from([
                ("alertname".to_owned(), "TallyBudgetExceeded".to_owned()),
                ("budget".to_owned(), "gpu-hours".to_owned()),
            ]),
            annotations: BTreeMap::from([("summary".to_owned(), "over budget".to_owned())]),
            starts_at: at(1_795_904_493, 440),
            ends_at: None,
            generator_url: None,
        }
    }

    #[test]
    fn rfc3339_known_instants() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(at(951_782_400, 0)), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339(at(951_868_800, 0)), "2000-03-01T00:00:00.000Z");
        assert_eq!(rfc3339(at(4_102_444_800, 0)), "2100-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(at(1_795_904_493, 440)), "2026-11-28T22:21:33.440Z");
        assert_eq!(rfc3339(at(86_399, 999)), "1970-01-01T23:59:59.999Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH - Duration::from_secs(5)),
            "1970-01-01T00:00:00.000Z"
        );
    }

    #[test]
    fn civil_from_days_agrees_with_counting_days_one_by_one() {
        let leap = |y: i64| (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
        let (mut y, mut m, mut d) = (1970_i64, 1_u32, 1_u32);
        // Through 2400, which crosses the non-leap 2100, 2200, 2300 and the leap 2400.
        for days in 0..(431 * 366) {
            assert_eq!(civil_from_days(days), (y, m, d), "day {days}");
            let length = match m {
                2 if leap(y) => 29,
                2 => 28,
                4 | 6 | 9 | 11 => 30,
                _ => 31,
            };
            d += 1;
            if d > length {
                d = 1;
                m += 1;
                if m > 12 {
                    m = 1;
                    y += 1;
                }
            }
        }
    }

    #[test]
    fn alertmanager_body_firing_and_resolved() {
        let firing = alert();
        let mut resolved = alert();
        resolved.ends_at = Some(at(1_795_904_600, 0));
        resolved.generator_url = Some("http://node-1:9400/budgets".to_owned());
        let body = alertmanager_body(&[firing, resolved], at(1_795_904_733, 440)).unwrap();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            json,
            serde_json::json!([
                {
                    "labels": {"alertname": "TallyBudgetExceeded", "budget": "gpu-hours"},
                    "annotations": {"summary": "over budget"},
                    "startsAt": "2026-11-28T22:21:33.440Z",
                    "endsAt": "2026-11-28T22:25:33.440Z"
                },
                {
                    "labels": {"alertname": "TallyBudgetExceeded", "budget": "gpu-hours"},
                    "annotations": {"summary": "over budget"},
                    "startsAt": "2026-11-28T22:21:33.440Z",
                    "endsAt": "2026-11-28T22:23:20.000Z",
                    "generatorURL": "http://node-1:9400/budgets"
                }
            ])
        );
    }

    #[test]
    fn alertmanager_body_never_ends_before_it_starts() {
        let mut early = alert();
        early.ends_at = Some(at(1_000, 0));
        let body = alertmanager_body(&[early], at(2_000, 0)).unwrap();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json[0]["endsAt"], json[0]["startsAt"]);
    }

    #[test]
    fn webhook_body_shape() {
        let body = webhook_body(Status::Firing, &alert()).unwrap();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "version": "1",
                "status": "firing",
                "alerts": [{
                    "status": "firing",
                    "labels": {"alertname": "TallyBudgetExceeded", "budget": "gpu-hours"},
                    "annotations": {"summary": "over budget"},
                    "startsAt": "2026-11-28T22:21:33.440Z"
                }]
            })
        );

        let mut resolved = alert();
        resolved.ends_at = Some(at(1_795_904_600, 5));
        let body = webhook_body(Status::Resolved, &resolved).unwrap();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["status"], "resolved");
        assert_eq!(json["alerts"][0]["status"], "resolved");
        assert_eq!(json["alerts"][0]["endsAt"], "2026-11-28T22:23:20.005Z");
    }
}
