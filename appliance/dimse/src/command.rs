//! Command sets (PS3.7 §9.3 and §E): group 0000 elements, always Implicit VR Little Endian,
//! preceded by their group length.

use crate::status::Status;

/// The command field (0000,0100) of the composite services.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CommandField {
    CStoreRq,
    CStoreRsp,
    CGetRq,
    CGetRsp,
    CFindRq,
    CFindRsp,
    CMoveRq,
    CMoveRsp,
    CEchoRq,
    CEchoRsp,
    CCancelRq,
    /// N-EVENT-REPORT (e.g. a storage commitment result, PS3.4 J.3.3).
    NEventReportRq,
    NEventReportRsp,
    /// N-ACTION (e.g. a storage commitment request, PS3.4 J.3.2).
    NActionRq,
    NActionRsp,
}

impl CommandField {
    pub fn code(self) -> u16 {
        match self {
            CommandField::CStoreRq => 0x0001,
            CommandField::CStoreRsp => 0x8001,
            CommandField::CGetRq => 0x0010,
            CommandField::CGetRsp => 0x8010,
            CommandField::CFindRq => 0x0020,
            CommandField::CFindRsp => 0x8020,
            CommandField::CMoveRq => 0x0021,
            CommandField::CMoveRsp => 0x8021,
            CommandField::CEchoRq => 0x0030,
            CommandField::CEchoRsp => 0x8030,
            CommandField::CCancelRq => 0x0FFF,
            CommandField::NEventReportRq => 0x0100,
            CommandField::NEventReportRsp => 0x8100,
            CommandField::NActionRq => 0x0130,
            CommandField::NActionRsp => 0x8130,
        }
    }

    pub fn from_code(code: u16) -> Option<CommandField> {
        Some(match code {
            0x0001 => CommandField::CStoreRq,
            0x8001 => CommandField::CStoreRsp,
            0x0010 => CommandField::CGetRq,
            0x8010 => CommandField::CGetRsp,
            0x0020 => CommandField::CFindRq,
            0x8020 => CommandField::CFindRsp,
            0x0021 => CommandField::CMoveRq,
            0x8021 => CommandField::CMoveRsp,
            0x0030 => CommandField::CEchoRq,
            0x8030 => CommandField::CEchoRsp,
            0x0FFF => CommandField::CCancelRq,
            0x0100 => CommandField::NEventReportRq,
            0x8100 => CommandField::NEventReportRsp,
            0x0130 => CommandField::NActionRq,
            0x8130 => CommandField::NActionRsp,
            _ => return None,
        })
    }

    /// Whether this is a response (bit 15).
    pub fn is_response(self) -> bool {
        self.code() & 0x8000 != 0
    }

    /// The response to a request (`None` for responses and C-CANCEL).
    pub fn response(self) -> Option<CommandField> {
        Some(match self {
            CommandField::CStoreRq => CommandField::CStoreRsp,
            CommandField::CGetRq => CommandField::CGetRsp,
            CommandField::CFindRq => CommandField::CFindRsp,
            CommandField::CMoveRq => CommandField::CMoveRsp,
            CommandField::CEchoRq => CommandField::CEchoRsp,
            CommandField::NEventReportRq => CommandField::NEventReportRsp,
            CommandField::NActionRq => CommandField::NActionRsp,
            _ => return None,
        })
    }
}

/// Priority (0000,0700).
pub const PRIORITY_MEDIUM: u16 = 0x0000;
pub const PRIORITY_HIGH: u16 = 0x0001;
pub const PRIORITY_LOW: u16 = 0x0002;

/// (0000,0800) CommandDataSetType: this value means "no data set follows"; anything else
/// means one does.
pub const NO_DATASET: u16 = 0x0101;

