//! What a resource contributes to the index: every search parameter's FHIRPath expression
//! evaluated, and each value turned into the terms that FHIR search semantics look up.
//!
//! All terms of all parameters go into one raw tantivy field as `code ␟ kind ␟ value`
//! (␟ is U+001F), so a new custom parameter needs no schema change. The kinds:
//!
//! | kind | from | value |
//! |---|---|---|
//! | `s` | string | normalized text (starts-with is a term range) |
//! | `e` | string | exact text |
//! | `t` | token | `code`, `system|code`, `|code` (no system); none for `_id`, see [`ID_PARAM`] (`system|` is a prefix search) |
//! | `x` | token | normalized display / text (`:text`) |
//! | `o` | token (Identifier) | `typesystem|typecode|value` (`:of-type`) |
//! | `r` | reference | `Type/id`, `id`, absolute URL, canonical with and without version |
//! | `i` | reference | `system|value`, `value` of `Reference.identifier` (`:identifier`) |
//! | `u` | uri | the uri |
//! | `dlC`, `dhC` | date | ordered low / high instant of the value's range, `C` the finest calendar unit holding it (`D`, `M`, `Y`, `S`) |
//! | `dpD` | date | both bounds of a point value (low = high: an instant to the microsecond) |
//! | `dsD` | date | both bounds of a value to the second (low on a whole second, high = low + [`SECOND_SPAN`]) |
//! | `db` | date | calendar buckets wholly containing the range (`eq` lookups): year, month, day; minute and second only on a crowded day |
//! | `dm` | date | a crowded day: two or more of the parameter's values lie within it |
//! | `n` | number | ordered value |
//! | `q` | quantity | `unitkey ␟ ordered value`, unit keys `''`, `|code`, `|unit`, `system|code` |
//! | `c` | composite | component equality forms joined by `$`, `␟`, the last component's term |
//! | `c0`, `c1`, … | composite of one focus | component `i`'s own terms (see [`single_focus`]) |
//! | `p` | any | presence: the resource has a value (`:missing`) |
//!
//! A derived parameter ([`SearchParam::derived_from`]) has only its `p` term and its sort
//! keys: its values are its members', already indexed under their codes.

use std::borrow::Cow;

use fhirkeep_fhirpath::{Item, member};
use serde_json::Value;

use crate::registry::{Component, ParamType, Registry, SearchParam};
use crate::values::{
    DAY_MICROS, DateBuckets, InstantRange, MAX_MICROS, MIN_MICROS, normalize_string, ordered_f64,
    ordered_i64, parse_fhir_date, sub_day_buckets,
};

/// The separator between the parts of an index term.
pub const SEP: char = '\u{1f}';

/// [`SEP`] as a string.
const SEP_STR: &str = "\u{1f}";

/// The resource id parameter: it has only its presence term, since the document key
/// (`Type/id`) answers `_id` searches and sorts.
pub const ID_PARAM: &str = "_id";

/// The high bound of a value to the second is its low bound plus this (µs).
pub const SECOND_SPAN: i64 = 999_999;

/// Whether composite `param` of `resource_type` has one focus, the resource itself (as
/// Observation's `code-value-quantity`, whose expression is `Observation`). Such a composite
/// matches `a$b` exactly when its first component matches `a` and its second `b`, so each
/// component is indexed on its own (`c0`, `c1`, … terms) and a search joins them with AND,
/// rather than indexing every combination of the components' forms: fewer terms, and far
/// fewer distinct ones (a code's terms are shared by every resource with that code).
pub fn single_focus(param: &SearchParam, resource_type: &str) -> bool {
    param.kind == ParamType::Composite
        && param.expression_text.as_deref().map(str::trim) == Some(resource_type)
}

/// Everything one resource contributes to the index.
#[derive(Debug, Default, Clone)]
pub struct IndexEntries {
    /// Terms of the `terms` field, in no particular order; one may repeat.
    pub terms: Vec<String>,
    /// Narrative text (`_text`).
    pub narrative: String,
    /// The resource's text (`_content`): `string` and `markdown` values and the narrative.
    pub content: String,
    /// `code ␟ Type/id` for each reference value (reverse chaining, `_include` via index).
    pub references: Vec<String>,
    /// `code ␟ sortable key` for each sortable value.
    pub sort_keys: Vec<String>,
}

/// The FHIRPath work one parameter's expression may do on one resource (about an item each):
/// far beyond what an R4 expression needs on the largest resource a request can carry, so only
/// an expression that goes quadratic is stopped (counted as an expression failure).
const EXPRESSION_BUDGET: u64 = 4_000_000;

/// A term for `code` of the given kind and value.
pub fn term(code: &str, kind: &str, value: &str) -> String {
    let mut out = String::with_capacity(code.len() + kind.len() + value.len() + 2);
    out.push_str(code);
    out.push(SEP);
    out.push_str(kind);
    out.push(SEP);
    out.push_str(value);
    out
}

/// `code ␟ kind ␟ parts…`, built without intermediate strings (extraction makes ~60 terms
/// per resource, and `format!` was a visible share of it).
fn term_of(code: &str, kind: &str, parts: &[&str]) -> String {
    let len = code.len() + kind.len() + 2 + parts.iter().map(|p| p.len()).sum::<usize>();
    let mut out = String::with_capacity(len);
    out.push_str(code);
    out.push(SEP);
    out.push_str(kind);
    out.push(SEP);
    for part in parts {
        out.push_str(part);
    }
    out
}

