//! The FHIR R4 REST server behind `fhirkeep serve`: an axum [`Router`] over a [`Database`].
//!
//! [`app`] builds the router; [`serve`] runs it on a listener until a shutdown signal. Every
//! route goes through one envelope middleware (see `envelope.rs`) that negotiates the format,
//! serializes FHIR bodies, sets the security headers, logs without PHI and audits requests
//! the engine never saw. Engine calls are blocking and run in `spawn_blocking`.

mod access;
mod audit_view;
pub(crate) mod auth;
#[cfg(test)]
mod auth_tests;
mod capability;
mod envelope;
mod everything;
mod export;
#[cfg(test)]
mod export_tests;
mod handlers;
pub(crate) mod hardening;
#[cfg(test)]
mod hardening_tests;
mod limits;
pub(crate) use limits::RateLimiter;
#[cfg(test)]
mod ops_tests;
mod patch;
#[cfg(test)]
mod random_requests_tests;
mod response;
mod scopes;
#[cfg(test)]
mod test_support;
#[cfg(test)]
mod tests;
pub(crate) mod tls;
mod validate;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::routing::{get, post};
use fhirkeep_query::Database;
use tower_http::catch_panic::CatchPanicLayer;

/// Default largest request body: a big transaction Bundle fits, a runaway upload does not.
pub(crate) const DEFAULT_BODY_LIMIT: usize = 16 * 1024 * 1024;

/// Settings of the HTTP layer.
#[derive(Debug, Clone)]
pub(crate) struct ServerConfig {
    /// The URL clients reach the server at, without a trailing slash (for `Location`,
    /// `fullUrl` and paging links).
    pub(crate) base_url: String,
    /// Largest accepted request body in bytes (larger ones are answered 413).
    pub(crate) max_body_bytes: usize,
    /// `--auth`: none (loopback only) or SMART on FHIR bearer tokens.
    pub(crate) auth: AuthMode,
    /// The answer for a resource outside the token's reach: 404 (default: existence is not
    /// revealed) or 403.
    pub(crate) deny_status: StatusCode,
    /// TLS flag, CORS allowlist, JSON depth, rate limit and timeout (`hardening.rs`).
    pub(crate) hardening: hardening::Hardening,
}

/// How requests are authenticated.
#[derive(Debug, Clone)]
pub(crate) enum AuthMode {
    /// No authentication: every request may do everything (loopback addresses only).
    None,
    /// SMART on FHIR: every route but `/metadata` and `/.well-known/smart-configuration`
    /// needs a valid bearer token, and its scopes decide what it may do.
    Smart(SmartSettings),
}

/// The settings of `--auth smart`.
#[derive(Debug, Clone)]
pub(crate) struct SmartSettings {
    /// Keys of trusted issuers (`--jwks`), besides the server's own issuer key.
    pub(crate) jwks: Vec<auth::TrustedKey>,
    /// The `--jwks` file, read again while running (key rotation) when given.
    pub(crate) jwks_file: Option<std::path::PathBuf>,
    /// `--issuer`: the only `iss` accepted from `jwks` keys.
    pub(crate) issuer: Option<String>,
    /// `--require-mfa-for-privileged`.
    pub(crate) require_mfa: bool,
    /// The endpoints of the external authorization server, to advertise.
    pub(crate) endpoints: OAuthUris,
}

/// The endpoints of the authorization server that issues tokens (`--authorize-url`,
/// `--token-url`), advertised in `/metadata` and `/.well-known/smart-configuration`.
#[derive(Debug, Clone, Default)]
pub(crate) struct OAuthUris {
    pub(crate) authorize: Option<String>,
    pub(crate) token: Option<String>,
}

/// What every handler shares: the database and the settings.
#[derive(Debug, Clone)]
pub(crate) struct AppState {
    inner: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    db: Arc<Database>,
    config: ServerConfig,
    /// Token validation, under `--auth smart`.
    smart: Option<auth::SmartAuth>,
    /// Bulk Data export jobs (`export.rs`).
    exports: export::Exports,
}

impl AppState {
    pub(crate) fn new(db: Database, mut config: ServerConfig) -> Self {
        config.base_url = config.base_url.trim_end_matches('/').to_owned();
        let smart = match &config.auth {
            AuthMode::None => None,
            AuthMode::Smart(settings) => {
                let own = auth::IssuerKey::from_secret(
                    db.store().derive_secret(auth::ISSUER_KEY_PURPOSE),
                );
                let smart = auth::SmartAuth::new(
                    &config.base_url,
                    &own,
                    settings.jwks.clone(),
                    settings.issuer.clone(),
                    settings.require_mfa,
                    settings.endpoints.clone(),
                );
                Some(match &settings.jwks_file {
                    Some(path) => smart.reloading_jwks(
                        path.clone(),
                        auth::JWKS_RELOAD_MIN_INTERVAL,
                        auth::JWKS_MAX_AGE,
                    ),
                    None => smart,
                })
            }
        };
        AppState {
            inner: Arc::new(Shared {
                db: Arc::new(db),
                config,
                smart,
                exports: export::Exports::default(),
            }),
        }
    }

    /// Token validation, if the server runs with `--auth smart`.
    pub(crate) fn smart(&self) -> Option<&auth::SmartAuth> {
        self.inner.smart.as_ref()
    }

    /// The status of a refusal that must not reveal whether a resource exists.
    pub(crate) fn deny_status(&self) -> StatusCode {
        self.inner.config.deny_status
    }

    /// The database, shareable with blocking tasks.
    pub(crate) fn db(&self) -> Arc<Database> {
        Arc::clone(&self.inner.db)
    }

