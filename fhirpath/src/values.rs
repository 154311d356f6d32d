//! Value semantics shared by operators and functions: the primitive view of items, equality,
//! equivalence, ordering, quantities and their units, de-duplication, arithmetic.

use std::cmp::Ordering;

use serde_json::Value;

use crate::Error;
use crate::decimal::Decimal;
use crate::eval::{Coll, err};
use crate::item::{Item, Quantity};
use crate::model::model;
use crate::parser::BinOp;
use crate::temporal::{Kind, Temporal};

/// A primitive view of an item, for operators.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Prim<'x> {
    Bool(bool),
    Int(i64),
    Dec(Decimal),
    Str(&'x str),
    Date(Temporal),
    DateTime(Temporal),
    Time(Temporal),
    Qty(Decimal, &'x str),
    Complex(&'x Value),
}

/// A JSON number as a decimal, keeping its written precision.
fn json_decimal(n: &serde_json::Number) -> Option<Decimal> {
    Decimal::parse(&n.to_string()).or_else(|| n.as_f64().and_then(Decimal::from_f64))
}

fn json_number<'x>(n: &serde_json::Number, integer_type: bool, node: &'x Value) -> Prim<'x> {
    if let Some(i) = n.as_i64()
        && (integer_type || !n.to_string().contains(['.', 'e', 'E']))
    {
        return Prim::Int(i);
    }
    json_decimal(n).map_or(Prim::Complex(node), Prim::Dec)
}

/// The primitive view of `item`.
pub(crate) fn prim<'x>(item: &'x Item<'_>) -> Prim<'x> {
    match item {
        Item::Boolean(b) => Prim::Bool(*b),
        Item::Integer(i) => Prim::Int(*i),
        Item::Decimal(d) => Prim::Dec(*d),
        Item::String(s) => Prim::Str(s),
        Item::Date(t) => Prim::Date(*t),
        Item::DateTime(t) => Prim::DateTime(*t),
        Item::Time(t) => Prim::Time(*t),
        Item::Quantity(q) => Prim::Qty(q.value, &q.unit),
        Item::Node(node) => {
            let m = model();
            let tname = node.ty.map_or("", |t| m.name(t));
            match node.value {
                Value::Bool(b) => Prim::Bool(*b),
                Value::Number(n) => json_number(
                    n,
                    matches!(tname, "integer" | "positiveInt" | "unsignedInt"),
                    node.value,
                ),
                Value::String(s) => {
                    let parsed = match tname {
                        "date" => Temporal::parse_date(s).map(Prim::Date),
                        "dateTime" | "instant" => Temporal::parse_datetime(s).map(|t| {
                            if t.precision() <= crate::Precision::Day {
                                Prim::Date(t.to_date())
                            } else {
                                Prim::DateTime(t)
                            }
                        }),
                        "time" => Temporal::parse_time(s).map(Prim::Time),
                        _ => None,
                    };
                    parsed.unwrap_or(Prim::Str(s))
                }
                Value::Object(o) => {
                    if node.ty.is_some_and(|t| m.is_a(t, "Quantity"))
                        && let Some(Value::Number(n)) = o.get("value")
                        && let Some(value) = json_decimal(n)
                    {
                        let unit = o
                            .get("code")
                            .or_else(|| o.get("unit"))
                            .and_then(Value::as_str)
                            .unwrap_or("");
                        return Prim::Qty(value, unit);
                    }
                    Prim::Complex(node.value)
                }
                other => Prim::Complex(other),
            }
        }
    }
}

/// Maps calendar words (singular or plural) to their singular form.
pub(crate) fn calendar_unit(word: &str) -> Option<&'static str> {
    Some(match word {
        "year" | "years" => "year",
        "month" | "months" => "month",
        "week" | "weeks" => "week",
        "day" | "days" => "day",
        "hour" | "hours" => "hour",
        "minute" | "minutes" => "minute",
        "second" | "seconds" => "second",
        "millisecond" | "milliseconds" => "millisecond",
        _ => return None,
    })
}

