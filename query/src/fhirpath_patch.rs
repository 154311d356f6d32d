//! FHIR `patch` with FHIRPath Patch: a `Parameters` resource whose `operation` parameters
//! add, insert, delete, replace and move elements named by FHIRPath expressions
//! (<https://hl7.org/fhir/R4/fhirpatch.html>), applied in order, all or nothing.
//!
//! An expression is evaluated with the FHIRPath engine over the resource as the earlier
//! operations left it; the elements it returns are found in the JSON by identity (the engine
//! returns references into the resource), which gives the place to change. A primitive's
//! `_name` sibling (its id and extensions) moves, is inserted into and is deleted with it.
//!
//! Error messages name the operation's index and what was wrong, never paths' matches or the
//! resource's content (they reach OperationOutcomes and logs).

use fhirkeep_fhirpath::Expression;
use serde_json::{Map, Value};

use crate::{Error, Result};

fn unprocessable(message: impl Into<String>) -> Error {
    Error::Unprocessable(message.into())
}

/// Whether `patch` is a FHIRPath Patch (a `Parameters` resource) rather than a JSON Patch.
pub fn is_fhirpath_patch(patch: &Value) -> bool {
    patch.get("resourceType").and_then(Value::as_str) == Some("Parameters")
}

/// One step from a JSON value to one of its children.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    Key(String),
    Index(usize),
}

/// The operation kinds, with the parts each needs.
#[derive(Debug)]
enum Operation {
    Add { name: String, value: Value },
    Insert { value: Value, index: usize },
    Delete,
    Replace { value: Value },
    Move { source: usize, destination: usize },
}

/// Applies a FHIRPath Patch to `resource`. A malformed operation, a path that is not valid
/// FHIRPath or that names no element (except for `delete`), several elements where one is
/// needed, or an index out of range is [`Error::Unprocessable`] (422).
pub fn apply_fhirpath_patch(resource: &Value, patch: &Value) -> Result<Value> {
    let parameters = patch
        .get("parameter")
        .and_then(Value::as_array)
        .ok_or_else(|| unprocessable("a FHIRPath Patch needs 'parameter' operations"))?;
    let mut doc = resource.clone();
    for (op, parameter) in parameters.iter().enumerate() {
        if parameter.get("name").and_then(Value::as_str) != Some("operation") {
            return Err(unprocessable(format!(
                "patch operation {op}: every parameter of a FHIRPath Patch must be named 'operation'"
            )));
        }
        let parts = Parts::of(parameter, op)?;
        let path_text = parts.string("path")?;
        let expression = Expression::parse(path_text).map_err(|_| {
            unprocessable(format!(
                "patch operation {op}: the path is not a valid FHIRPath expression"
            ))
        })?;
        let operation = parts.operation()?;
        let targets = locate_all(&doc, &expression, op)?;
        apply(&mut doc, operation, &targets, op)?;
    }
    Ok(doc)
}

/// The `part`s of one operation parameter.
struct Parts<'a> {
    parts: &'a [Value],
    op: usize,
}

impl<'a> Parts<'a> {
    fn of(parameter: &'a Value, op: usize) -> Result<Self> {
        let parts = parameter
            .get("part")
            .and_then(Value::as_array)
            .ok_or_else(|| unprocessable(format!("patch operation {op} has no parts")))?;
        Ok(Parts { parts, op })
    }

    fn find(&self, name: &str) -> Option<&'a Value> {
        self.parts
            .iter()
            .find(|part| part.get("name").and_then(Value::as_str) == Some(name))
    }

    fn string(&self, name: &str) -> Result<&'a str> {
        self.find(name)
            .and_then(|part| {
                ["valueString", "valueCode"]
                    .iter()
                    .find_map(|key| part.get(*key).and_then(Value::as_str))
            })
            .ok_or_else(|| {
                unprocessable(format!(
                    "patch operation {} needs a string part '{name}'",
                    self.op
                ))
            })
    }

    fn index(&self, name: &str) -> Result<usize> {
        self.find(name)
            .and_then(|part| part.get("valueInteger"))
            .and_then(Value::as_u64)
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| {
                unprocessable(format!(
                    "patch operation {} needs a non-negative integer part '{name}'",
                    self.op
                ))
            })
    }

    fn value(&self) -> Result<Value> {
        let part = self.find("value").ok_or_else(|| {
            unprocessable(format!("patch operation {} needs a 'value' part", self.op))
        })?;
        part_value(part, self.op, 0)
    }

    fn operation(&self) -> Result<Operation> {
        Ok(match self.string("type")? {
            "add" => Operation::Add {
                name: self.string("name")?.to_owned(),
                value: self.value()?,
            },
            "insert" => Operation::Insert {
                value: self.value()?,
                index: self.index("index")?,
            },
            "delete" => Operation::Delete,
            "replace" => Operation::Replace {
                value: self.value()?,
            },
            "move" => Operation::Move {
                source: self.index("source")?,
                destination: self.index("destination")?,
            },
            _ => {
                return Err(unprocessable(format!(
                    "patch operation {}: type must be add, insert, delete, replace or move",
                    self.op
                )));
            }
        })
    }
}

