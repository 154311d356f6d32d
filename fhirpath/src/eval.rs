//! The evaluator: walks the expression tree over the input JSON, navigating elements through
//! the model, testing types, and applying the operators.

use std::cmp::Ordering;

use serde_json::Value;

use crate::Error;
use crate::functions;
use crate::item::{Item, Node, Quantity};
use crate::model::{TypeId, model};
use crate::parser::{Ast, BinOp, Literal};
use crate::values::{
    Prim, arithmetic, coll_eq, coll_equiv, contains_item, item_cmp, prim, push_distinct,
    singleton_bool, singleton_integer,
};

/// A result collection.
pub(crate) type Coll<'a> = Vec<Item<'a>>;

/// Per-evaluation constants.
pub(crate) struct Ctx<'a> {
    pub(crate) root: Item<'a>,
    /// Work left before the evaluation stops with [`Error::Budget`].
    budget: std::cell::Cell<u64>,
}

impl Ctx<'_> {
    /// Spends `units` of the budget.
    pub(crate) fn charge(&self, units: usize) -> Result<(), Error> {
        let units = units as u64;
        match self.budget.get().checked_sub(units) {
            Some(left) => {
                self.budget.set(left);
                Ok(())
            }
            None => {
                self.budget.set(0);
                Err(Error::Budget)
            }
        }
    }
}

/// Variables bound by the enclosing function iteration.
#[derive(Clone, Copy)]
pub(crate) struct Scope<'s, 'a> {
    pub(crate) this: &'s [Item<'a>],
    pub(crate) index: Option<usize>,
    pub(crate) total: Option<&'s [Item<'a>]>,
}

pub(crate) fn err<T>(message: impl Into<String>) -> Result<T, Error> {
    Err(Error::Eval(message.into()))
}

/// Evaluates `ast` against a resource, with `focus` as the initial `$this` (the resource
/// itself when `None`).
pub(crate) fn evaluate<'a>(
    ast: &Ast,
    resource: &'a Value,
    focus: Option<&Item<'a>>,
    budget: &mut u64,
) -> Result<Coll<'a>, Error> {
    evaluate_from(ast, Node::new(resource, None, None), focus, budget)
}

/// [`evaluate`] with the root node already made (its type looked up once for many
/// expressions).
pub(crate) fn evaluate_from<'a>(
    ast: &Ast,
    root: Node<'a>,
    focus: Option<&Item<'a>>,
    budget: &mut u64,
) -> Result<Coll<'a>, Error> {
    let root = Item::Node(root);
    let ctx = Ctx {
        root: root.clone(),
        budget: std::cell::Cell::new(*budget),
    };
    let focus = [focus.cloned().unwrap_or(root)];
    let scope = Scope {
        this: &focus,
        index: None,
        total: None,
    };
    let result = eval(&ctx, ast, &focus, &scope);
    *budget = ctx.budget.get();
    result
}

