//! Where guests run: threads of their own, apart from the node's runtime (HTTP, QUIC,
//! Raft, leases, the failure detector), at a lower scheduling priority, shared fairly
//! between functions.
//!
//! The guest threads run a small executor of their own rather than tokio's, because
//! what matters here is who runs next: a guest's run is polled by one guest thread at
//! a time, and when runs are ready and waiting for a thread, a running guest yields at
//! its next epoch tick (1 ms). The next run polled is one of the ready function that
//! has had the least guest time lately (its oldest run first): a function whose guests
//! spin cannot keep every guest thread from a function with work waiting, and a short
//! run waits about one epoch tick at most. Timers and I/O inside a run (its deadline, a
//! WASI sleep) go to a one-thread tokio runtime kept for them; calls to other functions
//! are sent to the node's runtime (`Ctx::links`).

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use tokio::sync::oneshot;

/// The nice value of the guest threads: the node's own threads (at the process's
/// priority) get the CPU first whenever they have work.
const GUEST_NICE: libc::c_int = 10;

/// How fast a function's recent guest time is forgotten: halved every this long.
const USE_HALF_LIFE: Duration = Duration::from_millis(100);

/// Guest time (seconds) below which an idle function's record is forgotten.
const FORGET_BELOW: f64 = 1e-4;

type Job = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The guests' executor.
pub struct Guests {
    shared: Arc<Shared>,
    /// Timers and I/O of the runs (dropped in the background: a runtime cannot be
    /// dropped inside another's task).
    reactor: Option<tokio::runtime::Runtime>,
}

struct Shared {
    threads: usize,
    /// Makes running guests reach their epoch callback now (advances the engine's
    /// epoch), so that they yield to a run that just became ready.
    preempt: Box<dyn Fn() + Send + Sync>,
    /// Runs ready to be polled and not being polled (mirrors `Queue::ready`).
    ready: AtomicUsize,
    /// Guest threads polling a run now.
    busy: AtomicUsize,
    queue: Mutex<Queue>,
    wake: Condvar,
}

#[derive(Default)]
struct Queue {
    ready: usize,
    next_seq: u64,
    stopping: bool,
    /// Per function with runs ready or recent guest time.
    functions: HashMap<Arc<str>, Share>,
}

struct Share {
    /// Ready runs, each with the sequence number it was queued with.
    ready: VecDeque<(u64, Arc<Task>)>,
    /// Guest time used lately, in seconds, decayed to `at`.
    used: f64,
    at: Instant,
}

impl Share {
    fn used_at(&self, now: Instant) -> f64 {
        let halvings =
            now.saturating_duration_since(self.at).as_secs_f64() / USE_HALF_LIFE.as_secs_f64();
        self.used * 0.5f64.powf(halvings)
    }
}

/// One run: its future, polled by one guest thread at a time.
struct Task {
    function: Arc<str>,
    shared: Arc<Shared>,
    job: Mutex<Option<Job>>,
    /// In the ready queue or being polled after a wake: a wake now is not queued again
    /// (a wake while it is polled sets `woken` instead).
    queued: AtomicBool,
    woken: AtomicBool,
    running: AtomicBool,
    aborted: AtomicBool,
}

impl std::fmt::Debug for Guests {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guests")
            .field("threads", &self.shared.threads)
            .finish_non_exhaustive()
    }
}

impl Guests {
    /// Start `threads` guest threads (0: one per core). `preempt` makes running guests
    /// reach their epoch callback at once.
    pub fn new(
        threads: usize,
        preempt: impl Fn() + Send + Sync + 'static,
    ) -> std::io::Result<Guests> {
        let threads = match threads {
            0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
            n => n,
        };
        let reactor = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("guest-timers")
            .enable_all()
            .build()?;
        let shared = Shared::new(threads, Box::new(preempt));
        // The threads are not joined: they end when the executor stops (see `Drop`).
        for i in 0..threads {
            let (shared, handle) = (shared.clone(), reactor.handle().clone());
            std::thread::Builder::new()
                .name(format!("guest-{i}"))
                .spawn(move || {
                    lower_priority();
                    let _context = handle.enter();
                    shared.work();
                })?;
        }
        Ok(Guests {
            shared,
            reactor: Some(reactor),
        })
    }