/// A unit in a canonical spelling for comparing quantities; UCUM definite-duration codes map
/// to calendar words (years and months are not definite in UCUM, so they stay apart).
fn canonical_unit(unit: &str) -> &str {
    match unit {
        "wk" => "week",
        "d" => "day",
        "h" => "hour",
        "min" => "minute",
        "s" => "second",
        "ms" => "millisecond",
        u => calendar_unit(u).unwrap_or(u),
    }
}

/// Dimensions and factor to the base units, for the units `units` understands.
fn unit_factor(unit: &str) -> Option<([i8; 3], f64)> {
    crate::units::reduce(unit).map(|r| (r.dims, r.factor))
}

/// The unit of a product or quotient of two quantities.
fn compound_unit(u: &str, t: &str, divide: bool) -> String {
    let wrap = |x: &str| {
        if x.contains(['.', '/']) {
            format!("({x})")
        } else {
            x.to_string()
        }
    };
    match (u, t, divide) {
        (_, "1", _) => u.to_string(),
        ("1", _, false) => t.to_string(),
        _ if divide && canonical_unit(u) == canonical_unit(t) => "1".to_string(),
        _ => format!("{}{}{}", wrap(u), if divide { '/' } else { '.' }, wrap(t)),
    }
}

/// Whether quantities in these units can be compared (same unit or same dimension).
pub(crate) fn units_comparable(u: &str, t: &str) -> bool {
    canonical_unit(u) == canonical_unit(t)
        || matches!((unit_factor(u), unit_factor(t)), (Some(a), Some(b)) if a.0 == b.0)
}

/// Order of two quantities: exact in the same unit, else through the unit factors (with a
/// tolerance for binary conversion error); `None` when the units are not comparable.
fn qty_cmp(v: Decimal, u: &str, w: Decimal, t: &str) -> Option<Ordering> {
    if canonical_unit(u) == canonical_unit(t) {
        return Some(v.cmp_value(&w));
    }
    let (da, fa) = unit_factor(u)?;
    let (db, fb) = unit_factor(t)?;
    if da != db {
        return None;
    }
    let (a, b) = (v.to_f64() * fa, w.to_f64() * fb);
    if (a - b).abs() <= 1e-9 * a.abs().max(b.abs()) {
        Some(Ordering::Equal)
    } else {
        a.partial_cmp(&b)
    }
}

/// Quantity equivalence: compared in the coarser unit at the lesser written precision.
fn qty_equiv(v: Decimal, u: &str, w: Decimal, t: &str) -> bool {
    if canonical_unit(u) == canonical_unit(t) {
        return v.equivalent(&w);
    }
    let (Some((da, fa)), Some((db, fb))) = (unit_factor(u), unit_factor(t)) else {
        return false;
    };
    if da != db {
        return false;
    }
    let coarse = fa.max(fb);
    let places = v.scale().min(w.scale());
    let a = Decimal::from_f64(v.to_f64() * fa / coarse).and_then(|d| d.round(places));
    let b = Decimal::from_f64(w.to_f64() * fb / coarse).and_then(|d| d.round(places));
    matches!((a, b), (Some(a), Some(b)) if a.cmp_value(&b) == Ordering::Equal)
}

fn as_decimal(p: &Prim<'_>) -> Option<Decimal> {
    match p {
        Prim::Int(i) => Some(Decimal::from_i64(*i)),
        Prim::Dec(d) => Some(*d),
        _ => None,
    }
}

fn temporal_pair(a: &Prim<'_>, b: &Prim<'_>) -> Option<(Temporal, Temporal)> {
    match (a, b) {
        (Prim::Date(x), Prim::Date(y)) | (Prim::Time(x), Prim::Time(y)) => Some((*x, *y)),
        (Prim::Date(x) | Prim::DateTime(x), Prim::Date(y) | Prim::DateTime(y)) => {
            Some((x.as_datetime(), y.as_datetime()))
        }
        _ => None,
    }
}

