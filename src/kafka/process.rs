//! The server's end of a Kafka client process ([`super::client`]): starts
//! it, asks it ([`super::wire`]) and waits for each answer at most as long
//! as that answer can take, and ends it.
//!
//! Anything that goes wrong with the process (it crashed, it did not
//! answer in time, it said something that does not decode) is an error
//! naming what happened, after which the process is ended and this client
//! is spent: the consumer starts another session, and another process,
//! from the positions the store holds.
//!
//! This room owns the child process and its pipes; it knows nothing of
//! librdkafka, records or the store.

use std::io::BufWriter;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::wire::{Answer, At, FrameError, Msg, Request, VERSION, read_frame, write_frame};

/// What an answer may take beyond the time its request allows.
const SLACK: Duration = Duration::from_secs(10);
/// Longest wait for the process to end by itself once told to.
const END_WAIT: Duration = Duration::from_secs(2);

/// The program that is the client process: the server's own executable
/// (`/proc/self/exe` is that file even when an upgrade has replaced the
/// path), with the arguments that make it one; the source's name follows
/// them, so that `ps` tells the processes apart.
#[derive(Debug, Clone)]
pub struct Program {
    pub path: PathBuf,
    pub args: Vec<String>,
    /// What an answer may take beyond the time its request allows.
    pub slack: Duration,
}

impl Program {
    /// This executable, as `tagstore kafka-client SOURCE`.
    pub fn this_executable() -> Self {
        Self {
            path: PathBuf::from("/proc/self/exe"),
            args: vec!["kafka-client".into()],
            slack: SLACK,
        }
    }
}

/// A batch of messages, as [`Answer::Batch`].
pub struct Batch {
    pub msgs: Vec<Msg>,
    pub error: String,
    pub resets: Vec<String>,
}

/// A running client process.
pub struct ClientProcess {
    child: Child,
    input: Option<BufWriter<ChildStdin>>,
    answers: mpsc::Receiver<Result<Vec<u8>, FrameError>>,
    /// The thread that reads its answers; `None` once it is ended.
    reader: Option<JoinHandle<()>>,
    /// Something went wrong: said once, then every call fails with it.
    broken: Option<String>,
    slack: Duration,
}

