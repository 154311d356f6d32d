//! Parser from tokens to the expression tree, following the FHIRPath operator precedence.

use crate::Error;
use crate::decimal::Decimal;
use crate::lexer::{Tok, tokenize};
use crate::temporal::Temporal;

/// Deepest nesting the parser accepts; keeps parsing and evaluation recursion bounded.
const MAX_DEPTH: usize = 128;

/// A literal value in the expression text.
#[derive(Debug, Clone)]
pub(crate) enum Literal {
    Empty,
    Boolean(bool),
    String(String),
    Integer(i64),
    Decimal(Decimal),
    Date(Temporal),
    DateTime(Temporal),
    Time(Temporal),
    Quantity(Decimal, String),
}

/// Binary operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BinOp {
    Mul,
    Div,
    IntDiv,
    Mod,
    Add,
    Sub,
    Concat,
    Union,
    Lt,
    Gt,
    Le,
    Ge,
    Eq,
    Ne,
    Equiv,
    NotEquiv,
    In,
    Contains,
    And,
    Or,
    Xor,
    Implies,
}

/// The expression tree.
#[derive(Debug, Clone)]
pub(crate) enum Ast {
    Literal(Literal),
    /// An identifier evaluated against the focus (first step of a path).
    Ident(String),
    /// `base.name`
    Member(Box<Ast>, String),
    /// Function call on `base` (or on the focus when `None`).
    Call(Option<Box<Ast>>, String, Vec<Ast>),
    Index(Box<Ast>, Box<Ast>),
    Negate(Box<Ast>),
    Binary(BinOp, Box<Ast>, Box<Ast>),
    Is(Box<Ast>, String),
    As(Box<Ast>, String),
    This,
    IndexVar,
    Total,
    Env(String),
}

/// Most tokens an expression may have. Every tree node needs a token, so this also bounds the
/// depth of left-nested chains (`a.b.c...`), which are built by loops, not recursion.
const MAX_TOKENS: usize = 4096;

/// Parses expression text into a tree.
pub(crate) fn parse(text: &str) -> Result<Ast, Error> {
    let tokens = tokenize(text)?;
    if tokens.len() > MAX_TOKENS {
        return Err(Error::Parse {
            position: 0,
            message: "expression too long".into(),
        });
    }
    let mut p = Parser {
        tokens,
        pos: 0,
        end: text.len(),
    };
    let ast = p.expr(0, 0)?;
    if p.pos < p.tokens.len() {
        return Err(p.err("unexpected token"));
    }
    Ok(ast)
}

struct Parser {
    tokens: Vec<(usize, Tok)>,
    pos: usize,
    end: usize,
}

fn binary_op(tok: &Tok) -> Option<(BinOp, u8)> {
    let op = match tok {
        Tok::Sym(s) => match *s {
            "*" => (BinOp::Mul, 10),
            "/" => (BinOp::Div, 10),
            "+" => (BinOp::Add, 9),
            "-" => (BinOp::Sub, 9),
            "&" => (BinOp::Concat, 9),
            "|" => (BinOp::Union, 7),
            "<" => (BinOp::Lt, 6),
            ">" => (BinOp::Gt, 6),
            "<=" => (BinOp::Le, 6),
            ">=" => (BinOp::Ge, 6),
            "=" => (BinOp::Eq, 5),
            "!=" => (BinOp::Ne, 5),
            "~" => (BinOp::Equiv, 5),
            "!~" => (BinOp::NotEquiv, 5),
            _ => return None,
        },
        Tok::Ident(s, false) => match s.as_str() {
            "div" => (BinOp::IntDiv, 10),
            "mod" => (BinOp::Mod, 10),
            "in" => (BinOp::In, 4),
            "contains" => (BinOp::Contains, 4),
            "and" => (BinOp::And, 3),
            "or" => (BinOp::Or, 2),
            "xor" => (BinOp::Xor, 2),
            "implies" => (BinOp::Implies, 1),
            _ => return None,
        },
        _ => return None,
    };
    Some(op)
}

/// Binding power of `is` / `as`.
const TYPE_OP_BP: u8 = 8;

impl Parser {
    fn err(&self, message: &str) -> Error {
        let position = self.tokens.get(self.pos).map_or(self.end, |t| t.0);
        Error::Parse {
            position,
            message: message.to_string(),
        }
    }

    fn peek(&self) -> Option<&Tok> {
        self.tokens.get(self.pos).map(|t| &t.1)
    }

    fn next(&mut self) -> Option<Tok> {
        let t = self.tokens.get(self.pos).map(|t| t.1.clone());
        self.pos += 1;
        t
    }

