//! SMART on FHIR scopes, v1 (`patient/Observation.read`) and v2 (`patient/Observation.rs`,
//! with search restrictions such as `?category=laboratory`), parsed into a small model.
//!
//! Parsing is a pure function: a scope that is unknown or malformed is ignored (it grants
//! nothing), never an error, so a token with no usable scope can do nothing.

use fhirkeep_engine::resource::is_resource_type;
use fhirkeep_query::params::decode_query;

/// Whose data a scope reaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Context {
    /// The patient of the launch context (the token's `patient` claim) and their compartment.
    Patient,
    /// Whatever the user may see (no finer user permissions exist here: all data).
    User,
    /// A backend service: all data.
    System,
}

/// One of the SMART v2 interaction letters `c r u d s`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Letter {
    /// `c`: create (POST, PUT that creates).
    Create,
    /// `r`: read and vread.
    Read,
    /// `u`: update (PUT of an existing resource).
    Update,
    /// `d`: delete.
    Delete,
    /// `s`: search and history.
    Search,
}

impl Letter {
    /// The letters in their v2 order.
    pub(crate) const ALL: [Letter; 5] = [
        Letter::Create,
        Letter::Read,
        Letter::Update,
        Letter::Delete,
        Letter::Search,
    ];

    fn bit(self) -> u8 {
        match self {
            Letter::Create => 1,
            Letter::Read => 2,
            Letter::Update => 4,
            Letter::Delete => 8,
            Letter::Search => 16,
        }
    }

    fn of(c: char) -> Option<Letter> {
        match c {
            'c' => Some(Letter::Create),
            'r' => Some(Letter::Read),
            'u' => Some(Letter::Update),
            'd' => Some(Letter::Delete),
            's' => Some(Letter::Search),
            _ => None,
        }
    }
}

/// A set of interaction letters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Letters(u8);

impl Letters {
    pub(crate) fn of(letters: &[Letter]) -> Letters {
        Letters(letters.iter().fold(0, |acc, l| acc | l.bit()))
    }

    pub(crate) fn contains(self, letter: Letter) -> bool {
        self.0 & letter.bit() != 0
    }

    pub(crate) fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub(crate) fn without_writes(self) -> Letters {
        Letters(self.0 & !(Letter::Create.bit() | Letter::Update.bit() | Letter::Delete.bit()))
    }

    pub(crate) fn has_writes(self) -> bool {
        self.without_writes() != self
    }
}

/// A parsed scope that grants something.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Scope {
    pub(crate) context: Context,
    /// The resource type, `None` for `*`.
    pub(crate) resource_type: Option<String>,
    pub(crate) letters: Letters,
    /// v2 search restriction (`?category=laboratory`), decoded; empty when there is none.
    /// Resources must match it to be reached through this scope.
    pub(crate) restriction: Vec<(String, String)>,
}

impl Scope {
    /// Whether the scope reaches `resource_type` (`None`: every type at once, so only `*`).
    pub(crate) fn covers(&self, resource_type: Option<&str>) -> bool {
        match (&self.resource_type, resource_type) {
            (None, _) => true,
            (Some(mine), Some(asked)) => mine == asked,
            (Some(_), None) => false,
        }
    }
}

/// Result parameters that cannot restrict a scope (they shape results, they do not filter).
fn restriction_name_allowed(name: &str) -> bool {
    !name.starts_with('_')
        || matches!(
            name,
            "_id" | "_tag" | "_security" | "_profile" | "_source" | "_lastUpdated"
        )
}

/// Parses one scope; `None` for anything that is not a usable resource scope (`openid`,
/// `launch/patient`, typos, unknown types, bad permissions).
pub(crate) fn parse_scope(text: &str) -> Option<Scope> {
    let (context, rest) = text.split_once('/')?;
    let context = match context {
        "patient" => Context::Patient,
        "user" => Context::User,
        "system" => Context::System,
        _ => return None,
    };
    let (target, query) = match rest.split_once('?') {
        Some((target, query)) => (target, Some(query)),
        None => (rest, None),
    };
    let (resource_type, permission) = target.split_once('.')?;
    let resource_type = match resource_type {
        "*" => None,
        t if is_resource_type(t) => Some(t.to_owned()),
        _ => return None,
    };
    let (letters, v2) = match permission {
        // v1: `read` is read and search; `write` is create, update and delete.
        "read" => (Letters::of(&[Letter::Read, Letter::Search]), false),
        "write" => (
            Letters::of(&[Letter::Create, Letter::Update, Letter::Delete]),
            false,
        ),
        "*" => (Letters::of(&Letter::ALL), false),
        v2 => (parse_v2_letters(v2)?, true),
    };
    let restriction = match query {
        None => Vec::new(),
        // Only v2 permissions take restrictions.
        Some(_) if !v2 => return None,
        Some(query) => {
            let pairs = decode_query(query).ok()?;
            if pairs.is_empty()
                || pairs
                    .iter()
                    .any(|(name, value)| value.is_empty() || !restriction_name_allowed(name))
            {
                return None;
            }
            pairs
        }
    };
    Some(Scope {
        context,
        resource_type,
        letters,
        restriction,
    })
}

/// `cruds` letters: at least one, each at most once, in that order.
fn parse_v2_letters(text: &str) -> Option<Letters> {
    let mut last = None;
    let mut letters = Vec::new();
    for c in text.chars() {
        let letter = Letter::of(c)?;
        let position = Letter::ALL.iter().position(|l| *l == letter)?;
        if last.is_some_and(|p| p >= position) {
            return None;
        }
        last = Some(position);
        letters.push(letter);
    }
    (!letters.is_empty()).then(|| Letters::of(&letters))
}

