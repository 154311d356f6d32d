//! `fhirkeep serve` hardening end to end: the real binary over TLS with a self-signed
//! certificate made here (TLS 1.3 only unless `--tls12`, HSTS on every response), client
//! certificates under `--tls-client-ca`, startup errors for bad certificate files, `--config
//! FILE`, and the clear-text warning.

#![allow(clippy::unwrap_used, clippy::panic)]

mod common;

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tempfile::TempDir;

use common::Server;

/// Runs `fhirkeep serve ARGS` expecting it to refuse to start: its stderr.
fn refused(cwd: &Path, args: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_fhirkeep"))
        .arg("serve")
        .args(args)
        .current_dir(cwd)
        .env_remove("FHIRKEEP_PASSPHRASE")
        .output()
        .unwrap();
    assert!(!output.status.success(), "the server started");
    String::from_utf8(output.stderr).unwrap()
}

/// A self-signed certificate for localhost and 127.0.0.1, written as cert.pem and key.pem.
fn self_signed(dir: &Path) -> CertificateDer<'static> {
    let certified =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    std::fs::write(dir.join("cert.pem"), certified.cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), certified.signing_key.serialize_pem()).unwrap();
    certified.cert.der().clone()
}

/// `fhirkeep serve` over TLS with `cert.pem` and `key.pem` of `dir`, on a free loopback port.
fn https_server(dir: &Path, extra: &[&str]) -> Server {
    let mut args = vec![
        "--db",
        "db",
        "--listen",
        "127.0.0.1:0",
        "--tls-cert",
        "cert.pem",
        "--tls-key",
        "key.pem",
    ];
    args.extend_from_slice(extra);
    Server::start_with(dir, "https", &args)
}

/// A TLS client trusting only `cert`, speaking only `version`.
fn client(
    cert: &CertificateDer<'static>,
    version: &'static rustls::SupportedProtocolVersion,
) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[version])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// `GET path` over TLS: the whole response as text, or the TLS/IO error.
fn https_get(
    address: &str,
    config: Arc<rustls::ClientConfig>,
    path: &str,
) -> Result<String, std::io::Error> {
    let name = ServerName::try_from("localhost").unwrap();
    let connection = rustls::ClientConnection::new(config, name).unwrap();
    let socket = TcpStream::connect(address)?;
    socket.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut tls = rustls::StreamOwned::new(connection, socket);
    write!(
        tls,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/fhir+json\r\n\
         Connection: close\r\n\r\n"
    )?;
    tls.flush()?;
    let mut response = Vec::new();
    match tls.read_to_end(&mut response) {
        Ok(_) => {}
        // Some servers close without close_notify after `Connection: close`.
        Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof && !response.is_empty() => {
        }
        Err(error) => return Err(error),
    }
    Ok(String::from_utf8_lossy(&response).into_owned())
}

