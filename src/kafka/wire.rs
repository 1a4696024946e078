//! What the server and a Kafka client process say to each other
//! ([`super::process`] asks, [`super::client`] answers).
//!
//! The client process holds librdkafka, so that a fault in the C library
//! (a crash on a broker's answer it did not expect) ends that process, not
//! the server. They talk over the process's standard input and output in
//! frames: a little-endian `u32` length, then that many bytes, one request
//! and then its answer, in turn. Each frame starts with a kind byte; the
//! fields that follow are fixed-width little-endian integers, and strings
//! and byte strings as a `u32` length then the bytes. A frame longer than
//! [`MAX_FRAME`], or one that does not decode, ends the conversation.
//!
//! This room owns only the encoding: no librdkafka, no store.

use std::io::{self, Read, Write};
use std::time::Duration;

/// The version of this protocol, checked in [`Request::Hello`]: the server
/// starts the client from its own executable, so they differ only when
/// something is badly wrong.
pub const VERSION: u32 = 1;

/// The longest frame either side sends or takes: a batch of messages is
/// cut at about 32 MiB, and its last message may be as long as the
/// brokers let one be (librdkafka's `receive.message.max.bytes`, set to
/// [`MAX_MESSAGE`]).
pub const MAX_FRAME: usize = (32 << 20) + 2 * MAX_MESSAGE;

/// Longest a metadata request waits for the brokers.
pub const METADATA_TIMEOUT: Duration = Duration::from_secs(10);

/// The longest message the client takes from the brokers.
pub const MAX_MESSAGE: usize = 64 << 20;

/// Where a partition starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum At {
    Beginning,
    End,
    Offset(i64),
}

/// What the server asks of the client process.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    /// First, and only once: make the librdkafka consumer with these
    /// settings (`bootstrap.servers`, `group.id`, …).
    Hello {
        version: u32,
        source: String,
        settings: Vec<(String, String)>,
    },
    /// The partitions of a topic. `assigned`: the consumer reads
    /// partitions already (what librdkafka says of a failure is heard at
    /// the next poll instead of now).
    Partitions { topic: String, assigned: bool },
    /// Read these partitions, from these positions.
    Assign { at: Vec<(String, i32, At)> },
    /// Up to `most` messages and about `bytes` bytes: wait at most
    /// `first_wait_ms` for the first, then at most `linger_ms` for more.
    Gather {
        most: u32,
        bytes: u32,
        first_wait_ms: u32,
        linger_ms: u32,
    },
    /// Commit these positions to the consumer group, without waiting.
    Commit { next: Vec<(String, i32, i64)> },
    /// Each partition's end, in turn, waiting at most `timeout_ms` for
    /// each; stops at the first that does not answer.
    Ends {
        partitions: Vec<(String, i32)>,
        timeout_ms: u32,
    },
}

/// One message, copied out of librdkafka's buffer.
#[derive(Debug, Clone, PartialEq)]
pub struct Msg {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub payload: Vec<u8>,
}

/// What the client process answers.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// Done.
    Done,
    /// Not done, and why (in words for the source's status).
    Failed(String),
    /// A topic's partitions.
    Partitions(Vec<i32>),
    /// Messages gathered; `error`: a poll failed before any came (empty
    /// when none did); `resets`: librdkafka's reports of positions the
    /// brokers did not hold, since the last batch.
    Batch {
        msgs: Vec<Msg>,
        error: String,
        resets: Vec<String>,
    },
    /// The ends of the partitions asked, in order, as many as answered.
    Ends(Vec<i64>),
}

/// Why a frame could not be read.
#[derive(Debug)]
pub enum FrameError {
    /// The other side closed the pipe between two frames.
    Closed,
    Io(io::Error),
    /// A frame over [`MAX_FRAME`], or one that does not decode.
    Bad(String),
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::Closed => write!(f, "the pipe was closed"),
            FrameError::Io(e) => write!(f, "{e}"),
            FrameError::Bad(e) => write!(f, "{e}"),
        }
    }
}

