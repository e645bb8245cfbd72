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
