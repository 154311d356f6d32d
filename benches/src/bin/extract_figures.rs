//! Prints what index-term extraction costs and produces for the benchmark cohort: time per
//! resource on one thread (FHIRPath evaluation and term building, no JSON parsing, no
//! tantivy), and terms, distinct terms and distinct term bytes per resource (the distinct ones
//! are what tantivy's term dictionary compiles at every segment), with the words of the text
//! fields and the values of the reference and sort columns (tantivy's other per-document
//! work).
//!
//! ```text
//! cargo run --release -p fhirkeep-benches --bin extract_figures -- [--patients N] [--rounds R]
//! ```

use std::collections::HashSet;
use std::time::Instant;

use fhirkeep_benches::DEFAULT_SEED;
use fhirkeep_query::extract::extract;
use fhirkeep_query::registry::Registry;
use fhirkeep_synth::Cohort;
use serde_json::Value;

/// The same allocator as the `fhirkeep` binary, so the figures are the product's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut patients = 100u64;
    let mut rounds = 5usize;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--patients" => patients = value()?.parse()?,
            "--rounds" => rounds = value()?.parse::<usize>()?.max(1),
            _ => {
                return Err(format!(
                    "usage: extract_figures [--patients N] [--rounds R]; got {arg}"
                )
                .into());
            }
        }
    }
    let registry = Registry::r4()?;
    let cohort = Cohort::new(DEFAULT_SEED);
    let resources: Vec<(String, Value)> = cohort
        .patients(0..patients)
        .flat_map(fhirkeep_synth::PatientRecord::into_resources)
        .map(|r| Ok((r.resource_type.to_string(), r.to_value()?)))
        .collect::<serde_json::Result<_>>()?;
    let count = resources.len();
    if count == 0 {
        return Err("no resources".into());
    }

    let mut terms = 0usize;
    let mut distinct = HashSet::new();
    let mut distinct_words: HashSet<String> = HashSet::new();
    let (mut narrative_words, mut content_words, mut references, mut sort_keys) = (0, 0, 0, 0);
    for (resource_type, resource) in &resources {
        let (entries, _) = extract(&registry, resource_type, resource);
        terms += entries.terms.len();
        narrative_words += words(&entries.narrative);
        content_words += words(&entries.content);
        distinct_words.extend(
            entries
                .content
                .split(|c: char| !c.is_alphanumeric())
                .filter(|word| !word.is_empty())
                .map(str::to_lowercase),
        );
        references += entries.references.len();
        sort_keys += entries.sort_keys.len();
        distinct.extend(entries.terms);
    }
    let distinct_bytes: usize = distinct.iter().map(String::len).sum();

    let mut per_resource = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let started = Instant::now();
        let mut kept = 0usize;
        for (resource_type, resource) in &resources {
            kept += extract(&registry, resource_type, resource).0.terms.len();
        }
        per_resource.push(started.elapsed().as_secs_f64() * 1e6 / count as f64);
        // Keeps the work from being optimized away.
        if kept != terms {
            return Err("extraction is not deterministic".into());
        }
    }
    per_resource.sort_by(f64::total_cmp);

    println!("| extraction, {count} resources ({patients} patients), one thread | value |");
    println!("|---|---:|");
    println!(
        "| time per resource, median of {rounds} rounds | {:.2} µs |",
        per_resource[rounds / 2]
    );
    println!(
        "| terms per resource | {:.2} |",
        terms as f64 / count as f64
    );
    println!(
        "| distinct terms per resource | {:.3} |",
        distinct.len() as f64 / count as f64
    );
    println!("| distinct term bytes | {distinct_bytes} |");
    let per = |n: usize| n as f64 / count as f64;
    println!(
        "| `_text` words per resource | {:.2} |",
        per(narrative_words)
    );
    println!(
        "| `_content` words per resource | {:.2} |",
        per(content_words)
    );
    println!(
        "| distinct `_content` words per resource | {:.3} |",
        per(distinct_words.len())
    );
    println!(
        "| distinct `_content` word bytes | {} |",
        distinct_words.iter().map(String::len).sum::<usize>()
    );
    println!(
        "| reference column values per resource | {:.2} |",
        per(references)
    );
    println!(
        "| sort column values per resource | {:.2} |",
        per(sort_keys)
    );
    Ok(())
}

/// Words as the index's text tokenizer splits them (runs of letters and digits).
fn words(text: &str) -> usize {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|word| !word.is_empty())
        .count()
}
