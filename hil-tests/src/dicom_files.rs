//! Real DICOM test files: pydicom's test files (a pinned pip install in a cache outside
//! the repository) and instances generated with dcmtk's `dump2dcm` for the DICOM bridge's
//! tests, plus a small reader that finds top-level elements' raw bytes for assertions.
//!
//! - [`pydicom_test_files`] gives `pydicom/data/test_files` (e.g. `CT_small.dcm`,
//!   `MR_small.dcm`) of pydicom [`PYDICOM_VERSION`], installed by `cargo xtask test` with
//!   `pip install --target` into [`pypi_target`] (`$XDG_CACHE_HOME/tsunagi/pypi`, default
//!   `~/.cache/tsunagi/pypi`); [`pydicom_charset_files`] its character set files.
//! - [`japanese_ct`] gives a small CT Image Storage instance with `SpecificCharacterSet`
//!   `\ISO 2022 IR 87` and a Japanese `PatientName` encoded as DICOM requires (PS3.5 §6.1.2.5
//!   and Annex H: each component group that is not ASCII switches to JIS X 0208 with
//!   `ESC $ B` and back with `ESC ( B` before every `^` and `=` and at the end).
//! - [`multi_frame`] gives a Multi-frame Grayscale Word Secondary Capture instance of a
//!   requested size; the pixel data is streamed to the file one frame at a time.
//! - [`DicomFile`] reads the raw value bytes of top-level elements (explicit or implicit VR
//!   little endian), to compare a file with what a PACS returns byte for byte.
//!
//! Every generated file goes into a directory the caller owns, as `<SOPInstanceUID>.dcm`.
//! Generators need the Debian package `dcmtk` (`dump2dcm`); [`encode_iso_2022_ir_87`] uses
//! glibc's `iconv` (package `libc-bin`, always installed).

use crate::testnet::cmd::display;
use std::collections::hash_map::RandomState;
use std::fs::{self, File, OpenOptions};
use std::hash::{BuildHasher as _, Hasher as _};
use std::io::{self, BufWriter, Write as _};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// The pydicom release whose test files we use. The one place the version is pinned;
/// `cargo xtask test` installs exactly this.
pub const PYDICOM_VERSION: &str = "3.0.2";
/// The PyPI package.
pub const PYDICOM_PACKAGE: &str = "pydicom";

/// The example of PS3.5 Annex H (H.3.1), as Unicode: alphabetic, ideographic and phonetic
/// component groups.
pub const YAMADA_TAROU: &str = "Yamada^Tarou=山田^太郎=やまだ^たろう";
/// [`YAMADA_TAROU`] in `\ISO 2022 IR 87`, byte for byte as PS3.5 H.3.1 shows it.
pub const YAMADA_TAROU_ISO_2022_IR_87: &[u8] =
    b"Yamada^Tarou=\x1b$B;3ED\x1b(B^\x1b$BB@O:\x1b(B=\x1b$B$d$^$@\x1b(B^\x1b$B$?$m$&\x1b(B";

/// CT Image Storage.
pub const CT_IMAGE_STORAGE: &str = "1.2.840.10008.5.1.4.1.1.2";
/// Comprehensive SR Storage: a structured report, a document (not an image).
pub const COMPREHENSIVE_SR_STORAGE: &str = "1.2.840.10008.5.1.4.1.1.88.33";
/// Multi-frame Grayscale Word Secondary Capture Image Storage.
pub const MULTI_FRAME_GRAYSCALE_WORD_SC: &str = "1.2.840.10008.5.1.4.1.1.7.3";
/// VL Endoscopic Image Storage.
pub const VL_ENDOSCOPIC_IMAGE_STORAGE: &str = "1.2.840.10008.5.1.4.1.1.77.1.1";
/// VL Whole Slide Microscopy Image Storage.
pub const VL_WHOLE_SLIDE_MICROSCOPY_IMAGE_STORAGE: &str = "1.2.840.10008.5.1.4.1.1.77.1.6";
/// JPEG Baseline (Process 1).
pub const JPEG_BASELINE: &str = "1.2.840.10008.1.2.4.50";
/// Video Endoscopic Image Storage.
pub const VIDEO_ENDOSCOPIC_IMAGE_STORAGE: &str = "1.2.840.10008.5.1.4.1.1.77.1.1.1";
/// MPEG-4 AVC/H.264 High Profile / Level 4.1.
pub const MPEG4_AVC_HP41: &str = "1.2.840.10008.1.2.4.102";
/// Explicit VR Little Endian.
pub const EXPLICIT_VR_LITTLE_ENDIAN: &str = "1.2.840.10008.1.2.1";
/// Implicit VR Little Endian.
pub const IMPLICIT_VR_LITTLE_ENDIAN: &str = "1.2.840.10008.1.2";

/// Where the tools are looked up (and the only `PATH` they get).
const TOOL_PATH: &str = crate::testnet::cmd::CLEAN_PATH;

/// Why a test file could not be found, made or read.
#[derive(Debug, thiserror::Error)]
pub enum DicomFilesError {
    #[error("cannot find the pip cache directory: neither XDG_CACHE_HOME nor HOME is set")]
    NoCacheDir,
    #[error(
        "pydicom {PYDICOM_VERSION} test files not found at {path} (found pydicom {found}; run \
         `cargo xtask test`, or `python3 -m pip install --no-deps --upgrade --target {target} \
         {PYDICOM_PACKAGE}=={PYDICOM_VERSION}`)"
    )]
    NoPydicom {
        path: PathBuf,
        target: PathBuf,
        found: String,
    },
    #[error(
        "{program} is not installed: not found in {TOOL_PATH} (Debian package `{package}`; \
         `cargo xtask test` installs it, or: apt-get install -y --no-install-recommends {package})"
    )]
    Missing {
        program: &'static str,
        package: &'static str,
    },
    #[error("cannot {action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{command} failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("bad value for {what}: {value:?} ({reason})")]
    BadValue {
        what: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error("not a DICOM file we can read: {0}")]
    Parse(String),
}

