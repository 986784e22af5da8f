//! Guide, "What are Sandboxes": run `python -c "print('hello')"` in a sandbox, then stream the
//! lines of a slow loop as they are printed.
//!
//! Run against a running sbxd: `cargo run --release --example hello` (the socket is
//! `$SBX_SOCKET`, else /run/sbx/sbxd.sock).

use sbx::client::{Client, CreateSandbox, ExecRequest, Sandbox};

#[tokio::main(flavor = "current_thread")]
async fn main() -> sbx::client::Result<()> {
    let client = Client::connect().await?;
    let sb = Sandbox::create(
        &client,
        CreateSandbox {
            app: Some("my-app".into()),
            ..Default::default()
        },
    )
    .await?;

    let p = sb
        .exec_with(ExecRequest {
            argv: vec!["python3".into(), "-c".into(), "print('hello')".into()],
            timeout_secs: Some(3),
            ..Default::default()
        })
        .await?;
    println!("{}", p.stdout().read_text().await?);

    let p = sb
        .exec_with(ExecRequest {
            argv: vec![
                "bash".into(),
                "-c".into(),
                "for i in {1..10}; do date +%T; sleep 0.5; done".into(),
            ],
            timeout_secs: Some(5),
            ..Default::default()
        })
        .await?;
    while let Some(line) = p.stdout().next_line().await? {
        // Lines keep their "\n".
        print!("{line}");
    }

    sb.terminate(false).await?;
    sb.detach();
    Ok(())
}