/// Nesting of anonymous values (parts within parts) accepted, far beyond any FHIR type.
const MAX_PART_DEPTH: usize = 32;

/// The value a `value` part carries: its `value[x]`, or for an anonymous (backbone) type an
/// object built from its own parts (a name given several times becomes a list).
fn part_value(part: &Value, op: usize, depth: usize) -> Result<Value> {
    if let Some(object) = part.as_object()
        && let Some((_, value)) = object
            .iter()
            .find(|(key, _)| key.len() > 5 && key.starts_with("value"))
    {
        return Ok(value.clone());
    }
    let Some(parts) = part.get("part").and_then(Value::as_array) else {
        return Err(unprocessable(format!(
            "patch operation {op}: a value part needs a value[x] or parts"
        )));
    };
    if depth >= MAX_PART_DEPTH {
        return Err(unprocessable(format!(
            "patch operation {op}: a value's parts are nested too deeply"
        )));
    }
    let mut object = Map::new();
    for sub in parts {
        let name = sub.get("name").and_then(Value::as_str).ok_or_else(|| {
            unprocessable(format!("patch operation {op}: a value's part has no name"))
        })?;
        let value = part_value(sub, op, depth + 1)?;
        match object.get_mut(name) {
            None => {
                object.insert(name.to_owned(), value);
            }
            Some(Value::Array(items)) if !value.is_array() => items.push(value),
            Some(existing) => {
                let first = existing.take();
                *existing = Value::Array(vec![first, value]);
            }
        }
    }
    Ok(Value::Object(object))
}

/// Where every element the expression returns sits in `doc`.
fn locate_all(doc: &Value, expression: &Expression, op: usize) -> Result<Vec<Vec<Step>>> {
    let items = expression.evaluate(doc).map_err(|_| {
        unprocessable(format!(
            "patch operation {op}: the path cannot be evaluated on this resource"
        ))
    })?;
    items
        .iter()
        // A primitive with only its `_name` sibling has no node of its own to change; such
        // an element is out of this implementation's reach and is left as it is.
        .filter(|item| !item.is_valueless())
        .map(|item| {
            item.json()
                .and_then(|target| locate(doc, target))
                .ok_or_else(|| {
                    unprocessable(format!(
                        "patch operation {op}: the path must return elements of the resource"
                    ))
                })
        })
        .collect()
}

/// The steps from `doc` to the node that is `target` (the same node, not an equal one).
fn locate(doc: &Value, target: &Value) -> Option<Vec<Step>> {
    fn walk(node: &Value, target: &Value, path: &mut Vec<Step>) -> bool {
        if std::ptr::eq(node, target) {
            return true;
        }
        match node {
            Value::Object(map) => {
                for (key, child) in map {
                    path.push(Step::Key(key.clone()));
                    if walk(child, target, path) {
                        return true;
                    }
                    path.pop();
                }
            }
            Value::Array(items) => {
                for (index, child) in items.iter().enumerate() {
                    path.push(Step::Index(index));
                    if walk(child, target, path) {
                        return true;
                    }
                    path.pop();
                }
            }
            _ => {}
        }
        false
    }
    let mut path = Vec::new();
    walk(doc, target, &mut path).then_some(path)
}

fn get_mut<'a>(doc: &'a mut Value, path: &[Step]) -> Option<&'a mut Value> {
    let mut at = doc;
    for step in path {
        at = match (step, at) {
            (Step::Key(key), Value::Object(map)) => map.get_mut(key)?,
            (Step::Index(index), Value::Array(items)) => items.get_mut(*index)?,
            _ => return None,
        };
    }
    Some(at)
}

