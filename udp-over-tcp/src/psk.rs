//! The optional `--psk` handshake: a stranger who can reach the TCP port cannot take the tunnel
//! over (the original tools let any new connection replace it).
//!
//! Without `--psk` nothing is sent, so the wire stays byte-compatible with the original tools.
//! With it, before any frame (N = 32 random bytes, T = HMAC-SHA256 with the key, 32 bytes):
//!
//! 1. connector → listener: `Nc`
//! 2. listener → connector: `Nl | HMAC(psk, "udp-over-tcp psk v1 listener" | Nc | Nl)`
//! 3. connector → listener: `HMAC(psk, "udp-over-tcp psk v1 connector" | Nc | Nl)`
//!
//! Each side checks the other's tag (in constant time) and closes the connection on a mismatch;
//! the listener only lets a connection replace the live tunnel after step 3 checks out. Fresh
//! nonces from both sides defeat replay, the distinct labels defeat reflection. It authenticates
//! the connection's start only: frames are neither encrypted nor MACed, so someone on the path
//! who can inject into the TCP stream is out of scope (run the tunnel over SSH or WireGuard for
//! that, as the originals recommend).

use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Nonce and tag length.
pub const LEN: usize = 32;
const LABEL_LISTENER: &[u8] = b"udp-over-tcp psk v1 listener";
const LABEL_CONNECTOR: &[u8] = b"udp-over-tcp psk v1 connector";

/// Why a handshake failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PskError {
    /// The peer's tag is wrong: it does not know the key (or uses another).
    #[error("the peer failed pre-shared-key authentication (wrong or missing --psk)")]
    BadTag,
    /// The connection failed during the handshake.
    #[error("connection failed during the --psk handshake: {0}")]
    Io(#[from] std::io::Error),
}

fn mac(psk: &[u8], label: &[u8], nc: &[u8; LEN], nl: &[u8; LEN]) -> Hmac<Sha256> {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(psk).expect("HMAC takes keys of any length");
    m.update(label);
    m.update(nc);
    m.update(nl);
    m
}

/// The tag a side sends; `listener` selects the label.
pub fn tag(psk: &[u8], listener: bool, nc: &[u8; LEN], nl: &[u8; LEN]) -> [u8; LEN] {
    let label = if listener {
        LABEL_LISTENER
    } else {
        LABEL_CONNECTOR
    };
    mac(psk, label, nc, nl).finalize().into_bytes().into()
}

/// Checks a received tag in constant time.
pub fn verify(
    psk: &[u8],
    listener: bool,
    nc: &[u8; LEN],
    nl: &[u8; LEN],
    got: &[u8; LEN],
) -> Result<(), PskError> {
    let label = if listener {
        LABEL_LISTENER
    } else {
        LABEL_CONNECTOR
    };
    mac(psk, label, nc, nl)
        .verify_slice(got)
        .map_err(|_| PskError::BadTag)
}

/// Runs the connector's side (steps 1-3).
pub async fn connector<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    psk: &[u8],
) -> Result<(), PskError> {
    let nc: [u8; LEN] = rand::random();
    s.write_all(&nc).await?;
    let mut m = [0u8; 2 * LEN];
    s.read_exact(&mut m).await?;
    let nl: [u8; LEN] = m[..LEN].try_into().expect("split of a 64-byte array");
    let tl: [u8; LEN] = m[LEN..].try_into().expect("split of a 64-byte array");
    verify(psk, true, &nc, &nl, &tl)?;
    s.write_all(&tag(psk, false, &nc, &nl)).await?;
    Ok(())
}

/// Runs the listener's side (steps 1-3).
pub async fn listener<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    psk: &[u8],
) -> Result<(), PskError> {
    let mut nc = [0u8; LEN];
    s.read_exact(&mut nc).await?;
    let nl: [u8; LEN] = rand::random();
    let mut m = Vec::with_capacity(2 * LEN);
    m.extend_from_slice(&nl);
    m.extend_from_slice(&tag(psk, true, &nc, &nl));
    s.write_all(&m).await?;
    let mut tc = [0u8; LEN];
    s.read_exact(&mut tc).await?;
    verify(psk, false, &nc, &nl, &tc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn same_key_passes_other_key_fails() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        let (x, y) = tokio::join!(connector(&mut a, b"k1"), listener(&mut b, b"k1"));
        assert!(x.is_ok() && y.is_ok());
        let (mut a, mut b) = tokio::io::duplex(1024);
        let (x, y) = tokio::join!(
            async {
                let r = connector(&mut a, b"k1").await;
                drop(a);
                r
            },
            async {
                let r = listener(&mut b, b"k2").await;
                drop(b);
                r
            }
        );
        assert!(matches!(x, Err(PskError::BadTag)), "{x:?}");
        assert!(y.is_err());
    }

    #[test]
    fn tags_depend_on_role_key_and_nonces() {
        let (n1, n2) = ([1u8; LEN], [2u8; LEN]);
        let t = tag(b"k", true, &n1, &n2);
        assert!(verify(b"k", true, &n1, &n2, &t).is_ok());
        assert!(verify(b"k", false, &n1, &n2, &t).is_err());
        assert!(verify(b"j", true, &n1, &n2, &t).is_err());
        assert!(verify(b"k", true, &n2, &n1, &t).is_err());
    }
}
