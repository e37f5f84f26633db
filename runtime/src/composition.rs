//! Which backend serves which capability: the `backends` section.
//!
//! ```yaml
//! backends:
//!   coord: etcd      # the config center (and, unless stated, registry and lock)
//!   cache: redis
//!   ratelimit: redis
//!   mq: kafka
//!   uid: etcd
//! ```
//!
//! `registry` and `lock` follow `coord` unless stated; every other role
//! unstated is `memory`. An unknown role or backend, or a backend that
//! lacks the role's capability, is a start-up error naming both.

use std::collections::BTreeMap;

use im_infra::backend::Capability;
use im_infra::{Error, ErrorKind, Result};

/// A backend the runtime can compose.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BackendKind {
    /// The in-process backend (`im-infra-memory`).
    Memory,
    /// The null backend (`im-infra-noop`).
    Noop,
    /// etcd (`im-infra-etcd`, feature `etcd`).
    Etcd,
    /// Redis (`im-infra-redis`, feature `redis`).
    Redis,
    /// MySQL or MariaDB (`im-infra-mysql`, feature `mysql`).
    Mysql,
    /// Kafka (`im-infra-kafka`, feature `kafka`).
    Kafka,
}

impl BackendKind {
    /// Every backend, in the order of their names in errors.
    pub const ALL: [BackendKind; 6] = [
        BackendKind::Memory,
        BackendKind::Noop,
        BackendKind::Etcd,
        BackendKind::Redis,
        BackendKind::Mysql,
        BackendKind::Kafka,
    ];

    /// Its name in the configuration (`"redis"`).
    pub const fn as_str(self) -> &'static str {
        match self {
            BackendKind::Memory => "memory",
            BackendKind::Noop => "noop",
            BackendKind::Etcd => "etcd",
            BackendKind::Redis => "redis",
            BackendKind::Mysql => "mysql",
            BackendKind::Kafka => "kafka",
        }
    }

    /// The backend of a name.
    ///
    /// ```
    /// use im_infra_runtime::BackendKind;
    /// assert_eq!(BackendKind::parse("redis"), Some(BackendKind::Redis));
    /// assert_eq!(BackendKind::parse("mongo"), None);
    /// ```
    pub fn parse(name: &str) -> Option<BackendKind> {
        BackendKind::ALL.into_iter().find(|k| k.as_str() == name)
    }

    /// What the backend offers (the same list its `Backend::capabilities`
    /// gives).
    pub fn capabilities(self) -> &'static [Capability] {
        match self {
            BackendKind::Memory => im_infra_memory::CAPABILITIES,
            BackendKind::Noop => &Capability::ALL,
            BackendKind::Etcd => &[
                Capability::Lock,
                Capability::Config,
                Capability::Registry,
                Capability::Once,
                Capability::WorkerIds,
            ],
            BackendKind::Redis => &[
                Capability::Cache,
                Capability::Limiter,
                Capability::Lock,
                Capability::Config,
                Capability::Registry,
                Capability::Once,
                Capability::WorkerIds,
            ],
            BackendKind::Mysql => &[
                Capability::Cache,
                Capability::Limiter,
                Capability::Lock,
                Capability::Config,
                Capability::Once,
                Capability::WorkerIds,
            ],
            BackendKind::Kafka => &[Capability::Messaging],
        }
    }

    /// The cargo feature that compiles it in, `None` for those always in.
    pub const fn feature(self) -> Option<&'static str> {
        match self {
            BackendKind::Memory | BackendKind::Noop => None,
            BackendKind::Etcd => Some("etcd"),
            BackendKind::Redis => Some("redis"),
            BackendKind::Mysql => Some("mysql"),
            BackendKind::Kafka => Some("kafka"),
        }
    }

    /// The component its settings are read under (`/config/{env}/{service}/db`
    /// for MySQL), `None` for the null backend, which has none.
    pub const fn component(self) -> Option<&'static str> {
        match self {
            BackendKind::Memory => Some("memory"),
            BackendKind::Noop => None,
            BackendKind::Etcd => Some("etcd"),
            BackendKind::Redis => Some("redis"),
            BackendKind::Mysql => Some("db"),
            BackendKind::Kafka => Some("kafka"),
        }
    }
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A role a backend plays for the service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// The coordinator: the config center every other setting is read from.
    Coord,
    /// Service registry and discovery (follows `coord` unless stated).
    Registry,
    /// Distributed locks (follows `coord` unless stated).
    Lock,
    /// The cache.
    Cache,
    /// The rate limiter.
    Ratelimit,
    /// Idempotency.
    Once,
    /// Messaging: the producer and the consumers.
    Mq,
    /// Worker ids for unique ids.
    Uid,
}

