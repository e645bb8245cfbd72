//! SS-MIX2 times: HL7 TS/DTM values and file-name 発生日時, all Japan local time.
//!
//! SS-MIX2 writes times without an offset; they are Japan Standard Time (+09:00, no daylight
//! saving). A value is kept with the precision it was written with and shown as RFC 3339
//! with `+09:00`: `20111220224447.3399` is `2011-12-20T22:44:47.3399+09:00`. A value is never
//! converted as if it were UTC. An explicit offset (`+0900`), rare in SS-MIX2, is kept.

use std::fmt;

/// How much of a time was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Precision {
    Year,
    Month,
    Day,
    Hour,
    Minute,
    Second,
    /// Seconds with this many fractional digits (1 to 4 in HL7, 1 to 3 in file names).
    Fraction(u8),
}

impl Precision {
    pub fn as_str(self) -> &'static str {
        match self {
            Precision::Year => "year",
            Precision::Month => "month",
            Precision::Day => "day",
            Precision::Hour => "hour",
            Precision::Minute => "minute",
            Precision::Second => "second",
            Precision::Fraction(_) => "fraction",
        }
    }
}

/// A local time as written, validated (no month 13, no 2 February 30th).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalTime {
    year: u16,
    month: u8,
    day: u8,
    hour: u8,
    minute: u8,
    second: u8,
    /// The fractional digits as written (may be empty).
    fraction: String,
    /// Minutes east of UTC; +540 unless the value said otherwise.
    offset_minutes: i16,
    precision: Precision,
}

/// Why a time was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TimeError(String);

/// Minutes east of UTC of Japan Standard Time.
pub const JST_OFFSET_MINUTES: i16 = 540;

fn is_leap(y: u16) -> bool {
    (y.is_multiple_of(4) && !y.is_multiple_of(100)) || y.is_multiple_of(400)
}

pub(crate) fn days_in_month(y: u16, m: u8) -> u8 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if is_leap(y) => 29,
        2 => 28,
        _ => 0,
    }
}

