//! Writing ISO-2022-JP the way SS-MIX2 requires (E-20), for the test-data builder and for
//! anything the box itself writes.
//!
//! * Only 7-bit bytes; only `ESC $ B` (JIS X 0208) and `ESC ( B` (ASCII): never `ESC ( J`
//!   or `ESC ( I`.
//! * Every ASCII character, so every HL7 delimiter, is written in ASCII mode.
//! * No HTML `&#…;` escapes (encoding_rs's `Encoding::encode` would write them): characters
//!   outside JIS X 0208 become `■` and are counted.
//! * Half-width katakana become full-width; `¥`/`‾` become `￥`/`￣`; the characters that
//!   differ between JIS mappings are written in their JIS X 0208 form (`〜` as `～`).

use encoding_rs::{EncoderResult, ISO_2022_JP};

use crate::decode::{halfwidth_to_fullwidth, normalize_for_matching};

/// The result of encoding: the bytes, and how many characters were replaced by `■`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    pub bytes: Vec<u8>,
    pub substituted: usize,
}

fn premap(c: char) -> char {
    match c {
        '\u{00A5}' => '\u{FFE5}',
        '\u{203E}' => '\u{FFE3}',
        '\u{2014}' => '\u{2015}',
        _ => c,
    }
}

/// The JIS X 0208 bytes of one non-ASCII character, or `None` if it has none (NEC and IBM
/// extensions, which encoding_rs would write, are refused: rows 9–15 and 85–94).
fn jis_pair(c: char) -> Option<[u8; 2]> {
    let mut encoder = ISO_2022_JP.new_encoder();
    let mut buf = [0u8; 16];
    let mut s = [0u8; 4];
    let (result, _, written) =
        encoder.encode_from_utf8_without_replacement(c.encode_utf8(&mut s), &mut buf, true);
    if !matches!(result, EncoderResult::InputEmpty) {
        return None;
    }
    let out = &buf[..written];
    // Expect exactly ESC $ B hi lo ESC ( B.
    if out.len() != 8 || !out.starts_with(b"\x1b$B") || !out.ends_with(b"\x1b(B") {
        return None;
    }
    let (hi, lo) = (out[3], out[4]);
    let row_ok = (0x21..=0x28).contains(&hi) || (0x30..=0x74).contains(&hi);
    (row_ok && (0x21..=0x7e).contains(&lo)).then_some([hi, lo])
}

/// Encodes `text` (a whole message or a part of one) to SS-MIX2 ISO-2022-JP.
pub fn encode(text: &str) -> Encoded {
    const BLACK_SQUARE: [u8; 2] = [0x22, 0x23];
    let text = halfwidth_to_fullwidth(text);
    let text = normalize_for_matching(&text);
    let mut bytes = Vec::with_capacity(text.len() + 16);
    let mut substituted = 0;
    let mut two_byte = false;
    for c in text.chars() {
        if c.is_ascii() {
            if two_byte {
                bytes.extend_from_slice(b"\x1b(B");
                two_byte = false;
            }
            bytes.push(c as u8);
            continue;
        }
        let pair = jis_pair(premap(c)).unwrap_or_else(|| {
            substituted += 1;
            BLACK_SQUARE
        });
        if !two_byte {
            bytes.extend_from_slice(b"\x1b$B");
            two_byte = true;
        }
        bytes.extend_from_slice(&pair);
    }
    if two_byte {
        bytes.extend_from_slice(b"\x1b(B");
    }
    Encoded { bytes, substituted }
}

/// Checks bytes against the writer rules: 7-bit, only `ESC $ B` / `ESC ( B`, no delimiter or
/// control byte in two-byte mode, no `&#`, ends in ASCII mode. Returns the first problem.
pub fn check_written(bytes: &[u8]) -> Result<(), String> {
    let mut two_byte = false;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b >= 0x80 {
            return Err(format!("byte {b:#04x} at {i} is not 7-bit"));
        }
        if b == 0x1b {
            match bytes.get(i + 1..i + 3) {
                Some(b"$B") => two_byte = true,
                Some(b"(B") => two_byte = false,
                other => return Err(format!("escape {other:?} at {i} is not allowed")),
            }
            i += 3;
            continue;
        }
        if two_byte {
            let lo = bytes.get(i + 1).copied().unwrap_or(0);
            if !(0x21..=0x7e).contains(&b) || !(0x21..=0x7e).contains(&lo) {
                return Err(format!("a control byte inside two-byte mode at {i}"));
            }
            i += 2;
            continue;
        }
        if b == b'&' && bytes.get(i + 1) == Some(&b'#') {
            return Err(format!("an HTML character reference at {i}"));
        }
        i += 1;
    }
    if two_byte {
        Err("ends in two-byte mode".into())
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::decode;

    #[test]
    fn e20_delimiters_stay_ascii_and_round_trip() {
        let text = "PID|||0001^^^^PI||東京^時日^^^^^L^I~トウキョウ^ジニチ^^^^^L^P";
        let e = encode(text);
        check_written(&e.bytes).unwrap();
        assert_eq!(e.substituted, 0);
        assert_eq!(decode(&e.bytes).text, text);
        // 東京 contains `~` in JIS: it must be inside two-byte mode.
        assert!(e.bytes.windows(4).any(|w| w == b"El5~"));
    }

    #[test]
    fn e20_writer_traps() {
        // ¥ is never written as ESC ( J; half-width kana become full-width; 髙 and ① (NEC/IBM
        // extensions) and emoji become ■; no &# references.
        for (input, expect, subs) in [
            ("¥100", "￥100", 0),
            ("ｼﾞｮｳ", "ジョウ", 0),
            ("髙①😀", "■■■", 3),
            ("〜", "～", 0),
        ] {
            let e = encode(input);
            check_written(&e.bytes).unwrap();
            assert_eq!(decode(&e.bytes).text, expect, "{input}");
            assert_eq!(e.substituted, subs, "{input}");
        }
        assert!(check_written(b"\x1b(Jx").is_err());
        assert!(check_written(b"\x1b$BEl").is_err());
        assert!(check_written(b"a&#8212;").is_err());
    }
}
