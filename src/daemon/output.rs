//! Process output spooled to files and read back by byte offset; stdin written by offset.
//!
//! A pump task reads a pipe (or pty master) and appends to a spool file under the state dir;
//! readers stream the file from any offset and follow its growth until EOF. The pump stops
//! reading (so the process blocks on a full pipe) while more than [`OUTPUT_WINDOW`] bytes wait
//! beyond the furthest offset any reader has reached: back-pressure, nothing dropped.

use crate::api::{ApiError, ErrorCode, OUTPUT_WINDOW};
use bytes::Bytes;
use std::fs::File;
use std::io::Write as _;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe::{Receiver, Sender};
use tokio::sync::watch;

/// How much of a stream exists and whether it is complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SpoolState {
    pub len: u64,
    pub eof: bool,
}

pub struct Spool {
    path: Option<PathBuf>,
    state: watch::Sender<SpoolState>,
    /// The furthest offset a reader has been given.
    read_to: watch::Sender<u64>,
}

const CHUNK: usize = 64 * 1024;

/// The runtime's pipes (and pty masters) are blocking; tokio's pipe types need O_NONBLOCK,
/// or a read or write that readiness did not cover would block a worker thread.
fn set_nonblocking(f: &File) -> Result<(), ApiError> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    use std::os::fd::AsRawFd;
    let fd = f.as_raw_fd();
    let flags = fcntl(fd, FcntlArg::F_GETFL)
        .map(OFlag::from_bits_truncate)
        .and_then(|fl| fcntl(fd, FcntlArg::F_SETFL(fl | OFlag::O_NONBLOCK)));
    flags.map(|_| ()).map_err(|e| {
        ApiError::new(
            ErrorCode::Internal,
            format!("make a process pipe non-blocking: {e}"),
        )
    })
}

impl Spool {
    /// A stream that is empty and complete (devnull, merged stderr).
    pub fn empty() -> Arc<Spool> {
        Arc::new(Spool {
            path: None,
            state: watch::Sender::new(SpoolState { len: 0, eof: true }),
            read_to: watch::Sender::new(0),
        })
    }

    /// A complete stream read from an existing spool file (or empty if there is none): the
    /// output of a process sbxd no longer supervises.
    pub fn finished(path: PathBuf) -> Arc<Spool> {
        let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        Arc::new(Spool {
            path: Some(path),
            state: watch::Sender::new(SpoolState { len, eof: true }),
            read_to: watch::Sender::new(0),
        })
    }

    /// A stream whose source comes later ([`Spool::attach`]) or never ([`Spool::close`]):
    /// readers wait for it meanwhile.
    pub fn pending(path: PathBuf) -> Arc<Spool> {
        Arc::new(Spool {
            path: Some(path),
            state: watch::Sender::new(SpoolState::default()),
            read_to: watch::Sender::new(0),
        })
    }

    /// Start pumping `src` (a pipe's read end or a pty master) into a new spool file.
    pub fn pump(path: PathBuf, src: File) -> Result<Arc<Spool>, ApiError> {
        let s = Spool::pending(path);
        s.attach(src)?;
        Ok(s)
    }

    /// The stream ends here (no source will come).
    pub fn close(&self) {
        self.state.send_modify(|st| st.eof = true);
    }

