//! `fhirkeep import`: loading JSON, NDJSON and Bundles from files and directories.

use std::fs::File;
use std::io::{BufRead, BufReader, IsTerminal};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use fhirkeep_engine::bundle::is_applicable_bundle;
use fhirkeep_engine::store::{AccessContext, Upsert};
use fhirkeep_query::Database;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;

/// At most this many rejection reasons are printed; the count covers all of them.
const MAX_REASONS_SHOWN: usize = 50;

/// Totals of one import run.
#[derive(Debug, Default)]
pub(crate) struct Summary {
    pub(crate) loaded: u64,
    pub(crate) rejected: u64,
    reasons: Vec<String>,
}

impl Summary {
    fn reject(&mut self, location: String, reason: impl std::fmt::Display) {
        self.rejected += 1;
        if self.reasons.len() < MAX_REASONS_SHOWN {
            self.reasons.push(format!("{location}: {reason}"));
        }
    }

    pub(crate) fn print(&self) {
        for reason in &self.reasons {
            eprintln!("rejected {reason}");
        }
        if self.rejected as usize > self.reasons.len() {
            eprintln!(
                "... and {} more rejected",
                self.rejected as usize - self.reasons.len()
            );
        }
        eprintln!("loaded {}, rejected {}", self.loaded, self.rejected);
    }
}

/// The base URL written into bundle responses during an import (they are not shown).
const IMPORT_BASE: &str = "urn:fhirkeep:import";

/// A resource waiting for the next commit, with where it came from.
struct Pending {
    location: String,
    resource: Value,
}

pub(crate) struct Importer<'a> {
    db: &'a Database,
    ctx: &'a AccessContext,
    batch: usize,
    pending: Vec<Pending>,
    summary: Summary,
    progress: ProgressBar,
}

