#!/usr/bin/env python3
"""Writes query/tests/fixtures/r4-example-searches.txt: searches over the official R4
examples with the keys they must return, computed here by a deliberately simple, independent
reading of the FHIR search rules (so the Rust implementation is checked against a second
implementation, not against itself).

Usage: python3 tools/gen_search_fixtures.py   (reads testdata/r4/hl7.fhir.r4.examples-4.0.1.tgz)
"""
import datetime as dt
import json
import os
import tarfile
import unicodedata
import urllib.parse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TGZ = os.path.join(ROOT, "testdata", "r4", "hl7.fhir.r4.examples-4.0.1.tgz")
OUT = os.path.join(ROOT, "query", "tests", "fixtures", "r4-example-searches.txt")


def load():
    out = []
    with tarfile.open(TGZ) as tar:
        for member in tar:
            if not member.name.endswith(".json") or not member.isfile():
                continue
            try:
                r = json.load(tar.extractfile(member))
            except Exception:
                continue
            if isinstance(r, dict) and "resourceType" in r and "id" in r and len(r["id"]) <= 64:
                out.append(r)
    return out


def norm(s):
    s = unicodedata.normalize("NFKD", s)
    return " ".join("".join(c for c in s if not unicodedata.combining(c)).lower().split())


def as_list(v):
    return v if isinstance(v, list) else ([] if v is None else [v])


def date_range(text):
    """(low, high) in microseconds UTC, date-only read as UTC, as the search rules say."""
    if "T" not in text:
        parts = [int(p) for p in text.split("-")]
        if len(parts) == 1:
            lo, hi = dt.datetime(parts[0], 1, 1), dt.datetime(parts[0] + 1, 1, 1)
        elif len(parts) == 2:
            lo = dt.datetime(parts[0], parts[1], 1)
            hi = dt.datetime(parts[0] + (parts[1] == 12), parts[1] % 12 + 1, 1)
        else:
            lo = dt.datetime(*parts)
            hi = lo + dt.timedelta(days=1)
        lo, hi = lo.replace(tzinfo=dt.timezone.utc), hi.replace(tzinfo=dt.timezone.utc)
    else:
        t = text.replace("Z", "+00:00")
        has_seconds = t.count(":") >= 3 or (t.count(":") == 2 and "+" not in t[10:] and "-" not in t[10:])
        lo = dt.datetime.fromisoformat(t)
        if lo.tzinfo is None:
            lo = lo.replace(tzinfo=dt.timezone.utc)
        if "." in t:
            hi = lo + dt.timedelta(microseconds=1)
        elif has_seconds:
            hi = lo + dt.timedelta(seconds=1)
        else:
            hi = lo + dt.timedelta(minutes=1)
    epoch = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
    us = lambda d: (d - epoch) // dt.timedelta(microseconds=1)
    return us(lo), us(hi) - 1


def matches_date(value_ranges, prefix, text):
    lo, hi = date_range(text)
    for vlo, vhi in value_ranges:
        if prefix == "eq" and vlo >= lo and vhi <= hi:
            return True
        if prefix == "ge" and vhi >= lo:
            return True
        if prefix == "gt" and vhi > hi:
            return True
        if prefix == "le" and vlo <= hi:
            return True
        if prefix == "lt" and vlo < lo:
            return True
        if prefix == "sa" and vlo > hi:
            return True
        if prefix == "eb" and vhi < lo:
            return True
    return False


def key(r):
    return f"{r['resourceType']}/{r['id']}"


