//! Seeded random requests against the whole router: every answer is a FHIR answer (no panic,
//! no 500, every error an OperationOutcome), whatever the method, path, query, headers and
//! body. Bodies are the official R4 examples, mutated; queries mix real parameter names,
//! modifiers and prefixes with hostile values.
//!
//! `FHIRKEEP_RANDOM_REQUESTS=N` sends N requests instead of the default (for a longer local
//! run); `FHIRKEEP_RANDOM_SEED=S` starts from another seed. A failure prints the seed and the
//! request, which replay it.

#![allow(clippy::unwrap_used, clippy::panic)]

use std::io::Read as _;

use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use serde_json::{Map, Value, json};
use tower::ServiceExt as _;

use super::auth_tests::{Options, P1_COMPARTMENT, harness_with, token};
use super::{AppState, ServerConfig, app};
use fhirkeep_engine::store::AccessContext;
use fhirkeep_query::compartment_patients;

/// Requests per test run in CI: enough to reach every route with many shapes, a few seconds.
const DEFAULT_REQUESTS: usize = 1_500;

const TYPES: &[&str] = &[
    "Patient",
    "Observation",
    "Encounter",
    "Condition",
    "Bundle",
    "Group",
    "List",
    "ValueSet",
    "SearchParameter",
    "AuditEvent",
    "Foo",
    "patient",
    "",
    "Patient%2FObservation",
    "%ZZ",
    "Pat ient",
];

const IDS: &[&str] = &[
    "p1",
    "p2",
    "o1",
    "example",
    "missing",
    "-",
    "a.b",
    "..",
    "%2E%2E",
    "1234567890123456789012345678901234567890123456789012345678901234567890",
    "%00",
    "%C3%A9",
    "$everything",
    "_history",
    "_search",
];

const PARAMS: &[&str] = &[
    "_id",
    "_lastUpdated",
    "_count",
    "_sort",
    "_include",
    "_revinclude",
    "_include:iterate",
    "_has:Observation:subject:code",
    "_has:Observation:patient:_has:Encounter:patient:status",
    "_elements",
    "_summary",
    "_total",
    "_text",
    "_content",
    "_tag",
    "_profile",
    "_security",
    "_source",
    "_list",
    "_type",
    "_since",
    "_at",
    "_format",
    "_pretty",
    "_outputFormat",
    "_typeFilter",
    "name",
    "family",
    "family:exact",
    "family:contains",
    "family:missing",
    "birthdate",
    "gender",
    "gender:not",
    "identifier",
    "identifier:of-type",
    "code",
    "code:text",
    "code:in",
    "code:not-in",
    "code:below",
    "date",
    "value-quantity",
    "component-code-value-quantity",
    "code-value-quantity",
    "subject",
    "subject:Patient",
    "subject:Patient.name",
    "subject:Patient.organization.name",
    "subject:identifier",
    "patient",
    "url:below",
    "url:above",
    "probability",
    "unknown-param",
    "",
];

const VALUES: &[&str] = &[
    "",
    "x",
    "ge2020",
    "lt2020-01-01T00:00:00Z",
    "sa2020-02",
    "ap2019",
    "eb1970-13-45",
    "2020-01-01T25:00:00+99:00",
    "ne5.40e-3||mg",
    "5.4|http://unitsofmeasure.org|mg",
    "gt-1",
    "1e400",
    "99999999999999999999999999",
    "http://loinc.org|",
    "|",
    "||",
    "http://loinc.org|1234-5",
    "Patient/p1",
    "p1",
    "http://fhir.test/Patient/p1",
    "true",
    "false",
    "-_lastUpdated,name",
    "date,-code,_id",
    "*",
    "Observation:subject",
    "Observation:subject:Patient",
    "Patient:general-practitioner:Practitioner",
    "id,name",
    "count",
    "text",
    "accurate",
    "estimate",
    "none",
    "0",
    "-5",
    "100000",
    "json",
    "xml",
    "application/fhir+ndjson",
    "Patient?name=a",
    "http://loinc.org|1234-5$gt5",
    "a$b$c",
    "%",
    "%ZZ",
    "%00",
    "%C3%A9",
    "\u{00e9}l\u{00e8}ve",
    "\u{1f600}",
    "a,b,,c",
    "Patient,Observation",
];

