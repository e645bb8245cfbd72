//! The SS-MIX2 data types (データ種別) of the standardized storage, with the messages each one
//! holds and where its care date comes from (guideline 1.2g table, as NHO quotes it).

/// Which message field gives a file's 診療日 (care-date folder).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CareDateSource {
    /// No care date: the file lives under `-`.
    None,
    /// Segment and field number, e.g. `("ORC", 9)`.
    Field(&'static str, usize),
}

/// One row of the table.
#[derive(Debug)]
pub struct DataType {
    pub code: &'static str,
    pub name_ja: &'static str,
    /// Message types (`MSH-9.1^MSH-9.2`) that belong in this folder, the first the normal one.
    pub messages: &'static [&'static str],
    /// Trigger events that cancel what an earlier message of this type did (E-06).
    pub cancels: &'static [&'static str],
    /// A snapshot type: the current file replaces the whole previous state (E-07).
    pub snapshot: bool,
}

macro_rules! table {
    ($($code:literal, $ja:literal, [$($msg:literal),*], [$($cancel:literal),*], $snap:literal;)*) => {
        /// Every data type of the standardized storage.
        pub const TABLE: &[DataType] = &[$(DataType {
            code: $code, name_ja: $ja, messages: &[$($msg),*], cancels: &[$($cancel),*], snapshot: $snap,
        },)*];
    };
}

table! {
    "ADT-00", "患者基本情報の更新/削除", ["ADT^A08", "ADT^A23"], ["ADT^A23"], true;
    "ADT-01", "担当医の変更/取消", ["ADT^A54", "ADT^A55"], ["ADT^A55"], false;
    "ADT-12", "外来診察の受付", ["ADT^A04"], [], false;
    "ADT-21", "入院予定", ["ADT^A14", "ADT^A27"], ["ADT^A27"], false;
    "ADT-22", "入院実施", ["ADT^A01", "ADT^A11"], ["ADT^A11"], false;
    "ADT-31", "外出泊実施", ["ADT^A21", "ADT^A52"], ["ADT^A52"], false;
    "ADT-32", "外出泊帰院実施", ["ADT^A22", "ADT^A53"], ["ADT^A53"], false;
    "ADT-41", "転科・転棟(転室・転床)予定", ["ADT^A15", "ADT^A26"], ["ADT^A26"], false;
    "ADT-42", "転科・転棟(転室・転床)実施", ["ADT^A02", "ADT^A12"], ["ADT^A12"], false;
    "ADT-51", "退院予定", ["ADT^A16", "ADT^A25"], ["ADT^A25"], false;
    "ADT-52", "退院実施", ["ADT^A03", "ADT^A13"], ["ADT^A13"], false;
    "ADT-61", "アレルギー情報の登録/更新", ["ADT^A60"], [], true;
    "PPR-01", "病名(歴)情報の登録/更新", ["PPR^ZD1"], [], true;
    "OMD", "食事オーダ", ["OMD^O03"], [], false;
    "OMP-01", "処方オーダ", ["RDE^O11"], [], false;
    "OMP-11", "処方実施通知", ["RAS^O17"], [], false;
    "OMP-02", "注射オーダ", ["RDE^O11"], [], false;
    "OMP-12", "注射実施通知", ["RAS^O17"], [], false;
    "OML-01", "検体検査オーダ", ["OML^O33"], [], false;
    "OML-11", "検体検査結果通知", ["OUL^R22"], [], false;
    "OMG-01", "放射線検査オーダ", ["OMG^O19"], [], false;
    "OMG-11", "放射線検査の実施通知", ["OMI^Z23"], [], false;
    "OMG-02", "内視鏡検査オーダ", ["OMG^O19"], [], false;
    "OMG-12", "内視鏡検査の実施通知", ["OMI^Z23"], [], false;
    "OMG-03", "生理検査オーダ", ["OMG^O19"], [], false;
    "OMG-13", "生理検査結果通知", ["ORU^R01"], [], false;
}

/// The data type with this code (exact, case-sensitive: `omp-01` is unknown).
pub fn lookup(code: &str) -> Option<&'static DataType> {
    TABLE.iter().find(|t| t.code == code)
}

/// The field that gives the care date of a message type (`ADT^A04`), per NHO's checker.
pub fn care_date_source(message_type: &str) -> Option<CareDateSource> {
    use CareDateSource::{Field, None};
    Some(match message_type {
        "ADT^A08" | "ADT^A23" | "ADT^A54" | "ADT^A55" | "ADT^A60" | "PPR^ZD1" => None,
        "ADT^A04" | "ADT^A01" | "ADT^A11" => Field("PV1", 44),
        "ADT^A14" | "ADT^A27" | "ADT^A15" | "ADT^A26" => Field("PV2", 8),
        "ADT^A16" | "ADT^A25" => Field("PV2", 9),
        "ADT^A21" | "ADT^A52" | "ADT^A22" | "ADT^A02" | "ADT^A12" => Field("EVN", 6),
        "ADT^A53" => Field("PV2", 47),
        "ADT^A03" | "ADT^A13" => Field("PV1", 45),
        "OMD^O03" | "RDE^O11" | "OML^O33" | "OMG^O19" => Field("ORC", 9),
        "RAS^O17" => Field("RXA", 3),
        "OUL^R22" => Field("SPM", 17),
        "OMI^Z23" | "ORU^R01" => Field("OBR", 7),
        _ => return Option::None,
    })
}

/// The dummy order number of types that have no order (ADT-00, PPR-01, ...). Two records with
/// it are never "the same order" (E-19): only the full key links files.
pub const DUMMY_ORDER_NO: &str = "999999999999999";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_consistent() {
        assert_eq!(TABLE.len(), 26);
        for t in TABLE {
            for m in t.messages {
                assert!(care_date_source(m).is_some(), "{m} has no care-date source");
            }
            for c in t.cancels {
                assert!(t.messages.contains(c));
            }
        }
        assert!(lookup("omp-01").is_none());
        assert!(lookup("ADT-62").is_none());
        assert!(lookup("OMP-01").is_some());
    }
}
