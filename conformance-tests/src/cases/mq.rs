//! `Producer` / `Consumer` contract.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use bytes::Bytes;
use im_infra::backend::Capability;
use im_infra::mq::{
    dead_letter_headers as dlh, handler_fn, Consumer, ConsumerSettings, Handler, Message, Producer,
    ReceivedMessage, StartPosition, TopicSpec,
};
use im_infra::{Error, ErrorKind, RetrySettings};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use super::{eventually, expect_kind, unique};
use crate::harness::{Case, World};

/// Messages a handler saw, in order.
#[derive(Clone, Default)]
struct Seen {
    messages: Arc<Mutex<Vec<ReceivedMessage>>>,
}

impl Seen {
    fn push(&self, m: ReceivedMessage) {
        self.messages
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(m);
    }

    fn all(&self) -> Vec<ReceivedMessage> {
        self.messages
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn payloads(&self) -> Vec<String> {
        self.all()
            .iter()
            .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
            .collect()
    }

    async fn wait_for(&self, n: usize, what: &str) -> Result<()> {
        let me = self.clone();
        eventually(Duration::from_secs(30), what, move || {
            let me = me.clone();
            async move { Ok(me.all().len() >= n) }
        })
        .await
    }

    fn handler(&self) -> Arc<dyn Handler> {
        let me = self.clone();
        handler_fn(move |m| {
            let me = me.clone();
            async move {
                me.push(m);
                Ok(())
            }
        })
    }
}

struct Running {
    consumer: Arc<dyn Consumer>,
    task: JoinHandle<im_infra::Result<()>>,
}

impl Running {
    async fn stop(self) -> Result<()> {
        self.consumer.shutdown().await?;
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .context("run did not return after shutdown")???;
        Ok(())
    }
}

async fn start(w: &World, cfg: ConsumerSettings, handler: Arc<dyn Handler>) -> Result<Running> {
    let consumer = w.backend.consumer(cfg).await?;
    let c = consumer.clone();
    let task = tokio::spawn(async move { c.run(handler).await });
    Ok(Running { consumer, task })
}

async fn topic(w: &World, partitions: u32) -> Result<String> {
    let t = unique("topic");
    w.hooks
        .create_topic(&TopicSpec::new(&t, partitions))
        .await?;
    Ok(t)
}

async fn producer(w: &World) -> Result<Arc<dyn Producer>> {
    Ok(w.backend.producer().await?)
}

fn quick_retry(max_retries: u32) -> RetrySettings {
    RetrySettings {
        max_retries,
        initial_interval: Duration::from_millis(20),
        max_interval: Duration::from_millis(100),
        multiplier: 2.0,
        jitter: false,
    }
}

async fn produce_and_consume_roundtrip(w: World) -> Result<()> {
    let t = topic(&w, 1).await?;
    let p = producer(&w).await?;
    let d = p
        .produce(
            Message::new(&t, "hello")
                .with_key("room-1")
                .with_header("trace", "abc")
                .with_header("bin", Bytes::from_static(&[0, 255])),
        )
        .await?;
    ensure!(d.partition == 0 && d.offset >= 0, "{d:?}");
    let seen = Seen::default();
    let run = start(
        &w,
        ConsumerSettings::new(unique("group"), [&t]),
        seen.handler(),
    )
    .await?;
    seen.wait_for(1, "the message").await?;
    let m = &seen.all()[0];
    ensure!(m.topic == t && m.payload == "hello" && m.key.as_deref() == Some(&b"room-1"[..]));
    ensure!(
        m.header("trace").map(|v| v.as_ref()) == Some(&b"abc"[..]),
        "headers: {:?}",
        m.headers
    );
    ensure!(m.header("bin").map(|v| v.as_ref()) == Some(&[0u8, 255][..]));
    ensure!(m.partition == d.partition && m.offset == d.offset && m.attempt == 1);
    run.stop().await
}

async fn messages_of_one_key_keep_their_order(w: World) -> Result<()> {
    let t = topic(&w, 3).await?;
    let p = producer(&w).await?;
    for i in 0..30 {
        for key in ["k1", "k2", "k3"] {
            p.produce(Message::new(&t, format!("{key}:{i}")).with_key(key))
                .await?;
        }
    }
    let seen = Seen::default();
    let run = start(
        &w,
        ConsumerSettings::new(unique("group"), [&t]),
        seen.handler(),
    )
    .await?;
    seen.wait_for(90, "all 90 messages").await?;
    run.stop().await?;
    let mut per_key: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    for payload in seen.payloads() {
        let (k, i) = payload.split_once(':').context("payload")?;
        per_key.entry(k.to_owned()).or_default().push(i.parse()?);
    }
    for (k, seq) in per_key {
        ensure!(
            seq == (0..30).collect::<Vec<_>>(),
            "key {k} out of order: {seq:?}"
        );
    }
    Ok(())
}

async fn batch_produce_keeps_order(w: World) -> Result<()> {
    let t = topic(&w, 2).await?;
    let p = producer(&w).await?;
    let batch = (0..10)
        .map(|i| Message::new(&t, format!("{i}")).with_key("same"))
        .collect();
    let results = p.produce_batch(batch).await?;
    ensure!(results.len() == 10);
    let deliveries: Vec<_> = results.into_iter().collect::<im_infra::Result<_>>()?;
    ensure!(
        deliveries
            .iter()
            .all(|d| d.partition == deliveries[0].partition),
        "one key, one partition"
    );
    ensure!(
        deliveries.windows(2).all(|w| w[0].offset < w[1].offset),
        "{deliveries:?}"
    );
    p.flush(Duration::from_secs(10)).await?;
    Ok(())
}

async fn failed_handler_is_retried_before_commit(w: World) -> Result<()> {
    let t = topic(&w, 1).await?;
    let p = producer(&w).await?;
    for m in ["a", "flaky", "b"] {
        p.produce(Message::new(&t, m)).await?;
    }
    let seen = Seen::default();
    let handler = {
        let seen = seen.clone();
        handler_fn(move |m| {
            let seen = seen.clone();
            async move {
                seen.push(m.clone());
                if m.payload == "flaky" && m.attempt < 3 {
                    return Err(Error::new(ErrorKind::Unavailable, "downstream not ready"));
                }
                Ok(())
            }
        })
    };
    let cfg = ConsumerSettings::new(unique("group"), [&t]).handler_retry(quick_retry(5));
    let run = start(&w, cfg, handler).await?;
    seen.wait_for(5, "a, flaky x3, b").await?;
    run.stop().await?;
    let payloads = seen.payloads();
    ensure!(
        payloads == ["a", "flaky", "flaky", "flaky", "b"],
        "{payloads:?}"
    );
    let attempts: Vec<u32> = seen.all().iter().map(|m| m.attempt).collect();
    ensure!(attempts == [1, 1, 2, 3, 1], "{attempts:?}");
    Ok(())
}

async fn two_members_split_partitions_without_duplicates(w: World) -> Result<()> {
    let t = topic(&w, 4).await?;
    let group = unique("group");
    let (seen_a, seen_b) = (Seen::default(), Seen::default());
    let a = start(&w, ConsumerSettings::new(&group, [&t]), seen_a.handler()).await?;
    let b = start(&w, ConsumerSettings::new(&group, [&t]), seen_b.handler()).await?;
    let p = producer(&w).await?;
    // Members join at their own pace (a Kafka rebalance takes seconds): keep
    // producing in waves until both have handled something.
    let mut produced = 0usize;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        for _ in 0..20 {
            p.produce(
                Message::new(&t, format!("{produced}")).with_key(format!("key-{}", produced % 20)),
            )
            .await?;
            produced += 1;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        if !seen_a.all().is_empty() && !seen_b.all().is_empty() {
            break;
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "one member never got a partition"
        );
    }
    let all = || {
        let mut v = seen_a.all();
        v.extend(seen_b.all());
        v
    };
    eventually(
        Duration::from_secs(60),
        "every produced message handled",
        || {
            let n = all().len();
            async move { Ok(n >= produced) }
        },
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    a.stop().await?;
    b.stop().await?;
    let handled = all();
    let distinct: HashSet<(i32, i64)> = handled.iter().map(|m| (m.partition, m.offset)).collect();
    ensure!(
        distinct.len() == produced,
        "{} distinct of {produced}",
        distinct.len()
    );
    ensure!(
        handled.len() == produced,
        "{} deliveries for {produced} messages: a message was handled twice",
        handled.len()
    );
    // Within each partition, offsets were handled in order, once.
    let mut by_partition: BTreeMap<i32, Vec<i64>> = BTreeMap::new();
    for m in &handled {
        by_partition.entry(m.partition).or_default().push(m.offset);
    }
    for (p, mut offsets) in by_partition {
        let n = offsets.len();
        offsets.dedup();
        ensure!(
            offsets.len() == n,
            "partition {p} had an offset handled twice"
        );
    }
    Ok(())
}

async fn consumer_dropped_without_commit_gets_messages_redelivered(w: World) -> Result<()> {
    let t = topic(&w, 1).await?;
    let group = unique("group");
    let p = producer(&w).await?;
    for i in 0..3 {
        p.produce(Message::new(&t, format!("m{i}"))).await?;
    }
    let entered = Arc::new(Notify::new());
    let stuck = {
        let entered = entered.clone();
        handler_fn(move |_m| {
            let entered = entered.clone();
            async move {
                entered.notify_one();
                futures::future::pending::<()>().await;
                Ok(())
            }
        })
    };
    let first = start(&w, ConsumerSettings::new(&group, [&t]), stuck).await?;
    tokio::time::timeout(Duration::from_secs(30), entered.notified())
        .await
        .context("the first member never got a message")?;
    // The member dies mid-message: its task is dropped, nothing is committed.
    first.task.abort();
    let _ = first.task.await;
    drop(first.consumer);
    let seen = Seen::default();
    let second = start(&w, ConsumerSettings::new(&group, [&t]), seen.handler()).await?;
    seen.wait_for(3, "every message again").await?;
    second.stop().await?;
    ensure!(
        seen.payloads() == ["m0", "m1", "m2"],
        "{:?}",
        seen.payloads()
    );
    Ok(())
}

async fn poison_message_goes_to_the_dead_letter_topic(w: World) -> Result<()> {
    let t = topic(&w, 1).await?;
    let dlq = topic(&w, 1).await?;
    let p = producer(&w).await?;
    p.produce(
        Message::new(&t, "poison")
            .with_key("p")
            .with_header("trace", "t1"),
    )
    .await?;
    p.produce(Message::new(&t, "healthy")).await?;
    let seen = Seen::default();
    let handler = {
        let seen = seen.clone();
        handler_fn(move |m| {
            let seen = seen.clone();
            async move {
                if m.payload == "poison" {
                    return Err(Error::new(ErrorKind::InvalidArgument, "cannot parse"));
                }
                seen.push(m);
                Ok(())
            }
        })
    };
    let cfg = ConsumerSettings::new(unique("group"), [&t])
        .handler_retry(quick_retry(2))
        .dead_letter(&dlq);
    let run = start(&w, cfg, handler).await?;
    seen.wait_for(1, "the healthy message after the poison one")
        .await?;
    run.stop().await?;
    let dead = Seen::default();
    let reader = start(
        &w,
        ConsumerSettings::new(unique("dlq-reader"), [&dlq]),
        dead.handler(),
    )
    .await?;
    dead.wait_for(1, "the dead letter").await?;
    reader.stop().await?;
    let m = &dead.all()[0];
    ensure!(m.payload == "poison" && m.key.as_deref() == Some(&b"p"[..]));
    ensure!(
        m.header("trace").map(|v| v.as_ref()) == Some(&b"t1"[..]),
        "original headers kept"
    );
    ensure!(m.header(dlh::ORIGINAL_TOPIC).map(|v| v.as_ref()) == Some(t.as_bytes()));
    ensure!(m.header(dlh::ORIGINAL_OFFSET).is_some() && m.header(dlh::ERROR).is_some());
    Ok(())
}

async fn new_group_starts_from_the_configured_position(w: World) -> Result<()> {
    let t = topic(&w, 1).await?;
    let p = producer(&w).await?;
    p.produce(Message::new(&t, "old")).await?;
    let earliest = Seen::default();
    let e = start(
        &w,
        ConsumerSettings::new(unique("early"), [&t]),
        earliest.handler(),
    )
    .await?;
    earliest
        .wait_for(1, "the old message for an earliest group")
        .await?;
    ensure!(earliest.payloads() == ["old"]);
    e.stop().await?;
    let latest = Seen::default();
    let cfg = ConsumerSettings::new(unique("late"), [&t]).start(StartPosition::Latest);
    let l = start(&w, cfg, latest.handler()).await?;
    // Joining takes a backend-specific time: produce until one arrives.
    let mut i = 0;
    let got_new = loop {
        p.produce(Message::new(&t, format!("new-{i}"))).await?;
        i += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
        if !latest.all().is_empty() {
            break true;
        }
        if i > 150 {
            break false;
        }
    };
    ensure!(got_new, "a latest group never received a new message");
    l.stop().await?;
    ensure!(
        !latest.payloads().iter().any(|p| p == "old"),
        "a latest group must not see old messages"
    );
    Ok(())
}

async fn shutdown_commits_and_the_group_resumes_after(w: World) -> Result<()> {
    let t = topic(&w, 1).await?;
    let group = unique("group");
    let p = producer(&w).await?;
    for i in 0..5 {
        p.produce(Message::new(&t, format!("a{i}"))).await?;
    }
    let first = Seen::default();
    let run = start(&w, ConsumerSettings::new(&group, [&t]), first.handler()).await?;
    first.wait_for(5, "first batch").await?;
    run.stop().await?;
    for i in 0..3 {
        p.produce(Message::new(&t, format!("b{i}"))).await?;
    }
    let second = Seen::default();
    let run = start(&w, ConsumerSettings::new(&group, [&t]), second.handler()).await?;
    second.wait_for(3, "second batch").await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    run.stop().await?;
    ensure!(
        second.payloads() == ["b0", "b1", "b2"],
        "resumed from the commit: {:?}",
        second.payloads()
    );
    Ok(())
}

async fn shutdown_finishes_the_in_flight_message_and_commits_it(w: World) -> Result<()> {
    let t = topic(&w, 1).await?;
    let group = unique("group");
    let p = producer(&w).await?;
    p.produce(Message::new(&t, "slow")).await?;
    p.produce(Message::new(&t, "next")).await?;
    let entered = Arc::new(Notify::new());
    let finished = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let first = Seen::default();
    let handler = {
        let (entered, finished, first) = (entered.clone(), finished.clone(), first.clone());
        handler_fn(move |m| {
            let (entered, finished, first) = (entered.clone(), finished.clone(), first.clone());
            async move {
                if m.payload == "slow" {
                    entered.notify_one();
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    finished.store(true, std::sync::atomic::Ordering::SeqCst);
                }
                first.push(m);
                Ok(())
            }
        })
    };
    let run = start(&w, ConsumerSettings::new(&group, [&t]), handler).await?;
    tokio::time::timeout(Duration::from_secs(30), entered.notified())
        .await
        .context("the slow message never reached the handler")?;
    run.stop().await?;
    ensure!(
        finished.load(std::sync::atomic::Ordering::SeqCst),
        "shutdown returned before the in-flight message finished"
    );
    // The next member of the group starts after what the first one finished.
    p.produce(Message::new(&t, "after")).await?;
    let second = Seen::default();
    let run = start(&w, ConsumerSettings::new(&group, [&t]), second.handler()).await?;
    second.wait_for(1, "a message for the next member").await?;
    eventually(
        Duration::from_secs(30),
        "\"after\" for the next member",
        || {
            let got = second.payloads().iter().any(|p| p == "after");
            async move { Ok(got) }
        },
    )
    .await?;
    run.stop().await?;
    let (a, b) = (first.payloads(), second.payloads());
    ensure!(
        !b.iter().any(|p| p == "slow"),
        "the in-flight message was committed at shutdown, yet delivered again: {a:?} then {b:?}"
    );
    let mut all: Vec<_> = a.iter().chain(&b).cloned().collect();
    all.sort();
    ensure!(
        all == ["after", "next", "slow"],
        "every message once across the two members: {a:?} then {b:?}"
    );
    Ok(())
}

async fn pause_stops_delivery_until_resume(w: World) -> Result<()> {
    let t = topic(&w, 1).await?;
    let seen = Seen::default();
    let run = start(
        &w,
        ConsumerSettings::new(unique("group"), [&t]),
        seen.handler(),
    )
    .await?;
    let p = producer(&w).await?;
    p.produce(Message::new(&t, "before")).await?;
    seen.wait_for(1, "first message").await?;
    run.consumer.pause().await?;
    p.produce(Message::new(&t, "while paused")).await?;
    tokio::time::sleep(Duration::from_millis(800)).await;
    ensure!(
        seen.all().len() == 1,
        "a paused consumer must not deliver: {:?}",
        seen.payloads()
    );
    run.consumer.resume().await?;
    seen.wait_for(2, "delivery after resume").await?;
    run.stop().await
}

async fn run_twice_and_after_shutdown_fail_clearly(w: World) -> Result<()> {
    let t = topic(&w, 1).await?;
    let seen = Seen::default();
    let run = start(
        &w,
        ConsumerSettings::new(unique("group"), [&t]),
        seen.handler(),
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    expect_kind(
        run.consumer.run(seen.handler()).await,
        ErrorKind::InvalidState,
        "run while running",
    )?;
    let consumer = run.consumer.clone();
    run.stop().await?;
    expect_kind(
        consumer.run(seen.handler()).await,
        ErrorKind::Closed,
        "run after shutdown",
    )?;
    consumer.shutdown().await?;
    Ok(())
}

async fn a_topic_is_created_once_and_never_with_another_partition_count(w: World) -> Result<()> {
    let spec = TopicSpec::new(unique("topic"), 2);
    ensure!(w.hooks.create_topic(&spec).await?, "created");
    ensure!(
        !w.hooks.create_topic(&spec).await?,
        "creating it again answers that it existed"
    );
    let other = TopicSpec::new(spec.name.clone(), 3);
    let e = match w.hooks.create_topic(&other).await {
        Ok(created) => bail!("another partition count answered Ok({created})"),
        Err(e) => e,
    };
    ensure!(
        e.downcast_ref::<Error>()
            .is_some_and(|e| e.kind() == ErrorKind::AlreadyExists),
        "another partition count is AlreadyExists: {e:#}"
    );
    Ok(())
}

async fn bad_input_is_invalid_argument(w: World) -> Result<()> {
    let p = producer(&w).await?;
    for bad in ["", "has space", "slash/topic", &"t".repeat(300)] {
        expect_kind(
            p.produce(Message::new(bad, "x")).await,
            ErrorKind::InvalidArgument,
            "bad topic",
        )?;
    }
    let t = topic(&w, 1).await?;
    expect_kind(
        p.produce(Message::new(&t, vec![0u8; 64 * 1024 * 1024]))
            .await,
        ErrorKind::InvalidArgument,
        "64 MiB message",
    )?;
    match w.backend.consumer(ConsumerSettings::new("", [&t])).await {
        Err(e) if e.kind() == ErrorKind::InvalidArgument => {}
        Err(e) => bail!("empty group: {e}"),
        Ok(_) => bail!("empty group accepted"),
    }
    match w
        .backend
        .consumer(ConsumerSettings::new("g", Vec::<String>::new()))
        .await
    {
        Err(e) if e.kind() == ErrorKind::InvalidArgument => Ok(()),
        Err(e) => bail!("no topics: {e}"),
        Ok(_) => bail!("a consumer without topics accepted"),
    }
}

/// The messaging cases.
pub fn cases() -> Vec<Case> {
    let on = |c: &crate::harness::Claims| c.has(Capability::Messaging);
    let pausable = |c: &crate::harness::Claims| {
        c.has(Capability::Messaging) && c.consumer.as_ref().is_some_and(|x| x.pause_resume)
    };
    vec![
        crate::case!("mq", produce_and_consume_roundtrip, when = on),
        crate::case!("mq", messages_of_one_key_keep_their_order, when = on),
        crate::case!("mq", batch_produce_keeps_order, when = on),
        crate::case!("mq", failed_handler_is_retried_before_commit, when = on),
        crate::case!(
            "mq",
            two_members_split_partitions_without_duplicates,
            when = on,
            timeout = 120
        ),
        crate::case!(
            "mq",
            consumer_dropped_without_commit_gets_messages_redelivered,
            when = on,
            timeout = 120
        ),
        crate::case!(
            "mq",
            poison_message_goes_to_the_dead_letter_topic,
            when = on,
            timeout = 120
        ),
        crate::case!(
            "mq",
            new_group_starts_from_the_configured_position,
            when = on,
            timeout = 120
        ),
        crate::case!(
            "mq",
            shutdown_commits_and_the_group_resumes_after,
            when = on,
            timeout = 120
        ),
        crate::case!(
            "mq",
            shutdown_finishes_the_in_flight_message_and_commits_it,
            when = on,
            timeout = 120
        ),
        crate::case!("mq", pause_stops_delivery_until_resume, when = pausable),
        crate::case!("mq", run_twice_and_after_shutdown_fail_clearly, when = on),
        crate::case!(
            "mq",
            a_topic_is_created_once_and_never_with_another_partition_count,
            when = on
        ),
        crate::case!("mq", bad_input_is_invalid_argument, when = on),
    ]
}
