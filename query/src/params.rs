//! Parsing FHIR search requests (`Patient?family=chalmers&birthdate=ge1970`) into a typed
//! [`SearchRequest`], checked against the [`Registry`]: unknown parameters, bad modifiers and
//! malformed values are errors that name the parameter (strict), or are ignored and listed
//! (lenient).

use std::sync::Arc;

use crate::registry::{ParamType, Registry, SearchParam};
use crate::values::parse_fhir_date;
use crate::{Error, Result};

/// How unknown or unsupported parameters are treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Handling {
    /// An error naming the parameter (FHIR's `Prefer: handling=strict`; the default).
    #[default]
    Strict,
    /// Ignored, and listed in [`SearchRequest::ignored`] (`Prefer: handling=lenient`).
    Lenient,
}

/// A search modifier (`name:modifier=value`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Modifier {
    /// No modifier.
    None,
    /// `:missing`
    Missing,
    /// `:exact`
    Exact,
    /// `:contains`
    Contains,
    /// `:text`
    Text,
    /// `:not`
    Not,
    /// `:above`
    Above,
    /// `:below`
    Below,
    /// `:in`
    In,
    /// `:not-in`
    NotIn,
    /// `:of-type`
    OfType,
    /// `:identifier`
    Identifier,
    /// `:[Type]` on a reference.
    Type(String),
}

/// `_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TotalMode {
    /// No total.
    None,
    /// An estimate (here: the exact count, which is cheap).
    Estimate,
    /// The exact count (the default).
    #[default]
    Accurate,
}

/// `_summary`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SummaryMode {
    /// Summary elements only.
    True,
    /// Text, id, meta and mandatory elements.
    Text,
    /// Everything but the narrative.
    Data,
    /// Only the count.
    Count,
    /// Everything.
    False,
}

/// One `_include` or `_revinclude`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Include {
    /// The type whose parameter is followed (`Observation` in `Observation:patient`).
    pub source_type: String,
    /// The reference parameter, or `None` for `*`.
    pub param: Option<String>,
    /// Only targets of this type.
    pub target_type: Option<String>,
    /// `:iterate` (or R4's `:recurse`).
    pub iterate: bool,
}

/// One sort key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SortKey {
    /// The parameter code.
    pub code: String,
    /// `-code`.
    pub descending: bool,
}

/// One search criterion: all of a request's criteria must hold (AND); each holds when any
/// of its values matches (OR).
#[derive(Debug, Clone)]
pub enum Criterion {
    /// A parameter of the searched type(s).
    Param {
        /// The parameter code.
        code: String,
        /// Its type.
        kind: ParamType,
        /// The modifier.
        modifier: Modifier,
        /// The values (comma-separated alternatives, unescaped).
        values: Vec<String>,
    },
    /// `ref[:Type].chained...=value`: resources whose `ref` points at a resource matching
    /// `inner`.
    Chain {
        /// The reference parameter code.
        code: String,
        /// The types the reference may point at (from `:Type` or the parameter's targets).
        target_types: Vec<String>,
        /// The criterion on the target.
        inner: Box<Criterion>,
    },
    /// `_has:Type:ref:criterion=value`: resources that some `Type` resource refers to via
    /// `ref`, where that resource matches `inner`.
    Has {
        /// The referring type.
        source_type: String,
        /// The reference parameter on the referring type.
        reference: String,
        /// The criterion on the referring resource.
        inner: Box<Criterion>,
    },
    /// `_text`: full-text search over the narrative.
    Text(Vec<String>),
    /// `_content`: full-text search over the whole resource.
    Content(Vec<String>),
    /// `_list`: members of a List.
    List(Vec<String>),
}

