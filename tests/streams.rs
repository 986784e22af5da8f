//! Output and input streams through the client library against a real sbxd: output replayed
//! from a byte offset by a second connection, 100 MB arriving intact, back-pressure once
//! [`OUTPUT_WINDOW`] bytes wait unread, stdin written by offset (retries harmless), and 100
//! concurrent execs over one connection. Runs as root; every test starts its own sbxd
//! (tests/support/daemon.rs) and asserts it left nothing behind.

#[path = "support/daemon.rs"]
mod daemon;

use daemon::TestDaemon;
use sbx::api::{StdinAck, OUTPUT_WINDOW};
use sbx::client::{CreateSandbox, ExecRequest, Sandbox};
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

/// Python writing `lines` lines `%08d\n` (9 bytes each) in ten flushed pieces, 0.1 s apart.
fn pattern_script(lines: usize) -> String {
    format!(
        "import sys, time\n\
         w = sys.stdout.buffer\n\
         n = {lines}\n\
         step = n // 10\n\
         for k in range(10):\n\
         \x20   w.write(b''.join(b'%08d\\n' % i for i in range(k * step, (k + 1) * step)))\n\
         \x20   w.flush()\n\
         \x20   time.sleep(0.1)\n"
    )
}

fn pattern(lines: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(lines * 9);
    for i in 0..lines {
        v.extend_from_slice(format!("{i:08}\n").as_bytes());
    }
    v
}

/// Asserts `got == want`, naming the first differing byte instead of dumping megabytes.
fn assert_same_bytes(got: &[u8], want: &[u8], what: &str) {
    if got == want {
        return;
    }
    let at = got
        .iter()
        .zip(want)
        .position(|(a, b)| a != b)
        .unwrap_or(got.len().min(want.len()));
    let show = |b: &[u8]| {
        String::from_utf8_lossy(&b[at.min(b.len())..(at + 40).min(b.len())]).into_owned()
    };
    panic!(
        "{what}: {} bytes arrived, {} expected; first difference at byte {at}: got {:?}, want {:?}",
        got.len(),
        want.len(),
        show(got),
        show(want)
    );
}

/// A reader gets half of a 10 MB output and goes away with its connection; a second client
/// resumes at that offset and gets every remaining byte exactly once — for the entrypoint's
/// stdout (client library) and an exec's (the wire route, see below).
#[tokio::test]
async fn output_resumes_from_offset_on_a_new_connection() {
    let d = TestDaemon::start("resume").await;
    let lines = 1_200_000; // 10.8 MB
    let want = pattern(lines);
    let half = want.len() / 2;

    // The entrypoint's stdout, through the client library on both sides.
    let (id, offset, mut got) = {
        let first = d.client().await;
        let sb = Sandbox::create(
            &first,
            CreateSandbox {
                entrypoint: vec!["python3".into(), "-c".into(), pattern_script(lines)],
                ..Default::default()
            },
        )
        .await
        .expect("create");
        let reader = sb.stdout();
        let mut got = Vec::new();
        while got.len() < half {
            let chunk = reader
                .next_chunk()
                .await
                .expect("read")
                .expect("EOF before half of the output");
            got.extend_from_slice(&chunk);
        }
        assert_eq!(reader.offset(), got.len() as u64);
        (sb.id().to_string(), reader.offset(), got)
        // The reader, the handle and the first client's connection are dropped here.
    };
    let second = d.client().await;
    let sb = Sandbox::from_id(&second, &id).await.expect("from_id");
    let rest = sb.stdout().at(offset);
    assert_eq!(rest.offset(), offset);
    got.extend_from_slice(&rest.read_to_end().await.expect("read the rest"));
    assert_same_bytes(&got, &want, "entrypoint stdout read in two halves");
    assert_eq!(sb.wait().await.expect("wait"), 0);

    // An exec's stdout: half through the library, the rest by `GET …?offset=N` on another
    // connection. (The library cannot start an exec's reader at an offset: `Process::stdout`
    // lends its reader and `StreamReader::at` takes it by value.)
    let sb = Sandbox::create(&second, CreateSandbox::default())
        .await
        .expect("create");
    let (exec_id, offset, mut got) = {
        let p = sb
            .exec(["python3", "-c", &pattern_script(lines)])
            .await
            .expect("exec");
        let mut got = Vec::new();
        while got.len() < half {
            let chunk = p
                .stdout()
                .next_chunk()
                .await
                .expect("read")
                .expect("EOF before half of the output");
            got.extend_from_slice(&chunk);
        }
        (p.id().to_string(), p.stdout().offset(), got)
    };
    let (status, rest) = d
        .raw(
            "GET",
            &format!(
                "/v1/sandboxes/{}/execs/{exec_id}/stdout?offset={offset}&follow=true",
                sb.id()
            ),
            b"",
        )
        .await;
    assert_eq!(status, 200);
    got.extend_from_slice(&rest);
    assert_same_bytes(&got, &want, "exec stdout read in two halves");
    assert_eq!(sb.process(&exec_id).wait().await.expect("wait"), 0);
    sb.terminate(true).await.expect("terminate");
    d.finish().await;
}

