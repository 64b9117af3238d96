//! containerd's filter syntax (its `filters` package), which the snapshots API's Walk takes and
//! a snapshotter must apply itself: containerd's metadata layer asks, for instance, for
//! `labels."containerd.io/snapshot.ref"==sha256:...,parent=="ns/3/sha256:..."` to find the
//! snapshot a remote Prepare committed.
//!
//! ```text
//! filters   := one or more strings: a snapshot matches if any of them matches
//! selectors := selector ("," selector)*          all must match
//! selector  := fieldpath [operator value]        no operator: the field is present
//! fieldpath := field ("." field)*
//! field     := quoted | [A-Za-z0-9_]+
//! operator  := "==" | "!=" | "~="               "~=": the value is a regular expression
//! value     := quoted | [^\s,]+
//! quoted    := "..." (Go string escapes) | /.../ or |...| (raw; \/ or \| escapes the delimiter)
//! ```
//!
//! Snapshot fields, as containerd adapts them: `kind` (`active`, `view`, `committed`), `name`,
//! `parent` (always present, empty for none) and `labels.KEY` (the rest of the path joined
//! with dots, present if the label is set).

use crate::snapshot::{Info, Kind};

/// Why a filter does not parse.
#[derive(Debug, thiserror::Error)]
#[error("filter {filter:?}: {reason} at byte {at}")]
pub struct FilterError {
    /// The filter text.
    pub filter: String,
    /// What is wrong.
    pub reason: String,
    /// Where.
    pub at: usize,
}

/// Parsed filters: any of the alternatives, each all of its selectors.
#[derive(Clone, Debug, Default)]
pub struct Filters {
    alternatives: Vec<Vec<Selector>>,
}

#[derive(Clone, Debug)]
struct Selector {
    fieldpath: Vec<String>,
    operator: Operator,
}

#[derive(Clone, Debug)]
enum Operator {
    Present,
    Equal(String),
    NotEqual(String),
    Matches(regex::Regex),
}

/// Longest filter text parsed: the API gives no bound, and a filter is a few labels.
const MAX_FILTER_LEN: usize = 64 << 10;

impl Filters {
    /// Parses every filter string; none (or only empty ones) match everything.
    pub fn parse<S: AsRef<str>>(filters: &[S]) -> Result<Self, FilterError> {
        let mut alternatives = Vec::new();
        for filter in filters {
            let filter = filter.as_ref();
            if filter.is_empty() {
                // containerd: an empty filter matches all.
                return Ok(Filters::default());
            }
            alternatives.push(Parser::new(filter)?.selectors()?);
        }
        Ok(Filters { alternatives })
    }

    /// Whether `info` passes.
    pub fn matches(&self, info: &Info) -> bool {
        self.alternatives.is_empty()
            || self
                .alternatives
                .iter()
                .any(|selectors| selectors.iter().all(|s| s.matches(info)))
    }
}

impl Selector {
    fn matches(&self, info: &Info) -> bool {
        let field = field_of(info, &self.fieldpath);
        match &self.operator {
            Operator::Present => field.is_some(),
            Operator::Equal(value) => field.as_deref() == Some(value.as_str()),
            // As containerd: an absent field is "not equal" to any value.
            Operator::NotEqual(value) => field.as_deref() != Some(value.as_str()),
            Operator::Matches(re) => field.is_some_and(|f| re.is_match(&f)),
        }
    }
}

/// A snapshot's field, as containerd's snapshot adaptor gives it.
fn field_of(info: &Info, path: &[String]) -> Option<String> {
    match path.first().map(String::as_str)? {
        "kind" if path.len() == 1 => Some(
            match info.kind {
                Kind::Active => "active",
                Kind::View => "view",
                Kind::Committed => "committed",
            }
            .to_string(),
        ),
        "name" if path.len() == 1 => Some(info.name.clone()),
        "parent" if path.len() == 1 => Some(info.parent.clone().unwrap_or_default()),
        "labels" if path.len() > 1 => info.labels.get(&path[1..].join(".")).cloned(),
        _ => None,
    }
}

struct Parser<'a> {
    text: &'a str,
    at: usize,
}

