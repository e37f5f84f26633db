//! MariaDB coming back with older data: the config tables (or the locks
//! table) are restored from a copy taken earlier — as after a restore from a backup or a failover to
//! a lagging replica — while a watch and a `ConfigManager` run. The test
//! works on tables of its own (a private table prefix, dropped at the end),
//! so no other test sees the restore. What a client was told must still
//! hold (DESIGN §8): versions keep increasing, and the watch converges on
//! the server's state instead of silently dropping the writes made after
//! the regression.

#[path = "support/regression.rs"]
mod regression;

use std::time::Duration;

use anyhow::{ensure, Result};
use im_infra::backend::Backend;
use im_infra::lock::LockOptions;
use im_infra_conformance::servers::{server_or_skip, MYSQL_ENV};
use im_infra_mysql::{Db, MysqlBackend};

/// The tables of the config center (`backends/mysql/src/sql/schema_v1.sql`).
const CONFIG_TABLES: [&str; 3] = ["config", "config_log", "meta"];

/// The table of the locks (with their fencing counters).
const LOCK_TABLES: [&str; 1] = ["locks"];

/// Copies `tables` aside (`<table>_copy`).
async fn copy_tables(db: &Db, prefix: &str, tables: &[&str]) -> Result<()> {
    for t in tables {
        let (table, copy) = (format!("{prefix}{t}"), format!("{prefix}{t}_copy"));
        db.exec(&format!("DROP TABLE IF EXISTS {copy}"), ()).await?;
        db.exec(&format!("CREATE TABLE {copy} LIKE {table}"), ())
            .await?;
        db.exec(&format!("INSERT INTO {copy} SELECT * FROM {table}"), ())
            .await?;
    }
    Ok(())
}

/// Puts the copies back in one atomic `RENAME TABLE`, as a restore would
/// bring them back: rows and auto-increment counters as they were.
async fn restore_tables(db: &Db, prefix: &str, tables: &[&str]) -> Result<()> {
    let mut renames = Vec::new();
    for t in tables {
        let (table, copy) = (format!("{prefix}{t}"), format!("{prefix}{t}_copy"));
        let (restored, lost) = (format!("{table}_restored"), format!("{table}_lost"));
        db.exec(&format!("CREATE TABLE {restored} LIKE {copy}"), ())
            .await?;
        db.exec(&format!("INSERT INTO {restored} SELECT * FROM {copy}"), ())
            .await?;
        renames.push(format!("{table} TO {lost}, {restored} TO {table}"));
    }
    db.exec(&format!("RENAME TABLE {}", renames.join(", ")), ())
        .await?;
    Ok(())
}

/// Drops every table whose name starts with `prefix`.
async fn drop_tables(db: &Db, prefix: &str) -> Result<()> {
    let tables: Vec<String> = db
        .query(
            "SELECT table_name FROM information_schema.tables \
             WHERE table_schema = DATABASE() AND LEFT(table_name, CHAR_LENGTH(?)) = ?",
            (prefix, prefix),
        )
        .await?;
    for t in tables {
        db.exec(&format!("DROP TABLE IF EXISTS {t}"), ()).await?;
    }
    Ok(())
}

fn private_prefix() -> String {
    format!(
        "iminfra_regr_{}_",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fencing_tokens_stay_increasing_after_the_locks_table_comes_back_older() -> Result<()> {
    let Some(url) = server_or_skip("mysql", MYSQL_ENV) else {
        return Ok(());
    };
    let prefix = private_prefix();
    let backend = MysqlBackend::builder()
        .url(&url)
        .namespace("regression/")
        .table_prefix(&prefix)
        .build()
        .await?;
    let db = backend.db();
    let outcome = async {
        let locks = backend.lock().await?;
        let opts = LockOptions::new(Duration::from_secs(10));
        locks.acquire("ledger", opts).await?.release().await?;
        copy_tables(db, &prefix, &LOCK_TABLES).await?;
        let mut issued = Vec::new();
        for _ in 0..5 {
            let g = locks.acquire("ledger", opts).await?;
            issued.push(g.fencing_token());
            g.release().await?;
        }
        restore_tables(db, &prefix, &LOCK_TABLES).await?;
        let g = locks.acquire("ledger", opts).await?;
        let after = g.fencing_token();
        g.release().await?;
        let highest = issued.iter().max().copied().unwrap_or(0);
        ensure!(
            after > highest,
            "token {after} after the restore, but {highest} was issued before it ({issued:?})"
        );
        anyhow::Ok(())
    }
    .await;
    let dropped = drop_tables(db, &prefix).await;
    backend.close().await?;
    outcome?;
    dropped
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_watch_converges_after_the_tables_come_back_older() -> Result<()> {
    let Some(url) = server_or_skip("mysql", MYSQL_ENV) else {
        return Ok(());
    };
    let prefix = private_prefix();
    let backend = MysqlBackend::builder()
        .url(&url)
        .namespace("regression/")
        .table_prefix(&prefix)
        .request_timeout(Duration::from_secs(5))
        .config_poll_interval(Duration::from_millis(50))
        .build()
        .await?;
    let db = backend.db();
    let center = backend.config().await?;
    let outcome = regression::watch_converges_after_the_server_lost_writes(
        center,
        || copy_tables(db, &prefix, &CONFIG_TABLES),
        || restore_tables(db, &prefix, &CONFIG_TABLES),
    )
    .await;
    let dropped = drop_tables(db, &prefix).await;
    backend.close().await?;
    outcome?;
    dropped
}
