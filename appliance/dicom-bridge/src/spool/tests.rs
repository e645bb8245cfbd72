use super::*;

/// An instance with this SOP Instance UID makes the committing thread panic.
pub(super) const PANIC_IN_COMMIT: &str = "1.2.3.999.0";
/// The rows of a round with an instance whose SOP Instance UID starts so fail.
pub(super) const FAIL_IN_ROWS: &str = "1.2.3.999.1.";

fn meta(uid: &str, patient: &str) -> Meta {
    Meta {
        sop_class: "1.2.840.10008.5.1.4.1.1.2".into(),
        sop_instance: uid.into(),
        transfer_syntax: "1.2.840.10008.1.2.1".into(),
        calling_ae: "MODALITY".into(),
        patient_id: Some(patient.into()),
        study_uid: Some("1.2.392.9".into()),
    }
}

fn files(dir: &Path, sub: &str) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir.join(sub))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// A spool whose instances each get a file of their own (the layout of large instances,
/// and of every instance before segments).
fn open_files(dir: &Path, quota: u64) -> Result<Spool, SpoolError> {
    Spool::open_with(dir, quota, 0)
}

/// A queued instance's data set (in its object file before the trailer, or in its segment).
fn data_of(q: &Queued) -> Vec<u8> {
    use std::os::unix::fs::FileExt as _;
    let mut bytes = vec![0u8; usize::try_from(q.size).unwrap()];
    File::open(&q.path)
        .unwrap()
        .read_exact_at(&mut bytes, q.offset)
        .unwrap();
    bytes
}

/// Instances 1.2.3.1 to 1.2.3.4 ("DICM one" to "DICM four"), queued: their ids.
fn receive_four(spool: &Spool) -> Vec<i64> {
    [
        ("1.2.3.1", &b"DICM one"[..]),
        ("1.2.3.2", b"DICM two"),
        ("1.2.3.3", b"DICM three"),
        ("1.2.3.4", b"DICM four"),
    ]
    .into_iter()
    .map(
        |(uid, bytes)| match receive(spool, bytes, &meta(uid, "0001")) {
            Committed::Queued(id) => id,
            other => panic!("{other:?}"),
        },
    )
    .collect()
}

fn receive(spool: &Spool, bytes: &[u8], m: &Meta) -> Committed {
    let mut inc = spool.begin().unwrap();
    for chunk in bytes.chunks(7) {
        inc.write(chunk).unwrap();
    }
    inc.commit(m, 100).unwrap()
}

#[test]
fn committed_instances_are_queued_durably_and_survive_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open_files(dir.path(), 1 << 20).unwrap();
    let Committed::Queued(id) = receive(&spool, b"DICM instance one", &meta("1.2.3.1", "0001"))
    else {
        panic!()
    };
    assert_eq!(files(dir.path(), "objects"), vec![format!("{id}.dcm")]);
    drop(spool);
    let spool = open_files(dir.path(), 1 << 20).unwrap();
    let ready = spool.ready(100, 10).unwrap();
    assert_eq!(ready.len(), 1);
    assert_eq!(data_of(&ready[0]), b"DICM instance one");
    assert_eq!(ready[0].meta, meta("1.2.3.1", "0001"));
    spool.delivered(id).unwrap();
    assert!(files(dir.path(), "objects").is_empty());
    assert_eq!(spool.counts().unwrap().delivered, 1);
}

#[test]
fn an_aborted_transfer_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open_files(dir.path(), 1 << 20).unwrap();
    let mut inc = spool.begin().unwrap();
    inc.write(b"half an instance").unwrap();
    assert_eq!(files(dir.path(), "objects").len(), 1);
    drop(inc);
    assert!(files(dir.path(), "objects").is_empty());
    assert_eq!(spool.counts().unwrap(), Counts::default());
}

#[test]
fn the_quota_answers_out_of_resources_and_frees_up_again() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open_files(dir.path(), 20).unwrap();
    receive(&spool, b"0123456789", &meta("1.2.3.1", "0001"));
    let mut inc = spool.begin().unwrap();
    inc.write(b"0123456789").unwrap();
    assert!(matches!(inc.write(b"x"), Err(SpoolError::OutOfResources)));
    drop(inc);
    assert_eq!(files(dir.path(), "objects").len(), 1, "no partial file");
    // Another association is refused too while full; after delivery there is room again.
    let mut inc = spool.begin().unwrap();
    assert!(matches!(
        inc.write(&[0; 11]),
        Err(SpoolError::OutOfResources)
    ));
    drop(inc);
    let id = spool.ready(100, 1).unwrap()[0].id;
    spool.delivered(id).unwrap();
    receive(&spool, &[1; 20], &meta("1.2.3.2", "0001"));
}

#[test]
fn an_instance_is_refused_while_the_disk_is_down_to_its_reserve() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path(), 1 << 40).unwrap();
    // The reserve of a small data partition (256 MiB) and of a large disk.
    assert_eq!(disk_reserve(256 << 20), 32 << 20);
    assert_eq!(disk_reserve(1 << 40), 64 << 20);
    // More free space wanted than any disk has: refused at the start, nothing written.
    spool.set_disk_reserve(u64::MAX);
    assert!(matches!(spool.begin(), Err(SpoolError::OutOfResources)));
    // A large instance that started in time stops at the reserve (checked every 8 MiB).
    spool.set_disk_reserve(0);
    let mut inc = spool.begin().unwrap();
    inc.write(&vec![0; 2 << 20]).unwrap();
    spool.set_disk_reserve(u64::MAX);
    let refused = (0..8).find_map(|_| inc.write(&vec![0; 2 << 20]).err());
    assert!(
        matches!(refused, Some(SpoolError::OutOfResources)),
        "{refused:?}"
    );
    drop(inc);
    assert!(files(dir.path(), "objects").is_empty(), "no partial file");
    // With room again, instances are taken.
    spool.set_disk_reserve(0);
    receive(&spool, b"0123456789", &meta("1.2.3.1", "0001"));
    assert_eq!(spool.counts().unwrap().pending, 1);
}

#[test]
fn duplicates_follow_the_policy() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open_files(dir.path(), 1 << 20).unwrap();
    let Committed::Queued(first) = receive(&spool, b"version one", &meta("1.2.3.1", "0001")) else {
        panic!()
    };
    // Identical bytes: stored once.
    assert_eq!(
        receive(&spool, b"version one", &meta("1.2.3.1", "0001")),
        Committed::Identical(first)
    );
    assert_eq!(files(dir.path(), "objects").len(), 1);
    // Different bytes: the newest replaces it, recorded.
    let Committed::Replaced { id, replaced } =
        receive(&spool, b"version two", &meta("1.2.3.1", "0001"))
    else {
        panic!()
    };
    assert_eq!(replaced, first);
    assert_eq!(files(dir.path(), "objects"), vec![format!("{id}.dcm")]);
    let c = spool.counts().unwrap();
    assert_eq!((c.pending, c.duplicates, c.bytes), (1, 2, 11));
}