/// The one element an operation needs.
fn single(targets: &[Vec<Step>], op: usize) -> Result<&[Step]> {
    match targets {
        [] => Err(unprocessable(format!(
            "patch operation {op}: the path matches no element"
        ))),
        [one] => Ok(one),
        _ => Err(unprocessable(format!(
            "patch operation {op}: the path matches more than one element"
        ))),
    }
}

/// The list that all `targets` are items of: the path to its owning object and its key.
fn owning_list(targets: &[Vec<Step>], op: usize) -> Result<(Vec<Step>, String)> {
    let not_list = || {
        unprocessable(format!(
            "patch operation {op}: the path must return the items of one list"
        ))
    };
    let first = targets.first().ok_or_else(|| {
        unprocessable(format!("patch operation {op}: the path matches no element"))
    })?;
    let [owner @ .., Step::Key(key), Step::Index(_)] = first.as_slice() else {
        return Err(not_list());
    };
    let same_list = |path: &Vec<Step>| {
        path.len() == first.len() && path[..path.len() - 1] == first[..first.len() - 1]
    };
    if !targets.iter().all(same_list) {
        return Err(not_list());
    }
    Ok((owner.to_vec(), key.clone()))
}

/// The object at `owner` and the list under `key` in it, with its `_key` sibling (a
/// primitive list's ids and extensions) when there is one.
fn list_mut<'a>(
    doc: &'a mut Value,
    owner: &[Step],
    key: &str,
    op: usize,
) -> Result<(&'a mut Vec<Value>, Option<&'a mut Vec<Value>>)> {
    let lost = || unprocessable(format!("patch operation {op}: the list is gone"));
    let object = get_mut(doc, owner)
        .and_then(Value::as_object_mut)
        .ok_or_else(lost)?;
    let sibling_key = format!("_{key}");
    // Two disjoint borrows of the map: take the sibling out and put it back afterwards is
    // not possible with references, so split by iterating.
    let mut list = None;
    let mut sibling = None;
    for (name, value) in object.iter_mut() {
        if name == key {
            list = value.as_array_mut();
        } else if *name == sibling_key {
            sibling = value.as_array_mut();
        }
    }
    Ok((list.ok_or_else(lost)?, sibling))
}

fn apply(doc: &mut Value, operation: Operation, targets: &[Vec<Step>], op: usize) -> Result<()> {
    match operation {
        Operation::Add { name, value } => {
            let path = single(targets, op)?;
            let type_name = element_type(doc, path);
            let object = get_mut(doc, path)
                .and_then(Value::as_object_mut)
                .ok_or_else(|| {
                    unprocessable(format!(
                        "patch operation {op}: add needs the path to return a complex element"
                    ))
                })?;
            match object.get_mut(&name) {
                Some(Value::Array(items)) => items.push(value),
                Some(_) => {
                    return Err(unprocessable(format!(
                        "patch operation {op}: the element already has '{name}', which does \
                         not repeat (use replace)"
                    )));
                }
                None => {
                    let repeats = type_name
                        .as_deref()
                        .and_then(|t| crate::validate::element_repeats(t, &name))
                        .unwrap_or(matches!(name.as_str(), "extension" | "modifierExtension"));
                    let value = if repeats && !value.is_array() {
                        Value::Array(vec![value])
                    } else {
                        value
                    };
                    object.insert(name, value);
                }
            }
        }
        Operation::Replace { value } => {
            let path = single(targets, op)?;
            if path.is_empty() {
                return Err(unprocessable(format!(
                    "patch operation {op}: the resource itself cannot be replaced"
                )));
            }
            let at = get_mut(doc, path).ok_or_else(|| {
                unprocessable(format!("patch operation {op}: the element is gone"))
            })?;
            *at = value;
        }
        Operation::Delete => {
            let path = match targets {
                [] => return Ok(()),
                [one] => one,
                _ => {
                    return Err(unprocessable(format!(
                        "patch operation {op}: the path matches more than one element"
                    )));
                }
            };
            delete(doc, path, op)?;
        }
        Operation::Insert { value, index } => {
            let (owner, key) = owning_list(targets, op)?;
            let (list, sibling) = list_mut(doc, &owner, &key, op)?;
            if index > list.len() {
                return Err(unprocessable(format!(
                    "patch operation {op}: index {index} is past the end of the list"
                )));
            }
            list.insert(index, value);
            if let Some(sibling) = sibling
                && index <= sibling.len()
            {
                sibling.insert(index, Value::Null);
            }
        }
        Operation::Move {
            source,
            destination,
        } => {
            let (owner, key) = owning_list(targets, op)?;
            let (list, sibling) = list_mut(doc, &owner, &key, op)?;
            if source >= list.len() || destination >= list.len() {
                return Err(unprocessable(format!(
                    "patch operation {op}: source and destination must be indexes of the list"
                )));
            }
            let moved = list.remove(source);
            list.insert(destination, moved);
            if let Some(sibling) = sibling
                && source < sibling.len()
                && destination < sibling.len()
            {
                let moved = sibling.remove(source);
                sibling.insert(destination, moved);
            }
        }
    }
    Ok(())
}

