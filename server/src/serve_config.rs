//! The hardening flags of `fhirkeep serve` (TLS, CORS, limits) and `--config FILE`: a TOML
//! file that may give every serve setting, under the flags given on the command line.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::parser::ValueSource;
use clap::{ArgMatches, Args, ValueEnum as _};
use serde::Deserialize;

use crate::http::hardening::{self, Hardening};
use crate::{AuthArgs, AuthKind, DbArgs};

/// The hardening flags of `serve`.
#[derive(Debug, Args, Clone)]
pub(crate) struct HardeningArgs {
    /// TOML file with serve settings (keys: the flag names with `_`, e.g. `tls_cert`,
    /// `cors_origins = [..]`); flags given on the command line override it.
    #[arg(long, value_name = "FILE")]
    pub(crate) config: Option<PathBuf>,
    /// PEM certificate chain: serve HTTPS (with --tls-key). Read again, with the key, on
    /// SIGHUP (e.g. from a renewal hook); a pair that does not fit keeps the old one.
    #[arg(long, value_name = "FILE")]
    pub(crate) tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, value_name = "FILE")]
    pub(crate) tls_key: Option<PathBuf>,
    /// Also accept TLS 1.2 (default: TLS 1.3 only).
    #[arg(long)]
    pub(crate) tls12: bool,
    /// PEM file of CA certificates: require every client to present a certificate issued
    /// under one of them (mutual TLS). Read again on SIGHUP with the server's certificate.
    /// Requests are still authorized by --auth; the certificate only admits the connection.
    #[arg(long, value_name = "FILE")]
    pub(crate) tls_client_ca: Option<PathBuf>,
    /// An origin browsers may call the API from (repeatable, exact `scheme://host[:port]`);
    /// without one, cross-origin browser requests are refused.
    #[arg(long = "cors-origin", value_name = "ORIGIN")]
    pub(crate) cors_origins: Vec<String>,
    /// Largest search page: `_count` above it is capped.
    #[arg(long, value_name = "N", default_value_t = fhirkeep_query::SearchLimits::default().max_count)]
    pub(crate) max_count: usize,
    /// Deepest JSON nesting of a request body (deeper bodies are answered 400).
    #[arg(long, value_name = "N", default_value_t = hardening::DEFAULT_MAX_JSON_DEPTH)]
    pub(crate) max_json_depth: usize,
    /// Requests per second per client (token subject, else source address); over it: 429.
    /// 0 turns the limit off.
    #[arg(long, value_name = "N", default_value_t = hardening::DEFAULT_RATE_LIMIT)]
    pub(crate) rate_limit: u32,
    /// Longest time a request may take (`30s`, `2m`); slower ones are answered 503.
    #[arg(long, value_name = "DURATION", default_value = "30s")]
    pub(crate) request_timeout: String,
    /// Most threads running database calls at once (0: tokio's default, 512). A small number
    /// (such as 4 per core) keeps reads' tail latency low on a small machine, at the cost of
    /// reads waiting while that many slow calls (large transactions) run.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub(crate) blocking_threads: usize,
}

/// Every key a `--config` file may hold; any other key is an error that names it.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<SocketAddr>,
    db: Option<PathBuf>,
    key_file: Option<PathBuf>,
    verify_on_open: Option<bool>,
    base_url: Option<String>,
    auth: Option<String>,
    jwks: Option<PathBuf>,
    issuer: Option<String>,
    deny_status: Option<u16>,
    require_mfa_for_privileged: Option<bool>,
    authorize_url: Option<String>,
    token_url: Option<String>,
    max_body_bytes: Option<usize>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    tls12: Option<bool>,
    tls_client_ca: Option<PathBuf>,
    cors_origins: Option<Vec<String>>,
    max_count: Option<usize>,
    max_json_depth: Option<usize>,
    rate_limit: Option<u32>,
    request_timeout: Option<String>,
    blocking_threads: Option<usize>,
}

/// The serve settings `--config` may change, as the command line parsed them.
#[derive(Debug)]
pub(crate) struct ServeSettings<'a> {
    pub(crate) db: &'a mut DbArgs,
    pub(crate) listen: &'a mut SocketAddr,
    pub(crate) auth: &'a mut AuthArgs,
    pub(crate) base_url: &'a mut Option<String>,
    pub(crate) max_body_bytes: &'a mut usize,
    pub(crate) hardening: &'a mut HardeningArgs,
}

