//! Which nodes accept writes, read from their own answers: the primaries
//! of a cluster (`CLUSTER NODES`), and whether one node is a primary
//! (`ROLE`). The near cache's tracking follows every primary, because a
//! node pushes only the writes it applies.

use im_infra::{Error, ErrorKind, Result};
use redis::Value;

use crate::client::NodeAddr;

fn malformed(what: &str) -> Error {
    Error::new(ErrorKind::Internal, format!("an unexpected {what} answer"))
}

/// The text of a string answer (RESP2 bulk, RESP3 simple or verbatim).
pub(crate) fn text(v: &Value) -> Option<&str> {
    match v {
        Value::BulkString(b) => std::str::from_utf8(b).ok(),
        Value::SimpleString(s) | Value::VerbatimString { text: s, .. } => Some(s),
        _ => None,
    }
}

/// The primaries in a `CLUSTER NODES` answer given by `asked`, sorted,
/// each once: every node flagged `master` that is not known to have
/// failed (`fail`), not still joining (`handshake`) and has an address,
/// whether it serves slots or not yet (slots can be migrated to it, and
/// it accepts writes for them while they move), at its address (as
/// `CLUSTER SLOTS` gives it by default, the endpoint the cluster client
/// uses); the asked node may leave its own address empty or unspecified
/// (`myself`): that is `asked`'s host. A node only suspected of failing
/// (`fail?`) stays: it may still accept writes. A primary without an
/// address is an error: its writes could not be tracked.
pub(crate) fn primaries(nodes: &str, asked: &NodeAddr) -> Result<Vec<NodeAddr>> {
    let mut out = Vec::new();
    for line in nodes.lines().filter(|l| !l.trim().is_empty()) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (Some(address), Some(flags)) = (fields.get(1), fields.get(2)) else {
            return Err(malformed("CLUSTER NODES"));
        };
        let flags: Vec<&str> = flags.split(',').collect();
        if !flags.contains(&"master") || flags.iter().any(|f| matches!(*f, "fail" | "handshake")) {
            continue;
        }
        if flags.contains(&"noaddr") {
            return Err(Error::new(
                ErrorKind::Unavailable,
                format!("the cluster lists a primary without an address: {line}"),
            ));
        }
        // `ip:port@cport[,hostname[,...]]`
        let endpoint = address.split(',').next().unwrap_or(address);
        let endpoint = endpoint.split('@').next().unwrap_or(endpoint);
        let (ip, port) = endpoint
            .rsplit_once(':')
            .ok_or_else(|| malformed("CLUSTER NODES"))?;
        let port: u16 = port.parse().map_err(|_| malformed("CLUSTER NODES"))?;
        if port == 0 {
            return Err(Error::new(
                ErrorKind::Unavailable,
                format!("the cluster lists a primary without an address: {line}"),
            ));
        }
        let host = match ip {
            "" | "0.0.0.0" | "::" | "?" if flags.contains(&"myself") => asked.host.clone(),
            "" | "0.0.0.0" | "::" | "?" => {
                return Err(Error::new(
                    ErrorKind::Unavailable,
                    format!("the cluster lists a primary without a usable address: {line}"),
                ))
            }
            ip => ip.to_owned(),
        };
        out.push(NodeAddr { host, port });
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// Whether a `ROLE` answer says primary.
pub(crate) fn is_primary(role: &Value) -> Result<bool> {
    match role {
        Value::Array(fields) => fields
            .first()
            .and_then(text)
            .map(|r| r == "master")
            .ok_or_else(|| malformed("ROLE")),
        _ => Err(malformed("ROLE")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn asked() -> NodeAddr {
        NodeAddr {
            host: "10.0.0.1".into(),
            port: 7000,
        }
    }

    const NODES: &str = "\
07c3 10.0.0.1:7000@17000 myself,master - 0 0 1 connected 0-5460
67ed 10.0.0.2:7001@17001 master - 0 1426238317239 2 connected 5461-10922
292f 10.0.0.3:7002@17002 master,fail? - 0 1426238318243 3 connected 10923-16383
e7d1 10.0.0.4:7003@17003 slave 07c3 0 1426238316232 1 connected
6ec2 10.0.0.5:7004@17004 master,fail - 1426238316232 0 4 disconnected
824f 10.0.0.6:7005@17005,cache-6.example master - 0 1426238316232 5 connected
a1b2 10.0.0.7:7006@17006 master,handshake - 0 0 0 connected
";

    #[test]
    fn every_writable_primary_with_or_without_slots_and_no_replica() {
        let p = primaries(NODES, &asked()).expect("parsed");
        let names: Vec<String> = p.iter().map(|n| format!("{}:{}", n.host, n.port)).collect();
        assert_eq!(
            names,
            [
                "10.0.0.1:7000",
                "10.0.0.2:7001",
                "10.0.0.3:7002",
                "10.0.0.6:7005"
            ]
        );
    }

    #[test]
    fn an_address_left_empty_is_the_asked_node() {
        let p = primaries(
            "07c3 :7000@17000 myself,master - 0 0 1 connected 0-16383\n",
            &asked(),
        )
        .expect("parsed");
        assert_eq!(p, [asked()]);
    }

    #[test]
    fn a_failover_or_a_new_primary_changes_the_set_a_moved_slot_does_not() {
        let before = primaries(NODES, &asked()).expect("parsed");
        let moved = NODES
            .replace("0-5460", "0-5459")
            .replace("5461-10922", "5460-10922");
        assert_eq!(primaries(&moved, &asked()).expect("parsed"), before);
        let failed_over = NODES
            .replace(
                "10.0.0.4:7003@17003 slave 07c3",
                "10.0.0.4:7003@17003 master -",
            )
            .replace("myself,master", "myself,slave");
        assert_ne!(primaries(&failed_over, &asked()).expect("parsed"), before);
    }

    #[test]
    fn malformed_answers_are_errors_not_panics() {
        for nodes in ["x", "a b", "a 10.0.0.1 master", "a 10.0.0.1:99999@1 master"] {
            assert!(primaries(nodes, &asked()).is_err(), "{nodes}");
        }
        assert!(primaries("a :0@0 master,noaddr\n", &asked()).is_err());
        assert!(primaries("a 1.2.3.4:0@0 master\n", &asked()).is_err());
        assert!(
            primaries("a :7001@17001 master - 0 0 1 connected\n", &asked()).is_err(),
            "only the asked node may leave its address out"
        );
        assert!(primaries("a :0@0 master,fail,noaddr\n", &asked())
            .expect("a failed node is skipped")
            .is_empty());
    }

    #[test]
    fn role_answers() {
        let role = |r: &str| {
            Value::Array(vec![
                Value::BulkString(r.as_bytes().to_vec()),
                Value::Int(0),
            ])
        };
        assert!(is_primary(&role("master")).expect("parsed"));
        assert!(!is_primary(&role("slave")).expect("parsed"));
        assert!(is_primary(&Value::Nil).is_err());
        assert!(is_primary(&Value::Array(vec![])).is_err());
    }
}