impl<'a> Parser<'a> {
    fn new(text: &'a str) -> Result<Self, FilterError> {
        let parser = Parser { text, at: 0 };
        if text.len() > MAX_FILTER_LEN {
            return Err(parser.error(format!("longer than {MAX_FILTER_LEN} bytes")));
        }
        Ok(parser)
    }

    fn error(&self, reason: impl Into<String>) -> FilterError {
        FilterError {
            filter: self.text.to_string(),
            reason: reason.into(),
            at: self.at,
        }
    }

    fn peek(&self) -> Option<char> {
        self.text[self.at..].chars().next()
    }

    fn skip_space(&mut self) {
        while let Some(c) = self.peek().filter(|c| c.is_whitespace()) {
            self.at += c.len_utf8();
        }
    }

    fn selectors(mut self) -> Result<Vec<Selector>, FilterError> {
        let mut selectors = vec![self.selector()?];
        loop {
            self.skip_space();
            match self.peek() {
                None => return Ok(selectors),
                Some(',') => {
                    self.at += 1;
                    selectors.push(self.selector()?);
                }
                Some(other) => return Err(self.error(format!("expected ',' before {other:?}"))),
            }
        }
    }

    fn selector(&mut self) -> Result<Selector, FilterError> {
        let mut fieldpath = vec![self.field()?];
        loop {
            self.skip_space();
            if self.peek() != Some('.') {
                break;
            }
            self.at += 1;
            fieldpath.push(self.field()?);
        }
        self.skip_space();
        let operator = match self.peek() {
            None | Some(',') => Operator::Present,
            Some(_) => {
                let start = self.at;
                while let Some(c) = self.peek().filter(|c| matches!(c, '=' | '!' | '~')) {
                    self.at += c.len_utf8();
                }
                let operator = &self.text[start..self.at];
                self.skip_space();
                let value = self.value()?;
                match operator {
                    "==" => Operator::Equal(value),
                    "!=" => Operator::NotEqual(value),
                    "~=" => Operator::Matches(
                        regex::Regex::new(&value)
                            .map_err(|e| self.error(format!("bad regular expression: {e}")))?,
                    ),
                    "" => return Err(self.error("expected an operator (==, != or ~=)")),
                    other => return Err(self.error(format!("unknown operator {other:?}"))),
                }
            }
        };
        Ok(Selector {
            fieldpath,
            operator,
        })
    }

    fn field(&mut self) -> Result<String, FilterError> {
        self.skip_space();
        if let Some(quote) = self.peek().filter(|c| matches!(c, '"' | '/' | '|')) {
            return self.quoted(quote);
        }
        let start = self.at;
        while let Some(c) = self
            .peek()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
        {
            self.at += c.len_utf8();
        }
        if self.at == start {
            return Err(self.error("expected a field name"));
        }
        Ok(self.text[start..self.at].to_string())
    }

    fn value(&mut self) -> Result<String, FilterError> {
        if let Some(quote) = self.peek().filter(|c| matches!(c, '"' | '/' | '|')) {
            return self.quoted(quote);
        }
        let start = self.at;
        while let Some(c) = self.peek().filter(|c| *c != ',' && !c.is_whitespace()) {
            self.at += c.len_utf8();
        }
        if self.at == start {
            return Err(self.error("expected a value"));
        }
        Ok(self.text[start..self.at].to_string())
    }

