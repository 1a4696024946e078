//! The `tagstore` server binary.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use tagstore::config::{FileConfig, Overrides, ServerConfig};
use tagstore::storage::SyncMode;

/// mimalloc for Rust and, through its `override` feature, for the C code
/// (CRoaring's containers) as well.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "tagstore",
    version,
    about = "A database server for customer tags"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum Sync {
    /// fsync the log before acknowledging every write (default).
    Always,
    /// Never fsync (bulk loads that can be redone).
    Never,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server.
    Serve(ServeArgs),
    /// Make, list and revoke API tokens (in the tokens file the server reads).
    Token {
        #[command(subcommand)]
        action: TokenAction,
    },
}

/// `tagstore serve`: each flag overrides the config file.
#[derive(Args)]
struct ServeArgs {
    /// Address to listen on [default: 127.0.0.1:7420].
    #[arg(long)]
    listen: Option<String>,
    /// Data directory [default: ./tagstore-data].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// A TOML config file; flags given here override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// When to fsync the write-ahead log.
    #[arg(long, value_enum)]
    sync: Option<Sync>,
    /// Checkpoint once the log holds this many MiB [default: 64].
    #[arg(long)]
    checkpoint_wal_mb: Option<u64>,
    /// The tokens file (`tagstore token add`): every call then needs a
    /// token of it. Read again on SIGHUP.
    #[arg(long)]
    tokens: Option<PathBuf>,
    /// Serve beyond loopback without tokens: anyone who reaches the port
    /// may read, change and erase every customer.
    #[arg(long)]
    open_without_tokens: bool,
    /// TLS: the server's certificate chain (PEM). Read again on SIGHUP.
    #[arg(long)]
    tls_cert: Option<PathBuf>,
    /// TLS: the certificate's private key (PEM).
    #[arg(long)]
    tls_key: Option<PathBuf>,
    /// TLS: clients must present a certificate signed by this CA (PEM).
    #[arg(long)]
    tls_client_ca: Option<PathBuf>,
    /// Serve metrics (Prometheus text, `GET /metrics`) on this address,
    /// e.g. 127.0.0.1:9420 [default: off]. Call names and store-wide
    /// numbers only: no customer, key, tag or query.
    #[arg(long)]
    metrics_listen: Option<String>,
}

#[derive(Subcommand)]
enum TokenAction {
    /// Make a token and print it (once: only its salted hash is kept).
    Add {
        /// Who or what it is for (letters, digits, -, _, ., @).
        name: String,
        /// read (counts, member pages, exports, profiles, analytics), write
        /// (also updates, values, ingestion) or admin (also tags, fields,
        /// sources, erasing customers, checkpoints).
        #[arg(long)]
        role: String,
        /// It may count but not list individual customers.
        #[arg(long)]
        counts_only: bool,
        #[arg(long)]
        file: PathBuf,
    },
    /// The tokens in the file: name, role, limits, when made.
    List {
        #[arg(long)]
        file: PathBuf,
    },
    /// Remove a token; a running server stops taking it on SIGHUP (or
    /// restart).
    Revoke {
        name: String,
        #[arg(long)]
        file: PathBuf,
    },
}

/// `tagstore token …`: works on the file alone, no server needed.
fn token(action: TokenAction) -> ExitCode {
    use tagstore::access::{self, Role};
    let res = match action {
        TokenAction::Add {
            name,
            role,
            counts_only,
            file,
        } => match Role::parse(&role) {
            None => Err(format!("--role {role:?}: read, write or admin")),
            Some(role) => {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as i64);
                access::add(&file, &name, role, counts_only, now)
                    .map(|t| {
                        println!("{t}");
                        say(format_args!(
                            "token {name:?} ({role}{}) added to {}; it is shown only now. \
                             A running server takes it on SIGHUP.",
                            if counts_only { ", counts only" } else { "" },
                            file.display()
                        ));
                    })
                    .map_err(|e| e.to_string())
            }
        },
        TokenAction::List { file } => access::list(&file)
            .map(|entries| {
                for e in entries {
                    println!(
                        "{}\t{}{}\tmade {}",
                        e.name,
                        e.role,
                        if e.counts_only { " (counts only)" } else { "" },
                        tagstore::fields::time::format_ms(e.created_ms)
                    );
                }
            })
            .map_err(|e| e.to_string()),
        TokenAction::Revoke { name, file } => match access::revoke(&file, &name) {
            Ok(true) => {
                say(format_args!(
                    "token {name:?} revoked; a running server stops taking it on SIGHUP"
                ));
                Ok(())
            }
            Ok(false) => Err(format!("no token named {name:?} in {}", file.display())),
            Err(e) => Err(e.to_string()),
        },
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            say(format_args!("tagstore token: {e}"));
            ExitCode::from(2)
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "cannot listen for SIGTERM");
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutdown signal received");
}

/// Standard error for the log, where a failed write is dropped: a full or
/// closed log volume must never take the server down (the `eprintln!` that
/// the logging library falls back on panics when stderr cannot be written).
struct LogSink;

impl std::io::Write for LogSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = std::io::stderr().write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}

/// Prints a line on standard error or, if that fails, nowhere.
fn say(line: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(|| LogSink)
        .log_internal_errors(false)
        .init();
    let cli = Cli::parse();
    let args = match cli.command {
        Command::Token { action } => return token(action),
        Command::Serve(args) => args,
    };
    let config = args.config.clone();
    let over = Overrides {
        listen: args.listen,
        data_dir: args.data_dir,
        sync: args.sync.map(|s| match s {
            Sync::Always => SyncMode::Always,
            Sync::Never => SyncMode::Never,
        }),
        checkpoint_wal_mb: args.checkpoint_wal_mb,
        tokens: args.tokens,
        open_without_tokens: args.open_without_tokens,
        tls_cert: args.tls_cert,
        tls_key: args.tls_key,
        tls_client_ca: args.tls_client_ca,
        metrics_listen: args.metrics_listen,
    };
    let file = match config.as_deref().map(FileConfig::load).transpose() {
        Ok(f) => f.unwrap_or_default(),
        Err(e) => {
            say(format_args!("tagstore: {e}"));
            return ExitCode::from(2);
        }
    };
    let cfg = match ServerConfig::resolve(file, over) {
        Ok(c) => c,
        Err(e) => {
            say(format_args!("tagstore: {e}"));
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            say(format_args!(
                "tagstore: cannot start the async runtime: {e}"
            ));
            return ExitCode::FAILURE;
        }
    };
    let res = runtime.block_on(tagstore::server::serve(cfg, shutdown_signal(), |at| {
        // Lines for scripts and tests that start the server on port 0 (the
        // metrics' first: a reader may stop at the listening line). A
        // closed or full stdout must not stop the server.
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        if let Some(m) = at.metrics {
            let _ = writeln!(out, "tagstore metrics on {m}");
        }
        let _ = writeln!(out, "tagstore listening on {}", at.grpc).and_then(|_| out.flush());
    }));
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            say(format_args!("tagstore: {e}"));
            ExitCode::FAILURE
        }
    }
}