    /// Pump `src` into this spool's file until EOF.
    pub fn attach(self: &Arc<Self>, src: File) -> Result<(), ApiError> {
        let Some(path) = self.path.clone() else {
            return Err(ApiError::new(
                ErrorCode::Internal,
                "attach to an empty stream",
            ));
        };
        set_nonblocking(&src)?;
        // `unchecked`: a pty master is not a FIFO but polls the same way.
        let mut rd = Receiver::from_file_unchecked(src).map_err(|e| {
            ApiError::new(
                ErrorCode::Internal,
                format!("register the output pipe: {e}"),
            )
        })?;
        let s = self.clone();
        tokio::spawn(async move {
            // The file is made when the first bytes come: most short commands print nothing,
            // and creating (and later deleting) two inodes per exec is a good part of an exec's
            // cost on ext4. Readers open it only once `len` says there are bytes.
            let mut out: Option<File> = None;
            let mut buf = vec![0u8; CHUNK];
            let mut read_to = s.read_to.subscribe();
            loop {
                let len = s.state.borrow().len;
                // Back-pressure: wait until readers are within the window.
                if len.saturating_sub(*read_to.borrow_and_update()) >= OUTPUT_WINDOW
                    && read_to
                        .wait_for(|r| len.saturating_sub(*r) < OUTPUT_WINDOW)
                        .await
                        .is_err()
                {
                    break;
                }
                // A pty master reads EIO once the last slave closed: that is EOF too.
                let n = rd.read(&mut buf).await.unwrap_or(0);
                if n == 0 {
                    break;
                }
                if out.is_none() {
                    match std::fs::OpenOptions::new()
                        .create(true)
                        .truncate(true)
                        .write(true)
                        .open(&path)
                    {
                        Ok(f) => out = Some(f),
                        Err(e) => {
                            tracing::error!(spool = %path.display(), error = %e,
                                "create an output spool; the stream ends here");
                            break;
                        }
                    }
                }
                let Some(f) = out.as_mut() else { break };
                if let Err(e) = f.write_all(&buf[..n]) {
                    tracing::error!(spool = %path.display(), error = %e,
                        "output spool write failed; the stream ends here");
                    break;
                }
                s.state.send_modify(|st| st.len += n as u64);
            }
            s.state.send_modify(|st| st.eof = true);
        });
        Ok(())
    }

    /// Stop back-pressure for good: the producer is gone (its sandbox finished), so the pump
    /// drains what is left in the pipe to EOF whether or not anyone reads.
    pub fn release(&self) {
        self.read_to.send_replace(u64::MAX);
    }

    pub fn state(&self) -> SpoolState {
        *self.state.borrow()
    }

    /// Wait until the stream is complete.
    pub async fn wait_eof(&self) {
        let mut rx = self.state.subscribe();
        let _ = rx.wait_for(|s| s.eof).await;
    }

    /// The bytes from `offset` on. With `follow`, as they come until EOF; without, what
    /// exists now.
    pub fn read_from(
        self: &Arc<Self>,
        offset: u64,
        follow: bool,
    ) -> impl futures_util::Stream<Item = std::io::Result<Bytes>> + Send + 'static {
        struct St {
            spool: Arc<Spool>,
            file: Option<File>,
            pos: u64,
            rx: watch::Receiver<SpoolState>,
            follow: bool,
            end: u64,
        }
        let rx = self.state.subscribe();
        let end = self.state().len;
        let st = St {
            spool: self.clone(),
            file: None,
            pos: offset,
            rx,
            follow,
            end,
        };
        futures_util::stream::unfold(st, |mut st| async move {
            loop {
                let cur = *st.rx.borrow_and_update();
                let limit = if st.follow { cur.len } else { st.end };
                if st.pos < limit {
                    if st.file.is_none() {
                        let path = st.spool.path.as_ref()?;
                        match File::open(path) {
                            Ok(f) => st.file = Some(f),
                            Err(e) => return Some((Err(e), st)),
                        }
                    }
                    let want = ((limit - st.pos) as usize).min(CHUNK);
                    let mut buf = vec![0u8; want];
                    let f = st.file.as_ref()?;
                    return match f.read_at(&mut buf, st.pos) {
                        Ok(0) => None,
                        Ok(n) => {
                            buf.truncate(n);
                            st.pos += n as u64;
                            let p = st.pos;
                            st.spool.read_to.send_if_modified(|r| {
                                if p > *r {
                                    *r = p;
                                    true
                                } else {
                                    false
                                }
                            });
                            Some((Ok(Bytes::from(buf)), st))
                        }
                        Err(e) => Some((Err(e), st)),
                    };
                }
                if cur.eof || !st.follow {
                    return None;
                }
                if st.rx.changed().await.is_err() {
                    return None;
                }
            }
        })
    }
}

/// A process's stdin, written by offset (retries are harmless) with an EOF flag.
pub struct Stdin {
    inner: tokio::sync::Mutex<StdinState>,
    /// Set when the process ended: a write blocked on a full pipe (a background child kept
    /// it open) or on a stalled request body gives up instead of holding the lock forever.
    closed: watch::Sender<bool>,
}

/// A request body that sends nothing for this long is abandoned.
const BODY_IDLE: std::time::Duration = std::time::Duration::from_secs(60);

struct StdinState {
    fd: Option<Sender>,
    written: u64,
    eof: bool,
}