/// The pip target directory: `$XDG_CACHE_HOME/tsunagi/pypi`, else
/// `$HOME/.cache/tsunagi/pypi` (beside the npm cache of `fhir::npm_prefix`).
pub fn pypi_target() -> Result<PathBuf, DicomFilesError> {
    let cache = match (std::env::var_os("XDG_CACHE_HOME"), std::env::var_os("HOME")) {
        (Some(x), _) if !x.is_empty() => PathBuf::from(x),
        (_, Some(home)) if !home.is_empty() => PathBuf::from(home).join(".cache"),
        _ => return Err(DicomFilesError::NoCacheDir),
    };
    Ok(cache.join("tsunagi").join("pypi"))
}

/// The pydicom version installed in `target` (from its `pydicom-VERSION.dist-info`), if
/// exactly one is.
pub fn installed_pydicom_version(target: &Path) -> Option<String> {
    let mut found: Vec<String> = fs::read_dir(target)
        .ok()?
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            let version = name
                .strip_prefix(&format!("{PYDICOM_PACKAGE}-"))?
                .strip_suffix(".dist-info")?;
            Some(version.to_owned())
        })
        .collect();
    (found.len() == 1).then(|| found.remove(0))
}

/// `pydicom/data/test_files` of the pinned pydicom under [`pypi_target`]; an error if
/// that version is not installed there.
pub fn pydicom_test_files() -> Result<PathBuf, DicomFilesError> {
    pydicom_data("test_files")
}

/// `pydicom/data/charset_files` (e.g. `chrH31.dcm`, `chrH32.dcm`: ISO 2022 IR 87 and
/// IR 13), like [`pydicom_test_files`].
pub fn pydicom_charset_files() -> Result<PathBuf, DicomFilesError> {
    pydicom_data("charset_files")
}

fn pydicom_data(sub: &str) -> Result<PathBuf, DicomFilesError> {
    let target = pypi_target()?;
    let path = target.join("pydicom").join("data").join(sub);
    let found = installed_pydicom_version(&target);
    if found.as_deref() == Some(PYDICOM_VERSION) && path.is_dir() {
        return Ok(path);
    }
    Err(DicomFilesError::NoPydicom {
        path,
        target,
        found: found.unwrap_or_else(|| "none".to_owned()),
    })
}

/// A fresh UID: `2.25.` and 128 random bits in decimal (PS3.5 B.2).
pub fn new_uid() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut bits: u128 = 0;
    for _ in 0..2 {
        let mut hasher = RandomState::new().build_hasher();
        hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
        hasher.write_u32(std::process::id());
        hasher.write_u128(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default(),
        );
        bits = (bits << 64) | u128::from(hasher.finish());
    }
    format!("2.25.{bits}")
}

/// What identifies a generated instance; tests set what they assert on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ids {
    pub patient_id: String,
    /// As Unicode; encoded for the instance's character set.
    pub patient_name: String,
    pub study_instance_uid: String,
    pub series_instance_uid: String,
    pub sop_instance_uid: String,
    pub accession_number: String,
    /// `YYYYMMDD`.
    pub study_date: String,
}

impl Ids {
    /// `patient_id`, the name [`YAMADA_TAROU`], fresh UIDs, accession `ACC` + the last
    /// digits of the study UID, study date 2026-01-01.
    pub fn new(patient_id: &str) -> Ids {
        let study = new_uid();
        let accession = format!("ACC{}", &study[study.len() - 8..]);
        Ids {
            patient_id: patient_id.to_owned(),
            patient_name: YAMADA_TAROU.to_owned(),
            study_instance_uid: study,
            series_instance_uid: new_uid(),
            sop_instance_uid: new_uid(),
            accession_number: accession,
            study_date: "20260101".to_owned(),
        }
    }

    /// The same patient and study, a new series and instance.
    pub fn next_series(&self) -> Ids {
        Ids {
            series_instance_uid: new_uid(),
            sop_instance_uid: new_uid(),
            ..self.clone()
        }
    }

    /// The same patient, study and series, a new instance.
    pub fn next_instance(&self) -> Ids {
        Ids {
            sop_instance_uid: new_uid(),
            ..self.clone()
        }
    }
}

/// Encodes a person name for `SpecificCharacterSet` `\ISO 2022 IR 87`: every component
/// (between `^` and `=`) separately with iconv's ISO-2022-JP, so each one that leaves
/// ASCII ends with `ESC ( B` before the next delimiter, as DICOM requires. Characters
/// outside ASCII and JIS X 0208 (e.g. half-width katakana) are an error.
pub fn encode_iso_2022_ir_87(name: &str) -> Result<Vec<u8>, DicomFilesError> {
    let iconv = find_tool("iconv", "libc-bin")?;
    let mut out = Vec::with_capacity(name.len() * 2);
    let mut component = String::new();
    let flush = |component: &mut String, out: &mut Vec<u8>| -> Result<(), DicomFilesError> {
        if component.is_ascii() {
            out.extend_from_slice(component.as_bytes());
        } else {
            out.extend(run_with_input(
                Command::new(&iconv).args(["-f", "UTF-8", "-t", "ISO-2022-JP"]),
                component.as_bytes(),
            )?);
        }
        component.clear();
        Ok(())
    };
    for c in name.chars() {
        if c == '^' || c == '=' {
            flush(&mut component, &mut out)?;
            out.push(u8::try_from(c).unwrap_or(b'^'));
        } else {
            component.push(c);
        }
    }
    flush(&mut component, &mut out)?;
    Ok(out)
}

