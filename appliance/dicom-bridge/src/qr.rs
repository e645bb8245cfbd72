//! The query proxy for the clinic's viewers: a C-FIND to the box is answered by a C-FIND to
//! the network PACS, with patient IDs translated both ways and the answers filtered by
//! consent (the seed's steps 13 and 15).
//!
//! - The viewer's PatientID (a local ID) becomes the patient's network ID; a local patient
//!   without one has nothing at the network (no match). A query without a PatientID, or with
//!   wildcards in it, goes as is.
//! - PatientID is always asked of the network (added as a return key if the viewer did not
//!   ask for it, and removed from the answer then), so that every answer can be checked.
//! - An answer reaches the viewer only when its network ID is one of this clinic's patients
//!   and the consent service permits images of that patient to this clinic (recipient: the
//!   site's 医療機関コード): an unknown patient, a stale cache or a patient who did not
//!   disclose to this clinic is dropped. PatientID in the answer is the local ID then, and
//!   the network's IssuerOfPatientID is removed.
//! - With `patient-ids = "as-is"` IDs are not translated, but answers are filtered the same
//!   way (with the PatientID as the local ID).
//!
//! Answers are relayed as they come (pending, FF00H). The final status is the network's;
//! the network unreachable is C001H ("unable to process") with a comment. Not yet: C-CANCEL
//! (the viewer waits for the end of the answers).

use std::path::PathBuf;
use std::sync::Arc;

use consent::client::{Category, Identities as _, Recipient, SocketGate};
use dicom_ul::ClientAssociationOptions;
use dicom_ul::Pdu;
use dicom_ul::pdu::{PDataValueType, PresentationContextResultReason};
use dimse::command::{Command, CommandField};
use dimse::status::Status;
use tokio::sync::mpsc;

use crate::forward::Destination;
use crate::pacs::{PacsAssociation, Peer as _};
use crate::translate::{self, TranslateError};

const PATIENT_ID: u32 = 0x0010_0020;
const ISSUER: u32 = 0x0010_0021;
const STUDY_INSTANCE_UID: u32 = 0x0020_000D;
/// The largest identifier a viewer or the network may send (they are a few hundred bytes).
pub const MAX_IDENTIFIER: usize = 1 << 20;

/// Empties the work directory: what a C-MOVE or C-GET left there when the service stopped
/// in the middle (never acknowledged to anyone; the viewer asks again). Returns how many
/// files went.
pub fn clean_work_dir(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
                .filter(|e| std::fs::remove_file(e.path()).is_ok())
                .count()
        })
        .unwrap_or(0)
}

/// Who asks: the viewer's AE title and address (for the audit trail).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requestor {
    pub ae_title: String,
    pub address: String,
}

/// Keeps an audit event in the spool until the audit trail has it (a failure is logged: the
/// answer to the viewer has gone or is going).
async fn keep_event(proxy: &Proxy, event: &audit::protocol::Event) {
    let Some(spool) = proxy.spool.clone() else {
        return;
    };
    let event = event.clone();
    match tokio::task::spawn_blocking(move || spool.record_event(&event)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::warn!(error = %tsunagi_runtime::child::error_chain(&e), "cannot keep a query's audit event");
        }
        Err(_) => tracing::warn!("cannot keep a query's audit event"),
    }
}

/// The instances a retrieve sent to one of the clinic's viewers (or its move destination),
/// as transfers in the audit trail.
pub async fn audit_sent(proxy: &Proxy, to: &Requestor, sent: Vec<crate::spool::Meta>) {
    let Some(spool) = proxy.spool.clone() else {
        return;
    };
    if sent.is_empty() {
        return;
    }
    let to = to.clone();
    let result = tokio::task::spawn_blocking(move || {
        let metas: Vec<&crate::spool::Meta> = sent.iter().collect();
        spool.record_sent_to_clinic(&to.ae_title, &to.address, &metas, crate::now())
    })
    .await;
    if !matches!(result, Ok(Ok(()))) {
        tracing::warn!("cannot keep a retrieve's transfers for the audit trail");
    }
}

/// What the proxy needs.
#[derive(Debug, Clone)]
pub struct Proxy {
    pub pacs: Destination,
    /// The clinic's C-MOVE destinations (AE title, address of its storage SCP).
    pub destinations: Vec<(String, std::net::SocketAddr)>,
    /// Where retrieved instances wait until the viewer has them.
    pub work_dir: PathBuf,
    /// This clinic's 医療機関コード: the recipient of what a viewer sees.
    pub facility_code: String,
    /// Whether patient IDs are translated (`patient-ids = "translate"`).
    pub translate: bool,
    pub consent_socket: PathBuf,
    /// The spool whose quota counts the working files (set by the service once the spool
    /// is open; `None`: not counted).
    pub spool: Option<crate::spool::Spool>,
}

/// Removes a working file of a retrieve and gives its bytes back to the quota.
fn remove_work_file(spool: Option<&crate::spool::Spool>, path: &std::path::Path) {
    let size = std::fs::metadata(path).map_or(0, |m| m.len());
    if std::fs::remove_file(path).is_ok()
        && let Some(s) = spool
    {
        s.unreserve(size);
    }
}

/// One answer to the viewer: a status and, for a pending one, an identifier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: Status,
    pub identifier: Option<Vec<u8>>,
    pub comment: Option<String>,
    /// C-MOVE: sub-operations completed and failed.
    pub counts: Option<(u16, u16)>,
}

impl Reply {
    fn last(status: Status, comment: Option<String>) -> Reply {
        Reply {
            status,
            identifier: None,
            comment,
            counts: None,
        }
    }
}