pub(crate) fn eval<'a>(
    ctx: &Ctx<'a>,
    ast: &Ast,
    focus: &[Item<'a>],
    scope: &Scope<'_, 'a>,
) -> Result<Coll<'a>, Error> {
    ctx.charge(focus.len() + 1)?;
    match ast {
        Ast::Literal(lit) => Ok(literal(lit)),
        Ast::Ident(name) => {
            let mut out = Vec::new();
            // FHIR element names start lower-case, so an upper-case first step is a type
            // name: it selects the focus when the type matches and nothing otherwise.
            let type_name = first_upper(name);
            for item in focus {
                if !type_name {
                    navigate(item, name, &mut out);
                } else if is_type_name_of(item, name) {
                    out.push(item.clone());
                }
            }
            Ok(out)
        }
        Ast::Member(base, name)
            if matches!(name.as_str(), "name" | "namespace")
                && matches!(&**base, Ast::Call(_, f, a) if f == "type" && a.is_empty()) =>
        {
            // Reflection is supported in its common form, `type().name` / `type().namespace`.
            let input = match &**base {
                Ast::Call(Some(inner), _, _) => eval(ctx, inner, focus, scope)?,
                _ => focus.to_vec(),
            };
            Ok(input
                .iter()
                .filter_map(type_info)
                .map(|(ns, n)| Item::String(if name == "name" { n } else { ns }.to_string()))
                .collect())
        }
        Ast::Member(base, name) => {
            if let Ast::Ident(type_name) = &**base
                && first_upper(type_name)
            {
                // `Type.element`, the first step of most search parameters' paths: the focus
                // filtered by type and navigated in one pass, without the filtered collection
                // in between (the same work is charged as for the two steps).
                ctx.charge(focus.len() + 1)?;
                let mut out = Vec::new();
                for item in focus {
                    if is_type_name_of(item, type_name) {
                        ctx.charge(1)?;
                        navigate(item, name, &mut out);
                    }
                }
                return Ok(out);
            }
            let input = eval(ctx, base, focus, scope)?;
            ctx.charge(input.len())?;
            let mut out = Vec::new();
            for item in &input {
                navigate(item, name, &mut out);
            }
            Ok(out)
        }
        Ast::Call(base, name, args) => {
            let input = match base {
                Some(b) => eval(ctx, b, focus, scope)?,
                None => focus.to_vec(),
            };
            let out = functions::call(ctx, name, args, input, scope)?;
            // What a function makes (`descendants()`, `repeat()`) is work too.
            ctx.charge(out.len())?;
            Ok(out)
        }
        Ast::Index(base, index) => {
            let input = eval(ctx, base, focus, scope)?;
            let idx = eval(ctx, index, scope.this, scope)?;
            match singleton_integer(&idx)? {
                Some(i) if i >= 0 => Ok(input.into_iter().nth(i as usize).into_iter().collect()),
                _ => Ok(Vec::new()),
            }
        }
        Ast::Negate(inner) => {
            let v = eval(ctx, inner, focus, scope)?;
            match v.as_slice() {
                [] => Ok(Vec::new()),
                [item] => match prim(item) {
                    Prim::Int(i) => Ok(i.checked_neg().map(Item::Integer).into_iter().collect()),
                    Prim::Dec(d) => Ok(d.neg().map(Item::Decimal).into_iter().collect()),
                    Prim::Qty(v, u) => Ok(v
                        .neg()
                        .map(|value| {
                            Item::Quantity(Quantity {
                                value,
                                unit: u.to_string(),
                            })
                        })
                        .into_iter()
                        .collect()),
                    _ => err("unary minus needs a number"),
                },
                _ => err("unary minus on a collection of more than one item"),
            }
        }
        Ast::Is(base, ty) => {
            let v = eval(ctx, base, focus, scope)?;
            match v.as_slice() {
                [] => Ok(Vec::new()),
                [item] => Ok(vec![Item::Boolean(type_matches(item, ty, false))]),
                _ => err("'is' on a collection of more than one item"),
            }
        }
        Ast::As(base, ty) => {
            let v = eval(ctx, base, focus, scope)?;
            Ok(v.into_iter()
                .filter(|i| type_matches(i, ty, true))
                .collect())
        }
        Ast::This => Ok(scope.this.to_vec()),
        Ast::IndexVar => Ok(scope
            .index
            .map(|i| Item::Integer(i as i64))
            .into_iter()
            .collect()),
        Ast::Total => Ok(scope.total.map(<[Item<'a>]>::to_vec).unwrap_or_default()),
        Ast::Env(name) => env_var(ctx, name),
        Ast::Binary(op, lhs, rhs) => binary(ctx, *op, lhs, rhs, focus, scope),
    }
}

fn env_var<'a>(ctx: &Ctx<'a>, name: &str) -> Result<Coll<'a>, Error> {
    let s = |v: &str| Ok(vec![Item::String(v.to_string())]);
    match name {
        "resource" | "context" | "rootResource" => Ok(vec![ctx.root.clone()]),
        "ucum" => s("http://unitsofmeasure.org"),
        "sct" => s("http://snomed.info/sct"),
        "loinc" => s("http://loinc.org"),
        _ => {
            if let Some(rest) = name.strip_prefix("vs-") {
                s(&format!("http://hl7.org/fhir/ValueSet/{rest}"))
            } else if let Some(rest) = name.strip_prefix("ext-") {
                s(&format!("http://hl7.org/fhir/StructureDefinition/{rest}"))
            } else {
                err(format!("unknown environment variable %{name}"))
            }
        }
    }
}

