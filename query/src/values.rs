//! How FHIR values become comparable index terms: string normalization, date ranges at their
//! precision, order-preserving encodings of numbers and instants.
//!
//! Every index term is text in one tantivy field, so ordered values (instants, numbers) are
//! encoded as fixed-width hexadecimal whose byte order is the numeric order: a range over
//! terms is then a range over values.

use std::sync::OnceLock;

use chrono::{DateTime, Datelike, Duration, FixedOffset, NaiveDate, NaiveDateTime, TimeZone, Utc};
use tantivy::tokenizer::{AsciiFoldingFilter, LowerCaser, RawTokenizer, TextAnalyzer};

/// The smallest and largest instants an index range may hold, in microseconds since the epoch.
pub const MIN_MICROS: i64 = i64::MIN;
/// See [`MIN_MICROS`].
pub const MAX_MICROS: i64 = i64::MAX;

/// A string as FHIR string search compares it: lower case, accents removed.
pub fn normalize_string(text: &str) -> String {
    if text.is_ascii() {
        // ASCII has no accents to fold: one pass gives what the analyzer gives, without its
        // allocations (extraction normalizes every string and token text it indexes).
        let mut out = String::with_capacity(text.len());
        let mut space_pending = false;
        for byte in text.bytes() {
            // ASCII's Unicode white space: tab, line feed, vertical tab, form feed, carriage
            // return and space (what `char::is_whitespace` says of ASCII).
            if matches!(byte, b'\t'..=b'\r' | b' ') {
                space_pending = !out.is_empty();
            } else {
                if space_pending {
                    out.push(' ');
                    space_pending = false;
                }
                out.push(char::from(byte.to_ascii_lowercase()));
            }
        }
        return out;
    }
    normalize_with_analyzer(text)
}

/// [`normalize_string`] for any text: tantivy's lower-casing and ASCII folding.
fn normalize_with_analyzer(text: &str) -> String {
    static ANALYZER: OnceLock<TextAnalyzer> = OnceLock::new();
    let analyzer = ANALYZER.get_or_init(|| {
        TextAnalyzer::builder(RawTokenizer::default())
            .filter(LowerCaser)
            .filter(AsciiFoldingFilter)
            .build()
    });
    // TextAnalyzer::token_stream needs `&mut`; analyzers are cheap to clone.
    let mut analyzer = analyzer.clone();
    let mut stream = analyzer.token_stream(text);
    let mut out = String::new();
    while let Some(token) = stream.next() {
        out.push_str(&token.text);
    }
    // Whitespace runs compare as one space, as most FHIR servers do.
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// An `i64` as 16 hex digits whose lexical order is the numeric order.
pub fn ordered_i64(value: i64) -> String {
    hex16((value as u64) ^ (1 << 63))
}

/// `key` as 16 lower-case hex digits (several per indexed resource: `format!` showed in
/// profiles of indexing).
fn hex16(key: u64) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(16);
    for nibble in (0..16).rev() {
        out.push(char::from(DIGITS[((key >> (nibble * 4)) & 0xf) as usize]));
    }
    out
}

/// An `f64` as 16 hex digits whose lexical order is the numeric order (NaN is refused earlier).
pub fn ordered_f64(value: f64) -> String {
    let bits = value.to_bits();
    let key = if bits >> 63 == 1 {
        !bits
    } else {
        bits | (1 << 63)
    };
    hex16(key)
}

/// The precision a FHIR date, dateTime or instant was written with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum DatePrecision {
    /// `YYYY`
    Year,
    /// `YYYY-MM`
    Month,
    /// `YYYY-MM-DD`
    Day,
    /// `YYYY-MM-DDThh:mm`
    Minute,
    /// `YYYY-MM-DDThh:mm:ss`
    Second,
    /// Fractional seconds.
    Fraction,
}

/// A closed range of instants `[low, high]` in microseconds since the epoch (UTC).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InstantRange {
    /// The first microsecond in the range.
    pub low: i64,
    /// The last microsecond in the range.
    pub high: i64,
}