/// `code ␟ value`: a sort key or a reference target.
fn keyed(code: &str, value: &str) -> String {
    let mut out = String::with_capacity(code.len() + 1 + value.len());
    out.push_str(code);
    out.push(SEP);
    out.push_str(value);
    out
}

/// Computes the index entries of `resource` (of type `resource_type`).
///
/// A parameter whose expression fails on this resource contributes nothing and is counted in
/// the returned number of failures, so that one odd resource never blocks a write.
pub fn extract(
    registry: &Registry,
    resource_type: &str,
    resource: &Value,
) -> (IndexEntries, usize) {
    // Sized for a typical resource (~40 terms, ~11 sort keys), so the vectors rarely grow.
    let mut entries = IndexEntries {
        terms: Vec::with_capacity(64),
        sort_keys: Vec::with_capacity(16),
        ..IndexEntries::default()
    };
    let mut failures = 0;
    let root = fhirkeep_fhirpath::Node::resource(resource);
    let mut derived = Vec::new();
    let mut present: Vec<&str> = Vec::new();
    // One buffer for every parameter's values: a resource has ~40 parameters.
    let mut values: Vec<IndexValue<'_>> = Vec::new();
    for param in registry.for_type(resource_type) {
        if !param.derived_from.is_empty() {
            derived.push(param);
            continue;
        }
        let Some(expression) = &param.expression else {
            continue;
        };
        // Bounded, as a stored SearchParameter's expression is a user's: one written to scan
        // the resource per item would otherwise stall indexing on a large resource.
        let mut budget = EXPRESSION_BUDGET;
        let items = match expression.evaluate_node_within(root, &mut budget) {
            Ok(items) => items,
            Err(_) => {
                failures += 1;
                continue;
            }
        };
        let before = entries.terms.len();
        if single_focus(param, resource_type) {
            component_terms(param, &items, &mut entries.terms);
        } else if param.kind == ParamType::Composite {
            composite_terms(param, &items, &mut entries.terms);
        } else {
            values.clear();
            for item in &items {
                item_values(param.kind, item, &mut values);
            }
            let crowded = crowded_days(&values);
            for value in &values {
                emit(&param.code, value, &crowded, &mut entries);
            }
        }
        if entries.terms.len() > before {
            entries.terms.push(term(&param.code, "p", ""));
            present.push(&param.code);
        }
    }
    for param in derived {
        derived_entries(param, &present, &mut entries);
    }
    entries.narrative = narrative_text(resource);
    entries.content = content_text(resource);
    // The terms stay unsorted and may repeat (two codings with one code): sorting ~40 terms
    // cost more than tantivy's look-up of the ~2 repeats, which it records once.
    entries.sort_keys.sort_unstable();
    entries.sort_keys.dedup();
    entries.references.sort_unstable();
    entries.references.dedup();
    (entries, failures)
}

/// What a derived parameter (see [`SearchParam::derived_from`]) keeps of its own: its
/// presence term, and its members' sort keys under its code. Its value terms are its
/// members', which a search looks up instead.
fn derived_entries(param: &SearchParam, present: &[&str], entries: &mut IndexEntries) {
    if param
        .derived_from
        .iter()
        .any(|member| present.contains(&member.as_str()))
    {
        entries.terms.push(term(&param.code, "p", ""));
    }
    let mut renamed = Vec::new();
    for member in &param.derived_from {
        for key in &entries.sort_keys {
            if let Some(value) = key
                .strip_prefix(member.as_str())
                .and_then(|rest| rest.strip_prefix(SEP))
            {
                renamed.push(keyed(&param.code, value));
            }
        }
    }
    entries.sort_keys.extend(renamed);
}

