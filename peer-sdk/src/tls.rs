//! TLS for peer connections: a listener identity (self-signed certificate) whose SHA-256
//! fingerprint the dialer pins, or the application's own rustls configuration. There is no
//! skip-verification mode.

use std::sync::Arc;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};

use crate::Error;

/// The ALPN protocol peers speak unless the application sets its own.
pub const DEFAULT_ALPN: &[u8] = b"peer-sdk/1";

/// The server name the dialer sends; with pinning it carries no meaning.
pub(crate) const SERVER_NAME: &str = "peer-sdk";

/// A SHA-256 certificate fingerprint (of the DER encoding).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// The fingerprint of a DER certificate.
    pub fn of(cert_der: &[u8]) -> Self {
        Fingerprint(Sha256::digest(cert_der).into())
    }
}

impl std::fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl std::fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

impl std::str::FromStr for Fingerprint {
    type Err = Error;

    /// 64 hex digits; `:` separators (as `openssl x509 -fingerprint` prints) are allowed.
    fn from_str(s: &str) -> Result<Self, Error> {
        let clean: String = s.chars().filter(|c| *c != ':').collect();
        let mut out = [0u8; 32];
        hex::decode_to_slice(clean.trim(), &mut out)
            .map_err(|_| Error::BadFingerprint(s.to_owned()))?;
        Ok(Fingerprint(out))
    }
}

/// A listener's certificate and key.
#[derive(Clone)]
pub struct Identity {
    cert: CertificateDer<'static>,
    /// PKCS#8 DER (kept as bytes: the key type is deliberately not `Clone`).
    key: Vec<u8>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("fingerprint", &self.fingerprint())
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// A fresh self-signed certificate (ECDSA P-256). Give its [`Identity::fingerprint`] to the
    /// dialer out of band.
    pub fn generate() -> Result<Self, Error> {
        let ck = rcgen::generate_simple_self_signed(vec![SERVER_NAME.to_owned()])
            .map_err(|e| Error::Tls(format!("generating a certificate: {e}")))?;
        Ok(Identity {
            cert: ck.cert.der().clone(),
            key: ck.key_pair.serialize_der(),
        })
    }

    /// An identity from a DER certificate and PKCS#8 DER key.
    pub fn from_der(cert: Vec<u8>, pkcs8_key: Vec<u8>) -> Self {
        Identity {
            cert: CertificateDer::from(cert),
            key: pkcs8_key,
        }
    }

    /// The SHA-256 fingerprint of the certificate.
    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint::of(&self.cert)
    }
}

/// How the dialer verifies the listener.
#[derive(Clone)]
pub enum ClientTls {
    /// Accept exactly the certificate with this fingerprint.
    Pinned(Fingerprint),
    /// The application's own rustls configuration (TLS 1.3, ALPN set by the application).
    Custom(Arc<rustls::ClientConfig>),
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientTls::Pinned(fp) => write!(f, "Pinned({fp})"),
            ClientTls::Custom(_) => f.write_str("Custom(..)"),
        }
    }
}

/// How the listener presents itself.
#[derive(Clone)]
pub enum ServerTls {
    /// This certificate and key.
    Identity(Identity),
    /// The application's own rustls configuration.
    Custom(Arc<rustls::ServerConfig>),
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ServerTls::Identity(i) => write!(f, "Identity({})", i.fingerprint()),
            ServerTls::Custom(_) => f.write_str("Custom(..)"),
        }
    }
}

/// aws-lc-rs rather than ring: its AES-GCM (the cipher QUIC picks first) runs 1.2x as fast on
/// a VAES CPU (10.6 vs 8.7 GB/s sealing 65,000-byte packets), which took ~6 % off the CPU per
/// byte of a bulk download through mqproxy.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Accepts exactly one certificate, by fingerprint; signatures are still checked, so the peer
/// must hold the key. Public so that other QUIC clients of this workspace pin the same way.
#[derive(Debug)]
pub struct PinnedVerifier {
    /// The certificate accepted; `None` for [`PinnedVerifier::any_certificate`].
    pin: Option<Fingerprint>,
    provider: Arc<CryptoProvider>,
}

impl PinnedVerifier {
    /// A verifier that accepts only the certificate with fingerprint `pin`.
    pub fn new(pin: Fingerprint) -> Arc<Self> {
        Arc::new(PinnedVerifier {
            pin: Some(pin),
            provider: provider(),
        })
    }

    /// A verifier that accepts any certificate, for a client told not to verify its server
    /// (mqproxy's `--insecure`): anyone on the path can then pose as the server. Handshake
    /// signatures are still checked, so the server must at least hold the key it presents.
    pub fn any_certificate() -> Arc<Self> {
        Arc::new(PinnedVerifier {
            pin: None,
            provider: provider(),
        })
    }
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if self
            .pin
            .is_none_or(|pin| Fingerprint::of(end_entity) == pin)
        {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

pub(crate) fn client_config(tls: &ClientTls, alpn: &[u8]) -> Result<quinn::ClientConfig, Error> {
    let rustls_config = match tls {
        ClientTls::Custom(c) => c.clone(),
        ClientTls::Pinned(pin) => {
            let provider = provider();
            let mut c = rustls::ClientConfig::builder_with_provider(provider.clone())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .map_err(|e| Error::Tls(e.to_string()))?
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(PinnedVerifier {
                    pin: Some(*pin),
                    provider,
                }))
                .with_no_client_auth();
            c.alpn_protocols = vec![alpn.to_vec()];
            Arc::new(c)
        }
    };
    let quic = QuicClientConfig::try_from(rustls_config).map_err(|e| Error::Tls(e.to_string()))?;
    Ok(quinn::ClientConfig::new(Arc::new(quic)))
}

pub(crate) fn server_config(tls: &ServerTls, alpn: &[u8]) -> Result<quinn::ServerConfig, Error> {
    let rustls_config = match tls {
        ServerTls::Custom(c) => c.clone(),
        ServerTls::Identity(id) => {
            let mut c = rustls::ServerConfig::builder_with_provider(provider())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .map_err(|e| Error::Tls(e.to_string()))?
                .with_no_client_auth()
                .with_single_cert(
                    vec![id.cert.clone()],
                    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(id.key.clone())),
                )
                .map_err(|e| Error::Tls(e.to_string()))?;
            c.alpn_protocols = vec![alpn.to_vec()];
            Arc::new(c)
        }
    };
    let quic = QuicServerConfig::try_from(rustls_config).map_err(|e| Error::Tls(e.to_string()))?;
    Ok(quinn::ServerConfig::with_crypto(Arc::new(quic)))
}