/// A parsed FHIR date/dateTime/instant: the range it denotes and its precision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FhirDate {
    /// The instants the value covers.
    pub range: InstantRange,
    /// How precisely the value was written.
    pub precision: DatePrecision,
}

/// Parses `YYYY`, `YYYY-MM`, `YYYY-MM-DD`, `YYYY-MM-DDThh:mm[:ss[.fff]][Z|±hh:mm]`.
///
/// A value without a time zone is read as UTC: the server has no other local time, and the
/// choice is the same for stored values and search arguments, so comparisons stay consistent.
pub fn parse_fhir_date(text: &str) -> Option<FhirDate> {
    let text = text.trim();
    let (date_part, time_part) = match text.split_once('T') {
        Some((d, t)) => (d, Some(t)),
        None => (text, None),
    };
    let mut pieces = date_part.split('-');
    let year: i32 = parse_digits(pieces.next()?, 4)?;
    let month: Option<u32> = match pieces.next() {
        Some(m) => Some(parse_digits(m, 2)?),
        None => None,
    };
    let day: Option<u32> = match pieces.next() {
        Some(d) => Some(parse_digits(d, 2)?),
        None => None,
    };
    if pieces.next().is_some() {
        return None;
    }
    let Some(time_part) = time_part else {
        let (start, end, precision) = match (month, day) {
            (None, None) => (
                NaiveDate::from_ymd_opt(year, 1, 1)?,
                NaiveDate::from_ymd_opt(year.checked_add(1)?, 1, 1)?,
                DatePrecision::Year,
            ),
            (Some(m), None) => {
                let start = NaiveDate::from_ymd_opt(year, m, 1)?;
                let end = if m == 12 {
                    NaiveDate::from_ymd_opt(year.checked_add(1)?, 1, 1)?
                } else {
                    NaiveDate::from_ymd_opt(year, m + 1, 1)?
                };
                (start, end, DatePrecision::Month)
            }
            (Some(m), Some(d)) => {
                let start = NaiveDate::from_ymd_opt(year, m, d)?;
                (start, start.succ_opt()?, DatePrecision::Day)
            }
            (None, Some(_)) => return None,
        };
        let low = start.and_hms_opt(0, 0, 0)?.and_utc().timestamp_micros();
        let high = end.and_hms_opt(0, 0, 0)?.and_utc().timestamp_micros() - 1;
        return Some(FhirDate {
            range: InstantRange { low, high },
            precision,
        });
    };
    let date = NaiveDate::from_ymd_opt(year, month?, day?)?;
    // Split off the zone: `Z`, `+hh:mm` or `-hh:mm` after the clock.
    let (clock, offset) = split_zone(time_part)?;
    let mut fields = clock.split(':');
    let hour: u32 = parse_digits(fields.next()?, 2)?;
    let minute: u32 = parse_digits(fields.next()?, 2)?;
    let (second, micros, precision) = match fields.next() {
        None => (0, 0, DatePrecision::Minute),
        Some(sec) => match sec.split_once('.') {
            None => (parse_digits(sec, 2)?, 0, DatePrecision::Second),
            Some((whole, frac)) => {
                if frac.is_empty() || !frac.bytes().all(|b| b.is_ascii_digit()) {
                    return None;
                }
                let digits: String = frac.chars().chain("000000".chars()).take(6).collect();
                (
                    parse_digits(whole, 2)?,
                    digits.parse::<u32>().ok()?,
                    DatePrecision::Fraction,
                )
            }
        },
    };
    if fields.next().is_some() {
        return None;
    }
    let naive: NaiveDateTime = date.and_hms_micro_opt(hour, minute, second.min(59), micros)?;
    let start: DateTime<FixedOffset> = offset.from_local_datetime(&naive).single()?;
    let low = start.with_timezone(&Utc).timestamp_micros();
    let width = match precision {
        DatePrecision::Minute => Duration::minutes(1),
        DatePrecision::Second => Duration::seconds(1),
        _ => Duration::microseconds(1),
    };
    let high = low.checked_add(width.num_microseconds()?)? - 1;
    Some(FhirDate {
        range: InstantRange { low, high },
        precision,
    })
}

