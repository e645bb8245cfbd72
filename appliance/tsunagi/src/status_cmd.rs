//! `tsunagi status`: ask the running supervisor and print a table or JSON.

use std::path::Path;

use tsunagi_runtime::control;
use tsunagi_runtime::exit_code;
use tsunagi_runtime::status::StatusReport;

pub(crate) fn status(config: &Path, socket: Option<&Path>, json: bool) -> u8 {
    let socket = match socket {
        Some(s) => s.to_owned(),
        None => match tsunagi_config::load(config) {
            Ok(cfg) => cfg.paths.runtime_dir.as_path().join(control::SOCKET_NAME),
            // The file may have been broken after the supervisor started: status is exactly
            // what an operator needs then, so take the runtime directory alone if we can.
            Err(e) => match runtime_dir_only(config) {
                Some(dir) => {
                    eprintln!(
                        "tsunagi: warning: {} has problems (see `tsunagi config check`); the running supervisor keeps its last valid config",
                        config.display()
                    );
                    dir.join(control::SOCKET_NAME)
                }
                None => {
                    eprintln!(
                        "tsunagi: {} (give the control socket with --socket)",
                        crate::error_chain(&e)
                    );
                    return exit_code::CONFIG;
                }
            },
        },
    };
    match control::query_status(&socket) {
        Ok(report) => {
            if json {
                match serde_json::to_string_pretty(&report) {
                    Ok(text) => println!("{text}"),
                    Err(e) => {
                        eprintln!("tsunagi: {e}");
                        return exit_code::FAILURE;
                    }
                }
            } else {
                print!("{}", table(&report));
            }
            exit_code::OK
        }
        Err(e) => {
            eprintln!("tsunagi: {}", crate::error_chain(&e));
            exit_code::NO_SUPERVISOR
        }
    }
}

/// `paths.runtime-dir` of a config file that does not validate as a whole.
fn runtime_dir_only(config: &Path) -> Option<std::path::PathBuf> {
    let text = std::fs::read_to_string(config).ok()?;
    let value: toml::Table = toml::from_str(&text).ok()?;
    let dir = value.get("paths")?.get("runtime-dir")?.as_str()?;
    let dir = std::path::PathBuf::from(dir);
    dir.is_absolute().then_some(dir)
}

fn duration(secs: Option<u64>) -> String {
    match secs {
        None => "-".to_owned(),
        Some(s) if s < 60 => format!("{s}s"),
        Some(s) if s < 3600 => format!("{}m{:02}s", s / 60, s % 60),
        Some(s) if s < 86400 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        Some(s) => format!("{}d{:02}h", s / 86400, (s % 86400) / 3600),
    }
}

fn table(report: &StatusReport) -> String {
    let sup = &report.supervisor;
    let mut out = format!(
        "tsunagi {} — supervisor pid {}, up {}, {}, {}\n",
        sup.version,
        sup.pid,
        duration(Some(sup.uptime_secs)),
        if sup.ready { "ready" } else { "starting" },
        if sup.privileged {
            "privilege separation on"
        } else {
            "unprivileged (development)"
        },
    );
    let rows: Vec<[String; 7]> = report
        .services
        .iter()
        .map(|s| {
            let detail = match (&s.last_error, s.state.as_str()) {
                (Some(err), "backoff" | "failed") => format!("last error: {err}"),
                _ => s.summary.clone(),
            };
            [
                s.name.clone(),
                s.state.as_str().to_owned(),
                format!("{:?}", s.health).to_lowercase(),
                s.pid.map_or("-".to_owned(), |p| p.to_string()),
                s.restarts.to_string(),
                duration(s.uptime_secs),
                detail,
            ]
        })
        .collect();
    let header = [
        "SERVICE", "STATE", "HEALTH", "PID", "RESTARTS", "UPTIME", "SUMMARY",
    ]
    .map(String::from);
    let mut widths = header.clone().map(|h| h.chars().count());
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for row in std::iter::once(&header).chain(&rows) {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<width$}  ", width = widths[i]));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}