/// One typed value found for a parameter. Text borrows from the resource where it can:
/// extraction makes ~30 values per resource, and a copy of each was as many allocations.
#[derive(Debug, Clone, PartialEq)]
pub enum IndexValue<'a> {
    /// A string value (string parameters).
    Text(Cow<'a, str>),
    /// A token: optional system, code, optional display text.
    Token {
        /// The code system (or identifier system).
        system: Option<Cow<'a, str>>,
        /// The code (or identifier value).
        code: Cow<'a, str>,
    },
    /// Display text of a token (`:text`).
    TokenText(Cow<'a, str>),
    /// An identifier's type and value (`:of-type`).
    OfType {
        /// `type.coding.system`.
        system: Cow<'a, str>,
        /// `type.coding.code`.
        code: Cow<'a, str>,
        /// `Identifier.value`.
        value: Cow<'a, str>,
    },
    /// A reference target as written.
    Reference(Cow<'a, str>),
    /// A logical reference by identifier.
    ReferenceIdentifier {
        /// The identifier system.
        system: Option<Cow<'a, str>>,
        /// The identifier value.
        value: Cow<'a, str>,
    },
    /// A uri.
    Uri(Cow<'a, str>),
    /// A range of instants.
    Date(InstantRange),
    /// A number.
    Number(f64),
    /// A quantity.
    Quantity {
        /// The value.
        value: f64,
        /// The unit system.
        system: Option<Cow<'a, str>>,
        /// The unit code.
        code: Option<Cow<'a, str>>,
        /// The human unit.
        unit: Option<Cow<'a, str>>,
    },
}

impl IndexValue<'_> {
    /// The value with its text owned, free of the JSON it was found in.
    pub fn into_owned(self) -> IndexValue<'static> {
        fn own(text: Cow<'_, str>) -> Cow<'static, str> {
            Cow::Owned(text.into_owned())
        }
        match self {
            IndexValue::Text(text) => IndexValue::Text(own(text)),
            IndexValue::Token { system, code } => IndexValue::Token {
                system: system.map(own),
                code: own(code),
            },
            IndexValue::TokenText(text) => IndexValue::TokenText(own(text)),
            IndexValue::OfType {
                system,
                code,
                value,
            } => IndexValue::OfType {
                system: own(system),
                code: own(code),
                value: own(value),
            },
            IndexValue::Reference(reference) => IndexValue::Reference(own(reference)),
            IndexValue::ReferenceIdentifier { system, value } => IndexValue::ReferenceIdentifier {
                system: system.map(own),
                value: own(value),
            },
            IndexValue::Uri(uri) => IndexValue::Uri(own(uri)),
            IndexValue::Date(range) => IndexValue::Date(range),
            IndexValue::Number(number) => IndexValue::Number(number),
            IndexValue::Quantity {
                value,
                system,
                code,
                unit,
            } => IndexValue::Quantity {
                value,
                system: system.map(own),
                code: code.map(own),
                unit: unit.map(own),
            },
        }
    }
}

/// The days (in days since 1970, UTC) that hold two or more date values each lying within
/// one day: on those the values get minute and second buckets, since their bounds alone
/// cannot tell which low goes with which high (see [`emit`]).
fn crowded_days(values: &[IndexValue<'_>]) -> Vec<i64> {
    let mut days: Vec<i64> = values
        .iter()
        .filter_map(|value| match value {
            IndexValue::Date(range) => within_one_day(*range),
            _ => None,
        })
        .collect();
    if days.len() < 2 {
        return Vec::new();
    }
    days.sort_unstable();
    let mut crowded: Vec<i64> = days
        .windows(2)
        .filter(|pair| pair[0] == pair[1])
        .map(|pair| pair[0])
        .collect();
    crowded.dedup();
    crowded
}

/// The day (days since 1970, UTC) that wholly holds `range`, if one does.
fn within_one_day(range: InstantRange) -> Option<i64> {
    let day = range.low.div_euclid(DAY_MICROS);
    (day == range.high.div_euclid(DAY_MICROS)).then_some(day)
}

/// Appends the terms and sort keys of one value of parameter `code`; `crowded` are the days
/// holding more than one of the parameter's date values (see [`crowded_days`]).
fn emit(code: &str, value: &IndexValue<'_>, crowded: &[i64], entries: &mut IndexEntries) {
    let terms = &mut entries.terms;
    let sort = &mut entries.sort_keys;
    match value {
        IndexValue::Text(text) => {
            let normalized = normalize_string(text);
            if normalized.is_empty() {
                return;
            }
            terms.push(term(code, "e", text));
            sort.push(keyed(code, &normalized));
            terms.push(term(code, "s", &normalized));
        }
        IndexValue::Token {
            system,
            code: value,
        } => {
            if value.is_empty() {
                return;
            }
            if code == ID_PARAM {
                // The id is the second half of the document's key: `_id` searches look up
                // `key` terms and `_sort=_id` reads the key column (see `search`), so the id,
                // unique per resource, needs no term or sort value of its own. It keeps its
                // presence term (`:missing`), pushed here because the caller adds one only
                // for a parameter that added terms.
                terms.push(term(code, "p", ""));
                return;
            }
            terms.push(term(code, "t", value));
            // No `system|` term: a search for any code of a system takes the `system|code`
            // terms by prefix (a system has few distinct codes in one index, and the term
            // would be one more per coding).
            match system {
                Some(system) => terms.push(term_of(code, "t", &[system, "|", value])),
                None => terms.push(term_of(code, "t", &["|", value])),
            }
            sort.push(keyed(code, value));
        }
        IndexValue::TokenText(text) => {
            let normalized = normalize_string(text);
            if !normalized.is_empty() {
                terms.push(term(code, "x", &normalized));
            }
        }
        IndexValue::OfType {
            system,
            code: type_code,
            value,
        } => terms.push(term_of(code, "o", &[system, "|", type_code, "|", value])),
        IndexValue::Reference(reference) => {
            if plain_local_reference(reference).is_some() {
                // `Type/id` as written, most references: its only form, and a target.
                entries.references.push(keyed(code, reference));
                terms.push(term(code, "r", reference));
            } else {
                let (other_form, _) = reference_forms_and_id(reference);
                for form in std::iter::once(&**reference).chain(other_form.as_deref()) {
                    if form.matches('/').count() == 1 && !form.contains(':') {
                        entries.references.push(keyed(code, form));
                    }
                    terms.push(term(code, "r", form));
                }
            }
            sort.push(keyed(code, reference));
        }
        IndexValue::ReferenceIdentifier { system, value } => {
            terms.push(term(code, "i", value));
            match system {
                Some(system) => terms.push(term_of(code, "i", &[system, "|", value])),
                None => terms.push(term_of(code, "i", &["|", value])),
            }
        }
        IndexValue::Uri(uri) => {
            terms.push(term(code, "u", uri));
            sort.push(keyed(code, uri));
        }
        IndexValue::Date(range) => {
            let buckets = DateBuckets::of(*range);
            // The bounds are filed under the finest calendar unit that holds the whole value
            // (day, month, year, or S for spanning years), so a range search scans the bound
            // terms of one unit only and takes whole later or earlier units as bucket terms.
            let class = date_class(buckets.len());
            let (low_kind, high_kind) = match class {
                'D' => ("dlD", "dhD"),
                'M' => ("dlM", "dhM"),
                'Y' => ("dlY", "dhY"),
                _ => ("dlS", "dhS"),
            };
            let low = ordered_i64(range.low);
            if class == 'D' && range.low == range.high {
                // A point (an instant to the microsecond, as every `meta.lastUpdated`): one
                // term stands for both bounds, which would be two distinct terms each.
                terms.push(term(code, "dpD", &low));
            } else if class == 'D'
                && range.high - range.low == SECOND_SPAN
                && range.low.rem_euclid(SECOND_SPAN + 1) == 0
            {
                // A value to the second (most clinical times): likewise one term, its high
                // bound implied.
                terms.push(term(code, "dsD", &low));
            } else {
                terms.push(term(code, low_kind, &low));
                terms.push(term(code, high_kind, &ordered_i64(range.high)));
            }
            // A value alone on its day is found at minute or second precision by its bounds
            // (both within the asked minute or second); on a crowded day a low and a high in
            // range may come from two values, so those values carry minute and second
            // buckets, and the day a marker that keeps the bounds-only lookup off it.
            if class == 'D'
                && let Some(day) = within_one_day(*range)
                && crowded.contains(&day)
            {
                if let Some(day_bucket) = buckets.last() {
                    terms.push(term(code, "dm", day_bucket));
                }
                for bucket in sub_day_buckets(*range) {
                    terms.push(term(code, "db", &bucket));
                }
            }
            for bucket in buckets.iter() {
                terms.push(term(code, "db", bucket));
            }
            sort.push(keyed(code, &low));
        }
        IndexValue::Number(number) => {
            let ordered = ordered_f64(*number);
            terms.push(term(code, "n", &ordered));
            sort.push(keyed(code, &ordered));
        }
        IndexValue::Quantity {
            value,
            system,
            code: unit_code,
            unit,
        } => {
            let ordered = ordered_f64(*value);
            for_each_quantity_unit_key(
                system.as_deref(),
                unit_code.as_deref(),
                unit.as_deref(),
                |key| {
                    let mut parts = [""; 5];
                    parts[..key.len()].copy_from_slice(key);
                    parts[key.len()] = SEP_STR;
                    parts[key.len() + 1] = &ordered;
                    terms.push(term_of(code, "q", &parts[..key.len() + 2]));
                },
            );
            sort.push(keyed(code, &ordered));
        }
    }
}

/// The finest calendar unit wholly holding a date value, from how many calendar buckets hold
/// it: `D`, `M`, `Y`, or `S` (spans years, or open-ended).
pub fn date_class(bucket_count: usize) -> char {
    match bucket_count {
        0 => 'S',
        1 => 'Y',
        2 => 'M',
        _ => 'D',
    }
}

/// Calls `key` with the parts of each unit key a quantity is findable under: `''`, `|code`,
/// `system|code`, `|unit`. In parts, so that a term is written without the key's own string.
fn for_each_quantity_unit_key(
    system: Option<&str>,
    code: Option<&str>,
    unit: Option<&str>,
    mut key: impl FnMut(&[&str]),
) {
    key(&[]);
    if let Some(code) = code {
        key(&["|", code]);
        if let Some(system) = system {
            key(&[system, "|", code]);
        }
    }
    if let Some(unit) = unit
        && Some(unit) != code
    {
        key(&["|", unit]);
    }
}

/// The forms under which a reference value is findable: as written, `Type/id` without
/// version or base URL, and a canonical without its `|version`.
///
/// Not the bare id: a search by id alone (`subject=123`) asks for `Type/123` for each type
/// the parameter may point to (see `search`). A bare-id term per reference was 6 % of a
/// typical resource's terms and 7 % of the distinct ones, paid on every write for a rare
/// search.
pub fn reference_forms(reference: &str) -> Vec<String> {
    let (other_form, _) = reference_forms_and_id(reference);
    std::iter::once(reference.to_string())
        .chain(other_form.map(Cow::into_owned))
        .collect()
}

/// `Type/id` and its two parts, when `reference` is exactly that (no base URL, no version,
/// nothing to strip): one slash, and the parts checked, is the whole parse.
fn plain_local_reference(reference: &str) -> Option<(&str, &str)> {
    let (resource_type, id) = reference.split_at(memchr::memchr(b'/', reference.as_bytes())?);
    let id = &id[1..];
    (fhirkeep_engine::resource::is_valid_id(id)
        && fhirkeep_engine::resource::is_resource_type(resource_type))
    .then_some((resource_type, id))
}

/// The form of a reference other than as written (see [`reference_forms`]), if it has one,
/// and the bare id of a `Type/id` reference. Borrowed where it can be: extraction asks this
/// of every reference it indexes.
fn reference_forms_and_id(reference: &str) -> (Option<Cow<'_, str>>, Option<&str>) {
    if let Some((_, id)) = plain_local_reference(reference) {
        return (None, Some(id));
    }
    if reference.starts_with('#') || reference.starts_with("urn:") {
        return (None, None);
    }
    if let Some((canonical, _version)) = reference.split_once('|') {
        return (Some(Cow::Borrowed(canonical)), None);
    }
    let path = reference.split(['?', '#']).next().unwrap_or(reference);
    // [base/]Type/id[/_history/vid], read from the end.
    let mut segments = path.rsplit('/').filter(|segment| !segment.is_empty());
    let last = segments.next();
    let second = segments.next();
    let tail = match (last, second, segments.next(), segments.next()) {
        (Some(_), Some("_history"), Some(id), Some(resource_type)) => Some((resource_type, id)),
        (Some(id), Some(resource_type), _, _) => Some((resource_type, id)),
        _ => None,
    };
    if let Some((resource_type, id)) = tail
        && fhirkeep_engine::resource::is_resource_type(resource_type)
        && fhirkeep_engine::resource::is_valid_id(id)
    {
        let written_local = reference.len() == resource_type.len() + 1 + id.len()
            && reference.starts_with(resource_type)
            && reference[resource_type.len()..].starts_with('/')
            && reference.ends_with(id);
        let local = (!written_local).then(|| Cow::Owned(format!("{resource_type}/{id}")));
        return (local, Some(id));
    }
    (None, None)
}

/// The typed values of one evaluated item, for a parameter of type `kind`.
pub fn item_values<'a>(kind: ParamType, item: &Item<'a>, out: &mut Vec<IndexValue<'a>>) {
    let Some(json) = item.json() else {
        // A computed value (e.g. the boolean of `deceased.exists() and ...`).
        if let Some(text) = computed_text(item) {
            let computed = Value::String(text);
            let mut values = Vec::new();
            json_values(kind, None, &computed, &mut values);
            for value in values {
                out.push(value.into_owned());
            }
        }
        return;
    };
    json_values(kind, item.fhir_type(), json, out);
}

fn computed_text(item: &Item<'_>) -> Option<String> {
    match item {
        // A node without JSON is a resolved reference stand-in: nothing to index.
        Item::Node(_) => None,
        computed => Some(computed.to_string()),
    }
}

/// The typed values of a JSON node of FHIR type `fhir_type` (when known).
pub fn json_values<'a>(
    kind: ParamType,
    fhir_type: Option<&str>,
    json: &'a Value,
    out: &mut Vec<IndexValue<'a>>,
) {
    match kind {
        ParamType::String => string_values(json, out),
        ParamType::Token => token_values(fhir_type, json, out),
        ParamType::Reference => reference_values(json, out),
        ParamType::Uri => {
            if let Some(uri) = json.as_str() {
                out.push(IndexValue::Uri(Cow::Borrowed(uri)));
            }
        }
        ParamType::Date => date_values(json, out),
        ParamType::Number => {
            if let Some(number) = json_number(json) {
                out.push(IndexValue::Number(number));
            }
        }
        ParamType::Quantity => quantity_values(json, out),
        ParamType::Composite | ParamType::Special => {}
    }
}

fn json_number(json: &Value) -> Option<f64> {
    let number = match json {
        Value::Number(n) => n.as_f64()?,
        Value::String(s) => s.parse::<f64>().ok()?,
        _ => return None,
    };
    number.is_finite().then_some(number)
}

fn string_values<'a>(json: &'a Value, out: &mut Vec<IndexValue<'a>>) {
    match json {
        Value::String(s) => out.push(IndexValue::Text(Cow::Borrowed(s))),
        Value::Object(map) => {
            // HumanName, Address and other structures: every string part is searchable.
            for (key, value) in map {
                if key == "extension" || key == "id" || key == "use" || key == "period" {
                    continue;
                }
                match value {
                    Value::String(s) => out.push(IndexValue::Text(Cow::Borrowed(s))),
                    Value::Array(items) => {
                        for item in items {
                            if let Value::String(s) = item {
                                out.push(IndexValue::Text(Cow::Borrowed(s)));
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        _ => {}
    }
}

fn text_of<'a>(json: &'a Value, key: &str) -> Option<&'a str> {
    field(json, key).and_then(Value::as_str)
}

/// [`text_of`], borrowed as a value's text.
fn cow_of<'a>(json: &'a Value, key: &str) -> Option<Cow<'a, str>> {
    text_of(json, key).map(Cow::Borrowed)
}

/// `json[key]` for an object (see [`member`]), `None` for anything else.
fn field<'a>(json: &'a Value, key: &str) -> Option<&'a Value> {
    json.as_object().and_then(|object| member(object, key))
}

