//! Authentication of a new connection: the AUTH_REQUEST with its token, compared in constant time.

use super::*;

/// Drops (and counts) DATAGRAMs until the connection ends; runs while authenticating.
pub(super) async fn drop_datagrams(conn: &Connection, metrics: &ServerCounters) {
    while conn.read_datagram().await.is_ok() {
        inc(&metrics.datagrams_before_auth);
    }
}

pub(super) fn ct_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub(super) struct Authenticated {
    pub(super) client_id: String,
    /// PATH_BIND: (bundle id, path index, scheduler).
    pub(super) bind: Option<([u8; BUNDLE_ID_LEN], usize, Scheduler)>,
}

pub(super) async fn authenticate(
    conn: &Connection,
    ctx: &ServerState,
) -> Result<Authenticated, AuthFailure> {
    let (mut send, recv) = conn.accept_bi().await.map_err(TransportError::from)?;
    let mut r = FrameReader::new(recv);
    if r.stream_type().await? != proto::STREAM_AUTH {
        return Err(AuthFailure::Protocol("first stream is not an auth stream"));
    }
    let Some(Frame::AuthRequest {
        version,
        client_id,
        token,
        ..
    }) = r.frame().await?
    else {
        return Err(AuthFailure::Protocol("expected AUTH_REQUEST"));
    };
    // A multipath client follows with PATH_BIND; older clients finish the stream instead.
    let bind = match r.frame().await? {
        Some(Frame::PathBind {
            bundle,
            path_index,
            scheduler,
        }) => {
            if path_index >= MAX_PATHS as u64 {
                return Err(AuthFailure::Protocol("path index out of range"));
            }
            Some((bundle, path_index as usize, Scheduler::from_code(scheduler)))
        }
        _ => None,
    };
    let digest: [u8; 32] = Sha256::digest(&token).into();
    let status = if version != proto::VERSION {
        AuthStatus::BadVersion
    } else if !ct_eq(&digest, &ctx.token_digest) {
        AuthStatus::BadToken
    } else {
        AuthStatus::Ok
    };
    let mut features = if ctx.cfg.udp_enabled { FEATURE_UDP } else { 0 };
    if bind.is_some() {
        features |= FEATURE_MULTIPATH;
    }
    let resp = Frame::AuthResponse {
        status,
        features,
        udp_idle_timeout_ms: ctx.cfg.udp_idle_timeout.as_millis() as u64,
        max_udp_sessions: ctx.cfg.max_udp_sessions as u64,
    };
    transport::write_frame(&mut send, None, &resp).await?;
    let _ = send.finish();
    if status == AuthStatus::Ok {
        return Ok(Authenticated { client_id, bind });
    }
    // Let the response reach the client before the close discards it.
    let _ = tokio::time::timeout(Duration::from_secs(1), send.stopped()).await;
    Err(AuthFailure::Refused { status, client_id })
}

pub(super) enum AuthFailure {
    Transport(TransportError),
    Protocol(&'static str),
    Refused {
        status: AuthStatus,
        client_id: String,
    },
}

impl From<TransportError> for AuthFailure {
    fn from(e: TransportError) -> Self {
        AuthFailure::Transport(e)
    }
}
