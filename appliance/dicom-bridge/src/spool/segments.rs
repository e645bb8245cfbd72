//! Spool segments: small instances appended to preallocated, already written files, so that
//! the flush before a success status writes data blocks only (no new inode, no directory
//! entry, no extent conversion) and concurrent associations share it (group commit of the
//! data). See `docs/dicom-ingest-profile.md` for the measurements behind it.
//!
//! **Layout.** `segments/SLOT.seg`, [`SEGMENT_SIZE`] bytes written with zeros when it is
//! made. The first [`HEADER`] bytes: [`SEGMENT_MAGIC`], the segment's generation (u64 LE)
//! and the first 16 bytes of the BLAKE3 of those 16 bytes. Records follow, back to back:
//! [`RECORD_MAGIC`], the generation, the queue id (i64), the data set's length (u64), the
//! metadata's length (u32), 4 reserved bytes, a 16-byte check (BLAKE3 of the 40 bytes
//! before it and the metadata), the metadata (the trailer body of `super::trailer_body`:
//! what the queue row holds, with the data set's BLAKE3), then the data set.
//!
//! **Why a scan may stop at the first record that does not check.** Records are written to
//! the page cache in offset order, under one lock, and a success is answered only after a
//! flush of the segment that came after its record was written. So every record before an
//! acknowledged one was written before that flush and is durable too: a record that does
//! not check (torn, or left from the slot's earlier generation) has no acknowledged record
//! after it.
//!
//! **Reuse.** A segment whose records have all left (delivered, replaced, moved out) is
//! given a new generation (its header rewritten and flushed: the old records no longer
//! check) and appended to again; at most [`FREE_MAX`] wait unused, the others are removed.
//! Records of a generation that left the queue are listed in the queue's `gone` table until
//! the generation ends, so that a scan never takes them for rows lost with power.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::{SpoolError, io_or_full, lock};

/// A segment's size.
pub(super) const SEGMENT_SIZE: u64 = 16 << 20;
/// Where records start (the segment header's block).
pub(super) const HEADER: u64 = 4096;
/// Unused segments kept ready beyond the current one.
const FREE_MAX: usize = 2;
const SEGMENT_MAGIC: &[u8; 8] = b"TSUSEG01";
const RECORD_MAGIC: &[u8; 8] = b"TSUREC01";
/// A record's fixed part.
const RECORD_HEAD_LEN: usize = 56;
pub(super) const RECORD_HEAD: u64 = RECORD_HEAD_LEN as u64;
/// A record's metadata, at most (UIDs, an AE title, a patient ID, a digest).
const META_MAX: u32 = 4096;

/// Where a record's data set is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Location {
    pub slot: i64,
    pub generation: i64,
    /// The data set's first byte in the segment.
    pub offset: u64,
}

/// A record found by [`scan`].
pub(super) struct Found {
    pub id: i64,
    pub location: Location,
    /// The record's metadata (see `super::parse_trailer_body`).
    pub meta: Vec<u8>,
    pub size: u64,
}

struct Current {
    slot: i64,
    generation: i64,
    file: Arc<File>,
    end: u64,
}

struct Ready {
    slot: i64,
    generation: i64,
    file: File,
}

struct State {
    current: Option<Current>,
    free: Vec<Ready>,
    /// Live records by slot, with the slot's generation.
    live: HashMap<i64, (i64, u64)>,
    next_slot: i64,
    next_generation: i64,
    /// Records written so far (the group flush's ticket).
    written: u64,
    /// A spare segment is being made beside the receivers.
    preparing: bool,
}

/// The segments of a spool (shared by every association).
pub(super) struct Segments {
    dir: PathBuf,
    /// Instances up to this size go into segments (0: none do).
    pub record_max: usize,
    state: Mutex<State>,
    /// Records known durable (their ticket); held while flushing, so that the receivers
    /// waiting for it share the next flush.
    synced: Mutex<u64>,
}

/// A segment header for `generation`.
fn header(generation: i64) -> [u8; 32] {
    let mut h = [0u8; 32];
    h[..8].copy_from_slice(SEGMENT_MAGIC);
    h[8..16].copy_from_slice(&generation.to_le_bytes());
    let check = blake3::hash(&h[..16]);
    h[16..].copy_from_slice(&check.as_bytes()[..16]);
    h
}

/// A segment's generation, if its header checks.
fn read_header(file: &File) -> Option<i64> {
    let mut h = [0u8; 32];
    file.read_exact_at(&mut h, 0).ok()?;
    let generation = i64::from_le_bytes(h[8..16].try_into().ok()?);
    (h == header(generation)).then_some(generation)
}

