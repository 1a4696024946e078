//! The Redis side of the comparison: a `redis-server` of its own on a free
//! loopback port with a temporary directory, and a small RESP client with
//! pipelining (the commands a Redis user would send: SETBIT, BITOP, BITCOUNT,
//! GETBIT, MULTI/EXEC, MEMORY USAGE, INFO).

use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub type Result<T> = std::result::Result<T, String>;

/// A Redis reply.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    Status(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Vec<Reply>),
}

impl Reply {
    pub fn int(&self) -> Result<i64> {
        match self {
            Reply::Int(n) => Ok(*n),
            other => Err(format!("expected an integer reply, got {other:?}")),
        }
    }
}

/// A connection with a write buffer, so commands can be pipelined.
pub struct Conn {
    reader: BufReader<TcpStream>,
    writer: BufWriter<TcpStream>,
    queued: usize,
}

fn io(e: std::io::Error) -> String {
    format!("redis connection: {e}")
}

impl Conn {
    pub fn connect(port: u16) -> Result<Self> {
        let stream = TcpStream::connect(("127.0.0.1", port)).map_err(io)?;
        stream.set_nodelay(true).map_err(io)?;
        Ok(Self {
            reader: BufReader::with_capacity(1 << 16, stream.try_clone().map_err(io)?),
            writer: BufWriter::with_capacity(1 << 16, stream),
            queued: 0,
        })
    }

    /// Queues a command (sent on the next [`Conn::flush`] or [`Conn::cmd`]).
    pub fn send(&mut self, args: &[&[u8]]) -> Result<()> {
        write!(self.writer, "*{}\r\n", args.len()).map_err(io)?;
        for a in args {
            write!(self.writer, "${}\r\n", a.len()).map_err(io)?;
            self.writer.write_all(a).map_err(io)?;
            self.writer.write_all(b"\r\n").map_err(io)?;
        }
        self.queued += 1;
        Ok(())
    }

    /// Sends every queued command and reads all their replies.
    pub fn flush(&mut self) -> Result<Vec<Reply>> {
        self.writer.flush().map_err(io)?;
        let n = std::mem::take(&mut self.queued);
        (0..n).map(|_| self.read()).collect()
    }

    /// One command, one reply; a Redis error is an `Err`.
    pub fn cmd(&mut self, args: &[&[u8]]) -> Result<Reply> {
        self.send(args)?;
        let mut replies = self.flush()?;
        match replies.pop() {
            Some(Reply::Error(e)) => Err(format!("redis: {e}")),
            Some(r) => Ok(r),
            None => Err("redis: no reply".into()),
        }
    }

    fn line(&mut self) -> Result<String> {
        let mut line = String::new();
        self.reader.read_line(&mut line).map_err(io)?;
        if !line.ends_with("\r\n") {
            return Err("redis: connection closed".into());
        }
        line.truncate(line.len() - 2);
        Ok(line)
    }

    fn read(&mut self) -> Result<Reply> {
        let line = self.line()?;
        let (kind, rest) = line.split_at(1.min(line.len()));
        let num = |s: &str| {
            s.parse::<i64>()
                .map_err(|_| format!("redis: bad number {s:?}"))
        };
        Ok(match kind {
            "+" => Reply::Status(rest.into()),
            "-" => Reply::Error(rest.into()),
            ":" => Reply::Int(num(rest)?),
            "$" => {
                let n = num(rest)?;
                if n < 0 {
                    Reply::Bulk(None)
                } else {
                    let mut buf = vec![0u8; n as usize + 2];
                    self.reader.read_exact(&mut buf).map_err(io)?;
                    buf.truncate(n as usize);
                    Reply::Bulk(Some(buf))
                }
            }
            "*" => {
                let n = num(rest)?;
                let mut items = Vec::with_capacity(n.max(0) as usize);
                for _ in 0..n.max(0) {
                    items.push(self.read()?);
                }
                Reply::Array(items)
            }
            _ => return Err(format!("redis: bad reply line {line:?}")),
        })
    }

    /// A field of `INFO section`.
    pub fn info_field(&mut self, section: &str, field: &str) -> Result<String> {
        let Reply::Bulk(Some(text)) = self.cmd(&[b"INFO", section.as_bytes()])? else {
            return Err("redis: INFO gave no text".into());
        };
        let text = String::from_utf8_lossy(&text).to_string();
        text.lines()
            .find_map(|l| {
                l.strip_prefix(&format!("{field}:"))
                    .map(|v| v.trim().to_string())
            })
            .ok_or_else(|| format!("redis: INFO {section} has no {field}"))
    }
}

/// A `redis-server` of the harness's own.
pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    pub dir: PathBuf,
    pub version: String,
}

fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(io)?;
    Ok(l.local_addr().map_err(io)?.port())
}

impl RedisServer {
    /// `None` (with a note on how to install it) when `redis-server` is not installed.
    pub fn find() -> Option<PathBuf> {
        let path = std::env::var_os("PATH")?;
        std::env::split_paths(&path)
            .map(|d| d.join("redis-server"))
            .find(|p| p.is_file())
    }

