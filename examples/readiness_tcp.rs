//! Guide, "TCP readiness probe": start `python3 -m http.server 8080` and block until port 8080
//! accepts connections.

use sbx::client::{Client, CreateSandbox, Probe, Sandbox};
use std::time::Duration;

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
            readiness_probe: Some(Probe::tcp(8080)),
            ..Default::default()
        },
    )
    .await?;

    // Blocks until port 8080 is accepting connections (Modal's default timeout: 5 minutes).
    let ready_at = sb.wait_until_ready(Duration::from_secs(300)).await?;
    println!("ready at {ready_at:.3}");

    // The server is now ready — interact with it via exec, etc.
    let p = sb
        .exec([
            "python3",
            "-c",
            "import urllib.request as u; print(u.urlopen('http://127.0.0.1:8080/').status)",
        ])
        .await?;
    print!("GET / -> {}", p.stdout().read_text().await?);

    sb.terminate(false).await?;
    sb.detach();
    Ok(())
}