#[test]
fn held_instances_are_never_ready_until_released() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open_files(dir.path(), 1 << 20).unwrap();
    let Committed::Queued(a) = receive(&spool, b"a", &meta("1.2.3.1", "0001")) else {
        panic!()
    };
    let Committed::Queued(b) = receive(&spool, b"b", &meta("1.2.3.2", "0002")) else {
        panic!()
    };
    spool.hold(a, "no-consent").unwrap();
    assert_eq!(
        spool
            .ready(100, 10)
            .unwrap()
            .iter()
            .map(|q| q.id)
            .collect::<Vec<_>>(),
        vec![b]
    );
    spool.retry_later(b, "connection refused", 160).unwrap();
    assert!(spool.ready(100, 10).unwrap().is_empty());
    assert_eq!(spool.ready(160, 10).unwrap()[0].attempts, 1);
    assert_eq!(spool.release_patient("0001").unwrap(), 1);
    assert_eq!(spool.ready(160, 10).unwrap().len(), 2);
    assert_eq!(spool.dead_letters(101).unwrap(), 2);
    assert_eq!(spool.counts().unwrap().dead, 2);
}

#[test]
fn opening_removes_what_a_crash_left() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open_files(dir.path(), 1 << 20).unwrap();
    let Committed::Queued(id) = receive(&spool, b"kept", &meta("1.2.3.1", "0001")) else {
        panic!()
    };
    drop(spool);
    // A transfer cut by kill -9 (an object without a row, its success never sent), a
    // complete object whose row never committed, and an earlier version's temporary file.
    fs::write(dir.path().join("objects").join("998.dcm"), b"half").unwrap();
    fs::write(dir.path().join("objects").join("999.dcm"), b"orphan").unwrap();
    fs::create_dir_all(dir.path().join("incoming")).unwrap();
    fs::write(dir.path().join("incoming").join("deadbeef.part"), b"half").unwrap();
    let spool = open_files(dir.path(), 1 << 20).unwrap();
    assert!(!dir.path().join("incoming").exists());
    assert_eq!(files(dir.path(), "objects"), vec![format!("{id}.dcm")]);
    assert_eq!(spool.counts().unwrap().bytes, 4);
    // Ids go on after the rows (and after delivered ones): never an existing object's name.
    let Committed::Queued(next) = receive(&spool, b"next", &meta("1.2.3.2", "0001")) else {
        panic!()
    };
    assert!(next > id);
    spool.delivered(next).unwrap();
    drop(spool);
    let spool = open_files(dir.path(), 1 << 20).unwrap();
    let Committed::Queued(after) = receive(&spool, b"after", &meta("1.2.3.3", "0001")) else {
        panic!()
    };
    assert!(after > next, "{after} after {next}");
    assert_eq!(
        files(dir.path(), "objects"),
        vec![format!("{id}.dcm"), format!("{after}.dcm")]
    );
}

#[test]
fn concurrent_commits_share_transactions_and_lose_nothing() {
    concurrent_commits(0);
}

/// A runtime for a test's tasks (`Incoming::commit_async`, `Spool::committer_stopped`).
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// The SOP Instance UIDs the spool in `dir` queues when it opens (sorted), and their sizes.
fn queued_at_opening(dir: &Path) -> Vec<(String, u64)> {
    let spool = Spool::open(dir, 1 << 30).unwrap();
    let mut queued: Vec<(String, u64)> = spool
        .ready(100, 10)
        .unwrap()
        .into_iter()
        .map(|q| (q.meta.sop_instance, q.size))
        .collect();
    queued.sort_unstable();
    queued
}

/// The size of a test's instance too large for a segment record: a file of its own.
const LARGE: usize = SEGMENT_RECORD_MAX + 10;

/// An instance of `LARGE` bytes, written and not yet committed.
fn begin_large(spool: &Spool) -> Incoming {
    let mut large = spool.begin().unwrap();
    large.write(&vec![7u8; LARGE]).unwrap();
    large
}

/// A committing thread that stops (a panic) answers no success: the instances of its round
/// and those after it fail, and `committer_stopped` says why, for the service to end on it.
#[test]
fn a_committing_thread_that_panics_fails_every_instance_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path(), 1 << 30).unwrap();
    let rt = runtime();
    // Running, it has nothing to say.
    let quiet = rt.block_on(async {
        tokio::time::timeout(Duration::from_millis(50), spool.committer_stopped()).await
    });
    assert!(quiet.is_err());
    assert!(matches!(
        receive(&spool, b"DICM before", &meta("1.2.3.1", "0001")),
        Committed::Queued(_)
    ));
    let fails = |uid: &str| {
        let mut inc = spool.begin().unwrap();
        inc.write(b"DICM bytes").unwrap();
        inc.commit(&meta(uid, "0001"), 100).unwrap_err()
    };
    let e = fails(PANIC_IN_COMMIT);
    assert!(matches!(e, SpoolError::GroupCommit(_)), "{e:?}");
    let why = rt.block_on(spool.committer_stopped()).to_string();
    assert!(why.contains("panicked: a test's instance"), "{why}");
    // Nothing after it is acknowledged either, and nothing is left of the attempts.
    let e = fails("1.2.3.2");
    assert!(
        e.to_string().contains("the committing thread has stopped"),
        "{e}"
    );
    assert_eq!(spool.counts().unwrap().pending, 1);
}

/// A file of its own is acknowledged once flushed, before the committing thread takes it:
/// should that thread then panic, the file is kept, and the spool's next opening queues it.
#[test]
fn a_file_acknowledged_before_the_committing_thread_panics_is_queued_at_the_next_opening() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    {
        let spool = Spool::open(dir.path(), 1 << 30).unwrap();
        let large = begin_large(&spool);
        rt.block_on(large.commit_async(meta(PANIC_IN_COMMIT, "0001"), 100))
            .unwrap();
        let why = rt.block_on(spool.committer_stopped()).to_string();
        assert!(why.contains("panicked: a test's instance"), "{why}");
        assert_eq!(spool.counts().unwrap().pending, 0);
    }
    let large = u64::try_from(LARGE).unwrap();
    assert_eq!(
        queued_at_opening(dir.path()),
        [(PANIC_IN_COMMIT.to_owned(), large)]
    );
}

