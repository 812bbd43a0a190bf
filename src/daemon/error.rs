//! [`DaemonError`], the error of every daemon operation.
//!
//! Invariant: each error names the device, file or option concerned, and says what to do
//! where there is something to do. An error that wraps another keeps it as its source, so
//! printing the chain (`{:#}` through `anyhow` at the CLI, or [`chain`]) gives the same text
//! as the message and its cause joined by ": ".

use crate::metadata::overwrite::Refusal;
use crate::metadata::MetadataError;
use std::error::Error;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The options or devices were refused, before anything was written. The message names
    /// the option or device and says what to do.
    #[error("{0}")]
    Refused(String),

    /// An I/O error whose message names its device or file itself.
    #[error(transparent)]
    Io(#[from] std::io::Error),

    /// Opening, reading or formatting the metadata failed (the error names the device).
    #[error(transparent)]
    Metadata(#[from] MetadataError),

    /// A record, request or configuration could not be encoded.
    #[error(transparent)]
    Json(#[from] serde_json::Error),

    /// Formatting would overwrite something the options do not allow overwriting (boxed:
    /// the largest of the errors, and the rarest).
    #[error(transparent)]
    Overwrite(Box<Refusal>),

    /// The engine could not start or shut down cleanly.
    #[error(transparent)]
    Engine(#[from] crate::engine::EngineError),

    /// The survival copy a dead daemon left cannot be used.
    #[error(transparent)]
    Survival(#[from] crate::metadata::SurvivalError),

    /// The ublk device could not be created or served.
    #[error(transparent)]
    Ublk(#[from] crate::ublk::ServeError),

    /// A daemon (started in the background, or answering on its control socket) reported
    /// a failure or did not behave as the protocol requires.
    #[error("{0}")]
    Daemon(String),

    /// `source`, with `what` saying which device, file or request it concerns.
    #[error("{what}")]
    Context {
        what: String,
        #[source]
        source: Box<dyn Error + Send + Sync + 'static>,
    },
}

impl From<Refusal> for DaemonError {
    fn from(r: Refusal) -> DaemonError {
        DaemonError::Overwrite(Box::new(r))
    }
}

/// The daemon's result type.
pub type Result<T, E = DaemonError> = std::result::Result<T, E>;

/// Wraps any error as [`DaemonError::Context`], naming what it concerns.
pub(crate) trait Named<T> {
    fn named(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T, E: Error + Send + Sync + 'static> Named<T> for std::result::Result<T, E> {
    fn named(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| DaemonError::Context {
            what: what(),
            source: Box::new(e),
        })
    }
}

/// Returns [`DaemonError::Refused`] with a formatted message (like `anyhow::bail!`).
macro_rules! refuse {
    ($($arg:tt)*) => {
        return Err($crate::daemon::DaemonError::Refused(format!($($arg)*)))
    };
}
pub(crate) use refuse;

/// `e` and its sources joined by ": ", the way the CLI prints an error.
pub fn chain(e: &dyn Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chain_joins_the_sources() {
        let io = std::io::Error::other("disk on fire");
        let e: Result<()> = Err(io).named(|| "--dest /d".into());
        let e = e.expect_err("error");
        assert_eq!(chain(&e), "--dest /d: disk on fire");
    }
}
