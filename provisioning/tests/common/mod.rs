//! What the provisioning tests share: an operator directory with two clinics, media and
//! their tokens, CSRs, and the hub's peers recorded instead of set.
#![allow(dead_code, unreachable_pub)] // Each test file uses a different part of it.

use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use tsunagi_medium::enroll::EnrollRequest;
use tsunagi_provision::hub::HubPeers;
use tsunagi_provision::{Init, Operator};

pub const HUB_KEY: &str = "FqGPA/dw/H+9j+QYoKYEg1ofmejzlvrfqqa+t4OnBy4=";
pub const BOX_KEY: &str = "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=";
pub const OTHER_BOX_KEY: &str = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=";
pub const CODE: &str = "1312345678";

/// The hub's peers as the server set them: key → address.
#[derive(Default)]
pub struct Recorded {
    pub peers: Mutex<Vec<(String, Ipv4Addr)>>,
    pub broken: Mutex<bool>,
}

impl HubPeers for Recorded {
    fn set(&self, key: &str, address: Ipv4Addr, previous: Option<&str>) -> Result<(), String> {
        if *self.broken.lock().unwrap() {
            return Err("the hub's interface is gone".into());
        }
        let mut peers = self.peers.lock().unwrap();
        if let Some(p) = previous {
            peers.retain(|(k, _)| k != p);
        }
        peers.retain(|(k, _)| k != key);
        peers.push((key.to_owned(), address));
        Ok(())
    }
    fn remove(&self, key: &str) -> Result<(), String> {
        self.peers.lock().unwrap().retain(|(k, _)| k != key);
        Ok(())
    }
}

/// What `init` reads: a network CA certificate (a placeholder: the operator's tool only
/// carries it) and a clinic config template, written into `work`.
pub fn inputs(work: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let ca = work.join("network-ca.pem");
    std::fs::write(
        &ca,
        "-----BEGIN CERTIFICATE-----\nTEST\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let template = work.join("template.toml");
    std::fs::write(
        &template,
        "version = 1\n\n[site]\nfacility-code = \"0000000000\"\nae-title = \"PLACEHOLDER\"\n\n\
         [paths]\nstate-dir = \"/var/lib/tsunagi\"\nruntime-dir = \"/run/tsunagi\"\n\n\
         [tunnel]\nhub-endpoint = \"placeholder:1\"\nhub-public-key = \"HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=\"\n\
         address = \"10.99.0.2/24\"\nhub-subnets = [\"10.98.0.0/24\"]\nhealth-url = \"http://10.98.0.1:8080/health\"\n",
    )
    .unwrap();
    (ca, template)
}

pub fn operator(work: &Path) -> Operator {
    let (ca, template) = inputs(work);
    let dir = work.join("operator");
    std::fs::create_dir_all(&dir).unwrap();
    Operator::init(
        &dir,
        &Init {
            name: "TOKYO-TEST".into(),
            hub_public_key: HUB_KEY.into(),
            hub_endpoint: "hub.example.test:51820".into(),
            hub_ca: ca,
            pool: "10.99.0.0/24".into(),
            enrollment_url: "https://10.250.0.1:8443".into(),
            template,
            signing_key: None,
            box_ca: None,
        },
    )
    .unwrap();
    let mut op = Operator::open(&dir).unwrap();
    op.add_clinic(CODE, "つなぎ内科", "TSUNAGI", &Default::default())
        .unwrap();
    op.add_clinic("1319999999", "ほかの医院", "OTHER", &Default::default())
        .unwrap();
    op
}

/// A medium for `code`; its token.
pub fn token(op: &mut Operator, work: &Path, code: &str, valid: Duration) -> String {
    let out = work.join(format!("medium-{}", fastrand_name()));
    let (b, _) = op
        .write_medium(
            code,
            tsunagi_medium::Kind::Provision,
            Duration::from_secs(86_400),
            valid,
            &[],
            &out,
        )
        .unwrap();
    b.enrollment.unwrap().token
}

pub fn fastrand_name() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// A CSR for a new key; (CSR PEM, the key).
pub fn csr(cn: &str) -> (String, rcgen::KeyPair) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["evil.example".to_owned()]).unwrap();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, cn);
    let pem = params.serialize_request(&key).unwrap().pem().unwrap();
    (pem, key)
}

pub fn request(token: &str, code: &str, serial: &str, wg: &str) -> (EnrollRequest, rcgen::KeyPair) {
    let (csr_pem, key) = csr("anything the box asks for");
    (
        EnrollRequest {
            token: token.to_owned(),
            facility_code: code.to_owned(),
            box_serial: serial.to_owned(),
            wireguard_public_key: wg.to_owned(),
            csr_pem,
        },
        key,
    )
}

pub fn now() -> i64 {
    tsunagi_provision::now()
}

pub fn policy() -> tsunagi_provision::enroll::Policy {
    tsunagi_provision::enroll::Policy {
        lifetime: tsunagi_provision::ca::BOX_CERT_LIFETIME,
        renew_url: "https://10.98.0.1:8443".into(),
    }
}

pub fn rustls_pem(pem: &str) -> Vec<u8> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .unwrap()
        .unwrap()
        .to_vec()
}

pub fn serial_of(pem: &str) -> String {
    let der = rustls_pem(pem);
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    cert.tbs_certificate
        .raw_serial()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// An operator directory whose clinic [`CODE`] has enrolled box QEMU-1 (with [`BOX_KEY`]):
/// the operator, its box CA, the hub's recorded peers, what the box got, and its
/// certificate's serial (hex).
pub struct EnrolledBox {
    pub op: Operator,
    pub ca: tsunagi_provision::ca::BoxCa,
    pub hub: Recorded,
    pub first: tsunagi_medium::enroll::Enrolled,
    pub serial: String,
    /// The token it enrolled with (spent).
    pub token: String,
}

pub fn enrolled_box(work: &Path) -> EnrolledBox {
    let mut op = operator(work);
    let ca = op.box_ca().unwrap();
    let hub = Recorded::default();
    let token = token(&mut op, work, CODE, Duration::from_secs(3600));
    let (req, _) = request(&token, CODE, "QEMU-1", BOX_KEY);
    let first = op.enroll(&ca, &hub, &policy(), &req, now()).unwrap();
    let serial = serial_of(&first.certificate_pem);
    EnrolledBox {
        op,
        ca,
        hub,
        first,
        serial,
        token,
    }
}
