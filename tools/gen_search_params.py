#!/usr/bin/env python3
"""Writes query/data/search-parameters-r4.json, the compact table of the official FHIR R4
SearchParameter definitions that the query crate embeds.

Input: the official bundle (CC0), vendored at testdata/r4/search-parameters.json (a copy of
the HL7 FHIR R4 4.0.1 `search-parameters.json`). Only the fields the query layer uses are
kept, one parameter per line, so that diffs of the generated file stay readable.

Usage: python3 tools/gen_search_params.py
"""
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = os.path.join(ROOT, "testdata", "r4", "search-parameters.json")
TARGET = os.path.join(ROOT, "query", "data", "search-parameters-r4.json")

KEPT = ["url", "code", "base", "type", "expression", "target", "multipleOr", "multipleAnd",
        "comparator", "modifier", "chain"]


def main():
    with open(SOURCE, encoding="utf-8") as f:
        bundle = json.load(f)
    params = []
    for entry in bundle["entry"]:
        resource = entry["resource"]
        if resource.get("resourceType") != "SearchParameter":
            continue
        compact = {k: resource[k] for k in KEPT if k in resource}
        if "component" in resource:
            compact["component"] = [
                {"definition": c["definition"], "expression": c["expression"]}
                for c in resource["component"]
            ]
        params.append(compact)
    params.sort(key=lambda p: p["url"])
    with open(TARGET, "w", encoding="utf-8", newline="\n") as f:
        f.write("[\n")
        f.write(",\n".join(json.dumps(p, ensure_ascii=False, separators=(",", ":")) for p in params))
        f.write("\n]\n")
    print(f"wrote {len(params)} search parameters to {os.path.relpath(TARGET, ROOT)}")


if __name__ == "__main__":
    main()
