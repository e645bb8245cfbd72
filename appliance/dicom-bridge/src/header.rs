//! Reading the few data elements the bridge routes on, from the start of a data set,
//! without decoding the rest: SpecificCharacterSet (0008,0005), SOPClassUID (0008,0016),
//! SOPInstanceUID (0008,0018), PatientName (0010,0010, raw bytes: ISO 2022 IR 87 text is
//! carried byte for byte, never re-encoded), PatientID (0010,0020), StudyInstanceUID
//! (0020,000D).
//!
//! Data sets are Implicit VR Little Endian or Explicit VR Little Endian (every other
//! transfer syntax in use encodes the data set as Explicit VR LE; Deflated and Big Endian
//! are refused here). Elements come in ascending tag order, so reading stops after
//! (0020,000D). Sequences of defined or undefined length are skipped. Strict: bounded, never
//! panicking; an input cut short before the last wanted tag is `Incomplete` (read more).

/// What the bridge routes on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Header {
    pub specific_character_set: Option<String>,
    pub sop_class: Option<String>,
    pub sop_instance: Option<String>,
    /// PatientName as it is in the data set (escape sequences and all).
    pub patient_name_raw: Option<Vec<u8>>,
    pub patient_id: Option<String>,
    pub study_instance: Option<String>,
}

/// Why the header could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("the data set ends before the routing elements (read more)")]
    Incomplete,
    #[error("element ({0:04X},{1:04X}) is malformed")]
    Malformed(u16, u16),
    #[error("elements are not in ascending order at ({0:04X},{1:04X})")]
    OutOfOrder(u16, u16),
    #[error("sequences nest deeper than {MAX_DEPTH}")]
    TooDeep,
}

const MAX_DEPTH: usize = 16;

/// Whether an explicit VR element of this VR has the long header (two reserved bytes and
/// a 32-bit length, 12 bytes in all; PS3.5 §7.1.2) rather than a 16-bit length (8 bytes).
pub(crate) fn has_long_length(vr: &[u8; 2]) -> bool {
    matches!(
        vr,
        b"OB"
            | b"OW"
            | b"OF"
            | b"SQ"
            | b"UT"
            | b"UN"
            | b"UC"
            | b"UR"
            | b"OD"
            | b"OL"
            | b"OV"
            | b"SV"
            | b"UV"
    )
}
const LAST: u32 = 0x0020_000D;

fn tag_of(g: u16, e: u16) -> u32 {
    (u32::from(g) << 16) | u32::from(e)
}

/// An element's header: group, element, VR (blank where the encoding has none), value
/// length, and the header's own length.
type ElementHeader = (u16, u16, [u8; 2], u32, usize);

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
    explicit: bool,
}

impl<'a> Reader<'a> {
    fn u16(&self, at: usize) -> Option<u16> {
        Some(u16::from_le_bytes([*self.b.get(at)?, *self.b.get(at + 1)?]))
    }

    fn u32(&self, at: usize) -> Option<u32> {
        Some(u32::from_le_bytes([
            *self.b.get(at)?,
            *self.b.get(at + 1)?,
            *self.b.get(at + 2)?,
            *self.b.get(at + 3)?,
        ]))
    }

    /// The next element's (group, element, VR, value length, header length); `None` at the
    /// end of the input.
    fn element(&self) -> Result<Option<ElementHeader>, HeaderError> {
        if self.pos >= self.b.len() {
            return Ok(None);
        }
        let (Some(g), Some(e)) = (self.u16(self.pos), self.u16(self.pos + 2)) else {
            return Err(HeaderError::Incomplete);
        };
        // Item and delimiter tags have no VR in either encoding.
        if g == 0xFFFE {
            let len = self.u32(self.pos + 4).ok_or(HeaderError::Incomplete)?;
            return Ok(Some((g, e, *b"  ", len, 8)));
        }
        if !self.explicit {
            let len = self.u32(self.pos + 4).ok_or(HeaderError::Incomplete)?;
            let vr = if tag_of(g, e) == 0xFFFF_FFFF {
                *b"UN"
            } else {
                *b"  "
            };
            return Ok(Some((g, e, vr, len, 8)));
        }
        let vr = [
            *self.b.get(self.pos + 4).ok_or(HeaderError::Incomplete)?,
            *self.b.get(self.pos + 5).ok_or(HeaderError::Incomplete)?,
        ];
        if !vr.iter().all(u8::is_ascii_uppercase) {
            return Err(HeaderError::Malformed(g, e));
        }
        if has_long_length(&vr) {
            let len = self.u32(self.pos + 8).ok_or(HeaderError::Incomplete)?;
            Ok(Some((g, e, vr, len, 12)))
        } else {
            let len = self.u16(self.pos + 6).ok_or(HeaderError::Incomplete)?;
            Ok(Some((g, e, vr, u32::from(len), 8)))
        }
    }

