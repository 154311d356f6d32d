//! Partial-precision dates, date-times and times as FHIRPath compares and adds them.

use std::cmp::Ordering;
use std::fmt;

/// How much of a date/time value is specified.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Precision {
    /// Year only.
    Year,
    /// Year and month.
    Month,
    /// A full date.
    Day,
    /// Up to the hour.
    Hour,
    /// Up to the minute.
    Minute,
    /// Up to the second.
    Second,
    /// Up to the millisecond.
    Millisecond,
}

/// A date, date-time or time value with its precision and optional timezone offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Temporal {
    year: i32,
    month: u8,
    day: u8,
    hour: u8,
    minute: u8,
    second: u8,
    millis: u16,
    precision: Precision,
    tz_minutes: Option<i16>,
    kind: Kind,
}

/// Whether the value is a date, a date-time or a time of day.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Date,
    DateTime,
    Time,
}

fn num(s: &str, len: usize) -> Option<u32> {
    if s.len() == len && s.bytes().all(|b| b.is_ascii_digit()) {
        s.parse().ok()
    } else {
        None
    }
}

pub(crate) fn days_in_month(year: i32, month: u8) -> u8 {
    match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        _ => 28,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(y: i32, m: u8, d: u8) -> i64 {
    let y = i64::from(y) - i64::from(m <= 2);
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i32, u8, u8) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y as i32, m, d)
}

impl Temporal {
    fn empty(kind: Kind) -> Temporal {
        Temporal {
            year: 0,
            month: 1,
            day: 1,
            hour: 0,
            minute: 0,
            second: 0,
            millis: 0,
            precision: Precision::Year,
            tz_minutes: None,
            kind,
        }
    }

    /// Parses `YYYY[-MM[-DD]]`.
    pub(crate) fn parse_date(text: &str) -> Option<Temporal> {
        let mut t = Temporal::empty(Kind::Date);
        t.set_date(text)?;
        Some(t)
    }

    fn set_date(&mut self, text: &str) -> Option<()> {
        let mut parts = text.split('-');
        self.year = num(parts.next()?, 4)? as i32;
        self.precision = Precision::Year;
        if let Some(m) = parts.next() {
            self.month = num(m, 2)? as u8;
            if !(1..=12).contains(&self.month) {
                return None;
            }
            self.precision = Precision::Month;
        }
        if let Some(d) = parts.next() {
            self.day = num(d, 2)? as u8;
            if self.day == 0 || self.day > days_in_month(self.year, self.month) {
                return None;
            }
            self.precision = Precision::Day;
        }
        if parts.next().is_some() {
            return None;
        }
        Some(())
    }

    /// Parses `hh[:mm[:ss[.fff]]]`.
    pub(crate) fn parse_time(text: &str) -> Option<Temporal> {
        let mut t = Temporal::empty(Kind::Time);
        t.set_time(text)?;
        Some(t)
    }

    fn set_time(&mut self, text: &str) -> Option<()> {
        let (hms, frac) = match text.split_once('.') {
            Some((a, b)) => (a, Some(b)),
            None => (text, None),
        };
        let mut parts = hms.split(':');
        self.hour = num(parts.next()?, 2)? as u8;
        self.precision = Precision::Hour;
        if let Some(m) = parts.next() {
            self.minute = num(m, 2)? as u8;
            self.precision = Precision::Minute;
        }
        if let Some(s) = parts.next() {
            self.second = num(s, 2)? as u8;
            self.precision = Precision::Second;
        }
        if parts.next().is_some() || self.hour > 23 || self.minute > 59 || self.second > 59 {
            return None;
        }
        if let Some(f) = frac {
            if f.is_empty()
                || !f.bytes().all(|b| b.is_ascii_digit())
                || self.precision < Precision::Second
            {
                return None;
            }
            let mut ms = 0u32;
            for (i, b) in f.bytes().take(3).enumerate() {
                ms += u32::from(b - b'0') * 10u32.pow(2 - i as u32);
            }
            self.millis = ms as u16;
            self.precision = Precision::Millisecond;
        }
        Some(())
    }

