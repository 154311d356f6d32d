//! Tokenizer for FHIRPath expression text.

use crate::Error;

/// One lexical token with the byte offset where it starts.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Tok {
    /// A plain or backtick-delimited identifier; keywords are identifiers the parser interprets.
    Ident(String, bool),
    Str(String),
    /// Number text and whether it has a fractional part.
    Number(String, bool),
    /// `@...` literal text without the `@`.
    DateTime(String),
    /// `%name` environment variable.
    Env(String),
    /// `$this`, `$index`, `$total`.
    Special(String),
    Sym(&'static str),
}

const SYMBOLS: [&str; 22] = [
    "!=", "!~", "<=", ">=", ".", ",", "(", ")", "[", "]", "{", "}", "+", "-", "*", "/", "&", "|",
    "=", "~", "<", ">",
];

/// Splits `text` into tokens, skipping whitespace and comments.
pub(crate) fn tokenize(text: &str) -> Result<Vec<(usize, Tok)>, Error> {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        if c.is_ascii_whitespace() {
            i += 1;
            continue;
        }
        if text[i..].starts_with("//") {
            while i < bytes.len() && bytes[i] != b'\n' {
                i += 1;
            }
            continue;
        }
        if text[i..].starts_with("/*") {
            match text[i + 2..].find("*/") {
                Some(end) => i = i + 2 + end + 2,
                None => return Err(parse_err(i, "unterminated comment")),
            }
            continue;
        }
        let start = i;
        if c.is_ascii_alphabetic() || c == b'_' {
            while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
                i += 1;
            }
            out.push((start, Tok::Ident(text[start..i].to_string(), false)));
        } else if c == b'`' {
            let (s, next) = quoted(text, i, b'`')?;
            out.push((start, Tok::Ident(s, true)));
            i = next;
        } else if c == b'\'' {
            let (s, next) = quoted(text, i, b'\'')?;
            out.push((start, Tok::Str(s)));
            i = next;
        } else if c.is_ascii_digit() {
            while i < bytes.len() && bytes[i].is_ascii_digit() {
                i += 1;
            }
            let mut decimal = false;
            if i + 1 < bytes.len() && bytes[i] == b'.' && bytes[i + 1].is_ascii_digit() {
                decimal = true;
                i += 1;
                while i < bytes.len() && bytes[i].is_ascii_digit() {
                    i += 1;
                }
            }
            out.push((start, Tok::Number(text[start..i].to_string(), decimal)));
        } else if c == b'@' {
            i += 1;
            let end = scan_datetime(bytes, i);
            if end == i {
                return Err(parse_err(start, "malformed date/time literal"));
            }
            out.push((start, Tok::DateTime(text[i..end].to_string())));
            i = end;
        } else if c == b'%' {
            i += 1;
            if i < bytes.len() && (bytes[i] == b'`' || bytes[i] == b'\'') {
                let (s, next) = quoted(text, i, bytes[i])?;
                out.push((start, Tok::Env(s)));
                i = next;
            } else {
                let s = i;
                while i < bytes.len()
                    && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_' || bytes[i] == b'-')
                {
                    i += 1;
                }
                if s == i {
                    return Err(parse_err(start, "missing variable name after %"));
                }
                out.push((start, Tok::Env(text[s..i].to_string())));
            }
        } else if c == b'$' {
            i += 1;
            let s = i;
            while i < bytes.len() && bytes[i].is_ascii_alphabetic() {
                i += 1;
            }
            out.push((start, Tok::Special(text[s..i].to_string())));
        } else if let Some(sym) = SYMBOLS.iter().find(|s| text[i..].starts_with(**s)) {
            out.push((start, Tok::Sym(sym)));
            i += sym.len();
        } else {
            return Err(parse_err(start, "unexpected character"));
        }
    }
    Ok(out)
}

fn parse_err(position: usize, message: &str) -> Error {
    Error::Parse {
        position,
        message: message.to_string(),
    }
}

/// Reads a quoted string starting at `start` (the opening quote); returns it unescaped and the
/// offset after the closing quote.
fn quoted(text: &str, start: usize, quote: u8) -> Result<(String, usize), Error> {
    let mut out = String::new();
    let mut chars = text[start + 1..].char_indices();
    while let Some((off, ch)) = chars.next() {
        if ch as u32 == quote as u32 {
            return Ok((out, start + 1 + off + 1));
        }
        if ch == '\\' {
            let Some((_, esc)) = chars.next() else { break };
            match esc {
                'n' => out.push('\n'),
                'r' => out.push('\r'),
                't' => out.push('\t'),
                'f' => out.push('\u{c}'),
                'u' => {
                    let mut code = 0u32;
                    for _ in 0..4 {
                        let digit = chars.next().and_then(|(_, d)| d.to_digit(16));
                        let Some(d) = digit else {
                            return Err(parse_err(start, "bad \\u escape"));
                        };
                        code = code * 16 + d;
                    }
                    out.push(char::from_u32(code).unwrap_or('\u{fffd}'));
                }
                other => out.push(other),
            }
        } else {
            out.push(ch);
        }
    }
    Err(parse_err(start, "unterminated string"))
}

fn digits(bytes: &[u8], i: usize, n: usize) -> bool {
    i + n <= bytes.len() && bytes[i..i + n].iter().all(u8::is_ascii_digit)
}

/// Returns the end offset of a date/time literal body starting at `i` (after `@`).
fn scan_datetime(bytes: &[u8], mut i: usize) -> usize {
    let at = |k: usize| bytes.get(k).copied();
    if at(i) == Some(b'T') {
        return scan_time(bytes, i + 1).unwrap_or(i);
    }
    if !digits(bytes, i, 4) {
        return i;
    }
    i += 4;
    if at(i) == Some(b'-') && digits(bytes, i + 1, 2) {
        i += 3;
        if at(i) == Some(b'-') && digits(bytes, i + 1, 2) {
            i += 3;
        }
    }
    if at(i) == Some(b'T') {
        i += 1;
        if let Some(end) = scan_time(bytes, i) {
            i = end;
            if at(i) == Some(b'Z') {
                i += 1;
            } else if matches!(at(i), Some(b'+' | b'-'))
                && digits(bytes, i + 1, 2)
                && at(i + 3) == Some(b':')
                && digits(bytes, i + 4, 2)
            {
                i += 6;
            }
        }
    }
    i
}

fn scan_time(bytes: &[u8], mut i: usize) -> Option<usize> {
    let at = |k: usize| bytes.get(k).copied();
    if !digits(bytes, i, 2) {
        return None;
    }
    i += 2;
    if at(i) == Some(b':') && digits(bytes, i + 1, 2) {
        i += 3;
        if at(i) == Some(b':') && digits(bytes, i + 1, 2) {
            i += 3;
            if at(i) == Some(b'.') && digits(bytes, i + 1, 1) {
                i += 1;
                while at(i).is_some_and(|b| b.is_ascii_digit()) {
                    i += 1;
                }
            }
        }
    }
    Some(i)
}
