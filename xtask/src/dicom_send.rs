//! The DICOM benchmark's C-STORE sender, faster than the receivers it measures. dcmtk's
//! `storescu` reads each file into a data set in memory and encodes it again for the wire;
//! on this machine that made it the limit (`storescp --ignore` took its large files only
//! 1.2-1.7× as fast as `storescp` stored them, and its 4 associations of small files only
//! 1.7× as fast), so a receiver's figure was partly the sender's
//! (`docs/dicom-ingest-profile.md`). This one sends each file's data set as it is on disk,
//! in P-DATA fragments of the receiver's maximum PDU: the bytes `storescu` sends for a file
//! in the transfer syntax the receiver accepted, with far less work per byte.
//!
//! One association per folder, like `storescu +sd`: one presentation context per SOP class
//! and transfer syntax of its files (the files' own, nothing converted). Every C-STORE must
//! be answered with success, or the run fails. The caller runs it on a thread in the
//! benchmark's network namespace (`hil_tests::orthanc::Netns::run`), so the process stays
//! where it is.

use std::fs::File;
use std::io::{BufReader, Read as _, Seek as _, SeekFrom};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use dicom_object::meta::FileMetaTable;
use dicom_ul::pdu::{PDataValue, PDataValueType, PresentationContextResultReason};
use dicom_ul::{ClientAssociationOptions, Pdu};
use dimse::command::{Command, CommandField};

/// What the sender needs of one file.
struct Instance {
    path: PathBuf,
    sop_class: String,
    sop_instance: String,
    transfer_syntax: String,
    /// Where the data set starts (after the preamble and the file meta group).
    offset: u64,
    len: u64,
}

/// Sends every file of `dir` (sorted by name) to `addr` over one association, from this
/// thread (in the namespace it is in), calling AE `calling`, called AE `called`,
/// advertising `max_pdu`. Fails unless every instance was stored with success.
pub(crate) fn send_folder(
    addr: SocketAddr,
    calling: &str,
    called: &str,
    max_pdu: u32,
    dir: &Path,
    timeout: Duration,
) -> anyhow::Result<()> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("list {}", dir.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .with_context(|| format!("list {}", dir.display()))?;
    files.sort();
    let instances = files
        .iter()
        .map(|p| read_instance(p))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("a runtime for the sender")?;
    rt.block_on(async {
        tokio::time::timeout(timeout, send(addr, calling, called, max_pdu, &instances))
            .await
            .unwrap_or_else(|_| bail!("sending {} took over {timeout:?}", dir.display()))
    })
}

/// The file meta group of `path`: what the C-STORE names, and where the data set lies.
fn read_instance(path: &Path) -> anyhow::Result<Instance> {
    let mut file = File::open(path).with_context(|| format!("open {}", path.display()))?;
    let len = file.metadata()?.len();
    file.seek(SeekFrom::Start(128))?;
    let meta = FileMetaTable::from_reader(BufReader::new(&mut file))
        .with_context(|| format!("{}: no DICOM file meta group", path.display()))?;
    // "DICM", then (0002,0000) UL (12 bytes), then the group's length.
    let offset = 128 + 4 + 12 + u64::from(meta.information_group_length);
    ensure!(
        offset <= len,
        "{}: shorter than its meta group",
        path.display()
    );
    Ok(Instance {
        path: path.to_owned(),
        sop_class: meta.media_storage_sop_class_uid().to_owned(),
        sop_instance: meta.media_storage_sop_instance_uid().to_owned(),
        transfer_syntax: meta.transfer_syntax().to_owned(),
        offset,
        len: len - offset,
    })
}

async fn send(
    addr: SocketAddr,
    calling: &str,
    called: &str,
    max_pdu: u32,
    instances: &[Instance],
) -> anyhow::Result<()> {
    let mut pairs: Vec<(&str, &str)> = instances
        .iter()
        .map(|i| (i.sop_class.as_str(), i.transfer_syntax.as_str()))
        .collect();
    pairs.sort_unstable();
    pairs.dedup();
    let mut options = ClientAssociationOptions::new()
        .calling_ae_title(calling)
        .called_ae_title(called)
        .max_pdu_length(max_pdu);
    for (class, ts) in &pairs {
        options = options.with_presentation_context(*class, vec![*ts]);
    }
    let mut assoc = options
        .establish_async(addr)
        .await
        .with_context(|| format!("associate with {called} at {addr}"))?;
    assoc.inner_stream().set_nodelay(true)?;
    let fragment = match assoc.acceptor_max_pdu_length() {
        0 => 64 * 1024,
        n => n.min(1 << 20),
    } as usize
        - 6;
    let mut buf = vec![0u8; fragment];
    for (n, i) in instances.iter().enumerate() {
        let pc = assoc
            .presentation_contexts()
            .iter()
            .find(|pc| {
                pc.reason == PresentationContextResultReason::Acceptance
                    && pc.abstract_syntax == i.sop_class
                    && pc.transfer_syntax == i.transfer_syntax
            })
            .map(|pc| pc.id)
            .with_context(|| {
                format!(
                    "{called} accepted no context for {} in {}",
                    i.sop_class, i.transfer_syntax
                )
            })?;
        let message_id = u16::try_from(n % 0xFFFF + 1).unwrap_or(1);
        let rq = Command::store(message_id, &i.sop_class, &i.sop_instance);
        assoc
            .send(&pdata(pc, PDataValueType::Command, true, rq.encode()))
            .await?;
        let mut file = File::open(&i.path)?;
        file.seek(SeekFrom::Start(i.offset))?;
        let mut left = i.len;
        loop {
            let want = usize::try_from(left.min(fragment as u64)).unwrap_or(fragment);
            file.read_exact(&mut buf[..want])
                .with_context(|| format!("read {}", i.path.display()))?;
            left -= want as u64;
            assoc
                .send(&pdata(
                    pc,
                    PDataValueType::Data,
                    left == 0,
                    buf[..want].to_vec(),
                ))
                .await?;
            if left == 0 {
                break;
            }
        }
        let rsp = response(&mut assoc).await?;
        ensure!(
            rsp.field == CommandField::CStoreRsp && rsp.status.is_some_and(|s| s.is_success()),
            "{called} did not store {}: {:?}",
            i.path.display(),
            rsp.status
        );
    }
    assoc.release().await?;
    Ok(())
}

/// The next response command (no data set follows a C-STORE-RSP).
async fn response(
    assoc: &mut dicom_ul::association::AsyncClientAssociation<tokio::net::TcpStream>,
) -> anyhow::Result<Command> {
    let mut bytes = Vec::new();
    loop {
        match assoc.receive().await? {
            Pdu::PData { data } => {
                for pdv in data {
                    ensure!(
                        pdv.value_type == PDataValueType::Command,
                        "a data set where a C-STORE-RSP was due"
                    );
                    bytes.extend_from_slice(&pdv.data);
                    if pdv.is_last {
                        return Command::decode(&bytes).context("an undecodable response");
                    }
                }
            }
            other => bail!("{other:?} where a C-STORE-RSP was due"),
        }
    }
}

fn pdata(pc: u8, kind: PDataValueType, is_last: bool, data: Vec<u8>) -> Pdu {
    Pdu::PData {
        data: vec![PDataValue {
            presentation_context_id: pc,
            value_type: kind,
            is_last,
            data,
        }],
    }
}
