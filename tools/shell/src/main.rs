//! `tagstore-shell`: the admin shell, a REPL over gRPC. It talks to the
//! server only through the public `tagstore.v1` proto.
//!
//! Interactive with line editing, history, completion (commands and tag
//! names) and multi-line input; or one command with `-c`, or a script with
//! `-f` (exit status 0 when every command succeeded, 1 otherwise).

mod commands;
mod session;
mod table;

use std::borrow::Cow;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use parking_lot::RwLock;
use rustyline::completion::{Completer, FilenameCompleter, Pair};
use rustyline::error::ReadlineError;
use rustyline::highlight::Highlighter;
use rustyline::hint::Hinter;
use rustyline::validate::{ValidationContext, ValidationResult, Validator};
use rustyline::{Editor, Helper};
use session::{Confirm, Failure, Session, describe};
use tagstore_proto::names::{is_bare_char, quote_tag_name};

#[derive(Parser)]
#[command(
    name = "tagstore-shell",
    version,
    about = "Admin shell for a tagstore server"
)]
struct Cli {
    /// Server address.
    #[arg(long, short = 'a', default_value = tagstore_proto::DEFAULT_ADDR)]
    addr: String,
    /// Run one command and exit.
    #[arg(short = 'c', value_name = "COMMAND")]
    command: Option<String>,
    /// Run the commands in a file (one per line; `--` starts a comment) and exit.
    #[arg(short = 'f', value_name = "FILE")]
    file: Option<PathBuf>,
    /// Print each result as one line of JSON.
    #[arg(long)]
    json: bool,
    /// Do not ask before dropping tags or deleting customers.
    #[arg(long)]
    yes: bool,
    /// The API token for a server with access control (default: the
    /// TAGSTORE_TOKEN environment variable).
    #[arg(long)]
    token: Option<String>,
    /// TLS: trust this CA (PEM) for the server's certificate (default: the
    /// TAGSTORE_CACERT environment variable). Implies TLS, as does an
    /// https:// address.
    #[arg(long, value_name = "FILE")]
    cacert: Option<PathBuf>,
    /// TLS: this client's certificate (PEM), for servers that ask for one.
    #[arg(long, value_name = "FILE", requires = "key")]
    cert: Option<PathBuf>,
    /// TLS: this client's private key (PEM).
    #[arg(long, value_name = "FILE", requires = "cert")]
    key: Option<PathBuf>,
    /// TLS: the name the server's certificate must carry (default: the
    /// address's host).
    #[arg(long, value_name = "NAME")]
    servername: Option<String>,
}

/// Line-editor helper: completion of commands, tag names and file names,
/// and multi-line input while a parenthesis or quote is open.
struct ShellHelper {
    tags: Arc<RwLock<Vec<String>>>,
    files: FilenameCompleter,
}

impl ShellHelper {
    fn complete_tag(&self, line: &str, pos: usize) -> (usize, Vec<Pair>) {
        let before = &line[..pos];
        // Start of the word under the cursor: bare characters, or an open quote.
        let mut start = pos;
        for (i, c) in before.char_indices().rev() {
            if is_bare_char(c) {
                start = i;
            } else if c == '"' {
                start = i;
                break;
            } else {
                break;
            }
        }
        let word = &before[start..];
        let prefix = word.trim_start_matches('"');
        let tags = self.tags.read();
        let pairs = tags
            .iter()
            .filter(|t| t.starts_with(prefix))
            .map(|t| Pair {
                display: t.clone(),
                replacement: quote_tag_name(t),
            })
            .collect();
        (start, pairs)
    }
}

impl Completer for ShellHelper {
    type Candidate = Pair;

    fn complete(
        &self,
        line: &str,
        pos: usize,
        ctx: &rustyline::Context<'_>,
    ) -> rustyline::Result<(usize, Vec<Pair>)> {
        let before = &line[..pos];
        let trimmed = before.trim_start();
        if !trimmed.contains(char::is_whitespace) {
            let start = before.len() - trimmed.len();
            let lower = trimmed.to_ascii_lowercase();
            let pairs = commands::command_words()
                .filter(|c| c.starts_with(&lower))
                .map(|c| Pair {
                    display: c.to_string(),
                    replacement: format!("{c} "),
                })
                .collect();
            return Ok((start, pairs));
        }
        let first = trimmed.split_whitespace().next().unwrap_or("");
        let lower = before.to_ascii_lowercase();
        if lower.contains(" from ")
            || lower.contains(" to ")
            || first.eq_ignore_ascii_case("backup")
        {
            return self.files.complete(line, pos, ctx);
        }
        if commands::takes_tags(first) {
            return Ok(self.complete_tag(line, pos));
        }
        Ok((pos, Vec::new()))
    }
}

impl Hinter for ShellHelper {
    type Hint = String;
}

impl Highlighter for ShellHelper {
    fn highlight_prompt<'b, 's: 'b, 'p: 'b>(
        &'s self,
        prompt: &'p str,
        _default: bool,
    ) -> Cow<'b, str> {
        Cow::Borrowed(prompt)
    }
}

impl Validator for ShellHelper {
    fn validate(&self, ctx: &mut ValidationContext) -> rustyline::Result<ValidationResult> {
        if commands::is_incomplete(ctx.input()) {
            Ok(ValidationResult::Incomplete)
        } else {
            Ok(ValidationResult::Valid(None))
        }
    }
}

