//! Configuration decoding never panics: valid documents of every settings
//! type, and tens of thousands of mutations of them (flipped bytes,
//! truncations, spliced-in hostile values), go through
//! [`decode_untrusted`]. The same function is the libFuzzer target in
//! `fuzz/`; this test runs it deterministically in CI.

use std::panic::{catch_unwind, AssertUnwindSafe};

use im_infra_integration_tests::decoding::decode_untrusted;

/// Valid documents: the mutations start from the shapes the decoders accept.
const SEEDS: &[&str] = &[
    r#"{"rules": {"login": {"rate": 5, "period": "1m", "burst": 10}}, "default_rule": {"rate": 100, "period": "1s"}}"#,
    r#"{"rate": 18446744073709551615, "period": "1ns", "burst": 18446744073709551615}"#,
    r#"{"max_retries": 4294967295, "initial_interval": "1ns", "max_interval": "100000h", "multiplier": 1e308, "jitter": true}"#,
    r#"{"group": "g", "topics": ["a", "b"], "start": "latest", "dead_letter_topic": "dlq", "handler_retry": {"max_retries": 1}}"#,
    r#"{"service": "im-logic", "id": "i-1", "address": "10.0.0.1:8080", "metadata": {"zone": "a"}}"#,
    r#"{"epoch_millis": 1704067200000, "time_bits": 41, "worker_bits": 10, "sequence_bits": 12, "max_backward": "50ms"}"#,
    r#"{"max_value_bytes": 1024, "max_message_bytes": 1024, "default_partitions": 4}"#,
    r#"{"urls": ["rediss://u:p@h:6380/0", "rediss://h2:6380"], "cluster": true, "username": "app", "password": "s", "namespace": "ns", "tls": {"ca_file": "/ca.pem"}, "connect_timeout": "1s", "request_timeout": "500ms"}"#,
    r#"{"endpoints": ["http://127.0.0.1:2379"], "dial_timeout": "5s", "username": "root", "password": "pw", "default_ttl": "30s", "service_prefix": "/services", "lock_prefix": "/locks", "tls": {"ca_file": "/ca.pem", "server_name": "etcd"}}"#,
    "endpoints:\n  - http://127.0.0.1:2379\ndial_timeout: 5s\nusername: root\n",
    // The seed's own sample files of the etcd library.
    r#"{"endpoints": ["localhost:23791", "localhost:23792", "localhost:23793"], "dial_timeout": "5s", "log_level": "info"}"#,
    "endpoints:\n  - localhost:23791\n  - localhost:23792\n  - localhost:23793\ndial_timeout: 5s\nlog_level: info\n",
    r#"{"url": "mysql://app:pw@db:3306/im?prefer_socket=false", "pool_min": 1, "pool_max": 8, "request_timeout": "2s", "table_prefix": "im_", "namespace": "svc/", "tls": {"ca_file": "/ca.pem", "accept_invalid_certs": true}}"#,
    r#"{"brokers": ["k1:9092", "k2:9092"], "client_id": "c", "namespace": "dev.", "security": {"protocol": "sasl_ssl", "sasl": {"mechanism": "scram_sha512", "username": "u", "password": "p"}, "tls": {"ca_file": "/ca.pem"}}, "producer": {"acks": "leader", "linger": "5ms", "compression": "lz4"}, "consumer": {"session_timeout": "10s"}, "topics": [{"name": "t", "partitions": 3}], "extra": {"debug": "all"}}"#,
    "/config/dev/im-logic/db",
    "key with spaces and \u{1F600} and \t tabs",
];

/// Values spliced into documents: the edges decoders get wrong.
const HOSTILE: &[&str] = &[
    "-1",
    "0",
    "1e309",
    "-0.0",
    "NaN",
    "18446744073709551616",
    "\"-5s\"",
    "\"99999999999999999999s\"",
    "\"\"",
    "null",
    "[]",
    "{}",
    "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]",
    "\"\\u0000\"",
    "\"\\ud800\"",
    "\"a,b\"",
    "\"::\"",
    "true",
];

/// The number of settings types that decoded `data` into a valid value;
/// fails the test, naming the input, if decoding panicked.
fn check(data: &[u8]) -> usize {
    match catch_unwind(AssertUnwindSafe(|| decode_untrusted(data))) {
        Ok(valid) => valid,
        Err(_) => panic!(
            "decoding panicked on {:?}",
            String::from_utf8_lossy(data).into_owned()
        ),
    }
}

fn mutate(rng: &mut fastrand::Rng, seed: &[u8]) -> Vec<u8> {
    let mut d = seed.to_vec();
    for _ in 0..rng.usize(1..4) {
        match rng.u8(0..5) {
            // Flip a byte.
            0 if !d.is_empty() => {
                let i = rng.usize(..d.len());
                d[i] = rng.u8(..);
            }
            // Truncate.
            1 if !d.is_empty() => d.truncate(rng.usize(..d.len())),
            // Replace the value after a ':' with a hostile one.
            2 => {
                let colons: Vec<usize> = d
                    .iter()
                    .enumerate()
                    .filter(|(_, b)| **b == b':')
                    .map(|(i, _)| i)
                    .collect();
                if let Some(&at) = colons.get(rng.usize(..colons.len().max(1))) {
                    let end = d[at + 1..]
                        .iter()
                        .position(|b| matches!(b, b',' | b'}' | b']'))
                        .map_or(d.len(), |p| at + 1 + p);
                    let v = HOSTILE[rng.usize(..HOSTILE.len())].as_bytes();
                    d.splice(at + 1..end, v.iter().copied());
                }
            }
            // Duplicate a slice.
            3 if !d.is_empty() => {
                let a = rng.usize(..d.len());
                let b = rng.usize(a..=d.len());
                let part = d[a..b].to_vec();
                let at = rng.usize(..=d.len());
                d.splice(at..at, part);
            }
            // Insert a random byte.
            _ => {
                let at = rng.usize(..=d.len());
                d.insert(at, rng.u8(..));
            }
        }
    }
    d
}

/// The seeds that are settings documents (the last two are names).
const DOCUMENTS: usize = SEEDS.len() - 2;

#[test]
fn every_document_seed_decodes_into_a_valid_setting() {
    // Otherwise the mutations would only exercise the parsers' error paths.
    for seed in &SEEDS[..DOCUMENTS] {
        assert!(
            check(seed.as_bytes()) > 0,
            "no settings type accepts the seed {seed}"
        );
    }
    for name in &SEEDS[DOCUMENTS..] {
        check(name.as_bytes());
    }
}

#[test]
fn twenty_thousand_mutations_decode_without_panicking() {
    let mut rng = fastrand::Rng::with_seed(0x1a_f00d);
    for i in 0..20_000 {
        let seed = SEEDS[i % SEEDS.len()].as_bytes();
        check(&mutate(&mut rng, seed));
    }
}

#[test]
fn hostile_values_in_every_field_decode_without_panicking() {
    // Every ':' of every seed, replaced by every hostile value.
    for seed in SEEDS {
        let s = seed.as_bytes();
        for (at, _) in s.iter().enumerate().filter(|(_, b)| **b == b':') {
            let end = s[at + 1..]
                .iter()
                .position(|b| matches!(b, b',' | b'}' | b']'))
                .map_or(s.len(), |p| at + 1 + p);
            for v in HOSTILE {
                let mut d = s.to_vec();
                d.splice(at + 1..end, v.bytes());
                check(&d);
            }
        }
    }
}