fn literal<'a>(lit: &Literal) -> Coll<'a> {
    let item = match lit {
        Literal::Empty => return Vec::new(),
        Literal::Boolean(b) => Item::Boolean(*b),
        Literal::String(s) => Item::String(s.clone()),
        Literal::Integer(i) => Item::Integer(*i),
        Literal::Decimal(d) => Item::Decimal(*d),
        Literal::Date(t) => Item::Date(*t),
        Literal::DateTime(t) => Item::DateTime(*t),
        Literal::Time(t) => Item::Time(*t),
        Literal::Quantity(v, u) => Item::Quantity(Quantity {
            value: *v,
            unit: u.clone(),
        }),
    };
    vec![item]
}

/// Whether a path's first identifier names the type of the focus item (`Patient.name`).
fn is_type_name_of(item: &Item<'_>, name: &str) -> bool {
    name.starts_with(|c: char| c.is_ascii_uppercase())
        && matches!(item, Item::Node(Node { ty: Some(t), .. }) if model().is_a(*t, name))
}

pub(crate) fn first_upper(s: &str) -> bool {
    s.starts_with(|c: char| c.is_ascii_uppercase())
}

/// Adds the nodes for `value` (an element value, possibly an array) with the aligned
/// primitive-extension sibling `ext`.
fn push_values<'a>(
    value: &'a Value,
    ext: Option<&'a Value>,
    ty: Option<TypeId>,
    out: &mut Coll<'a>,
) {
    match value {
        Value::Array(items) => {
            let exts = ext.and_then(Value::as_array);
            for (i, v) in items.iter().enumerate() {
                let e = exts.and_then(|a| a.get(i)).filter(|e| !e.is_null());
                // `[null]` with an extension sibling is a repetition that has no value but
                // does exist (FHIR JSON's alignment of `given` and `_given`).
                if !v.is_null() || e.is_some() {
                    out.push(Item::Node(Node::new(v, e, ty)));
                }
            }
            // Repetitions that only `_name` has (`_given` longer than `given`).
            if let Some(exts) = exts {
                for e in exts.iter().skip(items.len()).filter(|e| !e.is_null()) {
                    out.push(Item::Node(Node::new(&NO_VALUE, Some(e), ty)));
                }
            }
        }
        Value::Null => push_ext_only(ext, ty, out),
        v => out.push(Item::Node(Node::new(v, ext, ty))),
    }
}

/// The value of a primitive that has only its `_name` sibling (an id or extensions, such as
/// a data-absent-reason): the element exists, `hasValue()` is false, and operators treat it
/// as empty.
static NO_VALUE: Value = Value::Null;

/// Appends the primitives that `ext` (a `_name` sibling whose `name` is absent or null)
/// says exist without a value.
fn push_ext_only<'a>(ext: Option<&'a Value>, ty: Option<TypeId>, out: &mut Coll<'a>) {
    match ext {
        Some(Value::Array(exts)) => {
            for e in exts.iter().filter(|e| !e.is_null()) {
                out.push(Item::Node(Node::new(&NO_VALUE, Some(e), ty)));
            }
        }
        Some(e @ Value::Object(_)) => out.push(Item::Node(Node::new(&NO_VALUE, Some(e), ty))),
        _ => {}
    }
}

