//! The forwarder: C-STORE of queued instances to the network PACS, the bytes as received
//! (the data set in the transfer syntax it came in; nothing is transcoded).
//!
//! One association carries a batch: it proposes one presentation context per (SOP class,
//! transfer syntax) of the batch, `TCP_NODELAY` on, timeouts on every PDU, and streams each
//! file in P-DATA fragments of the PACS's maximum length. Success and warning statuses are
//! delivered; failures that say the instance itself is refused (A9xxH, Cxxx, 0122H, ...)
//! mark it failed with the reason; a connection or association failure leaves the rest of
//! the batch for a retry with backoff.
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

use std::net::SocketAddr;
use std::time::Duration;

use dicom_ul::ClientAssociationOptions;
use dicom_ul::Pdu;
use dicom_ul::association::{Association, AsyncAssociation, AsyncClientAssociation};
use dicom_ul::pdu::{PDataValueType, PresentationContextResultReason};
use dimse::command::Command;
use dimse::status::{Class, Status};
use tokio::io::AsyncReadExt as _;
use tokio::net::TcpStream;

use crate::inflight::Stop;
use crate::spool::{Queued, Spool};

/// The network PACS.
#[derive(Debug, Clone)]
pub struct Destination {
    pub ae_title: String,
    pub addr: SocketAddr,
    /// Our AE title towards it.
    pub calling_ae: String,
    pub timeout: Duration,
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
    /// The PACS refused this instance (the status says why); retrying will not help.
    Refused(Status),
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
}

/// An open association to the network PACS, kept between rounds for reuse.
pub struct Link {
    assoc: AsyncClientAssociation<TcpStream>,
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

    /// Releases the association.
    pub async fn close(self) {
        let _ = self.assoc.release().await;
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
        .read_timeout(dest.timeout)
        .write_timeout(dest.timeout)
        .connection_timeout(dest.timeout);
    for (class, ts) in &pairs {
        options = options.with_presentation_context(class.clone(), vec![ts.clone()]);
    }
    let mut assoc = options
        .establish_async(dest.addr)
        .await
        .map_err(ForwardError::Associate)?;
    let _ = assoc.inner_stream().set_nodelay(true);
    Ok(Link {
        assoc,
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

/// As [`send_batch`], on `link` when it was negotiated for every (SOP class, transfer
/// syntax) of the batch (else on a new association); the association stays open for the
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
    let mut pairs: Vec<(String, String)> = Vec::new();
    for q in batch.iter().map(|o| &o.queued) {
        let pair = (q.meta.sop_class.clone(), q.meta.transfer_syntax.clone());
        if !pairs.contains(&pair) {
            pairs.push(pair);
        }
    }
    pairs.truncate(127);
    let reusable = link.filter(|l| pairs.iter().all(|p| l.pairs.contains(p)));
    let (link, mut opened) = match reusable {
        Some(l) => (l, 0),
        None => match unless_shutdown(stop, open(dest, pairs.clone())).await {
            Some(Ok(l)) => (l, 1),
            Some(Err(e)) => return (Vec::new(), Some(e), None, 1),
            // The service is stopping (a connect or an A-ASSOCIATE-AC pending): it all stays
            // queued.
            None => return (Vec::new(), None, None, 1),
        },
    };
    let reused = opened == 0;
    let (outcomes, error, link) = send_all(link, batch, stop).await;
    if reused && outcomes.is_empty() && error.is_some() && !stop.shutting_down() {
        opened += 1;
        return match unless_shutdown(stop, open(dest, pairs)).await {
            Some(Ok(l)) => {
                let (o, e, l) = send_all(l, batch, stop).await;
                (o, e, l, opened)
            }
            Some(Err(e)) => (Vec::new(), Some(e), None, opened),
            None => (Vec::new(), None, None, opened),
        };
    }
    (outcomes, error, link, opened)
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
    let _ = link.assoc.inner_stream().set_zero_linger();
    drop(link);
}

async fn send_all(
    mut link: Link,
    batch: &[Outgoing],
    stop: &Stop,
) -> (Vec<(i64, Outcome)>, Option<ForwardError>, Option<Link>) {
    let mut outcomes = Vec::new();
    let mut message_id: u16 = 0;
    for out in batch {
        let q = &out.queued;
        if stop.shutting_down() {
            // Between two instances: the rest stays queued; the association is intact.
            break;
        }
        let patient = q.meta.patient_id.as_deref().unwrap_or_default();
        if stop.stopped(patient) {
            outcomes.push((q.id, Outcome::Stopped));
            continue;
        }
        let Some(pc_id) = link.accepted(&q.meta.sop_class, &q.meta.transfer_syntax) else {
            outcomes.push((q.id, Outcome::NotAccepted));
            continue;
        };
        message_id = message_id.wrapping_add(1);
        let sent = send_instance(
            &mut link.assoc,
            pc_id,
            message_id,
            out,
            Some((stop, patient)),
        )
        .await;
        let result = match sent {
            Ok(Sending::Sent) => {
                let status = unless_shutdown(stop, read_status(&mut link.assoc)).await;
                let Some(status) = status else {
                    // The response is pending: whether the PACS stored it is unknown, so it
                    // stays queued (sent again later; the PACS de-duplicates by SOP
                    // Instance UID).
                    reset(link);
                    return (outcomes, None, None);
                };
                status
            }
            Ok(Sending::ShutDown) => {
                // Part of the instance went: it stays queued.
                reset(link);
                return (outcomes, None, None);
            }
            Ok(Sending::StoppedBetween) => {
                // Part of the instance went: the PACS discards it with the association.
                outcomes.push((q.id, Outcome::Stopped));
                let _ = unless_shutdown(stop, link.assoc.abort()).await;
                return (outcomes, None, None);
            }
            Ok(Sending::StoppedWithin) => {
                // In the middle of a PDU: no other PDU may follow (its bytes could complete
                // this one). A reset ends the connection without another byte.
                outcomes.push((q.id, Outcome::Stopped));
                let _ = link.assoc.inner_stream().set_zero_linger();
                drop(link);
                return (outcomes, None, None);
            }
            Err(e) => Err(e),
        };
        match result {
            Ok(status) if matches!(status.class(), Class::Success | Class::Warning) => {
                outcomes.push((q.id, Outcome::Delivered(status)))
            }
            Ok(status) => outcomes.push((q.id, Outcome::Refused(status))),
            Err(e) => {
                let _ = unless_shutdown(stop, link.assoc.abort()).await;
                return (outcomes, Some(e), None);
            }
        }
    }
    link.idle_since = std::time::Instant::now();
    (outcomes, None, Some(link))
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
    A: AsyncAssociation<TcpStream> + Association + Send,
{
    send_instance(assoc, pc_id, message_id, out, None).await?;
    read_status(assoc).await
}

/// How far sending one instance went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sending {
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
) -> Result<Sending, ForwardError>
where
    A: AsyncAssociation<TcpStream> + Association + Send,
{
    let q = &out.queued;
    let rq = Command::store(message_id, &q.meta.sop_class, &q.meta.sop_instance);
    let command = send(assoc, pc_id, PDataValueType::Command, true, rq.encode());
    match watch {
        Some((stop, _)) => tokio::select! {
            biased;
            sent = command => sent.map_err(ForwardError::Association)?,
            () = stop.until_shutdown() => return Ok(Sending::ShutDown),
        },
        None => command.await.map_err(ForwardError::Association)?,
    }
    let max = match Association::peer_max_pdu_length(assoc) {
        0 => 64 * 1024,
        n => n.min(1 << 20),
    };
    let chunk = usize::try_from(max.saturating_sub(6))
        .unwrap_or(16 * 1024)
        .max(1024);
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
    if from > 0 {
        use tokio::io::AsyncSeekExt as _;
        file.seek(std::io::SeekFrom::Start(from))
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
                    return Ok(Sending::ShutDown);
                }
                if stop.stopped(patient) {
                    return Ok(Sending::StoppedBetween);
                }
                // The write first: when both are ready, the fragment that went is not undone.
                tokio::select! {
                    biased;
                    sent = fragment => sent.map_err(ForwardError::Association)?,
                    () = stop.until_stopped(patient) => return Ok(Sending::StoppedWithin),
                    () = stop.until_shutdown() => return Ok(Sending::ShutDown),
                }
            }
        }
        if left == 0 {
            break;
        }
    }
    Ok(Sending::Sent)
}

