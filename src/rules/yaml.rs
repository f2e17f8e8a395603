//! The parse pass: YAML text → a tree of [`Yaml`] nodes, each with the line it starts on.
//!
//! saphyr-parser turns the text into events, each with its span; [`Reader`] assembles them into
//! a tree that keeps what validation needs and serde_yaml would lose: every node's line, map
//! entries in file order with duplicate keys kept, and scalars as written (`1.10`, `010`), with
//! their style so that a plain `~` is null and a quoted `'~'` is text. Aliases are replaced by a
//! copy of their anchor's node, lines included (so an error inside an alias is reported where
//! the anchored node is written, as serde_yaml and yaml.v2 do). A syntax error has saphyr-parser's
//! message and line: libyaml's words (`while parsing a block collection, did not find expected
//! '-' indicator`), at libyaml's line except inside a token (an unclosed quote): its first line.
//!
//! Unlike serde_yaml, a tag outside the core schema (`!foo`) is refused at its node's line (`YAML
//! tag '!foo' is not supported in rules files`; serde_yaml read it as an enum, refused as `invalid
//! type: enum`, or as `{"!foo": value}` in metadata), and a block scalar (`|`, `>`) is placed on
//! the line its content starts on rather than its header's.

use std::borrow::Cow;
use std::collections::HashMap;

use saphyr_parser::{Event, Parser, ScalarStyle, Span, StrInput};

/// One YAML node and the 1-based line it starts on (for an anchored node, the anchor's line).
#[derive(Debug, Clone)]
pub(crate) struct Yaml {
    pub(crate) line: usize,
    pub(crate) node: Node,
}

/// The entries of a map, in file order; a key written twice stays twice.
pub(crate) type Entries = [(Yaml, Yaml)];

/// The shape of a [`Yaml`] node.
#[derive(Debug, Clone)]
pub(crate) enum Node {
    /// A scalar as written. `plain` is true for an untagged plain scalar (or one tagged with a
    /// core type other than `!!str`): only those are read as null, booleans or numbers.
    Scalar {
        text: String,
        plain: bool,
    },
    List(Vec<Yaml>),
    Map(Vec<(Yaml, Yaml)>),
}

/// What a scalar means under the YAML 1.2 core schema as serde_yaml applies it (quoted scalars are
/// always text; plain `010` is text too, as a number may not have leading zeros).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Scalar<'a> {
    Null,
    Bool(bool),
    Unsigned(u64),
    Signed(i64),
    /// An integer beyond 64 bits (but within 128), as written: no field takes one, and messages
    /// and metadata show its text.
    Huge(&'a str),
    Float(f64),
    Text(&'a str),
}

/// A rules document that cannot be read, from either pass: the 1-based line (when the problem
/// is at a place in the text) and what is wrong.
#[derive(Debug)]
pub(crate) struct Invalid {
    pub(crate) line: Option<usize>,
    pub(crate) message: String,
}

/// Aliases may copy at most this many nodes per document ("billion laughs" guard).
const ALIAS_BUDGET: usize = 1_000_000;
/// Collections may nest at most this deep (serde_yaml's limit too).
const MAX_DEPTH: usize = 128;

/// Parses one document. A text with no document at all reads as a null at its last line.
///
/// saphyr-parser refuses a tab right after a `:` indicator, which YAML (and libyaml) allow as
/// separating white space: each such tab is turned into a space, keeping every position, and the
/// text read again.
pub(crate) fn parse(text: &str) -> Result<Yaml, Invalid> {
    let mut patched = Cow::Borrowed(text);
    let mut tries = 0;
    loop {
        let mut reader = Reader::new(&patched);
        let error = match reader.document() {
            Ok(root) => return Ok(root),
            Err(error) => error,
        };
        match reader.tab_after_colon {
            Some(tab) if tries < 10_000 => patched.to_mut().replace_range(tab..=tab, " "),
            _ => return Err(error),
        }
        tries += 1;
    }
}

/// A problem at `line`.
fn refused<T>(line: usize, message: impl Into<String>) -> Result<T, Invalid> {
    let (line, message) = (Some(line), message.into());
    Err(Invalid { line, message })
}

/// Assembles the parser's events into [`Yaml`] nodes.
struct Reader<'t> {
    /// The events of `text`.
    parser: Parser<'t, StrInput<'t>>,
    /// The text, to find a tab the parser refused.
    text: &'t str,
    /// The byte offset of a tab right after `:` the parser refused, if it did.
    tab_after_colon: Option<usize>,
    /// Anchor id → the anchored node and how many nodes it is.
    anchors: HashMap<usize, (Yaml, usize)>,
    /// Nodes made so far, alias copies included: how big an anchored node is.
    nodes: usize,
    /// Nodes copied by aliases so far, at most [`ALIAS_BUDGET`].
    copied: usize,
}

