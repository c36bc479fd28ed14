//! The fast path of fan-out: caught-up viewers are written by one task per rendition.
//!
//! A viewer whose cursor reaches the live edge hands its socket to the rendition (it is
//! *promoted*). From then on the rendition's fan-out task writes each new media frame to every
//! promoted socket with one non-blocking vectored write per wake-up: no task wake-up or
//! allocation per viewer and frame, just the sink's (uncontended) mutex and the system call. A wake-up flushes everything pushed
//! since the last one, so a publisher's read that carried audio and video becomes one write.
//!
//! Anything unusual hands the socket back to the viewer's own task (it is *demoted*), which
//! then applies the slow-viewer rules of [`super::rendition`] (backpressure, stall timeout,
//! skipping to a keyframe) and control messages, and promotes it again once caught up:
//! - the socket would block, or took only part of the frames (the partial rest is handed back);
//! - a write failed;
//! - a non-media entry (init, status) comes next: the viewer's task handles what it implies;
//! - the viewer's task wants the socket back (a reply to send, shutdown, the client left).
//!
//! Ownership of the socket's write side passes only under the sink's mutex, so exactly one
//! party writes at a time and frames never interleave.

use std::io::{self, IoSlice};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::Tasks;

/// Frames per vectored write (Linux takes up to 1024 iovecs; this keeps them on the stack).
pub const MAX_IOV: usize = 64;

/// The write side of a viewer's socket, written without blocking.
pub trait SinkWrite: Send + Sync {
    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize>;
}

/// A viewer's socket as the fan-out sees it.
pub struct Sink {
    io: Arc<dyn SinkWrite>,
    state: Mutex<SinkState>,
    /// Wakes the viewer's task when the fan-out hands the socket back.
    returned: Notify,
    /// Bytes written to the socket, by the fan-out and the viewer's task together.
    sent: AtomicU64,
}

#[derive(Default)]
struct SinkState {
    /// The fan-out owns the socket's writes.
    promoted: bool,
    /// Sequence number of the next log entry to write. While the viewer's task owns the socket
    /// it keeps this up to date too ([`Sink::set_position`]), for backlog figures.
    next: u64,
    /// The unwritten rest of a frame a write took only part of.
    partial: Option<Bytes>,
    error: Option<io::Error>,
}

/// What a viewer's task gets back with its socket.
pub struct Returned {
    /// Sequence number of the next log entry the viewer needs.
    pub next: u64,
    /// The rest of a partly written frame: it must be written first.
    pub partial: Option<Bytes>,
    pub error: Option<io::Error>,
}

impl Sink {
    pub fn new(io: Arc<dyn SinkWrite>) -> Self {
        Self {
            io,
            state: Mutex::new(SinkState::default()),
            returned: Notify::new(),
            sent: AtomicU64::new(0),
        }
    }

