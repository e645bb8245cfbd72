//! `tsunagi ssmix2 scan ROOT` and `tsunagi ssmix2 check ROOT`: inventory and conformance of
//! an SS-MIX2 storage, without any service running. The storage is only read.
//! `tsunagi ssmix2 mount`: the storage's SMB share, mounted for the sync (exit 0 mounted or
//! nothing to mount, 1 not mounted, 3 invalid config).
//!
//! `scan --json` is a contract for scripts: one JSON object per file, in path order, then a
//! last line `{"summary": {...}}` (see `docs/ssmix2.md`). Exit codes: 0 the scan ran
//! (whatever it found), 1 the root could not be read. `check` exits 1 when any file is
//! quarantined.

use std::collections::BTreeMap;
use std::io::{self, BufWriter, Write as _};
use std::path::{Path, PathBuf};

use clap::Subcommand;
use ssmix2::reason::{Reason, Severity};
use ssmix2::scan::{self, Entry, NoCache, Options, Summary};
use tsunagi_runtime::exit_code;

#[derive(Debug, Subcommand)]
pub(crate) enum Ssmix2Command {
    /// Inventory a storage: every file with its status and, if any, the reason.
    Scan {
        root: PathBuf,
        /// One JSON object per line per file, then a summary line.
        #[arg(long)]
        json: bool,
        /// The root is an extended storage (拡張ストレージ).
        #[arg(long)]
        extended: bool,
    },
    /// A conformance report for a person: counts, then the worst problems first (日本語/English).
    Check {
        root: PathBuf,
        /// The root is an extended storage (拡張ストレージ).
        #[arg(long)]
        extended: bool,
    },
    /// Mounts `[ssmix2.share]` (the EMR server's SMB share) read-only at `ssmix2.storage`
    /// for the sync's user; nothing to do without one. Needs CAP_SYS_ADMIN: the image's
    /// `tsunagi-share.service` runs it, and again until it succeeds.
    Mount {
        /// The configuration file.
        #[arg(long, env = "TSUNAGI_CONFIG", default_value = tsunagi_config::DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
}

pub(crate) fn ssmix2(command: Ssmix2Command) -> u8 {
    match command {
        Ssmix2Command::Scan {
            root,
            json,
            extended,
        } => scan_cmd(&root, json, options(extended)),
        Ssmix2Command::Check { root, extended } => check_cmd(&root, options(extended)),
        Ssmix2Command::Mount { config } => match parse_only(&config) {
            Err(code) => code,
            Ok(cfg) => mount_cmd(&cfg),
        },
    }
}

/// The config, validated, without checking the other services' secret files: the mount
/// runs as root without CAP_DAC_OVERRIDE, so it cannot even look into their state
/// directories. It checks its own password file when it reads it.
fn parse_only(path: &Path) -> Result<tsunagi_config::Config, u8> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        eprintln!("tsunagi: cannot read {}: {e}", path.display());
        exit_code::CONFIG
    })?;
    tsunagi_config::parse(&text, path).map_err(|problems| {
        let text = problems.to_string();
        eprintln!("{}", text.trim_end());
        exit_code::CONFIG
    })
}

/// `tsunagi ssmix2 mount`: one line on stdout or stderr (the journal), never the password.
fn mount_cmd(cfg: &tsunagi_config::Config) -> u8 {
    let Some((x, share)) = cfg
        .ssmix2
        .as_ref()
        .filter(|x| x.enabled)
        .and_then(|x| Some((x, x.share.as_ref()?)))
    else {
        println!("tsunagi: no SS-MIX2 share configured; nothing to mount");
        return exit_code::OK;
    };
    let user = match nix::unistd::User::from_name(ssmix2_sync::USER) {
        Ok(Some(user)) => user,
        Ok(None) => {
            eprintln!(
                "tsunagi: the sync's user {} does not exist yet (systemd-sysusers makes it)",
                ssmix2_sync::USER
            );
            return exit_code::FAILURE;
        }
        Err(e) => {
            eprintln!("tsunagi: cannot look up {}: {e}", ssmix2_sync::USER);
            return exit_code::FAILURE;
        }
    };
    let storage = x.storage.as_path();
    match ssmix2_sync::share::mount(share, storage, user.uid.as_raw(), user.gid.as_raw()) {
        Ok(how) => {
            let what = match how {
                ssmix2_sync::share::Mounted::Now => "mounted",
                ssmix2_sync::share::Mounted::Already => "already mounted",
                ssmix2_sync::share::Mounted::Again => {
                    "mounted again (the old mount no longer answered)"
                }
            };
            println!(
                "tsunagi: SS-MIX2 share {} {what} at {} (read-only, SMB {})",
                share.unc(),
                storage.display(),
                share.version.mount_option()
            );
            exit_code::OK
        }
        Err(e) => {
            eprintln!("tsunagi: {}", tsunagi_runtime::child::error_chain(&e));
            exit_code::FAILURE
        }
    }
}

fn options(extended: bool) -> Options {
    if extended {
        Options::extended()
    } else {
        Options::standard()
    }
}