impl Stdin {
    /// A pipe's write end or a pty master.
    pub fn new(f: File) -> Result<Stdin, ApiError> {
        set_nonblocking(&f)?;
        let fd = Sender::from_file_unchecked(f).map_err(|e| {
            ApiError::new(ErrorCode::Internal, format!("register the stdin pipe: {e}"))
        })?;
        Ok(Stdin {
            inner: tokio::sync::Mutex::new(StdinState {
                fd: Some(fd),
                written: 0,
                eof: false,
            }),
            closed: watch::Sender::new(false),
        })
    }

    /// A process without a stdin pipe: every write is a conflict.
    pub fn none() -> Stdin {
        Stdin {
            inner: tokio::sync::Mutex::new(StdinState {
                fd: None,
                written: 0,
                eof: true,
            }),
            closed: watch::Sender::new(true),
        }
    }

    pub async fn position(&self) -> (u64, bool) {
        let s = self.inner.lock().await;
        (s.written, s.eof)
    }

    /// Write `body` (which starts at stream position `offset`), then close if `eof`.
    /// Bytes below what was already written are skipped; a gap is a conflict.
    pub async fn write<S>(
        &self,
        offset: u64,
        mut body: S,
        eof: bool,
    ) -> Result<(u64, bool), ApiError>
    where
        S: futures_util::Stream<Item = Result<Bytes, String>> + Unpin,
    {
        use futures_util::StreamExt;
        let mut closed = self.closed.subscribe();
        let gone = || {
            ApiError::new(
                ErrorCode::Conflict,
                "the process ended: its stdin is closed",
            )
        };
        let mut s = tokio::select! {
            biased;
            s = self.inner.lock() => s,
            _ = closed.wait_for(|c| *c) => return Err(gone()),
        };
        let mut pos = offset;
        if pos > s.written {
            return Err(ApiError::new(
                ErrorCode::Conflict,
                format!(
                    "stdin offset {offset} is past the {} bytes written so far",
                    s.written
                ),
            ));
        }
        loop {
            let next = tokio::select! {
                biased;
                n = tokio::time::timeout(BODY_IDLE, body.next()) => n,
                _ = closed.wait_for(|c| *c) => {
                    s.fd = None;
                    s.eof = true;
                    return Err(gone());
                }
            };
            let chunk = match next {
                Ok(Some(c)) => c,
                Ok(None) => break,
                Err(_) => {
                    return Err(ApiError::new(
                        ErrorCode::Timeout,
                        format!(
                            "the request body sent nothing for {} s",
                            BODY_IDLE.as_secs()
                        ),
                    ))
                }
            };
            let chunk =
                chunk.map_err(|e| ApiError::new(ErrorCode::Invalid, format!("read body: {e}")))?;
            let end = pos + chunk.len() as u64;
            if end <= s.written {
                pos = end;
                continue;
            }
            if s.eof || *closed.borrow() {
                return Err(ApiError::new(
                    ErrorCode::Conflict,
                    "stdin is closed (EOF was sent, or the process ended)",
                ));
            }
            let skip = (s.written - pos) as usize;
            let mut rest = &chunk[skip..];
            while !rest.is_empty() {
                let Some(fd) = s.fd.as_mut() else {
                    return Err(ApiError::new(ErrorCode::Conflict, "stdin is closed"));
                };
                let wrote = tokio::select! {
                    biased;
                    w = fd.write(rest) => w,
                    _ = closed.wait_for(|c| *c) => {
                        s.fd = None;
                        s.eof = true;
                        return Err(gone());
                    }
                };
                match wrote {
                    Ok(n) => {
                        rest = &rest[n..];
                        s.written += n as u64;
                    }
                    Err(e) => {
                        s.fd = None;
                        s.eof = true;
                        return Err(ApiError::new(
                            ErrorCode::Conflict,
                            format!("the process no longer reads stdin: {e}"),
                        ));
                    }
                }
            }
            pos = end;
        }
        if eof {
            s.fd = None;
            s.eof = true;
        }
        Ok((s.written, s.eof))
    }

    /// Close stdin (the process ended). Never waits: a write in progress gives up.
    pub fn close(&self) {
        self.closed.send_replace(true);
        if let Ok(mut s) = self.inner.try_lock() {
            s.fd = None;
            s.eof = true;
        }
    }
}
