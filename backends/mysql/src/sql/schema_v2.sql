-- Version 2: per worker id, the last timestamp (Unix ms, on the holder's
-- clock) its latest holder may have put in an id (`last_ms`), and, for the
-- allocator that takes the id next, the value it found (`prev_ms`): a
-- generator on a reused id starts after it.
ALTER TABLE {p}workers
  ADD COLUMN last_ms BIGINT UNSIGNED NOT NULL DEFAULT 0,
  ADD COLUMN prev_ms BIGINT UNSIGNED NOT NULL DEFAULT 0;
