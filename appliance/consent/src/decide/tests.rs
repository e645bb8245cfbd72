use std::collections::BTreeSet;

use proptest::prelude::*;
use tsunagi_config::FacilityCode;

use super::*;
use crate::model::{PatientId, Source};

const DAY: i64 = 86_400;
const T0: Timestamp = 1_795_273_200; // 2026-11-22T00:00:00+09:00
const HOUR: Duration = Duration::from_secs(3600);

fn fac(code: &str) -> FacilityCode {
    FacilityCode::try_from(code).unwrap()
}

fn consent(id: &str, version: u32) -> Consent {
    Consent {
        id: id.to_owned(),
        version,
        patient: "0001234".parse::<PatientId>().unwrap(),
        status: Status::Active,
        scope: Scope::AllParticipants,
        excluded: BTreeSet::new(),
        categories: Category::ALL.into_iter().collect(),
        valid_from: T0 - 10 * DAY,
        valid_until: None,
        evidence: None,
        source: Source::Local,
        recorded_at: T0 - 10 * DAY,
    }
}

fn known(consent: Consent, created_seq: i64) -> Known {
    Known {
        consent,
        created_seq,
    }
}

fn fresh() -> Freshness {
    Freshness {
        last_pull: Some(T0 - 60),
        bound: 24 * HOUR,
    }
}

struct Case {
    name: &'static str,
    records: Vec<Known>,
    recipient: Recipient,
    category: Category,
    at: Timestamp,
    now: Timestamp,
    freshness: Freshness,
    expect: Decision,
}

fn case(name: &'static str, records: Vec<Known>, expect: Decision) -> Case {
    Case {
        name,
        records,
        recipient: Recipient::Facility(fac("1312345678")),
        category: Category::LabResults,
        at: T0,
        now: T0,
        freshness: fresh(),
        expect,
    }
}

#[test]
fn decision_table() {
    use DenyReason::*;
    let listed = |codes: &[&str]| Scope::Facilities(codes.iter().map(|c| fac(c)).collect());
    let cases = vec![
        case("no consent", vec![], Decision::Deny(NoConsent)),
        case(
            "active, all participants",
            vec![known(consent("a", 1), 1)],
            Decision::Permit,
        ),
        Case {
            recipient: Recipient::Hub,
            ..case(
                "active, to the hub",
                vec![known(consent("a", 1), 1)],
                Decision::Permit,
            )
        },
        case(
            "facility list: listed",
            vec![known(
                Consent {
                    scope: listed(&["1312345678"]),
                    ..consent("a", 1)
                },
                1,
            )],
            Decision::Permit,
        ),
        case(
            "facility list: not listed",
            vec![known(
                Consent {
                    scope: listed(&["1319999999"]),
                    ..consent("a", 1)
                },
                1,
            )],
            Decision::Deny(RecipientNotDisclosed),
        ),
        Case {
            recipient: Recipient::Hub,
            ..case(
                "facility list: the hub is still the network's storage",
                vec![known(
                    Consent {
                        scope: listed(&["1319999999"]),
                        ..consent("a", 1)
                    },
                    1,
                )],
                Decision::Permit,
            )
        },
        case(
            "excluded facility",
            vec![known(
                Consent {
                    excluded: [fac("1312345678")].into(),
                    ..consent("a", 1)
                },
                1,
            )],
            Decision::Deny(RecipientExcluded),
        ),
        case(
            "excluded category",
            vec![known(
                Consent {
                    categories: [Category::Images].into(),
                    ..consent("a", 1)
                },
                1,
            )],
            Decision::Deny(CategoryExcluded),
        ),
        case(
            "expired",
            vec![known(
                Consent {
                    valid_until: Some(T0),
                    ..consent("a", 1)
                },
                1,
            )],
            Decision::Deny(Expired),
        ),
        case(
            "not yet valid",
            vec![known(
                Consent {
                    valid_from: T0 + 1,
                    ..consent("a", 1)
                },
                1,
            )],
            Decision::Deny(NotYetValid),
        ),
        case(
            "withdrawn",
            vec![
                known(consent("a", 1), 1),
                known(
                    Consent {
                        status: Status::Withdrawn,
                        ..consent("a", 2)
                    },
                    1,
                ),
            ],
            Decision::Deny(Withdrawn),
        ),
        case(
            "withdrawal wins over a later concurrent change of the same consent",
            vec![
                known(consent("a", 1), 1),
                known(
                    Consent {
                        status: Status::Withdrawn,
                        ..consent("a", 2)
                    },
                    1,
                ),
                known(consent("a", 3), 1),
            ],
            Decision::Deny(Withdrawn),
        ),
        case(
            "withdrawn, then a new consent",
            vec![
                known(consent("a", 1), 1),
                known(
                    Consent {
                        status: Status::Withdrawn,
                        ..consent("a", 2)
                    },
                    1,
                ),
                known(consent("b", 1), 2),
            ],
            Decision::Permit,
        ),
        Case {
            freshness: Freshness {
                last_pull: Some(T0 - 25 * 3600),
                bound: 24 * HOUR,
            },
            ..case(
                "stale cache fails closed",
                vec![known(consent("a", 1), 1)],
                Decision::Deny(CacheStale),
            )
        },
        Case {
            freshness: Freshness {
                last_pull: None,
                bound: 24 * HOUR,
            },
            ..case(
                "never synced fails closed",
                vec![known(consent("a", 1), 1)],
                Decision::Deny(CacheStale),
            )
        },
        Case {
            now: T0 - 3600,
            at: T0 - 3600,
            ..case(
                "clock moved backwards",
                vec![known(consent("a", 1), 1)],
                Decision::Deny(ClockBehind),
            )
        },
        Case {
            now: T0 - 120,
            at: T0 - 120,
            freshness: Freshness {
                last_pull: Some(T0),
                bound: 24 * HOUR,
            },
            ..case(
                "clock a little behind the pull is tolerated",
                vec![known(consent("a", 1), 1)],
                Decision::Permit,
            )
        },
    ];
    for c in cases {
        let got = decide(
            &c.records,
            &c.recipient,
            c.category,
            c.at,
            c.now,
            c.freshness,
        );
        assert_eq!(got, c.expect, "case: {}", c.name);
    }
}

