//! Audit messages in the DICOM audit message format (PS3.15 A.5), as IHE ATNA (ITI-20)
//! wants them: an [`AuditMessage`] is an event (what, when, how it ended), the active
//! participants (the box, its peer), the audit source (the box in its facility) and the
//! participant objects (the patient under the network ID, a study, a query, a file).
//!
//! The builders below make one message per event kind of issue 17. Patient data never goes
//! in beyond what ATNA requires to find the records: the patient appears by the network ID
//! only, never by name; a query by its SOP Class and, base64-encoded as A.5 asks, the query
//! keys the peer sent.
//!
//! Written with `quick-xml`, every attribute value escaped by it; the coded values use the
//! DICOM schema's `csd-code`, `codeSystemName` and `originalText` attributes.

use std::time::SystemTime;

use quick_xml::Writer;
use quick_xml::events::{BytesEnd, BytesStart, BytesText, Event};

/// A coded value (PS3.15 A.5.1 `CodedValueType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Code {
    pub code: &'static str,
    pub system: &'static str,
    pub text: &'static str,
}

const fn dcm(code: &'static str, text: &'static str) -> Code {
    Code {
        code,
        system: "DCM",
        text,
    }
}

/// The codes the box uses (PS3.16 CID 400-405 and the RFC 3881 ID types).
pub mod codes {
    use super::{Code, dcm};

    pub const APPLICATION_ACTIVITY: Code = dcm("110100", "Application Activity");
    pub const AUDIT_LOG_USED: Code = dcm("110101", "Audit Log Used");
    pub const INSTANCES_TRANSFERRED: Code = dcm("110104", "DICOM Instances Transferred");
    pub const EXPORT: Code = dcm("110106", "Export");
    pub const PATIENT_RECORD: Code = dcm("110110", "Patient Record");
    pub const QUERY: Code = dcm("110112", "Query");
    pub const SECURITY_ALERT: Code = dcm("110113", "Security Alert");
    pub const USER_AUTHENTICATION: Code = dcm("110114", "User Authentication");

    pub const APPLICATION_START: Code = dcm("110120", "Application Start");
    pub const APPLICATION_STOP: Code = dcm("110121", "Application Stop");
    pub const LOGIN: Code = dcm("110122", "Login");
    pub const LOGOUT: Code = dcm("110123", "Logout");
    pub const NODE_AUTHENTICATION: Code = dcm("110126", "Node Authentication");
    pub const SECURITY_CONFIGURATION: Code = dcm("110129", "Security Configuration");
    pub const SOFTWARE_CONFIGURATION: Code = dcm("110131", "Software Configuration");
    pub const AUDIT_RECORDING_STOPPED: Code = dcm("110133", "Audit Recording Stopped");
    pub const SECURITY_ROLES_CHANGED: Code = dcm("110136", "Security Roles Changed");
    pub const USER_SECURITY_ATTRIBUTES_CHANGED: Code =
        dcm("110137", "User Security Attributes Changed");

    pub const ROLE_APPLICATION: Code = dcm("110150", "Application");
    pub const ROLE_DESTINATION: Code = dcm("110152", "Destination Role ID");
    pub const ROLE_SOURCE: Code = dcm("110153", "Source Role ID");

    pub const STUDY_INSTANCE_UID: Code = dcm("110180", "Study Instance UID");
    pub const SOP_CLASS_UID: Code = dcm("110181", "SOP Class UID");
    pub const NODE_ID: Code = dcm("110182", "Node ID");
    pub const PATIENT_NUMBER: Code = Code {
        code: "2",
        system: "RFC-3881",
        text: "Patient Number",
    };
    pub const URI: Code = Code {
        code: "12",
        system: "RFC-3881",
        text: "URI",
    };
    pub const USER_IDENTIFIER: Code = Code {
        code: "11",
        system: "RFC-3881",
        text: "User Identifier",
    };
}

/// EventActionCode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Create,
    Read,
    Update,
    Delete,
    Execute,
}

impl Action {
    fn code(self) -> &'static str {
        match self {
            Action::Create => "C",
            Action::Read => "R",
            Action::Update => "U",
            Action::Delete => "D",
            Action::Execute => "E",
        }
    }
}

/// EventOutcomeIndicator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    MinorFailure,
    SeriousFailure,
    MajorFailure,
}