impl<'t> Reader<'t> {
    fn new(text: &'t str) -> Self {
        Reader {
            parser: Parser::new_from_str(text),
            text,
            tab_after_colon: None,
            anchors: HashMap::new(),
            nodes: 0,
            copied: 0,
        }
    }

    fn next(&mut self) -> Result<(Event<'t>, Span), Invalid> {
        match self.parser.next_event() {
            Some(Ok(event)) => Ok(event),
            Some(Err(err)) => {
                if err.info().starts_with("':' must be followed by") {
                    // The error points at the tab (a character index) or just past it.
                    let from = self.byte_at(err.marker().index().saturating_sub(1));
                    let mut near = self.text[from..].char_indices().take(2);
                    self.tab_after_colon =
                        near.find(|&(_, c)| c == '\t').map(|(tab, _)| from + tab);
                }
                let message = match err.info() {
                    "while parsing node, found unknown anchor" => "unknown anchor", // libyaml's
                    info => info,
                };
                // saphyr places an error at the start of the token it was scanning; a tab found
                // inside it (a tab-indented line after a plain scalar) is reported where the tab
                // is, as libyaml did.
                let mut line = err.marker().line();
                if message.contains("found a tab") {
                    let rest = &self.text[self.byte_at(err.marker().index())..];
                    if let Some(tab) = rest.find('\t') {
                        line += rest[..tab].matches('\n').count();
                    }
                }
                refused(line, message)
            }
            None => Ok((Event::StreamEnd, Span::default())),
        }
    }

    /// The byte offset of the character at `index` (the parser's markers count characters), or
    /// the text's end.
    fn byte_at(&self, index: usize) -> usize {
        let mut chars = self.text.char_indices();
        chars.nth(index).map_or(self.text.len(), |(at, _)| at)
    }

    fn document(&mut self) -> Result<Yaml, Invalid> {
        let mut root = None;
        loop {
            match self.next()? {
                (Event::StreamEnd, span) => {
                    // No document at all: a null.
                    let (line, text) = (span.start.line(), String::new());
                    let node = Node::Scalar { text, plain: true };
                    return Ok(root.unwrap_or(Yaml { line, node }));
                }
                (Event::DocumentStart(_), _) if root.is_some() => {
                    let message = "deserializing from YAML containing more than one document \
                                   is not supported";
                    let (line, message) = (None, message.to_owned());
                    return Err(Invalid { line, message });
                }
                (Event::StreamStart | Event::DocumentStart(_) | Event::DocumentEnd, _) => {}
                (event, span) => root = Some(self.node(event, span, 0)?),
            }
        }
    }

    fn node(&mut self, event: Event<'t>, span: Span, depth: usize) -> Result<Yaml, Invalid> {
        let line = span.start.line();
        if depth > MAX_DEPTH {
            return refused(line, "recursion limit exceeded");
        }
        // Refused before a collection's content is read: the tag is the first problem.
        if let Event::Scalar(.., Some(tag))
        | Event::SequenceStart(_, Some(tag))
        | Event::MappingStart(_, Some(tag)) = &event
        {
            if !tag.is_yaml_core_schema() {
                let message = format!("YAML tag '{tag}' is not supported in rules files");
                return refused(line, message);
            }
        }
        let first = self.nodes;
        let (anchor, node) = match event {
            Event::Alias(id) => {
                let Some((node, count)) = self.anchors.get(&id) else {
                    return refused(line, "unknown anchor");
                };
                self.nodes += count;
                self.copied += count;
                if self.copied > ALIAS_BUDGET {
                    return refused(line, "repetition limit exceeded");
                }
                return Ok(node.clone());
            }
            Event::Scalar(text, style, anchor, tag) => {
                // A core tag (others are refused above) other than `!!str` reads as plain.
                let plain = tag.map_or(style == ScalarStyle::Plain, |tag| tag.suffix != "str");
                let text = text.into_owned();
                (anchor, Node::Scalar { text, plain })
            }
            Event::SequenceStart(anchor, _) => {
                let items = std::iter::from_fn(|| self.child(depth).transpose());
                (anchor, Node::List(items.collect::<Result<_, _>>()?))
            }
            Event::MappingStart(anchor, _) => {
                let mut entries = Vec::new();
                while let Some(key) = self.child(depth)? {
                    let (event, span) = self.next()?;
                    entries.push((key, self.node(event, span, depth + 1)?));
                }
                (anchor, Node::Map(entries))
            }
            _ => return refused(line, "unexpected YAML event"),
        };
        let yaml = Yaml { line, node };
        self.nodes += 1;
        if anchor > 0 {
            self.anchors
                .insert(anchor, (yaml.clone(), self.nodes - first));
        }
        Ok(yaml)
    }

