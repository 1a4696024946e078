//! A real Kafka-protocol broker for tests: `tansu` (a Kafka-compatible
//! broker, from crates.io) as a child process on a free loopback port, with
//! its topics in memory.
//!
//! The binary is the one named by `TAGSTORE_TANSU`, else `tansu` on the
//! `PATH` or in `~/.cargo/bin` (`cargo install tansu --features dynostore
//! --locked`; `.ci/run` installs it). When there is none, [`Broker::start`]
//! returns `None` and the test says it was skipped, unless
//! `TAGSTORE_REQUIRE_KAFKA` is set (as CI sets it): then it panics.
//!
//! [`Broker::start_gated`] puts a [`Gate`] in front of it, which a test
//! closes and opens: the broker gone and back with its topics, as one
//! restarted on durable storage is (tansu's memory storage would lose them
//! in a real restart).

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::gate::Gate;

/// How a broker is started.
#[derive(Debug, Clone, Default)]
pub struct BrokerOptions {
    /// Behind a [`Gate`] ([`Broker::gate`]), which it advertises.
    pub gated: bool,
    /// Clients must authenticate with SASL (tansu 0.6 takes PLAIN with any
    /// password, and SCRAM for users it has).
    pub authentication: bool,
    /// The port it advertises to clients, when something else (a TLS
    /// front) stands before it; `address()` is then that port's.
    pub advertised_port: Option<u16>,
}

/// A running broker; killed when dropped.
pub struct Broker {
    child: Child,
    binary: PathBuf,
    port: u16,
    gate: Option<Gate>,
    advertised_port: Option<u16>,
}

fn find() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("TAGSTORE_TANSU") {
        return Some(p.into());
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("tansu"))
            .find(|p| p.is_file())
    });
    on_path.or_else(|| {
        let home = std::env::var_os("HOME")?;
        let p = PathBuf::from(home).join(".cargo/bin/tansu");
        p.is_file().then_some(p)
    })
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

impl Broker {
    /// Starts a broker, or says why there is none (see the module).
    pub fn start(test: &str) -> Option<Broker> {
        Self::start_with(test, BrokerOptions::default())
    }

    /// Starts a broker that clients reach through a gate
    /// ([`Broker::gate`]): it advertises the gate's address.
    pub fn start_gated(test: &str) -> Option<Broker> {
        Self::start_with(
            test,
            BrokerOptions {
                gated: true,
                ..BrokerOptions::default()
            },
        )
    }

    /// Starts a broker as `options` say, or says why there is none.
    pub fn start_with(test: &str, options: BrokerOptions) -> Option<Broker> {
        let Some(binary) = find() else {
            if std::env::var_os("TAGSTORE_REQUIRE_KAFKA").is_some() {
                panic!(
                    "{test}: no tansu broker (TAGSTORE_TANSU, PATH, ~/.cargo/bin), and TAGSTORE_REQUIRE_KAFKA is set; \
                     install it with `cargo install tansu --features dynostore --locked`"
                );
            }
            eprintln!(
                "{test}: SKIPPED: no tansu broker to test against (install it with \
                 `cargo install tansu --features dynostore --locked`, or name it in TAGSTORE_TANSU)"
            );
            return None;
        };
        let port = free_port();
        let url = format!("tcp://127.0.0.1:{port}");
        let gate = options.gated.then(|| Gate::start(port));
        let advertised = match (&gate, options.advertised_port) {
            (_, Some(p)) => format!("tcp://127.0.0.1:{p}"),
            (Some(g), None) => format!("tcp://127.0.0.1:{}", g.port()),
            (None, None) => url.clone(),
        };
        let mut args = vec![
            "broker",
            "--listener-url",
            &url,
            "--advertised-listener-url",
            &advertised,
            "--storage-engine",
            "memory://tansu/",
            "--silent",
        ];
        if options.authentication {
            args.push("--authentication");
        }
        let child = Command::new(&binary)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", binary.display()));
        let mut b = Broker {
            child,
            binary,
            port,
            gate,
            advertised_port: options.advertised_port,
        };
        let until = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = b.child.try_wait() {
                panic!("the tansu broker exited at start: {status}");
            }
            assert!(
                Instant::now() < until,
                "the tansu broker did not listen within 30 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(b)
    }

    /// `host:port` for clients: the port advertised, else the gate's,
    /// else the broker's own.
    pub fn address(&self) -> String {
        match (&self.gate, self.advertised_port) {
            (_, Some(p)) => format!("127.0.0.1:{p}"),
            (Some(g), None) => format!("127.0.0.1:{}", g.port()),
            (None, None) => format!("127.0.0.1:{}", self.port),
        }
    }

    /// The broker's own `host:port`, past any gate or front.
    pub fn own_address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The gate in front of the broker, when started with one.
    pub fn gate(&self) -> Option<&Gate> {
        self.gate.as_ref()
    }

    /// Deletes a topic and its records.
    pub fn delete_topic(&self, name: &str) {
        let out = Command::new(&self.binary)
            .args([
                "topic",
                "delete",
                name,
                "--broker",
                &format!("tcp://127.0.0.1:{}", self.port),
            ])
            .output()
            .unwrap_or_else(|e| panic!("tansu topic delete {name}: {e}"));
        assert!(
            out.status.success(),
            "tansu topic delete {name}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Creates a topic with `partitions` partitions.
    pub fn create_topic(&self, name: &str, partitions: u32) {
        let out = Command::new(&self.binary)
            .args([
                "topic",
                "create",
                name,
                "--partitions",
                &partitions.to_string(),
                "--broker",
                &format!("tcp://127.0.0.1:{}", self.port),
            ])
            .output()
            .unwrap_or_else(|e| panic!("tansu topic create {name}: {e}"));
        assert!(
            out.status.success(),
            "tansu topic create {name}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
