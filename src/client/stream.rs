//! Offset-addressed output readers and stdin writers (the entrypoint's and each exec's), and the
//! sandbox event stream. Readers resume at their byte offset after a broken connection; writers
//! send offset-addressed chunks, so a retried write is harmless.

use super::transport::{backoff, chain, Payload, Retry, MAX_RETRIES};
use super::{Client, Error, Result};
use crate::api;
use bytes::{Bytes, BytesMut};
use futures_util::Stream;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::Method;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Largest stdin chunk one POST carries; a long drain is acknowledged piece by piece.
const STDIN_CHUNK: usize = 1 << 20;

/// Refuses calls on handles of a detached sandbox (Modal's `ClientClosed`).
#[derive(Debug, Clone)]
pub(crate) struct Guard {
    sandbox: Arc<str>,
    detached: Arc<AtomicBool>,
}

impl Guard {
    pub(crate) fn new(sandbox: &str) -> Guard {
        Guard {
            sandbox: sandbox.into(),
            detached: Arc::new(AtomicBool::new(false)),
        }
    }

    pub(crate) fn detach(&self) {
        self.detached.store(true, Ordering::SeqCst);
    }

    pub(crate) fn check(&self, what: &str) -> Result<()> {
        if self.detached.load(Ordering::SeqCst) {
            return Err(Error::ClientClosed(format!(
                "{what} on sandbox {}: this handle was detached",
                self.sandbox
            )));
        }
        Ok(())
    }
}

/// Bytes received but not yet handed out, cut into lines on demand.
#[derive(Debug, Default)]
pub(crate) struct LineBuffer {
    buf: BytesMut,
    /// How far `buf` is known to hold no `\n` (so a long line is scanned once).
    scanned: usize,
}

impl LineBuffer {
    pub(crate) fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Everything buffered.
    pub(crate) fn take_all(&mut self) -> Bytes {
        self.scanned = 0;
        self.buf.split().freeze()
    }

    /// The next complete line (with its `\n`); at `eof`, the unterminated rest. `Invalid` when
    /// the line is not UTF-8: its bytes then stay buffered (`take_all` hands them out raw).
    /// `offset` is the stream position of the first buffered byte, for the message.
    pub(crate) fn take_line(&mut self, eof: bool, offset: u64) -> Result<Option<String>> {
        let end = match self.buf[self.scanned..].iter().position(|&b| b == b'\n') {
            Some(i) => self.scanned + i + 1,
            None if eof && !self.buf.is_empty() => self.buf.len(),
            None => {
                self.scanned = self.buf.len();
                return Ok(None);
            }
        };
        if let Err(e) = std::str::from_utf8(&self.buf[..end]) {
            return Err(Error::Invalid(format!(
                "output is not UTF-8 at byte offset {} (in the line at offset {offset}); \
                 read it with next_chunk instead",
                offset + e.valid_up_to() as u64
            )));
        }
        self.scanned = 0;
        let line = self.buf.split_to(end);
        Ok(Some(
            String::from_utf8(line.to_vec()).expect("validated as UTF-8 just above"),
        ))
    }
}

/// Where a reader is: what it got from sbxd and the open response, if any.
struct ReadState {
    /// Bytes received from sbxd: the offset the next request starts at.
    received: u64,
    body: Option<Incoming>,
    lines: LineBuffer,
    eof: bool,
}

/// Reads one output stream (stdout or stderr of the entrypoint or of an exec) from a byte
/// offset. Every byte arrives exactly once: when the connection breaks mid-way the reader
/// reopens `GET …?offset=N&follow=true` at the bytes it has so far (retrying with backoff).
///
/// It has one position, so it is shared by reference (`&StreamReader`), not cloned; the methods
/// take `&self` and serialize on an internal lock. They are cancel-safe: a call dropped while
/// waiting (e.g. in `tokio::select!`) loses no bytes. A reader keeps its response open between
/// calls, so a reader that stops reading holds up to 2 MiB of that stream in the client (and
/// back-pressures the process once sbxd's window is full); drop it to let go.
pub struct StreamReader {
    client: Client,
    /// `/v1/sandboxes/{id}/stdout` (or an exec's).
    path: String,
    guard: Guard,
    /// Bytes handed to the caller (`offset()`).
    delivered: AtomicU64,
    state: tokio::sync::Mutex<ReadState>,
}

