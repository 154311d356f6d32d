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
                                    <section>.<name>, "#<path>" = a contentReference,
                                    "Reference(<type>|<type>...)" = a reference to those
                                    resource types only), and the value set of a required
                                    binding, if any. A name ending in "[x]" is a choice
                                    element.
  !<element path>\t<key>\t<FHIRPath expression>\t<human description>
                                    an error-level invariant (constraint) a type defines on
                                    itself (its root, a backbone path, or a child element);
                                    inherited ones come from the base chain, as elements do.
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

from r4_structures import section_line, structure_definitions, walk

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


# Invariants whose R4 expression says other than what it means under FHIRPath's typing, with
# the expression $validate evaluates instead.
ERRATA = {
    # `is Boolean` names System.Boolean, which a FHIR boolean is not: as written it fails for
    # every `exists` condition, although the answer is a boolean.
    ("Questionnaire.item.enableWhen", "que-7"): (
        "operator = 'exists' implies (answer is Boolean)",
        "operator = 'exists' implies (answer is boolean)",
    ),
}


def invariants(src):
    """The "!" lines: each type's own error-level constraints with a FHIRPath expression."""
    lines = []
    for sd in structure_definitions(src):
        if sd.get("derivation") == "constraint":
            continue
        own = {None, sd["url"]}
        elements = sd["snapshot"]["element"]
        # Extension repeats ext-1 on Extension.extension, which is an Extension itself.
        on_root = {c["key"] for c in elements[0].get("constraint", [])}
        for el in elements:
            for c in el.get("constraint", []):
                if c.get("severity") != "error" or "expression" not in c:
                    continue
                if c.get("source") not in own:
                    continue
                # Element repeats its own ele-1 on Element.id and Element.extension; an
                # element's ele-1 comes from its type's chain (every type is an Element).
                if "." in el["path"] and (c["key"] == "ele-1" or c["key"] in on_root):
                    continue
                human = " ".join(c.get("human", "").split())
                expression = " ".join(c["expression"].split())
                erratum = ERRATA.get((el["path"], c["key"]))
                if erratum is not None:
                    if expression != erratum[0]:
                        sys.exit(f"erratum for {c['key']} no longer matches: {expression}")
                    expression = erratum[1]
                lines.append("!" + "\t".join([el["path"], c["key"], expression, human]))
    return lines


def reference_targets(type_name, el):
    """"Reference(A|B)" for a Reference to some resource types only; the type name otherwise."""
    if type_name != "Reference":
        return type_name
    targets = []
    for t in el.get("type", []):
        if t.get("code") == "Reference":
            targets.extend(p.rsplit("/", 1)[-1] for p in t.get("targetProfile", []))
    if not targets or "Resource" in targets:
        return type_name
    return "Reference(" + "|".join(dict.fromkeys(targets)) + ")"


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

    lines = []
    bound = set()
    for record in walk(src):
        if record[0] != "element":
            lines.append(section_line(record))
            continue
        _, child, types, el = record
        types = [reference_targets(t, el) for t in types]
        line = f"{child} {el.get('min', 0)} {el.get('max', '*')} " + ",".join(types)
        binding = el.get("binding", {})
        if binding.get("strength") == "required" and "valueSet" in binding:
            url = binding["valueSet"].split("|")[0]
            if enumerate_value_set(url, value_sets, code_systems) is not None:
                line += " " + url
                bound.add(url)
        lines.append(line)
    lines.extend(invariants(src))
    for url in sorted(bound):
        for system, codes in enumerate_value_set(url, value_sets, code_systems).items():
            lines.append("%" + "\t".join([url, system] + list(dict.fromkeys(codes))))
    header = [
        "# FHIR R4 (4.0.1) structure model for $validate: elements, cardinality, types, invariants",
        "# and the codes of required bindings. Generated by tools/gen_validation_model.py from",
        "# profiles-types.json, profiles-resources.json and valuesets.json; do not edit by hand.",
    ]
    with open(out_path, "w", encoding="utf-8", newline="\n") as f:
        f.write("\n".join(header + lines) + "\n")
    print(f"wrote {out_path}: {len(lines)} lines, {os.path.getsize(out_path)} bytes")


if __name__ == "__main__":
    main()