/// Writes one frame (and flushes).
pub fn write_frame(w: &mut impl Write, body: &[u8]) -> io::Result<()> {
    if body.len() > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("a frame of {} bytes (at most {MAX_FRAME})", body.len()),
        ));
    }
    w.write_all(&(body.len() as u32).to_le_bytes())?;
    w.write_all(body)?;
    w.flush()
}

/// Reads one frame.
pub fn read_frame(r: &mut impl Read) -> Result<Vec<u8>, FrameError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(FrameError::Closed),
        Err(e) => return Err(FrameError::Io(e)),
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::Bad(format!(
            "a frame of {len} bytes (at most {MAX_FRAME})"
        )));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            FrameError::Bad(format!("a frame of {len} bytes cut short"))
        } else {
            FrameError::Io(e)
        }
    })?;
    Ok(body)
}

struct Out(Vec<u8>);

impl Out {
    fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn i32(&mut self, v: i32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn i64(&mut self, v: i64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.u32(v.len() as u32);
        self.0.extend_from_slice(v);
        self
    }
    fn str(&mut self, v: &str) -> &mut Self {
        self.bytes(v.as_bytes())
    }
    fn count(&mut self, n: usize) -> &mut Self {
        self.u32(n as u32)
    }
}

struct In<'a>(&'a [u8]);

impl<'a> In<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], FrameError> {
        if self.0.len() < n {
            return Err(FrameError::Bad("a frame cut short".into()));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, FrameError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, FrameError> {
        let mut b = [0u8; 4];
        b.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(b))
    }
    fn i32(&mut self) -> Result<i32, FrameError> {
        Ok(self.u32()? as i32)
    }
    fn i64(&mut self) -> Result<i64, FrameError> {
        let mut b = [0u8; 8];
        b.copy_from_slice(self.take(8)?);
        Ok(i64::from_le_bytes(b))
    }
    fn bytes(&mut self) -> Result<&'a [u8], FrameError> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    fn str(&mut self) -> Result<String, FrameError> {
        String::from_utf8(self.bytes()?.to_vec())
            .map_err(|_| FrameError::Bad("a string that is not UTF-8".into()))
    }
    /// A count of items, each at least `least` bytes: never more than the
    /// frame can hold (so a bad count cannot make a huge vector).
    fn count(&mut self, least: usize) -> Result<usize, FrameError> {
        let n = self.u32()? as usize;
        if n.saturating_mul(least) > self.0.len() {
            return Err(FrameError::Bad(format!(
                "a count of {n} items in {} bytes",
                self.0.len()
            )));
        }
        Ok(n)
    }
    fn end(&self) -> Result<(), FrameError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(FrameError::Bad(format!(
                "{} bytes after the end of a frame",
                self.0.len()
            )))
        }
    }
}

impl Request {
    pub fn encode(&self) -> Vec<u8> {
        let mut o = Out(Vec::new());
        match self {
            Request::Hello {
                version,
                source,
                settings,
            } => {
                o.u8(1).u32(*version).str(source).count(settings.len());
                for (k, v) in settings {
                    o.str(k).str(v);
                }
            }
            Request::Partitions { topic, assigned } => {
                o.u8(2).str(topic).u8(u8::from(*assigned));
            }
            Request::Assign { at } => {
                o.u8(3).count(at.len());
                for (topic, p, at) in at {
                    o.str(topic).i32(*p);
                    match at {
                        At::Beginning => o.u8(0).i64(0),
                        At::End => o.u8(1).i64(0),
                        At::Offset(n) => o.u8(2).i64(*n),
                    };
                }
            }
            Request::Gather {
                most,
                bytes,
                first_wait_ms,
                linger_ms,
            } => {
                o.u8(4)
                    .u32(*most)
                    .u32(*bytes)
                    .u32(*first_wait_ms)
                    .u32(*linger_ms);
            }
            Request::Commit { next } => {
                o.u8(5).count(next.len());
                for (topic, p, n) in next {
                    o.str(topic).i32(*p).i64(*n);
                }
            }
            Request::Ends {
                partitions,
                timeout_ms,
            } => {
                o.u8(6).u32(*timeout_ms).count(partitions.len());
                for (topic, p) in partitions {
                    o.str(topic).i32(*p);
                }
            }
        }
        o.0
    }

