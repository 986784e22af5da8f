//! Guide, "Cleaning up Client-side Connections": `detach` lets go of a sandbox handle without
//! stopping the sandbox; later calls on that handle fail with ClientClosed.

use sbx::client::{Client, CreateSandbox, Error, Sandbox};

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
    sb.detach();
    println!("detached {}", sb.id());
    match sb.exec(["true"]).await {
        Err(Error::ClientClosed(msg)) => println!("ClientClosed: {msg}"),
        other => println!("unexpected: {other:?}"),
    }

    // The sandbox still runs: stop it through a new handle (the guide leaves it running).
    let again = Sandbox::from_id(&client, sb.id()).await?;
    println!("still running: {}", again.poll().await?.is_none());
    again.terminate(true).await?;
    again.detach();
    Ok(())
}