/// `items` without value-less primitives: operators compute on values, and FHIRPath treats
/// a primitive without one as empty there.
fn values_only(items: Coll<'_>) -> Coll<'_> {
    if items.iter().any(Item::is_valueless) {
        items
            .into_iter()
            .filter(|item| !item.is_valueless())
            .collect()
    } else {
        items
    }
}

/// The model type a choice suffix (`Quantity`, `String`, `DateTime`) names.
pub(crate) fn suffix_type(candidates: Option<&[TypeId]>, suffix: &str) -> Option<TypeId> {
    let m = model();
    if let Some(types) = candidates {
        return types.iter().copied().find(|t| {
            let n = m.name(*t);
            let mut a = n.chars();
            let mut b = suffix.chars();
            matches!((a.next(), b.next()), (Some(x), Some(y)) if x.eq_ignore_ascii_case(&y))
                && a.as_str() == b.as_str()
        });
    }
    let mut lower = suffix.to_string();
    if let Some(first) = lower.get_mut(0..1) {
        first.make_ascii_lowercase();
    }
    m.type_id(&lower).or_else(|| m.type_id(suffix))
}

/// The `_name` key of a primitive's extension sibling, built without allocating for the
/// usual short names.
fn ext_key<'o>(obj: &'o serde_json::Map<String, Value>, name: &str) -> Option<&'o Value> {
    let mut buf = [0u8; 64];
    let len = name.len() + 1;
    if len > buf.len() {
        return crate::item::member(obj, &format!("_{name}"));
    }
    buf[0] = b'_';
    buf[1..len].copy_from_slice(name.as_bytes());
    std::str::from_utf8(&buf[..len])
        .ok()
        .and_then(|k| crate::item::member(obj, k))
}

/// The `_name` sibling of element `name` when its value is a primitive (or a list of them):
/// only primitives have one, and most values are objects, so the look-up is skipped for them.
fn primitive_ext<'o>(
    obj: &'o serde_json::Map<String, Value>,
    name: &str,
    value: &Value,
) -> Option<&'o Value> {
    let primitive = match value {
        Value::Object(_) => false,
        Value::Array(items) => items.iter().any(|item| !item.is_object()),
        _ => true,
    };
    if primitive { ext_key(obj, name) } else { None }
}

/// Appends the children called `name` of `item`.
pub(crate) fn navigate<'a>(item: &Item<'a>, name: &str, out: &mut Coll<'a>) {
    let Item::Node(node) = item else { return };
    if node.stub {
        return;
    }
    let obj = match node.value {
        Value::Object(o) => o,
        _ => match node.ext {
            Some(Value::Object(o)) => o,
            _ => return,
        },
    };
    let m = model();
    let def = node.ty.and_then(|t| m.child(t, name));
    match def {
        Some(def) if def.choice => {
            for (key, value) in obj {
                if let Some(suffix) = key.strip_prefix(name)
                    && first_upper(suffix)
                    && let Some(t) = suffix_type(Some(&def.types), suffix)
                {
                    push_values(value, primitive_ext(obj, key, value), Some(t), out);
                } else if let Some(choice) = key.strip_prefix('_')
                    && let Some(suffix) = choice.strip_prefix(name)
                    && first_upper(suffix)
                    && !obj.contains_key(choice)
                    && let Some(t) = suffix_type(Some(&def.types), suffix)
                {
                    push_ext_only(Some(value), Some(t), out);
                }
            }
        }
        Some(def) => {
            let ty = def.types.first().copied();
            match crate::item::member(obj, name) {
                Some(value) => push_values(value, primitive_ext(obj, name, value), ty, out),
                // Only primitives have a `_name` sibling, so only their look-up can find one.
                None if ty.is_some_and(|t| m.is_primitive(t)) => {
                    push_ext_only(ext_key(obj, name), ty, out);
                }
                None => {}
            }
        }
        None => {
            if let Some(value) = crate::item::member(obj, name) {
                let ty = match name {
                    "extension" | "modifierExtension" => m.type_id("Extension"),
                    _ => None,
                };
                push_values(value, primitive_ext(obj, name, value), ty, out);
                return;
            }
            // Unknown element: treat `nameXxx` as a choice element of type Xxx.
            for (key, value) in obj {
                if let Some(suffix) = key.strip_prefix(name)
                    && first_upper(suffix)
                    && let Some(t) = suffix_type(None, suffix)
                {
                    push_values(value, primitive_ext(obj, key, value), Some(t), out);
                }
            }
        }
    }
}