/// Writes a small CT Image Storage instance (64×64, 16-bit signed, a gradient) with
/// `SpecificCharacterSet` `\ISO 2022 IR 87` and `ids.patient_name` encoded by
/// [`encode_iso_2022_ir_87`], Explicit VR Little Endian, into `dir`. Returns the file.
pub fn japanese_ct(dir: &Path, ids: &Ids) -> Result<PathBuf, DicomFilesError> {
    let name = encode_iso_2022_ir_87(&ids.patient_name)?;
    let (rows, columns) = (64u16, 64u16);
    let mut dump = header_dump(ids, CT_IMAGE_STORAGE, "CT", &name)?;
    dump.extend_from_slice(
        format!(
            "(0008,0008) CS [ORIGINAL\\PRIMARY\\AXIAL]\n\
             (0018,0050) DS [5]\n\
             (0020,0032) DS [0\\0\\0]\n\
             (0020,0037) DS [1\\0\\0\\0\\1\\0]\n\
             (0028,0002) US 1\n\
             (0028,0004) CS [MONOCHROME2]\n\
             (0028,0010) US {rows}\n\
             (0028,0011) US {columns}\n\
             (0028,0030) DS [0.5\\0.5]\n\
             (0028,0100) US 16\n\
             (0028,0101) US 16\n\
             (0028,0102) US 15\n\
             (0028,0103) US 1\n\
             (0028,1050) DS [40]\n\
             (0028,1051) DS [400]\n\
             (0028,1052) DS [-1024]\n\
             (0028,1053) DS [1]\n"
        )
        .as_bytes(),
    );
    let mut frame = Vec::with_capacity(usize::from(rows) * usize::from(columns) * 2);
    for y in 0..rows {
        for x in 0..columns {
            frame.extend_from_slice(&(x * 16 + y * 8).to_le_bytes());
        }
    }
    write_instance(dir, ids, &dump, frame.len() as u64, |out| {
        out.write_all(&frame)
    })
}

/// Writes a small Comprehensive SR instance (a report: a titled container with one text
/// item, no pixel data) with the Japanese name as [`japanese_ct`] does, Explicit VR Little
/// Endian, into `dir`. Returns the file.
pub fn comprehensive_sr(dir: &Path, ids: &Ids) -> Result<PathBuf, DicomFilesError> {
    let name = encode_iso_2022_ir_87(&ids.patient_name)?;
    let mut dump = header_dump(ids, COMPREHENSIVE_SR_STORAGE, "SR", &name)?;
    dump.extend_from_slice(
        b"(0040,a040) CS [CONTAINER]\n\
          (0040,a043) SQ (Sequence with undefined length)\n\
          (fffe,e000) na (Item with undefined length)\n\
          (0008,0100) SH [18748-4]\n\
          (0008,0102) SH [LN]\n\
          (0008,0104) LO [Diagnostic imaging report]\n\
          (fffe,e00d) na (ItemDelimitationItem)\n\
          (fffe,e0dd) na (SequenceDelimitationItem)\n\
          (0040,a050) CS [SEPARATE]\n\
          (0040,a491) CS [COMPLETE]\n\
          (0040,a493) CS [UNVERIFIED]\n\
          (0040,a730) SQ (Sequence with undefined length)\n\
          (fffe,e000) na (Item with undefined length)\n\
          (0040,a010) CS [CONTAINS]\n\
          (0040,a040) CS [TEXT]\n\
          (0040,a043) SQ (Sequence with undefined length)\n\
          (fffe,e000) na (Item with undefined length)\n\
          (0008,0100) SH [121071]\n\
          (0008,0102) SH [DCM]\n\
          (0008,0104) LO [Finding]\n\
          (fffe,e00d) na (ItemDelimitationItem)\n\
          (fffe,e0dd) na (SequenceDelimitationItem)\n\
          (0040,a160) UT [No acute findings.]\n\
          (fffe,e00d) na (ItemDelimitationItem)\n\
          (fffe,e0dd) na (SequenceDelimitationItem)\n",
    );
    dump_to_file(dir, ids, &dump)
}

/// `dump2dcm`: `dump` into `<SOP UID>.dcm` in `dir` (Explicit VR Little Endian, no group
/// lengths in the data set).
fn dump_to_file(dir: &Path, ids: &Ids, dump: &[u8]) -> Result<PathBuf, DicomFilesError> {
    let dump2dcm = find_tool("dump2dcm", "dcmtk")?;
    let file = dir.join(format!("{}.dcm", ids.sop_instance_uid));
    let dump_path = dir.join(format!("{}.dump", ids.sop_instance_uid));
    fs::write(&dump_path, dump).map_err(io_err("write", &dump_path))?;
    let mut command = Command::new(&dump2dcm);
    command
        .args(["--quiet", "--write-xfer-little", "--group-length-remove"])
        .arg(&dump_path)
        .arg(&file);
    let result = run_with_input(&mut command, b"");
    let _ = fs::remove_file(&dump_path);
    result?;
    Ok(file)
}

/// The size of a [`multi_frame`] instance's pixel data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MultiFrame {
    pub rows: u16,
    pub columns: u16,
    pub frames: u32,
}

impl MultiFrame {
    /// 512×512 frames, 16 bits, enough of them for at least `bytes` of pixel data (one
    /// frame at least).
    pub fn at_least(bytes: u64) -> MultiFrame {
        let frame = 512 * 512 * 2;
        let frames = bytes.div_ceil(frame).max(1);
        MultiFrame {
            rows: 512,
            columns: 512,
            frames: u32::try_from(frames).unwrap_or(u32::MAX),
        }
    }

    pub fn frame_bytes(&self) -> u64 {
        u64::from(self.rows) * u64::from(self.columns) * 2
    }

    /// The pixel data's length.
    pub fn pixel_bytes(&self) -> u64 {
        self.frame_bytes() * u64::from(self.frames)
    }
}

