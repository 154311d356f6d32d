//! The FHIRPath function library.

use std::slice;

use serde_json::Value;

use crate::Error;
use crate::decimal::Decimal;
use crate::eval::{Coll, Ctx, Scope, err, eval, navigate, type_matches};
use crate::item::{Item, Node, Quantity};
use crate::model::model;
use crate::parser::Ast;
use crate::temporal::Temporal;
use crate::values::{
    Prim, contains_item, prim, push_distinct, singleton_bool, singleton_integer, singleton_string,
};

/// Functions: name, minimum and maximum argument count.
const FUNCTIONS: &[(&str, usize, usize)] = &[
    ("empty", 0, 0),
    ("exists", 0, 1),
    ("all", 1, 1),
    ("allTrue", 0, 0),
    ("anyTrue", 0, 0),
    ("allFalse", 0, 0),
    ("anyFalse", 0, 0),
    ("subsetOf", 1, 1),
    ("supersetOf", 1, 1),
    ("count", 0, 0),
    ("distinct", 0, 0),
    ("isDistinct", 0, 0),
    ("where", 1, 1),
    ("select", 1, 1),
    ("repeat", 1, 1),
    ("ofType", 1, 1),
    ("as", 1, 1),
    ("is", 1, 1),
    ("first", 0, 0),
    ("last", 0, 0),
    ("tail", 0, 0),
    ("skip", 1, 1),
    ("take", 1, 1),
    ("single", 0, 0),
    ("intersect", 1, 1),
    ("exclude", 1, 1),
    ("union", 1, 1),
    ("combine", 1, 1),
    ("iif", 2, 3),
    ("toBoolean", 0, 0),
    ("convertsToBoolean", 0, 0),
    ("toInteger", 0, 0),
    ("convertsToInteger", 0, 0),
    ("toDecimal", 0, 0),
    ("convertsToDecimal", 0, 0),
    ("toString", 0, 0),
    ("convertsToString", 0, 0),
    ("toQuantity", 0, 1),
    ("convertsToQuantity", 0, 1),
    ("toDate", 0, 0),
    ("convertsToDate", 0, 0),
    ("toDateTime", 0, 0),
    ("convertsToDateTime", 0, 0),
    ("toTime", 0, 0),
    ("convertsToTime", 0, 0),
    ("indexOf", 1, 1),
    ("substring", 1, 2),
    ("startsWith", 1, 1),
    ("endsWith", 1, 1),
    ("contains", 1, 1),
    ("upper", 0, 0),
    ("lower", 0, 0),
    ("replace", 2, 2),
    ("matches", 1, 1),
    ("matchesFull", 1, 1),
    ("sort", 0, 8),
    ("encode", 1, 1),
    ("decode", 1, 1),
    ("escape", 1, 1),
    ("unescape", 1, 1),
    ("replaceMatches", 2, 2),
    ("length", 0, 0),
    ("toChars", 0, 0),
    ("trim", 0, 0),
    ("split", 1, 1),
    ("join", 0, 1),
    ("abs", 0, 0),
    ("ceiling", 0, 0),
    ("exp", 0, 0),
    ("floor", 0, 0),
    ("ln", 0, 0),
    ("log", 1, 1),
    ("power", 1, 1),
    ("round", 0, 1),
    ("sqrt", 0, 0),
    ("truncate", 0, 0),
    ("children", 0, 0),
    ("descendants", 0, 0),
    ("trace", 1, 2),
    ("now", 0, 0),
    ("today", 0, 0),
    ("timeOfDay", 0, 0),
    ("not", 0, 0),
    ("extension", 1, 1),
    ("resolve", 0, 0),
    ("hasValue", 0, 0),
    ("getValue", 0, 0),
    ("aggregate", 1, 2),
    ("htmlChecks", 0, 0),
    ("memberOf", 1, 1),
    ("precision", 0, 0),
    ("type", 0, 0),
    ("comparable", 1, 1),
    ("lowBoundary", 0, 1),
    ("highBoundary", 0, 1),
    ("conformsTo", 1, 1),
];

/// Largest collection `descendants()` builds before giving up.
const MAX_GENERATED: usize = 1_000_000;
/// Largest collection `repeat()` builds (its duplicate check is quadratic).
const MAX_REPEAT: usize = 5_000;

/// Rejects unknown functions and wrong argument counts at parse time.
pub(crate) fn check_arity(name: &str, args: usize) -> Result<(), Error> {
    match FUNCTIONS.iter().find(|f| f.0 == name) {
        Some((_, min, max)) if (*min..=*max).contains(&args) => Ok(()),
        Some(_) => Err(Error::Parse {
            position: 0,
            message: format!("wrong number of arguments for {name}()"),
        }),
        None => Err(Error::Parse {
            position: 0,
            message: format!("unknown function {name}()"),
        }),
    }
}

fn one<'a>(item: Item<'a>) -> Result<Coll<'a>, Error> {
    Ok(vec![item])
}

