//! The `fhirkeep` command-line tool: create, load, read, search, check and audit a database.

mod r#gen;
mod http;
mod import;
mod serve_config;

/// mimalloc: the store, the index and the server allocate and free many small objects
/// across threads, where it costs about a fifth less CPU than the system allocator
/// (BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Args, CommandFactory as _, FromArgMatches as _, Parser, Subcommand};
use fhirkeep_engine::audit::AuditAction;
use fhirkeep_engine::audit::SignedTreeHead;
use fhirkeep_engine::crypto::{KdfParams, KeySource, Keyring, create_key_file};
use fhirkeep_engine::store::{AccessContext, AccessRecord, HistoryQuery, Store};
use fhirkeep_query::params::{Handling, parse_search_url};
use fhirkeep_query::{Database, EntryMode};
use std::io::Write as _;

/// fhirkeep: an embedded, encrypted, auditable FHIR database.
///
/// Every command needs the database key: `--key-file FILE` or the environment variable
/// FHIRKEEP_PASSPHRASE (never pass a passphrase on the command line: others can read it).
#[derive(Debug, Parser)]
#[command(name = "fhirkeep", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// The settings of `fhirkeep serve` (boxed in [`Command`]: by far its largest variant).
#[derive(Debug, Args)]
struct ServeArgs {
    #[command(flatten)]
    db: DbArgs,
    /// Address to listen on (loopback only with `--auth none`); port 0 picks a free port.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8080")]
    listen: std::net::SocketAddr,
    #[command(flatten)]
    auth: AuthArgs,
    /// The URL clients reach the server at (for Location headers and Bundle links); the
    /// API is served at its path (http://HOST/fhir serves /fhir/metadata). Default:
    /// http://ADDR.
    #[arg(long, value_name = "URL")]
    base_url: Option<String>,
    /// Largest request body in bytes (larger ones are answered 413).
    #[arg(long, value_name = "BYTES", default_value_t = http::DEFAULT_BODY_LIMIT)]
    max_body_bytes: usize,
    /// Load the official R4 examples first if the database is empty (default archive:
    /// the one shipped in testdata/).
    #[arg(
        long,
        value_name = "TGZ",
        num_args = 0..=1,
        default_missing_value = "testdata/r4/hl7.fhir.r4.examples-4.0.1.tgz"
    )]
    load_samples: Option<PathBuf>,
    #[command(flatten)]
    hardening: serve_config::HardeningArgs,
    /// How long Bulk Data `$export` jobs and their (encrypted) files are kept: e.g. 90s,
    /// 15m, 1h.
    #[arg(long, value_name = "DURATION", default_value = "1h")]
    export_ttl: String,
}

/// Key file used when none is named and no passphrase is set (the embedded default).
const DEFAULT_KEY_FILE: &str = "fhirkeep.keyfile";

#[derive(Debug, Args, Clone)]
struct DbArgs {
    /// Database directory.
    #[arg(long, value_name = "DIR", default_value = "./data")]
    db: PathBuf,
    /// File holding the 32-byte database key (64 hex characters). Alternative: FHIRKEEP_PASSPHRASE.
    #[arg(long, value_name = "FILE")]
    key_file: Option<PathBuf>,
    /// Argon2id memory in KiB when deriving a key from a passphrase (default 65536 = 64 MiB).
    /// Lower it only for tests.
    #[arg(long, value_name = "KIB", hide = true)]
    kdf_memory_kib: Option<u32>,
    /// Verify every page's checksum while opening (reads the whole file). Catches pages
    /// replayed from an older copy of the database, which still authenticate.
    #[arg(long)]
    verify_on_open: bool,
}

impl DbArgs {
    /// The key named on the command line, else FHIRKEEP_PASSPHRASE, else the embedded
    /// default key file `DIR/fhirkeep.keyfile` if it exists.
    fn key_source(&self) -> Result<KeySource> {
        if let Some(path) = &self.key_file {
            return Ok(KeySource::KeyFile(path.clone()));
        }
        match std::env::var("FHIRKEEP_PASSPHRASE") {
            Ok(passphrase) if !passphrase.is_empty() => {
                return Ok(KeySource::Passphrase(passphrase.into()));
            }
            _ => {}
        }
        let default = self.default_key_file();
        if default.exists() {
            return Ok(KeySource::KeyFile(default));
        }
        bail!("no key given: pass --key-file FILE or set FHIRKEEP_PASSPHRASE")
    }

    fn default_key_file(&self) -> PathBuf {
        self.db.join(DEFAULT_KEY_FILE)
    }

    fn kdf(&self) -> KdfParams {
        let mut kdf = KdfParams::default();
        if let Some(kib) = self.kdf_memory_kib {
            kdf.m_cost_kib = kib;
            kdf.t_cost = 1;
        }
        kdf
    }

    fn open(&self) -> Result<Store> {
        Ok(Store::builder(&self.db)
            .key(self.key_source()?)
            .verify_on_open(self.verify_on_open)
            .open()?)
    }

