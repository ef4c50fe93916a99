//! containerd's filter language, as List (Walk) takes it.
//!
//! ```text
//! selectors := selector ("," selector)*
//! selector  := fieldpath (operator value)?
//! fieldpath := field ("." field)*
//! field     := quoted | [A-Za-z0-9_-]+
//! operator  := "==" | "!=" | "~="
//! value     := quoted | [^\s,]+
//! quoted    := "..." | /.../ | |...|   (Go string escapes)
//! ```
//! Several filters are OR'ed; the selectors of one filter are AND'ed. An empty filter
//! matches everything. Pure: no I/O, tested on literal inputs.

use regex::Regex;

/// A parse error with the byte offset where it happened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("filter {input:?}: at byte {pos}: {msg}")]
pub struct ParseError {
    pub input: String,
    pub pos: usize,
    pub msg: String,
}

#[derive(Debug, Clone)]
enum Op {
    Present,
    Equal(String),
    NotEqual(String),
    Matches(Regex),
}

#[derive(Debug, Clone)]
struct Selector {
    fieldpath: Vec<String>,
    op: Op,
}

/// One parsed filter: all selectors must match.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    selectors: Vec<Selector>,
}

/// Several filters: any may match. No filters match everything.
#[derive(Debug, Clone, Default)]
pub struct AnyFilter {
    filters: Vec<Filter>,
}

/// Something a filter looks at: answers a field path with its value, if present.
pub trait Adaptor {
    fn field(&self, path: &[String]) -> Option<String>;
}

impl Filter {
    pub fn matches(&self, a: &dyn Adaptor) -> bool {
        self.selectors.iter().all(|s| {
            let value = a.field(&s.fieldpath);
            match &s.op {
                Op::Present => value.is_some(),
                Op::Equal(v) => value.as_deref() == Some(v.as_str()),
                // As containerd: an absent field has the value "" here.
                Op::NotEqual(v) => value.as_deref().unwrap_or("") != v,
                Op::Matches(re) => re.is_match(value.as_deref().unwrap_or("")),
            }
        })
    }
}

impl AnyFilter {
    pub fn matches(&self, a: &dyn Adaptor) -> bool {
        self.filters.is_empty() || self.filters.iter().any(|f| f.matches(a))
    }
}

/// Parse the `filters` of a List request (OR'ed).
pub fn parse_all<S: AsRef<str>>(filters: &[S]) -> Result<AnyFilter, ParseError> {
    let filters = filters
        .iter()
        .map(|f| parse(f.as_ref()))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(AnyFilter { filters })
}

/// Parse one filter string.
pub fn parse(input: &str) -> Result<Filter, ParseError> {
    if input.is_empty() {
        return Ok(Filter::default());
    }
    let mut p = Parser {
        input,
        pos: 0,
        value_next: false,
    };
    let mut selectors = vec![p.selector()?];
    loop {
        match p.next_token()? {
            Token::Eof => break,
            Token::Sep(',') => selectors.push(p.selector()?),
            t => return Err(p.err(format!("unexpected {}", t.describe()))),
        }
    }
    Ok(Filter { selectors })
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Eof,
    Field(String),
    Quoted(String),
    Value(String),
    Sep(char),
    Operator(String),
}

impl Token {
    fn describe(&self) -> String {
        match self {
            Token::Eof => "end of input".into(),
            Token::Field(s) => format!("field {s:?}"),
            Token::Quoted(s) => format!("quoted {s:?}"),
            Token::Value(s) => format!("value {s:?}"),
            Token::Sep(c) => format!("{c:?}"),
            Token::Operator(s) => format!("operator {s:?}"),
        }
    }
}

struct Parser<'a> {
    input: &'a str,
    pos: usize,
    /// After an operator the next bare word is a value, not a field.
    value_next: bool,
}

fn is_field_char(c: char) -> bool {
    c == '-' || c == '_' || c.is_ascii_alphanumeric()
}

fn is_quote(c: char) -> bool {
    matches!(c, '"' | '/' | '|')
}

fn is_operator_char(c: char) -> bool {
    matches!(c, '=' | '!' | '~')
}

fn is_value_char(c: char) -> bool {
    c != ',' && !c.is_whitespace() && !c.is_control()
}