    pub fn decode(b: &[u8]) -> Result<Self, FrameError> {
        let mut i = In(b);
        let r = match i.u8()? {
            1 => {
                let version = i.u32()?;
                let source = i.str()?;
                let n = i.count(8)?;
                let mut settings = Vec::with_capacity(n);
                for _ in 0..n {
                    settings.push((i.str()?, i.str()?));
                }
                Request::Hello {
                    version,
                    source,
                    settings,
                }
            }
            2 => Request::Partitions {
                topic: i.str()?,
                assigned: i.u8()? != 0,
            },
            3 => {
                let n = i.count(17)?;
                let mut at = Vec::with_capacity(n);
                for _ in 0..n {
                    let topic = i.str()?;
                    let p = i.i32()?;
                    let kind = i.u8()?;
                    let off = i.i64()?;
                    let a = match kind {
                        0 => At::Beginning,
                        1 => At::End,
                        2 => At::Offset(off),
                        k => return Err(FrameError::Bad(format!("a start of kind {k}"))),
                    };
                    at.push((topic, p, a));
                }
                Request::Assign { at }
            }
            4 => Request::Gather {
                most: i.u32()?,
                bytes: i.u32()?,
                first_wait_ms: i.u32()?,
                linger_ms: i.u32()?,
            },
            5 => {
                let n = i.count(16)?;
                let mut next = Vec::with_capacity(n);
                for _ in 0..n {
                    next.push((i.str()?, i.i32()?, i.i64()?));
                }
                Request::Commit { next }
            }
            6 => {
                let timeout_ms = i.u32()?;
                let n = i.count(8)?;
                let mut partitions = Vec::with_capacity(n);
                for _ in 0..n {
                    partitions.push((i.str()?, i.i32()?));
                }
                Request::Ends {
                    partitions,
                    timeout_ms,
                }
            }
            k => return Err(FrameError::Bad(format!("a request of kind {k}"))),
        };
        i.end()?;
        Ok(r)
    }
}

impl Answer {
    pub fn encode(&self) -> Vec<u8> {
        let mut o = Out(Vec::new());
        match self {
            Answer::Done => {
                o.u8(1);
            }
            Answer::Failed(why) => {
                o.u8(2).str(why);
            }
            Answer::Partitions(ps) => {
                o.u8(3).count(ps.len());
                for p in ps {
                    o.i32(*p);
                }
            }
            Answer::Batch {
                msgs,
                error,
                resets,
            } => {
                o.u8(4).str(error).count(resets.len());
                for r in resets {
                    o.str(r);
                }
                o.count(msgs.len());
                for m in msgs {
                    o.str(&m.topic)
                        .i32(m.partition)
                        .i64(m.offset)
                        .bytes(&m.payload);
                }
            }
            Answer::Ends(highs) => {
                o.u8(5).count(highs.len());
                for h in highs {
                    o.i64(*h);
                }
            }
        }
        o.0
    }