    /// Run `job`, a run of a guest of `function`, on a guest thread. Aborted (dropped
    /// on a guest thread) when the returned handle is dropped.
    pub fn spawn<F>(&self, function: Arc<str>, job: F) -> Spawned<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let task = Arc::new(Task {
            function,
            shared: self.shared.clone(),
            job: Mutex::new(Some(Box::pin(async move {
                let _ = tx.send(job.await);
            }))),
            queued: AtomicBool::new(false),
            woken: AtomicBool::new(false),
            running: AtomicBool::new(false),
            aborted: AtomicBool::new(false),
        });
        task.schedule(true);
        Spawned {
            answer: rx,
            task: Some(task),
        }
    }

    /// Whether a run is ready and waiting for a guest thread (for the epoch callback:
    /// then a running guest yields at its next tick).
    pub fn contention(&self) -> Contention {
        Contention(self.shared.clone())
    }

    /// Guest threads polling a run, and runs ready and waiting for one.
    pub fn load(&self) -> (usize, usize) {
        (
            self.shared.busy.load(Ordering::Relaxed),
            self.shared.ready.load(Ordering::Relaxed),
        )
    }
}

#[derive(Clone)]
pub struct Contention(Arc<Shared>);

impl Contention {
    pub fn contended(&self) -> bool {
        self.0.ready.load(Ordering::Relaxed) > 0
    }
}

impl Drop for Guests {
    fn drop(&mut self) {
        self.shared.queue.lock().stopping = true;
        self.shared.wake.notify_all();
        // A guest thread finishes its poll (at most an epoch tick of wasm) and goes;
        // not joined here, which may be on the node's runtime.
        if let Some(reactor) = self.reactor.take() {
            reactor.shutdown_background();
        }
    }
}

impl Shared {
    fn new(threads: usize, preempt: Box<dyn Fn() + Send + Sync>) -> Arc<Shared> {
        Arc::new(Shared {
            threads,
            preempt,
            ready: AtomicUsize::new(0),
            busy: AtomicUsize::new(0),
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
        })
    }

    /// A guest thread's loop: poll the fairest ready run, until stopped.
    fn work(self: &Arc<Self>) {
        loop {
            let task = {
                let mut q = self.queue.lock();
                loop {
                    if q.stopping {
                        // What is left is dropped with the queue's last reference.
                        q.functions.clear();
                        return;
                    }
                    if let Some(task) = q.next(Instant::now()) {
                        self.ready.store(q.ready, Ordering::Relaxed);
                        break task;
                    }
                    self.wake.wait(&mut q);
                }
            };
            self.busy.fetch_add(1, Ordering::Relaxed);
            let started = Instant::now();
            // A panic in a run (host code) ends that run, not the guest thread.
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| task.poll())).is_err() {
                tracing::error!(function = %task.function, "a guest's run panicked; it was dropped");
                task.running.store(false, Ordering::SeqCst);
                *task.job.lock() = None;
            }
            let used = started.elapsed();
            self.busy.fetch_sub(1, Ordering::Relaxed);
            self.queue.lock().charge(&task.function, used);
        }
    }

    /// Queue a ready run. When every guest thread is busy and `preempt`, a new run (or
    /// one woken by what it waited for) makes the running guests yield now rather than
    /// at their next tick; a run that yielded itself does not.
    fn enqueue(&self, task: Arc<Task>, preempt: bool) {
        let mut q = self.queue.lock();
        let seq = q.next_seq;
        q.next_seq += 1;
        let now = Instant::now();
        q.functions
            .entry(task.function.clone())
            .or_insert_with(|| Share {
                ready: VecDeque::new(),
                used: 0.0,
                at: now,
            })
            .ready
            .push_back((seq, task));
        q.ready += 1;
        self.ready.store(q.ready, Ordering::Relaxed);
        drop(q);
        if preempt && self.busy.load(Ordering::Relaxed) >= self.threads {
            (self.preempt)();
        }
        self.wake.notify_one();
    }
}