/// Writes a Multi-frame Grayscale Word Secondary Capture instance (Explicit VR Little
/// Endian, `ISO_IR 192` so any `ids.patient_name` fits) with `size`'s frames into `dir`.
/// Frame `n` is a fixed pattern with `n` (u32, little endian) in its first two pixels, so
/// frames differ. Only one frame is in memory at a time. Returns the file.
pub fn multi_frame(dir: &Path, ids: &Ids, size: MultiFrame) -> Result<PathBuf, DicomFilesError> {
    let pixel_bytes = size.pixel_bytes();
    if size.rows == 0 || size.columns == 0 || size.frames == 0 || pixel_bytes >= u64::from(u32::MAX)
    {
        return Err(DicomFilesError::BadValue {
            what: "multi-frame size",
            value: format!("{size:?}"),
            reason: "rows, columns and frames must be > 0 and the pixel data < 4 GiB",
        });
    }
    let mut dump = header_dump_with_charset(
        ids,
        MULTI_FRAME_GRAYSCALE_WORD_SC,
        "OT",
        "ISO_IR 192",
        ids.patient_name.as_bytes(),
    )?;
    dump.extend_from_slice(
        format!(
            "(0008,0064) CS [WSD]\n\
             (0018,1063) DS [33.3]\n\
             (0028,0002) US 1\n\
             (0028,0004) CS [MONOCHROME2]\n\
             (0028,0008) IS [{frames}]\n\
             (0028,0009) AT (0018,1063)\n\
             (0028,0010) US {rows}\n\
             (0028,0011) US {columns}\n\
             (0028,0100) US 16\n\
             (0028,0101) US 16\n\
             (0028,0102) US 15\n\
             (0028,0103) US 0\n",
            frames = size.frames,
            rows = size.rows,
            columns = size.columns,
        )
        .as_bytes(),
    );
    let frame_len = usize::try_from(size.frame_bytes()).map_err(|_| DicomFilesError::BadValue {
        what: "multi-frame size",
        value: format!("{size:?}"),
        reason: "a frame does not fit in memory",
    })?;
    let mut frame = Vec::with_capacity(frame_len);
    let mut value: u16 = 0;
    while frame.len() < frame_len {
        frame.extend_from_slice(&value.to_le_bytes());
        value = value.wrapping_add(7);
    }
    write_instance(dir, ids, &dump, pixel_bytes, |out| {
        for n in 0..size.frames {
            frame[..4].copy_from_slice(&n.to_le_bytes());
            out.write_all(&frame)?;
        }
        Ok(())
    })
}

/// The attributes of an 8-bit RGB image of `rows` × `columns` (uncompressed, interleaved).
fn rgb_lines(rows: u32, columns: u32) -> String {
    format!(
        "(0028,0002) US 3\n\
         (0028,0004) CS [RGB]\n\
         (0028,0006) US 0\n\
         (0028,0010) US {rows}\n\
         (0028,0011) US {columns}\n\
         (0028,0100) US 8\n\
         (0028,0101) US 8\n\
         (0028,0102) US 7\n\
         (0028,0103) US 0\n"
    )
}

/// An RGB picture of `rows` × `columns`: colour gradients with `seed` mixed in, smooth
/// enough for JPEG to compress the way it does photographs.
fn rgb_picture(rows: u32, columns: u32, seed: u32) -> Vec<u8> {
    let byte = |v: u32| v.to_le_bytes()[0];
    let mut v = Vec::with_capacity(usize::try_from(rows * columns * 3).unwrap_or(0));
    for y in 0..rows {
        for x in 0..columns {
            v.push(byte(x.wrapping_add(seed.wrapping_mul(13))));
            v.push(byte(y.wrapping_add(seed.wrapping_mul(7))));
            v.push(byte(((x + y) / 2).wrapping_add(seed)));
        }
    }
    v
}

/// Compresses `file` to JPEG Baseline with dcmtk's `dcmcjpeg +eb` (8-bit, lossy, colour
/// as YBR_FULL_422, as endoscopes and slide scanners write it); returns the new file
/// (`<SOP UID>.jpeg.dcm`) and removes the uncompressed one.
fn to_jpeg_baseline(dir: &Path, ids: &Ids, file: PathBuf) -> Result<PathBuf, DicomFilesError> {
    let dcmcjpeg = find_tool("dcmcjpeg", "dcmtk")?;
    let out = dir.join(format!("{}.jpeg.dcm", ids.sop_instance_uid));
    let mut command = Command::new(&dcmcjpeg);
    // +un: keep the SOP Instance UID (dcmcjpeg gives lossy results a new one by default).
    command.args(["--quiet", "+eb", "+un"]).arg(&file).arg(&out);
    run_with_input(&mut command, b"")?;
    let _ = fs::remove_file(&file);
    Ok(out)
}

/// Writes a VL Endoscopic Image Storage instance (modality ES): one 640×480 RGB frame,
/// compressed to JPEG Baseline by dcmtk ([`JPEG_BASELINE`]), with the Japanese name as
/// [`japanese_ct`] has it. Returns the file.
pub fn vl_endoscopic(dir: &Path, ids: &Ids) -> Result<PathBuf, DicomFilesError> {
    let name = encode_iso_2022_ir_87(&ids.patient_name)?;
    let (rows, columns) = (480u32, 640u32);
    let mut dump = header_dump(ids, VL_ENDOSCOPIC_IMAGE_STORAGE, "ES", &name)?;
    dump.extend_from_slice(b"(0008,0008) CS [ORIGINAL\\PRIMARY]\n");
    dump.extend_from_slice(rgb_lines(rows, columns).as_bytes());
    let picture = rgb_picture(rows, columns, 1);
    let file = write_pixels(dir, ids, &dump, b"OB", picture.len() as u64, |out| {
        out.write_all(&picture)
    })?;
    to_jpeg_baseline(dir, ids, file)
}

