//! The `wg` socket: `/var/run/wireguard/<name>.sock`, a Unix stream socket
//! (directory 0755, socket 0700, as wireguard-go makes them) that answers
//! `get=1` and `set=1` requests, any number per connection. A stale socket
//! file (no process answers on it) is replaced; a live one refuses the start.
//!
//! Limits: a request is at most `MAX_REQUEST_BYTES`; a connection that sends
//! nothing for `IDLE`, or lasts `LIFETIME`, is closed; at most
//! `MAX_CONNECTIONS` are served at once (one more is closed at once).

use super::device::UapiDevice;
use super::protocol::{errno, format_get, parse_set, status_line, UapiError, MAX_REQUEST_BYTES};
use anyhow::Context;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use zeroize::Zeroizing;

/// Where `wg(8)` looks for userspace implementations' sockets.
pub const SOCKET_DIR: &str = "/var/run/wireguard";

/// A connection idle this long is closed.
pub const IDLE: Duration = Duration::from_secs(30);

/// The longest a connection is served (`wg` needs milliseconds).
pub const LIFETIME: Duration = Duration::from_secs(120);

/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 16;

/// Reads one line (with its `\n`) of at most `limit` bytes into `buf`.
/// `Ok(false)`: end of stream or an over-long line.
async fn read_line<R: AsyncRead + Unpin>(r: &mut BufReader<R>, buf: &mut Vec<u8>, limit: usize) -> bool {
    let limit = u64::try_from(limit).unwrap_or(u64::MAX);
    match tokio::time::timeout(IDLE, (&mut *r).take(limit).read_until(b'\n', buf)).await {
        Ok(Ok(n)) => n > 0 && buf.last() == Some(&b'\n'),
        _ => false,
    }
}

/// The body of a `set=1` request: its lines up to the empty one.
async fn read_set_body<R: AsyncRead + Unpin>(r: &mut BufReader<R>) -> Result<Zeroizing<String>, UapiError> {
    // Keys in hex pass through here: zeroed when dropped.
    let mut body = Zeroizing::new(Vec::new());
    loop {
        let start = body.len();
        let room = MAX_REQUEST_BYTES.saturating_sub(start);
        if room == 0 {
            return Err(UapiError::new(errno::EMSGSIZE, format!("a set request is at most {MAX_REQUEST_BYTES} bytes")));
        }
        if !read_line(r, &mut body, room).await {
            if body.len() >= MAX_REQUEST_BYTES {
                return Err(UapiError::new(
                    errno::EMSGSIZE,
                    format!("a set request is at most {MAX_REQUEST_BYTES} bytes"),
                ));
            }
            return Err(UapiError::new(errno::EPROTO, "the set request ended before its empty line"));
        }
        if body.len() - start == 1 {
            body.pop();
            if std::str::from_utf8(&body).is_err() {
                return Err(UapiError::new(errno::EPROTO, "the request is not UTF-8"));
            }
            let text = String::from_utf8(std::mem::take(&mut *body)).unwrap_or_default();
            return Ok(Zeroizing::new(text));
        }
    }
}

async fn answer<W: AsyncWrite + Unpin>(w: &mut W, text: &[u8], result: &Result<(), UapiError>) -> bool {
    if let Err(e) = result {
        tracing::warn!(errno = -e.errno, error = %e.message, "wg socket request refused");
    }
    let mut ok = w.write_all(text).await.is_ok();
    ok = ok && w.write_all(status_line(result).as_bytes()).await.is_ok();
    ok && w.flush().await.is_ok()
}

