//! The whole platform in one process on the in-process backend
//! (`chat all` with no configuration): sends, idempotency, ordering,
//! histories, a hot-reloaded rate limit and a graceful stop.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use futures::StreamExt;
use im_infra::config::ConfigCenterExt;
use im_infra::ratelimit::{LimiterSettings, Rule};
use im_infra_examples_chat::proto::gateway_client::GatewayClient;
use im_infra_examples_chat::proto::{HistoryRequest, SendRequest};
use im_infra_examples_chat::{builder, Platform, Role};

fn send(user: &str, conversation: &str, client_msg_id: &str) -> SendRequest {
    SendRequest {
        user: user.into(),
        conversation: conversation.into(),
        client_msg_id: client_msg_id.into(),
        body: format!("hello from {user}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_platform_in_one_process_stores_each_send_once_in_order_and_limits_by_rule(
) -> Result<()> {
    let platform = Platform::start(
        Role::All,
        builder(Role::All)
            .environment(false)
            .section("chat", serde_json::json!({"gateway_listen": "127.0.0.1:0"})),
    )
    .await?;
    let gateway = platform.gateway_addr().context("the gateway listens")?;
    let store = platform.store().context("the store is open")?;
    let center = platform.runtime().config();
    let env = platform.runtime().env().to_owned();
    let stopper = platform.stopper();
    let running = tokio::spawn(platform.run());
    let mut client = GatewayClient::connect(format!("http://{gateway}")).await?;

    // 200 sends over 4 conversations; every tenth repeats the client
    // message id of the send five before it (sometimes still running).
    let replies: Vec<_> = futures::stream::iter(0..200u32)
        .map(|i| {
            let mut client = client.clone();
            async move {
                let o = if i % 10 == 9 { i - 5 } else { i };
                let r = client
                    .send(send(
                        &format!("u{}", o % 7),
                        &format!("c{}", o % 4),
                        &format!("m{o}"),
                    ))
                    .await
                    .with_context(|| format!("send {i}"))?
                    .into_inner();
                anyhow::Ok((o, r))
            }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    let mut ids: BTreeMap<u32, u64> = BTreeMap::new();
    let mut fresh = 0;
    for r in replies {
        let (o, reply) = r?;
        fresh += usize::from(!reply.duplicate);
        let first = *ids.entry(o).or_insert(reply.id);
        ensure!(
            first == reply.id,
            "client message m{o} got two ids: {first} and {}",
            reply.id
        );
    }
    ensure!(
        ids.len() == 180 && fresh == 180,
        "{} distinct, {fresh} not duplicates",
        ids.len()
    );

    // Every accepted message is stored once, and each conversation's
    // history is its messages in sequence order 1, 2, 3, ...
    let deadline = Instant::now() + Duration::from_secs(10);
    while store.count().await? < 180 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ensure!(
        store.count().await? == 180,
        "stored {}",
        store.count().await?
    );
    let mut stored = BTreeSet::new();
    for c in 0..4u32 {
        let n = ids.keys().filter(|o| *o % 4 == c).count() as u64;
        let history = client
            .history(HistoryRequest {
                conversation: format!("c{c}"),
                limit: 0,
            })
            .await?
            .into_inner()
            .messages;
        let seqs: Vec<u64> = history.iter().map(|m| m.seq).collect();
        ensure!(
            seqs == (1..=n).collect::<Vec<_>>(),
            "c{c}: sequence {seqs:?}, {n} sent"
        );
        stored.extend(history.iter().map(|m| m.id));
        let latest = client
            .history(HistoryRequest {
                conversation: format!("c{c}"),
                limit: 5,
            })
            .await?
            .into_inner()
            .messages;
        ensure!(
            latest.iter().map(|m| m.seq).eq(n - 4..=n),
            "the latest five of c{c}"
        );
    }
    ensure!(
        stored == ids.values().copied().collect(),
        "the stored ids are the ids the sends got"
    );

    // A client message id used again for another message is refused.
    let mut other = send("u0", "c0", "m0");
    other.body = "something else".into();
    let refused = client.send(other).await.unwrap_err();
    ensure!(refused.code() == tonic::Code::AlreadyExists, "{refused}");

    // A rule written to the center limits a user within a second.
    let written = Instant::now();
    center
        .set_json(
            &format!("/config/{env}/im-chat/ratelimit"),
            &LimiterSettings::with_rule("send", Rule::per_minute(1)),
        )
        .await?;
    let mut n = 0;
    let limited_after = loop {
        n += 1;
        match client.send(send("burst", "c9", &format!("b{n}"))).await {
            Err(s) if s.code() == tonic::Code::ResourceExhausted => break written.elapsed(),
            Err(s) => anyhow::bail!("send {n}: {s}"),
            Ok(_) => {}
        }
        ensure!(
            written.elapsed() < Duration::from_secs(1),
            "not limited a second after the rule was written"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    println!("limited {limited_after:?} after the rule was written ({n} sends)");

    // Stop: the run ends cleanly and promptly.
    let stopping = Instant::now();
    stopper.cancel();
    tokio::time::timeout(Duration::from_secs(5), running)
        .await
        .context("the platform did not stop within 5 s")???;
    println!("stopped in {:?}", stopping.elapsed());
    Ok(())
}

#[tokio::test]
async fn a_role_alone_refuses_the_in_process_store() {
    let e = Platform::start(Role::Logic, builder(Role::Logic).environment(false))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("chat.store"), "{e}");
}
