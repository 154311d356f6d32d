#!/usr/bin/env python3
"""Transaction ingest driver: POSTs transaction Bundles of BUNDLE_SIZE `PUT TYPE/ID` entries,
built from `fhirkeep gen` NDJSON, to a fhirkeep server on a loopback address from a few
concurrent connections, and prints resources/s and the latency median and p99 per Bundle.

Bounded in count (--max-bundles) and time (--seconds); loopback addresses only.
"""

import argparse
import http.client
import ipaddress
import json
import pathlib
import statistics
import sys
import threading
import time
import urllib.parse

# Referenced types first, so a Bundle's references mostly point at resources already stored.
TYPE_ORDER = ["Patient", "Encounter", "Condition", "Observation", "DiagnosticReport",
              "MedicationRequest", "Procedure", "Immunization"]


def bundles(data_dir: pathlib.Path, size: int, limit: int) -> list[bytes]:
    entries = []
    for resource_type in TYPE_ORDER:
        path = data_dir / f"{resource_type}.ndjson"
        if not path.exists():
            continue
        with path.open() as lines:
            for line in lines:
                if len(entries) >= size * limit:
                    break
                resource = json.loads(line)
                entries.append({
                    "resource": resource,
                    "request": {"method": "PUT", "url": f"{resource['resourceType']}/{resource['id']}"},
                })
    out = []
    for start in range(0, len(entries) - size + 1, size):
        bundle = {"resourceType": "Bundle", "type": "transaction", "entry": entries[start:start + size]}
        out.append(json.dumps(bundle).encode())
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("base", help="http://127.0.0.1:PORT")
    parser.add_argument("data", type=pathlib.Path, help="a `fhirkeep gen` output directory")
    parser.add_argument("--bundle-size", type=int, default=100)
    parser.add_argument("--max-bundles", type=int, default=300)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--representation", action="store_true",
                        help="ask for the stored resources back (default: Prefer: return=minimal, "
                             "as bulk loaders do)")
    args = parser.parse_args()

    url = urllib.parse.urlparse(args.base)
    if url.scheme != "http" or not ipaddress.ip_address(url.hostname).is_loopback:
        print("ingest.py only talks to http://127.0.0.1 or http://[::1]", file=sys.stderr)
        return 2
    payloads = bundles(args.data, args.bundle_size, args.max_bundles)
    if not payloads:
        print(f"no resources in {args.data}", file=sys.stderr)
        return 2

    lock = threading.Lock()
    next_bundle = [0]
    latencies: list[float] = []
    failures: list[str] = []
    deadline = time.monotonic() + args.seconds

    def worker() -> None:
        connection = http.client.HTTPConnection(url.hostname, url.port, timeout=120)
        headers = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}
        if not args.representation:
            headers["Prefer"] = "return=minimal"
        while time.monotonic() < deadline:
            with lock:
                index = next_bundle[0]
                if index >= len(payloads) or failures:
                    return
                next_bundle[0] += 1
            started = time.perf_counter()
            connection.request("POST", url.path or "/", body=payloads[index], headers=headers)
            response = connection.getresponse()
            body = response.read()
            elapsed = time.perf_counter() - started
            with lock:
                if response.status != 200:
                    failures.append(f"bundle {index}: HTTP {response.status}: {body[:300]!r}")
                    return
                latencies.append(elapsed)

    started = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(args.connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started

    if failures:
        print("ingest FAILED: " + failures[0], file=sys.stderr)
        return 1
    resources = len(latencies) * args.bundle_size
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    print(f"transaction ingest: {len(latencies)} bundles of {args.bundle_size} in {wall:.1f} s "
          f"({args.connections} connections): {resources / wall:,.0f} resources/s, "
          f"{len(latencies) / wall:.1f} bundles/s, latency median {statistics.median(ordered) * 1000:.1f} ms, "
          f"p99 {p99 * 1000:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
