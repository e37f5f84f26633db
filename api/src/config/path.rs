//! The configuration path convention `/config/{env}/{service}/{component}`.

use crate::error::{Error, ErrorKind, Result};

/// Environment variable naming the deployment environment.
pub const APP_ENV_VAR: &str = "APP_ENV";
/// Environment used when `APP_ENV` is unset or empty.
pub const DEFAULT_ENV: &str = "dev";

/// The deployment environment: `APP_ENV`, or `dev` when unset or empty.
///
/// ```
/// let env = im_infra::config::app_env();
/// assert!(!env.is_empty());
/// ```
pub fn app_env() -> String {
    match std::env::var(APP_ENV_VAR) {
        Ok(v) if !v.trim().is_empty() => v.trim().to_owned(),
        _ => DEFAULT_ENV.to_owned(),
    }
}

/// `/config/{env}/{service}/{component}` with `env` from [`app_env`].
///
/// ```
/// let path = im_infra::config::config_path("im-logic", "ratelimit").unwrap();
/// assert!(path.starts_with("/config/") && path.ends_with("/im-logic/ratelimit"));
/// ```
pub fn config_path(service: &str, component: &str) -> Result<String> {
    config_path_in(&app_env(), service, component)
}

/// `/config/{env}/{service}/{component}`; every segment must be a valid
/// name (non-empty, no `/`, no whitespace).
///
/// ```
/// use im_infra::config::config_path_in;
/// assert_eq!(config_path_in("prod", "im-gateway", "cache").unwrap(), "/config/prod/im-gateway/cache");
/// assert!(config_path_in("prod", "a/b", "cache").is_err());
/// ```
pub fn config_path_in(env: &str, service: &str, component: &str) -> Result<String> {
    for (what, v) in [("env", env), ("service", service), ("component", component)] {
        crate::validate::name(what, v)
            .map_err(|e| Error::new(ErrorKind::InvalidConfig, e.message().to_owned()))?;
    }
    Ok(format!("/config/{env}/{service}/{component}"))
}
