//! Decoding a file's bytes to Unicode, before any HL7 tokenising (E-12, E-13).
//!
//! JIS X 0208 byte pairs often contain `|`, `^`, `~`, `\` or `&` (東京 is `El5~`), so the whole
//! message is decoded first, tracking the ISO 2022 escape state, and only then split. The
//! choice of decoder is made from the bytes, never from MSH-18 (E-15):
//!
//! * only 7-bit bytes: ISO-2022-JP (encoding_rs). Half-width katakana (`ESC ( I`) are
//!   normalised to full-width; JIS X 0212 becomes U+FFFD; a line or file that ends in
//!   two-byte mode is closed implicitly. Each of these is flagged.
//! * a byte of 0x80 or above: not ISO-2022-JP. UTF-8 if it is valid UTF-8, else CP932, and
//!   the file is flagged `CHARSET_VIOLATION`.

use std::borrow::Cow;

use crate::reason::{Findings, Reason};

/// The character set a file was decoded from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Charset {
    /// Only ASCII: no escape sequence at all.
    Ascii,
    Iso2022Jp,
    Utf8,
    Cp932,
}

impl Charset {
    pub fn as_str(self) -> &'static str {
        match self {
            Charset::Ascii => "ascii",
            Charset::Iso2022Jp => "iso-2022-jp",
            Charset::Utf8 => "utf-8",
            Charset::Cp932 => "cp932",
        }
    }
}

/// A decoded message.
#[derive(Debug, Clone)]
pub struct Decoded {
    pub text: String,
    pub charset: Charset,
    /// Encoding findings (warnings, or `CHARSET_VIOLATION`).
    pub findings: Findings,
}

const ESC: u8 = 0x1b;

/// The escape-state mode of an ISO-2022-JP stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Ascii,
    Roman,
    Katakana,
    TwoByte,
    Jis0212,
}

/// Prepares 7-bit bytes for the WHATWG decoder: closes two-byte mode before every CR/LF and at
/// the end (flagging it), and notes which modes occur.
fn prepare(bytes: &[u8], findings: &mut Findings) -> (Vec<u8>, bool) {
    let mut out = Vec::with_capacity(bytes.len() + 8);
    let mut mode = Mode::Ascii;
    let mut any_escape = false;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == ESC {
            any_escape = true;
            let next = escape(&bytes[i + 1..]);
            let len = match next {
                Some(Mode::Jis0212) => 4,
                Some(_) => 3,
                None => 1,
            };
            if let Some(m) = next {
                match m {
                    Mode::Roman => findings.add(Reason::JisRoman),
                    Mode::Katakana => findings.add(Reason::HalfWidthKana),
                    Mode::Jis0212 => findings.add(Reason::JisX0212),
                    _ => {}
                }
                mode = m;
            }
            let end = (i + len).min(bytes.len());
            out.extend_from_slice(&bytes[i..end]);
            i = end;
            continue;
        }
        if (b == b'\r' || b == b'\n') && multi_byte(mode) {
            findings.add(Reason::UnterminatedJis);
            out.extend_from_slice(b"\x1b(B");
            mode = Mode::Ascii;
        }
        out.push(b);
        i += 1;
    }
    if multi_byte(mode) {
        findings.add(Reason::UnterminatedJis);
        out.extend_from_slice(b"\x1b(B");
    }
    (out, any_escape)
}

/// The mode an escape sequence at the start of `seq` (after ESC) switches to.
fn escape(seq: &[u8]) -> Option<Mode> {
    if seq.starts_with(b"(B") {
        Some(Mode::Ascii)
    } else if seq.starts_with(b"(J") {
        Some(Mode::Roman)
    } else if seq.starts_with(b"(I") {
        Some(Mode::Katakana)
    } else if seq.starts_with(b"$B") || seq.starts_with(b"$@") {
        Some(Mode::TwoByte)
    } else if seq.starts_with(b"$(D") {
        Some(Mode::Jis0212)
    } else {
        None
    }
}

fn multi_byte(mode: Mode) -> bool {
    matches!(mode, Mode::TwoByte | Mode::Jis0212 | Mode::Katakana)
}

/// Whether a line or the whole input ends in a mode other than ASCII/Roman.
fn needs_closing(bytes: &[u8]) -> bool {
    let mut mode = Mode::Ascii;
    for (i, &b) in bytes.iter().enumerate() {
        if b == ESC {
            if let Some(m) = escape(&bytes[i + 1..]) {
                mode = m;
            }
        } else if (b == b'\r' || b == b'\n') && multi_byte(mode) {
            return true;
        }
    }
    multi_byte(mode)
}

