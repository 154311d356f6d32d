//! Fuzz target: arbitrary text as a FHIR date, dateTime or instant (as stored values and as
//! search arguments are parsed). Only `None` for what is not a date, never a panic; a parsed
//! value is a non-empty range, and its calendar buckets and search bucket can be computed.
#![no_main]

use fhirkeep_query::values::{date_buckets, parse_fhir_date, search_bucket};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Some(date) = parse_fhir_date(text) else {
        return;
    };
    assert!(
        date.range.low <= date.range.high,
        "a parsed date is an empty range"
    );
    let _ = date_buckets(date.range);
    let _ = search_bucket(&date);
});
