//! `tsunagi consent ...` and `tsunagi audit verify`: the clinic's consent workflow on the
//! command line (the Japanese web console will sit on the same library calls).
//!
//! The commands open the consent service's database directly (SQLite serialises writers);
//! run as root, they create the service's user and state directory and leave every file
//! owned by that user. Decisions made here go through the same function, and into the same
//! audit trail, as the services' decisions.

use std::collections::BTreeSet;
use std::path::PathBuf;

use clap::{Args, Subcommand};
use consent::decide::{Decision, effective};
use consent::model::{Category, Evidence, Patient, PatientId, Recipient, Scope, Sex, Status};
use consent::store::{AuditCheck, NewConsent, Store, sha256_file};
use consent::time;
use tsunagi_config::{Config, FacilityCode};
use tsunagi_runtime::exit_code;
use tsunagi_runtime::privilege;

#[derive(Debug, Subcommand)]
pub(crate) enum ConsentCommand {
    /// Register a patient and their participation consent (参加同意, 公開設定).
    Register(Box<Register>),
    /// Link another facility's patient ID to a patient (名寄せ; e.g. from a referral letter).
    Link {
        patient: PatientId,
        /// The other facility's 医療機関コード.
        #[arg(long)]
        facility: FacilityCode,
        /// The patient's ID at that facility.
        #[arg(long)]
        id: String,
    },
    /// Record the patient's network ID (名寄せ: the ID the network's patient index gave
    /// them; the sync also learns it from the network). The DICOM bridge sends images under it.
    NetworkId {
        patient: PatientId,
        /// The network ID: 1–64 printable ASCII characters, no backslash.
        id: String,
    },
    /// Disclose the patient's data to a facility (公開設定).
    Disclose {
        patient: PatientId,
        facility: FacilityCode,
    },
    /// Stop disclosing the patient's data to a facility.
    Undisclose {
        patient: PatientId,
        facility: FacilityCode,
    },
    /// Withdraw the patient's consent (takes effect at once, even offline).
    Withdraw {
        patient: PatientId,
        /// Who recorded the withdrawal.
        #[arg(long)]
        recorded_by: String,
    },
    /// Show a patient's identity, links and consents.
    Show { patient: PatientId },
    /// List the changes waiting to be pushed to the network.
    Pending,
    /// List the network's facility directory as the box last read it (for the console's
    /// recipients by name), and every entry it does not offer, with why.
    Facilities,
    /// Decide as the services would: may PATIENT's CATEGORY data go to RECIPIENT?
    Decide {
        patient: PatientId,
        /// `hub` or a facility's 医療機関コード.
        recipient: Recipient,
        /// One of: demographics, problems, allergies, prescriptions, injections, lab-results,
        /// orders, images, documents.
        category: Category,
        /// When (default now): YYYY-MM-DD or YYYY-MM-DDTHH:MM:SS+09:00.
        #[arg(long, value_parser = parse_time)]
        at: Option<time::Timestamp>,
    },
}

#[derive(Debug, Args)]
pub(crate) struct Register {
    patient: PatientId,
    /// Family name in kanji.
    #[arg(long)]
    family: String,
    /// Given name in kanji.
    #[arg(long)]
    given: String,
    /// Family name in katakana.
    #[arg(long)]
    family_kana: String,
    /// Given name in katakana.
    #[arg(long)]
    given_kana: String,
    /// YYYY-MM-DD.
    #[arg(long, value_parser = parse_date)]
    birth_date: String,
    /// male, female, other or unknown.
    #[arg(long)]
    sex: Sex,
    /// `all` (every network participant) or a comma-separated list of 医療機関コード, as
    /// ticked on the paper form. Required: there is no silent "all".
    #[arg(long)]
    scope: String,
    /// Facilities never disclosed to (comma-separated 医療機関コード).
    #[arg(long, value_delimiter = ',')]
    exclude: Vec<FacilityCode>,
    /// `all` or a comma-separated list of data categories, as ticked on the paper form.
    /// Required: there is no silent "all".
    #[arg(long)]
    categories: String,
    /// Valid from (default now).
    #[arg(long, value_parser = parse_time)]
    from: Option<time::Timestamp>,
    /// Valid until (exclusive; default open-ended).
    #[arg(long, value_parser = parse_time)]
    until: Option<time::Timestamp>,
    /// The scanned consent form (its SHA-256 is recorded, not the file).
    #[arg(long)]
    evidence: PathBuf,
    /// Who recorded the consent.
    #[arg(long)]
    recorded_by: String,
}

fn parse_time(text: &str) -> Result<time::Timestamp, String> {
    time::parse(text).map_err(|e| e.to_string())
}

