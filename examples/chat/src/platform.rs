//! The platform's roles on the runtime: start-up (listeners bound, logic
//! registered, consumer joined), then [`Platform::run`] until SIGTERM,
//! Ctrl-C or [`Platform::stopper`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use im_infra::mq::ConsumerSettings;
use im_infra::ratelimit::tower::{KeyExtractor, RateLimitLayer};
use im_infra::ratelimit::{LimiterSettings, Rule};
use im_infra::registry::grpc::{BalancedChannel, GrpcOptions};
use im_infra::registry::ServiceInstance;
use im_infra::uid::{Layout, Snowflake};
use im_infra_mysql::Db;
use im_infra_runtime::{Runtime, RuntimeBuilder};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;

use crate::gateway::GatewayService;
use crate::logic::{LogicDeps, LogicService, SEND_PATH, USER_HEADER};
use crate::settings::{ChatSettings, StoreKind};
use crate::store::{MemoryStore, MessageStore, MysqlStore};

/// The name logic instances register under.
pub const LOGIC_SERVICE: &str = "im-logic";

/// The rate-limit resource of a send (per user).
pub const SEND_RESOURCE: &str = "send";

/// How long a logic registration lives without renewal (a killed instance
/// leaves discovery after it).
pub const REGISTRATION_TTL: Duration = Duration::from_secs(10);

/// How long a stopping logic instance keeps serving after it left
/// discovery, so that gateways stop choosing it first.
const DRAIN: Duration = Duration::from_millis(300);

/// What one process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Logic, gateway and task in one process.
    All,
    /// One logic instance.
    Logic,
    /// The gateway.
    Gateway,
    /// The task consumer.
    Task,
}

impl Role {
    /// The role named `name` (`all`, `logic`, `gateway`, `task`).
    ///
    /// ```
    /// use im_infra_examples_chat::Role;
    /// assert_eq!(Role::parse("task"), Some(Role::Task));
    /// assert_eq!(Role::parse("repo"), None);
    /// ```
    pub fn parse(name: &str) -> Option<Role> {
        match name {
            "all" => Some(Role::All),
            "logic" => Some(Role::Logic),
            "gateway" => Some(Role::Gateway),
            "task" => Some(Role::Task),
            _ => None,
        }
    }

    /// The service name the runtime runs it as (and reads its settings
    /// under, `/config/{env}/{service}/…`).
    pub fn service(self) -> &'static str {
        match self {
            Role::All => "im-chat",
            Role::Logic => LOGIC_SERVICE,
            Role::Gateway => "im-gateway",
            Role::Task => "im-task",
        }
    }

    fn logic(self) -> bool {
        matches!(self, Role::All | Role::Logic)
    }

    fn gateway(self) -> bool {
        matches!(self, Role::All | Role::Gateway)
    }

    fn task(self) -> bool {
        matches!(self, Role::All | Role::Task)
    }
}

/// The runtime builder of `role`: its service name, the `chat` section
/// declared, and a default rule of 100 sends per second per user (the
/// configuration file or the config center's `ratelimit` replaces it).
pub fn builder(role: Role) -> RuntimeBuilder {
    Runtime::builder(role.service()).component("chat").section(
        "ratelimit",
        LimiterSettings::with_rule(SEND_RESOURCE, Rule::per_second(100)),
    )
}

/// A started role, before [`run`](Self::run).
pub struct Platform {
    runtime: Runtime,
    role: Role,
    settings: ChatSettings,
    store: Option<Arc<dyn MessageStore>>,
    logic: Option<(TcpListener, LogicService)>,
    gateway: Option<(TcpListener, GatewayService)>,
    consumer: Option<Arc<dyn im_infra::mq::Consumer>>,
    db: Option<Arc<Db>>,
    /// Fires when logic's worker-id lease is lost: no id can be issued.
    lease_lost: Option<CancellationToken>,
}

impl std::fmt::Debug for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Platform")
            .field("role", &self.role)
            .field("logic", &self.logic_addr())
            .field("gateway", &self.gateway_addr())
            .finish()
    }
}

async fn open_store(
    runtime: &Runtime,
    settings: &ChatSettings,
) -> anyhow::Result<(Arc<dyn MessageStore>, Option<Arc<Db>>)> {
    Ok(match settings.store {
        StoreKind::Memory => (Arc::new(MemoryStore::default()), None),
        StoreKind::Mysql => {
            let db_settings: im_infra_mysql::MysqlSettings = runtime.settings().await?;
            let db = Arc::new(Db::connect(db_settings).await.context("chat store: db")?);
            let store = MysqlStore::open(db.clone(), &settings.table).await?;
            (Arc::new(store), Some(db))
        }
    })
}

