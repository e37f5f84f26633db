//! The MySQL-specific surface against the real MariaDB from
//! `scripts/services.sh`: the `db` wrapper, the self-managed schema, the
//! background purge and the query deadline.

use std::time::Duration;

use anyhow::{anyhow, ensure, Result};
use bytes::Bytes;
use im_infra::backend::{Backend, Maintenance};
use im_infra::ErrorKind;
use im_infra_conformance::servers::{server_or_skip, MYSQL_ENV};
use im_infra_mysql::{Db, MysqlBackend, MysqlSettings, SCHEMA_VERSION};

fn unique(what: &str) -> String {
    format!(
        "{what}_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    )
}

async fn drop_tables(db: &Db, prefix: &str) -> Result<()> {
    let tables: Vec<String> = db
        .query(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = DATABASE() AND table_name LIKE ?",
            (format!("{prefix}%"),),
        )
        .await?;
    for t in tables {
        db.exec(&format!("DROP TABLE IF EXISTS `{t}`"), ()).await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn db_runs_statements_queries_and_transactions() -> Result<()> {
    let Some(url) = server_or_skip("mysql", MYSQL_ENV) else {
        return Ok(());
    };
    let db = Db::connect(MysqlSettings::new(&url)).await?;
    let table = unique("dbtest");
    db.exec(
        &format!("CREATE TABLE {table} (id INT PRIMARY KEY, name VARCHAR(32) NOT NULL)"),
        (),
    )
    .await?;
    let result = async {
        ensure!(
            db.exec(
                &format!("INSERT INTO {table} VALUES (?, ?), (?, ?)"),
                (1, "a", 2, "b")
            )
            .await?
                == 2
        );
        let names: Vec<String> = db
            .query(&format!("SELECT name FROM {table} ORDER BY id"), ())
            .await?;
        ensure!(names == ["a", "b"], "{names:?}");
        let one: Option<(i32, String)> = db
            .query_first(&format!("SELECT id, name FROM {table} WHERE id = ?"), (2,))
            .await?;
        ensure!(one == Some((2, "b".to_owned())), "{one:?}");

        // A transaction commits when the closure succeeds...
        let t = table.clone();
        db.transaction(move |tx| {
            Box::pin(async move {
                use im_infra_mysql::mysql_async::prelude::Queryable;
                tx.exec_drop(format!("INSERT INTO {t} VALUES (3, 'c')"), ())
                    .await
            })
        })
        .await?;
        // ...and rolls back when it fails.
        let t = table.clone();
        let failed = db
            .transaction(move |tx| {
                Box::pin(async move {
                    use im_infra_mysql::mysql_async::prelude::Queryable;
                    tx.exec_drop(format!("INSERT INTO {t} VALUES (4, 'd')"), ())
                        .await?;
                    tx.exec_drop(format!("INSERT INTO {t} VALUES (1, 'duplicate')"), ())
                        .await
                })
            })
            .await;
        ensure!(
            failed.as_ref().err().map(|e| e.kind()) == Some(ErrorKind::AlreadyExists),
            "{failed:?}"
        );
        let ids: Vec<i32> = db
            .query(&format!("SELECT id FROM {table} ORDER BY id"), ())
            .await?;
        ensure!(
            ids == [1, 2, 3],
            "the failed transaction left rows behind: {ids:?}"
        );

        // A NULL where a value is expected is an error, not a panic.
        let err = db.query_first::<i64>("SELECT NULL", ()).await.err();
        ensure!(err.map(|e| e.kind()) == Some(ErrorKind::Serialization));
        // Several statements in one round trip.
        let rows = db.text("SET @x = 41; SELECT @x + 1").await?;
        let v: Option<i64> = rows.first().and_then(|r| r.get(0));
        ensure!(v == Some(42), "{v:?}");
        db.health_check().await?;
        Ok(())
    }
    .await;
    db.exec(&format!("DROP TABLE {table}"), ()).await?;
    result?;
    db.close().await?;
    let err = db
        .health_check()
        .await
        .err()
        .ok_or_else(|| anyhow!("a closed pool answered"))?;
    ensure!(err.kind() == ErrorKind::Closed, "{err}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_past_its_deadline_is_a_retryable_timeout() -> Result<()> {
    let Some(url) = server_or_skip("mysql", MYSQL_ENV) else {
        return Ok(());
    };
    let cfg = MysqlSettings {
        request_timeout: Duration::from_millis(200),
        ..MysqlSettings::new(&url)
    };
    let db = Db::connect(cfg).await?;
    let err = db
        .query_first::<i64>("SELECT SLEEP(2)", ())
        .await
        .err()
        .ok_or_else(|| anyhow!("a 2 s query finished within 200 ms"))?;
    ensure!(
        err.kind() == ErrorKind::Timeout && err.is_retryable(),
        "{err}"
    );
    // The pool is still usable.
    db.health_check().await?;
    db.close().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_starts_create_the_schema_once() -> Result<()> {
    let Some(url) = server_or_skip("mysql", MYSQL_ENV) else {
        return Ok(());
    };
    let prefix = format!("{}_", unique("schema"));
    let build = || {
        MysqlBackend::builder()
            .url(&url)
            .table_prefix(&prefix)
            .request_timeout(Duration::from_secs(10))
            .build()
    };
    let started = futures::future::join_all((0..4).map(|_| build())).await;
    let admin = Db::connect(MysqlSettings::new(&url)).await?;
    let result = async {
        let backends = started.into_iter().collect::<Result<Vec<_>, _>>()?;
        let versions: Vec<u32> = admin
            .query(&format!("SELECT version FROM {prefix}schema_version"), ())
            .await?;
        ensure!(
            versions == (1..=SCHEMA_VERSION).collect::<Vec<_>>(),
            "{versions:?}"
        );
        // Each start works on the tables.
        for (i, b) in backends.iter().enumerate() {
            b.cache()
                .await?
                .set(&format!("k{i}"), Bytes::from_static(b"v"), None)
                .await?;
        }
        for b in &backends {
            b.close().await?;
        }
        // A schema newer than the build is refused, not damaged.
        admin
            .exec(
                &format!("INSERT INTO {prefix}schema_version (version) VALUES (?)"),
                (SCHEMA_VERSION + 1,),
            )
            .await?;
        let err = build()
            .await
            .err()
            .ok_or_else(|| anyhow!("a newer schema was accepted"))?;
        ensure!(err.kind() == ErrorKind::InvalidState, "{err}");
        Ok(())
    }
    .await;
    drop_tables(&admin, &prefix).await?;
    admin.close().await?;
    result
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_purge_deletes_expired_rows_and_trims_the_config_log() -> Result<()> {
    let Some(url) = server_or_skip("mysql", MYSQL_ENV) else {
        return Ok(());
    };
    let prefix = format!("{}_", unique("purge"));
    let cfg = MysqlSettings {
        table_prefix: prefix.clone(),
        config_history: 5,
        // The background pass stays out of the way; the test runs one itself.
        purge_interval: Duration::from_secs(3600),
        ..MysqlSettings::new(&url)
    };
    let backend = MysqlBackend::builder().settings(cfg).build().await?;
    let result = async {
        let cache = backend.cache().await?;
        cache
            .set(
                "short",
                Bytes::from_static(b"v"),
                Some(Duration::from_millis(5)),
            )
            .await?;
        cache
            .set(
                "long",
                Bytes::from_static(b"v"),
                Some(Duration::from_secs(600)),
            )
            .await?;
        let config = backend.config().await?;
        for i in 0..20 {
            config.set("/c", Bytes::from(i.to_string())).await?;
        }
        // A released worker id: its row is expired but must stay, with the
        // last timestamp its holder may have used.
        let workers = backend.worker_ids().await?;
        let held = workers.allocate(0, Duration::from_secs(600)).await?;
        held.release().await?;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let count = |table: &str| {
            let sql = format!("SELECT COUNT(*) FROM {prefix}{table}");
            let db = backend.db();
            async move {
                db.query_first::<i64>(&sql, ())
                    .await
                    .map(Option::unwrap_or_default)
            }
        };
        ensure!(count("cache").await? == 2);
        ensure!(count("config_log").await? == 20);
        let deleted = backend.purge_expired().await?;
        ensure!(deleted == 1 + 15, "deleted {deleted} rows");
        ensure!(
            count("cache").await? == 1,
            "the expired cache row is gone, the live one stays"
        );
        ensure!(
            count("config_log").await? == 5,
            "config_history changes are kept"
        );
        ensure!(cache.get("long").await?.is_some());
        ensure!(
            count("workers").await? == 1,
            "the released worker id's row stays"
        );
        let next = workers.allocate(0, Duration::from_secs(600)).await?;
        ensure!(
            next.not_before_millis() > 0,
            "the next holder of the id starts after its previous holder"
        );
        next.release().await?;
        Ok(())
    }
    .await;
    drop_tables(backend.db(), &prefix).await?;
    backend.close().await?;
    result
}

/// A rule of 1 per day with a burst so large that period × burst leaves
/// 64-bit arithmetic is refused as `InvalidConfig`, never computed wrapped;
/// a large rule that fits still decides.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limiter_rules_beyond_64_bit_arithmetic_are_refused() -> Result<()> {
    use im_infra::ratelimit::{Rule, Rules};
    let Some(url) = server_or_skip("mysql", MYSQL_ENV) else {
        return Ok(());
    };
    let backend = MysqlBackend::builder()
        .url(&url)
        .namespace(unique("ovf"))
        .table_prefix("iminfra_test_")
        .build()
        .await?;
    let result = async {
        let day = Duration::from_secs(86_400);
        // 1 per day × 2^27 = 1.16e19 µs: fits u64, not the signed BIGINT
        // of the statement.
        let huge = Rule::new(1, day).with_burst(1 << 27);
        let refused = backend
            .limiter(Rules::single("api", huge)?)
            .await
            .err()
            .ok_or_else(|| anyhow!("a rule beyond 64-bit arithmetic was accepted"))?;
        ensure!(refused.kind() == ErrorKind::InvalidConfig, "{refused}");
        ensure!(
            refused.to_string().contains("api"),
            "names the rule: {refused}"
        );

        // Beyond u64 altogether: refused at the decision, like everywhere.
        let beyond = Rule::new(1, day).with_burst(1 << 40);
        let limiter = backend.limiter(Rules::single("api", beyond)?).await?;
        let refused = limiter.check("api", "k", 1).await.unwrap_err();
        ensure!(refused.kind() == ErrorKind::InvalidConfig, "{refused}");

        let large = Rule::new(1, day).with_burst(1 << 20);
        let limiter = backend.limiter(Rules::single("api", large)?).await?;
        let d = limiter.check("api", "k", 1 << 20).await?;
        ensure!(
            d.allowed && d.limit == 1 << 20,
            "the whole burst at once: {d:?}"
        );
        let d = limiter.check("api", "k", 1).await?;
        ensure!(
            !d.allowed && d.retry_after > Duration::from_secs(86_000),
            "then a day to wait: {d:?}"
        );
        Ok(())
    }
    .await;
    backend.purge_namespace().await?;
    backend.close().await?;
    result
}

/// With the default, empty namespace a backend's "namespace" is the whole
/// of the shared tables: purging it is refused, and another namespace's
/// rows stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_namespace_is_not_purged() -> Result<()> {
    let Some(url) = server_or_skip("mysql", MYSQL_ENV) else {
        return Ok(());
    };
    let build = |ns: String| {
        MysqlBackend::builder()
            .url(&url)
            .namespace(ns)
            .table_prefix("iminfra_test_")
            .build()
    };
    let named = build(format!("{}/", unique("kept"))).await?;
    let unnamed = build(String::new()).await?;
    let result = async {
        let cache = named.cache().await?;
        cache.set("k", Bytes::from_static(b"v"), None).await?;
        let refused = unnamed.purge_namespace().await.unwrap_err();
        ensure!(refused.kind() == ErrorKind::InvalidArgument, "{refused}");
        ensure!(
            cache.get("k").await?.as_deref() == Some(&b"v"[..]),
            "another namespace's row was deleted"
        );
        ensure!(named.purge_namespace().await? >= 1);
        ensure!(cache.get("k").await?.is_none());
        Ok(())
    }
    .await;
    unnamed.close().await?;
    named.close().await?;
    result
}
