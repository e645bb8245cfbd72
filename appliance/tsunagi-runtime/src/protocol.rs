//! The child → supervisor report protocol.
//!
//! One JSON object per line over the inherited stream socket. The child sends
//! [`ChildMessage`]s; the supervisor sends nothing yet, and the child treats end-of-file as
//! "the supervisor is gone" and stops. Lines longer than [`MAX_LINE`] are a protocol error:
//! the supervisor drops the connection and the child is treated as crashed.

use serde::{Deserialize, Serialize};

use crate::status::Health;

/// The longest line either side accepts, in bytes.
pub const MAX_LINE: usize = 16 * 1024;

/// The longest summary or error text the supervisor keeps, in characters.
pub const MAX_TEXT: usize = 512;

/// A report from a child.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
pub enum ChildMessage {
    /// The service finished starting and does its job.
    Ready {},
    /// Current health and a one-line summary (counts and states, never patient data).
    Status { health: Health, summary: String },
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
    fn one_line_folds_and_bounds() {
        assert_eq!(one_line("a\nb\tc "), "a b c");
        assert_eq!(one_line(&"x".repeat(2000)).len(), MAX_TEXT);
    }
}