/// A task is answered once its instance is durable, before the row: should the row then
/// fail, the instance stays (never listed gone), the committing thread says so for the
/// service to end, and the spool's next opening queues it from its record.
#[test]
fn an_instance_acknowledged_before_its_row_is_queued_at_the_next_opening_if_the_row_fails() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    {
        let spool = Spool::open(dir.path(), 1 << 30).unwrap();
        let mut small = spool.begin().unwrap();
        small.write(b"DICM small").unwrap();
        let large = begin_large(&spool);
        rt.block_on(async {
            small
                .commit_async(meta("1.2.3.999.1.1", "0001"), 100)
                .await
                .unwrap();
            large
                .commit_async(meta("1.2.3.999.1.2", "0001"), 100)
                .await
                .unwrap();
        });
        let why = rt.block_on(spool.committer_stopped()).to_string();
        assert!(
            why.contains("could not queue instances it had acknowledged"),
            "{why}"
        );
        assert_eq!(spool.counts().unwrap().pending, 0);
    }
    let large = u64::try_from(LARGE).unwrap();
    assert_eq!(
        queued_at_opening(dir.path()),
        [
            ("1.2.3.999.1.1".to_owned(), 10),
            ("1.2.3.999.1.2".to_owned(), large)
        ]
    );
}

