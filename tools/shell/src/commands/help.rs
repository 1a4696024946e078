//! `help`: the list of commands and one command in detail, wrapped to the
//! terminal. The texts themselves sit beside each command's parser.

use super::SPECS;
use crate::table;

/// Widest usage column of the command list; longer usages put their
/// summary on the next line.
const USAGE_COLUMN: usize = 34;

/// `text` broken at spaces into lines of at most `width` display columns
/// (a word longer than that stands alone).
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut line = String::new();
    for word in text.split(' ').filter(|w| !w.is_empty()) {
        if !line.is_empty() && table::width(&line) + 1 + table::width(word) > width {
            lines.push(std::mem::take(&mut line));
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    if !line.is_empty() || lines.is_empty() {
        lines.push(line);
    }
    lines
}

/// `text` wrapped to `columns`, every line after the first indented by
/// `indent` spaces, appended to `out` with a newline after each line.
fn push_wrapped(out: &mut String, first: &str, text: &str, indent: usize, columns: usize) {
    let room = columns.saturating_sub(indent).max(20);
    for (i, line) in wrap(text, room).into_iter().enumerate() {
        if i == 0 {
            out.push_str(first);
        } else {
            out.push_str(&" ".repeat(indent));
        }
        out.push_str(&line);
        out.push('\n');
    }
}

/// The help text, every command or one in detail, wrapped to `columns`
/// (the terminal's width; at least 40 are used).
pub fn help(topic: Option<&str>, columns: usize) -> Result<String, String> {
    let columns = columns.max(40);
    match topic {
        None => {
            let usage_col = SPECS
                .iter()
                .map(|d| table::width(d.usage))
                .filter(|&w| w <= USAGE_COLUMN)
                .max()
                .unwrap_or(USAGE_COLUMN);
            let mut out = String::new();
            push_wrapped(
                &mut out,
                "",
                "Commands (a query uses AND, OR, NOT, parentheses and ALL; quote tag names with spaces):",
                0,
                columns,
            );
            let indent = 2 + usage_col + 2;
            // Too narrow for two columns: each usage on its own line.
            let two_columns = columns >= indent + 30;
            for d in SPECS {
                let usage_width = table::width(d.usage);
                if !two_columns {
                    push_wrapped(&mut out, "  ", d.usage, 6, columns);
                    push_wrapped(&mut out, "      ", d.summary, 6, columns);
                } else if usage_width <= usage_col {
                    let first = format!("  {}{}  ", d.usage, " ".repeat(usage_col - usage_width));
                    push_wrapped(&mut out, &first, d.summary, indent, columns);
                } else {
                    push_wrapped(&mut out, "  ", d.usage, 6, columns);
                    push_wrapped(&mut out, &" ".repeat(indent), d.summary, indent, columns);
                }
            }
            push_wrapped(
                &mut out,
                "",
                "A line that leaves a parenthesis or quote open, or ends with \\, continues on the next.",
                0,
                columns,
            );
            Ok(out.trim_end().to_string())
        }
        Some(t) => {
            let t = t.trim().to_ascii_lowercase();
            let d = SPECS
                .iter()
                .find(|d| d.name == t || d.usage.starts_with(&t))
                .ok_or_else(|| format!("no command {t:?}; type `help` for the list"))?;
            let mut out = String::new();
            push_wrapped(&mut out, "", d.usage, 4, columns);
            push_wrapped(&mut out, "  ", d.summary, 2, columns);
            push_wrapped(&mut out, "  example: ", d.example, 11, columns);
            Ok(out.trim_end().to_string())
        }
    }
}
