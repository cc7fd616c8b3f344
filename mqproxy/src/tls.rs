//! TLS for the proxy: the server's certificate (from `--cert`/`--key`, or self-signed on first
//! start and kept in the state directory) and the client's verification (a pinned SHA-256
//! fingerprint, a CA file, or an explicit `--insecure`).

#![cfg(feature = "runtime")]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use peer_sdk::tls::{Fingerprint, PinnedVerifier};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::proto::ALPN;

/// The name in the self-signed certificate; a pinning client sends it as SNI.
pub const SELF_SIGNED_NAME: &str = "mqproxy";
/// File names of the kept self-signed certificate inside the state directory.
pub const CERT_FILE: &str = "server-cert.pem";
/// See [`CERT_FILE`].
pub const KEY_FILE: &str = "server-key.pem";

/// TLS setup errors; each names the file or setting at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A certificate or key file could not be read or parsed.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// Generating the self-signed certificate failed.
    #[error("generating a self-signed certificate: {0}")]
    Generate(String),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// Where the server's certificate comes from.
#[derive(Debug, Clone)]
pub enum ServerCert {
    /// PEM certificate chain and PEM private key.
    Files {
        /// Certificate chain (leaf first).
        cert: PathBuf,
        /// Private key (PKCS#8, PKCS#1 or SEC1).
        key: PathBuf,
    },
    /// A self-signed certificate kept in this directory, created on first start.
    SelfSigned(PathBuf),
}

/// How the client verifies the server.
#[derive(Debug, Clone)]
pub enum ClientVerify {
    /// Accept exactly the certificate with this SHA-256 fingerprint.
    Pinned(Fingerprint),
    /// Verify the chain against the CA certificates in this PEM file and the server name.
    Ca(PathBuf),
    /// Accept any certificate (`--insecure`): no protection against an active attacker.
    Insecure,
}

/// The same provider as peer-sdk's (aws-lc-rs, for its faster AES-GCM; see there).
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn file_err(path: &Path, reason: impl ToString) -> TlsError {
    TlsError::File {
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}

/// A loaded server certificate.
#[derive(Debug)]
pub struct LoadedCert {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    /// SHA-256 of the leaf certificate: what clients pin.
    pub fingerprint: Fingerprint,
    /// Whether this start created the certificate.
    pub created: bool,
}

/// Loads (or, for [`ServerCert::SelfSigned`], creates once and then reloads) the certificate.
pub fn load_server_cert(src: &ServerCert) -> Result<LoadedCert, TlsError> {
    let (cert_path, key_path, created) = match src {
        ServerCert::Files { cert, key } => (cert.clone(), key.clone(), false),
        ServerCert::SelfSigned(dir) => {
            let cert = dir.join(CERT_FILE);
            let key = dir.join(KEY_FILE);
            let created = !cert.exists();
            if created {
                create_self_signed(dir, &cert, &key)?;
            }
            (cert, key, created)
        }
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert_path)
        .map_err(|e| file_err(&cert_path, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_err(&cert_path, e))?;
    let leaf = chain
        .first()
        .ok_or_else(|| file_err(&cert_path, "no certificate in the file"))?;
    let fingerprint = Fingerprint::of(leaf);
    let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| file_err(&key_path, e))?;
    Ok(LoadedCert {
        chain,
        key,
        fingerprint,
        created,
    })
}

fn create_self_signed(dir: &Path, cert: &Path, key: &Path) -> Result<(), TlsError> {
    std::fs::create_dir_all(dir).map_err(|e| file_err(dir, e))?;
    let ck = rcgen::generate_simple_self_signed(vec![SELF_SIGNED_NAME.to_owned()])
        .map_err(|e| TlsError::Generate(e.to_string()))?;
    write_private(key, ck.key_pair.serialize_pem().as_bytes())?;
    std::fs::write(cert, ck.cert.pem()).map_err(|e| file_err(cert, e))?;
    Ok(())
}

/// Writes a file readable by its owner only (the private key).
fn write_private(path: &Path, data: &[u8]) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| file_err(path, e))?;
    f.write_all(data).map_err(|e| file_err(path, e))
}

/// The quinn server configuration for a loaded certificate.
pub fn server_config(cert: LoadedCert) -> Result<quinn::ServerConfig, TlsError> {
    server_config_from(rustls_server_config(cert)?)
}

/// The quinn server configuration over an existing rustls one (shared with a relay front end).
pub fn server_config_from(
    rustls: Arc<rustls::ServerConfig>,
) -> Result<quinn::ServerConfig, TlsError> {
    let quic = QuicServerConfig::try_from(rustls).map_err(|e| TlsError::Config(e.to_string()))?;
    Ok(quinn::ServerConfig::with_crypto(Arc::new(quic)))
}

/// The rustls server configuration (TLS 1.3, ALPN `mqproxy-tcp/1`) behind [`server_config`];
/// the relay path hands it to peer-sdk.
pub fn rustls_server_config(cert: LoadedCert) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let mut c = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(cert.chain, cert.key)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    c.alpn_protocols = vec![ALPN.to_vec()];
    c.max_early_data_size = 0;
    Ok(Arc::new(c))
}

/// The quinn client configuration for a verification mode.
pub fn client_config(verify: &ClientVerify) -> Result<quinn::ClientConfig, TlsError> {
    let quic = QuicClientConfig::try_from(rustls_client_config(verify)?)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    Ok(quinn::ClientConfig::new(Arc::new(quic)))
}

/// The rustls client configuration (TLS 1.3, ALPN `mqproxy-tcp/1`) behind [`client_config`];
/// the relay path hands it to peer-sdk.
pub fn rustls_client_config(verify: &ClientVerify) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let provider = provider();
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let mut c = match verify {
        ClientVerify::Ca(path) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(path).map_err(|e| file_err(path, e))? {
                roots
                    .add(cert.map_err(|e| file_err(path, e))?)
                    .map_err(|e| file_err(path, e))?;
            }
            if roots.is_empty() {
                return Err(file_err(path, "no CA certificate in the file"));
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        ClientVerify::Pinned(pin) => builder
            .dangerous()
            .with_custom_certificate_verifier(PinnedVerifier::new(*pin))
            .with_no_client_auth(),
        ClientVerify::Insecure => builder
            .dangerous()
            .with_custom_certificate_verifier(PinnedVerifier::any_certificate())
            .with_no_client_auth(),
    };
    c.alpn_protocols = vec![ALPN.to_vec()];
    Ok(Arc::new(c))
}