const HEADERS: &[(&str, &[&str])] = &[
    (
        "if-match",
        &[
            "W/\"1\"",
            "W/\"2\"",
            "\"1\"",
            "*",
            "W/\"99999999999999999999\"",
            "x",
        ],
    ),
    ("if-none-match", &["W/\"1\"", "*", "junk"]),
    (
        "if-none-exist",
        &["identifier=a|b", "name=x", "_id=p1", "unknown=1", "%ZZ", ""],
    ),
    (
        "if-modified-since",
        &["Wed, 21 Oct 2015 07:28:00 GMT", "yesterday", ""],
    ),
    (
        "prefer",
        &[
            "return=minimal",
            "return=representation",
            "return=OperationOutcome",
            "handling=strict",
            "handling=lenient",
            "respond-async",
            "return=bogus",
        ],
    ),
    (
        "accept",
        &[
            "application/fhir+json",
            "application/json",
            "application/fhir+xml",
            "text/html",
            "*/*",
            "application/fhir+ndjson",
            "",
        ],
    ),
    (
        "content-type",
        &[
            "application/fhir+json",
            "application/json",
            "application/json-patch+json",
            "application/x-www-form-urlencoded",
            "text/plain",
            "application/fhir+xml",
            "application/fhir+json; charset=latin1",
        ],
    ),
    (
        "authorization",
        &["Bearer x.y.z", "Basic Zm9vOmJhcg==", "Bearer"],
    ),
];

struct Harness {
    _dir: tempfile::TempDir,
    state: AppState,
    app: Router,
}

fn harness() -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let db = super::test_support::new_database(dir.path());
    let mut config = ServerConfig::for_tests();
    // Thousands of requests from one client: the rate limit would answer nearly all of them.
    config.hardening.rate_limiter = None;
    let state = AppState::new(db, config);
    Harness {
        app: app(state.clone()),
        state,
        _dir: dir,
    }
}

/// Resources of the official R4 examples package: the bodies that mutations start from.
fn examples(limit: usize) -> Vec<Value> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../testdata/r4/hl7.fhir.r4.examples-4.0.1.tgz"
    );
    let file = std::fs::File::open(path).unwrap();
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(file));
    let mut out = Vec::new();
    for (n, entry) in archive.entries().unwrap().enumerate() {
        let mut entry = entry.unwrap();
        let name = entry.path().unwrap().display().to_string();
        // Every seventh example: all kinds of resources, a few hundred of them.
        if !name.ends_with(".json") || name.contains("package.json") || n % 7 != 0 {
            continue;
        }
        let mut text = String::new();
        entry.read_to_string(&mut text).unwrap();
        if let Ok(value) = serde_json::from_str::<Value>(&text)
            && value.get("resourceType").is_some()
        {
            out.push(value);
        }
        if out.len() >= limit {
            break;
        }
    }
    out
}

struct Generator {
    rng: fastrand::Rng,
    examples: Vec<Value>,
    /// A patient that written resources often point to (`subject`), so that writes of a
    /// token with this patient's context get past the compartment check now and then.
    patient_hint: Option<&'static str>,
}

