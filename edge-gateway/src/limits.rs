//! Client keys and their per-minute limits (requests and tokens).
//!
//! Keys are compared as SHA-256 digests in constant time, so neither a key's bytes nor its
//! length leak through timing. Limits are token buckets refilled continuously: a key with
//! `requests_per_minute = 60` may burst 60 requests, then one per second. Tokens are debited
//! after an answer (its `usage.total_tokens`); a key whose token bucket is empty is refused
//! until it refills, so one large answer may overdraw it once.

use std::sync::Mutex;
use std::time::Instant;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::ClientKey;

/// Who a request is, by its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller {
    /// No keys are configured: anyone.
    Open,
    /// A client key (index into the config's keys).
    Client(usize),
    /// The admin key.
    Admin,
}

/// Why a key was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Missing or unknown key.
    Unauthorized,
    /// A client key (or none) on an admin endpoint.
    NotAdmin(&'static str),
    /// Over a limit: which one, and seconds until it allows again.
    Limited {
        what: &'static str,
        retry_after: u64,
    },
}

#[derive(Debug)]
struct Bucket {
    level: f64,
    capacity: f64,
    per_sec: f64,
    at: Instant,
}

impl Bucket {
    fn new(per_minute: u32, now: Instant) -> Self {
        let capacity = f64::from(per_minute);
        Bucket {
            level: capacity,
            capacity,
            per_sec: capacity / 60.0,
            at: now,
        }
    }
    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.level = (self.level + dt * self.per_sec).min(self.capacity);
        self.at = now;
    }
    /// Seconds until the level reaches `need`.
    fn wait_for(&self, need: f64) -> u64 {
        ((need - self.level) / self.per_sec).ceil().max(1.0) as u64
    }
}

#[derive(Debug)]
struct KeyState {
    digest: [u8; 32],
    requests: Option<Bucket>,
    tokens: Option<Bucket>,
}

/// The keys and their buckets.
#[derive(Debug)]
pub struct Limits {
    keys: Mutex<Vec<KeyState>>,
    admin: Option<[u8; 32]>,
    any_client_key: bool,
}

fn digest(s: &str) -> [u8; 32] {
    Sha256::digest(s.as_bytes()).into()
}

impl Limits {
    /// Limits for `keys`, with an optional admin key.
    pub fn new(keys: &[ClientKey], admin: Option<&str>) -> Self {
        let now = Instant::now();
        Limits {
            keys: Mutex::new(
                keys.iter()
                    .map(|k| KeyState {
                        digest: digest(&k.key),
                        requests: k.requests_per_minute.map(|r| Bucket::new(r, now)),
                        tokens: k.tokens_per_minute.map(|t| Bucket::new(t, now)),
                    })
                    .collect(),
            ),
            admin: admin.map(digest),
            any_client_key: !keys.is_empty(),
        }
    }

    /// Who presents `bearer` (the `Authorization: Bearer` value, if any).
    fn identify(&self, bearer: Option<&str>) -> Option<Caller> {
        let d = digest(bearer?);
        if self.admin.is_some_and(|a| bool::from(a.ct_eq(&d))) {
            return Some(Caller::Admin);
        }
        let keys = self.keys.lock().ok()?;
        let mut hit = None;
        // Every key is compared, matched or not, so the time does not say which matched.
        for (i, k) in keys.iter().enumerate() {
            if bool::from(k.digest.ct_eq(&d)) {
                hit = Some(i);
            }
        }
        hit.map(Caller::Client)
    }