/// Serves one connection until the client closes it or sends something
/// unanswerable: the loop production runs for every client, and what the
/// `uapi_socket` fuzz target drives.
pub async fn serve_connection<S: AsyncRead + AsyncWrite + Unpin>(device: &Arc<UapiDevice>, stream: S) {
    let (reader, mut writer) = tokio::io::split(stream);
    let mut reader = BufReader::new(reader);
    loop {
        let mut op = Vec::new();
        if !read_line(&mut reader, &mut op, 16).await {
            return;
        }
        match op.as_slice() {
            b"get=1\n" => {
                let mut next = [0u8; 1];
                let result = match tokio::time::timeout(IDLE, reader.read_exact(&mut next)).await {
                    Ok(Ok(_)) if next[0] == b'\n' => Ok(()),
                    Ok(Ok(_)) => Err(UapiError::invalid("trailing characters after get=1")),
                    _ => return,
                };
                let result = match result {
                    Ok(()) => {
                        let d = device.clone();
                        match tokio::task::spawn_blocking(move || d.get()).await {
                            Ok(Ok(state)) => Ok(format_get(&state)),
                            Ok(Err(e)) => Err(e),
                            Err(e) => Err(UapiError::new(errno::EIO, format!("the get did not finish: {e}"))),
                        }
                    }
                    Err(e) => Err(e),
                };
                let ok = match result {
                    Ok(text) => answer(&mut writer, text.as_bytes(), &Ok(())).await,
                    Err(e) => answer(&mut writer, b"", &Err(e)).await,
                };
                if !ok {
                    return;
                }
            }
            b"set=1\n" => {
                let result = match read_set_body(&mut reader).await {
                    Ok(body) => match parse_set(&body) {
                        Ok(req) => device.set(req).await,
                        Err(e) => Err(e),
                    },
                    Err(e) => Err(e),
                };
                let unreadable = matches!(&result, Err(e) if e.errno == errno::EMSGSIZE || e.errno == errno::EPROTO);
                if !answer(&mut writer, b"", &result).await || unreadable {
                    // The rest of the stream cannot be framed: close it.
                    return;
                }
            }
            other => {
                tracing::warn!(op = %String::from_utf8_lossy(other).escape_debug(), "wg socket: unknown operation; closing");
                return;
            }
        }
    }
}

/// What is at a socket path now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketState {
    /// Nothing: a socket can be made there.
    Free,
    /// A socket no process answers on (its process is gone): replaceable.
    Stale,
    /// A process answers on it.
    Live,
    /// A file that is not a socket.
    NotASocket,
    /// A socket this process may not connect to (not root?): cannot tell.
    Unknown,
}

/// What is at `path`: the one probe `UapiSocket::bind` and `wgxdp check` use.
pub fn probe(path: &Path) -> SocketState {
    let Ok(meta) = std::fs::symlink_metadata(path) else { return SocketState::Free };
    if !meta.file_type().is_socket() {
        return SocketState::NotASocket;
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => SocketState::Live,
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => SocketState::Unknown,
        Err(_) => SocketState::Stale,
    }
}

/// The bound socket; its file is removed when this is dropped.
#[derive(Debug)]
pub struct UapiSocket {
    path: PathBuf,
    listener: Option<std::os::unix::net::UnixListener>,
    inode: u64,
}

impl UapiSocket {
    /// Binds `<dir>/<name>.sock`, replacing a stale file; fails if a live
    /// process answers on it.
    pub fn bind(dir: &Path, name: &str) -> anyhow::Result<Self> {
        if !dir.is_dir() {
            // Created as wireguard-go creates it (whatever the umask); an
            // existing one keeps its mode.
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(dir)
                .and_then(|()| std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)))
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let path = dir.join(format!("{name}.sock"));
        match probe(&path) {
            SocketState::Free => {}
            SocketState::Stale => {
                std::fs::remove_file(&path).with_context(|| format!("cannot remove the stale {}", path.display()))?
            }
            SocketState::Live | SocketState::Unknown => anyhow::bail!(
                "{} is in use by a running process (wireguard-go or another wgxdp); choose another [interface] name",
                path.display()
            ),
            SocketState::NotASocket => anyhow::bail!(
                "{} exists and is not a socket; remove it or choose another [interface] name",
                path.display()
            ),
        }
        // Created 0700 (umask 077, as wireguard-go binds it): nobody else can
        // connect in the moment between creating the file and a chmod.
        // SAFETY: umask(2) only swaps the process's file mode mask; it is
        // restored at once (serve binds before it starts other threads).
        let old_mask = unsafe { libc::umask(0o077) };
        let bound = std::os::unix::net::UnixListener::bind(&path);
        // SAFETY: as above.
        unsafe { libc::umask(old_mask) };
        let listener = bound.with_context(|| format!("cannot listen on {}", path.display()))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("cannot set the mode of {}", path.display()))?;
        listener.set_nonblocking(true)?;
        let inode = std::fs::metadata(&path)?.ino();
        Ok(Self { path, listener: Some(listener), inode })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves connections until `stop` is set.
    pub async fn serve(mut self, device: Arc<UapiDevice>, stop: Arc<AtomicBool>) -> anyhow::Result<()> {
        let std_listener = self.listener.take().context("the socket is already being served")?;
        let listener = tokio::net::UnixListener::from_std(std_listener)?;
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        let mut backoff = Duration::from_millis(10);
        while !stop.load(Ordering::Relaxed) {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
            };
            let stream = match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // E.g. out of file descriptors: wait, longer each time.
                    tracing::warn!(error = %e, "wg socket: accept failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            };
            backoff = Duration::from_millis(10);
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                tracing::warn!(max = MAX_CONNECTIONS, "wg socket: too many connections; closing a new one");
                continue;
            };
            let device = device.clone();
            tokio::spawn(async move {
                let _ = tokio::time::timeout(LIFETIME, serve_connection(&device, stream)).await;
                drop(slot);
            });
        }
        Ok(())
    }
}

