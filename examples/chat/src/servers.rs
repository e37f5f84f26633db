//! The platform's configuration on the servers `scripts/services.sh`
//! started, for the end-to-end test and the benchmark: the committed
//! `servers.yaml` with this machine's addresses (from the variables the
//! script exports) and names unique to one run, so that runs never meet
//! each other's keys, topics or tables.

use anyhow::{bail, Context, Result};
use serde_json::{json, Map, Value};

/// The committed configuration file of the platform on the servers.
pub const SERVERS_FILE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/servers.yaml");

/// The variables naming the servers' addresses, by backend.
pub const SERVER_VARS: [(&str, &str); 4] = [
    ("etcd", "IMINFRA_ETCD_ENDPOINTS"),
    ("redis", "IMINFRA_REDIS_URL"),
    ("mysql", "IMINFRA_MYSQL_URL"),
    ("kafka", "IMINFRA_KAFKA_BROKERS"),
];

fn list(text: &str) -> Value {
    Value::Array(
        text.split(',')
            .map(|s| Value::String(s.trim().to_owned()))
            .collect(),
    )
}

/// [`SERVERS_FILE`] with the addresses of `vars` (a lookup of the
/// [`SERVER_VARS`]), every namespace, the store's table and the
/// environment made unique by `run` (letters and digits), and every
/// listener on a free port.
///
/// ```
/// let vars = |name: &str| Some(match name {
///     "IMINFRA_ETCD_ENDPOINTS" => "http://127.0.0.1:2379".to_owned(),
///     "IMINFRA_REDIS_URL" => "redis://127.0.0.1:6379".to_owned(),
///     "IMINFRA_MYSQL_URL" => "mysql://root@127.0.0.1:3306/im_infra".to_owned(),
///     _ => "127.0.0.1:9092".to_owned(),
/// });
/// let c = im_infra_examples_chat::servers::config("r1", vars).unwrap();
/// assert_eq!(c["chat"]["table"], "chat_r1");
/// assert_eq!(c["kafka"]["brokers"][0], "127.0.0.1:9092");
/// ```
pub fn config(run: &str, vars: impl Fn(&str) -> Option<String>) -> Result<Map<String, Value>> {
    if run.is_empty() || !run.bytes().all(|b| b.is_ascii_alphanumeric()) {
        bail!("run id {run:?}: letters and digits only");
    }
    let text = std::fs::read_to_string(SERVERS_FILE).context(SERVERS_FILE)?;
    let mut file: Value = serde_yaml_ng::from_str(&text).context(SERVERS_FILE)?;
    let get = |var: &str| vars(var).with_context(|| format!("{var} is not set"));
    let overrides = json!({
        "env": format!("e2e{run}"),
        "etcd": {"endpoints": list(&get("IMINFRA_ETCD_ENDPOINTS")?), "namespace": format!("/chat-{run}")},
        "redis": {"urls": list(&get("IMINFRA_REDIS_URL")?), "namespace": format!("chat-{run}")},
        "db": {"url": get("IMINFRA_MYSQL_URL")?},
        "kafka": {"brokers": list(&get("IMINFRA_KAFKA_BROKERS")?), "namespace": format!("chat-{run}.")},
        "chat": {"table": format!("chat_{run}"), "gateway_listen": "127.0.0.1:0", "logic_listen": "127.0.0.1:0"},
        "metrics": {"listen": "127.0.0.1:0"},
    });
    let Value::Object(map) = &mut file else {
        bail!("{SERVERS_FILE}: the top level must be a mapping");
    };
    for (section, values) in overrides.as_object().expect("an object") {
        match (map.get_mut(section), values) {
            (Some(Value::Object(at)), Value::Object(values)) => {
                at.extend(values.clone());
            }
            _ => {
                map.insert(section.clone(), values.clone());
            }
        }
    }
    Ok(map.clone())
}
