//! Writes a small sample storage: `cargo run -p ssmix2 --example sample_storage DIR [PATIENTS]`.
use std::path::PathBuf;

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(args.next().unwrap_or_else(|| "sample-storage".into()));
    let n = args.next().and_then(|n| n.parse().ok()).unwrap_or(3);
    ssmix2::build::sample_storage(&dir, 1, n)?;
    println!("wrote {n} patients to {}", dir.display());
    Ok(())
}
