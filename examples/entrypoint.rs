//! Guide, "Running a Sandbox with an entrypoint": `python -m http.server 8080` as the
//! sandbox's command, its output streamed line by line until the 10 s timeout ends it.

use sbx::client::{Client, CreateSandbox, Sandbox};
use std::collections::BTreeMap;

#[tokio::main(flavor = "current_thread")]
async fn main() -> sbx::client::Result<()> {
    let client = Client::connect().await?;
    let sb = Sandbox::create(
        &client,
        CreateSandbox {
            app: Some("my-app".into()),
            entrypoint: ["python3", "-m", "http.server", "8080"]
                .map(String::from)
                .to_vec(),
            // Python buffers a pipe's output until exit; a timeout kill would lose it.
            env: BTreeMap::from([("PYTHONUNBUFFERED".into(), "1".into())]),
            timeout_secs: Some(10),
            ..Default::default()
        },
    )
    .await?;
    let stdout = sb.stdout();
    while let Some(line) = stdout.next_line().await? {
        print!("{line}");
    }
    sb.detach();
    Ok(())
}
