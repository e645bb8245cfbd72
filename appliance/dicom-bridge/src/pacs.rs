//! Associations with the network PACS, over TCP or over DICOM TLS (PS3.15 Annex B, the
//! Basic TLS Secure Transport Connection Profile, under the box's one TLS policy:
//! `tsunagi_runtime::http::TLS_POLICY`). With TLS the PACS's certificate must chain to the
//! network CA and name the address connected to (an IP address in its SAN), and the box
//! presents its certificate; the files are read again when one of them changes (a renewal).
//!
//! [`Peer`] is what the forwarder and the query/retrieve proxy need of an association (PDUs
//! both ways, the peer's maximum PDU length), for either transport and for the SCP's own
//! associations (a C-GET's C-STOREs to a viewer).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use dicom_ul::Pdu;
use dicom_ul::association::client::AsyncTlsStream;
use dicom_ul::association::{
    Association, AsyncAssociation, AsyncClientAssociation, AsyncServerAssociation,
};
use dicom_ul::pdu::PresentationContextNegotiated;
use dicom_ul::{ClientAssociationOptions, association::Error as UlError};
use tokio::net::TcpStream;
use tsunagi_runtime::http::{ReloadingTls, TlsFileError};

/// What the forwarder's and the proxy's exchanges need of an association.
pub trait Peer: Send {
    fn send_pdu(&mut self, pdu: &Pdu) -> impl Future<Output = Result<(), UlError>> + Send;
    fn receive_pdu(&mut self) -> impl Future<Output = Result<Pdu, UlError>> + Send;
    /// The largest PDU the peer takes.
    fn peer_max_pdu(&self) -> u32;
}

/// An association the box requested of the PACS (or of a viewer, for C-MOVE).
pub enum PacsAssociation {
    Tcp(Box<AsyncClientAssociation<TcpStream>>),
    Tls(Box<AsyncClientAssociation<AsyncTlsStream>>),
}

/// Dispatches to the association of either transport.
macro_rules! either {
    ($assoc:expr, $a:ident => $body:expr) => {
        match $assoc {
            PacsAssociation::Tcp($a) => $body,
            PacsAssociation::Tls($a) => $body,
        }
    };
}

impl PacsAssociation {
    pub fn presentation_contexts(&self) -> &[PresentationContextNegotiated] {
        either!(self, a => a.presentation_contexts())
    }

    /// The TCP connection underneath (for its socket options).
    pub fn tcp(&mut self) -> &TcpStream {
        match self {
            PacsAssociation::Tcp(a) => a.inner_stream(),
            PacsAssociation::Tls(a) => a.inner_stream().get_ref().0,
        }
    }

    /// A-RELEASE-RQ, then the A-RELEASE-RP waited for.
    pub async fn release(self) -> Result<(), UlError> {
        either!(self, a => a.release().await)
    }

    /// A-ABORT.
    pub async fn abort(self) -> Result<(), UlError> {
        either!(self, a => a.abort().await)
    }
}

impl Peer for PacsAssociation {
    async fn send_pdu(&mut self, pdu: &Pdu) -> Result<(), UlError> {
        either!(self, a => a.send(pdu).await)
    }

    async fn receive_pdu(&mut self) -> Result<Pdu, UlError> {
        either!(self, a => a.receive().await)
    }

    fn peer_max_pdu(&self) -> u32 {
        // The requestor's peer is the acceptor.
        either!(self, a => a.acceptor_max_pdu_length())
    }
}

impl Peer for AsyncServerAssociation<TcpStream> {
    async fn send_pdu(&mut self, pdu: &Pdu) -> Result<(), UlError> {
        AsyncAssociation::send(self, pdu).await
    }

    async fn receive_pdu(&mut self) -> Result<Pdu, UlError> {
        AsyncAssociation::receive(self).await
    }

    fn peer_max_pdu(&self) -> u32 {
        Association::peer_max_pdu_length(self)
    }
}

/// Why no association came about.
#[derive(Debug, thiserror::Error)]
pub enum EstablishError {
    #[error("the association was refused or failed")]
    Associate(#[source] UlError),
    /// The TLS handshake was refused (the reason from `tsunagi_runtime::http::tls_refusal`).
    #[error("DICOM TLS with the PACS at {addr} failed: {reason}")]
    TlsRefused { addr: SocketAddr, reason: String },
    #[error("the DICOM TLS files cannot be used")]
    TlsFiles(#[source] Arc<TlsFileError>),
    #[error("no A-ASSOCIATE-AC within {0:?}")]
    Timeout(Duration),
}

/// Requests an association at `addr` with `options` (AE titles, contexts, timeouts); over
/// TLS with `tls`. The connect, the handshake and the A-ASSOCIATE-AC within `within`.
pub async fn establish(
    options: ClientAssociationOptions<'_>,
    addr: SocketAddr,
    tls: Option<&ReloadingTls>,
    within: Duration,
) -> Result<PacsAssociation, EstablishError> {
    let assoc = match tls {
        None => tokio::time::timeout(within, options.establish_async(addr))
            .await
            .map_err(|_| EstablishError::Timeout(within))?
            .map(|a| PacsAssociation::Tcp(Box::new(a))),
        Some(tls) => {
            let config = tls.current().map_err(EstablishError::TlsFiles)?;
            let options = options
                .tls_config(config)
                .server_name(&addr.ip().to_string());
            tokio::time::timeout(within, options.establish_tls_async(addr))
                .await
                .map_err(|_| EstablishError::Timeout(within))?
                .map(|a| PacsAssociation::Tls(Box::new(a)))
        }
    };
    let mut assoc = assoc.map_err(|e| match tsunagi_runtime::http::tls_refusal(&e) {
        Some(reason) if tls.is_some() => EstablishError::TlsRefused { addr, reason },
        _ => EstablishError::Associate(e),
    })?;
    let _ = assoc.tcp().set_nodelay(true);
    Ok(assoc)
}