/// A command set. Absent optional elements are `None`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    pub field: CommandField,
    /// (0000,0002)
    pub affected_sop_class: Option<String>,
    /// (0000,0003)
    pub requested_sop_class: Option<String>,
    /// (0000,0110)
    pub message_id: Option<u16>,
    /// (0000,0120)
    pub responding_to: Option<u16>,
    /// (0000,0600)
    pub move_destination: Option<String>,
    /// (0000,0700)
    pub priority: Option<u16>,
    /// (0000,0800) is not [`NO_DATASET`].
    pub has_dataset: bool,
    /// (0000,0900)
    pub status: Option<Status>,
    /// (0000,0902)
    pub error_comment: Option<String>,
    /// (0000,1000)
    pub affected_sop_instance: Option<String>,
    /// (0000,1001)
    pub requested_sop_instance: Option<String>,
    /// (0000,1002) N-EVENT-REPORT
    pub event_type: Option<u16>,
    /// (0000,1008) N-ACTION
    pub action_type: Option<u16>,
    /// (0000,1020), (0000,1021), (0000,1022), (0000,1023)
    pub remaining: Option<u16>,
    pub completed: Option<u16>,
    pub failed: Option<u16>,
    pub warning: Option<u16>,
    /// (0000,1030), (0000,1031)
    pub move_originator_ae: Option<String>,
    pub move_originator_id: Option<u16>,
}

impl Command {
    /// An empty command of this kind (no optional element set).
    pub fn new(field: CommandField) -> Command {
        Command {
            field,
            affected_sop_class: None,
            requested_sop_class: None,
            message_id: None,
            responding_to: None,
            move_destination: None,
            priority: None,
            has_dataset: false,
            status: None,
            error_comment: None,
            affected_sop_instance: None,
            requested_sop_instance: None,
            event_type: None,
            action_type: None,
            remaining: None,
            completed: None,
            failed: None,
            warning: None,
            move_originator_ae: None,
            move_originator_id: None,
        }
    }

    /// C-ECHO-RQ.
    pub fn echo(message_id: u16) -> Command {
        Command {
            affected_sop_class: Some(VERIFICATION.to_owned()),
            message_id: Some(message_id),
            ..Command::new(CommandField::CEchoRq)
        }
    }

    /// C-STORE-RQ for an instance; its data set follows.
    pub fn store(message_id: u16, sop_class: &str, sop_instance: &str) -> Command {
        Command {
            affected_sop_class: Some(sop_class.to_owned()),
            affected_sop_instance: Some(sop_instance.to_owned()),
            message_id: Some(message_id),
            priority: Some(PRIORITY_MEDIUM),
            has_dataset: true,
            ..Command::new(CommandField::CStoreRq)
        }
    }

    /// N-ACTION-RQ of `action_type` on a SOP instance (e.g. a storage commitment request:
    /// [`STORAGE_COMMITMENT_PUSH`], [`STORAGE_COMMITMENT_PUSH_INSTANCE`], action 1); its data
    /// set follows.
    pub fn n_action(
        message_id: u16,
        sop_class: &str,
        sop_instance: &str,
        action_type: u16,
    ) -> Command {
        Command {
            requested_sop_class: Some(sop_class.to_owned()),
            requested_sop_instance: Some(sop_instance.to_owned()),
            message_id: Some(message_id),
            action_type: Some(action_type),
            has_dataset: true,
            ..Command::new(CommandField::NActionRq)
        }
    }

    /// The response to this request with `status` (no data set). `None` for a response or
    /// a C-CANCEL.
    pub fn respond(&self, status: Status) -> Option<Command> {
        let field = self.field.response()?;
        Some(Command {
            affected_sop_class: self
                .affected_sop_class
                .clone()
                .or_else(|| self.requested_sop_class.clone()),
            affected_sop_instance: match field {
                CommandField::CStoreRsp | CommandField::NEventReportRsp => {
                    self.affected_sop_instance.clone()
                }
                CommandField::NActionRsp => self.requested_sop_instance.clone(),
                _ => None,
            },
            event_type: self.event_type,
            action_type: self.action_type,
            responding_to: self.message_id,
            status: Some(status),
            ..Command::new(field)
        })
    }
}

/// The Verification SOP Class.
pub const VERIFICATION: &str = "1.2.840.10008.1.1";
/// The Storage Commitment Push Model SOP Class (PS3.4 Annex J).
pub const STORAGE_COMMITMENT_PUSH: &str = "1.2.840.10008.1.20.1";
/// Its well-known SOP instance.
pub const STORAGE_COMMITMENT_PUSH_INSTANCE: &str = "1.2.840.10008.1.20.1.1";

