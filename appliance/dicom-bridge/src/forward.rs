//! The forwarder: C-STORE of queued instances to the network PACS, the bytes as received
//! (the data set in the transfer syntax it came in; nothing is transcoded).
//!
//! One association carries a batch: it proposes one presentation context per (SOP class,
//! transfer syntax) of the batch, `TCP_NODELAY` on, timeouts on every PDU, and streams each
//! file in P-DATA fragments of the PACS's maximum length. Success and warning statuses are
//! delivered; failures that say the instance itself is refused (A9xxH, Cxxx, 0122H, ...)
//! mark it failed with the reason; a connection or association failure leaves the rest of
//! the batch for a retry with backoff.

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
pub async fn send_batch(
    dest: &Destination,
    batch: &[Outgoing],
) -> (Vec<(i64, Outcome)>, Option<ForwardError>) {
    let (outcomes, error, link, _) = send_on(dest, batch, None).await;
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
pub async fn send_on(dest: &Destination, batch: &[Outgoing], link: Option<Link>) -> Sent {
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
        None => match open(dest, pairs.clone()).await {
            Ok(l) => (l, 1),
            Err(e) => return (Vec::new(), Some(e), None, 1),
        },
    };
    let reused = opened == 0;
    let (outcomes, error, link) = send_all(link, batch).await;
    if reused && outcomes.is_empty() && error.is_some() {
        opened += 1;
        return match open(dest, pairs).await {
            Ok(l) => {
                let (o, e, l) = send_all(l, batch).await;
                (o, e, l, opened)
            }
            Err(e) => (Vec::new(), Some(e), None, opened),
        };
    }
    (outcomes, error, link, opened)
}

async fn send_all(
    mut link: Link,
    batch: &[Outgoing],
) -> (Vec<(i64, Outcome)>, Option<ForwardError>, Option<Link>) {
    let mut outcomes = Vec::new();
    let mut message_id: u16 = 0;
    for out in batch {
        let q = &out.queued;
        let Some(pc_id) = link.accepted(&q.meta.sop_class, &q.meta.transfer_syntax) else {
            outcomes.push((q.id, Outcome::NotAccepted));
            continue;
        };
        message_id = message_id.wrapping_add(1);
        match store_one(&mut link.assoc, pc_id, message_id, out).await {
            Ok(status) if matches!(status.class(), Class::Success | Class::Warning) => {
                outcomes.push((q.id, Outcome::Delivered(status)))
            }
            Ok(status) => outcomes.push((q.id, Outcome::Refused(status))),
            Err(e) => {
                let _ = link.assoc.abort().await;
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
    let q = &out.queued;
    let rq = Command::store(message_id, &q.meta.sop_class, &q.meta.sop_instance);
    send(assoc, pc_id, PDataValueType::Command, true, rq.encode())
        .await
        .map_err(ForwardError::Association)?;
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
        send(
            assoc,
            pc_id,
            PDataValueType::Data,
            left == 0,
            buf[..want].to_vec(),
        )
        .await
        .map_err(ForwardError::Association)?;
        if left == 0 {
            break;
        }
    }
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
        }
    }
    Ok(delivered)
}
