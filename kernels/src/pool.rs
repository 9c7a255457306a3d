//! The threads that share each product's rows.
//!
//! A decode step runs ~200 products of 20–200 µs each, with a little other work between
//! them. Waking sleeping threads for each (rayon: a futex wake and a steal per product)
//! cost more than a third of the step on this 2-core machine. So, as llama.cpp does, the
//! workers spin between products (yielding the core to anyone who needs it) and only park
//! after `SPIN` without work. The calling thread always takes its share of the tasks.
//!
//! A worker joins a product only while it is open, and the caller waits only for workers
//! that joined: when the workers are off the cores (other threads of the process want them:
//! four streams' guests), the caller runs the tasks alone instead of waiting for each
//! worker to be scheduled again just to say that it saw the product.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long an idle worker keeps looking for work before it parks.
const SPIN: Duration = Duration::from_millis(2);

/// Threads the pool is built with (the caller included); 0: not set.
static THREADS: AtomicUsize = AtomicUsize::new(0);
static POOL: OnceLock<Pool> = OnceLock::new();

/// Sets how many threads (the caller included) share a product. Takes effect if called
/// before the first product; returns whether it did.
pub fn set_threads(n: usize) -> bool {
    THREADS.store(n.max(1), Ordering::SeqCst);
    POOL.get().is_none()
}

/// Threads that share a product (the caller included).
pub fn threads() -> usize {
    pool().workers + 1
}

fn pool() -> &'static Pool {
    POOL.get_or_init(|| {
        // Unset: RAYON_NUM_THREADS, which candle and rayon read too, so one setting sizes
        // every pool of the process; else every core.
        let n = match THREADS.load(Ordering::SeqCst) {
            0 => std::env::var("RAYON_NUM_THREADS")
                .ok()
                .and_then(|v| v.parse::<usize>().ok())
                .filter(|&n| n > 0)
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
            n => n,
        };
        Pool::new(n - 1)
    })
}

/// Runs `f(0..tasks)` across the pool and returns when every task is done. A call made while
/// the pool is busy (another model's product, or a nested call) runs on the caller alone.
pub fn parallel_for(tasks: usize, f: &(dyn Fn(usize) + Sync)) {
    let pool = pool();
    if tasks <= 1 || pool.workers == 0 {
        (0..tasks).for_each(f);
        return;
    }
    match pool.call.try_lock() {
        Ok(_guard) => pool.run(tasks, f),
        Err(_) => (0..tasks).for_each(f),
    }
}

/// The job of the current product: a borrowed closure, valid while `Pool::run` waits.
struct Job(UnsafeCell<Option<*const (dyn Fn(usize) + Sync)>>);
// SAFETY: written only by the thread holding `Pool::call` before it opens the product in
// `Shared::state`, read only by workers that joined it while open, and cleared only after
// the product is closed and every worker in it has left.
unsafe impl Sync for Job {}
unsafe impl Send for Job {}

/// [`Shared::state`]: whether the product is open to join.
const OPEN: u64 = 1 << 32;
/// [`Shared::state`]: the workers in the product, in the low 32 bits.
const JOINED: u64 = OPEN - 1;
/// [`Shared::state`]: the product's number, above the open bit.
const EPOCH_SHIFT: u32 = 33;

struct Shared {
    /// The product's number (bumped for each), whether it is open, and how many workers
    /// joined it, in one word, so that joining and closing cannot cross.
    state: AtomicU64,
    job: Job,
    tasks: AtomicUsize,
    next: AtomicUsize,
    /// Workers parked on `wake`.
    sleepers: AtomicUsize,
    stop: AtomicBool,
    /// A task panicked on a worker (the caller re-raises it).
    panicked: AtomicBool,
    lock: Mutex<()>,
    wake: Condvar,
}

struct Pool {
    workers: usize,
    shared: Arc<Shared>,
    /// Serializes products.
    call: Mutex<()>,
}

impl Pool {
    fn new(workers: usize) -> Self {
        let shared = Arc::new(Shared {
            state: AtomicU64::new(0),
            job: Job(UnsafeCell::new(None)),
            tasks: AtomicUsize::new(0),
            next: AtomicUsize::new(0),
            sleepers: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            panicked: AtomicBool::new(false),
            lock: Mutex::new(()),
            wake: Condvar::new(),
        });
        let mut started = 0;
        for i in 0..workers {
            let s = shared.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("wasmlm-kernels-{i}"))
                .spawn(move || worker(&s));
            if spawned.is_ok() {
                started += 1;
            }
        }
        Self {
            workers: started,
            shared,
            call: Mutex::new(()),
        }
    }

    fn run(&self, tasks: usize, f: &(dyn Fn(usize) + Sync)) {
        let s = &*self.shared;
        // SAFETY: see `Job`; `f` outlives this call, which waits until no worker uses it.
        unsafe {
            *s.job.0.get() = Some(std::mem::transmute::<
                *const (dyn Fn(usize) + Sync + '_),
                *const (dyn Fn(usize) + Sync + 'static),
            >(f as *const _));
        }
        s.tasks.store(tasks, Ordering::SeqCst);
        s.next.store(0, Ordering::SeqCst);
        // Closed products have no workers left, so the word is the epoch alone.
        let epoch = s.state.load(Ordering::SeqCst) >> EPOCH_SHIFT;
        s.state
            .store(((epoch + 1) << EPOCH_SHIFT) | OPEN, Ordering::SeqCst);
        if s.sleepers.load(Ordering::SeqCst) > 0 {
            let _g = s.lock.lock().unwrap_or_else(|p| p.into_inner());
            s.wake.notify_all();
        }
        // Closes the product and waits for the workers in it, even when a task of this
        // thread panics: they borrow `f`.
        let done = WaitForWorkers(s);
        take_tasks(s, f);
        drop(done);
        if s.panicked.swap(false, Ordering::SeqCst) {
            panic!("a kernel task panicked on a pool thread");
        }
    }
}

struct WaitForWorkers<'a>(&'a Shared);

