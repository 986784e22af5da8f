//! Guide, "Configuration" (JavaScript/Go tab): a volume at /data and the working directory
//! /repo, where the entrypoint and every exec start.

use sbx::client::{Client, CreateSandbox, Sandbox, VolumeMount};

#[tokio::main(flavor = "current_thread")]
async fn main() -> sbx::client::Result<()> {
    let client = Client::connect().await?;
    let sb = Sandbox::create(
        &client,
        CreateSandbox {
            app: Some("my-app".into()),
            volumes: vec![VolumeMount {
                name: "my-volume".into(),
                path: "/data".into(),
                read_only: false,
            }],
            workdir: Some("/repo".into()),
            ..Default::default()
        },
    )
    .await?;
    let p = sb.exec(["pwd"]).await?;
    print!("{}", p.stdout().read_text().await?);

    sb.terminate(false).await?;
    sb.detach();
    Ok(())
}
