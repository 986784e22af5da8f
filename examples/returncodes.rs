//! Guide, "Return Codes": a process's exit code, and 137 for a terminated sandbox.

use sbx::client::{Client, CreateSandbox, Sandbox};

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

    // Read returncode of individual process
    let p = sb.exec(["sh", "-c", "exit 42"]).await?;
    p.wait().await?;
    println!("{}", p.poll().await?.unwrap_or(-1)); // 42

    // Read returncode of finished sandbox
    // Terminate sends a SIGKILL, code 137
    sb.terminate(true).await?;
    println!("{}", sb.returncode().await?.unwrap_or(-1)); // 137
    sb.detach();
    Ok(())
}