/// 100 MB of random output arrives intact: the SHA-256 computed inside the sandbox matches the
/// one of the bytes that arrived.
#[tokio::test]
async fn hundred_megabytes_arrive_intact() {
    let d = TestDaemon::start("100mb").await;
    let c = d.client().await;
    let sb = Sandbox::create(&c, CreateSandbox::default())
        .await
        .expect("create");
    let total: usize = 100_000_000;
    let script = format!(
        "import hashlib, os, sys\n\
         h = hashlib.sha256()\n\
         out = sys.stdout.buffer\n\
         left = {total}\n\
         while left:\n\
         \x20   b = os.urandom(min(1 << 20, left))\n\
         \x20   h.update(b)\n\
         \x20   out.write(b)\n\
         \x20   left -= len(b)\n\
         out.flush()\n\
         sys.stderr.write(h.hexdigest() + '\\n')\n"
    );
    let p = sb.exec(["python3", "-c", &script]).await.expect("exec");
    let t0 = Instant::now();
    let mut got = Vec::with_capacity(total);
    while let Some(chunk) = p.stdout().next_chunk().await.expect("read") {
        assert!(!chunk.is_empty(), "an empty chunk");
        got.extend_from_slice(&chunk);
    }
    let took = t0.elapsed();
    let inside = p.stderr().read_text().await.expect("stderr");
    assert_eq!(p.wait().await.expect("wait"), 0);
    assert_eq!(got.len(), total, "bytes that arrived");
    assert_eq!(p.stdout().offset(), total as u64);
    let outside = sha256_hex(got);
    assert_eq!(
        outside,
        inside.trim(),
        "SHA-256 of what arrived vs what the sandbox wrote"
    );
    eprintln!("100 MB of exec output in {took:?}");
    sb.terminate(true).await.expect("terminate");
    d.finish().await;
}

/// SHA-256 of `data` by the host's `sha256sum`.
fn sha256_hex(data: Vec<u8>) -> String {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run sha256sum");
    let mut stdin = child.stdin.take().expect("piped stdin");
    let feeder = std::thread::spawn(move || stdin.write_all(&data));
    let out = child.wait_with_output().expect("sha256sum output");
    feeder
        .join()
        .expect("feeder thread")
        .expect("write to sha256sum");
    assert!(out.status.success());
    String::from_utf8(out.stdout)
        .expect("hex")
        .split_whitespace()
        .next()
        .expect("a hash")
        .to_string()
}

