//! A small, strict HL7 v2 tokenizer over decoded text.
//!
//! Why our own and not `hl7-parser`: the input is untrusted and parsed in a process that holds
//! patient data, so the parser is small enough to read in one sitting, has no dependencies,
//! never panics, and reports *why* a file is not HL7 (`NOT_HL7`, `TRUNCATED`) in our own
//! reason codes. It reads the encoding characters from MSH-1/MSH-2, accepts every framing and
//! terminator seen in SS-MIX2 storages (E-14: leading 0x0B, trailing 0x1C, CR, LF, CRLF, none)
//! and decodes the standard escapes (`\F\ \S\ \T\ \R\ \E\ \X..\`). Fields are addressed by
//! their 1-based HL7 numbers.

use crate::reason::Reason;

/// The delimiters from MSH-1 and MSH-2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delimiters {
    pub field: char,
    pub component: char,
    pub repetition: char,
    pub escape: Option<char>,
    pub subcomponent: Option<char>,
}

/// One segment: its ID and its fields, `fields[n]` being field `n` (for MSH, `fields[1]` is
/// the field separator and `fields[2]` the encoding characters, as HL7 numbers them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment<'a> {
    pub id: &'a str,
    fields: Vec<&'a str>,
}

impl<'a> Segment<'a> {
    /// Field `n` (1-based), raw (escapes not decoded), or `""` if absent.
    pub fn field(&self, n: usize) -> &'a str {
        self.fields.get(n).copied().unwrap_or("")
    }

    /// The number of the last field present.
    pub fn len(&self) -> usize {
        self.fields.len().saturating_sub(1)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A parsed message: borrowed from the decoded text.
#[derive(Debug, Clone)]
pub struct Message<'a> {
    pub delimiters: Delimiters,
    pub segments: Vec<Segment<'a>>,
}

/// Strips MLLP framing and trailing terminators (E-14).
fn unframe(text: &str) -> &str {
    let text = text.strip_prefix('\u{FEFF}').unwrap_or(text);
    let text = text.trim_start_matches('\u{0B}');
    text.trim_end_matches(['\u{1C}', '\r', '\n', '\u{0B}'])
}

/// The lines of a text split at CR and LF (each one a terminator), by bytes: both are ASCII,
/// so every piece is a whole `str`.
fn lines(text: &str) -> impl Iterator<Item = &str> {
    let bytes = text.as_bytes();
    let mut start = 0;
    let mut done = false;
    std::iter::from_fn(move || {
        if done {
            return None;
        }
        match bytes[start..]
            .iter()
            .position(|&b| b == b'\r' || b == b'\n')
        {
            Some(i) => {
                let line = &text[start..start + i];
                start += i + 1;
                Some(line)
            }
            None => {
                done = true;
                Some(&text[start..])
            }
        }
    })
}

fn valid_segment_id(id: &str) -> bool {
    let b = id.as_bytes();
    b.len() == 3
        && b[0].is_ascii_uppercase()
        && b[1..]
            .iter()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit())
}

/// Parses a decoded message.
///
/// `NOT_HL7`: it does not start with `MSH` and a field separator, or its encoding characters
/// are unusable. `TRUNCATED`: a segment is cut short (an ID without fields, or a fragment
/// that is not a segment ID), or MSH lacks MSH-9, MSH-10 or MSH-12.
pub fn parse(text: &str) -> Result<Message<'_>, Reason> {
    let text = unframe(text);
    let rest = text.strip_prefix("MSH").ok_or(Reason::NotHl7)?;
    let mut chars = rest.chars();
    let field = chars.next().ok_or(Reason::NotHl7)?;
    if field.is_alphanumeric() || field.is_control() || field.is_whitespace() {
        return Err(Reason::NotHl7);
    }
    // MSH-2: two to four encoding characters, up to the next field separator.
    let mut enc = ['\0'; 4];
    let mut n = 0;
    for c in rest[field.len_utf8()..]
        .chars()
        .take_while(|&c| c != field && c != '\r' && c != '\n')
    {
        if n == 4 || c.is_alphanumeric() {
            return Err(Reason::NotHl7);
        }
        enc[n] = c;
        n += 1;
    }
    if n < 2 {
        return Err(Reason::NotHl7);
    }
    let delimiters = Delimiters {
        field,
        component: enc[0],
        repetition: enc[1],
        escape: (n > 2).then_some(enc[2]),
        subcomponent: (n > 3).then_some(enc[3]),
    };
    let mut segments = Vec::with_capacity(8);
    for line in lines(text) {
        if line.is_empty() {
            continue;
        }
        let (id, body) = match line.find(field) {
            Some(i) => (&line[..i], Some(&line[i + field.len_utf8()..])),
            None => (line, None),
        };
        if !valid_segment_id(id) {
            // A fragment: the rest of a segment cut in two, or garbage.
            return Err(if segments.is_empty() {
                Reason::NotHl7
            } else {
                Reason::Truncated
            });
        }
        let Some(body) = body else {
            return Err(Reason::Truncated);
        };
        let mut fields = Vec::with_capacity(16);
        fields.push(id);
        if id == "MSH" {
            // MSH-1 is the separator itself; MSH-2 onwards follow it.
            fields.push(&line[3..3 + field.len_utf8()]);
        }
        fields.extend(body.split(field));
        segments.push(Segment { id, fields });
    }
    let msh = &segments[0];
    if msh.field(9).is_empty() || msh.field(10).is_empty() || msh.field(12).is_empty() {
        return Err(Reason::Truncated);
    }
    Ok(Message {
        delimiters,
        segments,
    })
}