impl Platform {
    /// Starts `role` on a runtime from `builder` (see [`builder`]).
    ///
    /// A role alone (`logic`, `task`) needs a shared store
    /// (`chat.store: mysql`): with the in-process store its histories
    /// would stay empty.
    pub async fn start(role: Role, builder: RuntimeBuilder) -> anyhow::Result<Platform> {
        let runtime = builder.start().await?;
        match Platform::assemble(role, runtime).await {
            Ok(p) => Ok(p),
            Err((runtime, e)) => {
                let _ = runtime.shutdown().await;
                Err(e)
            }
        }
    }

    async fn assemble(role: Role, runtime: Runtime) -> Result<Platform, (Runtime, anyhow::Error)> {
        let mut platform = Platform {
            runtime,
            role,
            settings: ChatSettings::default(),
            store: None,
            logic: None,
            gateway: None,
            consumer: None,
            db: None,
            lease_lost: None,
        };
        match platform.connect().await {
            Ok(()) => Ok(platform),
            Err(e) => {
                if let Some(db) = platform.db.take() {
                    let _ = db.close().await;
                }
                Err((platform.runtime, e))
            }
        }
    }

    async fn connect(&mut self) -> anyhow::Result<()> {
        let runtime = &self.runtime;
        let settings: ChatSettings = runtime.settings().await?;
        let role = self.role;
        if role != Role::All && role != Role::Gateway && settings.store == StoreKind::Memory {
            bail!(
                "chat role {role:?} alone needs a shared store: set chat.store to mysql (the in-process store is for `chat all`)"
            );
        }
        if role.logic() || role.task() {
            let (store, db) = open_store(runtime, &settings).await?;
            self.store = Some(store);
            self.db = db;
        }
        if role.logic() {
            let listener = TcpListener::bind(settings.logic_listen)
                .await
                .with_context(|| format!("logic: binding {}", settings.logic_listen))?;
            let addr = listener.local_addr()?;
            let lease = runtime
                .worker_ids()
                .allocate(Layout::default().max_worker_id(), Duration::from_secs(30))
                .await?;
            let instance_name = format!("logic-{}", lease.worker_id());
            self.lease_lost = Some(lease.lost());
            let ids = Arc::new(Snowflake::with_lease(Layout::default(), lease)?);
            let service = LogicService::new(LogicDeps {
                instance: instance_name.clone(),
                settings: settings.clone(),
                cache: runtime.cache(),
                lock: runtime.lock(),
                once: runtime.once(),
                producer: runtime.producer(),
                ids,
                store: self.store.clone().expect("opened above"),
            });
            let instance = ServiceInstance::new(LOGIC_SERVICE, instance_name, addr.to_string());
            runtime
                .registry()
                .register(&instance, REGISTRATION_TTL)
                .await?;
            self.logic = Some((listener, service));
        }
        if role.task() {
            let consumer = runtime
                .consumer(ConsumerSettings::new(
                    settings.group.clone(),
                    [settings.topic.clone()],
                ))
                .await?;
            self.consumer = Some(consumer);
        }
        if role.gateway() {
            let listener = TcpListener::bind(settings.gateway_listen)
                .await
                .with_context(|| format!("gateway: binding {}", settings.gateway_listen))?;
            let channel = BalancedChannel::connect(
                runtime.discovery(),
                LOGIC_SERVICE,
                GrpcOptions::default(),
            )
            .await?;
            self.gateway = Some((listener, GatewayService::new(channel, settings.clone())));
        }
        self.settings = settings;
        Ok(())
    }

    /// The runtime (its handles, its metrics endpoint).
    pub fn runtime(&self) -> &Runtime {
        &self.runtime
    }

    /// The store of this process (logic and task roles).
    pub fn store(&self) -> Option<Arc<dyn MessageStore>> {
        self.store.clone()
    }

    /// Where logic listens, when this process runs it.
    pub fn logic_addr(&self) -> Option<SocketAddr> {
        self.logic.as_ref().and_then(|(l, _)| l.local_addr().ok())
    }