fn token_values<'a>(fhir_type: Option<&str>, json: &'a Value, out: &mut Vec<IndexValue<'a>>) {
    match json {
        Value::String(s) => out.push(IndexValue::Token {
            system: None,
            code: Cow::Borrowed(s),
        }),
        Value::Bool(b) => out.push(IndexValue::Token {
            system: None,
            code: Cow::Borrowed(if *b { "true" } else { "false" }),
        }),
        Value::Number(n) => out.push(IndexValue::Token {
            system: None,
            code: Cow::Owned(n.to_string()),
        }),
        Value::Object(map) => {
            if let Some(codings) = member(map, "coding").and_then(Value::as_array) {
                // CodeableConcept
                let first = out.len();
                for coding in codings {
                    coding_values(coding, out);
                }
                // The text often repeats a coding's display: it would be the same term again.
                if let Some(text) = cow_of(json, "text")
                    && !out[first..].iter().any(
                        |value| matches!(value, IndexValue::TokenText(display) if *display == text),
                    )
                {
                    out.push(IndexValue::TokenText(text));
                }
            } else if fhir_type == Some("Identifier")
                || (map.contains_key("value")
                    && !map.contains_key("code")
                    && fhir_type != Some("ContactPoint"))
            {
                if let Some(value) = text_of(json, "value") {
                    out.push(IndexValue::Token {
                        system: cow_of(json, "system"),
                        code: Cow::Borrowed(value),
                    });
                    if let Some(codings) = json
                        .get("type")
                        .and_then(|t| field(t, "coding"))
                        .and_then(Value::as_array)
                    {
                        for coding in codings {
                            if let (Some(system), Some(code)) =
                                (cow_of(coding, "system"), cow_of(coding, "code"))
                            {
                                out.push(IndexValue::OfType {
                                    system,
                                    code,
                                    value: Cow::Borrowed(value),
                                });
                            }
                        }
                    }
                }
                if let Some(text) = field(json, "type").and_then(|t| cow_of(t, "text")) {
                    out.push(IndexValue::TokenText(text));
                }
            } else if fhir_type == Some("ContactPoint") {
                if let Some(value) = cow_of(json, "value") {
                    out.push(IndexValue::Token {
                        system: None,
                        code: value,
                    });
                }
            } else {
                // Coding, or anything else with system/code.
                coding_values(json, out);
            }
        }
        _ => {}
    }
}

