//! Idempotency. Basic: the second run of the same work returns the stored
//! outcome. Advanced: ten concurrent callers of one payment, exactly one
//! executes and the others get its outcome; a failed run can be retried.
//!
//! ```text
//! cargo run --example once [basic|advanced]
//! IMINFRA_CONFIG=examples/servers.yaml cargo run --example once
//! ```

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, ensure, Result};
use im_infra::once::{Once, OnceExt, OnceOptions};
use im_infra_examples::{parts, run_id, start};

const HOUR: Duration = Duration::from_secs(3600);

async fn basic(once: Arc<dyn Once>, run: &str) -> Result<()> {
    let key = format!("welcome-mail:{run}");
    for attempt in 1..=2 {
        let out = once
            .run(&key, HOUR, || async {
                Ok::<_, std::io::Error>("sent".to_string())
            })
            .await
            .map_err(|e| anyhow!("{:?}", e.kind()))?;
        println!(
            "basic: attempt {attempt} executed={} -> {:?}",
            out.executed(),
            out.into_inner()
        );
    }
    Ok(())
}

async fn advanced(once: Arc<dyn Once>, run: &str) -> Result<()> {
    let key = format!("charge:order-42:{run}");
    let executions = Arc::new(AtomicUsize::new(0));
    let callers = (0..10).map(|_| {
        let (once, key, executions) = (once.clone(), key.clone(), executions.clone());
        tokio::spawn(async move {
            let opts = OnceOptions::new(HOUR).wait(Duration::from_secs(10));
            once.run_with(&key, opts, || async move {
                executions.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(100)).await; // the payment provider
                Ok::<_, std::io::Error>("receipt-7".to_string())
            })
            .await
            .map(|o| o.into_inner())
            .map_err(|e| anyhow!("{:?}", e.kind()))
        })
    });
    for caller in futures::future::join_all(callers).await {
        ensure!(caller?? == "receipt-7");
    }
    println!(
        "advanced: 10 concurrent callers, {} execution(s)",
        executions.load(Ordering::SeqCst)
    );
    ensure!(executions.load(Ordering::SeqCst) == 1);

    // A failed run leaves the key free: the retry executes.
    let flaky = format!("import:{run}");
    let failed = once
        .run(&flaky, HOUR, || async {
            Err::<String, _>(std::io::Error::other("provider down"))
        })
        .await;
    ensure!(failed.is_err());
    let retried = once
        .run(&flaky, HOUR, || async {
            Ok::<_, std::io::Error>("imported".to_string())
        })
        .await
        .map_err(|e| anyhow!("{:?}", e.kind()))?;
    ensure!(retried.executed(), "the retry of a failed run executes");
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let parts = parts()?;
    let runtime = start("example-once").await?;
    let run = run_id();
    if parts.basic {
        basic(runtime.once(), &run).await?;
    }
    if parts.advanced {
        advanced(runtime.once(), &run).await?;
    }
    runtime.shutdown().await?;
    Ok(())
}
