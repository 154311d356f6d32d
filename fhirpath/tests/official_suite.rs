//! Runs the official FHIRPath R4 test suite (testdata/fhirpath/tests-fhir-r4.xml) against the
//! JSON form of its input resources from the R4 examples package.
//!
//! Tests listed in tests/unsupported.txt are expected to fail; the run fails if any other test
//! fails, and also if a listed test passes (so the list stays honest).

// Test helpers fail loudly on broken vendored data; that is what a test should do.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};

use fhirkeep_fhirpath::{Expression, Item};
use serde_json::Value;

fn path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

#[derive(Debug, Default)]
struct Case {
    name: String,
    input: Option<String>,
    predicate: bool,
    unordered: bool,
    expression: String,
    invalid: bool,
    outputs: Vec<(String, String)>,
}

fn unescape(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&amp;", "&")
}

/// Attributes of the start tag text `<tag a="x" b='y'>` (without the brackets).
fn attributes(tag: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut rest = tag.split_once(char::is_whitespace).map_or("", |(_, r)| r);
    while let Some(eq) = rest.find('=') {
        let key = rest[..eq].trim().to_string();
        let after = rest[eq + 1..].trim_start();
        let quote = after.chars().next().unwrap();
        let end = after[1..].find(quote).unwrap();
        out.insert(key, unescape(&after[1..1 + end]));
        rest = &after[end + 2..];
    }
    out
}

/// Offset of the next `<test ...>` start tag (not `<tests>`).
fn find_test_start(s: &str) -> Option<usize> {
    let mut from = 0;
    while let Some(i) = s[from..].find("<test") {
        let at = from + i;
        if s[at + 5..].starts_with(|c: char| c.is_whitespace() || c == '>') {
            return Some(at);
        }
        from = at + 5;
    }
    None
}

/// A deliberately small parser for the suite's regular structure.
fn parse_suite(xml: &str) -> Vec<Case> {
    let mut text = String::new();
    let mut rest = xml;
    while let Some(start) = rest.find("<!--") {
        text.push_str(&rest[..start]);
        let end = rest[start..].find("-->").unwrap();
        rest = &rest[start + end + 3..];
    }
    text.push_str(rest);
    let mut cases = Vec::new();
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut rest = text.as_str();
    while let Some(start) = find_test_start(rest) {
        let body_start = start + rest[start..].find('>').unwrap();
        let attrs = attributes(&rest[start + 1..body_start]);
        let end = body_start + rest[body_start..].find("</test>").unwrap();
        let body = &rest[body_start + 1..end];
        rest = &rest[end + 7..];
        let mut name = attrs.get("name").cloned().unwrap_or_default();
        let n = seen.entry(name.clone()).or_default();
        *n += 1;
        if *n > 1 {
            name = format!("{name}#{n}");
        }
        let mut case = Case {
            name,
            input: attrs.get("inputfile").cloned(),
            predicate: attrs.get("predicate").is_some_and(|p| p == "true"),
            unordered: attrs.get("ordered").is_some_and(|p| p == "false"),
            ..Case::default()
        };
        let mut b = body;
        while let Some(open) = b.find('<') {
            let close = open + b[open..].find('>').unwrap();
            let tag = &b[open + 1..close];
            let self_closing = tag.ends_with('/');
            let tag_name = tag
                .split_whitespace()
                .next()
                .unwrap_or("")
                .trim_end_matches('/');
            let attrs = attributes(tag.trim_end_matches('/'));
            let (content, next) = if self_closing {
                (String::new(), close + 1)
            } else {
                let end_tag = format!("</{tag_name}>");
                let e = close + b[close..].find(&end_tag).unwrap();
                (unescape(&b[close + 1..e]), e + end_tag.len())
            };
            match tag_name {
                "expression" => {
                    case.expression = content;
                    case.invalid = attrs.contains_key("invalid");
                }
                "output" => case
                    .outputs
                    .push((attrs.get("type").cloned().unwrap_or_default(), content)),
                _ => {}
            }
            b = &b[next..];
        }
        cases.push(case);
    }
    cases
}

