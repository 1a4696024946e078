//! The query language's parser: text to [`Expr`], with the position of every
//! tag name kept for error messages.
//!
//! ```text
//! query   := or
//! or      := and ( OR and )*
//! and     := unary ( AND unary )*
//! unary   := NOT unary | primary
//! primary := '(' or ')' | ALL | count | SNAPSHOT number | name [ predicate ]
//! predicate := cmp literal                      -- integer and enumerated fields
//!            | BETWEEN literal AND literal      -- integers, or dates of a behaviour
//!            | IS [ NOT ] NULL
//!            | [ NOT ] IN '(' literal ( ',' literal )* ')'
//!            | WITHIN days                      -- behaviour fields: `7d`
//! count   := COUNT '(' name ( WITHIN days | BETWEEN literal AND literal ) ')' cmp literal
//! cmp     := '=' | '!=' | '<>' | '<' | '<=' | '>' | '>='
//! literal := bare | '"' … '"' | "'" … "'" | today
//! today   := TODAY [ ( '-' | '+' ) days ]          -- a local day number
//! name    := bare | '"' ( any char except '"' and '\' | '\"' | '\\' )* '"'
//! ```
//! Keywords are case-insensitive. BETWEEN, IS, NULL, IN, WITHIN and COUNT are
//! keywords only where a predicate can stand (after a name, or COUNT before
//! '('), and SNAPSHOT only before a number, so tags may still be called
//! `count`, `in` or `snapshot`. TODAY is a word only where a value stands:
//! the local day number (days since 1970-01-01) of the moment the query is
//! evaluated at, in the store's time zone (a rule's own, for a rule), so
//! `last_order_day < TODAY - 90` compares day numbers. Positions are 0-based
//! character offsets.

use crate::error::Result;
use crate::query::lexer::{Tok, syntax, tokenize};

/// Longest query text accepted, in bytes.
pub const MAX_QUERY_BYTES: usize = 64 * 1024;
/// The word for the current local day in a literal: `TODAY`, `TODAY - 90`.
pub const TODAY: &str = "TODAY";

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
    /// A predicate over a field, with the position of the field's name.
    Pred {
        field: String,
        pos: usize,
        pred: Pred,
    },
    /// `SNAPSHOT 17`: the members of audience snapshot 17 (those still
    /// customers), with the position of the keyword.
    Snapshot {
        id: u32,
        pos: usize,
    },
}

/// A comparison operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmpOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

/// A literal as written: its text, whether it was quoted, and its position.
#[derive(Debug, Clone, PartialEq)]
pub struct Lit {
    pub text: String,
    pub quoted: bool,
    pub pos: usize,
}

/// The days a behaviour predicate looks at.
#[derive(Debug, Clone, PartialEq)]
pub enum Window {
    /// The last `days` local days, today included.
    Within { days: u32, pos: usize },
    /// Local dates `lo ..= hi`.
    Between { lo: Lit, hi: Lit },
}

/// What a predicate asks of a field.
#[derive(Debug, Clone, PartialEq)]
pub enum Pred {
    Cmp {
        op: CmpOp,
        /// Where the operator was written.
        op_pos: usize,
        value: Lit,
    },
    Between {
        lo: Lit,
        hi: Lit,
    },
    IsNull {
        negated: bool,
    },
    In {
        values: Vec<Lit>,
        negated: bool,
    },
    Window(Window),
    /// `COUNT(field window) op value`: distinct days with the behaviour.
    Count {
        window: Window,
        op: CmpOp,
        value: Lit,
    },
}

impl Expr {
    /// Every audience snapshot the expression names.
    pub fn snapshot_ids(&self, out: &mut Vec<u32>) {
        match self {
            Expr::Snapshot { id, .. } => out.push(*id),
            Expr::Tag { .. } | Expr::Pred { .. } | Expr::All => {}
            Expr::Not(x) => x.snapshot_ids(out),
            Expr::And(items) | Expr::Or(items) => items.iter().for_each(|i| i.snapshot_ids(out)),
        }
    }