fn scan_error(root: &Path, e: &scan::ScanError) -> u8 {
    eprintln!(
        "tsunagi: {}: {}",
        root.display(),
        tsunagi_runtime::child::error_chain(e)
    );
    exit_code::FAILURE
}

fn scan_cmd(root: &Path, json: bool, opts: Options) -> u8 {
    let stdout = io::stdout();
    let mut out = BufWriter::with_capacity(1 << 16, stdout.lock());
    let mut broken = false;
    if !json {
        let _ = writeln!(out, "{:<11} {:<18} {:<4} PATH", "STATUS", "REASON", "FLAG");
    }
    let result = scan::scan(root, &opts, &mut NoCache, &mut |e: Entry| {
        if broken {
            return;
        }
        let written = if json {
            serde_json::to_writer(&mut out, &e)
                .map_err(io::Error::from)
                .and_then(|()| out.write_all(b"\n"))
        } else {
            writeln!(
                out,
                "{:<11} {:<18} {:<4} {}",
                e.status.as_str(),
                e.reason.map_or("-", Reason::code),
                e.flag.map_or_else(|| "-".to_owned(), |f| f.to_string()),
                e.path
            )
        };
        // A closed pipe (`| head`) ends the output quietly.
        broken = written.is_err();
    });
    let summary = match result {
        Ok(s) => s,
        Err(e) => return scan_error(root, &e),
    };
    if !broken {
        let _ = if json {
            serde_json::to_writer(&mut out, &serde_json::json!({ "summary": summary }))
                .map_err(io::Error::from)
                .and_then(|()| out.write_all(b"\n"))
        } else {
            write_summary(&mut out, &summary)
        };
    }
    let _ = out.flush();
    exit_code::OK
}

fn write_summary(out: &mut impl io::Write, s: &Summary) -> io::Result<()> {
    writeln!(out)?;
    let statuses: Vec<String> = s
        .by_status
        .iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect();
    writeln!(out, "{} files: {}", s.files, statuses.join(", "))?;
    for (reason, n) in &s.by_reason {
        writeln!(out, "  {reason}: {n}")?;
    }
    Ok(())
}

fn check_cmd(root: &Path, opts: Options) -> u8 {
    const EXAMPLES: usize = 5;
    let mut examples: BTreeMap<Reason, Vec<String>> = BTreeMap::new();
    let result = scan::scan(root, &opts, &mut NoCache, &mut |e: Entry| {
        for r in &e.findings {
            let list = examples.entry(*r).or_default();
            if list.len() < EXAMPLES {
                list.push(e.path.clone());
            }
        }
    });
    let summary = match result {
        Ok(s) => s,
        Err(e) => return scan_error(root, &e),
    };
    let stdout = io::stdout();
    let mut out = stdout.lock();
    let _ = report(&mut out, root, &summary, &examples);
    let quarantined = summary.by_status.get("quarantined").copied().unwrap_or(0);
    if quarantined > 0 {
        exit_code::FAILURE
    } else {
        exit_code::OK
    }
}

fn report(
    out: &mut impl io::Write,
    root: &Path,
    s: &Summary,
    examples: &BTreeMap<Reason, Vec<String>>,
) -> io::Result<()> {
    let n = |k: &str| s.by_status.get(k).copied().unwrap_or(0);
    writeln!(
        out,
        "SS-MIX2 適合性レポート / conformance report: {}",
        root.display()
    )?;
    writeln!(out, "ファイル数 / files: {}", s.files)?;
    writeln!(
        out,
        "  最新版 current {}, 更新前 superseded {}, 削除 deleted {}, 隔離 quarantined {}",
        n("current"),
        n("superseded"),
        n("deleted"),
        n("quarantined")
    )?;
    let mut problems: Vec<(&Reason, u64)> = examples
        .keys()
        .map(|r| (r, s.by_reason.get(r.code()).copied().unwrap_or(0)))
        .collect();
    // The worst first: quarantine, then anomalies, then warnings; more files first.
    problems.sort_by(|a, b| {
        b.0.severity()
            .cmp(&a.0.severity())
            .then(b.1.cmp(&a.1))
            .then(a.0.cmp(b.0))
    });
    if problems.is_empty() {
        writeln!(out, "問題はありません / no problems found")?;
        return Ok(());
    }
    for (reason, count) in problems {
        let level = match reason.severity() {
            Severity::Quarantine => "隔離 QUARANTINE",
            Severity::Anomaly => "異常 ANOMALY",
            Severity::Warning => "注意 WARNING",
        };
        writeln!(out)?;
        writeln!(out, "[{level}] {} ({count})", reason.code())?;
        writeln!(out, "  {}", reason.describe_ja())?;
        writeln!(out, "  {}", reason.describe_en())?;
        for path in &examples[reason] {
            writeln!(out, "    {path}")?;
        }
        if count > examples[reason].len() as u64 {
            writeln!(
                out,
                "    … ほか {} 件 / and {} more",
                count - examples[reason].len() as u64,
                count - examples[reason].len() as u64
            )?;
        }
    }
    Ok(())
}