/// Reads `--config` (if given) into `settings`, except for the settings given on the
/// command line (`matches`: the `serve` subcommand's).
pub(crate) fn apply_config_file(settings: ServeSettings<'_>, matches: &ArgMatches) -> Result<()> {
    let Some(path) = settings.hardening.config.clone() else {
        return Ok(());
    };
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read the config file {}", path.display()))?;
    apply_toml(&text, &path, settings, matches)
}

fn apply_toml(
    text: &str,
    path: &Path,
    settings: ServeSettings<'_>,
    matches: &ArgMatches,
) -> Result<()> {
    let file: FileConfig =
        toml::from_str(text).map_err(|error| anyhow::anyhow!("{}: {error}", path.display()))?;
    // Whether the flag `id` was typed: then it wins over the file.
    let typed = |id: &str| matches.value_source(id) == Some(ValueSource::CommandLine);
    macro_rules! take {
        ($value:expr, $id:literal, $target:expr) => {
            if let Some(value) = $value
                && !typed($id)
            {
                $target = value;
            }
        };
    }
    let ServeSettings {
        db,
        listen,
        auth,
        base_url,
        max_body_bytes,
        hardening,
    } = settings;
    take!(file.listen, "listen", *listen);
    take!(file.db, "db", db.db);
    take!(file.key_file.map(Some), "key_file", db.key_file);
    take!(file.verify_on_open, "verify_on_open", db.verify_on_open);
    take!(file.base_url.map(Some), "base_url", *base_url);
    if let Some(kind) = file.auth.as_deref() {
        let kind = AuthKind::from_str(kind, false).map_err(|_| {
            anyhow::anyhow!(
                "{}: auth must be \"none\" or \"smart\", not {kind:?}",
                path.display()
            )
        })?;
        take!(Some(kind), "auth", auth.auth);
    }
    take!(file.jwks.map(Some), "jwks", auth.jwks);
    take!(file.issuer.map(Some), "issuer", auth.issuer);
    if let Some(status) = file.deny_status
        && !(403..=404).contains(&status)
    {
        bail!("{}: deny_status must be 403 or 404", path.display());
    }
    take!(file.deny_status, "deny_status", auth.deny_status);
    take!(
        file.require_mfa_for_privileged,
        "require_mfa_for_privileged",
        auth.require_mfa_for_privileged
    );
    take!(
        file.authorize_url.map(Some),
        "authorize_url",
        auth.authorize_url
    );
    take!(file.token_url.map(Some), "token_url", auth.token_url);
    take!(file.max_body_bytes, "max_body_bytes", *max_body_bytes);
    take!(file.tls_cert.map(Some), "tls_cert", hardening.tls_cert);
    take!(file.tls_key.map(Some), "tls_key", hardening.tls_key);
    take!(file.tls12, "tls12", hardening.tls12);
    take!(
        file.tls_client_ca.map(Some),
        "tls_client_ca",
        hardening.tls_client_ca
    );
    take!(file.cors_origins, "cors_origins", hardening.cors_origins);
    take!(file.max_count, "max_count", hardening.max_count);
    take!(
        file.max_json_depth,
        "max_json_depth",
        hardening.max_json_depth
    );
    take!(file.rate_limit, "rate_limit", hardening.rate_limit);
    take!(
        file.request_timeout,
        "request_timeout",
        hardening.request_timeout
    );
    take!(
        file.blocking_threads,
        "blocking_threads",
        hardening.blocking_threads
    );
    Ok(())
}