fn boolean<'a>(b: bool) -> Result<Coll<'a>, Error> {
    Ok(vec![Item::Boolean(b)])
}

/// The type name a type-specifier argument spells (`Patient`, `FHIR.Patient`).
pub(crate) fn type_name(ast: &Ast) -> Option<String> {
    match ast {
        Ast::Ident(n) => Some(n.clone()),
        Ast::Member(base, n) => Some(format!("{}.{n}", type_name(base)?)),
        _ => None,
    }
}

/// Argument `i` (present whenever the parse-time arity check passed).
fn arg_ast(args: &[Ast], i: usize) -> Result<&Ast, Error> {
    args.get(i)
        .map_or_else(|| err("missing function argument"), Ok)
}

fn type_arg(ast: &Ast) -> Result<String, Error> {
    type_name(ast).map_or_else(|| err("expected a type name"), Ok)
}

/// The single input item, or `None` for empty input.
fn single<'x, 'a>(input: &'x [Item<'a>], name: &str) -> Result<Option<&'x Item<'a>>, Error> {
    match input {
        [] => Ok(None),
        [item] => Ok(Some(item)),
        _ => err(format!("{name}() needs a single input item")),
    }
}

/// The single input as a string, `None` when empty; an error for other types.
fn input_string<'x>(input: &'x [Item<'_>], name: &str) -> Result<Option<&'x str>, Error> {
    match single(input, name)? {
        None => Ok(None),
        Some(item) => match prim(item) {
            Prim::Str(s) => Ok(Some(s)),
            Prim::Complex(Value::Null) => Ok(None),
            _ => err(format!("{name}() needs a String input")),
        },
    }
}

/// Calls function `name` on `input`. Functions whose arguments are evaluated per item
/// (`where`, `select`, ...) or are type names run here; the others get their arguments
/// evaluated first and run in [`call_simple`], which keeps this frame (part of the evaluation
/// recursion) small.
pub(crate) fn call<'a>(
    ctx: &Ctx<'a>,
    name: &str,
    args: &[Ast],
    input: Coll<'a>,
    scope: &Scope<'_, 'a>,
) -> Result<Coll<'a>, Error> {
    // Lambda arguments are evaluated once per input item with $this bound to it.
    let lambda = |i: usize, item: &Item<'a>, index: usize| -> Result<Coll<'a>, Error> {
        let Some(a) = args.get(i) else {
            return Ok(Vec::new());
        };
        let this = slice::from_ref(item);
        let inner = Scope {
            this,
            index: Some(index),
            total: scope.total,
        };
        eval(ctx, a, this, &inner)
    };
    // Non-lambda arguments are evaluated in the enclosing context.
    let arg = |i: usize| -> Result<Coll<'a>, Error> {
        match args.get(i) {
            Some(a) => eval(ctx, a, scope.this, scope),
            None => Ok(Vec::new()),
        }
    };
    match name {
        "exists" => {
            if args.is_empty() {
                return boolean(!input.is_empty());
            }
            for (i, item) in input.iter().enumerate() {
                if singleton_bool(&lambda(0, item, i)?)? == Some(true) {
                    return boolean(true);
                }
            }
            boolean(false)
        }
        "all" => {
            for (i, item) in input.iter().enumerate() {
                if singleton_bool(&lambda(0, item, i)?)? != Some(true) {
                    return boolean(false);
                }
            }
            boolean(true)
        }
        "where" => {
            let mut out = Vec::new();
            for (i, item) in input.iter().enumerate() {
                if singleton_bool(&lambda(0, item, i)?)? == Some(true) {
                    out.push(item.clone());
                }
            }
            Ok(out)
        }
        "select" => {
            let mut out = Vec::new();
            for (i, item) in input.iter().enumerate() {
                out.extend(lambda(0, item, i)?);
            }
            Ok(out)
        }
        "repeat" => {
            let mut out: Coll<'a> = Vec::new();
            let mut frontier = input;
            while !frontier.is_empty() {
                let mut next = Vec::new();
                for (i, item) in frontier.iter().enumerate() {
                    for r in lambda(0, item, i)? {
                        if !contains_item(&out, &r) {
                            out.push(r.clone());
                            next.push(r);
                        }
                    }
                }
                if out.len() > MAX_REPEAT {
                    return err("repeat() produced too many items");
                }
                frontier = next;
            }
            Ok(out)
        }
        "ofType" | "as" => {
            let ty = type_arg(arg_ast(args, 0)?)?;
            Ok(input
                .into_iter()
                .filter(|i| type_matches(i, &ty, true))
                .collect())
        }
        "is" => {
            let ty = type_arg(arg_ast(args, 0)?)?;
            match single(&input, name)? {
                None => Ok(Vec::new()),
                Some(item) => boolean(type_matches(item, &ty, false)),
            }
        }
        "iif" => {
            if input.len() > 1 {
                return err("iif() on a collection of more than one item");
            }
            let this: &[Item<'a>] = if input.is_empty() { scope.this } else { &input };
            let inner = Scope { this, ..*scope };
            let cond_items = eval(ctx, arg_ast(args, 0)?, this, &inner)?;
            let cond = match cond_items.as_slice() {
                [] => None,
                [c] => match prim(c) {
                    Prim::Bool(b) => Some(b),
                    _ => return err("iif() criterion must be a Boolean"),
                },
                _ => return err("iif() criterion must be a single Boolean"),
            };
            if cond == Some(true) {
                eval(ctx, arg_ast(args, 1)?, this, &inner)
            } else if let Some(a) = args.get(2) {
                eval(ctx, a, this, &inner)
            } else {
                Ok(Vec::new())
            }
        }
        "sort" => {
            let mut keyed = Vec::with_capacity(input.len());
            for (i, item) in input.into_iter().enumerate() {
                let mut keys = Vec::with_capacity(args.len());
                for a in args {
                    // A leading minus on a sort key means descending order.
                    let (expr, descending) = match a {
                        Ast::Negate(inner) => (&**inner, true),
                        other => (other, false),
                    };
                    let this = slice::from_ref(&item);
                    let inner = Scope {
                        this,
                        index: Some(i),
                        total: scope.total,
                    };
                    let key = eval(ctx, expr, this, &inner)?;
                    if key.len() > 1 {
                        return err("sort() key must be a single item");
                    }
                    keys.push((key.into_iter().next(), descending));
                }
                keyed.push((keys, item));
            }
            let mut failed = false;
            keyed.sort_by(|(ka, a), (kb, b)| {
                let pairs: Vec<(Option<&Item<'a>>, Option<&Item<'a>>, bool)> = if ka.is_empty() {
                    vec![(Some(a), Some(b), false)]
                } else {
                    ka.iter()
                        .zip(kb)
                        .map(|(x, y)| (x.0.as_ref(), y.0.as_ref(), x.1))
                        .collect()
                };
                for (x, y, desc) in pairs {
                    // Items without a key sort first in either direction.
                    let ord = match (x, y) {
                        (None, None) => std::cmp::Ordering::Equal,
                        (None, Some(_)) => return std::cmp::Ordering::Less,
                        (Some(_), None) => return std::cmp::Ordering::Greater,
                        (Some(x), Some(y)) => match crate::values::item_cmp(x, y) {
                            Ok(Some(o)) => o,
                            Ok(None) => std::cmp::Ordering::Equal,
                            Err(_) => {
                                failed = true;
                                std::cmp::Ordering::Equal
                            }
                        },
                    };
                    let ord = if desc { ord.reverse() } else { ord };
                    if ord != std::cmp::Ordering::Equal {
                        return ord;
                    }
                }
                std::cmp::Ordering::Equal
            });
            if failed {
                return err("sort() keys cannot be compared");
            }
            Ok(keyed.into_iter().map(|(_, item)| item).collect())
        }
        "aggregate" => {
            let mut total = arg(1)?;
            for (i, item) in input.iter().enumerate() {
                let this = slice::from_ref(item);
                let inner = Scope {
                    this,
                    index: Some(i),
                    total: Some(&total),
                };
                total = eval(ctx, arg_ast(args, 0)?, this, &inner)?;
            }
            Ok(total)
        }
        _ => {
            let mut values = Vec::with_capacity(args.len());
            for a in args {
                values.push(eval(ctx, a, scope.this, scope)?);
            }
            call_simple(ctx, name, &values, input)
        }
    }
}

