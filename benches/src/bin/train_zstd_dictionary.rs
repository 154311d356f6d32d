//! Trains the zstd dictionary the engine compresses resource bodies with.
//!
//! Samples are the official FHIR R4 examples (`testdata/`), stamped with `meta.versionId` and
//! `meta.lastUpdated` as the engine stores them. Only real spec data is used, never the
//! benchmark generator's output, so compression figures measured on generated data are not
//! flattered by a dictionary trained on it.
//!
//! Usage (from the repository root):
//! `cargo run --release -p fhirkeep-benches --bin train_zstd_dictionary -- testdata/r4/hl7.fhir.r4.examples-4.0.1.tgz engine/src/store/fhir-r4-v1.zdict`

use std::io::Read;

use serde_json::Value;

/// Dictionary size: 64 KiB is where gains on ~1 KiB resources flatten out.
const DICTIONARY_SIZE: usize = 64 * 1024;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [examples, output] = args.as_slice() else {
        return Err("usage: train_zstd_dictionary EXAMPLES.tgz OUTPUT.zdict".into());
    };
    let mut archive =
        tar::Archive::new(flate2::read::GzDecoder::new(std::fs::File::open(examples)?));
    let mut samples = Vec::new();
    for entry in archive.entries()? {
        let mut entry = entry?;
        let name = entry.path()?.to_string_lossy().into_owned();
        if !name.ends_with(".json") || name.ends_with("package.json") || name.contains("/.") {
            continue;
        }
        let mut text = String::new();
        entry.read_to_string(&mut text)?;
        let Ok(mut value) = serde_json::from_str::<Value>(&text) else {
            continue;
        };
        let Some(object) = value.as_object_mut() else {
            continue;
        };
        if !object.contains_key("resourceType") {
            continue;
        }
        let meta = object
            .entry("meta")
            .or_insert_with(|| Value::Object(serde_json::Map::new()));
        if let Some(meta) = meta.as_object_mut() {
            meta.insert("versionId".into(), Value::String("1".into()));
            meta.insert(
                "lastUpdated".into(),
                Value::String("2026-01-01T00:00:00.000000Z".into()),
            );
        }
        samples.push(serde_json::to_vec(&value)?);
    }
    let dictionary = zstd::dict::from_samples(&samples, DICTIONARY_SIZE)?;
    std::fs::write(output, &dictionary)?;
    eprintln!(
        "trained a {} byte dictionary from {} resources into {output}",
        dictionary.len(),
        samples.len()
    );
    Ok(())
}