    /// A quoted field or value starting at the quote: Go escapes inside `"..."`, raw text
    /// inside `/.../` and `|...|` but for the escaped delimiter.
    fn quoted(&mut self, quote: char) -> Result<String, FilterError> {
        self.at += 1;
        let mut out = String::new();
        loop {
            let Some(c) = self.peek() else {
                return Err(self.error("unterminated quote"));
            };
            self.at += c.len_utf8();
            match c {
                c if c == quote => return Ok(out),
                '\\' => {
                    let Some(escaped) = self.peek() else {
                        return Err(self.error("unterminated escape"));
                    };
                    self.at += escaped.len_utf8();
                    if quote != '"' {
                        if escaped != quote {
                            out.push('\\');
                        }
                        out.push(escaped);
                        continue;
                    }
                    match escaped {
                        'n' => out.push('\n'),
                        't' => out.push('\t'),
                        'r' => out.push('\r'),
                        '0' => out.push('\0'),
                        'a' => out.push('\u{7}'),
                        'b' => out.push('\u{8}'),
                        'f' => out.push('\u{c}'),
                        'v' => out.push('\u{b}'),
                        '\\' | '"' | '\'' => out.push(escaped),
                        'x' | 'u' | 'U' => {
                            let digits = match escaped {
                                'x' => 2,
                                'u' => 4,
                                _ => 8,
                            };
                            let hex = self.text.get(self.at..self.at + digits).unwrap_or("");
                            let code = u32::from_str_radix(hex, 16)
                                .ok()
                                .filter(|_| hex.len() == digits)
                                .and_then(char::from_u32)
                                .ok_or_else(|| self.error("bad escape"))?;
                            self.at += digits;
                            out.push(code);
                        }
                        other => return Err(self.error(format!("unknown escape \\{other}"))),
                    }
                }
                c => out.push(c),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn info(name: &str, kind: Kind, parent: Option<&str>, labels: &[(&str, &str)]) -> Info {
        Info {
            name: name.into(),
            parent: parent.map(str::to_string),
            kind,
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
            created_ns: 0,
            updated_ns: 0,
        }
    }

    fn passes(filters: &[&str], info: &Info) -> bool {
        Filters::parse(filters).unwrap().matches(info)
    }

    #[test]
    fn containerds_filters_select_snapshots_as_containerd_does() {
        let chain = "sha256:1ee7";
        let remote = info(
            chain,
            Kind::Committed,
            Some("ns/3/sha256:base"),
            &[
                ("containerd.io/snapshot.ref", chain),
                ("containerd.io/gc.root", "x"),
            ],
        );
        let active = info("a-wl", Kind::Active, Some("p"), &[("l", "2")]);
        // What containerd's metadata layer sends after a remote Prepare.
        let lookup =
            format!("labels.\"containerd.io/snapshot.ref\"=={chain},parent==\"ns/3/sha256:base\"");
        assert!(passes(&[&lookup], &remote));
        assert!(!passes(&[&lookup], &active));
        assert!(
            passes(&[], &active) && passes(&[""], &active),
            "none match all"
        );
        // Any string may match (OR); within one, all selectors (AND).
        assert!(passes(&["name==p", "name==a-wl"], &active));
        assert!(!passes(&["name==a-wl,labels.l==3"], &active));
        assert!(passes(&["kind==active,labels.l"], &active));
        assert!(!passes(&["kind==committed"], &active));
        assert!(passes(&["parent==p"], &active));
        assert!(passes(&["parent!=\"\""], &active));
        assert!(!passes(
            &["parent!=\"\""],
            &info("base", Kind::Committed, None, &[])
        ));
        assert!(passes(&["labels.l!=3"], &active));
        assert!(
            passes(&["labels.missing!=3"], &active),
            "absent is not equal"
        );
        assert!(!passes(&["labels.missing"], &active));
        // Unquoted label keys join the path back with dots; others need quotes.
        let dotted = info("d", Kind::View, None, &[("a.b_c", "1")]);
        assert!(passes(&["labels.a.b_c==1"], &dotted));
        assert!(passes(&["labels.\"containerd.io/gc.root\"==x"], &remote));
        assert!(passes(&["name~=/^a-/"], &active));
        assert!(passes(&["name~=|a-w.|"], &active));
        assert!(!passes(&["name~=\"^p$\""], &active));
        assert!(passes(&[" name == a-wl , kind == active "], &active));
    }

    #[test]
    fn malformed_filters_are_refused_with_where() {
        for bad in [
            "name=",
            "name===x",
            "name=>x",
            ",name==x",
            "name==x,",
            "labels.\"unterminated==x",
            "name~=/(/",
            "labels.containerd.io/gc.root",
            "name x",
            "=x",
        ] {
            let error = Filters::parse(&[bad]).unwrap_err();
            assert_eq!(error.filter, bad);
        }
        assert!(Filters::parse(&["x".repeat(MAX_FILTER_LEN + 1)]).is_err());
    }
}
