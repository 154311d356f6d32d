//! What the generators produce: a resource as type, id and compact JSON text.

use serde_json::Value;

/// One generated resource: its type, client id, and JSON text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GeneratedResource {
    /// The resource type (`Observation`, ...).
    pub resource_type: &'static str,
    /// The client-assigned logical id (UUID-shaped).
    pub id: String,
    /// The resource as compact JSON, `id` included.
    pub json: String,
}

impl GeneratedResource {
    /// `Type/id`.
    pub fn reference(&self) -> String {
        format!("{}/{}", self.resource_type, self.id)
    }

    /// The JSON parsed into a [`Value`] (what the store's write API takes).
    pub fn to_value(&self) -> serde_json::Result<Value> {
        serde_json::from_str(&self.json)
    }
}

/// A resource ready to be written: type, id and parsed body.
#[derive(Debug, Clone)]
pub struct ParsedResource {
    /// The resource type.
    pub resource_type: &'static str,
    /// The logical id.
    pub id: String,
    /// The parsed body.
    pub body: Value,
}
