"""The walk over the official R4 StructureDefinitions that the model generators share.

`structure_definitions(src)` yields the StructureDefinitions themselves (logical models left
out), and `walk(src)` yields, in file order, the records both generated models are made of:
  ("type", name, base)          a StructureDefinition (a section of its own)
  ("section", path)             the elements that follow belong to this backbone path
  ("element", name, types, el)  a child element the type defines itself: its types ("@..." =
                                the anonymous type at section.name, "#path" = a
                                contentReference), and the element definition itself
Primitive types and constraint profiles yield their "type" record only: they add no children.
Stdlib only.
"""
import json
import os

FHIR_TYPE_EXT = "http://hl7.org/fhir/StructureDefinition/structuredefinition-fhir-type"


def type_code(t):
    code = t["code"]
    if code.startswith("http://hl7.org/fhirpath/System."):
        for ext in t.get("extension", []):
            if ext.get("url") == FHIR_TYPE_EXT:
                return ext["valueUrl"]
        return code.rsplit(".", 1)[1].lower()
    return code


def structure_definitions(src):
    """Every StructureDefinition of the types and resources bundles, logical models left out."""
    for name in ("profiles-types.json", "profiles-resources.json"):
        with open(os.path.join(src, name), encoding="utf-8") as f:
            bundle = json.load(f)
        for entry in bundle["entry"]:
            sd = entry["resource"]
            if sd.get("resourceType") == "StructureDefinition" and sd.get("kind") != "logical":
                yield sd


def walk(src):
    for sd in structure_definitions(src):
        tname = sd["id"]
        yield ("type", tname, sd.get("baseDefinition", "").rsplit("/", 1)[-1])
        # Primitives have no JSON children, and constraint profiles (SimpleQuantity, ...)
        # add none: for both only the name and base matter.
        if sd.get("kind") == "primitive-type" or sd.get("derivation") == "constraint":
            continue
        section = tname
        for el in sd["snapshot"]["element"]:
            path = el["path"]
            if "." not in path:
                continue
            # Inherited elements come from the base chain, not from this type.
            base_path = el.get("base", {}).get("path", path)
            if base_path.split(".", 1)[0] != path.split(".", 1)[0]:
                continue
            parent, child = path.rsplit(".", 1)
            if parent != section:
                section = parent
                yield ("section", section)
            if "contentReference" in el:
                types = [el["contentReference"]]
            else:
                codes = [type_code(t) for t in el.get("type", [])]
                types = ["@" + codes[0]] if codes in (["BackboneElement"], ["Element"]) else codes
            if types:
                yield ("element", child, list(dict.fromkeys(types)), el)


def section_line(record):
    """The "=name[<base]" or "=path" line of a "type" or "section" record."""
    if record[0] == "type":
        _, name, base = record
        return "=" + name + ("<" + base if base else "")
    return "=" + record[1]
