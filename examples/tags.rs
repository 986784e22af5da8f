//! Guide, "Tagging": tag sandboxes and filter `Sandbox.list` by tags (a subset match, newest
//! first, running sandboxes only).

use sbx::client::{Client, CreateSandbox, Sandbox};
use std::collections::BTreeMap;

fn tags(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> sbx::client::Result<()> {
    let client = Client::connect().await?;
    let sleeper = |secs: &str| CreateSandbox {
        app: Some("my-app".into()),
        entrypoint: vec!["sleep".into(), secs.into()],
        ..Default::default()
    };
    let sandbox_v1_1 = Sandbox::create(&client, sleeper("10")).await?;
    let sandbox_v1_2 = Sandbox::create(&client, sleeper("20")).await?;

    sandbox_v1_1
        .set_tags(tags(&[("major_version", "1"), ("minor_version", "1")]))
        .await?;
    sandbox_v1_2
        .set_tags(tags(&[("major_version", "1"), ("minor_version", "2")]))
        .await?;

    // All sandboxes.
    for sandbox in Sandbox::list(&client, Some("my-app"), &BTreeMap::new(), false).await? {
        println!("{}", sandbox.id);
    }

    // Also all sandboxes.
    for sandbox in Sandbox::list(
        &client,
        Some("my-app"),
        &tags(&[("major_version", "1")]),
        false,
    )
    .await?
    {
        println!("{}", sandbox.id);
    }

    // Just the latest sandbox.
    let filter = tags(&[("major_version", "1"), ("minor_version", "2")]);
    for sandbox in Sandbox::list(&client, Some("my-app"), &filter, false).await? {
        println!("{}", sandbox.id);
    }

    // The guide only detaches; this example also stops them.
    for sb in [&sandbox_v1_1, &sandbox_v1_2] {
        sb.terminate(false).await?;
        sb.detach();
    }
    Ok(())
}