fn record_head(generation: i64, id: i64, size: u64, meta: &[u8]) -> [u8; RECORD_HEAD_LEN] {
    let mut h = [0u8; RECORD_HEAD_LEN];
    h[..8].copy_from_slice(RECORD_MAGIC);
    h[8..16].copy_from_slice(&generation.to_le_bytes());
    h[16..24].copy_from_slice(&id.to_le_bytes());
    h[24..32].copy_from_slice(&size.to_le_bytes());
    h[32..36].copy_from_slice(&u32::try_from(meta.len()).unwrap_or(u32::MAX).to_le_bytes());
    let mut check = blake3::Hasher::new();
    check.update(&h[..40]);
    check.update(meta);
    h[40..].copy_from_slice(&check.finalize().as_bytes()[..16]);
    h
}

fn slot_path(dir: &Path, slot: i64) -> PathBuf {
    dir.join(format!("{slot}.seg"))
}

/// Makes segment `slot` for `generation`: written with zeros to its size (written extents:
/// a later flush changes no metadata), its header, and made durable with its entry.
fn make(dir: &Path, slot: i64, generation: i64) -> io::Result<File> {
    let path = slot_path(dir, slot);
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)?;
    let zeros = vec![0u8; 1 << 20];
    let mut at = 0;
    while at < SEGMENT_SIZE {
        file.write_all_at(&zeros, at)?;
        at += zeros.len() as u64;
    }
    file.write_all_at(&header(generation), 0)?;
    file.sync_all()?;
    File::open(dir)?.sync_all()?;
    Ok(file)
}

/// Gives a segment whose records have all left a new generation (flushed: its records no
/// longer check).
fn renew(file: &File, generation: i64) -> io::Result<()> {
    file.write_all_at(&header(generation), 0)?;
    file.sync_data()
}

/// Reads segment `path`'s records, in order, up to the first that does not check. `data`:
/// whether a record's data set must match its digest (only records without a row need it).
/// `None` when the header does not check (a segment being made or renewed: nothing of it
/// is live).
pub(super) fn scan(
    file: &File,
    slot: i64,
    mut check_data: impl FnMut(i64, Location) -> bool,
    digest_of: impl Fn(&[u8]) -> Option<String>,
) -> Option<(i64, Vec<Found>)> {
    let generation = read_header(file)?;
    let mut found = Vec::new();
    let mut at = HEADER;
    let mut head = [0u8; RECORD_HEAD_LEN];
    while at + RECORD_HEAD <= SEGMENT_SIZE {
        if file.read_exact_at(&mut head, at).is_err() || &head[..8] != RECORD_MAGIC {
            break;
        }
        let word = |r: std::ops::Range<usize>| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&head[r]);
            b
        };
        let record_generation = i64::from_le_bytes(word(8..16));
        let id = i64::from_le_bytes(word(16..24));
        let size = u64::from_le_bytes(word(24..32));
        let meta_len = u32::from_le_bytes([head[32], head[33], head[34], head[35]]);
        if record_generation != generation
            || meta_len > META_MAX
            || size > SEGMENT_SIZE
            || at + RECORD_HEAD + u64::from(meta_len) + size > SEGMENT_SIZE
        {
            break;
        }
        let mut meta = vec![0u8; meta_len as usize];
        if file.read_exact_at(&mut meta, at + RECORD_HEAD).is_err()
            || record_head(generation, id, size, &meta) != head
        {
            break;
        }
        let location = Location {
            slot,
            generation,
            offset: at + RECORD_HEAD + u64::from(meta_len),
        };
        if check_data(id, location) {
            let Ok(len) = usize::try_from(size) else {
                break;
            };
            let mut data = vec![0u8; len];
            if file.read_exact_at(&mut data, location.offset).is_err() {
                break;
            }
            if digest_of(&meta).is_none_or(|d| d != blake3::hash(&data).to_hex().as_str()) {
                break;
            }
        }
        found.push(Found {
            id,
            location,
            meta,
            size,
        });
        at = location.offset + size;
    }
    Some((generation, found))
}

/// A segment found when the spool opens.
pub(super) struct Existing {
    pub slot: i64,
    pub generation: Option<i64>,
    pub file: File,
}

/// The segments in `dir` (made if missing), by slot.
pub(super) fn existing(dir: &Path) -> io::Result<Vec<Existing>> {
    fs::create_dir_all(dir)?;
    let mut out = Vec::new();
    for e in fs::read_dir(dir)? {
        let path = e?.path();
        let slot = path
            .extension()
            .filter(|x| *x == "seg")
            .and(path.file_stem())
            .and_then(|s| s.to_str())
            .and_then(|s| s.parse::<i64>().ok());
        let Some(slot) = slot else {
            // Not ours (a stray file): left alone.
            continue;
        };
        let file = fs::OpenOptions::new().read(true).write(true).open(&path)?;
        let generation = read_header(&file);
        out.push(Existing {
            slot,
            generation,
            file,
        });
    }
    out.sort_by_key(|e| e.slot);
    Ok(out)
}

