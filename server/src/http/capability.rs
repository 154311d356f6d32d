//! The CapabilityStatement of `/metadata`, generated from what the server really supports:
//! every R4 resource type, the interactions the router implements, and every search
//! parameter the database's registry knows (official R4 plus stored SearchParameters).

use chrono::{SecondsFormat, Utc};
use fhirkeep_engine::resource::resource_types;
use fhirkeep_query::{Database, Result};
use serde_json::{Value, json};

/// The type-level interactions of every resource type (see `routes` in `mod.rs`).
const TYPE_INTERACTIONS: [&str; 9] = [
    "read",
    "vread",
    "update",
    "patch",
    "delete",
    "history-instance",
    "history-type",
    "create",
    "search-type",
];

/// The operations `resource_type` supports (see `everything.rs` and `validate.rs`).
fn operations(resource_type: &str) -> Vec<Value> {
    let mut operations = vec![json!({
        "name": "validate",
        "definition": "http://hl7.org/fhir/OperationDefinition/Resource-validate",
    })];
    if resource_type == "Patient" {
        operations.push(json!({
            "name": "everything",
            "definition": "http://hl7.org/fhir/OperationDefinition/Patient-everything",
        }));
    }
    operations
}

/// The whole-system interactions.
const SYSTEM_INTERACTIONS: [&str; 4] = ["transaction", "batch", "search-system", "history-system"];

use super::OAuthUris;

/// The custom and Bulk Data operations (`export.rs`, `audit_view.rs`): name and definition.
const OPERATIONS: [(&str, &str); 6] = [
    (
        "export",
        "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/export",
    ),
    (
        "patient-export",
        "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/patient-export",
    ),
    (
        "group-export",
        "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/group-export",
    ),
    ("audit-head", "urn:fhirkeep:operation:audit-head"),
    ("audit-proof", "urn:fhirkeep:operation:audit-proof"),
    (
        "audit-consistency",
        "urn:fhirkeep:operation:audit-consistency",
    ),
];

/// AuditEvent is the engine's audit log, read-only (see `audit_view.rs`).
const AUDIT_EVENT_INTERACTIONS: [&str; 2] = ["read", "search-type"];

/// The `rest[0].security` of the statement: SMART on FHIR (`smart`, with the authorization
/// server's endpoints when configured) or none, loopback only.
fn security(smart: Option<&OAuthUris>) -> Value {
    let Some(endpoints) = smart else {
        return json!({
            "cors": false,
            "description": "No authentication (--auth none): the server only listens on \
                            loopback addresses.",
        });
    };
    let mut security = json!({
        "cors": false,
        "service": [{
            "coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                "code": "SMART-on-FHIR",
                "display": "SMART-on-FHIR",
            }],
            "text": "OAuth2 using SMART-on-FHIR profile (see http://docs.smarthealthit.org)",
        }],
        "description": "Every interaction but /metadata and /.well-known/smart-configuration \
                        needs a bearer JWT (RS256, ES256 or EdDSA) whose aud is this base URL; \
                        SMART v1 and v2 scopes decide what it may do. See \
                        /.well-known/smart-configuration.",
    });
    let uris: Vec<Value> = [
        ("authorize", &endpoints.authorize),
        ("token", &endpoints.token),
    ]
    .into_iter()
    .filter_map(|(name, uri)| {
        uri.as_ref()
            .map(|uri| json!({"url": name, "valueUri": uri}))
    })
    .collect();
    if !uris.is_empty() {
        security["extension"] = json!([{
            "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
            "extension": uris,
        }]);
    }
    security
}

/// The CapabilityStatement for a server reached at `base` (`smart`: under `--auth smart`).
pub(crate) fn statement(db: &Database, base: &str, smart: Option<&OAuthUris>) -> Result<Value> {
    let registry = db.registry()?;
    let interactions: Vec<Value> = TYPE_INTERACTIONS
        .iter()
        .map(|code| json!({"code": code}))
        .collect();
    let resources: Vec<Value> = resource_types()
        .iter()
        .map(|resource_type| {
            let mut params: Vec<(&str, Value)> = registry
                .for_type(resource_type)
                .map(|param| {
                    (
                        param.code.as_str(),
                        json!({
                            "name": param.code,
                            "definition": param.url,
                            "type": param.kind.name(),
                        }),
                    )
                })
                .collect();
            params.sort_by(|a, b| a.0.cmp(b.0));
            if *resource_type == "AuditEvent" {
                return json!({
                    "type": resource_type,
                    "profile": "http://hl7.org/fhir/StructureDefinition/AuditEvent",
                    "documentation": "The server's Merkle audit log (id = leaf index), read-only; \
                                      needs a system/AuditEvent.read scope under SMART.",
                    "interaction": AUDIT_EVENT_INTERACTIONS
                        .iter()
                        .map(|code| json!({"code": code}))
                        .collect::<Vec<_>>(),
                    "searchParam": [{"name": "date", "type": "date"}],
                });
            }
            let mut resource = json!({
                "type": resource_type,
                "profile": format!("http://hl7.org/fhir/StructureDefinition/{resource_type}"),
                "interaction": interactions,
                "versioning": "versioned-update",
                "readHistory": true,
                "updateCreate": true,
                "conditionalCreate": true,
                "conditionalRead": "not-supported",
                "conditionalUpdate": true,
                "conditionalDelete": "single",
                "searchParam": params.into_iter().map(|(_, p)| p).collect::<Vec<_>>(),
            });
            resource["operation"] = Value::Array(operations(resource_type));
            resource
        })
        .collect();
    Ok(json!({
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true),
        "publisher": "fhirkeep",
        "kind": "instance",
        "software": {"name": "fhirkeep", "version": env!("CARGO_PKG_VERSION")},
        "implementation": {"description": "fhirkeep FHIR R4 server", "url": base},
        "fhirVersion": "4.0.1",
        "format": ["json", "application/fhir+json"],
        "patchFormat": ["application/json-patch+json", "application/fhir+json"],
        "rest": [{
            "mode": "server",
            "security": security(smart),
            "resource": resources,
            "interaction": SYSTEM_INTERACTIONS
                .iter()
                .map(|code| json!({"code": code}))
                .collect::<Vec<_>>(),
            "operation": OPERATIONS
                .iter()
                .map(|(name, definition)| json!({"name": name, "definition": definition}))
                .collect::<Vec<_>>(),
            "compartment": ["http://hl7.org/fhir/CompartmentDefinition/patient"],
        }],
    }))
}