/// `=` on two items; `None` when the result is unknown.
pub(crate) fn item_eq(a: &Item<'_>, b: &Item<'_>) -> Option<bool> {
    let (pa, pb) = (prim(a), prim(b));
    if let (Prim::Int(i), Prim::Int(j)) = (pa, pb) {
        return Some(i == j);
    }
    if let (Some(x), Some(y)) = (as_decimal(&pa), as_decimal(&pb)) {
        return Some(x.cmp_value(&y) == Ordering::Equal);
    }
    if let Some((x, y)) = temporal_pair(&pa, &pb) {
        return x.compare(&y).map(|o| o == Ordering::Equal);
    }
    match (pa, pb) {
        (Prim::Bool(x), Prim::Bool(y)) => Some(x == y),
        (Prim::Str(x), Prim::Str(y)) => Some(x == y),
        (Prim::Qty(v, u), Prim::Qty(w, t)) => qty_cmp(v, u, w, t).map(|o| o == Ordering::Equal),
        (Prim::Complex(x), Prim::Complex(y)) => Some(std::ptr::eq(x, y) || x == y),
        _ => Some(false),
    }
}

fn normalize_ws(s: &str) -> String {
    s.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase()
}

/// `~` on two items.
pub(crate) fn item_equiv(a: &Item<'_>, b: &Item<'_>) -> bool {
    let (pa, pb) = (prim(a), prim(b));
    if let (Some(x), Some(y)) = (as_decimal(&pa), as_decimal(&pb)) {
        return x.equivalent(&y);
    }
    if let Some((x, y)) = temporal_pair(&pa, &pb) {
        return x.compare(&y) == Some(Ordering::Equal);
    }
    match (pa, pb) {
        (Prim::Str(x), Prim::Str(y)) => normalize_ws(x) == normalize_ws(y),
        (Prim::Complex(x), Prim::Complex(y)) => x == y,
        (Prim::Qty(v, u), Prim::Qty(w, t)) => qty_equiv(v, u, w, t),
        _ => item_eq(a, b).unwrap_or(false),
    }
}

/// Ordering of two singletons for `<` and friends.
pub(crate) fn item_cmp(a: &Item<'_>, b: &Item<'_>) -> Result<Option<Ordering>, Error> {
    let (pa, pb) = (prim(a), prim(b));
    if let (Some(x), Some(y)) = (as_decimal(&pa), as_decimal(&pb)) {
        return Ok(Some(x.cmp_value(&y)));
    }
    if let Some((x, y)) = temporal_pair(&pa, &pb) {
        return Ok(x.compare(&y));
    }
    match (pa, pb) {
        (Prim::Str(x), Prim::Str(y)) => Ok(Some(x.cmp(y))),
        (Prim::Qty(v, u), Prim::Qty(w, t)) => Ok(qty_cmp(v, u, w, t)),
        _ => err("values of these types cannot be compared"),
    }
}

