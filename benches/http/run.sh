#!/usr/bin/env bash
# HTTP load figures for `fhirkeep serve` (BENCHMARKS.md, "HTTP server"). Not run by CI.
#
# Builds the release binary, generates 200 synthetic patients (seed 1), imports them into a
# fresh database BEFORE the server starts (import takes the database lock), starts the server
# on a free loopback port, and measures with wrk:
#   - read by id: GET Observation/ID rotating over the imported Observation ids (read.lua),
#     at full load with wrk, and at a fixed 15,000 requests/s with oha (coordinated omission
#     corrected), with the default blocking threads and with --blocking-threads 8
#   - search, first page: GET Observation?code=http://loinc.org|8867-4 (50 entries)
#   - single creates: POST /Patient from every connection at once (create.lua; group commit)
#   - transaction ingest: transaction Bundles of fresh resources (100 Bundles of 100 from 4
#     connections, 20 of 1000 from 2), Prefer: return=minimal (ingest.py)
# printing requests/s (resources/s for ingest) and latency median and p99.
#
# Usage: benches/http/run.sh        (DURATION=15s CONNECTIONS=16 THREADS=2 to change the load)
set -euo pipefail
cd "$(dirname "$0")/../.."

DURATION="${DURATION:-15s}"
CONNECTIONS="${CONNECTIONS:-16}"
THREADS="${THREADS:-2}"
PATIENTS=200
SEED=1

if ! command -v wrk >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk
fi
if ! command -v oha >/dev/null; then
    cargo install oha --locked
fi

cargo build --release --locked --bin fhirkeep
bin="$(cd "${CARGO_TARGET_DIR:-target}" && pwd)/release/fhirkeep"

work="$(mktemp -d)"
server_pid=""
cleanup() {
    if [[ -n "$server_pid" ]]; then
        kill -TERM "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

echo "== data: $PATIENTS patients, seed $SEED"
"$bin" gen --patients "$PATIENTS" --seed "$SEED" --out "$work/synth"
# The ingest data: the next patients of the same cohort, so their ids are new to the database.
"$bin" gen --patients 60 --seed "$SEED" --first "$PATIENTS" --out "$work/ingest"
"$bin" gen --patients 120 --seed "$SEED" --first "$((PATIENTS + 60))" --out "$work/ingest-large"
"$bin" init --db "$work/db" --key-file "$work/key"
"$bin" import --db "$work/db" --key-file "$work/key" "$work/synth"
python3 -c '
import json, sys
with open(sys.argv[1]) as lines, open(sys.argv[2], "w") as out:
    for n, line in enumerate(lines):
        if n >= 20000:
            break
        out.write("Observation/" + json.loads(line)["id"] + "\n")
' "$work/synth/Observation.ndjson" "$work/ids.txt"
echo "read targets: $(wc -l < "$work/ids.txt") Observation ids"

echo "== server"
# Per-request log lines at warn only: the figures are the server's, not the terminal's. The
# per-client rate limit is off: every request of the load generator comes from one address.
start_server() {
    RUST_LOG=warn "$bin" serve --db "$work/db" --key-file "$work/key" --listen 127.0.0.1:0 \
        --rate-limit 0 "$@" \
        > "$work/serve.out" 2> "$work/serve.err" &
    server_pid=$!
    base=""
    for _ in $(seq 1 600); do
        base="$(sed -n 's/.* on \(http:\/\/[^ ]*\).*/\1/p' "$work/serve.out" | head -n 1)"
        [[ -n "$base" ]] && break
        kill -0 "$server_pid" 2>/dev/null || { cat "$work/serve.err"; exit 1; }
        sleep 0.1
    done
    [[ -n "$base" ]] || { echo "the server did not start" >&2; exit 1; }
    case "$base" in
        http://127.0.0.1:*) ;;
        *) echo "not a loopback address: $base" >&2; exit 1 ;;
    esac
    echo "serving on $base $*"
}
stop_server() {
    kill -TERM "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
    server_pid=""
}

# Read by id at a fixed rate of 15,000 requests/s (the goal's rate) with oha, latency corrected
# for coordinated omission; prints the achieved rate and the p50/p99/p99.9 latency.
fixed_rate_reads() {
    sed "s|^|$base/|" "$work/ids.txt" > "$work/urls.txt"
    oha -z "$DURATION" -q 15000 -c "$CONNECTIONS" --latency-correction --no-tui \
        --urls-from-file "$work/urls.txt" --output-format json > "$work/oha.json"
    python3 -c '
import json, sys
d = json.load(open(sys.argv[1])); s = d["summary"]; p = d["latencyPercentiles"]
print("%s: %.0f requests/s offered 15000, success %.4f, latency median %.2fms, p99 %.2fms, p99.9 %.2fms"
      % (sys.argv[2], s["requestsPerSec"], s["successRate"], p["p50"] * 1000, p["p99"] * 1000,
         p["p99.9"] * 1000))' "$work/oha.json" "$1" | tee -a "$work/fixed.txt"
}

start_server

# One line from wrk's --latency output: requests/s, median and p99.
summarize() {
    awk -v name="$1" '
        /Requests\/sec:/ { rps = $2 }
        /^ +50%/ { p50 = $2 }
        /^ +99%/ { p99 = $2 }
        /Non-2xx or 3xx responses:/ { bad = $5 }
        END {
            printf "%s: %s requests/s, latency median %s, p99 %s", name, rps, p50, p99
            if (bad != "") printf " (%s non-2xx responses!)", bad
            printf "\n"
        }'
}

echo "== read by id ($THREADS threads, $CONNECTIONS connections, $DURATION)"
wrk -t "$THREADS" -c "$CONNECTIONS" -d "$DURATION" --latency -s benches/http/read.lua \
    "$base" -- "$work/ids.txt" | tee "$work/read.txt"
echo "== search, first page ($THREADS threads, $CONNECTIONS connections, $DURATION)"
wrk -t "$THREADS" -c "$CONNECTIONS" -d "$DURATION" --latency \
    -H "Accept: application/fhir+json" \
    "$base/Observation?code=http%3A%2F%2Floinc.org%7C8867-4" | tee "$work/search.txt"
echo "== single creates ($THREADS threads, $CONNECTIONS connections, $DURATION)"
wrk -t "$THREADS" -c "$CONNECTIONS" -d "$DURATION" --latency -s benches/http/create.lua \
    "$base" | tee "$work/create.txt"
echo "== transaction ingest"
python3 benches/http/ingest.py "$base" "$work/ingest" --bundle-size 100 --max-bundles 100 \
    --connections 4 --seconds 120 | tee "$work/ingest.txt"
python3 benches/http/ingest.py "$base" "$work/ingest-large" --bundle-size 1000 --max-bundles 20 \
    --connections 2 --seconds 120 | tee -a "$work/ingest.txt"

echo "== read by id at a fixed 15,000 requests/s (oha, $CONNECTIONS connections, $DURATION)"
fixed_rate_reads "fixed-rate reads, default blocking threads"
stop_server
start_server --blocking-threads 8
fixed_rate_reads "fixed-rate reads, --blocking-threads 8"
stop_server

echo
echo "== summary ($(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg))"
summarize "read by id" < "$work/read.txt"
summarize "search first page" < "$work/search.txt"
summarize "single creates" < "$work/create.txt"
cat "$work/ingest.txt"
cat "$work/fixed.txt"