impl Segments {
    /// The segments after the spool's recovery: `live` holds the live records by slot
    /// (with their generation); every other existing segment is renewed for reuse (up to
    /// [`FREE_MAX`]) or removed. Returns the generations that ended (their `gone` rows
    /// may go).
    pub(super) fn open(
        dir: &Path,
        record_max: usize,
        found: Vec<Existing>,
        live: HashMap<i64, (i64, u64)>,
    ) -> io::Result<Segments> {
        let next_slot = found.iter().map(|e| e.slot + 1).max().unwrap_or(0);
        let mut next_generation = found
            .iter()
            .filter_map(|e| e.generation)
            .chain(live.values().map(|(g, _)| *g))
            .max()
            .unwrap_or(0)
            + 1;
        let mut free = Vec::new();
        for e in found {
            if live.contains_key(&e.slot) {
                continue;
            }
            if free.len() < FREE_MAX && e.generation.is_some() {
                renew(&e.file, next_generation)?;
                free.push(Ready {
                    slot: e.slot,
                    generation: next_generation,
                    file: e.file,
                });
                next_generation += 1;
            } else {
                drop(e.file);
                fs::remove_file(slot_path(dir, e.slot))?;
            }
        }
        Ok(Segments {
            dir: dir.to_owned(),
            record_max,
            state: Mutex::new(State {
                current: None,
                free,
                live,
                next_slot,
                next_generation,
                written: 0,
                preparing: false,
            }),
            synced: Mutex::new(0),
        })
    }

    /// Makes the segment the first instance goes into, and a spare, ready now (when the
    /// service starts, not while an association waits for its first instance's flush:
    /// making a segment writes [`SEGMENT_SIZE`] bytes).
    pub(super) fn prepare(self: &Arc<Self>) -> Result<(), SpoolError> {
        if self.record_max == 0 {
            return Ok(());
        }
        let mut st = lock(&self.state);
        while st.free.len() < FREE_MAX {
            let (slot, generation) = (st.next_slot, st.next_generation);
            st.next_slot += 1;
            st.next_generation += 1;
            let file = make(&self.dir, slot, generation).map_err(io_or_full)?;
            st.free.push(Ready {
                slot,
                generation,
                file,
            });
        }
        self.switch(&mut st)
    }

    pub(super) fn path(&self, slot: i64) -> PathBuf {
        slot_path(&self.dir, slot)
    }

    /// Writes a record to the page cache, in offset order after the ones before it, and
    /// returns where it is with its ticket for [`Segments::sync`]: it is durable (and the
    /// queue's) only after that. Counted live until [`Segments::forget`].
    pub(super) fn write(
        self: &Arc<Self>,
        id: i64,
        meta: &[u8],
        data: &[u8],
    ) -> Result<(Location, u64), SpoolError> {
        let size = data.len() as u64;
        let len = RECORD_HEAD + meta.len() as u64 + size;
        if len > SEGMENT_SIZE - HEADER || meta.len() > META_MAX as usize {
            return Err(SpoolError::Io(io::Error::other(
                "a record larger than a segment",
            )));
        }
        let (ticket, location) = {
            let mut st = lock(&self.state);
            if st
                .current
                .as_ref()
                .is_none_or(|c| c.end + len > SEGMENT_SIZE)
            {
                self.switch(&mut st)?;
            }
            let Some(cur) = st.current.as_mut() else {
                return Err(SpoolError::Io(io::Error::other("no segment")));
            };
            let at = cur.end;
            let head = record_head(cur.generation, id, size, meta);
            let wrote = cur
                .file
                .write_all_at(&head, at)
                .and_then(|()| cur.file.write_all_at(meta, at + RECORD_HEAD))
                .and_then(|()| {
                    cur.file
                        .write_all_at(data, at + RECORD_HEAD + meta.len() as u64)
                });
            if let Err(e) = wrote {
                // A record half written ends the segment: nothing may follow it.
                self.seal(&mut st);
                return Err(io_or_full(e));
            }
            cur.end = at + len;
            let location = Location {
                slot: cur.slot,
                generation: cur.generation,
                offset: at + RECORD_HEAD + meta.len() as u64,
            };
            st.live
                .entry(location.slot)
                .or_insert((location.generation, 0))
                .1 += 1;
            st.written += 1;
            (st.written, location)
        };
        Ok((location, ticket))
    }