/// Rows follow the answers: while instances keep coming, their rows wait for each other,
/// and are written at a pause in the flow (unasked), or at once for `caught_up`.
#[test]
fn answered_instances_get_their_rows_at_a_pause_or_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path(), 1 << 30).unwrap();
    let rt = runtime();
    // Alone: its row comes at the pause after it.
    let mut one = spool.begin().unwrap();
    one.write(b"DICM one").unwrap();
    rt.block_on(one.commit_async(meta("1.2.3.50", "0001"), 100))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while spool.counts().unwrap().pending == 0 {
        assert!(Instant::now() < deadline, "no row");
        // Made inside the runtime: a timer made outside it has no runtime to find.
        rt.block_on(async { tokio::time::sleep(Duration::from_millis(1)).await });
    }
    // Many, from four tasks at once: every one queued, once, when `caught_up` returns.
    rt.block_on(async {
        let tasks: Vec<_> = (0..4)
            .map(|t| {
                let spool = spool.clone();
                tokio::spawn(async move {
                    for i in 0..50 {
                        let mut inc = spool.begin().unwrap();
                        inc.write(format!("DICM {t} {i}").as_bytes()).unwrap();
                        inc.commit_async(meta(&format!("1.2.3.51.{t}.{i}"), "0001"), 100)
                            .await
                            .unwrap();
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
    });
    spool.caught_up().unwrap();
    assert_eq!(spool.counts().unwrap().pending, 201);
    drop(spool);
    let reopened = Spool::open(dir.path(), 1 << 30).unwrap();
    assert_eq!(reopened.counts().unwrap().pending, 201);
}

/// The same with segments: the associations share the segment's flushes as well.
#[test]
fn concurrent_commits_into_segments_share_flushes_and_lose_nothing() {
    concurrent_commits(SEGMENT_RECORD_MAX);
}

fn concurrent_commits(segment_record_max: usize) {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open_with(dir.path(), 1 << 30, segment_record_max).unwrap();
    let in_files = if segment_record_max == 0 { 200 } else { 0 };
    let results: Vec<Committed> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..8)
            .map(|t| {
                let spool = spool.clone();
                scope.spawn(move || {
                    (0..25)
                        .map(|i| {
                            let uid = format!("1.2.3.{t}.{i}");
                            receive(&spool, uid.as_bytes(), &meta(&uid, "0001"))
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    let mut ids: Vec<i64> = results
        .iter()
        .map(|c| match c {
            Committed::Queued(id) => *id,
            other => panic!("{other:?}"),
        })
        .collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 200);
    assert_eq!(spool.counts().unwrap().pending, 200);
    assert_eq!(files(dir.path(), "objects").len(), in_files);
    // Every row's object holds its own bytes.
    for q in spool.ready(100, 1000).unwrap() {
        assert_eq!(data_of(&q), q.meta.sop_instance.as_bytes());
    }
    // The same instance from two threads at once: stored once, the other recorded.
    let twice: Vec<Committed> = std::thread::scope(|scope| {
        let a = scope.spawn(|| receive(&spool, b"same bytes", &meta("1.2.3.99", "0001")));
        let b = scope.spawn(|| receive(&spool, b"same bytes", &meta("1.2.3.99", "0001")));
        vec![a.join().unwrap(), b.join().unwrap()]
    });
    assert_eq!(
        twice
            .iter()
            .filter(|c| matches!(c, Committed::Identical(_)))
            .count(),
        1,
        "{twice:?}"
    );
    assert_eq!(spool.counts().unwrap().pending, 201);
    assert_eq!(
        files(dir.path(), "objects").len(),
        in_files + in_files / 200
    );
    // Reopened, every instance is there once, with its own bytes.
    drop(spool);
    let spool = Spool::open_with(dir.path(), 1 << 30, segment_record_max).unwrap();
    let ready = spool.ready(100, 1000).unwrap();
    assert_eq!(ready.len(), 201);
    for q in &ready {
        let want = if q.meta.sop_instance == "1.2.3.99" {
            b"same bytes".to_vec()
        } else {
            q.meta.sop_instance.as_bytes().to_vec()
        };
        assert_eq!(data_of(q), want);
    }
}

#[test]
fn a_busy_pacs_backs_each_instance_off_on_its_own_up_to_an_hour() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open_files(dir.path(), 1 << 20).unwrap();
    let Committed::Queued(id) = receive(&spool, b"DICM busy", &meta("1.2.3.9", "0001")) else {
        panic!()
    };
    let mut at = 1_000;
    let mut waits = Vec::new();
    for _ in 0..9 {
        spool.retry_backoff(id, "A700H", at).unwrap();
        let next: i64 = spool
            .conn()
            .query_row(
                "SELECT next_attempt_at FROM queue WHERE id = ?1",
                [id],
                |r| r.get(0),
            )
            .unwrap();
        waits.push(next - at);
        // Not ready before its time, ready at it: never a dead letter.
        assert!(spool.ready(next - 1, 10).unwrap().is_empty());
        assert_eq!(spool.ready(next, 10).unwrap().len(), 1);
        at = next;
    }
    assert_eq!(waits, [30, 60, 120, 240, 480, 960, 1920, 3600, 3600]);
    assert_eq!(spool.counts().unwrap().dead, 0);
}

#[test]
fn dead_letters_are_listed_and_requeued_with_a_fresh_clock() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open_files(dir.path(), 1 << 20).unwrap();
    let mut ids = Vec::new();
    for (i, uid) in ["1.2.3.21", "1.2.3.22", "1.2.3.23"].iter().enumerate() {
        let Committed::Queued(id) =
            receive(&spool, format!("DICM {i}").as_bytes(), &meta(uid, "0001"))
        else {
            panic!()
        };
        ids.push(id);
    }
    spool
        .fail(
            ids[0],
            "refused by the network PACS: 0122H (SOP class not supported)",
        )
        .unwrap();
    spool
        .retry_later(ids[1], "connection refused", 500)
        .unwrap();
    // Not delivered within the dead-letter time: dead, like the refused one.
    assert_eq!(spool.dead_letters(101).unwrap(), 2);
    spool.hold(ids[2], "no-consent").unwrap();
    let dead = spool.entries("dead", 10).unwrap();
    assert_eq!(dead.iter().map(|e| e.id).collect::<Vec<_>>(), ids[..2]);
    assert_eq!(
        dead[0].reason,
        "refused by the network PACS: 0122H (SOP class not supported)"
    );
    assert_eq!(dead[1].reason, "connection refused");
    assert_eq!(dead[1].attempts, 1);
    assert_eq!(spool.entries("held", 10).unwrap()[0].reason, "no-consent");

    // By id: only a dead letter moves (the held one stays held).
    let mut admin = Admin::open(dir.path()).unwrap();
    let put = admin.requeue(Some(&[ids[0], ids[2]]), 10_000).unwrap();
    assert_eq!(put.len(), 1);
    assert_eq!(put[0].id, ids[0]);
    assert_eq!(put[0].sop_instance, "1.2.3.21");
    assert_eq!(put[0].patient_id.as_deref(), Some("0001"));
    assert_eq!(spool.entries("held", 10).unwrap().len(), 1);
    // Pending at once, and the dead-letter clock starts again from the requeue.
    let ready = spool.ready(10_000, 10).unwrap();
    assert_eq!(ready.iter().map(|q| q.id).collect::<Vec<_>>(), [ids[0]]);
    assert_eq!(ready[0].attempts, 0);
    assert_eq!(spool.dead_letters(9_000).unwrap(), 0);
    // All of them.
    let put = admin.requeue(None, 10_000).unwrap();
    assert_eq!(put.iter().map(|r| r.id).collect::<Vec<_>>(), [ids[1]]);
    assert!(spool.entries("dead", 10).unwrap().is_empty());
    assert_eq!(spool.counts().unwrap().pending, 2);
}

#[test]
fn the_admin_view_needs_a_spool_and_removes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let err = Admin::open(dir.path()).unwrap_err();
    assert!(err.to_string().contains("spool"), "{err}");
    let spool = open_files(dir.path(), 1 << 20).unwrap();
    // An instance being received (no queue row yet) survives an operator's command.
    let mut inc = spool.begin().unwrap();
    inc.write(b"half").unwrap();
    let admin = Admin::open(dir.path()).unwrap();
    assert!(admin.entries("pending", 10).unwrap().is_empty());
    assert_eq!(files(dir.path(), "objects").len(), 1);
    drop(inc);
}

/// `(SOP class, SOP instance)` of [`meta`]'s instance `uid`.
fn named(uid: &str) -> (String, String) {
    ("1.2.840.10008.5.1.4.1.1.2".to_owned(), uid.to_owned())
}

#[test]
fn a_stored_instance_stays_until_the_pacs_commits_it_and_survives_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open_files(dir.path(), 1 << 20).unwrap();
    let mut ids = Vec::new();
    for uid in ["1.2.3.1", "1.2.3.2", "1.2.3.3"] {
        let Committed::Queued(id) = receive(&spool, b"DICM stored", &meta(uid, "0001")) else {
            panic!()
        };
        ids.push(id);
    }
    spool.stored(&ids, Some("2.25.7"), 200, 260).unwrap();
    // Released (audited) at the C-STORE, kept until committed, not sent again before 260.
    let c = spool.counts().unwrap();
    assert_eq!((c.pending, c.awaiting_commitment, c.delivered), (0, 3, 0));
    assert_eq!(c.releases_waiting, 3);
    assert!(spool.ready(259, 10).unwrap().is_empty());
    assert_eq!(files(dir.path(), "objects").len(), 3);
    drop(spool);
    let spool = open_files(dir.path(), 1 << 20).unwrap();
    assert_eq!(spool.counts().unwrap().awaiting_commitment, 3);
    let listed = spool.entries("pending", 10).unwrap();
    assert_eq!(listed.len(), 3);
    assert!(
        listed
            .iter()
            .all(|e| e.reason == "stored at the network PACS, awaiting its storage commitment"),
        "{listed:?}"
    );
    // A report naming another transaction, a wrong SOP class or an unknown instance
    // changes nothing.
    let other = spool
        .commitment_report("2.25.8", &[named("1.2.3.1")], &[], 210)
        .unwrap();
    assert_eq!(other.unknown, 1);
    let wrong_class = spool
        .commitment_report(
            "2.25.7",
            &[("1.2.840.10008.5.1.4.1.1.7".into(), "1.2.3.1".into())],
            &[],
            210,
        )
        .unwrap();
    assert_eq!(wrong_class.unknown, 1);
    assert_eq!(spool.counts().unwrap().awaiting_commitment, 3);
    // Two committed, one failed (0112H): the two leave, the third is sent again later.
    let applied = spool
        .commitment_report(
            "2.25.7",
            &[named("1.2.3.1"), named("1.2.3.2"), named("1.2.3.99")],
            &[(named("1.2.3.3").0, named("1.2.3.3").1, "0112H".to_owned())],
            220,
        )
        .unwrap();
    assert_eq!(
        applied,
        CommitmentApplied {
            committed: 2,
            failed: 1,
            unknown: 1
        }
    );
    assert_eq!(
        files(dir.path(), "objects"),
        vec![format!("{}.dcm", ids[2])]
    );
    let c = spool.counts().unwrap();
    assert_eq!((c.pending, c.awaiting_commitment, c.delivered), (1, 0, 2));
    assert!(spool.ready(249, 10).unwrap().is_empty());
    let again = spool.ready(250, 10).unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].attempts, 1);
    // The same report again commits nothing more.
    let twice = spool
        .commitment_report("2.25.7", &[named("1.2.3.1")], &[], 230)
        .unwrap();
    assert_eq!(twice.unknown, 1);
}

#[test]
fn an_instance_whose_commitment_does_not_come_is_sent_again_under_a_new_transaction() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open_files(dir.path(), 1 << 20).unwrap();
    let Committed::Queued(id) = receive(&spool, b"DICM late", &meta("1.2.3.1", "0001")) else {
        panic!()
    };
    spool.stored(&[id], Some("2.25.1"), 100, 160).unwrap();
    assert!(spool.ready(159, 10).unwrap().is_empty());
    assert_eq!(spool.ready(160, 10).unwrap().len(), 1);
    // Sent again, under a new transaction: a late report of the first one is ignored.
    spool.stored(&[id], Some("2.25.2"), 160, 220).unwrap();
    let late = spool
        .commitment_report("2.25.1", &[named("1.2.3.1")], &[], 170)
        .unwrap();
    assert_eq!(late.unknown, 1);
    assert_eq!(spool.counts().unwrap().awaiting_commitment, 1);
    // Stored without a commitment asked for (None): sent again at its time too.
    spool.stored(&[id], None, 170, 230).unwrap();
    assert_eq!(spool.ready(230, 10).unwrap().len(), 1);
    assert_eq!(spool.counts().unwrap().releases_waiting, 3);
    // A different copy of the same instance replaces it: the old commitment goes with it.
    let Committed::Replaced { id: newer, .. } =
        receive(&spool, b"DICM newer", &meta("1.2.3.1", "0001"))
    else {
        panic!()
    };
    let c = spool.counts().unwrap();
    assert_eq!((c.pending, c.awaiting_commitment), (1, 0));
    spool.stored(&[newer], Some("2.25.3"), 240, 300).unwrap();
    let done = spool
        .commitment_report("2.25.3", &[named("1.2.3.1")], &[], 250)
        .unwrap();
    assert_eq!(done.committed, 1);
    assert!(files(dir.path(), "objects").is_empty());
    assert_eq!(spool.counts().unwrap().bytes, 0);
}

/// Issue 15, ingest without a flush of the queue: a row is written without one, so power
/// may take it while the object (with its trailer) is on disk, and its success was sent.
/// Opening the spool queues such an object again from its trailer, as it was received
/// (patient, SOP class, transfer syntax, calling AE, when); an object whose trailer is
/// incomplete or whose bytes do not match the digest was never acknowledged, and goes; an
/// older copy of an instance queued anew goes too.
#[test]
fn rows_lost_with_power_are_rebuilt_from_the_objects_trailers() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open_files(dir.path(), 1 << 20).unwrap();
    let ids = receive_four(&spool);
    // A newer copy of 1.2.3.4 replaces it; the older copy's file is left as a crash
    // before its removal would leave it.
    let object = |id: i64| dir.path().join("objects").join(format!("{id}.dcm"));
    let older = fs::read(object(ids[3])).unwrap();
    let Committed::Replaced { id: newer, .. } =
        receive(&spool, b"DICM four, newer", &meta("1.2.3.4", "0001"))
    else {
        panic!()
    };
    fs::write(object(ids[3]), older).unwrap();
    // No patient ID at all.
    let no_patient = Meta {
        patient_id: None,
        study_uid: None,
        ..meta("1.2.3.5", "")
    };
    let Committed::Queued(anonymous) = receive(&spool, b"DICM five", &no_patient) else {
        panic!()
    };
    // Power goes: the rows of 1, 2, 3, the older 4 and 5 never reached the disk.
    {
        let conn = spool.conn();
        for id in ids.iter().chain([&anonymous]) {
            conn.execute("DELETE FROM queue WHERE id = ?1", [id])
                .unwrap();
        }
    }
    drop(spool);
    // 2's trailer was cut short (its flush never finished), 3's bytes differ from its digest.
    let two = fs::read(object(ids[1])).unwrap();
    fs::write(object(ids[1]), &two[..two.len() - 3]).unwrap();
    let mut three = fs::read(object(ids[2])).unwrap();
    three[0] ^= 1;
    fs::write(object(ids[2]), &three).unwrap();

    let spool = open_files(dir.path(), 1 << 20).unwrap();
    let ready = spool.ready(1000, 10).unwrap();
    let uids: Vec<(&str, i64)> = ready
        .iter()
        .map(|q| (q.meta.sop_instance.as_str(), q.id))
        .collect();
    assert_eq!(
        uids,
        vec![
            ("1.2.3.1", ids[0]),
            ("1.2.3.4", newer),
            ("1.2.3.5", anonymous)
        ],
        "{ready:?}"
    );
    assert_eq!(ready[0].meta, meta("1.2.3.1", "0001"));
    assert_eq!(data_of(&ready[0]), b"DICM one");
    assert_eq!(ready[2].meta, no_patient);
    let received: i64 = spool
        .conn()
        .query_row(
            "SELECT received_at FROM queue WHERE id = ?1",
            [ids[0]],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(received, 100, "as it was received");
    assert_eq!(
        files(dir.path(), "objects"),
        vec![
            format!("{}.dcm", ids[0]),
            format!("{newer}.dcm"),
            format!("{anonymous}.dcm")
        ]
    );
    assert_eq!(
        spool.counts().unwrap().bytes,
        (b"DICM one".len() + b"DICM four, newer".len() + b"DICM five".len()) as u64
    );
    // A copy arriving now is the same instance: stored once.
    assert_eq!(
        receive(&spool, b"DICM one", &meta("1.2.3.1", "0001")),
        Committed::Identical(ids[0])
    );
}

/// Ingest (its own connection) and the forwarder's changes (the other) at the same time:
/// every commit waits its turn; none fails because the other connection wrote since it
/// began (a transaction that reads before it writes must take the write lock first).
#[test]
fn ingest_and_the_forwarders_changes_at_once_never_fail() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open_files(dir.path(), 1 << 30).unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        let forwarder = scope.spawn(|| {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let ready = spool.ready(i64::MAX, 20).unwrap();
                let decisions: Vec<(i64, i64)> = ready.iter().map(|q| (q.id, 1)).collect();
                spool.set_decisions(&decisions).unwrap();
                if let Some(q) = ready.first() {
                    spool.delivered(q.id).unwrap();
                }
                n += 1;
            }
            n
        });
        let senders: Vec<_> = (0..4)
            .map(|t| {
                let spool = &spool;
                scope.spawn(move || {
                    for i in 0..100 {
                        let uid = format!("1.2.3.{t}.{i}");
                        receive(spool, uid.as_bytes(), &meta(&uid, "0001"));
                    }
                })
            })
            .collect();
        let sent: Vec<_> = senders.into_iter().map(|s| s.join()).collect();
        stop.store(true, Ordering::Relaxed);
        assert!(forwarder.join().unwrap() > 0);
        for s in sent {
            s.unwrap();
        }
    });
    let c = spool.counts().unwrap();
    assert_eq!(c.pending + c.delivered, 400, "{c:?}");
}

