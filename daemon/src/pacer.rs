//! Which of the session's threads reads the next FUSE request.
//!
//! fuser serves a mount with N threads, each blocked in read(2) on the device, and the kernel
//! hands a request to the reader that has waited longest. When requests come one at a time
//! (one process doing one system call after another) that is the coldest thread, often on
//! the other CPU: on a small VM a round trip between two processes costs ~58 us across two
//! vCPUs against ~6 us on one, more than the request itself. The pacer keeps one reader while
//! requests come one at a time: a thread that finishes a request while another thread already
//! waits in read parks here instead of going back to read, so the thread that served the last
//! request is the one the kernel wakes next. More threads come in only when they are needed:
//! - a request begins while others already wait in the device queue: a parked thread (the
//!   most recently parked, the warmest) goes back to read at once;
//! - a request that may take long begins (a copy-up, an fsync, a large read or write) while no
//!   other thread reads: one parked thread stands by and goes to read if a request is still
//!   running a whole [`STANDBY_PERIOD`] later with no other thread reading;
//! - while requests come and no other thread reads, the coldest parked thread watches: if a
//!   request (even a quick one: a lookup on a cold disk or a stalled lower filesystem) is
//!   still running a whole [`WATCH_PERIOD`] later, it goes to read, so one slow request never
//!   holds up the mount. It stops watching after a period in which no request began.
//!
//! A parked thread leaves when the session ends: the first session thread to exit wakes them
//! all. Only a thread that has served a request can tell (a guard in its thread-local slot),
//! so no thread parks before every thread has served one: until then the session runs as
//! fuser's loop does. A quiet mount's parked threads sleep with no timer at all.
//!
//! FORGETs take no turn: fuser serves a BATCH_FORGET with one call per node, and a thread
//! parked between two of them would keep the rest of the batch waiting.
//!
//! On an idle small VM the kernel wakes a sleeping thread on an idle CPU rather than on the
//! waker's, so even the one hot thread would pay the cross-CPU wake-up for every lone
//! request. So the only reader, once it has answered, spins for the next request for a short
//! window (polling the device queue) before it goes back to sleep in read: a request that
//! comes within the window is read with no wake-up at all. The window adapts
//! ([`next_window`]): it grows while requests come soon after an answer and shrinks to
//! nothing while they come far apart, so a quiet mount burns no CPU. It is for a machine with
//! a CPU to spare: while more tasks are runnable than there are CPUs (many mounts busy at
//! once), nobody spins, and a spin yields its CPU to any task waiting for it.
#![forbid(unsafe_code)]

use std::cell::RefCell;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::thread::Thread;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::sys::{self, FuseQueue};

/// How long a request may run before a standing-by thread goes to read beside it.
pub const STANDBY_PERIOD: Duration = Duration::from_millis(1);
/// How long a quick request may run before the watching thread goes to read beside it.
pub const WATCH_PERIOD: Duration = Duration::from_millis(50);

/// What a request may cost its thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cost {
    /// Answered from memory or with a system call or two on cached metadata.
    Quick,
    /// May copy data, sync, or wait for the disk: another thread should stand by.
    MayBlock,
}

/// The pacing of one session's threads (one per mount).
pub struct Pacer {
    dev: OnceLock<OwnedFd>,
    state: Mutex<State>,
    /// CPUs this daemon may run on, and where the runnable tasks are counted (see
    /// [`Pacer::crowded`]; opened with the pacer, before the mount, so that the daemon's
    /// descriptors do not grow later).
    cpus: usize,
    loadavg: Option<sys::Loadavg>,
    /// When the machine was last looked at, and whether it was crowded then.
    crowd: Mutex<Option<(Instant, bool)>>,
}

