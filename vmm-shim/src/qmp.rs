//! A small QMP client: the greeting, `qmp_capabilities`, then commands matched to their
//! replies by id, with asynchronous events skipped.
//!
//! QEMU is trusted more than a guest, but its replies are still read with a bounded line
//! length, so a confused or hostile peer on the socket cannot make the agent buffer without
//! limit.

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Map, Value};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

/// The longest QMP message accepted. The replies this crate asks for are a few hundred bytes;
/// the largest QEMU sends unasked (events) are a few KiB. 1 MiB leaves room for commands such
/// as `query-qmp-schema` while still bounding memory.
pub const MAX_LINE: usize = 1 << 20;

/// Errors of the QMP client.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The socket could not be connected.
    #[error("cannot connect to the QMP socket {path}")]
    Connect {
        /// The socket.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Reading or writing the socket failed.
    #[error("the QMP connection failed")]
    Io(#[from] std::io::Error),
    /// QEMU closed the connection.
    #[error("QEMU closed the QMP connection")]
    Closed,
    /// A message was longer than [`MAX_LINE`].
    #[error("a QMP message is longer than {MAX_LINE} bytes")]
    LineTooLong,
    /// A message was not a JSON object.
    #[error("QEMU sent a QMP message that is not a JSON object: {0}")]
    NotJson(String),
    /// The first message was not a greeting.
    #[error("QEMU's first QMP message is not a greeting: {0}")]
    NoGreeting(String),
    /// QEMU answered a command with an error.
    #[error("QEMU refused {command}: {class}: {desc}")]
    Command {
        /// The command.
        command: String,
        /// QMP's error class, such as `GenericError`.
        class: String,
        /// QEMU's explanation.
        desc: String,
    },
    /// A reply had neither `return` nor `error`.
    #[error("QEMU's reply to {command} has neither a return nor an error: {reply}")]
    BadReply {
        /// The command.
        command: String,
        /// The reply.
        reply: String,
    },
    /// An earlier command was abandoned half-written, so the stream can no longer be trusted.
    #[error("an earlier QMP command was cancelled part-way; reconnect")]
    Desynchronized,
}

/// A connected QMP session, past capability negotiation.
#[derive(Debug)]
pub struct QmpClient {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    greeting: Value,
    next_id: u64,
    /// Set while a command is being written: if the future is dropped there, the stream may
    /// hold half a command and every later reply would be suspect.
    writing: bool,
    /// The part of a message read so far: kept here, not in a future, so that a cancelled
    /// read loses nothing.
    partial: Vec<u8>,
}

impl QmpClient {
    /// Connects to QEMU's QMP socket and negotiates capabilities.
    ///
    /// # Cancel safety
    /// Cancel safe: a dropped connect leaves nothing behind.
    pub async fn connect(path: &Path) -> Result<Self, Error> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| Error::Connect {
                path: path.to_owned(),
                source,
            })?;
        Self::handshake(stream).await
    }

    /// Tries [`QmpClient::connect`] every few milliseconds until it works or `timeout` passes;
    /// `give_up` is checked between tries (say, whether QEMU has exited) and ends the wait
    /// with the last error when it returns true.
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn connect_retry(
        path: &Path,
        timeout: Duration,
        mut give_up: impl FnMut() -> bool,
    ) -> Result<Self, Error> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut delay = Duration::from_millis(2);
        loop {
            let err = match tokio::time::timeout_at(deadline, Self::connect(path)).await {
                Ok(Ok(c)) => return Ok(c),
                // Not there yet, or there but not listening yet: try again.
                Ok(Err(Error::Connect { path, source }))
                    if matches!(
                        source.kind(),
                        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                    ) =>
                {
                    Error::Connect { path, source }
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => Error::Connect {
                    path: path.to_owned(),
                    source: std::io::ErrorKind::TimedOut.into(),
                },
            };
            if give_up() || tokio::time::Instant::now() >= deadline {
                return Err(err);
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(20));
        }
    }

    /// Reads the greeting and sends `qmp_capabilities` on an already connected stream.
    ///
    /// # Cancel safety
    /// Cancel safe: a dropped handshake drops the stream.
    pub async fn handshake(stream: UnixStream) -> Result<Self, Error> {
        let (r, w) = stream.into_split();
        let mut c = QmpClient {
            reader: BufReader::new(r),
            writer: w,
            greeting: Value::Null,
            next_id: 1,
            writing: false,
            partial: Vec::new(),
        };
        let greeting = c.read_message().await?;
        if !greeting.contains_key("QMP") {
            return Err(Error::NoGreeting(Value::Object(greeting).to_string()));
        }
        c.greeting = Value::Object(greeting);
        c.execute("qmp_capabilities", None).await?;
        Ok(c)
    }

    /// The greeting's `QMP` object (version and capabilities).
    pub fn greeting(&self) -> &Value {
        &self.greeting["QMP"]
    }

    /// QEMU's version from the greeting, such as `7.2.19`.
    pub fn qemu_version(&self) -> Option<String> {
        let v = &self.greeting()["version"]["qemu"];
        Some(format!(
            "{}.{}.{}",
            v["major"].as_u64()?,
            v["minor"].as_u64()?,
            v["micro"].as_u64()?
        ))
    }

    /// Whether an earlier cancelled command left the stream unusable.
    pub fn is_desynchronized(&self) -> bool {
        self.writing
    }

    /// Runs `command` with optional `arguments` and returns its `return` value. Events and
    /// replies to earlier, abandoned commands are skipped.
    ///
    /// # Cancel safety
    /// Cancelling while the reply is awaited is harmless: partial reads are kept, and the next
    /// command skips the stale reply by its id. Cancelling while the command is being written leaves the client
    /// [desynchronized](Self::is_desynchronized); later calls fail and the caller should
    /// reconnect.
    pub async fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, Error> {
        if self.writing {
            return Err(Error::Desynchronized);
        }
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({ "execute": command, "id": id });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        let mut line = msg.to_string();
        line.push('\n');
        self.writing = true;
        self.writer.write_all(line.as_bytes()).await?;
        self.writing = false;
        loop {
            let m = self.read_message().await?;
            if m.contains_key("event") {
                tracing::trace!(event = ?m.get("event"), "QMP event");
                continue;
            }
            if m.get("id").and_then(Value::as_u64) != Some(id) {
                let reply = Value::Object(m);
                tracing::debug!(%reply, "skipping a stale QMP reply");
                continue;
            }
            if let Some(r) = m.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = m.get("error") {
                let s = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
                return Err(Error::Command {
                    command: command.to_owned(),
                    class: s("class"),
                    desc: s("desc"),
                });
            }
            return Err(Error::BadReply {
                command: command.to_owned(),
                reply: Value::Object(m).to_string(),
            });
        }
    }

    async fn read_message(&mut self) -> Result<Map<String, Value>, Error> {
        let line = read_line_bounded(&mut self.reader, &mut self.partial, MAX_LINE).await?;
        match serde_json::from_slice::<Value>(&line) {
            Ok(Value::Object(m)) => Ok(m),
            _ => Err(Error::NotJson(
                String::from_utf8_lossy(&line[..line.len().min(200)]).into_owned(),
            )),
        }
    }
}

