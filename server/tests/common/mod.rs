//! The helpers of the end-to-end tests: the real `fhirkeep serve` on a loopback port, and an
//! HTTP agent that hands every status back to the test.

// Each test binary uses a part of these helpers.
#![allow(dead_code, clippy::unwrap_used, clippy::panic)]

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

/// A running server, killed if the test ends before stopping it.
pub(crate) struct Server {
    pub(crate) child: Child,
    /// `HOST:PORT` the server announced.
    pub(crate) address: String,
    /// `http://HOST:PORT` (or `https://`).
    pub(crate) base: String,
    /// Where its stderr (the log) goes.
    pub(crate) stderr_file: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// Starts `fhirkeep serve ARGS` in `cwd` over plain HTTP and waits for its "serving" line.
    pub(crate) fn start(cwd: &Path, args: &[&str]) -> Server {
        Server::start_with(cwd, "http", args)
    }

    /// Starts `fhirkeep serve ARGS` in `cwd` and waits for its "serving ... on SCHEME://ADDR"
    /// line on stdout (`--listen 127.0.0.1:0` picks a free port: the line names it).
    // The child is waited for by `Drop`, which clippy cannot see.
    #[allow(clippy::zombie_processes)]
    pub(crate) fn start_with(cwd: &Path, scheme: &str, args: &[&str]) -> Server {
        let stderr_file = cwd.join("serve.stderr");
        let mut child = Command::new(env!("CARGO_BIN_EXE_fhirkeep"))
            .arg("serve")
            .args(args)
            .current_dir(cwd)
            .env_remove("FHIRKEEP_PASSPHRASE")
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr_file).unwrap())
            .spawn()
            .unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        loop {
            line.clear();
            if stdout.read_line(&mut line).unwrap() == 0 {
                let _ = child.wait();
                panic!(
                    "the server exited before serving:\n{}",
                    std::fs::read_to_string(&stderr_file).unwrap()
                );
            }
            if let Some((_, rest)) = line.split_once(&format!(" on {scheme}://")) {
                let address = rest.split_whitespace().next().unwrap().to_owned();
                return Server {
                    child,
                    base: format!("{scheme}://{address}"),
                    address,
                    stderr_file,
                };
            }
        }
    }

    /// What the server wrote to stderr so far (its log).
    pub(crate) fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_file).unwrap()
    }
}

/// An HTTP agent that returns every status as a response (tests check them).
pub(crate) fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into()
}

/// The status and JSON body of a response (`Null` for an empty body).
pub(crate) fn body_of(mut response: ureq::http::Response<ureq::Body>) -> (u16, Value) {
    let status = response.status().as_u16();
    let text = response.body_mut().read_to_string().unwrap();
    let value = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap()
    };
    (status, value)
}