impl Generator {
    fn pick<'a>(&mut self, from: &[&'a str]) -> &'a str {
        from[self.rng.usize(..from.len())]
    }

    fn chance(&mut self, percent: u8) -> bool {
        self.rng.u8(..100) < percent
    }

    /// A path, with the methods its route answers (the others are tried now and then too).
    fn route(
        &mut self,
    ) -> (
        String,
        &'static [Method],
        Option<(&'static str, &'static str)>,
    ) {
        // Mostly the seeded resources, so that requests get past routing and lookups.
        let t = if self.chance(60) {
            self.pick(&TYPES[..4])
        } else {
            self.pick(TYPES)
        };
        let id = if self.chance(60) {
            self.pick(&IDS[..4])
        } else {
            self.pick(IDS)
        };
        const GET: &[Method] = &[Method::GET];
        const POST: &[Method] = &[Method::POST];
        const GET_POST: &[Method] = &[Method::GET, Method::POST];
        const TYPE: &[Method] = &[
            Method::GET,
            Method::POST,
            Method::PUT,
            Method::DELETE,
            Method::PATCH,
        ];
        const INSTANCE: &[Method] = &[Method::GET, Method::PUT, Method::DELETE, Method::PATCH];
        const STATUS: &[Method] = &[Method::GET, Method::DELETE];
        match self.rng.u8(..22) {
            0 => ("/".into(), GET_POST, None),
            1 => ("/metadata".into(), GET, None),
            2 => ("/_history".into(), GET, None),
            3 => ("/_search".into(), POST, None),
            4 | 5 => (format!("/{t}"), TYPE, Some((t, id))),
            6..=8 => (format!("/{t}/{id}"), INSTANCE, Some((t, id))),
            9 => (format!("/{t}/{id}/_history"), GET, None),
            10 => (
                format!(
                    "/{t}/{id}/_history/{}",
                    self.pick(&["1", "2", "0", "x", "-1"])
                ),
                GET,
                None,
            ),
            11 => (format!("/{t}/_history"), GET, None),
            12 => (format!("/{t}/_search"), POST, None),
            13 => (format!("/Patient/{id}/$everything"), GET, None),
            14 => ("/Patient/$everything".into(), GET, None),
            15 => (format!("/Patient/{id}/{t}"), GET, None),
            16 => (format!("/{t}/$validate"), POST, Some((t, id))),
            17 => (format!("/{t}/{id}/$validate"), POST, Some((t, id))),
            18 => (
                self.pick(&["/$export", "/Patient/$export", "/Group/g1/$export"])
                    .into(),
                GET,
                None,
            ),
            19 => match self.rng.u8(..3) {
                0 => (format!("/$export-status/{id}"), STATUS, None),
                1 => (
                    format!(
                        "/$export-file/{id}/{}",
                        self.pick(&["Patient.ndjson", "x", ".."])
                    ),
                    GET,
                    None,
                ),
                _ => ("/.well-known/smart-configuration".into(), GET, None),
            },
            20 => (
                self.pick(&[
                    "/AuditEvent",
                    "/AuditEvent/1",
                    "/$audit-head",
                    "/$audit-proof",
                    "/$audit-consistency",
                ])
                .into(),
                GET,
                None,
            ),
            _ => (
                format!("/{t}/{id}/{}/{}", self.pick(IDS), self.pick(IDS)),
                GET,
                None,
            ),
        }
    }

    /// A path alone (for the `url` of a Bundle entry).
    fn path(&mut self) -> String {
        self.route().0
    }

    fn query(&mut self) -> String {
        let pairs = self.rng.usize(..5);
        let mut out = Vec::new();
        for _ in 0..pairs {
            let name = self.pick(PARAMS);
            let value = self.pick(VALUES);
            let value = if self.chance(10) {
                format!("{value},{}", self.pick(VALUES))
            } else {
                value.to_owned()
            };
            out.push(format!("{}={}", name, encode_query_value(&value)));
        }
        if self.chance(3) {
            out.push(format!("name={}", "a".repeat(5_000)));
        }
        if out.is_empty() {
            String::new()
        } else {
            format!("?{}", out.join("&"))
        }
    }

    fn method(&mut self, allowed: &[Method]) -> Method {
        if self.chance(85) {
            return allowed[self.rng.usize(..allowed.len())].clone();
        }
        match self.rng.u8(..6) {
            0 => Method::GET,
            1 => Method::POST,
            2 => Method::PUT,
            3 => Method::DELETE,
            4 => Method::PATCH,
            _ => Method::HEAD,
        }
    }

    /// An example of type `t`, with id `id`, as a create or update would send it.
    fn resource_for(&mut self, t: &str, id: &str) -> Value {
        let of_type: Vec<&Value> = self
            .examples
            .iter()
            .filter(|e| e["resourceType"] == t)
            .collect();
        let mut v = match of_type.len() {
            0 => json!({"resourceType": t}),
            n => of_type[self.rng.usize(..n)].clone(),
        };
        v["id"] = json!(id);
        self.steer(&mut v);
        v
    }

    /// Points `resource` at the hinted patient half of the time.
    fn steer(&mut self, resource: &mut Value) {
        if let Some(patient) = self.patient_hint
            && self.chance(50)
            && resource["resourceType"] != "Patient"
        {
            resource["subject"] = json!({"reference": format!("Patient/{patient}")});
        }
    }

    fn body(&mut self) -> Vec<u8> {
        let value = match self.rng.u8(..10) {
            0..=4 => {
                let mut v = self.examples[self.rng.usize(..self.examples.len())].clone();
                for _ in 0..self.rng.usize(..4) {
                    self.mutate(&mut v, 0);
                }
                v
            }
            5 | 6 => self.bundle(),
            7 => self.json_patch(),
            8 => self.fhirpath_patch(),
            _ => self.random_value(0),
        };
        let mut bytes = serde_json::to_vec(&value).unwrap();
        match self.rng.u8(..20) {
            0 if !bytes.is_empty() => bytes.truncate(self.rng.usize(..bytes.len())),
            1 if !bytes.is_empty() => {
                let at = self.rng.usize(..bytes.len());
                bytes[at] = self.rng.u8(..);
            }
            2 => bytes = b"[".repeat(2_000),
            3 => {
                bytes = format!("{{\"resourceType\":\"Patient\",\"a\":{}}}", "[".repeat(300)).into()
            }
            _ => {}
        }
        bytes
    }

    fn bundle(&mut self) -> Value {
        let kind = self.pick(&["transaction", "batch", "searchset", "collection", "x"]);
        let entries: Vec<Value> = (0..self.rng.usize(..6))
            .map(|_| {
                let method = self.pick(&["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "x"]);
                let url = format!("{}{}", &self.path()[1..], self.query());
                let mut entry = json!({"request": {"method": method, "url": url}});
                if self.chance(60) {
                    let mut resource = self.examples[self.rng.usize(..self.examples.len())].clone();
                    if self.chance(40) {
                        // References to another entry, to a search, or to nothing known.
                        resource["subject"] = json!({"reference": self.pick(&[
                            "urn:uuid:61ebe359-bfdc-4613-8bf2-c5e300945f0a",
                            "urn:uuid:00000000-0000-0000-0000-000000000000",
                            "Patient?identifier=a|b",
                            "Patient?_id=p1",
                            "Patient?",
                            "Patient/p1",
                            "#contained",
                        ])});
                    }
                    entry["resource"] = resource;
                }
                if self.chance(40) {
                    entry["fullUrl"] = json!(self.pick(&[
                        "urn:uuid:61ebe359-bfdc-4613-8bf2-c5e300945f0a",
                        "urn:uuid:x",
                        "http://fhir.test/Patient/p1",
                        "",
                    ]));
                }
                if self.chance(20) {
                    entry["request"]["ifMatch"] = json!(self.pick(&["W/\"1\"", "x", ""]));
                }
                if self.chance(20) {
                    entry["request"]["ifNoneExist"] = json!(self.pick(&["_id=p1", "%", "x=y"]));
                }
                if self.chance(10) {
                    self.mutate(&mut entry, 0);
                }
                entry
            })
            .collect();
        json!({"resourceType": "Bundle", "type": kind, "entry": entries})
    }

    fn json_patch(&mut self) -> Value {
        let ops: Vec<Value> = (0..self.rng.usize(..4))
            .map(|_| {
                json!({
                    "op": self.pick(&["add", "remove", "replace", "move", "copy", "test", "x"]),
                    "path": self.pick(&["/name", "/name/0/family", "/id", "/meta", "/-", "", "/a~2b", "/name/99"]),
                    "from": self.pick(&["/name", "/x", ""]),
                    "value": self.random_value(2),
                })
            })
            .collect();
        Value::Array(ops)
    }

    fn fhirpath_patch(&mut self) -> Value {
        let parts: Vec<Value> = (0..self.rng.usize(..4))
            .map(|_| {
                json!({"name": "operation", "part": [
                    {"name": "type", "valueCode": self.pick(&["add", "insert", "delete", "replace", "move", "x"])},
                    {"name": "path", "valueString": self.pick(&["Patient", "Patient.name", "Patient.name[0]", "Patient.name.where(", "%x", ""])},
                    {"name": "name", "valueString": self.pick(&["family", "birthDate", "x", ""])},
                    {"name": "value", "valueString": self.pick(VALUES)},
                    {"name": "index", "valueInteger": self.rng.i32(-2..5)},
                ]})
            })
            .collect();
        json!({"resourceType": "Parameters", "parameter": parts})
    }

    fn random_value(&mut self, depth: usize) -> Value {
        match self.rng.u8(..if depth > 3 { 6 } else { 8 }) {
            0 => Value::Null,
            1 => Value::Bool(self.rng.bool()),
            2 => json!(self.rng.i64(..)),
            3 => serde_json::from_str(self.pick(&[
                "1e400",
                "-0.000",
                "1.50",
                "12345678901234567890123",
            ]))
            .unwrap(),
            4 | 5 => Value::String(self.pick(VALUES).to_owned()),
            6 => Value::Array(
                (0..self.rng.usize(..4))
                    .map(|_| self.random_value(depth + 1))
                    .collect(),
            ),
            _ => {
                let mut map = Map::new();
                for _ in 0..self.rng.usize(..4) {
                    let key = self.pick(&[
                        "resourceType",
                        "id",
                        "meta",
                        "text",
                        "name",
                        "extension",
                        "x",
                        "",
                    ]);
                    map.insert(key.to_owned(), self.random_value(depth + 1));
                }
                Value::Object(map)
            }
        }
    }

    /// Replaces, removes or adds one node somewhere in `value`.
    fn mutate(&mut self, value: &mut Value, depth: usize) {
        let descend = depth < 6 && self.chance(70);
        match value {
            Value::Object(map) if !map.is_empty() => {
                let key = map
                    .keys()
                    .nth(self.rng.usize(..map.len()))
                    .cloned()
                    .unwrap();
                if descend {
                    self.mutate(map.get_mut(&key).unwrap(), depth + 1);
                } else if self.chance(40) {
                    map.remove(&key);
                } else {
                    let replacement = self.random_value(2);
                    map.insert(key, replacement);
                }
            }
            Value::Array(items) if !items.is_empty() => {
                let at = self.rng.usize(..items.len());
                if descend {
                    self.mutate(&mut items[at], depth + 1);
                } else {
                    items[at] = self.random_value(2);
                }
            }
            other => *other = self.random_value(2),
        }
    }

    fn request(&mut self) -> (Method, String, Vec<(&'static str, String)>, Vec<u8>) {
        if let Some(patient) = self.patient_hint
            && self.chance(25)
        {
            return self.write_for(patient);
        }
        let (path, allowed, target) = self.route();
        let method = self.method(allowed);
        let uri = format!("{path}{}", self.query());
        let mut headers = Vec::new();
        for (name, values) in HEADERS {
            if self.chance(12) {
                headers.push((*name, self.pick(values).to_owned()));
            }
        }
        if method == Method::POST && path.ends_with("/_search") && self.chance(70) {
            headers.retain(|(name, _)| *name != "content-type");
            headers.push((
                "content-type",
                "application/x-www-form-urlencoded".to_owned(),
            ));
            let form = self.query();
            let form = form.strip_prefix('?').unwrap_or(&form).as_bytes().to_vec();
            return (method, uri, headers, form);
        }
        let body = if matches!(method, Method::POST | Method::PUT | Method::PATCH) || self.chance(5)
        {
            if !headers.iter().any(|(name, _)| *name == "content-type") && self.chance(85) {
                let content_type = if method == Method::PATCH && self.chance(50) {
                    "application/json-patch+json"
                } else {
                    "application/fhir+json"
                };
                headers.push(("content-type", content_type.to_owned()));
            }
            match target {
                Some((t, id)) if method != Method::PATCH && self.chance(50) => {
                    let mut resource = self.resource_for(t, id);
                    for _ in 0..self.rng.usize(..3) {
                        self.mutate(&mut resource, 0);
                    }
                    serde_json::to_vec(&resource).unwrap()
                }
                _ => self.body(),
            }
        } else {
            Vec::new()
        };
        (method, uri, headers, body)
    }
}

impl Generator {
    /// A plain write that names `patient`: a create, an update of a seeded or new id (the
    /// other patient's among them), or a delete.
    fn write_for(
        &mut self,
        patient: &str,
    ) -> (Method, String, Vec<(&'static str, String)>, Vec<u8>) {
        let headers = vec![("content-type", "application/fhir+json".to_owned())];
        let t = self.pick(&["Observation", "Condition", "Encounter"]);
        let id = self.pick(&["o1", "o2", "o3", "o4", "new1", "new2"]);
        let mut resource = self.resource_for(t, id);
        resource["subject"] = json!({"reference": format!("Patient/{patient}")});
        if self.chance(20) {
            self.mutate(&mut resource, 0);
        }
        let body = serde_json::to_vec(&resource).unwrap();
        match self.rng.u8(..4) {
            0 => (Method::POST, format!("/{t}"), headers, body),
            1 => (
                Method::DELETE,
                format!("/Observation/{id}"),
                Vec::new(),
                Vec::new(),
            ),
            _ => (Method::PUT, format!("/{t}/{id}"), headers, body),
        }
    }
}

/// Percent-encodes what a query value cannot hold as is, leaving the `%` sequences the value
/// list holds on purpose (some valid, some not).
fn encode_query_value(value: &str) -> String {
    let mut out = String::new();
    for c in value.chars() {
        match c {
            'A'..='Z'
            | 'a'..='z'
            | '0'..='9'
            | '-'
            | '.'
            | '_'
            | '~'
            | '%'
            | ','
            | '|'
            | '$'
            | ':'
            | '/'
            | '*' => out.push(c),
            _ => {
                let mut buf = [0u8; 4];
                for b in c.encode_utf8(&mut buf).bytes() {
                    out.push_str(&format!("%{b:02X}"));
                }
            }
        }
    }
    out
}

async fn seed_data(app: &Router) {
    let resources = [
        json!({"resourceType": "Patient", "id": "p1", "name": [{"family": "Chalmers", "given": ["Peter"]}], "birthDate": "1974-12-25", "gender": "male"}),
        json!({"resourceType": "Patient", "id": "p2", "name": [{"family": "\u{00c9}l\u{00e8}ve"}]}),
        json!({"resourceType": "Observation", "id": "o1", "status": "final", "code": {"coding": [{"system": "http://loinc.org", "code": "1234-5"}]}, "subject": {"reference": "Patient/p1"}, "effectiveDateTime": "2020-02-03", "valueQuantity": {"value": 5.4, "system": "http://unitsofmeasure.org", "code": "mg"}}),
        json!({"resourceType": "Group", "id": "g1", "type": "person", "actual": true, "member": [{"entity": {"reference": "Patient/p1"}}]}),
        json!({"resourceType": "List", "id": "l1", "status": "current", "mode": "working", "entry": [{"item": {"reference": "Patient/p2"}}]}),
    ];
    for resource in resources {
        let uri = format!(
            "/{}/{}",
            resource["resourceType"].as_str().unwrap(),
            resource["id"].as_str().unwrap()
        );
        let req = Request::builder()
            .method(Method::PUT)
            .uri(uri)
            .header("content-type", "application/fhir+json")
            .body(Body::from(resource.to_string()))
            .unwrap();
        let status = app.clone().oneshot(req).await.unwrap().status();
        assert!(status.is_success(), "seeding answered {status}");
    }
}

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One random request's answer, with what replays it.
struct Answer {
    method: Method,
    status: StatusCode,
    raw: Vec<u8>,
    context: String,
}

/// Sends `GET` of each of `first`, then `count` random requests from `seed` (each with
/// `authorization` when given), and hands each answer to `check`; returns how often each
/// status came back. Every answer is checked to be a FHIR answer first: no panic, no 500,
/// every error an OperationOutcome.
async fn send_random(
    app: &Router,
    seed: u64,
    count: u64,
    authorization: Option<&str>,
    patient_hint: Option<&'static str>,
    first: &[&str],
    mut check: impl FnMut(&Answer),
) -> std::collections::BTreeMap<u16, usize> {
    let mut generator = Generator {
        rng: fastrand::Rng::with_seed(seed),
        examples: examples(400),
        patient_hint,
    };
    assert!(generator.examples.len() > 100, "too few examples to mutate");
    let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
    for n in 0..first.len() as u64 + count {
        let (method, uri, mut headers, body) = match first.get(n as usize) {
            Some(uri) => (Method::GET, (*uri).to_owned(), Vec::new(), Vec::new()),
            None => generator.request(),
        };
        if let Some(authorization) = authorization {
            headers.retain(|(name, _)| *name != "authorization");
            headers.push(("authorization", authorization.to_owned()));
        }
        let mut builder = Request::builder().method(method.clone()).uri(&uri);
        for (name, value) in &headers {
            builder = builder.header(*name, value);
        }
        let Ok(req) = builder.body(Body::from(body.clone())) else {
            // A URI or header value the HTTP types refuse never reaches a server either.
            continue;
        };
        let response = app.clone().oneshot(req).await.unwrap();
        let status = response.status();
        *statuses.entry(status.as_u16()).or_default() += 1;
        let raw = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap()
            .to_vec();
        let answer = Answer {
            context: format!(
                "request {n} (seed {seed}): {method} {uri} {headers:?} body {}",
                String::from_utf8_lossy(&body[..body.len().min(300)])
            ),
            method,
            status,
            raw,
        };
        assert!(
            status != StatusCode::INTERNAL_SERVER_ERROR && status != StatusCode::NOT_IMPLEMENTED,
            "{status} for {}: {}",
            answer.context,
            String::from_utf8_lossy(&answer.raw)
        );
        if (status.is_client_error() || status.is_server_error()) && answer.method != Method::HEAD {
            let outcome: Value = serde_json::from_slice(&answer.raw)
                .unwrap_or_else(|_| panic!("{status} without a JSON body for {}", answer.context));
            assert_eq!(
                outcome["resourceType"], "OperationOutcome",
                "{status} for {}",
                answer.context
            );
        }
        check(&answer);
    }
    statuses
}

/// `Type/id` of every resource a body carries: itself, and the resources of its Bundle
/// entries (OperationOutcomes and the Bundle itself left out).
fn carried_resources(body: &Value, out: &mut Vec<String>) {
    let Some(resource_type) = body["resourceType"].as_str() else {
        return;
    };
    match resource_type {
        "Bundle" => {
            for entry in body["entry"].as_array().into_iter().flatten() {
                carried_resources(&entry["resource"], out);
            }
        }
        "OperationOutcome" | "CapabilityStatement" => {}
        _ => out.push(format!(
            "{resource_type}/{}",
            body["id"].as_str().unwrap_or("(no id)")
        )),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_requests_get_fhir_answers() {
    let h = harness();
    seed_data(&h.app).await;
    let seed = env_number("FHIRKEEP_RANDOM_SEED", 20_261_130);
    let count = env_number("FHIRKEEP_RANDOM_REQUESTS", DEFAULT_REQUESTS as u64);
    let statuses = send_random(&h.app, seed, count, None, None, &[], |_| {}).await;
    // The generator reaches both sides: successes and each kind of refusal.
    for expected in [200, 201, 400, 404, 405, 415] {
        assert!(
            statuses.contains_key(&expected),
            "no {expected} among {statuses:?}"
        );
    }
}

/// Four clients sending random requests at once (reads, searches, writes, Bundles, exports
/// racing each other through group commits and index catch-ups): still only FHIR answers,
/// and afterwards the database is consistent (the index answers searches, the audit log
/// verifies).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_requests_from_concurrent_clients_get_fhir_answers() {
    let h = harness();
    seed_data(&h.app).await;
    let seed = env_number("FHIRKEEP_RANDOM_SEED", 20_261_130) + 100;
    let count = env_number("FHIRKEEP_RANDOM_REQUESTS", DEFAULT_REQUESTS as u64) / 4;
    let clients: Vec<_> = (0..4)
        .map(|n| {
            let app = h.app.clone();
            tokio::spawn(async move {
                send_random(&app, seed + n, count, None, None, &[], |_| {}).await
            })
        })
        .collect();
    for client in clients {
        let statuses = client.await.unwrap();
        assert!(statuses.contains_key(&200), "{statuses:?}");
    }
    let search = Request::builder()
        .uri("/Patient?_count=1")
        .body(Body::empty())
        .unwrap();
    let response = h.app.clone().oneshot(search).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let db = h.state.db();
    db.store().flush_audit().unwrap();
    let report = db.store().verify_audit().unwrap();
    assert!(report.leaves > count, "{report:?}");
}

/// Tokens of a patient context or with search restrictions, each with what of the seeded data
/// it may see (see `auth_tests::seed`).
const SCOPED_TOKENS: &[(&str, Option<&str>, &[&str])] = &[
    ("patient/*.read launch/patient", Some("p1"), P1_COMPARTMENT),
    (
        "patient/Observation.rs?category=laboratory",
        Some("p1"),
        &["Observation/o1", "Observation/o4"],
    ),
    (
        "user/Observation.rs?category=laboratory",
        None,
        &["Observation/o1", "Observation/o2", "Observation/o4"],
    ),
];

/// Whatever a scoped token asks (searches, includes, reverse chains, compartments, history,
/// operations, writes), every answer it gets carries only resources its scopes reach, and
/// never the patient it may not see.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_requests_of_scoped_tokens_see_only_what_the_scopes_reach() {
    let h = harness_with(Options::without_rate_limit());
    let seed = env_number("FHIRKEEP_RANDOM_SEED", 20_261_130);
    let count = env_number("FHIRKEEP_RANDOM_REQUESTS", DEFAULT_REQUESTS as u64);
    for (n, (scope, patient, allowed)) in SCOPED_TOKENS.iter().enumerate() {
        let bearer = format!("Bearer {}", token(scope, *patient));
        let mut seen = std::collections::BTreeSet::new();
        // Plain reads first, which reach everything the token may see: the checks below are
        // then not vacuous.
        let first = ["/Patient/p1/$everything", "/Observation", "/Patient/p1"];
        let statuses = send_random(
            &h.app,
            seed + 1 + n as u64,
            count,
            Some(&bearer),
            None,
            &first,
            |answer: &Answer| {
                if !answer.status.is_success() {
                    return;
                }
                // p2's family name is in no resource these tokens may see.
                assert!(
                    !String::from_utf8_lossy(&answer.raw).contains("\"Two\""),
                    "p2 reached {scope}: {}",
                    answer.context
                );
                let Ok(body) = serde_json::from_slice::<Value>(&answer.raw) else {
                    return;
                };
                let mut carried = Vec::new();
                carried_resources(&body, &mut carried);
                for key in carried {
                    assert!(
                        allowed.contains(&key.as_str()),
                        "{key} reached {scope}: {}",
                        answer.context
                    );
                    seen.insert(key);
                }
            },
        )
        .await;
        assert_eq!(
            seen.iter()
                .map(String::as_str)
                .collect::<std::collections::BTreeSet<_>>(),
            allowed.iter().copied().collect(),
            "{scope}: statuses {statuses:?}"
        );
    }
}

/// A token with a patient context and write access: whatever it sends (creates, updates,
/// patches, deletes, conditional writes, Bundles), every version that lands is in its
/// patient's compartment, and so was the version it replaced; nothing else changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_writes_of_a_patient_token_stay_in_its_compartment() {
    let h = harness_with(Options::without_rate_limit());
    let db = h.database();
    let ctx = AccessContext::local("test");
    let seeded = db.store().last_change_seq().unwrap();
    let bearer = format!("Bearer {}", token("patient/*.cruds", Some("p1")));
    let seed = env_number("FHIRKEEP_RANDOM_SEED", 20_261_130) + 7;
    let count = env_number("FHIRKEEP_RANDOM_REQUESTS", DEFAULT_REQUESTS as u64);
    send_random(&h.app, seed, count, Some(&bearer), Some("p1"), &[], |_| {}).await;

    let registry = db.registry().unwrap();
    let in_p1 = |resource_type: &str, content: &Value| {
        compartment_patients(&registry, resource_type, content).contains("p1")
    };
    let mut written = 0;
    let mut after = Some(seeded);
    loop {
        let page = db.store().changes_after(&ctx, after, 500).unwrap();
        for (seq, version) in &page.changes {
            after = Some(*seq);
            written += 1;
            let key = format!(
                "{}/{}/_history/{}",
                version.resource_type, version.id, version.version
            );
            if !version.is_deleted() {
                assert!(
                    in_p1(&version.resource_type, &version.to_json().unwrap()),
                    "{key} was written outside p1's compartment"
                );
            }
            if version.version > 1 {
                // A version after a deletion replaced nothing (vread answers Gone).
                let before = db.store().vread(
                    &ctx,
                    &version.resource_type,
                    &version.id,
                    version.version - 1,
                );
                if let Ok(before) = before {
                    assert!(
                        in_p1(&version.resource_type, &before.to_json().unwrap()),
                        "{key} replaced a version outside p1's compartment"
                    );
                } else {
                    assert!(
                        matches!(before, Err(fhirkeep_engine::Error::Gone { .. })),
                        "{key}: {before:?}"
                    );
                }
            }
        }
        if page.changes.is_empty() {
            break;
        }
    }
    // Writes did land (the checks above are not vacuous), and p2 is as seeded.
    assert!(written > 50, "only {written} writes landed");
    for (resource_type, id) in [
        ("Patient", "p2"),
        ("Observation", "o2"),
        ("Practitioner", "dr1"),
    ] {
        let current = db.store().read(&ctx, resource_type, id);
        assert!(
            matches!(&current, Ok(stored) if stored.version == 1),
            "{resource_type}/{id}: {current:?}"
        );
    }
}