impl Outcome {
    fn code(self) -> &'static str {
        match self {
            Outcome::Success => "0",
            Outcome::MinorFailure => "4",
            Outcome::SeriousFailure => "8",
            Outcome::MajorFailure => "12",
        }
    }
}

/// An ActiveParticipant: a process or a node taking part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Participant {
    /// The box's serial, an AE title, a user name.
    pub user_id: String,
    /// The process (its pid) or the AE titles, where known.
    pub alternative_user_id: Option<String>,
    pub is_requestor: bool,
    /// An IP address (NetworkAccessPointTypeCode 2) or a node name (1).
    pub network_access_point: Option<String>,
    pub role: Option<Code>,
}

/// A ParticipantObjectIdentification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Object {
    pub id: String,
    /// 1 person, 2 system object, 3 organization, 4 other.
    pub type_code: u8,
    /// 1 patient, 3 report, 10 guarantor..., 24 query (RFC 3881 table).
    pub role: u8,
    pub id_type: Code,
    /// Base64 of the query keys, for a query object.
    pub query: Option<Vec<u8>>,
    /// ParticipantObjectDetail: type and value (base64 in the XML).
    pub details: Vec<(String, String)>,
    /// The SOP classes and instance counts of a study (ParticipantObjectDescription).
    pub sop_classes: Vec<(String, u32)>,
}

/// The box as an audit source: its facility (医療機関コード) and its serial.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub facility: String,
    pub serial: String,
    /// Its address on the network (the tunnel's).
    pub address: Option<String>,
}

/// One audit message (PS3.15 A.5.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditMessage {
    pub event: Code,
    pub event_types: Vec<Code>,
    pub action: Action,
    pub at: SystemTime,
    pub outcome: Outcome,
    /// EventOutcomeDescription: why a failure failed, in words (no patient data).
    pub outcome_description: Option<String>,
    pub participants: Vec<Participant>,
    pub source: Node,
    pub objects: Vec<Object>,
}

/// Base64 (RFC 4648, with padding), for ParticipantObjectQuery and Detail values.
fn base64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// xs:dateTime in UTC, to the millisecond.
fn date_time(at: SystemTime) -> String {
    let ts = jiff::Timestamp::try_from(at).unwrap_or(jiff::Timestamp::UNIX_EPOCH);
    format!("{ts:.3}")
}

type Xml = Writer<Vec<u8>>;

fn start(w: &mut Xml, name: &str, attributes: &[(&str, &str)]) {
    let mut e = BytesStart::new(name);
    for (k, v) in attributes {
        e.push_attribute((*k, *v));
    }
    // Writing into a Vec cannot fail.
    let _ = w.write_event(Event::Start(e));
}

fn empty(w: &mut Xml, name: &str, attributes: &[(&str, &str)]) {
    let mut e = BytesStart::new(name);
    for (k, v) in attributes {
        e.push_attribute((*k, *v));
    }
    let _ = w.write_event(Event::Empty(e));
}

fn end(w: &mut Xml, name: &str) {
    let _ = w.write_event(Event::End(BytesEnd::new(name)));
}

fn text(w: &mut Xml, name: &str, value: &str) {
    start(w, name, &[]);
    let _ = w.write_event(Event::Text(BytesText::new(value)));
    end(w, name);
}

fn code(w: &mut Xml, name: &str, c: Code) {
    empty(
        w,
        name,
        &[
            ("csd-code", c.code),
            ("codeSystemName", c.system),
            ("originalText", c.text),
        ],
    );
}