/// Found in review: a copy replaced by a newer one (same SOP Instance UID, other content,
/// here another patient) while it was being sent left without a release record, because
/// the record was made from its queue row, which the replacement had deleted.
#[test]
fn a_copy_replaced_while_it_was_sent_is_still_audited_as_released() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open_files(dir.path(), 1 << 20).unwrap();
    let Committed::Queued(old) = receive(&spool, b"DICM first copy", &meta("1.2.3.9", "0001"))
    else {
        panic!()
    };
    // The forwarder takes it under permit 77 and starts sending.
    spool.set_decisions(&[(old, 77)]).unwrap();
    // Meanwhile the modality sends a corrected copy (for another patient).
    let Committed::Replaced { id: new, .. } =
        receive(&spool, b"DICM second copy", &meta("1.2.3.9", "0002"))
    else {
        panic!("a replacement")
    };
    assert_ne!(old, new);
    // The first copy arrived: its release is audited as what it was.
    spool.delivered(old).unwrap();
    let releases = spool.pending_releases(10).unwrap();
    assert_eq!(releases.len(), 1, "{releases:?}");
    assert_eq!(releases[0].patient_id, "0001");
    assert_eq!(releases[0].sop_instance, "1.2.3.9");
    assert_eq!(releases[0].decision, Some(77));
    // The corrected copy is still to be sent, decided on its own.
    let ready = spool.ready(1000, 10).unwrap();
    assert_eq!(ready.len(), 1);
    assert_eq!(ready[0].id, new);
    assert_eq!(ready[0].meta.patient_id.as_deref(), Some("0002"));
    // With storage commitment the same holds.
    spool.set_decisions(&[(new, 78)]).unwrap();
    let Committed::Replaced { id: newest, .. } =
        receive(&spool, b"DICM third copy", &meta("1.2.3.9", "0003"))
    else {
        panic!("a replacement")
    };
    spool.stored(&[new], Some("2.25.9"), 200, 260).unwrap();
    let releases = spool.pending_releases(10).unwrap();
    assert_eq!(releases.len(), 2, "{releases:?}");
    assert_eq!(releases[1].patient_id, "0002");
    assert_eq!(releases[1].decision, Some(78));
    // Nothing of the replaced copies lingers after the next round.
    spool.set_decisions(&[(newest, 79)]).unwrap();
    let left: i64 = spool
        .conn()
        .query_row("SELECT count(*) FROM superseded", [], |r| r.get(0))
        .unwrap();
    assert_eq!(left, 0);
}