    /// Bytes written to this viewer so far.
    pub fn bytes_sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Counts bytes the viewer's own task wrote.
    pub fn add_sent(&self, n: usize) {
        self.sent.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// The viewer's task records where its cursor is (it owns the socket now).
    pub fn set_position(&self, next: u64) {
        let mut st = self.state.lock();
        if !st.promoted {
            st.next = next;
        }
    }

    /// Sequence number of the next log entry this viewer needs.
    pub fn position(&self) -> u64 {
        self.state.lock().next
    }

    /// Hands the socket to the fan-out from entry `next` on. Call with the log locked and the
    /// viewer's cursor at its head, so that no entry can be pushed in between.
    pub(super) fn promote(&self, next: u64) {
        let mut st = self.state.lock();
        st.promoted = true;
        st.next = next;
    }

    /// Takes the socket back (whether or not the fan-out already returned it).
    pub fn reclaim(&self) -> Returned {
        let mut st = self.state.lock();
        st.promoted = false;
        Returned {
            next: st.next,
            partial: st.partial.take(),
            error: st.error.take(),
        }
    }

    /// Resolves once the fan-out has handed the socket back (or had, since the last wait).
    pub async fn returned(&self) {
        self.returned.notified().await
    }

    fn demote(&self, mut st: parking_lot::MutexGuard<'_, SinkState>) {
        st.promoted = false;
        drop(st);
        self.returned.notify_one();
    }

    /// Writes the entries from `lo` on (`entries[i]` is entry `lo + i`; `true` for media) this
    /// sink has not had yet.
    fn flush(&self, lo: u64, entries: &[(Bytes, bool)]) {
        let mut st = self.state.lock();
        if !st.promoted {
            return;
        }
        let Some(start) = st.next.checked_sub(lo) else {
            // Entries it needs were trimmed before we saw them: its task applies the skip rules.
            return self.demote(st);
        };
        let start = start as usize;
        if start >= entries.len() {
            return;
        }
        let mut iov = [IoSlice::new(&[]); MAX_IOV];
        let mut count = 0;
        let mut total = 0;
        for (frame, media) in &entries[start..] {
            if !media || count == MAX_IOV {
                break;
            }
            iov[count] = IoSlice::new(frame);
            count += 1;
            total += frame.len();
        }
        if count == 0 {
            return self.demote(st);
        }
        let written = self.io.try_write_vectored(&iov[..count]);
        if let Ok(n) = written {
            self.sent.fetch_add(n as u64, Ordering::Relaxed);
        }
        match written {
            Ok(n) if n == total => {
                st.next += count as u64;
                if start + count < entries.len() {
                    // A non-media entry, or more than one write's worth: the task takes over.
                    self.demote(st);
                }
            }
            Ok(mut n) => {
                // The socket took part of it: hand back the rest, from the first partial frame.
                let mut i = start;
                while n >= entries[i].0.len() {
                    n -= entries[i].0.len();
                    i += 1;
                }
                st.next = lo + i as u64;
                if n > 0 {
                    st.partial = Some(entries[i].0.slice(n..));
                    st.next += 1;
                }
                self.demote(st);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.demote(st),
            Err(e) => {
                st.error = Some(e);
                self.demote(st);
            }
        }
    }
}

/// The promoted sinks of a rendition and the task that writes them.
#[derive(Default)]
pub struct Fanout {
    sinks: Mutex<Vec<Arc<Sink>>>,
    wake: Arc<Wake>,
}

#[derive(Default)]
struct Wake {
    notify: Notify,
    started: AtomicBool,
    closed: AtomicBool,
}

/// What the fan-out task keeps between wake-ups.
#[derive(Default)]
pub(super) struct FlushState {
    /// Entries before this one have been handed to the sinks.
    pub flushed: u64,
    pub entries: Vec<(Bytes, bool)>,
    sinks: Vec<Arc<Sink>>,
}

/// Something whose log the fan-out task flushes.
pub(super) trait Flush: Send + Sync + 'static {
    fn fanout(&self) -> &Fanout;
    /// Collects the entries from `state.flushed` to the head into `state.entries`; returns the
    /// sequence number of the first one.
    fn collect(&self, state: &mut FlushState) -> u64;
}

impl Fanout {
    /// Registers a viewer's socket; starts the fan-out task on first use, tracked with every
    /// other task for shutdown.
    pub(super) fn attach<T: Flush>(&self, owner: &Arc<T>, sink: Arc<Sink>, tasks: &Tasks) {
        self.sinks.lock().push(sink);
        if !self.wake.started.swap(true, Ordering::AcqRel) {
            tasks.tracker.spawn(run(
                Arc::downgrade(owner),
                self.wake.clone(),
                tasks.shutdown.clone(),
            ));
        }
    }

    pub(super) fn remove(&self, sink: &Arc<Sink>) {
        let mut sinks = self.sinks.lock();
        if let Some(i) = sinks.iter().position(|s| Arc::ptr_eq(s, sink)) {
            sinks.swap_remove(i);
        }
    }

    /// Something was pushed: the task flushes it when it next runs.
    pub(super) fn wake(&self) {
        if self.wake.started.load(Ordering::Acquire) {
            self.wake.notify.notify_one();
        }
    }

