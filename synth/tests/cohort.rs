//! The cohort generator from the outside: determinism, slices, referential integrity, the
//! resource mix, plausible values and dates, and a round trip through a real encrypted store.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use fhirkeep_engine::crypto::{KeySource, create_key_file};
use fhirkeep_engine::store::{AccessContext, Store, Upsert};
use fhirkeep_synth::{Cohort, GeneratedResource, NdjsonExport, RESOURCE_TYPES};
use serde_json::Value;

fn resources(cohort: &Cohort, patients: std::ops::Range<u64>) -> Vec<GeneratedResource> {
    cohort
        .patients(patients)
        .flat_map(|r| r.into_resources())
        .collect()
}

fn read_dir_files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let path = e.unwrap().path();
            (
                path.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&path).unwrap(),
            )
        })
        .collect()
}

/// Every `reference` string anywhere in `value`, with the name of the element holding it.
fn references<'a>(value: &'a Value, field: &str, out: &mut Vec<(String, &'a str)>) {
    match value {
        Value::Object(map) => {
            for (key, child) in map {
                if key == "reference"
                    && let Some(text) = child.as_str()
                {
                    out.push((field.to_owned(), text));
                } else {
                    references(child, key, out);
                }
            }
        }
        Value::Array(items) => {
            for item in items {
                references(item, field, out);
            }
        }
        _ => {}
    }
}

#[test]
fn same_seed_gives_identical_bytes_on_any_thread_count() {
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let one = NdjsonExport::new(Cohort::new(7), 0..70).threads(1);
    let three = NdjsonExport::new(Cohort::new(7), 0..70).threads(3);
    let other_seed = NdjsonExport::new(Cohort::new(8), 0..70).threads(2);
    let a = one.write(dirs[0].path(), |_, _| {}).unwrap();
    let b = three.write(dirs[1].path(), |_, _| {}).unwrap();
    let c = other_seed.write(dirs[2].path(), |_, _| {}).unwrap();
    assert_eq!(a.patients, 70);
    assert_eq!(a.count("Patient"), 70);
    assert_eq!((&a.counts, a.bytes), (&b.counts, b.bytes));
    let files_a = read_dir_files(dirs[0].path());
    assert_eq!(files_a.len(), RESOURCE_TYPES.len());
    assert_eq!(files_a, read_dir_files(dirs[1].path()));
    let files_c = read_dir_files(dirs[2].path());
    for (name, bytes) in &files_a {
        assert_ne!(Some(bytes), files_c.get(name), "{name} ignores the seed");
    }
    assert_ne!(a.total(), 0);
    assert_ne!(Cohort::new(7).epoch(), Cohort::new(8).epoch());
    assert_eq!(c.patients, 70);
}

#[test]
fn slices_regenerate_identically_in_any_order() {
    let cohort = Cohort::new(42);
    let all: Vec<_> = cohort.patients(0..60).collect();
    for index in (0..60).rev().step_by(7) {
        assert_eq!(cohort.patient(index), all[index as usize]);
        assert_eq!(cohort.patient_id(index), all[index as usize].patient().id);
    }
    // Exporting two halves gives the same files as exporting the whole, concatenated.
    let whole = tempfile::tempdir().unwrap();
    let first = tempfile::tempdir().unwrap();
    let second = tempfile::tempdir().unwrap();
    NdjsonExport::new(cohort, 0..60)
        .write(whole.path(), |_, _| {})
        .unwrap();
    NdjsonExport::new(cohort, 0..25)
        .write(first.path(), |_, _| {})
        .unwrap();
    NdjsonExport::new(cohort, 25..60)
        .write(second.path(), |_, _| {})
        .unwrap();
    let (whole, first, second) = (
        read_dir_files(whole.path()),
        read_dir_files(first.path()),
        read_dir_files(second.path()),
    );
    for (name, bytes) in whole {
        let mut joined = first[&name].clone();
        joined.extend_from_slice(&second[&name]);
        assert_eq!(bytes, joined, "{name}");
    }
}

