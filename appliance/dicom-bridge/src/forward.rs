//! The forwarder: C-STORE of queued instances to the network PACS, the bytes as received
//! (the data set in the transfer syntax it came in; nothing is transcoded).
//!
//! One association carries a batch: it proposes one presentation context per (SOP class,
//! transfer syntax) of the batch, `TCP_NODELAY` on, timeouts on every PDU, and streams each
//! file in P-DATA fragments of the PACS's maximum length. Success and warning statuses are
//! delivered. A failure that says the PACS cannot store it *now* (A7xxH out of resources,
//! 0110H processing failure, 0213H; [`Status::is_transient`]) is sent again later with a
//! backoff of its own (A7xxH also pauses the association's share: the PACS is full). Only
//! a failure that refuses the instance itself (A9xxH, Cxxx, 0122H, 0124H, ...) holds it as
//! a dead letter with the reason, until an operator requeues it (`tsunagi dicom requeue`).
//! A connection or association failure (refused, A-ASSOCIATE-RJ, aborted, timed out)
//! leaves the rest of the batch queued, for a retry with the forwarder's backoff.
//!
//! A round's associations share its work ([`Work`], [`send_parallel`]): each takes the next
//! instance when it is free, so one that is slow to open, or refused, holds nothing back.
//! One still opening when the others have sent everything is given up [`OPEN_GRACE`]
//! later; the service lowers the destination's parallelism when that happens (a PACS that
//! serves fewer associations at a time than configured) and tries a higher one again later.
//!
//! Every send is watched ([`crate::inflight`]): an instance whose patient's consent changed
//! while the batch is being sent is not sent (it stays queued, [`Outcome::Stopped`]), and one
//! being transferred at that moment ends its association with an A-ABORT (a TCP reset in the
//! middle of a PDU), so the PACS discards the partial instance.
//!
//! A stop of the service ([`Stop::with_shutdown`]) ends a send at once wherever it waits on
//! the PACS (a connect, an A-ASSOCIATE-AC, a fragment's write, a C-STORE response): the
//! association is reset and every instance without a response stays queued, to be sent
//! again after the restart (the PACS de-duplicates by SOP Instance UID). Between two
//! instances the association is kept for an orderly release.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Duration;

use dicom_ul::ClientAssociationOptions;
use dicom_ul::Pdu;
use dicom_ul::pdu::{PDataValueType, PresentationContextResultReason};
use dimse::command::{
    Command, CommandField, STORAGE_COMMITMENT_PUSH, STORAGE_COMMITMENT_PUSH_INSTANCE,
};
use dimse::status::{Class, Status};
use tokio::io::AsyncReadExt as _;

use crate::commitment::Reference;
use crate::inflight::Stop;
use crate::pacs::{EstablishError, PacsAssociation, Peer};
use crate::spool::{Queued, Spool};

/// The network PACS.
#[derive(Debug, Clone)]
pub struct Destination {
    pub ae_title: String,
    pub addr: SocketAddr,
    /// Our AE title towards it.
    pub calling_ae: String,
    pub timeout: Duration,
    /// Ask the PACS for storage commitment of what it stored ([`crate::commitment`]): each
    /// association also proposes the Storage Commitment Push Model, and sends one
    /// N-ACTION-RQ for its share once it has sent it.
    pub storage_commitment: bool,
    /// DICOM TLS ([`crate::pacs`]); `None`: plain TCP.
    pub tls: Option<tsunagi_runtime::http::ReloadingTls>,
}

/// An instance to send: as spooled, or with a rewritten start ([`crate::translate`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    pub queued: Queued,
    pub head: Option<crate::translate::Rewritten>,
}

impl From<Queued> for Outgoing {
    fn from(queued: Queued) -> Outgoing {
        Outgoing { queued, head: None }
    }
}

/// What sending one instance came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Delivered(Status),
    /// The PACS refused this instance for good (the status says why): retrying will not
    /// help. It is held as a dead letter, with the status, until an operator requeues it.
    Refused(Status),
    /// The PACS cannot store it now (out of resources, a processing failure,
    /// [`Status::is_transient`]): sent again later, with a backoff.
    Busy(Status),
    /// No presentation context was accepted for its SOP class and transfer syntax.
    NotAccepted,
    /// Not sent, or its transfer aborted: its patient's consent changed while the batch was
    /// being sent ([`crate::inflight`]). It stays queued, to be decided again.
    Stopped,
}

