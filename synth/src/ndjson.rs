//! Writing a cohort as NDJSON, one file per resource type, the layout of a FHIR Bulk Data
//! export: streamed chunk by chunk, generated on several threads, written in patient order.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::thread;

use crate::cohort::{Cohort, RESOURCE_TYPES};
use crate::error::{Error, Result};

/// Patients per unit of work: large enough to amortize a thread hand-off, small enough that
/// the chunks in flight stay a few megabytes.
const CHUNK: u64 = 32;

/// Buffer of each output file.
const BUFFER: usize = 1 << 20;

/// Writes patients of a [`Cohort`] to `TYPE.ndjson` files in a directory.
///
/// Output is byte-identical for the same cohort and range whatever the number of threads.
///
/// ```no_run
/// use fhirkeep_synth::{Cohort, NdjsonExport};
///
/// let summary = NdjsonExport::new(Cohort::new(7), 0..1_000)
///     .write(std::path::Path::new("out"), |_patients, _resources| {})?;
/// println!("{} resources", summary.total());
/// # Ok::<(), fhirkeep_synth::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct NdjsonExport {
    cohort: Cohort,
    patients: Range<u64>,
    force: bool,
    threads: usize,
}

/// What an export wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportSummary {
    /// Patients generated.
    pub patients: u64,
    /// Resources written per type, in [`RESOURCE_TYPES`] order.
    pub counts: Vec<(&'static str, u64)>,
    /// Bytes written, over all files.
    pub bytes: u64,
    /// The files, in [`RESOURCE_TYPES`] order.
    pub files: Vec<PathBuf>,
}

impl ExportSummary {
    /// Resources written, all types together.
    pub fn total(&self) -> u64 {
        self.counts.iter().map(|(_, n)| n).sum()
    }

    /// Resources written of `resource_type`.
    pub fn count(&self, resource_type: &str) -> u64 {
        self.counts
            .iter()
            .find(|(t, _)| *t == resource_type)
            .map_or(0, |(_, n)| *n)
    }
}

/// The generated NDJSON of one chunk of patients, per resource type.
struct Chunk {
    patients: u64,
    buffers: Vec<Vec<u8>>,
    counts: Vec<u64>,
}

fn generate(cohort: &Cohort, patients: Range<u64>) -> Chunk {
    let mut chunk = Chunk {
        patients: patients.end - patients.start,
        buffers: vec![Vec::new(); RESOURCE_TYPES.len()],
        counts: vec![0; RESOURCE_TYPES.len()],
    };
    for record in cohort.patients(patients) {
        for resource in record.resources() {
            let slot = RESOURCE_TYPES
                .iter()
                .position(|t| *t == resource.resource_type)
                .unwrap_or(0);
            chunk.buffers[slot].extend_from_slice(resource.json.as_bytes());
            chunk.buffers[slot].push(b'\n');
            chunk.counts[slot] += 1;
        }
    }
    chunk
}

impl NdjsonExport {
    /// An export of the patients `patients` of `cohort`, on all available cores, refusing to
    /// overwrite non-empty files.
    pub fn new(cohort: Cohort, patients: Range<u64>) -> Self {
        NdjsonExport {
            cohort,
            patients,
            force: false,
            threads: thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }

    /// Whether existing non-empty output files may be overwritten.
    pub fn force(mut self, force: bool) -> Self {
        self.force = force;
        self
    }

    /// Generator threads (at least one).
    pub fn threads(mut self, threads: usize) -> Self {
        self.threads = threads.max(1);
        self
    }

    /// The file a resource type is written to inside `dir`.
    pub fn file_for(dir: &Path, resource_type: &str) -> PathBuf {
        dir.join(format!("{resource_type}.ndjson"))
    }

    /// Fails with [`Error::WouldOverwrite`] if an output file in `dir` already holds data and
    /// overwriting was not allowed.
    pub fn check(&self, dir: &Path) -> Result<()> {
        if self.force {
            return Ok(());
        }
        for resource_type in RESOURCE_TYPES {
            let path = Self::file_for(dir, resource_type);
            if std::fs::metadata(&path).is_ok_and(|m| m.len() > 0) {
                return Err(Error::WouldOverwrite(path));
            }
        }
        Ok(())
    }

    /// Creates `dir` if needed and writes every file; `progress` is called after each chunk
    /// with the patients and resources written so far.
    pub fn write(&self, dir: &Path, mut progress: impl FnMut(u64, u64)) -> Result<ExportSummary> {
        self.check(dir)?;
        std::fs::create_dir_all(dir).map_err(|source| Error::Io {
            path: dir.to_owned(),
            source,
        })?;
        let files: Vec<PathBuf> = RESOURCE_TYPES
            .iter()
            .map(|t| Self::file_for(dir, t))
            .collect();
        let mut writers = Vec::with_capacity(files.len());
        for path in &files {
            let file = File::create(path).map_err(|source| Error::Io {
                path: path.clone(),
                source,
            })?;
            writers.push(BufWriter::with_capacity(BUFFER, file));
        }
        let mut counts = vec![0u64; RESOURCE_TYPES.len()];
        let mut bytes = 0u64;
        let mut patients_done = 0u64;
        let mut write_chunk = |chunk: Chunk, writers: &mut Vec<BufWriter<File>>| -> Result<()> {
            for (slot, buffer) in chunk.buffers.iter().enumerate() {
                writers[slot]
                    .write_all(buffer)
                    .map_err(|source| Error::Io {
                        path: files[slot].clone(),
                        source,
                    })?;
                bytes += buffer.len() as u64;
                counts[slot] += chunk.counts[slot];
            }
            patients_done += chunk.patients;
            progress(patients_done, counts.iter().sum());
            Ok(())
        };

        let cohort = self.cohort;
        let mut next = self.patients.start;
        let end = self.patients.end;
        thread::scope(|scope| -> Result<()> {
            // Each round generates `threads` chunks while the previous round is written, so
            // the disk and the cores work at the same time and output order is preserved.
            let mut previous: Vec<Chunk> = Vec::new();
            loop {
                let mut handles = Vec::with_capacity(self.threads);
                while handles.len() < self.threads && next < end {
                    let range = next..(next + CHUNK).min(end);
                    next = range.end;
                    handles.push(scope.spawn(move || generate(&cohort, range)));
                }
                for chunk in previous.drain(..) {
                    write_chunk(chunk, &mut writers)?;
                }
                if handles.is_empty() {
                    return Ok(());
                }
                for handle in handles {
                    match handle.join() {
                        Ok(chunk) => previous.push(chunk),
                        // A panic in the generator is a bug: let it surface as one.
                        Err(payload) => std::panic::resume_unwind(payload),
                    }
                }
            }
        })?;
        for (writer, path) in writers.iter_mut().zip(&files) {
            writer.flush().map_err(|source| Error::Io {
                path: path.clone(),
                source,
            })?;
        }
        Ok(ExportSummary {
            patients: patients_done,
            counts: RESOURCE_TYPES.iter().copied().zip(counts).collect(),
            bytes,
            files,
        })
    }
}