    /// Starts a server in `dir` with append-only persistence and the given
    /// `appendfsync` policy (`always` or `everysec`); `aof = false` starts it
    /// without the append-only file (it then loads `dump.rdb` if present).
    pub fn start(binary: &Path, dir: &Path, appendfsync: &str, aof: bool) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(io)?;
        let port = free_port()?;
        let child = Command::new(binary)
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--protected-mode",
                "no",
                "--save",
                "",
            ])
            .args([
                "--appendonly",
                if aof { "yes" } else { "no" },
                "--appendfsync",
                appendfsync,
            ])
            .arg("--dir")
            .arg(dir)
            .args(["--daemonize", "no", "--loglevel", "warning"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
        let mut server = Self {
            child: Some(child),
            port,
            dir: dir.to_path_buf(),
            version: String::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            if let Ok(mut c) = Conn::connect(port)
                && let Ok(Reply::Status(s)) = c.cmd(&[b"PING"])
                && s == "PONG"
            {
                server.version = c.info_field("server", "redis_version").unwrap_or_default();
                return Ok(server);
            }
            if Instant::now() > deadline {
                return Err("redis-server did not answer PING".into());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn conn(&self) -> Result<Conn> {
        Conn::connect(self.port)
    }

    /// Resident memory as Redis reports it.
    pub fn rss(&self) -> Result<u64> {
        self.conn()?
            .info_field("memory", "used_memory_rss")?
            .parse()
            .map_err(|_| "redis: bad used_memory_rss".into())
    }

    /// SHUTDOWN (with the given save behaviour) and wait for the process.
    pub fn stop(&mut self, save: bool) {
        if let Ok(mut c) = self.conn() {
            let _ = c.send(&[b"SHUTDOWN", if save { b"SAVE" as &[u8] } else { b"NOSAVE" }]);
            let _ = c.flush();
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// How a boolean expression over tags runs in Redis: BITOPs into temporary
/// keys, then BITCOUNT, inside one MULTI/EXEC.
#[derive(Debug, Clone)]
pub enum Expr {
    Tag(String),
    And(Vec<Expr>),
    Or(Vec<Expr>),
    /// `a AND NOT b`.
    AndNot(Box<Expr>, Box<Expr>),
}

/// Queues MULTI, the BITOPs, BITCOUNT, the DELs of the temporary keys and
/// EXEC. Returns the index of the BITCOUNT reply within EXEC's array.
pub fn queue_count(c: &mut Conn, e: &Expr, tmp_prefix: &str) -> Result<usize> {
    let mut temps = Vec::new();
    c.send(&[b"MULTI"])?;
    let key = emit(c, e, tmp_prefix, &mut temps)?;
    c.send(&[b"BITCOUNT", key.as_bytes()])?;
    for t in &temps {
        c.send(&[b"DEL", t.as_bytes()])?;
    }
    c.send(&[b"EXEC"])?;
    Ok(temps.len())
}

/// The count from the replies of [`queue_count`].
pub fn count_from(replies: &[Reply], index: usize) -> Result<u64> {
    match replies.last() {
        Some(Reply::Array(items)) => match items.get(index) {
            Some(Reply::Int(n)) => Ok(*n as u64),
            other => Err(format!("redis: expected BITCOUNT's integer, got {other:?}")),
        },
        other => Err(format!("redis: EXEC failed: {other:?}")),
    }
}

fn emit(c: &mut Conn, e: &Expr, prefix: &str, temps: &mut Vec<String>) -> Result<String> {
    match e {
        Expr::Tag(t) => Ok(t.clone()),
        Expr::And(items) | Expr::Or(items) => {
            let op: &[u8] = if matches!(e, Expr::And(_)) {
                b"AND"
            } else {
                b"OR"
            };
            let keys: Vec<String> = items
                .iter()
                .map(|i| emit(c, i, prefix, temps))
                .collect::<Result<_>>()?;
            let out = format!("{prefix}:{}", temps.len());
            temps.push(out.clone());
            let mut args: Vec<&[u8]> = vec![b"BITOP", op, out.as_bytes()];
            args.extend(keys.iter().map(|k| k.as_bytes()));
            c.send(&args)?;
            Ok(out)
        }
        Expr::AndNot(a, b) => {
            let a = emit(c, a, prefix, temps)?;
            let b = emit(c, b, prefix, temps)?;
            let not = format!("{prefix}:{}", temps.len());
            temps.push(not.clone());
            c.send(&[b"BITOP", b"NOT", not.as_bytes(), b.as_bytes()])?;
            let out = format!("{prefix}:{}", temps.len());
            temps.push(out.clone());
            c.send(&[
                b"BITOP",
                b"AND",
                out.as_bytes(),
                a.as_bytes(),
                not.as_bytes(),
            ])?;
            Ok(out)
        }
    }
}

/// A bitmap as Redis stores it: bit `id` is bit `7 - id % 8` of byte `id / 8`.
pub fn bitmap_bytes(ids: &[u32], customers: u32) -> Vec<u8> {
    let mut out = vec![0u8; (customers as usize).div_ceil(8)];
    for &id in ids {
        out[id as usize / 8] |= 0x80 >> (id % 8);
    }
    out
}