/// Writes a Video Endoscopic Image Storage instance (modality ES): `frames` frames of
/// 320×240 at 25 frames/s, a moving colour gradient encoded by x264 (H.264 High Profile,
/// level 4.1, an Annex B byte stream, as PS3.5 §8.2.8 wants it), in encapsulated pixel
/// data (an empty offset table, the stream in one fragment) under [`MPEG4_AVC_HP41`], with
/// the Japanese name as [`japanese_ct`] has it. Returns the file.
pub fn video_endoscopic(dir: &Path, ids: &Ids, frames: u32) -> Result<PathBuf, DicomFilesError> {
    let x264 = find_tool("x264", "x264")?;
    let name = encode_iso_2022_ir_87(&ids.patient_name)?;
    let (w, h) = (320u32, 240u32);
    // The raw video (YUV 4:2:0) for x264.
    let y4m = dir.join(format!("{}.y4m", ids.sop_instance_uid));
    {
        let out = File::create(&y4m).map_err(io_err("create", &y4m))?;
        let mut out = BufWriter::new(out);
        let byte = |v: u32| v.to_le_bytes()[0];
        let mut write = || -> io::Result<()> {
            writeln!(out, "YUV4MPEG2 W{w} H{h} F25:1 Ip A1:1 C420jpeg")?;
            for f in 0..frames {
                out.write_all(b"FRAME\n")?;
                for y in 0..h {
                    for x in 0..w {
                        out.write_all(&[byte(x + y + f * 4)])?;
                    }
                }
                for plane in 0..2u32 {
                    for y in 0..h / 2 {
                        for x in 0..w / 2 {
                            out.write_all(&[byte(x * (plane + 1) + y + f)])?;
                        }
                    }
                }
            }
            out.flush()
        };
        write().map_err(io_err("write", &y4m))?;
    }
    let stream_path = dir.join(format!("{}.264", ids.sop_instance_uid));
    let mut command = Command::new(&x264);
    command
        .args([
            "--quiet",
            "--profile",
            "high",
            "--level",
            "4.1",
            "--preset",
            "veryfast",
        ])
        .args(["--demuxer", "y4m", "-o"])
        .arg(&stream_path)
        .arg(&y4m);
    let done = run_with_input(&mut command, b"");
    let _ = fs::remove_file(&y4m);
    done?;
    let mut stream = fs::read(&stream_path).map_err(io_err("read", &stream_path))?;
    let _ = fs::remove_file(&stream_path);
    if stream.len() % 2 == 1 {
        stream.push(0);
    }
    let mut dump = header_dump(ids, VIDEO_ENDOSCOPIC_IMAGE_STORAGE, "ES", &name)?;
    dump.extend_from_slice(
        format!(
            "(0008,0008) CS [ORIGINAL\\PRIMARY]\n\
             (0018,0040) IS [25]\n\
             (0018,1063) DS [40]\n\
             (0028,0002) US 3\n\
             (0028,0004) CS [YBR_PARTIAL_420]\n\
             (0028,0006) US 0\n\
             (0028,0008) IS [{frames}]\n\
             (0028,0009) AT (0018,1063)\n\
             (0028,0010) US {h}\n\
             (0028,0011) US {w}\n\
             (0028,0100) US 8\n\
             (0028,0101) US 8\n\
             (0028,0102) US 7\n\
             (0028,0103) US 0\n"
        )
        .as_bytes(),
    );
    // dump2dcm writes the header (Explicit VR Little Endian, which encapsulated transfer
    // syntaxes use for the data set too); the file meta then names MPEG-4, and the pixel
    // data follows, encapsulated.
    let header = dump_to_file(dir, ids, &dump)?;
    let parsed = DicomFile::read(&header)?;
    let mut out = vec![0u8; 128];
    out.extend_from_slice(b"DICM");
    let mut meta = Vec::new();
    let ui = |meta: &mut Vec<u8>, element: u16, value: &str| {
        let mut v = value.as_bytes().to_vec();
        if v.len() % 2 == 1 {
            v.push(0);
        }
        meta.extend_from_slice(&2u16.to_le_bytes());
        meta.extend_from_slice(&element.to_le_bytes());
        meta.extend_from_slice(b"UI");
        meta.extend_from_slice(&u16::try_from(v.len()).unwrap_or(0).to_le_bytes());
        meta.extend_from_slice(&v);
    };
    meta.extend_from_slice(&[0x02, 0x00, 0x01, 0x00, b'O', b'B', 0, 0, 2, 0, 0, 0, 0, 1]);
    ui(&mut meta, 0x0002, VIDEO_ENDOSCOPIC_IMAGE_STORAGE);
    ui(&mut meta, 0x0003, &ids.sop_instance_uid);
    ui(&mut meta, 0x0010, MPEG4_AVC_HP41);
    ui(
        &mut meta,
        0x0012,
        "2.25.310427758932212837913389447283719583725",
    );
    out.extend_from_slice(&[0x02, 0x00, 0x00, 0x00, b'U', b'L', 4, 0]);
    out.extend_from_slice(&u32::try_from(meta.len()).unwrap_or(0).to_le_bytes());
    out.extend_from_slice(&meta);
    out.extend_from_slice(parsed.data_set());
    out.extend_from_slice(&[
        0xE0, 0x7F, 0x10, 0x00, b'O', b'B', 0, 0, 0xFF, 0xFF, 0xFF, 0xFF,
    ]);
    out.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0, 0, 0, 0, 0]);
    out.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0]);
    out.extend_from_slice(&u32::try_from(stream.len()).unwrap_or(0).to_le_bytes());
    out.extend_from_slice(&stream);
    out.extend_from_slice(&[0xFE, 0xFF, 0xDD, 0xE0, 0, 0, 0, 0]);
    let _ = fs::remove_file(&header);
    let file = dir.join(format!("{}.mp4.dcm", ids.sop_instance_uid));
    fs::write(&file, out).map_err(io_err("write", &file))?;
    Ok(file)
}

/// The size of a [`whole_slide`] instance: tiles of 256×256 RGB pixels, `across` × `down`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slide {
    pub across: u32,
    pub down: u32,
}

impl Slide {
    pub const TILE: u32 = 256;

    /// The uncompressed pixel data's length.
    pub fn pixel_bytes(&self) -> u64 {
        u64::from(Slide::TILE * Slide::TILE * 3) * u64::from(self.across) * u64::from(self.down)
    }
}