/// A parsed search.
#[derive(Debug, Clone, Default)]
pub struct SearchRequest {
    /// The types searched (one, several via `_type`, or empty for all types).
    pub resource_types: Vec<String>,
    /// `Patient/123/Observation?...`: the compartment (type, id).
    pub compartment: Option<(String, String)>,
    /// All must hold.
    pub criteria: Vec<Criterion>,
    /// `_sort`.
    pub sort: Vec<SortKey>,
    /// `_count`.
    pub count: Option<usize>,
    /// The paging cursor from a `next` link.
    pub cursor: Option<String>,
    /// `_total`.
    pub total: TotalMode,
    /// `_summary`.
    pub summary: Option<SummaryMode>,
    /// `_elements`.
    pub elements: Option<Vec<String>>,
    /// `_include`.
    pub includes: Vec<Include>,
    /// `_revinclude`.
    pub revincludes: Vec<Include>,
    /// Parameters ignored in lenient mode (names only, never values).
    pub ignored: Vec<String>,
    /// The request's parameters as given, canonically ordered (for `self` links and the
    /// audit hash).
    pub canonical_query: String,
}

impl SearchRequest {
    /// A hash of the request, recorded in the audit log instead of its values.
    pub fn digest(&self) -> [u8; 32] {
        let mut hasher = blake3::Hasher::new_derive_key("fhirkeep search request v1");
        hasher.update(self.resource_types.join(",").as_bytes());
        hasher.update(&[0]);
        if let Some((t, id)) = &self.compartment {
            hasher.update(t.as_bytes());
            hasher.update(b"/");
            hasher.update(id.as_bytes());
        }
        hasher.update(&[0]);
        hasher.update(self.canonical_query.as_bytes());
        *hasher.finalize().as_bytes()
    }
}

/// Parses a search URL relative to the base: `Type?query`, `Type/_search?query` is the
/// server's business; here `Type?query`, `?query` (all types), or
/// `Compartment/id/Type?query`.
pub fn parse_search_url(
    registry: &Registry,
    url: &str,
    handling: Handling,
) -> Result<SearchRequest> {
    let (path, query) = url.split_once('?').unwrap_or((url, ""));
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let (types, compartment) = match segments.as_slice() {
        [] => (Vec::new(), None),
        [t] => (vec![(*t).to_string()], None),
        [c, id, t] => (
            if *t == "*" {
                Vec::new()
            } else {
                vec![(*t).to_string()]
            },
            Some(((*c).to_string(), (*id).to_string())),
        ),
        _ => {
            return Err(Error::InvalidSearch(
                "the search path must be [type], [compartment]/[id]/[type] or empty".into(),
            ));
        }
    };
    for t in &types {
        if !fhirkeep_engine::resource::is_resource_type(t) {
            return Err(Error::InvalidSearch(format!(
                "{t:?} is not an R4 resource type"
            )));
        }
    }
    let pairs = decode_query(query)?;
    parse_search(registry, types, compartment, &pairs, handling)
}

/// Decodes `application/x-www-form-urlencoded` text into (name, value) pairs.
pub fn decode_query(query: &str) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for (name, value) in form_urlencoded::parse(query.as_bytes()) {
        if name.is_empty() {
            continue;
        }
        out.push((name.into_owned(), value.into_owned()));
    }
    Ok(out)
}

/// Parses decoded parameters for a search of `types` (empty = all types).
pub fn parse_search(
    registry: &Registry,
    mut types: Vec<String>,
    compartment: Option<(String, String)>,
    pairs: &[(String, String)],
    handling: Handling,
) -> Result<SearchRequest> {
    if let Some((compartment_type, id)) = &compartment {
        if compartment_type != "Patient" {
            return Err(Error::InvalidSearch(format!(
                "compartment {compartment_type:?} is not supported (only Patient)"
            )));
        }
        if !fhirkeep_engine::resource::is_valid_id(id) {
            return Err(Error::InvalidSearch(
                "the compartment id is not a valid id".into(),
            ));
        }
    }
    // `_type` first: it decides which parameters exist.
    for (name, value) in pairs {
        if name == "_type" {
            if !types.is_empty() && compartment.is_none() {
                return Err(Error::InvalidSearch(
                    "_type is only allowed in a search across all types".into(),
                ));
            }
            for t in split_values(value) {
                if !fhirkeep_engine::resource::is_resource_type(&t) {
                    return Err(Error::InvalidSearch(format!(
                        "_type names {t:?}, which is not an R4 resource type"
                    )));
                }
                if !types.contains(&t) {
                    types.push(t);
                }
            }
        }
    }
    let mut request = SearchRequest {
        resource_types: types,
        compartment,
        ..SearchRequest::default()
    };
    let mut canonical: Vec<(String, String)> = Vec::new();
    for (name, value) in pairs {
        let outcome = parse_one(registry, &mut request, name, value);
        match outcome {
            Ok(()) => canonical.push((name.clone(), value.clone())),
            Err(e) if handling == Handling::Lenient && is_ignorable(&e) => {
                request.ignored.push(name.clone());
            }
            Err(e) => return Err(e),
        }
    }
    canonical.retain(|(n, _)| n != "_cursor");
    canonical.sort();
    request.canonical_query = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(canonical.iter())
        .finish();
    Ok(request)
}