/// The FHIR primitive types a System type name stands for in lenient casts.
fn fhir_primitives_for_system(name: &str) -> Option<&'static [&'static str]> {
    Some(match name {
        "Boolean" => &["boolean"],
        "Integer" => &["integer", "positiveInt", "unsignedInt"],
        "Decimal" => &["decimal"],
        "String" => &[
            "string",
            "code",
            "id",
            "markdown",
            "uri",
            "url",
            "canonical",
            "oid",
            "uuid",
        ],
        "Date" => &["date"],
        "DateTime" => &["dateTime", "instant"],
        "Time" => &["time"],
        _ => return None,
    })
}

/// Namespace and name of an item's type, for `type()`.
fn type_info(item: &Item<'_>) -> Option<(&'static str, &'static str)> {
    Some(match item {
        Item::Node(n) => ("FHIR", n.fhir_type()?),
        Item::Boolean(_) => ("System", "Boolean"),
        Item::Integer(_) => ("System", "Integer"),
        Item::Decimal(_) => ("System", "Decimal"),
        Item::String(_) => ("System", "String"),
        Item::Date(_) => ("System", "Date"),
        Item::DateTime(_) => ("System", "DateTime"),
        Item::Time(_) => ("System", "Time"),
        Item::Quantity(_) => ("System", "Quantity"),
    })
}

/// System type names usable in type specifiers.
pub(crate) const SYSTEM_TYPES: [&str; 8] = [
    "Boolean", "Integer", "Decimal", "String", "Date", "DateTime", "Time", "Quantity",
];

/// Whether `item` is of the type named by a specifier (`Patient`, `FHIR.string`,
/// `System.Integer`, `Integer`).
///
/// `is` accepts subtypes (a `code` is a `string`); `as` / `ofType` (`exact`) accept subtypes
/// only for complex types and resources (an `Age` is a `Quantity`, a `code` is no `string`).
pub(crate) fn type_matches(item: &Item<'_>, spec: &str, exact: bool) -> bool {
    let (ns, name) = match spec.split_once('.') {
        Some((ns, n)) => (Some(ns), n),
        None => (None, spec),
    };
    match item {
        Item::Node(node) => {
            if ns == Some("System") {
                return false;
            }
            let m = model();
            if exact
                && ns.is_none()
                && let Some(fhir) = fhir_primitives_for_system(name)
            {
                // R4 search parameters cast FHIR values with System names (`value.as(DateTime)`);
                // `as` / `ofType` accept that, `is` keeps the strict FHIRPath meaning.
                return node.ty.is_some_and(|t| fhir.contains(&m.name(t)));
            }
            // Primitive types match exactly (a `code` is not a `string` here); complex types and
            // resources also match their base types (`Age` is a `Quantity`).
            node.ty.is_some_and(|t| {
                if exact && name.starts_with(|c: char| c.is_ascii_lowercase()) {
                    m.name(t) == name
                } else {
                    m.is_a(t, name)
                }
            })
        }
        _ => {
            if ns == Some("FHIR") || !SYSTEM_TYPES.contains(&name) {
                return false;
            }
            let actual = match item {
                Item::Boolean(_) => "Boolean",
                Item::Integer(_) => "Integer",
                Item::Decimal(_) => "Decimal",
                Item::String(_) => "String",
                Item::Date(_) => "Date",
                Item::DateTime(_) => "DateTime",
                Item::Time(_) => "Time",
                Item::Quantity(_) => "Quantity",
                Item::Node(_) => "",
            };
            actual == name
        }
    }
}

fn boolean<'a>(b: Option<bool>) -> Coll<'a> {
    b.map(Item::Boolean).into_iter().collect()
}