    pub(crate) fn base(&self) -> &str {
        &self.inner.config.base_url
    }

    /// The path of the base URL (`/fhir` of `http://host/fhir`), empty for the root.
    fn base_path(&self) -> &str {
        let base = self.base();
        let after_scheme = base.split_once("://").map_or(base, |(_, rest)| rest);
        after_scheme
            .find('/')
            .map_or("", |slash| &after_scheme[slash..])
    }

    fn max_body_bytes(&self) -> usize {
        self.inner.config.max_body_bytes
    }

    fn hardening(&self) -> &hardening::Hardening {
        &self.inner.config.hardening
    }
}

/// The FHIR REST API as a router (state included, ready to serve), at the path of the base
/// URL (`http://host/fhir` serves `/fhir/Patient/1`), so that every link the server makes
/// leads back to it.
pub(crate) fn app(state: AppState) -> Router {
    let prefix = state.base_path().to_owned();
    let router = if prefix.is_empty() {
        routes()
    } else {
        Router::new()
            .nest(&prefix, routes())
            .fallback(handlers::unknown_route)
    };
    layered(router, state)
}

/// Every FHIR route; the layers are added by [`layered`].
fn routes() -> Router<AppState> {
    use handlers as h;
    Router::new()
        .route("/", get(h::search_system).post(h::bundle))
        .route("/metadata", get(h::metadata))
        .route(
            "/.well-known/smart-configuration",
            get(h::smart_configuration),
        )
        .route("/_search", post(h::search_system_post))
        .route("/_history", get(h::history_system))
        .merge(export_routes())
        .merge(audit_view::routes())
        .route(
            "/{type}",
            get(h::search_type)
                .post(h::create)
                .put(h::conditional_update)
                .delete(h::conditional_delete)
                .patch(patch::conditional_patch),
        )
        .route("/{type}/_search", post(h::search_type_post))
        .route("/{type}/$validate", post(validate::validate_type))
        .route("/{type}/{id}/$validate", post(validate::validate_instance))
        .route("/{type}/_history", get(h::history_type))
        .route(
            "/{type}/{id}",
            get(h::read)
                .put(h::update)
                .delete(h::delete)
                .patch(patch::patch),
        )
        .route("/{type}/{id}/_history", get(h::history_instance))
        .route("/{type}/{id}/_history/{vid}", get(h::vread))
        .route("/Patient/{id}/$everything", get(everything::everything))
        .route(
            "/Patient/$everything",
            get(everything::everything_of_context),
        )
        .route(
            "/{type}/{id}/{compartment_type}",
            get(h::search_compartment),
        )
        .fallback(h::unknown_route)
}

/// The Bulk Data `$export` routes (`export.rs`).
fn export_routes() -> Router<AppState> {
    use export as e;
    Router::new()
        .route("/$export", get(e::export_system))
        .route("/Patient/$export", get(e::export_patients))
        .route("/Group/{id}/$export", get(e::export_group))
        .route("/$export-status/{id}", get(e::status).delete(e::cancel))
        .route("/$export-file/{id}/{name}", get(e::file))
}

/// Wraps `router` in the layers every route gets. Separate from [`routes`] so that tests can
/// add routes (e.g. one that panics) under the same layers.
fn layered(router: Router<AppState>, state: AppState) -> Router {
    let router = router
        .layer(DefaultBodyLimit::max(state.max_body_bytes()))
        // JSON depth and request timeout, inside the envelope so that refusals are audited.
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            limits::guard,
        ))
        // Inside the envelope, so that a panic's 500 is still logged, audited and given the
        // security headers.
        .layer(CatchPanicLayer::custom(response::panic_response))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            envelope::envelope,
        ))
        .with_state(state.clone());
    hardening::outer_layers(router, state.hardening())
}

/// What `fhirkeep token` needs to know about a `--scope` text.
#[derive(Debug)]
pub(crate) struct ScopeSummary {
    /// How many scopes grant something.
    pub(crate) usable: usize,
    /// The scopes that grant nothing.
    pub(crate) ignored: Vec<String>,
    /// Whether some usable scope is a `patient/` scope.
    pub(crate) patient_scopes: bool,
}

/// Sorts a `--scope` text into usable and ignored scopes.
pub(crate) fn scopes_of(text: &str) -> ScopeSummary {
    let mut summary = ScopeSummary {
        usable: 0,
        ignored: Vec::new(),
        patient_scopes: false,
    };
    for word in text.split_whitespace() {
        match scopes::parse_scope(word) {
            Some(scope) => {
                summary.usable += 1;
                summary.patient_scopes |= scope.context == scopes::Context::Patient;
            }
            None => summary.ignored.push(word.to_owned()),
        }
    }
    summary
}

/// Whether `path` is one of the routes served without a token: `/metadata` and
/// `/.well-known/smart-configuration` under the base path.
fn is_public_path(state: &AppState, path: &str) -> bool {
    let Some(rest) = path.strip_prefix(state.base_path()) else {
        return false;
    };
    matches!(rest, "/metadata" | "/.well-known/smart-configuration")
}

/// Whether `addr` is a loopback address (the only place the server may run without auth).
pub(crate) fn is_loopback(addr: &SocketAddr) -> bool {
    addr.ip().is_loopback()
}

/// Serves `state` on `listener` until `shutdown` completes, then waits for requests in
/// flight to finish.
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(
        listener,
        app(state).into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}

/// Completes on Ctrl-C or (on Unix) SIGTERM.
pub(crate) async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            // No handler could be installed: only SIGTERM (or killing) stops the server.
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
    tracing::info!("shutdown signal received: finishing requests in flight");
}