    /// Makes every record up to `ticket` durable, with one flush for all that wait.
    pub(super) fn sync(&self, ticket: u64) -> Result<(), SpoolError> {
        let mut synced = lock(&self.synced);
        if *synced >= ticket {
            return Ok(());
        }
        let (written, file) = {
            let st = lock(&self.state);
            (st.written, st.current.as_ref().map(|c| Arc::clone(&c.file)))
        };
        // No current segment: the one sealed was flushed when it was.
        if let Some(file) = file {
            file.sync_data().map_err(SpoolError::Io)?;
        }
        *synced = written;
        Ok(())
    }

    /// Ends the current segment (flushed: what was written to it is durable).
    fn seal(&self, st: &mut State) {
        if let Some(cur) = st.current.take() {
            if let Err(e) = cur.file.sync_data() {
                tracing::error!(error = %e, "cannot flush a spool segment");
            }
            if st.live.get(&cur.slot).is_none_or(|(_, n)| *n == 0) {
                st.live.remove(&cur.slot);
                self.reuse(st, cur.slot, &cur.file);
            }
        }
    }

    /// Moves to the next segment: a ready one, else one made now (and a spare made beside).
    /// Of the ready ones, the lowest slot: a renewed segment goes before a spare made
    /// later, whichever became ready first (the spare is made on a thread of its own).
    fn switch(self: &Arc<Self>, st: &mut State) -> Result<(), SpoolError> {
        self.seal(st);
        let lowest = (0..st.free.len()).min_by_key(|&i| st.free[i].slot);
        let ready = match lowest.map(|i| st.free.swap_remove(i)) {
            Some(r) => r,
            None => {
                let (slot, generation) = (st.next_slot, st.next_generation);
                st.next_slot += 1;
                st.next_generation += 1;
                let file = make(&self.dir, slot, generation).map_err(io_or_full)?;
                Ready {
                    slot,
                    generation,
                    file,
                }
            }
        };
        st.current = Some(Current {
            slot: ready.slot,
            generation: ready.generation,
            file: Arc::new(ready.file),
            end: HEADER,
        });
        if st.free.is_empty() && !st.preparing {
            st.preparing = true;
            let (slot, generation) = (st.next_slot, st.next_generation);
            st.next_slot += 1;
            st.next_generation += 1;
            let me = Arc::clone(self);
            let spawned = std::thread::Builder::new()
                .name("spool-segment".into())
                .spawn(move || {
                    let made = make(&me.dir, slot, generation);
                    let mut st = lock(&me.state);
                    st.preparing = false;
                    match made {
                        Ok(file) => st.free.push(Ready {
                            slot,
                            generation,
                            file,
                        }),
                        Err(e) => {
                            // The next switch makes one itself (and reports its error).
                            tracing::warn!(error = %e, "cannot make a spare spool segment");
                            let _ = fs::remove_file(slot_path(&me.dir, slot));
                        }
                    }
                });
            if spawned.is_err() {
                st.preparing = false;
            }
        }
        Ok(())
    }

    /// A segment whose records have all left: renewed for reuse, or removed.
    fn reuse(&self, st: &mut State, slot: i64, file: &File) {
        if st.free.len() < FREE_MAX {
            let generation = st.next_generation;
            st.next_generation += 1;
            match file
                .try_clone()
                .and_then(|f| renew(&f, generation).map(|()| f))
            {
                Ok(file) => {
                    st.free.push(Ready {
                        slot,
                        generation,
                        file,
                    });
                    return;
                }
                Err(e) => tracing::warn!(error = %e, "cannot renew a spool segment"),
            }
        }
        if let Err(e) = fs::remove_file(slot_path(&self.dir, slot)) {
            tracing::warn!(error = %e, "cannot remove a spool segment");
        }
    }

    /// A record of `slot` left the queue (its `gone` row committed): when it was the last,
    /// and the segment is not being appended to, the segment is reused. Returns the
    /// generation that ended, if one did (its `gone` rows may go).
    pub(super) fn forget(&self, slot: i64) -> Option<(i64, i64)> {
        let mut st = lock(&self.state);
        let (generation, left) = {
            let entry = st.live.get_mut(&slot)?;
            entry.1 = entry.1.saturating_sub(1);
            *entry
        };
        if left > 0 || st.current.as_ref().is_some_and(|c| c.slot == slot) {
            return None;
        }
        st.live.remove(&slot);
        match File::options().read(true).write(true).open(self.path(slot)) {
            Ok(file) => self.reuse(&mut st, slot, &file),
            Err(e) => tracing::warn!(error = %e, "cannot open a spool segment to reuse it"),
        }
        Some((slot, generation))
    }
}
