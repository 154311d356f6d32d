//! `htmlChecks()`: whether a narrative's XHTML keeps FHIR's rules (R4 narrative.html#xhtml):
//! one `div` in the XHTML namespace, only the basic formatting elements and attributes of HTML
//! 4.0 (no scripts, forms, frames, objects, head/body, base/link or event handlers), links
//! and images without `javascript:`, and some non-whitespace content.
//!
//! A list of what is allowed, not of what is refused: an element or attribute this module
//! does not know fails, as FHIR's "only the basic html formatting elements" says.

/// The XHTML namespace every narrative element is in.
const XHTML: &str = "http://www.w3.org/1999/xhtml";

/// Elements of HTML 4.0 chapters 7–11 and 15 (formatting, lists, tables, links, images).
const ELEMENTS: &[&str] = &[
    "a",
    "abbr",
    "acronym",
    "address",
    "b",
    "bdo",
    "big",
    "blockquote",
    "br",
    "caption",
    "cite",
    "code",
    "col",
    "colgroup",
    "dd",
    "dfn",
    "del",
    "div",
    "dl",
    "dt",
    "em",
    "h1",
    "h2",
    "h3",
    "h4",
    "h5",
    "h6",
    "hr",
    "i",
    "img",
    "ins",
    "kbd",
    "li",
    "ol",
    "p",
    "pre",
    "q",
    "samp",
    "small",
    "span",
    "strong",
    "sub",
    "sup",
    "table",
    "tbody",
    "td",
    "tfoot",
    "th",
    "thead",
    "tr",
    "tt",
    "ul",
    "var",
];

/// Attributes of those elements (no event handlers such as `onclick`).
const ATTRIBUTES: &[&str] = &[
    "abbr",
    "accesskey",
    "align",
    "alt",
    "axis",
    "border",
    "cellpadding",
    "cellspacing",
    "char",
    "charoff",
    "charset",
    "cite",
    "class",
    "colspan",
    "compact",
    "coords",
    "datetime",
    "dir",
    "frame",
    "headers",
    "height",
    "href",
    "hreflang",
    "hspace",
    "id",
    "lang",
    "longdesc",
    "name",
    "nowrap",
    "rel",
    "rev",
    "rowspan",
    "rules",
    "scope",
    "shape",
    "span",
    "src",
    "start",
    "style",
    "summary",
    "tabindex",
    "title",
    "type",
    "valign",
    "value",
    "vspace",
    "width",
];

/// Deepest element nesting checked (a bound on the walk, whatever the input).
const MAX_DEPTH: usize = 256;

/// Whether `text` is a narrative `div` that keeps the rules.
pub(crate) fn html_checks(text: &str) -> bool {
    let Ok(document) = roxmltree::Document::parse(text) else {
        return false;
    };
    let root = document.root_element();
    if root.tag_name().name() != "div" || root.tag_name().namespace() != Some(XHTML) {
        return false;
    }
    let mut has_content = false;
    element_ok(root, 0, &mut has_content) && has_content
}

fn element_ok(node: roxmltree::Node<'_, '_>, depth: usize, has_content: &mut bool) -> bool {
    if depth > MAX_DEPTH {
        return false;
    }
    let name = node.tag_name().name();
    if node.tag_name().namespace() != Some(XHTML) || !ELEMENTS.contains(&name) {
        return false;
    }
    // An image counts as content, as text does.
    if name == "img" {
        *has_content = true;
    }
    for attribute in node.attributes() {
        let local = attribute.name();
        let allowed = match attribute.namespace() {
            None => ATTRIBUTES.contains(&local),
            Some("http://www.w3.org/XML/1998/namespace") => local == "lang",
            Some(_) => false,
        };
        if !allowed {
            return false;
        }
        if matches!(local, "href" | "src" | "longdesc" | "cite") && is_script_url(attribute.value())
        {
            return false;
        }
    }
    for child in node.children() {
        if child.is_element() {
            if !element_ok(child, depth + 1, has_content) {
                return false;
            }
        } else if child.is_text() && child.text().is_some_and(|t| !t.trim().is_empty()) {
            *has_content = true;
        }
    }
    true
}

/// A URL that runs code when followed (`javascript:`, `vbscript:`, `data:text/html`),
/// whatever its case and the whitespace a browser ignores.
fn is_script_url(url: &str) -> bool {
    let compact: String = url
        .chars()
        .filter(|c| !c.is_whitespace() && !c.is_control())
        .flat_map(char::to_lowercase)
        .collect();
    compact.starts_with("javascript:")
        || compact.starts_with("vbscript:")
        || compact.starts_with("data:text/html")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn div(inner: &str) -> String {
        format!("<div xmlns=\"http://www.w3.org/1999/xhtml\">{inner}</div>")
    }

    #[test]
    fn basic_formatting_passes() {
        for inner in [
            "text",
            "<p>a <b>b</b> <i>c</i></p>",
            "<table border=\"1\"><tr><td colspan=\"2\">x</td></tr></table>",
            "<a href=\"http://example.org\">link</a>",
            "<span style=\"color: red\" xml:lang=\"en\">x</span>",
            "<img src=\"#photo\" alt=\"\"/>",
            "<ul><li>one</li></ul>",
        ] {
            assert!(html_checks(&div(inner)), "{inner}");
        }
    }

    #[test]
    fn scripts_forms_handlers_and_empty_narratives_fail() {
        for inner in [
            "<script>alert(1)</script>",
            "<p onclick=\"alert(1)\">x</p>",
            "<form><input/></form>",
            "<iframe src=\"http://example.org\"></iframe>",
            "<object>x</object>",
            "<a href=\" JavaScript:alert(1)\">x</a>",
            "<img src=\"data:text/html;base64,AAAA\"/>",
            "<p xmlns=\"http://example.org\">x</p>",
            "",
            "   <p> </p>",
        ] {
            assert!(!html_checks(&div(inner)), "{inner}");
        }
        // Not a div, not in the XHTML namespace, or not XML.
        assert!(!html_checks(
            "<p xmlns=\"http://www.w3.org/1999/xhtml\">x</p>"
        ));
        assert!(!html_checks("<div>x</div>"));
        assert!(!html_checks(
            "<div xmlns=\"http://www.w3.org/1999/xhtml\">x"
        ));
        assert!(!html_checks("not xml"));
    }
}