/// Singleton evaluation to a Boolean: empty is `None`, a single non-Boolean item is true.
pub(crate) fn singleton_bool(items: &[Item<'_>]) -> Result<Option<bool>, Error> {
    match items {
        [] => Ok(None),
        [item] => match prim(item) {
            Prim::Bool(b) => Ok(Some(b)),
            // A primitive that exists without a value counts as empty.
            Prim::Complex(Value::Null) => Ok(None),
            _ => Ok(Some(true)),
        },
        _ => err("expected a single Boolean but got a collection"),
    }
}

pub(crate) fn singleton_integer(items: &[Item<'_>]) -> Result<Option<i64>, Error> {
    match items {
        [] => Ok(None),
        [item] => match prim(item) {
            Prim::Int(i) => Ok(Some(i)),
            // A primitive that exists without a value counts as empty.
            Prim::Complex(Value::Null) => Ok(None),
            _ => err("expected an Integer"),
        },
        _ => err("expected a single Integer but got a collection"),
    }
}

pub(crate) fn singleton_string<'x>(items: &'x [Item<'_>]) -> Result<Option<&'x str>, Error> {
    match items {
        [] => Ok(None),
        [item] => match prim(item) {
            Prim::Str(s) => Ok(Some(s)),
            // A primitive that exists without a value counts as empty.
            Prim::Complex(Value::Null) => Ok(None),
            _ => err("expected a String"),
        },
        _ => err("expected a single String but got a collection"),
    }
}

/// Collection equality (`=`).
pub(crate) fn coll_eq(a: &[Item<'_>], b: &[Item<'_>]) -> Option<bool> {
    if a.is_empty() || b.is_empty() {
        return None;
    }
    if a.len() != b.len() {
        return Some(false);
    }
    let mut result = Some(true);
    for (x, y) in a.iter().zip(b) {
        match item_eq(x, y) {
            Some(true) => {}
            Some(false) => return Some(false),
            None => result = None,
        }
    }
    result
}

/// Collection equivalence (`~`): order does not matter.
pub(crate) fn coll_equiv(a: &[Item<'_>], b: &[Item<'_>]) -> bool {
    a.len() == b.len() && a.iter().all(|x| b.iter().any(|y| item_equiv(x, y)))
}

/// Whether `items` holds an item equal to `x`.
pub(crate) fn contains_item(items: &[Item<'_>], x: &Item<'_>) -> bool {
    items.iter().any(|y| item_eq(x, y) == Some(true))
}

/// A hash of the values `item_eq` compares by value (strings, numbers, Booleans), so that
/// de-duplication is not quadratic on large collections; `None` for the other kinds, which
/// are compared pairwise among themselves.
fn hash_key(item: &Item<'_>) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    match prim(item) {
        Prim::Str(s) => (0u8, s).hash(&mut h),
        Prim::Bool(b) => (1u8, b).hash(&mut h),
        // Equal numbers must hash alike whatever their precision (`1` = `1.0`).
        Prim::Int(i) => (2u8, (i as f64 + 0.0).to_bits()).hash(&mut h),
        Prim::Dec(d) => (2u8, (d.to_f64() + 0.0).to_bits()).hash(&mut h),
        _ => return None,
    }
    Some(h.finish())
}

/// Appends `items` to `out` skipping duplicates (of each other and of what `out` holds).
pub(crate) fn push_distinct<'a>(out: &mut Coll<'a>, items: impl IntoIterator<Item = Item<'a>>) {
    let mut items = items.into_iter();
    let Some(first) = items.next() else {
        return;
    };
    match items.next() {
        // One item into nothing cannot repeat: most unions of search parameter paths have an
        // empty side (`(value as Quantity) | (value as SampledData)`), and hashing was half
        // of their evaluation.
        None if out.is_empty() => out.push(first),
        None => push_distinct_hashed(out, std::iter::once(first)),
        Some(second) => push_distinct_hashed(out, [first, second].into_iter().chain(items)),
    }
}

/// [`push_distinct`] by the hashes of the values compared by value.
fn push_distinct_hashed<'a>(out: &mut Coll<'a>, items: impl IntoIterator<Item = Item<'a>>) {
    let mut index: std::collections::HashMap<u64, Vec<usize>> = Default::default();
    let mut others: Vec<usize> = Vec::new();
    for (i, item) in out.iter().enumerate() {
        match hash_key(item) {
            Some(h) => index.entry(h).or_default().push(i),
            None => others.push(i),
        }
    }
    for item in items {
        let key = hash_key(&item);
        let candidates = match key {
            Some(h) => index.get(&h).map_or(&[][..], Vec::as_slice),
            None => others.as_slice(),
        };
        if candidates
            .iter()
            .any(|&j| out.get(j).is_some_and(|o| item_eq(&item, o) == Some(true)))
        {
            continue;
        }
        let j = out.len();
        match key {
            Some(h) => index.entry(h).or_default().push(j),
            None => others.push(j),
        }
        out.push(item);
    }
}

pub(crate) fn arithmetic<'a>(op: BinOp, x: Prim<'_>, y: Prim<'_>) -> Result<Coll<'a>, Error> {
    let one = |i: Option<Item<'a>>| Ok(i.into_iter().collect());
    match (x, y) {
        (Prim::Int(i), Prim::Int(j)) if op != BinOp::Div => {
            let r = match op {
                BinOp::Add => i.checked_add(j),
                BinOp::Sub => i.checked_sub(j),
                BinOp::Mul => i.checked_mul(j),
                BinOp::IntDiv => i.checked_div(j),
                _ => i.checked_rem(j),
            };
            one(r.map(Item::Integer))
        }
        (Prim::Str(s), Prim::Str(t)) if op == BinOp::Add => {
            one(Some(Item::String(format!("{s}{t}"))))
        }
        (Prim::Date(t) | Prim::DateTime(t) | Prim::Time(t), Prim::Qty(v, u))
            if matches!(op, BinOp::Add | BinOp::Sub) =>
        {
            let unit = canonical_unit(u);
            if calendar_unit(unit).is_none() {
                return err("date arithmetic needs a calendar duration");
            }
            let amount = if op == BinOp::Sub {
                -v.to_f64()
            } else {
                v.to_f64()
            };
            one(t.add(amount, unit).map(|t| match t.kind() {
                Kind::Date => Item::Date(t),
                Kind::DateTime => Item::DateTime(t),
                Kind::Time => Item::Time(t),
            }))
        }
        (Prim::Qty(v, u), Prim::Qty(w, t)) if matches!(op, BinOp::Add | BinOp::Sub) => {
            if canonical_unit(u) != canonical_unit(t) {
                return Ok(Vec::new());
            }
            let value = if op == BinOp::Add {
                v.checked_add(w)
            } else {
                v.checked_sub(w)
            };
            one(value.map(|value| {
                Item::Quantity(Quantity {
                    value,
                    unit: u.to_string(),
                })
            }))
        }
        (Prim::Qty(v, u), Prim::Qty(w, t)) if matches!(op, BinOp::Mul | BinOp::Div) => {
            let divide = op == BinOp::Div;
            let value = if divide {
                v.checked_div(w)
            } else {
                v.checked_mul(w)
            };
            one(value.map(|value| {
                Item::Quantity(Quantity {
                    value,
                    unit: compound_unit(u, t, divide),
                })
            }))
        }
        (Prim::Qty(v, u), other) | (other, Prim::Qty(v, u))
            if op == BinOp::Mul && as_decimal(&other).is_some() =>
        {
            let value = as_decimal(&other).and_then(|f| v.checked_mul(f));
            one(value.map(|value| {
                Item::Quantity(Quantity {
                    value,
                    unit: u.to_string(),
                })
            }))
        }
        (Prim::Qty(v, u), other) if op == BinOp::Div && as_decimal(&other).is_some() => {
            let value = as_decimal(&other).and_then(|f| v.checked_div(f));
            one(value.map(|value| {
                Item::Quantity(Quantity {
                    value,
                    unit: u.to_string(),
                })
            }))
        }
        (a, b) => {
            let (Some(p), Some(q)) = (as_decimal(&a), as_decimal(&b)) else {
                return err("arithmetic on values of these types is not supported");
            };
            // Overflow and division by zero give empty, as FHIRPath specifies.
            let r = match op {
                BinOp::Add => p.checked_add(q).map(Item::Decimal),
                BinOp::Sub => p.checked_sub(q).map(Item::Decimal),
                BinOp::Mul => p.checked_mul(q).map(Item::Decimal),
                BinOp::Div => p.checked_div(q).map(Item::Decimal),
                BinOp::IntDiv => p
                    .div_trunc(q)
                    .and_then(|i| i64::try_from(i).ok())
                    .map(Item::Integer),
                _ => p.checked_rem(q).map(Item::Decimal),
            };
            one(r)
        }
    }
}