fn is_ignorable(error: &Error) -> bool {
    matches!(error, Error::InvalidSearch(message) if message.contains("unknown parameter") || message.contains("not supported"))
}

fn parse_one(
    registry: &Registry,
    request: &mut SearchRequest,
    name: &str,
    value: &str,
) -> Result<()> {
    match name {
        "_type" | "_format" | "_pretty" => Ok(()),
        "_count" => {
            let count: usize = value.parse().map_err(|_| {
                Error::InvalidSearch("_count must be a non-negative integer".into())
            })?;
            request.count = Some(count);
            Ok(())
        }
        "_cursor" => {
            request.cursor = Some(value.to_string());
            Ok(())
        }
        "_sort" => {
            for key in value.split(',').filter(|k| !k.is_empty()) {
                let (code, descending) = match key.strip_prefix('-') {
                    Some(code) => (code, true),
                    None => (key, false),
                };
                let known = code == "_id"
                    || code == "_lastUpdated"
                    || param_on_types(registry, &request.resource_types, code).is_some();
                if !known {
                    return Err(Error::InvalidSearch(format!(
                        "_sort: unknown parameter {code:?} for this search"
                    )));
                }
                request.sort.push(SortKey {
                    code: code.to_string(),
                    descending,
                });
            }
            Ok(())
        }
        "_total" => {
            request.total = match value {
                "none" => TotalMode::None,
                "estimate" => TotalMode::Estimate,
                "accurate" => TotalMode::Accurate,
                _ => {
                    return Err(Error::InvalidSearch(
                        "_total must be none, estimate or accurate".into(),
                    ));
                }
            };
            Ok(())
        }
        "_summary" => {
            request.summary = Some(match value {
                "true" => SummaryMode::True,
                "text" => SummaryMode::Text,
                "data" => SummaryMode::Data,
                "count" => SummaryMode::Count,
                "false" => SummaryMode::False,
                _ => {
                    return Err(Error::InvalidSearch(
                        "_summary must be true, text, data, count or false".into(),
                    ));
                }
            });
            Ok(())
        }
        "_elements" => {
            let elements: Vec<String> = value
                .split(',')
                .map(str::trim)
                .filter(|e| !e.is_empty())
                .map(String::from)
                .collect();
            if elements.iter().any(|e| {
                !e.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
            }) {
                return Err(Error::InvalidSearch(
                    "_elements must list element names".into(),
                ));
            }
            request.elements = Some(elements);
            Ok(())
        }
        "_contained" | "_containedType" => {
            Err(Error::InvalidSearch(format!("{name} is not supported")))
        }
        _ if name.starts_with("_include") || name.starts_with("_revinclude") => {
            let (base, modifier) = name.split_once(':').unwrap_or((name, ""));
            let iterate = match modifier {
                "" => false,
                "iterate" | "recurse" => true,
                _ => {
                    return Err(Error::InvalidSearch(format!(
                        "{base}: unknown modifier {modifier:?}"
                    )));
                }
            };
            let include = parse_include(registry, base, value, iterate)?;
            if base == "_include" {
                request.includes.push(include);
            } else if base == "_revinclude" {
                request.revincludes.push(include);
            } else {
                return Err(Error::InvalidSearch(format!("unknown parameter {base:?}")));
            }
            Ok(())
        }
        _ => {
            let criterion = parse_criterion(registry, &request.resource_types, name, value, 0)?;
            request.criteria.push(criterion);
            Ok(())
        }
    }
}

