//! The stop's semantics and the watcher, against a scripted change feed.
#![expect(
    clippy::disallowed_methods,
    reason = "the watcher runs on a plain thread, and so do these tests of it"
)]

use std::sync::{Arc, Mutex};

use consent::client::{Category, Changes, Decided, GateError, Release};

use super::*;

#[test]
fn only_changed_patients_stop_and_only_once_confirmed_and_while_confirmations_are_fresh() {
    let (watch, stop) = channel(Duration::from_millis(200));
    assert!(stop.stopped("0001"), "nothing confirmed yet");
    watch.confirm(Vec::new(), Instant::now());
    assert!(!stop.stopped("0001"));
    watch.confirm(vec!["0002".to_owned()], Instant::now());
    assert!(!stop.stopped("0001"));
    assert!(stop.stopped("0002"));
    // A change is never forgotten within the batch.
    watch.confirm(Vec::new(), Instant::now());
    assert!(stop.stopped("0002"));
    // A confirmation older than the allowed age stops everyone (fail closed).
    std::thread::sleep(Duration::from_millis(250));
    assert!(stop.stopped("0001"));
    watch.confirm(Vec::new(), Instant::now());
    assert!(!stop.stopped("0001"));
    watch.stop_all();
    assert!(stop.stopped("0001"));
    assert!(!Stop::never().stopped("0001"));
}

#[tokio::test(flavor = "current_thread")]
async fn until_stopped_resolves_on_a_change_of_that_patient_or_on_a_stale_confirmation() {
    let (watch, stop) = channel(Duration::from_millis(300));
    watch.confirm(Vec::new(), Instant::now());
    assert!(stop.first_confirmation().await);
    let waiting = tokio::spawn({
        let stop = stop.clone();
        async move { stop.until_stopped("0001").await }
    });
    // Other patients' changes and fresh confirmations do not stop 0001.
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        watch.confirm(vec!["0002".to_owned()], Instant::now());
    }
    assert!(!waiting.is_finished());
    watch.confirm(vec!["0001".to_owned()], Instant::now());
    tokio::time::timeout(Duration::from_millis(100), waiting)
        .await
        .expect("stopped at once")
        .unwrap();
    // No confirmation for longer than the allowed age: stopped by the deadline.
    let at = Instant::now();
    watch.confirm(Vec::new(), at);
    tokio::time::timeout(Duration::from_secs(2), stop.until_stopped("0003"))
        .await
        .expect("stale");
    let waited = at.elapsed();
    assert!(
        waited >= Duration::from_millis(300) && waited < Duration::from_millis(1500),
        "{waited:?}"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn a_feed_that_cannot_be_read_stops_everything_before_anything_is_sent() {
    let (watch, stop) = channel(MAX_AGE);
    watch.stop_all();
    assert!(!stop.first_confirmation().await);
    assert!(Stop::never().first_confirmation().await);
}

/// A change feed another thread writes to (as the desk does), failing on demand.
#[derive(Debug, Clone, Default)]
struct Feed {
    log: Arc<Mutex<Vec<String>>>,
    broken: Arc<Mutex<bool>>,
    stale: Arc<Mutex<bool>>,
    reads: Arc<Mutex<Vec<i64>>>,
}

impl Gate for Feed {
    fn decide(&mut self, _: &str, _: Category) -> Result<Decided, GateError> {
        panic!("the watcher never decides (no audit rows while sending)")
    }

    fn released(&mut self, _: &Release) -> Result<(), GateError> {
        panic!("the watcher records no releases")
    }

    fn changes(&mut self, since: i64) -> Result<Changes, GateError> {
        self.reads.lock().unwrap().push(since);
        if *self.broken.lock().unwrap() {
            return Err(GateError::Io(std::io::Error::other("gone")));
        }
        let log = self.log.lock().unwrap();
        let from = usize::try_from(since).unwrap().min(log.len());
        Ok(Changes {
            seq: i64::try_from(log.len()).unwrap(),
            patients: log[from..].to_vec(),
            fresh: !*self.stale.lock().unwrap(),
        })
    }
}

#[test]
fn the_watcher_reports_a_withdrawal_within_one_period_and_reads_on_from_where_it_was() {
    let feed = Feed::default();
    feed.log.lock().unwrap().push("0007".to_owned());
    let (watch, stop) = channel(MAX_AGE);
    let (done, done_rx) = mpsc::channel();
    let watcher = std::thread::spawn({
        let mut feed = feed.clone();
        move || watch_feed_every(&mut feed, 1, &watch, &done_rx, Duration::from_millis(50))
    });
    while stop.stopped("0001") {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        !stop.stopped("0007"),
        "changed before the round's decisions"
    );
    std::thread::sleep(Duration::from_millis(120));
    let recorded = Instant::now();
    feed.log.lock().unwrap().push("0001".to_owned());
    while !stop.stopped("0001") {
        std::thread::sleep(Duration::from_millis(2));
    }
    let noticed = recorded.elapsed();
    assert!(noticed < Duration::from_millis(500), "{noticed:?}");
    assert!(!stop.stopped("0002"));
    done.send(()).unwrap();
    assert_eq!(watcher.join().unwrap(), 2);
    let reads = feed.reads.lock().unwrap().clone();
    assert_eq!(reads[0], 1);
    assert!(reads.len() >= 3, "{reads:?}");
    assert!(reads.windows(2).all(|w| w[0] <= w[1]), "{reads:?}");
}

#[test]
fn a_broken_feed_stops_everything_and_ends_the_watch() {
    let feed = Feed::default();
    let (watch, stop) = channel(MAX_AGE);
    let (_done, done_rx) = mpsc::channel();
    let watcher = std::thread::spawn({
        let mut feed = feed.clone();
        move || watch_feed_every(&mut feed, 0, &watch, &done_rx, Duration::from_millis(20))
    });
    while stop.stopped("0001") {
        std::thread::sleep(Duration::from_millis(5));
    }
    *feed.broken.lock().unwrap() = true;
    assert_eq!(watcher.join().unwrap(), 0);
    assert!(stop.stopped("0001"));
}

#[test]
fn a_cache_gone_stale_while_sending_stops_everything() {
    let feed = Feed::default();
    let (watch, stop) = channel(MAX_AGE);
    let (_done, done_rx) = mpsc::channel();
    let watcher = std::thread::spawn({
        let mut feed = feed.clone();
        move || watch_feed_every(&mut feed, 0, &watch, &done_rx, Duration::from_millis(20))
    });
    while stop.stopped("0001") {
        std::thread::sleep(Duration::from_millis(5));
    }
    *feed.stale.lock().unwrap() = true;
    watcher.join().unwrap();
    assert!(stop.stopped("0001"));
}