impl Drop for UapiSocket {
    fn drop(&mut self) {
        // Only our own file: another process may have replaced it since.
        if std::fs::metadata(&self.path).is_ok_and(|m| m.ino() == self.inode) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plane::MemoryPlane;
    use wgxdp_dataplane::noise::PrivateKey;

    fn device() -> Arc<UapiDevice> {
        let key = PrivateKey::from_bytes([0x22; 32]);
        let plane = Arc::new(MemoryPlane::new(key.public_key()));
        Arc::new(UapiDevice::new(key, 51820, Vec::new(), plane, None))
    }

    fn converse(input: &[u8]) -> String {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let mut stream = tokio::io::join(input, Vec::new());
        rt.block_on(serve_connection(&device(), &mut stream));
        String::from_utf8(stream.into_inner().1).unwrap()
    }

    #[test]
    fn a_connection_serves_requests_until_it_cannot_frame_one() {
        let get = "private_key=2222222222222222222222222222222222222222222222222222222222222222\nlisten_port=51820\nerrno=0\n\n";
        assert_eq!(converse(b"get=1\n\nget=1\n\n"), format!("{get}{get}"));
        // What the gateway runs with is no change (accepted without an [api]).
        assert_eq!(converse(b"set=1\nlisten_port=51820\n\nget=1\n\n"), format!("errno=0\n\n{get}"));
        assert_eq!(converse(b"get=1\nx"), "errno=-22\n\n");
        // Unframeable: answered, then closed (the get after it is not read).
        assert_eq!(converse(b"set=1\nlisten_port\n\nget=1\n\n"), "errno=-71\n\n");
        assert_eq!(converse(b"set=1\nlisten_port=1"), "errno=-71\n\n");
        assert_eq!(converse(b"set=1\n\xff=1\n\n"), "errno=-71\n\n");
        let mut huge = b"set=1\n".to_vec();
        while huge.len() <= MAX_REQUEST_BYTES + 10 {
            huge.extend_from_slice(b"replace_peers=true\n");
        }
        assert_eq!(converse(&huge), "errno=-90\n\n");
        let mut long_line = b"set=1\n".to_vec();
        long_line.resize(MAX_REQUEST_BYTES + 100, b'a');
        assert_eq!(converse(&long_line), "errno=-90\n\n");
        // Unknown operations close the connection without an answer.
        assert_eq!(converse(b"get=2\n\n"), "");
        assert_eq!(converse(b"GET / HTTP/1.1\r\n\r\n"), "");
        assert_eq!(converse(b""), "");
    }

    fn temp_dir() -> PathBuf {
        let d = std::env::temp_dir().join(crate::store::random_id("wgxdp-uapi-dir-"));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn the_socket_is_private_replaces_a_stale_one_and_refuses_a_live_one() {
        let dir = temp_dir();
        let sock_dir = dir.join("wireguard");
        let socket = UapiSocket::bind(&sock_dir, "wgtest0").unwrap();
        let path = sock_dir.join("wgtest0.sock");
        assert_eq!(socket.path(), path);
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!((mode(&sock_dir), mode(&path)), (0o755, 0o700));
        // A live socket (this one listens) refuses a second gateway.
        let e = UapiSocket::bind(&sock_dir, "wgtest0").unwrap_err().to_string();
        assert!(e.contains("in use by a running process"), "{e}");
        // A stale file (its process gone, the file left) is replaced.
        drop(socket);
        assert!(!path.exists(), "the socket file outlived its socket");
        let stale = std::os::unix::net::UnixListener::bind(&path).unwrap();
        drop(stale);
        assert!(path.exists());
        let again = UapiSocket::bind(&sock_dir, "wgtest0").unwrap();
        // A file that is not a socket is left alone.
        std::fs::write(sock_dir.join("plain.sock"), b"x").unwrap();
        let e = UapiSocket::bind(&sock_dir, "plain").unwrap_err().to_string();
        assert!(e.contains("not a socket"), "{e}");
        // Dropping removes only our own file, not one that replaced it.
        std::fs::remove_file(&path).unwrap();
        let other = std::os::unix::net::UnixListener::bind(&path).unwrap();
        drop(again);
        assert!(path.exists(), "dropped another process's socket file");
        drop(other);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
