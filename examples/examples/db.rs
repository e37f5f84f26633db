//! The MySQL handle (`Db`), connected with the `db` settings the runtime
//! reads by its one convention (config center, file, environment).
//! Basic: a table, statements with named parameters, typed rows. Advanced:
//! a transfer in a transaction that commits, one that rolls back when its
//! check fails, and a query bounded by its own deadline.
//!
//! `Db` is MySQL's own: there is no in-process database, so this example
//! runs on the server only.
//!
//! ```text
//! IMINFRA_CONFIG=examples/servers.yaml cargo run --example db [basic|advanced]
//! ```

use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use im_infra_examples::{parts, run_id, start};
use im_infra_mysql::mysql_async::params;
use im_infra_mysql::mysql_async::prelude::Queryable;
use im_infra_mysql::{Db, MysqlSettings};

async fn basic(db: &Db, table: &str) -> Result<()> {
    db.exec(
        &format!("CREATE TABLE `{table}` (name VARCHAR(64) PRIMARY KEY, balance BIGINT NOT NULL)"),
        (),
    )
    .await?;
    for (name, balance) in [("alice", 100i64), ("bob", 20)] {
        db.exec(
            &format!("INSERT INTO `{table}` (name, balance) VALUES (:name, :balance)"),
            params! { "name" => name, "balance" => balance },
        )
        .await?;
    }
    let rows: Vec<(String, i64)> = db
        .query(
            &format!("SELECT name, balance FROM `{table}` ORDER BY name"),
            (),
        )
        .await?;
    println!("basic: accounts {rows:?}");
    ensure!(rows == vec![("alice".into(), 100), ("bob".into(), 20)]);
    let bob: Option<i64> = db
        .query_first(
            &format!("SELECT balance FROM `{table}` WHERE name = :name"),
            params! { "name" => "bob" },
        )
        .await?;
    ensure!(bob == Some(20), "bob: {bob:?}");
    Ok(())
}

/// Moves `amount` from `from` to `to` in one transaction; fails (and rolls
/// back) when `from` would go below zero.
async fn transfer(db: &Db, table: &str, from: &str, to: &str, amount: i64) -> Result<()> {
    let (table, from, to) = (table.to_owned(), from.to_owned(), to.to_owned());
    db.transaction(move |tx| {
        Box::pin(async move {
            tx.exec_drop(
                format!("UPDATE `{table}` SET balance = balance - :amount WHERE name = :name"),
                params! { "amount" => amount, "name" => &from },
            )
            .await?;
            tx.exec_drop(
                format!("UPDATE `{table}` SET balance = balance + :amount WHERE name = :name"),
                params! { "amount" => amount, "name" => &to },
            )
            .await?;
            let left: Option<i64> = tx
                .exec_first(
                    format!("SELECT balance FROM `{table}` WHERE name = :name"),
                    params! { "name" => &from },
                )
                .await?;
            if left.unwrap_or(0) < 0 {
                // Any error rolls the transaction back.
                return Err(im_infra_mysql::mysql_async::Error::Other(
                    format!("{from} would be overdrawn").into(),
                ));
            }
            Ok(())
        })
    })
    .await?;
    Ok(())
}

async fn advanced(db: &Db, table: &str) -> Result<()> {
    transfer(db, table, "alice", "bob", 30).await?;
    let refused = transfer(db, table, "bob", "alice", 500).await;
    println!(
        "advanced: a transfer of 500 from bob -> {}",
        refused
            .as_ref()
            .map_or_else(|e| e.to_string(), |_| "done".into())
    );
    ensure!(refused.is_err(), "an overdraft must be refused");
    let rows: Vec<(String, i64)> = db
        .query(
            &format!("SELECT name, balance FROM `{table}` ORDER BY name"),
            (),
        )
        .await?;
    println!("advanced: after one transfer and one rolled back: {rows:?}");
    ensure!(
        rows == vec![("alice".into(), 70), ("bob".into(), 50)],
        "{rows:?}"
    );

    // A statement of its own deadline: SLEEP(2) under a 200 ms bound.
    let slow = db
        .with_conn_within(Duration::from_millis(200), |c| {
            Box::pin(async move { c.query_drop("SELECT SLEEP(2)").await })
        })
        .await;
    let kind = slow.as_ref().err().map(|e| e.kind());
    println!("advanced: SELECT SLEEP(2) bounded by 200 ms -> {kind:?}");
    ensure!(kind == Some(im_infra::ErrorKind::Timeout), "{slow:?}");
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let parts = parts()?;
    let runtime = start("example-db").await?;
    let settings: MysqlSettings = runtime.settings().await?;
    let db = Arc::new(Db::connect(settings).await.context(
        "db has no in-process counterpart: give it a server (IMINFRA_CONFIG=examples/servers.yaml)",
    )?);
    let table = format!("example_accounts_{}", run_id());
    let outcome = async {
        basic(&db, &table).await?;
        if parts.advanced {
            advanced(&db, &table).await?;
        }
        anyhow::Ok(())
    }
    .await;
    db.exec(&format!("DROP TABLE IF EXISTS `{table}`"), ())
        .await?;
    db.close().await?;
    runtime.shutdown().await?;
    outcome
}
