-- Schema version 1 of the im-infra MySQL backend. `{p}` is the table prefix.
-- Every key column holds the namespace followed by the key.
CREATE TABLE IF NOT EXISTS {p}cache (
  k VARBINARY(1100) NOT NULL PRIMARY KEY,
  v LONGBLOB NOT NULL,
  expires_at DATETIME(6) NULL,
  KEY {p}cache_expiry (expires_at)
) ENGINE=InnoDB;

CREATE TABLE IF NOT EXISTS {p}config (
  k VARBINARY(1100) NOT NULL PRIMARY KEY,
  v LONGBLOB NOT NULL,
  version BIGINT UNSIGNED NOT NULL
) ENGINE=InnoDB;

-- Every config change, in commit order (writers serialise on the
-- 'config_writer' row of {p}meta); watches read it after their last id.
CREATE TABLE IF NOT EXISTS {p}config_log (
  id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
  k VARBINARY(1100) NOT NULL,
  kind CHAR(1) NOT NULL,
  v LONGBLOB NULL
) ENGINE=InnoDB;

-- 'config_writer': the row config writers lock, holding the last version
-- handed out; 'config_floor': the highest log id purged (a watch behind it
-- resynchronises).
CREATE TABLE IF NOT EXISTS {p}meta (
  name VARCHAR(64) NOT NULL PRIMARY KEY,
  value BIGINT UNSIGNED NOT NULL
) ENGINE=InnoDB;
INSERT IGNORE INTO {p}meta (name, value) VALUES ('config_writer', 0), ('config_floor', 0);

-- One row per lock key, kept after release so that the fencing counter
-- never goes back.
CREATE TABLE IF NOT EXISTS {p}locks (
  k VARBINARY(1100) NOT NULL PRIMARY KEY,
  owner VARCHAR(64) NULL,
  fence BIGINT UNSIGNED NOT NULL DEFAULT 0,
  expires_at DATETIME(6) NOT NULL,
  acquired_at DATETIME(6) NULL
) ENGINE=InnoDB;

CREATE TABLE IF NOT EXISTS {p}once (
  k VARBINARY(1100) NOT NULL PRIMARY KEY,
  state CHAR(1) NOT NULL,
  token VARCHAR(64) NULL,
  outcome LONGBLOB NULL,
  expires_at DATETIME(6) NOT NULL,
  KEY {p}once_expiry (expires_at)
) ENGINE=InnoDB;

-- GCRA state: the theoretical arrival time in microseconds since the epoch.
CREATE TABLE IF NOT EXISTS {p}limiter (
  k VARBINARY(2200) NOT NULL PRIMARY KEY,
  tat BIGINT NOT NULL,
  expires_at DATETIME(6) NOT NULL,
  KEY {p}limiter_expiry (expires_at)
) ENGINE=InnoDB;

CREATE TABLE IF NOT EXISTS {p}workers (
  ns VARBINARY(64) NOT NULL,
  id INT UNSIGNED NOT NULL,
  token VARCHAR(64) NOT NULL,
  expires_at DATETIME(6) NOT NULL,
  PRIMARY KEY (ns, id)
) ENGINE=InnoDB;