#[derive(Debug, Default)]
struct State {
    /// Threads reading the device or serving a request (not parked, not standing by).
    readers: usize,
    /// Threads serving a request.
    busy: usize,
    /// Requests begun, and of those the ones that may block.
    begun: u64,
    may_block_begun: u64,
    /// Parked threads, the most recently parked last.
    parked: Vec<Arc<Slot>>,
    /// One thread stands by.
    standby: bool,
    /// One parked thread watches for a request that runs long.
    watching: bool,
    /// The session is ending: no thread parks any more.
    ending: bool,
    /// Threads that have not served a request yet: their exit tells nobody, so while there
    /// are any no thread parks.
    unguarded: usize,
    /// How long the only reader spins for the next request (see [`next_window`]), and since
    /// when it has waited.
    spin_window: Duration,
    idle_since: Option<Instant>,
}

/// The longest spin, and the one to start with.
pub const SPIN_MAX: Duration = Duration::from_micros(100);
pub const SPIN_START: Duration = Duration::from_micros(50);
/// How long a look at how crowded the machine is holds (see [`Pacer::crowded`]).
const CROWD_SAMPLE: Duration = Duration::from_millis(1);
/// A request that comes within this much of the last answer would have been worth a spin.
const SPIN_USEFUL: Duration = Duration::from_micros(250);

/// The next spin window, given how long the only reader waited for the last request: keep it
/// when the request came within it; widen it (from [`SPIN_START`] up to [`SPIN_MAX`]) when the
/// request came soon after it ended; halve it (to none) when requests come far apart, so a
/// mount with nothing to do spins for nothing.
fn next_window(window: Duration, waited: Duration) -> Duration {
    if waited <= window {
        window
    } else if waited <= SPIN_USEFUL {
        (window * 2).clamp(SPIN_START, SPIN_MAX)
    } else if window > SPIN_START / 4 {
        window / 2
    } else {
        Duration::ZERO
    }
}

const WAIT: u8 = 0;
const READ: u8 = 1;
const STAND_BY: u8 = 2;
const WATCH: u8 = 3;

/// A session thread's place in the pacer: what it has been asked to do while parked.
#[derive(Debug)]
struct Slot {
    thread: Thread,
    call: AtomicU8,
}

thread_local! {
    /// This thread's slot and, once it has served a request, a guard that ends the pacing
    /// when the thread exits (the session is ending).
    static SLOT: RefCell<Option<(Arc<Slot>, ExitGuard)>> = const { RefCell::new(None) };
}

struct ExitGuard(Weak<Pacer>);

impl Drop for ExitGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.upgrade() {
            p.end_session();
        }
    }
}

/// One request's turn on a thread: ends (and may park the thread) when dropped, after the
/// reply has gone.
#[must_use = "the turn ends when dropped"]
pub struct Turn<'a>(Option<&'a Arc<Pacer>>);

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        if let Some(p) = self.0 {
            p.end();
        }
    }
}

impl Pacer {
    /// The pacing of a session served by `threads` threads, all reading at the start.
    pub fn new(threads: usize) -> Arc<Pacer> {
        Arc::new(Pacer {
            dev: OnceLock::new(),
            state: Mutex::new(State {
                readers: threads.max(1),
                unguarded: threads.max(1),
                ..State::default()
            }),
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            loadavg: sys::Loadavg::open(),
            crowd: Mutex::new(None),
        })
    }

    /// The session's device, whose queue the pacer looks at. Until it is given the pacer
    /// brings in a parked thread for every request that may block, and never for a queue.
    pub fn set_device(&self, dev: OwnedFd) {
        let _ = self.dev.set(dev);
    }