impl AuditMessage {
    /// The message as XML (no declaration, no line breaks: one syslog MSG).
    pub fn to_xml(&self) -> String {
        let mut w = Writer::new(Vec::new());
        start(&mut w, "AuditMessage", &[]);
        let at = date_time(self.at);
        start(
            &mut w,
            "EventIdentification",
            &[
                ("EventActionCode", self.action.code()),
                ("EventDateTime", &at),
                ("EventOutcomeIndicator", self.outcome.code()),
            ],
        );
        code(&mut w, "EventID", self.event);
        for t in &self.event_types {
            code(&mut w, "EventTypeCode", *t);
        }
        if let Some(d) = &self.outcome_description {
            text(&mut w, "EventOutcomeDescription", d);
        }
        end(&mut w, "EventIdentification");
        for p in &self.participants {
            let mut attributes = vec![("UserID", p.user_id.as_str())];
            if let Some(alt) = &p.alternative_user_id {
                attributes.push(("AlternativeUserID", alt));
            }
            attributes.push((
                "UserIsRequestor",
                if p.is_requestor { "true" } else { "false" },
            ));
            if let Some(nap) = &p.network_access_point {
                attributes.push(("NetworkAccessPointID", nap));
                let is_ip = nap.parse::<std::net::IpAddr>().is_ok();
                attributes.push(("NetworkAccessPointTypeCode", if is_ip { "2" } else { "1" }));
            }
            match p.role {
                Some(role) => {
                    start(&mut w, "ActiveParticipant", &attributes);
                    code(&mut w, "RoleIDCode", role);
                    end(&mut w, "ActiveParticipant");
                }
                None => empty(&mut w, "ActiveParticipant", &attributes),
            }
        }
        start(
            &mut w,
            "AuditSourceIdentification",
            &[
                ("AuditEnterpriseSiteID", &self.source.facility),
                ("AuditSourceID", &self.source.serial),
            ],
        );
        // 4: an application server process tier (RFC 3881 audit source types).
        empty(
            &mut w,
            "AuditSourceTypeCode",
            &[
                ("csd-code", "4"),
                ("codeSystemName", "DCM"),
                ("originalText", "Application Server"),
            ],
        );
        end(&mut w, "AuditSourceIdentification");
        for o in &self.objects {
            let (type_code, role) = (o.type_code.to_string(), o.role.to_string());
            start(
                &mut w,
                "ParticipantObjectIdentification",
                &[
                    ("ParticipantObjectID", &o.id),
                    ("ParticipantObjectTypeCode", &type_code),
                    ("ParticipantObjectTypeCodeRole", &role),
                ],
            );
            code(&mut w, "ParticipantObjectIDTypeCode", o.id_type);
            if let Some(q) = &o.query {
                text(&mut w, "ParticipantObjectQuery", &base64(q));
            }
            for (kind, value) in &o.details {
                empty(
                    &mut w,
                    "ParticipantObjectDetail",
                    &[("type", kind), ("value", &base64(value.as_bytes()))],
                );
            }
            if !o.sop_classes.is_empty() {
                start(&mut w, "ParticipantObjectDescription", &[]);
                for (uid, count) in &o.sop_classes {
                    let n = count.to_string();
                    empty(
                        &mut w,
                        "SOPClass",
                        &[("UID", uid), ("NumberOfInstances", &n)],
                    );
                }
                end(&mut w, "ParticipantObjectDescription");
            }
            end(&mut w, "ParticipantObjectIdentification");
        }
        end(&mut w, "AuditMessage");
        String::from_utf8(w.into_inner()).unwrap_or_default()
    }
}

/// The box's own process as a participant.
fn this_box(node: &Node, requestor: bool, role: Code) -> Participant {
    Participant {
        user_id: node.serial.clone(),
        alternative_user_id: Some(std::process::id().to_string()),
        is_requestor: requestor,
        network_access_point: node.address.clone(),
        role: Some(role),
    }
}

/// A console account at an address on the clinic LAN, as the one who asked.
fn staff(account: &str, from: &str) -> Participant {
    Participant {
        user_id: account.to_owned(),
        alternative_user_id: None,
        is_requestor: true,
        network_access_point: Some(from.to_owned()),
        role: None,
    }
}

/// The patient, under the network ID.
pub fn patient(network_id: &str) -> Object {
    Object {
        id: network_id.to_owned(),
        type_code: 1,
        role: 1,
        id_type: codes::PATIENT_NUMBER,
        query: None,
        details: Vec::new(),
        sop_classes: Vec::new(),
    }
}

/// A study, with its SOP classes and instance counts.
pub fn study(uid: &str, sop_classes: &[(String, u32)]) -> Object {
    Object {
        id: uid.to_owned(),
        type_code: 2,
        role: 3,
        id_type: codes::STUDY_INSTANCE_UID,
        query: None,
        details: Vec::new(),
        sop_classes: sop_classes.to_vec(),
    }
}

/// Application Start or Stop (A.5.3.1).
pub fn application_activity(node: &Node, start: bool, at: SystemTime) -> AuditMessage {
    AuditMessage {
        event: codes::APPLICATION_ACTIVITY,
        event_types: vec![if start {
            codes::APPLICATION_START
        } else {
            codes::APPLICATION_STOP
        }],
        action: Action::Execute,
        at,
        outcome: Outcome::Success,
        outcome_description: None,
        participants: vec![this_box(node, false, codes::ROLE_APPLICATION)],
        source: node.clone(),
        objects: Vec::new(),
    }
}