fn digits(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

fn num(s: &str) -> u16 {
    s.bytes()
        .fold(0u16, |acc, b| acc * 10 + u16::from(b - b'0'))
}

/// Validates a `YYYYMMDD` date.
pub fn check_date(s: &str) -> Result<(), TimeError> {
    if s.len() != 8 || !digits(s) {
        return Err(TimeError(format!("{s:?} is not a YYYYMMDD date")));
    }
    LocalTime::parse_hl7(s).map(|_| ())
}

impl LocalTime {
    /// Parses an HL7 TS/DTM: `YYYY[MM[DD[HH[MM[SS[.S[S[S[S]]]]]]]]][+/-ZZZZ]`.
    pub fn parse_hl7(text: &str) -> Result<LocalTime, TimeError> {
        let bad = |why: &str| TimeError(format!("{text:?} is not an HL7 time: {why}"));
        let (body, offset) = match text.find(['+', '-']) {
            Some(i) => {
                let (b, o) = text.split_at(i);
                if o.len() != 5 || !digits(&o[1..]) {
                    return Err(bad("the offset is not +ZZZZ"));
                }
                let hours = num(&o[1..3]);
                let mins = num(&o[3..5]);
                if hours > 14 || mins > 59 {
                    return Err(bad("the offset is out of range"));
                }
                let minutes = i16::try_from(hours * 60 + mins).map_err(|_| bad("offset"))?;
                (
                    b,
                    if o.starts_with('-') {
                        -minutes
                    } else {
                        minutes
                    },
                )
            }
            None => (text, JST_OFFSET_MINUTES),
        };
        let (whole, fraction) = match body.split_once('.') {
            Some((w, f)) => {
                if !digits(f) || f.len() > 4 {
                    return Err(bad("the fraction is not 1 to 4 digits"));
                }
                if w.len() != 14 {
                    return Err(bad("a fraction needs seconds"));
                }
                (w, f)
            }
            None => (body, ""),
        };
        if !digits(whole) {
            return Err(bad("not digits"));
        }
        let precision = match whole.len() {
            4 => Precision::Year,
            6 => Precision::Month,
            8 => Precision::Day,
            10 => Precision::Hour,
            12 => Precision::Minute,
            14 if fraction.is_empty() => Precision::Second,
            14 => Precision::Fraction(u8::try_from(fraction.len()).unwrap_or(4)),
            _ => return Err(bad("wrong number of digits")),
        };
        Self::build(whole, fraction, offset, precision).map_err(|why| bad(&why))
    }

    /// Parses a file name's 発生日時: `YYYYMMDDHHMMSS` followed by 0 to 3 fractional digits
    /// (14 to 17 digits; 17 is the norm, 14 and 15 occur).
    pub fn parse_file_time(text: &str) -> Result<LocalTime, TimeError> {
        let bad = |why: &str| TimeError(format!("{text:?} is not a 発生日時: {why}"));
        if !digits(text) || !(14..=17).contains(&text.len()) {
            return Err(bad("expected 14 to 17 digits (YYYYMMDDHHMMSSfff)"));
        }
        let (whole, fraction) = text.split_at(14);
        let precision = if fraction.is_empty() {
            Precision::Second
        } else {
            Precision::Fraction(u8::try_from(fraction.len()).unwrap_or(3))
        };
        Self::build(whole, fraction, JST_OFFSET_MINUTES, precision).map_err(|why| bad(&why))
    }

    fn build(
        whole: &str,
        fraction: &str,
        offset_minutes: i16,
        precision: Precision,
    ) -> Result<LocalTime, String> {
        let part = |from: usize, to: usize, default: u16| -> u16 {
            if whole.len() >= to {
                num(&whole[from..to])
            } else {
                default
            }
        };
        let year = part(0, 4, 0);
        let month = u8::try_from(part(4, 6, 1)).map_err(|_| "month")?;
        let day = u8::try_from(part(6, 8, 1)).map_err(|_| "day")?;
        let hour = u8::try_from(part(8, 10, 0)).map_err(|_| "hour")?;
        let minute = u8::try_from(part(10, 12, 0)).map_err(|_| "minute")?;
        let second = u8::try_from(part(12, 14, 0)).map_err(|_| "second")?;
        if !(1..=12).contains(&month) {
            return Err(format!("there is no month {month}"));
        }
        if day == 0 || day > days_in_month(year, month) {
            return Err(format!("{year}-{month:02} has no day {day}"));
        }
        if hour > 23 || minute > 59 || second > 59 {
            return Err(format!(
                "{hour:02}:{minute:02}:{second:02} is not a time of day"
            ));
        }
        Ok(LocalTime {
            year,
            month,
            day,
            hour,
            minute,
            second,
            fraction: fraction.to_owned(),
            offset_minutes,
            precision,
        })
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// The date as `YYYYMMDD` (the form of a care-date folder).
    pub fn yyyymmdd(&self) -> String {
        format!("{:04}{:02}{:02}", self.year, self.month, self.day)
    }

    /// RFC 3339 (`2011-12-20T22:44:47.3399+09:00`). Parts that were not written are zero; the
    /// fraction is shown as written; [`LocalTime::precision`] says what was written.
    pub fn to_rfc3339(&self) -> String {
        self.to_string()
    }

    /// A key that orders times of the same offset by when they happened, whatever their
    /// precision (`2011122022444733990`).
    pub fn sort_key(&self) -> (u16, u8, u8, u8, u8, u8, u32) {
        let mut frac = self.fraction.clone();
        while frac.len() < 4 {
            frac.push('0');
        }
        (
            self.year,
            self.month,
            self.day,
            self.hour,
            self.minute,
            self.second,
            u32::from(num(&frac[..4])),
        )
    }
}

impl fmt::Display for LocalTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
            self.year, self.month, self.day, self.hour, self.minute, self.second
        )?;
        if !self.fraction.is_empty() {
            write!(f, ".{}", self.fraction)?;
        }
        let sign = if self.offset_minutes < 0 { '-' } else { '+' };
        let m = self.offset_minutes.unsigned_abs();
        write!(f, "{sign}{:02}:{:02}", m / 60, m % 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e16_hl7_times_are_japan_local_with_their_precision() {
        let t = LocalTime::parse_hl7("20111220224447.3399").unwrap();
        assert_eq!(t.to_rfc3339(), "2011-12-20T22:44:47.3399+09:00");
        assert_eq!(t.precision(), Precision::Fraction(4));
        let t = LocalTime::parse_hl7("201112202100").unwrap();
        assert_eq!(t.precision(), Precision::Minute);
        assert_eq!(t.to_rfc3339(), "2011-12-20T21:00:00+09:00");
        assert_eq!(
            LocalTime::parse_hl7("20111220").unwrap().precision(),
            Precision::Day
        );
        // Never shifted as UTC: midnight stays midnight on the same date.
        assert_eq!(
            LocalTime::parse_hl7("20111231000000").unwrap().to_rfc3339(),
            "2011-12-31T00:00:00+09:00"
        );
        assert_eq!(
            LocalTime::parse_hl7("20111231000000+0900")
                .unwrap()
                .to_rfc3339(),
            "2011-12-31T00:00:00+09:00"
        );
    }

    #[test]
    fn e16_file_times_of_14_to_17_digits() {
        assert_eq!(
            LocalTime::parse_file_time("20110701224603984")
                .unwrap()
                .to_rfc3339(),
            "2011-07-01T22:46:03.984+09:00"
        );
        assert_eq!(
            LocalTime::parse_file_time("200802031630123")
                .unwrap()
                .to_rfc3339(),
            "2008-02-03T16:30:12.3+09:00"
        );
        assert_eq!(
            LocalTime::parse_file_time("20080203163012")
                .unwrap()
                .to_rfc3339(),
            "2008-02-03T16:30:12+09:00"
        );
        assert!(LocalTime::parse_file_time("2008020316301").is_err());
        assert!(LocalTime::parse_file_time("200802031630123456").is_err());
    }

    #[test]
    fn impossible_times_are_refused() {
        for bad in [
            "20110230",
            "20111301",
            "20111220246000",
            "2011122025",
            "2011.5",
            "20111220224447.12345",
            "abc",
            "",
        ] {
            assert!(LocalTime::parse_hl7(bad).is_err(), "{bad}");
        }
        assert!(LocalTime::parse_hl7("20120229").is_ok());
        assert!(check_date("20130229").is_err());
        assert!(check_date("2013022").is_err());
    }

    #[test]
    fn sort_keys_order_by_time_across_precisions() {
        let a = LocalTime::parse_file_time("20110701224603984").unwrap();
        let b = LocalTime::parse_file_time("20110701224604").unwrap();
        assert!(a.sort_key() < b.sort_key());
    }
}
