//! A small UCUM subset for comparing and multiplying quantities: common metric units with
//! prefixes, a few customary ones, time units, and products/quotients/powers of them. Units
//! outside it compare only with an identical unit.

/// A unit reduced to a factor of the base units gram, metre and second with their exponents.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Reduced {
    pub(crate) factor: f64,
    pub(crate) dims: [i8; 3],
}

const DIMENSIONLESS: Reduced = Reduced {
    factor: 1.0,
    dims: [0, 0, 0],
};

/// Most nested parentheses in a unit.
const MAX_NESTING: usize = 8;

fn base(factor: f64, dims: [i8; 3]) -> Reduced {
    Reduced { factor, dims }
}

/// Atoms that are not a prefix plus a base unit.
fn special_atom(atom: &str) -> Option<Reduced> {
    Some(match atom {
        "1" => DIMENSIONLESS,
        "%" => base(0.01, [0, 0, 0]),
        "min" | "minute" => base(60.0, [0, 0, 1]),
        "h" | "hour" => base(3600.0, [0, 0, 1]),
        "d" | "day" => base(86_400.0, [0, 0, 1]),
        "wk" | "week" => base(604_800.0, [0, 0, 1]),
        "second" => base(1.0, [0, 0, 1]),
        "millisecond" => base(1e-3, [0, 0, 1]),
        "[lb_av]" => base(453.592_37, [1, 0, 0]),
        "[oz_av]" => base(28.349_523_125, [1, 0, 0]),
        "[in_i]" => base(0.0254, [0, 1, 0]),
        "[ft_i]" => base(0.3048, [0, 1, 0]),
        _ if atom.starts_with('{') && atom.ends_with('}') => DIMENSIONLESS,
        _ => return None,
    })
}

fn metric_atom(atom: &str) -> Option<Reduced> {
    let units: [(&str, Reduced); 4] = [
        ("g", base(1.0, [1, 0, 0])),
        ("m", base(1.0, [0, 1, 0])),
        ("s", base(1.0, [0, 0, 1])),
        ("L", base(1e-3, [0, 3, 0])),
    ];
    let prefixes: [(&str, f64); 8] = [
        ("", 1.0),
        ("k", 1e3),
        ("d", 1e-1),
        ("c", 1e-2),
        ("m", 1e-3),
        ("u", 1e-6),
        ("n", 1e-9),
        ("p", 1e-12),
    ];
    let atom = if atom == "l" { "L" } else { atom };
    for (name, unit) in units {
        if let Some(prefix) = atom.strip_suffix(name)
            && let Some((_, f)) = prefixes.iter().find(|(p, _)| *p == prefix)
        {
            return Some(base(unit.factor * f, unit.dims));
        }
    }
    None
}

fn combine(a: Reduced, b: Reduced, divide: bool) -> Option<Reduced> {
    let mut dims = a.dims;
    for (d, e) in dims.iter_mut().zip(b.dims) {
        *d = if divide {
            d.checked_sub(e)?
        } else {
            d.checked_add(e)?
        };
    }
    let factor = if divide {
        a.factor / b.factor
    } else {
        a.factor * b.factor
    };
    Some(Reduced { factor, dims })
}

fn power(r: Reduced, exp: i8) -> Option<Reduced> {
    let mut dims = r.dims;
    for d in &mut dims {
        *d = d.checked_mul(exp)?;
    }
    Some(Reduced {
        factor: r.factor.powi(i32::from(exp)),
        dims,
    })
}

struct UnitParser<'u> {
    text: &'u str,
    pos: usize,
}

impl UnitParser<'_> {
    /// term := component (('.' | '/') component)*
    fn term(&mut self, depth: usize) -> Option<Reduced> {
        if depth > MAX_NESTING {
            return None;
        }
        let mut acc = self.component(depth)?;
        while let Some(op) = self.text[self.pos..].chars().next() {
            if op != '.' && op != '/' {
                break;
            }
            self.pos += 1;
            let next = self.component(depth)?;
            acc = combine(acc, next, op == '/')?;
        }
        Some(acc)
    }

    /// component := '(' term ')' | atom [exponent]
    fn component(&mut self, depth: usize) -> Option<Reduced> {
        let rest = &self.text[self.pos..];
        if rest.starts_with('(') {
            self.pos += 1;
            let inner = self.term(depth + 1)?;
            if !self.text[self.pos..].starts_with(')') {
                return None;
            }
            self.pos += 1;
            return Some(inner);
        }
        // An atom runs to the next operator or parenthesis; brackets and braces may hold
        // anything but those closers.
        let mut end = 0;
        let mut in_brackets = false;
        for (i, c) in rest.char_indices() {
            match c {
                '[' | '{' => in_brackets = true,
                ']' | '}' => in_brackets = false,
                '.' | '/' | '(' | ')' if !in_brackets => break,
                _ => {}
            }
            end = i + c.len_utf8();
        }
        let token = &rest[..end];
        self.pos += end;
        if token.is_empty() {
            return None;
        }
        if let Some(r) = special_atom(token) {
            return Some(r);
        }
        // Trailing exponent digits (`m2`, `s-1`).
        let digits_start = token
            .char_indices()
            .rev()
            .take_while(|(_, c)| c.is_ascii_digit() || *c == '-' || *c == '+')
            .last()
            .map_or(token.len(), |(i, _)| i);
        let (atom, exp) = token.split_at(digits_start);
        let exp: i8 = if exp.is_empty() { 1 } else { exp.parse().ok()? };
        let unit = special_atom(atom).or_else(|| metric_atom(atom))?;
        power(unit, exp)
    }
}

/// Reduces a UCUM unit (or calendar word) to base units, if it is in the supported subset.
pub(crate) fn reduce(unit: &str) -> Option<Reduced> {
    if matches!(unit, "year" | "years" | "month" | "months" | "a" | "mo") {
        // Calendar years and months have no fixed length.
        return None;
    }
    let singular = unit.strip_suffix('s').filter(|u| {
        matches!(
            *u,
            "week" | "day" | "hour" | "minute" | "second" | "millisecond"
        )
    });
    let unit = singular.unwrap_or(unit);
    let mut parser = UnitParser { text: unit, pos: 0 };
    let r = parser.term(0)?;
    (parser.pos == unit.len()).then_some(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reduces_compound_units() {
        let r = |u: &str| reduce(u).unwrap();
        assert_eq!(r("m2").dims, [0, 2, 0]);
        assert!((r("cm.m").factor - 0.01).abs() < 1e-12);
        assert_eq!(r("g/m").dims, [1, -1, 0]);
        assert_eq!(r("m/m"), DIMENSIONLESS);
        assert_eq!(r("mg/dL").dims, r("g/L").dims);
        assert!((r("mg/dL").factor / r("g/L").factor - 0.01).abs() < 1e-12);
        assert_eq!(r("{beats}/min").dims, [0, 0, -1]);
        assert_eq!(r("weeks").dims, [0, 0, 1]);
        for bad in [
            "",
            "year",
            "a",
            "mm[Hg]",
            "((((((((((m))))))))))",
            "m/",
            "xyz",
        ] {
            assert!(reduce(bad).is_none(), "{bad}");
        }
    }
}
