//! FHIR `instant`s: formatting server time and parsing search values, std only.
//! Times are microseconds since the Unix epoch (UTC).

use std::time::{SystemTime, UNIX_EPOCH};

/// Microseconds since the Unix epoch, now.
pub fn now_micros() -> i64 {
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_micros()).unwrap_or(i64::MAX),
        Err(_) => 0,
    }
}

/// `YYYY-MM-DDThh:mm:ss.ffffffZ`.
pub fn format_instant(micros: i64) -> String {
    let secs = micros.div_euclid(1_000_000);
    let frac = micros.rem_euclid(1_000_000);
    let (days, sod) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{frac:06}Z",
        sod / 3600,
        sod % 3600 / 60,
        sod % 60
    )
}

/// Parses `YYYY-MM-DDThh:mm:ss[.f{1,6}](Z|+hh:mm|-hh:mm)` into the range it denotes
/// (FHIR search: a value covers its precision): `[start, end)` in microseconds.
pub fn parse_instant_range(s: &str) -> Option<(i64, i64)> {
    let b = s.as_bytes();
    let num = |from: usize, len: usize| -> Option<i64> {
        let part = s.get(from..from + len)?;
        part.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| part.parse().ok())
            .flatten()
    };
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b'T'
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let (y, mo, d) = (num(0, 4)?, num(5, 2)?, num(8, 2)?);
    let (h, mi, sec) = (num(11, 2)?, num(14, 2)?, num(17, 2)?);
    if !(1..=12).contains(&mo) || d < 1 || d > days_in_month(y, mo) || h > 23 || mi > 59 || sec > 59
    {
        return None;
    }
    let mut i = 19;
    let mut frac = 0i64;
    let mut unit = 1_000_000i64;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        let digits = i - start;
        if digits == 0 || digits > 6 {
            return None;
        }
        frac = num(start, digits)?;
        unit = 10i64.pow(6 - u32::try_from(digits).ok()?);
        frac *= unit;
    }
    let offset_secs = match &s[i..] {
        "Z" => 0,
        tz if tz.len() == 6
            && (tz.starts_with('+') || tz.starts_with('-'))
            && tz.as_bytes()[3] == b':' =>
        {
            let (oh, om) = (num(i + 1, 2)?, num(i + 4, 2)?);
            if oh > 14 || om > 59 {
                return None;
            }
            let sign = if tz.starts_with('-') { -1 } else { 1 };
            sign * (oh * 3600 + om * 60)
        }
        _ => return None,
    };
    let u32_of = |v: i64| u32::try_from(v).ok();
    let days = days_from_civil(y, u32_of(mo)?, u32_of(d)?);
    let secs = days * 86_400 + h * 3600 + mi * 60 + sec - offset_secs;
    let start = secs * 1_000_000 + frac;
    Some((start, start + unit))
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (i64::from(m) + 9) % 12;
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The inverse of [`days_from_civil`].
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_and_parses() {
        assert_eq!(format_instant(0), "1970-01-01T00:00:00.000000Z");
        let t = 1_795_324_321_123_456; // 2026-11-22T05:12:01.123456Z
        let s = format_instant(t);
        assert_eq!(s, "2026-11-22T05:12:01.123456Z");
        assert_eq!(parse_instant_range(&s), Some((t, t + 1)));
        assert_eq!(
            parse_instant_range("2026-11-22T14:12:01+09:00"),
            Some((t - 123_456, t - 123_456 + 1_000_000))
        );
        assert_eq!(
            parse_instant_range("2024-02-29T00:00:00.5Z").map(|(a, b)| b - a),
            Some(100_000)
        );
        for bad in [
            "2026-11-22",
            "2026-11-22T05:12:01",
            "2026-13-01T00:00:00Z",
            "2025-02-29T00:00:00Z",
            "2026-11-22T05:12:01.1234567Z",
            "2026-11-22T05:12:01.Z",
            "2026-11-22T05:12:01+0900",
            "2026-11-22T05:12:01 09:00",
            "２026-11-22T05:12:01Z",
            "2026-11-22T05:12:01+0é00",
        ] {
            assert_eq!(parse_instant_range(bad), None, "{bad}");
        }
    }
}
