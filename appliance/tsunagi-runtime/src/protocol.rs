//! The child → supervisor report protocol.
//!
//! One JSON object per line over the inherited stream socket. The child sends
//! [`ChildMessage`]s; the supervisor sends nothing yet, and the child treats end-of-file as
//! "the supervisor is gone" and stops. Lines longer than [`MAX_LINE`] are a protocol error:
//! the supervisor drops the connection and the child is treated as crashed.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::status::Health;

/// The longest line either side accepts, in bytes.
pub const MAX_LINE: usize = 16 * 1024;

/// The longest summary or error text the supervisor keeps, in characters.
pub const MAX_TEXT: usize = 512;

/// The most metrics one service may report.
pub const MAX_METRICS: usize = 32;

/// A report from a child.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
pub enum ChildMessage {
    /// The service finished starting and does its job.
    Ready {},
    /// Current health, a one-line summary (counts and states, never patient data) and the
    /// service's own metrics: names as in [`valid_metric_name`]; a name ending in `_total`
    /// is a counter, any other a gauge. Exported as `tsunagi_SERVICE_NAME`.
    Status {
        health: Health,
        summary: String,
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        metrics: BTreeMap<String, f64>,
    },
    /// The service is about to exit because of this error (the whole chain, one line).
    Error { message: String },
}

impl ChildMessage {
    /// Encodes the message as one line, newline included.
    pub fn to_line(&self) -> String {
        // Serializing a plain enum of strings to JSON cannot fail.
        let mut line = serde_json::to_string(self).unwrap_or_else(|_| String::from("{}"));
        line.push('\n');
        line
    }
}

/// Whether `name` may be a service metric: `[a-z][a-z0-9_]*`, at most 64 characters.
pub fn valid_metric_name(name: &str) -> bool {
    name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// Keeps the valid, finite metrics, at most [`MAX_METRICS`].
pub fn clean_metrics(metrics: BTreeMap<String, f64>) -> BTreeMap<String, f64> {
    metrics
        .into_iter()
        .filter(|(name, value)| valid_metric_name(name) && value.is_finite())
        .take(MAX_METRICS)
        .collect()
}

/// Cuts `text` to [`MAX_TEXT`] characters and folds it onto one line.
pub fn one_line(text: &str) -> String {
    let folded: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(MAX_TEXT)
        .collect();
    folded.trim().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_as_lines() {
        for msg in [
            ChildMessage::Ready {},
            ChildMessage::Status {
                health: Health::Degraded,
                summary: "queue 3".into(),
                metrics: BTreeMap::from([("queue_length".to_owned(), 3.0)]),
            },
            ChildMessage::Error {
                message: "disk full".into(),
            },
        ] {
            let line = msg.to_line();
            assert!(line.ends_with('\n'));
            assert_eq!(line.matches('\n').count(), 1);
            let back: ChildMessage = serde_json::from_str(line.trim_end()).unwrap();
            assert_eq!(back, msg);
        }
    }

    #[test]
    fn unknown_message_fields_are_rejected() {
        assert!(serde_json::from_str::<ChildMessage>(r#"{"type":"ready","x":1}"#).is_err());
        assert!(serde_json::from_str::<ChildMessage>(r#"{"type":"launch"}"#).is_err());
    }

    #[test]
    fn metric_names_and_values_are_checked() {
        let metrics = BTreeMap::from([
            ("ok_total".to_owned(), 1.0),
            ("Bad".to_owned(), 1.0),
            ("with space".to_owned(), 1.0),
            ("nan".to_owned(), f64::NAN),
            ("x".repeat(65), 1.0),
        ]);
        assert_eq!(
            clean_metrics(metrics).keys().collect::<Vec<_>>(),
            ["ok_total"]
        );
        let many = (0..100).map(|i| (format!("m{i}"), 1.0)).collect();
        assert_eq!(clean_metrics(many).len(), MAX_METRICS);
    }

    #[test]
    fn one_line_folds_and_bounds() {
        assert_eq!(one_line("a\nb\tc "), "a b c");
        assert_eq!(one_line(&"x".repeat(2000)).len(), MAX_TEXT);
    }
}
