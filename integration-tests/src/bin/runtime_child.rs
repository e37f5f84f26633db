//! A service started by the runtime, for the graceful-shutdown test
//! (`tests/runtime.rs`): it registers one instance, consumes a topic and
//! appends each message's payload as one line to a record file, slowly
//! (each message takes `--work-ms`), until SIGTERM.
//!
//! ```text
//! runtime_child --config FILE --record FILE --id INSTANCE --topic T --group G [--work-ms 150]
//! ```
//!
//! Prints `ready` once registered and consuming. Exits 0 after a clean
//! shutdown, 1 otherwise.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use im_infra::mq::{handler_fn, ConsumerSettings};
use im_infra::registry::ServiceInstance;
use im_infra_runtime::Runtime;

/// The service name the child registers under.
const SERVICE: &str = "im-runtime-child";

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

async fn serve(args: Vec<String>) -> Result<()> {
    let need = |name: &str| arg(&args, name).with_context(|| format!("{name} is required"));
    let (config, record, id) = (need("--config")?, need("--record")?, need("--id")?);
    let (topic, group) = (need("--topic")?, need("--group")?);
    let work = Duration::from_millis(arg(&args, "--work-ms").map_or(Ok(150), |v| v.parse())?);

    let runtime = Runtime::builder(SERVICE)
        .config_file(config)
        .start()
        .await?;
    let instance = ServiceInstance::new(SERVICE, &id, "127.0.0.1:1");
    runtime
        .registry()
        .register(&instance, Duration::from_secs(30))
        .await?;
    let consumer = runtime
        .consumer(ConsumerSettings::new(group, [topic]))
        .await?;
    let handler = handler_fn(move |m| {
        let record = record.clone();
        async move {
            tokio::time::sleep(work).await;
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&record)
                .map_err(|e| im_infra::Error::new(im_infra::ErrorKind::Internal, e.to_string()))?;
            let mut line = m.payload.to_vec();
            line.push(b'\n');
            f.write_all(&line)
                .and_then(|()| f.sync_data())
                .map_err(|e| im_infra::Error::new(im_infra::ErrorKind::Internal, e.to_string()))
        }
    });
    println!("ready");
    runtime
        .run(async move { consumer.run(handler).await })
        .await?;
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    match serve(std::env::args().collect()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("runtime_child: {e:#}");
            ExitCode::FAILURE
        }
    }
}
