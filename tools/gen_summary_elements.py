#!/usr/bin/env python3
"""Writes query/data/summary-elements-r4.json: for each R4 resource type, the top-level
elements marked isSummary, and those that are mandatory (min >= 1), as `_summary` needs.

Input: the official R4 StructureDefinitions (CC0) `profiles-resources.json`, passed as the
first argument (it is 35 MB and not vendored; the reference copy lives in ../shared/fhir/r4).

Usage: python3 tools/gen_summary_elements.py ../shared/fhir/r4/profiles-resources.json
"""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.path.join(ROOT, "query", "data", "summary-elements-r4.json")


def main():
    with open(sys.argv[1], encoding="utf-8") as f:
        bundle = json.load(f)
    table = {}
    for entry in bundle["entry"]:
        sd = entry["resource"]
        if sd.get("resourceType") != "StructureDefinition" or sd.get("kind") != "resource":
            continue
        if sd.get("derivation") == "constraint" or sd.get("abstract"):
            continue
        name = sd["type"]
        summary, mandatory = set(), set()
        for element in sd["snapshot"]["element"]:
            path = element["path"].split(".")
            if len(path) != 2:
                continue
            field = path[1]
            if field.endswith("[x]"):
                field = field[:-3] + "[x]"
            if element.get("isSummary"):
                summary.add(field)
            if element.get("min", 0) >= 1:
                mandatory.add(field)
        table[name] = {"summary": sorted(summary), "mandatory": sorted(mandatory)}
    with open(TARGET, "w", encoding="utf-8", newline="\n") as f:
        f.write("{\n")
        f.write(",\n".join(f"{json.dumps(k)}:{json.dumps(v, separators=(',', ':'))}" for k, v in sorted(table.items())))
        f.write("\n}\n")
    print(f"wrote {len(table)} resource types to {os.path.relpath(TARGET, ROOT)}")


if __name__ == "__main__":
    main()