fn parse_include(registry: &Registry, base: &str, value: &str, iterate: bool) -> Result<Include> {
    let parts: Vec<&str> = value.split(':').collect();
    let (source_type, param, target_type) = match parts.as_slice() {
        [t, "*"] => (*t, None, None),
        [t, p] => (*t, Some(*p), None),
        [t, p, target] => (*t, Some(*p), Some(*target)),
        _ => {
            return Err(Error::InvalidSearch(format!(
                "{base} must be Type:parameter[:targetType] or Type:*"
            )));
        }
    };
    if !fhirkeep_engine::resource::is_resource_type(source_type) {
        return Err(Error::InvalidSearch(format!(
            "{base}: {source_type:?} is not a resource type"
        )));
    }
    if let Some(param) = param {
        let known = registry
            .get(source_type, param)
            .is_some_and(|p| p.kind == ParamType::Reference);
        if !known {
            return Err(Error::InvalidSearch(format!(
                "{base}: {source_type} has no reference parameter {param:?}"
            )));
        }
    }
    if let Some(target) = target_type
        && !fhirkeep_engine::resource::is_resource_type(target)
    {
        return Err(Error::InvalidSearch(format!(
            "{base}: {target:?} is not a resource type"
        )));
    }
    Ok(Include {
        source_type: source_type.to_string(),
        param: param.map(String::from),
        target_type: target_type.map(String::from),
        iterate,
    })
}

/// The parameter `code` as defined on every one of `types` (all types when empty); `None`
/// if some type lacks it or the definitions disagree on the type.
pub fn param_on_types<'r>(
    registry: &'r Registry,
    types: &[String],
    code: &str,
) -> Option<&'r Arc<SearchParam>> {
    if types.is_empty() {
        // A search across all types may use only the common parameters.
        let param = registry.get("Patient", code)?;
        return param
            .base
            .iter()
            .any(|b| b == "Resource" || b == "DomainResource")
            .then_some(param);
    }
    let first = registry.get(&types[0], code)?;
    for t in &types[1..] {
        let other = registry.get(t, code)?;
        if other.kind != first.kind {
            return None;
        }
    }
    Some(first)
}

const MAX_CHAIN_DEPTH: usize = 4;