    /// The store with its search index (brought in line with the store while opening).
    fn open_database(&self) -> Result<Database> {
        Ok(Database::builder(&self.db)
            .key(self.key_source()?)
            .verify_on_open(self.verify_on_open)
            .open()?)
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Embedded default: create ./data and its key file on first start, load the R4 samples.
    Demo {
        #[command(flatten)]
        db: DbArgs,
        /// The R4 examples package to load (default: the one shipped in testdata/).
        #[arg(
            long,
            value_name = "TGZ",
            default_value = "testdata/r4/hl7.fhir.r4.examples-4.0.1.tgz"
        )]
        samples: PathBuf,
    },
    /// Serve the database as a FHIR R4 REST server (application/fhir+json).
    ///
    /// With no arguments: the database in ./data (created, with its key file, on first start),
    /// listening on 127.0.0.1:8080 without authentication, which is allowed on a loopback
    /// address only. With `--auth smart` every request but /metadata and
    /// /.well-known/smart-configuration needs a SMART on FHIR bearer token (a JWT signed by a
    /// key of `--jwks` or minted by `fhirkeep token`), and any address may be used.
    Serve(Box<ServeArgs>),
    /// Mint a SMART on FHIR access token signed by the server's own issuer key.
    ///
    /// The key is derived from the database key (nothing is stored), so only someone holding
    /// the database key can mint tokens, and `fhirkeep serve --auth smart` on this database
    /// accepts them. The token is printed on stdout, nothing else; it works while the server
    /// runs. Keep it secret: it is a password until it expires.
    Token {
        #[command(flatten)]
        db: DbArgs,
        /// Space-separated SMART scopes, e.g. "patient/*.rs" or "system/Observation.cruds".
        #[arg(long)]
        scope: String,
        /// The patient of the launch context (needed by patient/ scopes).
        #[arg(long, value_name = "ID")]
        patient: Option<String>,
        /// Lifetime: e.g. 90s, 15m, 1h (at most 60 minutes).
        #[arg(long, default_value = "15m")]
        ttl: String,
        /// The subject (`sub`) recorded in the audit log for requests with this token.
        #[arg(long, value_name = "NAME")]
        subject: Option<String>,
        /// The client application (`client_id`) recorded in the audit log.
        #[arg(long, value_name = "NAME", default_value = "fhirkeep-token")]
        client_id: String,
        /// The server's base URL (the token's `iss` and `aud`); must match `serve --base-url`.
        #[arg(long, value_name = "URL", default_value = "http://127.0.0.1:8080")]
        base_url: String,
    },
    /// Generate deterministic synthetic FHIR R4 data: NDJSON, one file per resource type.
    ///
    /// Patients with demographics and years of history: Encounters, Observations (vital signs
    /// and labs, LOINC/UCUM), Conditions (SNOMED), MedicationRequests (RxNorm), Procedures,
    /// Immunizations (CVX) and DiagnosticReports, every reference resolving inside the output.
    /// The same seed gives the same bytes; dates end at an epoch derived from the seed. Load
    /// the result with `fhirkeep import --db DB DIR`. Refuses to overwrite non-empty files
    /// unless --force.
    Gen(r#gen::GenArgs),
    /// Create a database (and the key file, mode 0600, if it does not exist yet).
    Init {
        #[command(flatten)]
        db: DbArgs,
    },
    /// Load .json (a resource or a Bundle), .ndjson files, or directories of them.
    ///
    /// Resources that carry an id keep it; batch and transaction Bundles are applied, other
    /// Bundles are stored as Bundle resources. A bad line is reported with its file and line
    /// number and does not stop the rest. Exits with status 1 if anything was rejected.
    Import {
        #[command(flatten)]
        db: DbArgs,
        /// Files or directories to load.
        #[arg(required = true, value_name = "PATH")]
        paths: Vec<PathBuf>,
        /// Resources per durable commit.
        #[arg(long, default_value_t = 1000)]
        batch: usize,
    },
    /// Search, e.g. `fhirkeep search 'Patient?family=chalmers&birthdate=ge1970'`.
    ///
    /// Prints the searchset Bundle (or `Type/id` lines with --ids). The query is FHIR search
    /// syntax: parameters, modifiers, prefixes, chains, _has, _include, _sort, _count, ...
    /// Unknown parameters are errors unless --lenient.
    Search {
        #[command(flatten)]
        db: DbArgs,
        /// TYPE?query, Patient/ID/TYPE?query (compartment), or ?query (all types).
        query: String,
        /// Print `Type/id` lines of the matches instead of the Bundle (every page).
        #[arg(long)]
        ids: bool,
        /// Ignore unknown parameters (they are listed in the Bundle) instead of failing.
        #[arg(long)]
        lenient: bool,
        /// Base URL for fullUrl and links in the Bundle.
        #[arg(long, default_value = "http://localhost:8080/fhir")]
        base: String,
    },
    /// Rebuild the search index from the store (e.g. after adding SearchParameters).
    Reindex {
        #[command(flatten)]
        db: DbArgs,
    },
    /// Print a resource: TYPE/ID or TYPE/ID/_history/VID.
    Get {
        #[command(flatten)]
        db: DbArgs,
        /// TYPE/ID or TYPE/ID/_history/VID.
        reference: String,
    },
    /// Print the history Bundle of a resource (TYPE/ID), a type (TYPE) or everything (no argument).
    History {
        #[command(flatten)]
        db: DbArgs,
        /// TYPE/ID, TYPE, or nothing for the whole store.
        reference: Option<String>,
        /// Most entries to print.
        #[arg(long)]
        count: Option<usize>,
    },
    /// Decrypt and authenticate every page, check redb's integrity and verify the audit log.
    Check {
        #[command(flatten)]
        db: DbArgs,
    },
    /// Give the space of free pages back: rewrite the store file and the auxiliary files
    /// (search index, exports) with their live pages only. Files never shrink on their own,
    /// and a bulk load leaves the index with many free pages. Run it with the server stopped.
    Compact {
        #[command(flatten)]
        db: DbArgs,
    },
    /// Show where the bytes go: entries and bytes of every table of the store file and of
    /// the auxiliary files (search index, exports). Sizes only, no content.
    Stats {
        #[command(flatten)]
        db: DbArgs,
    },
    /// Signed tree heads, verification and proofs of the Merkle audit log.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Copy the database into NEWDIR, re-encrypting every page under a fresh data key.
    ///
    /// The copy is written in the current data file format (2), so this also converts a
    /// database written in format 1 (`fhirkeep check` says when one is).
    ///
    /// Versions, history and the audit log (and its signing key) are copied as they are. The
    /// copy is keyed by --new-key-file, FHIRKEEP_NEW_PASSPHRASE (with --new-passphrase-from-env),
    /// or else the same key as the source. Swap the directories yourself once it is done.
    Copy {
        #[command(flatten)]
        db: DbArgs,
        /// Directory of the new database (must not exist).
        #[arg(long, value_name = "NEWDIR")]
        to: PathBuf,
        /// Key file for the copy (created with mode 0600 if it does not exist).
        #[arg(long, value_name = "FILE")]
        new_key_file: Option<PathBuf>,
        /// Take the copy's passphrase from FHIRKEEP_NEW_PASSPHRASE.
        #[arg(long, conflicts_with = "new_key_file")]
        new_passphrase_from_env: bool,
    },
    /// Change the passphrase or key file (O(1): re-wraps the data key), or rotate the data key.
    Rekey {
        #[command(flatten)]
        db: DbArgs,
        /// New key file (created with mode 0600 if it does not exist).
        #[arg(long, value_name = "FILE", conflicts_with = "rotate_data_key")]
        new_key_file: Option<PathBuf>,
        /// Take the new passphrase from FHIRKEEP_NEW_PASSPHRASE.
        #[arg(long, conflicts_with_all = ["new_key_file", "rotate_data_key"])]
        new_passphrase_from_env: bool,
        /// Start a new data key for new page writes; old pages stay readable.
        #[arg(long)]
        rotate_data_key: bool,
    },
}

