//! Guide, "Referencing Sandboxes from other code": keep a sandbox's id, detach, and later get
//! a new handle with `from_id`.

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
    let sb_id = sb.id().to_string();
    sb.detach();

    // ... later in the program ...

    let sb2 = Sandbox::from_id(&client, &sb_id).await?;
    let p = sb2.exec(["echo", "hello"]).await?;
    println!("{}", p.stdout().read_text().await?);
    sb2.terminate(false).await?;
    sb2.detach();
    Ok(())
}
