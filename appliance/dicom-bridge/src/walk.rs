//! The data set's structure, checked as it streams in (every P-DATA fragment, before the
//! C-STORE is answered): the bridge forwards only what it can read the way a PACS will.
//!
//! [`Walker`] follows the top-level elements and the items of every sequence of undefined
//! length, with bounded memory (a 12-byte header buffer, a stack of at most
//! [`MAX_DEPTH`] open sequences and items, the routing values of at most
//! [`MAX_ROUTING_VALUE`] bytes each). It refuses ([`WalkError`]):
//! - a top-level tag that is not strictly greater than the one before: a **duplicate**
//!   (a PACS might read the second PatientID where the bridge routed on the first) or
//!   elements out of order;
//! - an element of **undefined length that cannot be walked**: only SQ, UN (whose value is
//!   then implicit VR little endian, PS3.5 §6.2.2) and encapsulated pixel data (OB/OW,
//!   fragments of defined length) may have one, and each must end with its delimiter;
//! - anything else malformed: a VR that is not two capital letters, an item or a delimiter
//!   where an element belongs (and the reverse), a delimiter with a length, nesting deeper
//!   than [`MAX_DEPTH`], a data set that ends inside an element;
//! - patient elements (up to OtherPatientIDsSequence (0010,1002), and the next element's
//!   header) that end after `limit` bytes (`[dicom] header-limit-kib`): the forwarder
//!   reads that much of the spooled instance to translate its patient IDs.
//!
//! On the way it takes the routing elements ([`crate::header::Header`]): SpecificCharacterSet,
//! SOPClassUID, SOPInstanceUID, PatientName (raw), PatientID and StudyInstanceUID, wherever
//! they are within `limit`.

use crate::header::Header;

/// Sequences and items open at once, at most.
pub const MAX_DEPTH: usize = 16;

/// A routing element's value, at most (a longer one is malformed: the longest, PatientName,
/// is at most 3 × 64 characters plus escapes).
pub const MAX_ROUTING_VALUE: usize = 1024;

/// The last element the forwarder rewrites: OtherPatientIDsSequence
/// ([`crate::translate`]). It and the next element's header must lie within the limit.
const LAST_REWRITTEN: u32 = 0x0010_1002;

/// The longest element header: what the forwarder must see of the element after
/// [`LAST_REWRITTEN`].
const NEXT_HEADER: u64 = 12;

/// Why a data set is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WalkError {
    #[error("element ({0:04X},{1:04X}) comes twice")]
    Duplicate(u16, u16),
    #[error("elements are not in ascending order at ({0:04X},{1:04X})")]
    OutOfOrder(u16, u16),
    #[error("element ({0:04X},{1:04X}) has an undefined length that cannot be walked")]
    UndefinedLength(u16, u16),
    #[error("element ({0:04X},{1:04X}) is malformed")]
    Malformed(u16, u16),
    #[error("sequences nest deeper than {MAX_DEPTH}")]
    TooDeep,
    #[error("the routing element ({0:04X},{1:04X}) is longer than {MAX_ROUTING_VALUE} bytes")]
    LongValue(u16, u16),
    #[error("the patient elements end after the first {0} bytes (the header limit)")]
    BeyondLimit(u64),
    #[error("the data set ends inside an element")]
    Truncated,
}

/// What an open frame of the stack is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Frame {
    /// A sequence of undefined length: items until (FFFE,E0DD). `explicit`: how its items'
    /// elements are encoded.
    Sequence { explicit: bool },
    /// Encapsulated pixel data: items of defined length until (FFFE,E0DD).
    Fragments,
    /// An item of undefined length: elements until (FFFE,E00D).
    Item { explicit: bool },
}

/// A routing value being collected.
#[derive(Debug)]
struct Collecting {
    tag: u32,
    value: Vec<u8>,
    left: u64,
}

/// The streaming walker (see the module documentation).
#[derive(Debug)]
pub struct Walker {
    explicit: bool,
    limit: u64,
    /// Bytes consumed so far.
    pos: u64,
    /// A partial element header.
    head: Vec<u8>,
    /// Value bytes still to skip.
    skip: u64,
    collecting: Option<Collecting>,
    stack: Vec<Frame>,
    last_tag: Option<u32>,
    /// Where the patient elements end (the end of the last top-level element up to
    /// [`LAST_REWRITTEN`]; `u64::MAX` while such a sequence of undefined length is open).
    routing_end: u64,
    header: Header,
    error: Option<WalkError>,
}

