//! Limits on connections: how many the server holds at once, and how many one address may have
//! that have not finished their handshake (HTTP request head, WebSocket upgrade, RTMP handshake
//! and publish). Every refusal is counted (`onair_connections_refused_total{listener,reason}`)
//! and logged once per address and reason a minute, not once per socket.
//!
//! A connection holds a [`Slot`] from accept to close. Its place in the handshake count is
//! released by [`Slot::handshake_done`]; a WebSocket connection keeps its slot in the task
//! that serves it after the upgrade, so viewers count against the total too.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// How often one address is logged again for the same refusal.
const LOG_EVERY: Duration = Duration::from_secs(60);
/// Addresses remembered for that; beyond it the oldest entries go.
const LOGGED_MAX: usize = 4096;

/// Why a connection was refused: the `reason` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refused {
    /// `max_connections` are open.
    Total,
    /// The address has `max_handshakes_per_address` connections still in their handshake.
    Handshakes,
}

impl Refused {
    pub fn label(self) -> &'static str {
        match self {
            Refused::Total => "max_connections",
            Refused::Handshakes => "max_handshakes_per_address",
        }
    }
}

pub struct Limits {
    max_total: usize,
    max_handshakes: usize,
    open: AtomicUsize,
    handshakes: Mutex<HashMap<IpAddr, usize>>,
    logged: Mutex<HashMap<(IpAddr, Refused), Instant>>,
}

impl Limits {
    pub fn new(max_total: usize, max_handshakes: usize) -> Arc<Self> {
        Arc::new(Self {
            max_total,
            max_handshakes,
            open: AtomicUsize::new(0),
            handshakes: Mutex::new(HashMap::new()),
            logged: Mutex::new(HashMap::new()),
        })
    }

    /// `max_connections`.
    pub fn max(&self) -> usize {
        self.max_total
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Connections in their handshake now, all addresses together.
    pub fn in_handshake(&self) -> usize {
        self.handshakes.lock().values().sum()
    }

    /// A slot for a connection just accepted on `listener`, or why not (counted and logged).
    pub fn admit(self: &Arc<Self>, peer: SocketAddr, listener: &'static str) -> Option<Slot> {
        let ip = peer.ip();
        let refused = if self.open.fetch_add(1, Ordering::AcqRel) >= self.max_total {
            self.open.fetch_sub(1, Ordering::AcqRel);
            Some(Refused::Total)
        } else {
            let mut h = self.handshakes.lock();
            let n = h.entry(ip).or_insert(0);
            if *n >= self.max_handshakes {
                drop(h);
                self.open.fetch_sub(1, Ordering::AcqRel);
                Some(Refused::Handshakes)
            } else {
                *n += 1;
                None
            }
        };
        match refused {
            None => Some(Slot {
                limits: self.clone(),
                ip,
                in_handshake: Mutex::new(true),
            }),
            Some(why) => {
                crate::metrics::connection_refused(listener, why.label());
                if self.first_in_a_while(ip, why) {
                    tracing::warn!(
                        %ip,
                        listener,
                        reason = why.label(),
                        "connection refused (logged once a minute per address and reason)"
                    );
                }
                None
            }
        }
    }

    fn first_in_a_while(&self, ip: IpAddr, why: Refused) -> bool {
        let now = Instant::now();
        let mut logged = self.logged.lock();
        if logged.len() >= LOGGED_MAX {
            logged.retain(|_, at| now.duration_since(*at) < LOG_EVERY);
            if logged.len() >= LOGGED_MAX {
                logged.clear();
            }
        }
        match logged.get(&(ip, why)) {
            Some(at) if now.duration_since(*at) < LOG_EVERY => false,
            _ => {
                logged.insert((ip, why), now);
                true
            }
        }
    }

    fn end_handshake(&self, ip: IpAddr) {
        let mut h = self.handshakes.lock();
        if let Some(n) = h.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                h.remove(&ip);
            }
        }
    }
}

/// An HTTP connection's slot, as its handlers see it (a request extension): a handler that
/// takes the socket over (a WebSocket) keeps it while it serves the socket.
#[derive(Clone)]
pub struct ConnSlot(pub Arc<Slot>);

/// One admitted connection's place in the limits, released on drop.
pub struct Slot {
    limits: Arc<Limits>,
    ip: IpAddr,
    in_handshake: Mutex<bool>,
}

impl Slot {
    /// The connection finished its handshake: it no longer counts against its address's.
    pub fn handshake_done(&self) {
        let mut h = self.in_handshake.lock();
        if std::mem::take(&mut *h) {
            self.limits.end_handshake(self.ip);
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.handshake_done();
        self.limits.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A count of something held (blocked HLS requests, feed subscribers) with a ceiling.
pub struct Counted {
    what: &'static str,
    n: AtomicUsize,
    max: usize,
}

/// One of a [`Counted`], given back on drop.
pub struct Taken(Arc<Counted>);

impl Counted {
    /// `what` is the `limit` label of `onair_limit_refusals_total`.
    pub fn new(what: &'static str, max: usize) -> Arc<Self> {
        Arc::new(Self {
            what,
            n: AtomicUsize::new(0),
            max,
        })
    }

    /// One more, unless the ceiling is reached (then counted in the metric).
    pub fn take(self: &Arc<Self>) -> Option<Taken> {
        if self.n.fetch_add(1, Ordering::AcqRel) >= self.max {
            self.n.fetch_sub(1, Ordering::AcqRel);
            crate::metrics::limit_refused(self.what);
            return None;
        }
        Some(Taken(self.clone()))
    }

    pub fn held(&self) -> usize {
        self.n.load(Ordering::Relaxed)
    }
}

impl Drop for Taken {
    fn drop(&mut self) {
        self.0.n.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(last: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, last], 1000))
    }

    #[test]
    fn handshakes_per_address_and_the_total_are_capped_and_released() {
        let limits = Limits::new(4, 2);
        let a1 = limits.admit(peer(1), "test").expect("first");
        let a2 = limits.admit(peer(1), "test").expect("second");
        assert!(limits.admit(peer(1), "test").is_none(), "two in handshake");
        a1.handshake_done();
        let a3 = limits.admit(peer(1), "test").expect("one finished");
        let b1 = limits.admit(peer(2), "test").expect("another address");
        assert_eq!(limits.open(), 4);
        assert!(limits.admit(peer(3), "test").is_none(), "the total");
        drop(a2);
        assert_eq!((limits.open(), limits.in_handshake()), (3, 2));
        let c1 = limits.admit(peer(3), "test").expect("room again");
        drop((a1, a3, b1, c1));
        assert_eq!((limits.open(), limits.in_handshake()), (0, 0));
        assert!(
            limits.handshakes.lock().is_empty(),
            "no address left behind"
        );
    }

    #[test]
    fn a_count_refuses_at_its_ceiling_and_gives_back_on_drop() {
        let c = Counted::new("test", 2);
        let a = c.take().expect("one");
        let b = c.take().expect("two");
        assert!(c.take().is_none());
        drop(a);
        let _c = c.take().expect("room again");
        drop(b);
        assert_eq!(c.held(), 1);
    }

    #[test]
    fn a_refusal_is_logged_once_a_minute_per_address_and_reason() {
        let limits = Limits::new(0, 1);
        let ip = peer(1).ip();
        assert!(limits.first_in_a_while(ip, Refused::Total));
        assert!(!limits.first_in_a_while(ip, Refused::Total));
        assert!(limits.first_in_a_while(ip, Refused::Handshakes));
        assert!(limits.first_in_a_while(peer(2).ip(), Refused::Total));
    }
}
