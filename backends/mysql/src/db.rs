//! `db`: a pooled `mysql_async` connection with a deadline, a span and
//! metrics around every query — the original system's `db` library.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use im_infra::telemetry::OpMetrics;
use im_infra::{Error, ErrorKind, Result};
use mysql_async::prelude::{FromRow, Queryable};
use mysql_async::{Conn, DriverError, Params, Pool, Row, TxOpts};

use crate::error::from_mysql;
use crate::settings::MysqlSettings;

struct Ops {
    exec: OpMetrics,
    query: OpMetrics,
    text: OpMetrics,
    conn: OpMetrics,
    health: OpMetrics,
}

/// Converts a row without the panic of `mysql_async`'s own conversion.
pub(crate) fn convert<T: FromRow>(row: Row) -> std::result::Result<T, mysql_async::Error> {
    T::from_row_opt(row).map_err(|e| DriverError::FromRow { row: e.0 }.into())
}

/// `exec_first` that converts as [`convert`] does.
pub(crate) async fn first<T, Q>(
    q: &mut Q,
    sql: &str,
    params: impl Into<Params> + Send,
) -> std::result::Result<Option<T>, mysql_async::Error>
where
    T: FromRow + Send + 'static,
    Q: Queryable + Send,
{
    let row: Option<Row> = q.exec_first(sql, params).await?;
    row.map(convert).transpose()
}

/// A connection pool to MySQL or MariaDB.
///
/// Every call takes a connection from the pool, runs within the configured
/// request timeout (the time to get a connection included), is one `tracing`
/// span, and counts in `im_infra_ops_total{backend="mysql",capability="db"}`.
///
/// The [`MysqlBackend`](crate::MysqlBackend)'s own queries run on an
/// untimed view of the same pool: each of them is part of one of the
/// backend's operations (`cache.get`, `lock.acquire`, ...), which is the
/// one span and the one count. [`MysqlBackend::db`](crate::MysqlBackend::db)
/// hands out the timed view.
///
/// ```no_run
/// use im_infra_mysql::{Db, MysqlSettings};
///
/// # async fn demo() -> im_infra::Result<()> {
/// let db = Db::connect(MysqlSettings::new("mysql://app:pw@127.0.0.1:3306/im")).await?;
/// db.exec("INSERT INTO users (id, name) VALUES (?, ?)", (7, "alice")).await?;
/// let names: Vec<String> = db.query("SELECT name FROM users WHERE id = ?", (7,)).await?;
/// assert_eq!(names, ["alice"]);
/// db.close().await
/// # }
/// ```
pub struct Db {
    pool: Pool,
    settings: MysqlSettings,
    /// `None` on the backend's internal, untimed view.
    ops: Option<Arc<Ops>>,
    /// Shared by the views of one pool.
    closed: Arc<AtomicBool>,
}