impl<'a> Message<'a> {
    /// The first segment with this ID.
    pub fn segment(&self, id: &str) -> Option<&Segment<'a>> {
        self.segments.iter().find(|s| s.id == id)
    }

    /// Splits a raw field into its repetitions.
    pub fn repetitions(&self, raw: &'a str) -> impl Iterator<Item = &'a str> + use<'a> {
        raw.split(self.delimiters.repetition)
    }

    /// Component `n` (1-based) of one repetition, raw.
    pub fn component(&self, repetition: &'a str, n: usize) -> &'a str {
        repetition
            .split(self.delimiters.component)
            .nth(n.saturating_sub(1))
            .unwrap_or("")
    }

    /// Field `n` of segment `id`, first repetition, component `c`, with escapes decoded.
    pub fn value(&self, id: &str, n: usize, c: usize) -> String {
        let Some(seg) = self.segment(id) else {
            return String::new();
        };
        let first = self.repetitions(seg.field(n)).next().unwrap_or("");
        self.unescape(self.component(first, c))
    }

    /// Decodes the standard HL7 escapes of a value.
    pub fn unescape(&self, raw: &str) -> String {
        let Some(esc) = self.delimiters.escape else {
            return raw.to_owned();
        };
        if !raw.contains(esc) {
            return raw.to_owned();
        }
        let d = self.delimiters;
        let mut out = String::with_capacity(raw.len());
        let mut rest = raw;
        while let Some(i) = rest.find(esc) {
            out.push_str(&rest[..i]);
            let after = &rest[i + esc.len_utf8()..];
            let Some(j) = after.find(esc) else {
                // A lone escape character: kept as written.
                out.push_str(&rest[i..]);
                return out;
            };
            let seq = &after[..j];
            match seq {
                "F" => out.push(d.field),
                "S" => out.push(d.component),
                "R" => out.push(d.repetition),
                "E" => out.push(esc),
                "T" => out.push(d.subcomponent.unwrap_or('&')),
                ".br" => out.push('\n'),
                _ if seq.starts_with('X')
                    && seq.len() > 1
                    && seq.len() % 2 == 1
                    && seq[1..].bytes().all(|b| b.is_ascii_hexdigit()) =>
                {
                    let hex = &seq[1..];
                    let decoded: Option<String> = (0..hex.len())
                        .step_by(2)
                        .map(|k| {
                            u8::from_str_radix(&hex[k..k + 2], 16)
                                .ok()
                                .filter(u8::is_ascii)
                                .map(char::from)
                        })
                        .collect();
                    match decoded {
                        Some(s) => out.push_str(&s),
                        None => {
                            out.push(esc);
                            out.push_str(seq);
                            out.push(esc);
                        }
                    }
                }
                _ => {
                    out.push(esc);
                    out.push_str(seq);
                    out.push(esc);
                }
            }
            rest = &after[j + esc.len_utf8()..];
        }
        out.push_str(rest);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MSG: &str = "MSH|^~\\&|HIS|FAC|GW|RCV|20111220224447.3399||ADT^A08^ADT_A01|20111220000001|P|2.5||||||~ISO IR87||ISO 2022-1994\rEVN||201112202244\rPID|||9999013^^^^PI||東京^時日^^^^^L^I~トウキョウ^ジニチ^^^^^L^P||19480405|M";

    #[test]
    fn e14_every_framing_gives_the_same_segments() {
        let base = parse(MSG).unwrap().segments;
        for variant in [
            format!("{MSG}\r\u{1c}"),
            format!("{MSG}\r"),
            MSG.replace('\r', "\r\n"),
            format!("\u{0b}{MSG}\u{1c}\r"),
            MSG.replace('\r', "\n"),
        ] {
            assert_eq!(parse(&variant).unwrap().segments, base, "{variant:?}");
        }
    }

    #[test]
    fn fields_components_and_repetitions() {
        let m = parse(MSG).unwrap();
        let msh = m.segment("MSH").unwrap();
        assert_eq!(msh.field(1), "|");
        assert_eq!(msh.field(2), "^~\\&");
        assert_eq!(msh.field(7), "20111220224447.3399");
        assert_eq!(msh.field(18), "~ISO IR87");
        assert_eq!(m.value("MSH", 9, 1), "ADT");
        assert_eq!(m.value("PID", 3, 1), "9999013");
        let pid = m.segment("PID").unwrap();
        let reps: Vec<&str> = m.repetitions(pid.field(5)).collect();
        assert_eq!(reps.len(), 2);
        assert_eq!(m.component(reps[0], 1), "東京");
        assert_eq!(m.component(reps[1], 8), "P");
    }

    #[test]
    fn escapes() {
        let m = parse(MSG).unwrap();
        assert_eq!(
            m.unescape("a\\F\\b\\S\\c\\R\\d\\E\\e\\T\\f\\X41\\"),
            "a|b^c~d\\e&fA"
        );
        assert_eq!(m.unescape("lone\\"), "lone\\");
    }

    #[test]
    fn e17_not_hl7_and_truncated() {
        assert_eq!(parse("").unwrap_err(), Reason::NotHl7);
        assert_eq!(parse("PID|1").unwrap_err(), Reason::NotHl7);
        assert_eq!(parse("\u{0}\u{1}garbage").unwrap_err(), Reason::NotHl7);
        assert_eq!(parse("MSHX").unwrap_err(), Reason::NotHl7);
        assert_eq!(parse("MSH|^~\\&|A|B").unwrap_err(), Reason::Truncated);
        let cut = &MSG[..MSG.find("PID").unwrap() + 2];
        assert_eq!(parse(cut).unwrap_err(), Reason::Truncated);
        let fragment = format!("{}\rnese^Taro", &MSG[..MSG.find("\rPID").unwrap()]);
        assert_eq!(parse(&fragment).unwrap_err(), Reason::Truncated);
    }
}
