//! Splitting a command line into its parts: words with quotes, a query
//! after a keyword, queries separated by `;`, flags; and lines continued
//! on the next. Shared by every command's parser.

/// Splits arguments on white space; double quotes group, with `\"` and `\\`.
pub fn split_args(s: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let Some(&c) = chars.peek() else {
            return Ok(out);
        };
        let mut word = String::new();
        if c == '"' {
            chars.next();
            loop {
                match chars.next() {
                    None => return Err("unterminated quote".into()),
                    Some('"') => break,
                    Some('\\') => match chars.next() {
                        Some(e @ ('"' | '\\')) => word.push(e),
                        _ => {
                            return Err(
                                "bad escape: only \\\" and \\\\ are allowed in quotes".into()
                            );
                        }
                    },
                    Some(ch) => word.push(ch),
                }
            }
        } else {
            while let Some(&ch) = chars.peek() {
                if ch.is_whitespace() {
                    break;
                }
                word.push(ch);
                chars.next();
            }
        }
        out.push(word);
    }
}

pub(super) fn first_word(line: &str) -> (&str, &str) {
    let line = line.trim();
    match line.find(char::is_whitespace) {
        Some(i) => (&line[..i], line[i..].trim()),
        None => (line, ""),
    }
}

pub(super) fn need(rest: &str, what: &str, usage: &str) -> Result<(), String> {
    if rest.is_empty() {
        Err(format!("{what} is missing; usage: {usage}"))
    } else {
        Ok(())
    }
}

/// Splits `text` at the last case-insensitive ` word ` (surrounded by white space).
pub(super) fn rsplit_word<'a>(text: &'a str, word: &str) -> Option<(&'a str, &'a str)> {
    let lower = text.to_lowercase();
    let pat = format!(" {word} ");
    // Lowercasing keeps byte offsets for ASCII words; find on the original when it does not.
    if lower.len() != text.len() {
        let i = text.rfind(&pat)?;
        return Some((text[..i].trim(), text[i + pat.len()..].trim()));
    }
    let i = lower.rfind(&pat)?;
    Some((text[..i].trim(), text[i + pat.len()..].trim()))
}

/// Splits `head over query` at the first ` over ` (case-insensitive).
pub(super) fn split_over(text: &str) -> Option<(&str, &str)> {
    let lower = text.to_ascii_lowercase();
    let i = lower.find(" over ")?;
    let (head, query) = (text[..i].trim(), text[i + 6..].trim());
    (!head.is_empty() && !query.is_empty()).then_some((head, query))
}

/// Splits at `;` outside quotes; drops empty parts.
pub(super) fn split_queries(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for c in text.chars() {
        match (quote, c) {
            (Some('"'), '\\') if !escaped => {
                escaped = true;
                cur.push(c);
                continue;
            }
            (Some(q), c) if c == q && !escaped => quote = None,
            (None, '"' | '\'') => quote = Some(c),
            (None, ';') => {
                out.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        escaped = false;
        cur.push(c);
    }
    out.push(cur);
    out.into_iter()
        .map(|q| q.trim().to_string())
        .filter(|q| !q.is_empty())
        .collect()
}

/// Removes `flag` (any case) from `args`; true when it was there.
pub(super) fn take_flag(args: &mut Vec<String>, flag: &str) -> bool {
    match args.iter().position(|a| a.eq_ignore_ascii_case(flag)) {
        Some(i) => {
            args.remove(i);
            true
        }
        None => false,
    }
}

/// True when a line leaves a parenthesis or a double quote open, or ends with `\`.
pub fn is_incomplete(text: &str) -> bool {
    if text.trim_end().ends_with('\\') {
        return true;
    }
    let (mut depth, mut in_quote, mut escaped) = (0i64, false, false);
    for c in text.chars() {
        if in_quote {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => in_quote = false,
                _ => {}
            }
        } else {
            match c {
                '"' => in_quote = true,
                '(' => depth += 1,
                ')' => depth -= 1,
                _ => {}
            }
        }
    }
    in_quote || depth > 0
}

/// Joins continuation lines: a trailing `\` is dropped, lines are joined by a space.
pub fn join_lines(text: &str) -> String {
    text.lines()
        .map(|l| l.trim_end().strip_suffix('\\').unwrap_or(l).trim())
        .collect::<Vec<_>>()
        .join(" ")
}
