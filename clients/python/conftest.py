"""Fixture: the real `fhirkeep serve` binary on a free loopback port with a fresh database."""

import os
import pathlib
import subprocess
import tempfile
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 60


def _binary() -> str:
    path = pathlib.Path(os.environ.get("FHIRKEEP_BIN", "target/debug/fhirkeep"))
    if not path.is_absolute():
        path = REPO / path
    if not path.exists():
        pytest.fail(f"no fhirkeep binary at {path}: run `cargo build --bin fhirkeep` or set FHIRKEEP_BIN")
    return str(path)


class Server:
    """A running `fhirkeep serve`; `base` is its URL."""

    def __init__(self, workdir: pathlib.Path):
        env = {k: v for k, v in os.environ.items() if k != "FHIRKEEP_PASSPHRASE"}
        env["RUST_LOG"] = "warn"
        self.stderr_path = workdir / "serve.stderr"
        self._stderr = open(self.stderr_path, "wb")
        self.process = subprocess.Popen(
            [_binary(), "serve", "--db", str(workdir / "db"), "--listen", "127.0.0.1:0"],
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
        )
        self.base = self._wait_for_address()

    def _wait_for_address(self) -> str:
        # The binary prints "fhirkeep serving DIR on http://ADDR (base URL ...)" once it
        # listens; port 0 means only this line tells which port it picked.
        deadline = time.monotonic() + START_TIMEOUT_S
        assert self.process.stdout is not None
        while time.monotonic() < deadline:
            line = self.process.stdout.readline().decode("utf-8", "replace")
            if not line:
                self.stop()
                pytest.fail("fhirkeep serve exited before serving:\n" + self.stderr_path.read_text())
            if " on http://" in line:
                address = line.split(" on http://", 1)[1].split()[0]
                return f"http://{address}"
        self.stop()
        pytest.fail("fhirkeep serve did not start in time")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=20)
        if self.process.stdout is not None:
            self.process.stdout.close()
        self._stderr.close()


@pytest.fixture(scope="session")
def server():
    with tempfile.TemporaryDirectory(prefix="fhirkeep-clients-") as tmp:
        running = Server(pathlib.Path(tmp))
        try:
            yield running
        finally:
            running.stop()
        # A clean stop: SIGTERM ends the server with status 0.
        assert running.process.returncode == 0, running.stderr_path.read_text()