fn coding_values<'a>(coding: &'a Value, out: &mut Vec<IndexValue<'a>>) {
    if let Some(code) = cow_of(coding, "code") {
        out.push(IndexValue::Token {
            system: cow_of(coding, "system"),
            code,
        });
    }
    if let Some(display) = cow_of(coding, "display") {
        out.push(IndexValue::TokenText(display));
    }
}

fn reference_values<'a>(json: &'a Value, out: &mut Vec<IndexValue<'a>>) {
    match json {
        // canonical and uri references
        Value::String(s) => out.push(IndexValue::Reference(Cow::Borrowed(s))),
        Value::Object(_) => {
            if let Some(reference) = text_of(json, "reference")
                && !reference.starts_with('#')
            {
                out.push(IndexValue::Reference(Cow::Borrowed(reference)));
            }
            if let Some(identifier) = field(json, "identifier")
                && let Some(value) = cow_of(identifier, "value")
            {
                out.push(IndexValue::ReferenceIdentifier {
                    system: cow_of(identifier, "system"),
                    value,
                });
            }
        }
        _ => {}
    }
}

fn date_values(json: &Value, out: &mut Vec<IndexValue<'_>>) {
    match json {
        Value::String(s) => {
            if let Some(date) = parse_fhir_date(s) {
                out.push(IndexValue::Date(date.range));
            }
        }
        Value::Object(map) => {
            if map.contains_key("start") || map.contains_key("end") {
                // Period: an open end is unbounded.
                let low = text_of(json, "start")
                    .and_then(parse_fhir_date)
                    .map_or(MIN_MICROS, |d| d.range.low);
                let high = text_of(json, "end")
                    .and_then(parse_fhir_date)
                    .map_or(MAX_MICROS, |d| d.range.high);
                if low <= high {
                    out.push(IndexValue::Date(InstantRange { low, high }));
                }
            } else if map.contains_key("event") || map.contains_key("repeat") {
                // Timing: each event, and the bounds of the repeat.
                if let Some(events) = map.get("event").and_then(Value::as_array) {
                    for event in events {
                        date_values(event, out);
                    }
                }
                if let Some(bounds) = map.get("repeat").and_then(|r| r.get("boundsPeriod")) {
                    date_values(bounds, out);
                }
            }
        }
        _ => {}
    }
}