impl Drop for WaitForWorkers<'_> {
    fn drop(&mut self) {
        // Nobody joins after this; those in it leave when the tasks run out.
        self.0.state.fetch_and(!OPEN, Ordering::SeqCst);
        while self.0.state.load(Ordering::Acquire) & JOINED > 0 {
            std::hint::spin_loop();
        }
        // SAFETY: every worker is done with the job.
        unsafe { *self.0.job.0.get() = None };
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        let _g = self.shared.lock.lock().unwrap_or_else(|p| p.into_inner());
        self.shared.wake.notify_all();
    }
}

fn take_tasks(s: &Shared, f: &(dyn Fn(usize) + Sync)) {
    let tasks = s.tasks.load(Ordering::Acquire);
    loop {
        let t = s.next.fetch_add(1, Ordering::AcqRel);
        if t >= tasks {
            break;
        }
        f(t);
    }
}

/// Joins the open product if it is one this worker has not seen; marks any product it
/// sees as seen. Whether it joined.
fn join(s: &Shared, seen: &mut u64) -> bool {
    let mut state = s.state.load(Ordering::SeqCst);
    loop {
        let epoch = state >> EPOCH_SHIFT;
        if epoch == *seen {
            return false;
        }
        if state & OPEN == 0 {
            // Closed before this worker came: the caller did the work.
            *seen = epoch;
            return false;
        }
        match s
            .state
            .compare_exchange_weak(state, state + 1, Ordering::SeqCst, Ordering::SeqCst)
        {
            Ok(_) => {
                *seen = epoch;
                return true;
            }
            Err(now) => state = now,
        }
    }
}

fn worker(s: &Shared) {
    let mut seen = 0;
    loop {
        let mut idle_since: Option<Instant> = None;
        let mut spins = 0u32;
        loop {
            if join(s, &mut seen) {
                break;
            }
            if s.stop.load(Ordering::SeqCst) {
                return;
            }
            spins += 1;
            if spins < 1000 {
                std::hint::spin_loop();
                continue;
            }
            // Past a short pure spin: give the core away when someone else wants it.
            std::thread::yield_now();
            let since = *idle_since.get_or_insert_with(Instant::now);
            if since.elapsed() < SPIN {
                continue;
            }
            let mut g = s.lock.lock().unwrap_or_else(|p| p.into_inner());
            s.sleepers.fetch_add(1, Ordering::SeqCst);
            while s.state.load(Ordering::SeqCst) >> EPOCH_SHIFT == seen
                && !s.stop.load(Ordering::SeqCst)
            {
                g = s.wake.wait(g).unwrap_or_else(|p| p.into_inner());
            }
            s.sleepers.fetch_sub(1, Ordering::SeqCst);
            idle_since = None;
            spins = 0;
        }
        // SAFETY: joining an open product: its job stays valid until this worker leaves.
        if let Some(job) = unsafe { *s.job.0.get() } {
            let f = unsafe { &*job };
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| take_tasks(s, f))).is_err()
            {
                s.panicked.store(true, Ordering::SeqCst);
            }
        }
        s.state.fetch_sub(1, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    #[test]
    fn every_task_runs_once_in_many_products_from_many_threads() {
        // Products back to back (workers spinning), after pauses (workers parked), and from
        // several threads at once (one gets the pool, the others run alone).
        std::thread::scope(|scope| {
            for caller in 0..3u32 {
                scope.spawn(move || {
                    for round in 0..300u32 {
                        let tasks = ((round * 7 + caller) % 37) as usize;
                        let counts: Vec<AtomicU32> =
                            (0..tasks).map(|_| AtomicU32::new(0)).collect();
                        parallel_for(tasks, &|t| {
                            counts[t].fetch_add(1, Ordering::Relaxed);
                        });
                        assert!(counts.iter().all(|c| c.load(Ordering::Relaxed) == 1));
                        if round % 100 == 99 {
                            std::thread::sleep(SPIN * 2);
                        }
                    }
                });
            }
        });
    }

    #[test]
    fn a_panicking_task_panics_the_caller_and_the_pool_goes_on() {
        let hit = std::panic::catch_unwind(|| {
            parallel_for(64, &|t| {
                if t == 40 {
                    panic!("task 40");
                }
            })
        });
        assert!(hit.is_err());
        let sum = AtomicUsize::new(0);
        parallel_for(64, &|t| {
            sum.fetch_add(t, Ordering::Relaxed);
        });
        assert_eq!(sum.load(Ordering::Relaxed), 64 * 63 / 2);
    }
}