    /// Writes newly collected entries to every promoted sink, yielding to the scheduler every
    /// [`YIELD_EVERY`] sinks so that a large flush never holds up joins and ingest.
    pub(super) async fn flush(&self, owner: &impl Flush, state: &mut FlushState) {
        state.entries.clear();
        let lo = owner.collect(state);
        if state.entries.is_empty() {
            return;
        }
        let mut sinks = std::mem::take(&mut state.sinks);
        sinks.extend(self.sinks.lock().iter().cloned());
        for chunk in sinks.chunks(YIELD_EVERY) {
            for sink in chunk {
                sink.flush(lo, &state.entries);
            }
            if chunk.len() == YIELD_EVERY {
                tokio::task::yield_now().await;
            }
        }
        sinks.clear();
        state.sinks = sinks;
        state.entries.clear();
    }
}

/// Sinks written between two yields to the scheduler (a write is a few microseconds).
const YIELD_EVERY: usize = 32;

impl Drop for Fanout {
    fn drop(&mut self) {
        self.wake.closed.store(true, Ordering::Release);
        self.wake.notify.notify_one();
    }
}

/// With this many promoted sinks a flush takes milliseconds anyway; then the task first waits
/// [`GATHER`] for whatever else the publisher is sending (audio beside video, the rest of an
/// RTMP burst) so that it goes out in the same write. Fewer, fuller writes are most of the
/// fan-out's CPU (each write is a trip through the TCP stack).
const GATHER_MIN_SINKS: usize = 64;
const GATHER: std::time::Duration = std::time::Duration::from_millis(1);

async fn run<T: Flush>(owner: Weak<T>, wake: Arc<Wake>, shutdown: CancellationToken) {
    let mut state = FlushState::default();
    loop {
        tokio::select! {
            _ = wake.notify.notified() => {}
            // Viewers' tasks take their sockets back and close them themselves.
            _ = shutdown.cancelled() => return,
        }
        if wake.closed.load(Ordering::Acquire) {
            return;
        }
        let Some(owner) = owner.upgrade() else {
            return;
        };
        let registered = owner.fanout().sinks.lock().len();
        if registered == 0 {
            // Nobody to write to: leave the entries in the log. A viewer promoted later starts
            // at the head, and collecting clamps to what the log still holds.
            continue;
        }
        if registered >= GATHER_MIN_SINKS {
            tokio::time::sleep(GATHER).await;
        }
        owner.fanout().flush(&*owner, &mut state).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A socket that takes at most `budget` more bytes, then would block.
    #[derive(Default)]
    struct Socket {
        got: Mutex<Vec<u8>>,
        budget: Mutex<usize>,
        writes: Mutex<usize>,
        broken: bool,
    }

    impl SinkWrite for Socket {
        fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
            *self.writes.lock() += 1;
            if self.broken {
                return Err(io::ErrorKind::ConnectionReset.into());
            }
            let mut budget = self.budget.lock();
            if *budget == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let mut n = 0;
            for b in bufs {
                let take = b.len().min(*budget);
                self.got.lock().extend_from_slice(&b[..take]);
                *budget -= take;
                n += take;
            }
            Ok(n)
        }
    }

    fn with_budget(budget: usize) -> (Arc<Socket>, Sink) {
        let socket = Arc::new(Socket {
            budget: Mutex::new(budget),
            ..Default::default()
        });
        (socket.clone(), Sink::new(socket))
    }

    fn media(s: &str) -> (Bytes, bool) {
        (Bytes::copy_from_slice(s.as_bytes()), true)
    }

    #[test]
    fn promoted_sink_gets_new_frames_in_one_write() {
        let (socket, sink) = with_budget(1 << 20);
        sink.promote(11);
        // Entries 10..13; the sink already has 10.
        sink.flush(10, &[media("old"), media("aa"), media("bbb")]);
        assert_eq!(&socket.got.lock()[..], b"aabbb");
        assert_eq!(*socket.writes.lock(), 1);
        assert!(sink.state.lock().promoted, "still on the fast path");
        sink.flush(13, &[media("c")]);
        assert_eq!(&socket.got.lock()[..], b"aabbbc");
        let back = sink.reclaim();
        assert_eq!(
            (back.next, back.partial, back.error.is_none()),
            (14, None, true)
        );
        // Taken back: the fan-out no longer writes it.
        sink.flush(14, &[media("d")]);
        assert_eq!(&socket.got.lock()[..], b"aabbbc");
    }

    #[test]
    fn partial_write_hands_back_the_rest() {
        let (socket, sink) = with_budget(3);
        sink.promote(0);
        sink.flush(0, &[media("aa"), media("bbb"), media("cc")]);
        assert_eq!(&socket.got.lock()[..], b"aab");
        let back = sink.reclaim();
        assert_eq!(back.partial.as_deref(), Some(&b"bb"[..]));
        assert_eq!(back.next, 2, "entry 2 was not written at all");
    }

    #[test]
    fn full_socket_and_errors_hand_back_unchanged() {
        let (socket, sink) = with_budget(0);
        sink.promote(5);
        sink.flush(5, &[media("x")]);
        assert!(socket.got.lock().is_empty());
        let back = sink.reclaim();
        assert_eq!((back.next, back.partial.is_none()), (5, true));

        let socket = Arc::new(Socket {
            broken: true,
            ..Default::default()
        });
        let sink = Sink::new(socket);
        sink.promote(0);
        sink.flush(0, &[media("x")]);
        assert!(sink.reclaim().error.is_some());
    }

    #[test]
    fn non_media_entries_are_left_to_the_viewer_task() {
        let (socket, sink) = with_budget(1 << 20);
        sink.promote(0);
        let init = (Bytes::from_static(b"INIT"), false);
        sink.flush(0, &[media("a"), init, media("b")]);
        assert_eq!(&socket.got.lock()[..], b"a");
        assert!(!sink.state.lock().promoted);
        assert_eq!(sink.reclaim().next, 1, "resumes at the init");

        // Entries it needed were trimmed before the fan-out saw them.
        let (socket, sink) = with_budget(1 << 20);
        sink.promote(3);
        sink.flush(7, &[media("z")]);
        assert!(socket.got.lock().is_empty());
        assert_eq!(sink.reclaim().next, 3);
    }
}