    /// The next item (or key) of a collection at `depth`, or `None` at the collection's end.
    fn child(&mut self, depth: usize) -> Result<Option<Yaml>, Invalid> {
        match self.next()? {
            (Event::SequenceEnd | Event::MappingEnd, _) => Ok(None),
            (event, span) => self.node(event, span, depth + 1).map(Some),
        }
    }
}

impl Yaml {
    /// The entries, if this is a map.
    pub(crate) fn map(&self) -> Option<&Entries> {
        match &self.node {
            Node::Map(entries) => Some(entries),
            _ => None,
        }
    }

    /// The items, if this is a list.
    pub(crate) fn list(&self) -> Option<&[Yaml]> {
        match &self.node {
            Node::List(items) => Some(items),
            _ => None,
        }
    }

    /// The scalar's meaning, or `None` for a list or map.
    pub(crate) fn scalar(&self) -> Option<Scalar<'_>> {
        match &self.node {
            Node::Scalar { text, plain: true } => Some(resolve(text)),
            Node::Scalar { text, plain: false } => Some(Scalar::Text(text)),
            _ => None,
        }
    }

    /// Whether this is null (`~`, `null`, or nothing at all).
    pub(crate) fn is_null(&self) -> bool {
        self.scalar() == Some(Scalar::Null)
    }

    /// How a validation message names this node when it is not what was expected: `'text'`, a
    /// number or boolean as written by serde, `null`, `a list`, `a map`.
    pub(crate) fn found(&self) -> String {
        match self.scalar() {
            Some(Scalar::Null) => "null".to_owned(),
            Some(Scalar::Bool(b)) => b.to_string(),
            Some(Scalar::Unsigned(n)) => n.to_string(),
            Some(Scalar::Signed(n)) => n.to_string(),
            Some(Scalar::Huge(n)) => n.to_owned(),
            Some(Scalar::Float(f)) => f.to_string(),
            Some(Scalar::Text(s)) => format!("'{s}'"),
            None if self.list().is_some() => "a list".to_owned(),
            None => "a map".to_owned(),
        }
    }
}

