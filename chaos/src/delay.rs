//! Added latency without netem: a userspace UDP proxy that holds every
//! datagram for a while before passing it on.
//!
//! The proxy listens on a loopback port; each client address gets its own
//! upstream socket connected to the target, so replies find their way back.
//! Every datagram, either way, is sent `delay` (plus up to `jitter`) after
//! it arrived; datagrams are never dropped, duplicated or reordered (a
//! datagram waits for the one before it). The storage agent advertises the proxy's
//! address (`--advertise`), so sources dial through it.

use std::cmp::Reverse;
use std::collections::hash_map::Entry;
use std::collections::{BinaryHeap, HashMap};
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// How long a blocked receive waits before looking at the stop flag.
const POLL: Duration = Duration::from_millis(100);
/// Largest datagram passed on (QUIC's are far smaller).
const MAX_DATAGRAM: usize = 65_535;

/// Where a held datagram goes.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Towards {
    /// To the target, through this client's upstream socket.
    Target(SocketAddr),
    /// Back to this client, from the listening socket.
    Client(SocketAddr),
}

/// A held datagram, ordered by when it is due (then by arrival).
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Held {
    due: Instant,
    seq: u64,
    towards: Towards,
    data: Vec<u8>,
}

#[derive(Debug, Default)]
struct Queue {
    held: Mutex<BinaryHeap<Reverse<Held>>>,
    ready: Condvar,
}

/// A running delay proxy. Dropping it stops its threads.
#[derive(Debug)]
pub struct DelayProxy {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    forwarded: Arc<AtomicU64>,
    threads: Vec<JoinHandle<()>>,
}

