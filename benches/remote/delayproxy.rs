// benches/remote/delayproxy.rs — a TCP proxy that adds a fixed one-way delay
// in each direction, without limiting throughput.
//
//   rustc -O benches/remote/delayproxy.rs -o delayproxy   (std only, no Cargo)
//   delayproxy LISTEN_ADDR UPSTREAM_ADDR DELAY_MS
//
// Every chunk read from one side is stamped and handed to a writer thread
// that sends it to the other side DELAY_MS after it arrived. The reader keeps
// reading meanwhile (the chunks in flight are a queue, not a stop-and-wait),
// so a stream flows at whatever rate the path allows (tbf sets that), only
// DELAY_MS later: with 5 ms each way, a request/response costs a 10 ms RTT.
// A new connection's first bytes wait one RTT more (the TCP handshake of a
// real 10 ms path). TCP_NODELAY on both sockets: the proxy adds no Nagle
// delay of its own. Bandwidth shaping is left to tbf; the proxy stays cheap
// (a 256 KiB read per wake-up, 4 threads per connection, no polling).
//
// What it does not model: the slow-start ramp of a fresh connection over a
// real 10 ms path (both of its TCP legs have ~0 RTT), and loss.

use std::collections::VecDeque;
use std::env;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::exit;
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

const CHUNK: usize = 256 << 10;
/// Bytes a direction may hold before its reader waits (far above the
/// 1.25 MB that 1 Gbit/s x 10 ms keeps in flight).
const MAX_HELD: usize = 32 << 20;

struct Queue {
    items: VecDeque<(Instant, Option<Vec<u8>>)>, // None: end of stream
    held: usize,
    closed: bool, // the writer failed: the reader stops
}

struct Pipe {
    q: Mutex<Queue>,
    cv: Condvar,
}

fn reader(mut from: TcpStream, pipe: Arc<Pipe>, start_after: Option<Instant>) {
    if let Some(t) = start_after {
        let now = Instant::now();
        if t > now {
            thread::sleep(t - now);
        }
    }
    loop {
        let mut buf = vec![0u8; CHUNK];
        let n = match from.read(&mut buf) {
            Ok(n) => n,
            Err(ref e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => 0,
        };
        let now = Instant::now();
        let mut q = pipe.q.lock().unwrap();
        if n == 0 {
            q.items.push_back((now, None));
            pipe.cv.notify_all();
            return;
        }
        buf.truncate(n);
        while q.held + n > MAX_HELD && !q.closed {
            q = pipe.cv.wait(q).unwrap();
        }
        if q.closed {
            return;
        }
        q.held += n;
        q.items.push_back((now, Some(buf)));
        pipe.cv.notify_all();
    }
}

fn writer(mut to: TcpStream, other: TcpStream, pipe: Arc<Pipe>, delay: Duration) {
    loop {
        let (at, item) = {
            let mut q = pipe.q.lock().unwrap();
            while q.items.is_empty() {
                q = pipe.cv.wait(q).unwrap();
            }
            q.items.pop_front().unwrap()
        };
        let due = at + delay;
        let now = Instant::now();
        if due > now {
            thread::sleep(due - now);
        }
        match item {
            Some(buf) => {
                let ok = to.write_all(&buf).is_ok();
                let mut q = pipe.q.lock().unwrap();
                q.held -= buf.len();
                if !ok {
                    q.closed = true;
                    pipe.cv.notify_all();
                    drop(q);
                    // Tear both connections down: the reader of this
                    // direction and the other direction's threads see it.
                    let _ = to.shutdown(Shutdown::Both);
                    let _ = other.shutdown(Shutdown::Both);
                    return;
                }
                pipe.cv.notify_all();
            }
            None => {
                let _ = to.shutdown(Shutdown::Write);
                return;
            }
        }
    }
}

fn direction(from: TcpStream, to: TcpStream, delay: Duration, start_after: Option<Instant>) {
    let pipe = Arc::new(Pipe {
        q: Mutex::new(Queue { items: VecDeque::new(), held: 0, closed: false }),
        cv: Condvar::new(),
    });
    let p = pipe.clone();
    let other = from.try_clone().expect("clone");
    thread::spawn(move || reader(from, p, start_after));
    thread::spawn(move || writer(to, other, pipe, delay));
}

fn main() {
    let args: Vec<String> = env::args().collect();
    if args.len() != 4 {
        eprintln!("usage: delayproxy LISTEN_ADDR UPSTREAM_ADDR DELAY_MS");
        exit(2);
    }
    let delay = Duration::from_micros((args[3].parse::<f64>().expect("DELAY_MS") * 1000.0) as u64);
    let listener = TcpListener::bind(&args[1]).unwrap_or_else(|e| {
        eprintln!("delayproxy: cannot listen on {}: {e}", args[1]);
        exit(1);
    });
    let upstream = args[2].clone();
    eprintln!("delayproxy: {} -> {}, {:?} each way", args[1], upstream, delay);
    for conn in listener.incoming() {
        let client = match conn {
            Ok(c) => c,
            Err(_) => continue,
        };
        let upstream = upstream.clone();
        thread::spawn(move || {
            let accepted = Instant::now();
            let server = match TcpStream::connect(&upstream) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("delayproxy: connect {upstream}: {e}");
                    return;
                }
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            // The handshake of a real path: the request leaves one RTT
            // after the connect; it then takes one more delay to arrive.
            direction(client, server, delay, Some(accepted + 2 * delay));
            direction(s2, c2, delay, None);
        });
    }
}