/// Records which non-standard modes occur (without copying).
fn note_modes(bytes: &[u8], findings: &mut Findings) {
    for (i, &b) in bytes.iter().enumerate() {
        if b == ESC {
            match escape(&bytes[i + 1..]) {
                Some(Mode::Roman) => findings.add(Reason::JisRoman),
                Some(Mode::Katakana) => findings.add(Reason::HalfWidthKana),
                Some(Mode::Jis0212) => findings.add(Reason::JisX0212),
                _ => {}
            }
        }
    }
}

/// Decodes a file's bytes (see the module documentation).
pub fn decode(bytes: &[u8]) -> Decoded {
    let mut findings = Findings::default();
    if bytes.iter().any(|&b| b >= 0x80) {
        findings.add(Reason::CharsetViolation);
        return match std::str::from_utf8(bytes) {
            Ok(text) => Decoded {
                text: text.to_owned(),
                charset: Charset::Utf8,
                findings,
            },
            Err(_) => {
                let (text, _, errors) = encoding_rs::SHIFT_JIS.decode(bytes);
                if errors {
                    findings.add(Reason::DecodeErrors);
                }
                Decoded {
                    text: text.into_owned(),
                    charset: Charset::Cp932,
                    findings,
                }
            }
        };
    }
    if !bytes.contains(&ESC) {
        // Pure ASCII: no decoder needed (and none could fail).
        let text = String::from_utf8_lossy(bytes).into_owned();
        return Decoded {
            text,
            charset: Charset::Ascii,
            findings,
        };
    }
    // Copy only when a line or the file ends in a non-ASCII mode and must be closed.
    let prepared;
    let input = if needs_closing(bytes) {
        prepared = prepare(bytes, &mut findings).0;
        &prepared[..]
    } else {
        note_modes(bytes, &mut findings);
        bytes
    };
    let (text, errors) = encoding_rs::ISO_2022_JP.decode_without_bom_handling(input);
    if errors && !findings.contains(Reason::JisX0212) {
        findings.add(Reason::DecodeErrors);
    }
    let text = if findings.contains(Reason::HalfWidthKana) {
        halfwidth_to_fullwidth(&text).into_owned()
    } else {
        text.into_owned()
    };
    Decoded {
        text,
        charset: Charset::Iso2022Jp,
        findings,
    }
}

fn fullwidth_of(c: char) -> Option<char> {
    const TABLE: [u16; 63] = [
        0x3002, 0x300C, 0x300D, 0x3001, 0x30FB, 0x30F2, 0x30A1, 0x30A3, 0x30A5, 0x30A7, 0x30A9,
        0x30E3, 0x30E5, 0x30E7, 0x30C3, 0x30FC, 0x30A2, 0x30A4, 0x30A6, 0x30A8, 0x30AA, 0x30AB,
        0x30AD, 0x30AF, 0x30B1, 0x30B3, 0x30B5, 0x30B7, 0x30B9, 0x30BB, 0x30BD, 0x30BF, 0x30C1,
        0x30C4, 0x30C6, 0x30C8, 0x30CA, 0x30CB, 0x30CC, 0x30CD, 0x30CE, 0x30CF, 0x30D2, 0x30D5,
        0x30D8, 0x30DB, 0x30DE, 0x30DF, 0x30E0, 0x30E1, 0x30E2, 0x30E4, 0x30E6, 0x30E8, 0x30E9,
        0x30EA, 0x30EB, 0x30EC, 0x30ED, 0x30EF, 0x30F3, 0x309B, 0x309C,
    ];
    let cp = u32::from(c);
    if (0xFF61..=0xFF9F).contains(&cp) {
        let i = usize::try_from(cp - 0xFF61).ok()?;
        char::from_u32(u32::from(TABLE[i]))
    } else {
        None
    }
}

/// Composes a full-width kana with a following (half-width) voiced or semi-voiced mark.
fn compose(base: char, mark: char) -> Option<char> {
    let b = u32::from(base);
    let voiced = mark == '\u{FF9E}';
    let semi = mark == '\u{FF9F}';
    let ksth = [
        0x30AB, 0x30AD, 0x30AF, 0x30B1, 0x30B3, 0x30B5, 0x30B7, 0x30B9, 0x30BB, 0x30BD, 0x30BF,
        0x30C1, 0x30C4, 0x30C6, 0x30C8,
    ];
    let h = [0x30CF, 0x30D2, 0x30D5, 0x30D8, 0x30DB];
    if voiced && (ksth.contains(&b) || h.contains(&b)) {
        return char::from_u32(b + 1);
    }
    if semi && h.contains(&b) {
        return char::from_u32(b + 2);
    }
    if voiced && b == 0x30A6 {
        return Some('\u{30F4}');
    }
    None
}

