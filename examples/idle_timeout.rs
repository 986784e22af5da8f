//! Guide, "Idle Timeouts": a sandbox ends after `idle_timeout` seconds without a running exec
//! or stdin writes; an exec that runs longer than that keeps it alive.

use sbx::client::{Client, CreateSandbox, Sandbox};

#[tokio::main(flavor = "current_thread")]
async fn main() -> sbx::client::Result<()> {
    let client = Client::connect().await?;
    let sb = Sandbox::create(
        &client,
        CreateSandbox {
            app: Some("my-app".into()),
            idle_timeout_secs: Some(2),
            ..Default::default()
        },
    )
    .await?;

    // Active: a command runs for longer than the idle timeout.
    let p = sb.exec(["sleep", "3"]).await?;
    p.wait().await?;
    println!(
        "after a 3 s exec the sandbox still runs: poll() = {:?}",
        sb.poll().await?
    );

    // Idle from here on: it ends by itself about 2 s later.
    let rc = sb.wait().await?;
    let reason = sb.info().await?.end_reason.map(|r| r.as_str());
    println!("returncode {rc}, end reason {}", reason.unwrap_or("?"));
    sb.detach();
    Ok(())
}
