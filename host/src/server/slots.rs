//! A model's slots: warm component instances, each with its own KV caches, handed to requests
//! by prompt-prefix affinity, with a bounded FIFO queue for requests that find every slot busy.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use tokio::sync::oneshot;

use crate::runtime::{Instance, Runtime, RuntimeError};

/// One slot: an instance (none until created, or after a trap) and what its caches hold.
pub struct Slot {
    pub id: usize,
    pub instance: Option<Instance>,
    /// The conversation text this slot last served (prompt + answer), to match new prompts.
    pub affinity: String,
    last_used: Instant,
}

/// A slot's instance set up for `model`: a new one when there is none yet or a trap left the
/// last one untrustworthy.
pub fn ready_instance<'a>(
    instance: &'a mut Option<Instance>,
    runtime: &Runtime,
    model: &str,
) -> Result<&'a mut Instance, RuntimeError> {
    if instance.as_ref().is_some_and(|i| !i.is_healthy()) {
        *instance = None;
    }
    match instance {
        Some(i) => Ok(i),
        empty => Ok(empty.insert(runtime.create_instance(model)?)),
    }
}

/// Why no slot was handed out.
#[derive(Debug, PartialEq, Eq)]
pub enum AcquireError {
    /// Every slot busy and the queue full.
    Busy,
    /// The pool was closed (the node is shutting down).
    Closed,
}

struct PoolState {
    idle: Vec<Slot>,
    waiters: VecDeque<oneshot::Sender<SlotLease>>,
    total: usize,
}

/// The slots of one model.
pub struct SlotPool {
    state: Mutex<PoolState>,
    queue_limit: usize,
}

impl SlotPool {
    /// An empty pool (slots are added once the model is warm).
    pub fn new(queue_limit: usize) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(PoolState {
                idle: Vec::new(),
                waiters: VecDeque::new(),
                total: 0,
            }),
            queue_limit,
        })
    }

    fn lock(&self) -> MutexGuard<'_, PoolState> {
        // A panic while holding the lock cannot leave the state half-updated: every update is
        // a single push or pop.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a slot with `instance`.
    pub fn add(self: &Arc<Self>, instance: Instance) {
        let slot = {
            let mut s = self.lock();
            s.total += 1;
            Slot {
                id: s.total - 1,
                instance: Some(instance),
                affinity: String::new(),
                last_used: Instant::now(),
            }
        };
        self.release(slot);
    }

    /// A slot for a request whose conversation text is `key`: the idle slot that shares the
    /// longest prefix with it (else the least recently used), or the next one freed if none is
    /// idle and the queue has room.
    pub async fn acquire(self: &Arc<Self>, key: &str) -> Result<SlotLease, AcquireError> {
        let rx = {
            let mut s = self.lock();
            if s.total == 0 {
                return Err(AcquireError::Closed);
            }
            if let Some(i) = best_slot(&s.idle, key) {
                let slot = s.idle.swap_remove(i);
                return Ok(SlotLease {
                    pool: self.clone(),
                    slot: Some(slot),
                });
            }
            s.waiters.retain(|w| !w.is_closed());
            if s.waiters.len() >= self.queue_limit {
                return Err(AcquireError::Busy);
            }
            let (tx, rx) = oneshot::channel();
            s.waiters.push_back(tx);
            rx
        };
        // A lease sent to a waiter that has gone is dropped with the channel, and its drop
        // hands the slot on: no slot is ever lost to a client that gave up.
        rx.await.map_err(|_| AcquireError::Closed)
    }

    /// An idle slot for `key` if there is one, without waiting: for the further choices of a
    /// request that already holds one.
    pub fn try_acquire(self: &Arc<Self>, key: &str) -> Option<SlotLease> {
        let mut s = self.lock();
        let i = best_slot(&s.idle, key)?;
        let slot = s.idle.swap_remove(i);
        Some(SlotLease {
            pool: self.clone(),
            slot: Some(slot),
        })
    }

    fn release(self: &Arc<Self>, mut slot: Slot) {
        slot.last_used = Instant::now();
        let mut s = self.lock();
        while let Some(w) = s.waiters.pop_front() {
            let lease = SlotLease {
                pool: self.clone(),
                slot: Some(slot),
            };
            match w.send(lease) {
                Ok(()) => return,
                Err(mut lease) => match lease.slot.take() {
                    Some(back) => slot = back,
                    None => return,
                },
            }
        }
        s.idle.push(slot);
    }

    /// Slots in this pool.
    pub fn total(&self) -> usize {
        self.lock().total
    }

    /// Slots serving a request now.
    pub fn busy(&self) -> usize {
        let s = self.lock();
        s.total - s.idle.len()
    }

    /// Requests waiting for a slot.
    pub fn queued(&self) -> usize {
        self.lock()
            .waiters
            .iter()
            .filter(|w| !w.is_closed())
            .count()
    }

    /// Idle slots and the length of the conversation text each holds (the `/node` summary of
    /// the prefix caches).
    pub fn cached(&self) -> Vec<(usize, usize)> {
        let s = self.lock();
        let mut v: Vec<(usize, usize)> = s.idle.iter().map(|x| (x.id, x.affinity.len())).collect();
        v.sort_unstable();
        v
    }
}