    /// Skips a sequence of undefined length starting at the current position (just after the
    /// SQ element's header), including nested ones.
    fn skip_undefined_sequence(&mut self, depth: usize) -> Result<(), HeaderError> {
        if depth > MAX_DEPTH {
            return Err(HeaderError::TooDeep);
        }
        loop {
            let Some((g, e, vr, len, hl)) = self.element()? else {
                return Err(HeaderError::Incomplete);
            };
            self.pos += hl;
            match (g, e) {
                (0xFFFE, 0xE0DD) => return Ok(()),
                (0xFFFE, 0xE000) if len == u32::MAX => self.skip_undefined_item(depth + 1)?,
                (0xFFFE, 0xE000) => self.advance(len)?,
                _ if &vr == b"SQ" && len == u32::MAX => self.skip_undefined_sequence(depth + 1)?,
                _ => self.advance(len)?,
            }
        }
    }

    fn skip_undefined_item(&mut self, depth: usize) -> Result<(), HeaderError> {
        if depth > MAX_DEPTH {
            return Err(HeaderError::TooDeep);
        }
        loop {
            let Some((g, e, vr, len, hl)) = self.element()? else {
                return Err(HeaderError::Incomplete);
            };
            self.pos += hl;
            match (g, e) {
                (0xFFFE, 0xE00D) => return Ok(()),
                _ if len == u32::MAX && (&vr == b"SQ" || (!self.explicit && g != 0xFFFE)) => {
                    self.skip_undefined_sequence(depth + 1)?
                }
                _ => self.advance(len)?,
            }
        }
    }

    fn advance(&mut self, len: u32) -> Result<(), HeaderError> {
        let len = usize::try_from(len).map_err(|_| HeaderError::Incomplete)?;
        if len > self.b.len() - self.pos {
            return Err(HeaderError::Incomplete);
        }
        self.pos += len;
        Ok(())
    }
}

/// A text value without its padding (spaces, NULs) at either end.
pub(crate) fn text(value: &[u8]) -> String {
    let end = value
        .iter()
        .rposition(|&b| b != 0 && b != b' ')
        .map_or(0, |i| i + 1);
    let start = value[..end].iter().position(|&b| b != b' ').unwrap_or(end);
    String::from_utf8_lossy(&value[start..end]).into_owned()
}

/// Reads the routing elements from the start of a data set.
pub fn read(data_set: &[u8], explicit: bool) -> Result<Header, HeaderError> {
    let mut r = Reader {
        b: data_set,
        pos: 0,
        explicit,
    };
    let mut h = Header::default();
    let mut last_tag = 0u32;
    loop {
        let Some((g, e, vr, len, hl)) = r.element()? else {
            // The whole data set was read: what is absent is absent.
            return Ok(h);
        };
        let tag = tag_of(g, e);
        if tag > LAST {
            return Ok(h);
        }
        if tag < last_tag {
            return Err(HeaderError::OutOfOrder(g, e));
        }
        last_tag = tag;
        r.pos += hl;
        let implicit_sq = !explicit && len == u32::MAX;
        if (&vr == b"SQ" || implicit_sq) && len == u32::MAX {
            r.skip_undefined_sequence(0)?;
            continue;
        }
        let start = r.pos;
        r.advance(len)?;
        let value = &data_set[start..r.pos];
        match tag {
            0x0008_0005 => h.specific_character_set = Some(text(value)),
            0x0008_0016 => h.sop_class = Some(text(value)),
            0x0008_0018 => h.sop_instance = Some(text(value)),
            0x0010_0010 => h.patient_name_raw = Some(value.to_vec()),
            0x0010_0020 => h.patient_id = Some(text(value)),
            0x0020_000D => {
                h.study_instance = Some(text(value));
                return Ok(h);
            }
            _ => {}
        }
    }
}

/// A top-level element: its tag, where it starts, where its value starts and where it ends
/// (a sequence of undefined length ends after its delimiter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Element {
    pub tag: u32,
    pub vr: [u8; 2],
    pub start: usize,
    pub value_start: usize,
    pub end: usize,
    /// The value length was undefined (0xFFFFFFFF).
    pub undefined_length: bool,
}