    pub fn decode(b: &[u8]) -> Result<Self, FrameError> {
        let mut i = In(b);
        let a = match i.u8()? {
            1 => Answer::Done,
            2 => Answer::Failed(i.str()?),
            3 => {
                let n = i.count(4)?;
                let mut ps = Vec::with_capacity(n);
                for _ in 0..n {
                    ps.push(i.i32()?);
                }
                Answer::Partitions(ps)
            }
            4 => {
                let error = i.str()?;
                let n = i.count(4)?;
                let mut resets = Vec::with_capacity(n);
                for _ in 0..n {
                    resets.push(i.str()?);
                }
                let n = i.count(20)?;
                let mut msgs = Vec::with_capacity(n);
                for _ in 0..n {
                    msgs.push(Msg {
                        topic: i.str()?,
                        partition: i.i32()?,
                        offset: i.i64()?,
                        payload: i.bytes()?.to_vec(),
                    });
                }
                Answer::Batch {
                    msgs,
                    error,
                    resets,
                }
            }
            5 => {
                let n = i.count(8)?;
                let mut highs = Vec::with_capacity(n);
                for _ in 0..n {
                    highs.push(i.i64()?);
                }
                Answer::Ends(highs)
            }
            k => return Err(FrameError::Bad(format!("an answer of kind {k}"))),
        };
        i.end()?;
        Ok(a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_request_and_answer_reads_back_as_written() {
        let requests = vec![
            Request::Hello {
                version: VERSION,
                source: "抖音".into(),
                settings: vec![("bootstrap.servers".into(), "a:9092".into())],
            },
            Request::Partitions {
                topic: "events".into(),
                assigned: true,
            },
            Request::Assign {
                at: vec![
                    ("t".into(), 0, At::Beginning),
                    ("t".into(), 1, At::End),
                    ("u".into(), 7, At::Offset(42)),
                ],
            },
            Request::Gather {
                most: 5000,
                bytes: 32 << 20,
                first_wait_ms: 100,
                linger_ms: 20,
            },
            Request::Commit {
                next: vec![("t".into(), 3, 9)],
            },
            Request::Ends {
                partitions: vec![("t".into(), 0), ("t".into(), 1)],
                timeout_ms: 500,
            },
        ];
        for r in requests {
            assert_eq!(Request::decode(&r.encode()).unwrap(), r);
        }
        let answers = vec![
            Answer::Done,
            Answer::Failed("topic \"t\": the brokers do not list it".into()),
            Answer::Partitions(vec![0, 1, 2]),
            Answer::Batch {
                msgs: vec![
                    Msg {
                        topic: "t".into(),
                        partition: 2,
                        offset: 10,
                        payload: b"{\"a\":1}".to_vec(),
                    },
                    Msg {
                        topic: "t".into(),
                        partition: 2,
                        offset: 11,
                        payload: Vec::new(),
                    },
                ],
                error: String::new(),
                resets: vec!["t [2]: offset reset".into()],
            },
            Answer::Ends(vec![-1, 5]),
        ];
        for a in answers {
            let mut pipe = Vec::new();
            write_frame(&mut pipe, &a.encode()).unwrap();
            let body = read_frame(&mut pipe.as_slice()).unwrap();
            assert_eq!(Answer::decode(&body).unwrap(), a);
        }
    }

    #[test]
    fn a_bad_frame_is_refused_whole() {
        // Cut anywhere, with bytes after, or an unknown kind: an error,
        // never a panic or a huge allocation.
        let a = Answer::Batch {
            msgs: vec![Msg {
                topic: "t".into(),
                partition: 0,
                offset: 1,
                payload: vec![7; 100],
            }],
            error: String::new(),
            resets: Vec::new(),
        }
        .encode();
        for n in 0..a.len() {
            assert!(Answer::decode(&a[..n]).is_err(), "cut at {n}");
        }
        let mut more = a.clone();
        more.push(0);
        assert!(Answer::decode(&more).is_err());
        assert!(Answer::decode(&[9]).is_err());
        // A count far larger than the frame.
        assert!(Answer::decode(&[3, 0xff, 0xff, 0xff, 0xff]).is_err());
        assert!(Request::decode(&[5, 0xff, 0xff, 0xff, 0x7f]).is_err());
        // A length over the limit, and a frame cut short.
        let huge = ((MAX_FRAME + 1) as u32).to_le_bytes();
        assert!(matches!(
            read_frame(&mut huge.as_slice()),
            Err(FrameError::Bad(_))
        ));
        assert!(matches!(
            read_frame(&mut [4u8, 0, 0, 0, 1].as_slice()),
            Err(FrameError::Bad(_))
        ));
        assert!(matches!(
            read_frame(&mut [].as_slice()),
            Err(FrameError::Closed)
        ));
    }
}