impl Queue {
    /// The next run to poll: of the function with a ready run and the least recent
    /// guest time, its oldest (ties between functions: the run queued first).
    fn next(&mut self, now: Instant) -> Option<Arc<Task>> {
        let function = self
            .functions
            .iter()
            .filter_map(|(f, share)| Some((share.used_at(now), share.ready.front()?.0, f)))
            .min_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)))
            .map(|(_, _, f)| f.clone())?;
        let share = self.functions.get_mut(&function).expect("just found");
        let (_, task) = share.ready.pop_front().expect("just found");
        self.ready -= 1;
        Some(task)
    }

    /// Count `used` guest time against `function`; forget idle functions whose time
    /// has decayed away.
    fn charge(&mut self, function: &Arc<str>, used: Duration) {
        let now = Instant::now();
        if let Some(share) = self.functions.get_mut(function) {
            share.used = share.used_at(now) + used.as_secs_f64();
            share.at = now;
        } else {
            self.functions.insert(
                function.clone(),
                Share {
                    ready: VecDeque::new(),
                    used: used.as_secs_f64(),
                    at: now,
                },
            );
        }
        self.functions
            .retain(|_, share| !share.ready.is_empty() || share.used_at(now) >= FORGET_BELOW);
    }
}

impl Task {
    /// Put the task in the ready queue, unless it is there already (or being polled:
    /// then it is polled again after). `preempt`: see `Shared::enqueue`.
    fn schedule(self: &Arc<Self>, preempt: bool) {
        // `running` and `woken` are written by one side and read by the other (store,
        // then load, on each side): sequentially consistent, so that one of the two
        // sees the other's store and a wake is never lost.
        if self.running.load(Ordering::SeqCst) {
            self.woken.store(true, Ordering::SeqCst);
            // The poller may have finished between the two loads: check again.
            if self.running.load(Ordering::SeqCst) {
                return;
            }
        }
        if !self.queued.swap(true, Ordering::AcqRel) {
            self.shared.enqueue(self.clone(), preempt);
        }
    }

    /// Poll the run once (on a guest thread).
    fn poll(self: &Arc<Self>) {
        self.running.store(true, Ordering::SeqCst);
        self.queued.store(false, Ordering::SeqCst);
        let mut job = self.job.lock();
        if self.aborted.load(Ordering::Acquire) {
            *job = None;
        }
        let done = match job.as_mut() {
            None => true,
            Some(future) => {
                let waker = Waker::from(self.clone());
                future
                    .as_mut()
                    .poll(&mut Context::from_waker(&waker))
                    .is_ready()
            }
        };
        if done {
            *job = None;
        }
        drop(job);
        self.running.store(false, Ordering::SeqCst);
        if !done && self.woken.swap(false, Ordering::SeqCst) {
            // Woken while polled: mostly a guest yielding its thread.
            self.schedule(false);
        }
    }
}

impl Wake for Task {
    fn wake(self: Arc<Self>) {
        self.schedule(true);
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.schedule(true);
    }
}

fn lower_priority() {
    // SAFETY: gettid and setpriority touch no memory; on Linux a thread id names one
    // thread, so this lowers the calling thread's priority alone.
    #[allow(unsafe_code)]
    let result = unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, GUEST_NICE)
    };
    if result != 0 {
        tracing::debug!(
            error = %std::io::Error::last_os_error(),
            "could not lower a guest thread's priority"
        );
    }
}

/// A run on a guest thread; dropping it aborts the run.
pub struct Spawned<T> {
    answer: oneshot::Receiver<T>,
    task: Option<Arc<Task>>,
}

/// The run was dropped without an answer: its executor stopped.
#[derive(Debug, thiserror::Error)]
#[error("the guest threads stopped before the run ended")]
pub struct Stopped;

impl<T> Future for Spawned<T> {
    type Output = Result<T, Stopped>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let answer = Pin::new(&mut self.answer).poll(cx).map_err(|_| Stopped);
        if answer.is_ready() {
            self.task = None;
        }
        answer
    }
}

impl<T> Drop for Spawned<T> {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.aborted.store(true, Ordering::Release);
            // Queued, it is dropped by the guest thread that picks it.
            task.schedule(false);
        }
    }
}

/// A task on another runtime (the node's); dropping the handle aborts it.
pub struct OnRuntime<T>(tokio::task::JoinHandle<T>);

impl<T: Send + 'static> OnRuntime<T> {
    pub fn spawn<F>(runtime: &tokio::runtime::Handle, task: F) -> OnRuntime<T>
    where
        F: Future<Output = T> + Send + 'static,
    {
        OnRuntime(runtime.spawn(task))
    }
}