/// Parses a space-separated `scope` claim; unusable scopes are left out.
pub(crate) fn parse_scopes<'a>(scopes: impl IntoIterator<Item = &'a str>) -> Vec<Scope> {
    scopes
        .into_iter()
        .flat_map(str::split_whitespace)
        .filter_map(parse_scope)
        .collect()
}

/// Applies `--require-mfa-for-privileged` to a token without MFA: `system/` scopes are
/// dropped, `user/` scopes lose their write letters (`c`, `u`, `d`).
pub(crate) fn drop_privileged(scopes: Vec<Scope>) -> Vec<Scope> {
    scopes
        .into_iter()
        .filter_map(|mut scope| match scope.context {
            Context::System => None,
            Context::User if scope.letters.has_writes() => {
                scope.letters = scope.letters.without_writes();
                (!scope.letters.is_empty()).then_some(scope)
            }
            _ => Some(scope),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letters(text: &str) -> Letters {
        Letters::of(&text.chars().filter_map(Letter::of).collect::<Vec<_>>())
    }

    #[test]
    fn v1_and_v2_scopes_parse_to_contexts_types_and_letters() {
        let table: &[(&str, Context, Option<&str>, &str)] = &[
            (
                "patient/Observation.read",
                Context::Patient,
                Some("Observation"),
                "rs",
            ),
            ("user/*.write", Context::User, None, "cud"),
            ("system/*.*", Context::System, None, "cruds"),
            ("patient/*.read", Context::Patient, None, "rs"),
            (
                "patient/Observation.rs",
                Context::Patient,
                Some("Observation"),
                "rs",
            ),
            ("user/*.cruds", Context::User, None, "cruds"),
            ("system/Patient.r", Context::System, Some("Patient"), "r"),
            (
                "user/Encounter.cud",
                Context::User,
                Some("Encounter"),
                "cud",
            ),
            (
                "patient/Condition.s",
                Context::Patient,
                Some("Condition"),
                "s",
            ),
            ("system/*.d", Context::System, None, "d"),
        ];
        for (text, context, resource_type, expected) in table {
            let scope = parse_scope(text).unwrap_or_else(|| panic!("{text} did not parse"));
            assert_eq!(scope.context, *context, "{text}");
            assert_eq!(scope.resource_type.as_deref(), *resource_type, "{text}");
            assert_eq!(scope.letters, letters(expected), "{text}");
            assert!(scope.restriction.is_empty(), "{text}");
        }
    }

    #[test]
    fn unknown_and_malformed_scopes_are_ignored() {
        for text in [
            "",
            "openid",
            "fhirUser",
            "launch/patient",
            "offline_access",
            "patient/Observation",
            "patient/Observation.",
            "patient/Observation.readwrite",
            "patient/Observation.sr",
            "patient/Observation.rr",
            "patient/Observation.crudsx",
            "patient/Observation.x",
            "doctor/Observation.read",
            "Patient/Observation.read",
            "patient/observation.read",
            "patient/NotAType.rs",
            "patient/Observation.read?category=laboratory",
            "patient/Observation.rs?",
            "patient/Observation.rs?category=",
            "patient/Observation.rs?_count=1",
            "patient/Observation.rs?_include=Observation:subject",
        ] {
            assert_eq!(parse_scope(text), None, "{text:?} should be ignored");
        }
        assert!(parse_scopes(["openid   launch fhirUser"]).is_empty());
    }

    #[test]
    fn v2_restrictions_are_decoded() {
        let scope = parse_scope("patient/Observation.rs?category=laboratory").unwrap();
        assert_eq!(
            scope.restriction,
            vec![("category".to_owned(), "laboratory".to_owned())]
        );
        let scope = parse_scope(
            "user/Observation.rs?category=http://terminology.hl7.org/CodeSystem/observation-category|vital-signs&status=final",
        )
        .unwrap();
        assert_eq!(scope.restriction.len(), 2);
        assert_eq!(
            scope.restriction[0].1,
            "http://terminology.hl7.org/CodeSystem/observation-category|vital-signs"
        );
        let scope = parse_scope("patient/*.rs?_security=R").unwrap();
        assert_eq!(scope.resource_type, None);
        assert_eq!(scope.restriction[0].0, "_security");
    }

    #[test]
    fn a_claim_keeps_only_the_usable_scopes() {
        let scopes = parse_scopes([
            "openid fhirUser launch/patient patient/Observation.rs bogus/x.y  patient/Patient.read\n",
        ]);
        assert_eq!(scopes.len(), 2);
        assert_eq!(scopes[1].resource_type.as_deref(), Some("Patient"));
    }

    #[test]
    fn without_mfa_privileged_scopes_are_dropped_or_lose_write_letters() {
        let scopes = parse_scopes([
            "system/*.* user/*.cruds user/Observation.cud patient/Observation.cruds user/Patient.rs",
        ]);
        let kept = drop_privileged(scopes);
        let describe: Vec<(Context, Option<&str>, Letters)> = kept
            .iter()
            .map(|s| (s.context, s.resource_type.as_deref(), s.letters))
            .collect();
        assert_eq!(
            describe,
            vec![
                (Context::User, None, letters("rs")),
                (Context::Patient, Some("Observation"), letters("cruds")),
                (Context::User, Some("Patient"), letters("rs")),
            ]
        );
    }

    #[test]
    fn covers_matches_the_type_or_the_wildcard() {
        let any = parse_scope("user/*.rs").unwrap();
        let obs = parse_scope("user/Observation.rs").unwrap();
        assert!(any.covers(Some("Patient")) && any.covers(None));
        assert!(obs.covers(Some("Observation")));
        assert!(!obs.covers(Some("Patient")) && !obs.covers(None));
    }
}
