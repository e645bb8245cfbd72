//! `cargo xtask release VERSION`: a release of the appliance for the update channel (issue
//! 18). Builds the image of `VERSION` (`target/releases/VERSION/`, cached like `cargo xtask
//! image`), checks its RAUC bundle against the update CA, and publishes every release built
//! so far into the channel, a TUF repository of static files (`target/channel/`: serve it
//! from any web server), signed with the channel keys in `KEYS/channel/` under the root the
//! image carries (`KEYS/update-root.json`).
//!
//! Each bundle is a target `tsunagi-VERSION.raucb` whose metadata says its version, the
//! compatible `tsunagi` and its waves: every box from the moment it is first published, or
//! `TSUNAGI_WAVES` (`SEEDS_BELOW@RFC3339,…`, e.g. `64@2026-12-07T00:00:00Z,2048@2026-12-09T00:00:00Z`).
//! With `--fault never-ready` (tests only), the release is built with a supervisor that never
//! becomes ready (`image/build.sh`'s `FAULT`): the update tests' rollback.
//!
//! The metadata expires: the timestamp in 7 days, the snapshot in 30, the targets in 90
//! (publish again before then, or every box refuses the channel).

use std::fs;
use std::path::Path;

use anyhow::{Context as _, bail};
use tsunagi_provision::release::{Bundle, ChannelKeys, Expiries, publish};
use update::release::{Custom, SEEDS, Version, Wave};

pub(crate) fn run(args: &[&str]) -> anyhow::Result<()> {
    let (version, fault) = match args {
        [version] => (version, None),
        [version, "--fault", "never-ready"] => (version, Some(crate::image::Fault::NeverReady)),
        _ => bail!("usage: cargo xtask release VERSION [--fault never-ready]"),
    };
    let parsed: Version = version.parse()?;
    let version = parsed.to_string();
    let (target, keys) = crate::image::prepare()?;
    let out = target
        .join("releases")
        .join(format!("{version}{}", fault.map_or("", |_| "-fault")));
    crate::image::build(&out, &keys, &version, fault)?;
    let checked = crate::image::check_bundle(&out.join("tsunagi.raucb"), &keys, &version)?;
    println!("release: {checked}");

    // Every release built so far, each with the metadata it was first published with.
    let kept = target.join("channel-bundles");
    fs::create_dir_all(&kept)?;
    let name = format!("tsunagi-{version}.raucb");
    fs::copy(out.join("tsunagi.raucb"), kept.join(&name))?;
    let meta = kept.join(format!("tsunagi-{version}.json"));
    if !meta.exists() {
        let custom = Custom {
            version: parsed,
            compatible: "tsunagi".to_owned(),
            waves: waves()?,
        };
        custom.validate()?;
        fs::write(&meta, serde_json::to_vec_pretty(&custom)?)?;
    }
    let bundles = bundles(&kept)?;
    let now = jiff::Timestamp::now();
    let days = |n: i64| now + jiff::SignedDuration::from_hours(24 * n);
    let channel = target.join("channel");
    let published = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(publish(
            &channel,
            &keys.join("update-root.json"),
            &ChannelKeys::open(&keys.join("channel")),
            &bundles,
            &Expiries {
                targets: days(90),
                snapshot: days(30),
                timestamp: days(7),
            },
        ))?;
    println!(
        "release: {version} published; the channel {} (metadata version {published}) lists {}",
        channel.display(),
        bundles
            .iter()
            .map(|b| b.custom.version.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}

/// `TSUNAGI_WAVES`, or every box from now.
fn waves() -> anyhow::Result<Vec<Wave>> {
    let Ok(text) = std::env::var("TSUNAGI_WAVES") else {
        return Ok(vec![Wave {
            seeds_below: SEEDS,
            starts: jiff::Timestamp::now(),
        }]);
    };
    text.split(',')
        .map(|w| {
            let (bound, starts) = w
                .split_once('@')
                .with_context(|| format!("TSUNAGI_WAVES: {w:?} is not SEEDS_BELOW@RFC3339"))?;
            Ok(Wave {
                seeds_below: bound.trim().parse()?,
                starts: starts.trim().parse()?,
            })
        })
        .collect()
}

/// The bundles kept in `dir` with their metadata (`tsunagi-VERSION.raucb` and `.json`).
fn bundles(dir: &Path) -> anyhow::Result<Vec<Bundle>> {
    let mut found = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "raucb") {
            let meta = path.with_extension("json");
            let custom: Custom = serde_json::from_slice(
                &fs::read(&meta).with_context(|| format!("read {}", meta.display()))?,
            )?;
            found.push(Bundle { path, custom });
        }
    }
    found.sort_by(|a, b| a.custom.version.cmp(&b.custom.version));
    Ok(found)
}
