//! The `tagstore` server binary.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use tagstore::config::{FileConfig, Overrides, ServerConfig};
use tagstore::storage::SyncMode;

/// mimalloc for Rust and, through its `override` feature, for the C code
/// (CRoaring's containers) as well.
#[cfg(feature = "mimalloc")]
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
    /// Back up a running server into a new file (the `Backup` call: an
    /// admin token when the server has tokens).
    Backup(BackupArgs),
    /// Make a new data directory from a backup and its increments, checking
    /// every checksum (no server needed; start one on the directory after).
    Restore(RestoreArgs),
    /// The Kafka client process a server starts for a consuming Kafka
    /// source (it speaks a private protocol on its standard input and
    /// output; not for people).
    #[command(hide = true)]
    KafkaClient {
        /// The source it reads for (shown by `ps`, named in its log).
        source: String,
    },
}

/// `tagstore backup`.
#[derive(Args)]
struct BackupArgs {
    /// The new backup file (never replaced; written as FILE.partial until whole).
    file: PathBuf,
    /// Make an increment of this earlier backup of the same store.
    #[arg(long, value_name = "BACKUP")]
    since: Option<PathBuf>,
    /// Server address.
    #[arg(long, short = 'a', default_value = tagstore_proto::DEFAULT_ADDR)]
    addr: String,
    /// The API token (default: the TAGSTORE_TOKEN environment variable).
    #[arg(long)]
    token: Option<String>,
    /// TLS: trust this CA (PEM) (default: TAGSTORE_CACERT). Implies TLS, as
    /// does an https:// address.
    #[arg(long, value_name = "FILE")]
    cacert: Option<PathBuf>,
    /// TLS: this client's certificate (PEM).
    #[arg(long, value_name = "FILE", requires = "key")]
    cert: Option<PathBuf>,
    /// TLS: this client's private key (PEM).
    #[arg(long, value_name = "FILE", requires = "cert")]
    key: Option<PathBuf>,
    /// TLS: the name the server's certificate must carry.
    #[arg(long, value_name = "NAME")]
    servername: Option<String>,
}

/// `tagstore restore`.
#[derive(Args)]
struct RestoreArgs {
    /// The new data directory: must not exist, or be empty.
    #[arg(long)]
    data_dir: PathBuf,
    /// The full backup, then its increments in the order they were taken.
    #[arg(required = true, value_name = "BACKUP")]
    backups: Vec<PathBuf>,
}

/// `tagstore backup`: a client of the server, over the public proto.
fn backup(args: BackupArgs) -> ExitCode {
    use tagstore_proto::backup::{SaveError, save};
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            say(format_args!("tagstore backup: {e}"));
            return ExitCode::from(2);
        }
    };
    let tls = tagstore_proto::connect::TlsOptions {
        cacert: args
            .cacert
            .or_else(|| std::env::var_os("TAGSTORE_CACERT").map(PathBuf::from)),
        cert: args.cert,
        key: args.key,
        servername: args.servername,
    };
    let res = rt.block_on(async {
        let channel = tagstore_proto::connect::endpoint(&args.addr, &tls)?
            .connect()
            .await
            .map_err(|e| format!("cannot connect to {}: {e}", args.addr))?;
        let bearer = tagstore_proto::auth::Bearer::from_flag_or_env(args.token.as_deref())?;
        let mut client = tagstore_proto::auth::client(channel, bearer);
        save(&mut client, args.since.as_deref(), &args.file, |p| {
            say(format_args!(
                "copied {} of about {}; {} written",
                mib(p.bytes_copied),
                mib(p.bytes_estimated),
                mib(p.bytes_sent)
            ))
        })
        .await
        .map_err(|e| match e {
            SaveError::Server(s) => format!("{:?}: {}", s.code(), s.message()),
            SaveError::Local(m) => m,
        })
    });
    match res {
        Ok(d) => {
            println!(
                "backup {} holds every write up to lsn {}{}: {} files{}, {} log records; {} read, {} written to {}",
                d.id,
                d.position,
                if d.base_id.is_empty() {
                    String::new()
                } else {
                    format!(
                        " (an increment of {} at lsn {})",
                        d.base_id, d.base_position
                    )
                },
                thousands(d.files),
                if d.files_in_base > 0 {
                    format!(" (and {} in its base)", thousands(d.files_in_base))
                } else {
                    String::new()
                },
                thousands(d.log_records),
                mib(d.content_bytes),
                mib(d.backup_bytes),
                args.file.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            say(format_args!("tagstore backup: {e}"));
            ExitCode::FAILURE
        }
    }
}

