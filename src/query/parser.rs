//! The query language's parser: text to [`Expr`], with the position of every
//! tag name kept for error messages.
//!
//! ```text
//! query   := or
//! or      := and ( OR and )*
//! and     := unary ( AND unary )*
//! unary   := NOT unary | primary
//! primary := '(' or ')' | ALL | name
//! name    := bare | '"' ( any char except '"' and '\' | '\"' | '\\' )* '"'
//! ```
//! Keywords are case-insensitive. Positions are 0-based character offsets.

use crate::error::{Error, QueryErrorKind, Result};
use crate::names::{KEYWORDS, is_bare_char};

/// Longest query text accepted, in bytes.
pub const MAX_QUERY_BYTES: usize = 64 * 1024;
/// Deepest nesting of parentheses and NOTs accepted.
pub const MAX_DEPTH: usize = 256;

/// A parsed query.
#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    /// A tag, by name, with the character position where it was written.
    Tag {
        name: String,
        pos: usize,
    },
    /// Every live customer.
    All,
    Not(Box<Expr>),
    And(Vec<Expr>),
    Or(Vec<Expr>),
}

impl Expr {
    /// Every tag name the expression mentions.
    pub fn tag_names<'a>(&'a self, out: &mut Vec<&'a str>) {
        match self {
            Expr::Tag { name, .. } => out.push(name),
            Expr::All => {}
            Expr::Not(x) => x.tag_names(out),
            Expr::And(items) | Expr::Or(items) => items.iter().for_each(|i| i.tag_names(out)),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    LParen,
    RParen,
    And,
    Or,
    Not,
    All,
    Name(String),
    End,
}

impl Tok {
    fn describe(&self) -> String {
        match self {
            Tok::LParen => "'('".into(),
            Tok::RParen => "')'".into(),
            Tok::And => "AND".into(),
            Tok::Or => "OR".into(),
            Tok::Not => "NOT".into(),
            Tok::All => "ALL".into(),
            Tok::Name(n) => format!("tag name {n:?}"),
            Tok::End => "end of query".into(),
        }
    }
}

fn syntax(position: usize, message: impl Into<String>) -> Error {
    Error::Query {
        kind: QueryErrorKind::Syntax,
        position,
        message: message.into(),
    }
}

fn tokenize(text: &str) -> Result<Vec<(Tok, usize)>> {
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
                out.push((Tok::Name(name), start));
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

struct Parser {
    toks: Vec<(Tok, usize)>,
    at: usize,
    depth: usize,
}

impl Parser {
    fn peek(&self) -> &(Tok, usize) {
        &self.toks[self.at.min(self.toks.len() - 1)]
    }

    fn bump(&mut self) -> (Tok, usize) {
        let t = self.peek().clone();
        self.at += 1;
        t
    }

    fn or(&mut self) -> Result<Expr> {
        let mut items = vec![self.and()?];
        while self.peek().0 == Tok::Or {
            self.bump();
            items.push(self.and()?);
        }
        Ok(if items.len() == 1 {
            items.remove(0)
        } else {
            Expr::Or(items)
        })
    }

    fn and(&mut self) -> Result<Expr> {
        let mut items = vec![self.unary()?];
        while self.peek().0 == Tok::And {
            self.bump();
            items.push(self.unary()?);
        }
        Ok(if items.len() == 1 {
            items.remove(0)
        } else {
            Expr::And(items)
        })
    }

    fn enter(&mut self, pos: usize) -> Result<()> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(syntax(
                pos,
                format!("query nests deeper than {MAX_DEPTH} levels"),
            ));
        }
        Ok(())
    }

    fn unary(&mut self) -> Result<Expr> {
        if self.peek().0 == Tok::Not {
            let (_, pos) = self.bump();
            self.enter(pos)?;
            let inner = self.unary()?;
            self.depth -= 1;
            return Ok(Expr::Not(Box::new(inner)));
        }
        self.primary()
    }