/// Writes a VL Whole Slide Microscopy Image Storage instance (modality SM, a volume image
/// of `slide`'s tiles, TILED_FULL, one frame per tile) with the Japanese name as
/// [`japanese_ct`] has it; with `jpeg`, its tiles compressed to JPEG Baseline by dcmtk,
/// else uncompressed (Explicit VR Little Endian). One tile is in memory at a time.
pub fn whole_slide(
    dir: &Path,
    ids: &Ids,
    slide: Slide,
    jpeg: bool,
) -> Result<PathBuf, DicomFilesError> {
    let name = encode_iso_2022_ir_87(&ids.patient_name)?;
    let frames = slide.across * slide.down;
    if frames == 0 || slide.pixel_bytes() >= u64::from(u32::MAX) {
        return Err(DicomFilesError::BadValue {
            what: "slide size",
            value: format!("{slide:?}"),
            reason: "at least one tile, and the pixel data < 4 GiB",
        });
    }
    let tile = Slide::TILE;
    let mut dump = header_dump(ids, VL_WHOLE_SLIDE_MICROSCOPY_IMAGE_STORAGE, "SM", &name)?;
    dump.extend_from_slice(
        format!(
            "(0008,0008) CS [ORIGINAL\\PRIMARY\\VOLUME\\NONE]\n\
             (0020,9311) CS [TILED_FULL]\n\
             (0028,0008) IS [{frames}]\n\
             (0048,0001) FL 25.0\n\
             (0048,0002) FL 25.0\n\
             (0048,0006) UL {}\n\
             (0048,0007) UL {}\n",
            slide.across * tile,
            slide.down * tile,
        )
        .as_bytes(),
    );
    dump.extend_from_slice(rgb_lines(tile, tile).as_bytes());
    let file = write_pixels(dir, ids, &dump, b"OB", slide.pixel_bytes(), |out| {
        for n in 0..frames {
            out.write_all(&rgb_picture(tile, tile, n))?;
        }
        Ok(())
    })?;
    if jpeg {
        to_jpeg_baseline(dir, ids, file)
    } else {
        Ok(file)
    }
}

/// The dump2dcm lines every generated instance has, `\ISO 2022 IR 87`.
fn header_dump(
    ids: &Ids,
    sop_class: &str,
    modality: &str,
    encoded_name: &[u8],
) -> Result<Vec<u8>, DicomFilesError> {
    header_dump_with_charset(ids, sop_class, modality, "\\ISO 2022 IR 87", encoded_name)
}

fn header_dump_with_charset(
    ids: &Ids,
    sop_class: &str,
    modality: &str,
    charset: &str,
    encoded_name: &[u8],
) -> Result<Vec<u8>, DicomFilesError> {
    for (what, value) in [
        ("StudyInstanceUID", &ids.study_instance_uid),
        ("SeriesInstanceUID", &ids.series_instance_uid),
        ("SOPInstanceUID", &ids.sop_instance_uid),
    ] {
        check_uid(what, value)?;
    }
    for (what, value) in [
        ("PatientID", ids.patient_id.as_bytes()),
        ("PatientName", encoded_name),
        ("AccessionNumber", ids.accession_number.as_bytes()),
        ("StudyDate", ids.study_date.as_bytes()),
    ] {
        // dump2dcm takes a bracketed value up to the last `]` of the line, as is.
        if value
            .iter()
            .any(|&b| b == b'\n' || b == b'\r' || b == b']' || b == b'\\')
        {
            return Err(DicomFilesError::BadValue {
                what,
                value: String::from_utf8_lossy(value).into_owned(),
                reason: "no line breaks, `]` or `\\`",
            });
        }
    }
    let mut dump = Vec::new();
    let mut line = |tag_vr: &str, value: &[u8]| {
        dump.extend_from_slice(tag_vr.as_bytes());
        dump.extend_from_slice(b" [");
        dump.extend_from_slice(value);
        dump.extend_from_slice(b"]\n");
    };
    line("(0008,0005) CS", charset.as_bytes());
    line("(0008,0016) UI", sop_class.as_bytes());
    line("(0008,0018) UI", ids.sop_instance_uid.as_bytes());
    line("(0008,0020) DA", ids.study_date.as_bytes());
    line("(0008,0030) TM", b"090000");
    line("(0008,0050) SH", ids.accession_number.as_bytes());
    line("(0008,0060) CS", modality.as_bytes());
    line("(0008,0090) PN", b"");
    line("(0010,0010) PN", encoded_name);
    line("(0010,0020) LO", ids.patient_id.as_bytes());
    line("(0010,0030) DA", b"19700101");
    line("(0010,0040) CS", b"M");
    line("(0020,000d) UI", ids.study_instance_uid.as_bytes());
    line("(0020,000e) UI", ids.series_instance_uid.as_bytes());
    line("(0020,0010) SH", b"1");
    line("(0020,0011) IS", b"1");
    line("(0020,0013) IS", b"1");
    line("(0020,0020) CS", b"");
    Ok(dump)
}

fn check_uid(what: &'static str, uid: &str) -> Result<(), DicomFilesError> {
    let ok = (1..=64).contains(&uid.len())
        && uid.split('.').all(|part| {
            !part.is_empty()
                && part.bytes().all(|b| b.is_ascii_digit())
                && (part == "0" || !part.starts_with('0'))
        });
    if ok {
        Ok(())
    } else {
        Err(DicomFilesError::BadValue {
            what,
            value: uid.to_owned(),
            reason: "a UID: digits and dots, at most 64 characters",
        })
    }
}

/// `dump2dcm` turns `dump` (everything but the pixel data) into `<SOP UID>.dcm` in `dir`
/// (Explicit VR Little Endian, no group lengths in the data set); then the Pixel Data
/// element (OW, `pixel_bytes` long) is appended and `pixels` streams its value. Pixel
/// Data is the last element, so appending keeps the data set in tag order.
fn write_instance(
    dir: &Path,
    ids: &Ids,
    dump: &[u8],
    pixel_bytes: u64,
    pixels: impl FnOnce(&mut BufWriter<File>) -> io::Result<()>,
) -> Result<PathBuf, DicomFilesError> {
    write_pixels(dir, ids, dump, b"OW", pixel_bytes, pixels)
}