/// `tagstore restore`: works on files alone, no server needed.
fn restore(args: RestoreArgs) -> ExitCode {
    match tagstore::storage::backup::restore_dir(&args.backups, &args.data_dir) {
        Ok(r) => {
            println!(
                "restored {} backup file{} into {}: every write up to lsn {} ({} tags, {} customers; {} files, {} log records, {} checked)",
                r.backups,
                if r.backups == 1 { "" } else { "s" },
                args.data_dir.display(),
                r.header.position,
                thousands(r.tags as u64),
                thousands(r.customers),
                thousands(r.files),
                thousands(r.log_records),
                mib(r.bytes)
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            say(format_args!("tagstore restore: {e}"));
            ExitCode::FAILURE
        }
    }
}

/// 1234567 as 1,234,567.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Bytes for people: B, KiB, MiB or GiB.
fn mib(bytes: u64) -> String {
    match bytes {
        0..1024 => format!("{bytes} B"),
        1024..1_048_576 => format!("{:.1} KiB", bytes as f64 / 1024.0),
        1_048_576..1_073_741_824 => format!("{:.1} MiB", bytes as f64 / 1_048_576.0),
        _ => format!("{:.2} GiB", bytes as f64 / 1_073_741_824.0),
    }
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
        /// It may use only the tags and fields of these categories
        /// (comma-separated; read and write roles): it names no other in
        /// queries and writes, and sees no other in listings and profiles.
        #[arg(long, value_delimiter = ',', value_name = "CATEGORY,…")]
        categories: Vec<String>,
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

/// `, categories a, b` for a token limited to some; empty otherwise.
fn limited(categories: &[String]) -> String {
    if categories.is_empty() {
        String::new()
    } else {
        format!(", categories {}", categories.join(", "))
    }
}

/// `tagstore token …`: works on the file alone, no server needed.
fn token(action: TokenAction) -> ExitCode {
    use tagstore::access::{self, Role};
    let res = match action {
        TokenAction::Add {
            name,
            role,
            counts_only,
            categories,
            file,
        } => match Role::parse(&role) {
            None => Err(format!("--role {role:?}: read, write or admin")),
            Some(role) => {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as i64);
                access::add(&file, &name, role, counts_only, &categories, now)
                    .map(|t| {
                        println!("{t}");
                        say(format_args!(
                            "token {name:?} ({role}{}{}) added to {}; it is shown only now. \
                             A running server takes it on SIGHUP.",
                            if counts_only { ", counts only" } else { "" },
                            limited(&categories),
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
                        "{}\t{}{}{}\tmade {}",
                        e.name,
                        e.role,
                        if e.counts_only { " (counts only)" } else { "" },
                        limited(&e.categories),
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

/// `tagstore kafka-client`.
fn kafka_client(source: &str) -> ExitCode {
    #[cfg(feature = "kafka")]
    return ExitCode::from(tagstore::kafka::client::run(source));
    #[cfg(not(feature = "kafka"))]
    {
        let _ = source;
        say(format_args!(
            "tagstore kafka-client: this build has no Kafka client (the `kafka` feature)"
        ));
        ExitCode::from(2)
    }
}

/// Prints a line on standard error or, if that fails, nowhere.
fn say(line: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The server logs what it does; the one-shot commands only what goes wrong.
    let level = match cli.command {
        Command::Serve(_) => "info",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| level.into()),
        )
        .with_writer(|| LogSink)
        .log_internal_errors(false)
        .init();
    let args = match cli.command {
        Command::Token { action } => return token(action),
        Command::Backup(args) => return backup(args),
        Command::Restore(args) => return restore(args),
        Command::KafkaClient { source } => return kafka_client(&source),
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