fn parse_date(text: &str) -> Result<String, String> {
    if text.contains('T') {
        return Err(format!("{text:?}: a birth date is YYYY-MM-DD"));
    }
    time::parse(text)
        .map(|_| text.to_owned())
        .map_err(|e| e.to_string())
}

fn parse_scope(text: &str) -> Result<Scope, String> {
    if text == "all" {
        return Ok(Scope::AllParticipants);
    }
    let list = text
        .split(',')
        .map(|c| FacilityCode::try_from(c.trim()).map_err(|e| format!("--scope {c:?}: {e}")))
        .collect::<Result<BTreeSet<_>, _>>()?;
    Ok(Scope::Facilities(list))
}

fn parse_categories(text: &str) -> Result<BTreeSet<Category>, String> {
    if text == "all" {
        return Ok(Category::ALL.into_iter().collect());
    }
    text.split(',')
        .map(|c| c.trim().parse::<Category>().map_err(|e| e.to_string()))
        .collect()
}

/// Opens the consent database, creating the service's user, directory and audit key if
/// needed.
pub(crate) fn open(cfg: &Config) -> Result<(Store, Ownership), String> {
    open_with(cfg, true)
}

/// Opens the consent database; `create_key`: make the audit key when there is none (never
/// for `audit verify`). The audit key is the trail's own secret, `STATE-DIR/consent/audit.key`,
/// never `privacy.id-hash-key-file`: whoever may hash IDs for logs must not be able to forge
/// the trail.
fn open_with(cfg: &Config, create_key: bool) -> Result<(Store, Ownership), String> {
    let dir = cfg.paths.state_dir.as_path().join(consent::NAME);
    let identity = if privilege::is_root() {
        Some(privilege::ensure_user(consent::USER).map_err(|e| crate::error_chain(&e))?)
    } else {
        None
    };
    privilege::ensure_private_dir(&dir, identity).map_err(|e| crate::error_chain(&e))?;
    let store = Store::open_in(&dir, cfg.site.facility_code.clone(), create_key)
        .map_err(|e| crate::error_chain(&e))?;
    let key_path = dir.join(Store::AUDIT_KEY_FILE);
    Ok((
        store,
        Ownership {
            dir,
            key: key_path,
            identity,
        },
    ))
}

/// Gives files created by a root-run command back to the service's user.
pub(crate) struct Ownership {
    dir: PathBuf,
    key: PathBuf,
    identity: Option<privilege::Identity>,
}

impl Drop for Ownership {
    fn drop(&mut self) {
        let Some(id) = self.identity else { return };
        let mut files = vec![self.key.clone()];
        for name in ["consent.db", "consent.db-wal", "consent.db-shm"] {
            files.push(self.dir.join(name));
        }
        for file in files
            .iter()
            .filter(|f| f.starts_with(&self.dir) && f.exists())
        {
            let _ = nix::unistd::chown(file.as_path(), Some(id.uid), Some(id.gid));
        }
    }
}

fn print_json(value: &serde_json::Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_default()
    );
}

fn scope_text(scope: &Scope) -> String {
    match scope {
        Scope::AllParticipants => "all network participants".to_owned(),
        Scope::Facilities(list) => list
            .iter()
            .map(|c| c.to_string())
            .collect::<Vec<_>>()
            .join(", "),
    }
}

pub(crate) fn consent(cfg: &Config, command: ConsentCommand, json: bool) -> u8 {
    match run(cfg, command, json) {
        Ok(()) => exit_code::OK,
        Err(message) => {
            eprintln!("tsunagi: {message}");
            exit_code::FAILURE
        }
    }
}