/// The functions whose arguments are plain values.
#[inline(never)]
fn call_simple<'a>(
    ctx: &Ctx<'a>,
    name: &str,
    args: &[Coll<'a>],
    input: Coll<'a>,
) -> Result<Coll<'a>, Error> {
    let arg =
        |i: usize| -> Result<Coll<'a>, Error> { Ok(args.get(i).cloned().unwrap_or_default()) };
    match name {
        "empty" => boolean(input.is_empty()),
        "allTrue" | "anyTrue" | "allFalse" | "anyFalse" => {
            let mut bools = Vec::with_capacity(input.len());
            for item in &input {
                match prim(item) {
                    Prim::Bool(b) => bools.push(b),
                    _ => return err(format!("{name}() needs Boolean items")),
                }
            }
            boolean(match name {
                "allTrue" => bools.iter().all(|b| *b),
                "anyTrue" => bools.iter().any(|b| *b),
                "allFalse" => bools.iter().all(|b| !*b),
                _ => bools.iter().any(|b| !*b),
            })
        }
        "subsetOf" => {
            let other = arg(0)?;
            boolean(input.iter().all(|x| contains_item(&other, x)))
        }
        "supersetOf" => {
            let other = arg(0)?;
            boolean(other.iter().all(|x| contains_item(&input, x)))
        }
        "count" => one(Item::Integer(input.len() as i64)),
        "distinct" => {
            let mut out = Vec::new();
            push_distinct(&mut out, input);
            Ok(out)
        }
        "isDistinct" => {
            let n = input.len();
            let mut out = Vec::new();
            push_distinct(&mut out, input);
            boolean(out.len() == n)
        }
        "first" => Ok(input.into_iter().take(1).collect()),
        "last" => Ok(input.into_iter().last().into_iter().collect()),
        "tail" => Ok(input.into_iter().skip(1).collect()),
        "skip" | "take" => {
            let n = singleton_integer(&arg(0)?)?.unwrap_or(0).max(0) as usize;
            if name == "skip" {
                Ok(input.into_iter().skip(n).collect())
            } else {
                Ok(input.into_iter().take(n).collect())
            }
        }
        "single" => match input.len() {
            0 | 1 => Ok(input),
            _ => err("single() on a collection of more than one item"),
        },
        "intersect" => {
            let other = arg(0)?;
            let mut out = Vec::new();
            push_distinct(
                &mut out,
                input.into_iter().filter(|x| contains_item(&other, x)),
            );
            Ok(out)
        }
        "exclude" => {
            let other = arg(0)?;
            Ok(input
                .into_iter()
                .filter(|x| !contains_item(&other, x))
                .collect())
        }
        "union" => {
            let other = arg(0)?;
            let mut out = Vec::new();
            push_distinct(&mut out, input);
            push_distinct(&mut out, other);
            Ok(out)
        }
        "combine" => {
            let mut out = input;
            out.extend(arg(0)?);
            Ok(out)
        }
        "toBoolean" | "toInteger" | "toDecimal" | "toString" | "toQuantity" | "toDate"
        | "toDateTime" | "toTime" => {
            let Some(item) = single(&input, name)? else {
                return Ok(Vec::new());
            };
            Ok(convert(
                name,
                item,
                args.first().map(|_| arg(0)).transpose()?.as_deref(),
            )
            .into_iter()
            .collect())
        }
        "convertsToBoolean" | "convertsToInteger" | "convertsToDecimal" | "convertsToString"
        | "convertsToQuantity" | "convertsToDate" | "convertsToDateTime" | "convertsToTime" => {
            let Some(item) = single(&input, name)? else {
                return Ok(Vec::new());
            };
            let target = format!("to{}", &name["convertsTo".len()..]);
            let unit = args.first().map(|_| arg(0)).transpose()?;
            boolean(convert(&target, item, unit.as_deref()).is_some())
        }
        "indexOf" | "startsWith" | "endsWith" | "contains" => {
            let Some(s) = input_string(&input, name)? else {
                return Ok(Vec::new());
            };
            let a = arg(0)?;
            let Some(sub) = singleton_string(&a)? else {
                return Ok(Vec::new());
            };
            match name {
                "indexOf" => {
                    let idx = s.find(sub).map_or(-1, |b| s[..b].chars().count() as i64);
                    one(Item::Integer(idx))
                }
                "startsWith" => boolean(s.starts_with(sub)),
                "endsWith" => boolean(s.ends_with(sub)),
                _ => boolean(s.contains(sub)),
            }
        }
        "substring" => {
            let Some(s) = input_string(&input, name)? else {
                return Ok(Vec::new());
            };
            let Some(start) = singleton_integer(&arg(0)?)? else {
                return Ok(Vec::new());
            };
            let chars: Vec<char> = s.chars().collect();
            if start < 0 || start as usize >= chars.len() {
                return Ok(Vec::new());
            }
            let len = match args.get(1) {
                Some(_) => match singleton_integer(&arg(1)?)? {
                    Some(l) => l.max(0) as usize,
                    None => chars.len(),
                },
                None => chars.len(),
            };
            let out: String = chars[start as usize..].iter().take(len).collect();
            one(Item::String(out))
        }
        "upper" | "lower" | "trim" | "length" | "toChars" => {
            let Some(s) = input_string(&input, name)? else {
                return Ok(Vec::new());
            };
            match name {
                "upper" => one(Item::String(s.to_uppercase())),
                "lower" => one(Item::String(s.to_lowercase())),
                "trim" => one(Item::String(s.trim().to_string())),
                "length" => one(Item::Integer(s.chars().count() as i64)),
                _ => Ok(s.chars().map(|c| Item::String(c.to_string())).collect()),
            }
        }
        "replace" | "replaceMatches" => {
            let Some(s) = input_string(&input, name)? else {
                return Ok(Vec::new());
            };
            let (a, b) = (arg(0)?, arg(1)?);
            let (Some(pattern), Some(with)) = (singleton_string(&a)?, singleton_string(&b)?) else {
                return Ok(Vec::new());
            };
            if name == "replace" {
                return one(Item::String(s.replace(pattern, with)));
            }
            if pattern.is_empty() {
                return one(Item::String(s.to_string()));
            }
            let re = regex(pattern, false)?;
            one(Item::String(re.replace_all(s, with).into_owned()))
        }
        "matches" | "matchesFull" => {
            let Some(s) = input_string(&input, name)? else {
                return Ok(Vec::new());
            };
            let a = arg(0)?;
            let Some(pattern) = singleton_string(&a)? else {
                return Ok(Vec::new());
            };
            boolean(regex(pattern, name == "matchesFull")?.is_match(s))
        }
        "encode" | "decode" | "escape" | "unescape" => {
            let Some(s) = input_string(&input, name)? else {
                return Ok(Vec::new());
            };
            let a = arg(0)?;
            let Some(format) = singleton_string(&a)? else {
                return Ok(Vec::new());
            };
            Ok(crate::codec::apply(name, format, s)
                .map(Item::String)
                .into_iter()
                .collect())
        }
        "split" => {
            let Some(s) = input_string(&input, name)? else {
                return Ok(Vec::new());
            };
            let a = arg(0)?;
            let Some(sep) = singleton_string(&a)? else {
                return Ok(Vec::new());
            };
            Ok(s.split(sep).map(|p| Item::String(p.to_string())).collect())
        }
        "join" => {
            let a = arg(0)?;
            let sep = singleton_string(&a)?.unwrap_or("");
            let mut parts = Vec::with_capacity(input.len());
            for item in &input {
                match prim(item) {
                    Prim::Str(s) => parts.push(s.to_string()),
                    _ => return err("join() needs String items"),
                }
            }
            one(Item::String(parts.join(sep)))
        }
        "abs" | "ceiling" | "exp" | "floor" | "ln" | "log" | "power" | "round" | "sqrt"
        | "truncate" => math(name, &input, &|i| arg(i)),
        "children" => {
            let mut out = Vec::new();
            for item in &input {
                children_of(item, &mut out);
            }
            Ok(out)
        }
        "descendants" => {
            let mut out = Vec::new();
            let mut frontier = input;
            while !frontier.is_empty() {
                let mut next = Vec::new();
                for item in &frontier {
                    children_of(item, &mut next);
                }
                out.extend(next.iter().cloned());
                if out.len() > MAX_GENERATED {
                    return err("descendants() produced too many items");
                }
                frontier = next;
            }
            Ok(out)
        }
        "trace" => Ok(input),
        "now" | "today" | "timeOfDay" => {
            let millis = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64);
            let now = Temporal::from_unix_millis(millis);
            match name {
                "now" => one(Item::DateTime(now)),
                "today" => one(Item::Date(now.to_date())),
                _ => one(Item::Time(now.to_time())),
            }
        }
        "not" => match singleton_bool(&input)? {
            Some(b) => boolean(!b),
            None => Ok(Vec::new()),
        },
        "extension" => {
            let a = arg(0)?;
            let Some(url) = singleton_string(&a)? else {
                return Ok(Vec::new());
            };
            let mut exts = Vec::new();
            for item in &input {
                navigate(item, "extension", &mut exts);
            }
            Ok(exts
                .into_iter()
                .filter(|e| {
                    e.json().and_then(|v| v.get("url")).and_then(Value::as_str) == Some(url)
                })
                .collect())
        }
        "resolve" => Ok(input.iter().filter_map(|i| resolve(ctx, i)).collect()),
        "hasValue" => boolean(matches!(input.as_slice(), [Item::Node(n)]
            if !n.stub && !matches!(n.value, Value::Object(_) | Value::Array(_) | Value::Null))),
        "getValue" => Ok(match input.as_slice() {
            [item @ Item::Node(n)] if !matches!(n.value, Value::Object(_) | Value::Array(_)) => {
                vec![item.clone()]
            }
            _ => Vec::new(),
        }),
        "htmlChecks" => match input_string(&input, name)? {
            Some(text) => boolean(crate::xhtml::html_checks(text)),
            None => Ok(Vec::new()),
        },
        "conformsTo" => {
            let a = arg(0)?;
            let (Some(item), Some(url)) = (single(&input, name)?, singleton_string(&a)?) else {
                return Ok(Vec::new());
            };
            // Only the core type profiles can be checked without a validator.
            match url.strip_prefix("http://hl7.org/fhir/StructureDefinition/") {
                Some(ty) if model().type_id(ty).is_some() => boolean(type_matches(item, ty, false)),
                _ => err("conformsTo() supports only core type profiles"),
            }
        }
        "type" => err("type() is supported only as type().name or type().namespace"),
        "comparable" => {
            let other = arg(0)?;
            match (single(&input, name)?, other.as_slice()) {
                (None, _) | (_, []) => Ok(Vec::new()),
                (Some(a), [b]) => match (prim(a), prim(b)) {
                    (Prim::Qty(_, u), Prim::Qty(_, t)) => {
                        boolean(crate::values::units_comparable(u, t))
                    }
                    _ => err("comparable() needs quantities"),
                },
                _ => err("comparable() needs a single quantity argument"),
            }
        }
        "precision" => Ok(single(&input, name)?
            .and_then(precision_of)
            .map(Item::Integer)
            .into_iter()
            .collect()),
        "lowBoundary" | "highBoundary" => {
            let Some(item) = single(&input, name)? else {
                return Ok(Vec::new());
            };
            let places = if args.is_empty() {
                None
            } else {
                match singleton_integer(&arg(0)?)? {
                    Some(p) => Some(p),
                    None => return Ok(Vec::new()),
                }
            };
            Ok(boundary(item, places, name == "highBoundary")
                .into_iter()
                .collect())
        }
        _ => err(format!("function {name}() is not supported")),
    }
}

