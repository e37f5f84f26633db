//! Logging (the seed's `clog`): a bootstrap subscriber installed before
//! anything connects, reloaded from `/config/{env}/{service}/clog`.
//!
//! The subscriber is the process's global one, installed once: a filter
//! and an output, each behind a reload handle. A reload swaps them under a
//! lock, so an event is written by the old output or the new one, never
//! lost; file output is written synchronously. Every line carries the
//! caller's file and line.
//!
//! Level, filters, stdout and the file change at run time. The format
//! (text or JSON) is fixed by the first `clog` applied at start: a JSON
//! output cannot format spans opened before it, so a later change of
//! format is logged and waits for the next restart.
//!
//! ```yaml
//! clog:
//!   level: info
//!   filters: { im_infra_etcd: debug, hyper: warn }
//!   format: json          # or text
//!   stdout: true
//!   file: { directory: /var/log/im-logic, prefix: im-logic, rotation: daily, max_files: 7 }
//! ```

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::OnceLock;

use im_infra::{Error, ErrorKind, Result};
use serde::{Deserialize, Serialize};
use tracing_subscriber::fmt::writer::{BoxMakeWriter, MakeWriterExt};
use tracing_subscriber::layer::{Layered, SubscriberExt};
use tracing_subscriber::{reload, EnvFilter, Layer, Registry};

/// The output format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per event.
    Json,
}

/// When the log file rolls over.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogRotation {
    /// One file, never rolled.
    Never,
    /// A new file every hour.
    Hourly,
    /// A new file every day.
    #[default]
    Daily,
}

/// A log file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogFile {
    /// The directory of the files.
    pub directory: PathBuf,
    /// The file name's start (`im-logic` → `im-logic.2026-11-30.log`).
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// When a new file starts.
    #[serde(default)]
    pub rotation: LogRotation,
    /// How many rolled files to keep; all when unset.
    #[serde(default)]
    pub max_files: Option<usize>,
}

fn default_prefix() -> String {
    "service".into()
}

/// The `clog` settings. Every field can change at run time.
///
/// ```
/// let s: im_infra_runtime::LogSettings =
///     serde_json::from_str(r#"{"level": "debug", "filters": {"hyper": "warn"}}"#).unwrap();
/// s.check().unwrap();
/// assert_eq!(s.directives(), "debug,hyper=warn");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogSettings {
    /// The level of everything without a filter of its own
    /// (`error`, `warn`, `info`, `debug`, `trace`, `off`).
    pub level: String,
    /// Levels by module or crate (`im_infra_etcd: debug`).
    pub filters: BTreeMap<String, String>,
    /// Text or JSON.
    pub format: LogFormat,
    /// Whether to write to stdout.
    pub stdout: bool,
    /// A file to write to, with rotation.
    pub file: Option<LogFile>,
}

impl Default for LogSettings {
    fn default() -> Self {
        LogSettings {
            level: "info".into(),
            filters: BTreeMap::new(),
            format: LogFormat::Text,
            stdout: true,
            file: None,
        }
    }
}

impl LogSettings {
    /// The filter directives (`info,im_infra_etcd=debug`).
    pub fn directives(&self) -> String {
        let mut out = self.level.trim().to_owned();
        for (module, level) in &self.filters {
            out.push_str(&format!(",{}={}", module.trim(), level.trim()));
        }
        out
    }

    /// Checks the level, every filter, and that the directives form a
    /// filter.
    pub fn check(&self) -> Result<()> {
        self.check_fields()?;
        EnvFilter::try_new(self.directives())
            .map(drop)
            .map_err(|e| Error::new(ErrorKind::InvalidConfig, format!("clog: {e}")))
    }

    fn check_fields(&self) -> Result<()> {
        let bad = |what: String| Error::new(ErrorKind::InvalidConfig, format!("clog: {what}"));
        if self
            .level
            .trim()
            .parse::<tracing_subscriber::filter::LevelFilter>()
            .is_err()
        {
            return Err(bad(format!("level {:?} is not a level", self.level)));
        }
        for (module, level) in &self.filters {
            if module.trim().is_empty() || module.contains([',', '=']) {
                return Err(bad(format!(
                    "filter module {module:?} is not a module path"
                )));
            }
            if level
                .trim()
                .parse::<tracing_subscriber::filter::LevelFilter>()
                .is_err()
            {
                return Err(bad(format!("filter {module:?}: {level:?} is not a level")));
            }
        }
        if !self.stdout && self.file.is_none() {
            return Err(bad("no output: stdout is off and no file is set".into()));
        }
        Ok(())
    }

    fn filter(&self) -> Result<EnvFilter> {
        self.check_fields()?;
        EnvFilter::try_new(self.directives())
            .map_err(|e| Error::new(ErrorKind::InvalidConfig, format!("clog: {e}")))
    }
}

impl im_infra::settings::Settings for LogSettings {
    const COMPONENT: &'static str = "clog";
    fn validate(&self) -> Result<()> {
        self.check()
    }
}

type Base = Layered<reload::Layer<EnvFilter, Registry>, Registry>;
type Output = Box<dyn Layer<Base> + Send + Sync>;

struct Handles {
    filter: reload::Handle<EnvFilter, Registry>,
    output: reload::Handle<Output, Base>,
}

static INSTALLED: OnceLock<Option<Handles>> = OnceLock::new();

/// The format of the first settings applied; later ones keep it.
static FORMAT: OnceLock<LogFormat> = OnceLock::new();

/// One apply at a time: an output and a filter always come from the same
/// settings.
static APPLYING: parking_lot::Mutex<()> = parking_lot::Mutex::new(());

