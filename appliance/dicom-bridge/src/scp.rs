//! The clinic-side SCP: C-ECHO, C-STORE of every storage SOP class into the spool, and
//! C-FIND / C-MOVE through the query proxy ([`crate::qr`]).
//!
//! One tokio task per association, at most `max_associations` at a time (beyond that the
//! caller gets A-ASSOCIATE-RJ "local limit exceeded"). `TCP_NODELAY` on every socket; read
//! and write timeouts on every PDU; strict PDU lengths. The called AE title must be ours; with an allow-list, the
//! calling AE title must be listed for the peer's address (else A-ASSOCIATE-RJ "calling AE
//! title not recognized"). Presentation contexts are accepted with the transfer syntaxes as
//! proposed (nothing is transcoded); a C-STORE of a SOP class that is neither a standard
//! storage SOP class ([`is_standard_storage`]) nor configured (`extra-sop-classes`) is
//! answered 0122H "SOP class not supported" and nothing is stored.
//!
//! A data set is streamed PDU by PDU into the spool; the C-STORE-RSP success is sent only
//! after [`crate::spool::Incoming::commit`] returned. The spool full: A700, and the
//! association goes on. The command's Affected SOP Instance UID must match (0008,0018) in the
//! data set, else A900 and nothing is stored. An abort or a dropped connection mid-transfer
//! leaves nothing. Other commands are answered "unrecognized operation" (0211H).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use dicom_ul::association::server::AccessControl;
use dicom_ul::pdu::{AssociationRJServiceUserReason, PDataValueType, UserIdentity};
use dicom_ul::{Pdu, ServerAssociationOptions};
use dimse::command::{Command, CommandField};
use dimse::status::Status;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tsunagi_runtime::listen::{self, Admission, Limits, STOP_DRAIN, ServeError};

use crate::spool::{Incoming, Meta, Spool, SpoolError};

/// What the SCP needs.
#[derive(Debug, Clone)]
pub struct Settings {
    pub ae_title: String,
    pub max_pdu: u32,
    pub timeout: Duration,
    pub max_associations: usize,
    /// Calling AE titles and the addresses they may come from; `None`: anyone.
    pub allowed: Option<Vec<(String, IpAddr)>>,
    /// The query proxy for viewers; `None`: C-FIND is an unrecognized operation.
    pub proxy: Option<Arc<crate::qr::Proxy>>,
    /// SOP classes stored besides the standard storage SOP classes (e.g. a vendor's private
    /// ones).
    pub extra_sop_classes: Vec<String>,
    /// How far into a data set its patient elements may lie, in bytes
    /// ([`crate::walk::Walker`]).
    pub header_limit: u64,
    /// With storage commitment: the network PACS's AE titles and addresses (its own, or
    /// `commitment-reports-from`), the only callers whose N-EVENT-REPORT (a commitment
    /// report) is taken; empty without storage commitment. They may associate even when
    /// they are not in `allowed`, for that and C-ECHO only.
    pub commitment_from: Vec<(String, IpAddr)>,
    /// Commitment reports refused because they did not come from the network PACS (its AE
    /// title at its address), for the status: a PACS that reports from elsewhere never
    /// commits anything.
    pub refused_reports: Arc<std::sync::atomic::AtomicU64>,
    /// Associations from the clinic being served now (status: `associations_inbound_active`;
    /// the update installer reboots the box only when there are none).
    pub active: Arc<std::sync::atomic::AtomicUsize>,
}

/// Counts one association in [`Settings::active`] while it lives.
struct Active(Arc<std::sync::atomic::AtomicUsize>);