/// Which way instances went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From a clinic modality to the box.
    Received,
    /// From the box to the network PACS.
    Sent,
}

/// A peer node: its AE title and address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub ae_title: String,
    pub address: String,
}

/// DICOM Instances Transferred (A.5.3.6): one study's instances received from or sent to
/// `peer`, the patient under the network ID.
#[expect(
    clippy::too_many_arguments,
    reason = "one argument per field of the message A.5.3.6 describes"
)]
pub fn instances_transferred(
    node: &Node,
    direction: Direction,
    peer: &Peer,
    outcome: Outcome,
    patient_network_id: &str,
    study_uid: &str,
    sop_classes: &[(String, u32)],
    at: SystemTime,
) -> AuditMessage {
    let other = Participant {
        user_id: peer.ae_title.clone(),
        alternative_user_id: None,
        is_requestor: direction == Direction::Received,
        network_access_point: Some(peer.address.clone()),
        role: Some(match direction {
            Direction::Received => codes::ROLE_SOURCE,
            Direction::Sent => codes::ROLE_DESTINATION,
        }),
    };
    let me = this_box(
        node,
        direction == Direction::Sent,
        match direction {
            Direction::Received => codes::ROLE_DESTINATION,
            Direction::Sent => codes::ROLE_SOURCE,
        },
    );
    let participants = match direction {
        Direction::Received => vec![other, me],
        Direction::Sent => vec![me, other],
    };
    AuditMessage {
        event: codes::INSTANCES_TRANSFERRED,
        event_types: Vec::new(),
        action: match direction {
            Direction::Received => Action::Create,
            Direction::Sent => Action::Read,
        },
        at,
        outcome,
        outcome_description: None,
        participants,
        source: node.clone(),
        objects: vec![study(study_uid, sop_classes), patient(patient_network_id)],
    }
}

/// Query (A.5.3.10): a C-FIND from `peer` through the box, with its SOP Class and the query
/// keys (the dataset as received, base64 in the message).
pub fn query(
    node: &Node,
    peer: &Peer,
    outcome: Outcome,
    sop_class_uid: &str,
    keys: &[u8],
    at: SystemTime,
) -> AuditMessage {
    AuditMessage {
        event: codes::QUERY,
        event_types: Vec::new(),
        action: Action::Execute,
        at,
        outcome,
        outcome_description: None,
        participants: vec![
            Participant {
                user_id: peer.ae_title.clone(),
                alternative_user_id: None,
                is_requestor: true,
                network_access_point: Some(peer.address.clone()),
                role: Some(codes::ROLE_SOURCE),
            },
            this_box(node, false, codes::ROLE_DESTINATION),
        ],
        source: node.clone(),
        objects: vec![Object {
            id: sop_class_uid.to_owned(),
            type_code: 2,
            role: 3,
            id_type: codes::SOP_CLASS_UID,
            query: Some(keys.to_vec()),
            details: Vec::new(),
            sop_classes: Vec::new(),
        }],
    }
}

/// An SS-MIX2 file exported to the hub's replica (Export, action R) or deleted there
/// (Patient Record, action D), by its path under the storage root.
pub fn ssmix2_file(
    node: &Node,
    deleted: bool,
    replica: &str,
    path: &str,
    patient_network_id: &str,
    outcome: Outcome,
    at: SystemTime,
) -> AuditMessage {
    AuditMessage {
        event: if deleted {
            codes::PATIENT_RECORD
        } else {
            codes::EXPORT
        },
        event_types: Vec::new(),
        action: if deleted {
            Action::Delete
        } else {
            Action::Read
        },
        at,
        outcome,
        outcome_description: None,
        participants: vec![
            this_box(node, true, codes::ROLE_SOURCE),
            Participant {
                user_id: replica.to_owned(),
                alternative_user_id: None,
                is_requestor: false,
                network_access_point: None,
                role: Some(codes::ROLE_DESTINATION),
            },
        ],
        source: node.clone(),
        objects: vec![
            patient(patient_network_id),
            Object {
                id: path.to_owned(),
                type_code: 2,
                role: 3,
                id_type: codes::URI,
                query: None,
                details: Vec::new(),
                sop_classes: Vec::new(),
            },
        ],
    }
}