/// A large instance is hashed beside the receiver past its first MiB: the digest in its
/// trailer is still the whole data set's (the trailer check reads it back), whether the
/// fragments came owned or borrowed; one aborted midway leaves nothing.
#[test]
fn a_large_instance_hashed_beside_the_receiver_has_the_whole_digest() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open_files(dir.path(), 1 << 30).unwrap();
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let mut inc = spool.begin().unwrap();
    for (n, fragment) in data.chunks(16_372).enumerate() {
        if n % 2 == 0 {
            inc.write_owned(fragment.to_vec()).unwrap();
        } else {
            inc.write(fragment).unwrap();
        }
    }
    let Committed::Queued(id) = inc.commit(&meta("1.2.3.4.5.1", "P1"), 100).unwrap() else {
        panic!("not queued")
    };
    let t = read_trailer(&spool.object_path(id)).expect("a trailer that matches the data");
    assert_eq!(t.digest, blake3::hash(&data).to_hex().to_string());
    assert_eq!(t.size, 3_000_000);
    let mut aborted = spool.begin().unwrap();
    for fragment in data.chunks(65_536) {
        aborted.write_owned(fragment.to_vec()).unwrap();
    }
    drop(aborted);
    assert_eq!(files(dir.path(), "objects").len(), 1);
}

/// Past its first MiB a large instance is written by a thread of its own: a write that
/// fails there (here: a file opened read-only) reaches the receiver, at a later fragment or
/// at the end, and never passes for a complete instance.
#[test]
fn a_write_that_fails_on_the_writing_thread_fails_the_instance() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("object");
    fs::write(&path, b"").unwrap();
    let read_only = Some(File::open(&path).unwrap());
    let fragment = vec![7u8; 65_536];
    // Before HASH_INLINE: hashed here, handed back to be written by the caller.
    let mut digest = Digest::Inline(Box::default());
    let mut file = read_only;
    let back = digest
        .update(std::borrow::Cow::Borrowed(&fragment), 0, &mut file)
        .unwrap();
    assert!(back.is_some() && file.is_some());
    // From HASH_INLINE on: the writing thread takes the file and the fragments.
    let mut failed = None;
    for n in 0..64u64 {
        match digest.update(
            std::borrow::Cow::Owned(fragment.clone()),
            HASH_INLINE + n * 65_536,
            &mut file,
        ) {
            Ok(back) => assert!(back.is_none() && file.is_none()),
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    let error = match failed {
        Some(e) => e,
        None => digest.finish().expect_err("a write that failed"),
    };
    assert!(matches!(error, SpoolError::Io(_)), "{error:?}");
}

// Segments (issue 15): small instances appended to preallocated segment files.

fn segments_of(dir: &Path) -> Vec<String> {
    files(dir, "segments")
}

/// The queue's rows, as power would leave them: `ids` never reached the disk.
fn lose_rows(spool: &Spool, ids: &[i64]) {
    let conn = spool.conn();
    for id in ids {
        conn.execute("DELETE FROM queue WHERE id = ?1", [id])
            .unwrap();
    }
}

#[test]
fn small_instances_go_into_a_segment_large_ones_into_files_of_their_own() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path(), 1 << 30).unwrap();
    spool.prepare().unwrap();
    let Committed::Queued(small) = receive(&spool, b"DICM small", &meta("1.2.3.1", "0001")) else {
        panic!()
    };
    let large_bytes: Vec<u8> = (0..SEGMENT_RECORD_MAX + 10)
        .map(|i| u8::try_from(i % 251).unwrap())
        .collect();
    let mut inc = spool.begin().unwrap();
    for chunk in large_bytes.chunks(16 << 10) {
        inc.write(chunk).unwrap();
    }
    let Committed::Queued(large) = inc.commit(&meta("1.2.3.2", "0001"), 100).unwrap() else {
        panic!()
    };
    assert_eq!(files(dir.path(), "objects"), vec![format!("{large}.dcm")]);
    assert_eq!(
        segments_of(dir.path()).len(),
        2,
        "the current one and a spare"
    );
    let ready = spool.ready(100, 10).unwrap();
    assert_eq!(ready[0].id, small);
    assert!(ready[0].path.starts_with(dir.path().join("segments")));
    assert!(ready[0].offset > 0);
    assert_eq!(data_of(&ready[0]), b"DICM small");
    assert_eq!(spool.counts().unwrap().bytes, 10 + large_bytes.len() as u64);
    assert_eq!((ready[1].offset, data_of(&ready[1])), (0, large_bytes));
    drop(spool);
    let spool = Spool::open(dir.path(), 1 << 30).unwrap();
    let ready = spool.ready(100, 10).unwrap();
    assert_eq!(ready.len(), 2);
    assert_eq!(data_of(&ready[0]), b"DICM small");
    spool.delivered(small).unwrap();
    spool.delivered(large).unwrap();
    assert!(files(dir.path(), "objects").is_empty());
    // Delivered records never come back.
    drop(spool);
    let spool = Spool::open(dir.path(), 1 << 30).unwrap();
    assert!(spool.ready(100, 10).unwrap().is_empty());
    assert_eq!(spool.counts().unwrap().delivered, 2);
}