fn binary<'a>(
    ctx: &Ctx<'a>,
    op: BinOp,
    lhs: &Ast,
    rhs: &Ast,
    focus: &[Item<'a>],
    scope: &Scope<'_, 'a>,
) -> Result<Coll<'a>, Error> {
    let a = eval(ctx, lhs, focus, scope)?;
    // Short-circuit the logical operators where the left side decides.
    match op {
        BinOp::And if singleton_bool(&a)? == Some(false) => return Ok(boolean(Some(false))),
        BinOp::Or if singleton_bool(&a)? == Some(true) => return Ok(boolean(Some(true))),
        BinOp::Implies if singleton_bool(&a)? == Some(false) => {
            return Ok(boolean(Some(true)));
        }
        _ => {}
    }
    let b = eval(ctx, rhs, focus, scope)?;
    let (a, b) = match op {
        BinOp::Union => (a, b),
        _ => (values_only(a), values_only(b)),
    };
    match op {
        BinOp::Union => {
            let mut out = Vec::with_capacity(a.len() + b.len());
            push_distinct(&mut out, a);
            push_distinct(&mut out, b);
            Ok(out)
        }
        BinOp::Eq => Ok(boolean(coll_eq(&a, &b))),
        BinOp::Ne => Ok(boolean(coll_eq(&a, &b).map(|v| !v))),
        BinOp::Equiv => Ok(boolean(Some(coll_equiv(&a, &b)))),
        BinOp::NotEquiv => Ok(boolean(Some(!coll_equiv(&a, &b)))),
        BinOp::Lt | BinOp::Gt | BinOp::Le | BinOp::Ge => {
            let (x, y) = match (a.as_slice(), b.as_slice()) {
                ([], _) | (_, []) => return Ok(Vec::new()),
                ([x], [y]) => (x, y),
                _ => return err("comparison of collections with more than one item"),
            };
            let Some(ord) = item_cmp(x, y)? else {
                return Ok(Vec::new());
            };
            let r = match op {
                BinOp::Lt => ord == Ordering::Less,
                BinOp::Gt => ord == Ordering::Greater,
                BinOp::Le => ord != Ordering::Greater,
                _ => ord != Ordering::Less,
            };
            Ok(boolean(Some(r)))
        }
        BinOp::In | BinOp::Contains => {
            let (needle, hay) = if op == BinOp::In { (&a, &b) } else { (&b, &a) };
            match needle.as_slice() {
                [] => Ok(Vec::new()),
                [x] => Ok(boolean(Some(contains_item(hay, x)))),
                _ => err("membership test of a collection with more than one item"),
            }
        }
        BinOp::And | BinOp::Or | BinOp::Xor | BinOp::Implies => {
            let x = singleton_bool(&a)?;
            let y = singleton_bool(&b)?;
            let r = match op {
                BinOp::And => match (x, y) {
                    (Some(false), _) | (_, Some(false)) => Some(false),
                    (Some(true), Some(true)) => Some(true),
                    _ => None,
                },
                BinOp::Or => match (x, y) {
                    (Some(true), _) | (_, Some(true)) => Some(true),
                    (Some(false), Some(false)) => Some(false),
                    _ => None,
                },
                BinOp::Xor => match (x, y) {
                    (Some(p), Some(q)) => Some(p != q),
                    _ => None,
                },
                _ => match (x, y) {
                    (Some(false), _) | (_, Some(true)) => Some(true),
                    (Some(true), Some(false)) => Some(false),
                    _ => None,
                },
            };
            Ok(boolean(r))
        }
        BinOp::Concat => {
            let x = singleton_string_lenient(&a)?;
            let y = singleton_string_lenient(&b)?;
            Ok(vec![Item::String(format!("{x}{y}"))])
        }
        BinOp::Add | BinOp::Sub | BinOp::Mul | BinOp::Div | BinOp::IntDiv | BinOp::Mod => {
            let (x, y) = match (a.as_slice(), b.as_slice()) {
                ([], _) | (_, []) => return Ok(Vec::new()),
                ([x], [y]) => (x, y),
                _ => return err("arithmetic on collections with more than one item"),
            };
            arithmetic(op, prim(x), prim(y))
        }
    }
}

fn singleton_string_lenient(items: &[Item<'_>]) -> Result<String, Error> {
    match items {
        [] => Ok(String::new()),
        [item] => match prim(item) {
            Prim::Str(s) => Ok(s.to_string()),
            _ => Ok(item.to_string()),
        },
        _ => err("string concatenation of a collection with more than one item"),
    }
}
