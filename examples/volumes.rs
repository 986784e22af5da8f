//! Guide, "Configuration": mount the named volume `data-volume` at /data (created on first
//! use). What one sandbox writes there, the next one reads.

use sbx::client::{Client, CreateSandbox, Sandbox, VolumeMount};

#[tokio::main(flavor = "current_thread")]
async fn main() -> sbx::client::Result<()> {
    let client = Client::connect().await?;
    let params = CreateSandbox {
        app: Some("my-app".into()),
        volumes: vec![VolumeMount {
            name: "data-volume".into(),
            path: "/data".into(),
            read_only: false,
        }],
        ..Default::default()
    };

    let sb = Sandbox::create(&client, params.clone()).await?;
    let p = sb
        .exec([
            "sh",
            "-c",
            "echo hello from the first sandbox > /data/hello.txt",
        ])
        .await?;
    p.wait().await?;
    sb.terminate(true).await?;
    sb.detach();

    let sb = Sandbox::create(&client, params).await?;
    let p = sb.exec(["cat", "/data/hello.txt"]).await?;
    print!("{}", p.stdout().read_text().await?);
    sb.terminate(true).await?;
    sb.detach();
    Ok(())
}
