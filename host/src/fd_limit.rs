//! The descriptor budget: the process's `RLIMIT_NOFILE`, raised to its hard
//! limit at start (NGINX `worker_rlimit_nofile`), from which the global
//! connection cap is derived (see [`crate::config::derived_max_connections`]);
//! and the errors that mean the proxy itself ran out of a resource
//! (descriptors, buffers, memory, ephemeral ports), which are never blamed on
//! a backend: not counted for outlier detection or `max_fails`, not failing
//! a health check.

use std::error::Error;
use std::io;

/// Raise the soft `RLIMIT_NOFILE` to the hard limit. Returns the soft limit
/// in force afterwards (unchanged if raising failed: the error is returned
/// with it). Uses the `rlimit` crate (`setrlimit(2)`).
pub fn raise_nofile() -> (u64, Option<io::Error>) {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => (n, None),
        Err(e) => (nofile(), Some(e)),
    }
}

/// The soft `RLIMIT_NOFILE` now (`u64::MAX` if unlimited or unknown).
pub fn nofile() -> u64 {
    rlimit::Resource::NOFILE
        .get()
        .map_or(u64::MAX, |(soft, _hard)| soft)
}

/// True if `e` says this process (not the peer) is out of a resource:
/// `EMFILE`/`ENFILE` (descriptors), `ENOBUFS`, `ENOMEM`, or
/// `EADDRNOTAVAIL` (no ephemeral port left for a connect).
pub fn is_local_resource_error(e: &io::Error) -> bool {
    // Linux errno values (asm-generic/errno-base.h, errno.h).
    const ENOMEM: i32 = 12;
    const ENFILE: i32 = 23;
    const EMFILE: i32 = 24;
    const EADDRNOTAVAIL: i32 = 99;
    const ENOBUFS: i32 = 105;
    if matches!(
        e.kind(),
        io::ErrorKind::OutOfMemory | io::ErrorKind::AddrNotAvailable
    ) {
        return true;
    }
    cfg!(target_os = "linux")
        && matches!(
            e.raw_os_error(),
            Some(ENOMEM | ENFILE | EMFILE | EADDRNOTAVAIL | ENOBUFS)
        )
}

/// The first local resource error (see [`is_local_resource_error`]) in `e`'s
/// source chain, `e` included.
pub fn local_resource_error<'a>(e: &'a (dyn Error + 'static)) -> Option<&'a io::Error> {
    io_error_in(e, is_local_resource_error)
}

/// The first I/O error in `e`'s source chain (`e` included) for which
/// `matches` holds.
pub fn io_error_in<'a>(
    e: &'a (dyn Error + 'static),
    matches: impl Fn(&io::Error) -> bool,
) -> Option<&'a io::Error> {
    let mut next: Option<&(dyn Error + 'static)> = Some(e);
    while let Some(err) = next {
        if let Some(io) = err.downcast_ref::<io::Error>()
            && matches(io)
        {
            return Some(io);
        }
        next = err.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("connect failed")]
    struct Wrapper(#[source] io::Error);

    #[test]
    fn descriptor_exhaustion_is_local_and_refusal_is_not() {
        let emfile = io::Error::from_raw_os_error(24);
        assert!(is_local_resource_error(&emfile));
        let wrapped = Wrapper(io::Error::from_raw_os_error(24));
        assert!(local_resource_error(&wrapped).is_some());
        let refused = Wrapper(io::Error::from(io::ErrorKind::ConnectionRefused));
        assert!(local_resource_error(&refused).is_none());
        let timeout = io::Error::from(io::ErrorKind::TimedOut);
        assert!(!is_local_resource_error(&timeout));
    }

    #[test]
    fn the_soft_limit_is_raised_to_at_least_what_it_was() {
        let before = nofile();
        let (after, _) = raise_nofile();
        assert!(after >= before);
        assert_eq!(nofile(), after);
    }
}