impl Helper for ShellHelper {}

/// Runs one line; prints its failure. Returns (keep going, succeeded).
async fn run_line(session: &mut Session, line: &str) -> (bool, bool) {
    let cmd = match commands::parse(&commands::join_lines(line)) {
        Ok(Some(c)) => c,
        Ok(None) => return (true, true),
        Err(e) => {
            eprintln!("error: {e}");
            return (true, false);
        }
    };
    let res = tokio::select! {
        r = session.run(cmd) => r,
        _ = tokio::signal::ctrl_c() => Err(Failure::Cancelled),
    };
    match res {
        Ok(keep_going) => (keep_going, true),
        Err(f) => {
            eprintln!("{}", describe(&f, &session.addr));
            (true, false)
        }
    }
}

fn history_path() -> Option<PathBuf> {
    std::env::var_os("TAGSTORE_HISTORY")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".tagstore_history")))
}

async fn interactive(mut session: Session) -> ExitCode {
    session.refresh_tags().await;
    let helper = ShellHelper {
        tags: session.tag_names.clone(),
        files: FilenameCompleter::new(),
    };
    let mut editor: Editor<ShellHelper, rustyline::history::DefaultHistory> = match Editor::new() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("tagstore-shell: cannot start the line editor: {e}");
            return ExitCode::FAILURE;
        }
    };
    editor.set_helper(Some(helper));
    let history = history_path();
    if let Some(h) = &history {
        let _ = editor.load_history(h);
    }
    println!(
        "tagstore-shell {} connected to {}. Type `help` for commands, `quit` to leave.",
        env!("CARGO_PKG_VERSION"),
        session.addr
    );
    loop {
        let prompt = format!("tagstore {}{}> ", session.addr, session.as_of_label());
        // Reading a line blocks; run it off the async workers.
        let (ed, line) = tokio::task::block_in_place(|| {
            let line = editor.readline(&prompt);
            (editor, line)
        });
        editor = ed;
        match line {
            Ok(line) => {
                if line.trim().is_empty() {
                    continue;
                }
                let _ = editor.add_history_entry(line.as_str());
                let (keep_going, _) = run_line(&mut session, &line).await;
                if !keep_going {
                    break;
                }
            }
            Err(ReadlineError::Interrupted) => {
                println!("^C");
                continue;
            }
            Err(ReadlineError::Eof) => break,
            Err(e) => {
                eprintln!("tagstore-shell: {e}");
                break;
            }
        }
    }
    if let Some(h) = &history {
        let _ = editor.save_history(h);
    }
    ExitCode::SUCCESS
}

/// Runs lines from a script (or piped input); stops at the first failure.
async fn batch(mut session: Session, lines: Vec<String>) -> ExitCode {
    let mut pending = String::new();
    for (n, line) in lines.iter().enumerate() {
        if !pending.is_empty() {
            pending.push('\n');
        }
        pending.push_str(line);
        if commands::is_incomplete(&pending) && n + 1 < lines.len() {
            continue;
        }
        let text = std::mem::take(&mut pending);
        let (keep_going, ok) = run_line(&mut session, &text).await;
        if !ok {
            if lines.len() > 1 {
                eprintln!("(stopped at line {})", n + 1);
            }
            return ExitCode::FAILURE;
        }
        if !keep_going {
            break;
        }
    }
    ExitCode::SUCCESS
}

async fn main_async(cli: Cli) -> ExitCode {
    let tty = std::io::stdin().is_terminal();
    let confirm = match (cli.yes, tty && cli.command.is_none() && cli.file.is_none()) {
        (true, _) => Confirm::Yes,
        (false, true) => Confirm::Ask,
        (false, false) => Confirm::Refuse,
    };
    let session = match Session::new(
        &cli.addr,
        cli.token.as_deref(),
        &session::TlsOptions {
            cacert: cli
                .cacert
                .clone()
                .or_else(|| std::env::var_os("TAGSTORE_CACERT").map(PathBuf::from)),
            cert: cli.cert.clone(),
            key: cli.key.clone(),
            servername: cli.servername.clone(),
        },
        cli.json,
        confirm,
    ) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("tagstore-shell: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(c) = cli.command {
        return batch(session, vec![c]).await;
    }
    if let Some(path) = cli.file {
        return match std::fs::read_to_string(&path) {
            Ok(text) => batch(session, text.lines().map(str::to_string).collect()).await,
            Err(e) => {
                eprintln!("tagstore-shell: cannot read {}: {e}", path.display());
                ExitCode::from(2)
            }
        };
    }
    if !tty {
        let mut text = String::new();
        if let Err(e) = std::io::Read::read_to_string(&mut std::io::stdin(), &mut text) {
            eprintln!("tagstore-shell: reading standard input: {e}");
            return ExitCode::from(2);
        }
        return batch(session, text.lines().map(str::to_string).collect()).await;
    }
    interactive(session).await
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => {
            let code = rt.block_on(main_async(cli));
            // A cancelled command may have left a blocking read (a FIFO, a
            // stalled disk) behind; do not wait for it.
            rt.shutdown_background();
            code
        }
        Err(e) => {
            eprintln!("tagstore-shell: cannot start the async runtime: {e}");
            ExitCode::FAILURE
        }
    }
}