/// Deletes the element at `path`: an item from its list (the list too when it is left
/// empty), or a property with its `_name` sibling.
fn delete(doc: &mut Value, path: &[Step], op: usize) -> Result<()> {
    match path {
        [] => Err(unprocessable(format!(
            "patch operation {op}: the resource itself cannot be deleted"
        ))),
        [owner @ .., Step::Key(key), Step::Index(index)] => {
            let (list, sibling) = list_mut(doc, owner, key, op)?;
            if *index < list.len() {
                list.remove(*index);
            }
            let emptied = list.is_empty();
            if let Some(sibling) = sibling
                && *index < sibling.len()
            {
                sibling.remove(*index);
            }
            if emptied && let Some(object) = get_mut(doc, owner).and_then(Value::as_object_mut) {
                object.shift_remove(key.as_str());
                object.shift_remove(&format!("_{key}"));
            }
            Ok(())
        }
        [owner @ .., Step::Key(key)] => {
            if let Some(object) = get_mut(doc, owner).and_then(Value::as_object_mut) {
                object.shift_remove(key.as_str());
                object.shift_remove(&format!("_{key}"));
            }
            Ok(())
        }
        _ => Err(unprocessable(format!(
            "patch operation {op}: the element cannot be deleted"
        ))),
    }
}

