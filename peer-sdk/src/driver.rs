//! The thin tokio task around the sans-IO [`Rendezvous`] machine: feeds it the relay replies
//! and punch packets the socket wrapper takes out of Quinn's stream, wakes it on its timer,
//! sends what it queues (UDP, with a per-datagram TTL when asked, or the TCP link), publishes
//! its status and the path the wrapper sends on. One task per peer, owned by the
//! [`crate::Peer`], stopped when it is dropped.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, watch};
use tracing::{debug, info};

use crate::rendezvous::{Config, Dest, Event, Rendezvous, Status};
use crate::socket::{Control, PeerSocket};

pub(crate) use crate::rendezvous::Config as DriverConfig;

pub(crate) struct Driver {
    socket: Arc<PeerSocket>,
    control: mpsc::Receiver<Control>,
    machine: Rendezvous,
    status: watch::Sender<Status>,
    /// The TCP link to the relay, once the machine switched to it (for the rest of its life).
    tcp: Option<crate::AbortOnDrop>,
}

impl Driver {
    pub(crate) fn new(
        socket: Arc<PeerSocket>,
        control: mpsc::Receiver<Control>,
        cfg: Config,
    ) -> (Self, watch::Receiver<Status>) {
        let machine = Rendezvous::new(cfg);
        let (status, rx) = watch::channel(machine.status().clone());
        (
            Driver {
                socket,
                control,
                machine,
                status,
                tcp: None,
            },
            rx,
        )
    }

    pub(crate) async fn run(mut self) {
        self.flush().await;
        loop {
            let now = Instant::now();
            let wake = self.machine.poll_timeout(now, self.socket.shared.last_rx());
            tokio::select! {
                c = self.control.recv() => match c {
                    Some(Control::Relay { reply, alt }) => {
                        self.machine.handle_relay(Instant::now(), reply, alt);
                    }
                    Some(Control::Candidates(bytes)) => {
                        self.machine.handle_candidates(Instant::now(), &bytes);
                    }
                    Some(Control::Punch { from, packet, via }) => {
                        self.machine.handle_punch(Instant::now(), from, packet, via);
                    }
                    None => return, // the socket is gone
                },
                () = tokio::time::sleep_until(wake.into()) => {
                    self.machine.handle_timeout(Instant::now(), self.socket.shared.last_rx());
                }
            }
            self.flush().await;
        }
    }

    /// Carries out what the machine asked for: events, transmits, the path and the status.
    async fn flush(&mut self) {
        while let Some(ev) = self.machine.poll_event() {
            match ev {
                Event::SwitchRelay(relay) => {
                    info!(%relay, "moving to the next relay");
                    self.socket.set_relay(relay);
                }
                Event::StartTcp {
                    registration,
                    reason,
                } => {
                    let relay = self.socket.relay();
                    info!(%relay, reason, "reaching the relay over TCP");
                    self.tcp = Some(crate::AbortOnDrop(tokio::spawn(crate::relay_tcp::run(
                        self.socket.clone(),
                        relay,
                        registration,
                    ))));
                }
                Event::OpenSockets { from, to } => {
                    let opened = self.socket.open_extra(from, to);
                    debug!(
                        from,
                        to, opened, "opened extra sockets for birthday punching"
                    );
                }
                Event::KeepSocket(i) => {
                    debug!(socket = i, "the birthday socket that won carries the path");
                    self.socket.keep_extra(i);
                }
                Event::CloseLosers => {
                    debug!("closing the birthday sockets that lost");
                    self.socket.close_losers();
                }
                Event::CloseSockets => {
                    debug!("closing the birthday sockets");
                    self.socket.close_extra();
                }
            }
        }
        while let Some(t) = self.machine.poll_transmit() {
            let r = match t.dst {
                Dest::RelayTcp => {
                    self.socket.send_tcp(&t.bytes);
                    Ok(())
                }
                Dest::Relay => {
                    self.socket
                        .send_control(self.socket.relay(), &t.bytes)
                        .await
                }
                Dest::RelayAlt => match self.socket.relay_alt() {
                    Some(alt) => self.socket.send_control(alt, &t.bytes).await,
                    None => Ok(()),
                },
                Dest::Peer(dst) => match (t.via, t.ttl) {
                    (Some(i), ttl) => self.socket.send_extra(i, dst, &t.bytes, ttl),
                    (None, Some(ttl)) => self.socket.send_control_with_ttl(dst, &t.bytes, ttl),
                    (None, None) => self.socket.send_control(dst, &t.bytes).await,
                },
            };
            if let Err(e) = r {
                debug!(dst = ?t.dst, error = %e, "control send failed");
            }
        }
        let status = self.machine.status();
        self.socket
            .shared
            .set_path(status.path, self.machine.direct_via());
        self.status.send_if_modified(|s| {
            let changed = s != status;
            if changed {
                *s = status.clone();
            }
            changed
        });
    }
}