impl std::fmt::Debug for StreamReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamReader")
            .field("path", &self.path)
            .field("offset", &self.offset())
            .finish()
    }
}

impl StreamReader {
    pub(crate) fn new(client: Client, path: String, guard: Guard) -> StreamReader {
        StreamReader {
            client,
            path,
            guard,
            delivered: AtomicU64::new(0),
            state: tokio::sync::Mutex::new(ReadState {
                received: 0,
                body: None,
                lines: LineBuffer::default(),
                eof: false,
            }),
        }
    }

    /// The stream position of the next byte this reader hands out.
    pub fn offset(&self) -> u64 {
        self.delivered.load(Ordering::SeqCst)
    }

    /// The same stream read from `offset` instead (e.g. to resume where an earlier reader, or
    /// an earlier run of the program, stopped).
    /// (A new reader with its own position; this one is left as it is.)
    pub fn at(&self, offset: u64) -> StreamReader {
        StreamReader {
            client: self.client.clone(),
            path: self.path.clone(),
            guard: self.guard.clone(),
            delivered: AtomicU64::new(offset),
            state: tokio::sync::Mutex::new(ReadState {
                received: offset,
                body: None,
                lines: LineBuffer::default(),
                eof: false,
            }),
        }
    }

    /// The next bytes of output, as they come; `None` at the end of the stream (the process
    /// and everything holding the pipe closed it, and every byte was delivered). Never empty.
    pub async fn next_chunk(&self) -> Result<Option<Bytes>> {
        self.guard.check("reading output")?;
        let mut st = self.state.lock().await;
        if !st.lines.is_empty() {
            let data = st.lines.take_all();
            self.delivered
                .fetch_add(data.len() as u64, Ordering::SeqCst);
            return Ok(Some(data));
        }
        let data = self.fill(&mut st).await?;
        if let Some(d) = &data {
            self.delivered.fetch_add(d.len() as u64, Ordering::SeqCst);
        }
        Ok(data)
    }

    /// The next line, with its `\n`; the last line without one when the stream ends on it;
    /// `None` at the end. Strict UTF-8: a line that is not is `Invalid`, and its bytes stay
    /// unread (`next_chunk` returns them). A line is buffered whole, however long it is.
    pub async fn next_line(&self) -> Result<Option<String>> {
        self.guard.check("reading output")?;
        let mut st = self.state.lock().await;
        loop {
            let start = self.offset();
            let eof = st.eof;
            if let Some(line) = st.lines.take_line(eof, start)? {
                self.delivered
                    .fetch_add(line.len() as u64, Ordering::SeqCst);
                return Ok(Some(line));
            }
            if eof {
                return Ok(None);
            }
            if let Some(data) = self.fill(&mut st).await? {
                st.lines.push(&data);
            }
        }
    }