fn regex(pattern: &str, full: bool) -> Result<regex::Regex, Error> {
    let pattern = if full {
        format!("^(?:{pattern})$")
    } else {
        pattern.to_string()
    };
    regex::RegexBuilder::new(&pattern)
        .dot_matches_new_line(true)
        .size_limit(1 << 20)
        .build()
        .or_else(|_| err("invalid regular expression"))
}

/// Appends the child nodes of `item`, typed through the model where possible.
fn children_of<'a>(item: &Item<'a>, out: &mut Coll<'a>) {
    let Item::Node(node) = item else { return };
    let Value::Object(obj) = node.value else {
        return;
    };
    let m = model();
    for key in obj.keys() {
        if key.starts_with('_') || key == "resourceType" {
            continue;
        }
        let known = node.ty.and_then(|t| m.child(t, key)).is_some();
        if known {
            navigate(item, key, out);
            continue;
        }
        // A choice element: find the defined prefix (`valueQuantity` -> `value`).
        let prefix = key
            .char_indices()
            .filter(|(_, c)| c.is_ascii_uppercase())
            .map(|(i, _)| &key[..i])
            .find(|p| {
                node.ty
                    .and_then(|t| m.child(t, p))
                    .is_some_and(|c| c.choice)
            });
        match prefix {
            Some(p) => {
                let mut all = Vec::new();
                navigate(item, p, &mut all);
                // Keep only the nodes for this key (a choice has one key, but be exact).
                if let Some(v) = obj.get(key) {
                    all.retain(|i| i.json().is_some_and(|j| is_within(v, j)));
                }
                out.extend(all);
            }
            None => navigate(item, key, out),
        }
    }
}

