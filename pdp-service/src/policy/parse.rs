//! YAML text to a small located node tree.
//!
//! We build our own tree from the event stream of `granit-parser` (the
//! maintained YAML 1.2 parser behind `serde-saphyr`) instead of deriving
//! `Deserialize`: serde stops at the first error, while operators need every
//! mistake of a refused policy at once, each with line, column and rule id.

use serde_saphyr::granit_parser::{Event, Options, Parser, ScalarStyle, Span};

use super::PolicyError;

/// Largest policy text accepted (a 10,000-rule policy is ~1-2 MiB).
pub(crate) const MAX_POLICY_BYTES: usize = 16 * 1024 * 1024;

/// A YAML node with its position (1-based line and column).
#[derive(Debug, Clone)]
pub(crate) struct Node {
    pub line: u32,
    pub col: u32,
    pub kind: Kind,
}

#[derive(Debug, Clone)]
pub(crate) enum Kind {
    /// A scalar; `plain` is false for quoted and block scalars (always
    /// strings, never null / bool / int).
    Scalar {
        value: String,
        plain: bool,
    },
    Seq(Vec<Node>),
    Map(Vec<(Node, Node)>),
}

impl Node {
    fn at(span: &Span, kind: Kind) -> Node {
        Node {
            line: u32::try_from(span.start.line()).unwrap_or(u32::MAX),
            col: u32::try_from(span.start.col() + 1).unwrap_or(u32::MAX),
            kind,
        }
    }

    /// True for a YAML null (`~`, `null`, or an empty plain scalar).
    pub fn is_null(&self) -> bool {
        matches!(&self.kind, Kind::Scalar { value, plain: true }
            if value.is_empty() || value == "~" || value.eq_ignore_ascii_case("null"))
    }

    /// Short description of the node type, for messages.
    pub fn type_name(&self) -> &'static str {
        match &self.kind {
            Kind::Scalar { .. } if self.is_null() => "null",
            Kind::Scalar { .. } => "a scalar",
            Kind::Seq(_) => "a sequence",
            Kind::Map(_) => "a mapping",
        }
    }
}

fn err_at(line: u32, col: u32, message: impl Into<String>) -> PolicyError {
    PolicyError {
        line,
        column: col,
        rule_id: None,
        path: String::new(),
        message: message.into(),
    }
}

enum Frame {
    Seq(Node),
    Map(Node, Option<Node>),
}

/// Parse `yaml` into exactly one document's root node.
pub(crate) fn parse(yaml: &str) -> Result<Node, Vec<PolicyError>> {
    if yaml.len() > MAX_POLICY_BYTES {
        return Err(vec![err_at(
            0,
            0,
            format!("policy is larger than {MAX_POLICY_BYTES} bytes"),
        )]);
    }
    let mut opts = Options::default();
    opts.emit_comments = false;
    let parser = Parser::new_from_str_with_options(yaml, opts);
    let mut stack: Vec<Frame> = Vec::new();
    let mut root: Option<Node> = None;
    let mut documents = 0usize;
    let mut errors = Vec::new();

    for item in parser {
        let (event, span) = match item {
            Ok(x) => x,
            Err(e) => {
                let m = e.marker();
                errors.push(err_at(
                    u32::try_from(m.line()).unwrap_or(u32::MAX),
                    u32::try_from(m.col() + 1).unwrap_or(u32::MAX),
                    format!("YAML syntax error: {}", e.info()),
                ));
                return Err(errors);
            }
        };
        let node = match event {
            Event::DocumentStart(..) => {
                documents += 1;
                if documents > 1 {
                    errors.push(
                        Node::at(&span, Kind::Seq(vec![]))
                            .error("a policy file holds exactly one YAML document"),
                    );
                    return Err(errors);
                }
                continue;
            }
            Event::Alias(_) | Event::UnresolvedAlias(_) => {
                errors.push(
                    Node::at(&span, Kind::Seq(vec![]))
                        .error("YAML aliases are not supported in policies"),
                );
                // Keep the tree shape: an alias stands for a null node.
                Node::at(
                    &span,
                    Kind::Scalar {
                        value: String::new(),
                        plain: true,
                    },
                )
            }
            Event::Scalar(value, style, _anchor, _tag) => Node::at(
                &span,
                Kind::Scalar {
                    value: value.into_owned(),
                    plain: style == ScalarStyle::Plain,
                },
            ),
            Event::SequenceStart(..) => {
                stack.push(Frame::Seq(Node::at(&span, Kind::Seq(Vec::new()))));
                continue;
            }
            Event::MappingStart(..) => {
                stack.push(Frame::Map(Node::at(&span, Kind::Map(Vec::new())), None));
                continue;
            }
            Event::SequenceEnd | Event::MappingEnd => match stack.pop() {
                Some(Frame::Seq(n)) | Some(Frame::Map(n, None)) => n,
                Some(Frame::Map(n, Some(_))) => n, // unreachable with a well-formed stream
                None => continue,
            },
            _ => continue,
        };
        // Attach the completed node to its parent (or make it the root).
        match stack.last_mut() {
            Some(Frame::Seq(parent)) => {
                if let Kind::Seq(items) = &mut parent.kind {
                    items.push(node);
                }
            }
            Some(Frame::Map(parent, pending)) => match pending.take() {
                None => *pending = Some(node),
                Some(key) => {
                    if let Kind::Map(entries) = &mut parent.kind {
                        entries.push((key, node));
                    }
                }
            },
            None => root = Some(node),
        }
    }
    match root {
        Some(r) if errors.is_empty() => Ok(r),
        Some(_) => Err(errors),
        None => {
            errors.push(err_at(
                1,
                1,
                "empty policy: expected a mapping with `version: 1`",
            ));
            Err(errors)
        }
    }
}

impl Node {
    /// An error located at this node.
    pub fn error(&self, message: impl Into<String>) -> PolicyError {
        err_at(self.line, self.col, message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_located_tree() {
        let n = parse("a: 1\nb:\n  - x\n  - 'y'\n").unwrap();
        let Kind::Map(entries) = &n.kind else {
            panic!("not a map")
        };
        assert_eq!(entries.len(), 2);
        let (k, v) = &entries[1];
        assert_eq!((k.line, k.col), (2, 1));
        let Kind::Seq(items) = &v.kind else {
            panic!("not a seq")
        };
        assert_eq!((items[1].line, items[1].col), (4, 5));
        assert!(matches!(&items[1].kind, Kind::Scalar { plain: false, .. }));
    }

    #[test]
    fn syntax_errors_are_located() {
        let e = parse("a: [1, 2\nb: 3\n").unwrap_err();
        assert_eq!(e.len(), 1);
        assert!(
            e[0].line >= 1 && e[0].message.contains("YAML syntax error"),
            "{:?}",
            e
        );
        assert!(parse("").is_err());
        assert!(parse("a: 1\n---\nb: 2\n").is_err());
        let e = parse("a: &x 1\nb: *x\n").unwrap_err();
        assert_eq!(e[0].line, 2);
    }
}
