//! The one lock-poisoning policy of the engine (and of the NBD frontend, which
//! takes its mutexes through [`lock`] too).
//!
//! A std mutex is poisoned when a thread panics while holding it. Release
//! builds abort on panic (`panic = "abort"`), so poisoning can only be seen in
//! tests and debug builds; there the data is used as it is, because every
//! critical section in the engine leaves its data consistent at each step it
//! can panic from (no multi-step invariants are half-updated across a call
//! that may panic). Every engine mutex is taken through [`lock`].

use std::sync::{Mutex, MutexGuard};

/// Locks `m`, recovering the data of a poisoned mutex (see the module docs).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
