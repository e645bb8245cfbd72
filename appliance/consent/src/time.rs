//! Time as the network sees it: instants are Unix seconds; dates and times are read and
//! shown in Japan Standard Time (+09:00, no daylight saving), e.g. `2026-11-22T13:05:00+09:00`.

/// Seconds since the Unix epoch.
pub type Timestamp = i64;

const JST: i64 = 9 * 3600;

/// Why a date or time was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TimeError(String);

/// Days since 1970-01-01 of a civil date (proleptic Gregorian).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The civil date of a day number.
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        _ => 28,
    }
}

fn number(text: &str, what: &str) -> Result<i64, TimeError> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(TimeError(format!("{what} {text:?} is not a number")));
    }
    text.parse()
        .map_err(|_| TimeError(format!("{what} {text:?} is out of range")))
}

/// Parses `YYYY-MM-DD` (midnight JST) or `YYYY-MM-DDTHH:MM[:SS]` with an optional offset
/// (`+09:00`, `Z`; none means JST). Impossible dates such as 2026-02-30 are refused.
pub fn parse(text: &str) -> Result<Timestamp, TimeError> {
    let text = text.trim();
    let (date, rest) = match text.split_once('T') {
        Some((d, r)) => (d, Some(r)),
        None => (text, None),
    };
    let parts: Vec<&str> = date.split('-').collect();
    let [y, m, d] = parts.as_slice() else {
        return Err(TimeError(format!(
            "{text:?} is not a date: expected YYYY-MM-DD or YYYY-MM-DDTHH:MM:SS+09:00"
        )));
    };
    if y.len() != 4 || m.len() != 2 || d.len() != 2 {
        return Err(TimeError(format!(
            "{text:?} is not a date: expected YYYY-MM-DD"
        )));
    }
    let (y, m, d) = (number(y, "year")?, number(m, "month")?, number(d, "day")?);
    if !(1..=12).contains(&m) {
        return Err(TimeError(format!("{text:?}: there is no month {m}")));
    }
    if d < 1 || d > days_in_month(y, m) {
        return Err(TimeError(format!("{text:?}: {y}-{m:02} has no day {d}")));
    }
    let mut secs = 0;
    let mut offset = JST;
    if let Some(rest) = rest {
        let (clock, zone) = if let Some(c) = rest.strip_suffix('Z') {
            (c, Some(0))
        } else if let Some(i) = rest.rfind(['+', '-']) {
            let (c, z) = rest.split_at(i);
            let sign = if z.starts_with('-') { -1 } else { 1 };
            let (zh, zm) = z[1..]
                .split_once(':')
                .filter(|(h, m)| h.len() == 2 && m.len() == 2)
                .ok_or_else(|| TimeError(format!("{text:?}: bad offset {z:?}")))?;
            (
                c,
                Some(
                    sign * (number(zh, "offset hour")? * 3600 + number(zm, "offset minute")? * 60),
                ),
            )
        } else {
            (rest, None)
        };
        if let Some(z) = zone {
            offset = z;
        }
        // Fractions of a second are accepted and dropped.
        let clock = match clock.split_once('.') {
            Some((whole, fraction))
                if !fraction.is_empty() && fraction.bytes().all(|b| b.is_ascii_digit()) =>
            {
                whole
            }
            Some(_) => return Err(TimeError(format!("{text:?}: bad fraction of a second"))),
            None => clock,
        };
        let fields: Vec<&str> = clock.split(':').collect();
        // Two digits each, as RFC 3339 and FHIR's dateTime have them: `04:000:5` is not a
        // time (the fuzzer's `fhir_resource` found it read as 04:00:05).
        if fields.iter().any(|f| f.len() != 2) {
            return Err(TimeError(format!("{text:?}: expected HH:MM or HH:MM:SS")));
        }
        let (h, mi, s) = match fields.as_slice() {
            [h, mi] => (number(h, "hour")?, number(mi, "minute")?, 0),
            [h, mi, s] => (
                number(h, "hour")?,
                number(mi, "minute")?,
                number(s, "second")?,
            ),
            _ => return Err(TimeError(format!("{text:?}: expected HH:MM or HH:MM:SS"))),
        };
        if h > 23 || mi > 59 || s > 59 {
            return Err(TimeError(format!(
                "{text:?}: {h:02}:{mi:02}:{s:02} is not a time of day"
            )));
        }
        secs = h * 3600 + mi * 60 + s;
    }
    Ok(days_from_civil(y, m, d) * 86_400 + secs - offset)
}

/// RFC 3339 in JST: `2026-11-22T13:05:00+09:00`.
pub fn format(ts: Timestamp) -> String {
    let local = ts + JST;
    let (days, secs) = (local.div_euclid(86_400), local.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}+09:00",
        secs / 3600,
        (secs % 3600) / 60,
        secs % 60
    )
}

/// The current time.
pub fn now() -> Timestamp {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_jst_and_round_trip() {
        // 2026-11-22 00:00 JST is 2026-11-21 15:00 UTC.
        assert_eq!(parse("2026-11-22").unwrap(), 1_795_273_200);
        assert_eq!(format(1_795_273_200), "2026-11-22T00:00:00+09:00");
        for text in [
            "2024-02-29T23:59:59+09:00",
            "1999-12-31T00:00:00+09:00",
            "2026-11-22T13:05:00+09:00",
        ] {
            assert_eq!(format(parse(text).unwrap()), text);
        }
        assert_eq!(
            parse("2026-11-22T04:05:00Z").unwrap(),
            parse("2026-11-22T13:05:00+09:00").unwrap()
        );
        assert_eq!(
            parse("2026-11-22T13:05").unwrap(),
            parse("2026-11-22T13:05:00+09:00").unwrap()
        );
    }

    #[test]
    fn impossible_dates_are_refused_clearly() {
        for (bad, says) in [
            ("2026-02-30", "has no day 30"),
            ("2023-02-29", "has no day 29"),
            ("2026-13-01", "no month 13"),
            ("2026-1-01", "expected YYYY-MM-DD"),
            ("yesterday", "not a date"),
            ("2026-11-22T24:00", "not a time of day"),
            ("2026-11-22T04:000:5Z", "expected HH:MM or HH:MM:SS"),
            ("2026-11-22T4:05", "expected HH:MM or HH:MM:SS"),
            ("2026-11-22T04:05:00+9:00", "bad offset"),
        ] {
            let err = parse(bad).unwrap_err().to_string();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }
}
