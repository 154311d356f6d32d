//! The `fhirkeep` binary end to end: real processes, real files, checked output and exit codes.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use fhirkeep_engine::audit::{ConsistencyProof, InclusionProof, SignedTreeHead};
use serde_json::Value;
use tempfile::TempDir;

/// One helper per boundary: run the binary with arguments and environment, no inherited key.
fn fhirkeep(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_fhirkeep"));
    command.args(args).env_remove("FHIRKEEP_PASSPHRASE");
    for (key, value) in env {
        command.env(key, value);
    }
    command.output().unwrap()
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

struct Db {
    dir: TempDir,
}

impl Db {
    fn new() -> Db {
        Db {
            dir: TempDir::new().unwrap(),
        }
    }
    fn db(&self) -> String {
        self.dir.path().join("db").display().to_string()
    }
    fn key(&self) -> String {
        self.dir.path().join("key").display().to_string()
    }
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    fn run(&self, args: &[&str]) -> Output {
        let db = self.db();
        let key = self.key();
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--db", db.as_str(), "--key-file", key.as_str()]);
        fhirkeep(&all, &[])
    }
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

#[test]
fn init_import_get_history_check_audit() {
    let db = Db::new();
    let init = db.run(&["init"]);
    ok(&init);
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(db.key()).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "key file must be private");
    assert!(
        !db.run(&["init"]).status.success(),
        "init twice must refuse"
    );

    let data = db.path("data");
    std::fs::create_dir_all(&data).unwrap();
    write(
        &data.join("a.ndjson"),
        concat!(
            r#"{"resourceType":"Patient","id":"p1","name":[{"family":"Chalmers"}]}"#,
            "\n",
            "{not json\n",
            r#"{"resourceType":"Observation","status":"final","code":{"text":"hr"},"subject":{"reference":"Patient/p1"}}"#,
            "\n",
            "\n",
            r#"{"resourceType":"Nope"}"#,
            "\n",
        ),
    );
    write(
        &data.join("b.json"),
        r#"{"resourceType":"Bundle","type":"transaction","entry":[
            {"fullUrl":"urn:uuid:x","resource":{"resourceType":"Patient","name":[{"family":"Tx"}]},"request":{"method":"POST","url":"Patient"}},
            {"resource":{"resourceType":"Observation","status":"final","code":{"text":"t"},"subject":{"reference":"urn:uuid:x"}},"request":{"method":"POST","url":"Observation"}}]}"#,
    );
    write(&data.join("ignored.txt"), "not loaded");
    let import = db.run(&["import", data.to_str().unwrap()]);
    assert_eq!(
        import.status.code(),
        Some(1),
        "rejections make the exit status 1"
    );
    let report = stderr(&import);
    assert!(report.contains("a.ndjson:2: not valid JSON"), "{report}");
    assert!(
        report.contains("a.ndjson:5: unknown resource type"),
        "{report}"
    );
    assert!(report.contains("loaded 4, rejected 2"), "{report}");

    let patient: Value = serde_json::from_str(&ok(&db.run(&["get", "Patient/p1"]))).unwrap();
    assert_eq!(patient["name"][0]["family"], "Chalmers");
    assert_eq!(patient["meta"]["versionId"], "1");
    let v1: Value = serde_json::from_str(&ok(&db.run(&["get", "Patient/p1/_history/1"]))).unwrap();
    assert_eq!(v1, patient);
    let missing = db.run(&["get", "Patient/nope"]);
    assert!(!missing.status.success());
    assert!(stderr(&missing).contains("not found"));

    let history: Value = serde_json::from_str(&ok(&db.run(&["history", "Patient/p1"]))).unwrap();
    assert_eq!(history["type"], "history");
    assert_eq!(history["entry"].as_array().unwrap().len(), 1);
    let system: Value = serde_json::from_str(&ok(&db.run(&["history"]))).unwrap();
    assert_eq!(system["entry"].as_array().unwrap().len(), 4);

    let check = ok(&db.run(&["check"]));
    assert!(check.starts_with("ok:"), "{check}");

    // Compaction reports every file and leaves a database that checks out and reads the same.
    let compacted = ok(&db.run(&["compact"]));
    assert!(compacted.contains("fhirkeep.redb: "), "{compacted}");
    assert!(compacted.contains("index.redb: "), "{compacted}");
    assert!(compacted.contains("total: "), "{compacted}");
    let again: Value = serde_json::from_str(&ok(&db.run(&["get", "Patient/p1"]))).unwrap();
    assert_eq!(again, patient);
    assert!(ok(&db.run(&["check"])).starts_with("ok:"));

    // Stats: one line per table with its entry count, and a total per file; no content.
    let stats = ok(&db.run(&["stats"]));
    let versions = stats
        .lines()
        .find(|line| line.starts_with("fhirkeep.redb") && line.contains(" versions "))
        .unwrap_or_else(|| panic!("no versions line: {stats}"));
    assert_eq!(versions.split_whitespace().nth(2), Some("4"), "{stats}");
    assert!(stats.contains("index.redb: "), "{stats}");
    assert!(!stats.contains("Chalmers"), "{stats}");

    let head_text = ok(&db.run(&["audit", "head"]));
    let head = SignedTreeHead::from_json(&head_text).unwrap();
    head.verify().unwrap();
    let head_file = db.path("head.json");
    write(&head_file, &head_text);
    ok(&db.run(&["get", "Patient/p1"]));
    let verified = ok(&db.run(&[
        "audit",
        "verify",
        "--trusted-head",
        head_file.to_str().unwrap(),
    ]));
    assert!(
        verified.contains("consistent with the trusted head"),
        "{verified}"
    );

    let newer = SignedTreeHead::from_json(&ok(&db.run(&["audit", "head"]))).unwrap();
    assert!(newer.size > head.size);
    let size = newer.size.to_string();
    let inclusion = ok(&db.run(&["audit", "prove", "--leaf", "1", "--size", &size]));
    InclusionProof::from_json(&inclusion)
        .unwrap()
        .verify(&newer)
        .unwrap();
    let old = head.size.to_string();
    let consistency = ok(&db.run(&["audit", "prove", "--from", &old, "--to", &size]));
    ConsistencyProof::from_json(&consistency)
        .unwrap()
        .verify(&head, &newer)
        .unwrap();

    // Rotating the signing key: the old key signs over the rotation, later heads carry the
    // new one, and heads kept from before still check.
    let rotated: Value = serde_json::from_str(&ok(&db.run(&["audit", "rotate-key"]))).unwrap();
    let old_key = rotated["oldPublicKey"].as_str().unwrap();
    let new_key = rotated["newPublicKey"].as_str().unwrap();
    assert_eq!(old_key, hex::encode(head.public_key));
    assert_ne!(old_key, new_key);
    let rotation = SignedTreeHead::from_json(&rotated["rotationHead"].to_string()).unwrap();
    rotation.verify().unwrap();
    ok(&db.run(&["get", "Patient/p1"]));
    let latest = SignedTreeHead::from_json(&ok(&db.run(&["audit", "head"]))).unwrap();
    assert_eq!(hex::encode(latest.public_key), new_key);
    let verified = ok(&db.run(&[
        "audit",
        "verify",
        "--trusted-head",
        head_file.to_str().unwrap(),
    ]));
    assert!(verified.contains("2 signing keys"), "{verified}");
    assert!(
        verified.contains("consistent with the trusted head"),
        "{verified}"
    );
}

