//! Calendar arithmetic and FHIR date formats, without a date crate or the wall clock.

/// `YYYY-MM-DD` for days since 1970-01-01 (proleptic Gregorian; Howard Hinnant's algorithm).
pub(crate) fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = u32::try_from(doy - (153 * mp + 2) / 5 + 1).unwrap_or(1);
    let m = u32::try_from(if mp < 10 { mp + 3 } else { mp - 9 }).unwrap_or(1);
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

pub(crate) fn date(secs: i64) -> String {
    let (y, m, d) = civil(secs.div_euclid(86_400));
    format!("{y:04}-{m:02}-{d:02}")
}

/// FHIR dateTime with a fixed offset, like most EHR exports.
pub(crate) fn date_time(secs: i64) -> String {
    let tod = secs.rem_euclid(86_400);
    format!(
        "{}T{:02}:{:02}:{:02}-05:00",
        date(secs),
        tod / 3600,
        (tod / 60) % 60,
        tod % 60
    )
}

/// Seconds in a day.
pub(crate) const DAY: i64 = 86_400;

/// Seconds in an average Gregorian year, for ages and spans of years.
pub(crate) const YEAR: i64 = 31_556_952;

/// Offset of local clinic time from UTC: the generated addresses are all in New England, and
/// a fixed offset (no daylight saving) keeps every dateTime a plain function of its instant.
pub(crate) const LOCAL_OFFSET: i64 = -5 * 3600;

/// FHIR dateTime of the instant `utc` in local clinic time, with its offset.
pub(crate) fn local_date_time(utc: i64) -> String {
    let local = utc + LOCAL_OFFSET;
    let tod = local.rem_euclid(DAY);
    format!(
        "{}T{:02}:{:02}:{:02}-05:00",
        date(local),
        tod / 3600,
        (tod / 60) % 60,
        tod % 60
    )
}

/// FHIR date (local clinic calendar) of the instant `utc`.
pub(crate) fn local_date(utc: i64) -> String {
    date(utc + LOCAL_OFFSET)
}

/// FHIR instant in UTC with milliseconds, as servers stamp `issued`.
pub(crate) fn instant(utc: i64, millis: u64) -> String {
    let tod = utc.rem_euclid(DAY);
    format!(
        "{}T{:02}:{:02}:{:02}.{:03}Z",
        date(utc),
        tod / 3600,
        (tod / 60) % 60,
        tod % 60,
        millis % 1000
    )
}

/// The UTC instant of local midnight starting the local day that contains `utc`.
pub(crate) fn local_midnight(utc: i64) -> i64 {
    (utc + LOCAL_OFFSET).div_euclid(DAY) * DAY - LOCAL_OFFSET
}

/// Local (month, day) of the instant `utc`.
pub(crate) fn local_month(utc: i64) -> u32 {
    civil((utc + LOCAL_OFFSET).div_euclid(DAY)).1
}

/// Local calendar year of the instant `utc`.
pub(crate) fn local_year(utc: i64) -> i64 {
    civil((utc + LOCAL_OFFSET).div_euclid(DAY)).0
}

/// Seconds since 1970 of local midnight on `year-month-day`.
pub(crate) fn local_ymd(year: i64, month: u32, day: u32) -> i64 {
    days_from_civil(year, month, day) * DAY - LOCAL_OFFSET
}

/// Days since 1970-01-01 of a proleptic Gregorian date (inverse of [`civil`]).
pub(crate) fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(month);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(date(0), "1970-01-01");
        assert_eq!(date(1_388_534_400), "2014-01-01");
        assert_eq!(date(951_782_400), "2000-02-29");
        assert_eq!(date(-86_400), "1969-12-31");
        for days in [-800_000, -1, 0, 11_016, 19_000, 60_000] {
            let (y, m, d) = civil(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }

    #[test]
    fn local_times_carry_their_offset() {
        // 2014-01-01T03:00:00Z is still New Year's Eve in Boston.
        let t = 1_388_534_400 + 3 * 3600;
        assert_eq!(local_date_time(t), "2013-12-31T22:00:00-05:00");
        assert_eq!(local_date(t), "2013-12-31");
        assert_eq!(instant(t, 7), "2014-01-01T03:00:00.007Z");
        assert_eq!(local_midnight(t), 1_388_534_400 - DAY + 5 * 3600);
        assert_eq!(local_ymd(2014, 1, 1), 1_388_534_400 + 5 * 3600);
        assert_eq!((local_year(t), local_month(t)), (2013, 12));
    }
}