/// How `serve` authenticates requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum AuthKind {
    /// No authentication (loopback addresses only).
    None,
    /// SMART on FHIR bearer tokens (JWT).
    Smart,
}

#[derive(Debug, Args, Clone)]
struct AuthArgs {
    /// Authentication: none (loopback only) or smart (SMART on FHIR bearer tokens).
    #[arg(long, value_enum, default_value = "none")]
    auth: AuthKind,
    /// JSON Web Key Set file with the public keys of trusted token issuers (RS256, ES256,
    /// EdDSA). The server's own issuer key (`fhirkeep token`) is always trusted.
    #[arg(long, value_name = "FILE")]
    jwks: Option<PathBuf>,
    /// The only issuer (`iss`) accepted for tokens signed by `--jwks` keys.
    #[arg(long, value_name = "URL")]
    issuer: Option<String>,
    /// The status for a resource outside the token's reach: 404 (default: its existence is
    /// not revealed) or 403.
    #[arg(long, value_name = "STATUS", default_value_t = 404,
          value_parser = clap::value_parser!(u16).range(403..=404))]
    deny_status: u16,
    /// Drop system/ scopes and the write letters of user/ scopes unless the token's `amr`
    /// claim contains "mfa".
    #[arg(long)]
    require_mfa_for_privileged: bool,
    /// The authorization endpoint of the authorization server that issues the tokens, to
    /// advertise in /.well-known/smart-configuration and /metadata (fhirkeep has none).
    #[arg(long, value_name = "URL")]
    authorize_url: Option<String>,
    /// The token endpoint of that authorization server, advertised likewise.
    #[arg(long, value_name = "URL")]
    token_url: Option<String>,
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Print the current signed tree head as JSON (keep it: it is what later audits check against).
    Head {
        #[command(flatten)]
        db: DbArgs,
    },
    /// Recompute the whole tree; with --trusted-head, also check against a head kept earlier.
    Verify {
        #[command(flatten)]
        db: DbArgs,
        /// A signed tree head JSON file saved from `fhirkeep audit head`.
        #[arg(long, value_name = "FILE")]
        trusted_head: Option<PathBuf>,
    },
    /// Replace the key that signs tree heads: prints the last head of the old key (it covers
    /// the rotation leaf naming the new key) and both public keys, as JSON.
    RotateKey {
        #[command(flatten)]
        db: DbArgs,
    },
    /// Print an inclusion proof for a leaf, or a consistency proof between two tree sizes.
    Prove {
        #[command(flatten)]
        db: DbArgs,
        /// Leaf sequence number to prove inclusion of.
        #[arg(long, conflicts_with_all = ["from", "to"])]
        leaf: Option<u64>,
        /// Tree size for the inclusion proof (default: current size).
        #[arg(long)]
        size: Option<u64>,
        /// Old tree size for a consistency proof.
        #[arg(long, requires = "to")]
        from: Option<u64>,
        /// New tree size for a consistency proof.
        #[arg(long, requires = "from")]
        to: Option<u64>,
    },
}