/// Index of the idle slot to use for `key`.
fn best_slot(idle: &[Slot], key: &str) -> Option<usize> {
    let scored = idle
        .iter()
        .enumerate()
        .map(|(i, s)| (i, common_prefix(&s.affinity, key), s.last_used));
    let best = scored
        .clone()
        .max_by_key(|&(_, n, _)| n)
        .filter(|&(_, n, _)| n > 0);
    match best {
        Some((i, _, _)) => Some(i),
        None => scored.min_by_key(|&(_, _, t)| t).map(|(i, _, _)| i),
    }
}

/// Length in bytes of the common prefix of `a` and `b`.
fn common_prefix(a: &str, b: &str) -> usize {
    a.bytes().zip(b.bytes()).take_while(|(x, y)| x == y).count()
}

/// A slot lent to one request; dropping it returns the slot.
pub struct SlotLease {
    pool: Arc<SlotPool>,
    slot: Option<Slot>,
}

impl std::ops::Deref for SlotLease {
    type Target = Slot;
    fn deref(&self) -> &Slot {
        self.slot.as_ref().expect("slot present until drop")
    }
}

impl std::ops::DerefMut for SlotLease {
    fn deref_mut(&mut self) -> &mut Slot {
        self.slot.as_mut().expect("slot present until drop")
    }
}

impl Drop for SlotLease {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            self.pool.release(slot);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(id: usize, affinity: &str) -> Slot {
        Slot {
            id,
            instance: None,
            affinity: affinity.into(),
            last_used: Instant::now(),
        }
    }

    #[test]
    fn the_longest_shared_prefix_wins_else_the_oldest() {
        let idle = vec![slot(0, "user:hi"), slot(1, "user:hello there, assistant:")];
        assert_eq!(best_slot(&idle, "user:hello there, assistant: x"), Some(1));
        assert_eq!(best_slot(&idle, "zzz"), Some(0));
        assert_eq!(best_slot(&[], "x"), None);
    }

    #[tokio::test]
    async fn queue_is_bounded_and_leases_come_back() {
        let pool = SlotPool::new(1);
        {
            let mut s = pool.lock();
            s.total = 1;
            s.idle.push(slot(0, ""));
        }
        let first = pool.acquire("a").await.unwrap();
        assert_eq!(pool.busy(), 1);
        let p2 = pool.clone();
        let waiter = tokio::spawn(async move { p2.acquire("b").await.map(|l| l.id) });
        while pool.queued() == 0 {
            tokio::task::yield_now().await;
        }
        assert_eq!(pool.acquire("c").await.err(), Some(AcquireError::Busy));
        drop(first);
        assert_eq!(waiter.await.unwrap(), Ok(0));
        assert_eq!((pool.busy(), pool.queued()), (0, 0));
    }
}
