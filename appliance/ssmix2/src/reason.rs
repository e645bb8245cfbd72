//! Stable reason codes for what the engine finds wrong with a file. The codes are API:
//! scripts read them from `tsunagi ssmix2 scan --json`, and the index stores them.

use std::fmt;

use serde::{Serialize, Serializer};

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// Reported; the file is used as it is.
    Warning,
    /// The key's state is doubtful (e.g. two current files); the file is used, the finding
    /// raised as an anomaly.
    Anomaly,
    /// The file is quarantined: reported, held back, never modified.
    Quarantine,
}

macro_rules! reasons {
    ($($variant:ident => $code:literal, $sev:ident, $en:literal, $ja:literal;)*) => {
        /// Why a file is quarantined or flagged.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub enum Reason { $($variant,)* }

        impl Reason {
            /// Every reason, in the order of the table.
            pub const ALL: &'static [Reason] = &[$(Reason::$variant,)*];

            /// The stable code, e.g. `BAD_NAME`.
            pub fn code(self) -> &'static str {
                match self { $(Reason::$variant => $code,)* }
            }

            pub fn severity(self) -> Severity {
                match self { $(Reason::$variant => Severity::$sev,)* }
            }

            /// A one-line explanation for a person, in English.
            pub fn describe_en(self) -> &'static str {
                match self { $(Reason::$variant => $en,)* }
            }

            /// The same in Japanese.
            pub fn describe_ja(self) -> &'static str {
                match self { $(Reason::$variant => $ja,)* }
            }

            /// The reason with this code.
            pub fn from_code(code: &str) -> Option<Reason> {
                match code { $($code => Some(Reason::$variant),)* _ => None }
            }
        }
    };
}

reasons! {
    BadName => "BAD_NAME", Quarantine,
        "the file or folder name does not follow the SS-MIX2 naming convention",
        "ファイル名またはフォルダ名がSS-MIX2の命名規約に従っていません";
    PathMismatch => "PATH_MISMATCH", Quarantine,
        "the name's fields disagree with the folders it is in, or it is at the wrong depth",
        "ファイル名の項目が格納フォルダと一致しないか、階層の位置が正しくありません";
    BadPatientId => "BAD_PATIENT_ID", Quarantine,
        "the patient ID contains characters that are not allowed (`_`, spaces, non-ASCII)",
        "患者IDに使用できない文字（_、空白、ASCII以外）が含まれています";
    CharsetViolation => "CHARSET_VIOLATION", Quarantine,
        "the file is not 7-bit ISO-2022-JP (bytes of 0x80 or above); decoded as UTF-8 or CP932 for the report only",
        "ISO-2022-JP（7ビット）ではありません（0x80以上のバイトがあります）。報告用にのみUTF-8またはCP932で復号しました";
    NotHl7 => "NOT_HL7", Quarantine,
        "the file is not an HL7 v2 message (it does not start with MSH)",
        "HL7 v2メッセージではありません（MSHで始まっていません）";
    Truncated => "TRUNCATED", Quarantine,
        "the message is incomplete: a segment or a required field is cut off or missing",
        "メッセージが不完全です（セグメントまたは必須項目が欠けています）";
    EmptyFile => "EMPTY_FILE", Quarantine,
        "the file is empty",
        "ファイルが空です";
    PatientMismatch => "PATIENT_MISMATCH", Quarantine,
        "the patient ID in the message (PID-3) differs from the patient folder",
        "メッセージ内の患者ID（PID-3）が患者フォルダと一致しません";
    MessageMismatch => "MESSAGE_MISMATCH", Quarantine,
        "the message type does not belong to the data type of its folder",
        "メッセージ型が格納フォルダのデータ種別と一致しません";
    NotRegular => "NOT_REGULAR", Quarantine,
        "not a regular file (a symbolic link, device or socket); not followed",
        "通常のファイルではありません（シンボリックリンク等）。参照しません";
    Unreadable => "UNREADABLE", Quarantine,
        "the file could not be read",
        "ファイルを読み取れませんでした";
    TooLarge => "TOO_LARGE", Quarantine,
        "the file is larger than the configured limit for a message",
        "ファイルがメッセージの上限サイズを超えています";
    DuplicateCurrent => "DUPLICATE_CURRENT", Anomaly,
        "more than one current (_1) file for the same key; the newest is used",
        "同じキーに最新版（_1）のファイルが複数あります。最も新しいものを採用しました";
    NoCurrent => "NO_CURRENT", Anomaly,
        "a key with only superseded (_2) files; the newest is used as current",
        "更新前（_2）のファイルしかないキーです。最も新しいものを最新版として扱いました";
    CaseCollision => "CASE_COLLISION", Anomaly,
        "two folders differ only in upper and lower case; on a case-insensitive share they are the same",
        "大文字と小文字だけが異なるフォルダがあります。大文字小文字を区別しない共有では同一とみなされます";
    UnknownDataType => "UNKNOWN_DATA_TYPE", Warning,
        "the data type is not in the SS-MIX2 table; held unless the policy forwards it",
        "SS-MIX2のデータ種別表にないデータ種別です。設定で転送しない限り保留します";
    CareDateMismatch => "CARE_DATE_MISMATCH", Warning,
        "the care-date folder differs from the date in the message field the guideline names",
        "診療日フォルダがガイドラインの定めるメッセージ項目の日付と一致しません";
    HalfWidthKana => "HALF_WIDTH_KANA", Warning,
        "half-width katakana (ESC ( I) found; normalised to full-width",
        "半角カタカナ（ESC ( I）があります。全角に変換しました";
    JisX0212 => "JIS_X_0212", Warning,
        "JIS X 0212 characters found; replaced by U+FFFD",
        "JIS X 0212の文字があります。U+FFFDに置き換えました";
    JisRoman => "JIS_ROMAN", Warning,
        "JIS X 0201 Roman (ESC ( J) found; 0x5C and 0x7E decode as ¥ and ‾",
        "JIS X 0201ローマ字（ESC ( J）があります。0x5Cと0x7Eは¥と‾になります";
    UnterminatedJis => "UNTERMINATED_JIS", Warning,
        "a line or the file ends still in two-byte (JIS) mode",
        "行またはファイルの終わりが2バイト（JIS）モードのままです";
    DecodeErrors => "DECODE_ERRORS", Warning,
        "some bytes could not be decoded and were replaced by U+FFFD",
        "復号できないバイトがあり、U+FFFDに置き換えました";
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

impl Serialize for Reason {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.code())
    }
}

