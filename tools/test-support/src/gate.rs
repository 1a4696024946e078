//! A gate in front of a TCP server: a loopback port that forwards every
//! connection to the server while open, and while closed cuts the
//! connections it carries and refuses new ones (accepts and closes them at
//! once). To a client this is the server going away and coming back with
//! what it had, as a broker restarted on durable storage does.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

struct Shared {
    open: AtomicBool,
    stop: AtomicBool,
    /// Both ends of every connection carried, to cut them.
    carried: Mutex<Vec<TcpStream>>,
}

/// A gate on a free loopback port; stops forwarding when dropped.
pub struct Gate {
    port: u16,
    shared: Arc<Shared>,
}

fn forward(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = [0u8; 16 << 10];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}

impl Gate {
    /// A gate, open, forwarding to `127.0.0.1:upstream`.
    pub fn start(upstream: u16) -> Gate {
        let listener = TcpListener::bind("127.0.0.1:0").expect("a loopback port for the gate");
        let port = listener.local_addr().expect("the gate's port").port();
        let shared = Arc::new(Shared {
            open: AtomicBool::new(true),
            stop: AtomicBool::new(false),
            carried: Mutex::new(Vec::new()),
        });
        let s = shared.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if s.stop.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = client else { continue };
                if !s.open.load(Ordering::SeqCst) {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                let (Ok(c2), Ok(s2), Ok(c3), Ok(s3)) = (
                    client.try_clone(),
                    server.try_clone(),
                    client.try_clone(),
                    server.try_clone(),
                ) else {
                    continue;
                };
                s.carried
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .extend([c3, s3]);
                std::thread::spawn(move || forward(client, server));
                std::thread::spawn(move || forward(s2, c2));
            }
        });
        Gate { port, shared }
    }

    /// The gate's port: what clients connect to.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Cuts every connection carried and refuses new ones until
    /// [`Gate::open`].
    pub fn close(&self) {
        self.shared.open.store(false, Ordering::SeqCst);
        let carried = std::mem::take(
            &mut *self
                .shared
                .carried
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        );
        for c in carried {
            let _ = c.shutdown(Shutdown::Both);
        }
    }

    /// Forwards new connections again.
    pub fn open(&self) {
        self.shared.open.store(true, Ordering::SeqCst);
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.close();
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wakes the accepting thread so that it sees the stop.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}
