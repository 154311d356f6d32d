//! `fhirkeep gen`: deterministic synthetic FHIR R4 data as NDJSON, one file per resource type.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use fhirkeep_synth::{Cohort, Error as SynthError, NdjsonExport};
use indicatif::{ProgressBar, ProgressStyle};

/// Arguments of `fhirkeep gen`.
#[derive(Debug, clap::Args)]
pub(crate) struct GenArgs {
    /// Number of patients; each comes with years of history (about 200 resources on average).
    #[arg(long, value_name = "N")]
    patients: u64,
    /// Seed. The same seed and patients give byte-identical files, on any machine.
    #[arg(long, value_name = "S", default_value_t = 1)]
    seed: u64,
    /// Output directory (created if missing).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Index of the first patient: generates patients FIRST..FIRST+N of the seed's cohort, so
    /// a large cohort can be produced in slices (on several machines) and concatenated.
    #[arg(long, value_name = "FIRST", default_value_t = 0)]
    first: u64,
    /// Overwrite output files that already hold data.
    #[arg(long)]
    force: bool,
    /// Generator threads (default: every core). Output does not depend on it.
    #[arg(long, value_name = "T")]
    threads: Option<usize>,
    /// UUIDv7-shaped ids that rise in generation order within each type, as ids a server
    /// assigned at creation have (fhirkeep assigns UUIDv7). Default: random UUIDv4 ids.
    #[arg(long)]
    time_ordered_ids: bool,
}

pub(crate) fn run(args: &GenArgs) -> Result<ExitCode> {
    let Some(end) = args.first.checked_add(args.patients) else {
        bail!("--first plus --patients is too large");
    };
    let mut cohort = Cohort::new(args.seed);
    if args.time_ordered_ids {
        cohort = cohort.with_time_ordered_ids();
    }
    let mut export = NdjsonExport::new(cohort, args.first..end).force(args.force);
    if let Some(threads) = args.threads {
        export = export.threads(threads);
    }
    let progress = if std::io::stderr().is_terminal() {
        let bar = ProgressBar::new(args.patients);
        bar.set_style(
            ProgressStyle::with_template("{bar:40} {pos}/{len} patients, {msg} ({eta} left)")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar
    } else {
        ProgressBar::hidden()
    };
    let started = Instant::now();
    let result = export.write(&args.out, |patients, resources| {
        progress.set_position(patients);
        progress.set_message(format!("{resources} resources"));
    });
    progress.finish_and_clear();
    let summary = match result {
        Ok(summary) => summary,
        Err(SynthError::WouldOverwrite(path)) => bail!(
            "{} already exists and is not empty; refusing to overwrite it (pass --force to overwrite)",
            path.display()
        ),
        Err(error) => {
            return Err(error).with_context(|| format!("writing {}", args.out.display()));
        }
    };
    let seconds = started.elapsed().as_secs_f64();
    for ((resource_type, count), file) in summary.counts.iter().zip(&summary.files) {
        println!("{resource_type:<18} {count:>12}  {}", file.display());
    }
    let total = summary.total();
    println!(
        "{:<18} {total:>12}  resources for {} patients, {:.1} MB, in {seconds:.1} s ({:.0} resources/s)",
        "total",
        summary.patients,
        summary.bytes as f64 / 1e6,
        total as f64 / seconds.max(1e-9)
    );
    eprintln!(
        "seed {}: histories end on {}; load with `fhirkeep import {}`",
        args.seed,
        cohort.epoch_date(),
        args.out.display()
    );
    Ok(ExitCode::SUCCESS)
}