/// Forwarding errors: the association itself failed (the batch is retried later).
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("cannot associate with the network PACS")]
    Associate(#[source] dicom_ul::association::Error),
    #[error("the association with the network PACS failed")]
    Association(#[source] dicom_ul::association::Error),
    #[error("cannot read a spooled instance")]
    Read(#[source] std::io::Error),
    #[error("the network PACS answered something that is not a C-STORE response")]
    Protocol,
    #[error("the network PACS cannot store now: {0}")]
    Busy(Status),
    #[error("the network PACS did not accept the association within {0:?}")]
    AssociateTimeout(Duration),
    /// The TLS handshake was refused (the reason in words).
    #[error("DICOM TLS with the network PACS at {addr} failed: {reason}")]
    TlsRefused { addr: SocketAddr, reason: String },
    #[error("the DICOM TLS files cannot be used")]
    TlsFiles(#[source] std::sync::Arc<tsunagi_runtime::http::TlsFileError>),
    #[error("the network PACS did not answer a C-STORE within {0:?}")]
    ResponseTimeout(Duration),
}

/// How long a PACS may take to answer a C-STORE once it has the whole instance: the
/// destination's `timeout`, plus a second per 10 MB of it (a PACS parses and writes a large
/// instance before it answers: a 2 GiB one may take minutes).
pub fn response_budget(timeout: Duration, size: u64) -> Duration {
    timeout + Duration::from_secs(size / 10_000_000)
}

/// The read timeout of the forwarder's associations: long, because the forwarder bounds
/// each wait itself (the A-ASSOCIATE-AC by the destination's timeout, each C-STORE
/// response by [`response_budget`]).
const READ_TIMEOUT: Duration = Duration::from_secs(3600);

/// An open association to the network PACS, kept between rounds for reuse.
pub struct Link {
    assoc: PacsAssociation,
    /// The destination's timeout.
    timeout: Duration,
    /// The (SOP class, transfer syntax) pairs it proposed.
    pairs: Vec<(String, String)>,
    idle_since: std::time::Instant,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("pairs", &self.pairs.len())
            .finish_non_exhaustive()
    }
}

impl Link {
    /// How long it has been unused.
    pub fn idle(&self) -> Duration {
        self.idle_since.elapsed()
    }

    /// Releases the association (the A-RELEASE-RP waited for within the destination's
    /// timeout; then the connection is closed).
    pub async fn close(self) {
        let _ = tokio::time::timeout(self.timeout, self.assoc.release()).await;
    }

    /// The accepted Storage Commitment Push Model context: its id and transfer syntax.
    fn commitment_context(&self) -> Option<(u8, String)> {
        self.assoc
            .presentation_contexts()
            .iter()
            .find(|pc| {
                pc.reason == PresentationContextResultReason::Acceptance
                    && pc.abstract_syntax.trim_end_matches('\0') == STORAGE_COMMITMENT_PUSH
            })
            .map(|pc| (pc.id, pc.transfer_syntax.trim_end_matches('\0').to_owned()))
    }

    fn accepted(&self, class: &str, ts: &str) -> Option<u8> {
        self.assoc
            .presentation_contexts()
            .iter()
            .find(|pc| {
                pc.reason == PresentationContextResultReason::Acceptance
                    && pc.abstract_syntax.trim_end_matches('\0') == class
                    && pc.transfer_syntax.trim_end_matches('\0') == ts
            })
            .map(|pc| pc.id)
    }
}

async fn open(dest: &Destination, pairs: Vec<(String, String)>) -> Result<Link, ForwardError> {
    let mut options = ClientAssociationOptions::new()
        .calling_ae_title(dest.calling_ae.clone())
        .called_ae_title(dest.ae_title.clone())
        .read_timeout(READ_TIMEOUT)
        .write_timeout(dest.timeout)
        .connection_timeout(dest.timeout);
    for (class, ts) in &pairs {
        options = options.with_presentation_context(class.clone(), vec![ts.clone()]);
    }
    if dest.storage_commitment {
        options = options.with_presentation_context(
            STORAGE_COMMITMENT_PUSH,
            vec![
                crate::commitment::EXPLICIT_VR_LE,
                crate::commitment::IMPLICIT_VR_LE,
            ],
        );
    }
    // The connect within the timeout, then the A-ASSOCIATE-AC within the timeout.
    let within = dest.timeout * 2;
    let assoc = crate::pacs::establish(options, dest.addr, dest.tls.as_ref(), within)
        .await
        .map_err(|e| match e {
            EstablishError::Associate(e) => ForwardError::Associate(e),
            EstablishError::Timeout(t) => ForwardError::AssociateTimeout(t),
            EstablishError::TlsRefused { addr, reason } => {
                ForwardError::TlsRefused { addr, reason }
            }
            EstablishError::TlsFiles(e) => ForwardError::TlsFiles(e),
        })?;
    Ok(Link {
        assoc,
        timeout: dest.timeout,
        pairs,
        idle_since: std::time::Instant::now(),
    })
}

/// Sends a batch over one association and releases it; returns each instance's outcome, in
/// order, as far as the association lasted (an error ends the batch: the rest stays queued).
/// Unwatched: see [`send_on`] for the forwarder's sends.
pub async fn send_batch(
    dest: &Destination,
    batch: &[Outgoing],
) -> (Vec<(i64, Outcome)>, Option<ForwardError>) {
    let (outcomes, error, link, _) = send_on(dest, batch, None, &Stop::never()).await;
    if let Some(link) = link {
        link.close().await;
    }
    (outcomes, error)
}

/// What [`send_on`] came to: each instance's outcome as far as it went, the error that ended
/// it, the association (still open) unless it failed, and how many were opened.
pub type Sent = (Vec<(i64, Outcome)>, Option<ForwardError>, Option<Link>, u32);

/// The (SOP class, transfer syntax) pairs of `batch`, in order, at most 127 (the most one
/// association can propose).
fn pairs_of(batch: &[Outgoing]) -> Vec<(String, String)> {
    let mut pairs: Vec<(String, String)> = Vec::new();
    for q in batch.iter().map(|o| &o.queued) {
        let pair = (q.meta.sop_class.clone(), q.meta.transfer_syntax.clone());
        if !pairs.contains(&pair) {
            pairs.push(pair);
        }
    }
    pairs.truncate(127);
    pairs
}

/// A round's instances, shared by its associations: each association takes the next one
/// when it is free. An association that is slow to open, or refused, leaves its share to
/// the others instead of holding it.
#[derive(Debug)]
pub struct Work {
    queue: std::sync::Mutex<VecDeque<Outgoing>>,
    /// Each instance's SOP class and instance, by queue id (for a commitment request).
    references: std::collections::HashMap<i64, Reference>,
    pairs: Vec<(String, String)>,
    /// How many associations are sending (established, taking work).
    sending: tokio::sync::watch::Sender<usize>,
    /// With a commitment destination: where what is stored is recorded before its
    /// commitment is asked for.
    commit: Option<Commit>,
}

/// Where a commitment destination's stored instances are recorded, before their
/// commitment is asked for: the PACS's report may arrive before its N-ACTION-RSP is read,
/// and must find them waiting under their transaction.
#[derive(Debug, Clone)]
pub struct Commit {
    pub spool: Spool,
    /// How long to wait for the commitment before an instance is sent again.
    pub resend_after: Duration,
}

impl Work {
    pub fn new(batch: &[Outgoing]) -> Work {
        Work {
            queue: std::sync::Mutex::new(batch.iter().cloned().collect()),
            references: batch
                .iter()
                .map(|o| {
                    let m = &o.queued.meta;
                    (
                        o.queued.id,
                        Reference {
                            sop_class: m.sop_class.clone(),
                            sop_instance: m.sop_instance.clone(),
                        },
                    )
                })
                .collect(),
            pairs: pairs_of(batch),
            sending: tokio::sync::watch::Sender::new(0),
            commit: None,
        }
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, VecDeque<Outgoing>> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn take(&self) -> Option<Outgoing> {
        self.queue().pop_front()
    }

    fn put_back(&self, out: Outgoing) {
        self.queue().push_front(out);
    }

    /// Resolves once every instance was taken and no association is sending any more (the
    /// others did the work), then `grace` later.
    async fn done_then(&self, grace: Duration) {
        let mut rx = self.sending.subscribe();
        loop {
            let idle = *rx.borrow_and_update() == 0;
            if idle && self.queue().is_empty() {
                break;
            }
            if rx.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
        tokio::time::sleep(grace).await;
    }
}

/// How long an association still opening may wait once the others have sent everything: a
/// PACS answers an A-ASSOCIATE-RQ in milliseconds, one serving a single association at a
/// time (dcmtk storescp without `--fork`) never does while ours is open.
pub const OPEN_GRACE: Duration = Duration::from_secs(2);

/// How an association of a round came about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opening {
    /// An association kept from an earlier round.
    Reused,
    /// A new association.
    Opened,
    /// Refused (TCP or A-ASSOCIATE-RJ), aborted or timed out while opening.
    Failed,
    /// Still waiting for the A-ASSOCIATE-AC when the others had sent everything
    /// ([`OPEN_GRACE`] later): given up.
    Abandoned,
    /// The service stopped while it was opening.
    Stopped,
}

/// What one association of a round came to.
#[derive(Debug)]
pub struct Share {
    pub outcomes: Vec<(i64, Outcome)>,
    /// The storage commitment asked for what this association delivered (with a
    /// commitment destination).
    pub commitment: Option<Requested>,
    pub error: Option<ForwardError>,
    pub link: Option<Link>,
    pub opened: u32,
    pub opening: Opening,
}

/// As [`send_batch`], on `link` when it accepted every (SOP class, transfer syntax) of the
/// batch (else on a new association); the association stays open for the
/// next batch. A reused association that fails before the first instance went (the PACS
/// closed it while idle) is replaced by a new one once.
///
/// `stop` says whose instances may no longer be sent: those are skipped
/// ([`Outcome::Stopped`]); when one is being transferred, the association is aborted and
/// the rest of the batch stays queued (no outcome, no error).
pub async fn send_on(
    dest: &Destination,
    batch: &[Outgoing],
    link: Option<Link>,
    stop: &Stop,
) -> Sent {
    let share = send_share(dest, &Work::new(batch), link, stop, false).await;
    (share.outcomes, share.error, share.link, share.opened)
}

/// One association's part of `work`: on `link` if it covers the work's pairs, else on a
/// new association. With `extra` (other associations take the same work), an association
/// still opening when the work is done is given up [`OPEN_GRACE`] later.
pub async fn send_share(
    dest: &Destination,
    work: &Work,
    link: Option<Link>,
    stop: &Stop,
    extra: bool,
) -> Share {
    let mut share = Share {
        outcomes: Vec::new(),
        commitment: None,
        error: None,
        link: None,
        opened: 0,
        opening: Opening::Reused,
    };
    // Reused only where every pair was accepted: a refusal is only ever taken from a fresh
    // negotiation (the PACS's configuration may have changed since).
    let reusable = link.filter(|l| work.pairs.iter().all(|p| l.accepted(&p.0, &p.1).is_some()));
    let link = match reusable {
        Some(l) => l,
        None => match open_for(dest, work, stop, extra, &mut share).await {
            Some(l) => l,
            None => return share,
        },
    };
    let reused = share.opening == Opening::Reused;
    let (outcomes, error, link, unfinished) = send_all(link, work, stop).await;
    if reused && outcomes.is_empty() && error.is_some() && !stop.shutting_down() {
        // The PACS closed the kept association while it was idle: once more, on a new one.
        if let Some(out) = unfinished {
            work.put_back(out);
        }
        let Some(l) = open_for(dest, work, stop, extra, &mut share).await else {
            return share;
        };
        let (o, e, l, _) = send_all(l, work, stop).await;
        share.outcomes = o;
        share.error = e;
        share.link = l;
        ask_commitment(dest, work, stop, &mut share).await;
        return share;
    }
    share.outcomes = outcomes;
    share.error = error;
    share.link = link;
    ask_commitment(dest, work, stop, &mut share).await;
    share
}

/// A storage commitment asked for (or not) by one association.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requested {
    /// The queue ids of the instances it delivered.
    pub ids: Vec<i64>,
    /// The transaction the PACS accepted, or why none was asked for (they are sent again
    /// when the commitment timeout runs out).
    pub transaction: Result<String, String>,
    /// Whether they were recorded in the spool as stored (under the transaction) before it
    /// was asked for; else [`record`] records them.
    pub recorded: bool,
}

/// With a commitment destination: asks the PACS, on the share's association, to commit
/// what the share delivered (one N-ACTION-RQ). With the work's [`Commit`], the instances
/// are first recorded in the spool as stored under the new transaction (one transaction of
/// the spool's), so that a report arriving at once finds them. An association that fails
/// while asking is dropped.
async fn ask_commitment(dest: &Destination, work: &Work, stop: &Stop, share: &mut Share) {
    if !dest.storage_commitment || stop.shutting_down() {
        return;
    }
    let ids: Vec<i64> = share
        .outcomes
        .iter()
        .filter(|(_, o)| matches!(o, Outcome::Delivered(_)))
        .map(|(id, _)| *id)
        .collect();
    if ids.is_empty() {
        return;
    }
    let refs: Vec<Reference> = ids
        .iter()
        .filter_map(|id| work.references.get(id).cloned())
        .collect();
    let not_asked = |reason: String| Requested {
        ids: ids.clone(),
        transaction: Err(reason),
        recorded: false,
    };
    let Some(link) = share.link.as_mut() else {
        share.commitment = Some(not_asked(match &share.error {
            Some(e) => format!(
                "the association ended before the commitment was asked for: {}",
                tsunagi_runtime::child::error_chain(e)
            ),
            None => "the association ended before the commitment was asked for".to_owned(),
        }));
        return;
    };
    let Some((pc_id, ts)) = link.commitment_context() else {
        share.commitment = Some(not_asked(
            "the network PACS does not accept storage commitment (Storage Commitment Push Model not accepted)".to_owned(),
        ));
        return;
    };
    let transaction = crate::commitment::new_transaction_uid();
    let mut recorded = false;
    if let Some(commit) = &work.commit {
        let (spool, tx, ids) = (commit.spool.clone(), transaction.clone(), ids.clone());
        let now = crate::now();
        let resend_at =
            now.saturating_add(i64::try_from(commit.resend_after.as_secs()).unwrap_or(i64::MAX));
        let saved =
            tokio::task::spawn_blocking(move || spool.stored(&ids, Some(&tx), now, resend_at))
                .await;
        match saved {
            Ok(Ok(())) => recorded = true,
            Ok(Err(e)) => {
                share.commitment = Some(not_asked(format!(
                    "cannot record the stored instances: {}",
                    tsunagi_runtime::child::error_chain(&e)
                )));
                return;
            }
            Err(_) => {
                share.commitment = Some(not_asked(
                    "recording the stored instances did not finish".to_owned(),
                ));
                return;
            }
        }
    }
    let asked = unless_shutdown(
        stop,
        request_commitment(link, pc_id, &ts, &transaction, &refs),
    )
    .await;
    let result = match asked {
        Some(Ok(())) => Ok(transaction),
        Some(Err(why)) => {
            if why.dropped
                && let Some(l) = share.link.take()
            {
                reset(l);
            }
            Err(why.reason)
        }
        None => {
            if let Some(l) = share.link.take() {
                reset(l);
            }
            Err("the service stopped while the commitment was asked for".to_owned())
        }
    };
    share.commitment = Some(Requested {
        ids,
        transaction: result,
        recorded,
    });
}

/// Why a commitment request failed, and whether the association is unusable after it.
struct NotAsked {
    reason: String,
    dropped: bool,
}

/// The message ID of a commitment request (C-STOREs count up from 1 on each association).
const COMMITMENT_MESSAGE_ID: u16 = 0xFFFF;

/// Sends the N-ACTION-RQ (Request Storage Commitment) of `transaction` for `refs` on the
/// presentation context `pc_id` (transfer syntax `ts`) and reads its response: `Ok` once
/// the PACS answered success.
async fn request_commitment(
    link: &mut Link,
    pc_id: u8,
    ts: &str,
    transaction: &str,
    refs: &[Reference],
) -> Result<(), NotAsked> {
    let data = crate::commitment::request(transaction, refs, ts).map_err(|e| NotAsked {
        reason: e.to_string(),
        dropped: false,
    })?;
    let failed = |e: ForwardError| NotAsked {
        reason: format!(
            "the storage commitment request failed: {}",
            tsunagi_runtime::child::error_chain(&e)
        ),
        dropped: true,
    };
    let rq = Command::n_action(
        COMMITMENT_MESSAGE_ID,
        STORAGE_COMMITMENT_PUSH,
        STORAGE_COMMITMENT_PUSH_INSTANCE,
        1,
    );
    let timeout = link.timeout;
    let exchange = async {
        send(
            &mut link.assoc,
            pc_id,
            PDataValueType::Command,
            true,
            rq.encode(),
        )
        .await
        .map_err(ForwardError::Association)?;
        send_fragments(&mut link.assoc, pc_id, &data).await?;
        read_response(&mut link.assoc).await
    };
    let rsp = tokio::time::timeout(timeout, exchange)
        .await
        .unwrap_or(Err(ForwardError::ResponseTimeout(timeout)))
        .map_err(failed)?;
    link.idle_since = std::time::Instant::now();
    match rsp.status {
        Some(status)
            if rsp.field == CommandField::NActionRsp
                && rsp.responding_to == Some(COMMITMENT_MESSAGE_ID)
                && matches!(status.class(), Class::Success | Class::Warning) =>
        {
            Ok(())
        }
        Some(status) if rsp.field == CommandField::NActionRsp => Err(NotAsked {
            reason: format!("the network PACS refused the storage commitment request: {status}"),
            dropped: false,
        }),
        _ => Err(failed(ForwardError::Protocol)),
    }
}

/// Sends `data` as one message's data set, in P-DATA fragments of the peer's maximum length.
async fn send_fragments<A>(assoc: &mut A, pc_id: u8, data: &[u8]) -> Result<(), ForwardError>
where
    A: Peer,
{
    let chunk = fragment_size(assoc.peer_max_pdu());
    let mut pieces = data.chunks(chunk).peekable();
    if pieces.peek().is_none() {
        return send(assoc, pc_id, PDataValueType::Data, true, Vec::new())
            .await
            .map_err(ForwardError::Association);
    }
    while let Some(piece) = pieces.next() {
        let last = pieces.peek().is_none();
        send(assoc, pc_id, PDataValueType::Data, last, piece.to_vec())
            .await
            .map_err(ForwardError::Association)?;
    }
    Ok(())
}

/// A fragment's size for a peer's maximum PDU length (0: unlimited, taken as 64 KiB).
fn fragment_size(max_pdu: u32) -> usize {
    let max = match max_pdu {
        0 => 64 * 1024,
        n => n.min(1 << 20),
    };
    usize::try_from(max.saturating_sub(6))
        .unwrap_or(16 * 1024)
        .max(1024)
}

/// Opens an association for `work`, recording how in `share`; `None` when it did not open.
async fn open_for(
    dest: &Destination,
    work: &Work,
    stop: &Stop,
    extra: bool,
    share: &mut Share,
) -> Option<Link> {
    share.opened += 1;
    let given_up = async {
        if extra {
            work.done_then(OPEN_GRACE).await
        } else {
            std::future::pending().await
        }
    };
    let opened = tokio::select! {
        biased;
        () = stop.until_shutdown() => {
            // A connect or an A-ASSOCIATE-AC pending: it all stays queued.
            share.opening = Opening::Stopped;
            return None;
        }
        () = given_up => {
            share.opening = Opening::Abandoned;
            return None;
        }
        opened = open(dest, work.pairs.clone()) => opened,
    };
    match opened {
        Ok(l) => {
            share.opening = Opening::Opened;
            Some(l)
        }
        Err(ForwardError::Associate(
            dicom_ul::association::Error::NoAcceptedPresentationContexts { .. },
        )) => {
            // An answer, not a failure: the PACS takes none of the round's (SOP class,
            // transfer syntax) pairs, so each of those instances is refused.
            share.opening = Opening::Opened;
            while let Some(out) = work.take() {
                let q = &out.queued;
                let pair = (q.meta.sop_class.clone(), q.meta.transfer_syntax.clone());
                if work.pairs.contains(&pair) {
                    share.outcomes.push((q.id, Outcome::NotAccepted));
                }
            }
            None
        }
        Err(e) => {
            share.opening = Opening::Failed;
            share.error = Some(e);
            None
        }
    }
}

/// `work`, unless the service stops first (`None`: it was dropped where it was waiting).
async fn unless_shutdown<F: Future>(stop: &Stop, work: F) -> Option<F::Output> {
    tokio::select! {
        biased;
        () = stop.until_shutdown() => None,
        done = work => Some(done),
    }
}

/// Ends an association at a stop without waiting for the peer: a TCP reset (no A-ABORT,
/// whose write could wait on a peer that reads nothing). A partial instance is discarded by
/// the PACS with the association.
fn reset(mut link: Link) {
    let _ = link.assoc.tcp().set_zero_linger();
    drop(link);
}

/// Counts an association as sending while it lives.
struct Sending<'a>(&'a Work);

impl<'a> Sending<'a> {
    fn new(work: &'a Work) -> Sending<'a> {
        work.sending.send_modify(|n| *n += 1);
        Sending(work)
    }
}

impl Drop for Sending<'_> {
    fn drop(&mut self) {
        self.0.sending.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// Sends what `work` holds on `link` until it is empty; returns the outcomes, the error that
/// ended the association, the association (still open) unless it ended, and the instance
/// taken but left without an outcome by an error.
async fn send_all(
    mut link: Link,
    work: &Work,
    stop: &Stop,
) -> (
    Vec<(i64, Outcome)>,
    Option<ForwardError>,
    Option<Link>,
    Option<Outgoing>,
) {
    let _sending = Sending::new(work);
    let mut outcomes = Vec::new();
    let mut message_id: u16 = 0;
    loop {
        if stop.shutting_down() {
            // Between two instances: the rest stays queued; the association is intact.
            break;
        }
        let Some(out) = work.take() else { break };
        let q = &out.queued;
        let patient = q.meta.patient_id.as_deref().unwrap_or_default();
        if stop.stopped(patient) {
            outcomes.push((q.id, Outcome::Stopped));
            continue;
        }
        let pair = (q.meta.sop_class.clone(), q.meta.transfer_syntax.clone());
        let Some(pc_id) = link.accepted(&pair.0, &pair.1) else {
            if link.pairs.contains(&pair) {
                outcomes.push((q.id, Outcome::NotAccepted));
            }
            // Else not proposed (more than 127 pairs in the round): it stays queued for a
            // later round.
            continue;
        };
        message_id = message_id.wrapping_add(1);
        let sent = send_instance(
            &mut link.assoc,
            pc_id,
            message_id,
            &out,
            Some((stop, patient)),
        )
        .await;
        let result = match sent {
            Ok(Progress::Sent) => {
                let budget = response_budget(link.timeout, q.size);
                let response = async {
                    tokio::time::timeout(budget, read_status(&mut link.assoc))
                        .await
                        .unwrap_or(Err(ForwardError::ResponseTimeout(budget)))
                };
                let status = unless_shutdown(stop, response).await;
                let Some(status) = status else {
                    // The response is pending: whether the PACS stored it is unknown, so it
                    // stays queued (sent again later; the PACS de-duplicates by SOP
                    // Instance UID).
                    reset(link);
                    return (outcomes, None, None, None);
                };
                status
            }
            Ok(Progress::ShutDown) => {
                // Part of the instance went: it stays queued.
                reset(link);
                return (outcomes, None, None, None);
            }
            Ok(Progress::StoppedBetween) => {
                // Part of the instance went: the PACS discards it with the association.
                outcomes.push((q.id, Outcome::Stopped));
                let _ = unless_shutdown(stop, link.assoc.abort()).await;
                return (outcomes, None, None, None);
            }
            Ok(Progress::StoppedWithin) => {
                // In the middle of a PDU: no other PDU may follow (its bytes could complete
                // this one). A reset ends the connection without another byte.
                outcomes.push((q.id, Outcome::Stopped));
                let _ = link.assoc.tcp().set_zero_linger();
                drop(link);
                return (outcomes, None, None, None);
            }
            Err(e) => Err(e),
        };
        match result {
            Ok(status) if matches!(status.class(), Class::Success | Class::Warning) => {
                outcomes.push((q.id, Outcome::Delivered(status)))
            }
            Ok(status) if status.is_transient() => {
                outcomes.push((q.id, Outcome::Busy(status)));
                if matches!(status.0, 0xA700..=0xA7FF) {
                    // The PACS is out of resources: this association takes no more; the
                    // rest waits (with the forwarder's backoff).
                    link.idle_since = std::time::Instant::now();
                    return (outcomes, Some(ForwardError::Busy(status)), Some(link), None);
                }
            }
            Ok(status) => outcomes.push((q.id, Outcome::Refused(status))),
            Err(e) => {
                let _ = unless_shutdown(stop, link.assoc.abort()).await;
                return (outcomes, Some(e), None, Some(out));
            }
        }
    }
    link.idle_since = std::time::Instant::now();
    (outcomes, None, Some(link), None)
}

/// What a round's associations came to ([`send_parallel`]).
#[derive(Debug, Default)]
pub struct Spread {
    /// Each instance's outcome, as far as its association went (the others stay queued).
    pub outcomes: Vec<(i64, Outcome)>,
    /// The first error (its chain), if any: the instances without an outcome are retried
    /// later. An association that failed to open while another one sent is not an error
    /// here (it is counted in `failed`).
    pub error: Option<String>,
    /// Associations opened (tried).
    pub opened: u64,
    /// Associations that sent (reused or opened).
    pub worked: usize,
    /// Associations that failed to open, or were given up, while another one sent.
    pub failed: usize,
    /// A share's task panicked (a bug): how.
    pub panicked: Option<String>,
    /// The storage commitments asked for (or not), one per association that delivered.
    pub commitments: Vec<Requested>,
    /// The PACS refused over DICOM TLS (its address, why), for the audit trail.
    pub refused: Option<(String, String)>,
}

/// A TLS refusal in `error`, as (the peer's address, why).
fn refusal(error: &ForwardError) -> Option<(String, String)> {
    match error {
        ForwardError::TlsRefused { addr, reason } => Some((addr.to_string(), reason.clone())),
        _ => None,
    }
}

/// Sends `batch` over up to `n` associations at once, each taking the next instance when it
/// is free, reusing the open ones in `links` and keeping them there afterwards, each
/// watched by `stop`; with a commitment destination, `commit` is where each association
/// records what it stored before it asks for the commitment.
pub async fn send_parallel(
    dest: &Destination,
    batch: &[Outgoing],
    n: usize,
    links: &mut Vec<Link>,
    stop: &Stop,
    commit: Option<&Commit>,
) -> Spread {
    let n = n.clamp(1, batch.len().max(1));
    let mut work = Work::new(batch);
    work.commit = commit.cloned();
    let work = std::sync::Arc::new(work);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..n {
        let dest = dest.clone();
        let link = links.pop();
        let stop = stop.clone();
        let work = work.clone();
        tasks.spawn(async move { send_share(&dest, &work, link, &stop, n > 1).await });
    }
    let mut spread = Spread::default();
    let mut open_errors = Vec::new();
    while let Some(done) = tasks.join_next().await {
        match done {
            Ok(share) => {
                spread.outcomes.extend(share.outcomes);
                spread.commitments.extend(share.commitment);
                spread.opened += u64::from(share.opened);
                match share.opening {
                    Opening::Reused | Opening::Opened => spread.worked += 1,
                    Opening::Failed => {
                        if let Some(e) = share.error {
                            spread.refused = spread.refused.take().or_else(|| refusal(&e));
                            open_errors.push(e);
                        }
                        spread.failed += 1;
                        continue;
                    }
                    Opening::Abandoned => {
                        spread.failed += 1;
                        continue;
                    }
                    Opening::Stopped => {}
                }
                if let Some(e) = &share.error {
                    spread.refused = spread.refused.take().or_else(|| refusal(e));
                }
                if spread.error.is_none() {
                    spread.error = share.error.map(|e| tsunagi_runtime::child::error_chain(&e));
                }
                links.extend(share.link);
            }
            Err(e) => {
                spread.panicked = Some(if e.is_panic() {
                    tsunagi_runtime::tasks::panicked(&*e.into_panic())
                } else {
                    "was cancelled".to_owned()
                })
            }
        }
    }
    if spread.worked == 0 {
        // None opened: that is the round's error (the PACS is down or refuses us), not a
        // lower parallelism.
        spread.failed = 0;
        if spread.error.is_none() {
            spread.error = open_errors
                .first()
                .map(|e| tsunagi_runtime::child::error_chain(e));
        }
    }
    spread
}

/// One C-STORE on an association: the instance (its rewritten start, if any, then the
/// spooled bytes) in P-DATA fragments of the peer's maximum length; returns the status the
/// peer answered. On the box's own associations and on a viewer's (C-GET).
pub async fn store_one<A>(
    assoc: &mut A,
    pc_id: u8,
    message_id: u16,
    out: &Outgoing,
) -> Result<Status, ForwardError>
where
    A: Peer,
{
    send_instance(assoc, pc_id, message_id, out, None).await?;
    read_status(assoc).await
}

/// How far sending one instance went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Progress {
    /// All of it: the response follows.
    Sent,
    /// Stopped between two PDUs, after some of it went.
    StoppedBetween,
    /// Stopped while a PDU was being written (part of it went).
    StoppedWithin,
    /// The service is stopping: between or during its PDUs (part of it may have gone).
    ShutDown,
}

/// Sends the C-STORE request and the instance; with `watch`, stops as soon as that patient
/// may no longer be sent (checked before every PDU, and while one is being written).
async fn send_instance<A>(
    assoc: &mut A,
    pc_id: u8,
    message_id: u16,
    out: &Outgoing,
    watch: Option<(&Stop, &str)>,
) -> Result<Progress, ForwardError>
where
    A: Peer,
{
    let q = &out.queued;
    let rq = Command::store(message_id, &q.meta.sop_class, &q.meta.sop_instance);
    let command = send(assoc, pc_id, PDataValueType::Command, true, rq.encode());
    match watch {
        Some((stop, _)) => tokio::select! {
            biased;
            sent = command => sent.map_err(ForwardError::Association)?,
            () = stop.until_shutdown() => return Ok(Progress::ShutDown),
        },
        None => command.await.map_err(ForwardError::Association)?,
    }
    let chunk = fragment_size(assoc.peer_max_pdu());
    let mut file = tokio::fs::File::open(&q.path)
        .await
        .map_err(ForwardError::Read)?;
    // The rewritten start first, then the spooled bytes from where it ends.
    let (head, from): (&[u8], u64) = match &out.head {
        Some(r) if r.rest_from <= q.size => (&r.head, r.rest_from),
        Some(_) => {
            return Err(ForwardError::Read(std::io::Error::other(
                "rewrite past the end",
            )));
        }
        None => (&[], 0),
    };
    // In a segment, the data set starts at its record's offset.
    if q.offset + from > 0 {
        use tokio::io::AsyncSeekExt as _;
        file.seek(std::io::SeekFrom::Start(q.offset + from))
            .await
            .map_err(ForwardError::Read)?;
    }
    let mut head = head;
    let mut left = head.len() as u64 + (q.size - from);
    let mut buf = vec![0u8; chunk];
    loop {
        let want = usize::try_from(left.min(chunk as u64)).unwrap_or(chunk);
        let from_head = want.min(head.len());
        buf[..from_head].copy_from_slice(&head[..from_head]);
        head = &head[from_head..];
        file.read_exact(&mut buf[from_head..want])
            .await
            .map_err(ForwardError::Read)?;
        left -= want as u64;
        let fragment = send(
            assoc,
            pc_id,
            PDataValueType::Data,
            left == 0,
            buf[..want].to_vec(),
        );
        match watch {
            None => fragment.await.map_err(ForwardError::Association)?,
            Some((stop, patient)) => {
                if stop.shutting_down() {
                    return Ok(Progress::ShutDown);
                }
                if stop.stopped(patient) {
                    return Ok(Progress::StoppedBetween);
                }
                // The write first: when both are ready, the fragment that went is not undone.
                tokio::select! {
                    biased;
                    sent = fragment => sent.map_err(ForwardError::Association)?,
                    () = stop.until_stopped(patient) => return Ok(Progress::StoppedWithin),
                    () = stop.until_shutdown() => return Ok(Progress::ShutDown),
                }
            }
        }
        if left == 0 {
            break;
        }
    }
    Ok(Progress::Sent)
}

/// Reads a C-STORE response; its status.
async fn read_status<A>(assoc: &mut A) -> Result<Status, ForwardError>
where
    A: Peer,
{
    let rsp = read_response(assoc).await?;
    rsp.status.ok_or(ForwardError::Protocol)
}

/// Reads a response command (without a data set).
async fn read_response<A>(assoc: &mut A) -> Result<Command, ForwardError>
where
    A: Peer,
{
    // The response (its command may come in fragments).
    let mut command = crate::CommandBuf::default();
    loop {
        match assoc
            .receive_pdu()
            .await
            .map_err(ForwardError::Association)?
        {
            Pdu::PData { data } => {
                for pdv in data {
                    if pdv.value_type == PDataValueType::Command
                        && let Some(rsp) =
                            command.push(&pdv).map_err(|()| ForwardError::Protocol)?
                    {
                        if !rsp.field.is_response() || rsp.has_dataset {
                            return Err(ForwardError::Protocol);
                        }
                        return Ok(rsp);
                    }
                }
            }
            _ => return Err(ForwardError::Protocol),
        }
    }
}

pub(crate) async fn send<A: Peer>(
    assoc: &mut A,
    pc_id: u8,
    kind: PDataValueType,
    last: bool,
    data: Vec<u8>,
) -> Result<(), dicom_ul::association::Error> {
    assoc.send_pdu(&crate::pdata(pc_id, kind, last, data)).await
}

/// With storage commitment: the commitments asked for, and how long to wait for one
/// before an instance is sent again (seconds).
#[derive(Debug, Clone, Copy)]
pub struct Committing<'a> {
    pub requested: &'a [Requested],
    pub resend_after: i64,
}

/// Applies a batch's outcomes to the spool at `now` (Unix seconds); returns how many were
/// delivered (stored at the PACS). With `committing`, a delivered instance stays in the
/// spool until the PACS commits it ([`Spool::stored`]); else it leaves at once.
pub fn record(
    spool: &Spool,
    outcomes: &[(i64, Outcome)],
    now: i64,
    committing: Option<Committing<'_>>,
) -> Result<usize, crate::spool::SpoolError> {
    let mut delivered = 0;
    for (id, outcome) in outcomes {
        match outcome {
            Outcome::Delivered(_) => {
                match committing {
                    None => spool.delivered(*id)?,
                    // Recorded already, before its commitment was asked for.
                    Some(c) if c.requested.iter().any(|r| r.recorded && r.ids.contains(id)) => {}
                    // Stored, but no commitment asked for: sent again at the timeout.
                    Some(c) => {
                        spool.stored(&[*id], None, now, now.saturating_add(c.resend_after))?
                    }
                }
                delivered += 1;
            }
            Outcome::Refused(status) => {
                spool.fail(*id, &format!("{}{status}", crate::desk::PACS_REFUSED))?
            }
            Outcome::Busy(status) => {
                spool.retry_backoff(*id, &format!("{}{status}", crate::desk::PACS_BUSY), now)?
            }
            Outcome::NotAccepted => spool.fail(*id, crate::desk::NOT_ACCEPTED)?,
            // Still queued as it was: the next round decides it again.
            Outcome::Stopped => {}
        }
    }
    Ok(delivered)
}