/// The checked hardening settings, and the TLS configuration if `--tls-cert` is given.
pub(crate) fn hardening(
    args: &HardeningArgs,
) -> Result<(Hardening, Option<crate::http::tls::TlsSettings>)> {
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(crate::http::tls::TlsSettings::load(
            cert,
            key,
            args.tls_client_ca.as_deref(),
            args.tls12,
        )?),
        (None, None) if args.tls12 => bail!("--tls12 needs --tls-cert and --tls-key"),
        (None, None) if args.tls_client_ca.is_some() => {
            bail!("--tls-client-ca needs --tls-cert and --tls-key")
        }
        (None, None) => None,
        _ => bail!("--tls-cert and --tls-key go together"),
    };
    let cors_origins = args
        .cors_origins
        .iter()
        .map(|origin| hardening::parse_origin(origin).map_err(anyhow::Error::msg))
        .collect::<Result<Vec<_>>>()?;
    if args.max_json_depth == 0 {
        bail!("--max-json-depth must be at least 1");
    }
    if args.max_count == 0 {
        bail!("--max-count must be at least 1");
    }
    let seconds =
        crate::parse_duration_seconds(&args.request_timeout).context("--request-timeout")?;
    if seconds <= 0 {
        bail!("--request-timeout must be positive");
    }
    let hardening = Hardening {
        tls: tls.is_some(),
        cors_origins,
        max_json_depth: args.max_json_depth,
        rate_limiter: (args.rate_limit > 0).then(|| crate::http::RateLimiter::new(args.rate_limit)),
        request_timeout: Duration::from_secs(seconds.unsigned_abs()),
    };
    Ok((hardening, tls))
}