/// A process whose output nobody reads is paused once OUTPUT_WINDOW (64 MiB) waits unread,
/// nothing dropped; reading lets it finish, and every byte is there, in order.
#[tokio::test]
async fn unread_output_pauses_the_writer() {
    let d = TestDaemon::start("backpressure").await;
    let c = d.client().await;
    let sb = Sandbox::create(&c, CreateSandbox::default())
        .await
        .expect("create");
    let chunks = 100u64; // MiB
                         // Writes 1 MiB blocks of byte (i % 251) and records, after each, how many it wrote.
    let script = format!(
        "import os, sys\n\
         out = sys.stdout.buffer\n\
         for i in range({chunks}):\n\
         \x20   out.write(bytes([i % 251]) * (1 << 20))\n\
         \x20   out.flush()\n\
         \x20   with open('/tmp/progress.tmp', 'w') as f:\n\
         \x20       f.write(str(i + 1))\n\
         \x20   os.replace('/tmp/progress.tmp', '/tmp/progress')\n"
    );
    let p = sb.exec(["python3", "-c", &script]).await.expect("exec");
    let fs = sb.filesystem();
    let progress = || async {
        match fs.read_text("/tmp/progress").await {
            Ok(s) => s.trim().parse::<u64>().expect("a count"),
            Err(sbx::client::Error::NotFound(_)) => 0,
            Err(e) => panic!("read /tmp/progress: {e}"),
        }
    };
    // Wait until the writer stops moving.
    let deadline = Instant::now() + Duration::from_secs(60);
    let (mut last, mut since) = (progress().await, Instant::now());
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = progress().await;
        if now != last {
            (last, since) = (now, Instant::now());
        } else if now > 0 && since.elapsed() >= Duration::from_millis(1500) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the writer never stalled (at {now} MiB)"
        );
    }
    let window = OUTPUT_WINDOW / MIB;
    eprintln!("with nobody reading, the writer stalled after {last} MiB");
    assert!(
        (window - 4..=window + 2).contains(&last),
        "with nobody reading the writer stopped after {last} MiB; the window is {window} MiB"
    );
    assert_eq!(
        p.poll().await.expect("poll"),
        None,
        "the writer finished although nobody read"
    );

    // Reading releases it; every block arrives in order.
    let mut got = 0u64;
    while let Some(chunk) = p.stdout().next_chunk().await.expect("read") {
        for (k, b) in chunk.iter().enumerate() {
            let at = got + k as u64;
            let want = ((at / MIB) % 251) as u8;
            assert_eq!(*b, want, "byte {at} (block {})", at / MIB);
        }
        got += chunk.len() as u64;
    }
    assert_eq!(got, chunks * MIB);
    assert_eq!(p.wait().await.expect("wait"), 0);
    assert_eq!(progress().await, chunks);
    sb.terminate(true).await.expect("terminate");
    d.finish().await;
}

async fn stdin_post(
    d: &TestDaemon,
    path: &str,
    offset: u64,
    eof: bool,
    body: &[u8],
) -> (u16, Option<StdinAck>) {
    let (status, reply) = d
        .raw("POST", &format!("{path}?offset={offset}&eof={eof}"), body)
        .await;
    let ack = if status == 200 {
        Some(serde_json::from_slice(&reply).unwrap_or_else(|e| {
            panic!(
                "stdin reply {:?} is not a StdinAck: {e}",
                String::from_utf8_lossy(&reply)
            )
        }))
    } else {
        None
    };
    (status, ack)
}