    /// Admits a data-plane request: checks the key and takes one request from its bucket.
    pub fn admit(&self, bearer: Option<&str>) -> Result<Caller, Refusal> {
        if !self.any_client_key {
            // With no client keys the data plane is open (an admin key alone guards admin).
            return Ok(self.identify(bearer).unwrap_or(Caller::Open));
        }
        let caller = self.identify(bearer).ok_or(Refusal::Unauthorized)?;
        if let Caller::Client(i) = caller {
            let now = Instant::now();
            let mut keys = self.keys.lock().map_err(|_| Refusal::Unauthorized)?;
            let k = &mut keys[i];
            if let Some(t) = &mut k.tokens {
                t.refill(now);
                if t.level <= 0.0 {
                    return Err(Refusal::Limited {
                        what: "tokens per minute",
                        retry_after: t.wait_for(1.0),
                    });
                }
            }
            if let Some(r) = &mut k.requests {
                r.refill(now);
                if r.level < 1.0 {
                    return Err(Refusal::Limited {
                        what: "requests per minute",
                        retry_after: r.wait_for(1.0),
                    });
                }
                r.level -= 1.0;
            }
        }
        Ok(caller)
    }

    /// Admits an admin request: the admin key, or anyone when no key at all is configured.
    pub fn admit_admin(&self, bearer: Option<&str>) -> Result<(), Refusal> {
        match (self.admin.is_some(), self.any_client_key) {
            (false, false) => Ok(()),
            (false, true) => Err(Refusal::NotAdmin(
                "admin endpoints are disabled: client keys are configured but no admin_key",
            )),
            (true, _) => match self.identify(bearer) {
                Some(Caller::Admin) => Ok(()),
                Some(_) => Err(Refusal::NotAdmin("admin endpoints refuse client keys")),
                None => Err(Refusal::Unauthorized),
            },
        }
    }

    /// Debits the tokens an answer used from the caller's bucket.
    pub fn spend_tokens(&self, caller: Caller, tokens: u64) {
        let Caller::Client(i) = caller else {
            return;
        };
        if let Ok(mut keys) = self.keys.lock() {
            if let Some(t) = keys.get_mut(i).and_then(|k| k.tokens.as_mut()) {
                t.refill(Instant::now());
                t.level -= tokens as f64;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(k: &str, rpm: Option<u32>, tpm: Option<u32>) -> ClientKey {
        ClientKey {
            key: k.into(),
            name: k.into(),
            requests_per_minute: rpm,
            tokens_per_minute: tpm,
        }
    }

    #[test]
    fn keys_admin_and_open_modes() {
        let open = Limits::new(&[], None);
        assert_eq!(open.admit(None), Ok(Caller::Open));
        assert_eq!(open.admit_admin(None), Ok(()));

        let l = Limits::new(&[key("client-1", None, None)], Some("admin-key"));
        assert_eq!(l.admit(None), Err(Refusal::Unauthorized));
        assert_eq!(l.admit(Some("client-2")), Err(Refusal::Unauthorized));
        assert_eq!(l.admit(Some("client-1")), Ok(Caller::Client(0)));
        assert_eq!(l.admit(Some("admin-key")), Ok(Caller::Admin));
        assert!(matches!(
            l.admit_admin(Some("client-1")),
            Err(Refusal::NotAdmin(_))
        ));
        assert_eq!(l.admit_admin(Some("admin-key")), Ok(()));

        let no_admin = Limits::new(&[key("client-1", None, None)], None);
        assert!(matches!(
            no_admin.admit_admin(Some("client-1")),
            Err(Refusal::NotAdmin(_))
        ));
    }

    #[test]
    fn request_and_token_buckets() {
        let l = Limits::new(&[key("client-1", Some(2), Some(100))], None);
        assert!(l.admit(Some("client-1")).is_ok());
        assert!(l.admit(Some("client-1")).is_ok());
        match l.admit(Some("client-1")) {
            Err(Refusal::Limited { what, retry_after }) => {
                assert_eq!(what, "requests per minute");
                assert!((1..=30).contains(&retry_after), "{retry_after}");
            }
            other => panic!("{other:?}"),
        }
        let t = Limits::new(&[key("client-1", None, Some(100))], None);
        t.spend_tokens(Caller::Client(0), 150);
        match t.admit(Some("client-1")) {
            Err(Refusal::Limited { what, retry_after }) => {
                assert_eq!(what, "tokens per minute");
                assert!((30..=31).contains(&retry_after), "{retry_after}");
            }
            other => panic!("{other:?}"),
        }
    }
}