fn is_within(container: &Value, node: &Value) -> bool {
    match container {
        Value::Array(items) => items.iter().any(|i| std::ptr::eq(i, node)),
        v => std::ptr::eq(v, node),
    }
}

/// `resolve()`: contained references yield the contained resource; other references yield a
/// stand-in carrying only the referenced resource type.
fn resolve<'a>(ctx: &Ctx<'a>, item: &Item<'a>) -> Option<Item<'a>> {
    let (reference, anchor) = match item {
        Item::Node(n) if !n.stub => match n.value {
            Value::Object(o) => (crate::item::member(o, "reference")?.as_str()?, n.value),
            Value::String(s) => (s.as_str(), n.value),
            _ => return None,
        },
        _ => return None,
    };
    let m = model();
    if let Some(id) = reference.strip_prefix('#') {
        let root = ctx.root.json()?;
        if id.is_empty() {
            return Some(ctx.root.clone());
        }
        let contained = root.get("contained")?.as_array()?;
        let found = contained
            .iter()
            .find(|r| r.get("id").and_then(Value::as_str) == Some(id))?;
        return Some(Item::Node(Node::new(found, None, None)));
    }
    // Every `subject.where(resolve() is Patient)` of every resource resolves: no allocation.
    let path_end = reference
        .bytes()
        .position(|b| b == b'?' || b == b'#')
        .unwrap_or(reference.len());
    // The type is the segment before the id, skipping a trailing `_history/<vid>`.
    let mut segments = reference[..path_end].rsplit('/');
    let (rtype, id) = match (
        segments.next(),
        segments.next(),
        segments.next(),
        segments.next(),
    ) {
        (Some(_), Some("_history"), Some(id), Some(rtype)) => (rtype, id),
        (Some(id), Some(rtype), _, _) => (rtype, id),
        _ => return None,
    };
    if id.is_empty() {
        return None;
    }
    let ty = m.type_id(rtype).filter(|&t| m.is_resource_like(t))?;
    Some(Item::Node(Node {
        value: anchor,
        ext: None,
        ty: Some(ty),
        stub: true,
    }))
}

