//! What an operator does with the spool, audited: the functions behind `tsunagi dicom ...`
//! and, later, the clinic console's 保留中 page.

use consent::model::{Category, Recipient};
use consent::store::Store;

use crate::spool::{Admin, Requeued, SpoolError};

/// Why a requeue was not made (or not whole).
#[derive(Debug, thiserror::Error)]
pub enum RequeueError {
    #[error("say who requeues (recorded in the audit trail)")]
    NoOperator,
    #[error("cannot read the dead letters")]
    Read(#[source] SpoolError),
    /// Nothing was requeued: what cannot be audited is not done.
    #[error("the audit trail cannot record the requeue; nothing was requeued")]
    Audit(#[source] consent::store::StoreError),
    /// The audit trail says they were requeued, but the spool did not change.
    #[error("the requeue was audited, but the spool could not put the instances back")]
    Requeue(#[source] SpoolError),
}

/// Puts dead letters back in the queue (`ids`, or every one when `None`) for operator
/// `by`, audited first: one `requeued` row per instance in the consent service's trail
/// (under its patient's hash, with the category of its SOP class, recipient `hub`, reason
/// `by:NAME`), then the spool's change. Nothing leaves by this: the forwarder decides each
/// instance again. Returns those put back; ids that are not dead letters are left alone.
pub fn requeue(
    admin: &mut Admin,
    store: &mut Store,
    ids: Option<&[i64]>,
    by: &str,
    now: i64,
) -> Result<Vec<Requeued>, RequeueError> {
    let by = by.trim();
    if by.is_empty() {
        return Err(RequeueError::NoOperator);
    }
    let dead = admin.dead(ids).map_err(RequeueError::Read)?;
    // One audit transaction per patient and category.
    let mut groups: std::collections::BTreeMap<(Option<String>, Category), Vec<String>> =
        std::collections::BTreeMap::new();
    for r in &dead {
        // A class no category covers (a private one) is never sent; it is audited under
        // images, the category of what the bridge carries.
        let category = Category::for_dicom_sop_class(&r.sop_class).unwrap_or(Category::Images);
        groups
            .entry((r.patient_id.clone(), category))
            .or_default()
            .push(format!("dicom:{}", r.sop_instance));
    }
    for ((patient, category), objects) in &groups {
        store
            .record_handling(
                patient.as_deref(),
                &Recipient::Hub,
                *category,
                consent::model::Handling::Requeued,
                objects,
                by,
                now,
            )
            .map_err(RequeueError::Audit)?;
    }
    let ids: Vec<i64> = dead.iter().map(|r| r.id).collect();
    admin
        .requeue(Some(&ids), now)
        .map_err(RequeueError::Requeue)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::{Committed, Meta, Spool};

    fn queue(spool: &Spool, uid: &str, class: &str, patient: &str) -> i64 {
        let mut inc = spool.begin().unwrap();
        inc.write(b"DICM").unwrap();
        let meta = Meta {
            sop_class: class.into(),
            sop_instance: uid.into(),
            transfer_syntax: "1.2.840.10008.1.2.1".into(),
            calling_ae: "CT".into(),
            patient_id: Some(patient.into()),
            study_uid: None,
        };
        let Committed::Queued(id) = inc.commit(&meta, 100).unwrap() else {
            panic!()
        };
        id
    }

    #[test]
    fn a_requeue_is_audited_per_instance_with_its_category_then_made() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(&dir.path().join("spool"), 1 << 20).unwrap();
        let ct = queue(&spool, "1.2.3.1", "1.2.840.10008.5.1.4.1.1.2", "0001");
        let sr = queue(&spool, "1.2.3.2", "1.2.840.10008.5.1.4.1.1.88.33", "0001");
        let kept = queue(&spool, "1.2.3.3", "1.2.840.10008.5.1.4.1.1.2", "0002");
        for id in [ct, sr, kept] {
            spool
                .fail(id, "refused by the network PACS: 0122H")
                .unwrap();
        }
        let facility = tsunagi_config::FacilityCode::try_from("1312345678").unwrap();
        let mut store = Store::open_in(dir.path(), facility, true).unwrap();
        let mut admin = Admin::open(&dir.path().join("spool")).unwrap();
        assert!(matches!(
            requeue(&mut admin, &mut store, None, "  ", 200),
            Err(RequeueError::NoOperator)
        ));
        let put = requeue(
            &mut admin,
            &mut store,
            Some(&[ct, sr, 999]),
            "受付 山田",
            200,
        )
        .unwrap();
        assert_eq!(put.iter().map(|r| r.id).collect::<Vec<_>>(), [ct, sr]);
        let rows: Vec<(String, String, String, String)> = store
            .connection()
            .prepare("SELECT decision, category, reason, object FROM audit ORDER BY seq")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let want = |category: &str, object: &str| {
            (
                "requeued".to_owned(),
                category.to_owned(),
                "by:受付 山田".to_owned(),
                object.to_owned(),
            )
        };
        assert_eq!(
            rows,
            [
                want("images", "dicom:1.2.3.1"),
                want("documents", "dicom:1.2.3.2")
            ]
        );
        assert!(matches!(
            store.verify_audit().unwrap(),
            consent::store::AuditCheck::Intact { .. }
        ));
        assert_eq!(spool.counts().unwrap().dead, 1);
        assert_eq!(spool.ready(1000, 10).unwrap().len(), 2);
    }
}