fn quantity_values<'a>(json: &'a Value, out: &mut Vec<IndexValue<'a>>) {
    match json {
        Value::Object(map) => {
            if let Some(value) = member(map, "value").and_then(json_number) {
                let currency = text_of(json, "currency");
                out.push(IndexValue::Quantity {
                    value,
                    system: cow_of(json, "system")
                        .or_else(|| currency.map(|_| Cow::Borrowed("urn:iso:std:iso:4217"))),
                    code: text_of(json, "code").or(currency).map(Cow::Borrowed),
                    unit: cow_of(json, "unit"),
                });
            } else if map.contains_key("low") || map.contains_key("high") {
                // Range: findable by both ends.
                for end in ["low", "high"] {
                    if let Some(bound) = map.get(end) {
                        quantity_values(bound, out);
                    }
                }
            }
        }
        Value::Number(_) => {
            if let Some(value) = json_number(json) {
                out.push(IndexValue::Quantity {
                    value,
                    system: None,
                    code: None,
                    unit: None,
                });
            }
        }
        _ => {}
    }
}

/// The equality forms of a composite component value (all but the last component).
pub fn component_equality_forms(value: &IndexValue<'_>) -> Vec<String> {
    match value {
        // `system|` (any code of a system) is left out here: as a composite's leading part it
        // is rarely asked for, and every form multiplies the composite's terms.
        IndexValue::Token { system, code } => {
            let system = system.as_deref().unwrap_or("");
            let mut qualified = String::with_capacity(system.len() + 1 + code.len());
            qualified.push_str(system);
            qualified.push('|');
            qualified.push_str(code);
            vec![code.to_string(), qualified]
        }
        IndexValue::Text(text) => vec![normalize_string(text)],
        // A composite's search value is matched as written, so a bare id is a form here.
        IndexValue::Reference(reference) => {
            let (other_form, id) = reference_forms_and_id(reference);
            std::iter::once(reference.to_string())
                .chain(other_form.map(Cow::into_owned))
                .chain(id.map(String::from))
                .collect()
        }
        IndexValue::Uri(uri) => vec![uri.to_string()],
        _ => Vec::new(),
    }
}

