//! TLS for `fhirkeep serve --tls-cert --tls-key`: the rustls configuration (ring provider,
//! TLS 1.3 only unless `--tls12`, client certificates required under `--tls-client-ca`), the
//! HTTPS server loop (axum-server over the same router), and certificate reload on `SIGHUP`
//! (renewed certificates without a restart).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use axum_server::tls_rustls::RustlsConfig;
use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::{AppState, app};

/// How long a shutdown waits for connections to finish their requests.
const GRACEFUL_SHUTDOWN: Duration = Duration::from_secs(30);

/// The process-wide crypto provider (ring), installed on first use. The only provider
/// compiled in, so the provider that another part of the process might install is ring too.
fn provider() -> Arc<CryptoProvider> {
    if let Some(provider) = CryptoProvider::get_default() {
        return Arc::clone(provider);
    }
    // Losing a race with another installer is fine: whichever won is read back below.
    let _ = rustls::crypto::ring::default_provider().install_default();
    CryptoProvider::get_default()
        .map(Arc::clone)
        .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()))
}

/// The server configuration from PEM files: the certificate chain in `cert`, its private
/// key in `key`, and with `client_ca` the CA certificates a client's certificate must chain
/// to (a client without one is refused in the handshake). TLS 1.3 only unless
/// `allow_tls12`. Errors name the file and the problem, never key material.
pub(crate) fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
    allow_tls12: bool,
) -> Result<ServerConfig> {
    let chain = read_certificates(cert, "TLS certificate")?;
    let key_pem =
        std::fs::read(key).with_context(|| format!("cannot read the TLS key {}", key.display()))?;
    let private_key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|_| anyhow!("{} holds no PEM private key", key.display()))?;
    let versions: &[&rustls::SupportedProtocolVersion] = if allow_tls12 {
        &[&rustls::version::TLS13, &rustls::version::TLS12]
    } else {
        &[&rustls::version::TLS13]
    };
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .context("the TLS protocol versions")?;
    let builder = match client_ca {
        Some(path) => builder.with_client_cert_verifier(client_verifier(path)?),
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        // Checks that the key is the certificate's (rustls compares the public keys).
        .with_single_cert(chain, private_key)
        .map_err(|error| {
            anyhow!(
                "the TLS key {} does not fit the certificate {}: {error}",
                key.display(),
                cert.display()
            )
        })?;
    // The router speaks HTTP/1.1 only.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// The certificates of the PEM file `path` (at least one); `what` names the file in errors.
fn read_certificates(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>> {
    let pem = std::fs::read(path)
        .with_context(|| format!("cannot read the {what} {}", path.display()))?;
    let certificates = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| anyhow!("{} is not a PEM certificate file", path.display()))?;
    if certificates.is_empty() {
        bail!("{} holds no PEM certificate", path.display());
    }
    Ok(certificates)
}

/// The verifier of client certificates: each must chain to a CA certificate in the PEM file
/// `path` (with the client-authentication purpose, when the certificate names purposes).
fn client_verifier(path: &Path) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>> {
    let certificates = read_certificates(path, "client CA file")?;
    let mut roots = rustls::RootCertStore::empty();
    for certificate in certificates {
        roots.add(certificate).map_err(|error| {
            anyhow!(
                "{} holds a certificate that cannot be a trust anchor: {error}",
                path.display()
            )
        })?;
    }
    rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|error| anyhow!("the client CA file {}: {error}", path.display()))
}

/// The TLS settings of a server: where its certificate, key and client CAs come from (read
/// again on reload) and the configuration made from them at start.
#[derive(Debug)]
pub(crate) struct TlsSettings {
    cert: PathBuf,
    key: PathBuf,
    client_ca: Option<PathBuf>,
    allow_tls12: bool,
    config: ServerConfig,
}

impl TlsSettings {
    /// Reads and checks the certificate chain in `cert`, its key in `key` and the client CA
    /// certificates in `client_ca` (see [`server_config`]).
    pub(crate) fn load(
        cert: &Path,
        key: &Path,
        client_ca: Option<&Path>,
        allow_tls12: bool,
    ) -> Result<TlsSettings> {
        Ok(TlsSettings {
            config: server_config(cert, key, client_ca, allow_tls12)?,
            cert: cert.to_owned(),
            key: key.to_owned(),
            client_ca: client_ca.map(Path::to_owned),
            allow_tls12,
        })
    }

    /// The configuration from the files as they are now.
    fn reload(&self) -> Result<ServerConfig> {
        server_config(
            &self.cert,
            &self.key,
            self.client_ca.as_deref(),
            self.allow_tls12,
        )
    }
}

/// Serves `state` over TLS on `listener` until `shutdown` completes, then lets requests in
/// flight finish (for at most 30 s). On `SIGHUP` the certificate, key and client CAs are read
/// again: connections from then on get the new ones; if the files do not make a valid
/// configuration, the server keeps the one it has and logs why.
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    settings: TlsSettings,
    state: AppState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let handle = axum_server::Handle::new();
    let on_signal = handle.clone();
    tokio::spawn(async move {
        shutdown.await;
        on_signal.graceful_shutdown(Some(GRACEFUL_SHUTDOWN));
    });
    let rustls_config = RustlsConfig::from_config(Arc::new(settings.config.clone()));
    reload_on_hangup(settings, rustls_config.clone());
    let listener = listener.into_std()?;
    axum_server::from_tcp_rustls(listener, rustls_config)?
        .handle(handle)
        .serve(app(state).into_make_service_with_connect_info::<SocketAddr>())
        .await
}

/// Reloads the certificate and key into `live` whenever the process gets `SIGHUP` (what
/// certificate renewal hooks send: `pkill -HUP fhirkeep`).
fn reload_on_hangup(settings: TlsSettings, live: RustlsConfig) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hangups = match signal(SignalKind::hangup()) {
            Ok(hangups) => hangups,
            Err(error) => {
                tracing::warn!(%error, "no SIGHUP handler: the TLS certificate reloads only on restart");
                return;
            }
        };
        let settings = Arc::new(settings);
        tokio::spawn(async move {
            while hangups.recv().await.is_some() {
                let from_files = Arc::clone(&settings);
                // File reads and key parsing are blocking work.
                match tokio::task::spawn_blocking(move || from_files.reload()).await {
                    Ok(Ok(config)) => {
                        live.reload_from_config(Arc::new(config));
                        tracing::info!("TLS certificate and key reloaded");
                    }
                    Ok(Err(error)) => tracing::warn!(
                        error = %format!("{error:#}"),
                        "TLS reload refused: keeping the certificate in use"
                    ),
                    Err(error) => {
                        tracing::warn!(%error, "TLS reload failed: keeping the certificate in use")
                    }
                }
            }
        });
    }
    #[cfg(not(unix))]
    {
        let _ = (settings, live);
    }
}
