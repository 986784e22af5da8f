//! Guide, "Lifecycle / Events": follow a sandbox's events — created, scheduled, started, ready
//! (with a readiness probe) and finished.

use futures_util::StreamExt;
use sbx::client::{Client, CreateSandbox, EventKind, Probe, Sandbox};

#[tokio::main(flavor = "current_thread")]
async fn main() -> sbx::client::Result<()> {
    let client = Client::connect().await?;
    let sb = Sandbox::create(
        &client,
        CreateSandbox {
            app: Some("my-app".into()),
            entrypoint: vec!["sleep".into(), "2".into()],
            readiness_probe: Some(Probe::exec(["true"])),
            ..Default::default()
        },
    )
    .await?;

    // Follows until the Finished event.
    let mut events = sb.events(true).await?;
    while let Some(ev) = events.next().await {
        let ev = ev?;
        let kind = match ev.kind {
            EventKind::Created => "created",
            EventKind::Scheduled => "scheduled",
            EventKind::Started => "started",
            EventKind::Ready => "ready",
            EventKind::Finished => "finished",
        };
        match (ev.reason, ev.returncode) {
            (Some(reason), Some(rc)) => {
                println!(
                    "{} {kind} at {:.3} ({}, returncode {rc})",
                    ev.seq,
                    ev.at,
                    reason.as_str()
                )
            }
            _ => println!("{} {kind} at {:.3}", ev.seq, ev.at),
        }
    }
    sb.detach();
    Ok(())
}