fn ops() -> Arc<Ops> {
    let m = |op| OpMetrics::new(crate::NAME, "db", op);
    Arc::new(Ops {
        exec: m("db.exec"),
        query: m("db.query"),
        text: m("db.text"),
        conn: m("db.conn"),
        health: m("db.health_check"),
    })
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Db")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Db {
    /// Opens the pool and checks the server answers.
    pub async fn connect(settings: MysqlSettings) -> Result<Db> {
        Db::open(settings, true).await
    }

    /// [`connect`](Self::connect); without telemetry unless `timed`.
    pub(crate) async fn open(settings: MysqlSettings, timed: bool) -> Result<Db> {
        settings.validate()?;
        let pool = Pool::new(settings.opts()?);
        let db = Db {
            pool,
            ops: timed.then(ops),
            settings,
            closed: Arc::new(AtomicBool::new(false)),
        };
        let bound = db.settings.connect_timeout;
        match tokio::time::timeout(bound, db.health_check()).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(Error::new(
                    ErrorKind::Timeout,
                    format!("no connection to the database within {bound:?}"),
                )
                .with_backend(crate::NAME))
            }
        }
        Ok(db)
    }

    /// The same pool with the `db.*` telemetry (closing either closes both).
    pub(crate) fn timed(&self) -> Db {
        Db {
            pool: self.pool.clone(),
            settings: self.settings.clone(),
            ops: Some(self.ops.clone().unwrap_or_else(ops)),
            closed: self.closed.clone(),
        }
    }

    /// Runs `fut` as the operation `op` picks, or as it is on the
    /// untimed view.
    async fn op<T>(
        &self,
        op: fn(&Ops) -> &OpMetrics,
        fut: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        match &self.ops {
            Some(ops) => op(ops).run(fut).await,
            None => fut.await,
        }
    }

    /// The settings in force.
    pub fn settings(&self) -> &MysqlSettings {
        &self.settings
    }

    /// The `mysql_async` pool, for anything this wrapper does not offer.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    fn check_open(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            Err(
                Error::new(ErrorKind::Closed, "the database pool was closed")
                    .with_backend(crate::NAME),
            )
        } else {
            Ok(())
        }
    }

    /// Runs `fut` within the request timeout, mapping errors.
    async fn bounded<T>(
        &self,
        fut: impl Future<Output = std::result::Result<T, mysql_async::Error>>,
    ) -> Result<T> {
        self.bounded_by(self.settings.request_timeout, fut).await
    }

    /// Runs `fut` within `bound`, mapping errors.
    async fn bounded_by<T>(
        &self,
        bound: Duration,
        fut: impl Future<Output = std::result::Result<T, mysql_async::Error>>,
    ) -> Result<T> {
        self.check_open()?;
        match tokio::time::timeout(bound, fut).await {
            Ok(r) => r.map_err(from_mysql),
            Err(_) => Err(Error::new(
                ErrorKind::Timeout,
                format!("the query did not finish within {bound:?}"),
            )
            .with_backend(crate::NAME)),
        }
    }

    /// `SELECT 1`.
    pub async fn health_check(&self) -> Result<()> {
        self.op(
            |o| &o.health,
            self.bounded(async {
                let mut c = self.pool.get_conn().await?;
                c.query_drop("SELECT 1").await
            }),
        )
        .await
    }

    /// Runs a statement; returns the number of affected rows.
    pub async fn exec(&self, sql: &str, params: impl Into<Params> + Send) -> Result<u64> {
        let params = params.into();
        self.op(
            |o| &o.exec,
            self.bounded(async {
                let mut c = self.pool.get_conn().await?;
                c.exec_drop(sql, params).await?;
                Ok(c.affected_rows())
            }),
        )
        .await
    }

    /// Runs a query; returns every row. A row that does not convert to `T`
    /// (a NULL, a type mismatch) is a `Serialization` error, never a panic.
    pub async fn query<T>(&self, sql: &str, params: impl Into<Params> + Send) -> Result<Vec<T>>
    where
        T: FromRow + Send + 'static,
    {
        let params = params.into();
        self.op(
            |o| &o.query,
            self.bounded(async {
                let mut c = self.pool.get_conn().await?;
                let rows: Vec<Row> = c.exec(sql, params).await?;
                rows.into_iter().map(convert).collect()
            }),
        )
        .await
    }

    /// Runs a query; returns the first row (converted as by
    /// [`query`](Self::query)).
    pub async fn query_first<T>(
        &self,
        sql: &str,
        params: impl Into<Params> + Send,
    ) -> Result<Option<T>>
    where
        T: FromRow + Send + 'static,
    {
        let params = params.into();
        self.op(
            |o| &o.query,
            self.bounded(async {
                let mut c = self.pool.get_conn().await?;
                first(&mut c, sql, params).await
            }),
        )
        .await
    }

    /// Runs statements separated by `;` over the text protocol in one round
    /// trip; returns the rows of the last result set. Only for SQL built
    /// from trusted parts: nothing is escaped here.
    pub async fn text(&self, sql: &str) -> Result<Vec<Row>> {
        self.op(
            |o| &o.text,
            self.bounded(async {
                let mut c = self.pool.get_conn().await?;
                let mut result = c.query_iter(sql).await?;
                let mut last = Vec::new();
                while !result.is_empty() {
                    let rows: Vec<Row> = result.collect().await?;
                    if !rows.is_empty() {
                        last = rows;
                    }
                }
                Ok(last)
            }),
        )
        .await
    }

    /// Runs `f` on one pooled connection, within the request timeout.
    pub async fn with_conn<T, F>(&self, f: F) -> Result<T>
    where
        T: Send,
        F: for<'c> FnOnce(
                &'c mut Conn,
            ) -> BoxFuture<'c, std::result::Result<T, mysql_async::Error>>
            + Send,
    {
        self.with_conn_within(self.settings.request_timeout, f)
            .await
    }

    /// Runs `f` on one pooled connection, within `bound` (for work known to
    /// take longer than one query, such as a schema upgrade).
    pub async fn with_conn_within<T, F>(&self, bound: Duration, f: F) -> Result<T>
    where
        T: Send,
        F: for<'c> FnOnce(
                &'c mut Conn,
            ) -> BoxFuture<'c, std::result::Result<T, mysql_async::Error>>
            + Send,
    {
        self.op(
            |o| &o.conn,
            self.bounded_by(bound, async {
                let mut c = self.pool.get_conn().await?;
                f(&mut c).await
            }),
        )
        .await
    }

    /// Runs `f` in a transaction that commits when `f` succeeds and rolls
    /// back otherwise (also when the deadline passes: the connection is
    /// dropped).
    pub async fn transaction<T, F>(&self, f: F) -> Result<T>
    where
        T: Send,
        F: for<'c> FnOnce(
                &'c mut mysql_async::Transaction<'_>,
            ) -> BoxFuture<'c, std::result::Result<T, mysql_async::Error>>
            + Send,
    {
        self.op(
            |o| &o.conn,
            self.bounded(async {
                let mut c = self.pool.get_conn().await?;
                let mut tx = c.start_transaction(TxOpts::default()).await?;
                let out = f(&mut tx).await;
                match out {
                    Ok(v) => {
                        tx.commit().await?;
                        Ok(v)
                    }
                    Err(e) => {
                        let _ = tx.rollback().await;
                        Err(e)
                    }
                }
            }),
        )
        .await
    }

    /// Closes the pool (waiting for connections in use to come back).
    pub async fn close(&self) -> Result<()> {
        if self.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        match tokio::time::timeout(Duration::from_secs(5), self.pool.clone().disconnect()).await {
            Ok(r) => r.map_err(from_mysql),
            Err(_) => Ok(()),
        }
    }
}