    /// Parses a date-time literal body `YYYY[-MM[-DD]]T[hh[:mm[:ss[.fff]]]][Z|+hh:mm]`, or a
    /// FHIR `dateTime`/`instant` string where the `T` part may be absent.
    pub(crate) fn parse_datetime(text: &str) -> Option<Temporal> {
        let mut t = Temporal::empty(Kind::DateTime);
        let (date, rest) = match text.split_once('T') {
            Some((d, r)) => (d, Some(r)),
            None => (text, None),
        };
        t.set_date(date)?;
        let Some(rest) = rest else { return Some(t) };
        if rest.is_empty() {
            return Some(t);
        }
        let (time, tz) = if let Some(time) = rest.strip_suffix('Z') {
            (time, Some(0))
        } else if let Some(pos) = rest.rfind(['+', '-']) {
            let (time, zone) = rest.split_at(pos);
            let sign: i16 = if zone.starts_with('-') { -1 } else { 1 };
            let (h, m) = zone[1..].split_once(':')?;
            let minutes = num(h, 2)? as i16 * 60 + num(m, 2)? as i16;
            (time, Some(sign * minutes))
        } else {
            (rest, None)
        };
        if t.precision != Precision::Day {
            return None;
        }
        t.set_time(time)?;
        t.tz_minutes = tz;
        Some(t)
    }

    pub(crate) fn kind(&self) -> Kind {
        self.kind
    }

    /// The precision of the value.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// The same value viewed as a date-time (for comparing a date with a date-time).
    pub(crate) fn as_datetime(mut self) -> Temporal {
        if self.kind == Kind::Date {
            self.kind = Kind::DateTime;
        }
        self
    }

    /// The date part of a date-time.
    pub(crate) fn to_date(mut self) -> Temporal {
        self.kind = Kind::Date;
        self.precision = self.precision.min(Precision::Day);
        self.tz_minutes = None;
        self
    }

    fn normalized(self) -> Temporal {
        let Some(offset) = self.tz_minutes else {
            return self;
        };
        if self.kind == Kind::Time || self.precision < Precision::Hour || offset == 0 {
            return self;
        }
        let days = days_from_civil(self.year, self.month, self.day);
        let minutes =
            days * 1440 + i64::from(self.hour) * 60 + i64::from(self.minute) - i64::from(offset);
        let (y, m, d) = civil_from_days(minutes.div_euclid(1440));
        let rem = minutes.rem_euclid(1440);
        Temporal {
            year: y,
            month: m,
            day: d,
            hour: (rem / 60) as u8,
            minute: (rem % 60) as u8,
            tz_minutes: Some(0),
            ..self
        }
    }

    /// FHIRPath ordering: `None` when the values differ in precision and are equal as far as
    /// both go (the result is unknown). Seconds and milliseconds count as one precision.
    pub(crate) fn compare(&self, other: &Temporal) -> Option<Ordering> {
        let timed = |t: &Temporal| t.kind == Kind::DateTime && t.precision >= Precision::Hour;
        if timed(self) && timed(other) && self.tz_minutes.is_some() != other.tz_minutes.is_some() {
            // One value is local time of an unknown zone: the order is unknown.
            return None;
        }
        let (a, b) = if self.tz_minutes.is_some() && other.tz_minutes.is_some() {
            (self.normalized(), other.normalized())
        } else {
            (*self, *other)
        };
        let level = |p: Precision| p.min(Precision::Second);
        let pa = level(a.precision);
        let pb = level(b.precision);
        let fields = |t: &Temporal| -> [(Precision, i64); 6] {
            let sec = i64::from(t.second) * 1000 + i64::from(t.millis);
            [
                (Precision::Year, i64::from(t.year)),
                (Precision::Month, i64::from(t.month)),
                (Precision::Day, i64::from(t.day)),
                (Precision::Hour, i64::from(t.hour)),
                (Precision::Minute, i64::from(t.minute)),
                (Precision::Second, sec),
            ]
        };
        let start = if a.kind == Kind::Time { 3 } else { 0 };
        let fa = fields(&a);
        let fb = fields(&b);
        for i in start..6 {
            let p = fa[i].0;
            if p > pa || p > pb {
                break;
            }
            match fa[i].1.cmp(&fb[i].1) {
                Ordering::Equal => {}
                other => return Some(other),
            }
        }
        if pa == pb {
            Some(Ordering::Equal)
        } else {
            None
        }
    }

