//! The backend's tables: created and upgraded on start, idempotently, under
//! a database-wide named lock so that concurrent starts do not collide.

use im_infra::{Error, ErrorKind, Result};
use mysql_async::prelude::Queryable;

use crate::db::{first, Db};

/// The migrations, in order; version n is `MIGRATIONS[n - 1]`.
const MIGRATIONS: &[&str] = &[
    include_str!("sql/schema_v1.sql"),
    include_str!("sql/schema_v2.sql"),
];

/// Bound of the whole upgrade, waiting for the migration lock included.
const MIGRATION_BOUND: std::time::Duration = std::time::Duration::from_secs(60);

/// The schema version this build creates.
pub const SCHEMA_VERSION: u32 = MIGRATIONS.len() as u32;

/// Brings the tables under `prefix` to [`SCHEMA_VERSION`]; returns the
/// version found before.
pub(crate) async fn migrate(db: &Db, prefix: &str) -> Result<u32> {
    let version_table = format!("{prefix}schema_version");
    let lock_name = format!("im-infra-migrate-{prefix}");
    let statements: Vec<Vec<String>> = MIGRATIONS
        .iter()
        .map(|sql| {
            let code: Vec<&str> = sql
                .lines()
                .filter(|l| !l.trim_start().starts_with("--"))
                .collect();
            code.join("\n")
                .replace("{p}", prefix)
                .split(';')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .collect();
    // Waiting for another instance's upgrade may take up to the lock's 30 s.
    let found = db
        .with_conn_within(MIGRATION_BOUND, move |c| {
            Box::pin(async move {
                let got: Option<Option<i64>> = first(c, "SELECT GET_LOCK(?, 30)", (lock_name.clone(),)).await?;
                if got != Some(Some(1)) {
                    return Err(mysql_async::Error::Other("could not take the migration lock".into()));
                }
                let result = async {
                    c.query_drop(format!(
                        "CREATE TABLE IF NOT EXISTS {version_table} (version INT UNSIGNED NOT NULL) ENGINE=InnoDB"
                    ))
                    .await?;
                    let current: Option<Option<u32>> =
                        first(c, &format!("SELECT MAX(version) FROM {version_table}"), ()).await?;
                    let current = current.flatten().unwrap_or(0);
                    for (i, stmts) in statements.iter().enumerate() {
                        let v = i as u32 + 1;
                        if v <= current {
                            continue;
                        }
                        for s in stmts {
                            c.query_drop(s.as_str()).await?;
                        }
                        c.exec_drop(format!("INSERT INTO {version_table} (version) VALUES (?)"), (v,)).await?;
                        tracing::info!(version = v, "database schema upgraded");
                    }
                    Ok(current)
                }
                .await;
                let _: Option<Option<i64>> = first(c, "SELECT RELEASE_LOCK(?)", (lock_name,)).await?;
                result
            })
        })
        .await?;
    if found > SCHEMA_VERSION {
        return Err(Error::new(
            ErrorKind::InvalidState,
            format!("the database schema is at version {found}, newer than this build's {SCHEMA_VERSION}"),
        ));
    }
    Ok(found)
}