    /// What the stream holds now, from the current offset, without waiting for more
    /// (`follow=false`), and whether that is the end of the stream. Advances the offset.
    pub async fn read_available(&self) -> Result<(Vec<u8>, bool)> {
        use http_body_util::BodyExt;
        self.guard.check("reading output")?;
        let mut st = self.state.lock().await;
        let mut out = st.lines.take_all().to_vec();
        self.delivered.fetch_add(out.len() as u64, Ordering::SeqCst);
        if st.eof {
            return Ok((out, true));
        }
        // Any open following response is dropped; bytes it had not handed out are asked again.
        st.body = None;
        let offset = st.received;
        let path = format!("{}?offset={offset}&follow=false", self.path);
        let response = self
            .client
            .send(Method::GET, &path, &Payload::Empty, Retry::Always)
            .await?;
        let eof = response
            .headers()
            .get("sbx-eof")
            .and_then(|v| v.to_str().ok())
            .map(|v| v == "true")
            .unwrap_or(false);
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| Error::Transport(format!("reading {path}: {}", chain(&e))))?
            .to_bytes();
        st.received += body.len() as u64;
        self.delivered
            .fetch_add(body.len() as u64, Ordering::SeqCst);
        out.extend_from_slice(&body);
        if eof {
            st.eof = true;
        }
        Ok((out, eof))
    }

    /// Everything from the current offset to the end of the stream.
    pub async fn read_to_end(&self) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        while let Some(chunk) = self.next_chunk().await? {
            out.extend_from_slice(&chunk);
        }
        Ok(out)
    }

    /// Everything to the end, as strict UTF-8 (`Invalid` naming the first bad byte's offset).
    pub async fn read_text(&self) -> Result<String> {
        let start = self.offset();
        let bytes = self.read_to_end().await?;
        String::from_utf8(bytes).map_err(|e| {
            Error::Invalid(format!(
                "output of {} is not UTF-8 at byte offset {}",
                self.path,
                start + e.utf8_error().valid_up_to() as u64
            ))
        })
    }

    /// The next data frame from sbxd, opening (or reopening, after a break) the response at
    /// `st.received`; `None` once the body ended cleanly.
    async fn fill(&self, st: &mut ReadState) -> Result<Option<Bytes>> {
        let mut failures = 0;
        loop {
            if st.eof {
                return Ok(None);
            }
            let body = match st.body.as_mut() {
                Some(body) => body,
                None => st.body.insert(self.open(st.received).await?),
            };
            match body.frame().await {
                None => {
                    st.body = None;
                    st.eof = true;
                    return Ok(None);
                }
                Some(Ok(frame)) => {
                    // Trailers carry nothing for us; empty data frames are skipped.
                    if let Ok(data) = frame.into_data() {
                        if !data.is_empty() {
                            st.received += data.len() as u64;
                            return Ok(Some(data));
                        }
                    }
                }
                Some(Err(e)) => {
                    st.body = None;
                    if failures >= MAX_RETRIES {
                        return Err(Error::Transport(format!(
                            "reading {} at offset {}: {}",
                            self.path,
                            st.received,
                            chain(&e)
                        )));
                    }
                    failures += 1;
                    tokio::time::sleep(backoff(failures)).await;
                }
            }
        }
    }

    async fn open(&self, offset: u64) -> Result<Incoming> {
        let path = format!("{}?offset={offset}&follow=true", self.path);
        let response = self
            .client
            .send(Method::GET, &path, &Payload::Empty, Retry::Always)
            .await?;
        if let Some(v) = response.headers().get("sbx-offset") {
            let start = v.to_str().ok().and_then(|s| s.trim().parse::<u64>().ok());
            if start != Some(offset) {
                return Err(Error::Transport(format!(
                    "GET {path}: sbxd answered from offset {v:?}, not {offset}"
                )));
            }
        }
        Ok(response.into_body())
    }
}

/// What `write` has buffered and `drain` has not yet sent.
#[derive(Debug, Default)]
struct Pending {
    data: Vec<u8>,
    eof: bool,
}

/// What sbxd has acknowledged.
#[derive(Debug)]
struct Sent {
    /// The stream position of the next byte to send; `None` until learned (a handle made by
    /// `from_id` does not know what others wrote before it).
    offset: Option<u64>,
    eof: bool,
}

struct WriterShared {
    client: Client,
    /// `/v1/sandboxes/{id}/stdin` (or an exec's).
    path: String,
    guard: Guard,
    pending: Mutex<Pending>,
    sent: tokio::sync::Mutex<Sent>,
}

/// Modal's `StreamWriter` for a stdin: [`write`](Self::write) buffers, [`drain`](Self::drain)
/// sends, [`write_eof`](Self::write_eof) marks the end that the next drain sends.
///
/// Writes are addressed by stream offset, so a drain retried after a broken connection never
/// duplicates bytes. Clones share one buffer and position (as do all clones of the
/// [`Sandbox`](super::Sandbox) or [`Process`](super::Process) it came from). When sbxd reports
/// a position other than the one this writer expected (another writer wrote to the same
/// stdin), `drain` fails with `Conflict`.
#[derive(Clone)]
pub struct StreamWriter {
    shared: Arc<WriterShared>,
}

impl std::fmt::Debug for StreamWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamWriter")
            .field("path", &self.shared.path)
            .finish()
    }
}