fn parse_bool_text(s: &str) -> Option<bool> {
    match s.to_ascii_lowercase().as_str() {
        "true" | "t" | "yes" | "y" | "1" | "1.0" => Some(true),
        "false" | "f" | "no" | "n" | "0" | "0.0" => Some(false),
        _ => None,
    }
}

fn is_integer_text(s: &str) -> bool {
    let d = s.strip_prefix(['+', '-']).unwrap_or(s);
    !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit())
}

fn is_decimal_text(s: &str) -> bool {
    let d = s.strip_prefix(['+', '-']).unwrap_or(s);
    match d.split_once('.') {
        Some((a, b)) => {
            is_integer_text(a) && !b.is_empty() && b.bytes().all(|c| c.is_ascii_digit())
        }
        None => is_integer_text(d),
    }
}

fn quantity_from_text(s: &str) -> Option<Quantity> {
    let s = s.trim();
    let (num, unit) = match s.find([' ', '\'']) {
        Some(i) => (&s[..i], s[i..].trim()),
        None => (s, ""),
    };
    if !is_decimal_text(num) {
        return None;
    }
    let value = Decimal::parse(num)?;
    let unit = if unit.is_empty() {
        "1".to_string()
    } else if let Some(u) = unit.strip_prefix('\'').and_then(|u| u.strip_suffix('\'')) {
        u.to_string()
    } else {
        crate::values::calendar_unit(unit)?.to_string()
    };
    Some(Quantity { value, unit })
}