#[test]
fn every_reference_resolves_to_a_generated_resource() {
    let cohort = Cohort::new(3);
    let all = resources(&cohort, 0..300);
    let mut keys = HashSet::new();
    for r in &all {
        assert!(fhirkeep_engine::resource::is_valid_id(&r.id), "{}", r.id);
        assert_eq!(r.id.len(), 36, "UUID-shaped: {}", r.id);
        assert!(keys.insert(r.reference()), "duplicate {}", r.reference());
    }
    let mut checked: HashMap<String, usize> = HashMap::new();
    let mut patient_of_record = String::new();
    for r in &all {
        let value = r.to_value().unwrap();
        assert_eq!(value["resourceType"], r.resource_type);
        assert_eq!(value["id"], r.id.as_str());
        if r.resource_type == "Patient" {
            patient_of_record = r.reference();
            continue;
        }
        let mut refs = Vec::new();
        references(&value, "", &mut refs);
        for (field, target) in &refs {
            assert!(
                keys.contains(*target),
                "{} {field} -> {target}",
                r.reference()
            );
            *checked.entry(field.clone()).or_default() += 1;
            if field == "subject" || field == "patient" {
                assert_eq!(
                    *target,
                    patient_of_record,
                    "{} belongs to its record",
                    r.reference()
                );
            }
        }
        // Every clinical resource is about its patient and (here) happens in an encounter.
        let subject = value.get("subject").or_else(|| value.get("patient"));
        assert_eq!(
            subject.and_then(|s| s["reference"].as_str()),
            Some(patient_of_record.as_str())
        );
        if r.resource_type != "Encounter" {
            let encounter = value["encounter"]["reference"].as_str().unwrap();
            assert!(encounter.starts_with("Encounter/"));
        }
        if r.resource_type == "DiagnosticReport" {
            let results = value["result"].as_array().unwrap();
            assert!(!results.is_empty());
            for result in results {
                assert!(
                    result["reference"]
                        .as_str()
                        .unwrap()
                        .starts_with("Observation/")
                );
            }
        }
    }
    for field in [
        "subject",
        "patient",
        "encounter",
        "result",
        "reasonReference",
    ] {
        assert!(
            checked.get(field).copied().unwrap_or(0) > 0,
            "no {field} references checked"
        );
    }
}

#[test]
fn the_mix_is_observation_heavy_and_complete() {
    let cohort = Cohort::new(11);
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    let mut bytes = 0;
    let records = 400;
    for record in cohort.patients(0..records) {
        for r in record.resources() {
            *counts.entry(r.resource_type).or_default() += 1;
            bytes += r.json.len();
        }
    }
    let total: usize = counts.values().sum();
    eprintln!(
        "{records} patients: {total} resources, {} bytes each on average: {counts:?}",
        bytes / total
    );
    for t in RESOURCE_TYPES {
        assert!(counts.get(t).copied().unwrap_or(0) > 0, "no {t}");
    }
    assert_eq!(counts["Patient"], records as usize);
    let share = counts["Observation"] as f64 / total as f64;
    assert!(
        (0.55..=0.75).contains(&share),
        "Observations are {share:.2} of all"
    );
    for (t, n) in &counts {
        if *t != "Observation" {
            assert!(*n < counts["Observation"], "{t} outnumbers Observations");
        }
    }
    let per_patient = total as f64 / records as f64;
    assert!(
        (40.0..=600.0).contains(&per_patient),
        "{per_patient} resources per patient"
    );
}

/// Is `text` a FHIR date, dateTime or instant? Returns its date part.
fn date_part(text: &str) -> Option<&str> {
    let bytes = text.as_bytes();
    let date_ok = bytes.len() >= 10
        && bytes[..10].iter().enumerate().all(|(i, b)| {
            if i == 4 || i == 7 {
                *b == b'-'
            } else {
                b.is_ascii_digit()
            }
        });
    if !date_ok {
        return None;
    }
    let rest = &text[10..];
    let time_ok = rest.is_empty()
        || (rest.len() == 15 && rest.starts_with('T') && rest.ends_with("-05:00"))
        || (rest.len() == 14 && rest.starts_with('T') && rest.ends_with('Z'));
    time_ok.then(|| &text[..10])
}

