//! Guide, "Timeouts": a sandbox with a 10-minute lifetime (the default is 5 minutes, the most
//! 24 hours). Reaching it ends the sandbox with returncode 124.

use sbx::client::{Client, CreateSandbox, Sandbox};

#[tokio::main(flavor = "current_thread")]
async fn main() -> sbx::client::Result<()> {
    let client = Client::connect().await?;
    let sb = Sandbox::create(
        &client,
        CreateSandbox {
            app: Some("my-app".into()),
            timeout_secs: Some(10 * 60), // 10 minutes
            ..Default::default()
        },
    )
    .await?;
    let id = sb.id().to_string();
    let timeout = sb.info().await?.config.timeout_secs.unwrap_or_default();
    println!("sandbox {id} has a timeout of {timeout} s");
    sb.detach();

    // The guide leaves it running until the timeout; this example cleans up after itself.
    Sandbox::from_id(&client, &id)
        .await?
        .terminate(true)
        .await?;
    Ok(())
}
