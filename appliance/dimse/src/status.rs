//! DIMSE status codes (PS3.7 Annex C and the service classes of PS3.4).

/// A status's class, which decides what the peer does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Success,
    /// More responses follow (C-FIND, C-MOVE, C-GET).
    Pending,
    Cancel,
    Warning,
    Failure,
}

/// A status code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Status(pub u16);

impl Status {
    pub const SUCCESS: Status = Status(0x0000);
    pub const PENDING: Status = Status(0xFF00);
    /// Pending, with optional keys not supported (C-FIND).
    pub const PENDING_WARNING: Status = Status(0xFF01);
    pub const CANCEL: Status = Status(0xFE00);
    /// C-STORE: coercion of data elements.
    pub const WARNING_COERCION: Status = Status(0xB000);
    /// C-STORE: elements discarded.
    pub const WARNING_ELEMENTS_DISCARDED: Status = Status(0xB006);
    /// C-STORE: data set does not match SOP class.
    pub const WARNING_DATASET_MISMATCH: Status = Status(0xB007);
    /// C-MOVE/C-GET: one or more sub-operations failed.
    pub const WARNING_SUBOPERATIONS_FAILED: Status = Status(0xB000);
    /// C-STORE: out of resources (disk full, spool quota).
    pub const OUT_OF_RESOURCES: Status = Status(0xA700);
    /// C-MOVE: out of resources, unable to calculate the number of matches.
    pub const OUT_OF_RESOURCES_MATCHES: Status = Status(0xA701);
    /// C-MOVE/C-GET: out of resources, unable to perform sub-operations.
    pub const OUT_OF_RESOURCES_SUBOPERATIONS: Status = Status(0xA702);
    /// C-MOVE: move destination unknown.
    pub const MOVE_DESTINATION_UNKNOWN: Status = Status(0xA801);
    /// Data set does not match SOP class / identifier does not match.
    pub const DATASET_MISMATCH: Status = Status(0xA900);
    /// Cannot understand.
    pub const CANNOT_UNDERSTAND: Status = Status(0xC000);
    /// Unable to process (C-FIND, C-MOVE, C-GET).
    pub const UNABLE_TO_PROCESS: Status = Status(0xC001);
    pub const PROCESSING_FAILURE: Status = Status(0x0110);
    pub const NO_SUCH_SOP_INSTANCE: Status = Status(0x0112);
    pub const NO_SUCH_EVENT_TYPE: Status = Status(0x0113);
    pub const NO_SUCH_SOP_CLASS: Status = Status(0x0118);
    /// Class-instance conflict.
    pub const CLASS_INSTANCE_CONFLICT: Status = Status(0x0119);
    pub const SOP_CLASS_NOT_SUPPORTED: Status = Status(0x0122);
    pub const NOT_AUTHORIZED: Status = Status(0x0124);
    pub const DUPLICATE_INVOCATION: Status = Status(0x0210);
    pub const UNRECOGNIZED_OPERATION: Status = Status(0x0211);
    pub const MISTYPED_ARGUMENT: Status = Status(0x0212);
    /// Resource limitation (PS3.7 C.5.13).
    pub const RESOURCE_LIMITATION: Status = Status(0x0213);

    /// The class of a status code (PS3.7 C.1–C.5, with the service-specific ranges).
    pub fn class(self) -> Class {
        match self.0 {
            0x0000 => Class::Success,
            0xFF00 | 0xFF01 => Class::Pending,
            0xFE00 => Class::Cancel,
            0x0001 | 0x0107 | 0x0116 | 0xB000..=0xBFFF => Class::Warning,
            _ => Class::Failure,
        }
    }

    pub fn is_success(self) -> bool {
        self.class() == Class::Success
    }

    /// A failure that says the peer cannot do it *now*, not that it never will: out of
    /// resources (A7xxH), a processing failure (0110H), a resource limitation (0213H). The
    /// same request may succeed later; every other failure is permanent (a refusal of the
    /// object itself: its SOP class, its content, our authorisation).
    pub fn is_transient(self) -> bool {
        matches!(self.0, 0xA700..=0xA7FF | 0x0110 | 0x0213)
    }

    /// A short English name for logs and status lines.
    pub fn describe(self) -> &'static str {
        match self.0 {
            0x0000 => "success",
            0xFF00 | 0xFF01 => "pending",
            0xFE00 => "cancelled",
            0xB000..=0xBFFF => "warning",
            0xA700..=0xA7FF => "refused: out of resources",
            0xA801 => "refused: move destination unknown",
            0xA900..=0xA9FF => "error: data set does not match SOP class",
            0xC000..=0xCFFF => "error: cannot understand",
            0x0110 => "processing failure",
            0x0112 => "no such object instance",
            0x0113 => "no such event type",
            0x0118 => "no such SOP class",
            0x0119 => "class/instance conflict",
            0x0131 => "duplicate transaction UID",
            0x0122 => "SOP class not supported",
            0x0124 => "not authorized",
            0x0210 => "duplicate invocation",
            0x0211 => "unrecognized operation",
            0x0212 => "mistyped argument",
            0x0213 => "resource limitation",
            _ => "failure",
        }
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:04X}H ({})", self.0, self.describe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes() {
        assert_eq!(Status::SUCCESS.class(), Class::Success);
        assert_eq!(Status::PENDING.class(), Class::Pending);
        assert_eq!(Status::PENDING_WARNING.class(), Class::Pending);
        assert_eq!(Status::CANCEL.class(), Class::Cancel);
        assert_eq!(Status::WARNING_COERCION.class(), Class::Warning);
        assert_eq!(Status::OUT_OF_RESOURCES.class(), Class::Failure);
        assert_eq!(Status::SOP_CLASS_NOT_SUPPORTED.class(), Class::Failure);
        assert_eq!(Status(0xC123).class(), Class::Failure);
        assert_eq!(
            Status::OUT_OF_RESOURCES.to_string(),
            "A700H (refused: out of resources)"
        );
    }

    #[test]
    fn only_a_failure_for_now_is_transient() {
        for s in [0xA700, 0xA7FF, 0x0110, 0x0213] {
            assert!(Status(s).is_transient(), "{:04X}", s);
        }
        for s in [
            0x0000, 0xB000, 0xFF00, 0x0122, 0x0124, 0xA900, 0xC000, 0x0211, 0xA801,
        ] {
            assert!(!Status(s).is_transient(), "{:04X}", s);
        }
    }
}