/// The core-schema meaning of a plain scalar, with serde_yaml's rules: `~`/`null`/empty is null,
/// only `true`/`false` (three casings) are booleans, integers may be `0x`/`0o`/`0b` prefixed
/// and signed but not zero-padded, floats include `.inf` and `.nan`.
pub(crate) fn resolve(text: &str) -> Scalar<'_> {
    match text {
        "" | "~" | "null" | "Null" | "NULL" => return Scalar::Null,
        "true" | "True" | "TRUE" => return Scalar::Bool(true),
        "false" | "False" | "FALSE" => return Scalar::Bool(false),
        // No number starts with a letter (`inf` and `nan` are only numbers with a dot).
        _ if text.starts_with(char::is_alphabetic) => return Scalar::Text(text),
        _ => {}
    }
    let negative = text.starts_with('-');
    let unsigned = text.strip_prefix(['+', '-']).unwrap_or(text);
    let zero_padded = unsigned.len() > 1
        && unsigned.starts_with('0')
        && unsigned[1..].bytes().all(|b| b.is_ascii_digit());
    if zero_padded {
        return Scalar::Text(text);
    }
    let (radix, digits) = match unsigned.get(..2) {
        Some("0x") => (16, &unsigned[2..]),
        Some("0o") => (8, &unsigned[2..]),
        Some("0b") => (2, &unsigned[2..]),
        _ => (10, unsigned),
    };
    if !digits.is_empty() && !digits.starts_with(['+', '-']) {
        if let Ok(n) = u128::from_str_radix(digits, radix) {
            return match (negative, u64::try_from(n), i64::try_from(n)) {
                (false, Ok(n), _) => Scalar::Unsigned(n),
                (true, _, Ok(n)) => Scalar::Signed(-n),
                (true, _, _) if n == 1 << 63 => Scalar::Signed(i64::MIN),
                _ => Scalar::Huge(text),
            };
        }
    }
    if unsigned.starts_with(['+', '-']) {
        return Scalar::Text(text);
    }
    let float = match unsigned {
        ".inf" | ".Inf" | ".INF" => Some(f64::INFINITY),
        ".nan" | ".NaN" | ".NAN" if !text.starts_with(['+', '-']) => Some(f64::NAN),
        _ => unsigned.parse::<f64>().ok().filter(|f| f.is_finite()),
    };
    match float {
        Some(f) if negative => Scalar::Float(-f),
        Some(f) => Scalar::Float(f),
        None => Scalar::Text(text),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_scalars_resolve_like_serde_yaml() {
        for (text, want) in [
            ("", Scalar::Null),
            ("~", Scalar::Null),
            ("True", Scalar::Bool(true)),
            ("yes", Scalar::Text("yes")),
            ("10", Scalar::Unsigned(10)),
            ("+7", Scalar::Unsigned(7)),
            ("-1", Scalar::Signed(-1)),
            ("0x10", Scalar::Unsigned(16)),
            ("0o10", Scalar::Unsigned(8)),
            ("010", Scalar::Text("010")),
            ("1.10", Scalar::Float(1.1)),
            ("1e3", Scalar::Float(1000.0)),
            ("-.inf", Scalar::Float(f64::NEG_INFINITY)),
            ("99999999999999999999", Scalar::Huge("99999999999999999999")),
            ("ten", Scalar::Text("ten")),
        ] {
            assert_eq!(resolve(text), want, "{text:?}");
        }
        assert!(matches!(resolve(".nan"), Scalar::Float(f) if f.is_nan()));
    }

    #[test]
    fn nodes_keep_lines_order_duplicates_and_anchor_lines() {
        let text = "a: &x\n  k: 1\n  k: 2\nb: *x\nc: '~'\n";
        let root = parse(text).unwrap();
        let Node::Map(entries) = &root.node else {
            panic!("{root:?}")
        };
        assert_eq!(entries.len(), 3);
        let (Node::Map(a), Node::Map(b)) = (&entries[0].1.node, &entries[1].1.node) else {
            panic!("{entries:?}")
        };
        assert_eq!((a.len(), b.len()), (2, 2));
        assert_eq!(
            (entries[0].1.line, entries[1].1.line),
            (1, 1),
            "the anchor's line"
        );
        assert_eq!(b[1].0.line, 3);
        assert_eq!(entries[2].1.scalar(), Some(Scalar::Text("~")));
    }

    #[test]
    fn a_tab_indented_line_is_reported_at_its_own_line() {
        let err = parse("domain: d\n\tdescriptors: []\n").unwrap_err();
        assert_eq!(err.line, Some(2), "{err:?}");
        assert!(err.message.contains("tab"), "{err:?}");
    }

    #[test]
    fn a_tab_after_a_colon_separates_like_a_space() {
        let root = parse("a:\tx\nb: {c:\t1, d: 'q:\tr'}\n").unwrap();
        let Node::Map(entries) = &root.node else {
            panic!("{root:?}")
        };
        assert_eq!(entries[0].1.scalar(), Some(Scalar::Text("x")));
        let inner = entries[1].1.map().unwrap();
        assert_eq!(inner[0].1.scalar(), Some(Scalar::Unsigned(1)));
        assert_eq!(
            inner[1].1.scalar(),
            Some(Scalar::Text("q:\tr")),
            "quoted text as written"
        );
        assert_eq!(inner[1].0.line, 2);
    }

    #[test]
    fn documents_syntax_errors_and_alias_bombs() {
        assert_eq!(parse("").unwrap().line, 1);
        let empty = parse("# only a comment\n").unwrap();
        assert!(empty.is_null() && empty.line == 2);
        assert!(parse("---\n").unwrap().is_null());
        let err = parse("a: 1\n---\nb: 2\n").unwrap_err();
        assert!(err.message.contains("more than one document"), "{err:?}");
        let err = parse("a: [\n").unwrap_err();
        assert!(err.line.is_some(), "{err:?}");
        let err = parse("a: *nope\n").unwrap_err();
        assert_eq!(
            (err.line, err.message.as_str()),
            (Some(1), "unknown anchor")
        );
        let mut bomb = "a: &a0 [x, x, x, x, x, x, x, x, x, x]\n".to_owned();
        for i in 1..8 {
            let p = i - 1;
            bomb += &format!("a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n");
        }
        let err = parse(&bomb).unwrap_err();
        assert_eq!(err.message, "repetition limit exceeded");
        let deep = "[".repeat(200) + &"]".repeat(200);
        assert_eq!(
            parse(&deep).unwrap_err().message,
            "recursion limit exceeded"
        );
    }
}