pub(crate) fn import_paths(
    db: &Database,
    ctx: &AccessContext,
    paths: &[PathBuf],
    batch: usize,
) -> Result<Summary> {
    let mut files = Vec::new();
    for path in paths {
        collect_files(path, &mut files).with_context(|| format!("reading {}", path.display()))?;
    }
    let progress = if std::io::stderr().is_terminal() {
        let bar = ProgressBar::new(files.len() as u64);
        bar.set_style(
            ProgressStyle::with_template("{bar:40} {pos}/{len} files, {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar
    } else {
        ProgressBar::hidden()
    };
    let mut importer = Importer::new(db, ctx, batch, progress);
    for file in &files {
        importer.file(file)?;
        importer.progress.inc(1);
        importer
            .progress
            .set_message(format!("{} loaded", importer.summary.loaded));
    }
    importer.finish()
}

fn collect_files(path: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    if path.is_dir() {
        let mut children: Vec<PathBuf> = std::fs::read_dir(path)?
            .map(|entry| entry.map(|e| e.path()))
            .collect::<std::io::Result<_>>()?;
        children.sort();
        for child in children {
            if child.is_dir() || is_loadable(&child) {
                collect_files(&child, out)?;
            }
        }
    } else if path.exists() {
        out.push(path.to_path_buf());
    } else {
        anyhow::bail!("no such file or directory");
    }
    Ok(())
}

fn is_loadable(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("json" | "ndjson")
    )
}

impl<'a> Importer<'a> {
    pub(crate) fn new(
        db: &'a Database,
        ctx: &'a AccessContext,
        batch: usize,
        progress: ProgressBar,
    ) -> Self {
        Importer {
            db,
            ctx,
            batch,
            pending: Vec::with_capacity(batch),
            summary: Summary::default(),
            progress,
        }
    }

    /// Commits what is pending and returns the totals.
    pub(crate) fn finish(mut self) -> Result<Summary> {
        self.flush()?;
        // Bulk loads defer index commits; make everything searchable before reporting.
        self.db.flush_index()?;
        self.progress.finish_and_clear();
        Ok(self.summary)
    }

    fn file(&mut self, path: &Path) -> Result<()> {
        let display = path.display().to_string();
        let ndjson = path.extension().and_then(|e| e.to_str()) == Some("ndjson");
        let file = match File::open(path) {
            Ok(file) => file,
            Err(error) => {
                self.summary.reject(display, error);
                return Ok(());
            }
        };
        if ndjson {
            for (number, line) in BufReader::new(file).lines().enumerate() {
                let location = format!("{display}:{}", number + 1);
                let line = match line {
                    Ok(line) => line,
                    Err(error) => {
                        self.summary.reject(location, error);
                        continue;
                    }
                };
                if line.trim().is_empty() {
                    continue;
                }
                match serde_json::from_str::<Value>(&line) {
                    Ok(value) => self.value(location, value)?,
                    Err(error) => self
                        .summary
                        .reject(location, format!("not valid JSON ({error})")),
                }
            }
        } else {
            match serde_json::from_reader::<_, Value>(BufReader::new(file)) {
                Ok(value) => self.value(display, value)?,
                Err(error) => self
                    .summary
                    .reject(display, format!("not valid JSON ({error})")),
            }
        }
        Ok(())
    }

    /// Queues one parsed JSON document (a resource or a Bundle) from `location`.
    pub(crate) fn value(&mut self, location: String, value: Value) -> Result<()> {
        if is_applicable_bundle(&value) {
            self.flush()?;
            self.bundle(location, &value);
            return Ok(());
        }
        self.pending.push(Pending {
            location,
            resource: value,
        });
        if self.pending.len() >= self.batch {
            self.flush()?;
        }
        Ok(())
    }

    fn bundle(&mut self, location: String, bundle: &Value) {
        let transaction = bundle.get("type").and_then(Value::as_str) == Some("transaction");
        let response = match self.db.process_bundle(self.ctx, bundle, IMPORT_BASE) {
            Ok(response) => response,
            Err(error) if transaction => {
                self.summary
                    .reject(location, format!("transaction rolled back: {error}"));
                return;
            }
            Err(error) => {
                self.summary.reject(location, error);
                return;
            }
        };
        let entries = response["entry"].as_array().cloned().unwrap_or_default();
        for (index, entry) in entries.iter().enumerate() {
            let status = entry["response"]["status"].as_str().unwrap_or("");
            if status.starts_with('2') {
                self.summary.loaded += 1;
            } else {
                let reason = entry["response"]["outcome"]["issue"][0]["diagnostics"]
                    .as_str()
                    .unwrap_or(status)
                    .to_string();
                self.summary
                    .reject(format!("{location} entry {index}"), reason);
            }
        }
    }

    /// Writes pending resources in one durable commit; a rejected resource writes nothing.
    fn flush(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let pending = std::mem::take(&mut self.pending);
        let mut locations = Vec::with_capacity(pending.len());
        let mut items = Vec::with_capacity(pending.len());
        for item in pending {
            let field = |name: &str| {
                item.resource
                    .get(name)
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            };
            items.push(Upsert {
                resource_type: field("resourceType").unwrap_or_default(),
                id: field("id"),
                resource: item.resource,
                expected_version: None,
            });
            locations.push(item.location);
        }
        let results = self.db.load_many(self.ctx, items)?;
        let mut rejected = Vec::new();
        let mut loaded = 0;
        for (location, result) in locations.into_iter().zip(results) {
            match result {
                Ok(_) => loaded += 1,
                Err(error) if is_input_error(&error) => rejected.push((location, error)),
                Err(error) => return Err(error.into()),
            }
        }
        self.summary.loaded += loaded;
        for (location, error) in rejected {
            self.summary.reject(location, error);
        }
        Ok(())
    }
}

/// Errors that reject one resource; anything else (I/O, corruption) stops the import.
fn is_input_error(error: &fhirkeep_engine::Error) -> bool {
    use fhirkeep_engine::Error;
    matches!(
        error,
        Error::InvalidResource(_)
            | Error::InvalidId
            | Error::UnknownResourceType(_)
            | Error::VersionConflict { .. }
    )
}

/// Loads every `.json` resource in a gzipped tar (such as the official R4 examples package).
pub(crate) fn import_tgz(db: &Database, ctx: &AccessContext, path: &Path) -> Result<Summary> {
    use std::io::Read;
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(file));
    let mut importer = Importer::new(db, ctx, 1000, ProgressBar::hidden());
    for entry in archive.entries()? {
        let mut entry = entry?;
        let name = entry.path()?.to_string_lossy().into_owned();
        if !name.ends_with(".json") || name.ends_with("package.json") || name.contains("/.") {
            continue;
        }
        let mut text = String::new();
        let location = format!("{}:{name}", path.display());
        if let Err(error) = entry.read_to_string(&mut text) {
            importer.summary.reject(location, error);
            continue;
        }
        match serde_json::from_str::<Value>(&text) {
            Ok(value) => importer.value(location, value)?,
            Err(error) => importer
                .summary
                .reject(location, format!("not valid JSON ({error})")),
        }
    }
    importer.finish()
}