impl Walker {
    /// A walker for a data set in implicit (`explicit` false) or explicit VR little endian,
    /// whose routing elements must end within `limit` bytes.
    pub fn new(explicit: bool, limit: u64) -> Walker {
        Walker {
            explicit,
            limit,
            pos: 0,
            head: Vec::with_capacity(12),
            skip: 0,
            collecting: None,
            stack: Vec::new(),
            last_tag: None,
            routing_end: 0,
            header: Header::default(),
            error: None,
        }
    }

    /// Walks the next bytes of the data set. After an error, nothing more is read (the
    /// error stays).
    pub fn push(&mut self, mut data: &[u8]) {
        while !data.is_empty() && self.error.is_none() {
            if let Some(c) = self.collecting.as_mut() {
                let n = usize::try_from(c.left.min(data.len() as u64)).unwrap_or(data.len());
                c.value.extend_from_slice(&data[..n]);
                c.left -= n as u64;
                self.pos += n as u64;
                data = &data[n..];
                if c.left == 0 {
                    let done = self.collecting.take();
                    if let Some(c) = done {
                        self.take_value(c.tag, &c.value);
                    }
                }
                continue;
            }
            if self.skip > 0 {
                let n = usize::try_from(self.skip.min(data.len() as u64)).unwrap_or(data.len());
                self.skip -= n as u64;
                self.pos += n as u64;
                data = &data[n..];
                continue;
            }
            // An element header: 8 bytes, or 12 for an explicit VR with a 4-byte length.
            let want = self.header_len();
            let n = (want - self.head.len()).min(data.len());
            self.head.extend_from_slice(&data[..n]);
            self.pos += n as u64;
            data = &data[n..];
            if self.head.len() == 8 && self.header_len() == 12 {
                continue;
            }
            if self.head.len() == self.header_len() {
                let head = std::mem::take(&mut self.head);
                if let Err(e) = self.element(&head) {
                    self.error = Some(e);
                }
                self.head = head;
                self.head.clear();
            }
        }
    }

    /// The data set is complete: its routing elements, or why it is refused.
    pub fn finish(mut self) -> Result<Header, WalkError> {
        if let Some(e) = self.error.take() {
            return Err(e);
        }
        if !self.head.is_empty()
            || self.skip > 0
            || self.collecting.is_some()
            || !self.stack.is_empty()
        {
            return Err(WalkError::Truncated);
        }
        Ok(self.header)
    }

    /// Whether the elements are encoded with explicit VR where the walker stands.
    fn explicit_here(&self) -> bool {
        match self.stack.last() {
            None => self.explicit,
            Some(Frame::Item { explicit }) => *explicit,
            // Items and delimiters have no VR.
            Some(Frame::Sequence { .. } | Frame::Fragments) => false,
        }
    }

    /// The length of the element header being read (8 until its VR is known).
    fn header_len(&self) -> usize {
        if self.head.len() < 6 || !self.explicit_here() {
            return 8;
        }
        let group = u16::from_le_bytes([self.head[0], self.head[1]]);
        if group == 0xFFFE {
            return 8;
        }
        if crate::header::has_long_length(&[self.head[4], self.head[5]]) {
            12
        } else {
            8
        }
    }

    fn element(&mut self, h: &[u8]) -> Result<(), WalkError> {
        let g = u16::from_le_bytes([h[0], h[1]]);
        let e = u16::from_le_bytes([h[2], h[3]]);
        let tag = (u32::from(g) << 16) | u32::from(e);
        let undefined = |len: u32| len == u32::MAX;
        match self.stack.last().copied() {
            Some(frame @ (Frame::Sequence { .. } | Frame::Fragments)) => {
                // Items (of undefined length only in a sequence) until the delimiter.
                let len = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
                match (tag, frame) {
                    (0xFFFE_E000, Frame::Sequence { explicit }) if undefined(len) => {
                        self.open(Frame::Item { explicit })
                    }
                    (0xFFFE_E000, _) if !undefined(len) => {
                        self.skip = u64::from(len);
                        Ok(())
                    }
                    (0xFFFE_E0DD, _) if len == 0 => {
                        self.stack.pop();
                        self.closed();
                        Ok(())
                    }
                    _ => Err(WalkError::Malformed(g, e)),
                }
            }
            Some(Frame::Item { explicit }) => {
                if tag == 0xFFFE_E00D {
                    let len = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
                    if len != 0 {
                        return Err(WalkError::Malformed(g, e));
                    }
                    self.stack.pop();
                    return Ok(());
                }
                if g == 0xFFFE {
                    return Err(WalkError::Malformed(g, e));
                }
                let (vr, len) = vr_and_length(h, explicit, g, e)?;
                if undefined(len) {
                    return self.open_undefined(vr, explicit, g, e);
                }
                self.skip = u64::from(len);
                Ok(())
            }
            None => {
                if g == 0xFFFE {
                    return Err(WalkError::Malformed(g, e));
                }
                match self.last_tag {
                    Some(last) if tag == last => return Err(WalkError::Duplicate(g, e)),
                    Some(last) if tag < last => return Err(WalkError::OutOfOrder(g, e)),
                    _ => {}
                }
                self.last_tag = Some(tag);
                let (vr, len) = vr_and_length(h, self.explicit, g, e)?;
                if undefined(len) {
                    return self.open_undefined(vr, self.explicit, g, e);
                }
                if tag <= LAST_REWRITTEN {
                    self.routing_end = self.pos + u64::from(len);
                    if self.routing_end.saturating_add(NEXT_HEADER) > self.limit {
                        return Err(WalkError::BeyondLimit(self.limit));
                    }
                }
                if is_routing(tag) {
                    if len as usize > MAX_ROUTING_VALUE {
                        return Err(WalkError::LongValue(g, e));
                    }
                    if len == 0 {
                        self.take_value(tag, &[]);
                    } else {
                        self.collecting = Some(Collecting {
                            tag,
                            value: Vec::with_capacity(len as usize),
                            left: u64::from(len),
                        });
                    }
                    return Ok(());
                }
                self.skip = u64::from(len);
                Ok(())
            }
        }
    }

