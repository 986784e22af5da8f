//! `sandbox.filesystem`: write, read, list, stat, make directories and remove files inside a
//! running sandbox from the outside.

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
    let fs = sb.filesystem();

    fs.make_directory("/tmp/project/src", true).await?;
    fs.write_text("/tmp/project/README.md", "hello from the filesystem API\n")
        .await?;
    print!("{}", fs.read_text("/tmp/project/README.md").await?);

    // Processes inside see the same files.
    let p = sb.exec(["ls", "/tmp/project"]).await?;
    print!("{}", p.stdout().read_text().await?);

    for f in fs.list_files("/tmp/project").await? {
        println!(
            "{:?} {} {} bytes {}",
            f.file_type, f.permissions, f.size, f.path
        );
    }
    let st = fs.stat("/tmp/project/README.md").await?;
    println!("stat: {} bytes, mode {:o}", st.size, st.mode);

    match fs.remove("/tmp/project", false).await {
        Err(Error::Filesystem { code, .. }) => println!("remove without recursive: {code}"),
        other => println!("remove without recursive: {other:?}"),
    }
    fs.remove("/tmp/project", true).await?;
    match fs.read_text("/tmp/project/README.md").await {
        Err(Error::NotFound(_)) => println!("removed"),
        other => println!("after remove: {other:?}"),
    }

    sb.terminate(false).await?;
    sb.detach();
    Ok(())
}