fn main() -> ExitCode {
    // Before the first large allocation: faults then clear 4 KiB, not 2 MiB (engine
    // `process` module). Failing to switch costs speed only.
    if let Err(error) = fhirkeep_engine::process::disable_transparent_huge_pages() {
        eprintln!("warning: transparent huge pages stay on: {error}");
    }
    // The matches are kept: `serve --config` needs to know which flags were typed.
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|error| error.exit());
    match run(cli, &matches) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn ctx(command: &str) -> AccessContext {
    AccessContext::local(format!("fhirkeep-cli/{command}"))
}

fn print_json(value: &serde_json::Value) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn run(cli: Cli, matches: &clap::ArgMatches) -> Result<ExitCode> {
    match cli.command {
        Command::Init { db } => init(&db),
        Command::Gen(args) => r#gen::run(&args),
        Command::Demo { db, samples } => demo(&db, &samples),
        Command::Serve(mut args) => {
            if let Some(serve_matches) = matches.subcommand_matches("serve") {
                serve_config::apply_config_file(
                    serve_config::ServeSettings {
                        db: &mut args.db,
                        listen: &mut args.listen,
                        auth: &mut args.auth,
                        base_url: &mut args.base_url,
                        max_body_bytes: &mut args.max_body_bytes,
                        hardening: &mut args.hardening,
                    },
                    serve_matches,
                )?;
            }
            serve(&args)
        }
        Command::Token {
            db,
            scope,
            patient,
            ttl,
            subject,
            client_id,
            base_url,
        } => token(
            &db,
            &TokenArgs {
                scope,
                patient,
                ttl,
                subject,
                client_id,
                base_url,
            },
        ),
        Command::Import { db, paths, batch } => {
            let database = db.open_database()?;
            let summary = import::import_paths(&database, &ctx("import"), &paths, batch.max(1))?;
            summary.print();
            Ok(if summary.rejected == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Search {
            db,
            query,
            ids,
            lenient,
            base,
        } => search(&db, &query, ids, lenient, &base),
        Command::Reindex { db } => {
            let database = db.open_database()?;
            let started = std::time::Instant::now();
            let report = database.reindex(&ctx("reindex"))?;
            eprintln!(
                "reindexed {} changes in {:.1} s ({} parameter expressions failed on some resource)",
                report.changes,
                started.elapsed().as_secs_f64(),
                report.expression_failures
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Get { db, reference } => {
            let store = db.open()?;
            let parts: Vec<&str> = reference.split('/').collect();
            let stored = match parts.as_slice() {
                [t, id] => store.read(&ctx("get"), t, id)?,
                [t, id, "_history", vid] => {
                    let vid: u64 = vid.parse().context("version id must be a number")?;
                    store.vread(&ctx("get"), t, id, vid)?
                }
                _ => bail!("expected TYPE/ID or TYPE/ID/_history/VID"),
            };
            print_json(&stored.to_json()?)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::History {
            db,
            reference,
            count,
        } => {
            let store = db.open()?;
            let query = HistoryQuery {
                count,
                ..HistoryQuery::default()
            };
            let page = match reference
                .as_deref()
                .map(|r| r.split('/').collect::<Vec<_>>())
            {
                None => store.history_system(&ctx("history"), &query)?,
                Some(parts) => match parts.as_slice() {
                    [t] => store.history_type(&ctx("history"), t, &query)?,
                    [t, id] => store.history_instance(&ctx("history"), t, id, &query)?,
                    _ => bail!("expected TYPE/ID, TYPE, or nothing"),
                },
            };
            print_json(&page.to_bundle()?)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Check { db } => check(&db),
        Command::Compact { db } => {
            let mut store = db.open()?;
            let report = store.compact(&ctx("compact"))?;
            for (file, before, after) in &report.files {
                println!("{file}: {before} -> {after} bytes");
            }
            let (before, after) = report.totals();
            println!("total: {before} -> {after} bytes");
            for (table, before, after) in &report.packed_tables {
                println!("packed table {table}: {before} -> {after} bytes");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Stats { db } => {
            let store = db.open()?;
            let tables = store.space_report(&ctx("stats"))?;
            print_space_report(&tables);
            Ok(ExitCode::SUCCESS)
        }
        Command::Audit { command } => audit(command),
        Command::Copy {
            db,
            to,
            new_key_file,
            new_passphrase_from_env,
        } => {
            let store = db.open()?;
            let key = new_key(new_key_file, new_passphrase_from_env)?
                .map_or_else(|| db.key_source(), Ok)?;
            let rows = store.copy_to(&ctx("copy"), &to, key, db.kdf())?;
            eprintln!(
                "copied {rows} rows into {}, encrypted under a fresh data key",
                to.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Rekey {
            db,
            new_key_file,
            new_passphrase_from_env,
            rotate_data_key: rotate,
        } => rekey(&db, new_key_file, new_passphrase_from_env, rotate),
    }
}

fn init(db: &DbArgs) -> Result<ExitCode> {
    if let Some(path) = &db.key_file
        && !path.exists()
    {
        create_key_file(path)?;
        eprintln!(
            "created key file {} (mode 0600): keep it safe and apart from backups of the database",
            path.display()
        );
    }
    let store = Store::builder(&db.db)
        .key(db.key_source()?)
        .kdf(db.kdf())
        .create()?;
    eprintln!("created database in {}", store.dir().display());
    Ok(ExitCode::SUCCESS)
}

/// The embedded default of `demo` and `serve`: without --key-file or FHIRKEEP_PASSPHRASE,
/// create `DIR/fhirkeep.keyfile` (mode 0600) on first start, and say where it is.
fn ensure_embedded_key(db: &DbArgs) -> Result<()> {
    let explicit_key = db.key_file.is_some() || std::env::var_os("FHIRKEEP_PASSPHRASE").is_some();
    let key_file = db.default_key_file();
    if !explicit_key && !key_file.exists() {
        std::fs::create_dir_all(&db.db)?;
        create_key_file(&key_file)?;
        eprintln!(
            "created key file {} (mode 0600).\nwarning: the key sits next to the data it protects; \
             in production use FHIRKEEP_PASSPHRASE or a key file kept elsewhere",
            key_file.display()
        );
    }
    Ok(())
}

/// The `--auth` settings as the HTTP layer takes them (reads and checks `--jwks`).
fn auth_mode(auth: &AuthArgs) -> Result<http::AuthMode> {
    if auth.auth == AuthKind::None {
        if auth.jwks.is_some()
            || auth.issuer.is_some()
            || auth.require_mfa_for_privileged
            || auth.authorize_url.is_some()
            || auth.token_url.is_some()
        {
            bail!(
                "--jwks, --issuer, --require-mfa-for-privileged, --authorize-url and \
                 --token-url need --auth smart"
            );
        }
        return Ok(http::AuthMode::None);
    }
    let jwks = match &auth.jwks {
        None => Vec::new(),
        Some(path) => {
            let (keys, skipped) = http::auth::load_jwks(path).map_err(anyhow::Error::msg)?;
            if skipped > 0 {
                eprintln!(
                    "warning: {skipped} key(s) of {} are not usable signature keys (RSA of \
                     2048 bits or more, EC P-256, Ed25519) and are ignored",
                    path.display()
                );
            }
            keys
        }
    };
    Ok(http::AuthMode::Smart(http::SmartSettings {
        jwks,
        // Read again while running, so that the issuer's key rotation needs no restart.
        jwks_file: auth.jwks.clone(),
        issuer: auth.issuer.clone(),
        require_mfa: auth.require_mfa_for_privileged,
        endpoints: http::OAuthUris {
            authorize: auth.authorize_url.clone(),
            token: auth.token_url.clone(),
        },
    }))
}

fn serve(args: &ServeArgs) -> Result<ExitCode> {
    let ServeArgs {
        db,
        auth,
        hardening,
        ..
    } = args;
    let (listen, max_body_bytes) = (args.listen, args.max_body_bytes);
    let base_url = args.base_url.clone();
    let load_samples = args.load_samples.as_deref();
    let export_ttl = args.export_ttl.as_str();
    // Checked before anything is created: a refused start leaves no trace on disk.
    if auth.auth == AuthKind::None && !http::is_loopback(&listen) {
        bail!(
            "refusing to listen on {listen} with --auth none: without authentication the \
             server only listens on a loopback address (127.0.0.1 or [::1]); use --auth smart \
             (SMART on FHIR bearer tokens) to listen on other addresses"
        );
    }
    let auth_mode = auth_mode(auth)?;
    let export_ttl = parse_duration_seconds(export_ttl)
        .ok()
        .and_then(|s| u64::try_from(s).ok())
        .filter(|&s| s > 0)
        .map(std::time::Duration::from_secs)
        .context("--export-ttl must be a positive duration such as 90s, 15m or 1h")?;
    let blocking_threads = hardening.blocking_threads;
    let (hardened, tls) = serve_config::hardening(hardening)?;
    if auth.auth == AuthKind::Smart && tls.is_none() && !http::is_loopback(&listen) {
        eprintln!(
            "warning: serving {listen} without TLS: bearer tokens and health data travel in \
             clear text; use --tls-cert and --tls-key (or a TLS proxy in front)"
        );
    }
    let deny_status = axum::http::StatusCode::from_u16(auth.deny_status)
        .unwrap_or(axum::http::StatusCode::NOT_FOUND);
    ensure_embedded_key(db)?;
    // Before logging is set up, and an open can take a while (the index catches up with the
    // store; the first open after an upgrade may convert the audit log): say what is going on.
    eprintln!("opening the database in {} ...", db.db.display());
    let database = Database::builder(&db.db)
        .key(db.key_source()?)
        .kdf(db.kdf())
        .verify_on_open(db.verify_on_open)
        .limits(serve_config::search_limits(hardening))
        .open_or_create()?;
    if let Some(samples) = load_samples {
        load_samples_if_empty(&database, &ctx("serve"), samples)?;
    }
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Another subscriber already set (none in this binary) is not worth failing for.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only for a terminal: log files and collectors get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if blocking_threads > 0 {
        runtime.max_blocking_threads(blocking_threads);
    }
    let runtime = runtime.enable_all().build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("cannot listen on {listen}"))?;
        let local = listener.local_addr()?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        let base_url = base_url.unwrap_or_else(|| format!("{scheme}://{local}"));
        let state = http::AppState::new(
            database,
            http::ServerConfig {
                base_url: base_url.clone(),
                max_body_bytes,
                auth: auth_mode,
                deny_status,
                hardening: hardened,
            },
        );
        state
            .start_exports(export_ttl)
            .map_err(|_| anyhow::anyhow!("could not open the export store (exports.redb)"))?;
        if state.smart().is_some() {
            eprintln!(
                "authentication: SMART on FHIR bearer tokens (aud must be {base_url}); mint one \
                 with `fhirkeep token --base-url {base_url}`"
            );
        } else {
            eprintln!(
                "warning: authentication is off (--auth none); this is allowed only because \
                 {local} is a loopback address"
            );
        }
        println!(
            "fhirkeep serving {} on {scheme}://{local} (base URL {base_url})",
            db.db.display()
        );
        std::io::stdout().flush()?;
        match tls {
            Some(tls) => http::tls::serve(listener, tls, state, http::shutdown_signal()).await?,
            None => http::serve(listener, state, http::shutdown_signal()).await?,
        }
        eprintln!("server stopped");
        anyhow::Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}

/// The arguments of `fhirkeep token`.
#[derive(Debug)]
struct TokenArgs {
    scope: String,
    patient: Option<String>,
    ttl: String,
    subject: Option<String>,
    client_id: String,
    base_url: String,
}

/// `90s`, `15m`, `1h`, or a number of seconds.
fn parse_duration_seconds(text: &str) -> Result<i64> {
    let text = text.trim();
    let (number, unit) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => text.split_at(i),
        None => (text, "s"),
    };
    let number: i64 = number
        .parse()
        .with_context(|| format!("{text:?} is not a duration such as 15m"))?;
    let unit = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        _ => bail!("{text:?} is not a duration such as 90s, 15m or 1h"),
    };
    number.checked_mul(unit).context("the duration is too long")
}

fn token(db: &DbArgs, args: &TokenArgs) -> Result<ExitCode> {
    let ttl = parse_duration_seconds(&args.ttl)?;
    if ttl <= 0 || ttl > http::auth::MAX_OWN_TOKEN_SECONDS {
        bail!("--ttl must be between 1 second and 60 minutes");
    }
    let scopes = http::scopes_of(&args.scope);
    if scopes.usable == 0 {
        bail!("--scope names no usable SMART scope (e.g. patient/*.rs, user/Observation.cruds)");
    }
    for ignored in &scopes.ignored {
        eprintln!("warning: scope {ignored:?} is not a usable SMART scope and grants nothing");
    }
    if let Some(patient) = &args.patient
        && !fhirkeep_engine::resource::is_valid_id(patient)
    {
        bail!("--patient must be a resource id");
    }
    if scopes.patient_scopes && args.patient.is_none() {
        bail!("patient/ scopes need --patient ID (the patient of the launch context)");
    }
    // The key header only: works while a server holds the database open.
    let keyring = Keyring::open(&db.db, &db.key_source()?)?;
    let key =
        http::auth::IssuerKey::from_secret(keyring.derive_subkey(http::auth::ISSUER_KEY_PURPOSE));
    drop(keyring);
    let now = chrono::Utc::now().timestamp();
    let base_url = args.base_url.trim_end_matches('/').to_owned();
    let subject = args
        .subject
        .clone()
        .unwrap_or_else(|| std::env::var("USER").unwrap_or_else(|_| "local".into()));
    let claims = http::auth::TokenClaims {
        iss: base_url.clone(),
        aud: base_url,
        sub: subject,
        client_id: args.client_id.clone(),
        iat: now,
        nbf: now,
        exp: now + ttl,
        jti: uuid::Uuid::new_v4().to_string(),
        scope: args.scope.split_whitespace().collect::<Vec<_>>().join(" "),
        patient: args.patient.clone(),
    };
    let token = key.sign(&claims).context("signing the token")?;
    println!("{token}");
    Ok(ExitCode::SUCCESS)
}

fn demo(db: &DbArgs, samples: &Path) -> Result<ExitCode> {
    ensure_embedded_key(db)?;
    let database = Database::builder(&db.db)
        .key(db.key_source()?)
        .kdf(db.kdf())
        .open_or_create()?;
    let store = database.store();
    load_samples_if_empty(&database, &ctx("demo"), samples)?;
    let head = store.audit_head()?;
    println!(
        "database: {} (audit log: {} leaves)",
        db.db.display(),
        head.size
    );
    println!("try:  cargo run --release --bin fhirkeep -- get Patient/example");
    println!("      cargo run --release --bin fhirkeep -- search 'Patient?family=chalmers'");
    println!(
        "      cargo run --release --bin fhirkeep -- search --ids 'Observation?code=http://loinc.org|29463-7'"
    );
    println!("      cargo run --release --bin fhirkeep -- history Patient/example");
    println!("      cargo run --release --bin fhirkeep -- check");
    println!("      cargo run --release --bin fhirkeep -- audit head");
    Ok(ExitCode::SUCCESS)
}

/// Loads the R4 examples archive into `database` if it holds no resource yet (the embedded
/// default's "sample data"); a database with data is left alone.
fn load_samples_if_empty(database: &Database, ctx: &AccessContext, samples: &Path) -> Result<()> {
    let already = database
        .store()
        .history_system(
            ctx,
            &HistoryQuery {
                count: Some(1),
                ..HistoryQuery::default()
            },
        )?
        .entries
        .len();
    if already > 0 {
        eprintln!(
            "database in {} already has data; no samples loaded",
            database.dir().display()
        );
        return Ok(());
    }
    if !samples.exists() {
        eprintln!(
            "sample data {} not found: run from the project root",
            samples.display()
        );
        return Ok(());
    }
    let started = std::time::Instant::now();
    let summary = import::import_tgz(database, ctx, samples)?;
    summary.print();
    eprintln!(
        "loaded the R4 examples in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn search(db: &DbArgs, query: &str, ids: bool, lenient: bool, base: &str) -> Result<ExitCode> {
    let database = db.open_database()?;
    let handling = if lenient {
        Handling::Lenient
    } else {
        Handling::Strict
    };
    let mut request = parse_search_url(&*database.registry()?, query, handling)?;
    let ctx = ctx("search");
    if !ids {
        print_json(
            &database
                .search(&ctx, &request)?
                .to_bundle(base.trim_end_matches('/')),
        )?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut out = std::io::stdout().lock();
    loop {
        let page = database.search(&ctx, &request)?;
        for entry in page.entries.iter().filter(|e| e.mode == EntryMode::Match) {
            writeln!(out, "{}", entry.key)?;
        }
        match page.next_cursor {
            Some(cursor) => request.cursor = Some(cursor),
            None => break,
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn check(db: &DbArgs) -> Result<ExitCode> {
    match Store::check(&ctx("check"), &db.db, db.key_source()?) {
        Ok(report) => {
            for warning in &report.warnings {
                eprintln!("warning: {warning}");
            }
            println!(
                "ok: {} page blocks authenticated ({} never written; page format {}), redb integrity ok, {} versions match their bodies and changes, audit log of {} leaves verified",
                report.pages.page_blocks,
                report.pages.zero_blocks,
                report.pages.format_version,
                report.versions,
                report.audit.leaves
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(error) => {
            eprintln!("check FAILED: {error}");
            Ok(ExitCode::FAILURE)
        }
    }
}

fn audit(command: AuditCommand) -> Result<ExitCode> {
    match command {
        AuditCommand::Head { db } => {
            let head = db.open()?.audit_head()?;
            println!("{}", head.to_json());
        }
        AuditCommand::Verify { db, trusted_head } => {
            let store = db.open()?;
            let report = match store.verify_audit() {
                Ok(report) => report,
                Err(error) => {
                    eprintln!("audit verification FAILED: {error}");
                    return Ok(ExitCode::FAILURE);
                }
            };
            if let Some(path) = trusted_head {
                let text = std::fs::read_to_string(&path)
                    .with_context(|| format!("reading {}", path.display()))?;
                let trusted = SignedTreeHead::from_json(&text)?;
                if let Err(error) = store.verify_audit_against(&trusted) {
                    eprintln!(
                        "audit verification FAILED against {}: {error}",
                        path.display()
                    );
                    return Ok(ExitCode::FAILURE);
                }
                println!("consistent with the trusted head of size {}", trusted.size);
            }
            println!(
                "ok: audit log of {} leaves verified ({} signing key{})",
                report.leaves,
                report.keys.len(),
                if report.keys.len() == 1 {
                    ""
                } else {
                    "s: rotated"
                }
            );
        }
        AuditCommand::RotateKey { db } => {
            let store = db.open()?;
            let head = store.rotate_audit_key(&ctx("audit-rotate-key"))?;
            let keys = store.audit_keys()?;
            let new_key = keys.last().map(|k| hex::encode(k.public_key));
            print_json(&serde_json::json!({
                "oldPublicKey": hex::encode(head.public_key),
                "newPublicKey": new_key,
                "rotationHead": serde_json::from_str::<serde_json::Value>(&head.to_json())?,
            }))?;
        }
        AuditCommand::Prove {
            db,
            leaf,
            size,
            from,
            to,
        } => {
            let store = db.open()?;
            match (leaf, from, to) {
                (Some(leaf), _, _) => {
                    let head = store.audit_head()?;
                    let size = size.unwrap_or(head.size);
                    let proof = store.prove_inclusion(leaf, size)?;
                    println!("{}", serde_json::to_string_pretty(&proof)?);
                }
                (None, Some(from), Some(to)) => {
                    let proof = store.prove_consistency(from, to)?;
                    println!("{}", serde_json::to_string_pretty(&proof)?);
                }
                _ => bail!("give --leaf N [--size S], or --from OLD --to NEW"),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn rekey(
    db: &DbArgs,
    new_key_file: Option<PathBuf>,
    new_passphrase_from_env: bool,
    rotate: bool,
) -> Result<ExitCode> {
    let old = db.key_source()?;
    let new = if rotate {
        None
    } else {
        let Some(new) = new_key(new_key_file, new_passphrase_from_env)? else {
            bail!(
                "say what to change: --new-key-file FILE, --new-passphrase-from-env, or --rotate-data-key"
            )
        };
        Some(new)
    };
    // Holding the store open keeps every other process (a server, another rekey) out while
    // the key header changes, and the rekey is audited by the same handle.
    let store = Store::builder(&db.db).key(old.clone()).open()?;
    let message = match &new {
        None => {
            let id = Keyring::rotate_data_key(&db.db, &old)?;
            format!("data key {id} becomes active for new page writes from the next open")
        }
        Some(new) => {
            Keyring::change_key(&db.db, &old, new, db.kdf())?;
            "the data key is now wrapped by the new key; the old key no longer opens the database"
                .to_owned()
        }
    };
    store.record_access(&ctx("rekey"), AccessRecord::succeeded(AuditAction::Rekey))?;
    store.flush_audit()?;
    eprintln!("{message}");
    Ok(ExitCode::SUCCESS)
}

/// The new key named by `--new-key-file` or `--new-passphrase-from-env`, if any.
fn new_key(new_key_file: Option<PathBuf>, from_env: bool) -> Result<Option<KeySource>> {
    match (new_key_file, from_env) {
        (Some(path), _) => {
            ensure_key_file(&path)?;
            Ok(Some(KeySource::KeyFile(path)))
        }
        (None, true) => match std::env::var("FHIRKEEP_NEW_PASSPHRASE") {
            Ok(p) if !p.is_empty() => Ok(Some(KeySource::Passphrase(p.into()))),
            _ => bail!("FHIRKEEP_NEW_PASSPHRASE is not set"),
        },
        (None, false) => Ok(None),
    }
}

fn ensure_key_file(path: &Path) -> Result<()> {
    if !path.exists() {
        create_key_file(path)?;
        eprintln!("created key file {} (mode 0600)", path.display());
    }
    Ok(())
}

/// Prints one line per table and a total per file; bytes per entry help size a disk.
fn print_space_report(tables: &[fhirkeep_engine::store::TableSpace]) {
    println!(
        "{:<16} {:<22} {:>12} {:>14} {:>12} {:>12} {:>10}",
        "file", "table", "entries", "stored bytes", "metadata", "fragmented", "B/entry"
    );
    for t in tables {
        let per_entry = t.total_bytes().checked_div(t.entries).unwrap_or(0);
        println!(
            "{:<16} {:<22} {:>12} {:>14} {:>12} {:>12} {:>10}",
            t.file,
            t.table,
            t.entries,
            t.stored_bytes,
            t.metadata_bytes,
            t.fragmented_bytes,
            per_entry
        );
    }
    let mut files: Vec<&str> = tables.iter().map(|t| t.file.as_str()).collect();
    files.dedup();
    for file in files {
        let total: u64 = tables
            .iter()
            .filter(|t| t.file == file)
            .map(|t| t.total_bytes())
            .sum();
        println!("{file}: {total} bytes in tables");
    }
}
