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

use consent::client::{Identities as _, SocketGate, Verdict};
use dicom_ul::ClientAssociationOptions;
use dicom_ul::Pdu;
use dicom_ul::association::AsyncClientAssociation;
use dicom_ul::pdu::{PDataValue, PDataValueType, PresentationContextResultReason};
use dimse::command::{Command, CommandField};
use dimse::status::Status;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::forward::Destination;
use crate::translate::{self, TranslateError};

const PATIENT_ID: u32 = 0x0010_0020;
const ISSUER: u32 = 0x0010_0021;
/// The largest identifier a viewer or the network may send (they are a few hundred bytes).
pub const MAX_IDENTIFIER: usize = 1 << 20;
/// "Unable to process" (C001H): the network could not be asked.
pub const UNABLE_TO_PROCESS: Status = Status(0xC001);

/// What the proxy needs.
#[derive(Debug, Clone)]
pub struct Proxy {
    pub pacs: Destination,
    /// This clinic's 医療機関コード: the recipient of what a viewer sees.
    pub facility_code: String,
    /// Whether patient IDs are translated (`patient-ids = "translate"`).
    pub translate: bool,
    pub consent_socket: PathBuf,
}

/// One answer to the viewer: a status and, for a pending one, an identifier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: Status,
    pub identifier: Option<Vec<u8>>,
    pub comment: Option<String>,
}

impl Reply {
    fn last(status: Status, comment: Option<String>) -> Reply {
        Reply {
            status,
            identifier: None,
            comment,
        }
    }
}

/// Why the network could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("cannot associate with the network PACS")]
    Associate(#[source] dicom_ul::association::Error),
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
}

/// The identity and consent questions of one query, answered by the consent service (each
/// asked once per query).
struct Checks {
    gate: SocketGate,
    facility: String,
    locals: Vec<(String, Option<String>)>,
    verdicts: Vec<(String, bool)>,
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

    /// Whether this clinic may see images of the local patient.
    fn visible(&mut self, local: &str) -> Result<bool, QueryError> {
        if let Some((_, v)) = self.verdicts.iter().find(|(p, _)| p == local) {
            return Ok(*v);
        }
        let v = matches!(
            self.gate
                .decide_for(local, &self.facility, "images")
                .map_err(QueryError::Consent)?,
            Verdict::Permit
        );
        self.verdicts.push((local.to_owned(), v));
        Ok(v)
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
    replies: mpsc::Sender<Reply>,
) {
    let last = match find_inner(&proxy, &command, &transfer_syntax, &identifier, &replies).await {
        Ok(status) => Reply::last(status, None),
        Err(e) => {
            let message = tsunagi_runtime::child::error_chain(&e);
            tracing::warn!(error = %message, "C-FIND through the network failed");
            Reply::last(UNABLE_TO_PROCESS, Some(e.to_string()))
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

async fn find_inner(
    proxy: &Proxy,
    command: &Command,
    transfer_syntax: &str,
    identifier: &[u8],
    replies: &mpsc::Sender<Reply>,
) -> Result<Status, QueryError> {
    let explicit = translate::data_set_is_explicit(transfer_syntax)
        .ok_or(QueryError::Identifier(TranslateError::Encoding))?;
    let asked_id =
        translate::text_value(identifier, explicit, PATIENT_ID).map_err(QueryError::Identifier)?;
    let mut checks = Checks {
        gate: SocketGate::new(&proxy.consent_socket),
        facility: proxy.facility_code.clone(),
        locals: Vec::new(),
        verdicts: Vec::new(),
    };
    // The viewer's PatientID, as the network knows it.
    let network_key: String = match asked_id.as_deref() {
        Some(local) if proxy.translate && !local.is_empty() && !has_wildcard(local) => {
            let local = local.to_owned();
            let (c, r) = blocking(checks, move |c| c.network_id(&local)).await?;
            checks = c;
            match r {
                Some(n) => n,
                // Nothing was ever sent under a network ID for this patient.
                None => return Ok(Status::SUCCESS),
            }
        }
        Some(v) => v.to_owned(),
        None => String::new(),
    };
    let query = translate::with_elements(
        identifier,
        explicit,
        &[(PATIENT_ID, *b"LO", Some(network_key.as_str()))],
    )
    .map_err(QueryError::Identifier)?;

    let sop_class = command.affected_sop_class.clone().unwrap_or_default();
    let mut assoc = ClientAssociationOptions::new()
        .calling_ae_title(proxy.pacs.calling_ae.clone())
        .called_ae_title(proxy.pacs.ae_title.clone())
        .read_timeout(proxy.pacs.timeout)
        .write_timeout(proxy.pacs.timeout)
        .connection_timeout(proxy.pacs.timeout)
        .with_presentation_context(sop_class.clone(), vec![transfer_syntax.to_owned()])
        .establish_async(proxy.pacs.addr)
        .await
        .map_err(QueryError::Associate)?;
    let _ = assoc.inner_stream().set_nodelay(true);
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
    send(&mut assoc, pc_id, PDataValueType::Command, rq.encode()).await?;
    send(&mut assoc, pc_id, PDataValueType::Data, query).await?;
    loop {
        let (rsp, data) = receive(&mut assoc).await?;
        let status = rsp.status.ok_or(QueryError::Protocol)?;
        if status.class() != dimse::status::Class::Pending {
            let _ = assoc.release().await;
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
        let (c, visible) = blocking(checks, move |c| c.visible(&l)).await?;
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
    assoc: &mut AsyncClientAssociation<TcpStream>,
    pc_id: u8,
    kind: PDataValueType,
    data: Vec<u8>,
) -> Result<(), QueryError> {
    assoc
        .send(&Pdu::PData {
            data: vec![PDataValue {
                presentation_context_id: pc_id,
                value_type: kind,
                is_last: true,
                data,
            }],
        })
        .await
        .map_err(QueryError::Association)
}

/// One response: its command and, when it has one, its data set.
async fn receive(
    assoc: &mut AsyncClientAssociation<TcpStream>,
) -> Result<(Command, Option<Vec<u8>>), QueryError> {
    let mut command_buf = Vec::new();
    let mut command: Option<Command> = None;
    let mut data = Vec::new();
    loop {
        let Pdu::PData { data: pdvs } = assoc.receive().await.map_err(QueryError::Association)?
        else {
            return Err(QueryError::Protocol);
        };
        for pdv in pdvs {
            match pdv.value_type {
                PDataValueType::Command => {
                    command_buf.extend_from_slice(&pdv.data);
                    if command_buf.len() > dimse::command::MAX_COMMAND_SET {
                        return Err(QueryError::Protocol);
                    }
                    if pdv.is_last {
                        let c = Command::decode(&command_buf).map_err(|_| QueryError::Protocol)?;
                        if c.field != CommandField::CFindRsp {
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