    /// Every tag name the expression mentions.
    pub fn tag_names<'a>(&'a self, out: &mut Vec<&'a str>) {
        match self {
            Expr::Tag { name, .. } => out.push(name),
            Expr::Pred { field, .. } => out.push(field),
            Expr::All | Expr::Snapshot { .. } => {}
            Expr::Not(x) => x.tag_names(out),
            Expr::And(items) | Expr::Or(items) => items.iter().for_each(|i| i.tag_names(out)),
        }
    }
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
            Tok::Name(name)
                if name.eq_ignore_ascii_case("COUNT") && self.peek().0 == Tok::LParen =>
            {
                self.count()
            }
            Tok::Name(name)
                if name.eq_ignore_ascii_case("SNAPSHOT")
                    && matches!(&self.peek().0, Tok::Name(n) if n.bytes().all(|b| b.is_ascii_digit())) =>
            {
                let (tok, at) = self.bump();
                let Tok::Name(digits) = tok else {
                    return Err(syntax(at, "expected a snapshot number"));
                };
                let id = digits
                    .parse::<u32>()
                    .map_err(|_| syntax(at, format!("snapshot {digits} is out of range")))?;
                Ok(Expr::Snapshot { id, pos })
            }
            Tok::Name(name) | Tok::Quoted(name) => self.after_name(name, pos),
            Tok::End if pos == 0 => Err(syntax(0, "empty query")),
            other => Err(syntax(
                pos,
                format!(
                    "expected a tag or field name, ALL, NOT or '(', found {}",
                    other.describe()
                ),
            )),
        }
    }
}

fn is_word(t: &Tok, word: &str) -> bool {
    matches!(t, Tok::Name(n) if n.eq_ignore_ascii_case(word))
}

impl Parser {
    fn expect_word(&mut self, word: &str) -> Result<()> {
        let (tok, at) = self.bump();
        if is_word(&tok, word) {
            Ok(())
        } else {
            Err(syntax(
                at,
                format!("expected {word}, found {}", tok.describe()),
            ))
        }
    }

    fn literal(&mut self) -> Result<Lit> {
        let (tok, pos) = self.bump();
        match tok {
            Tok::Name(text) if text.eq_ignore_ascii_case(TODAY) => self.today(pos),
            Tok::Name(text) => Ok(Lit {
                text,
                quoted: false,
                pos,
            }),
            Tok::Quoted(text) | Tok::Str(text) => Ok(Lit {
                text,
                quoted: true,
                pos,
            }),
            other => Err(syntax(
                pos,
                format!("expected a value, found {}", other.describe()),
            )),
        }
    }

    /// `TODAY`, `TODAY - n` or `TODAY + n` (also written without spaces),
    /// after the word TODAY: one literal, `TODAY`, `TODAY-n` or `TODAY+n`.
    fn today(&mut self, pos: usize) -> Result<Lit> {
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        let sign = match &self.peek().0 {
            Tok::Plus => Some('+'),
            Tok::Name(n) if n == "-" => Some('-'),
            // `TODAY -90`: the minus and the number are one word.
            Tok::Name(n) if n.strip_prefix('-').is_some_and(digits) => {
                let text = format!("{TODAY}{n}");
                self.bump();
                return Ok(Lit {
                    text,
                    quoted: false,
                    pos,
                });
            }
            _ => None,
        };
        let mut text = TODAY.to_string();
        if let Some(sign) = sign {
            self.bump();
            let (tok, at) = self.bump();
            match tok {
                Tok::Name(n) if digits(&n) => {
                    text.push(sign);
                    text.push_str(&n);
                }
                other => {
                    return Err(syntax(
                        at,
                        format!(
                            "expected a number of days after TODAY {sign}, found {}",
                            other.describe()
                        ),
                    ));
                }
            }
        }
        Ok(Lit {
            text,
            quoted: false,
            pos,
        })
    }

    /// `literal AND literal`, after BETWEEN.
    fn bounds(&mut self) -> Result<(Lit, Lit)> {
        let lo = self.literal()?;
        let (and, at) = self.bump();
        if and != Tok::And {
            return Err(syntax(
                at,
                format!("expected AND, found {}", and.describe()),
            ));
        }
        Ok((lo, self.literal()?))
    }

