//! Guide, "Configuration" (JavaScript/Go tab): a volume and the working directory /repo, where
//! the entrypoint and every exec start. The guide mounts the volume at /data; here it holds
//! /repo itself, which the host image does not have (sbxd does not create a missing workdir).

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
                path: "/repo".into(),
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
