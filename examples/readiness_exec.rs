//! Guide, "Exec readiness probe": the sandbox is ready once `test -f /tmp/ready` exits 0,
//! checked every 250 ms.

use sbx::client::{Client, CreateSandbox, Probe, Sandbox};
use std::time::Duration;

#[tokio::main(flavor = "current_thread")]
async fn main() -> sbx::client::Result<()> {
    let client = Client::connect().await?;
    let sb = Sandbox::create(
        &client,
        CreateSandbox {
            app: Some("my-app".into()),
            entrypoint: ["bash", "-c", "sleep 5 && touch /tmp/ready && sleep 3600"]
                .map(String::from)
                .to_vec(),
            readiness_probe: Some(Probe::exec(["sh", "-c", "test -f /tmp/ready"]).interval_ms(250)),
            ..Default::default()
        },
    )
    .await?;

    // Blocks until "test -f /tmp/ready" exits with code 0.
    let ready_at = sb.wait_until_ready(Duration::from_secs(300)).await?;
    println!("ready at {ready_at:.3}");

    // The sandbox is now ready.
    let p = sb.exec(["cat", "/tmp/ready"]).await?;
    println!("cat /tmp/ready exited {}", p.wait().await?);
    sb.terminate(false).await?;
    sb.detach();
    Ok(())
}