impl Active {
    fn new(count: &Arc<std::sync::atomic::AtomicUsize>) -> Active {
        count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Active(count.clone())
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// The DICOMDIR's SOP class: a file-set directory, never sent over the network.
const MEDIA_STORAGE_DIRECTORY: &str = "1.2.840.10008.1.3.10";

/// Whether `uid` is a standard storage SOP class: every SOP class the standard's registry
/// (PS3.6 Annex A, as dicom-rs carries it) names "... Storage" (retired, trial and "For
/// Processing" ones included), but not Storage Commitment, the DICOMDIR, or the retired print
/// "Storage SOP Class"es.
pub fn is_standard_storage(uid: &str) -> bool {
    use dicom_core::dictionary::UidDictionary as _;
    dicom_dictionary_std::StandardSopClassDictionary
        .by_uid(uid)
        .is_some_and(|e| {
            e.name.contains("Storage")
                && !e.name.contains("SOP Class")
                && !e.name.starts_with("Storage Commitment")
                && e.uid != MEDIA_STORAGE_DIRECTORY
        })
}

/// The A-ASSOCIATE-RJ sent at the association cap: rejected-transient (2), by the service
/// provider, presentation related (3), local limit exceeded (2) (PS3.8 §9.3.4).
const REJECT_LOCAL_LIMIT: [u8; 10] = [0x03, 0, 0, 0, 0, 4, 0, 2, 3, 2];
/// At most this many callers beyond the cap are answered A-ASSOCIATE-RJ at once; the others
/// are closed.
const MAX_REJECTING: usize = 8;

struct Access {
    peer: IpAddr,
    allowed: Option<Vec<(String, IpAddr)>>,
    commitment_from: Vec<(String, IpAddr)>,
}

/// Whether `calling` from `peer` is in the allow-list (or there is none).
fn listed(allowed: Option<&[(String, IpAddr)]>, calling: &str, peer: IpAddr) -> bool {
    allowed.is_none_or(|list| list.iter().any(|(ae, ip)| ae == calling && *ip == peer))
}

/// Whether `calling` from `peer` is the network PACS sending commitment reports.
fn is_pacs(from: &[(String, IpAddr)], calling: &str, peer: IpAddr) -> bool {
    from.iter().any(|(ae, ip)| ae == calling && *ip == peer)
}

impl AccessControl for Access {
    fn check_access(
        &self,
        this_ae_title: &str,
        calling_ae_title: &str,
        called_ae_title: &str,
        _user_identity: Option<&UserIdentity>,
    ) -> Result<(), AssociationRJServiceUserReason> {
        if this_ae_title != called_ae_title.trim() {
            return Err(AssociationRJServiceUserReason::CalledAETitleNotRecognized);
        }
        let calling = calling_ae_title.trim();
        if listed(self.allowed.as_deref(), calling, self.peer)
            || is_pacs(&self.commitment_from, calling, self.peer)
        {
            Ok(())
        } else {
            Err(AssociationRJServiceUserReason::CallingAETitleNotRecognized)
        }
    }
}

/// Accepts associations until `stop` fires (the runtime's one accept loop: it backs off on
/// accept errors such as EMFILE, owns every association's task, and aborts those still open
/// shortly after a stop). Beyond `max-associations`, a caller is answered A-ASSOCIATE-RJ
/// "local limit exceeded" (at most [`MAX_REJECTING`] such answers at once).
pub async fn serve(
    listener: TcpListener,
    settings: Arc<Settings>,
    spool: Spool,
    stop: CancellationToken,
) -> Result<(), ServeError> {
    let limits = Limits {
        max_connections: settings.max_associations.max(1),
        max_overflow: MAX_REJECTING,
        // Each association has its own per-PDU timeouts; a long study may take long.
        per_connection: None,
        drain: STOP_DRAIN,
    };
    let accept = || listener.accept();
    listen::serve(accept, limits, stop.clone(), |(socket, peer), admission| {
        let (settings, spool, stop) = (settings.clone(), spool.clone(), stop.clone());
        async move {
            let peer: SocketAddr = peer;
            match admission {
                Admission::Overflow => {
                    tracing::warn!(peer = %peer.ip(), "too many associations; rejected (local limit exceeded)");
                    let timeout = settings.timeout.min(Duration::from_secs(5));
                    let _ = tokio::time::timeout(timeout, reject(socket)).await;
                }
                Admission::Admitted => {
                    let _active = Active::new(&settings.active);
                    let span = tracing::info_span!("association", peer = %peer.ip());
                    let _ = tracing::Instrument::instrument(
                        association(socket, peer.ip(), &settings, &spool, &stop),
                        span,
                    )
                    .await;
                }
            }
        }
    })
    .await
}

/// Reads the caller's A-ASSOCIATE-RQ (bounded) and answers A-ASSOCIATE-RJ "local limit
/// exceeded", so that the caller learns why and may retry later.
async fn reject(mut socket: TcpStream) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let _ = socket.set_nodelay(true);
    let mut header = [0u8; 6];
    socket.read_exact(&mut header).await?;
    let len = u32::from_be_bytes([header[2], header[3], header[4], header[5]]);
    if header[0] != 0x01 || len > 64 * 1024 {
        return Ok(());
    }
    let mut body = vec![0u8; usize::try_from(len).unwrap_or(0)];
    socket.read_exact(&mut body).await?;
    socket.write_all(&REJECT_LOCAL_LIMIT).await?;
    socket.shutdown().await?;
    // Let the caller read it before the socket goes.
    let mut rest = [0u8; 256];
    while socket.read(&mut rest).await? > 0 {}
    Ok(())
}

/// A query identifier being received for a C-FIND.
struct Querying {
    pc_id: u8,
    command: Command,
    transfer_syntax: String,
    identifier: Vec<u8>,
    /// Who asks (for the audit trail).
    requestor: crate::qr::Requestor,
}

/// The data set being received for a C-STORE.
struct Receiving {
    pc_id: u8,
    command: Command,
    transfer_syntax: String,
    incoming: Option<Incoming>,
    /// The data set's structure and routing elements, as it streams in; `None` for a
    /// transfer syntax whose data set is not little endian VR (deflated, big endian).
    walker: Option<crate::walk::Walker>,
    failure: Option<Status>,
}

async fn send_command(
    assoc: &mut dicom_ul::association::AsyncServerAssociation<TcpStream>,
    pc_id: u8,
    c: &Command,
) -> Result<(), dicom_ul::association::Error> {
    assoc
        .send(&crate::pdata(
            pc_id,
            PDataValueType::Command,
            true,
            c.encode(),
        ))
        .await
}

async fn association(
    socket: TcpStream,
    peer: IpAddr,
    settings: &Settings,
    spool: &Spool,
    stop: &CancellationToken,
) -> Result<(), dicom_ul::association::Error> {
    let _ = socket.set_nodelay(true);
    let options = ServerAssociationOptions::new()
        .ae_access_control(Access {
            peer,
            allowed: settings.allowed.clone(),
            commitment_from: settings.commitment_from.clone(),
        })
        .ae_title(settings.ae_title.clone())
        .with_negotiation(StorageRoles {
            extra: settings.extra_sop_classes.clone(),
        })
        .promiscuous(true)
        .max_pdu_length(settings.max_pdu)
        .strict(true)
        .read_timeout(settings.timeout)
        .write_timeout(settings.timeout);
    let mut assoc = options.establish_async(socket).await?;
    let calling = dicom_ul::association::Association::peer_ae_title(&assoc)
        .trim()
        .to_owned();
    tracing::debug!(calling = %calling, "association established");
    // Admitted only as the network PACS (not in the allow-list): commitment reports and
    // C-ECHO, nothing else.
    let from_pacs = is_pacs(&settings.commitment_from, &calling, peer);
    let pacs_only = !listed(settings.allowed.as_deref(), &calling, peer);
    let mut command_buf = crate::CommandBuf::default();
    let mut receiving: Option<Receiving> = None;
    let mut querying: Option<Querying> = None;
    let mut reporting: Option<Querying> = None;
    loop {
        let pdu = tokio::select! {
            _ = stop.cancelled() => {
                let _ = assoc.abort().await;
                return Ok(());
            }
            pdu = assoc.receive() => pdu?,
        };
        match pdu {
            Pdu::PData { data } => {
                for pdv in data {
                    match pdv.value_type {
                        PDataValueType::Command => {
                            let command = match command_buf.push(&pdv) {
                                Ok(Some(c)) => c,
                                Ok(None) => continue,
                                Err(()) => {
                                    tracing::warn!(
                                        "oversized or undecodable command set; aborting"
                                    );
                                    let _ = assoc.abort().await;
                                    return Ok(());
                                }
                            };
                            let transfer_syntax = assoc
                                .presentation_contexts()
                                .iter()
                                .find(|pc| pc.id == pdv.presentation_context_id)
                                .map(|pc| pc.transfer_syntax.trim_end_matches('\0').to_owned());
                            let Some(transfer_syntax) = transfer_syntax else {
                                let _ = assoc.abort().await;
                                return Ok(());
                            };
                            match command.field {
                                CommandField::CEchoRq => {
                                    if let Some(rsp) = command.respond(Status::SUCCESS) {
                                        send_command(&mut assoc, pdv.presentation_context_id, &rsp)
                                            .await?;
                                    }
                                }
                                CommandField::CStoreRq if command.has_dataset => {
                                    let class =
                                        command.affected_sop_class.as_deref().unwrap_or_default();
                                    let known = is_standard_storage(class)
                                        || settings.extra_sop_classes.iter().any(|c| c == class);
                                    let (incoming, failure) = if pacs_only {
                                        (None, Some(Status::NOT_AUTHORIZED))
                                    } else if !known {
                                        // Read and discarded: nothing is stored.
                                        tracing::warn!(sop_class = %class, "not a storage SOP class; refused (0122H)");
                                        (None, Some(Status::SOP_CLASS_NOT_SUPPORTED))
                                    } else {
                                        match spool.begin() {
                                            Ok(mut i) => {
                                                i.set_peer(&peer.to_string());
                                                (Some(i), None)
                                            }
                                            Err(SpoolError::OutOfResources) => {
                                                (None, Some(Status::OUT_OF_RESOURCES))
                                            }
                                            Err(_) => (None, Some(Status::PROCESSING_FAILURE)),
                                        }
                                    };
                                    receiving = Some(Receiving {
                                        pc_id: pdv.presentation_context_id,
                                        command,
                                        walker: crate::translate::data_set_is_explicit(
                                            &transfer_syntax,
                                        )
                                        .map(|explicit| {
                                            crate::walk::Walker::new(
                                                explicit,
                                                settings.header_limit,
                                            )
                                        }),
                                        transfer_syntax,
                                        incoming,
                                        failure,
                                    });
                                }
                                CommandField::CFindRq
                                | CommandField::CMoveRq
                                | CommandField::CGetRq
                                    if command.has_dataset
                                        && settings.proxy.is_some()
                                        && !pacs_only =>
                                {
                                    querying = Some(Querying {
                                        pc_id: pdv.presentation_context_id,
                                        command,
                                        transfer_syntax,
                                        identifier: Vec::new(),
                                        requestor: crate::qr::Requestor {
                                            ae_title: calling.clone(),
                                            address: peer.to_string(),
                                        },
                                    });
                                }
                                CommandField::NEventReportRq if command.has_dataset => {
                                    reporting = Some(Querying {
                                        pc_id: pdv.presentation_context_id,
                                        command,
                                        transfer_syntax,
                                        identifier: Vec::new(),
                                        requestor: crate::qr::Requestor {
                                            ae_title: calling.clone(),
                                            address: peer.to_string(),
                                        },
                                    });
                                }
                                _ if command.field.is_response() => {}
                                _ => {
                                    if let Some(rsp) =
                                        command.respond(Status::UNRECOGNIZED_OPERATION)
                                    {
                                        send_command(&mut assoc, pdv.presentation_context_id, &rsp)
                                            .await?;
                                    }
                                }
                            }
                        }
                        PDataValueType::Data if reporting.is_some() => {
                            let Some(r) = reporting.as_mut() else {
                                continue;
                            };
                            if r.pc_id != pdv.presentation_context_id
                                || r.identifier.len() + pdv.data.len()
                                    > crate::commitment::MAX_REPORT
                            {
                                tracing::warn!("an oversized N-EVENT-REPORT; aborting");
                                let _ = assoc.abort().await;
                                return Ok(());
                            }
                            r.identifier.extend_from_slice(&pdv.data);
                            if pdv.is_last
                                && let Some(r) = reporting.take()
                            {
                                let status = commitment_report(&r, from_pacs, spool).await;
                                if !from_pacs && !settings.commitment_from.is_empty() {
                                    settings
                                        .refused_reports
                                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                }
                                if let Some(rsp) = r.command.respond(status) {
                                    send_command(&mut assoc, r.pc_id, &rsp).await?;
                                }
                            }
                        }
                        PDataValueType::Data if querying.is_some() => {
                            let Some(q) = querying.as_mut() else {
                                continue;
                            };
                            if q.pc_id != pdv.presentation_context_id
                                || q.identifier.len() + pdv.data.len() > crate::qr::MAX_IDENTIFIER
                            {
                                let _ = assoc.abort().await;
                                return Ok(());
                            }
                            q.identifier.extend_from_slice(&pdv.data);
                            if pdv.is_last
                                && let (Some(q), Some(proxy)) = (querying.take(), &settings.proxy)
                            {
                                if q.command.field == CommandField::CGetRq {
                                    if !answer_get(&mut assoc, proxy.clone(), q).await? {
                                        let _ = assoc.abort().await;
                                        return Ok(());
                                    }
                                } else {
                                    answer_query(&mut assoc, proxy.clone(), q).await?;
                                }
                            }
                        }
                        PDataValueType::Data => {
                            let Some(r) = receiving.as_mut() else {
                                tracing::warn!("a data set without a command; aborting");
                                let _ = assoc.abort().await;
                                return Ok(());
                            };
                            if r.pc_id != pdv.presentation_context_id {
                                let _ = assoc.abort().await;
                                return Ok(());
                            }
                            if let Some(w) = r.walker.as_mut() {
                                w.push(&pdv.data);
                            }
                            if let Some(inc) = r.incoming.as_mut()
                                && let Err(e) = inc.write_owned(pdv.data)
                            {
                                r.failure = Some(match e {
                                    SpoolError::OutOfResources => Status::OUT_OF_RESOURCES,
                                    _ => Status::PROCESSING_FAILURE,
                                });
                                // Nothing partial stays: the rest is read and discarded.
                                r.incoming = None;
                            }
                            if pdv.is_last {
                                let done = receiving.take();
                                if let Some(r) = done {
                                    let status = finish(
                                        r.incoming,
                                        r.failure,
                                        r.walker,
                                        &r.command,
                                        &r.transfer_syntax,
                                        &calling,
                                    )
                                    .await;
                                    if let Some(rsp) = r.command.respond(status) {
                                        send_command(&mut assoc, r.pc_id, &rsp).await?;
                                    }
                                }
                            }
                        }
                    }
                }
            }
            Pdu::ReleaseRQ => {
                assoc.send(&Pdu::ReleaseRP).await?;
                return Ok(());
            }
            Pdu::AbortRQ { .. } => return Ok(()),
            _ => {
                let _ = assoc.abort().await;
                return Ok(());
            }
        }
    }
}

/// Takes a storage commitment report (N-EVENT-REPORT-RQ of the Storage Commitment Push
/// Model) from the network PACS: the committed instances leave the spool, the failed ones
/// are sent again later ([`Spool::commitment_report`]). Only from the PACS configured;
/// only instances waiting under the transaction it names. The status to answer.
async fn commitment_report(r: &Querying, from_pacs: bool, spool: &Spool) -> Status {
    use dimse::command::{STORAGE_COMMITMENT_PUSH, STORAGE_COMMITMENT_PUSH_INSTANCE};
    if !from_pacs {
        tracing::warn!(
            "an N-EVENT-REPORT from a caller that is not the network PACS; refused (0124H)"
        );
        return Status::NOT_AUTHORIZED;
    }
    let c = &r.command;
    if c.affected_sop_class.as_deref() != Some(STORAGE_COMMITMENT_PUSH) {
        return Status::NO_SUCH_SOP_CLASS;
    }
    if c.affected_sop_instance.as_deref() != Some(STORAGE_COMMITMENT_PUSH_INSTANCE) {
        return Status::NO_SUCH_SOP_INSTANCE;
    }
    if !matches!(c.event_type, Some(1 | 2)) {
        return Status::NO_SUCH_EVENT_TYPE;
    }
    let report = match crate::commitment::read_report(&r.identifier, &r.transfer_syntax) {
        Ok(report) => report,
        Err(e) => {
            tracing::warn!(reason = %e, "a storage commitment report that cannot be read; refused (nothing committed)");
            return Status::MISTYPED_ARGUMENT;
        }
    };
    let pair = |x: &crate::commitment::Reference| (x.sop_class.clone(), x.sop_instance.clone());
    let committed: Vec<(String, String)> = report.committed.iter().map(pair).collect();
    let failed: Vec<(String, String, String)> = report
        .failed
        .iter()
        .map(|(x, reason)| {
            (
                x.sop_class.clone(),
                x.sop_instance.clone(),
                Status(*reason).to_string(),
            )
        })
        .collect();
    let spool = spool.clone();
    let transaction = report.transaction.clone();
    let applied = tokio::task::spawn_blocking(move || {
        spool.commitment_report(&transaction, &committed, &failed, crate::now())
    })
    .await;
    match applied {
        Ok(Ok(a)) => {
            // Counts only: which instances is not logged.
            tracing::info!(
                transaction = %report.transaction,
                committed = a.committed,
                failed = a.failed,
                unknown = a.unknown,
                "storage commitment report from the network PACS"
            );
            if a.failed > 0 {
                tracing::warn!(
                    failed = a.failed,
                    "the network PACS did not commit some instances; they are sent again"
                );
            }
            Status::SUCCESS
        }
        // The PACS may send the report again.
        _ => Status::PROCESSING_FAILURE,
    }
}

/// Relays a C-FIND or a C-MOVE through the query proxy: every pending answer with its
/// identifier, then the final status (with the sub-operation counts of a C-MOVE).
async fn answer_query(
    assoc: &mut dicom_ul::association::AsyncServerAssociation<TcpStream>,
    proxy: Arc<crate::qr::Proxy>,
    q: Querying,
) -> Result<(), dicom_ul::association::Error> {
    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    // Owned by this association: ended with it (a stop, an abort), never left running.
    let mut task = AbortOnDrop(if q.command.field == CommandField::CMoveRq {
        tokio::spawn(crate::qr::retrieve(
            proxy,
            q.command.clone(),
            q.transfer_syntax.clone(),
            q.identifier,
            tx,
        ))
    } else {
        tokio::spawn(crate::qr::find(
            proxy,
            q.command.clone(),
            q.transfer_syntax.clone(),
            q.identifier,
            q.requestor.clone(),
            tx,
        ))
    });
    let max = match dicom_ul::association::Association::peer_max_pdu_length(assoc) {
        0 => 16 * 1024,
        n => n.min(1 << 20),
    };
    let chunk = usize::try_from(max.saturating_sub(6))
        .unwrap_or(16 * 1024)
        .max(1024);
    while let Some(reply) = rx.recv().await {
        let Some(rsp) = response(&q.command, &reply) else {
            break;
        };
        send_command(assoc, q.pc_id, &rsp).await?;
        if let Some(data) = reply.identifier {
            let mut pieces: Vec<&[u8]> = data.chunks(chunk).collect();
            if pieces.is_empty() {
                pieces.push(&[]);
            }
            for (i, piece) in pieces.iter().enumerate() {
                let last = i + 1 == pieces.len();
                assoc
                    .send(&crate::pdata(
                        q.pc_id,
                        PDataValueType::Data,
                        last,
                        piece.to_vec(),
                    ))
                    .await?;
            }
        }
    }
    if let Err(e) = (&mut task.0).await
        && e.is_panic()
    {
        // A bug: end the association's task the same way, so that the service ends with it.
        std::panic::resume_unwind(e.into_panic());
    }
    Ok(())
}

/// A task that is aborted when its handle goes (with the association that started it).
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Answers a C-GET on the viewer's own association: the instances this clinic may see are
/// retrieved from the network ([`crate::qr::collect`]) and sent to the viewer as C-STORE
/// sub-operations, then the final C-GET-RSP with the counts. `false`: the association failed
/// (the caller aborts it).
async fn answer_get(
    assoc: &mut dicom_ul::association::AsyncServerAssociation<TcpStream>,
    proxy: Arc<crate::qr::Proxy>,
    q: Querying,
) -> Result<bool, dicom_ul::association::Error> {
    use dicom_ul::association::Association as _;
    let reply = match crate::qr::collect(&proxy, &q.command, &q.transfer_syntax, &q.identifier)
        .await
    {
        Err(e) => {
            let message = tsunagi_runtime::child::error_chain(&e);
            tracing::warn!(error = %message, "C-GET through the network failed");
            crate::qr::retrieve_failed(e.to_string())
        }
        Ok(Err(reply)) => reply,
        Ok(Ok(retrieved)) => {
            let (mut completed, mut failed) = (0u16, retrieved.failed);
            // What reached the viewer, for the audit trail.
            let mut sent: Vec<Meta> = Vec::new();
            for (i, out) in retrieved.outgoing.iter().enumerate() {
                let meta = &out.queued.meta;
                let pc = assoc
                    .presentation_contexts()
                    .iter()
                    .find(|pc| {
                        pc.reason == dicom_ul::pdu::PresentationContextResultReason::Acceptance
                            && pc.abstract_syntax.trim_end_matches('\0') == meta.sop_class
                            && pc.transfer_syntax.trim_end_matches('\0') == meta.transfer_syntax
                    })
                    .map(|pc| pc.id);
                let Some(pc) = pc.filter(|_| assoc.requestor_roles_for(&meta.sop_class).scp) else {
                    failed = failed.saturating_add(1);
                    continue;
                };
                let id = u16::try_from(i % 60_000).unwrap_or(0) + 1;
                match crate::forward::store_one(assoc, pc, id, out).await {
                    Ok(status)
                        if matches!(
                            status.class(),
                            dimse::status::Class::Success | dimse::status::Class::Warning
                        ) =>
                    {
                        completed = completed.saturating_add(1);
                        sent.push(meta.clone());
                    }
                    Ok(_) => failed = failed.saturating_add(1),
                    Err(e) => {
                        tracing::warn!(error = %tsunagi_runtime::child::error_chain(&e), "C-GET: the viewer's association failed");
                        return Ok(false);
                    }
                }
            }
            crate::qr::audit_sent(&proxy, &q.requestor, sent).await;
            crate::qr::retrieve_done(completed, failed)
        }
    };
    if let Some(rsp) = response(&q.command, &reply) {
        send_command(assoc, q.pc_id, &rsp).await?;
    }
    Ok(true)
}

/// The response command for a proxy's reply: its status, comment, whether an identifier
/// follows, and a retrieve's sub-operation counts.
fn response(request: &Command, reply: &crate::qr::Reply) -> Option<Command> {
    let mut rsp = request.respond(reply.status)?;
    rsp.error_comment.clone_from(&reply.comment);
    rsp.has_dataset = reply.identifier.is_some();
    if let Some((completed, failed)) = reply.counts {
        rsp.completed = Some(completed);
        rsp.failed = Some(failed);
        rsp.warning = Some(0);
        rsp.remaining = Some(0);
    }
    Some(rsp)
}

/// Lets a viewer take the SCP role for storage SOP classes (C-GET delivers on its own
/// association).
struct StorageRoles {
    extra: Vec<String>,
}

impl dicom_ul::association::server::Negotiation for StorageRoles {
    fn negotiate_roles(
        &self,
        sop_class_uid: &str,
        scu_role: bool,
        scp_role: bool,
    ) -> Option<dicom_ul::pdu::RequestorRoles> {
        let class = sop_class_uid.trim_end_matches('\0');
        // The PACS reports storage commitment as the SCP of the Push Model.
        (is_standard_storage(class)
            || self.extra.iter().any(|c| c == class)
            || class == dimse::command::STORAGE_COMMITMENT_PUSH)
            .then_some(dicom_ul::pdu::RequestorRoles {
                scu: scu_role,
                scp: scp_role,
            })
    }
}

/// Commits a received data set (or not) and says which status to answer.
async fn finish(
    incoming: Option<Incoming>,
    failure: Option<Status>,
    walker: Option<crate::walk::Walker>,
    command: &Command,
    transfer_syntax: &str,
    calling: &str,
) -> Status {
    if let Some(f) = failure {
        return f;
    }
    let Some(incoming) = incoming else {
        return Status::PROCESSING_FAILURE;
    };
    // A data set the bridge cannot walk the way a PACS will read it is refused: never
    // forwarded to be read differently there. (Tags only in the log: no patient data.)
    let Some(walker) = walker else {
        tracing::warn!(
            transfer_syntax,
            "a data set in a transfer syntax the bridge cannot read; refused (C000H)"
        );
        return Status::CANNOT_UNDERSTAND;
    };
    let head = match walker.finish() {
        Ok(head) => Some(head),
        Err(e) => {
            tracing::warn!(reason = %e, "a malformed data set; refused (C000H)");
            return Status::CANNOT_UNDERSTAND;
        }
    };
    let sop_instance = command.affected_sop_instance.clone().unwrap_or_default();
    if sop_instance.is_empty()
        || head
            .as_ref()
            .and_then(|h| h.sop_instance.as_deref())
            .is_some_and(|uid| uid != sop_instance)
    {
        // The command and the data set disagree: store nothing.
        return Status::DATASET_MISMATCH;
    }
    let meta = Meta {
        sop_class: command.affected_sop_class.clone().unwrap_or_default(),
        sop_instance,
        transfer_syntax: transfer_syntax.to_owned(),
        calling_ae: calling.to_owned(),
        study_uid: head
            .as_ref()
            .and_then(|h| h.study_instance.clone())
            .filter(|s| !s.is_empty()),
        patient_id: head.and_then(|h| h.patient_id).filter(|p| !p.is_empty()),
    };
    let now = crate::now();
    // fsync and SQLite: on the spool's committing thread (and a large file's flush on the
    // blocking pool), off the async threads.
    match incoming.commit_async(meta, now).await {
        Ok(_) => Status::SUCCESS,
        Err(SpoolError::OutOfResources) => Status::OUT_OF_RESOURCES,
        Err(e) => {
            tracing::warn!(
                error = %tsunagi_runtime::child::error_chain(&e),
                "cannot queue a received instance; refused (0110H)"
            );
            Status::PROCESSING_FAILURE
        }
    }
}