/// Why the network could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("cannot associate with the network PACS")]
    Associate(#[source] crate::pacs::EstablishError),
    #[error("the association with the network PACS failed")]
    Association(#[source] dicom_ul::association::Error),
    #[error("the network PACS accepts no presentation context for this query")]
    NotAccepted,
    #[error("the network PACS answered something that is not a C-FIND response")]
    Protocol,
    #[error("the identifier cannot be read or rewritten")]
    Identifier(#[source] TranslateError),
    #[error("the consent service could not be asked")]
    Consent(#[source] consent::client::GateError),
    #[error("internal error")]
    Internal,
    #[error("the network sent an instance of another patient than the one asked for")]
    WrongPatient,
    #[error("the network sent another instance than the one asked for")]
    NotRequested,
    #[error("a query must name one patient by PatientID (no name or wildcard searches)")]
    NoPatientId,
    #[error("cannot store to the viewer")]
    Relay(#[source] Box<crate::forward::ForwardError>),
    #[error("the spool's quota is reached (a retrieve's working files count in it)")]
    Full,
}

/// A retrieve's working file being received: removed, with its bytes given back to the
/// quota, unless it was completed (`path` taken).
struct WorkFile {
    path: Option<PathBuf>,
    spool: Option<crate::spool::Spool>,
}

impl Drop for WorkFile {
    fn drop(&mut self) {
        if let Some(path) = self.path.take() {
            remove_work_file(self.spool.as_ref(), &path);
        }
    }
}

/// The identity and consent questions of one query, answered by the consent service (each
/// asked once per query).
struct Checks {
    gate: SocketGate,
    locals: Vec<(String, Option<String>)>,
    verdicts: Vec<((String, Option<Category>), bool)>,
}

impl Checks {
    fn network_id(&mut self, local: &str) -> Result<Option<String>, QueryError> {
        self.gate.network_id(local).map_err(QueryError::Consent)
    }

    fn local_id(&mut self, network: &str) -> Result<Option<String>, QueryError> {
        if let Some((_, l)) = self.locals.iter().find(|(n, _)| n == network) {
            return Ok(l.clone());
        }
        let l = self.gate.local_id(network).map_err(QueryError::Consent)?;
        self.locals.push((network.to_owned(), l.clone()));
        Ok(l)
    }

    /// Whether this clinic's viewers may see the network's data of the local patient: the
    /// patient's active participation consent at this clinic ([`Recipient::Clinic`]),
    /// covering `category` when the data is one object (a retrieved instance, by its SOP
    /// class); for a C-FIND match, participation alone (`category` none). Who else may see
    /// the data (other facilities' 公開設定) is the network's to enforce, not this box's.
    /// An instance whose SOP class has no category is never shown (`visible` is not asked).
    fn visible(&mut self, local: &str, category: Option<Category>) -> Result<bool, QueryError> {
        let key = (local.to_owned(), category);
        if let Some((_, v)) = self.verdicts.iter().find(|(k, _)| *k == key) {
            return Ok(*v);
        }
        let decision = match category {
            Some(c) => self.gate.decide_for(local, Recipient::Clinic, c),
            None => self.gate.participates(local),
        }
        .map_err(QueryError::Consent)?
        .decision;
        self.verdicts.push((key, decision.is_permit()));
        Ok(decision.is_permit())
    }
}

impl Checks {
    /// Records in the audit trail that what the network sent for `local`'s retrieve was
    /// discarded (`object`: the SOP Instance UID it came as). A record that cannot be
    /// written is logged: the instance is discarded all the same.
    fn discarded(&mut self, local: &str, category: Category, object: &str) {
        let object = if object.is_empty() { "0" } else { object };
        let release = consent::client::Release {
            patient: local.to_owned(),
            category,
            kind: consent::client::ReleaseKind::Discarded,
            objects: vec![consent::client::Object::DicomInstance(object.to_owned())],
            decision: None,
        };
        if let Err(e) = self.gate.released_to(Recipient::Clinic, &release) {
            tracing::warn!(error = %tsunagi_runtime::child::error_chain(&e), "cannot record a discarded retrieve in the audit trail");
        }
    }
}

fn has_wildcard(v: &str) -> bool {
    v.contains(['*', '?'])
}

/// Answers one C-FIND (`command` with `identifier`, in the presentation context's
/// `transfer_syntax`), sending every reply to `replies`; the last one is the final status.
pub async fn find(
    proxy: Arc<Proxy>,
    command: Command,
    transfer_syntax: String,
    identifier: Vec<u8>,
    requestor: Requestor,
    replies: mpsc::Sender<Reply>,
) {
    let last = match find_inner(
        &proxy,
        &command,
        &transfer_syntax,
        &identifier,
        &requestor,
        &replies,
    )
    .await
    {
        Ok(status) => Reply::last(status, None),
        Err(e @ QueryError::NoPatientId) => {
            tracing::info!("a C-FIND without a patient ID was refused");
            Reply::last(Status::DATASET_MISMATCH, Some(e.to_string()))
        }
        Err(e) => {
            let message = tsunagi_runtime::child::error_chain(&e);
            tracing::warn!(error = %message, "C-FIND through the network failed");
            Reply::last(Status::UNABLE_TO_PROCESS, Some(e.to_string()))
        }
    };
    let _ = replies.send(last).await;
}

async fn blocking<T: Send + 'static>(
    checks: Checks,
    f: impl FnOnce(&mut Checks) -> Result<T, QueryError> + Send + 'static,
) -> Result<(Checks, T), QueryError> {
    let mut checks = checks;
    let (checks, r) = tokio::task::spawn_blocking(move || {
        let r = f(&mut checks);
        (checks, r)
    })
    .await
    .map_err(|_| QueryError::Internal)?;
    Ok((checks, r?))
}

/// A viewer's identifier, read: its encoding, the PatientID it asked with, and that ID as
/// the network knows it.
struct Key {
    explicit: bool,
    asked_id: Option<String>,
    checks: Checks,
    network_key: String,
}

/// `None`: the viewer asked for a local patient the network has no ID for (no match).
async fn viewer_key(
    proxy: &Proxy,
    transfer_syntax: &str,
    identifier: &[u8],
) -> Result<Option<Key>, QueryError> {
    let explicit = translate::data_set_is_explicit(transfer_syntax)
        .ok_or(QueryError::Identifier(TranslateError::Encoding))?;
    let asked_id =
        translate::text_value(identifier, explicit, PATIENT_ID).map_err(QueryError::Identifier)?;
    let mut checks = Checks {
        gate: SocketGate::new(&proxy.consent_socket),
        locals: Vec::new(),
        verdicts: Vec::new(),
    };
    let network_key = match asked_id.as_deref() {
        Some(local) if proxy.translate && !local.is_empty() && !has_wildcard(local) => {
            let local = local.to_owned();
            let (c, r) = blocking(checks, move |c| c.network_id(&local)).await?;
            checks = c;
            match r {
                Some(n) => n,
                None => return Ok(None),
            }
        }
        Some(v) => v.to_owned(),
        None => String::new(),
    };
    Ok(Some(Key {
        explicit,
        asked_id,
        checks,
        network_key,
    }))
}

/// A query the network was asked is audited once it ends (a Query message: the viewer, the
/// SOP class and the keys as the network got them, under the network ID); one that never
/// reached the network is not.
async fn find_inner(
    proxy: &Proxy,
    command: &Command,
    transfer_syntax: &str,
    identifier: &[u8],
    requestor: &Requestor,
    replies: &mpsc::Sender<Reply>,
) -> Result<Status, QueryError> {
    // A query names one patient: searches by name or by wildcard would show the viewer the
    // network's matches across patients, which no single consent covers.
    let explicit = translate::data_set_is_explicit(transfer_syntax)
        .ok_or(QueryError::Identifier(TranslateError::Encoding))?;
    let named =
        translate::text_value(identifier, explicit, PATIENT_ID).map_err(QueryError::Identifier)?;
    if named
        .as_deref()
        .is_none_or(|id| id.is_empty() || has_wildcard(id))
    {
        return Err(QueryError::NoPatientId);
    }
    let Some(Key {
        explicit,
        asked_id,
        mut checks,
        network_key,
    }) = viewer_key(proxy, transfer_syntax, identifier).await?
    else {
        // Nothing was ever sent under a network ID for this patient.
        return Ok(Status::SUCCESS);
    };
    let query = translate::with_elements(
        identifier,
        explicit,
        &[(PATIENT_ID, *b"LO", Some(network_key.as_str()))],
    )
    .map_err(QueryError::Identifier)?;

    let sop_class = command.affected_sop_class.clone().unwrap_or_default();
    let mut assoc = associate(
        proxy,
        vec![(sop_class.clone(), vec![transfer_syntax.to_owned()])],
        &[],
    )
    .await?;
    let pc_id = assoc
        .presentation_contexts()
        .iter()
        .find(|pc| pc.reason == PresentationContextResultReason::Acceptance)
        .map(|pc| pc.id)
        .ok_or(QueryError::NotAccepted)?;
    let mut rq = Command::new(CommandField::CFindRq);
    rq.affected_sop_class = Some(sop_class);
    rq.message_id = Some(1);
    rq.priority = Some(command.priority.unwrap_or(0));
    rq.has_dataset = true;
    let audited = |ok: bool| audit::protocol::Event::Query {
        peer_ae: requestor.ae_title.clone(),
        peer_address: requestor.address.clone(),
        result: if ok {
            audit::protocol::Result::Success
        } else {
            audit::protocol::Result::MinorFailure
        },
        sop_class_uid: rq.affected_sop_class.clone().unwrap_or_default(),
        keys: query.clone(),
    };
    let asked = async {
        send(&mut assoc, pc_id, PDataValueType::Command, rq.encode()).await?;
        send(&mut assoc, pc_id, PDataValueType::Data, query.clone()).await?;
        Ok::<(), QueryError>(())
    }
    .await;
    if let Err(e) = asked {
        keep_event(proxy, &audited(false)).await;
        return Err(e);
    }
    loop {
        let (rsp, data) = match receive(&mut assoc, CommandField::CFindRsp).await {
            Ok(r) => r,
            Err(e) => {
                keep_event(proxy, &audited(false)).await;
                return Err(e);
            }
        };
        let status = rsp.status.ok_or(QueryError::Protocol)?;
        if status.class() != dimse::status::Class::Pending {
            let _ = assoc.release().await;
            keep_event(
                proxy,
                &audited(status.class() == dimse::status::Class::Success),
            )
            .await;
            return Ok(status);
        }
        let Some(data) = data else {
            continue;
        };
        let network = translate::text_value(&data, explicit, PATIENT_ID)
            .map_err(QueryError::Identifier)?
            .unwrap_or_default();
        let (c, local) = if proxy.translate {
            let n = network.clone();
            blocking(checks, move |c| c.local_id(&n)).await?
        } else {
            (checks, Some(network.clone()))
        };
        checks = c;
        let Some(local) = local.filter(|l| !l.is_empty()) else {
            continue;
        };
        let l = local.clone();
        let (c, visible) = blocking(checks, move |c| c.visible(&l, None)).await?;
        checks = c;
        if !visible {
            continue;
        }
        let shown = if asked_id.is_some() {
            Some(local.as_str())
        } else {
            None
        };
        let answer = translate::with_elements(
            &data,
            explicit,
            &[(PATIENT_ID, *b"LO", shown), (ISSUER, *b"LO", None)],
        )
        .map_err(QueryError::Identifier)?;
        if replies
            .send(Reply {
                status,
                identifier: Some(answer),
                comment: None,
                counts: None,
            })
            .await
            .is_err()
        {
            // The viewer is gone.
            let _ = assoc.abort().await;
            return Ok(Status::SUCCESS);
        }
    }
}

async fn send(
    assoc: &mut PacsAssociation,
    pc_id: u8,
    kind: PDataValueType,
    data: Vec<u8>,
) -> Result<(), QueryError> {
    crate::forward::send(assoc, pc_id, kind, true, data)
        .await
        .map_err(QueryError::Association)
}

/// One response: its command and, when it has one, its data set.
async fn receive(
    assoc: &mut PacsAssociation,
    expected: CommandField,
) -> Result<(Command, Option<Vec<u8>>), QueryError> {
    let mut command_buf = crate::CommandBuf::default();
    let mut command: Option<Command> = None;
    let mut data = Vec::new();
    loop {
        let Pdu::PData { data: pdvs } =
            assoc.receive_pdu().await.map_err(QueryError::Association)?
        else {
            return Err(QueryError::Protocol);
        };
        for pdv in pdvs {
            match pdv.value_type {
                PDataValueType::Command => {
                    if let Some(c) = command_buf.push(&pdv).map_err(|()| QueryError::Protocol)? {
                        if c.field != expected {
                            return Err(QueryError::Protocol);
                        }
                        if !c.has_dataset {
                            return Ok((c, None));
                        }
                        command = Some(c);
                    }
                }
                PDataValueType::Data => {
                    if command.is_none() || data.len() + pdv.data.len() > MAX_IDENTIFIER {
                        return Err(QueryError::Protocol);
                    }
                    data.extend_from_slice(&pdv.data);
                    if pdv.is_last {
                        return Ok((command.take().ok_or(QueryError::Protocol)?, Some(data)));
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// C-MOVE: retrieve from the network (C-GET), store to the clinic's viewer.

const QR_LEVEL: u32 = 0x0008_0052;
const SOP_CLASS: u32 = 0x0008_0016;
const SOP_INSTANCE: u32 = 0x0008_0018;
const STUDY: u32 = 0x0020_000D;
const SERIES: u32 = 0x0020_000E;
/// The most instances one C-MOVE retrieves.
const MAX_INSTANCES: usize = 10_000;

/// The FIND and GET models that go with a MOVE or GET model (study root, patient root).
fn models(model: &str) -> Option<(&'static str, &'static str)> {
    match model {
        "1.2.840.10008.5.1.4.1.2.2.2" | "1.2.840.10008.5.1.4.1.2.2.3" => {
            Some(("1.2.840.10008.5.1.4.1.2.2.1", "1.2.840.10008.5.1.4.1.2.2.3"))
        }
        "1.2.840.10008.5.1.4.1.2.1.2" | "1.2.840.10008.5.1.4.1.2.1.3" => {
            Some(("1.2.840.10008.5.1.4.1.2.1.1", "1.2.840.10008.5.1.4.1.2.1.3"))
        }
        _ => None,
    }
}

/// What a retrieve from the network came to: the instances to deliver (files in the work
/// directory, removed on drop, with the clinic's IDs written at their start), and how many
/// matching instances this clinic may not have or could not be retrieved.
#[derive(Debug, Default)]
pub struct Retrieved {
    pub outgoing: Vec<crate::forward::Outgoing>,
    pub failed: u16,
    /// Whose quota counts the files.
    pub spool: Option<crate::spool::Spool>,
}

impl Drop for Retrieved {
    fn drop(&mut self) {
        for o in &self.outgoing {
            remove_work_file(self.spool.as_ref(), &o.queued.path);
        }
    }
}

/// The final reply of a retrieve that could not ask the network.
pub fn retrieve_failed(comment: String) -> Reply {
    Reply::last(Status::UNABLE_TO_PROCESS, Some(comment))
}

/// The final reply of a retrieve (C-MOVE or C-GET) for these counts.
pub fn retrieve_done(completed: u16, failed: u16) -> Reply {
    done(completed, failed, 0)
}

/// The transfer syntaxes offered for each retrieved SOP class, one presentation context
/// each, so that the network sends every instance as it holds it (nothing transcoded).
/// The storage classes offered for a retrieve whose SOP class the PACS did not report: CT,
/// MR, CR, DX, US, secondary capture, VL endoscopic, comprehensive SR, encapsulated PDF.
const COMMON_STORAGE_CLASSES: &[&str] = &[
    "1.2.840.10008.5.1.4.1.1.2",
    "1.2.840.10008.5.1.4.1.1.4",
    "1.2.840.10008.5.1.4.1.1.1",
    "1.2.840.10008.5.1.4.1.1.1.1",
    "1.2.840.10008.5.1.4.1.1.6.1",
    "1.2.840.10008.5.1.4.1.1.7",
    "1.2.840.10008.5.1.4.1.1.77.1.1",
    "1.2.840.10008.5.1.4.1.1.88.33",
    "1.2.840.10008.5.1.4.1.1.104.1",
];

const STORAGE_SYNTAXES: &[&str] = &[
    "1.2.840.10008.1.2.1",
    "1.2.840.10008.1.2",
    "1.2.840.10008.1.2.4.50",
    "1.2.840.10008.1.2.4.51",
    "1.2.840.10008.1.2.4.57",
    "1.2.840.10008.1.2.4.70",
    "1.2.840.10008.1.2.4.80",
    "1.2.840.10008.1.2.4.81",
    "1.2.840.10008.1.2.4.90",
    "1.2.840.10008.1.2.4.91",
    "1.2.840.10008.1.2.5",
];

/// One instance the viewer may have.
#[derive(Debug, Clone)]
struct Wanted {
    sop_class: String,
    sop_instance: String,
    study: String,
    series: String,
    network_id: String,
    local_id: String,
    /// What the network actually sent for it: its SOP class and instance UID.
    arrived: Option<(String, String)>,
}

/// Answers one C-MOVE: the matching instances this clinic may see are retrieved from the
/// network PACS (C-GET on the box's own association: the network never connects to the
/// box) and stored to the destination viewer with the clinic's patient IDs. Unknown
/// destination: A801H. The final reply carries the sub-operation counts.
pub async fn retrieve(
    proxy: Arc<Proxy>,
    command: Command,
    transfer_syntax: String,
    identifier: Vec<u8>,
    replies: mpsc::Sender<Reply>,
) {
    let last = match retrieve_inner(&proxy, &command, &transfer_syntax, &identifier).await {
        Ok(r) => r,
        Err(e) => {
            let message = tsunagi_runtime::child::error_chain(&e);
            tracing::warn!(error = %message, "C-MOVE through the network failed");
            Reply::last(Status::UNABLE_TO_PROCESS, Some(e.to_string()))
        }
    };
    let _ = replies.send(last).await;
}

async fn retrieve_inner(
    proxy: &Proxy,
    command: &Command,
    transfer_syntax: &str,
    identifier: &[u8],
) -> Result<Reply, QueryError> {
    let destination = command
        .move_destination
        .as_deref()
        .unwrap_or_default()
        .trim()
        .to_owned();
    let Some((_, viewer)) = proxy.destinations.iter().find(|(ae, _)| *ae == destination) else {
        return Ok(Reply::last(
            Status::MOVE_DESTINATION_UNKNOWN,
            Some("the move destination is not one of the clinic's".into()),
        ));
    };
    let retrieved = match collect(proxy, command, transfer_syntax, identifier).await? {
        Ok(r) => r,
        Err(reply) => return Ok(reply),
    };
    if retrieved.outgoing.is_empty() {
        return Ok(done(0, retrieved.failed, 0));
    }
    let dest = Destination {
        ae_title: destination,
        addr: *viewer,
        calling_ae: proxy.pacs.calling_ae.clone(),
        timeout: proxy.pacs.timeout,
        storage_commitment: false,
        tls: None,
    };
    let (outcomes, relay_error) = crate::forward::send_batch(&dest, &retrieved.outgoing).await;
    let delivered: Vec<crate::spool::Meta> = outcomes
        .iter()
        .filter(|(_, o)| matches!(o, crate::forward::Outcome::Delivered(_)))
        .filter_map(|(id, _)| {
            retrieved
                .outgoing
                .iter()
                .find(|o| o.queued.id == *id)
                .map(|o| o.queued.meta.clone())
        })
        .collect();
    let completed = delivered.len();
    audit_sent(
        proxy,
        &Requestor {
            ae_title: dest.ae_title.clone(),
            address: dest.addr.to_string(),
        },
        delivered,
    )
    .await;
    let completed = u16::try_from(completed).unwrap_or(u16::MAX);
    let failed = u16::try_from(retrieved.outgoing.len())
        .unwrap_or(u16::MAX)
        .saturating_sub(completed)
        .saturating_add(retrieved.failed);
    if let Some(e) = relay_error {
        tracing::warn!(error = %tsunagi_runtime::child::error_chain(&e), "C-MOVE: cannot store to the viewer");
    }
    Ok(done(completed, failed, 0))
}

/// The matching instances this clinic may see, retrieved from the network PACS into the work
/// directory with the clinic's IDs (C-MOVE and C-GET); `Err(reply)`: the final answer
/// already.
pub async fn collect(
    proxy: &Proxy,
    command: &Command,
    transfer_syntax: &str,
    identifier: &[u8],
) -> Result<Result<Retrieved, Reply>, QueryError> {
    let model = command.affected_sop_class.clone().unwrap_or_default();
    let Some((find_model, get_model)) = models(&model) else {
        return Ok(Err(Reply::last(Status::SOP_CLASS_NOT_SUPPORTED, None)));
    };
    let Some(Key {
        explicit,
        mut checks,
        network_key,
        ..
    }) = viewer_key(proxy, transfer_syntax, identifier).await?
    else {
        return Ok(Err(done(0, 0, 0)));
    };
    // Which instances match, and whose they are.
    let mut keys: Vec<(u32, [u8; 2], Option<&str>)> = vec![
        (QR_LEVEL, *b"CS", Some("IMAGE")),
        (PATIENT_ID, *b"LO", Some(network_key.as_str())),
    ];
    for tag in [SOP_CLASS, SOP_INSTANCE, STUDY, SERIES] {
        if translate::text_value(identifier, explicit, tag)
            .map_err(QueryError::Identifier)?
            .is_none()
        {
            keys.push((tag, *b"UI", Some("")));
        }
    }
    let query =
        translate::with_elements(identifier, explicit, &keys).map_err(QueryError::Identifier)?;
    let answers = query_all(proxy, find_model, transfer_syntax, query).await?;
    let mut wanted = Vec::new();
    let mut refused = 0u16;
    for a in &answers {
        let v = |tag| {
            translate::text_value(a, explicit, tag)
                .map_err(QueryError::Identifier)
                .map(Option::unwrap_or_default)
        };
        let network = v(PATIENT_ID)?;
        let (c, local) = if proxy.translate {
            let n = network.clone();
            blocking(checks, move |c| c.local_id(&n)).await?
        } else {
            (checks, Some(network.clone()))
        };
        checks = c;
        // Before fetching: the category of the SOP class the PACS reports, or (a PACS that
        // does not report it at IMAGE level) participation alone; the category of what
        // actually arrives is decided again before it goes to the viewer.
        let class = v(SOP_CLASS)?;
        let category = if class.is_empty() {
            Ok(None)
        } else {
            Category::for_dicom_sop_class(&class).map(Some).ok_or(())
        };
        let visible = match (local.clone().filter(|l| !l.is_empty()), category) {
            (Some(l), Ok(category)) => {
                let (c, v) = blocking(checks, move |c| c.visible(&l, category)).await?;
                checks = c;
                v
            }
            _ => false,
        };
        if !visible {
            refused = refused.saturating_add(1);
            continue;
        }
        wanted.push(Wanted {
            sop_class: v(SOP_CLASS)?,
            sop_instance: v(SOP_INSTANCE)?,
            study: v(STUDY)?,
            series: v(SERIES)?,
            network_id: network,
            local_id: local.unwrap_or_default(),
            arrived: None,
        });
    }
    if wanted.is_empty() {
        return Ok(Err(done(0, refused, 0)));
    }
    let _ = std::fs::create_dir_all(&proxy.work_dir);
    let retrieved = get_all(proxy, get_model, &wanted).await;
    let (got, error) = match retrieved {
        Ok(got) => (got, None),
        Err((got, e)) => (got, Some(e)),
    };
    let mut retrieved = Retrieved {
        outgoing: Vec::new(),
        failed: refused,
        spool: proxy.spool.clone(),
    };
    for (n, (w, path, ts)) in got.iter().enumerate() {
        let (class, uid) = w.arrived.clone().unwrap_or_default();
        let category = Category::for_dicom_sop_class(&class);
        // Only the instance asked for (and of the class the query reported, when it did)...
        let asked_for = !class.is_empty()
            && uid == w.sop_instance
            && (w.sop_class.is_empty() || class == w.sop_class);
        // ...of the patient asked for (`outgoing_for` reads its PatientID)...
        let outgoing = if asked_for {
            outgoing_for(n, w, path, ts)
        } else {
            Err(QueryError::NotRequested)
        };
        let outgoing = match outgoing {
            Ok(o) => o,
            Err(e) => {
                remove_work_file(proxy.spool.as_ref(), path);
                if matches!(e, QueryError::NotRequested | QueryError::WrongPatient) {
                    // A security event: in the audit trail, under the patient asked for.
                    tracing::warn!(error = %e, "discarded what the network sent for a retrieve");
                    let (local, object) = (w.local_id.clone(), uid.clone());
                    let label = category
                        .or_else(|| Category::for_dicom_sop_class(&w.sop_class))
                        .unwrap_or(Category::Images);
                    let (c, ()) = blocking(checks, move |c| {
                        c.discarded(&local, label, &object);
                        Ok(())
                    })
                    .await?;
                    checks = c;
                }
                continue;
            }
        };
        // ...and the decision for this exact object, with the category of its class.
        let shown = match category {
            Some(category) => {
                let local = w.local_id.clone();
                let (c, v) = blocking(checks, move |c| c.visible(&local, Some(category))).await?;
                checks = c;
                v
            }
            None => false,
        };
        if shown {
            retrieved.outgoing.push(outgoing);
        } else {
            remove_work_file(proxy.spool.as_ref(), path);
        }
    }
    let missing = wanted.len().saturating_sub(retrieved.outgoing.len());
    retrieved.failed = retrieved
        .failed
        .saturating_add(u16::try_from(missing).unwrap_or(u16::MAX));
    if let Some(e) = error {
        tracing::warn!(error = %tsunagi_runtime::child::error_chain(&e), "retrieve from the network incomplete");
    }
    Ok(Ok(retrieved))
}

/// The final C-MOVE reply for these counts.
fn done(completed: u16, failed: u16, _warning: u16) -> Reply {
    let status = match (completed, failed) {
        (_, 0) => Status::SUCCESS,
        (0, _) => Status::OUT_OF_RESOURCES_SUBOPERATIONS,
        _ => Status::WARNING_SUBOPERATIONS_FAILED,
    };
    Reply {
        status,
        identifier: None,
        comment: (failed > 0)
            .then(|| "some instances are not disclosed to this clinic or failed".to_owned()),
        counts: Some((completed, failed)),
    }
}

/// A retrieved instance as an outgoing C-STORE to the viewer, with the clinic's ID.
fn outgoing_for(
    n: usize,
    w: &Wanted,
    path: &std::path::Path,
    ts: &str,
) -> Result<crate::forward::Outgoing, QueryError> {
    use std::io::Read as _;
    let size = std::fs::metadata(path)
        .map_err(|_| QueryError::Internal)?
        .len();
    let mut prefix = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(1 << 20).read_to_end(&mut prefix))
        .map_err(|_| QueryError::Internal)?;
    let explicit = translate::data_set_is_explicit(ts)
        .ok_or(QueryError::Identifier(TranslateError::Encoding))?;
    // The data set must be of the patient it was asked for, whatever the PACS answered to
    // the query: an instance of another patient is discarded, never shown.
    let patient = translate::text_value(&prefix, explicit, PATIENT_ID)
        .map_err(QueryError::Identifier)?
        .unwrap_or_default();
    if patient != w.network_id {
        tracing::warn!(
            "the network sent an instance of another patient than the one requested; discarded"
        );
        return Err(QueryError::WrongPatient);
    }
    let head = if w.local_id == w.network_id {
        None
    } else {
        Some(
            translate::restore(&prefix, explicit, prefix.len() as u64 >= size, &w.local_id)
                .map_err(QueryError::Identifier)?,
        )
    };
    Ok(crate::forward::Outgoing {
        queued: crate::spool::Queued {
            id: i64::try_from(n).unwrap_or(i64::MAX),
            path: path.to_owned(),
            offset: 0,
            meta: crate::spool::Meta {
                sop_class: w
                    .arrived
                    .as_ref()
                    .map_or_else(|| w.sop_class.clone(), |(class, _)| class.clone()),
                sop_instance: w.sop_instance.clone(),
                transfer_syntax: ts.to_owned(),
                calling_ae: String::new(),
                patient_id: Some(w.local_id.clone()),
                // For the audit trail only: none if it cannot be read from the start.
                study_uid: translate::text_value(&prefix, explicit, STUDY_INSTANCE_UID)
                    .ok()
                    .flatten(),
            },
            size,
            attempts: 0,
        },
        head,
    })
}

async fn associate(
    proxy: &Proxy,
    contexts: Vec<(String, Vec<String>)>,
    scp_roles: &[String],
) -> Result<PacsAssociation, QueryError> {
    let mut options = ClientAssociationOptions::new()
        .calling_ae_title(proxy.pacs.calling_ae.clone())
        .called_ae_title(proxy.pacs.ae_title.clone())
        .read_timeout(proxy.pacs.timeout)
        .write_timeout(proxy.pacs.timeout)
        .connection_timeout(proxy.pacs.timeout);
    for (class, syntaxes) in contexts {
        options = options.with_presentation_context(class, syntaxes);
    }
    for class in scp_roles {
        options = options.with_role_selection(class.clone(), false, true);
    }
    crate::pacs::establish(
        options,
        proxy.pacs.addr,
        proxy.pacs.tls.as_ref(),
        proxy.pacs.timeout * 2,
    )
    .await
    .map_err(QueryError::Associate)
}

/// Every answer of a C-FIND at the network (at most [`MAX_INSTANCES`]).
async fn query_all(
    proxy: &Proxy,
    find_model: &str,
    transfer_syntax: &str,
    query: Vec<u8>,
) -> Result<Vec<Vec<u8>>, QueryError> {
    let mut assoc = associate(
        proxy,
        vec![(find_model.to_owned(), vec![transfer_syntax.to_owned()])],
        &[],
    )
    .await?;
    let pc_id = accepted(&assoc, find_model).ok_or(QueryError::NotAccepted)?;
    let mut rq = Command::new(CommandField::CFindRq);
    rq.affected_sop_class = Some(find_model.to_owned());
    rq.message_id = Some(1);
    rq.priority = Some(0);
    rq.has_dataset = true;
    send(&mut assoc, pc_id, PDataValueType::Command, rq.encode()).await?;
    send(&mut assoc, pc_id, PDataValueType::Data, query).await?;
    let mut out = Vec::new();
    loop {
        let (rsp, data) = receive(&mut assoc, CommandField::CFindRsp).await?;
        let status = rsp.status.ok_or(QueryError::Protocol)?;
        if status.class() != dimse::status::Class::Pending {
            let _ = assoc.release().await;
            return Ok(out);
        }
        if let Some(d) = data
            && out.len() < MAX_INSTANCES
        {
            out.push(d);
        }
    }
}

fn accepted(assoc: &PacsAssociation, class: &str) -> Option<u8> {
    accepted_with(assoc, class, None)
}

fn accepted_with(assoc: &PacsAssociation, class: &str, ts: Option<&str>) -> Option<u8> {
    assoc
        .presentation_contexts()
        .iter()
        .find(|pc| {
            pc.reason == PresentationContextResultReason::Acceptance
                && pc.abstract_syntax.trim_end_matches('\0') == class
                && ts.is_none_or(|t| pc.transfer_syntax.trim_end_matches('\0') == t)
        })
        .map(|pc| pc.id)
}

type Got = Vec<(Wanted, PathBuf, String)>;

/// C-GET of each wanted instance on one association; the files received, with their transfer
/// syntax. An error keeps what was received before it.
async fn get_all(
    proxy: &Proxy,
    get_model: &str,
    wanted: &[Wanted],
) -> Result<Got, (Got, QueryError)> {
    let mut classes: Vec<String> = Vec::new();
    for w in wanted {
        // A PACS that does not report SOPClassUID at IMAGE level: offer the common classes.
        let offer: Vec<&str> = if w.sop_class.is_empty() {
            COMMON_STORAGE_CLASSES.to_vec()
        } else {
            vec![w.sop_class.as_str()]
        };
        for class in offer {
            if !classes.iter().any(|c| c == class) && classes.len() < 11 {
                classes.push(class.to_owned());
            }
        }
    }
    let mut contexts = vec![(get_model.to_owned(), vec![STORAGE_SYNTAXES[1].to_owned()])];
    for c in &classes {
        for ts in STORAGE_SYNTAXES {
            contexts.push((c.clone(), vec![(*ts).to_owned()]));
        }
    }
    let mut got: Got = Vec::new();
    let mut assoc = match associate(proxy, contexts, &classes).await {
        Ok(a) => a,
        Err(e) => return Err((got, e)),
    };
    let Some(pc_id) = accepted(&assoc, get_model) else {
        return Err((got, QueryError::NotAccepted));
    };
    for (n, w) in wanted.iter().enumerate() {
        let ids: Vec<(u32, [u8; 2], Option<&str>)> = vec![
            (QR_LEVEL, *b"CS", Some("IMAGE")),
            (PATIENT_ID, *b"LO", Some(w.network_id.as_str())),
            (STUDY, *b"UI", Some(w.study.as_str())),
            (SERIES, *b"UI", Some(w.series.as_str())),
            (SOP_INSTANCE, *b"UI", Some(w.sop_instance.as_str())),
        ];
        // The identifier in implicit VR LE (the GET context's transfer syntax).
        let identifier = match translate::with_elements(&[], false, &ids) {
            Ok(i) => i,
            Err(e) => return Err((got, QueryError::Identifier(e))),
        };
        let mut rq = Command::new(CommandField::CGetRq);
        rq.affected_sop_class = Some(get_model.to_owned());
        rq.message_id = Some(u16::try_from(n % 60_000).unwrap_or(0) + 1);
        rq.priority = Some(0);
        rq.has_dataset = true;
        let sent = async {
            send(&mut assoc, pc_id, PDataValueType::Command, rq.encode()).await?;
            send(&mut assoc, pc_id, PDataValueType::Data, identifier).await
        };
        if let Err(e) = sent.await {
            return Err((got, e));
        }
        if let Err(e) = receive_stores(&mut assoc, proxy, w, &mut got).await {
            let _ = assoc.abort().await;
            return Err((got, e));
        }
    }
    let _ = assoc.release().await;
    Ok(got)
}

/// Receives the C-STOREs of one C-GET, until its final C-GET-RSP.
async fn receive_stores(
    assoc: &mut PacsAssociation,
    proxy: &Proxy,
    w: &Wanted,
    got: &mut Got,
) -> Result<(), QueryError> {
    use std::io::Write as _;
    let mut command_buf = crate::CommandBuf::default();
    let mut storing: Option<(Command, u8, std::fs::File, WorkFile)> = None;
    loop {
        let Pdu::PData { data: pdvs } =
            assoc.receive_pdu().await.map_err(QueryError::Association)?
        else {
            return Err(QueryError::Protocol);
        };
        for pdv in pdvs {
            match pdv.value_type {
                PDataValueType::Command => {
                    let Some(c) = command_buf.push(&pdv).map_err(|()| QueryError::Protocol)? else {
                        continue;
                    };
                    match c.field {
                        CommandField::CGetRsp => {
                            let status = c.status.ok_or(QueryError::Protocol)?;
                            if status.class() != dimse::status::Class::Pending {
                                return Ok(());
                            }
                        }
                        CommandField::CStoreRq if c.has_dataset => {
                            let path = proxy
                                .work_dir
                                .join(format!("{:016x}.dcm", fastrand::u64(..)));
                            let file =
                                std::fs::File::create(&path).map_err(|_| QueryError::Internal)?;
                            let work = WorkFile {
                                path: Some(path),
                                spool: proxy.spool.clone(),
                            };
                            storing = Some((c, pdv.presentation_context_id, file, work));
                        }
                        _ => return Err(QueryError::Protocol),
                    }
                }
                PDataValueType::Data => {
                    let Some((_, _, file, work)) = storing.as_mut() else {
                        return Err(QueryError::Protocol);
                    };
                    // Counted in the spool's quota before it is written (a full quota ends
                    // the retrieve: what did not come counts as failed).
                    if let Some(s) = &work.spool {
                        s.reserve(pdv.data.len() as u64)
                            .map_err(|_| QueryError::Full)?;
                    }
                    file.write_all(&pdv.data)
                        .map_err(|_| QueryError::Internal)?;
                    if pdv.is_last {
                        let Some((c, pc, file, mut work)) = storing.take() else {
                            return Err(QueryError::Protocol);
                        };
                        drop(file);
                        let Some(path) = work.path.take() else {
                            return Err(QueryError::Internal);
                        };
                        let ts = assoc
                            .presentation_contexts()
                            .iter()
                            .find(|p| p.id == pc)
                            .map(|p| p.transfer_syntax.trim_end_matches('\0').to_owned())
                            .unwrap_or_default();
                        // What arrived is judged in `collect`: only the instance asked for, of
                        // the patient asked for, is kept.
                        let uid = |v: &Option<String>| {
                            v.as_deref()
                                .map(|u| u.trim_end_matches(['\0', ' ']).to_owned())
                                .unwrap_or_default()
                        };
                        let mut item = w.clone();
                        item.arrived =
                            Some((uid(&c.affected_sop_class), uid(&c.affected_sop_instance)));
                        got.push((item, path, ts));
                        let rsp = c.respond(Status::SUCCESS).ok_or(QueryError::Protocol)?;
                        send(assoc, pc, PDataValueType::Command, rsp.encode()).await?;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_work_dir_is_emptied_and_a_missing_one_is_fine() {
        let dir = tempfile::tempdir().unwrap();
        for n in 0..3 {
            std::fs::write(dir.path().join(format!("{n}.dcm")), b"half").unwrap();
        }
        assert_eq!(clean_work_dir(dir.path()), 3);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        assert_eq!(clean_work_dir(&dir.path().join("absent")), 0);
    }

    #[test]
    fn a_retrieved_instance_of_another_patient_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ct = "1.2.840.10008.5.1.4.1.1.2";
        // What the PACS sent: a data set (explicit VR LE) of NET-9999999.
        let data = translate::with_elements(
            &[],
            true,
            &[
                (SOP_CLASS, *b"UI", Some(ct)),
                (SOP_INSTANCE, *b"UI", Some("1.2.3.4")),
                (PATIENT_ID, *b"LO", Some("NET-9999999")),
            ],
        )
        .unwrap();
        let path = dir.path().join("got.dcm");
        std::fs::write(&path, &data).unwrap();
        let wanted = |network: &str| Wanted {
            sop_class: ct.into(),
            sop_instance: "1.2.3.4".into(),
            study: "1.2.3".into(),
            series: "1.2.3.1".into(),
            network_id: network.into(),
            local_id: "0001234".into(),
            arrived: Some((ct.into(), "1.2.3.4".into())),
        };
        let explicit_le = "1.2.840.10008.1.2.1";
        assert!(matches!(
            outgoing_for(0, &wanted("NET-0001234"), &path, explicit_le),
            Err(QueryError::WrongPatient)
        ));
        // The patient asked for: accepted, with the clinic's ID restored.
        let o = outgoing_for(0, &wanted("NET-9999999"), &path, explicit_le).unwrap();
        assert_eq!(o.queued.meta.patient_id.as_deref(), Some("0001234"));
        assert!(o.head.is_some());
    }

    #[test]
    fn move_and_get_models_map_to_their_find_and_get_models() {
        let study = ("1.2.840.10008.5.1.4.1.2.2.1", "1.2.840.10008.5.1.4.1.2.2.3");
        let patient = ("1.2.840.10008.5.1.4.1.2.1.1", "1.2.840.10008.5.1.4.1.2.1.3");
        assert_eq!(models("1.2.840.10008.5.1.4.1.2.2.2"), Some(study));
        assert_eq!(models("1.2.840.10008.5.1.4.1.2.2.3"), Some(study));
        assert_eq!(models("1.2.840.10008.5.1.4.1.2.1.2"), Some(patient));
        assert_eq!(models("1.2.840.10008.5.1.4.1.2.1.3"), Some(patient));
        assert_eq!(models("1.2.840.10008.5.1.4.1.1.2"), None);
    }

    #[test]
    fn retrieve_statuses_follow_the_counts() {
        assert_eq!(retrieve_done(3, 0).status, Status::SUCCESS);
        assert_eq!(
            retrieve_done(2, 1).status,
            Status::WARNING_SUBOPERATIONS_FAILED
        );
        assert_eq!(
            retrieve_done(0, 2).status,
            Status::OUT_OF_RESOURCES_SUBOPERATIONS
        );
        assert_eq!(retrieve_done(0, 0).counts, Some((0, 0)));
    }
}