/// The terms of a composite of one focus (see [`single_focus`]): each component's values under
/// `c0`, `c1`, …; leading components by their equality forms, the last one by its type's terms.
fn component_terms(param: &SearchParam, items: &[Item<'_>], terms: &mut Vec<String>) {
    let Some((last, leading)) = param.components.split_last() else {
        return;
    };
    'items: for item in items {
        let Some(node) = item.json() else { continue };
        // A component without values makes the composite match nothing (as with the
        // combinations of other composites, of which there would be none): no terms at all.
        let mut own = Vec::new();
        for (position, component) in leading.iter().enumerate() {
            let forms = component_forms(component, node);
            if forms.is_empty() {
                continue 'items;
            }
            let kind = component_kind(position);
            own.extend(forms.iter().map(|form| term(&param.code, &kind, form)));
        }
        let last_terms = last_component_terms(last, node);
        if last_terms.is_empty() {
            continue;
        }
        let last_kind = component_kind(leading.len());
        for last_term in &last_terms {
            // `last_term` is `␟kind␟value` (empty code): the term is `code␟cN␟kind␟value`.
            let value_term = last_term.strip_prefix(SEP).unwrap_or(last_term);
            own.push(term_of(&param.code, &last_kind, &[value_term]));
        }
        terms.append(&mut own);
    }
}

/// The term kind of a composite's component at `position` (`c0`, `c1`, …).
fn component_kind(position: usize) -> Cow<'static, str> {
    const KINDS: [&str; 8] = ["c0", "c1", "c2", "c3", "c4", "c5", "c6", "c7"];
    match KINDS.get(position) {
        Some(kind) => Cow::Borrowed(kind),
        None => Cow::Owned(format!("c{position}")),
    }
}