/// A consent or identity change (Patient Record, A.5.3.9): `what` says which (for example
/// "Consent", "公開設定", "名寄せ"), as a detail.
pub fn patient_record(
    node: &Node,
    action: Action,
    patient_network_id: &str,
    what: &str,
    user: Option<(&str, &str)>,
    at: SystemTime,
) -> AuditMessage {
    let mut object = patient(patient_network_id);
    object.details.push(("change".to_owned(), what.to_owned()));
    // A change at the console: the staff member asked for it, the box made it.
    let mut participants: Vec<Participant> = user
        .map(|(user, from)| Participant {
            user_id: user.to_owned(),
            alternative_user_id: None,
            is_requestor: true,
            network_access_point: (!from.is_empty()).then(|| from.to_owned()),
            role: None,
        })
        .into_iter()
        .collect();
    participants.push(this_box(node, user.is_none(), codes::ROLE_APPLICATION));
    AuditMessage {
        event: codes::PATIENT_RECORD,
        event_types: Vec::new(),
        action,
        at,
        outcome: Outcome::Success,
        outcome_description: None,
        participants,
        source: node.clone(),
        objects: vec![object],
    }
}

/// What a security alert is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alert {
    /// A provisioning medium refused.
    RefusedMedium,
    /// A TLS peer refused (another CA, expired, the wrong name).
    RefusedTlsPeer,
    /// The local audit trail failed its verification.
    FailedAuditVerify,
    /// Something of the update channel refused (expired or untrusted metadata, an older
    /// release, a bundle that is not the one signed).
    RefusedUpdate,
    /// An update installed, or its first boot judged (kept, or rolled back).
    Update,
    /// The box's clock is off the network's time, or its sync is lost (IHE CT), or back in
    /// step (a success).
    Clock,
}

/// Security Alert (A.5.3.11), a failure (minor) with the reason in words.
pub fn security_alert(
    node: &Node,
    alert: Alert,
    reason: &str,
    subject: Option<&str>,
    at: SystemTime,
) -> AuditMessage {
    let event_type = match alert {
        Alert::RefusedMedium => codes::SECURITY_CONFIGURATION,
        Alert::RefusedTlsPeer => codes::NODE_AUTHENTICATION,
        Alert::FailedAuditVerify => codes::AUDIT_RECORDING_STOPPED,
        Alert::RefusedUpdate | Alert::Update => codes::SOFTWARE_CONFIGURATION,
        // The time every record carries is part of the security configuration.
        Alert::Clock => codes::SECURITY_CONFIGURATION,
    };
    AuditMessage {
        event: codes::SECURITY_ALERT,
        event_types: vec![event_type],
        action: Action::Execute,
        at,
        outcome: Outcome::MinorFailure,
        outcome_description: Some(reason.to_owned()),
        participants: vec![this_box(node, false, codes::ROLE_APPLICATION)],
        source: node.clone(),
        objects: subject
            .map(|s| Object {
                id: s.to_owned(),
                type_code: 2,
                role: 13,
                id_type: codes::NODE_ID,
                query: None,
                details: Vec::new(),
                sop_classes: Vec::new(),
            })
            .into_iter()
            .collect(),
    }
}

/// A change to a console account by an administrator (Security Alert, a success): its
/// role (Security Roles Changed), or the account added, removed or unlocked (User
/// Security Attributes Changed); `what` says which, in words.
pub fn account_change(
    node: &Node,
    admin: &str,
    from: &str,
    account: &str,
    role_changed: bool,
    what: &str,
    at: SystemTime,
) -> AuditMessage {
    AuditMessage {
        event: codes::SECURITY_ALERT,
        event_types: vec![if role_changed {
            codes::SECURITY_ROLES_CHANGED
        } else {
            codes::USER_SECURITY_ATTRIBUTES_CHANGED
        }],
        action: Action::Update,
        at,
        outcome: Outcome::Success,
        outcome_description: Some(what.to_owned()),
        participants: vec![
            staff(admin, from),
            this_box(node, false, codes::ROLE_APPLICATION),
        ],
        source: node.clone(),
        objects: vec![Object {
            id: account.to_owned(),
            // A person, as a security user entity.
            type_code: 1,
            role: 11,
            id_type: codes::USER_IDENTIFIER,
            query: None,
            details: Vec::new(),
            sop_classes: Vec::new(),
        }],
    }
}

