//! String encodings for `encode()`, `decode()`, `escape()` and `unescape()`.

const BASE64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
const BASE64_URL: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// Applies `function` (`encode`, `decode`, `escape`, `unescape`) in `format`; `None` when the
/// format is unknown or the input is not valid for it.
pub(crate) fn apply(function: &str, format: &str, s: &str) -> Option<String> {
    match (function, format) {
        ("encode", "base64") => Some(base64_encode(s.as_bytes(), BASE64)),
        ("encode", "urlbase64") => Some(base64_encode(s.as_bytes(), BASE64_URL)),
        ("encode", "hex") => Some(s.bytes().map(|b| format!("{b:02x}")).collect()),
        ("decode", "base64") => String::from_utf8(base64_decode(s, BASE64)?).ok(),
        ("decode", "urlbase64") => String::from_utf8(base64_decode(s, BASE64_URL)?).ok(),
        ("decode", "hex") => {
            if !s.len().is_multiple_of(2) {
                return None;
            }
            let bytes: Option<Vec<u8>> = (0..s.len())
                .step_by(2)
                .map(|i| s.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
                .collect();
            String::from_utf8(bytes?).ok()
        }
        ("escape", "html") => Some(
            s.replace('&', "&amp;")
                .replace('<', "&lt;")
                .replace('>', "&gt;")
                .replace('"', "&quot;")
                .replace('\'', "&#39;"),
        ),
        ("unescape", "html") => Some(
            s.replace("&lt;", "<")
                .replace("&gt;", ">")
                .replace("&quot;", "\"")
                .replace("&#39;", "'")
                .replace("&apos;", "'")
                .replace("&amp;", "&"),
        ),
        ("escape", "json") => Some(s.replace('\\', "\\\\").replace('"', "\\\"")),
        ("unescape", "json") => Some(s.replace("\\\"", "\"").replace("\\\\", "\\")),
        _ => None,
    }
}

fn base64_encode(bytes: &[u8], alphabet: &[u8; 64]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(alphabet[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn base64_decode(s: &str, alphabet: &[u8; 64]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() / 4 * 3);
    let mut acc = 0u32;
    let mut bits = 0;
    for c in s.bytes().filter(|c| *c != b'=') {
        let v = alphabet.iter().position(|a| *a == c)? as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}