/// [`write_instance`] with the Pixel Data's VR (`OB` for 8-bit pixels).
fn write_pixels(
    dir: &Path,
    ids: &Ids,
    dump: &[u8],
    vr: &[u8; 2],
    pixel_bytes: u64,
    pixels: impl FnOnce(&mut BufWriter<File>) -> io::Result<()>,
) -> Result<PathBuf, DicomFilesError> {
    let length = u32::try_from(pixel_bytes)
        .ok()
        .filter(|len| len % 2 == 0 && *len != u32::MAX)
        .ok_or_else(|| DicomFilesError::BadValue {
            what: "pixel data length",
            value: pixel_bytes.to_string(),
            reason: "even and below 4 GiB",
        })?;
    let file = dump_to_file(dir, ids, dump)?;

    let out = OpenOptions::new()
        .append(true)
        .open(&file)
        .map_err(io_err("open", &file))?;
    let mut out = BufWriter::with_capacity(1 << 20, out);
    let mut element = Vec::with_capacity(12);
    element.extend_from_slice(&[0xe0, 0x7f, 0x10, 0x00]);
    element.extend_from_slice(vr);
    element.extend_from_slice(b"\0\0");
    element.extend_from_slice(&length.to_le_bytes());
    out.write_all(&element)
        .and_then(|()| pixels(&mut out))
        .and_then(|()| out.flush())
        .map_err(io_err("write the pixel data of", &file))?;
    Ok(file)
}

/// A DICOM file read into memory, with the positions of its top-level data set elements.
#[derive(Debug, Clone)]
pub struct DicomFile {
    bytes: Vec<u8>,
    transfer_syntax: String,
    data_set_start: usize,
    /// Tag (`group << 16 | element`), VR (explicit VR only) and value range, in file order.
    elements: Vec<(u32, Option<[u8; 2]>, Range<usize>)>,
}

impl DicomFile {
    /// Reads and indexes `path`.
    pub fn read(path: &Path) -> Result<DicomFile, DicomFilesError> {
        let bytes = fs::read(path).map_err(io_err("read", path))?;
        DicomFile::parse(bytes)
    }

    /// Indexes a Part 10 file (preamble, `DICM`, file meta information) whose data set is
    /// Explicit or Implicit VR Little Endian (or a compressed syntax: those are explicit VR
    /// little endian around encapsulated pixel data).
    pub fn parse(bytes: Vec<u8>) -> Result<DicomFile, DicomFilesError> {
        if bytes.len() < 132 || &bytes[128..132] != b"DICM" {
            return Err(DicomFilesError::Parse("no DICM prefix".to_owned()));
        }
        // The file meta information is always explicit VR little endian.
        let mut meta = Vec::new();
        let mut pos = 132;
        while pos + 4 <= bytes.len() && read_u16(&bytes, pos) == Some(0x0002) {
            let (tag, vr, value, next) = next_element(&bytes, pos, true)?;
            meta.push((tag, vr, value));
            pos = next;
        }
        let transfer_syntax = meta
            .iter()
            .find(|(tag, _, _)| *tag == 0x0002_0010)
            .map(|(_, _, range)| trim_value(&bytes[range.clone()]))
            .ok_or_else(|| DicomFilesError::Parse("no TransferSyntaxUID".to_owned()))?;
        let explicit = match transfer_syntax.as_str() {
            IMPLICIT_VR_LITTLE_ENDIAN => false,
            "1.2.840.10008.1.2.2" => {
                return Err(DicomFilesError::Parse(
                    "Explicit VR Big Endian is not supported".to_owned(),
                ));
            }
            _ => true,
        };
        let data_set_start = pos;
        let mut elements = Vec::new();
        while pos < bytes.len() {
            let (tag, vr, value, next) = next_element(&bytes, pos, explicit)?;
            elements.push((tag, vr, value));
            pos = next;
        }
        Ok(DicomFile {
            bytes,
            transfer_syntax,
            data_set_start,
            elements,
        })
    }

    /// The whole file.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The transfer syntax UID of the data set.
    pub fn transfer_syntax(&self) -> &str {
        &self.transfer_syntax
    }

    /// Everything after the file meta information.
    pub fn data_set(&self) -> &[u8] {
        &self.bytes[self.data_set_start..]
    }

    /// The raw value of top-level element `(group, element)` (with its padding), `None`
    /// if absent. For an undefined length (a sequence, encapsulated pixel data): the
    /// items, up to and without the delimiter.
    pub fn element(&self, group: u16, element: u16) -> Option<&[u8]> {
        let tag = (u32::from(group) << 16) | u32::from(element);
        self.elements
            .iter()
            .find(|(t, _, _)| *t == tag)
            .map(|(_, _, range)| &self.bytes[range.clone()])
    }

    /// The element's value as text without trailing spaces and NULs (lossy).
    pub fn string(&self, group: u16, element: u16) -> Option<String> {
        self.element(group, element).map(trim_value)
    }

    /// The top-level tags in file order.
    pub fn tags(&self) -> impl Iterator<Item = (u16, u16)> + '_ {
        self.elements.iter().map(|(tag, _, _)| {
            let group = u16::try_from(tag >> 16).unwrap_or(u16::MAX);
            let element = u16::try_from(tag & 0xffff).unwrap_or(u16::MAX);
            (group, element)
        })
    }

    /// The data set without a trailing `DataSetTrailingPadding` (FFFC,FFFC), which
    /// senders such as dcmtk's storescu drop.
    pub fn data_set_without_padding(&self) -> &[u8] {
        match self.elements.last() {
            Some((0xfffc_fffc, vr, range)) => {
                let header = match vr {
                    Some(_) => 12,
                    None => 8,
                };
                &self.bytes[self.data_set_start..range.start - header]
            }
            _ => self.data_set(),
        }
    }
}

fn trim_value(value: &[u8]) -> String {
    String::from_utf8_lossy(value)
        .trim_end_matches([' ', '\0'])
        .to_owned()
}

fn read_u16(bytes: &[u8], pos: usize) -> Option<u16> {
    Some(u16::from_le_bytes(
        bytes.get(pos..pos + 2)?.try_into().ok()?,
    ))
}

fn read_u32(bytes: &[u8], pos: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        bytes.get(pos..pos + 4)?.try_into().ok()?,
    ))
}

type Parsed = (u32, Option<[u8; 2]>, Range<usize>, usize);