// ---------------------------------------------------------------------------------------
// Property: for random sequences of operations, a Permit always means the last effective
// consent covers that recipient and category at that time.

#[derive(Debug, Clone)]
enum Op {
    New {
        all: bool,
        facilities: Vec<u8>,
        excluded: Vec<u8>,
        categories: Vec<u8>,
        from: i64,
        until: Option<i64>,
    },
    Change {
        facilities: Vec<u8>,
        categories: Vec<u8>,
    },
    Withdraw,
}

const FACILITIES: [&str; 4] = ["1312345678", "1312345679", "0112345678", "2732345678"];

fn op() -> impl Strategy<Value = Op> {
    let small = || prop::collection::vec(0u8..4, 0..4);
    let cats = || prop::collection::vec(0u8..9, 0..5);
    prop_oneof![
        (
            any::<bool>(),
            small(),
            small(),
            cats(),
            -5i64..5,
            prop::option::of(-5i64..10)
        )
            .prop_map(
                |(all, facilities, excluded, categories, from, until)| Op::New {
                    all,
                    facilities,
                    excluded,
                    categories,
                    from,
                    until
                }
            ),
        (small(), cats()).prop_map(|(facilities, categories)| Op::Change {
            facilities,
            categories
        }),
        Just(Op::Withdraw),
    ]
}

/// The latest version of consent number `seq`, if any.
fn latest(records: &[Known], seq: i64) -> Option<Known> {
    records
        .iter()
        .filter(|k| k.created_seq == seq)
        .max_by_key(|k| k.consent.version)
        .cloned()
}