fn parse_criterion(
    registry: &Registry,
    types: &[String],
    name: &str,
    value: &str,
    depth: usize,
) -> Result<Criterion> {
    if depth > MAX_CHAIN_DEPTH {
        return Err(Error::InvalidSearch(format!(
            "chains and _has nest at most {MAX_CHAIN_DEPTH} levels"
        )));
    }
    if let Some(rest) = name.strip_prefix("_has:") {
        // _has:Type:ref:name
        let mut parts = rest.splitn(3, ':');
        let (Some(source_type), Some(reference), Some(inner_name)) =
            (parts.next(), parts.next(), parts.next())
        else {
            return Err(Error::InvalidSearch(
                "_has must be _has:Type:reference:parameter".into(),
            ));
        };
        if !fhirkeep_engine::resource::is_resource_type(source_type) {
            return Err(Error::InvalidSearch(format!(
                "_has: {source_type:?} is not a resource type"
            )));
        }
        let reference_param = registry
            .get(source_type, reference)
            .filter(|p| p.kind == ParamType::Reference);
        if reference_param.is_none() {
            return Err(Error::InvalidSearch(format!(
                "_has: {source_type} has no reference parameter {reference:?}"
            )));
        }
        let inner = parse_criterion(
            registry,
            &[source_type.to_string()],
            inner_name,
            value,
            depth + 1,
        )?;
        return Ok(Criterion::Has {
            source_type: source_type.to_string(),
            reference: reference.to_string(),
            inner: Box::new(inner),
        });
    }
    // Chained: `ref[:Type].rest`
    if let Some((head, rest)) = name.split_once('.') {
        let (code, type_modifier) = match head.split_once(':') {
            Some((c, m)) => (c, Some(m)),
            None => (head, None),
        };
        let param = param_on_types(registry, types, code)
            .filter(|p| p.kind == ParamType::Reference)
            .ok_or_else(|| {
                Error::InvalidSearch(format!(
                    "unknown parameter {code:?}: chaining needs a reference parameter of the searched type"
                ))
            })?;
        let target_types: Vec<String> = match type_modifier {
            Some(t) => {
                if !fhirkeep_engine::resource::is_resource_type(t) {
                    return Err(Error::InvalidSearch(format!(
                        "{code}: {t:?} is not a resource type"
                    )));
                }
                vec![t.to_string()]
            }
            None => {
                // Only the targets that define the chained parameter.
                let next_code = rest.split(['.', ':']).next().unwrap_or(rest);
                param
                    .targets
                    .iter()
                    .filter(|t| registry.get(t, next_code).is_some())
                    .cloned()
                    .collect()
            }
        };
        if target_types.is_empty() {
            return Err(Error::InvalidSearch(format!(
                "{code}: no target type of this reference defines the chained parameter"
            )));
        }
        let inner = parse_criterion(registry, &target_types, rest, value, depth + 1)?;
        return Ok(Criterion::Chain {
            code: code.to_string(),
            target_types,
            inner: Box::new(inner),
        });
    }
    let (code, modifier_text) = match name.split_once(':') {
        Some((c, m)) => (c, Some(m)),
        None => (name, None),
    };
    let values = split_values(value);
    match code {
        "_text" | "_content" | "_list" => {
            if modifier_text.is_some() {
                return Err(Error::InvalidSearch(format!("{code} takes no modifier")));
            }
            if values.iter().all(|v| v.trim().is_empty()) {
                return Err(Error::InvalidSearch(format!("{code} needs a value")));
            }
            return Ok(match code {
                "_text" => Criterion::Text(values),
                "_content" => Criterion::Content(values),
                _ => Criterion::List(values),
            });
        }
        _ => {}
    }
    let param = param_on_types(registry, types, code).ok_or_else(|| {
        Error::InvalidSearch(format!(
            "unknown parameter {code:?} for {}",
            describe_types(types)
        ))
    })?;
    if param.kind == ParamType::Special {
        return Err(Error::InvalidSearch(format!(
            "parameter {code:?} is not supported"
        )));
    }
    let modifier = parse_modifier(param, modifier_text)?;
    if values.is_empty() || values.iter().any(String::is_empty) {
        return Err(Error::InvalidSearch(format!(
            "parameter {code:?} has an empty value"
        )));
    }
    validate_values(param, &modifier, &values)?;
    Ok(Criterion::Param {
        code: code.to_string(),
        kind: param.kind,
        modifier,
        values,
    })
}

fn describe_types(types: &[String]) -> String {
    if types.is_empty() {
        "a search across all types".to_string()
    } else {
        types.join(", ")
    }
}

fn parse_modifier(param: &SearchParam, text: Option<&str>) -> Result<Modifier> {
    let Some(text) = text else {
        return Ok(Modifier::None);
    };
    let modifier = match text {
        "missing" => Modifier::Missing,
        "exact" => Modifier::Exact,
        "contains" => Modifier::Contains,
        "text" => Modifier::Text,
        "not" => Modifier::Not,
        "above" => Modifier::Above,
        "below" => Modifier::Below,
        "in" => Modifier::In,
        "not-in" => Modifier::NotIn,
        "of-type" => Modifier::OfType,
        "identifier" => Modifier::Identifier,
        t if fhirkeep_engine::resource::is_resource_type(t) => Modifier::Type(t.to_string()),
        _ => {
            return Err(Error::InvalidSearch(format!(
                "parameter {:?}: unknown modifier {text:?}",
                param.code
            )));
        }
    };
    let allowed = matches!(
        (&modifier, param.kind),
        (Modifier::Missing, _)
            | (Modifier::Exact | Modifier::Contains, ParamType::String)
            | (
                Modifier::Text | Modifier::Not | Modifier::OfType | Modifier::In | Modifier::NotIn,
                ParamType::Token,
            )
            | (
                Modifier::Above | Modifier::Below,
                ParamType::Uri | ParamType::Reference
            )
            | (
                Modifier::Identifier | Modifier::Type(_),
                ParamType::Reference
            )
    );
    if !allowed {
        return Err(Error::InvalidSearch(format!(
            "parameter {:?}: modifier {text:?} does not apply to a {} parameter",
            param.code,
            param.kind.name()
        )));
    }
    if let Modifier::Type(t) = &modifier
        && !param.targets.is_empty()
        && !param.targets.contains(t)
    {
        return Err(Error::InvalidSearch(format!(
            "parameter {:?} cannot refer to {t}",
            param.code
        )));
    }
    if matches!(modifier, Modifier::Above | Modifier::Below) && param.kind == ParamType::Reference {
        return Err(Error::InvalidSearch(format!(
            "parameter {:?}: :above/:below on references is not supported",
            param.code
        )));
    }
    Ok(modifier)
}