    fn primary(&mut self) -> Result<Expr> {
        let (tok, pos) = self.bump();
        match tok {
            Tok::LParen => {
                self.enter(pos)?;
                let inner = self.or()?;
                self.depth -= 1;
                let (close, at) = self.bump();
                if close != Tok::RParen {
                    return Err(syntax(
                        at,
                        format!(
                            "expected ')' to close the '(' at {pos}, found {}",
                            close.describe()
                        ),
                    ));
                }
                Ok(inner)
            }
            Tok::All => Ok(Expr::All),
            Tok::Name(name) => Ok(Expr::Tag { name, pos }),
            Tok::End if pos == 0 => Err(syntax(0, "empty query")),
            other => Err(syntax(
                pos,
                format!(
                    "expected a tag name, ALL, NOT or '(', found {}",
                    other.describe()
                ),
            )),
        }
    }
}

/// Parses a query.
pub fn parse(text: &str) -> Result<Expr> {
    if text.len() > MAX_QUERY_BYTES {
        return Err(syntax(
            0,
            format!("query is longer than {MAX_QUERY_BYTES} bytes"),
        ));
    }
    let mut p = Parser {
        toks: tokenize(text)?,
        at: 0,
        depth: 0,
    };
    let expr = p.or()?;
    let (tok, pos) = p.bump();
    if tok != Tok::End {
        let hint = match tok {
            Tok::RParen => "unmatched ')'".to_string(),
            other => format!(
                "expected AND, OR or end of query, found {}",
                other.describe()
            ),
        };
        return Err(syntax(pos, hint));
    }
    Ok(expr)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tag(name: &str, pos: usize) -> Expr {
        Expr::Tag {
            name: name.into(),
            pos,
        }
    }

    fn err_at(text: &str) -> (usize, String) {
        match parse(text) {
            Err(Error::Query {
                position, message, ..
            }) => (position, message),
            other => panic!("expected a query error for {text:?}, got {other:?}"),
        }
    }

    #[test]
    fn precedence_not_and_or() {
        assert_eq!(
            parse("a OR b and not c").unwrap(),
            Expr::Or(vec![
                tag("a", 0),
                Expr::And(vec![tag("b", 5), Expr::Not(Box::new(tag("c", 15)))])
            ])
        );
        assert_eq!(
            parse("(a OR b) AND c").unwrap(),
            Expr::And(vec![Expr::Or(vec![tag("a", 1), tag("b", 6)]), tag("c", 13)])
        );
        assert_eq!(
            parse("NOT NOT all").unwrap(),
            Expr::Not(Box::new(Expr::Not(Box::new(Expr::All))))
        );
    }

    #[test]
    fn chinese_and_quoted_names() {
        assert_eq!(
            parse("高价值用户 AND (常购护肤品 OR 尝试新品) AND NOT 潜在流失").unwrap(),
            Expr::And(vec![
                tag("高价值用户", 0),
                Expr::Or(vec![tag("常购护肤品", 11), tag("尝试新品", 20)]),
                Expr::Not(Box::new(tag("潜在流失", 34))),
            ])
        );
        assert_eq!(parse(r#""a \"b\" \\ c""#).unwrap(), tag(r#"a "b" \ c"#, 0));
        assert_eq!(parse(r#""and""#).unwrap(), tag("and", 0));
        assert_eq!(
            parse("channel:jd.pin-1_x").unwrap(),
            tag("channel:jd.pin-1_x", 0)
        );
    }

    #[test]
    fn errors_carry_positions() {
        assert_eq!(err_at("").0, 0);
        assert_eq!(err_at("   ").0, 3);
        assert_eq!(err_at("a AND").0, 5);
        assert_eq!(err_at("a b").0, 2);
        assert_eq!(err_at("(a OR b").0, 7);
        assert_eq!(err_at("a)").0, 1);
        assert_eq!(err_at("高价值 AND $x").0, 8);
        assert_eq!(err_at("x OR \"abc").0, 5);
        assert_eq!(err_at("\"\"").0, 0);
        assert!(err_at("a b").1.contains("expected AND, OR"));
        let deep = "(".repeat(300) + "a" + &")".repeat(300);
        assert!(err_at(&deep).1.contains("deeper"));
    }
}