impl Role {
    /// Every role, the coordinator first.
    pub const ALL: [Role; 8] = [
        Role::Coord,
        Role::Registry,
        Role::Lock,
        Role::Cache,
        Role::Ratelimit,
        Role::Once,
        Role::Mq,
        Role::Uid,
    ];

    /// Its key in the `backends` section.
    pub const fn as_str(self) -> &'static str {
        match self {
            Role::Coord => "coord",
            Role::Registry => "registry",
            Role::Lock => "lock",
            Role::Cache => "cache",
            Role::Ratelimit => "ratelimit",
            Role::Once => "once",
            Role::Mq => "mq",
            Role::Uid => "uid",
        }
    }

    /// The capability a backend needs to play it.
    pub const fn capability(self) -> Capability {
        match self {
            Role::Coord => Capability::Config,
            Role::Registry => Capability::Registry,
            Role::Lock => Capability::Lock,
            Role::Cache => Capability::Cache,
            Role::Ratelimit => Capability::Limiter,
            Role::Once => Capability::Once,
            Role::Mq => Capability::Messaging,
            Role::Uid => Capability::WorkerIds,
        }
    }

    fn index(self) -> usize {
        Role::ALL.iter().position(|r| *r == self).expect("in ALL")
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The backend of every role.
///
/// ```
/// use std::collections::BTreeMap;
/// use im_infra_runtime::{BackendKind, Composition, Role};
///
/// let stated = BTreeMap::from([("coord".to_string(), "etcd".to_string()), ("cache".to_string(), "redis".to_string())]);
/// let c = Composition::from_names(&stated).unwrap();
/// assert_eq!(c.kind(Role::Lock), BackendKind::Etcd, "lock follows coord");
/// assert_eq!(c.kind(Role::Mq), BackendKind::Memory, "unstated is memory");
///
/// let wrong = BTreeMap::from([("cache".to_string(), "kafka".to_string())]);
/// let e = Composition::from_names(&wrong).unwrap_err();
/// assert!(e.to_string().contains("cache") && e.to_string().contains("kafka"));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Composition {
    kinds: [BackendKind; 8],
}

impl Default for Composition {
    /// Everything in process.
    fn default() -> Self {
        Composition {
            kinds: [BackendKind::Memory; 8],
        }
    }
}

impl Composition {
    /// The composition the `backends` section states (role → backend name).
    pub fn from_names(stated: &BTreeMap<String, String>) -> Result<Composition> {
        let mut given: [Option<BackendKind>; 8] = [None; 8];
        for (role_name, backend_name) in stated {
            let role = Role::ALL
                .into_iter()
                .find(|r| r.as_str() == role_name)
                .ok_or_else(|| {
                    let known: Vec<_> = Role::ALL.iter().map(|r| r.as_str()).collect();
                    invalid(format!(
                        "backends.{role_name}: unknown capability (known: {})",
                        known.join(", ")
                    ))
                })?;
            let kind = BackendKind::parse(backend_name.trim()).ok_or_else(|| {
                let known: Vec<_> = BackendKind::ALL.iter().map(|k| k.as_str()).collect();
                invalid(format!(
                    "backends.{role}: unknown backend {backend_name:?} (known: {})",
                    known.join(", ")
                ))
            })?;
            given[role.index()] = Some(kind);
        }
        let coord = given[Role::Coord.index()].unwrap_or(BackendKind::Memory);
        let mut kinds = [BackendKind::Memory; 8];
        for role in Role::ALL {
            let follows_coord = matches!(role, Role::Registry | Role::Lock);
            kinds[role.index()] = given[role.index()].unwrap_or(if follows_coord {
                coord
            } else {
                BackendKind::Memory
            });
        }
        let composition = Composition { kinds };
        composition.check()?;
        Ok(composition)
    }