/// The search prefixes of ordered types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prefix {
    /// eq
    Eq,
    /// ne
    Ne,
    /// gt
    Gt,
    /// lt
    Lt,
    /// ge
    Ge,
    /// le
    Le,
    /// sa
    Sa,
    /// eb
    Eb,
    /// ap
    Ap,
}

/// Splits a prefix off an ordered value (`ge1970` → (Ge, "1970")).
pub fn split_prefix(value: &str) -> (Prefix, &str) {
    let prefixes = [
        ("eq", Prefix::Eq),
        ("ne", Prefix::Ne),
        ("gt", Prefix::Gt),
        ("lt", Prefix::Lt),
        ("ge", Prefix::Ge),
        ("le", Prefix::Le),
        ("sa", Prefix::Sa),
        ("eb", Prefix::Eb),
        ("ap", Prefix::Ap),
    ];
    for (text, prefix) in prefixes {
        if let Some(rest) = value.strip_prefix(text)
            && rest.starts_with(|c: char| c.is_ascii_digit() || c == '-' || c == '.')
        {
            return (prefix, rest);
        }
    }
    (Prefix::Eq, value)
}

fn validate_values(param: &SearchParam, modifier: &Modifier, values: &[String]) -> Result<()> {
    let bad = |what: &str| {
        Err(Error::InvalidSearch(format!(
            "parameter {:?}: {what}",
            param.code
        )))
    };
    if *modifier == Modifier::Missing {
        if values.iter().any(|v| v != "true" && v != "false") {
            return bad(":missing takes true or false");
        }
        return Ok(());
    }
    for value in values {
        match param.kind {
            ParamType::Date => {
                let (_, date) = split_prefix(value);
                if parse_fhir_date(date).is_none() {
                    return bad(
                        "the value is not a FHIR date (YYYY, YYYY-MM, YYYY-MM-DD or a dateTime)",
                    );
                }
            }
            ParamType::Number => {
                let (_, number) = split_prefix(value);
                if !is_decimal(number) {
                    return bad("the value is not a number");
                }
            }
            ParamType::Quantity => {
                let (_, rest) = split_prefix(value);
                let number = rest.split('|').next().unwrap_or(rest);
                if !is_decimal(number) || rest.split('|').count() > 3 {
                    return bad("the value must be [prefix]number[|system|code]");
                }
            }
            ParamType::Composite if value.split('$').count() != param.components.len() => {
                return bad("a composite value needs one $-separated part per component");
            }
            _ => {}
        }
    }
    Ok(())
}

fn is_decimal(text: &str) -> bool {
    !text.is_empty()
        && text.parse::<f64>().is_ok_and(f64::is_finite)
        && text
            .chars()
            .all(|c| c.is_ascii_digit() || matches!(c, '.' | '-' | '+' | 'e' | 'E'))
}

/// Splits a parameter value on unescaped commas and removes the `\,` escapes.
pub fn split_values(value: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some(',') => current.push(','),
                Some(other) => {
                    current.push('\\');
                    current.push(other);
                }
                None => current.push('\\'),
            },
            ',' => out.push(std::mem::take(&mut current)),
            _ => current.push(c),
        }
    }
    out.push(current);
    out
}

