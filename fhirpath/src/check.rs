//! Static checks run once at parse time: bounded tree size, known functions and arities, known
//! type names, and paths anchored at a type name checked against the model.

use crate::Error;
use crate::eval::{SYSTEM_TYPES, first_upper};
use crate::functions;
use crate::model::{TypeId, model};
use crate::parser::Ast;

/// Deepest expression tree evaluated; deeper trees are rejected at parse time.
const MAX_AST_DEPTH: usize = 200;
/// Most tree nodes accepted.
const MAX_AST_NODES: usize = 20_000;

/// Children of an AST node, for the iterative checks.
fn children(ast: &Ast) -> Vec<&Ast> {
    match ast {
        Ast::Member(b, _) | Ast::Negate(b) | Ast::Is(b, _) | Ast::As(b, _) => vec![b],
        Ast::Call(b, _, args) => b.iter().map(|b| &**b).chain(args.iter()).collect(),
        Ast::Index(a, b) | Ast::Binary(_, a, b) => vec![a, b],
        _ => Vec::new(),
    }
}

/// Static checks after parsing: bounded depth, known functions with valid argument counts.
pub(crate) fn check(ast: &Ast) -> Result<(), Error> {
    let mut stack = vec![(ast, 0usize)];
    let mut nodes = 0usize;
    while let Some((node, depth)) = stack.pop() {
        nodes += 1;
        if depth > MAX_AST_DEPTH || nodes > MAX_AST_NODES {
            return Err(Error::Parse {
                position: 0,
                message: "expression too deeply nested or too long".into(),
            });
        }
        match node {
            Ast::Call(_, name, args) => {
                functions::check_arity(name, args.len())?;
                if matches!(name.as_str(), "is" | "as" | "ofType")
                    && let Some(arg) = args.first()
                    && let Some(ty) = functions::type_name(arg)
                {
                    check_type_name(&ty)?;
                }
            }
            Ast::Is(_, ty) | Ast::As(_, ty) => check_type_name(ty)?,
            _ => {}
        }
        for c in children(node) {
            stack.push((c, depth + 1));
        }
    }
    // Depth is bounded now, so the recursive path check below is too.
    static_types(ast)?;
    Ok(())
}

fn parse_error<T>(message: String) -> Result<T, Error> {
    Err(Error::Parse {
        position: 0,
        message,
    })
}

/// The model type of a cast target, if it is a FHIR type.
fn cast_target(spec: &str) -> Option<TypeId> {
    let name = spec.strip_prefix("FHIR.").unwrap_or(spec);
    if spec.starts_with("System.") {
        return None;
    }
    model().type_id(name)
}

/// Statically follows paths anchored at a type name (`Observation.value.unit`) through the
/// model, rejecting element names the types cannot have and casts that cannot succeed. Returns
/// the possible types of `ast`, or `None` when they are not statically known.
fn static_types(ast: &Ast) -> Result<Option<Vec<TypeId>>, Error> {
    let m = model();
    match ast {
        Ast::Ident(name) if first_upper(name) => Ok(m.type_id(name).map(|t| vec![t])),
        Ast::Member(base, name) => {
            let Some(types) = static_types(base)? else {
                return Ok(None);
            };
            // Abstract or open types: the concrete type is only known at run time.
            let open = ["Resource", "DomainResource", "Element", "BackboneElement"];
            if types
                .iter()
                .any(|t| open.iter().any(|o| m.type_id(o) == Some(*t)))
            {
                return Ok(None);
            }
            let mut out = Vec::new();
            for t in &types {
                if let Some(def) = m.child(*t, name) {
                    out.extend(def.types.iter().copied());
                }
            }
            if out.is_empty() {
                return parse_error(format!("no element '{name}' on the type of its parent"));
            }
            Ok(Some(out))
        }
        Ast::As(base, ty) => cast(static_types(base)?, ty),
        Ast::Call(Some(base), name, args) if matches!(name.as_str(), "as" | "ofType") => {
            let base_types = static_types(base)?;
            match args.first().and_then(functions::type_name) {
                Some(ty) => cast(base_types, &ty),
                None => Ok(None),
            }
        }
        other => {
            for c in children(other) {
                static_types(c)?;
            }
            Ok(None)
        }
    }
}

fn cast(types: Option<Vec<TypeId>>, spec: &str) -> Result<Option<Vec<TypeId>>, Error> {
    let Some(target) = cast_target(spec) else {
        return Ok(None);
    };
    let Some(types) = types else {
        return Ok(Some(vec![target]));
    };
    let m = model();
    let target_name = m.name(target);
    // Primitive casts are left to run time (`gender.as(id)` is simply empty).
    let possible = !first_upper(target_name)
        || types
            .iter()
            .any(|t| m.is_a(*t, target_name) || m.is_a(target, m.name(*t)));
    if !possible {
        return parse_error(format!("a cast to {spec} can never succeed here"));
    }
    Ok(Some(vec![target]))
}

/// Rejects type specifiers that name no known type.
fn check_type_name(spec: &str) -> Result<(), Error> {
    let (ns, name) = match spec.split_once('.') {
        Some((ns, n)) => (Some(ns), n),
        None => (None, spec),
    };
    // A qualified name that names nothing is just a type no value has.
    if ns.is_some() || model().type_id(name).is_some() || SYSTEM_TYPES.contains(&name) {
        Ok(())
    } else {
        Err(Error::Parse {
            position: 0,
            message: format!("unknown type {spec}"),
        })
    }
}
