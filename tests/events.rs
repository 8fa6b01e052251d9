//! The client side of the API's events, as a consumer would write it: a
//! webhook receiver that checks each delivery's signature, and a
//! Server-Sent Events reader over a plain socket (HTTP/1.0, so the stream is
//! the raw `text/event-stream`).

use serde_json::Value;
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// A request the receiver got: headers (names in lowercase) and body.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub headers: HashMap<String, String>,
    pub body: Vec<u8>,
}

impl Delivery {
    pub fn event(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

/// A webhook receiver on `listener`: answers the statuses of `answers` in
/// turn (then 200) and hands over every request. Stops on drop.
#[derive(Debug)]
pub struct WebhookReceiver {
    rx: Receiver<Delivery>,
    stop: Arc<AtomicBool>,
}

fn read_request(conn: &TcpStream) -> std::io::Result<Delivery> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut headers = HashMap::new();
    let mut line = String::new();
    reader.read_line(&mut line)?;
    loop {
        line.clear();
        reader.read_line(&mut line)?;
        let Some((name, value)) = line.trim_end().split_once(':') else { break };
        headers.insert(name.to_ascii_lowercase(), value.trim().to_owned());
    }
    let len: usize = headers.get("content-length").and_then(|l| l.parse().ok()).unwrap_or(0);
    let mut body = vec![0u8; len];
    reader.read_exact(&mut body)?;
    Ok(Delivery { headers, body })
}

impl WebhookReceiver {
    pub fn start(listener: TcpListener, answers: Vec<u16>) -> Self {
        listener.set_nonblocking(true).expect("a non-blocking listener");
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = channel();
        let stopped = stop.clone();
        std::thread::spawn(move || {
            let mut answers = answers.into_iter();
            while !stopped.load(Ordering::Relaxed) {
                let Ok((mut conn, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                };
                let _ = conn.set_nonblocking(false);
                let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
                let Ok(delivery) = read_request(&conn) else { continue };
                let status = answers.next().unwrap_or(200);
                let _ = write!(conn, "HTTP/1.1 {status} Answer\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                let _ = tx.send(delivery);
            }
        });
        Self { rx, stop }
    }

    /// The next delivery, waiting at most `timeout`.
    pub fn next(&self, timeout: Duration) -> Option<Delivery> {
        self.rx.recv_timeout(timeout).ok()
    }
}

impl Drop for WebhookReceiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    use hmac::Mac;
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key).expect("any key length");
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

/// Checks `Wgxdp-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`
/// as the README tells a receiver to: the MAC, and a timestamp within 5 minutes.
pub fn verify_signature(d: &Delivery, secret: &str) -> Result<(), String> {
    let sig = d.headers.get("wgxdp-signature").ok_or("no Wgxdp-Signature header")?;
    let mut t = None;
    let mut v1 = None;
    for part in sig.split(',') {
        match part.split_once('=') {
            Some(("t", v)) => t = v.parse::<u64>().ok(),
            Some(("v1", v)) => v1 = Some(v.to_owned()),
            _ => {}
        }
    }
    let (t, v1) = (t.ok_or("no timestamp")?, v1.ok_or("no v1 signature")?);
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_err(|e| e.to_string())?.as_secs();
    if now.abs_diff(t) > 300 {
        return Err(format!("timestamp {t} is {} s from now", now.abs_diff(t)));
    }
    let expected: String = hmac_sha256(secret.as_bytes(), &[t.to_string().as_bytes(), b".", &d.body])
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    if expected != v1 {
        return Err(format!("signature {v1} does not verify (expected {expected})"));
    }
    Ok(())
}

/// One Server-Sent Event: id, type, data.
pub type Sse = (i64, String, Value);

/// A Server-Sent Events stream read off a socket; dropping it disconnects.
#[derive(Debug)]
pub struct SseClient {
    stream: TcpStream,
    buf: String,
    headers_done: bool,
    /// The HTTP status line.
    pub status: String,
}

impl SseClient {
    /// `GET path` on `stream` (already connected to the API) with `key`,
    /// resuming after `last_event_id` if given.
    pub fn open(mut stream: TcpStream, path: &str, key: &str, last_event_id: Option<i64>) -> Self {
        let resume = last_event_id.map(|id| format!("Last-Event-ID: {id}\r\n")).unwrap_or_default();
        write!(
            stream,
            "GET {path} HTTP/1.0\r\nAuthorization: Bearer {key}\r\nAccept: text/event-stream\r\n{resume}\r\n"
        )
        .expect("send the request");
        Self { stream, buf: String::new(), headers_done: false, status: String::new() }
    }

    /// The next event, or `None` after `timeout` (or when the stream ended).
    pub fn next(&mut self, timeout: Duration) -> Option<Sse> {
        let deadline = Instant::now() + timeout;
        loop {
            if !self.headers_done {
                if let Some(end) = self.buf.find("\r\n\r\n") {
                    self.status = self.buf.lines().next().unwrap_or("").to_owned();
                    self.buf.drain(..end + 4);
                    self.headers_done = true;
                }
            }
            while self.headers_done {
                let Some(end) = self.buf.find("\n\n") else { break };
                let block: String = self.buf.drain(..end + 2).collect();
                let (mut id, mut kind, mut data) = (None, None, None);
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("id:") {
                        id = v.trim().parse().ok();
                    } else if let Some(v) = line.strip_prefix("event:") {
                        kind = Some(v.trim().to_owned());
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data = serde_json::from_str(v.trim()).ok();
                    }
                }
                if let (Some(id), Some(kind), Some(data)) = (id, kind, data) {
                    return Some((id, kind, data));
                }
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            self.stream.set_read_timeout(Some(left.max(Duration::from_millis(1)))).ok()?;
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk) {
                Ok(0) => return None,
                Ok(n) => self.buf.push_str(&String::from_utf8_lossy(&chunk[..n])),
                Err(_) if Instant::now() >= deadline => return None,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return None,
            }
        }
    }

    /// The next event whose type is `kind`, skipping others (returned too).
    pub fn until(&mut self, kind: &str, timeout: Duration) -> Vec<Sse> {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        while let Some(e) = self.next(deadline.saturating_duration_since(Instant::now())) {
            let done = e.1 == kind;
            seen.push(e);
            if done {
                break;
            }
        }
        seen
    }
}