/// Splits on an unescaped `separator` (`|` in tokens, `$` in composites) and unescapes it.
pub fn split_escaped(value: &str, separator: char) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some(next) if next == separator || next == '\\' || next == '$' || next == '|' => {
                    current.push(next)
                }
                Some(next) => {
                    current.push('\\');
                    current.push(next);
                }
                None => current.push('\\'),
            }
        } else if c == separator {
            out.push(std::mem::take(&mut current));
        } else {
            current.push(c);
        }
    }
    out.push(current);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(url: &str) -> Result<SearchRequest> {
        parse_search_url(&Registry::r4().unwrap(), url, Handling::Strict)
    }

    fn message(url: &str) -> String {
        match parse(url) {
            Err(Error::InvalidSearch(m)) => m,
            other => panic!("{url}: expected InvalidSearch, got {other:?}"),
        }
    }

    #[test]
    fn parameters_modifiers_and_values_parse() {
        let request =
            parse("Patient?family=chalmers,smith&birthdate=ge1970&gender:not=male&_count=5")
                .unwrap();
        assert_eq!(request.resource_types, ["Patient"]);
        assert_eq!(request.count, Some(5));
        assert_eq!(request.criteria.len(), 3);
        match &request.criteria[0] {
            Criterion::Param {
                code, kind, values, ..
            } => {
                assert_eq!(code, "family");
                assert_eq!(*kind, ParamType::String);
                assert_eq!(values, &["chalmers", "smith"]);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            &request.criteria[2],
            Criterion::Param {
                modifier: Modifier::Not,
                ..
            }
        ));
    }

    #[test]
    fn chains_has_and_compartments_parse() {
        let request = parse(
            "Observation?subject:Patient.name=peter&_has:Provenance:target:agent=Practitioner/1",
        )
        .unwrap();
        assert!(
            matches!(&request.criteria[0], Criterion::Chain { target_types, .. } if target_types == &["Patient"])
        );
        assert!(matches!(&request.criteria[1], Criterion::Has { .. }));
        let ok = parse("Patient?_has:Observation:patient:code=1234-5&general-practitioner.name=x")
            .unwrap();
        assert!(
            matches!(&ok.criteria[0], Criterion::Has { source_type, reference, .. } if source_type == "Observation" && reference == "patient")
        );
        assert!(
            matches!(&ok.criteria[1], Criterion::Chain { target_types, .. } if target_types.contains(&"Practitioner".to_string()))
        );
        let compartment = parse("Patient/123/Observation?code=x").unwrap();
        assert_eq!(
            compartment.compartment,
            Some(("Patient".into(), "123".into()))
        );
    }

    #[test]
    fn errors_name_the_parameter_and_never_the_value() {
        let m = message("Patient?nonsense=secretvalue");
        assert!(m.contains("nonsense") && !m.contains("secretvalue"), "{m}");
        let m = message("Patient?birthdate=notadate-secret");
        assert!(m.contains("birthdate") && !m.contains("secret"), "{m}");
        let m = message("Patient?family:below=x");
        assert!(m.contains("below"), "{m}");
        assert!(message("Patient?_count=many").contains("_count"));
        assert!(message("NotAType?x=1").contains("NotAType"));
        assert!(
            message("Observation?code-value-quantity=http://loinc.org|1").contains("component")
        );
        assert!(message("Patient?_include=Patient:nothing").contains("nothing"));
        assert!(message("Patient?_sort=nothing").contains("nothing"));
    }

    #[test]
    fn lenient_mode_ignores_and_lists_unknown_parameters() {
        let registry = Registry::r4().unwrap();
        let request =
            parse_search_url(&registry, "Patient?nonsense=1&family=x", Handling::Lenient).unwrap();
        assert_eq!(request.ignored, ["nonsense"]);
        assert_eq!(request.criteria.len(), 1);
        // Malformed values are errors even in lenient mode.
        assert!(parse_search_url(&registry, "Patient?birthdate=x", Handling::Lenient).is_err());
    }

    #[test]
    fn escapes_and_prefixes() {
        assert_eq!(split_values(r"a\,b,c"), ["a,b", "c"]);
        assert_eq!(split_escaped(r"http://s|a\|b", '|'), ["http://s", "a|b"]);
        assert_eq!(split_prefix("ge1970"), (Prefix::Ge, "1970"));
        assert_eq!(split_prefix("1970"), (Prefix::Eq, "1970"));
        assert_eq!(split_prefix("ap-5.2"), (Prefix::Ap, "-5.2"));
    }

    #[test]
    fn digests_differ_by_values_and_ignore_order() {
        let a = parse("Patient?family=a&given=b").unwrap().digest();
        let b = parse("Patient?given=b&family=a").unwrap().digest();
        let c = parse("Patient?family=c&given=b").unwrap().digest();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }
}