impl Parser<'_> {
    fn err(&self, msg: impl Into<String>) -> ParseError {
        ParseError {
            input: self.input.to_string(),
            pos: self.pos,
            msg: msg.into(),
        }
    }

    fn peek_char(&self) -> Option<char> {
        self.input[self.pos..].chars().next()
    }

    fn take_while(&mut self, f: impl Fn(char) -> bool) -> String {
        let start = self.pos;
        while let Some(c) = self.peek_char() {
            if !f(c) {
                break;
            }
            self.pos += c.len_utf8();
        }
        self.input[start..self.pos].to_string()
    }

    fn peek_token(&mut self) -> Result<Token, ParseError> {
        let (pos, value_next) = (self.pos, self.value_next);
        let t = self.next_token();
        self.pos = pos;
        self.value_next = value_next;
        t
    }

    fn next_token(&mut self) -> Result<Token, ParseError> {
        while let Some(c) = self.peek_char() {
            if !c.is_whitespace() {
                break;
            }
            self.pos += c.len_utf8();
        }
        let Some(c) = self.peek_char() else {
            return Ok(Token::Eof);
        };
        if c == '\0' {
            return Err(self.err("unexpected NUL"));
        }
        if is_quote(c) {
            let s = self.quoted(c)?;
            self.value_next = false;
            return Ok(Token::Quoted(s));
        }
        if c == ',' || c == '.' {
            self.pos += 1;
            self.value_next = false;
            return Ok(Token::Sep(c));
        }
        if is_operator_char(c) {
            let op = self.take_while(is_operator_char);
            self.value_next = true;
            return Ok(Token::Operator(op));
        }
        if self.value_next {
            self.value_next = false;
            return Ok(Token::Value(self.take_while(is_value_char)));
        }
        if is_field_char(c) {
            return Ok(Token::Field(self.take_while(is_field_char)));
        }
        Err(self.err(format!("unexpected character {c:?}")))
    }

    /// A quoted string with Go escapes; `quote` is `"`, `/` or `|`.
    fn quoted(&mut self, quote: char) -> Result<String, ParseError> {
        let start = self.pos;
        self.pos += quote.len_utf8();
        let mut out = String::new();
        loop {
            let Some(c) = self.peek_char() else {
                self.pos = start;
                return Err(self.err("quoted literal not terminated"));
            };
            self.pos += c.len_utf8();
            match c {
                c if c == quote => return Ok(out),
                '\n' => {
                    self.pos = start;
                    return Err(self.err("newline in quoted literal"));
                }
                '\\' => out.push(self.escape(quote)?),
                c => out.push(c),
            }
        }
    }

    fn escape(&mut self, quote: char) -> Result<char, ParseError> {
        let Some(c) = self.peek_char() else {
            return Err(self.err("unterminated escape"));
        };
        self.pos += c.len_utf8();
        let simple = match c {
            'a' => Some('\x07'),
            'b' => Some('\x08'),
            'f' => Some('\x0c'),
            'n' => Some('\n'),
            'r' => Some('\r'),
            't' => Some('\t'),
            'v' => Some('\x0b'),
            '\\' => Some('\\'),
            c if c == quote => Some(c),
            _ => None,
        };
        if let Some(s) = simple {
            return Ok(s);
        }
        let (radix, digits, first) = match c {
            '0'..='7' => (8, 2, Some(c)),
            'x' => (16, 2, None),
            'u' => (16, 4, None),
            'U' => (16, 8, None),
            _ => return Err(self.err(format!("illegal escape \\{c}"))),
        };
        let mut s: String = first.into_iter().collect();
        for _ in 0..digits {
            match self.peek_char() {
                Some(d) if d.is_digit(radix) => {
                    s.push(d);
                    self.pos += 1;
                }
                _ => return Err(self.err("illegal numeric escape")),
            }
        }
        u32::from_str_radix(&s, radix)
            .ok()
            .and_then(char::from_u32)
            .ok_or_else(|| self.err(format!("escape {s:?} is not a character")))
    }

    fn field(&mut self) -> Result<String, ParseError> {
        match self.next_token()? {
            Token::Field(s) | Token::Quoted(s) => Ok(s),
            t => Err(self.err(format!("expected field or quoted, got {}", t.describe()))),
        }
    }

    fn selector(&mut self) -> Result<Selector, ParseError> {
        let mut fieldpath = vec![self.field()?];
        while self.peek_token()? == Token::Sep('.') {
            self.next_token()?;
            fieldpath.push(self.field()?);
        }
        let op = match self.peek_token()? {
            Token::Eof | Token::Sep(',') => {
                return Ok(Selector {
                    fieldpath,
                    op: Op::Present,
                });
            }
            Token::Operator(_) => match self.next_token()? {
                Token::Operator(op) => op,
                _ => unreachable!("peeked an operator"),
            },
            t => return Err(self.err(format!("expected an operator, got {}", t.describe()))),
        };
        let value = match self.next_token()? {
            Token::Value(s) | Token::Field(s) | Token::Quoted(s) => s,
            Token::Eof => return Err(self.err("expected value or quoted, got end of input")),
            t => {
                return Err(self.err(format!("expected value or quoted, got {}", t.describe())));
            }
        };
        let op = match op.as_str() {
            "==" => Op::Equal(value),
            "!=" => Op::NotEqual(value),
            "~=" => Op::Matches(
                Regex::new(&value)
                    .map_err(|e| self.err(format!("bad regular expression {value:?}: {e}")))?,
            ),
            other => {
                return Err(self.err(format!(
                    "unsupported operator {other:?} (expected ==, != or ~=)"
                )));
            }
        };
        Ok(Selector { fieldpath, op })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    struct Obj {
        name: &'static str,
        kind: &'static str,
        parent: &'static str,
        labels: HashMap<String, String>,
    }

    impl Adaptor for Obj {
        fn field(&self, path: &[String]) -> Option<String> {
            match path.first()?.as_str() {
                "name" => Some(self.name.into()),
                "kind" => Some(self.kind.into()),
                "parent" => Some(self.parent.into()),
                "labels" => {
                    if self.labels.is_empty() {
                        return None;
                    }
                    self.labels.get(&path[1..].join(".")).cloned()
                }
                _ => None,
            }
        }
    }

    fn obj(name: &'static str, parent: &'static str, labels: &[(&str, &str)]) -> Obj {
        Obj {
            name,
            kind: "active",
            parent,
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    fn m(filters: &[&str], o: &Obj) -> bool {
        parse_all(filters).unwrap().matches(o)
    }

    #[test]
    fn empty_matches_all() {
        let o = obj("a", "", &[]);
        assert!(m(&[], &o));
        assert!(m(&[""], &o));
    }

    #[test]
    fn equality_and_inequality() {
        let o = obj("a-wl", "p", &[("l", "2")]);
        assert!(m(&["name==a-wl"], &o));
        assert!(!m(&["name==a"], &o));
        assert!(m(&["name!=a"], &o));
        assert!(m(&["parent==p"], &o));
        assert!(m(&["labels.l==2"], &o));
        assert!(!m(&["labels.l==3"], &o));
        assert!(m(&["labels.l!=3"], &o));
    }

    #[test]
    fn presence() {
        let with = obj("a", "", &[("l", "1")]);
        let without = obj("b", "", &[("x", "1")]);
        assert!(m(&["labels.l"], &with));
        assert!(!m(&["labels.l"], &without));
        assert!(m(&["name==a,labels.l"], &with));
        assert!(!m(&["name==b,labels.l"], &without));
    }

    #[test]
    fn quoted_field_and_value() {
        let o = obj("a", "", &[("containerd.io/gc.root", "check walk")]);
        assert!(m(&[r#"labels."containerd.io/gc.root"=="check walk""#], &o));
        assert!(m(&[r#"labels."containerd.io/gc.root""#], &o));
        assert!(!m(&[r#"labels.containerd.io"#], &o));
        // Unquoted dots split the path and are joined back for labels.
        let dotted = obj("a", "", &[("a.b", "1")]);
        assert!(m(&["labels.a.b==1"], &dotted));
    }

    #[test]
    fn empty_quoted_value() {
        let child = obj("a", "p", &[]);
        let root = obj("b", "", &[]);
        assert!(m(&[r#"parent!="""#], &child));
        assert!(!m(&[r#"parent!="""#], &root));
        assert!(m(&[r#"parent=="""#], &root));
    }

    #[test]
    fn regex_forms() {
        let o = obj("layer-12", "", &[]);
        assert!(m(&["name~=^layer-[0-9]+$"], &o));
        assert!(m(&["name~=/layer-1./"], &o));
        assert!(m(&["name~=|^lay|"], &o));
        assert!(!m(&["name~=^x"], &o));
    }

    #[test]
    fn or_of_ands() {
        let p = obj("p", "", &[]);
        let q = obj("q", "", &[]);
        let r = obj("r", "", &[]);
        let f = ["name==p", "name==q"];
        assert!(m(&f, &p) && m(&f, &q) && !m(&f, &r));
        assert!(!m(&["name==p,name==q"], &p));
    }

    #[test]
    fn whitespace_is_skipped() {
        let o = obj("a", "p", &[]);
        assert!(m(&[" name == a , parent == p "], &o));
    }

    #[test]
    fn escapes() {
        let o = obj("a", "", &[("k", "x\"y\tz")]);
        assert!(m(&[r#"labels.k=="x\"y\tz""#], &o));
        assert!(m(&[r#"labels.k=="x\x22y\u0009z""#], &o));
    }

    #[test]
    fn errors() {
        for bad in [
            "name==",
            "name=",
            "name===x",
            "==x",
            "name==a,",
            ",name==a",
            "labels.",
            r#"labels."unterminated"#,
            "name~=(",
            "name a",
            r#"labels."\q"==x"#,
            "name@=x",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} should not parse");
        }
        let e = parse("name==a,").unwrap_err();
        assert_eq!(e.input, "name==a,");
    }
}