impl StreamWriter {
    /// `start`: the stream position when known (0 for a process this client just started).
    pub(crate) fn new(client: Client, path: String, guard: Guard, start: Option<u64>) -> Self {
        StreamWriter {
            shared: Arc::new(WriterShared {
                client,
                path,
                guard,
                pending: Mutex::new(Pending::default()),
                sent: tokio::sync::Mutex::new(Sent {
                    offset: start,
                    eof: false,
                }),
            }),
        }
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.shared
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Buffers `data` (nothing is sent until [`drain`](Self::drain)). `Invalid` after
    /// [`write_eof`](Self::write_eof).
    pub fn write(&self, data: impl AsRef<[u8]>) -> Result<()> {
        self.shared.guard.check("writing stdin")?;
        let mut p = self.pending();
        if p.eof {
            return Err(Error::Invalid(format!(
                "write to {} after write_eof",
                self.shared.path
            )));
        }
        p.data.extend_from_slice(data.as_ref());
        Ok(())
    }

    /// Marks the end of the input: the next [`drain`](Self::drain) closes the stdin after the
    /// buffered bytes. Idempotent.
    pub fn write_eof(&self) {
        self.pending().eof = true;
    }

    /// Sends what is buffered (and the EOF mark, if set), returning once sbxd has put it in
    /// the pipe: a process that does not read its stdin holds `drain` back. Safe to retry and
    /// to cancel: bytes leave the buffer only when acknowledged.
    pub async fn drain(&self) -> Result<()> {
        self.shared.guard.check("writing stdin")?;
        let mut sent = self.shared.sent.lock().await;
        loop {
            let (chunk, eof) = {
                let p = self.pending();
                let n = p.data.len().min(STDIN_CHUNK);
                (
                    Bytes::copy_from_slice(&p.data[..n]),
                    p.eof && n == p.data.len(),
                )
            };
            if chunk.is_empty() && (!eof || sent.eof) {
                return Ok(());
            }
            let start = match sent.offset {
                Some(o) => o,
                // An empty write at 0 skips nothing and reports the current position.
                None if !chunk.is_empty() => self.post(0, Bytes::new(), false).await?.offset,
                // An EOF alone may go at any offset not past the end.
                None => 0,
            };
            let len = chunk.len() as u64;
            let ack = self.post(start, chunk, eof).await?;
            if len > 0 && ack.offset != start + len {
                return Err(Error::Conflict(format!(
                    "{}: wrote {len} bytes at offset {start} but sbxd is at {}: \
                     another writer wrote to this stdin",
                    self.shared.path, ack.offset
                )));
            }
            sent.offset = Some(if len > 0 { start + len } else { ack.offset });
            sent.eof |= eof;
            self.pending().data.drain(..len as usize);
        }
    }

    /// [`write`](Self::write) then [`drain`](Self::drain).
    pub async fn write_all(&self, data: impl AsRef<[u8]>) -> Result<()> {
        self.write(data)?;
        self.drain().await
    }

    /// [`write_eof`](Self::write_eof) then [`drain`](Self::drain): sends what is buffered and
    /// closes the stdin.
    pub async fn close(&self) -> Result<()> {
        self.write_eof();
        self.drain().await
    }

    async fn post(&self, offset: u64, data: Bytes, eof: bool) -> Result<api::StdinAck> {
        let path = format!("{}?offset={offset}&eof={eof}", self.shared.path);
        self.shared
            .client
            .json(Method::POST, &path, &Payload::Raw(data), Retry::Always)
            .await
    }
}

/// The lifecycle events of a sandbox, in order (see [`Sandbox::events`](super::Sandbox::events)).
pub type EventStream = Pin<Box<dyn Stream<Item = Result<api::Event>> + Send>>;

/// Reads `events?after=SEQ` as NDJSON, resuming after the last event seen when the body breaks.
struct EventReader {
    client: Client,
    /// `/v1/sandboxes/{id}/events`.
    path: String,
    follow: bool,
    after: u64,
    body: Option<Incoming>,
    buf: LineBuffer,
    done: bool,
}

impl EventReader {
    async fn open(&mut self) -> Result<()> {
        let path = format!("{}?after={}&follow={}", self.path, self.after, self.follow);
        let response = self
            .client
            .send(Method::GET, &path, &Payload::Empty, Retry::Always)
            .await?;
        self.body = Some(response.into_body());
        Ok(())
    }