    /// An element of undefined length (`vr`, blank in implicit VR) in an encoding.
    fn open_undefined(
        &mut self,
        vr: [u8; 2],
        explicit: bool,
        g: u16,
        e: u16,
    ) -> Result<(), WalkError> {
        let frame = match (explicit, &vr) {
            (false, _) => Frame::Sequence { explicit: false },
            (true, b"SQ") => Frame::Sequence { explicit: true },
            // PS3.5 §6.2.2: an UN of undefined length holds implicit VR little endian.
            (true, b"UN") => Frame::Sequence { explicit: false },
            (true, b"OB" | b"OW") if self.stack.is_empty() && (g, e) == (0x7FE0, 0x0010) => {
                Frame::Fragments
            }
            _ => return Err(WalkError::UndefinedLength(g, e)),
        };
        if self.stack.is_empty() && ((u32::from(g) << 16) | u32::from(e)) <= LAST_REWRITTEN {
            // Its end is not known yet: it is checked against the limit when it closes.
            self.routing_end = u64::MAX;
        }
        self.open(frame)
    }

    fn open(&mut self, frame: Frame) -> Result<(), WalkError> {
        if self.stack.len() >= MAX_DEPTH {
            return Err(WalkError::TooDeep);
        }
        self.stack.push(frame);
        Ok(())
    }

    /// A sequence closed: if it was a top-level one among the routing elements, where the
    /// routing elements end now.
    fn closed(&mut self) {
        if self.stack.is_empty() && self.routing_end == u64::MAX {
            self.routing_end = self.pos;
            if self.routing_end.saturating_add(NEXT_HEADER) > self.limit {
                self.error = Some(WalkError::BeyondLimit(self.limit));
            }
        }
    }

    fn take_value(&mut self, tag: u32, value: &[u8]) {
        let h = &mut self.header;
        match tag {
            0x0008_0005 => h.specific_character_set = Some(crate::header::text(value)),
            0x0008_0016 => h.sop_class = Some(crate::header::text(value)),
            0x0008_0018 => h.sop_instance = Some(crate::header::text(value)),
            0x0010_0010 => h.patient_name_raw = Some(value.to_vec()),
            0x0010_0020 => h.patient_id = Some(crate::header::text(value)),
            0x0020_000D => h.study_instance = Some(crate::header::text(value)),
            _ => {}
        }
    }
}

fn is_routing(tag: u32) -> bool {
    matches!(
        tag,
        0x0008_0005 | 0x0008_0016 | 0x0008_0018 | 0x0010_0010 | 0x0010_0020 | 0x0020_000D
    )
}

/// An element header's VR (blank in implicit VR) and value length.
fn vr_and_length(h: &[u8], explicit: bool, g: u16, e: u16) -> Result<([u8; 2], u32), WalkError> {
    if !explicit {
        return Ok((*b"  ", u32::from_le_bytes([h[4], h[5], h[6], h[7]])));
    }
    let vr = [h[4], h[5]];
    if !vr.iter().all(u8::is_ascii_uppercase) {
        return Err(WalkError::Malformed(g, e));
    }
    if h.len() == 12 {
        Ok((vr, u32::from_le_bytes([h[8], h[9], h[10], h[11]])))
    } else {
        Ok((vr, u32::from(u16::from_le_bytes([h[6], h[7]]))))
    }
}

#[cfg(test)]
mod tests;