impl<T> Future for OnRuntime<T> {
    type Output = Result<T, tokio::task::JoinError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0).poll(cx)
    }
}

impl<T> Drop for OnRuntime<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A future that yields (waking itself) for `slices` polls of `slice` each, busy.
    struct Spin {
        slices: u32,
        slice: Duration,
    }

    impl Future for Spin {
        type Output = ();
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            let until = Instant::now() + self.slice;
            while Instant::now() < until {
                std::hint::spin_loop();
            }
            if self.slices == 0 {
                return Poll::Ready(());
            }
            self.slices -= 1;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_run_goes_on_a_guest_thread_with_timers_and_answers() {
        let guests = Guests::new(1, || ()).expect("guest threads");
        let (name, slept) = guests
            .spawn("f".into(), async {
                let t = Instant::now();
                tokio::time::sleep(Duration::from_millis(5)).await;
                (
                    std::thread::current().name().map(str::to_owned),
                    t.elapsed(),
                )
            })
            .await
            .expect("ran");
        assert_eq!(name.as_deref(), Some("guest-0"));
        assert!(slept >= Duration::from_millis(5));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dropped_run_is_dropped_on_its_thread() {
        let guests = Guests::new(1, || ()).expect("guest threads");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let run = guests.spawn("f".into(), async move {
            let _tx = tx;
            std::future::pending::<()>().await
        });
        // Let it start and park.
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(run);
        assert!(rx.await.is_err(), "the aborted run dropped its sender");
        // The guest thread is done with it once its poll returns.
        let t = Instant::now();
        while guests.load() != (0, 0) && t.elapsed() < Duration::from_secs(5) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(guests.load(), (0, 0));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_short_run_goes_before_a_spinning_functions_queued_runs() {
        // One guest thread, kept busy by four spinning runs of one function that
        // yield every millisecond; a run of another function queued last goes next.
        let guests = Guests::new(1, || ()).expect("guest threads");
        let spinners: Vec<_> = (0..4)
            .map(|_| {
                guests.spawn(
                    "spinner".into(),
                    Spin {
                        slices: 200,
                        slice: Duration::from_millis(1),
                    },
                )
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            guests.contention().contended(),
            "spinners are queued behind each other"
        );
        let queued = Instant::now();
        let waited = guests
            .spawn("counter".into(), async move { queued.elapsed() })
            .await
            .expect("ran");
        // Behind the spinners' queue (4 runs of 1 ms each, 200 times), it would wait
        // about 4 ms; the function with less guest time goes first, after the slice
        // that is running. Not a timing assertion: the order is what is checked.
        let spinners_left = guests.shared.queue.lock().ready;
        assert!(
            spinners_left >= 2,
            "the counter ran while the spinners were still queued ({spinners_left} left; waited {waited:?})"
        );
        drop(spinners);
    }

    #[test]
    fn the_fairest_function_goes_first_and_ties_go_to_the_oldest() {
        let shared = Shared::new(1, Box::new(|| ()));
        let task = |f: &str| {
            Arc::new(Task {
                function: f.into(),
                shared: shared.clone(),
                job: Mutex::new(None),
                queued: AtomicBool::new(true),
                woken: AtomicBool::new(false),
                running: AtomicBool::new(false),
                aborted: AtomicBool::new(false),
            })
        };
        shared
            .queue
            .lock()
            .charge(&"spinner".into(), Duration::from_millis(50));
        let (s1, s2, c, d) = (
            task("spinner"),
            task("spinner"),
            task("counter"),
            task("other"),
        );
        for t in [&s1, &s2, &c, &d] {
            shared.enqueue(t.clone(), false);
        }
        let mut q = shared.queue.lock();
        let now = Instant::now();
        let order: Vec<Arc<Task>> = std::iter::from_fn(|| q.next(now)).collect();
        let names: Vec<&str> = order.iter().map(|t| &*t.function).collect();
        assert_eq!(names, ["counter", "other", "spinner", "spinner"]);
        assert!(
            Arc::ptr_eq(&order[2], &s1),
            "the spinner's oldest run first"
        );
        assert_eq!(q.ready, 0);
    }
}