/// Reads one `\n`-terminated line (without the `\n`), failing once it passes `max` bytes
/// instead of buffering on. Blank lines are skipped.
///
/// # Cancel safety
/// Cancel safe: a partly read line stays in `line` for the next call.
async fn read_line_bounded<R: AsyncBufRead + Unpin>(
    r: &mut R,
    line: &mut Vec<u8>,
    max: usize,
) -> Result<Vec<u8>, Error> {
    loop {
        let buf = r.fill_buf().await?;
        if buf.is_empty() {
            return Err(Error::Closed);
        }
        let (take, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (buf.len(), false),
        };
        if line.len() + take > max + 1 {
            return Err(Error::LineTooLong);
        }
        line.extend_from_slice(&buf[..take]);
        r.consume(take);
        if done {
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            if line.iter().all(u8::is_ascii_whitespace) {
                line.clear();
                continue;
            }
            return Ok(std::mem::take(line));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 19, "minor": 2, "major": 7}, "package": "Debian 1:7.2+dfsg-7+deb12u18"}, "capabilities": ["oob"]}}"#;

    /// A fake QEMU: sends the greeting, then answers each command line with what `reply`
    /// returns for it (any number of lines, each sent as is).
    fn fake_qemu(
        server: UnixStream,
        greeting: &'static str,
        reply: impl Fn(&Value) -> Vec<String> + Send + 'static,
    ) -> tokio::task::JoinHandle<Vec<Value>> {
        tokio::spawn(async move {
            let (r, mut w) = server.into_split();
            let mut r = BufReader::new(r);
            let mut seen = Vec::new();
            w.write_all(format!("{greeting}\r\n").as_bytes())
                .await
                .unwrap();
            let mut line = String::new();
            while r.read_line(&mut line).await.unwrap() > 0 {
                let cmd: Value = serde_json::from_str(&line).unwrap();
                line.clear();
                for out in reply(&cmd) {
                    if w.write_all(format!("{out}\r\n").as_bytes()).await.is_err() {
                        return seen;
                    }
                }
                seen.push(cmd);
            }
            seen
        })
    }

    fn ok(cmd: &Value, ret: Value) -> String {
        json!({"return": ret, "id": cmd["id"]}).to_string()
    }

    #[tokio::test]
    async fn negotiates_and_matches_replies_by_id() {
        let (client, server) = UnixStream::pair().unwrap();
        let fake = fake_qemu(server, GREETING, |cmd| {
            match cmd["execute"].as_str().unwrap() {
            "qmp_capabilities" => vec![ok(cmd, json!({}))],
            "query-status" => vec![
                // An event and a stale reply come first; both are skipped.
                r#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "RESUME"}"#.into(),
                json!({"return": {"status": "paused"}, "id": 999}).to_string(),
                ok(cmd, json!({"status": "running", "singlestep": false, "running": true})),
            ],
            "bogus" => vec![json!({"error": {"class": "CommandNotFound", "desc": "The command bogus has not been found"}, "id": cmd["id"]}).to_string()],
            "odd" => vec![json!({"id": cmd["id"]}).to_string()],
            _ => vec![ok(cmd, json!({}))],
        }
        });
        let mut c = QmpClient::handshake(client).await.unwrap();
        assert_eq!(c.qemu_version().as_deref(), Some("7.2.19"));
        assert_eq!(c.greeting()["capabilities"][0], "oob");
        let st = c.execute("query-status", None).await.unwrap();
        assert_eq!(st["status"], "running");
        match c.execute("bogus", None).await {
            Err(Error::Command {
                command,
                class,
                desc,
            }) => {
                assert_eq!(command, "bogus");
                assert_eq!(class, "CommandNotFound");
                assert!(desc.contains("not been found"));
            }
            other => panic!("expected a command error, got {other:?}"),
        }
        assert!(matches!(
            c.execute("odd", None).await,
            Err(Error::BadReply { .. })
        ));
        c.execute("stop", Some(json!({"x": 1}))).await.unwrap();
        drop(c);
        let seen = fake.await.unwrap();
        let names: Vec<_> = seen
            .iter()
            .map(|c| c["execute"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            ["qmp_capabilities", "query-status", "bogus", "odd", "stop"]
        );
        assert_eq!(seen[4]["arguments"]["x"], 1);
        // Ids are distinct and rising.
        let ids: Vec<_> = seen.iter().map(|c| c["id"].as_u64().unwrap()).collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]));
    }

    #[tokio::test]
    async fn rejects_a_missing_greeting() {
        let (client, server) = UnixStream::pair().unwrap();
        let _fake = fake_qemu(server, r#"{"hello": 1}"#, |_| vec![]);
        assert!(matches!(
            QmpClient::handshake(client).await,
            Err(Error::NoGreeting(_))
        ));
    }

    #[tokio::test]
    async fn rejects_non_json() {
        let (client, server) = UnixStream::pair().unwrap();
        let _fake = fake_qemu(server, "not json", |_| vec![]);
        assert!(matches!(
            QmpClient::handshake(client).await,
            Err(Error::NotJson(_))
        ));
    }

    #[tokio::test]
    async fn reports_a_closed_connection() {
        let (client, server) = UnixStream::pair().unwrap();
        drop(server);
        assert!(matches!(
            QmpClient::handshake(client).await,
            Err(Error::Closed)
        ));
    }

    #[tokio::test]
    async fn bounds_the_line_length() {
        let (client, mut server) = UnixStream::pair().unwrap();
        let writer = tokio::spawn(async move {
            // Far more than MAX_LINE without a newline; the client must stop reading.
            let chunk = vec![b'x'; 64 * 1024];
            for _ in 0..(MAX_LINE / chunk.len() + 8) {
                if server.write_all(&chunk).await.is_err() {
                    break;
                }
            }
            let mut rest = Vec::new();
            let _ = server.read_to_end(&mut rest).await;
        });
        let r = tokio::time::timeout(Duration::from_secs(10), QmpClient::handshake(client))
            .await
            .unwrap();
        assert!(matches!(r, Err(Error::LineTooLong)), "{r:?}");
        writer.await.unwrap();
    }

    #[tokio::test]
    async fn reads_lines_across_buffer_boundaries() {
        let data = b"\n  \n{\"a\":1}\r\n{\"b\":2}\n".to_vec();
        let mut r = BufReader::with_capacity(3, &data[..]);
        let mut buf = Vec::new();
        assert_eq!(
            read_line_bounded(&mut r, &mut buf, 100).await.unwrap(),
            b"{\"a\":1}"
        );
        assert_eq!(
            read_line_bounded(&mut r, &mut buf, 7).await.unwrap(),
            b"{\"b\":2}"
        );
        assert!(matches!(
            read_line_bounded(&mut r, &mut buf, 100).await,
            Err(Error::Closed)
        ));
        let mut r = BufReader::with_capacity(3, &b"12345678\n"[..]);
        assert!(matches!(
            read_line_bounded(&mut r, &mut Vec::new(), 7).await,
            Err(Error::LineTooLong)
        ));
    }

    #[tokio::test]
    async fn connect_retry_waits_for_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let p2 = path.clone();
        let server = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let l = tokio::net::UnixListener::bind(&p2).unwrap();
            let (s, _) = l.accept().await.unwrap();
            fake_qemu(s, GREETING, |cmd| vec![ok(cmd, json!({}))])
                .await
                .unwrap()
        });
        let c = QmpClient::connect_retry(&path, Duration::from_secs(5), || false)
            .await
            .unwrap();
        drop(c);
        server.await.unwrap();

        // Gives up when told to, without waiting out the timeout.
        let start = std::time::Instant::now();
        let r = QmpClient::connect_retry(
            &dir.path().join("absent.sock"),
            Duration::from_secs(30),
            || true,
        )
        .await;
        assert!(matches!(r, Err(Error::Connect { .. })));
        assert!(start.elapsed() < Duration::from_secs(5));
    }
}
