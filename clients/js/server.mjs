// Fixture: the real `fhirkeep serve` binary on a free loopback port with a fresh database.
import { spawn } from 'node:child_process';
import { mkdtempSync, openSync, closeSync, readFileSync, rmSync, existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve, isAbsolute, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';

const REPO = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..');
const START_TIMEOUT_MS = 60_000;
const STOP_TIMEOUT_MS = 20_000;

function binary() {
  const path = process.env.FHIRKEEP_BIN || 'target/debug/fhirkeep';
  const full = isAbsolute(path) ? path : join(REPO, path);
  if (!existsSync(full)) {
    throw new Error(`no fhirkeep binary at ${full}: run \`cargo build --bin fhirkeep\` or set FHIRKEEP_BIN`);
  }
  return full;
}

/** Starts the server; resolves to { base, stop() } once it prints the address it listens on. */
export async function startServer() {
  const dir = mkdtempSync(join(tmpdir(), 'fhirkeep-clients-js-'));
  const stderrPath = join(dir, 'serve.stderr');
  const stderrFd = openSync(stderrPath, 'w');
  const env = { ...process.env, RUST_LOG: 'warn' };
  delete env.FHIRKEEP_PASSPHRASE;
  const child = spawn(binary(), ['serve', '--db', join(dir, 'db'), '--listen', '127.0.0.1:0'], {
    cwd: dir,
    env,
    stdio: ['ignore', 'pipe', stderrFd],
  });
  const exited = new Promise((done) => child.once('exit', (code, signal) => done({ code, signal })));
  const cleanup = () => {
    closeSync(stderrFd);
    rmSync(dir, { recursive: true, force: true });
  };

  // With port 0 only the "fhirkeep serving DIR on http://ADDR ..." line tells the port.
  const base = await new Promise((done, fail) => {
    let seen = '';
    const timer = setTimeout(() => fail(new Error('fhirkeep serve did not start in time')), START_TIMEOUT_MS);
    child.stdout.on('data', (chunk) => {
      seen += chunk.toString('utf8');
      const match = seen.match(/ on (http:\/\/\S+)/);
      if (match) {
        clearTimeout(timer);
        done(match[1]);
      }
    });
    exited.then(() => {
      clearTimeout(timer);
      fail(new Error(`fhirkeep serve exited before serving:\n${readFileSync(stderrPath, 'utf8')}`));
    });
  }).catch((error) => {
    child.kill('SIGKILL');
    cleanup();
    throw error;
  });

  async function stop() {
    child.kill('SIGTERM');
    const timer = setTimeout(() => child.kill('SIGKILL'), STOP_TIMEOUT_MS);
    const { code } = await exited;
    clearTimeout(timer);
    const log = readFileSync(stderrPath, 'utf8');
    cleanup();
    if (code !== 0) {
      throw new Error(`fhirkeep serve did not stop cleanly (exit ${code}):\n${log}`);
    }
  }
  return { base, stop };
}
