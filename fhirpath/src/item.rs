//! Result items: borrowed nodes of the input JSON and values computed by the expression.

use std::fmt;

use serde_json::Value;

use crate::decimal::Decimal;
use crate::model::{TypeId, model};
use crate::temporal::Temporal;

/// One item of a result collection.
#[derive(Debug, Clone)]
pub enum Item<'a> {
    /// A node of the input resource (or a stand-in for a resolved reference).
    Node(Node<'a>),
    /// A computed Boolean.
    Boolean(bool),
    /// A computed Integer.
    Integer(i64),
    /// A computed Decimal.
    Decimal(Decimal),
    /// A computed String.
    String(String),
    /// A computed Date.
    Date(Temporal),
    /// A computed DateTime.
    DateTime(Temporal),
    /// A computed Time.
    Time(Temporal),
    /// A computed Quantity.
    Quantity(Quantity),
}

/// A node of the input JSON together with its FHIR type when known.
#[derive(Debug, Clone, Copy)]
pub struct Node<'a> {
    pub(crate) value: &'a Value,
    /// The `_name` sibling holding a primitive's id/extensions.
    pub(crate) ext: Option<&'a Value>,
    pub(crate) ty: Option<TypeId>,
    /// A resolved reference to a resource that is not in the input: it has a type but no JSON.
    pub(crate) stub: bool,
}

/// A quantity value with its unit (UCUM code or calendar word).
#[derive(Debug, Clone)]
pub struct Quantity {
    /// The numeric value.
    pub value: Decimal,
    /// The unit.
    pub unit: String,
}

impl<'a> Node<'a> {
    pub(crate) fn new(value: &'a Value, ext: Option<&'a Value>, ty: Option<TypeId>) -> Node<'a> {
        // Only an object typed as a resource (or of unknown type) names its own type; data
        // types and backbone elements never do, and the lookup is the costly part.
        let m = model();
        let ty = if ty.is_none_or(|t| m.is_resource_like(t)) {
            match value
                .as_object()
                .and_then(|object| member(object, "resourceType"))
                .and_then(Value::as_str)
            {
                Some(rt) => m.type_id(rt).or(ty),
                None => ty,
            }
        } else {
            ty
        };
        Node {
            value,
            ext,
            ty,
            stub: false,
        }
    }

    /// The root node of a resource (or of any JSON value, typed by its `resourceType` if
    /// it has one), for [`crate::Expression::evaluate_node`].
    pub fn resource(value: &'a Value) -> Node<'a> {
        Node::new(value, None, None)
    }

    /// A node of JSON `value` of the FHIR type (or backbone element path, `Patient.contact`)
    /// `type_name`, for evaluating an expression on an element found by other means (as
    /// `$validate` does for invariants); untyped if the model does not know the name.
    pub fn typed(value: &'a Value, type_name: &str) -> Node<'a> {
        Node::new(value, None, model().type_id(type_name))
    }

    /// The JSON value of this node (`None` for a resolved reference stand-in).
    pub fn json(&self) -> Option<&'a Value> {
        if self.stub { None } else { Some(self.value) }
    }

    /// The FHIR type name when known.
    pub fn fhir_type(&self) -> Option<&'static str> {
        self.ty.map(|t| model().name(t))
    }
}

impl<'a> Item<'a> {
    /// The input JSON node this item is, if it is one (not a computed literal).
    pub fn json(&self) -> Option<&'a Value> {
        match self {
            Item::Node(n) => n.json(),
            _ => None,
        }
    }

    /// Whether this is a primitive element that exists without a value: its JSON has only
    /// the `_name` sibling (an id or extensions, such as a data-absent-reason).
    pub fn is_valueless(&self) -> bool {
        matches!(self, Item::Node(n) if !n.stub && n.value.is_null())
    }

    /// The FHIR type name when known; for resources the resource type. Computed values report
    /// the matching FHIR primitive name (`boolean`, `integer`, `decimal`, `string`, `date`,
    /// `dateTime`, `time`) or `Quantity`.
    pub fn fhir_type(&self) -> Option<&str> {
        match self {
            Item::Node(n) => n.fhir_type(),
            Item::Boolean(_) => Some("boolean"),
            Item::Integer(_) => Some("integer"),
            Item::Decimal(_) => Some("decimal"),
            Item::String(_) => Some("string"),
            Item::Date(_) => Some("date"),
            Item::DateTime(_) => Some("dateTime"),
            Item::Time(_) => Some("time"),
            Item::Quantity(_) => Some("Quantity"),
        }
    }
}

impl fmt::Display for Item<'_> {
    /// Primitive values print as their FHIR string form; complex nodes as compact JSON.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Item::Node(n) => match n.value {
                Value::String(s) => f.write_str(s),
                Value::Null => Ok(()),
                other => write!(f, "{other}"),
            },
            Item::Boolean(b) => write!(f, "{b}"),
            Item::Integer(i) => write!(f, "{i}"),
            Item::Decimal(d) => write!(f, "{d}"),
            Item::String(s) => f.write_str(s),
            Item::Date(t) | Item::DateTime(t) | Item::Time(t) => write!(f, "{t}"),
            Item::Quantity(q) => write!(f, "{} '{}'", q.value, q.unit),
        }
    }
}

/// The most keys an object has for [`member`] to scan it rather than hash the name.
const SCAN_LIMIT: usize = 16;

/// `object[name]`. FHIR's JSON objects are small (a Coding has three keys, a resource a
/// dozen), and serde_json's ordered map hashes the name with SipHash on every look-up, which
/// costs more than comparing it with each key of a small object; so small objects are scanned.
#[inline]
pub fn member<'v>(object: &'v serde_json::Map<String, Value>, name: &str) -> Option<&'v Value> {
    if object.len() <= SCAN_LIMIT {
        // Length and first byte first: most keys differ there, and a call to `memcmp` for
        // every key of the same length cost more than the scan itself.
        let first = name.as_bytes().first();
        object.iter().find_map(|(key, value)| {
            (key.len() == name.len() && key.as_bytes().first() == first && key == name)
                .then_some(value)
        })
    } else {
        object.get(name)
    }
}