    fn eat_sym(&mut self, sym: &str) -> bool {
        if matches!(self.peek(), Some(Tok::Sym(s)) if *s == sym) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn expect_sym(&mut self, sym: &str) -> Result<(), Error> {
        if self.eat_sym(sym) {
            Ok(())
        } else {
            Err(self.err(&format!("expected '{sym}'")))
        }
    }

    fn expr(&mut self, min_bp: u8, depth: usize) -> Result<Ast, Error> {
        if depth > MAX_DEPTH {
            return Err(self.err("expression nested too deeply"));
        }
        let mut lhs = self.unary(depth + 1)?;
        while let Some(tok) = self.peek() {
            if let Tok::Ident(word, false) = tok
                && (word == "is" || word == "as")
            {
                if TYPE_OP_BP < min_bp {
                    break;
                }
                let is = word == "is";
                self.pos += 1;
                let ty = self.type_specifier()?;
                lhs = if is {
                    Ast::Is(Box::new(lhs), ty)
                } else {
                    Ast::As(Box::new(lhs), ty)
                };
                continue;
            }
            let Some((op, bp)) = binary_op(tok) else {
                break;
            };
            if bp < min_bp {
                break;
            }
            self.pos += 1;
            let rhs = self.expr(bp + 1, depth + 1)?;
            lhs = Ast::Binary(op, Box::new(lhs), Box::new(rhs));
        }
        Ok(lhs)
    }

    fn type_specifier(&mut self) -> Result<String, Error> {
        let mut name = match self.next() {
            Some(Tok::Ident(s, _)) => s,
            _ => return Err(self.err("expected a type name")),
        };
        while matches!(self.peek(), Some(Tok::Sym("."))) {
            self.pos += 1;
            match self.next() {
                Some(Tok::Ident(s, _)) => {
                    name.push('.');
                    name.push_str(&s);
                }
                _ => return Err(self.err("expected a type name")),
            }
        }
        Ok(name)
    }

    fn unary(&mut self, depth: usize) -> Result<Ast, Error> {
        if depth > MAX_DEPTH {
            return Err(self.err("expression nested too deeply"));
        }
        if self.eat_sym("-") {
            let inner = self.unary(depth + 1)?;
            return Ok(match inner {
                Ast::Literal(Literal::Integer(i)) if i != i64::MIN => {
                    Ast::Literal(Literal::Integer(-i))
                }
                Ast::Literal(Literal::Decimal(d)) if d.neg().is_some() => {
                    Ast::Literal(Literal::Decimal(d.neg().unwrap_or(d)))
                }
                other => Ast::Negate(Box::new(other)),
            });
        }
        if self.eat_sym("+") {
            return self.unary(depth + 1);
        }
        let mut term = self.term(depth + 1)?;
        loop {
            if self.eat_sym(".") {
                let name = match self.next() {
                    Some(Tok::Ident(s, _)) => s,
                    _ => return Err(self.err("expected a name after '.'")),
                };
                if self.eat_sym("(") {
                    let args = self.args(depth + 1)?;
                    term = Ast::Call(Some(Box::new(term)), name, args);
                } else {
                    term = Ast::Member(Box::new(term), name);
                }
            } else if self.eat_sym("[") {
                let index = self.expr(0, depth + 1)?;
                self.expect_sym("]")?;
                term = Ast::Index(Box::new(term), Box::new(index));
            } else {
                break;
            }
        }
        Ok(term)
    }

    fn args(&mut self, depth: usize) -> Result<Vec<Ast>, Error> {
        let mut args = Vec::new();
        if self.eat_sym(")") {
            return Ok(args);
        }
        loop {
            args.push(self.expr(0, depth + 1)?);
            if self.eat_sym(")") {
                return Ok(args);
            }
            self.expect_sym(",")?;
        }
    }

    fn term(&mut self, depth: usize) -> Result<Ast, Error> {
        let Some(tok) = self.next() else {
            self.pos -= 1;
            return Err(self.err("unexpected end of expression"));
        };
        let ast = match tok {
            Tok::Sym("(") => {
                let inner = self.expr(0, depth + 1)?;
                self.expect_sym(")")?;
                inner
            }
            Tok::Sym("{") => {
                self.expect_sym("}")?;
                Ast::Literal(Literal::Empty)
            }
            Tok::Str(s) => Ast::Literal(Literal::String(s)),
            Tok::Number(text, decimal) => self.number(&text, decimal)?,
            Tok::DateTime(text) => {
                let lit = if let Some(time) = text.strip_prefix('T') {
                    Temporal::parse_time(time).map(Literal::Time)
                } else if text.contains('T') {
                    Temporal::parse_datetime(&text).map(Literal::DateTime)
                } else {
                    Temporal::parse_date(&text).map(Literal::Date)
                };
                match lit {
                    Some(l) => Ast::Literal(l),
                    None => {
                        self.pos -= 1;
                        return Err(self.err("invalid date/time literal"));
                    }
                }
            }
            Tok::Env(name) => Ast::Env(name),
            Tok::Special(name) => match name.as_str() {
                "this" => Ast::This,
                "index" => Ast::IndexVar,
                "total" => Ast::Total,
                _ => {
                    self.pos -= 1;
                    return Err(self.err("unknown $ variable"));
                }
            },
            Tok::Ident(name, quoted) => {
                if !quoted && (name == "true" || name == "false") {
                    Ast::Literal(Literal::Boolean(name == "true"))
                } else if self.eat_sym("(") {
                    let args = self.args(depth + 1)?;
                    Ast::Call(None, name, args)
                } else {
                    Ast::Ident(name)
                }
            }
            Tok::Sym(_) => {
                self.pos -= 1;
                return Err(self.err("unexpected symbol"));
            }
        };
        Ok(ast)
    }

    fn number(&mut self, text: &str, decimal: bool) -> Result<Ast, Error> {
        let value = Decimal::parse(text).ok_or_else(|| self.err("number out of range"))?;
        // A number directly followed by a unit string or calendar word is a quantity.
        let unit = match self.peek() {
            Some(Tok::Str(u)) => Some(u.clone()),
            Some(Tok::Ident(w, false)) if crate::values::calendar_unit(w).is_some() => {
                Some(w.clone())
            }
            _ => None,
        };
        if let Some(unit) = unit {
            self.pos += 1;
            return Ok(Ast::Literal(Literal::Quantity(value, unit)));
        }
        if decimal {
            Ok(Ast::Literal(Literal::Decimal(value)))
        } else {
            match text.parse::<i64>() {
                Ok(i) => Ok(Ast::Literal(Literal::Integer(i))),
                Err(_) => Err(self.err("integer literal out of range")),
            }
        }
    }
}
