//! Every R4 SearchParameter expression parses, and evaluates without error on every official
//! R4 example resource of the parameter's base types.

// Test helpers fail loudly on broken vendored data; that is what a test should do.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use fhirkeep_fhirpath::Expression;
use serde_json::Value;

fn testdata(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../testdata")
        .join(rel)
}

/// (id, expression, base types) of every search parameter that has an expression.
fn search_parameters() -> Vec<(String, String, Vec<String>)> {
    let text = std::fs::read_to_string(testdata("r4/search-parameters.json")).unwrap();
    let bundle: Value = serde_json::from_str(&text).unwrap();
    let mut out = Vec::new();
    for entry in bundle["entry"].as_array().unwrap() {
        let sp = &entry["resource"];
        let Some(expr) = sp["expression"].as_str() else {
            continue;
        };
        let bases = sp["base"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b.as_str().unwrap().to_string())
            .collect();
        out.push((
            sp["id"].as_str().unwrap().to_string(),
            expr.to_string(),
            bases,
        ));
    }
    out
}

/// Example resources from the official package, grouped by resource type.
fn examples_by_type() -> HashMap<String, Vec<Value>> {
    let file = std::fs::File::open(testdata("r4/hl7.fhir.r4.examples-4.0.1.tgz")).unwrap();
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(file));
    let mut by_type: HashMap<String, Vec<Value>> = HashMap::new();
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let name = entry.path().unwrap().to_string_lossy().into_owned();
        if !name.ends_with(".json") || name.ends_with("package.json") || name.contains("/.") {
            continue;
        }
        let mut text = String::new();
        entry.read_to_string(&mut text).unwrap();
        let value: Value = serde_json::from_str(&text).unwrap();
        if let Some(rt) = value.get("resourceType").and_then(Value::as_str) {
            by_type.entry(rt.to_string()).or_default().push(value);
        }
    }
    by_type
}

#[test]
fn every_search_parameter_expression_parses() {
    let params = search_parameters();
    assert!(
        params.len() > 1300,
        "expected the full R4 set, got {}",
        params.len()
    );
    let failures: Vec<String> = params
        .iter()
        .filter_map(|(id, expr, _)| Expression::parse(expr).err().map(|e| format!("{id}: {e}")))
        .collect();
    assert!(
        failures.is_empty(),
        "{} failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn every_search_parameter_evaluates_on_the_r4_examples() {
    let params = search_parameters();
    let examples = examples_by_type();
    let mut evaluations = 0usize;
    let mut non_empty = 0usize;
    let mut failures = Vec::new();
    let mut never_found = Vec::new();
    for (id, text, bases) in &params {
        let expr = Expression::parse(text).unwrap();
        let before = non_empty;
        for base in bases {
            let candidates: Vec<&Value> = if base == "Resource" || base == "DomainResource" {
                examples.values().flatten().collect()
            } else {
                examples
                    .get(base)
                    .map(|v| v.iter().collect())
                    .unwrap_or_default()
            };
            for resource in candidates {
                evaluations += 1;
                match expr.evaluate(resource) {
                    Ok(items) => non_empty += usize::from(!items.is_empty()),
                    Err(e) => failures.push(format!(
                        "{id} on {base}/{}: {e}",
                        resource["id"].as_str().unwrap_or("?")
                    )),
                }
            }
        }
        if non_empty == before {
            never_found.push(id.as_str());
        }
    }
    // Mostly types with few examples; listed to make navigation regressions visible.
    println!(
        "{} parameters found nothing in any example: {never_found:?}",
        never_found.len()
    );
    println!(
        "{evaluations} evaluations, {non_empty} non-empty, {} errors",
        failures.len()
    );
    assert!(evaluations > 10_000, "too few evaluations: {evaluations}");
    // Most parameters must find something somewhere, else navigation is broken.
    assert!(
        non_empty > evaluations / 10,
        "only {non_empty} of {evaluations} non-empty"
    );
    assert!(
        failures.is_empty(),
        "{} failed:\n{}",
        failures.len(),
        failures[..failures.len().min(50)].join("\n")
    );
}

#[test]
fn typed_results_on_known_examples() {
    let examples = examples_by_type();
    let find = |rt: &str, id: &str| examples[rt].iter().find(|r| r["id"] == id).unwrap().clone();
    let obs = find("Observation", "example");
    let out = Expression::parse("(Observation.value as Quantity)")
        .unwrap()
        .evaluate(&obs)
        .unwrap();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].fhir_type(), Some("Quantity"));
    let patient = find("Patient", "example");
    let out = Expression::parse("Patient.name")
        .unwrap()
        .evaluate(&patient)
        .unwrap();
    assert!(out.len() >= 2);
    assert!(
        out.iter()
            .all(|i| i.fhir_type() == Some("HumanName") && i.json().is_some())
    );
    let out = Expression::parse("Patient.birthDate")
        .unwrap()
        .evaluate(&patient)
        .unwrap();
    assert_eq!(out[0].fhir_type(), Some("date"));
    let out = Expression::parse("Patient.deceased.exists() and Patient.deceased != false")
        .unwrap()
        .evaluate(&patient)
        .unwrap();
    assert_eq!(out.len(), 1);
}

/// Composite parameters: (id, expression, bases, component expressions).
fn composite_parameters() -> Vec<(String, String, Vec<String>, Vec<String>)> {
    let text = std::fs::read_to_string(testdata("r4/search-parameters.json")).unwrap();
    let bundle: Value = serde_json::from_str(&text).unwrap();
    let mut out = Vec::new();
    for entry in bundle["entry"].as_array().unwrap() {
        let sp = &entry["resource"];
        let Some(components) = sp["component"].as_array() else {
            continue;
        };
        let bases = sp["base"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b.as_str().unwrap().to_string())
            .collect();
        let parts = components
            .iter()
            .map(|c| c["expression"].as_str().unwrap().to_string())
            .collect();
        out.push((
            sp["id"].as_str().unwrap().to_string(),
            sp["expression"].as_str().unwrap().to_string(),
            bases,
            parts,
        ));
    }
    out
}

#[test]
fn composite_components_evaluate_on_their_parent_items() {
    let examples = examples_by_type();
    let composites = composite_parameters();
    assert!(
        composites.len() > 30,
        "expected the R4 composites, got {}",
        composites.len()
    );
    let (mut evaluations, mut found) = (0usize, 0usize);
    for (id, expr, bases, parts) in &composites {
        let parent = Expression::parse(expr).unwrap();
        let parts: Vec<Expression> = parts
            .iter()
            .map(|p| Expression::parse(p).unwrap_or_else(|e| panic!("{id}: {p}: {e}")))
            .collect();
        for base in bases {
            for resource in examples.get(base).into_iter().flatten() {
                for item in parent.evaluate(resource).unwrap() {
                    for part in &parts {
                        evaluations += 1;
                        let out = part
                            .evaluate_on(resource, &item)
                            .unwrap_or_else(|e| panic!("{id} on {base}: {e}"));
                        found += usize::from(!out.is_empty());
                    }
                }
            }
        }
    }
    println!("{evaluations} component evaluations, {found} non-empty");
    assert!(
        evaluations > 500,
        "too few component evaluations: {evaluations}"
    );
    // Components are mostly required parts of their parent; most must find a value.
    assert!(
        found * 2 > evaluations,
        "only {found} of {evaluations} components found a value"
    );
}