    /// The session's device once given ([`Pacer::set_device`]): a copy of the fd every
    /// session thread reads from, so a reply written to it finds its request.
    pub fn device(&self) -> Option<BorrowedFd<'_>> {
        self.dev.get().map(|d| d.as_fd())
    }

    fn queue(&self) -> FuseQueue {
        match self.dev.get() {
            Some(d) => sys::fuse_queue(d.as_fd()),
            None => FuseQueue::Empty,
        }
    }

    /// A request of this cost begins on the calling thread.
    pub fn begin(self: &Arc<Self>, cost: Cost) -> Turn<'_> {
        // Every thread that serves gets its slot now, so that its exit ends the pacing.
        let (_, first) = self.slot();
        let mut s = self.state.lock();
        if first {
            s.unguarded = s.unguarded.saturating_sub(1);
        }
        if s.readers <= 1 && s.parked.is_empty() && !s.standby {
            // One thread serves this session (threaded=0): nothing to pace.
            return Turn(None);
        }
        if let Some(t) = s.idle_since.take() {
            s.spin_window = next_window(s.spin_window, t.elapsed());
        }
        s.busy += 1;
        s.begun += 1;
        if cost == Cost::MayBlock {
            s.may_block_begun += 1;
        }
        if s.readers <= s.busy && !s.watching && !s.parked.is_empty() {
            // No other thread reads: the coldest parked one watches this and later requests.
            s.watching = true;
            let w = s.parked[0].clone();
            w.call.store(WATCH, Ordering::Release);
            drop(s);
            w.thread.unpark();
            s = self.state.lock();
        }
        if s.readers > s.busy || s.parked.is_empty() {
            // Another thread reads, or none could be brought in.
            return Turn(Some(self));
        }
        let may_stand_by = cost == Cost::MayBlock && !s.standby;
        drop(s);
        let queued = self.queue() == FuseQueue::Waiting;
        if !queued && !may_stand_by {
            return Turn(Some(self));
        }
        let mut s = self.state.lock();
        if s.readers > s.busy || (!queued && s.standby) {
            return Turn(Some(self));
        }
        let Some(slot) = pop_parked(&mut s) else {
            return Turn(Some(self));
        };
        if queued {
            s.readers += 1;
            slot.call.store(READ, Ordering::Release);
        } else {
            s.standby = true;
            slot.call.store(STAND_BY, Ordering::Release);
        }
        drop(s);
        slot.thread.unpark();
        Turn(Some(self))
    }

    /// The calling thread's request has been answered: back to read, or park if another
    /// thread already reads.
    fn end(self: &Arc<Self>) {
        let mut s = self.state.lock();
        s.busy -= 1;
        if std::thread::panicking() {
            // This thread leaves the session's loop: a parked one reads in its place.
            match pop_parked(&mut s) {
                Some(slot) => {
                    drop(s);
                    slot.call.store(READ, Ordering::Release);
                    slot.thread.unpark();
                }
                None => s.readers -= 1,
            }
            return;
        }
        if s.ending || s.unguarded > 0 || s.readers - s.busy < 2 {
            if s.readers - s.busy == 1 && s.busy == 0 && self.dev.get().is_some() {
                // The only reader, and nothing runs: spin for the next request.
                let window = s.spin_window;
                s.idle_since = Some(Instant::now());
                drop(s);
                self.spin(window);
            }
            return;
        }
        let (slot, _) = self.slot();
        slot.call.store(WAIT, Ordering::Release);
        s.readers -= 1;
        s.parked.push(slot.clone());
        drop(s);
        self.park(&slot);
    }

    /// Wait for the next request spinning, for at most `window`, rather than asleep in read:
    /// a request that comes meanwhile is read at once, with no wake-up at all.
    ///
    /// The spin takes a CPU that another task may want: not at all while the machine is
    /// crowded ([`Pacer::crowded`]), and each turn of it yields to a task waiting for this
    /// CPU. (A rootless BuildKit export diffs its layers at once, through 16 mounts on 2 CPUs
    /// here: with every daemon spinning, the export took 1.1 s instead of 0.7.)
    fn spin(&self, window: Duration) {
        if window.is_zero() || self.crowded() {
            return;
        }
        let until = Instant::now() + window;
        while Instant::now() < until {
            if self.queue() != FuseQueue::Empty {
                return;
            }
            std::thread::yield_now();
        }
    }

    /// Whether more tasks are runnable on the machine than this daemon has CPUs (the serving
    /// thread and the client it just answered make two), looked at once per
    /// [`CROWD_SAMPLE`]. Counted machine-wide against the CPUs this daemon may use, so a
    /// daemon confined to a few CPUs of a busy host does not spin at all. Not known: not
    /// crowded.
    fn crowded(&self) -> bool {
        let now = Instant::now();
        let mut c = self.crowd.lock();
        match *c {
            Some((at, crowded)) if now.duration_since(at) < CROWD_SAMPLE => crowded,
            _ => {
                let crowded = (self.loadavg.as_ref())
                    .and_then(|l| l.runnable())
                    .is_some_and(|n| n as usize > self.cpus);
                *c = Some((now, crowded));
                crowded
            }
        }
    }

    /// This thread's slot, made at its first request (with the guard that ends the session's
    /// pacing when the thread exits).
    fn slot(self: &Arc<Self>) -> (Arc<Slot>, bool) {
        SLOT.with(|c| {
            let mut c = c.borrow_mut();
            let first = c.is_none();
            let (slot, _) = c.get_or_insert_with(|| {
                (
                    Arc::new(Slot {
                        thread: std::thread::current(),
                        call: AtomicU8::new(WAIT),
                    }),
                    ExitGuard(Arc::downgrade(self)),
                )
            });
            (slot.clone(), first)
        })
    }

    /// Wait parked until asked to read (return) or to stand by.
    fn park(&self, slot: &Arc<Slot>) {
        loop {
            match slot.call.load(Ordering::Acquire) {
                READ => return,
                STAND_BY => {
                    if self.stand_by(slot) {
                        return;
                    }
                    continue;
                }
                WATCH => {
                    if self.watch(slot) {
                        return;
                    }
                    continue;
                }
                _ => {}
            }
            // Every thread has served (or none would park): the first to exit wakes this one.
            std::thread::park();
        }
    }

    /// Watch while requests come: go to read (true) when one has run a whole
    /// [`WATCH_PERIOD`] with no other thread reading; stop (false) when asked to do something
    /// else or after a period in which no request began.
    fn watch(&self, slot: &Arc<Slot>) -> bool {
        let mut seen = self.state.lock().begun;
        loop {
            let start = Instant::now();
            while slot.call.load(Ordering::Acquire) == WATCH && start.elapsed() < WATCH_PERIOD {
                std::thread::park_timeout(WATCH_PERIOD.saturating_sub(start.elapsed()));
            }
            let mut s = self.state.lock();
            if slot.call.load(Ordering::Acquire) != WATCH {
                return false;
            }
            let stuck = s.busy > 0 && s.readers == s.busy && s.begun == seen;
            if stuck {
                s.watching = false;
                s.parked.retain(|p| !Arc::ptr_eq(p, slot));
                s.readers += 1;
                slot.call.store(READ, Ordering::Release);
                return true;
            }
            if s.begun == seen && s.busy == 0 {
                s.watching = false;
                slot.call.store(WAIT, Ordering::Release);
                return false;
            }
            seen = s.begun;
        }
    }

    /// Stand by while requests that may block keep coming: go to read (true) when one has
    /// run a whole period with no other thread reading; park again (false) after a period in
    /// which none began.
    fn stand_by(&self, slot: &Arc<Slot>) -> bool {
        let (mut seen, mut may_block_seen) = {
            let s = self.state.lock();
            (s.begun, s.may_block_begun)
        };
        loop {
            std::thread::sleep(STANDBY_PERIOD);
            let mut s = self.state.lock();
            let stuck = s.busy > 0 && s.readers == s.busy && s.begun == seen;
            if s.ending || stuck {
                s.standby = false;
                s.readers += 1;
                slot.call.store(READ, Ordering::Release);
                return true;
            }
            if s.may_block_begun == may_block_seen {
                s.standby = false;
                slot.call.store(WAIT, Ordering::Release);
                s.parked.push(slot.clone());
                return false;
            }
            seen = s.begun;
            may_block_seen = s.may_block_begun;
        }
    }

    /// The session ends: every parked thread goes back to read (and meets the end there),
    /// and none parks again.
    fn end_session(&self) {
        let mut s = self.state.lock();
        s.ending = true;
        s.watching = false;
        let woken = std::mem::take(&mut s.parked);
        s.readers += woken.len();
        drop(s);
        for slot in woken {
            slot.call.store(READ, Ordering::Release);
            slot.thread.unpark();
        }
    }
}