/// The top-level elements with tags up to `last` (inclusive), and the offset where the
/// first element after `last` starts (the length of the input when the data set ends
/// before). `Incomplete` when the input ends inside an element or before an element after
/// `last` shows that nothing up to `last` remains.
pub fn elements_until(
    data_set: &[u8],
    explicit: bool,
    last: u32,
    complete: bool,
) -> Result<(Vec<Element>, usize), HeaderError> {
    let mut r = Reader {
        b: data_set,
        pos: 0,
        explicit,
    };
    let mut out = Vec::new();
    let mut last_tag = 0u32;
    loop {
        let start = r.pos;
        let Some((g, e, vr, len, hl)) = r.element()? else {
            return if complete {
                Ok((out, start))
            } else {
                Err(HeaderError::Incomplete)
            };
        };
        let tag = tag_of(g, e);
        if tag > last {
            return Ok((out, start));
        }
        if tag < last_tag || g == 0xFFFE {
            return Err(HeaderError::OutOfOrder(g, e));
        }
        last_tag = tag;
        r.pos += hl;
        let value_start = r.pos;
        let undefined = len == u32::MAX;
        if undefined && (&vr == b"SQ" || !explicit || &vr == b"UN") {
            r.skip_undefined_sequence(0)?;
        } else if undefined {
            return Err(HeaderError::Malformed(g, e));
        } else {
            r.advance(len)?;
        }
        out.push(Element {
            tag,
            vr,
            start,
            value_start,
            end: r.pos,
            undefined_length: undefined,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testdata::{explicit, implicit};

    /// ISO 2022 IR 87: Yamada^Tarou=山田^太郎 with ESC $ B … ESC ( B.
    const NAME: &[u8] = b"Yamada^Tarou=\x1b$B;3ED\x1b(B^\x1b$BB@O:\x1b(B";

    fn sample_explicit() -> Vec<u8> {
        [
            explicit(0x0008, 0x0005, b"CS", b"\\ISO 2022 IR 87"),
            explicit(0x0008, 0x0016, b"UI", b"1.2.840.10008.5.1.4.1.1.2"),
            explicit(0x0008, 0x0018, b"UI", b"1.2.3.4.5"),
            // A sequence of undefined length with one item of undefined length.
            {
                let mut sq = Vec::new();
                sq.extend_from_slice(&[
                    0x08, 0x00, 0x15, 0x11, b'S', b'Q', 0, 0, 0xFF, 0xFF, 0xFF, 0xFF,
                ]);
                sq.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0, 0xFF, 0xFF, 0xFF, 0xFF]);
                sq.extend(explicit(0x0008, 0x1150, b"UI", b"1.2.3"));
                sq.extend_from_slice(&[0xFE, 0xFF, 0x0D, 0xE0, 0, 0, 0, 0]);
                sq.extend_from_slice(&[0xFE, 0xFF, 0xDD, 0xE0, 0, 0, 0, 0]);
                sq
            },
            explicit(0x0010, 0x0010, b"PN", NAME),
            explicit(0x0010, 0x0020, b"LO", b"0001234"),
            explicit(0x0020, 0x000D, b"UI", b"1.2.3.9"),
            explicit(0x7FE0, 0x0010, b"OB", &[0xAB; 64]),
        ]
        .concat()
    }

    #[test]
    fn explicit_vr_with_a_sequence_and_a_japanese_name() {
        let h = read(&sample_explicit(), true).unwrap();
        assert_eq!(
            h.specific_character_set.as_deref(),
            Some("\\ISO 2022 IR 87")
        );
        assert_eq!(h.sop_class.as_deref(), Some("1.2.840.10008.5.1.4.1.1.2"));
        assert_eq!(h.sop_instance.as_deref(), Some("1.2.3.4.5"));
        assert_eq!(h.patient_id.as_deref(), Some("0001234"));
        assert_eq!(h.study_instance.as_deref(), Some("1.2.3.9"));
        // Byte for byte, with the padding the encoder added.
        let raw = h.patient_name_raw.unwrap();
        assert!(raw.starts_with(NAME));
    }

    #[test]
    fn implicit_vr() {
        let ds = [
            implicit(0x0008, 0x0016, b"1.2.840.10008.5.1.4.1.1.7\0"),
            implicit(0x0008, 0x0018, b"1.2.3.4.6\0"),
            implicit(0x0010, 0x0020, b"0005678 "),
            implicit(0x7FE0, 0x0010, &[0; 16]),
        ]
        .concat();
        let h = read(&ds, false).unwrap();
        assert_eq!(h.sop_instance.as_deref(), Some("1.2.3.4.6"));
        assert_eq!(h.patient_id.as_deref(), Some("0005678"));
        assert_eq!(h.study_instance, None);
    }

    #[test]
    fn cut_short_and_malformed_input() {
        let ds = sample_explicit();
        let cut = ds.windows(2).position(|w| w == [0x10, 0x00]).unwrap() + 3;
        assert_eq!(read(&ds[..cut], true), Err(HeaderError::Incomplete));
        let mut bad = ds.clone();
        bad[4] = b'x';
        assert!(matches!(read(&bad, true), Err(HeaderError::Malformed(..))));
        let out_of_order = [
            explicit(0x0010, 0x0020, b"LO", b"1"),
            explicit(0x0008, 0x0018, b"UI", b"1.2"),
        ]
        .concat();
        assert!(matches!(
            read(&out_of_order, true),
            Err(HeaderError::OutOfOrder(..))
        ));
        // Never panics on noise.
        let mut seed = 7u64;
        for n in 0..2000 {
            let len = n % 97;
            let noise: Vec<u8> = (0..len)
                .map(|_| {
                    seed = seed
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    u8::try_from(seed >> 56).unwrap_or(0)
                })
                .collect();
            let _ = read(&noise, n % 2 == 0);
        }
    }
}
