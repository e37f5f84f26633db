//! The local sources of a service's configuration, layered: what the code
//! states, then the file (YAML or JSON), then the environment.
//!
//! The result is one JSON object whose top-level keys are the runtime's own
//! (`service`, `env`, `backends`, `startup`, `shutdown`) and the components'
//! sections (`redis`, `etcd`, `db`, `kafka`, `memory`, `clog`, `metrics`,
//! `ratelimit`). A component's section is its local settings: what it uses
//! when the config center has none.
//!
//! An environment variable `IMINFRA_<SECTION>__<FIELD>[__<FIELD>…]` sets one
//! value (`IMINFRA_REDIS__URLS=[redis://cache:6379]`,
//! `IMINFRA_BACKENDS__CACHE=redis`). A value is text, except `true` and
//! `false`, a number (`10`, `0.5`), and a YAML flow list or mapping
//! (`[a, b]`, `{k: v}`); quote a text that looks like one of those
//! (`IMINFRA_DB__PASSWORD='"123456"'`). Text is taken as it is: a `#` is
//! not a comment. `IMINFRA_SERVICE`, `IMINFRA_ENV` and `IMINFRA_CONFIG` (the
//! file) are single values. Variables naming no known section are ignored,
//! so the prefix can be shared with other tools; a variable whose name or
//! value is not UTF-8 is ignored too.

use std::path::{Path, PathBuf};

use im_infra::{Error, ErrorKind, Result};
use serde_json::{Map, Value};

/// The prefix of the environment variables the runtime reads.
pub const ENV_PREFIX: &str = "IMINFRA_";

/// The variable naming the configuration file.
pub const CONFIG_FILE_VAR: &str = "IMINFRA_CONFIG";

/// The top-level keys of the runtime itself.
pub(crate) const RUNTIME_KEYS: &[&str] = &["service", "env", "backends", "startup", "shutdown"];

/// The components whose sections the configuration may hold.
pub const COMPONENTS: &[&str] = &[
    "memory",
    "etcd",
    "redis",
    "db",
    "kafka",
    "clog",
    "metrics",
    "ratelimit",
];

fn invalid(message: String) -> Error {
    Error::new(ErrorKind::InvalidConfig, message)
}

/// Reads a configuration file: JSON when its name ends in `.json`, YAML
/// otherwise. It must hold a mapping.
pub(crate) fn read_file(path: &Path) -> Result<Map<String, Value>> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        invalid(format!(
            "configuration file {}: cannot be read: {e}",
            path.display()
        ))
    })?;
    let parsed: Value = if path.extension().is_some_and(|e| e == "json") {
        serde_json::from_str(&text).map_err(|e| e.to_string())
    } else {
        serde_yaml_ng::from_str(&text).map_err(|e| e.to_string())
    }
    .map_err(|e| invalid(format!("configuration file {}: {e}", path.display())))?;
    match parsed {
        Value::Object(map) => Ok(map),
        Value::Null => Ok(Map::new()),
        _ => Err(invalid(format!(
            "configuration file {}: the top level must be a mapping",
            path.display()
        ))),
    }
}

/// Each backend section of `layer` (what one source gives) with its fields'
/// current names ([`im_infra::settings::use_current_names`]), so that one
/// source's earlier name and another's current one merge as one field.
/// The backends' sections only: a service's own sections are merged as
/// they are given.
#[cfg_attr(
    not(any(feature = "etcd", feature = "redis", feature = "mysql")),
    allow(unused_imports, unused_variables)
)]
pub(crate) fn use_current_names(layer: &mut Map<String, Value>) -> Result<()> {
    use im_infra::settings::use_current_names as current;
    for (section, fields) in layer.iter_mut() {
        let Value::Object(fields) = fields else {
            continue;
        };
        match section.as_str() {
            #[cfg(feature = "etcd")]
            "etcd" => current::<im_infra_etcd::EtcdSettings>(fields)?,
            #[cfg(feature = "redis")]
            "redis" => current::<im_infra_redis::RedisSettings>(fields)?,
            #[cfg(feature = "mysql")]
            "db" => current::<im_infra_mysql::MysqlSettings>(fields)?,
            _ => {}
        }
    }
    Ok(())
}

