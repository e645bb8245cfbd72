//! The child → supervisor report protocol (`tsunagi_runtime::protocol`): one JSON line, as
//! the supervisor reads it (`ChildMessage`), then cleaned as it keeps it (`clean_metrics`,
//! `one_line`). Never panics; what is kept is bounded; a message written again is one line
//! that parses.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tsunagi_runtime::protocol::{
    ChildMessage, MAX_METRICS, MAX_TEXT, clean_metrics, one_line, valid_metric_name,
};

fuzz_target!(|data: &[u8]| {
    let Ok(message) = serde_json::from_slice::<ChildMessage>(data) else {
        return;
    };
    let line = message.to_line();
    assert!(line.ends_with('\n') && line.matches('\n').count() == 1);
    assert!(serde_json::from_str::<ChildMessage>(&line).is_ok());
    match message {
        ChildMessage::Status {
            summary, metrics, ..
        } => {
            let kept = one_line(&summary);
            assert!(kept.chars().count() <= MAX_TEXT && !kept.contains(['\n', '\r']));
            let metrics = clean_metrics(metrics);
            assert!(metrics.len() <= MAX_METRICS);
            assert!(
                metrics
                    .iter()
                    .all(|(name, value)| valid_metric_name(name) && value.is_finite())
            );
        }
        ChildMessage::Error { message } => {
            let kept = one_line(&message);
            assert!(kept.chars().count() <= MAX_TEXT && !kept.contains(['\n', '\r']));
        }
        ChildMessage::Ready {} => {}
    }
});