impl ClientProcess {
    /// Starts the process and makes its consumer with `settings`.
    pub fn start(
        program: &Program,
        source: &str,
        settings: Vec<(String, String)>,
    ) -> Result<Self, String> {
        let mut child = Command::new(&program.path)
            .arg0("tagstore")
            .args(&program.args)
            .arg(source)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| {
                format!(
                    "cannot start the Kafka client process ({}): {e}",
                    program.path.display()
                )
            })?;
        let (Some(stdin), Some(mut stdout)) = (child.stdin.take(), child.stdout.take()) else {
            let _ = child.kill();
            let _ = child.wait();
            return Err("the Kafka client process has no pipes".into());
        };
        let (tx, answers) = mpsc::sync_channel(1);
        let reader = std::thread::Builder::new()
            .name(format!("kafka-pipe-{source}"))
            .spawn(move || {
                loop {
                    let frame = read_frame(&mut stdout);
                    let last = frame.is_err();
                    if tx.send(frame).is_err() || last {
                        return;
                    }
                }
            });
        let reader = match reader {
            Ok(r) => r,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("cannot start a thread for the Kafka client: {e}"));
            }
        };
        let mut me = Self {
            child,
            input: Some(BufWriter::new(stdin)),
            answers,
            reader: Some(reader),
            broken: None,
            slack: program.slack,
        };
        let hello = Request::Hello {
            version: VERSION,
            source: source.to_string(),
            settings,
        };
        match me.call(&hello, Duration::ZERO)? {
            Answer::Done => Ok(me),
            Answer::Failed(why) => Err(why),
            other => Err(me.broke(format!("answered a hello with {}", kind(&other)))),
        }
    }

    /// The partitions of `topic` (the error in words when there are none).
    pub fn partitions(&mut self, topic: &str, assigned: bool) -> Result<Vec<i32>, String> {
        let r = Request::Partitions {
            topic: topic.to_string(),
            assigned,
        };
        match self.call(&r, super::wire::METADATA_TIMEOUT)? {
            Answer::Partitions(ps) => Ok(ps),
            Answer::Failed(why) => Err(why),
            other => Err(self.broke(format!("answered a metadata request with {}", kind(&other)))),
        }
    }

    pub fn assign(&mut self, at: Vec<(String, i32, At)>) -> Result<(), String> {
        match self.call(&Request::Assign { at }, Duration::ZERO)? {
            Answer::Done => Ok(()),
            Answer::Failed(why) => Err(why),
            other => Err(self.broke(format!("answered an assignment with {}", kind(&other)))),
        }
    }

    pub fn gather(
        &mut self,
        most: usize,
        bytes: usize,
        first_wait: Duration,
        linger: Duration,
    ) -> Result<Batch, String> {
        let r = Request::Gather {
            most: most.min(u32::MAX as usize) as u32,
            bytes: bytes.min(u32::MAX as usize) as u32,
            first_wait_ms: first_wait.as_millis() as u32,
            linger_ms: linger.as_millis() as u32,
        };
        match self.call(&r, first_wait + linger)? {
            Answer::Batch {
                msgs,
                error,
                resets,
            } => Ok(Batch {
                msgs,
                error,
                resets,
            }),
            other => Err(self.broke(format!("answered a poll with {}", kind(&other)))),
        }
    }

    /// Commits positions to the consumer group (without waiting for the
    /// brokers).
    pub fn commit(&mut self, next: Vec<(String, i32, i64)>) -> Result<(), String> {
        match self.call(&Request::Commit { next }, Duration::ZERO)? {
            Answer::Done => Ok(()),
            other => Err(self.broke(format!("answered a commit with {}", kind(&other)))),
        }
    }

    /// The ends of `partitions`, in order, as many as answered within
    /// `each` apiece (it stops at the first that does not).
    pub fn ends(
        &mut self,
        partitions: Vec<(String, i32)>,
        each: Duration,
    ) -> Result<Vec<i64>, String> {
        let longest = each * partitions.len().min(u32::MAX as usize) as u32;
        let r = Request::Ends {
            partitions,
            timeout_ms: each.as_millis() as u32,
        };
        match self.call(&r, longest)? {
            Answer::Ends(highs) => Ok(highs),
            other => Err(self.broke(format!("answered a request for ends with {}", kind(&other)))),
        }
    }

    /// Sends a request and waits for its answer, at most `takes` plus the
    /// program's slack ([`SLACK`]).
    fn call(&mut self, r: &Request, takes: Duration) -> Result<Answer, String> {
        if let Some(why) = &self.broken {
            return Err(why.clone());
        }
        let Some(input) = self.input.as_mut() else {
            return Err(self.broke("its input is closed".into()));
        };
        if let Err(e) = write_frame(input, &r.encode()) {
            return Err(self.broke(format!("cannot be written to: {e}")));
        }
        let deadline = Instant::now() + takes + self.slack;
        match self
            .answers
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            Ok(Ok(body)) => match Answer::decode(&body) {
                Ok(a) => Ok(a),
                Err(e) => Err(self.broke(format!("said something that does not decode: {e}"))),
            },
            Ok(Err(FrameError::Closed)) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                Err(self.broke("closed its output".into()))
            }
            Ok(Err(e)) => Err(self.broke(format!("cannot be read from: {e}"))),
            Err(mpsc::RecvTimeoutError::Timeout) => Err(self.broke(format!(
                "did not answer within {:.1} s",
                (takes + self.slack).as_secs_f64()
            ))),
        }
    }

    /// The process is of no more use: ended, and the error that says why,
    /// with how it ended.
    fn broke(&mut self, what: String) -> String {
        let status = self.end(Duration::from_millis(200));
        let why = format!(
            "the Kafka client process (librdkafka) {what}{}; starting another",
            status.map_or(String::new(), |s| format!(" and {}", ended(s)))
        );
        self.broken = Some(why.clone());
        why
    }

    /// Closes its input (it ends by itself then), waits at most `wait`,
    /// then kills it. How it ended, if it did.
    fn end(&mut self, wait: Duration) -> Option<ExitStatus> {
        self.input = None;
        let until = Instant::now() + wait;
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(s)) => break Some(s),
                Ok(None) if Instant::now() < until => std::thread::sleep(Duration::from_millis(10)),
                Ok(None) => {
                    let _ = self.child.kill();
                    break self.child.wait().ok();
                }
                Err(_) => break None,
            }
        };
        // An answer nobody took would keep the reader waiting to hand it
        // over: it sees the receiver gone instead, and ends. It is not
        // waited for: it ends when the pipe closes, which a process the
        // client started could hold open longer than the client lives.
        let (_, none) = mpsc::sync_channel(1);
        drop(std::mem::replace(&mut self.answers, none));
        self.reader = None;
        status
    }
}