    fn days(&mut self) -> Result<Window> {
        let (tok, pos) = self.bump();
        let days = match &tok {
            Tok::Name(w) => w
                .strip_suffix(['d', 'D'])
                .and_then(|n| n.parse::<u32>().ok())
                .filter(|n| *n >= 1),
            _ => None,
        };
        match days {
            Some(days) => Ok(Window::Within { days, pos }),
            None => Err(syntax(
                pos,
                format!(
                    "expected a number of days such as 7d, found {}",
                    tok.describe()
                ),
            )),
        }
    }

    fn window(&mut self) -> Result<Window> {
        let (tok, at) = self.peek().clone();
        if is_word(&tok, "WITHIN") {
            self.bump();
            self.days()
        } else if is_word(&tok, "BETWEEN") {
            self.bump();
            let (lo, hi) = self.bounds()?;
            Ok(Window::Between { lo, hi })
        } else {
            Err(syntax(
                at,
                format!("expected WITHIN or BETWEEN, found {}", tok.describe()),
            ))
        }
    }

    fn cmp(&mut self) -> Result<CmpOp> {
        match self.bump() {
            (Tok::Op(op), _) => Ok(op),
            (other, at) => Err(syntax(
                at,
                format!(
                    "expected a comparison (=, !=, <, <=, >, >=), found {}",
                    other.describe()
                ),
            )),
        }
    }

    /// `COUNT ( name window ) cmp literal`; the COUNT word is consumed.
    fn count(&mut self) -> Result<Expr> {
        self.bump();
        let (tok, at) = self.bump();
        let field = match tok {
            Tok::Name(n) | Tok::Quoted(n) => n,
            other => {
                return Err(syntax(
                    at,
                    format!("expected a behaviour field, found {}", other.describe()),
                ));
            }
        };
        let window = self.window()?;
        let (close, cat) = self.bump();
        if close != Tok::RParen {
            return Err(syntax(
                cat,
                format!("expected ')' to close COUNT(, found {}", close.describe()),
            ));
        }
        let op = self.cmp()?;
        let value = self.literal()?;
        Ok(Expr::Pred {
            field,
            pos: at,
            pred: Pred::Count { window, op, value },
        })
    }

    /// A name, and the predicate that may follow it.
    fn after_name(&mut self, name: String, pos: usize) -> Result<Expr> {
        let (next, at) = self.peek().clone();
        let pred = match &next {
            Tok::Op(_) => {
                let op = self.cmp()?;
                Pred::Cmp {
                    op,
                    op_pos: at,
                    value: self.literal()?,
                }
            }
            t if is_word(t, "BETWEEN") => {
                self.bump();
                let (lo, hi) = self.bounds()?;
                Pred::Between { lo, hi }
            }
            t if is_word(t, "WITHIN") => {
                self.bump();
                Pred::Window(self.days()?)
            }
            t if is_word(t, "IS") => {
                self.bump();
                let negated = self.peek().0 == Tok::Not;
                if negated {
                    self.bump();
                }
                self.expect_word("NULL")?;
                Pred::IsNull { negated }
            }
            t if is_word(t, "IN") => {
                self.bump();
                Pred::In {
                    values: self.list()?,
                    negated: false,
                }
            }
            Tok::Not
                if self
                    .toks
                    .get(self.at + 1)
                    .is_some_and(|t| is_word(&t.0, "IN")) =>
            {
                self.bump();
                self.bump();
                Pred::In {
                    values: self.list()?,
                    negated: true,
                }
            }
            _ => return Ok(Expr::Tag { name, pos }),
        };
        Ok(Expr::Pred {
            field: name,
            pos,
            pred,
        })
    }