#[test]
fn passphrase_wrong_key_and_missing_key_are_clear_errors() {
    let dir = TempDir::new().unwrap();
    let db = dir.path().join("db").display().to_string();
    let kdf = ["--kdf-memory-kib", "64"];
    let good = [("FHIRKEEP_PASSPHRASE", "correct horse")];
    let mut init = vec!["init", "--db", db.as_str()];
    init.extend(kdf);
    ok(&fhirkeep(&init, &good));
    write(
        &dir.path().join("p.json"),
        r#"{"resourceType":"Patient","id":"x"}"#,
    );
    let file = dir.path().join("p.json").display().to_string();
    ok(&fhirkeep(&["import", "--db", &db, &file], &good));
    ok(&fhirkeep(&["get", "--db", &db, "Patient/x"], &good));

    let wrong = fhirkeep(
        &["get", "--db", &db, "Patient/x"],
        &[("FHIRKEEP_PASSPHRASE", "wrong")],
    );
    assert!(!wrong.status.success());
    assert!(stderr(&wrong).contains("wrong key"), "{}", stderr(&wrong));

    let none = fhirkeep(&["get", "--db", &db, "Patient/x"], &[]);
    assert!(stderr(&none).contains("--key-file FILE or set FHIRKEEP_PASSPHRASE"));

    let missing_file = dir.path().join("absent.key").display().to_string();
    let missing = fhirkeep(
        &["get", "--db", &db, "--key-file", &missing_file, "Patient/x"],
        &[],
    );
    assert!(
        stderr(&missing).contains("does not exist"),
        "{}",
        stderr(&missing)
    );
}