/// The search limits of `--max-count` (the default page size shrinks with it).
pub(crate) fn search_limits(args: &HardeningArgs) -> fhirkeep_query::SearchLimits {
    let defaults = fhirkeep_query::SearchLimits::default();
    fhirkeep_query::SearchLimits {
        max_count: args.max_count,
        default_count: defaults.default_count.min(args.max_count),
        ..defaults
    }
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory as _, FromArgMatches as _};

    use super::*;
    use crate::{Cli, Command};

    /// Parses `serve ARGS`, applies `toml`, and returns the resulting settings.
    fn serve_with(
        args: &[&str],
        toml: &str,
    ) -> Result<(
        DbArgs,
        SocketAddr,
        AuthArgs,
        Option<String>,
        usize,
        HardeningArgs,
    )> {
        let matches = Cli::command().try_get_matches_from(
            std::iter::once("fhirkeep")
                .chain(std::iter::once("serve"))
                .chain(args.iter().copied()),
        )?;
        let cli = Cli::from_arg_matches(&matches)?;
        let Command::Serve(serve_args) = cli.command else {
            bail!("not serve");
        };
        let crate::ServeArgs {
            mut db,
            mut listen,
            mut auth,
            mut base_url,
            mut max_body_bytes,
            mut hardening,
            ..
        } = *serve_args;
        let serve = matches
            .subcommand_matches("serve")
            .context("serve matches")?;
        apply_toml(
            toml,
            Path::new("test.toml"),
            ServeSettings {
                db: &mut db,
                listen: &mut listen,
                auth: &mut auth,
                base_url: &mut base_url,
                max_body_bytes: &mut max_body_bytes,
                hardening: &mut hardening,
            },
            serve,
        )?;
        Ok((db, listen, auth, base_url, max_body_bytes, hardening))
    }

    const FULL: &str = r#"
        listen = "0.0.0.0:8443"
        db = "/srv/fhirkeep"
        key_file = "/etc/fhirkeep/key"
        verify_on_open = true
        base_url = "https://fhir.example.org/fhir"
        auth = "smart"
        jwks = "/etc/fhirkeep/jwks.json"
        issuer = "https://auth.example.org"
        deny_status = 403
        require_mfa_for_privileged = true
        authorize_url = "https://auth.example.org/authorize"
        token_url = "https://auth.example.org/token"
        max_body_bytes = 1048576
        tls_cert = "/etc/fhirkeep/cert.pem"
        tls_key = "/etc/fhirkeep/key.pem"
        tls12 = true
        cors_origins = ["https://app.example.org", "http://localhost:3000"]
        max_count = 200
        max_json_depth = 32
        rate_limit = 50
        request_timeout = "10s"
        blocking_threads = 8
    "#;

    #[test]
    fn every_key_of_the_file_is_applied() {
        let (db, listen, auth, base_url, max_body, h) = serve_with(&[], FULL).unwrap();
        assert_eq!(listen, "0.0.0.0:8443".parse::<SocketAddr>().unwrap());
        assert_eq!(db.db, PathBuf::from("/srv/fhirkeep"));
        assert_eq!(db.key_file, Some(PathBuf::from("/etc/fhirkeep/key")));
        assert!(db.verify_on_open);
        assert_eq!(base_url.as_deref(), Some("https://fhir.example.org/fhir"));
        assert_eq!(auth.auth, AuthKind::Smart);
        assert_eq!(auth.jwks, Some(PathBuf::from("/etc/fhirkeep/jwks.json")));
        assert_eq!(auth.issuer.as_deref(), Some("https://auth.example.org"));
        assert_eq!(auth.deny_status, 403);
        assert!(auth.require_mfa_for_privileged);
        assert_eq!(
            auth.authorize_url.as_deref(),
            Some("https://auth.example.org/authorize")
        );
        assert_eq!(
            auth.token_url.as_deref(),
            Some("https://auth.example.org/token")
        );
        assert_eq!(max_body, 1_048_576);
        assert_eq!(h.tls_cert, Some(PathBuf::from("/etc/fhirkeep/cert.pem")));
        assert_eq!(h.tls_key, Some(PathBuf::from("/etc/fhirkeep/key.pem")));
        assert!(h.tls12);
        assert_eq!(
            h.cors_origins,
            ["https://app.example.org", "http://localhost:3000"]
        );
        assert_eq!((h.max_count, h.max_json_depth, h.rate_limit), (200, 32, 50));
        assert_eq!(h.request_timeout, "10s");
        assert_eq!(h.blocking_threads, 8);
    }

    #[test]
    fn flags_on_the_command_line_win_over_the_file() {
        let (db, listen, auth, _, max_body, h) = serve_with(
            &[
                "--listen",
                "127.0.0.1:9000",
                "--max-count",
                "7",
                "--cors-origin",
                "https://other.example.org",
                "--deny-status",
                "404",
            ],
            FULL,
        )
        .unwrap();
        assert_eq!(listen, "127.0.0.1:9000".parse::<SocketAddr>().unwrap());
        assert_eq!(h.max_count, 7);
        assert_eq!(h.cors_origins, ["https://other.example.org"]);
        // Typed, though equal to the default: still wins.
        assert_eq!(auth.deny_status, 404);
        // Not typed: the file's values.
        assert_eq!(db.db, PathBuf::from("/srv/fhirkeep"));
        assert_eq!(max_body, 1_048_576);
        assert_eq!(h.rate_limit, 50);
        // Without a file, the defaults.
        let (_, listen, _, _, _, h) = serve_with(&[], "").unwrap();
        assert_eq!(listen, "127.0.0.1:8080".parse::<SocketAddr>().unwrap());
        assert_eq!(h.max_json_depth, hardening::DEFAULT_MAX_JSON_DEPTH);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors_that_name_them() {
        let error = serve_with(&[], "listen = \"127.0.0.1:1\"\nmax_cout = 5\n")
            .unwrap_err()
            .to_string();
        assert!(error.contains("max_cout"), "{error}");
        let error = serve_with(&[], "auth = \"basic\"").unwrap_err().to_string();
        assert!(error.contains("auth must be"), "{error}");
        let error = serve_with(&[], "deny_status = 500")
            .unwrap_err()
            .to_string();
        assert!(error.contains("deny_status"), "{error}");
        let error = serve_with(&[], "rate_limit = \"fast\"")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("rate_limit") || error.contains("integer"),
            "{error}"
        );
    }

    #[test]
    fn hardening_checks_its_values() {
        let (_, _, _, _, _, mut h) = serve_with(&[], "").unwrap();
        let (checked, tls) = hardening(&h).unwrap();
        assert!(tls.is_none() && !checked.tls && checked.cors_origins.is_empty());
        assert_eq!(checked.request_timeout, Duration::from_secs(30));
        h.cors_origins = vec!["*".into()];
        assert!(hardening(&h).is_err());
        h.cors_origins.clear();
        h.tls_cert = Some(PathBuf::from("cert.pem"));
        let error = hardening(&h).unwrap_err().to_string();
        assert!(error.contains("go together"), "{error}");
        h.tls_cert = None;
        h.tls12 = true;
        assert!(hardening(&h).is_err());
        h.tls12 = false;
        h.max_json_depth = 0;
        assert!(hardening(&h).is_err());
        h.max_json_depth = 8;
        h.request_timeout = "0s".into();
        assert!(hardening(&h).is_err());
    }
}