fn composite_terms(param: &SearchParam, items: &[Item<'_>], terms: &mut Vec<String>) {
    let Some((last, leading)) = param.components.split_last() else {
        return;
    };
    for item in items {
        let Some(node) = item.json() else { continue };
        // Each leading component contributes its equality forms; the prefix is their product.
        let mut prefixes = vec![String::new()];
        for component in leading {
            let forms = component_forms(component, node);
            let mut next = Vec::new();
            for prefix in &prefixes {
                for form in &forms {
                    if prefix.is_empty() {
                        next.push(form.clone());
                    } else {
                        let mut joined = String::with_capacity(prefix.len() + 1 + form.len());
                        joined.push_str(prefix);
                        joined.push('$');
                        joined.push_str(form);
                        next.push(joined);
                    }
                }
            }
            prefixes = next;
            if prefixes.is_empty() {
                break;
            }
        }
        if prefixes.is_empty() {
            continue;
        }
        let last_terms = last_component_terms(last, node);
        for prefix in &prefixes {
            for last_term in &last_terms {
                // `last_term` is `␟kind␟value` (empty code): append it to the prefix.
                terms.push(term_of(&param.code, "c", &[prefix, last_term]));
            }
        }
    }
}

/// The equality forms of a composite's leading `component` on its focus `node`.
fn component_forms(component: &Component, node: &Value) -> Vec<String> {
    let Ok(values) = component.expression.evaluate(node) else {
        return Vec::new();
    };
    let mut typed = Vec::new();
    for value_item in &values {
        item_values(component.kind, value_item, &mut typed);
    }
    typed.iter().flat_map(component_equality_forms).collect()
}

/// The terms of a composite's last `component` on its focus `node`, as its type indexes them,
/// each `␟kind␟value` (no code).
fn last_component_terms(component: &Component, node: &Value) -> Vec<String> {
    let Ok(items) = component.expression.evaluate(node) else {
        return Vec::new();
    };
    let mut values = Vec::new();
    for value_item in &items {
        item_values(component.kind, value_item, &mut values);
    }
    let mut scratch = IndexEntries::default();
    for value in &values {
        emit("", value, &[], &mut scratch);
    }
    scratch.terms
}

/// The narrative `text.div` with markup removed, for `_text`.
fn narrative_text(resource: &Value) -> String {
    let Some(div) = resource
        .get("text")
        .and_then(|t| t.get("div"))
        .and_then(Value::as_str)
    else {
        return String::new();
    };
    strip_markup(div)
}

/// XHTML to text: tags dropped, the common entities decoded.
pub fn strip_markup(xhtml: &str) -> String {
    let mut out = String::with_capacity(xhtml.len());
    let mut in_tag = false;
    for c in xhtml.chars() {
        match c {
            '<' => {
                in_tag = true;
                out.push(' ');
            }
            '>' => in_tag = false,
            _ if !in_tag => out.push(c),
            _ => {}
        }
    }
    out.replace("&nbsp;", " ")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&amp;", "&")
}

/// How many of the last strings taken into `_content` a new one is compared with.
const RECENT_TEXTS: usize = 16;

/// The text of `_content`: every `string` and `markdown` value and the narrative (see
/// [`fhirkeep_fhirpath::visit_text`] for what is left out and why), space-separated.
///
/// A string that repeats one of the last [`RECENT_TEXTS`] taken (a CodeableConcept's text
/// and its coding's display, the same unit on every component) is left out: `_content`
/// matches words and phrases, never counts them, and tantivy would record each word's
/// positions again. Only recent ones, so that a resource of many strings stays linear.
fn content_text(resource: &Value) -> String {
    let mut out = String::new();
    let mut recent: std::collections::VecDeque<&str> = std::collections::VecDeque::new();
    fhirkeep_fhirpath::visit_text(resource, &mut |text| {
        match text {
            fhirkeep_fhirpath::Text::Plain(s) => {
                if recent.contains(&s) {
                    return;
                }
                if recent.len() == RECENT_TEXTS {
                    recent.pop_front();
                }
                recent.push_back(s);
                out.push_str(s);
            }
            fhirkeep_fhirpath::Text::Xhtml(div) => out.push_str(&strip_markup(div)),
        }
        out.push(' ');
    });
    out
}

/// The instant range of a stored resource's `meta.lastUpdated`, if present.
pub fn last_updated_range(resource: &Value) -> Option<InstantRange> {
    let text = resource.get("meta")?.get("lastUpdated")?.as_str()?;
    parse_fhir_date(text).map(|d| d.range)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn content_keeps_each_string_once_and_every_word_of_the_resource() {
        let mut notes: Vec<Value> = (0..40)
            .map(|i| json!({"text": format!("note {i}")}))
            .collect();
        // A repeat far after its first occurrence is kept: only recent strings are compared.
        notes.push(json!({"text": "note 0"}));
        let observation = json!({
            "resourceType": "Observation", "id": "o", "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "85354-9",
                                 "display": "Blood pressure panel"}],
                     "text": "Blood pressure panel"},
            "component": [
                {"code": {"text": "Systolic"}, "valueQuantity": {"value": 107, "unit": "mm[Hg]"}},
                {"code": {"text": "Diastolic"}, "valueQuantity": {"value": 83, "unit": "mm[Hg]"}}
            ],
            "note": notes
        });
        let content = content_text(&observation);
        assert_eq!(
            content.matches("Blood pressure panel").count(),
            1,
            "{content}"
        );
        assert_eq!(content.matches("mm[Hg]").count(), 1, "{content}");
        for word in ["Systolic", "Diastolic", "note 39", "note 1 "] {
            assert!(content.contains(word), "{word} missing from {content}");
        }
        assert_eq!(content.matches("note 0 ").count(), 2, "{content}");
    }

    #[test]
    fn reference_forms_and_targets() {
        let forms = |reference: &str| reference_forms(reference);
        assert_eq!(forms("Patient/123"), ["Patient/123"]);
        assert_eq!(
            forms("http://example.org/fhir/Patient/123"),
            ["http://example.org/fhir/Patient/123", "Patient/123"]
        );
        assert_eq!(
            forms("Patient/123/_history/2"),
            ["Patient/123/_history/2", "Patient/123"]
        );
        assert_eq!(
            forms("http://x.org/vs|1.0"),
            ["http://x.org/vs|1.0", "http://x.org/vs"]
        );
        for unchanged in [
            "#contained",
            "urn:uuid:1",
            "Nonsense/123",
            "Patient/bad id",
            "Patient/",
        ] {
            assert_eq!(forms(unchanged), [unchanged]);
        }
        assert_eq!(reference_forms_and_id("Patient/123").1, Some("123"));
        assert_eq!(reference_forms_and_id("Patient/1/_history/2").1, Some("1"));
        assert_eq!(reference_forms_and_id("Patient/").1, None);

        let registry = Registry::r4().unwrap();
        let observation = json!({
            "resourceType": "Observation", "id": "o", "status": "final", "code": {"text": "x"},
            "subject": {"reference": "Patient/p1"},
            "encounter": {"reference": "http://example.org/fhir/Encounter/e1"}
        });
        let (entries, _) = extract(&registry, "Observation", &observation);
        for (code, target) in [("subject", "Patient/p1"), ("encounter", "Encounter/e1")] {
            assert!(
                entries.terms.contains(&self::term(code, "r", target)),
                "{code}"
            );
            assert!(entries.references.contains(&keyed(code, target)), "{code}");
        }
        assert!(entries.terms.contains(&self::term(
            "encounter",
            "r",
            "http://example.org/fhir/Encounter/e1"
        )));
        assert!(!entries.references.iter().any(|r| r.contains("http:")));
    }

    #[test]
    fn a_concept_text_equal_to_a_display_is_one_text_term() {
        let registry = Registry::r4().unwrap();
        let observation = json!({
            "resourceType": "Observation", "id": "o", "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "8480-6",
                                 "display": "Systolic blood pressure"}],
                     "text": "Systolic blood pressure"},
            "category": [{"coding": [{"code": "vital-signs", "display": "Vital Signs"}],
                          "text": "Vitals"}]
        });
        let (entries, failures) = extract(&registry, "Observation", &observation);
        assert_eq!(failures, 0);
        let count = |term: &str| entries.terms.iter().filter(|t| *t == term).count();
        assert_eq!(
            count(&self::term("code", "x", "systolic blood pressure")),
            1
        );
        assert_eq!(count(&self::term("category", "x", "vital signs")), 1);
        assert_eq!(count(&self::term("category", "x", "vitals")), 1);
    }
}