#[test]
fn rekey_changes_the_key_and_rotation_keeps_data_readable() {
    let db = Db::new();
    ok(&db.run(&["init"]));
    write(&db.path("p.json"), r#"{"resourceType":"Patient","id":"r"}"#);
    ok(&db.run(&["import", db.path("p.json").to_str().unwrap()]));

    let new_key = db.path("new.key").display().to_string();
    ok(&db.run(&["rekey", "--new-key-file", &new_key]));
    let old = db.run(&["get", "Patient/r"]);
    assert!(stderr(&old).contains("wrong key"), "{}", stderr(&old));
    let database = db.db();
    let with_new = ["--db", database.as_str(), "--key-file", new_key.as_str()];
    let get = |extra: &[&str]| {
        let mut args = extra.to_vec();
        args.extend(with_new);
        fhirkeep(&args, &[])
    };
    ok(&get(&["get", "Patient/r"]));
    ok(&get(&["rekey", "--rotate-data-key"]));
    ok(&get(&["get", "Patient/r"]));
    write(&db.path("q.json"), r#"{"resourceType":"Patient","id":"q"}"#);
    ok(&get(&["import", db.path("q.json").to_str().unwrap()]));
    ok(&get(&["get", "Patient/q"]));
    assert!(ok(&get(&["check"])).starts_with("ok:"));

    // A full re-encrypting copy under yet another key.
    let copy_dir = db.path("copy").display().to_string();
    let copy_key = db.path("copy.key").display().to_string();
    ok(&get(&[
        "copy",
        "--to",
        &copy_dir,
        "--new-key-file",
        &copy_key,
    ]));
    let copied = fhirkeep(
        &[
            "get",
            "--db",
            &copy_dir,
            "--key-file",
            &copy_key,
            "Patient/q",
        ],
        &[],
    );
    assert!(ok(&copied).contains("\"id\": \"q\""));
    let check = fhirkeep(&["check", "--db", &copy_dir, "--key-file", &copy_key], &[]);
    assert!(ok(&check).starts_with("ok:"));
}

#[test]
fn check_fails_on_a_flipped_byte() {
    let db = Db::new();
    ok(&db.run(&["init"]));
    let lines: String = (0..200)
        .map(|i| format!("{{\"resourceType\":\"Patient\",\"id\":\"t{i}\",\"name\":[{{\"family\":\"F{i}\"}}]}}\n"))
        .collect();
    write(&db.path("many.ndjson"), &lines);
    ok(&db.run(&["import", db.path("many.ndjson").to_str().unwrap()]));
    let file = Path::new(&db.db()).join("fhirkeep.redb");
    let mut bytes = std::fs::read(&file).unwrap();
    // One flipped byte in every written page block: some of them are live pages.
    const BLOCK: usize = 4128;
    let first_page = 8352;
    for start in (first_page..bytes.len()).step_by(BLOCK) {
        let end = (start + BLOCK).min(bytes.len());
        if let Some(at) = (start + 40..end).find(|&i| bytes[i] != 0) {
            bytes[at] ^= 0x01;
        }
    }
    std::fs::write(&file, &bytes).unwrap();
    let check = db.run(&["check"]);
    assert_eq!(check.status.code(), Some(1));
    let report = stderr(&check);
    assert!(
        report.contains("check FAILED") && report.contains("failed authentication"),
        "{report}"
    );
}

#[test]
fn search_and_reindex() {
    let db = Db::new();
    ok(&db.run(&["init"]));
    let data = db.path("data.ndjson");
    write(
        &data,
        concat!(
            r#"{"resourceType":"Patient","id":"p1","name":[{"family":"Chalmers"}],"birthDate":"1974-12-25"}"#,
            "\n",
            r#"{"resourceType":"Patient","id":"p2","name":[{"family":"Chalk"}],"birthDate":"1960-01-01"}"#,
            "\n",
            r#"{"resourceType":"Observation","id":"o1","status":"final","code":{"text":"w"},"subject":{"reference":"Patient/p1"}}"#,
            "\n",
        ),
    );
    ok(&db.run(&["import", data.to_str().unwrap()]));
    let ids = ok(&db.run(&["search", "--ids", "Patient?family=chal&birthdate=ge1970"]));
    assert_eq!(ids, "Patient/p1\n");
    let bundle: Value = serde_json::from_str(&ok(&db.run(&[
        "search",
        "Patient?family=chal&_revinclude=Observation:subject&_count=1",
    ])))
    .unwrap();
    assert_eq!(bundle["type"], "searchset");
    assert_eq!(bundle["total"], 2);
    assert_eq!(
        bundle["entry"][0]["fullUrl"],
        "http://localhost:8080/fhir/Patient/p1"
    );
    assert_eq!(bundle["entry"][1]["search"]["mode"], "include");
    assert_eq!(bundle["link"][1]["relation"], "next");
    // --ids walks every page.
    let all = ok(&db.run(&["search", "--ids", "Patient?_count=1"]));
    assert_eq!(all, "Patient/p1\nPatient/p2\n");

    // Unknown parameters are refused (naming them), or ignored with --lenient.
    let refused = db.run(&["search", "Patient?shoe-size=42"]);
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("shoe-size"),
        "{}",
        stderr(&refused)
    );
    let lenient: Value = serde_json::from_str(&ok(&db.run(&[
        "search",
        "--lenient",
        "Patient?shoe-size=42",
    ])))
    .unwrap();
    assert_eq!(lenient["total"], 2);

    // Rebuilding the index from scratch gives the same answers.
    let reindex = db.run(&["reindex"]);
    ok(&reindex);
    assert!(
        stderr(&reindex).contains("reindexed 3 changes"),
        "{}",
        stderr(&reindex)
    );
    assert_eq!(
        ok(&db.run(&["search", "--ids", "Observation?patient.family=chalmers"])),
        "Observation/o1\n"
    );
    ok(&db.run(&["check"]));
}