/// Half-width katakana to full-width, composing voiced marks (ｶﾞ → ガ), as NFKC does.
pub fn halfwidth_to_fullwidth(text: &str) -> Cow<'_, str> {
    if !text.chars().any(|c| fullwidth_of(c).is_some()) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match fullwidth_of(c) {
            Some(full) => {
                if let Some(&next) = chars.peek()
                    && let Some(composed) = compose(full, next)
                {
                    out.push(composed);
                    chars.next();
                    continue;
                }
                out.push(full);
            }
            None => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// One form for the characters that decoders disagree on (E-12 f): 〜/～, −/－, ‖/∥, ¢/￠, ¬/￢
/// become the CP932-style form (～, －, ∥, ￠, ￢), which is what encoding_rs decodes JIS to.
/// For matching and hashing only; stored and forwarded bytes are never changed.
pub fn normalize_for_matching(text: &str) -> Cow<'_, str> {
    fn map(c: char) -> Option<char> {
        Some(match c {
            '\u{301C}' => '\u{FF5E}',
            '\u{2212}' => '\u{FF0D}',
            '\u{2016}' => '\u{2225}',
            '\u{00A2}' => '\u{FFE0}',
            '\u{00AC}' => '\u{FFE2}',
            _ => return None,
        })
    }
    if !text.chars().any(|c| map(c).is_some()) {
        return Cow::Borrowed(text);
    }
    Cow::Owned(text.chars().map(|c| map(c).unwrap_or(c)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e12a_pure_iso_2022_jp_decodes_without_findings() {
        // 東京 = ESC $ B El5~ ESC ( B
        let d = decode(b"PID|1||X^\x1b$BEl5~\x1b(B^Y");
        assert_eq!(d.text, "PID|1||X^東京^Y");
        assert_eq!(d.charset, Charset::Iso2022Jp);
        assert!(d.findings.is_empty(), "{:?}", d.findings);
    }

    #[test]
    fn e12b_eight_bit_bytes_are_a_charset_violation() {
        let d = decode(b"MSH|^~\\&|\xfc\xfc");
        assert_eq!(d.charset, Charset::Cp932);
        assert!(d.findings.contains(Reason::CharsetViolation));
        let d = decode("MSH|^~\\&|東京".as_bytes());
        assert_eq!(d.charset, Charset::Utf8);
        assert_eq!(d.text, "MSH|^~\\&|東京");
        assert!(d.findings.contains(Reason::CharsetViolation));
    }

    #[test]
    fn e12c_half_width_kana_become_full_width() {
        // ESC ( I then 0x36 0x5E (ｶﾞ) 0x5D (ﾝ)
        let d = decode(b"A\x1b(I6^]\x1b(BB");
        assert_eq!(d.text, "AガンB");
        assert!(d.findings.contains(Reason::HalfWidthKana));
        assert_eq!(halfwidth_to_fullwidth("ﾊﾟﾋﾞｳﾞｱ"), "パビヴア");
    }

    #[test]
    fn e12d_jis_x_0212_is_replaced_and_flagged() {
        let d = decode(b"A\x1b$(D\x30\x21\x1b(BB");
        assert!(d.text.contains('\u{FFFD}'), "{:?}", d.text);
        assert!(d.text.starts_with('A') && d.text.ends_with('B'));
        assert!(d.findings.contains(Reason::JisX0212));
    }

    #[test]
    fn e12e_ending_in_jis_mode_decodes_and_is_flagged() {
        let d = decode(b"PID|\x1b$BEl5~\rPV1|\x1b$BEl5~");
        assert_eq!(d.text, "PID|東京\rPV1|東京");
        assert!(d.findings.contains(Reason::UnterminatedJis));
    }

    #[test]
    fn e12f_variant_characters_match() {
        assert_eq!(
            normalize_for_matching("〜−‖¢¬"),
            normalize_for_matching("～－∥￠￢")
        );
        assert_eq!(normalize_for_matching("abc"), "abc");
    }

    #[test]
    fn decoding_never_panics_on_odd_escapes() {
        for input in [
            &b"\x1b"[..],
            b"\x1b$",
            b"\x1b(",
            b"A\x1b$B\x21",
            b"\x1b\x1b$B",
        ] {
            let _ = decode(input);
        }
    }
}