/// The FHIR type of the element at `path` (a type or backbone path such as
/// `Patient.contact`), as the FHIRPath engine sees it, for deciding whether a child repeats.
fn element_type(doc: &Value, path: &[Step]) -> Option<String> {
    if path.is_empty() {
        return doc
            .get("resourceType")
            .and_then(Value::as_str)
            .map(str::to_owned);
    }
    // Build the FHIRPath of the element from its steps, then let the engine type it.
    let mut expression = doc.get("resourceType")?.as_str()?.to_owned();
    let mut at = doc;
    for step in path {
        match step {
            Step::Key(key) => {
                if !key.chars().all(|c| c.is_ascii_alphanumeric()) {
                    return None;
                }
                expression.push('.');
                expression.push_str(key);
                at = at.get(key.as_str())?;
            }
            Step::Index(index) => {
                expression.push_str(&format!("[{index}]"));
                at = at.get(*index)?;
            }
        }
    }
    let items = Expression::parse(&expression).ok()?.evaluate(doc).ok()?;
    items
        .iter()
        .find(|item| item.json().is_some_and(|v| std::ptr::eq(v, at)))
        .and_then(|item| item.fhir_type().map(str::to_owned))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn operation(parts: Value) -> Value {
        json!({"name": "operation", "part": parts})
    }

    fn patch(operations: Vec<Value>) -> Value {
        json!({"resourceType": "Parameters", "parameter": operations})
    }

    fn patient() -> Value {
        json!({
            "resourceType": "Patient",
            "id": "p1",
            "active": true,
            "name": [{"family": "Chalmers", "given": ["Peter", "James"]}],
            "_birthDate": {"extension": [{"url": "http://example.org/x", "valueString": "e"}]},
            "birthDate": "1974-12-25",
            "identifier": [
                {"system": "http://a", "value": "1"},
                {"system": "http://b", "value": "2"},
                {"system": "http://c", "value": "3"}
            ]
        })
    }

    fn apply_ok(resource: &Value, operations: Vec<Value>) -> Value {
        apply_fhirpath_patch(resource, &patch(operations)).unwrap()
    }

    fn apply_err(resource: &Value, operations: Vec<Value>) -> String {
        match apply_fhirpath_patch(resource, &patch(operations)) {
            Err(Error::Unprocessable(message)) => message,
            other => panic!("expected a 422, got {other:?}"),
        }
    }

    #[test]
    fn each_operation_kind_changes_what_the_spec_says() {
        let p = patient();
        let added = apply_ok(
            &p,
            vec![
                operation(json!([
                    {"name": "type", "valueCode": "add"},
                    {"name": "path", "valueString": "Patient"},
                    {"name": "name", "valueString": "telecom"},
                    {"name": "value", "valueContactPoint": {"system": "phone", "value": "555"}}
                ])),
                operation(json!([
                    {"name": "type", "valueCode": "add"},
                    {"name": "path", "valueString": "Patient"},
                    {"name": "name", "valueString": "gender"},
                    {"name": "value", "valueCode": "male"}
                ])),
                operation(json!([
                    {"name": "type", "valueCode": "add"},
                    {"name": "path", "valueString": "Patient.name[0]"},
                    {"name": "name", "valueString": "given"},
                    {"name": "value", "valueString": "Jim"}
                ])),
            ],
        );
        assert_eq!(
            added["telecom"],
            json!([{"system": "phone", "value": "555"}])
        );
        assert_eq!(added["gender"], json!("male"));
        assert_eq!(added["name"][0]["given"], json!(["Peter", "James", "Jim"]));

        let replaced = apply_ok(
            &p,
            vec![operation(json!([
                {"name": "type", "valueCode": "replace"},
                {"name": "path", "valueString": "Patient.name.where(family = 'Chalmers').given[1]"},
                {"name": "value", "valueString": "Jimmy"}
            ]))],
        );
        assert_eq!(replaced["name"][0]["given"], json!(["Peter", "Jimmy"]));

        let inserted = apply_ok(
            &p,
            vec![operation(json!([
                {"name": "type", "valueCode": "insert"},
                {"name": "path", "valueString": "Patient.identifier"},
                {"name": "index", "valueInteger": 1},
                {"name": "value", "valueIdentifier": {"system": "http://new", "value": "n"}}
            ]))],
        );
        let systems: Vec<&str> = inserted["identifier"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["system"].as_str().unwrap())
            .collect();
        assert_eq!(systems, ["http://a", "http://new", "http://b", "http://c"]);

        let moved = apply_ok(
            &p,
            vec![operation(json!([
                {"name": "type", "valueCode": "move"},
                {"name": "path", "valueString": "Patient.identifier"},
                {"name": "source", "valueInteger": 0},
                {"name": "destination", "valueInteger": 2}
            ]))],
        );
        let values: Vec<&str> = moved["identifier"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["value"].as_str().unwrap())
            .collect();
        assert_eq!(values, ["2", "3", "1"]);

        let deleted = apply_ok(
            &p,
            vec![
                operation(json!([
                    {"name": "type", "valueCode": "delete"},
                    {"name": "path", "valueString": "Patient.birthDate"}
                ])),
                operation(json!([
                    {"name": "type", "valueCode": "delete"},
                    {"name": "path", "valueString": "Patient.identifier.where(value = '2')"}
                ])),
                // Deleting what is not there is not an error.
                operation(json!([
                    {"name": "type", "valueCode": "delete"},
                    {"name": "path", "valueString": "Patient.deceased"}
                ])),
            ],
        );
        assert!(deleted.get("birthDate").is_none());
        assert!(
            deleted.get("_birthDate").is_none(),
            "a primitive's extensions go with it"
        );
        assert_eq!(deleted["identifier"].as_array().unwrap().len(), 2);
        assert_eq!(p, patient(), "the input is left as it was");
    }

    #[test]
    fn a_backbone_value_is_built_from_parts_and_a_list_emptied_by_delete_goes() {
        let p = json!({"resourceType": "Patient", "id": "p1", "name": [{"family": "A"}]});
        let patched = apply_ok(
            &p,
            vec![
                operation(json!([
                    {"name": "type", "valueCode": "add"},
                    {"name": "path", "valueString": "Patient"},
                    {"name": "name", "valueString": "contact"},
                    {"name": "value", "part": [
                        {"name": "name", "valueHumanName": {"family": "B"}},
                        {"name": "telecom", "valueContactPoint": {"system": "phone", "value": "1"}},
                        {"name": "telecom", "valueContactPoint": {"system": "email", "value": "x"}}
                    ]}
                ])),
                operation(json!([
                    {"name": "type", "valueCode": "delete"},
                    {"name": "path", "valueString": "Patient.name"}
                ])),
            ],
        );
        assert_eq!(patched["contact"][0]["name"]["family"], "B");
        assert_eq!(
            patched["contact"][0]["telecom"].as_array().unwrap().len(),
            2
        );
        assert!(patched.get("name").is_none());
    }

    #[test]
    fn primitive_lists_keep_their_extensions_in_step() {
        let p = json!({
            "resourceType": "Patient", "id": "p1",
            "name": [{"given": ["a", "b", "c"], "_given": [null, {"id": "x"}, null]}]
        });
        let moved = apply_ok(
            &p,
            vec![operation(json!([
                {"name": "type", "valueCode": "move"},
                {"name": "path", "valueString": "Patient.name.given"},
                {"name": "source", "valueInteger": 1},
                {"name": "destination", "valueInteger": 0}
            ]))],
        );
        assert_eq!(moved["name"][0]["given"], json!(["b", "a", "c"]));
        assert_eq!(moved["name"][0]["_given"], json!([{"id": "x"}, null, null]));
        let deleted = apply_ok(
            &p,
            vec![operation(json!([
                {"name": "type", "valueCode": "delete"},
                {"name": "path", "valueString": "Patient.name.given[1]"}
            ]))],
        );
        assert_eq!(deleted["name"][0]["given"], json!(["a", "c"]));
        assert_eq!(deleted["name"][0]["_given"], json!([null, null]));
    }

    #[test]
    fn bad_operations_are_refused_with_the_operation_named_and_nothing_changed() {
        let p = patient();
        let cases: Vec<(Vec<Value>, &str)> = vec![
            (
                vec![operation(json!([
                    {"name": "type", "valueCode": "replace"},
                    {"name": "path", "valueString": "Patient.identifier"},
                    {"name": "value", "valueString": "x"}
                ]))],
                "more than one",
            ),
            (
                vec![operation(json!([
                    {"name": "type", "valueCode": "replace"},
                    {"name": "path", "valueString": "Patient.deceased"},
                    {"name": "value", "valueBoolean": true}
                ]))],
                "matches no element",
            ),
            (
                vec![operation(json!([
                    {"name": "type", "valueCode": "add"},
                    {"name": "path", "valueString": "Patient"},
                    {"name": "name", "valueString": "active"},
                    {"name": "value", "valueBoolean": false}
                ]))],
                "does not repeat",
            ),
            (
                vec![operation(json!([
                    {"name": "type", "valueCode": "insert"},
                    {"name": "path", "valueString": "Patient.identifier"},
                    {"name": "index", "valueInteger": 9},
                    {"name": "value", "valueIdentifier": {"value": "9"}}
                ]))],
                "past the end",
            ),
            (
                vec![operation(json!([
                    {"name": "type", "valueCode": "move"},
                    {"name": "path", "valueString": "Patient.identifier"},
                    {"name": "source", "valueInteger": 0},
                    {"name": "destination", "valueInteger": 3}
                ]))],
                "indexes of the list",
            ),
            (
                vec![operation(json!([
                    {"name": "type", "valueCode": "insert"},
                    {"name": "path", "valueString": "Patient.birthDate"},
                    {"name": "index", "valueInteger": 0},
                    {"name": "value", "valueDate": "2000"}
                ]))],
                "items of one list",
            ),
            (
                vec![operation(json!([
                    {"name": "type", "valueCode": "delete"},
                    {"name": "path", "valueString": "Patient"}
                ]))],
                "resource itself",
            ),
            (
                vec![operation(json!([
                    {"name": "type", "valueCode": "replace"},
                    {"name": "path", "valueString": "'literal'"},
                    {"name": "value", "valueString": "x"}
                ]))],
                "elements of the resource",
            ),
            (
                vec![operation(json!([
                    {"name": "type", "valueCode": "delete"},
                    {"name": "path", "valueString": "Patient.name.("}
                ]))],
                "not a valid FHIRPath",
            ),
            (
                vec![operation(json!([
                    {"name": "type", "valueCode": "upsert"},
                    {"name": "path", "valueString": "Patient"}
                ]))],
                "type must be",
            ),
            (
                vec![operation(json!([
                    {"name": "type", "valueCode": "add"},
                    {"name": "path", "valueString": "Patient"},
                    {"name": "name", "valueString": "gender"}
                ]))],
                "needs a 'value' part",
            ),
            (vec![json!({"name": "op", "part": []})], "named 'operation'"),
        ];
        for (operations, expected) in cases {
            let message = apply_err(&p, operations);
            assert!(message.contains(expected), "{message}");
            assert!(message.starts_with("patch operation 0"), "{message}");
            assert!(!message.contains("Chalmers"));
        }
        let message = match apply_fhirpath_patch(&p, &json!({"resourceType": "Parameters"})) {
            Err(Error::Unprocessable(message)) => message,
            other => panic!("{other:?}"),
        };
        assert!(message.contains("needs 'parameter'"));
    }
}