    /// Every role is played by a backend that offers its capability.
    fn check(&self) -> Result<()> {
        for role in Role::ALL {
            let kind = self.kind(role);
            if !kind.capabilities().contains(&role.capability()) {
                let offers: Vec<_> = kind.capabilities().iter().map(|c| c.as_str()).collect();
                return Err(Error::new(
                    ErrorKind::Unsupported,
                    format!(
                        "backends.{role}: backend {kind} does not offer {} (it offers: {})",
                        role.capability(),
                        offers.join(", ")
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The backend of `role`.
    pub fn kind(&self, role: Role) -> BackendKind {
        self.kinds[role.index()]
    }

    /// The same composition with every role of `from` played by `to` (the
    /// fallback when the coordinator is unreachable at start).
    pub fn replacing(&self, from: BackendKind, to: BackendKind) -> Composition {
        let mut kinds = self.kinds;
        for k in &mut kinds {
            if *k == from {
                *k = to;
            }
        }
        Composition { kinds }
    }

    /// The distinct backends in use, the coordinator's first.
    pub fn backends(&self) -> Vec<BackendKind> {
        let mut out = Vec::new();
        for role in Role::ALL {
            let kind = self.kind(role);
            if !out.contains(&kind) {
                out.push(kind);
            }
        }
        out
    }
}

impl std::fmt::Display for Composition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, role) in Role::ALL.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{role}: {}", self.kind(*role))?;
        }
        Ok(())
    }
}

fn invalid(message: String) -> Error {
    Error::new(ErrorKind::InvalidConfig, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[(&str, &str)]) -> BTreeMap<String, String> {
        list.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn nothing_stated_is_everything_in_process() {
        let c = Composition::from_names(&BTreeMap::new()).unwrap();
        assert_eq!(c, Composition::default());
        assert_eq!(c.backends(), vec![BackendKind::Memory]);
    }

    #[test]
    fn registry_and_lock_follow_coord_and_the_rest_is_memory() {
        let c = Composition::from_names(&names(&[("coord", "etcd"), ("cache", "redis")])).unwrap();
        assert_eq!(c.kind(Role::Registry), BackendKind::Etcd);
        assert_eq!(c.kind(Role::Lock), BackendKind::Etcd);
        assert_eq!(c.kind(Role::Cache), BackendKind::Redis);
        assert_eq!(c.kind(Role::Once), BackendKind::Memory);
        assert_eq!(
            c.backends(),
            vec![BackendKind::Etcd, BackendKind::Redis, BackendKind::Memory]
        );
        let own_lock =
            Composition::from_names(&names(&[("coord", "etcd"), ("lock", "redis")])).unwrap();
        assert_eq!(own_lock.kind(Role::Lock), BackendKind::Redis);
    }

    #[test]
    fn unknown_names_and_missing_capabilities_name_the_role_and_the_backend() {
        let e = Composition::from_names(&names(&[("cache", "mongo")])).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidConfig);
        assert!(
            e.to_string().contains("backends.cache") && e.to_string().contains("mongo"),
            "{e}"
        );

        let e = Composition::from_names(&names(&[("search", "redis")])).unwrap_err();
        assert!(e.to_string().contains("backends.search"), "{e}");

        let e = Composition::from_names(&names(&[("mq", "redis")])).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        assert!(
            e.to_string().contains("backends.mq") && e.to_string().contains("redis"),
            "{e}"
        );

        // MySQL has a config center but no registry: as coord, registry must be stated.
        let e = Composition::from_names(&names(&[("coord", "mysql")])).unwrap_err();
        assert!(e.to_string().contains("backends.registry"), "{e}");
        Composition::from_names(&names(&[("coord", "mysql"), ("registry", "redis")])).unwrap();
    }

    #[test]
    fn the_fallback_replaces_every_role_of_the_unreachable_backend() {
        let c = Composition::from_names(&names(&[
            ("coord", "etcd"),
            ("uid", "etcd"),
            ("cache", "redis"),
        ]))
        .unwrap()
        .replacing(BackendKind::Etcd, BackendKind::Memory);
        assert_eq!(c.kind(Role::Coord), BackendKind::Memory);
        assert_eq!(c.kind(Role::Uid), BackendKind::Memory);
        assert_eq!(c.kind(Role::Cache), BackendKind::Redis);
    }
}
