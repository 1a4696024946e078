//! The query language's lexer: text to tokens, each with its 0-based
//! character position (for error messages). Knows the keywords and the
//! quoting rules of names and literals; the grammar is `parser.rs`'s.

use crate::error::{Error, QueryErrorKind, Result};
use crate::names::{KEYWORDS, is_bare_char};
use crate::query::parser::CmpOp;

/// A token of the query language.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Tok {
    LParen,
    RParen,
    And,
    Or,
    Not,
    All,
    Name(String),
    /// A double-quoted name.
    Quoted(String),
    /// A single-quoted literal.
    Str(String),
    Op(CmpOp),
    Comma,
    /// `+`, only in `TODAY + n`.
    Plus,
    End,
}

impl Tok {
    pub(super) fn describe(&self) -> String {
        match self {
            Tok::LParen => "'('".into(),
            Tok::RParen => "')'".into(),
            Tok::And => "AND".into(),
            Tok::Or => "OR".into(),
            Tok::Not => "NOT".into(),
            Tok::All => "ALL".into(),
            Tok::Name(n) | Tok::Quoted(n) => format!("name {n:?}"),
            Tok::Str(s) => format!("'{s}'"),
            Tok::Op(op) => format!("{op:?} operator"),
            Tok::Comma => "','".into(),
            Tok::Plus => "'+'".into(),
            Tok::End => "end of query".into(),
        }
    }
}

pub(super) fn syntax(position: usize, message: impl Into<String>) -> Error {
    Error::Query {
        kind: QueryErrorKind::Syntax,
        position,
        message: message.into(),
    }
}

/// The tokens of `text`, each with its character position, ending with
/// [`Tok::End`].
pub(super) fn tokenize(text: &str) -> Result<Vec<(Tok, usize)>> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
            continue;
        }
        let start = i;
        match c {
            '(' => {
                out.push((Tok::LParen, start));
                i += 1;
            }
            ')' => {
                out.push((Tok::RParen, start));
                i += 1;
            }
            '"' => {
                i += 1;
                let mut name = String::new();
                loop {
                    match chars.get(i) {
                        None => return Err(syntax(start, "unterminated quoted tag name")),
                        Some('"') => {
                            i += 1;
                            break;
                        }
                        Some('\\') => match chars.get(i + 1) {
                            Some(&e @ ('"' | '\\')) => {
                                name.push(e);
                                i += 2;
                            }
                            _ => {
                                return Err(syntax(
                                    i,
                                    "bad escape: only \\\" and \\\\ are allowed in a quoted name",
                                ));
                            }
                        },
                        Some(&ch) => {
                            name.push(ch);
                            i += 1;
                        }
                    }
                }
                if name.is_empty() {
                    return Err(syntax(start, "empty quoted tag name"));
                }
                out.push((Tok::Quoted(name), start));
            }
            '\'' => {
                i += 1;
                let mut text = String::new();
                loop {
                    match chars.get(i) {
                        None => return Err(syntax(start, "unterminated quoted literal")),
                        Some('\'') if chars.get(i + 1) == Some(&'\'') => {
                            text.push('\'');
                            i += 2;
                        }
                        Some('\'') => {
                            i += 1;
                            break;
                        }
                        Some(&ch) => {
                            text.push(ch);
                            i += 1;
                        }
                    }
                }
                out.push((Tok::Str(text), start));
            }
            ',' => {
                out.push((Tok::Comma, start));
                i += 1;
            }
            '+' => {
                out.push((Tok::Plus, start));
                i += 1;
            }
            '=' | '!' | '<' | '>' => {
                let next = chars.get(i + 1).copied();
                let (op, len) = match (c, next) {
                    ('=', _) => (CmpOp::Eq, 1),
                    ('!', Some('=')) => (CmpOp::Ne, 2),
                    ('<', Some('>')) => (CmpOp::Ne, 2),
                    ('<', Some('=')) => (CmpOp::Le, 2),
                    ('<', _) => (CmpOp::Lt, 1),
                    ('>', Some('=')) => (CmpOp::Ge, 2),
                    ('>', _) => (CmpOp::Gt, 1),
                    _ => return Err(syntax(start, "unexpected '!' (did you mean '!='?)")),
                };
                out.push((Tok::Op(op), start));
                i += len;
            }
            c if is_bare_char(c) => {
                while i < chars.len() && is_bare_char(chars[i]) {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                let tok = match KEYWORDS.iter().find(|k| k.eq_ignore_ascii_case(&word)) {
                    Some(&"AND") => Tok::And,
                    Some(&"OR") => Tok::Or,
                    Some(&"NOT") => Tok::Not,
                    Some(&"ALL") => Tok::All,
                    _ => Tok::Name(word),
                };
                out.push((tok, start));
            }
            other => {
                return Err(syntax(
                    start,
                    format!("unexpected character {other:?} (quote tag names that contain it)"),
                ));
            }
        }
    }
    out.push((Tok::End, chars.len()));
    Ok(out)
}
