//! Logging: `tracing` to stderr (journald collects it), filter from the config or `RUST_LOG`.

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, reload};

/// Errors while setting up logging.
#[derive(Debug, thiserror::Error)]
pub enum LoggingError {
    #[error("invalid log filter {filter:?}")]
    Filter {
        filter: String,
        #[source]
        source: tracing_subscriber::filter::ParseError,
    },
    #[error("cannot change the log filter")]
    Reload(#[source] reload::Error),
    #[error("a logger is already installed")]
    AlreadyInstalled,
}

/// Changes the filter of the installed logger.
#[derive(Debug, Clone)]
pub struct LogHandle {
    handle: reload::Handle<EnvFilter, Registry>,
    from_env: bool,
}

impl LogHandle {
    /// Applies a new filter from the config (unless `RUST_LOG` overrides it).
    pub fn set_filter(&self, filter: &str) -> Result<(), LoggingError> {
        if self.from_env {
            return Ok(());
        }
        let parsed = parse(filter)?;
        self.handle.reload(parsed).map_err(LoggingError::Reload)
    }
}

fn parse(filter: &str) -> Result<EnvFilter, LoggingError> {
    EnvFilter::try_new(filter).map_err(|source| LoggingError::Filter {
        filter: filter.to_owned(),
        source,
    })
}

/// Checks a filter string without installing it.
pub fn check_filter(filter: &str) -> Result<(), LoggingError> {
    parse(filter).map(|_| ())
}

/// Installs the global logger: `RUST_LOG` if set, else `filter`.
pub fn init(filter: &str) -> Result<LogHandle, LoggingError> {
    let env = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty());
    let from_env = env.is_some();
    let parsed = parse(env.as_deref().unwrap_or(filter))?;
    let (layer, handle) = reload::Layer::new(parsed);
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::registry()
        .with(layer)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(ansi),
        )
        .try_init()
        .map_err(|_| LoggingError::AlreadyInstalled)?;
    Ok(LogHandle { handle, from_env })
}