/// Why bytes are not a command set.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("the command set ends inside an element")]
    Truncated,
    #[error("element ({0:04X},{1:04X}) is not in group 0000")]
    NotCommandGroup(u16, u16),
    #[error("the group length says {said} bytes, {found} follow")]
    GroupLength { said: u32, found: usize },
    #[error("element (0000,{0:04X}) has a value of the wrong length or form")]
    BadValue(u16),
    #[error("required element (0000,{0:04X}) is missing")]
    Missing(u16),
    #[error("unknown command field {0:04X}H")]
    UnknownCommand(u16),
    #[error("element (0000,{0:04X}) appears twice")]
    Duplicate(u16),
    #[error("the command set is larger than {MAX_COMMAND_SET} bytes")]
    TooLarge,
}

/// Command sets are small; anything larger is not a command.
pub const MAX_COMMAND_SET: usize = 64 * 1024;

// Element numbers of group 0000.
const GROUP_LENGTH: u16 = 0x0000;
const AFFECTED_SOP_CLASS: u16 = 0x0002;
const REQUESTED_SOP_CLASS: u16 = 0x0003;
const COMMAND_FIELD: u16 = 0x0100;
const MESSAGE_ID: u16 = 0x0110;
const RESPONDING_TO: u16 = 0x0120;
const MOVE_DESTINATION: u16 = 0x0600;
const PRIORITY: u16 = 0x0700;
const DATASET_TYPE: u16 = 0x0800;
const STATUS: u16 = 0x0900;
const ERROR_COMMENT: u16 = 0x0902;
const AFFECTED_SOP_INSTANCE: u16 = 0x1000;
const REQUESTED_SOP_INSTANCE: u16 = 0x1001;
const EVENT_TYPE: u16 = 0x1002;
const ACTION_TYPE: u16 = 0x1008;
const REMAINING: u16 = 0x1020;
const COMPLETED: u16 = 0x1021;
const FAILED: u16 = 0x1022;
const WARNING: u16 = 0x1023;
const MOVE_ORIGINATOR_AE: u16 = 0x1030;
const MOVE_ORIGINATOR_ID: u16 = 0x1031;

enum Value<'a> {
    Uid(&'a str),
    Text(&'a str),
    Us(u16),
}

fn push_element(out: &mut Vec<u8>, element: u16, value: &Value<'_>) {
    let mut bytes: Vec<u8> = match value {
        Value::Uid(s) | Value::Text(s) => s.as_bytes().to_vec(),
        Value::Us(v) => v.to_le_bytes().to_vec(),
    };
    if bytes.len() % 2 == 1 {
        bytes.push(if matches!(value, Value::Uid(_)) {
            0
        } else {
            b' '
        });
    }
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&element.to_le_bytes());
    out.extend_from_slice(&u32::try_from(bytes.len()).unwrap_or(u32::MAX).to_le_bytes());
    out.extend_from_slice(&bytes);
}