/// The findings on one file: the worst one is *the* reason.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Findings(Vec<Reason>);

impl Findings {
    pub fn add(&mut self, reason: Reason) {
        if !self.0.contains(&reason) {
            self.0.push(reason);
        }
    }

    /// The worst finding (the first found among the worst), or `None`.
    pub fn worst(&self) -> Option<Reason> {
        let mut worst: Option<Reason> = None;
        for r in &self.0 {
            if worst.is_none_or(|w| r.severity() > w.severity()) {
                worst = Some(*r);
            }
        }
        worst
    }

    pub fn quarantined(&self) -> bool {
        self.0.iter().any(|r| r.severity() == Severity::Quarantine)
    }

    pub fn contains(&self, reason: Reason) -> bool {
        self.0.contains(&reason)
    }

    pub fn all(&self) -> &[Reason] {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_and_round_trip() {
        let mut seen = std::collections::BTreeSet::new();
        for r in Reason::ALL {
            assert!(seen.insert(r.code()), "{} twice", r.code());
            assert_eq!(Reason::from_code(r.code()), Some(*r));
            assert!(
                r.code()
                    .bytes()
                    .all(|b| b.is_ascii_uppercase() || b == b'_' || b.is_ascii_digit())
            );
        }
    }

    #[test]
    fn the_worst_finding_wins() {
        let mut f = Findings::default();
        f.add(Reason::HalfWidthKana);
        f.add(Reason::DuplicateCurrent);
        assert_eq!(f.worst(), Some(Reason::DuplicateCurrent));
        f.add(Reason::Truncated);
        f.add(Reason::NotHl7);
        assert_eq!(f.worst(), Some(Reason::Truncated));
        assert!(f.quarantined());
    }
}