/// Stdin is addressed by offset: a retried (duplicate or overlapping) chunk is taken once, a
/// gap is refused, EOF is idempotent; the process sees each byte once. Also through the
/// library's StreamWriter, for an exec and for the entrypoint.
#[tokio::test]
async fn stdin_by_offset_is_idempotent() {
    let d = TestDaemon::start("stdin").await;
    let c = d.client().await;
    let sb = Sandbox::create(&c, CreateSandbox::default())
        .await
        .expect("create");

    // On the wire, as a client retrying after lost replies would.
    let p = sb.exec(["cat"]).await.expect("exec cat");
    let path = format!("/v1/sandboxes/{}/execs/{}/stdin", sb.id(), p.id());
    let ack = |offset, eof| Some(StdinAck { offset, eof });
    assert_eq!(
        stdin_post(&d, &path, 0, false, b"hello ").await,
        (200, ack(6, false))
    );
    assert_eq!(
        stdin_post(&d, &path, 0, false, b"hello ").await,
        (200, ack(6, false)),
        "a duplicate chunk"
    );
    assert_eq!(
        stdin_post(&d, &path, 3, false, b"lo world").await,
        (200, ack(11, false)),
        "a chunk overlapping what was taken"
    );
    assert_eq!(
        stdin_post(&d, &path, 20, false, b"gap").await.0,
        409,
        "a write past the end"
    );
    assert_eq!(
        stdin_post(&d, &path, 11, true, b"").await,
        (200, ack(11, true))
    );
    assert_eq!(p.wait().await.expect("wait"), 0);
    assert_eq!(
        stdin_post(&d, &path, 11, true, b"").await,
        (200, ack(11, true)),
        "EOF again, after the process ended"
    );
    assert_eq!(
        stdin_post(&d, &path, 11, false, b"late").await.0,
        409,
        "a write after EOF"
    );
    assert_eq!(p.stdout().read_text().await.expect("read"), "hello world");

    // Through StreamWriter: write buffers, drain sends; a repeated drain sends nothing twice.
    let p = sb.exec(["cat"]).await.expect("exec cat");
    let w = p.stdin();
    w.write("one ").expect("write");
    w.write("two ").expect("write");
    w.drain().await.expect("drain");
    w.drain().await.expect("drain again");
    w.write_all("three").await.expect("write_all");
    w.write_eof();
    w.drain().await.expect("drain with EOF");
    w.drain().await.expect("drain after EOF");
    assert!(
        matches!(w.write("four"), Err(sbx::client::Error::Invalid(_))),
        "write after write_eof"
    );
    assert_eq!(p.stdout().read_text().await.expect("read"), "one two three");
    assert_eq!(p.wait().await.expect("wait"), 0);
    sb.terminate(true).await.expect("terminate");

    // The entrypoint's stdin, written by two handles in turn (the second learns the position).
    let sb = Sandbox::create(
        &c,
        CreateSandbox {
            entrypoint: vec!["cat".into()],
            stdin: true,
            ..Default::default()
        },
    )
    .await
    .expect("create");
    sb.stdin().write_all("first\n").await.expect("write");
    let other_client = d.client().await;
    let again = Sandbox::from_id(&other_client, sb.id())
        .await
        .expect("from_id");
    again.stdin().write_all("second\n").await.expect("write");
    again.stdin().close().await.expect("close");
    assert_eq!(sb.wait().await.expect("wait"), 0);
    assert_eq!(
        sb.stdout().read_text().await.expect("read"),
        "first\nsecond\n"
    );
    d.finish().await;
}

/// 100 execs at once over one client (one HTTP/2 connection) all run, each with its own output
/// and exit code.
#[tokio::test]
async fn hundred_concurrent_execs_share_one_connection() {
    let d = TestDaemon::start("concurrent").await;
    let c = d.client().await;
    let sb = Sandbox::create(&c, CreateSandbox::default())
        .await
        .expect("create");
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..100u32 {
        let sb = sb.clone();
        tasks.spawn(async move {
            let p = sb
                .exec_with(ExecRequest {
                    argv: vec![
                        "sh".into(),
                        "-c".into(),
                        "echo out-$0; echo err-$0 >&2; exit $(($0 % 7))".into(),
                        i.to_string(),
                    ],
                    ..Default::default()
                })
                .await
                .unwrap_or_else(|e| panic!("exec {i}: {e}"));
            let (out, err) = tokio::join!(p.stdout().read_text(), p.stderr().read_text());
            let rc = p.wait().await.unwrap_or_else(|e| panic!("wait {i}: {e}"));
            (i, rc, out.expect("stdout"), err.expect("stderr"))
        });
    }
    let mut seen = 0;
    while let Some(r) = tasks.join_next().await {
        let (i, rc, out, err) = r.expect("exec task");
        assert_eq!(rc, (i % 7) as i32, "exit code of exec {i}");
        assert_eq!(out, format!("out-{i}\n"), "stdout of exec {i}");
        assert_eq!(err, format!("err-{i}\n"), "stderr of exec {i}");
        seen += 1;
    }
    assert_eq!(seen, 100);
    sb.terminate(true).await.expect("terminate");
    d.finish().await;
}