impl DelayProxy {
    /// Listens on `127.0.0.1:0` and passes datagrams to `target` and back,
    /// each held `delay` plus a random part of `jitter`.
    pub fn start(target: SocketAddr, delay: Duration, jitter: Duration, seed: u64) -> Result<Self> {
        let listen = UdpSocket::bind("127.0.0.1:0").context("cannot bind the delay proxy")?;
        listen.set_read_timeout(Some(POLL))?;
        big_buffers(&listen);
        let listen = Arc::new(listen);
        let addr = listen.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let forwarded = Arc::new(AtomicU64::new(0));
        let queue = Arc::new(Queue::default());
        let upstreams: Arc<Mutex<HashMap<SocketAddr, Arc<UdpSocket>>>> = Arc::default();
        let seq = Arc::new(AtomicU64::new(0));
        // The random part, and the last due time: datagrams leave in the
        // order they came (jitter that reorders a burst makes QUIC take
        // every overtaken packet for lost and collapse its window, a fault
        // of the proxy rather than of a network).
        let clock = Arc::new(Mutex::new((
            flotilla_tests::XorShift::new(seed | 1),
            Instant::now(),
        )));
        let hold = move || {
            let Ok(mut clock) = clock.lock() else {
                return Instant::now() + delay;
            };
            let extra = if jitter.is_zero() {
                Duration::ZERO
            } else {
                Duration::from_micros(clock.0.next_u64() % (jitter.as_micros() as u64 + 1))
            };
            let due = (Instant::now() + delay + extra).max(clock.1);
            clock.1 = due;
            due
        };

        let mut threads = Vec::new();
        // Client → target.
        {
            let (listen, stop, queue, upstreams, seq) = (
                listen.clone(),
                stop.clone(),
                queue.clone(),
                upstreams.clone(),
                seq.clone(),
            );
            let hold = hold.clone();
            threads.push(thread::spawn(move || {
                let mut buf = vec![0u8; MAX_DATAGRAM];
                let mut readers = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let Ok((n, client)) = listen.recv_from(&mut buf) else {
                        continue;
                    };
                    let known = upstreams
                        .lock()
                        .map(|u| u.contains_key(&client))
                        .unwrap_or(true);
                    if !known {
                        // A new client: its own upstream socket, read by its
                        // own thread.
                        let Ok(up) = UdpSocket::bind("127.0.0.1:0") else {
                            continue;
                        };
                        if up.connect(target).is_err() || up.set_read_timeout(Some(POLL)).is_err() {
                            continue;
                        }
                        big_buffers(&up);
                        let up = Arc::new(up);
                        if let Ok(mut u) = upstreams.lock() {
                            u.insert(client, up.clone());
                        }
                        let (stop, queue, seq, hold) =
                            (stop.clone(), queue.clone(), seq.clone(), hold.clone());
                        readers.push(thread::spawn(move || {
                            let mut buf = vec![0u8; MAX_DATAGRAM];
                            while !stop.load(Ordering::Relaxed) {
                                if let Ok(n) = up.recv(&mut buf) {
                                    push(&queue, hold(), &seq, Towards::Client(client), &buf[..n]);
                                }
                            }
                        }));
                    }
                    push(&queue, hold(), &seq, Towards::Target(client), &buf[..n]);
                }
                for r in readers {
                    let _ = r.join();
                }
            }));
        }
        // The sender: waits for the earliest due datagram and sends it.
        {
            let (listen, stop, queue, forwarded) = (listen, stop.clone(), queue, forwarded.clone());
            threads.push(thread::spawn(move || {
                let mut known: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
                while !stop.load(Ordering::Relaxed) {
                    // Take what is due under the lock; send without it, so
                    // the readers are never held up by a send.
                    let due = {
                        let Ok(mut held) = queue.held.lock() else {
                            return;
                        };
                        let now = Instant::now();
                        let wait = match held.peek() {
                            Some(Reverse(h)) if h.due <= now => None,
                            Some(Reverse(h)) => Some((h.due - now).min(POLL)),
                            None => Some(POLL),
                        };
                        if let Some(wait) = wait {
                            let _ = queue.ready.wait_timeout(held, wait);
                            continue;
                        }
                        let mut due = Vec::new();
                        while held.peek().is_some_and(|Reverse(h)| h.due <= now) {
                            if let Some(Reverse(h)) = held.pop() {
                                due.push(h);
                            }
                        }
                        due
                    };
                    for h in due {
                        let sent = match h.towards {
                            Towards::Target(client) => {
                                let up = match known.entry(client) {
                                    Entry::Occupied(e) => Some(e.get().clone()),
                                    Entry::Vacant(e) => upstreams
                                        .lock()
                                        .ok()
                                        .and_then(|u| u.get(&client).cloned())
                                        .map(|up| e.insert(up).clone()),
                                };
                                up.map(|up| up.send(&h.data))
                            }
                            Towards::Client(client) => Some(listen.send_to(&h.data, client)),
                        };
                        if matches!(sent, Some(Ok(_))) {
                            forwarded.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }));
        }
        Ok(Self {
            addr,
            stop,
            forwarded,
            threads,
        })
    }

    /// The address clients dial.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Datagrams passed on so far, both ways (proof that traffic went
    /// through the proxy).
    pub fn forwarded(&self) -> u64 {
        self.forwarded.load(Ordering::Relaxed)
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Socket buffers large enough that a burst of a fast QUIC sender is held
/// rather than dropped by the kernel while the proxy's threads catch up (the
/// loss would be the proxy's, not the fault's). Forced past `rmem_max` when
/// root; the default otherwise.
fn big_buffers(socket: &UdpSocket) {
    use nix::sys::socket::{setsockopt, sockopt};
    const SIZE: usize = 16 << 20;
    if setsockopt(socket, sockopt::RcvBufForce, &SIZE).is_err() {
        let _ = setsockopt(socket, sockopt::RcvBuf, &SIZE);
    }
    if setsockopt(socket, sockopt::SndBufForce, &SIZE).is_err() {
        let _ = setsockopt(socket, sockopt::SndBuf, &SIZE);
    }
}

fn push(queue: &Queue, due: Instant, seq: &AtomicU64, towards: Towards, data: &[u8]) {
    let held = Held {
        due,
        seq: seq.fetch_add(1, Ordering::Relaxed),
        towards,
        data: data.to_vec(),
    };
    if let Ok(mut q) = queue.held.lock() {
        q.push(Reverse(held));
    }
    queue.ready.notify_one();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datagrams_go_both_ways_and_arrive_late() {
        let echo = UdpSocket::bind("127.0.0.1:0").unwrap();
        let target = echo.local_addr().unwrap();
        let server = thread::spawn(move || {
            let mut buf = [0u8; 64];
            for _ in 0..3 {
                let (n, from) = echo.recv_from(&mut buf).unwrap();
                echo.send_to(&buf[..n], from).unwrap();
            }
        });
        let proxy =
            DelayProxy::start(target, Duration::from_millis(40), Duration::ZERO, 1).unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        for word in [&b"one"[..], b"two", b"three"] {
            let sent = Instant::now();
            client.send_to(word, proxy.addr()).unwrap();
            let mut buf = [0u8; 64];
            let n = client.recv(&mut buf).unwrap();
            assert_eq!(&buf[..n], word);
            // Held once each way.
            assert!(
                sent.elapsed() >= Duration::from_millis(80),
                "{:?}",
                sent.elapsed()
            );
        }
        server.join().unwrap();
        // The count follows the send that the client has already seen.
        let deadline = Instant::now() + Duration::from_secs(5);
        while proxy.forwarded() < 6 && Instant::now() < deadline {
            thread::yield_now();
        }
        assert_eq!(proxy.forwarded(), 6);
    }
}