    async fn next(&mut self) -> Result<Option<api::Event>> {
        let mut failures = 0;
        loop {
            if let Some(line) = self.buf.take_line(self.done, 0)? {
                let line = line.trim();
                if line.is_empty() {
                    continue;
                }
                let event: api::Event = serde_json::from_str(line).map_err(|e| {
                    Error::Transport(format!(
                        "{}: an event line is not an Event: {e}: {line}",
                        self.path
                    ))
                })?;
                if event.seq <= self.after {
                    continue; // already seen (a resumed stream repeating itself)
                }
                self.after = event.seq;
                return Ok(Some(event));
            }
            if self.done {
                return Ok(None);
            }
            if self.body.is_none() {
                self.open().await?;
            }
            let body = self.body.as_mut().expect("opened just above");
            match body.frame().await {
                None => {
                    self.body = None;
                    self.done = true;
                }
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buf.push(&data);
                    }
                }
                Some(Err(e)) => {
                    self.body = None;
                    // Reopen after the last whole event; drop the partial line.
                    self.buf = LineBuffer::default();
                    if failures >= MAX_RETRIES {
                        return Err(Error::Transport(format!(
                            "reading {} after event {}: {}",
                            self.path,
                            self.after,
                            chain(&e)
                        )));
                    }
                    failures += 1;
                    tokio::time::sleep(backoff(failures)).await;
                }
            }
        }
    }
}

/// Opens the event stream (errors such as `not_found` come back here) and wraps it.
pub(crate) async fn events(client: Client, path: String, follow: bool) -> Result<EventStream> {
    let mut reader = EventReader {
        client,
        path,
        follow,
        after: 0,
        body: None,
        buf: LineBuffer::default(),
        done: false,
    };
    reader.open().await?;
    let stream = futures_util::stream::unfold(Some(reader), |state| async move {
        let mut reader = state?;
        match reader.next().await {
            Ok(Some(event)) => Some((Ok(event), Some(reader))),
            Ok(None) => None,
            Err(e) => Some((Err(e), None)),
        }
    });
    Ok(Box::pin(stream))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(chunks: &[&[u8]]) -> Vec<Result<Option<String>>> {
        let mut b = LineBuffer::default();
        let mut out = Vec::new();
        for c in chunks {
            b.push(c);
            while let Ok(Some(l)) = b.take_line(false, 0) {
                out.push(Ok(Some(l)));
            }
        }
        out.push(b.take_line(true, 0));
        out
    }

    #[test]
    fn lines_keep_the_final_unterminated_line() {
        let got = lines(&[b"h\xc3", b"\xa9llo\nwor", b"ld\n\n", b"tail"]);
        let got: Vec<_> = got.into_iter().map(|r| r.unwrap().unwrap()).collect();
        assert_eq!(got, ["héllo\n", "world\n", "\n", "tail"]);
    }

    #[test]
    fn lines_end_without_a_rest() {
        let mut b = LineBuffer::default();
        b.push(b"one\n");
        assert_eq!(b.take_line(true, 0).unwrap().as_deref(), Some("one\n"));
        assert_eq!(b.take_line(true, 4).unwrap(), None);
    }

    #[test]
    fn invalid_utf8_is_rejected_and_kept() {
        let mut b = LineBuffer::default();
        b.push(b"ok\nbad \xff here\n");
        assert_eq!(b.take_line(false, 10).unwrap().as_deref(), Some("ok\n"));
        let e = b.take_line(false, 13).unwrap_err();
        assert!(
            matches!(&e, Error::Invalid(m) if m.contains("offset 17")),
            "{e}"
        );
        // The bad bytes are still there, raw.
        assert_eq!(&b.take_all()[..], b"bad \xff here\n");
    }

    #[test]
    fn a_truncated_character_at_eof_is_invalid() {
        let mut b = LineBuffer::default();
        b.push(b"caf\xc3");
        assert_eq!(b.take_line(false, 0).unwrap(), None);
        assert!(matches!(b.take_line(true, 0), Err(Error::Invalid(_))));
    }
}