/// The `toX()` conversions; `None` when the item does not convert.
fn convert<'a>(name: &str, item: &Item<'a>, unit: Option<&[Item<'a>]>) -> Option<Item<'a>> {
    let p = prim(item);
    match name {
        "toBoolean" => match p {
            Prim::Bool(b) => Some(Item::Boolean(b)),
            Prim::Int(1) => Some(Item::Boolean(true)),
            Prim::Int(0) => Some(Item::Boolean(false)),
            Prim::Dec(d) if d.cmp_value(&Decimal::from_i64(1)).is_eq() => Some(Item::Boolean(true)),
            Prim::Dec(d) if d.is_zero() => Some(Item::Boolean(false)),
            Prim::Str(s) => parse_bool_text(s).map(Item::Boolean),
            _ => None,
        },
        "toInteger" => match p {
            Prim::Int(i) => Some(Item::Integer(i)),
            Prim::Bool(b) => Some(Item::Integer(i64::from(b))),
            Prim::Str(s) if is_integer_text(s) => s.parse().ok().map(Item::Integer),
            _ => None,
        },
        "toDecimal" => match p {
            Prim::Int(i) => Some(Item::Decimal(Decimal::from_i64(i))),
            Prim::Dec(d) => Some(Item::Decimal(d)),
            Prim::Bool(b) => Some(Item::Decimal(Decimal::from_i64(i64::from(b)))),
            Prim::Str(s) if is_decimal_text(s) => Decimal::parse(s).map(Item::Decimal),
            _ => None,
        },
        "toString" => {
            let s = match p {
                Prim::Str(s) => s.to_string(),
                Prim::Bool(b) => b.to_string(),
                Prim::Int(i) => i.to_string(),
                Prim::Dec(d) => d.to_string(),
                Prim::Date(t) | Prim::DateTime(t) | Prim::Time(t) => t.to_string(),
                Prim::Qty(v, u) if crate::values::calendar_unit(u).is_some() => {
                    format!("{v} {u}")
                }
                Prim::Qty(v, u) => format!("{v} '{u}'"),
                Prim::Complex(_) => return None,
            };
            Some(Item::String(s))
        }
        "toQuantity" => {
            let q = match p {
                Prim::Int(i) => Quantity {
                    value: Decimal::from_i64(i),
                    unit: "1".into(),
                },
                Prim::Dec(d) => Quantity {
                    value: d,
                    unit: "1".into(),
                },
                Prim::Qty(v, u) => Quantity {
                    value: v,
                    unit: u.to_string(),
                },
                Prim::Str(s) => quantity_from_text(s)?,
                Prim::Bool(b) => Quantity {
                    value: Decimal::from_i64(i64::from(b)),
                    unit: "1".into(),
                },
                _ => return None,
            };
            if let Some(target) = unit {
                let target = match target {
                    [i] => match prim(i) {
                        Prim::Str(s) => s.to_string(),
                        _ => return None,
                    },
                    _ => return None,
                };
                if target != q.unit {
                    return None;
                }
            }
            Some(Item::Quantity(q))
        }
        "toDate" => match p {
            Prim::Date(t) => Some(Item::Date(t)),
            Prim::DateTime(t) => Some(Item::Date(t.to_date())),
            Prim::Str(s) => Temporal::parse_date(s)
                .or_else(|| Temporal::parse_datetime(s).map(Temporal::to_date))
                .map(Item::Date),
            _ => None,
        },
        "toDateTime" => match p {
            Prim::DateTime(t) => Some(Item::DateTime(t)),
            Prim::Date(t) => Some(Item::DateTime(t.as_datetime())),
            Prim::Str(s) => Temporal::parse_datetime(s).map(Item::DateTime),
            _ => None,
        },
        "toTime" => match p {
            Prim::Time(t) => Some(Item::Time(t)),
            Prim::Str(s) => Temporal::parse_time(s.strip_prefix('T').unwrap_or(s)).map(Item::Time),
            _ => None,
        },
        _ => None,
    }
}

fn math<'a>(
    name: &str,
    input: &[Item<'a>],
    arg: &dyn Fn(usize) -> Result<Coll<'a>, Error>,
) -> Result<Coll<'a>, Error> {
    let Some(item) = single(input, name)? else {
        return Ok(Vec::new());
    };
    let p = prim(item);
    let x = match p {
        Prim::Int(i) => Decimal::from_i64(i),
        Prim::Dec(d) => d,
        Prim::Qty(v, u) if name == "abs" => {
            return Ok(v
                .abs()
                .map(|value| {
                    Item::Quantity(Quantity {
                        value,
                        unit: u.to_string(),
                    })
                })
                .into_iter()
                .collect());
        }
        _ => return err(format!("{name}() needs a number")),
    };
    let float = |v: f64| -> Result<Coll<'a>, Error> {
        Ok(Decimal::from_f64(v)
            .map(Item::Decimal)
            .into_iter()
            .collect())
    };
    let integer = |mode| -> Result<Coll<'a>, Error> {
        Ok(x.to_integer(mode).map(Item::Integer).into_iter().collect())
    };
    let f = x.to_f64();
    match name {
        "abs" => match p {
            Prim::Int(i) => Ok(i.checked_abs().map(Item::Integer).into_iter().collect()),
            _ => Ok(x.abs().map(Item::Decimal).into_iter().collect()),
        },
        "ceiling" => integer(std::cmp::Ordering::Greater),
        "floor" => integer(std::cmp::Ordering::Less),
        "truncate" => integer(std::cmp::Ordering::Equal),
        "exp" => float(f.exp()),
        "ln" => float(f.ln()),
        "sqrt" => float(f.sqrt()),
        "log" => {
            let base = arg(0)?;
            match base.as_slice() {
                [] => Ok(Vec::new()),
                [b] => match prim(b) {
                    Prim::Int(i) => float(f.ln() / (i as f64).ln()),
                    Prim::Dec(d) => float(f.ln() / d.to_f64().ln()),
                    _ => err("log() needs a numeric base"),
                },
                _ => err("log() needs a single base"),
            }
        }
        "power" => {
            let e = arg(0)?;
            match e.as_slice() {
                [] => Ok(Vec::new()),
                [b] => match (p, prim(b)) {
                    (Prim::Int(i), Prim::Int(j)) if j >= 0 => Ok(u32::try_from(j)
                        .ok()
                        .and_then(|j| i.checked_pow(j))
                        .map(Item::Integer)
                        .into_iter()
                        .collect()),
                    (_, Prim::Int(j)) => float(f.powf(j as f64)),
                    (_, Prim::Dec(d)) => float(f.powf(d.to_f64())),
                    _ => err("power() needs a numeric exponent"),
                },
                _ => err("power() needs a single exponent"),
            }
        }
        _ => {
            let places = match singleton_integer(&arg(0)?)? {
                Some(d) if d < 0 => return err("round() precision must not be negative"),
                Some(d) => u32::try_from(d.min(28)).unwrap_or(28),
                None => 0,
            };
            Ok(x.round(places).map(Item::Decimal).into_iter().collect())
        }
    }
}