/// Issue 15: a record whose row power took (written without a flush) is queued again from
/// its segment; records that left (delivered, an identical copy stored once, replaced) are
/// not; a record that does not check ends the scan.
#[test]
fn rows_lost_with_power_are_rebuilt_from_the_segment() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path(), 1 << 30).unwrap();
    let ids = receive_four(&spool);
    // 2 is delivered, a copy of 1 is stored once, 3 is replaced by a newer copy.
    spool.delivered(ids[1]).unwrap();
    assert_eq!(
        receive(&spool, b"DICM one", &meta("1.2.3.1", "0001")),
        Committed::Identical(ids[0])
    );
    let Committed::Replaced { id: newer, .. } =
        receive(&spool, b"DICM three, newer", &meta("1.2.3.3", "0001"))
    else {
        panic!()
    };
    // Power goes: the rows of 1 and 4 never reached the disk.
    lose_rows(&spool, &[ids[0], ids[3]]);
    drop(spool);
    let spool = Spool::open(dir.path(), 1 << 30).unwrap();
    let ready = spool.ready(1000, 10).unwrap();
    let got: Vec<(&str, i64, Vec<u8>)> = ready
        .iter()
        .map(|q| (q.meta.sop_instance.as_str(), q.id, data_of(q)))
        .collect();
    assert_eq!(
        got,
        vec![
            ("1.2.3.1", ids[0], b"DICM one".to_vec()),
            ("1.2.3.4", ids[3], b"DICM four".to_vec()),
            ("1.2.3.3", newer, b"DICM three, newer".to_vec()),
        ]
    );
    assert_eq!(ready[0].meta, meta("1.2.3.1", "0001"));
    assert_eq!(
        spool.counts().unwrap().bytes,
        (b"DICM one".len() + b"DICM four".len() + b"DICM three, newer".len()) as u64
    );
    // A record whose bytes do not match its digest ends the scan: 4's row is lost again
    // and its data changed on disk (a torn write); it is not queued, nor anything after it.
    let four = ready[1].clone();
    lose_rows(&spool, &[four.id, newer]);
    drop(spool);
    {
        use std::os::unix::fs::FileExt as _;
        let f = File::options().write(true).open(&four.path).unwrap();
        f.write_all_at(b"X", four.offset).unwrap();
    }
    let spool = Spool::open(dir.path(), 1 << 30).unwrap();
    let uids: Vec<String> = spool
        .ready(1000, 10)
        .unwrap()
        .into_iter()
        .map(|q| q.meta.sop_instance)
        .collect();
    assert_eq!(uids, vec!["1.2.3.1"]);
}

/// A segment is reused once its records have all left, under a new generation: its old
/// records never come back, even without their `gone` rows.
#[test]
fn a_segment_whose_records_all_left_is_reused_and_its_old_records_never_come_back() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path(), 1 << 30).unwrap();
    let bytes = vec![7u8; 900 << 10];
    let mut first = Vec::new();
    // Enough to fill the first segment and go on in the next.
    let per_segment = (segments::SEGMENT_SIZE / (900 << 10)) as usize;
    for i in 0..per_segment + 2 {
        let uid = format!("1.2.3.{i}");
        let Committed::Queued(id) = receive(&spool, &bytes, &meta(&uid, "0001")) else {
            panic!()
        };
        first.push(id);
    }
    let slots: Vec<PathBuf> = spool
        .ready(100, 1000)
        .unwrap()
        .iter()
        .map(|q| q.path.clone())
        .collect();
    let first_slot = slots[0].clone();
    assert_ne!(first_slot, *slots.last().unwrap());
    // Everything in the first segment is delivered; the forwarder's next round reuses it.
    for (id, path) in first.iter().zip(&slots) {
        if *path == first_slot {
            spool.delivered(*id).unwrap();
        }
    }
    let left = spool.ready(100, 1000).unwrap();
    assert_eq!(left.len(), 2);
    // The `gone` rows of its old generation went with it.
    let gone: i64 = spool
        .conn()
        .query_row("SELECT count(*) FROM gone", [], |r| r.get(0))
        .unwrap();
    assert_eq!(gone, 0);
    // Filling the current segment moves to the reused one.
    let mut more = Vec::new();
    for i in 0..per_segment {
        let uid = format!("1.2.4.{i}");
        let Committed::Queued(id) = receive(&spool, &bytes, &meta(&uid, "0001")) else {
            panic!()
        };
        more.push(id);
    }
    let ready = spool.ready(100, 1000).unwrap();
    assert!(ready.iter().any(|q| q.path == first_slot), "reused");
    let pending = ready.len();
    drop(spool);
    let spool = Spool::open(dir.path(), 1 << 30).unwrap();
    let ready = spool.ready(100, 1000).unwrap();
    assert_eq!(ready.len(), pending, "no old record came back");
    for q in &ready {
        assert_eq!(data_of(q), bytes);
    }
    assert!(
        segments_of(dir.path()).len() <= 4,
        "{:?}",
        segments_of(dir.path())
    );
}