    /// Adds `amount` of a calendar `unit` (`year`, `month`, `week`, `day`, `hour`, `minute`,
    /// `second`, `millisecond`); `None` when the result is out of range.
    pub(crate) fn add(&self, amount: f64, unit: &str) -> Option<Temporal> {
        let mut t = *self;
        let whole = amount.trunc() as i64;
        match unit {
            "year" | "month" => {
                let months = if unit == "year" {
                    whole.checked_mul(12)?
                } else {
                    whole
                };
                let total =
                    (i64::from(t.year) * 12 + i64::from(t.month) - 1).checked_add(months)?;
                t.year = i32::try_from(total.div_euclid(12)).ok()?;
                t.month = (total.rem_euclid(12) + 1) as u8;
                t.day = t.day.min(days_in_month(t.year, t.month));
            }
            _ => {
                let ms_per = match unit {
                    "week" => 7 * 86_400_000,
                    "day" => 86_400_000,
                    "hour" => 3_600_000,
                    "minute" => 60_000,
                    "second" => 1000,
                    "millisecond" => 1,
                    _ => return None,
                };
                let delta = whole.checked_mul(ms_per)?;
                let days = if t.kind == Kind::Time {
                    0
                } else {
                    days_from_civil(t.year, t.month, t.day)
                };
                let ms = i64::from(t.hour) * 3_600_000
                    + i64::from(t.minute) * 60_000
                    + i64::from(t.second) * 1000
                    + i64::from(t.millis);
                let total = days
                    .checked_mul(86_400_000)?
                    .checked_add(ms)?
                    .checked_add(delta)?;
                let (y, m, d) = civil_from_days(total.div_euclid(86_400_000));
                let rem = total.rem_euclid(86_400_000);
                if t.kind != Kind::Time {
                    t.year = y;
                    t.month = m;
                    t.day = d;
                }
                t.hour = (rem / 3_600_000) as u8;
                t.minute = (rem / 60_000 % 60) as u8;
                t.second = (rem / 1000 % 60) as u8;
                t.millis = (rem % 1000) as u16;
            }
        }
        if t.kind != Kind::Time && !(1..=9999).contains(&t.year) {
            return None;
        }
        Some(t)
    }
}

impl fmt::Display for Temporal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = self.precision;
        if self.kind != Kind::Time {
            write!(f, "{:04}", self.year)?;
            if p >= Precision::Month {
                write!(f, "-{:02}", self.month)?;
            }
            if p >= Precision::Day {
                write!(f, "-{:02}", self.day)?;
            }
            if self.kind == Kind::Date || p <= Precision::Day {
                return Ok(());
            }
            f.write_str("T")?;
        }
        write!(f, "{:02}", self.hour)?;
        if p >= Precision::Minute {
            write!(f, ":{:02}", self.minute)?;
        }
        if p >= Precision::Second {
            write!(f, ":{:02}", self.second)?;
        }
        if p >= Precision::Millisecond {
            write!(f, ".{:03}", self.millis)?;
        }
        match self.tz_minutes {
            Some(0) => f.write_str("Z"),
            Some(m) => {
                let sign = if m < 0 { '-' } else { '+' };
                write!(f, "{sign}{:02}:{:02}", m.abs() / 60, m.abs() % 60)
            }
            None => Ok(()),
        }
    }
}

impl Temporal {
    /// The UTC date-time `millis` milliseconds after the Unix epoch, at millisecond precision.
    pub(crate) fn from_unix_millis(millis: i64) -> Temporal {
        let (year, month, day) = civil_from_days(millis.div_euclid(86_400_000));
        let rem = millis.rem_euclid(86_400_000);
        Temporal {
            year,
            month,
            day,
            hour: (rem / 3_600_000) as u8,
            minute: (rem / 60_000 % 60) as u8,
            second: (rem / 1000 % 60) as u8,
            millis: (rem % 1000) as u16,
            precision: Precision::Millisecond,
            tz_minutes: Some(0),
            kind: Kind::DateTime,
        }
    }

    /// The time-of-day part of a date-time.
    pub(crate) fn to_time(mut self) -> Temporal {
        self.kind = Kind::Time;
        self.tz_minutes = None;
        self
    }
}

impl Temporal {
    /// FHIRPath `precision()`: the number of digits the value specifies.
    pub(crate) fn precision_digits(&self) -> i64 {
        let p = self.precision;
        if self.kind == Kind::Time {
            return match p {
                Precision::Millisecond => 9,
                Precision::Second => 6,
                Precision::Minute => 4,
                _ => 2,
            };
        }
        match p {
            Precision::Year => 4,
            Precision::Month => 6,
            Precision::Day => 8,
            Precision::Hour => 10,
            Precision::Minute => 12,
            Precision::Second => 14,
            Precision::Millisecond => 17,
        }
    }