/// The element at `pos`: tag, VR, value range and where the next one starts.
fn next_element(bytes: &[u8], pos: usize, explicit: bool) -> Result<Parsed, DicomFilesError> {
    let short = || DicomFilesError::Parse(format!("truncated element at offset {pos}"));
    let group = read_u16(bytes, pos).ok_or_else(short)?;
    let elem = read_u16(bytes, pos + 2).ok_or_else(short)?;
    let tag = (u32::from(group) << 16) | u32::from(elem);
    let (vr, length, start) = if explicit && group != 0xfffe {
        let vr: [u8; 2] = bytes
            .get(pos + 4..pos + 6)
            .ok_or_else(short)?
            .try_into()
            .map_err(|_| short())?;
        let long = matches!(
            &vr,
            b"OB"
                | b"OD"
                | b"OF"
                | b"OL"
                | b"OV"
                | b"OW"
                | b"SQ"
                | b"SV"
                | b"UC"
                | b"UN"
                | b"UR"
                | b"UT"
                | b"UV"
        );
        if long {
            (
                Some(vr),
                read_u32(bytes, pos + 8).ok_or_else(short)?,
                pos + 12,
            )
        } else {
            let length = read_u16(bytes, pos + 6).ok_or_else(short)?;
            (Some(vr), u32::from(length), pos + 8)
        }
    } else {
        (None, read_u32(bytes, pos + 4).ok_or_else(short)?, pos + 8)
    };
    if length == u32::MAX {
        // Undefined length: items (each defined or undefined) until a sequence delimiter.
        let mut at = start;
        loop {
            let group = read_u16(bytes, at).ok_or_else(short)?;
            let elem = read_u16(bytes, at + 2).ok_or_else(short)?;
            let item_len = read_u32(bytes, at + 4).ok_or_else(short)?;
            match (group, elem) {
                (0xfffe, 0xe0dd) => return Ok((tag, vr, start..at, at + 8)),
                (0xfffe, 0xe000) if item_len == u32::MAX => {
                    // An item of undefined length: elements until an item delimiter.
                    at += 8;
                    loop {
                        if read_u16(bytes, at) == Some(0xfffe)
                            && read_u16(bytes, at + 2) == Some(0xe00d)
                        {
                            at += 8;
                            break;
                        }
                        let (_, _, _, next) = next_element(bytes, at, explicit)?;
                        at = next;
                    }
                }
                (0xfffe, 0xe000) => {
                    at = at + 8 + usize::try_from(item_len).map_err(|_| short())?;
                }
                _ => {
                    return Err(DicomFilesError::Parse(format!(
                        "expected an item at offset {at}"
                    )));
                }
            }
        }
    }
    let end = start + usize::try_from(length).map_err(|_| short())?;
    if end > bytes.len() {
        return Err(short());
    }
    Ok((tag, vr, start..end, end))
}

/// Runs `command` with a clean environment, `input` on stdin; its stdout on success.
fn run_with_input(command: &mut Command, input: &[u8]) -> Result<Vec<u8>, DicomFilesError> {
    let line = display(command);
    command
        .env_clear()
        .env("PATH", TOOL_PATH)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let spawn_err = |source| DicomFilesError::Io {
        action: "run",
        path: PathBuf::from(&line),
        source,
    };
    let mut child = command.spawn().map_err(spawn_err)?;
    if let Some(mut stdin) = child.stdin.take() {
        // Inputs are a name component: far below the pipe buffer.
        let _ = stdin.write_all(input);
    }
    let output = child.wait_with_output().map_err(spawn_err)?;
    if output.status.success() {
        return Ok(output.stdout);
    }
    Err(DicomFilesError::Command {
        command: line,
        stderr: format!(
            "{}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ),
    })
}

fn find_tool(program: &'static str, package: &'static str) -> Result<PathBuf, DicomFilesError> {
    crate::testnet::cmd::find_in_clean_path(program)
        .ok_or(DicomFilesError::Missing { program, package })
}

fn io_err<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> DicomFilesError + 'a {
    move |source| DicomFilesError::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_the_standard_example() {
        assert_eq!(
            encode_iso_2022_ir_87(YAMADA_TAROU).unwrap(),
            YAMADA_TAROU_ISO_2022_IR_87
        );
        assert_eq!(encode_iso_2022_ir_87("Doe^John").unwrap(), b"Doe^John");
        // Half-width katakana is not in JIS X 0208.
        assert!(encode_iso_2022_ir_87("ﾔﾏﾀﾞ").is_err());
    }

    #[test]
    fn uids_are_valid_and_differ() {
        let (a, b) = (new_uid(), new_uid());
        assert_ne!(a, b);
        for uid in [&a, &b] {
            check_uid("uid", uid).unwrap();
        }
        assert!(check_uid("uid", "1.02.3").is_err());
        assert!(check_uid("uid", "1..3").is_err());
    }

    #[test]
    fn sizes() {
        let size = MultiFrame::at_least(100 << 20);
        assert_eq!((size.rows, size.columns, size.frames), (512, 512, 200));
        assert_eq!(size.pixel_bytes(), 100 << 20);
        assert_eq!(MultiFrame::at_least(1).frames, 1);
        assert_eq!(MultiFrame::at_least((100 << 20) + 1).frames, 201);
    }

    #[test]
    fn japanese_ct_round_trips_through_the_reader() {
        let dir = tempfile::tempdir().unwrap();
        let ids = Ids::new("TSU-0001");
        let path = japanese_ct(dir.path(), &ids).unwrap();
        let file = DicomFile::read(&path).unwrap();
        assert_eq!(file.transfer_syntax(), EXPLICIT_VR_LITTLE_ENDIAN);
        assert_eq!(
            file.element(0x0010, 0x0010).unwrap(),
            YAMADA_TAROU_ISO_2022_IR_87
        );
        assert_eq!(
            file.string(0x0008, 0x0005).as_deref(),
            Some("\\ISO 2022 IR 87")
        );
        assert_eq!(file.string(0x0010, 0x0020).as_deref(), Some("TSU-0001"));
        assert_eq!(
            file.string(0x0020, 0x000d).as_deref(),
            Some(ids.study_instance_uid.as_str())
        );
        assert_eq!(file.element(0x7fe0, 0x0010).unwrap().len(), 64 * 64 * 2);
        assert_eq!(file.tags().last(), Some((0x7fe0, 0x0010)));
        assert_eq!(file.data_set_without_padding(), file.data_set());
    }
}