/// The URI that names the consent service's decision trail (the 監査 page's) as an audit
/// log.
pub const CONSENT_TRAIL_URI: &str = "urn:tsunagi:audit:consent-decisions";

/// Audit Log Used (DICOM PS3.15 A.5.3.2): `user`, from the address `from`, read the audit
/// log named by the URI `log`.
pub fn audit_log_used(
    node: &Node,
    user: &str,
    from: &str,
    log: &str,
    at: SystemTime,
) -> AuditMessage {
    AuditMessage {
        event: codes::AUDIT_LOG_USED,
        event_types: Vec::new(),
        action: Action::Read,
        at,
        outcome: Outcome::Success,
        outcome_description: None,
        participants: vec![
            staff(user, from),
            this_box(node, false, codes::ROLE_APPLICATION),
        ],
        source: node.clone(),
        objects: vec![Object {
            id: log.to_owned(),
            // A system object, a security resource, named by its URI.
            type_code: 2,
            role: 13,
            id_type: codes::URI,
            query: None,
            details: Vec::new(),
            sop_classes: Vec::new(),
        }],
    }
}

/// A failed login at the console (User Authentication, Login, a minor failure).
pub fn failed_login(node: &Node, user: &str, from: &str, at: SystemTime) -> AuditMessage {
    user_authentication(node, user, from, false, false, at)
}

