//! Guide, readiness probe timeout: `wait_until_ready` raises TimeoutError when the probe does
//! not succeed in time; that does not end the sandbox, so terminate it yourself.
//! (The guide waits the default 5 minutes; this example waits 2 seconds.)

use sbx::client::{Client, CreateSandbox, Error, Probe, Sandbox};
use std::time::Duration;

#[tokio::main(flavor = "current_thread")]
async fn main() -> sbx::client::Result<()> {
    let client = Client::connect().await?;
    let sb = Sandbox::create(
        &client,
        CreateSandbox {
            app: Some("my-app".into()),
            // Nothing ever creates the file.
            readiness_probe: Some(Probe::exec(["test", "-f", "/tmp/never"])),
            ..Default::default()
        },
    )
    .await?;

    match sb.wait_until_ready(Duration::from_secs(2)).await {
        Err(Error::Timeout(_)) => {
            println!("Sandbox failed to become ready");
            sb.terminate(false).await?;
            sb.detach();
        }
        Ok(at) => println!("ready at {at:.3}"),
        Err(e) => return Err(e),
    }
    Ok(())
}