/// Merges `over` into `base`: mappings key by key, anything else replaced.
pub(crate) fn merge(base: &mut Map<String, Value>, over: Map<String, Value>) {
    for (key, value) in over {
        match (base.get_mut(&key), value) {
            (Some(Value::Object(b)), Value::Object(o)) => merge(b, o),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

/// The value of an environment variable: a bool, a number, a flow
/// collection or a quoted text when it is written as one; the text as it
/// is otherwise.
fn env_value(text: &str) -> Value {
    let t = text.trim();
    let typed = t.starts_with(['[', '{', '"', '\''])
        || t == "true"
        || t == "false"
        || t.parse::<f64>().is_ok_and(f64::is_finite);
    typed
        .then(|| serde_yaml_ng::from_str::<Value>(t).ok())
        .flatten()
        .filter(|v| !v.is_null())
        .unwrap_or_else(|| Value::String(text.to_owned()))
}

/// The path of keys a variable sets, or `None` when it names no known
/// section (or is the file variable).
fn env_path(name: &str, own: &[String]) -> Option<Vec<String>> {
    let rest = name.strip_prefix(ENV_PREFIX)?;
    let path: Vec<String> = rest.split("__").map(str::to_ascii_lowercase).collect();
    let first = path.first()?.as_str();
    let known = match path.len() {
        1 => matches!(first, "service" | "env"),
        _ => {
            RUNTIME_KEYS.contains(&first)
                || COMPONENTS.contains(&first)
                || own.iter().any(|c| c == first)
        }
    };
    (known && path.iter().all(|s| !s.is_empty())).then_some(path)
}

/// The overrides of `vars` (in the process: `std::env::vars()`), for the
/// runtime's sections and the service's `own`.
pub(crate) fn from_env(
    vars: impl IntoIterator<Item = (String, String)>,
    own: &[String],
) -> Map<String, Value> {
    let mut out = Map::new();
    for (name, text) in vars {
        let Some(path) = env_path(&name, own) else {
            continue;
        };
        let (last, parents) = path.split_last().expect("a path has a key");
        let mut at = &mut out;
        for key in parents {
            let entry = at
                .entry(key.clone())
                .or_insert_with(|| Value::Object(Map::new()));
            if !entry.is_object() {
                *entry = Value::Object(Map::new());
            }
            at = entry.as_object_mut().expect("just made an object");
        }
        at.insert(last.clone(), env_value(&text));
    }
    out
}

/// The layered sources: code, then the file, then the environment.
#[derive(Debug, Clone, Default)]
pub(crate) struct Sources {
    pub(crate) code: Map<String, Value>,
    pub(crate) file: Option<PathBuf>,
    pub(crate) read_env: bool,
    /// The sections of the service's own components.
    pub(crate) own: Vec<String>,
}

impl Sources {
    /// The merged configuration. The file is the one set in code, else the
    /// one `IMINFRA_CONFIG` names, else none.
    pub(crate) fn load(&self) -> Result<Map<String, Value>> {
        let mut merged = self.code.clone();
        use_current_names(&mut merged)?;
        let from_var = self
            .read_env
            .then(|| std::env::var_os(CONFIG_FILE_VAR))
            .flatten()
            .filter(|v| !v.is_empty())
            .map(PathBuf::from);
        if let Some(path) = self.file.clone().or(from_var) {
            let mut file = read_file(&path)?;
            use_current_names(&mut file).map_err(|e| {
                invalid(format!(
                    "configuration file {}: {}",
                    path.display(),
                    e.message()
                ))
            })?;
            merge(&mut merged, file);
        }
        if self.read_env {
            let utf8 = std::env::vars_os()
                .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)));
            let mut env = from_env(utf8, &self.own);
            use_current_names(&mut env)
                .map_err(|e| invalid(format!("environment: {}", e.message())))?;
            merge(&mut merged, env);
        }
        Ok(merged)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn vars(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// The code's section carries every field by its current name; a file
    /// that still uses an earlier name overrides it all the same, and a
    /// file that gives both names is refused, naming them.
    #[cfg(feature = "etcd")]
    #[test]
    fn a_files_earlier_field_name_overrides_the_codes_current_one() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("app.yaml");
        std::fs::write(&file, "etcd:\n  dial_timeout: 4s\n").unwrap();
        let etcd = serde_json::to_value(im_infra_etcd::EtcdSettings::default()).unwrap();
        let sources = Sources {
            code: Map::from_iter([("etcd".to_owned(), etcd)]),
            file: Some(file.clone()),
            read_env: false,
            own: Vec::new(),
        };
        let merged = sources.load().unwrap();
        let etcd: im_infra_etcd::EtcdSettings =
            serde_json::from_value(merged["etcd"].clone()).unwrap();
        assert_eq!(etcd.connect_timeout, std::time::Duration::from_secs(4));

        std::fs::write(&file, "etcd:\n  dial_timeout: 4s\n  connect_timeout: 5s\n").unwrap();
        let e = sources.load().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidConfig);
        assert!(
            e.message().contains("dial_timeout is the earlier name"),
            "{e}"
        );
    }

    #[test]
    fn environment_variables_set_typed_values_at_their_path() {
        let got = from_env(
            vars(&[
                ("IMINFRA_REDIS__URL", "redis://cache:6379"),
                ("IMINFRA_BACKENDS__CACHE", "redis"),
                ("IMINFRA_ETCD__ENDPOINTS", "[http://a:2379, http://b:2379]"),
                ("IMINFRA_DB__POOL__MAX", "10"),
                ("IMINFRA_METRICS__LISTEN", "127.0.0.1:9100"),
                ("IMINFRA_REDIS__PASSWORD", "abc #1: x"),
                ("IMINFRA_DB__PASSWORD", "\"123456\""),
                ("IMINFRA_KAFKA__ENABLED", "true"),
                ("IMINFRA_SERVICE", "im-logic"),
                ("IMINFRA_REDIS_URL", "ignored: no section separator"),
                ("IMINFRA_UNKNOWN__X", "ignored: no such section"),
                ("IMINFRA_CONFIG", "ignored: names the file"),
                ("IMINFRA_CHAT__TOPIC", "chat.messages"),
                ("IMINFRA_OTHER__TOPIC", "ignored: not declared"),
                ("HOME", "/root"),
            ]),
            &["chat".to_owned()],
        );
        assert_eq!(
            Value::Object(got),
            json!({
                "redis": {"url": "redis://cache:6379", "password": "abc #1: x"},
                "backends": {"cache": "redis"},
                "etcd": {"endpoints": ["http://a:2379", "http://b:2379"]},
                "db": {"pool": {"max": 10}, "password": "123456"},
                "kafka": {"enabled": true},
                "metrics": {"listen": "127.0.0.1:9100"},
                "service": "im-logic",
                "chat": {"topic": "chat.messages"},
            })
        );
    }

    #[test]
    fn later_sources_override_earlier_ones_key_by_key() {
        let mut base = json!({"redis": {"url": "a", "namespace": "n"}, "service": "x"})
            .as_object()
            .cloned()
            .unwrap();
        let over = json!({"redis": {"url": "b"}, "service": "y"})
            .as_object()
            .cloned()
            .unwrap();
        merge(&mut base, over);
        assert_eq!(
            Value::Object(base),
            json!({"redis": {"url": "b", "namespace": "n"}, "service": "y"})
        );
    }

    #[test]
    fn files_are_read_as_yaml_or_json_and_must_hold_a_mapping() {
        let dir = tempfile::tempdir().unwrap();
        let yaml = dir.path().join("svc.yaml");
        std::fs::write(
            &yaml,
            "backends:\n  cache: redis\nredis:\n  url: redis://r\n",
        )
        .unwrap();
        let json_file = dir.path().join("svc.json");
        std::fs::write(
            &json_file,
            r#"{"backends": {"cache": "redis"}, "redis": {"url": "redis://r"}}"#,
        )
        .unwrap();
        assert_eq!(read_file(&yaml).unwrap(), read_file(&json_file).unwrap());

        let list = dir.path().join("list.yaml");
        std::fs::write(&list, "- a\n- b\n").unwrap();
        let e = read_file(&list).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidConfig);
        assert!(e.to_string().contains("mapping"), "{e}");

        let missing = read_file(&dir.path().join("nope.yaml")).unwrap_err();
        assert!(missing.to_string().contains("nope.yaml"), "{missing}");
    }

    #[test]
    fn the_code_is_the_base_and_the_file_overrides_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("svc.yaml");
        std::fs::write(&file, "redis:\n  url: redis://from-file\n").unwrap();
        let sources = Sources {
            code: json!({"redis": {"url": "redis://from-code", "namespace": "x"}})
                .as_object()
                .cloned()
                .unwrap(),
            file: Some(file),
            read_env: false,
            own: Vec::new(),
        };
        assert_eq!(
            Value::Object(sources.load().unwrap()),
            json!({"redis": {"url": "redis://from-file", "namespace": "x"}})
        );
    }
}
