//! Guide, "Environment variables": an inline secret becomes an environment variable of every
//! process in the sandbox.

use sbx::client::{Client, CreateSandbox, Sandbox, SecretSource};
use std::collections::BTreeMap;

#[tokio::main(flavor = "current_thread")]
async fn main() -> sbx::client::Result<()> {
    let client = Client::connect().await?;
    let secret = SecretSource::Inline(BTreeMap::from([("MY_SECRET".into(), "hello".into())]));
    let sb = Sandbox::create(
        &client,
        CreateSandbox {
            app: Some("my-app".into()),
            secrets: vec![secret],
            ..Default::default()
        },
    )
    .await?;
    let p = sb.exec(["bash", "-c", "echo $MY_SECRET"]).await?;
    println!("{}", p.stdout().read_text().await?);

    // The guide only detaches; this example also stops the sandbox.
    sb.terminate(false).await?;
    sb.detach();
    Ok(())
}
