//! Data-set element builders for the crate's tests.

/// An explicit VR little endian element (4-byte length for OB, OW, SQ, UN, UT), padded to
/// an even length.
pub(crate) fn explicit(g: u16, e: u16, vr: &[u8; 2], value: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&g.to_le_bytes());
    v.extend_from_slice(&e.to_le_bytes());
    v.extend_from_slice(vr);
    let long = matches!(vr, b"OB" | b"OW" | b"SQ" | b"UN" | b"UT");
    let mut value = value.to_vec();
    if value.len() % 2 == 1 {
        value.push(if vr == b"UI" { 0 } else { b' ' });
    }
    if long {
        v.extend_from_slice(&[0, 0]);
        v.extend_from_slice(&u32::try_from(value.len()).unwrap().to_le_bytes());
    } else {
        v.extend_from_slice(&u16::try_from(value.len()).unwrap().to_le_bytes());
    }
    v.extend_from_slice(&value);
    v
}

/// An implicit VR little endian element.
pub(crate) fn implicit(g: u16, e: u16, value: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&g.to_le_bytes());
    v.extend_from_slice(&e.to_le_bytes());
    v.extend_from_slice(&u32::try_from(value.len()).unwrap().to_le_bytes());
    v.extend_from_slice(value);
    v
}

/// The real consent service on `store`, its decision socket in `dir` (no FHIR, no audit
/// service, no desk), served until the token is cancelled: its shared state, the token and
/// the socket's path. (In a Tokio runtime.)
pub(crate) fn consent_service(
    dir: &std::path::Path,
    store: consent::store::Store,
) -> (
    std::sync::Arc<consent::service::Shared>,
    tokio_util::sync::CancellationToken,
    std::path::PathBuf,
) {
    let settings = consent::service::Settings {
        freshness_bound: std::time::Duration::from_secs(86_400),
        runtime_dir: dir.to_owned(),
        fhir: None,
        pull_interval: std::time::Duration::from_secs(60),
        audit_socket: None,
        desk_dir: None,
    };
    let listener = consent::service::bind(&settings).unwrap();
    let shared = consent::service::Shared::new(store, settings);
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(consent::service::serve(
        listener,
        shared.clone(),
        stop.clone(),
    ));
    (shared, stop, dir.join(consent::service::SOCKET_NAME))
}