fn output(settings: &LogSettings, format: LogFormat) -> Result<Output> {
    let file = match &settings.file {
        Some(f) => {
            let rotation = match f.rotation {
                LogRotation::Never => tracing_appender::rolling::Rotation::NEVER,
                LogRotation::Hourly => tracing_appender::rolling::Rotation::HOURLY,
                LogRotation::Daily => tracing_appender::rolling::Rotation::DAILY,
            };
            let mut builder = tracing_appender::rolling::RollingFileAppender::builder()
                .rotation(rotation)
                .filename_prefix(&f.prefix)
                .filename_suffix("log");
            if let Some(n) = f.max_files {
                builder = builder.max_log_files(n);
            }
            let appender = builder.build(&f.directory).map_err(|e| {
                Error::new(
                    ErrorKind::InvalidConfig,
                    format!("clog: log file in {}: {e}", f.directory.display()),
                )
            })?;
            Some(appender)
        }
        None => None,
    };
    let ansi = settings.stdout && file.is_none() && std::io::stdout().is_terminal();
    let writer = match (settings.stdout, file) {
        (true, Some(f)) => BoxMakeWriter::new(std::io::stdout.and(f)),
        (false, Some(f)) => BoxMakeWriter::new(f),
        (_, None) => BoxMakeWriter::new(std::io::stdout),
    };
    let layer = tracing_subscriber::fmt::layer()
        .with_file(true)
        .with_line_number(true)
        .with_target(true)
        .with_ansi(ansi)
        .with_writer(writer);
    Ok(match format {
        LogFormat::Text => Box::new(layer),
        LogFormat::Json => Box::new(layer.json()),
    })
}

/// Installs the bootstrap subscriber (text to stdout, level from `RUST_LOG`
/// or `info`) as the process's global one, once, with records of the `log`
/// crate forwarded to it. `false` when another
/// subscriber was installed first: that one stays, and reloads do nothing.
pub fn bootstrap() -> bool {
    INSTALLED
        .get_or_init(|| {
            let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
            let (filter, filter_handle) = reload::Layer::new(filter);
            let first = output(&LogSettings::default(), LogFormat::Text)
                .expect("stdout text needs no set-up");
            let (output, output_handle) = reload::Layer::new(first);
            let subscriber = Registry::default().with(filter).with(output);
            match tracing::subscriber::set_global_default(subscriber) {
                Ok(()) => {
                    // `log` records too (redis, rustls, ...); a logger set
                    // before stays.
                    let _ = tracing_log::LogTracer::init();
                    Some(Handles {
                        filter: filter_handle,
                        output: output_handle,
                    })
                }
                Err(_) => {
                    tracing::warn!("a global subscriber was installed before the runtime's; log settings from clog will not apply");
                    None
                }
            }
        })
        .is_some()
}

/// Applies `settings` to the runtime's subscriber. `Ok(false)` when the
/// runtime's subscriber is not the process's (see [`bootstrap`]).
pub fn apply(settings: &LogSettings) -> Result<bool> {
    let Some(Some(handles)) = INSTALLED.get() else {
        return Ok(false);
    };
    let _one_at_a_time = APPLYING.lock();
    let format = FORMAT.get().copied().unwrap_or(settings.format);
    if format != settings.format {
        tracing::warn!(in_force = ?format, asked = ?settings.format,
            "clog: the format changes at the next restart; level, filters and outputs apply now");
    }
    let filter = settings.filter()?;
    let output = output(settings, format)?;
    let failed = |e: reload::Error| Error::new(ErrorKind::Internal, format!("clog: reload: {e}"));
    // The output first: events passing the new filter must meet the new
    // output (a file, JSON) rather than the old one.
    handles.output.reload(output).map_err(failed)?;
    handles.filter.reload(filter).map_err(failed)?;
    FORMAT.get_or_init(|| format);
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_and_filters_are_checked() {
        LogSettings::default().check().unwrap();
        let bad_level = LogSettings {
            level: "loud".into(),
            ..LogSettings::default()
        };
        assert!(bad_level.check().unwrap_err().to_string().contains("loud"));
        let mut bad_filter = LogSettings::default();
        bad_filter.filters.insert("hyper".into(), "chatty".into());
        assert!(bad_filter
            .check()
            .unwrap_err()
            .to_string()
            .contains("hyper"));
        let mut bad_module = LogSettings::default();
        bad_module.filters.insert("a=b".into(), "info".into());
        assert!(bad_module.check().is_err());
        let mut not_a_directive = LogSettings::default();
        not_a_directive.filters.insert("*".into(), "debug".into());
        assert!(
            not_a_directive.check().is_err(),
            "EnvFilter refuses it, so check does"
        );
        let silent = LogSettings {
            stdout: false,
            ..LogSettings::default()
        };
        assert!(silent
            .check()
            .unwrap_err()
            .to_string()
            .contains("no output"));
    }

    #[test]
    fn settings_read_from_yaml_with_defaults_for_what_is_missing() {
        let s: LogSettings = serde_yaml_ng::from_str(
            "level: warn\nformat: json\nfile: { directory: /tmp/x, rotation: hourly }\n",
        )
        .unwrap();
        assert_eq!(s.format, LogFormat::Json);
        assert!(s.stdout);
        let f = s.file.unwrap();
        assert_eq!(
            (f.prefix.as_str(), f.rotation, f.max_files),
            ("service", LogRotation::Hourly, None)
        );
        assert!(serde_yaml_ng::from_str::<LogSettings>("levle: warn").is_err());
    }
}