/// The example-package file holding each suite input, by resource type and id.
fn package_file(input: &str) -> Option<&'static str> {
    Some(match input {
        "patient-example.xml" => "package/Patient-example.json",
        "observation-example.xml" => "package/Observation-example.json",
        "questionnaire-example.xml" => "package/Questionnaire-3141.json",
        "valueset-example-expansion.xml" => "package/ValueSet-example-expansion.json",
        "codesystem-example.xml" => "package/CodeSystem-example.json",
        "appointment-examplereq.json" => "package/Appointment-examplereq.json",
        "explanationofbenefit-example.json" => "package/ExplanationOfBenefit-EB3500.json",
        _ => return None,
    })
}

fn load_inputs() -> HashMap<String, Value> {
    let wanted: Vec<&str> = [
        "patient-example.xml",
        "observation-example.xml",
        "questionnaire-example.xml",
        "valueset-example-expansion.xml",
        "codesystem-example.xml",
        "appointment-examplereq.json",
        "explanationofbenefit-example.json",
    ]
    .iter()
    .filter_map(|i| package_file(i))
    .collect();
    let file = std::fs::File::open(path("../testdata/r4/hl7.fhir.r4.examples-4.0.1.tgz")).unwrap();
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(file));
    let mut out = HashMap::new();
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let name = entry.path().unwrap().to_string_lossy().into_owned();
        if wanted.contains(&name.as_str()) {
            let mut text = String::new();
            entry.read_to_string(&mut text).unwrap();
            out.insert(name, serde_json::from_str(&text).unwrap());
        }
    }
    out
}

/// The item as (kind, text) for comparison with an expected output.
fn render(item: &Item<'_>) -> (&'static str, String) {
    match item {
        Item::Boolean(b) => ("boolean", b.to_string()),
        Item::Integer(i) => ("integer", i.to_string()),
        Item::Decimal(d) => ("decimal", d.to_string()),
        Item::String(s) => ("string", s.clone()),
        Item::Date(t) | Item::DateTime(t) | Item::Time(t) => ("temporal", t.to_string()),
        Item::Quantity(q) => ("Quantity", format!("{} '{}'", q.value, q.unit)),
        Item::Node(_) => match item.json() {
            Some(Value::Bool(b)) => ("boolean", b.to_string()),
            Some(Value::Number(n)) => {
                if matches!(item.fhir_type(), Some("decimal")) || n.as_i64().is_none() {
                    ("decimal", n.to_string())
                } else {
                    ("integer", n.to_string())
                }
            }
            Some(Value::String(s)) => match item.fhir_type() {
                Some("date" | "dateTime" | "instant" | "time") => ("temporal", s.clone()),
                _ => ("string", s.clone()),
            },
            _ => ("complex", item.to_string()),
        },
    }
}

fn matches_output(item: &Item<'_>, (ty, expected): &(String, String)) -> bool {
    let (kind, text) = render(item);
    match ty.as_str() {
        "boolean" | "integer" => kind == ty && text == *expected,
        "decimal" => {
            matches!(kind, "decimal" | "integer")
                && text.parse::<f64>().ok() == expected.parse::<f64>().ok()
        }
        "date" | "dateTime" | "time" => {
            let e = expected.trim_start_matches('@').trim_start_matches('T');
            kind == "temporal" && text == e
        }
        "Quantity" => {
            kind == "Quantity" && {
                let (v, u) = expected.split_once(' ').unwrap_or((expected, ""));
                let (tv, tu) = text.split_once(' ').unwrap_or((&text, ""));
                v.parse::<f64>().ok() == tv.parse::<f64>().ok() && u == tu
            }
        }
        // Untyped outputs (boundary and precision tests) compare as written.
        "" => text == expected.trim_start_matches('@').trim_start_matches('T'),
        _ => kind == "string" && text == *expected,
    }
}