/// `precision()`: decimal places of a decimal, digits of a date/time.
fn precision_of(item: &Item<'_>) -> Option<i64> {
    match prim(item) {
        Prim::Dec(d) => Some(i64::from(d.scale())),
        Prim::Int(_) => Some(0),
        Prim::Date(t) | Prim::DateTime(t) | Prim::Time(t) => Some(t.precision_digits()),
        _ => None,
    }
}

/// `lowBoundary()` / `highBoundary()`.
fn boundary<'a>(item: &Item<'a>, places: Option<i64>, high: bool) -> Option<Item<'a>> {
    let p = prim(item);
    let places = match places {
        Some(p) => Some(u32::try_from(p).ok().filter(|p| *p <= 28)?),
        None => None,
    };
    match p {
        Prim::Int(i) => Decimal::from_i64(i)
            .boundary(places.unwrap_or(8), high)
            .map(Item::Decimal),
        Prim::Dec(d) => d.boundary(places.unwrap_or(8), high).map(Item::Decimal),
        Prim::Qty(v, u) => v.boundary(places.unwrap_or(8), high).map(|value| {
            Item::Quantity(Quantity {
                value,
                unit: u.to_string(),
            })
        }),
        Prim::Date(t) => t.boundary(places.unwrap_or(8), high).map(Item::Date),
        Prim::DateTime(t) => t.boundary(places.unwrap_or(17), high).map(Item::DateTime),
        Prim::Time(t) => t.boundary(places.unwrap_or(9), high).map(Item::Time),
        _ => None,
    }
}