/// An instance held (no consent yet) or dead may wait for long: it moves out of its
/// segment into a file of its own, so that no segment stays in use for it.
#[test]
fn held_and_dead_instances_move_out_of_their_segment() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path(), 1 << 30).unwrap();
    let Committed::Queued(a) = receive(&spool, b"DICM held", &meta("1.2.3.1", "0001")) else {
        panic!()
    };
    let Committed::Queued(b) = receive(&spool, b"DICM dead", &meta("1.2.3.2", "0002")) else {
        panic!()
    };
    spool.hold(a, "no-consent").unwrap();
    spool.fail(b, "refused by the network PACS: 0122H").unwrap();
    assert_eq!(
        files(dir.path(), "objects"),
        vec![format!("{a}.dcm"), format!("{b}.dcm")]
    );
    assert_eq!(spool.release_patient("0001").unwrap(), 1);
    let ready = spool.ready(100, 10).unwrap();
    assert_eq!((ready[0].id, ready[0].offset), (a, 0));
    assert_eq!(data_of(&ready[0]), b"DICM held");
    // The moved copy is a complete object: its row lost with power comes back from it.
    lose_rows(&spool, &[a]);
    drop(spool);
    let spool = Spool::open(dir.path(), 1 << 30).unwrap();
    let ready = spool.ready(100, 10).unwrap();
    assert_eq!(ready.len(), 1);
    assert_eq!(data_of(&ready[0]), b"DICM held");
    assert_eq!(spool.counts().unwrap().dead, 1);
    // A move cut short (its copy written, its row not changed) leaves the segment's record.
    let Committed::Queued(c) = receive(&spool, b"DICM three", &meta("1.2.3.3", "0003")) else {
        panic!()
    };
    drop(spool);
    fs::write(
        dir.path().join("objects").join(format!("{c}.dcm")),
        b"half a move",
    )
    .unwrap();
    let spool = Spool::open(dir.path(), 1 << 30).unwrap();
    assert!(!dir.path().join("objects").join(format!("{c}.dcm")).exists());
    let ready = spool.ready(100, 10).unwrap();
    let three = ready.iter().find(|q| q.id == c).unwrap();
    assert_eq!(data_of(three), b"DICM three");
}

/// Dead letters by age move out of their segment too.
#[test]
fn dead_letters_by_age_move_out_of_their_segment() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path(), 1 << 30).unwrap();
    let Committed::Queued(a) = receive(&spool, b"DICM old", &meta("1.2.3.1", "0001")) else {
        panic!()
    };
    assert_eq!(spool.dead_letters(101).unwrap(), 1);
    assert_eq!(files(dir.path(), "objects"), vec![format!("{a}.dcm")]);
    let mut admin = Admin::open(dir.path()).unwrap();
    assert_eq!(admin.requeue(None, 200).unwrap().len(), 1);
    let ready = spool.ready(200, 10).unwrap();
    assert_eq!(data_of(&ready[0]), b"DICM old");
}

/// Issue 17: each copy received (with its peer and study) and each send is a transfer
/// record, written with the change that makes it true, until the audit trail has it; a
/// receipt whose row power took comes back from the trailer (its peer unknown).
#[test]
fn each_receipt_and_each_send_is_a_transfer_record_until_the_audit_trail_has_it() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path(), 1 << 20).unwrap();
    let from_ct = |bytes: &[u8], m: &Meta| {
        let mut inc = spool.begin().unwrap();
        inc.set_peer("192.168.10.5");
        inc.write(bytes).unwrap();
        inc.commit(m, 100).unwrap()
    };
    let Committed::Queued(one) = from_ct(b"DICM one", &meta("1.2.3.1", "0001")) else {
        panic!()
    };
    let Committed::Queued(two) = from_ct(b"DICM two", &meta("1.2.3.2", "0002")) else {
        panic!()
    };
    // The same copy again: stored once, received twice.
    assert_eq!(
        from_ct(b"DICM one", &meta("1.2.3.1", "0001")),
        Committed::Identical(one)
    );
    spool.delivered(one).unwrap();
    spool.stored(&[two], Some("2.25.1"), 200, 260).unwrap();
    let pending = spool.pending_transfers(10).unwrap();
    let seen: Vec<(bool, &str, &str, Option<&str>, &str)> = pending
        .iter()
        .map(|t| {
            (
                t.sent,
                t.peer_ae.as_str(),
                t.peer_address.as_str(),
                t.patient_id.as_deref(),
                t.sop_instance.as_str(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            (false, "MODALITY", "192.168.10.5", Some("0001"), "1.2.3.1"),
            (false, "MODALITY", "192.168.10.5", Some("0002"), "1.2.3.2"),
            (false, "MODALITY", "192.168.10.5", Some("0001"), "1.2.3.1"),
            (true, "", "", Some("0001"), "1.2.3.1"),
            (true, "", "", Some("0002"), "1.2.3.2"),
        ]
    );
    assert!(
        pending
            .iter()
            .all(|t| t.study_uid.as_deref() == Some("1.2.392.9"))
    );
    assert_eq!(spool.counts().unwrap().transfers_waiting, 5);
    spool.transfers_recorded(pending[2].id).unwrap();
    assert_eq!(spool.pending_transfers(10).unwrap(), pending[3..]);

    // Power takes a row and its receipt (one transaction): both come back from the record.
    let Committed::Queued(three) = from_ct(b"DICM three", &meta("1.2.3.3", "0003")) else {
        panic!()
    };
    spool.transfers_recorded(i64::MAX).unwrap();
    lose_rows(&spool, &[three]);
    drop(spool);
    let spool = Spool::open(dir.path(), 1 << 20).unwrap();
    let back = spool.pending_transfers(10).unwrap();
    assert_eq!(back.len(), 1, "{back:?}");
    assert_eq!(
        (
            back[0].sent,
            back[0].peer_address.as_str(),
            back[0].sop_instance.as_str(),
            back[0].study_uid.as_deref()
        ),
        (false, "", "1.2.3.3", Some("1.2.392.9"))
    );
}

/// A trailer written before studies were kept (no study field) still reads; one with a
/// study field of the wrong length does not.
#[test]
fn trailers_with_and_without_the_study_read_back() {
    let with = meta("1.2.3.1", "0001");
    let without = Meta {
        study_uid: None,
        ..with.clone()
    };
    for m in [&with, &without] {
        let t = parse_trailer_body(&trailer_body(m, "abc", 8, 100)).unwrap();
        assert_eq!(&t.meta, m);
        assert_eq!((t.digest.as_str(), t.size, t.received_at), ("abc", 8, 100));
    }
    let mut bad = trailer_body(&with, "abc", 8, 100);
    bad.push(b'x');
    assert!(parse_trailer_body(&bad).is_none());
}