impl Command {
    /// Encodes the command set (Implicit VR Little Endian), group length first.
    pub fn encode(&self) -> Vec<u8> {
        let mut list: Vec<(u16, Value<'_>)> = Vec::with_capacity(16);
        if let Some(s) = &self.affected_sop_class {
            list.push((AFFECTED_SOP_CLASS, Value::Uid(s)));
        }
        if let Some(s) = &self.requested_sop_class {
            list.push((REQUESTED_SOP_CLASS, Value::Uid(s)));
        }
        list.push((COMMAND_FIELD, Value::Us(self.field.code())));
        for (e, v) in [
            (MESSAGE_ID, self.message_id),
            (RESPONDING_TO, self.responding_to),
        ] {
            if let Some(v) = v {
                list.push((e, Value::Us(v)));
            }
        }
        if let Some(s) = &self.move_destination {
            list.push((MOVE_DESTINATION, Value::Text(s)));
        }
        if let Some(p) = self.priority {
            list.push((PRIORITY, Value::Us(p)));
        }
        list.push((
            DATASET_TYPE,
            Value::Us(if self.has_dataset { 0x0000 } else { NO_DATASET }),
        ));
        if let Some(s) = self.status {
            list.push((STATUS, Value::Us(s.0)));
        }
        if let Some(s) = &self.error_comment {
            list.push((ERROR_COMMENT, Value::Text(s)));
        }
        if let Some(s) = &self.affected_sop_instance {
            list.push((AFFECTED_SOP_INSTANCE, Value::Uid(s)));
        }
        if let Some(s) = &self.requested_sop_instance {
            list.push((REQUESTED_SOP_INSTANCE, Value::Uid(s)));
        }
        for (e, v) in [
            (EVENT_TYPE, self.event_type),
            (ACTION_TYPE, self.action_type),
        ] {
            if let Some(v) = v {
                list.push((e, Value::Us(v)));
            }
        }
        for (e, v) in [
            (REMAINING, self.remaining),
            (COMPLETED, self.completed),
            (FAILED, self.failed),
            (WARNING, self.warning),
        ] {
            if let Some(v) = v {
                list.push((e, Value::Us(v)));
            }
        }
        if let Some(s) = &self.move_originator_ae {
            list.push((MOVE_ORIGINATOR_AE, Value::Text(s)));
        }
        if let Some(v) = self.move_originator_id {
            list.push((MOVE_ORIGINATOR_ID, Value::Us(v)));
        }
        let mut body = Vec::with_capacity(256);
        for (e, v) in &list {
            push_element(&mut body, *e, v);
        }
        let mut out = Vec::with_capacity(body.len() + 12);
        out.extend_from_slice(&[0, 0, 0, 0, 4, 0, 0, 0]);
        out.extend_from_slice(&u32::try_from(body.len()).unwrap_or(u32::MAX).to_le_bytes());
        out.extend_from_slice(&body);
        out
    }

    /// Decodes a command set strictly: every element in group 0000, lengths within the
    /// input, the group length (if present) right, required elements present. Unknown
    /// (retired) elements of group 0000 are skipped.
    pub fn decode(bytes: &[u8]) -> Result<Command, DecodeError> {
        if bytes.len() > MAX_COMMAND_SET {
            return Err(DecodeError::TooLarge);
        }
        let mut field: Option<u16> = None;
        let mut dataset_type: Option<u16> = None;
        let mut c = Command::new(CommandField::CEchoRq);
        let mut seen: Vec<u16> = Vec::with_capacity(16);
        let mut rest = bytes;
        let mut first = true;
        while !rest.is_empty() {
            if rest.len() < 8 {
                return Err(DecodeError::Truncated);
            }
            let group = u16::from_le_bytes([rest[0], rest[1]]);
            let element = u16::from_le_bytes([rest[2], rest[3]]);
            let len = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]);
            if group != 0 {
                return Err(DecodeError::NotCommandGroup(group, element));
            }
            let len_usize = usize::try_from(len).map_err(|_| DecodeError::Truncated)?;
            if len_usize > rest.len() - 8 {
                return Err(DecodeError::Truncated);
            }
            let value = &rest[8..8 + len_usize];
            rest = &rest[8 + len_usize..];
            if seen.contains(&element) {
                return Err(DecodeError::Duplicate(element));
            }
            seen.push(element);
            let us = || -> Result<u16, DecodeError> {
                <[u8; 2]>::try_from(value)
                    .map(u16::from_le_bytes)
                    .map_err(|_| DecodeError::BadValue(element))
            };
            match element {
                GROUP_LENGTH => {
                    let said = <[u8; 4]>::try_from(value)
                        .map(u32::from_le_bytes)
                        .map_err(|_| DecodeError::BadValue(element))?;
                    if !first || usize::try_from(said).ok() != Some(rest.len()) {
                        return Err(DecodeError::GroupLength {
                            said,
                            found: rest.len(),
                        });
                    }
                }
                AFFECTED_SOP_CLASS => c.affected_sop_class = Some(uid(value, element)?),
                REQUESTED_SOP_CLASS => c.requested_sop_class = Some(uid(value, element)?),
                COMMAND_FIELD => field = Some(us()?),
                MESSAGE_ID => c.message_id = Some(us()?),
                RESPONDING_TO => c.responding_to = Some(us()?),
                MOVE_DESTINATION => c.move_destination = Some(text(value, element, 16)?),
                PRIORITY => c.priority = Some(us()?),
                DATASET_TYPE => dataset_type = Some(us()?),
                STATUS => c.status = Some(Status(us()?)),
                ERROR_COMMENT => c.error_comment = Some(text(value, element, 64)?),
                AFFECTED_SOP_INSTANCE => c.affected_sop_instance = Some(uid(value, element)?),
                REQUESTED_SOP_INSTANCE => c.requested_sop_instance = Some(uid(value, element)?),
                EVENT_TYPE => c.event_type = Some(us()?),
                ACTION_TYPE => c.action_type = Some(us()?),
                REMAINING => c.remaining = Some(us()?),
                COMPLETED => c.completed = Some(us()?),
                FAILED => c.failed = Some(us()?),
                WARNING => c.warning = Some(us()?),
                MOVE_ORIGINATOR_AE => c.move_originator_ae = Some(text(value, element, 16)?),
                MOVE_ORIGINATOR_ID => c.move_originator_id = Some(us()?),
                _ => {}
            }
            first = false;
        }
        let code = field.ok_or(DecodeError::Missing(COMMAND_FIELD))?;
        c.field = CommandField::from_code(code).ok_or(DecodeError::UnknownCommand(code))?;
        c.has_dataset = dataset_type.ok_or(DecodeError::Missing(DATASET_TYPE))? != NO_DATASET;
        if c.field.is_response() {
            c.responding_to.ok_or(DecodeError::Missing(RESPONDING_TO))?;
            c.status.ok_or(DecodeError::Missing(STATUS))?;
        } else {
            c.message_id.ok_or(DecodeError::Missing(MESSAGE_ID))?;
        }
        Ok(c)
    }
}