#[test]
fn dates_are_well_formed_and_before_the_epoch() {
    let cohort = Cohort::new(5);
    let epoch = cohort.epoch_date();
    let mut seen = 0;
    for record in cohort.patients(0..120) {
        let patient = record.patient().to_value().unwrap();
        let birth = patient["birthDate"].as_str().unwrap().to_owned();
        for r in record.resources() {
            let value = r.to_value().unwrap();
            let object = value.as_object().unwrap();
            for field in [
                "birthDate",
                "deceasedDateTime",
                "effectiveDateTime",
                "issued",
                "onsetDateTime",
                "recordedDate",
                "authoredOn",
                "performedDateTime",
                "occurrenceDateTime",
                "abatementDateTime",
                "recorded",
            ] {
                let Some(text) = object.get(field).and_then(Value::as_str) else {
                    continue;
                };
                let day = date_part(text).unwrap_or_else(|| panic!("{field} {text}"));
                seen += 1;
                assert!(
                    day <= epoch.as_str(),
                    "{} {field} {text} after {epoch}",
                    r.reference()
                );
                if field != "onsetDateTime" && field != "birthDate" {
                    assert!(
                        day >= birth.as_str(),
                        "{} {field} {text} before birth {birth}",
                        r.reference()
                    );
                }
            }
            if let Some(period) = object.get("period") {
                let start = period["start"].as_str().unwrap();
                let end = period["end"].as_str().unwrap();
                assert!(date_part(start).is_some() && date_part(end).is_some());
                assert!(start <= end, "{start} > {end}");
                assert!(&end[..10] <= epoch.as_str(), "{} ends {end}", r.reference());
            }
        }
    }
    assert!(seen > 1_000);
}