#[test]
fn serve_over_tls_13_with_hsts_and_refuses_tls_12_unless_allowed() {
    let dir = TempDir::new().unwrap();
    let cert = self_signed(dir.path());
    let server = https_server(dir.path(), &[]);
    let tls13 = client(&cert, &rustls::version::TLS13);
    let response = https_get(&server.address, Arc::clone(&tls13), "/metadata").unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let lower = response.to_ascii_lowercase();
    assert!(
        lower.contains("strict-transport-security: max-age=63072000; includesubdomains"),
        "{response}"
    );
    assert!(lower.contains("cache-control: no-store"), "{response}");
    assert!(response.contains("CapabilityStatement"), "{response}");
    // Error responses carry it too.
    let missing = https_get(&server.address, tls13, "/Patient/nobody").unwrap();
    assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
    assert!(
        missing
            .to_ascii_lowercase()
            .contains("strict-transport-security"),
        "{missing}"
    );

    // A client that speaks TLS 1.2 only is refused by default.
    let tls12 = client(&cert, &rustls::version::TLS12);
    let error = https_get(&server.address, Arc::clone(&tls12), "/metadata").unwrap_err();
    assert!(
        error.to_string().to_ascii_lowercase().contains("version")
            || error.to_string().to_ascii_lowercase().contains("handshake"),
        "{error}"
    );
    // A client that does not trust the certificate is refused too (by itself).
    let other = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let untrusted = client(other.cert.der(), &rustls::version::TLS13);
    assert!(https_get(&server.address, untrusted, "/metadata").is_err());
    drop(server);

    // With --tls12 the same client gets in.
    let server = https_server(dir.path(), &["--tls12"]);
    let response = https_get(&server.address, tls12, "/metadata").unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");

    // A graceful stop over TLS too: SIGTERM, then a clean exit.
    #[cfg(unix)]
    {
        let mut server = server;
        let killed = Command::new("kill")
            .args(["-TERM", &server.child.id().to_string()])
            .status()
            .unwrap();
        assert!(killed.success());
        let started = std::time::Instant::now();
        let status = loop {
            if let Some(status) = server.child.try_wait().unwrap() {
                break status;
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "no exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(status.success(), "{}", server.stderr());
        assert!(server.stderr().contains("server stopped"));
    }
}

/// A renewed certificate is taken on `SIGHUP` without a restart; files that do not make a
/// valid pair are refused and the certificate in use stays.
#[cfg(unix)]
#[test]
fn serve_reloads_its_certificate_on_sighup_and_keeps_it_when_the_new_files_are_bad() {
    let dir = TempDir::new().unwrap();
    let first = self_signed(dir.path());
    let server = https_server(dir.path(), &[]);
    let trusts_first = client(&first, &rustls::version::TLS13);
    let response = https_get(&server.address, Arc::clone(&trusts_first), "/metadata").unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let hang_up = || {
        let sent = Command::new("kill")
            .args(["-HUP", &server.child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
    };

    // The renewal: new files, then SIGHUP. New connections get the new certificate.
    let second = self_signed(dir.path());
    hang_up();
    let trusts_second = client(&second, &rustls::version::TLS13);
    let started = std::time::Instant::now();
    loop {
        if let Ok(response) = https_get(&server.address, Arc::clone(&trusts_second), "/metadata") {
            assert!(response.starts_with("HTTP/1.1 200"), "{response}");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the new certificate was not taken: {}",
            server.stderr()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        https_get(&server.address, Arc::clone(&trusts_first), "/metadata").is_err(),
        "the old certificate is still served"
    );

    // A key that does not fit: refused, logged without key material, the second stays.
    let other = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    std::fs::write(
        dir.path().join("key.pem"),
        other.signing_key.serialize_pem(),
    )
    .unwrap();
    hang_up();
    let started = std::time::Instant::now();
    while !server.stderr().contains("TLS reload refused") {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "no refusal logged: {}",
            server.stderr()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(server.stderr().contains("does not fit the certificate"));
    assert!(!server.stderr().contains("PRIVATE KEY"));
    let response = https_get(&server.address, trusts_second, "/metadata").unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
}

/// A CA that issues client certificates: its certificate as `name.pem` in `dir`.
struct ClientCa {
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl ClientCa {
    fn new(dir: &Path, name: &str) -> ClientCa {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("{name} client CA"));
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let issuer =
            rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap())
                .unwrap();
        std::fs::write(dir.join(format!("{name}.pem")), issuer.pem()).unwrap();
        ClientCa { issuer }
    }

    /// A client certificate issued by this CA, and its key.
    fn client_certificate(&self) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "etl-job");
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let key = rcgen::KeyPair::generate().unwrap();
        let certificate = params.signed_by(&key, &self.issuer).unwrap();
        let key = PrivateKeyDer::try_from(key.serialize_der()).unwrap();
        (certificate.der().clone(), key)
    }
}

/// A TLS 1.3 client trusting only `server_cert` that presents `identity`, if any.
fn client_with_identity(
    server_cert: &CertificateDer<'static>,
    identity: Option<(CertificateDer<'static>, PrivateKeyDer<'static>)>,
) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(server_cert.clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots);
    Arc::new(match identity {
        Some((certificate, key)) => builder
            .with_client_auth_cert(vec![certificate], key)
            .unwrap(),
        None => builder.with_no_client_auth(),
    })
}

/// Under `--tls-client-ca` a client gets in only with a certificate issued under one of the
/// CAs in the file: none, or one of another CA, is refused; a renewed CA file is read on
/// `SIGHUP`.
#[test]
fn serve_requires_client_certificates_of_the_given_cas() {
    let dir = TempDir::new().unwrap();
    let server_cert = self_signed(dir.path());
    let ours = ClientCa::new(dir.path(), "clients");
    let theirs = ClientCa::new(dir.path(), "elsewhere");
    let server = https_server(dir.path(), &["--tls-client-ca", "clients.pem"]);

    let admitted = client_with_identity(&server_cert, Some(ours.client_certificate()));
    let response = https_get(&server.address, Arc::clone(&admitted), "/metadata").unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");

    for (who, config) in [
        ("no certificate", client_with_identity(&server_cert, None)),
        (
            "another CA's certificate",
            client_with_identity(&server_cert, Some(theirs.client_certificate())),
        ),
    ] {
        match https_get(&server.address, config, "/metadata") {
            Err(_) => {}
            Ok(response) => assert!(
                !response.starts_with("HTTP/1.1"),
                "a client with {who} got an answer: {response}"
            ),
        }
    }

    // The other CA joins the file: after SIGHUP its clients get in too.
    #[cfg(unix)]
    {
        let both = format!(
            "{}{}",
            std::fs::read_to_string(dir.path().join("clients.pem")).unwrap(),
            std::fs::read_to_string(dir.path().join("elsewhere.pem")).unwrap()
        );
        std::fs::write(dir.path().join("clients.pem"), both).unwrap();
        let sent = Command::new("kill")
            .args(["-HUP", &server.child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
        let newly_admitted = client_with_identity(&server_cert, Some(theirs.client_certificate()));
        let started = std::time::Instant::now();
        loop {
            if let Ok(response) =
                https_get(&server.address, Arc::clone(&newly_admitted), "/metadata")
                && response.starts_with("HTTP/1.1 200")
            {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "the renewed CA file was not taken: {}",
                server.stderr()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let response = https_get(&server.address, admitted, "/metadata").unwrap();
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    }
}

#[test]
fn serve_refuses_missing_unreadable_and_mismatched_tls_files() {
    let dir = TempDir::new().unwrap();
    self_signed(dir.path());
    let base = ["--db", "db", "--listen", "127.0.0.1:0"];
    let run = |extra: &[&str]| {
        let args: Vec<&str> = base.iter().chain(extra).copied().collect();
        refused(dir.path(), &args)
    };
    let error = run(&["--tls-cert", "absent.pem", "--tls-key", "key.pem"]);
    assert!(
        error.contains("cannot read the TLS certificate absent.pem"),
        "{error}"
    );
    let error = run(&["--tls-cert", "cert.pem", "--tls-key", "absent.pem"]);
    assert!(
        error.contains("cannot read the TLS key absent.pem"),
        "{error}"
    );
    std::fs::write(dir.path().join("garbage.pem"), "not a certificate").unwrap();
    let error = run(&["--tls-cert", "garbage.pem", "--tls-key", "key.pem"]);
    assert!(error.contains("holds no PEM certificate"), "{error}");
    let error = run(&["--tls-cert", "cert.pem", "--tls-key", "garbage.pem"]);
    assert!(error.contains("holds no PEM private key"), "{error}");
    // The key of another certificate.
    let other = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    std::fs::write(
        dir.path().join("other.pem"),
        other.signing_key.serialize_pem(),
    )
    .unwrap();
    let error = run(&["--tls-cert", "cert.pem", "--tls-key", "other.pem"]);
    assert!(error.contains("does not fit the certificate"), "{error}");
    assert!(
        !error.contains("PRIVATE KEY"),
        "key material in an error: {error}"
    );
    let error = run(&["--tls-cert", "cert.pem"]);
    assert!(error.contains("go together"), "{error}");
    // Client CA files: absent, without certificates, or without the server's own TLS.
    let tls = ["--tls-cert", "cert.pem", "--tls-key", "key.pem"];
    let with_tls = |extra: &[&str]| {
        let args: Vec<&str> = tls.iter().chain(extra).copied().collect();
        run(&args)
    };
    let error = with_tls(&["--tls-client-ca", "absent.pem"]);
    assert!(
        error.contains("cannot read the client CA file absent.pem"),
        "{error}"
    );
    let error = with_tls(&["--tls-client-ca", "garbage.pem"]);
    assert!(error.contains("holds no PEM certificate"), "{error}");
    let error = run(&["--tls-client-ca", "cert.pem"]);
    assert!(
        error.contains("--tls-client-ca needs --tls-cert and --tls-key"),
        "{error}"
    );
    // Refused before anything was created.
    assert!(!dir.path().join("db").exists());
}

#[test]
fn serve_reads_a_config_file_under_the_command_line() {
    let dir = TempDir::new().unwrap();
    let cert = self_signed(dir.path());
    std::fs::write(
        dir.path().join("serve.toml"),
        "db = \"db\"\nlisten = \"127.0.0.1:0\"\ntls_cert = \"cert.pem\"\ntls_key = \"key.pem\"\n\
         cors_origins = [\"https://app.example.org\"]\nmax_json_depth = 16\n",
    )
    .unwrap();
    // The file turns TLS on; the command line's --db wins over the file's.
    let server = Server::start_with(
        dir.path(),
        "https",
        &["--config", "serve.toml", "--db", "db-from-flag"],
    );
    let response = https_get(
        &server.address,
        client(&cert, &rustls::version::TLS13),
        "/metadata",
    )
    .unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(dir.path().join("db-from-flag").exists());
    assert!(!dir.path().join("db").exists());
    drop(server);

    std::fs::write(
        dir.path().join("typo.toml"),
        "listen = \"127.0.0.1:0\"\nrate_limt = 5\n",
    )
    .unwrap();
    let error = refused(dir.path(), &["--config", "typo.toml"]);
    assert!(error.contains("rate_limt"), "{error}");
    let error = refused(dir.path(), &["--config", "absent.toml"]);
    assert!(
        error.contains("cannot read the config file absent.toml"),
        "{error}"
    );
}

#[test]
fn serve_warns_when_tokens_would_travel_in_clear_text() {
    let dir = TempDir::new().unwrap();
    let server = Server::start_with(
        dir.path(),
        "http",
        &["--db", "db", "--listen", "0.0.0.0:0", "--auth", "smart"],
    );
    let stderr = server.stderr();
    assert!(stderr.contains("without TLS"), "{stderr}");
    assert!(stderr.contains("clear text"), "{stderr}");
    drop(server);
    // On loopback, or with TLS, no warning.
    self_signed(dir.path());
    let server = Server::start_with(
        dir.path(),
        "https",
        &[
            "--db",
            "db",
            "--listen",
            "0.0.0.0:0",
            "--auth",
            "smart",
            "--tls-cert",
            "cert.pem",
            "--tls-key",
            "key.pem",
        ],
    );
    assert!(
        !server.stderr().contains("clear text"),
        "{}",
        server.stderr()
    );
    drop(server);
    let server = Server::start_with(
        dir.path(),
        "http",
        &["--db", "db", "--listen", "127.0.0.1:0", "--auth", "smart"],
    );
    assert!(
        !server.stderr().contains("clear text"),
        "{}",
        server.stderr()
    );
}
