//! Guide, "Named Sandboxes": a name is unique among an app's running sandboxes; `from_name`
//! finds the running one.

use sbx::client::{Client, CreateSandbox, Error, Sandbox};

#[tokio::main(flavor = "current_thread")]
async fn main() -> sbx::client::Result<()> {
    let client = Client::connect().await?;
    let params = CreateSandbox {
        app: Some("my-app".into()),
        name: Some("my-name".into()),
        ..Default::default()
    };
    let sb1 = Sandbox::create(&client, params.clone()).await?;
    // This fails with AlreadyExists.
    match Sandbox::create(&client, params).await {
        Err(Error::AlreadyExists(msg)) => println!("AlreadyExistsError: {msg}"),
        Ok(sb) => println!("unexpected: a second sandbox {} got the name", sb.id()),
        Err(e) => return Err(e),
    }

    // Returns the currently running Sandbox with the name "my-name" from the app "my-app".
    let sb2 = Sandbox::from_name(&client, "my-app", "my-name", false).await?;
    println!("same sandbox: {}", sb1.id() == sb2.id()); // sb1 and sb2 refer to the same Sandbox

    // The guide only detaches; stopping the sandbox frees the name.
    sb1.terminate(true).await?;
    sb1.detach();
    sb2.detach();
    Ok(())
}