def main():
    resources = load()
    by_type = {}
    for r in resources:
        by_type.setdefault(r["resourceType"], []).append(r)
    patients = by_type["Patient"]
    observations = by_type["Observation"]
    lines = []

    def add(query, found):
        lines.append(f"{query} => {' '.join(sorted(set(found)))}".rstrip())

    def families(p):
        return [n.get("family") for n in p.get("name", []) if n.get("family")]

    def name_parts(p):
        parts = []
        for n in p.get("name", []):
            for k in ("family", "text"):
                if n.get(k):
                    parts.append(n[k])
            for k in ("given", "prefix", "suffix"):
                parts += n.get(k, [])
        return parts

    for prefix in ["chal", "Chalmers", "solo", "EVERY", "lev", "zzz"]:
        add(f"Patient?family={prefix}", [key(p) for p in patients if any(norm(f).startswith(norm(prefix)) for f in families(p))])
    add("Patient?family:exact=Chalmers", [key(p) for p in patients if "Chalmers" in families(p)])
    add("Patient?family:exact=chalmers", [key(p) for p in patients if "chalmers" in families(p)])
    add("Patient?family:contains=alme", [key(p) for p in patients if any("alme" in norm(f) for f in families(p))])
    add("Patient?name=peter", [key(p) for p in patients if any(norm(x).startswith("peter") for x in name_parts(p))])
    add("Patient?family=solo,levin", [key(p) for p in patients if any(norm(f).startswith(("solo", "levin")) for f in families(p))])
    add("Patient?family=solo&given=leia", [key(p) for p in patients
        if any(norm(f).startswith("solo") for f in families(p))
        and any(norm(g).startswith("leia") for n in p.get("name", []) for g in n.get("given", []))])
    for g in ["female", "male", "other"]:
        add(f"Patient?gender={g}", [key(p) for p in patients if p.get("gender") == g])
    add("Patient?gender:not=male", [key(p) for p in patients if p.get("gender") != "male"])
    add("Patient?gender:missing=true", [key(p) for p in patients if "gender" not in p])
    add("Patient?birthdate:missing=false", [key(p) for p in patients if "birthDate" in p])
    for q in ["1974-12-25", "1973", "2017-05", "ge2010", "lt1950", "le1944-11-17", "gt1982-08-01", "sa1995", "eb1960-03-13", "ge1970&birthdate=lt1980"]:
        conds = q.split("&birthdate=")
        def ok(p):
            if "birthDate" not in p:
                return False
            rng = [date_range(p["birthDate"])]
            for c in conds:
                pre, val = (c[:2], c[2:]) if c[:2] in ("ge", "gt", "le", "lt", "sa", "eb") else ("eq", c)
                if not matches_date(rng, pre, val):
                    return False
            return True
        add(f"Patient?birthdate={q}", [key(p) for p in patients if ok(p)])
    add("Patient?_id=example,pat1,nope", [key(p) for p in patients if p["id"] in ("example", "pat1")])
    add("Patient?identifier=urn:oid:1.2.36.146.595.217.0.1|12345", [key(p) for p in patients
        if any(i.get("system") == "urn:oid:1.2.36.146.595.217.0.1" and i.get("value") == "12345" for i in p.get("identifier", []))])

    def codings(o, field="code"):
        return o.get(field, {}).get("coding", [])

    for system, code in [("http://loinc.org", "29463-7"), ("http://loinc.org", "85354-9"), ("http://snomed.info/sct", "27113001")]:
        add(f"Observation?code={system}|{code}", [key(o) for o in observations if any(c.get("system") == system and c.get("code") == code for c in codings(o))])
        add(f"Observation?code={code}", [key(o) for o in observations if any(c.get("code") == code for c in codings(o))])
    add("Observation?code=http://loinc.org|", [key(o) for o in observations if any(c.get("system") == "http://loinc.org" for c in codings(o))])
    add("Observation?category=vital-signs", [key(o) for o in observations
        if any(c.get("code") == "vital-signs" for cat in o.get("category", []) for c in cat.get("coding", []))])

    def subject(o):
        return (o.get("subject") or {}).get("reference", "")
    add("Observation?subject=Patient/example", [key(o) for o in observations if subject(o) in ("Patient/example",) or subject(o).endswith("/Patient/example")])
    add("Observation?patient=example", [key(o) for o in observations if subject(o) == "Patient/example" or subject(o).endswith("/Patient/example")])
    add("Observation?subject:Patient=f001", [key(o) for o in observations if subject(o) == "Patient/f001"])
    pmap = {p["id"]: p for p in patients}
    def subj_patient(o):
        ref = subject(o)
        if ref.startswith("Patient/"):
            return pmap.get(ref.split("/")[1])
        return None
    add("Observation?subject:Patient.gender=female", [key(o) for o in observations if (subj_patient(o) or {}).get("gender") == "female"])
    add("Observation?patient.family=chalmers", [key(o) for o in observations if any(norm(f).startswith("chalmers") for f in families(subj_patient(o) or {}))])
    has = set()
    for o in observations:
        if any(c.get("system") == "http://loinc.org" and c.get("code") == "29463-7" for c in codings(o)):
            p = subj_patient(o)
            if p:
                has.add(key(p))
    add("Patient?_has:Observation:patient:code=http://loinc.org|29463-7", has)

    def quantities(o):
        out = []
        vq = o.get("valueQuantity")
        if vq and "value" in vq:
            out.append(vq)
        return out
    for q, test in [("gt100", lambda v: v > 100), ("lt1", lambda v: v < 1), ("ge185", lambda v: v >= 185)]:
        add(f"Observation?value-quantity={q}", [key(o) for o in observations if any(test(float(x["value"])) for x in quantities(o))])
    add("Observation?value-quantity=185|http://unitsofmeasure.org|[lb_av]", [key(o) for o in observations
        if any(184.5 <= float(x["value"]) < 185.5 and x.get("system") == "http://unitsofmeasure.org" and x.get("code") == "[lb_av]" for x in quantities(o))])

    # Observation's combo-* parameters: the observation's own code and value, or any one
    # component's code and value (each pair taken from the same element).
    def elements(o):
        return [o] + o.get("component", [])

    def combo_codes(o):
        return [c for e in elements(o) for c in codings(e)]
    for system, code in [("http://loinc.org", "8480-6"), ("http://loinc.org", "29463-7")]:
        add(f"Observation?combo-code={system}|{code}", [key(o) for o in observations
            if any(c.get("system") == system and c.get("code") == code for c in combo_codes(o))])
    add("Observation?combo-code=8462-4", [key(o) for o in observations if any(c.get("code") == "8462-4" for c in combo_codes(o))])
    add("Observation?combo-code:missing=true", [key(o) for o in observations if not any(c.get("code") for c in combo_codes(o))])
    add("Observation?component-code:missing=false", [key(o) for o in observations
        if any(c.get("code") for e in o.get("component", []) for c in codings(e))])
    add("Observation?category=vital-signs&combo-code:not=http://loinc.org|8480-6", [key(o) for o in observations
        if any(c.get("code") == "vital-signs" for cat in o.get("category", []) for c in cat.get("coding", []))
        and not any(c.get("system") == "http://loinc.org" and c.get("code") == "8480-6" for c in combo_codes(o))])

    def combo_quantities(o):
        return [e["valueQuantity"] for e in elements(o) if "value" in e.get("valueQuantity", {})]
    for q, test in [("gt100", lambda v: v > 100), ("lt1", lambda v: v < 1)]:
        add(f"Observation?combo-value-quantity={q}", [key(o) for o in observations
            if any(test(float(x["value"])) for x in combo_quantities(o))])
    for code, q, test in [("8480-6", "gt100", lambda v: v > 100), ("8462-4", "lt90", lambda v: v < 90),
                          ("29463-7", "ge185", lambda v: v >= 185)]:
        add(f"Observation?combo-code-value-quantity=http://loinc.org|{code}${q}", [key(o) for o in observations
            if any(any(c.get("system") == "http://loinc.org" and c.get("code") == code for c in codings(e))
                   and "value" in e.get("valueQuantity", {}) and test(float(e["valueQuantity"]["value"]))
                   for e in elements(o))])

    def concept_codes(e):
        return e.get("valueCodeableConcept", {}).get("coding", [])
    pairs = sorted({(c.get("code"), v.get("system"), v.get("code")) for o in observations for e in elements(o)
                    for c in codings(e) for v in concept_codes(e) if c.get("code") and v.get("code") and v.get("system")})
    for code, system, value in pairs[:3]:
        add(f"Observation?combo-code-value-concept={code}${system}|{value}", [key(o) for o in observations
            if any(any(c.get("code") == code for c in codings(e))
                   and any(v.get("system") == system and v.get("code") == value for v in concept_codes(e))
                   for e in elements(o))])
        add(f"Observation?combo-value-concept={system}|{value}", [key(o) for o in observations
            if any(v.get("system") == system and v.get("code") == value for e in elements(o) for v in concept_codes(e))])

    # code-value-*: the observation's own code and own value (one focus: the resource).
    def own_codes(o):
        return [c for c in codings(o) if c.get("code")]
    for code, system, q, test in [("29463-7", "http://loinc.org", "ge185", lambda v: v >= 185),
                                  ("29463-7", None, "lt100", lambda v: v < 100),
                                  ("8480-6", "http://loinc.org", "gt100", lambda v: v > 100),
                                  ("2339-0", "http://loinc.org", "gt1", lambda v: v > 1)]:
        arg = f"{system}|{code}" if system else code
        add(f"Observation?code-value-quantity={arg}${q}", [key(o) for o in observations
            if any(c.get("code") == code and (system is None or c.get("system") == system) for c in own_codes(o))
            and any(test(float(x["value"])) for x in quantities(o))])
    add("Observation?code-value-quantity=29463-7$185|http://unitsofmeasure.org|[lb_av]", [key(o) for o in observations
        if any(c.get("code") == "29463-7" for c in own_codes(o))
        and any(184.5 <= float(x["value"]) < 185.5 and x.get("system") == "http://unitsofmeasure.org"
                and x.get("code") == "[lb_av]" for x in quantities(o))])
    own_pairs = sorted({(c.get("system"), c.get("code"), v.get("system"), v.get("code")) for o in observations
                        for c in own_codes(o) for v in concept_codes(o) if c.get("system") and v.get("code") and v.get("system")})
    for csys, code, vsys, value in own_pairs[:4]:
        add(f"Observation?code-value-concept={csys}|{code}${vsys}|{value}", [key(o) for o in observations
            if any(c.get("system") == csys and c.get("code") == code for c in own_codes(o))
            and any(v.get("system") == vsys and v.get("code") == value for v in concept_codes(o))])
        add(f"Observation?code-value-concept={code}${value}", [key(o) for o in observations
            if any(c.get("code") == code for c in own_codes(o))
            and any(v.get("code") == value for v in concept_codes(o))])
    strings = sorted({(c.get("code"), o["valueString"]) for o in observations for c in own_codes(o)
                      if isinstance(o.get("valueString"), str) and o["valueString"].strip()})
    for code, text in strings[:3]:
        start = text.split()[0][:4]
        add(f"Observation?code-value-string={code}${urllib.parse.quote(start)}", [key(o) for o in observations
            if any(c.get("code") == code for c in own_codes(o))
            and isinstance(o.get("valueString"), str) and norm(o["valueString"]).startswith(norm(start))])
    date_values = sorted({(c.get("code"), o["valueDateTime"]) for o in observations for c in own_codes(o)
                          if isinstance(o.get("valueDateTime"), str)})
    for code, when in date_values[:3]:
        for pre in ["ge", "lt"]:
            arg = when[:4]
            add(f"Observation?code-value-date={code}${pre}{arg}", [key(o) for o in observations
                if any(c.get("code") == code for c in own_codes(o))
                and isinstance(o.get("valueDateTime"), str) and matches_date([date_range(o["valueDateTime"])], pre, arg)])

    def effective_ranges(o):
        out = []
        if "effectiveDateTime" in o:
            out.append(date_range(o["effectiveDateTime"]))
        if "effectiveInstant" in o:
            out.append(date_range(o["effectiveInstant"]))
        if "effectivePeriod" in o:
            p = o["effectivePeriod"]
            lo = date_range(p["start"])[0] if "start" in p else -(2 ** 63)
            hi = date_range(p["end"])[1] if "end" in p else 2 ** 63 - 1
            out.append((lo, hi))
        return out
    # Minute and second precision, on values that are a second, a minute or a period long.
    seconds = sorted({o["effectiveDateTime"] for o in observations
                      if len(o.get("effectiveDateTime", "")) > 16 and "." not in o["effectiveDateTime"]})
    timed = [seconds[0], seconds[len(seconds) // 2], seconds[-1]] if seconds else []
    extra = timed + [s[:16] + s[19:] for s in timed if s[16:19].startswith(":")]
    extra = [q.replace("+", "%2B") for q in extra]
    # Every prefix at second precision, on and around values to the second.
    for s in timed:
        extra += [pre + s.replace("+", "%2B") for pre in ["gt", "ge", "lt", "le", "sa", "eb"]]
    for q in ["ge2013-04-02", "2012-09-17", "lt2010", "ge2013&date=lt2014"] + extra:
        conds = [urllib.parse.unquote(c) for c in q.split("&date=")]
        def ok(o):
            rng = effective_ranges(o)
            for c in conds:
                pre, val = (c[:2], c[2:]) if c[:2] in ("ge", "gt", "le", "lt", "sa", "eb") else ("eq", c)
                if not matches_date(rng, pre, val):
                    return False
            return True
        add(f"Observation?date={q}", [key(o) for o in observations if ok(o)])

    with open(OUT, "w", encoding="utf-8", newline="\n") as f:
        f.write("# Searches over the official R4 examples and the keys they return.\n")
        f.write("# Generated by tools/gen_search_fixtures.py (an independent oracle); do not edit.\n")
        for line in lines:
            f.write(line + "\n")
    print(f"wrote {len(lines)} searches to {os.path.relpath(OUT, ROOT)}")


if __name__ == "__main__":
    main()