impl Drop for ClientProcess {
    fn drop(&mut self) {
        if self.reader.is_some() {
            self.end(END_WAIT);
        }
    }
}

fn kind(a: &Answer) -> &'static str {
    match a {
        Answer::Done => "done",
        Answer::Failed(_) => "a failure",
        Answer::Partitions(_) => "partitions",
        Answer::Batch { .. } => "a batch",
        Answer::Ends(_) => "ends",
    }
}

/// How a process ended, in words ("was killed by signal 11 (SIGSEGV)").
fn ended(s: ExitStatus) -> String {
    if let Some(sig) = s.signal() {
        let name = match sig {
            libc::SIGSEGV => " (SIGSEGV: a crash)",
            libc::SIGABRT => " (SIGABRT: an assertion failed)",
            libc::SIGBUS => " (SIGBUS)",
            libc::SIGILL => " (SIGILL)",
            libc::SIGFPE => " (SIGFPE)",
            libc::SIGKILL => " (SIGKILL)",
            libc::SIGTERM => " (SIGTERM)",
            _ => "",
        };
        format!("was killed by signal {sig}{name}")
    } else {
        match s.code() {
            Some(c) => format!("exited with code {c}"),
            None => "ended".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client process that is a shell script (the source's name is its
    /// `$0`), with a short slack.
    fn script(body: &str) -> Program {
        Program {
            path: PathBuf::from("/bin/sh"),
            args: vec!["-c".into(), body.into()],
            slack: Duration::from_millis(300),
        }
    }

    fn start_fails(body: &str) -> String {
        match ClientProcess::start(&script(body), "orders", Vec::new()) {
            Ok(_) => panic!("{body}: started"),
            Err(e) => e,
        }
    }

    #[test]
    fn a_client_process_that_fails_is_said_to_and_ended() {
        // Gone before or after the hello was written: either way said,
        // with how it ended.
        let e = start_fails("exit 3");
        assert!(
            e.contains(" and exited with code 3; starting another"),
            "{e}"
        );
        let e = start_fails("kill -SEGV $$");
        assert!(e.contains("killed by signal 11 (SIGSEGV: a crash)"), "{e}");
        // Nothing said: ended once its answer is overdue.
        let began = Instant::now();
        let e = start_fails("exec sleep 30");
        assert!(e.contains("did not answer within 0.3 s"), "{e}");
        assert!(e.contains("killed by signal 9"), "{e}");
        assert!(began.elapsed() < Duration::from_secs(10));
        // An answer that does not decode, and a frame over the limit.
        let e = start_fails("printf '\\001\\000\\000\\000\\011'; exec sleep 30");
        assert!(e.contains("said something that does not decode"), "{e}");
        let e = start_fails("printf '\\377\\377\\377\\377'; exec sleep 30");
        assert!(
            e.contains("cannot be read from: a frame of 4294967295 bytes"),
            "{e}"
        );
        // A program that is not there.
        let mut missing = script("");
        missing.path = PathBuf::from("/nonexistent/tagstore");
        let e = match ClientProcess::start(&missing, "orders", Vec::new()) {
            Ok(_) => panic!("started"),
            Err(e) => e,
        };
        assert!(
            e.contains("cannot start the Kafka client process (/nonexistent/tagstore)"),
            "{e}"
        );
    }

    #[test]
    fn a_spent_client_fails_every_call_with_what_went_wrong() {
        // Reads (the start of) the hello, answers it, and ends.
        let hello = Answer::Done.encode();
        let mut frame = (hello.len() as u32).to_le_bytes().to_vec();
        frame.extend(hello);
        let octal: String = frame.iter().map(|b| format!("\\{b:03o}")).collect();
        let mut c = ClientProcess::start(
            &script(&format!("head -c 1 > /dev/null; printf '{octal}'; exit 0")),
            "orders",
            Vec::new(),
        )
        .unwrap();
        let e = c.partitions("events", false).unwrap_err();
        assert!(
            e.contains(" and exited with code 0; starting another"),
            "{e}"
        );
        let again = c
            .gather(10, 1 << 20, Duration::from_millis(10), Duration::ZERO)
            .err()
            .unwrap();
        assert_eq!(again, e);
        assert_eq!(c.commit(Vec::new()).unwrap_err(), e);
    }
}