    fn list(&mut self) -> Result<Vec<Lit>> {
        let (open, at) = self.bump();
        if open != Tok::LParen {
            return Err(syntax(
                at,
                format!("expected '(' after IN, found {}", open.describe()),
            ));
        }
        let mut out = vec![self.literal()?];
        loop {
            match self.bump() {
                (Tok::Comma, _) => out.push(self.literal()?),
                (Tok::RParen, _) => return Ok(out),
                (other, at) => {
                    return Err(syntax(
                        at,
                        format!(
                            "expected ',' or ')' in the IN list, found {}",
                            other.describe()
                        ),
                    ));
                }
            }
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
    use crate::error::Error;

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

    /// The literal of `field < <value>`.
    fn cmp_literal(text: &str) -> String {
        match parse(text) {
            Ok(Expr::Pred {
                pred: Pred::Cmp { value, .. },
                ..
            }) => value.text,
            other => panic!("{text}: {other:?}"),
        }
    }

    #[test]
    fn today_with_and_without_spaces() {
        assert_eq!(cmp_literal("d < TODAY"), "TODAY");
        assert_eq!(cmp_literal("d < today - 90"), "TODAY-90");
        assert_eq!(cmp_literal("d < TODAY -90"), "TODAY-90");
        assert_eq!(cmp_literal("d < TODAY-90"), "TODAY-90");
        assert_eq!(cmp_literal("d >= TODAY + 3"), "TODAY+3");
        let (at, msg) = err_at("d < TODAY - x");
        assert_eq!(at, 12);
        assert!(msg.contains("number of days after TODAY -"), "{msg}");
        // A tag may still be called today.
        assert_eq!(parse("today").unwrap(), tag("today", 0));
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

    fn lit(text: &str, quoted: bool, pos: usize) -> Lit {
        Lit {
            text: text.into(),
            quoted,
            pos,
        }
    }

    #[test]
    fn field_predicates() {
        assert_eq!(
            parse("total_spend >= 500000 AND age BETWEEN 25 AND 34").unwrap(),
            Expr::And(vec![
                Expr::Pred {
                    field: "total_spend".into(),
                    pos: 0,
                    pred: Pred::Cmp {
                        op: CmpOp::Ge,
                        op_pos: 12,
                        value: lit("500000", false, 15)
                    }
                },
                Expr::Pred {
                    field: "age".into(),
                    pos: 26,
                    pred: Pred::Between {
                        lo: lit("25", false, 38),
                        hi: lit("34", false, 45)
                    }
                },
            ])
        );
        assert_eq!(
            parse("lifecycle IN (new, 'active') OR x IS NOT NULL").unwrap(),
            Expr::Or(vec![
                Expr::Pred {
                    field: "lifecycle".into(),
                    pos: 0,
                    pred: Pred::In {
                        values: vec![lit("new", false, 14), lit("active", true, 19)],
                        negated: false
                    }
                },
                Expr::Pred {
                    field: "x".into(),
                    pos: 32,
                    pred: Pred::IsNull { negated: true }
                },
            ])
        );
        assert_eq!(
            parse("COUNT(bought WITHIN 90d) >= 3").unwrap(),
            Expr::Pred {
                field: "bought".into(),
                pos: 6,
                pred: Pred::Count {
                    window: Window::Within { days: 90, pos: 20 },
                    op: CmpOp::Ge,
                    value: lit("3", false, 28)
                }
            }
        );
        assert!(matches!(
            parse("v BETWEEN '2026-09-01' AND '2026-11-30'").unwrap(),
            Expr::Pred {
                pred: Pred::Between { .. },
                ..
            }
        ));
        assert!(matches!(
            parse("lifecycle NOT IN (churned) AND NOT age<>-5").unwrap(),
            Expr::And(_)
        ));
        // Predicate words are still fine as tag names elsewhere.
        assert_eq!(
            parse("count AND in").unwrap(),
            Expr::And(vec![tag("count", 0), tag("in", 10)])
        );
        assert_eq!(err_at("age >").0, 5);
        assert_eq!(err_at("seen WITHIN 7").0, 12);
        assert_eq!(err_at("x IS NUL").0, 5);
        assert_eq!(err_at("x IN (a b)").0, 8);
        assert_eq!(err_at("a ! b").0, 2);
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