/// The most recently parked thread, taken off the stack (no longer the watcher if it was).
fn pop_parked(s: &mut State) -> Option<Arc<Slot>> {
    let slot = s.parked.pop()?;
    if slot.call.load(Ordering::Acquire) == WATCH {
        s.watching = false;
    }
    Some(slot)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Barrier;

    fn counts(p: &Pacer) -> (usize, usize, usize) {
        let s = p.state.lock();
        (s.readers, s.busy, s.parked.len())
    }

    /// While more threads are runnable than the daemon has CPUs, the only reader does not
    /// spin for the next request: it would take a CPU one of them waits for.
    #[test]
    fn a_crowded_machine_gets_no_spin() {
        let p = Pacer::new(2);
        let n = p.cpus + 2;
        let busy = sys::BusyThreads::start(n);
        // No device: the queue always looks empty, so a spin would last its whole window.
        let t = Instant::now();
        p.spin(Duration::from_millis(200));
        let spun = t.elapsed();
        let crowded = p.crowded();
        drop(busy);
        assert!(crowded, "{n} spinning threads on {} CPUs", p.cpus);
        assert!(
            spun < Duration::from_millis(100),
            "spun {spun:?} on a crowded machine"
        );
    }

    #[test]
    fn the_spin_window_grows_while_requests_come_soon_and_goes_while_they_do_not() {
        let us = Duration::from_micros;
        // Caught within the window: kept.
        assert_eq!(next_window(us(50), us(30)), us(50));
        // Came soon after it: wider, from the start value, up to the most.
        assert_eq!(next_window(Duration::ZERO, us(120)), SPIN_START);
        assert_eq!(next_window(SPIN_START, us(120)), us(100));
        assert_eq!(next_window(SPIN_MAX, us(200)), SPIN_MAX);
        // Far apart: halved, then none.
        let mut w = SPIN_MAX;
        let mut steps = 0;
        while !w.is_zero() {
            w = next_window(w, Duration::from_millis(5));
            steps += 1;
            assert!(steps < 10);
        }
        assert_eq!(
            next_window(Duration::ZERO, Duration::from_secs(1)),
            Duration::ZERO
        );
    }

    #[test]
    fn no_thread_parks_before_every_thread_has_served() {
        let p = Pacer::new(3);
        for _ in 0..3 {
            drop(p.begin(Cost::Quick));
        }
        // Only this thread has served: it goes back to read, as do the others.
        assert_eq!(counts(&p), (3, 0, 0));
        assert_eq!(p.state.lock().unguarded, 2);
    }

    #[test]
    fn one_thread_is_never_paced() {
        let p = Pacer::new(1);
        for _ in 0..3 {
            let t = p.begin(Cost::MayBlock);
            assert!(t.0.is_none());
        }
        assert_eq!(counts(&p), (1, 0, 0));
    }

    #[test]
    fn a_thread_parks_while_another_reads_and_comes_back_for_a_long_request() {
        let p = Pacer::new(2);
        // The test thread serves first: no thread parks before every thread has served.
        drop(p.begin(Cost::Quick));
        // Thread B serves a request and parks: thread "main" still reads.
        let pb = p.clone();
        let b = std::thread::spawn(move || {
            {
                let _t = pb.begin(Cost::Quick);
            }
            // Back from the park: asked to read.
            Instant::now()
        });
        let start = Instant::now();
        while counts(&p).2 == 0 {
            assert!(start.elapsed() < Duration::from_secs(5), "B never parked");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(counts(&p), (1, 0, 1));
        // A quick request on the only reader brings nobody in.
        {
            let _t = p.begin(Cost::Quick);
            assert_eq!(counts(&p), (1, 1, 1));
        }
        // One that may block and runs past the period: B stands by, then reads.
        let t = p.begin(Cost::MayBlock);
        let began = Instant::now();
        b.join().unwrap();
        assert!(began.elapsed() >= STANDBY_PERIOD);
        assert_eq!(counts(&p), (2, 1, 0));
        drop(t);
        assert_eq!(counts(&p), (2, 0, 0));
    }

    #[test]
    fn a_quick_request_that_runs_long_gets_a_second_reader_beside_it() {
        let p = Pacer::new(2);
        // The test thread serves first: no thread parks before every thread has served.
        drop(p.begin(Cost::Quick));
        let pb = p.clone();
        let b = std::thread::spawn(move || drop(pb.begin(Cost::Quick)));
        let start = Instant::now();
        while counts(&p).2 == 0 {
            assert!(start.elapsed() < Duration::from_secs(5), "B never parked");
            std::thread::sleep(Duration::from_millis(1));
        }
        // A quick request on the only reader: B watches, and reads once it has run a period.
        let t = p.begin(Cost::Quick);
        let began = Instant::now();
        assert!(p.state.lock().watching);
        b.join().unwrap();
        assert!(began.elapsed() >= WATCH_PERIOD);
        assert_eq!(counts(&p), (2, 1, 0));
        assert!(!p.state.lock().watching);
        drop(t);
    }

    #[test]
    fn a_watcher_stops_when_requests_stop() {
        let p = Pacer::new(2);
        // The test thread serves first: no thread parks before every thread has served.
        drop(p.begin(Cost::Quick));
        let pb = p.clone();
        let done = Arc::new(Barrier::new(2));
        let d2 = done.clone();
        let b = std::thread::spawn(move || {
            drop(pb.begin(Cost::Quick));
            d2.wait();
        });
        while counts(&p).2 == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
        drop(p.begin(Cost::Quick));
        assert!(p.state.lock().watching);
        let start = Instant::now();
        while p.state.lock().watching {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "B watched for ever"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(counts(&p), (1, 0, 1));
        p.end_session();
        done.wait();
        b.join().unwrap();
    }

    #[test]
    fn a_standby_parks_again_when_requests_that_may_block_stop() {
        let p = Pacer::new(2);
        // The test thread serves first: no thread parks before every thread has served.
        drop(p.begin(Cost::Quick));
        let pb = p.clone();
        let ready = Arc::new(Barrier::new(2));
        let r2 = ready.clone();
        let b = std::thread::spawn(move || {
            {
                let _t = pb.begin(Cost::Quick);
            }
            r2.wait();
        });
        while counts(&p).2 == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
        // Short requests that may block: B stands by, sees them end, parks again.
        drop(p.begin(Cost::MayBlock));
        assert!(p.state.lock().standby);
        let start = Instant::now();
        while p.state.lock().standby {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "B stood by for ever"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(counts(&p), (1, 0, 1));
        p.end_session();
        ready.wait();
        b.join().unwrap();
        assert_eq!(counts(&p), (2, 0, 0));
    }

    #[test]
    fn the_end_of_the_session_wakes_every_parked_thread() {
        let p = Pacer::new(3);
        drop(p.begin(Cost::Quick));
        let both = Arc::new(Barrier::new(2));
        let mut joins = Vec::new();
        for _ in 0..2 {
            let q = p.clone();
            let b = both.clone();
            joins.push(std::thread::spawn(move || {
                let t = q.begin(Cost::Quick);
                b.wait();
                drop(t);
            }));
        }
        let start = Instant::now();
        while counts(&p).2 < 2 {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "threads never parked"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        // A thread that served a request exits: its guard ends the session's pacing.
        let q = p.clone();
        std::thread::spawn(move || {
            let _ = q.slot();
        })
        .join()
        .unwrap();
        for j in joins {
            j.join().unwrap();
        }
        assert_eq!(counts(&p).2, 0);
        // And no thread parks after that.
        drop(p.begin(Cost::Quick));
        assert_eq!(counts(&p).2, 0);
    }
}