fn run(cfg: &Config, command: ConsentCommand, json: bool) -> Result<(), String> {
    let (mut store, _ownership) = open(cfg)?;
    let now = time::now();
    let chain = |e: consent::store::StoreError| crate::error_chain(&e);
    match command {
        ConsentCommand::Register(r) => {
            let scope = parse_scope(&r.scope)?;
            let categories = parse_categories(&r.categories)?;
            let sha256 = sha256_file(&r.evidence).map_err(|e| {
                format!("cannot read the consent form {}: {e}", r.evidence.display())
            })?;
            if let (Some(from), Some(until)) = (r.from, r.until)
                && until <= from
            {
                return Err("--until must be later than --from".into());
            }
            let patient = Patient {
                id: r.patient.clone(),
                family_kanji: r.family,
                given_kanji: r.given,
                family_kana: r.family_kana,
                given_kana: r.given_kana,
                birth_date: r.birth_date,
                sex: r.sex,
                network_id: None,
            };
            store.upsert_patient(&patient, now).map_err(chain)?;
            let consent = store
                .record_consent(
                    NewConsent {
                        patient: r.patient,
                        scope,
                        excluded: r.exclude.into_iter().collect(),
                        categories,
                        valid_from: r.from.unwrap_or(now),
                        valid_until: r.until,
                        evidence: Some(Evidence {
                            sha256,
                            recorded_by: r.recorded_by,
                            recorded_at: now,
                        }),
                    },
                    now,
                )
                .map_err(chain)?;
            if json {
                print_json(&serde_json::json!({ "consent": consent }));
            } else {
                println!(
                    "registered consent {} (version 1) for patient {}",
                    consent.id, consent.patient
                );
            }
        }
        ConsentCommand::Link {
            patient,
            facility,
            id,
        } => {
            let link = store
                .add_link(&patient, &facility, &id, now)
                .map_err(chain)?;
            if json {
                print_json(&serde_json::json!({ "patient": patient, "link": link }));
            } else {
                println!("linked patient {patient} to {}|{}", link.system, link.value);
            }
        }
        ConsentCommand::NetworkId { patient, id } => {
            if !consent::fhir::is_network_id(&id) {
                return Err(
                    "a network ID is 1 to 64 printable ASCII characters, without a backslash or surrounding spaces"
                        .to_owned(),
                );
            }
            let changed = store.set_network_id(&patient, &id, now).map_err(chain)?;
            if json {
                print_json(
                    &serde_json::json!({ "patient": patient, "network_id": id, "changed": changed }),
                );
            } else if changed {
                println!("patient {patient} has network ID {id}");
            } else {
                println!("patient {patient} already had network ID {id}");
            }
        }
        ConsentCommand::Disclose { patient, facility } => {
            let c = store
                .change_consent(&patient, now, |c| {
                    c.excluded.remove(&facility);
                    if let Scope::Facilities(list) = &mut c.scope {
                        list.insert(facility.clone());
                    }
                })
                .map_err(chain)?;
            report_change(&c, json);
        }
        ConsentCommand::Undisclose { patient, facility } => {
            let c = store
                .change_consent(&patient, now, |c| match &mut c.scope {
                    Scope::AllParticipants => {
                        c.excluded.insert(facility.clone());
                    }
                    Scope::Facilities(list) => {
                        list.remove(&facility);
                    }
                })
                .map_err(chain)?;
            report_change(&c, json);
        }
        ConsentCommand::Withdraw {
            patient,
            recorded_by,
        } => {
            let c = store.withdraw(&patient, &recorded_by, now).map_err(chain)?;
            if json {
                print_json(&serde_json::json!({ "consent": c }));
            } else {
                println!(
                    "withdrew consent {} (version {}) for patient {patient}; effective now",
                    c.id, c.version
                );
            }
        }
        ConsentCommand::Show { patient } => {
            let Some(p) = store.patient(&patient).map_err(chain)? else {
                return Err(format!("unknown patient {patient} (register them first)"));
            };
            let links = store.links(&patient).map_err(chain)?;
            let records = store.records(&patient).map_err(chain)?;
            let current = effective(&records);
            if json {
                print_json(&serde_json::json!({
                    "patient": p,
                    "links": links,
                    "effective": current.map(|(c, withdrawn)| serde_json::json!({ "consent": c, "withdrawn": withdrawn })),
                    "versions": records.iter().map(|k| &k.consent).collect::<Vec<_>>(),
                }));
            } else {
                println!(
                    "patient {}: {} {} ({} {}), born {}, {:?}",
                    p.id,
                    p.family_kanji,
                    p.given_kanji,
                    p.family_kana,
                    p.given_kana,
                    p.birth_date,
                    p.sex
                );
                for link in &links {
                    println!(
                        "  linked: {}|{} (since {})",
                        link.system,
                        link.value,
                        time::format(link.recorded_at)
                    );
                }
                match current {
                    None => println!("  consent: none"),
                    Some((c, withdrawn)) => {
                        let status = if withdrawn || c.status == Status::Withdrawn {
                            "withdrawn"
                        } else {
                            "active"
                        };
                        println!("  consent {} version {}: {status}", c.id, c.version);
                        println!("    disclosed to: {}", scope_text(&c.scope));
                        if !c.excluded.is_empty() {
                            println!(
                                "    excluded: {}",
                                c.excluded
                                    .iter()
                                    .map(|f| f.to_string())
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            );
                        }
                        println!(
                            "    categories: {}",
                            c.categories
                                .iter()
                                .map(|k| k.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        );
                        println!(
                            "    valid: {} – {}",
                            time::format(c.valid_from),
                            c.valid_until.map_or("open".to_owned(), time::format)
                        );
                    }
                }
            }
        }
        ConsentCommand::Pending => {
            let pending = store.pending().map_err(chain)?;
            if json {
                print_json(&serde_json::json!({ "pending": pending }));
            } else if pending.is_empty() {
                println!("nothing waiting to be pushed");
            } else {
                for p in pending {
                    println!(
                        "{:>5}  {:<8} {:<28} since {}  attempts {}{}",
                        p.seq,
                        p.kind,
                        p.reference,
                        p.created_at,
                        p.attempts,
                        p.last_error
                            .map(|e| format!("  last error: {e}"))
                            .unwrap_or_default()
                    );
                }
            }
        }
        ConsentCommand::Facilities => {
            let directory = store.directory().map_err(chain)?;
            let not_offered = store.directory_not_offered().map_err(chain)?;
            if json {
                print_json(&serde_json::json!({
                    "refreshed_at": directory.refreshed_at,
                    "facilities": directory.facilities,
                    "not_offered": not_offered,
                }));
            } else {
                match directory.refreshed_at {
                    None => println!(
                        "the network's facility directory has not been read yet (the consent service reads it at its first sync, then hourly)"
                    ),
                    Some(at) => println!(
                        "the network's facility directory, read {}: {} offered, {} not offered",
                        time::format(at),
                        directory.facilities.len(),
                        not_offered.len()
                    ),
                }
                for f in &directory.facilities {
                    println!(
                        "  {}  {}{}",
                        f.code,
                        f.name,
                        if f.active { "" } else { "  (inactive)" }
                    );
                }
                if !not_offered.is_empty() {
                    println!("not offered:");
                    for n in &not_offered {
                        println!(
                            "  {}  {}  {}",
                            n.resource,
                            n.code.as_deref().unwrap_or("-"),
                            n.why
                        );
                    }
                }
            }
        }
        ConsentCommand::Decide {
            patient,
            recipient,
            category,
            at,
        } => {
            if store.patient(&patient).map_err(chain)?.is_none() {
                return Err(format!("unknown patient {patient} (register them first)"));
            }
            let at = at.unwrap_or(now);
            let bound = cfg.consent.freshness_bound.get();
            let (decision, audit) = store
                .decide_audited(&patient, &recipient, category, at, now, bound)
                .map_err(chain)?;
            let (verdict, reason, explain) = match decision {
                Decision::Permit => ("permit", None, None),
                Decision::Deny(r) => ("deny", Some(r.as_str()), Some(r.explain())),
            };
            if json {
                print_json(&serde_json::json!({
                    "decision": verdict, "reason": reason, "explain": explain,
                    "patient": patient, "recipient": recipient.to_string(),
                    "category": category.as_str(), "at": time::format(at),
                    "audit": audit,
                }));
            } else {
                match (reason, explain) {
                    (Some(reason), Some(explain)) => println!("deny: {reason} ({explain})"),
                    _ => println!("permit"),
                }
            }
        }
    }
    Ok(())
}

fn report_change(c: &consent::model::Consent, json: bool) {
    if json {
        print_json(&serde_json::json!({ "consent": c }));
    } else {
        println!(
            "consent {} is now version {}: disclosed to {}{}",
            c.id,
            c.version,
            scope_text(&c.scope),
            if c.excluded.is_empty() {
                String::new()
            } else {
                format!(
                    ", except {}",
                    c.excluded
                        .iter()
                        .map(|f| f.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }
        );
    }
}

/// `tsunagi audit verify`.
pub(crate) fn audit_verify(cfg: &Config, json: bool) -> u8 {
    let (store, _ownership) = match open_with(cfg, false) {
        Ok(s) => s,
        Err(message) => {
            eprintln!("tsunagi: {message}");
            return exit_code::FAILURE;
        }
    };
    match store.verify_audit() {
        Ok(AuditCheck::Intact { rows }) => {
            if json {
                print_json(&serde_json::json!({ "intact": true, "rows": rows }));
            } else {
                println!("audit trail intact: {rows} rows");
            }
            exit_code::OK
        }
        Ok(AuditCheck::Broken { row, problem }) => {
            // A Security Alert for the ATNA audit trail (the consent service hands it over).
            if let Err(e) = store.record_failed_verify(row, &problem) {
                eprintln!(
                    "tsunagi: cannot record the failed verification for the audit trail: {}",
                    crate::error_chain(&e)
                );
            }
            if json {
                print_json(&serde_json::json!({ "intact": false, "row": row, "problem": problem }));
            } else {
                println!("audit trail BROKEN at row {row}: {problem}");
            }
            exit_code::FAILURE
        }
        Err(e) => {
            eprintln!("tsunagi: {}", crate::error_chain(&e));
            exit_code::FAILURE
        }
    }
}
