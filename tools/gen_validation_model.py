#!/usr/bin/env python3
"""Generates query/data/r4-validation.txt, the compact R4 model `$validate` checks against.

Input: the R4 profiles-types.json, profiles-resources.json and valuesets.json bundles (default
location ../shared/fhir/r4 relative to the workspace root). Stdlib only. Run it again (and
commit the output) to regenerate; the server never reads ../shared.

Output format (one record per line; lines starting with "#" are comments):
  =<section path>[<<base type>]   starts a section: a type ("Patient<DomainResource") or an
                                    anonymous backbone element path ("Patient.contact")
  <name> <min> <max> <type>[,<type>...] [<value set url>]
                                    a child element of the current section: cardinality (max
                                    "*" or a number), its types ("@" = the anonymous type at
                                    <section>.<name>, "#<path>" = a contentReference), and the
                                    value set of a required binding, if any. A name ending in
                                    "[x]" is a choice element.
  %<value set url>\t<system>\t<code>\t<code>...
                                    the codes of a required value set, one line per code
                                    system; value sets that cannot be enumerated (filters,
                                    whole external code systems) are left out, so their
                                    bindings are not checked.
Only elements a type defines itself are listed; inherited ones come from the base chain.
"""
import json
import os
import sys

FHIR_TYPE_EXT = "http://hl7.org/fhir/StructureDefinition/structuredefinition-fhir-type"


def type_code(t):
    code = t["code"]
    if code.startswith("http://hl7.org/fhirpath/System."):
        for ext in t.get("extension", []):
            if ext.get("url") == FHIR_TYPE_EXT:
                return ext["valueUrl"]
        return code.rsplit(".", 1)[1].lower()
    return code


def concepts(concept_list):
    """Every code of a CodeSystem's (nested) concepts."""
    out = []
    for c in concept_list or []:
        out.append(c["code"])
        out.extend(concepts(c.get("concept")))
    return out


def enumerate_value_set(url, value_sets, code_systems, seen=()):
    """{system: [codes]} of a value set, or None if it cannot be enumerated."""
    vs = value_sets.get(url)
    if vs is None or url in seen:
        return None
    compose = vs.get("compose")
    if not compose or compose.get("exclude"):
        return None
    result = {}
    for inc in compose.get("include", []):
        if inc.get("filter"):
            return None
        for nested in inc.get("valueSet", []):
            sub = enumerate_value_set(nested.split("|")[0], value_sets, code_systems, seen + (url,))
            if sub is None:
                return None
            for system, codes in sub.items():
                result.setdefault(system, []).extend(codes)
        system = inc.get("system")
        if system is None:
            continue
        if "concept" in inc:
            codes = [c["code"] for c in inc["concept"]]
        else:
            cs = code_systems.get(system)
            if cs is None or cs.get("content") not in (None, "complete"):
                return None
            codes = concepts(cs.get("concept"))
            if not codes:
                return None
        result.setdefault(system, []).extend(codes)
    return result or None


def main():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    src = sys.argv[1] if len(sys.argv) > 1 else os.path.join(root, "..", "shared", "fhir", "r4")
    out_path = os.path.join(root, "query", "data", "r4-validation.txt")

    value_sets, code_systems = {}, {}
    with open(os.path.join(src, "valuesets.json"), encoding="utf-8") as f:
        for entry in json.load(f)["entry"]:
            r = entry["resource"]
            if r.get("resourceType") == "ValueSet":
                value_sets[r["url"]] = r
            elif r.get("resourceType") == "CodeSystem":
                code_systems[r["url"]] = r
    # profiles-resources.json holds some CodeSystems too? Only StructureDefinitions are read.

    lines = []
    bound = set()
    for name in ("profiles-types.json", "profiles-resources.json"):
        with open(os.path.join(src, name), encoding="utf-8") as f:
            bundle = json.load(f)
        for entry in bundle["entry"]:
            sd = entry["resource"]
            if sd.get("resourceType") != "StructureDefinition":
                continue
            if sd.get("kind") == "logical":
                continue
            tname = sd["id"]
            base = sd.get("baseDefinition", "").rsplit("/", 1)[-1]
            lines.append("=" + tname + ("<" + base if base else ""))
            if sd.get("kind") == "primitive-type" or sd.get("derivation") == "constraint":
                continue
            section = tname
            for el in sd["snapshot"]["element"]:
                path = el["path"]
                if "." not in path:
                    continue
                base_path = el.get("base", {}).get("path", path)
                if base_path.split(".", 1)[0] != path.split(".", 1)[0]:
                    continue
                parent, child = path.rsplit(".", 1)
                if parent != section:
                    section = parent
                    lines.append("=" + section)
                if "contentReference" in el:
                    types = [el["contentReference"]]
                else:
                    codes = [type_code(t) for t in el.get("type", [])]
                    if codes in (["BackboneElement"], ["Element"]):
                        types = ["@" + codes[0]]
                    else:
                        types = codes
                if not types:
                    continue
                record = f"{child} {el.get('min', 0)} {el.get('max', '*')} " + ",".join(
                    dict.fromkeys(types)
                )
                binding = el.get("binding", {})
                if binding.get("strength") == "required" and "valueSet" in binding:
                    url = binding["valueSet"].split("|")[0]
                    if enumerate_value_set(url, value_sets, code_systems) is not None:
                        record += " " + url
                        bound.add(url)
                lines.append(record)
    for url in sorted(bound):
        for system, codes in enumerate_value_set(url, value_sets, code_systems).items():
            lines.append("%" + "\t".join([url, system] + list(dict.fromkeys(codes))))
    header = [
        "# FHIR R4 (4.0.1) structure model for $validate: elements, cardinality, types and the",
        "# codes of required bindings. Generated by tools/gen_validation_model.py from",
        "# profiles-types.json, profiles-resources.json and valuesets.json; do not edit by hand.",
    ]
    with open(out_path, "w", encoding="utf-8", newline="\n") as f:
        f.write("\n".join(header + lines) + "\n")
    print(f"wrote {out_path}: {len(lines)} lines, {os.path.getsize(out_path)} bytes")


if __name__ == "__main__":
    main()