/// User Authentication (DICOM PS3.15 A.5.3.20): a login (or a `logout`) of `user` from the
/// address `from`, which succeeded or not.
pub fn user_authentication(
    node: &Node,
    user: &str,
    from: &str,
    logout: bool,
    success: bool,
    at: SystemTime,
) -> AuditMessage {
    AuditMessage {
        event: codes::USER_AUTHENTICATION,
        event_types: vec![if logout { codes::LOGOUT } else { codes::LOGIN }],
        action: Action::Execute,
        at,
        outcome: if success {
            Outcome::Success
        } else {
            Outcome::MinorFailure
        },
        outcome_description: None,
        participants: vec![
            staff(user, from),
            this_box(node, false, codes::ROLE_APPLICATION),
        ],
        source: node.clone(),
        objects: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quick_xml::Reader;
    use std::time::{Duration, UNIX_EPOCH};

    fn node() -> Node {
        Node {
            facility: "1312345678".to_owned(),
            serial: "1312345678-QEMU-0001".to_owned(),
            address: Some("10.99.0.2".to_owned()),
        }
    }

    /// Every element of `xml` with its attributes, in document order; panics unless it is
    /// well-formed.
    fn elements(xml: &str) -> Vec<(String, Vec<(String, String)>)> {
        let mut reader = Reader::from_str(xml);
        reader.config_mut().check_end_names = true;
        let mut out = Vec::new();
        let mut depth = 0i32;
        let parse = |e: &BytesStart<'_>| {
            let name = String::from_utf8(e.name().as_ref().to_vec()).unwrap();
            let attributes = e
                .attributes()
                .map(|a| {
                    let a = a.unwrap();
                    (
                        String::from_utf8(a.key.as_ref().to_vec()).unwrap(),
                        a.unescape_value().unwrap().into_owned(),
                    )
                })
                .collect();
            (name, attributes)
        };
        loop {
            match reader.read_event().unwrap() {
                Event::Start(e) => {
                    depth += 1;
                    out.push(parse(&e));
                }
                Event::Empty(e) => out.push(parse(&e)),
                Event::End(_) => depth -= 1,
                Event::Eof => break,
                _ => {}
            }
        }
        assert_eq!(depth, 0, "{xml}");
        out
    }

    fn attribute<'a>(
        el: &'a [(String, Vec<(String, String)>)],
        name: &str,
        key: &str,
    ) -> Vec<&'a str> {
        el.iter()
            .filter(|(n, _)| n == name)
            .filter_map(|(_, a)| a.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str()))
            .collect()
    }

    #[test]
    fn application_start_names_the_box_and_its_facility() {
        let at = UNIX_EPOCH + Duration::from_millis(1_796_446_935_123);
        let xml = application_activity(&node(), true, at).to_xml();
        assert!(!xml.contains('\n'), "{xml}");
        let el = elements(&xml);
        assert_eq!(el[0].0, "AuditMessage");
        assert_eq!(
            attribute(&el, "EventIdentification", "EventActionCode"),
            ["E"]
        );
        assert_eq!(
            attribute(&el, "EventIdentification", "EventDateTime"),
            ["2026-12-05T05:02:15.123Z"]
        );
        assert_eq!(attribute(&el, "EventID", "csd-code"), ["110100"]);
        assert_eq!(attribute(&el, "EventTypeCode", "csd-code"), ["110120"]);
        assert_eq!(
            attribute(&el, "AuditSourceIdentification", "AuditEnterpriseSiteID"),
            ["1312345678"]
        );
        assert_eq!(
            attribute(&el, "ActiveParticipant", "NetworkAccessPointTypeCode"),
            ["2"]
        );
        let stop = application_activity(&node(), false, at).to_xml();
        assert!(stop.contains("csd-code=\"110121\""), "{stop}");
    }

    #[test]
    fn a_transfer_carries_the_patient_under_the_network_id_and_the_study() {
        let peer = Peer {
            ae_title: "ORTHANC".to_owned(),
            address: "10.98.0.1".to_owned(),
        };
        let xml = instances_transferred(
            &node(),
            Direction::Sent,
            &peer,
            Outcome::Success,
            "TSUNAGI-NET-0042",
            "1.2.392.1.1",
            &[("1.2.840.10008.5.1.4.1.1.2".to_owned(), 30)],
            SystemTime::now(),
        )
        .to_xml();
        let el = elements(&xml);
        assert_eq!(
            attribute(&el, "EventIdentification", "EventActionCode"),
            ["R"]
        );
        assert_eq!(
            attribute(
                &el,
                "ParticipantObjectIdentification",
                "ParticipantObjectID"
            ),
            ["1.2.392.1.1", "TSUNAGI-NET-0042"]
        );
        assert_eq!(
            attribute(&el, "ParticipantObjectIDTypeCode", "csd-code"),
            ["110180", "2"]
        );
        assert_eq!(attribute(&el, "SOPClass", "NumberOfInstances"), ["30"]);
        assert_eq!(
            attribute(&el, "RoleIDCode", "csd-code"),
            ["110153", "110152"]
        );
        assert_eq!(
            attribute(&el, "ActiveParticipant", "UserIsRequestor"),
            ["true", "false"]
        );
    }

    #[test]
    fn values_are_escaped_and_a_query_is_base64() {
        let peer = Peer {
            ae_title: "A<B&\"C".to_owned(),
            address: "192.168.50.10".to_owned(),
        };
        let keys = b"(0010,0020) 0001234";
        let xml = query(
            &node(),
            &peer,
            Outcome::Success,
            "1.2.840.10008.5.1.4.1.2.2.1",
            keys,
            SystemTime::now(),
        )
        .to_xml();
        let el = elements(&xml);
        assert_eq!(attribute(&el, "ActiveParticipant", "UserID")[0], "A<B&\"C");
        assert!(!xml.contains("0001234"), "the query keys in clear: {xml}");
        assert!(xml.contains(&format!(">{}<", base64(keys))), "{xml}");
    }

    #[test]
    fn reading_the_audit_trail_is_audit_log_used_by_the_staff_member() {
        let xml = audit_log_used(
            &node(),
            "admin",
            "192.168.50.20",
            CONSENT_TRAIL_URI,
            SystemTime::now(),
        )
        .to_xml();
        let el = elements(&xml);
        assert_eq!(attribute(&el, "EventID", "csd-code"), ["110101"], "{xml}");
        assert_eq!(
            attribute(&el, "EventIdentification", "EventActionCode"),
            ["R"],
            "{xml}"
        );
        assert!(attribute(&el, "ActiveParticipant", "UserID").contains(&"admin"));
        assert_eq!(
            attribute(
                &el,
                "ParticipantObjectIdentification",
                "ParticipantObjectID"
            ),
            [CONSENT_TRAIL_URI]
        );
        assert_eq!(
            attribute(&el, "ParticipantObjectIDTypeCode", "csd-code"),
            ["12"]
        );
    }

    #[test]
    fn a_console_login_and_logout_are_user_authentication_with_their_outcome() {
        let n = node();
        let now = SystemTime::now();
        for (logout, success, kind, outcome) in [
            (false, true, "110122", "0"),
            (false, false, "110122", "4"),
            (true, true, "110123", "0"),
        ] {
            let xml =
                user_authentication(&n, "desk1", "192.168.50.20", logout, success, now).to_xml();
            let el = elements(&xml);
            assert_eq!(attribute(&el, "EventID", "csd-code"), ["110114"], "{xml}");
            assert_eq!(attribute(&el, "EventTypeCode", "csd-code"), [kind], "{xml}");
            assert_eq!(
                attribute(&el, "EventIdentification", "EventOutcomeIndicator"),
                [outcome],
                "{xml}"
            );
            assert!(attribute(&el, "ActiveParticipant", "UserID").contains(&"desk1"));
        }
    }

    #[test]
    fn a_change_at_the_console_names_the_staff_member_as_the_requestor() {
        let n = node();
        let now = SystemTime::now();
        let xml = patient_record(
            &n,
            Action::Update,
            "N-1",
            "consent withdrawn (version 3)",
            Some(("uketsuke1", "192.168.50.20")),
            now,
        )
        .to_xml();
        let el = elements(&xml);
        assert_eq!(attribute(&el, "EventID", "csd-code"), ["110110"], "{xml}");
        let users = attribute(&el, "ActiveParticipant", "UserID");
        let requestors = attribute(&el, "ActiveParticipant", "UserIsRequestor");
        assert_eq!(users.first(), Some(&"uketsuke1"), "{xml}");
        assert_eq!(requestors, ["true", "false"], "{xml}");
        assert_eq!(
            attribute(&el, "ActiveParticipant", "NetworkAccessPointID").first(),
            Some(&"192.168.50.20"),
            "{xml}"
        );
        // Without one (the sync, the command line), the box is the requestor.
        let xml = patient_record(&n, Action::Update, "N-1", "consent", None, now).to_xml();
        let el = elements(&xml);
        assert_eq!(
            attribute(&el, "ActiveParticipant", "UserIsRequestor"),
            ["true"],
            "{xml}"
        );
    }

    #[test]
    fn every_event_kind_is_well_formed() {
        let n = node();
        let peer = Peer {
            ae_title: "MODALITY".to_owned(),
            address: "192.168.50.10".to_owned(),
        };
        let now = SystemTime::now();
        for (message, event) in [
            (application_activity(&n, true, now), "110100"),
            (
                instances_transferred(
                    &n,
                    Direction::Received,
                    &peer,
                    Outcome::Success,
                    "N-1",
                    "1.2",
                    &[],
                    now,
                ),
                "110104",
            ),
            (
                query(&n, &peer, Outcome::Success, "1.2", b"k", now),
                "110112",
            ),
            (
                ssmix2_file(
                    &n,
                    false,
                    "https://10.98.0.1:8443/ssmix2",
                    "a/b.txt",
                    "N-1",
                    Outcome::Success,
                    now,
                ),
                "110106",
            ),
            (
                ssmix2_file(
                    &n,
                    true,
                    "https://10.98.0.1:8443/ssmix2",
                    "a/b.txt",
                    "N-1",
                    Outcome::Success,
                    now,
                ),
                "110110",
            ),
            (
                patient_record(&n, Action::Update, "N-1", "公開設定", None, now),
                "110110",
            ),
            (
                security_alert(&n, Alert::RefusedMedium, "signature", None, now),
                "110113",
            ),
            (
                security_alert(
                    &n,
                    Alert::RefusedTlsPeer,
                    "another CA",
                    Some("10.98.0.1:4242"),
                    now,
                ),
                "110113",
            ),
            (
                security_alert(&n, Alert::FailedAuditVerify, "chain broken", None, now),
                "110113",
            ),
            (failed_login(&n, "desk1", "192.168.50.20", now), "110114"),
            (
                audit_log_used(&n, "admin", "192.168.50.20", "urn:x", now),
                "110101",
            ),
            (
                user_authentication(&n, "desk1", "192.168.50.20", true, true, now),
                "110114",
            ),
            (
                account_change(&n, "admin", "192.168.50.20", "desk1", true, "role", now),
                "110113",
            ),
        ] {
            let xml = message.to_xml();
            let el = elements(&xml);
            assert_eq!(attribute(&el, "EventID", "csd-code"), [event], "{xml}");
            assert_eq!(attribute(&el, "AuditSourceTypeCode", "csd-code"), ["4"]);
        }
    }
}
