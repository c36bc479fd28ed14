//! The lossless cursor: for consumers that must see every frame (the transcoder's input, the
//! HLS packager; later the recorder and the relay).
//!
//! Each consumer has its own bounded queue, filled by the publisher's push. The publisher never
//! waits for it: when the queue is full, media is dropped (up to the next keyframe, so that
//! what follows decodes), the drop is counted, and the consumer reads [`Event::Lost`] where the
//! hole is. Inits and statuses are never dropped: they are few, and a consumer that missed one
//! would misread everything after it.

use std::collections::VecDeque;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::Notify;

use super::frame::Item;

/// What a lossless consumer reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Item(Item),
    /// The queue overflowed here: this many frames are missing, and the next media frame is a
    /// sync point.
    Lost(u64),
    /// The rendition was removed from its stream: nothing more will come.
    Ended,
}

/// The bounds of one consumer's queue.
#[derive(Debug, Clone, Copy)]
pub struct QueueLimits {
    pub max_bytes: usize,
    pub max_items: usize,
}

impl QueueLimits {
    /// 32 MB, and 4096 frames: about 38 s of 60 fps video with 48 kHz AAC beside it.
    pub const DEFAULT: QueueLimits = QueueLimits {
        max_bytes: 32 << 20,
        max_items: 4096,
    };
}

struct Queue {
    events: VecDeque<Event>,
    bytes: usize,
    limits: QueueLimits,
    /// Dropping media until the next sync point.
    skipping: bool,
    dropped: u64,
    ended: bool,
}

/// One consumer's queue, shared by the rendition (which fills it) and the consumer.
pub struct Lossless {
    queue: Mutex<Queue>,
    notify: Notify,
}

fn item_bytes(item: &Item) -> usize {
    match item {
        Item::Media(f) => f.payload.len(),
        _ => 0,
    }
}

impl Lossless {
    pub(super) fn new(limits: QueueLimits) -> Arc<Self> {
        Arc::new(Self {
            queue: Mutex::new(Queue {
                events: VecDeque::new(),
                bytes: 0,
                limits,
                skipping: false,
                dropped: 0,
                ended: false,
            }),
            notify: Notify::new(),
        })
    }

    /// Called with the rendition's log locked, so items arrive in log order.
    pub(super) fn offer(&self, item: &Item, sync: bool) {
        let mut q = self.queue.lock();
        if let Item::Media(_) = item {
            let full = q.bytes + item_bytes(item) > q.limits.max_bytes
                || q.events.len() >= q.limits.max_items;
            if q.skipping && sync && !full {
                q.skipping = false;
            }
            if q.skipping || full {
                q.dropped += 1;
                let skipping = q.skipping;
                match q.events.back_mut() {
                    Some(Event::Lost(n)) if skipping => *n += 1,
                    _ => q.events.push_back(Event::Lost(1)),
                }
                q.skipping = true;
                drop(q);
                self.notify.notify_one();
                return;
            }
        }
        q.bytes += item_bytes(item);
        q.events.push_back(Event::Item(item.clone()));
        drop(q);
        self.notify.notify_one();
    }

    pub(super) fn end(&self) {
        self.queue.lock().ended = true;
        self.notify.notify_one();
    }

    /// The next event, if one is queued.
    pub fn try_next(&self) -> Option<Event> {
        let mut q = self.queue.lock();
        match q.events.pop_front() {
            Some(e) => {
                if let Event::Item(item) = &e {
                    q.bytes -= item_bytes(item);
                }
                Some(e)
            }
            None if q.ended => Some(Event::Ended),
            None => None,
        }
    }

    /// The next event, waiting for one.
    pub async fn next(&self) -> Event {
        loop {
            let notified = self.notify.notified();
            if let Some(e) = self.try_next() {
                return e;
            }
            notified.await;
        }
    }

    /// Frames dropped so far because this consumer fell behind.
    pub fn dropped(&self) -> u64 {
        self.queue.lock().dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::frame::Frame;
    use bytes::Bytes;
    use onair_protocol::wire::MediaHeader;

    fn media(n: usize, keyframe: bool) -> Item {
        Item::Media(Frame {
            header: MediaHeader {
                track: 0,
                keyframe,
                dts: 0,
                cts: 0,
                ingest_us: 0,
            },
            payload: Bytes::from(vec![0u8; n]),
        })
    }

    #[test]
    fn a_full_queue_drops_to_the_next_keyframe_and_says_so() {
        let q = Lossless::new(QueueLimits {
            max_bytes: 100,
            max_items: 100,
        });
        q.offer(&media(60, true), true);
        q.offer(&media(60, false), false); // full: dropped
        q.offer(
            &Item::Status(onair_protocol::wire::StatusCode::Live, "x"),
            false,
        );
        assert!(matches!(q.try_next(), Some(Event::Item(Item::Media(_)))));
        q.offer(&media(10, false), false); // room again, but not a keyframe: still dropped
        q.offer(&media(10, true), true);
        assert_eq!(q.try_next(), Some(Event::Lost(1)));
        assert!(
            matches!(q.try_next(), Some(Event::Item(Item::Status(..)))),
            "never dropped"
        );
        assert_eq!(q.try_next(), Some(Event::Lost(1)));
        assert!(matches!(q.try_next(), Some(Event::Item(Item::Media(f))) if f.header.keyframe));
        assert_eq!(q.try_next(), None);
        assert_eq!(q.dropped(), 2);
        q.end();
        assert_eq!(q.try_next(), Some(Event::Ended));
    }
}
