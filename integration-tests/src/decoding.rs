//! Everything the library decodes from outside, behind one entry point for
//! fuzzing: configuration documents (JSON from the config center, YAML from
//! etcd config files) for every settings type, and the names and keys
//! applications pass in.
//!
//! [`decode_untrusted`] must never panic, whatever the bytes: a malformed
//! document is a `Serialization`/`InvalidConfig` error, a bad name an
//! `InvalidArgument`. It is run by the `config_decoding` test on seeds and
//! mutations of them, and by the `fuzz/` target under libFuzzer.
//!
//! ```
//! im_infra_integration_tests::decoding::decode_untrusted(br#"{"brokers": ["h:1"], "namespace": 7}"#);
//! im_infra_integration_tests::decoding::decode_untrusted(&[0xff, 0x00, b'{']);
//! ```

use im_infra::mq::{ConsumerSettings, StartPosition};
use im_infra::ratelimit::{LimiterSettings, Rule};
use im_infra::registry::ServiceInstance;
use im_infra::uid::Layout;
use im_infra::{Result, RetrySettings};
use im_infra_etcd::EtcdSettings;
use im_infra_kafka::KafkaSettings;
use im_infra_memory::MemorySettings;
use im_infra_mysql::MysqlSettings;
use im_infra_redis::RedisSettings;
use serde::de::DeserializeOwned;

/// Decodes `data` as JSON (and YAML where the library reads YAML) into `T`;
/// when that succeeds, checks it and runs `then` on a valid value. Returns
/// how many valid values it decoded.
fn one<T: DeserializeOwned>(
    data: &[u8],
    yaml: bool,
    validate: impl Fn(&T) -> Result<()>,
    then: impl Fn(&T),
) -> usize {
    let mut values: Vec<T> = serde_json::from_slice(data).into_iter().collect();
    if yaml {
        values.extend(serde_yaml_ng::from_slice::<T>(data));
    }
    let mut valid = 0;
    for v in values {
        if validate(&v).is_ok() {
            then(&v);
            valid += 1;
        }
    }
    valid
}

fn nothing<T>(_: &T) {}

/// Feeds `data` to every decoder and validator; returns normally for any
/// input (a panic is the bug this looks for). Returns how many settings
/// types decoded `data` into a valid value (so a corpus can be checked to
/// reach the decoders at all).
pub fn decode_untrusted(data: &[u8]) -> usize {
    let mut valid = 0;
    valid += one::<LimiterSettings>(data, false, LimiterSettings::validate, nothing::<_>);
    valid += one::<Rule>(data, false, Rule::validate, |r| {
        let _ = im_infra::ratelimit::gcra::Params::new(r, 1_000);
    });
    valid += one::<RetrySettings>(data, false, RetrySettings::validate, |r| {
        let _ = r.delays().take(64).count();
    });
    valid += one::<ConsumerSettings>(data, false, ConsumerSettings::validate, nothing::<_>);
    valid += one::<ServiceInstance>(data, false, ServiceInstance::validate, nothing::<_>);
    valid += one::<Layout>(data, false, Layout::validate, nothing::<_>);
    valid += one::<MemorySettings>(data, false, MemorySettings::validate, nothing::<_>);
    valid += one::<RedisSettings>(data, false, RedisSettings::validate, nothing::<_>);
    valid += one::<EtcdSettings>(data, true, EtcdSettings::validate, nothing::<_>);
    valid += one::<MysqlSettings>(data, false, MysqlSettings::validate, |c| {
        let _ = c.opts();
    });
    valid += one::<KafkaSettings>(data, false, KafkaSettings::validate, |c| {
        let _ = c.producer_properties();
        let _ = c.consumer_properties("group", StartPosition::Earliest);
        let _ = c.admin_properties();
    });
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = im_infra::validate::key(text);
        let _ = im_infra::validate::prefix(text);
        let _ = im_infra::validate::name("name", text);
        let _ = im_infra::mq::validate_topic(text);
        let _ = im_infra::ratelimit::validate_check(text, text, text.len() as u64);
        let mut parts = text.splitn(3, '/');
        let (env, service, component) = (
            parts.next().unwrap_or_default(),
            parts.next().unwrap_or_default(),
            parts.next().unwrap_or_default(),
        );
        let _ = im_infra::config::config_path_in(env, service, component);
    }
    valid
}
