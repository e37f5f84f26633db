//! `ratelimit::tower::RateLimitLayer` in front of a real tonic gRPC server
//! and a real axum HTTP server: a user over the rule is refused with
//! RESOURCE_EXHAUSTED or 429, both with the time to wait; other users and
//! requests without a key are not; a failing limiter lets requests pass or
//! refuses them, as configured.

use std::sync::Arc;

use anyhow::{ensure, Context, Result};
use im_infra::backend::Backend;
use im_infra::ratelimit::tower::{header_key, OnLimiterError, RateLimitLayer};
use im_infra::ratelimit::{Check, Limiter, Rule, Rules};
use im_infra::{Error, ErrorKind};
use im_infra_integration_tests::http;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// Two requests per minute per user on "api".
async fn limiter() -> Result<Arc<dyn Limiter>> {
    let backend = im_infra_memory::MemoryBackend::new();
    Ok(backend
        .limiter(Rules::single("api", Rule::per_minute(2))?)
        .await?)
}

/// A limiter whose backend is gone.
struct Broken;

impl Limiter for Broken {
    fn check<'a>(&'a self, _: &'a str, _: &'a str, _: u64) -> Check<'a> {
        Check::ready(Err(Error::new(ErrorKind::Unavailable, "down")))
    }
}

async fn grpc_server(
    layer: RateLimitLayer<im_infra::ratelimit::tower::HeaderKey>,
) -> Result<String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (_reporter, health) = tonic_health::server::health_reporter();
    tokio::spawn(async move {
        let _reporter = _reporter;
        tonic::transport::Server::builder()
            .layer(layer)
            .add_service(health)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
    });
    Ok(format!("http://{addr}"))
}

async fn connect(url: String) -> Result<HealthClient<tonic::transport::Channel>> {
    let channel = tonic::transport::Channel::from_shared(url)?
        .connect()
        .await?;
    Ok(HealthClient::new(channel))
}

async fn check_as(
    client: &mut HealthClient<tonic::transport::Channel>,
    user: Option<&str>,
) -> Result<(), tonic::Status> {
    let mut request = tonic::Request::new(HealthCheckRequest {
        service: String::new(),
    });
    if let Some(user) = user {
        request
            .metadata_mut()
            .insert("x-user", user.parse().expect("ascii"));
    }
    client.check(request).await.map(drop)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_calls_over_the_rule_are_resource_exhausted_with_the_time_to_wait() -> Result<()> {
    let url = grpc_server(RateLimitLayer::new(
        limiter().await?,
        "api",
        header_key("x-user"),
    )?)
    .await?;
    let mut client = connect(url).await?;
    check_as(&mut client, Some("alice")).await?;
    check_as(&mut client, Some("alice")).await?;
    let refused = check_as(&mut client, Some("alice"))
        .await
        .expect_err("the third in a minute");
    ensure!(
        refused.code() == tonic::Code::ResourceExhausted,
        "{refused:?}"
    );
    ensure!(
        refused.message().contains("rate limit exceeded on api"),
        "{refused:?}"
    );
    let retry: u64 = refused
        .metadata()
        .get("retry-after")
        .context("retry-after")?
        .to_str()?
        .parse()?;
    ensure!(
        (1..=30).contains(&retry),
        "one request per 30 s: retry after {retry} s"
    );
    ensure!(
        refused.metadata().get("grpc-retry-pushback-ms").is_some(),
        "{refused:?}"
    );
    check_as(&mut client, Some("bob")).await?;
    for _ in 0..5 {
        check_as(&mut client, None).await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_requests_over_the_rule_are_429_with_retry_after() -> Result<()> {
    let app = axum::Router::new()
        .route("/hello", axum::routing::get(|| async { "hi" }))
        .layer(RateLimitLayer::new(
            limiter().await?,
            "api",
            header_key("x-user"),
        )?);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });

    let alice = [("x-user", "alice")];
    for _ in 0..2 {
        let r = http::request(addr, "/hello", &alice).await?;
        ensure!(r.status == 200 && r.body == "hi", "{r:?}");
    }
    let refused = http::request(addr, "/hello", &alice).await?;
    ensure!(refused.status == 429, "{refused:?}");
    let retry: u64 = refused
        .header("retry-after")
        .context("Retry-After")?
        .parse()?;
    ensure!((1..=30).contains(&retry), "retry after {retry} s");
    ensure!(
        http::request(addr, "/hello", &[("x-user", "bob")])
            .await?
            .status
            == 200
    );
    ensure!(
        http::request(addr, "/hello", &[]).await?.status == 200,
        "no key, no limit"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_limiter_lets_requests_pass_or_refuses_them_as_configured() -> Result<()> {
    let broken: Arc<dyn Limiter> = Arc::new(Broken);
    let url = grpc_server(RateLimitLayer::new(
        broken.clone(),
        "api",
        header_key("x-user"),
    )?)
    .await?;
    let mut client = connect(url).await?;
    check_as(&mut client, Some("alice")).await?;

    let strict =
        RateLimitLayer::new(broken, "api", header_key("x-user"))?.on_error(OnLimiterError::Reject);
    let mut client = connect(grpc_server(strict).await?).await?;
    let refused = check_as(&mut client, Some("alice"))
        .await
        .expect_err("refused");
    ensure!(refused.code() == tonic::Code::Unavailable, "{refused:?}");
    let e = RateLimitLayer::new(Arc::new(Broken), "", header_key("x-user"))
        .expect_err("an empty resource");
    ensure!(e.kind() == ErrorKind::InvalidArgument, "{e}");
    Ok(())
}
