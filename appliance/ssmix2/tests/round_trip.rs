//! E-13 as a property: any name and address the builder writes (kanji whose JIS bytes are
//! `|`, `^`, `~`, `\` and `&`, kana, ASCII) decodes to identical field values.

use proptest::prelude::*;
use ssmix2::build::{Patient, Record, message};
use ssmix2::datatype::DUMMY_ORDER_NO;
use ssmix2::encode::{check_written, encode};
use ssmix2::message::parse_file;
use ssmix2::name::Key;

/// Characters with an HL7 delimiter byte in JIS X 0208 (日 `|`, 剤 `^`, 京 `~`, 施 `\`,
/// う `&`, ...), and others.
const POOL: &[char] = &[
    '東', '京', '時', '日', '期', '糖', '復', '剤', '急', '五', '入', '応', '施', '接', '移', 'う',
    'ウ', '・', '山', '田', '花', '子', 'ア', 'イ', 'カ', 'ナ', 'ー', '髙', '﨑', 'A', 'b', '1',
    '-', '.', ' ',
];

fn text() -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(POOL), 1..12)
        .prop_map(|v| v.into_iter().collect::<String>().trim().to_owned())
}

/// What the writer makes of a text: characters outside JIS X 0208 become ■.
fn as_written(s: &str) -> String {
    s.replace(['髙', '﨑'], "■")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn e13_written_messages_decode_to_the_same_fields(family in text(), given in text(), kana in text(), address in text()) {
        prop_assume!(!family.is_empty() && !given.is_empty() && !kana.is_empty());
        let p = Patient {
            family: family.clone(),
            given: given.clone(),
            family_kana: kana.clone(),
            given_kana: kana.clone(),
            address: address.clone(),
            ..Patient::sample("0000123456")
        };
        let r = Record::new("ADT-00", "-", DUMMY_ORDER_NO, "20261120100000000");
        let text = message(&p, &r, "1");
        let bytes = encode(&text).bytes;
        prop_assert!(check_written(&bytes).is_ok());
        let key = Key { patient_id: p.id.clone(), care_date: "-".into(), data_type: "ADT-00".into(), order_no: DUMMY_ORDER_NO.into() };
        let parsed = parse_file(&bytes, Some(&key));
        prop_assert!(parsed.findings.is_empty(), "{:?}", parsed.findings);
        let f = parsed.fields.unwrap();
        prop_assert_eq!(f.name.ideographic, Some(format!("{}\u{3000}{}", as_written(&family), as_written(&given))));
        prop_assert_eq!(f.name.phonetic, Some(format!("{}\u{3000}{}", as_written(&kana), as_written(&kana))));
        prop_assert_eq!(f.patient_id, p.id);
        // Decoding and re-encoding is stable.
        let decoded = ssmix2::decode::decode(&bytes).text;
        prop_assert_eq!(encode(&decoded).bytes, bytes);
    }
}
