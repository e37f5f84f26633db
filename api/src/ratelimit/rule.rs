//! Rate-limit rules per resource, fixed or hot-reloaded from the config center.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::FailurePolicy;
use crate::config::ConfigManager;
use crate::error::{Error, ErrorKind, Result};

/// `rate` requests per `period`, with bursts of up to `burst` requests.
///
/// In JSON: `{"rate": 100, "period": "1s", "burst": 200}` (`burst` defaults
/// to `rate`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Requests allowed per period at the steady rate (≥ 1).
    pub rate: u64,
    /// The period of `rate`.
    #[serde(with = "humantime_serde")]
    pub period: Duration,
    /// Largest number of requests allowed at once; `None` means `rate`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u64>,
}

impl Rule {
    /// `rate` requests per `period`, burst equal to `rate`.
    pub fn new(rate: u64, period: Duration) -> Rule {
        Rule {
            rate,
            period,
            burst: None,
        }
    }

    /// `rate` requests per second.
    pub fn per_second(rate: u64) -> Rule {
        Rule::new(rate, Duration::from_secs(1))
    }

    /// `rate` requests per minute.
    pub fn per_minute(rate: u64) -> Rule {
        Rule::new(rate, Duration::from_secs(60))
    }

    /// Sets the burst size.
    #[must_use]
    pub fn with_burst(mut self, burst: u64) -> Rule {
        self.burst = Some(burst);
        self
    }

    /// The effective burst size.
    pub fn burst(&self) -> u64 {
        self.burst.unwrap_or(self.rate)
    }

    /// Checks that rate and burst are at least 1 and the period is positive.
    pub fn validate(&self) -> Result<()> {
        if self.rate == 0 {
            return Err(Error::new(
                ErrorKind::InvalidConfig,
                "rule rate must be at least 1",
            ));
        }
        if self.period.is_zero() {
            return Err(Error::new(
                ErrorKind::InvalidConfig,
                "rule period must be positive",
            ));
        }
        if self.burst() == 0 {
            return Err(Error::new(
                ErrorKind::InvalidConfig,
                "rule burst must be at least 1",
            ));
        }
        Ok(())
    }
}

/// The `ratelimit` component's configuration, as stored under
/// `/config/{env}/{service}/ratelimit`.
///
/// ```
/// use im_infra::ratelimit::{FailurePolicy, LimiterSettings};
///
/// let cfg: LimiterSettings = serde_json::from_str(r#"{
///     "rules": { "send_message": { "rate": 10, "period": "1s", "burst": 20 } },
///     "default_rule": { "rate": 100, "period": "1m" },
///     "failure_policy": "local"
/// }"#).unwrap();
/// cfg.validate().unwrap();
/// assert_eq!(cfg.failure_policy, FailurePolicy::Local);
/// assert_eq!(cfg.rule("send_message").unwrap().burst(), 20);
/// assert_eq!(cfg.rule("anything").unwrap().rate, 100);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimiterSettings {
    /// Rules by resource name.
    pub rules: HashMap<String, Rule>,
    /// Rule of resources without their own; `None` makes them an error.
    pub default_rule: Option<Rule>,
    /// What a distributed limiter does while its backend is unreachable.
    pub failure_policy: FailurePolicy,
}

impl LimiterSettings {
    /// A configuration with one rule.
    pub fn with_rule(resource: impl Into<String>, rule: Rule) -> Self {
        let mut cfg = LimiterSettings::default();
        cfg.rules.insert(resource.into(), rule);
        cfg
    }

    /// The rule of `resource`.
    pub fn rule(&self, resource: &str) -> Option<Rule> {
        self.rules.get(resource).copied().or(self.default_rule)
    }

    /// Validates every rule and resource name.
    pub fn validate(&self) -> Result<()> {
        for (name, rule) in &self.rules {
            crate::validate::key(name)?;
            rule.validate().map_err(|e| {
                Error::new(
                    ErrorKind::InvalidConfig,
                    format!("rule of resource {name:?}: {}", e.message()),
                )
            })?;
        }
        if let Some(rule) = &self.default_rule {
            rule.validate()?;
        }
        Ok(())
    }
}

/// Where a limiter reads its rules: a fixed set, or a [`ConfigManager`] that
/// hot-reloads them from the config center.
#[derive(Clone)]
pub enum Rules {
    /// Rules that never change.
    Fixed(Arc<LimiterSettings>),
    /// Rules reloaded whenever the configuration changes.
    Managed(ConfigManager<LimiterSettings>),
}

impl std::fmt::Debug for Rules {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rules::Fixed(c) => f.debug_tuple("Fixed").field(c).finish(),
            Rules::Managed(m) => f.debug_tuple("Managed").field(&m.path()).finish(),
        }
    }
}

impl Rules {
    /// Fixed rules (validated).
    pub fn fixed(config: LimiterSettings) -> Result<Rules> {
        config.validate()?;
        Ok(Rules::Fixed(Arc::new(config)))
    }

    /// One fixed rule for one resource.
    pub fn single(resource: &str, rule: Rule) -> Result<Rules> {
        Rules::fixed(LimiterSettings::with_rule(resource, rule))
    }

    /// The current configuration.
    pub fn current(&self) -> Arc<LimiterSettings> {
        match self {
            Rules::Fixed(c) => c.clone(),
            Rules::Managed(m) => m.current(),
        }
    }

    /// The rule of `resource`, or a `NotFound` error naming it.
    pub fn lookup(&self, resource: &str) -> Result<Rule> {
        let found = match self {
            Rules::Fixed(c) => c.rule(resource),
            Rules::Managed(m) => m.with_current(|c| c.rule(resource)),
        };
        found.ok_or_else(|| no_rule(resource))
    }

    /// The failure policy in force.
    pub fn failure_policy(&self) -> FailurePolicy {
        match self {
            Rules::Fixed(c) => c.failure_policy,
            Rules::Managed(m) => m.with_current(|c| c.failure_policy),
        }
    }
}

/// The error of a resource without a rule when there is no default rule.
pub(crate) fn no_rule(resource: &str) -> Error {
    Error::new(
        ErrorKind::NotFound,
        format!("no rate-limit rule for resource {resource:?} and no default rule"),
    )
}

impl From<Rule> for LimiterSettings {
    fn from(rule: Rule) -> Self {
        LimiterSettings {
            default_rule: Some(rule),
            ..LimiterSettings::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_rules_are_rejected() {
        assert!(Rule::per_second(0).validate().is_err());
        assert!(Rule::new(1, Duration::ZERO).validate().is_err());
        assert!(Rule::per_second(5).with_burst(0).validate().is_err());
        assert!(Rules::single("", Rule::per_second(1)).is_err());
        let bad: std::result::Result<LimiterSettings, _> =
            serde_json::from_str(r#"{"rules":{"a":{"rate":1}}}"#);
        assert!(bad.is_err(), "period is required");
    }

    #[test]
    fn lookup_falls_back_to_default_or_fails() {
        let rules = Rules::single("a", Rule::per_second(1)).unwrap();
        assert_eq!(rules.lookup("a").unwrap().rate, 1);
        assert_eq!(rules.lookup("b").unwrap_err().kind(), ErrorKind::NotFound);
        let rules = Rules::fixed(Rule::per_minute(3).into()).unwrap();
        assert_eq!(rules.lookup("b").unwrap().rate, 3);
    }
}