fn apply(ops: &[Op]) -> Vec<Known> {
    let mut records: Vec<Known> = Vec::new();
    let mut seq = 0;
    for (i, op) in ops.iter().enumerate() {
        let t = T0 - 100 * DAY + i64::try_from(i).unwrap_or(0);
        match op {
            Op::New {
                all,
                facilities,
                excluded,
                categories,
                from,
                until,
            } => {
                seq += 1;
                let c = Consent {
                    id: format!("c{seq}"),
                    version: 1,
                    scope: if *all {
                        Scope::AllParticipants
                    } else {
                        Scope::Facilities(
                            facilities
                                .iter()
                                .map(|f| fac(FACILITIES[usize::from(*f)]))
                                .collect(),
                        )
                    },
                    excluded: excluded
                        .iter()
                        .map(|f| fac(FACILITIES[usize::from(*f)]))
                        .collect(),
                    categories: categories
                        .iter()
                        .map(|c| Category::ALL[usize::from(*c)])
                        .collect(),
                    valid_from: T0 + from * DAY,
                    valid_until: until.map(|u| T0 + u * DAY),
                    recorded_at: t,
                    ..consent("x", 1)
                };
                records.push(known(c, seq));
            }
            Op::Change {
                facilities,
                categories,
            } => {
                if let Some(last) = latest(&records, seq) {
                    let mut c = last.consent;
                    c.version += 1;
                    c.scope = Scope::Facilities(
                        facilities
                            .iter()
                            .map(|f| fac(FACILITIES[usize::from(*f)]))
                            .collect(),
                    );
                    c.categories = categories
                        .iter()
                        .map(|c| Category::ALL[usize::from(*c)])
                        .collect();
                    c.status = Status::Active; // a concurrent change: must not undo a withdrawal
                    records.push(known(c, seq));
                }
            }
            Op::Withdraw => {
                if let Some(last) = latest(&records, seq) {
                    let mut c = last.consent;
                    c.version += 1;
                    c.status = Status::Withdrawn;
                    records.push(known(c, seq));
                }
            }
        }
    }
    records
}

/// The reference model: what a person reading the operations would conclude.
fn covers(ops: &[Op], recipient: &Recipient, category: Category, at: Timestamp) -> bool {
    // The last consent created, with all changes after it, unless any of them withdrew it.
    let Some(start) = ops.iter().rposition(|o| matches!(o, Op::New { .. })) else {
        return false;
    };
    let tail = &ops[start..];
    if tail.iter().any(|o| matches!(o, Op::Withdraw)) {
        return false;
    }
    let Op::New {
        all,
        facilities,
        excluded,
        categories,
        from,
        until,
    } = &tail[0]
    else {
        return false;
    };
    let (mut all, mut facilities, mut categories) = (*all, facilities.clone(), categories.clone());
    for o in &tail[1..] {
        if let Op::Change {
            facilities: f,
            categories: c,
        } = o
        {
            all = false;
            facilities = f.clone();
            categories = c.clone();
        }
    }
    if at < T0 + from * DAY || until.is_some_and(|u| at >= T0 + u * DAY) {
        return false;
    }
    if !categories
        .iter()
        .any(|c| Category::ALL[usize::from(*c)] == category)
    {
        return false;
    }
    match recipient {
        // The hub and this clinic's own viewers: any active participation consent.
        Recipient::Hub | Recipient::Clinic => true,
        Recipient::Facility(code) => {
            let is = |list: &Vec<u8>| {
                list.iter()
                    .any(|f| FACILITIES[usize::from(*f)] == code.as_str())
            };
            !is(excluded) && (all || is(&facilities))
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]
    #[test]
    fn permit_only_when_the_last_effective_consent_covers_it(
        ops in prop::collection::vec(op(), 0..12),
        recipient in prop_oneof![Just(None), Just(Some(None)), (0usize..4).prop_map(|i| Some(Some(i)))],
        category in 0usize..9,
        day in -6i64..12,
    ) {
        let records = apply(&ops);
        let recipient = match recipient {
            None => Recipient::Hub,
            Some(None) => Recipient::Clinic,
            Some(Some(i)) => Recipient::Facility(fac(FACILITIES[i])),
        };
        let category = Category::ALL[category];
        let at = T0 + day * DAY;
        let got = decide(&records, &recipient, category, at, at, Freshness { last_pull: Some(at), bound: 24 * HOUR });
        prop_assert_eq!(got == Decision::Permit, covers(&ops, &recipient, category, at), "records: {:?}", records);
    }
}