fn split_zone(time: &str) -> Option<(&str, FixedOffset)> {
    if let Some(clock) = time.strip_suffix('Z') {
        return Some((clock, FixedOffset::east_opt(0)?));
    }
    if let Some(pos) = time.rfind(['+', '-']) {
        let (clock, zone) = time.split_at(pos);
        let sign = if zone.starts_with('-') { -1 } else { 1 };
        let (h, m) = zone[1..].split_once(':')?;
        let hours: i32 = parse_digits(h, 2)?;
        let minutes: i32 = parse_digits(m, 2)?;
        if hours > 14 || minutes > 59 {
            return None;
        }
        return Some((
            clock,
            FixedOffset::east_opt(sign * (hours * 3600 + minutes * 60))?,
        ));
    }
    Some((time, FixedOffset::east_opt(0)?))
}

fn parse_digits<T: std::str::FromStr>(text: &str, width: usize) -> Option<T> {
    if text.len() != width || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// Microseconds in a day.
pub const DAY_MICROS: i64 = 86_400_000_000;

/// The calendar buckets (UTC) that wholly contain `range`: year, month and day, as index
/// terms, so that `eq` search at one of those precisions is a single term lookup. Minutes
/// and seconds are in [`sub_day_buckets`].
pub fn date_buckets(range: InstantRange) -> Vec<String> {
    DateBuckets::of(range).iter().map(String::from).collect()
}

/// The texts of [`date_buckets`], kept in place: extraction writes them for every date value
/// it indexes, and `format!` with a `String` per bucket was a visible share of that.
#[derive(Debug, Clone, Copy)]
pub struct DateBuckets {
    texts: [[u8; BUCKET_TEXT_MAX]; 3],
    lens: [usize; 3],
    count: usize,
}

/// The longest bucket text: `D-262143-12-31` (chrono's earliest year).
const BUCKET_TEXT_MAX: usize = 16;

impl DateBuckets {
    /// The buckets of `range`.
    pub fn of(range: InstantRange) -> DateBuckets {
        let mut buckets = DateBuckets {
            texts: [[0; BUCKET_TEXT_MAX]; 3],
            lens: [0; 3],
            count: 0,
        };
        let (Some(low), Some(high)) = (
            DateTime::<Utc>::from_timestamp_micros(range.low),
            DateTime::<Utc>::from_timestamp_micros(range.high),
        ) else {
            return buckets;
        };
        if low.year() != high.year() {
            return buckets;
        }
        let mut year = [0u8; 8];
        let year = write_year(low.year(), &mut year);
        buckets.push(&[b"Y", year]);
        if low.month() != high.month() {
            return buckets;
        }
        let month = two_digits(low.month());
        buckets.push(&[b"M", year, b"-", &month]);
        if low.day() != high.day() {
            return buckets;
        }
        buckets.push(&[b"D", year, b"-", &month, b"-", &two_digits(low.day())]);
        buckets
    }

    fn push(&mut self, parts: &[&[u8]]) {
        let text = &mut self.texts[self.count];
        let mut len = 0;
        for part in parts {
            text[len..len + part.len()].copy_from_slice(part);
            len += part.len();
        }
        self.lens[self.count] = len;
        self.count += 1;
    }

    /// How many buckets there are: 0 (the range spans years), 1 (year), 2 (month) or 3 (day).
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether the range spans years (or is open-ended): no bucket holds it.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The buckets, year first.
    pub fn iter(&self) -> impl Iterator<Item = &str> {
        (0..self.count).map(|i| {
            std::str::from_utf8(&self.texts[i][..self.lens[i]])
                .expect("bucket texts are ASCII digits, letters and dashes")
        })
    }

    /// The finest bucket (the day's, when there are three).
    pub fn last(&self) -> Option<&str> {
        self.iter().last()
    }
}

/// `year` as `format!("{year:04}")` writes it, into `buffer`.
fn write_year(year: i32, buffer: &mut [u8; 8]) -> &[u8] {
    let mut digits = [0u8; 6];
    let mut start = digits.len();
    let mut rest = year.unsigned_abs();
    // chrono's years stay within ±262,143: six digits at most.
    while start > 0 && (rest > 0 || start == digits.len()) {
        start -= 1;
        digits[start] = b'0' + (rest % 10) as u8;
        rest /= 10;
    }
    let digits = &digits[start..];
    let width = if year < 0 { 3 } else { 4 };
    let mut len = 0;
    if year < 0 {
        buffer[0] = b'-';
        len = 1;
    }
    for _ in digits.len()..width {
        buffer[len] = b'0';
        len += 1;
    }
    buffer[len..len + digits.len()].copy_from_slice(digits);
    len += digits.len();
    &buffer[..len]
}

/// `value` (a month or a day) as two digits.
fn two_digits(value: u32) -> [u8; 2] {
    [b'0' + (value / 10 % 10) as u8, b'0' + (value % 10) as u8]
}

/// The minute and second buckets (`m…`, `S…`) that wholly contain `range`, if any.
///
/// The index files them only for a value that shares its day with another value of the same
/// parameter (see `extract`): alone on its day, a value is found by its bounds, and a
/// bucket per minute and per second were the most distinct terms of a typical resource.
pub fn sub_day_buckets(range: InstantRange) -> Vec<String> {
    let mut out = Vec::with_capacity(2);
    let (low_minute, high_minute) = (
        range.low.div_euclid(60_000_000),
        range.high.div_euclid(60_000_000),
    );
    if low_minute != high_minute {
        return out;
    }
    out.push(format!("m{low_minute}"));
    let (low_second, high_second) = (
        range.low.div_euclid(1_000_000),
        range.high.div_euclid(1_000_000),
    );
    if low_second == high_second {
        out.push(format!("S{low_second}"));
    }
    out
}

/// The bucket term that an `eq` search for `date` looks up, if its precision has buckets.
pub fn search_bucket(date: &FhirDate) -> Option<String> {
    let mut buckets = date_buckets(date.range);
    buckets.extend(sub_day_buckets(date.range));
    let wanted = match date.precision {
        DatePrecision::Year => 'Y',
        DatePrecision::Month => 'M',
        DatePrecision::Day => 'D',
        DatePrecision::Minute => 'm',
        DatePrecision::Second => 'S',
        DatePrecision::Fraction => return None,
    };
    buckets.into_iter().find(|b| b.starts_with(wanted))
}

/// The decimal places of a number as written (`100` → 0, `100.00` → 2).
///
/// In exponent form the spec reads one more significant digit than written (`1e2` is the
/// range 95 to 105), hence the extra place.
pub fn decimal_places(text: &str) -> i32 {
    let (mantissa, exponent) = match text.split_once(['e', 'E']) {
        Some((m, e)) => (m, e.parse::<i32>().unwrap_or(0).clamp(-300, 300) - 1),
        None => (text, 0),
    };
    let places = mantissa
        .split_once('.')
        .map_or(0, |(_, f)| i32::try_from(f.len()).unwrap_or(300).min(300));
    places - exponent
}

/// Half the width of the implied precision range of a number as written.
pub fn implied_half_width(text: &str) -> f64 {
    0.5 * 10f64.powi(-decimal_places(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_fold_case_accents_and_spaces() {
        assert_eq!(normalize_string("  Élodie  MÜLLER "), "elodie muller");
        assert_eq!(normalize_string("Chalmers"), "chalmers");
    }

    #[test]
    fn ordered_encodings_keep_numeric_order() {
        let ints = [i64::MIN, -5, -1, 0, 1, 7, i64::MAX];
        for pair in ints.windows(2) {
            assert!(ordered_i64(pair[0]) < ordered_i64(pair[1]), "{pair:?}");
        }
        let floats = [-1e300, -2.5, -0.0001, 0.0, 0.0001, 2.5, 1e300];
        for pair in floats.windows(2) {
            assert!(ordered_f64(pair[0]) < ordered_f64(pair[1]), "{pair:?}");
        }
        // The encoding is part of the index format: indexes written before stay readable.
        assert_eq!(ordered_i64(-1), "7fffffffffffffff");
        assert_eq!(ordered_i64(0x1234_5678_9abc), "8000123456789abc");
        assert_eq!(ordered_f64(2.5), "c004000000000000");
        assert_eq!(ordered_f64(-2.5), "3ffbffffffffffff");
    }

    #[test]
    fn dates_are_ranges_at_their_precision() {
        let year = parse_fhir_date("2013").unwrap();
        assert_eq!(year.precision, DatePrecision::Year);
        let start = parse_fhir_date("2013-01-01T00:00:00Z").unwrap().range.low;
        let next = parse_fhir_date("2014-01-01T00:00:00Z").unwrap().range.low;
        assert_eq!(
            year.range,
            InstantRange {
                low: start,
                high: next - 1
            }
        );

        let feb = parse_fhir_date("2012-02").unwrap();
        assert_eq!(
            feb.range.high + 1,
            parse_fhir_date("2012-03-01").unwrap().range.low
        );
        let dec = parse_fhir_date("2012-12").unwrap();
        assert_eq!(
            dec.range.high + 1,
            parse_fhir_date("2013").unwrap().range.low
        );

        let zoned = parse_fhir_date("2013-04-02T10:30:00+02:00").unwrap();
        assert_eq!(
            zoned.range.low,
            parse_fhir_date("2013-04-02T08:30:00Z").unwrap().range.low
        );
        assert_eq!(zoned.range.high - zoned.range.low, 999_999);
        let minute = parse_fhir_date("2013-04-02T08:30Z").unwrap();
        assert_eq!(minute.precision, DatePrecision::Minute);
        let fraction = parse_fhir_date("2013-04-02T08:30:00.25Z").unwrap();
        assert_eq!(fraction.range.low - zoned.range.low, 250_000);
    }

    #[test]
    fn malformed_dates_are_refused() {
        for bad in [
            "",
            "13",
            "2013-13",
            "2013-02-30",
            "2013-1-01",
            "2013-01-01T",
            "2013-01-01T25:00Z",
            "2013-01-01T10:00+15:00",
            "2013-01-01T10:00:00.Z",
            "2013-01-01-01",
            "abcd",
        ] {
            assert!(parse_fhir_date(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn buckets_name_every_calendar_unit_containing_the_range() {
        let day = parse_fhir_date("2013-04-02").unwrap();
        assert_eq!(day_terms(&day), ["Y2013", "M2013-04", "D2013-04-02"]);
        let second = parse_fhir_date("2013-04-02T10:30:05Z").unwrap();
        assert_eq!(date_buckets(second.range).len(), 3);
        assert_eq!(sub_day_buckets(second.range), ["m22748310", "S1364898605"]);
        let spanning = InstantRange {
            low: parse_fhir_date("2013-12-31").unwrap().range.low,
            high: parse_fhir_date("2014-01-01").unwrap().range.high,
        };
        assert!(date_buckets(spanning).is_empty());
        assert_eq!(
            search_bucket(&parse_fhir_date("2013-04").unwrap()).unwrap(),
            "M2013-04"
        );
    }

    fn day_terms(date: &FhirDate) -> Vec<String> {
        date_buckets(date.range)
    }

    /// What the buckets were before they were written by hand.
    fn formatted_buckets(range: InstantRange) -> Vec<String> {
        let mut out = Vec::new();
        let (Some(low), Some(high)) = (
            DateTime::<Utc>::from_timestamp_micros(range.low),
            DateTime::<Utc>::from_timestamp_micros(range.high),
        ) else {
            return out;
        };
        if low.year() != high.year() {
            return out;
        }
        out.push(format!("Y{:04}", low.year()));
        if low.month() != high.month() {
            return out;
        }
        out.push(format!("M{:04}-{:02}", low.year(), low.month()));
        if low.day() != high.day() {
            return out;
        }
        out.push(format!(
            "D{:04}-{:02}-{:02}",
            low.year(),
            low.month(),
            low.day()
        ));
        out
    }

    #[test]
    fn bucket_texts_are_what_formatting_writes() {
        let earliest = DateTime::<Utc>::MIN_UTC.timestamp_micros();
        let latest = DateTime::<Utc>::MAX_UTC.timestamp_micros();
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            state
        };
        let mut ranges = vec![
            InstantRange {
                low: earliest,
                high: earliest,
            },
            InstantRange {
                low: latest,
                high: latest,
            },
            InstantRange {
                low: MIN_MICROS,
                high: MAX_MICROS,
            },
            InstantRange { low: 0, high: 0 },
            InstantRange { low: -1, high: -1 },
        ];
        for year in [
            -10_000, -999, -99, -9, -1, 0, 1, 9, 99, 999, 1969, 2024, 9999, 10_000,
        ] {
            let start = NaiveDate::from_ymd_opt(year, 12, 31)
                .unwrap()
                .and_hms_opt(23, 59, 59)
                .unwrap()
                .and_utc()
                .timestamp_micros();
            ranges.push(InstantRange {
                low: start,
                high: start,
            });
            ranges.push(InstantRange {
                low: start,
                high: start + 1,
            });
            ranges.push(InstantRange {
                low: start - DAY_MICROS * 40,
                high: start,
            });
        }
        for _ in 0..20_000 {
            // The span exceeds i64; the wrapping sum still lands between the two.
            let low = earliest.wrapping_add((next() % latest.abs_diff(earliest)) as i64);
            let span = [0, 1_000_000, DAY_MICROS, 40 * DAY_MICROS, 400 * DAY_MICROS]
                [(next() % 5) as usize];
            let high = low.saturating_add((next() % (span as u64 + 1)) as i64);
            ranges.push(InstantRange { low, high });
        }
        for range in ranges {
            let buckets = DateBuckets::of(range);
            assert_eq!(date_buckets(range), formatted_buckets(range), "{range:?}");
            assert_eq!(buckets.len(), formatted_buckets(range).len());
            assert_eq!(buckets.is_empty(), formatted_buckets(range).is_empty());
            assert_eq!(
                buckets.last().map(String::from),
                formatted_buckets(range).pop()
            );
        }
    }

    #[test]
    fn ascii_strings_normalize_as_the_analyzer_does() {
        let mut samples: Vec<String> = vec![
            String::new(),
            " ".into(),
            "  Chalmers  ".into(),
            "Peter\tJames\n\r\x0bCHALMERS".into(),
            "a\x0cb\x1fc\x1ed".into(),
            "MRN-P3 / 12,34".into(),
        ];
        // Every ASCII character, alone, between letters and beside whitespace.
        for byte in 0u8..=127 {
            let c = char::from(byte);
            samples.push(c.to_string());
            samples.push(format!("Ab{c}Cd"));
            samples.push(format!(" {c} x{c}{c}Y "));
        }
        for sample in samples {
            assert!(sample.is_ascii());
            assert_eq!(
                normalize_string(&sample),
                normalize_with_analyzer(&sample),
                "{sample:?}"
            );
        }
        // Beyond ASCII the analyzer folds accents.
        assert_eq!(normalize_string("  Zoë  Ørsted "), "zoe orsted");
    }

    #[test]
    fn implied_precision_follows_the_written_digits() {
        assert_eq!(implied_half_width("100"), 0.5);
        assert!((implied_half_width("100.00") - 0.005).abs() < 1e-12);
        assert_eq!(implied_half_width("1e2"), 5.0);
    }
}