/// Runs one case: `Ok(())` if it behaves as the suite expects, else why not.
fn run(case: &Case, inputs: &HashMap<String, Value>, empty: &Value) -> Result<(), String> {
    let resource = match &case.input {
        Some(input) => {
            let file = package_file(input).ok_or("input not in package")?;
            inputs.get(file).ok_or("input missing from package")?
        }
        None => empty,
    };
    let result = Expression::parse(&case.expression).and_then(|e| e.evaluate(resource));
    if case.invalid {
        return match result {
            Err(_) => Ok(()),
            Ok(items) => Err(format!("expected an error, got {} items", items.len())),
        };
    }
    let mut items = result.map_err(|e| e.to_string())?;
    if case.predicate {
        items = vec![Item::Boolean(!items.is_empty())];
    }
    if items.len() != case.outputs.len() {
        let got: Vec<String> = items.iter().map(|i| render(i).1).collect();
        return Err(format!(
            "expected {} items, got {got:?}",
            case.outputs.len()
        ));
    }
    if case.unordered {
        let mut left: Vec<&Item<'_>> = items.iter().collect();
        for out in &case.outputs {
            let pos = left.iter().position(|i| matches_output(i, out));
            match pos {
                Some(p) => {
                    left.remove(p);
                }
                None => return Err(format!("missing {out:?}")),
            }
        }
        return Ok(());
    }
    for (item, out) in items.iter().zip(&case.outputs) {
        if !matches_output(item, out) {
            return Err(format!("expected {out:?}, got {:?}", render(item)));
        }
    }
    Ok(())
}

#[test]
fn official_fhirpath_suite() {
    let xml = std::fs::read_to_string(path("../testdata/fhirpath/tests-fhir-r4.xml")).unwrap();
    let cases = parse_suite(&xml);
    assert!(cases.len() > 800, "parsed only {} cases", cases.len());
    let unsupported_text = std::fs::read_to_string(path("tests/unsupported.txt")).unwrap();
    let unsupported: BTreeMap<&str, &str> = unsupported_text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            l.split_once(char::is_whitespace)
                .map_or((l, ""), |(n, r)| (n, r.trim()))
        })
        .collect();
    for (name, reason) in &unsupported {
        assert!(!reason.is_empty(), "unsupported.txt: {name} needs a reason");
        assert!(
            cases.iter().any(|c| c.name == *name),
            "unsupported.txt: no test {name}"
        );
    }
    let inputs = load_inputs();
    let empty = Value::Object(Default::default());
    let (mut passed, mut expected_failures, mut missing_input) = (0, 0, 0);
    let mut problems = Vec::new();
    for case in &cases {
        let outcome = run(case, &inputs, &empty);
        match (outcome, unsupported.contains_key(case.name.as_str())) {
            (Ok(()), false) => passed += 1,
            (Ok(()), true) => problems.push(format!(
                "{}: passes but is listed as unsupported",
                case.name
            )),
            (Err(_), true) => {
                expected_failures += 1;
                if case
                    .input
                    .as_deref()
                    .is_some_and(|i| package_file(i).is_none())
                {
                    missing_input += 1;
                }
            }
            (Err(why), false) => {
                problems.push(format!("{}: `{}`: {why}", case.name, case.expression))
            }
        }
    }
    println!(
        "FHIRPath suite: {} tests, {passed} passed, {expected_failures} skipped as listed in \
         unsupported.txt ({missing_input} of them because the input is not in the R4 examples \
         package), {} problems",
        cases.len(),
        problems.len()
    );
    assert!(
        problems.is_empty(),
        "{} problems:\n{}",
        problems.len(),
        problems.join("\n")
    );
}

/// Every prefix of every suite expression parses or fails cleanly, and evaluates without
/// panicking on the Patient example.
#[test]
fn truncated_expressions_never_panic() {
    let xml = std::fs::read_to_string(path("../testdata/fhirpath/tests-fhir-r4.xml")).unwrap();
    let cases = parse_suite(&xml);
    let inputs = load_inputs();
    let patient = &inputs["package/Patient-example.json"];
    let mut parsed = 0;
    for case in &cases {
        let text = &case.expression;
        for (end, _) in text.char_indices().chain([(text.len(), ' ')]) {
            if let Ok(expr) = Expression::parse(&text[..end]) {
                parsed += 1;
                let _ = expr.evaluate(patient);
            }
        }
    }
    assert!(parsed > 1000, "only {parsed} prefixes parsed");
}

#[test]
fn expressions_are_shareable_across_threads() {
    fn assert_send_sync<T: Send + Sync + Clone + std::fmt::Debug>() {}
    assert_send_sync::<Expression>();
}