#[test]
fn values_vary_plausibly() {
    let cohort = Cohort::new(9);
    let mut values: HashMap<String, Vec<f64>> = HashMap::new();
    let mut interpretations: HashMap<String, usize> = HashMap::new();
    let mut systolic = Vec::new();
    let mut codes = HashMap::<&str, HashSet<String>>::new();
    for r in resources(&cohort, 0..200) {
        let value = r.to_value().unwrap();
        let concept = ["code", "vaccineCode", "medicationCodeableConcept"]
            .iter()
            .map(|field| &value[*field])
            .find(|c| !c.is_null())
            .unwrap_or(&value["type"][0]);
        if let Some(code) = concept["coding"][0]["code"].as_str() {
            codes
                .entry(r.resource_type)
                .or_default()
                .insert(code.to_owned());
        }
        if r.resource_type != "Observation" {
            continue;
        }
        let code = value["code"]["coding"][0]["code"]
            .as_str()
            .unwrap()
            .to_owned();
        if let Some(v) = value["valueQuantity"]["value"].as_f64() {
            assert_eq!(
                value["valueQuantity"]["system"],
                "http://unitsofmeasure.org"
            );
            values.entry(code).or_default().push(v);
        }
        for component in value["component"].as_array().into_iter().flatten() {
            if component["code"]["coding"][0]["code"] == "8480-6" {
                systolic.push(component["valueQuantity"]["value"].as_f64().unwrap());
            }
        }
        if let Some(i) = value["interpretation"][0]["coding"][0]["code"].as_str() {
            *interpretations.entry(i.to_owned()).or_default() += 1;
        }
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    for (loinc, low, high) in [
        ("8867-4", 60.0, 100.0),  // heart rate
        ("29463-7", 20.0, 100.0), // body weight, children included
        ("2345-7", 80.0, 130.0),  // glucose
        ("2093-3", 150.0, 230.0), // cholesterol
        ("4548-4", 5.0, 8.0),     // HbA1c, mostly diabetics and prediabetics
    ] {
        let v = &values[loinc];
        let distinct: HashSet<u64> = v.iter().map(|x| x.to_bits()).collect();
        assert!(
            distinct.len() > 10,
            "{loinc}: {} distinct values",
            distinct.len()
        );
        let m = mean(v);
        assert!((low..=high).contains(&m), "{loinc}: mean {m}");
    }
    let m = mean(&systolic);
    assert!((110.0..=140.0).contains(&m), "systolic mean {m}");
    for flag in ["N", "H", "L"] {
        assert!(
            interpretations.get(flag).copied().unwrap_or(0) > 0,
            "no {flag} results"
        );
    }
    assert!(
        codes["Observation"].len() >= 25,
        "{:?}",
        codes["Observation"]
    );
    assert!(codes["Condition"].len() >= 10);
    assert!(codes["MedicationRequest"].len() >= 8);
    assert!(codes["Immunization"].len() >= 5);
    assert!(codes["Procedure"].len() >= 6);
    assert!(codes["Encounter"].len() >= 5);
}

#[test]
fn a_real_store_accepts_and_returns_every_resource() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    create_key_file(&key).unwrap();
    let store = Store::builder(dir.path().join("db"))
        .key(KeySource::KeyFile(key))
        .create()
        .unwrap();
    let ctx = AccessContext::new("synth-test", "synth", "local", "r1");
    let all = resources(&Cohort::new(21), 0..25);
    for batch in all.chunks(700) {
        let items = batch
            .iter()
            .map(|r| Upsert {
                resource_type: r.resource_type.to_owned(),
                id: Some(r.id.clone()),
                resource: r.to_value().unwrap(),
                expected_version: None,
            })
            .collect();
        let results = store.write(&ctx, |txn| txn.update_many(items)).unwrap();
        for result in results {
            result.unwrap();
        }
    }
    for r in &all {
        let stored = store.read(&ctx, r.resource_type, &r.id).unwrap();
        let mut back = stored.to_json().unwrap();
        let meta = back["meta"].as_object_mut().unwrap();
        assert_eq!(meta.remove("versionId"), Some(Value::from("1")));
        assert!(meta.remove("lastUpdated").is_some());
        assert_eq!(back, r.to_value().unwrap(), "{}", r.reference());
    }
}

#[test]
fn time_ordered_ids_are_uuid7_and_rise_in_generation_order_within_each_type() {
    let random = resources(&Cohort::new(5), 0..6);
    let ordered = resources(&Cohort::new(5).with_time_ordered_ids(), 0..6);
    assert_eq!(random.len(), ordered.len());
    let mut last: HashMap<&str, String> = HashMap::new();
    let mut seen = HashSet::new();
    for (r, o) in random.iter().zip(&ordered) {
        assert_eq!(r.resource_type, o.resource_type);
        assert_eq!(&r.id[14..15], "4", "{}", r.id);
        assert_eq!(&o.id[14..15], "7", "{}", o.id);
        assert_eq!(o.id.len(), 36);
        assert!(matches!(&o.id[19..20], "8" | "9" | "a" | "b"), "{}", o.id);
        if let Some(previous) = last.get(o.resource_type) {
            assert!(*previous < o.id, "{previous} then {}", o.id);
        }
        last.insert(o.resource_type, o.id.clone());
        assert!(seen.insert(o.id.clone()), "duplicate id {}", o.id);
    }
    // Only the ids differ: references follow them, the rest is byte for byte the same.
    let strip = |g: &GeneratedResource, ids: &[(String, String)]| {
        let mut text = g.json.clone();
        for (from, to) in ids {
            text = text.replace(from.as_str(), to.as_str());
        }
        text
    };
    let renames: Vec<(String, String)> = random
        .iter()
        .zip(&ordered)
        .map(|(r, o)| (o.id.clone(), r.id.clone()))
        .collect();
    for (r, o) in random.iter().zip(&ordered) {
        assert_eq!(r.json, strip(o, &renames));
    }
}