    /// Where the gateway listens, when this process runs it.
    pub fn gateway_addr(&self) -> Option<SocketAddr> {
        self.gateway.as_ref().and_then(|(l, _)| l.local_addr().ok())
    }

    /// Cancelling it stops the platform as SIGTERM would.
    pub fn stopper(&self) -> CancellationToken {
        self.runtime.shutdown_signal()
    }

    /// One line naming what listens where, printed by the `chat` binary
    /// when it is ready.
    pub fn ready_line(&self) -> String {
        let show = |a: Option<SocketAddr>| a.map_or("-".to_owned(), |a| a.to_string());
        format!(
            "chat ready: role={:?} gateway={} logic={} metrics={} backends={}",
            self.role,
            show(self.gateway_addr()),
            show(self.logic_addr()),
            show(self.runtime.metrics_addr()),
            self.runtime.composition()
        )
    }

    /// Serves until SIGTERM, Ctrl-C or the [`stopper`](Self::stopper);
    /// then a logic instance leaves discovery first and finishes the calls
    /// in hand, the consumer commits what it handled, and the runtime shuts
    /// down the rest.
    pub async fn run(self) -> anyhow::Result<()> {
        let Platform {
            runtime,
            logic,
            gateway,
            consumer,
            db,
            store,
            lease_lost,
            ..
        } = self;
        let stop = runtime.shutdown_signal();
        let limiter = runtime.limiter();
        let cache = runtime.cache();
        let service = async move {
            let mut servers = tokio::task::JoinSet::new();
            if let Some((listener, service)) = logic {
                let stop = stop.clone();
                let layer = RateLimitLayer::new(limiter, SEND_RESOURCE, SendUser)?;
                // The runtime takes the instance out of discovery as
                // shutdown begins; the server goes on answering for DRAIN,
                // while clients learn it is gone.
                let drained = async move {
                    stop.cancelled().await;
                    tokio::time::sleep(DRAIN).await;
                };
                servers.spawn(
                    tonic::transport::Server::builder()
                        .layer(layer)
                        .add_service(service.into_server())
                        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), drained),
                );
            }
            if let Some((listener, service)) = gateway {
                servers.spawn(
                    tonic::transport::Server::builder()
                        .add_service(service.into_server())
                        .serve_with_incoming_shutdown(
                            TcpListenerStream::new(listener),
                            stop.clone().cancelled_owned(),
                        ),
                );
            }
            let consuming = async {
                let consumed = match (consumer, store) {
                    (Some(consumer), Some(store)) => {
                        consumer.run(crate::task::handler(store, cache)).await
                    }
                    _ => Ok(()),
                };
                if let Err(e) = &consumed {
                    // The process cannot do its work: stop it, loudly.
                    tracing::error!(error = %e, "the consumer failed; stopping");
                    stop.cancel();
                }
                consumed
            };
            let serving = async {
                let mut served = Ok(());
                while let Some(r) = servers.join_next().await {
                    if let Err(e) = r
                        .context("a server task failed")
                        .and_then(|r| r.context("a server failed"))
                    {
                        // The rest of the process cannot stand in for it.
                        tracing::error!(error = %e, "stopping");
                        stop.cancel();
                        served = Err(e);
                    }
                }
                served
            };
            let watching = async {
                if let Some(lost) = lease_lost {
                    tokio::select! {
                        _ = lost.cancelled() => {
                            tracing::error!("the worker-id lease was lost: no message id can be issued; stopping");
                            stop.cancel();
                        }
                        _ = stop.cancelled() => {}
                    }
                }
            };
            let (consumed, served, ()) = tokio::join!(consuming, serving, watching);
            if let Some(db) = db {
                let _ = db.close().await;
            }
            consumed?;
            served
        };
        runtime
            .run(async move {
                service
                    .await
                    .map_err(|e| -> Box<dyn std::error::Error + Send + Sync> { e.into() })
            })
            .await?;
        Ok(())
    }
}

/// The rate limit's key: the sender of a send (the gateway's `x-user-id`);
/// other calls are not limited.
#[derive(Debug, Clone, Copy)]
pub struct SendUser;

impl<B> KeyExtractor<B> for SendUser {
    fn key(&self, request: &http::Request<B>) -> Option<String> {
        if request.uri().path() != SEND_PATH {
            return None;
        }
        let user = request.headers().get(USER_HEADER)?.to_str().ok()?;
        (!user.is_empty()).then(|| user.to_owned())
    }
}
