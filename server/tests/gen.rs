//! `fhirkeep gen` end to end: the real binary writes NDJSON that `fhirkeep import` loads
//! without a single rejection, deterministically, and never overwrites data unasked.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};

use tempfile::TempDir;

fn fhirkeep(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fhirkeep"))
        .args(args)
        .env_remove("FHIRKEEP_PASSPHRASE")
        .output()
        .unwrap()
}

fn ok(output: &Output) -> String {
    assert!(
        output.status.success(),
        "failed: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout.clone()).unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Lines per file of an output directory.
fn line_counts(dir: &Path) -> BTreeMap<String, usize> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| {
            let path = entry.unwrap().path();
            let text = std::fs::read_to_string(&path).unwrap();
            (
                path.file_name().unwrap().to_string_lossy().into_owned(),
                text.lines().count(),
            )
        })
        .collect()
}

#[test]
fn generated_data_imports_without_rejections() {
    let tmp = TempDir::new().unwrap();
    let out = tmp.path().join("synthetic");
    let out_s = out.to_str().unwrap();
    let summary = ok(&fhirkeep(&[
        "gen",
        "--patients",
        "20",
        "--seed",
        "7",
        "--out",
        out_s,
    ]));
    let counts = line_counts(&out);
    for file in [
        "Patient.ndjson",
        "Encounter.ndjson",
        "Condition.ndjson",
        "Observation.ndjson",
        "DiagnosticReport.ndjson",
        "MedicationRequest.ndjson",
        "Procedure.ndjson",
        "Immunization.ndjson",
    ] {
        assert!(
            counts.get(file).copied().unwrap_or(0) > 0,
            "{file}: {counts:?}"
        );
    }
    assert_eq!(counts["Patient.ndjson"], 20);
    let generated: usize = counts.values().sum();
    let total_line = summary.lines().find(|l| l.starts_with("total")).unwrap();
    assert!(
        total_line.contains(&format!(" {generated}  resources for 20 patients")),
        "{summary}"
    );
    assert!(summary.contains("Observation"), "{summary}");

    // Deterministic: the same arguments give the same bytes.
    let again = tmp.path().join("again");
    ok(&fhirkeep(&[
        "gen",
        "--patients",
        "20",
        "--seed",
        "7",
        "--out",
        again.to_str().unwrap(),
        "--threads",
        "1",
    ]));
    for file in counts.keys() {
        assert_eq!(
            std::fs::read(out.join(file)).unwrap(),
            std::fs::read(again.join(file)).unwrap(),
            "{file}"
        );
    }

    let db = tmp.path().join("db").display().to_string();
    let key = tmp.path().join("key").display().to_string();
    ok(&fhirkeep(&["init", "--db", &db, "--key-file", &key]));
    let import = fhirkeep(&["import", "--db", &db, "--key-file", &key, out_s]);
    let report = stderr(&import);
    assert!(import.status.success(), "{report}");
    assert!(
        report.contains(&format!("loaded {generated}, rejected 0")),
        "{report}"
    );

    // A generated patient reads back.
    let first = std::fs::read_to_string(out.join("Patient.ndjson")).unwrap();
    let patient: serde_json::Value = serde_json::from_str(first.lines().next().unwrap()).unwrap();
    let reference = format!("Patient/{}", patient["id"].as_str().unwrap());
    let read: serde_json::Value = serde_json::from_str(&ok(&fhirkeep(&[
        "get",
        "--db",
        &db,
        "--key-file",
        &key,
        &reference,
    ])))
    .unwrap();
    assert_eq!(read["name"], patient["name"]);
}

#[test]
fn gen_refuses_to_overwrite_without_force() {
    let tmp = TempDir::new().unwrap();
    let out = tmp.path().join("out");
    let out_s = out.to_str().unwrap();
    let args = ["gen", "--patients", "3", "--seed", "1", "--out", out_s];
    ok(&fhirkeep(&args));
    let before = std::fs::read(out.join("Observation.ndjson")).unwrap();

    let refused = fhirkeep(&["gen", "--patients", "5", "--seed", "2", "--out", out_s]);
    assert!(!refused.status.success(), "overwrote without --force");
    let message = stderr(&refused);
    assert!(
        message.contains("already exists and is not empty"),
        "{message}"
    );
    assert!(message.contains("--force"), "{message}");
    assert_eq!(
        std::fs::read(out.join("Observation.ndjson")).unwrap(),
        before,
        "a refused run must leave the files alone"
    );

    let mut forced: Vec<&str> = vec!["gen", "--patients", "5", "--seed", "2", "--out", out_s];
    forced.push("--force");
    ok(&fhirkeep(&forced));
    assert_eq!(line_counts(&out)["Patient.ndjson"], 5);

    let help = ok(&fhirkeep(&["gen", "--help"]));
    for flag in ["--patients", "--seed", "--out", "--force"] {
        assert!(help.contains(flag), "{help}");
    }
}