    /// FHIRPath `lowBoundary()` / `highBoundary()` at `digits` precision: missing parts are
    /// filled with their least (greatest) values; an absent timezone becomes the widest one.
    pub(crate) fn boundary(&self, digits: u32, high: bool) -> Option<Temporal> {
        let target = if self.kind == Kind::Time {
            match digits {
                2 => Precision::Hour,
                4 => Precision::Minute,
                6 => Precision::Second,
                9 => Precision::Millisecond,
                _ => return None,
            }
        } else {
            match digits {
                4 => Precision::Year,
                6 => Precision::Month,
                8 => Precision::Day,
                10 if self.kind == Kind::DateTime => Precision::Hour,
                12 if self.kind == Kind::DateTime => Precision::Minute,
                14 if self.kind == Kind::DateTime => Precision::Second,
                17 if self.kind == Kind::DateTime => Precision::Millisecond,
                _ => return None,
            }
        };
        let mut t = *self;
        let p = self.precision;
        if p < Precision::Month {
            t.month = if high { 12 } else { 1 };
        }
        if p < Precision::Day {
            t.day = if high {
                days_in_month(t.year, t.month)
            } else {
                1
            };
        }
        if p < Precision::Hour {
            t.hour = if high { 23 } else { 0 };
        }
        if p < Precision::Minute {
            t.minute = if high { 59 } else { 0 };
        }
        if p < Precision::Second {
            t.second = if high { 59 } else { 0 };
        }
        if p < Precision::Millisecond {
            t.millis = if high { 999 } else { 0 };
        }
        t.precision = target;
        if t.kind == Kind::DateTime && target > Precision::Day && t.tz_minutes.is_none() {
            t.tz_minutes = Some(if high { -12 * 60 } else { 14 * 60 });
        }
        if target <= Precision::Day {
            t.tz_minutes = None;
        }
        Some(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_partial_values() {
        for s in ["2014", "2014-01", "2014-01-05"] {
            assert_eq!(Temporal::parse_date(s).unwrap().to_string(), s);
        }
        for s in [
            "2014-01-05T10",
            "2014-01-05T10:30:00.123+01:00",
            "2014-01-05T10:30Z",
        ] {
            assert_eq!(Temporal::parse_datetime(s).unwrap().to_string(), s);
        }
        assert_eq!(
            Temporal::parse_datetime("2014-01-05").unwrap().precision(),
            Precision::Day
        );
        for bad in [
            "2014-13",
            "2014-02-30",
            "14-01-01",
            "2014-01-01T25:00",
            "2014-01T10:00",
        ] {
            assert!(Temporal::parse_datetime(bad).is_none(), "{bad}");
        }
        assert!(Temporal::parse_time("10:61").is_none());
    }

    #[test]
    fn compares_across_zones_and_precisions() {
        let dt = |s| Temporal::parse_datetime(s).unwrap();
        assert_eq!(
            dt("2017-11-05T01:30:00-04:00").compare(&dt("2017-11-05T00:30:00-05:00")),
            Some(Ordering::Equal)
        );
        assert_eq!(dt("2012").compare(&dt("2013-01")), Some(Ordering::Less));
        assert_eq!(dt("2012-01").compare(&dt("2012-01-05")), None);
        assert_eq!(
            dt("2012-04-15T15:30:31").compare(&dt("2012-04-15T15:30:31.000")),
            Some(Ordering::Equal)
        );
    }

    #[test]
    fn calendar_arithmetic_clamps_days() {
        let date = Temporal::parse_date("2019-01-31").unwrap();
        assert_eq!(date.add(1.0, "month").unwrap().to_string(), "2019-02-28");
        assert_eq!(date.add(-1.0, "year").unwrap().to_string(), "2018-01-31");
        let t = Temporal::parse_datetime("2019-12-31T23:59:59.999Z").unwrap();
        assert_eq!(
            t.add(1.0, "millisecond").unwrap().to_string(),
            "2020-01-01T00:00:00.000Z"
        );
        assert!(date.add(1e12, "year").is_none());
    }
}