/// A UID value: digits and dots, at most 64, padded with NUL (or, wrongly, space).
fn uid(value: &[u8], element: u16) -> Result<String, DecodeError> {
    let trimmed = match value.iter().rposition(|&b| b != 0 && b != b' ') {
        Some(i) => &value[..=i],
        None => &value[..0],
    };
    if trimmed.is_empty()
        || trimmed.len() > 64
        || !trimmed.iter().all(|b| b.is_ascii_digit() || *b == b'.')
    {
        return Err(DecodeError::BadValue(element));
    }
    Ok(String::from_utf8_lossy(trimmed).into_owned())
}

/// An AE or LO value: printable ASCII, padded with spaces.
fn text(value: &[u8], element: u16, max: usize) -> Result<String, DecodeError> {
    let s = std::str::from_utf8(value).map_err(|_| DecodeError::BadValue(element))?;
    let s = s.trim_matches([' ', '\0']);
    if s.len() > max || s.chars().any(|c| !(' '..='~').contains(&c)) {
        return Err(DecodeError::BadValue(element));
    }
    Ok(s.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn echo_round_trip_and_bytes() {
        let rq = Command::echo(7);
        let bytes = rq.encode();
        // Group length element first, value = the rest.
        assert_eq!(&bytes[..8], &[0, 0, 0, 0, 4, 0, 0, 0]);
        let len = u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize;
        assert_eq!(len, bytes.len() - 12);
        assert_eq!(Command::decode(&bytes).unwrap(), rq);
        let rsp = rq.respond(Status::SUCCESS).unwrap();
        assert_eq!(rsp.field, CommandField::CEchoRsp);
        assert_eq!(rsp.responding_to, Some(7));
        assert_eq!(rsp.affected_sop_class.as_deref(), Some(VERIFICATION));
        assert_eq!(Command::decode(&rsp.encode()).unwrap(), rsp);
    }

    #[test]
    fn store_response_carries_the_instance() {
        let rq = Command::store(3, "1.2.840.10008.5.1.4.1.1.2", "1.2.3.4.5");
        let rsp = rq.respond(Status::OUT_OF_RESOURCES).unwrap();
        assert_eq!(rsp.affected_sop_instance.as_deref(), Some("1.2.3.4.5"));
        assert!(!rsp.has_dataset);
        let back = Command::decode(&rq.encode()).unwrap();
        assert!(back.has_dataset);
        // An odd-length UID is padded with NUL and read back without it.
        assert_eq!(back.affected_sop_instance.as_deref(), Some("1.2.3.4.5"));
    }

    #[test]
    fn storage_commitment_action_and_report_round_trip() {
        let rq = Command::n_action(
            9,
            STORAGE_COMMITMENT_PUSH,
            STORAGE_COMMITMENT_PUSH_INSTANCE,
            1,
        );
        let back = Command::decode(&rq.encode()).unwrap();
        assert_eq!(back, rq);
        assert_eq!(back.field.code(), 0x0130);
        let rsp = rq.respond(Status::SUCCESS).unwrap();
        assert_eq!(rsp.field, CommandField::NActionRsp);
        assert_eq!(
            rsp.affected_sop_class.as_deref(),
            Some(STORAGE_COMMITMENT_PUSH)
        );
        assert_eq!(
            rsp.affected_sop_instance.as_deref(),
            Some(STORAGE_COMMITMENT_PUSH_INSTANCE)
        );
        assert_eq!(rsp.action_type, Some(1));
        assert_eq!(Command::decode(&rsp.encode()).unwrap(), rsp);
        // The PACS's report (event 1: all committed; 2: some failed), and our answer.
        let report = Command {
            affected_sop_class: Some(STORAGE_COMMITMENT_PUSH.to_owned()),
            affected_sop_instance: Some(STORAGE_COMMITMENT_PUSH_INSTANCE.to_owned()),
            message_id: Some(4),
            event_type: Some(2),
            has_dataset: true,
            ..Command::new(CommandField::NEventReportRq)
        };
        let back = Command::decode(&report.encode()).unwrap();
        assert_eq!(back, report);
        let answer = back.respond(Status::SUCCESS).unwrap();
        assert_eq!(answer.field.code(), 0x8100);
        assert_eq!(answer.event_type, Some(2));
        assert_eq!(answer.responding_to, Some(4));
    }

    #[test]
    fn strict_decoding() {
        let good = Command::echo(1).encode();
        // Cut short: the group length no longer matches; without a group length, truncated.
        assert!(matches!(
            Command::decode(&good[..good.len() - 1]),
            Err(DecodeError::GroupLength { .. })
        ));
        assert_eq!(
            Command::decode(&good[12..good.len() - 1]),
            Err(DecodeError::Truncated)
        );
        // Without the (optional) group length it still decodes.
        assert_eq!(Command::decode(&good[12..]).unwrap(), Command::echo(1));
        let mut wrong_len = good.clone();
        wrong_len[8] += 2;
        assert!(matches!(
            Command::decode(&wrong_len),
            Err(DecodeError::GroupLength { .. })
        ));
        let mut other_group = good.clone();
        other_group[12] = 8;
        assert!(matches!(
            Command::decode(&other_group),
            Err(DecodeError::NotCommandGroup(8, _))
        ));
        let mut unknown = Command::echo(1);
        unknown.field = CommandField::CEchoRq;
        let mut bytes = unknown.encode();
        // Command field value → 0x1234.
        let at = bytes.windows(4).position(|w| w == [0, 0, 0, 1]).unwrap();
        bytes[at + 8] = 0x34;
        bytes[at + 9] = 0x12;
        assert_eq!(
            Command::decode(&bytes),
            Err(DecodeError::UnknownCommand(0x1234))
        );
        let no_id = Command {
            message_id: None,
            ..Command::echo(1)
        };
        assert_eq!(
            Command::decode(&no_id.encode()),
            Err(DecodeError::Missing(MESSAGE_ID))
        );
        assert_eq!(
            Command::decode(&[]),
            Err(DecodeError::Missing(COMMAND_FIELD))
        );
    }

    fn uid_strategy() -> impl Strategy<Value = String> {
        "[1-9][0-9]{0,5}(\\.[0-9]{1,6}){1,6}"
    }

    proptest! {
        #[test]
        fn any_store_round_trips(id in any::<u16>(), class in uid_strategy(), instance in uid_strategy(), priority in 0u16..3, dest in proptest::option::of("[A-Z0-9_]{1,16}")) {
            let mut c = Command::store(id, &class, &instance);
            c.priority = Some(priority);
            c.move_originator_ae = dest;
            prop_assert_eq!(Command::decode(&c.encode()).unwrap(), c);
        }

        #[test]
        fn decoding_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = Command::decode(&bytes);
        }
    }
}