/// Reads a C-STORE response; its status.
async fn read_status<A>(assoc: &mut A) -> Result<Status, ForwardError>
where
    A: AsyncAssociation<TcpStream> + Association + Send,
{
    // The response (its command may come in fragments).
    let mut command = crate::CommandBuf::default();
    loop {
        match AsyncAssociation::receive(assoc)
            .await
            .map_err(ForwardError::Association)?
        {
            Pdu::PData { data } => {
                for pdv in data {
                    if pdv.value_type == PDataValueType::Command
                        && let Some(rsp) =
                            command.push(&pdv).map_err(|()| ForwardError::Protocol)?
                    {
                        return rsp.status.ok_or(ForwardError::Protocol);
                    }
                }
            }
            _ => return Err(ForwardError::Protocol),
        }
    }
}

pub(crate) async fn send<A: AsyncAssociation<TcpStream> + Send>(
    assoc: &mut A,
    pc_id: u8,
    kind: PDataValueType,
    last: bool,
    data: Vec<u8>,
) -> Result<(), dicom_ul::association::Error> {
    AsyncAssociation::send(assoc, &crate::pdata(pc_id, kind, last, data)).await
}

/// Applies a batch's outcomes to the spool; returns how many were delivered.
pub fn record(
    spool: &Spool,
    outcomes: &[(i64, Outcome)],
) -> Result<usize, crate::spool::SpoolError> {
    let mut delivered = 0;
    for (id, outcome) in outcomes {
        match outcome {
            Outcome::Delivered(_) => {
                spool.delivered(*id)?;
                delivered += 1;
            }
            Outcome::Refused(status) => {
                spool.fail(*id, &format!("refused by the network PACS: {status}"))?
            }
            Outcome::NotAccepted => spool.fail(
                *id,
                "the network PACS accepts neither this SOP class nor its transfer syntax",
            )?,
            // Still queued as it was: the next round decides it again.
            Outcome::Stopped => {}
        }
    }
    Ok(delivered)
}
