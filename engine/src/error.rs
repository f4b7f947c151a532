//! Engine errors. Every error carries enough context to be printed as the one-line
//! reason the CLI shows, and maps to the errno an NBD client should see.

use std::io;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O error on a device, with what we were doing. Displays as
    /// "context: OS error" on one line; the OS error is part of the message,
    /// not a separate cause, so a chain printer does not repeat it.
    #[error("{context}: {cause}")]
    Io { context: String, cause: io::Error },
    /// Not allowed now, by the device state or a safety rule (a target that is
    /// the source, a target that is too small): nothing was changed.
    #[error("{0}")]
    Refused(String),
    /// A setting or argument that cannot work (a region size that is not a power
    /// of two, a device whose alignment exceeds the region size).
    #[error("{0}")]
    InvalidConfig(String),
    /// Something that must not happen: a bug. Clients see EIO.
    #[error("internal error: {0}")]
    Internal(String),
    /// A request reaches past the end of the export.
    #[error("request [{offset}, +{len}) is past the end of the {size}-byte export")]
    OutOfRange { offset: u64, len: u64, size: u64, write: bool },
    #[error("the export is read-only")]
    ReadOnly,
    #[error("the device is shutting down")]
    Shutdown,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(context: impl Into<String>, source: io::Error) -> Error {
        Error::Io { context: context.into(), cause: source }
    }

    /// The errno an NBD client should receive for this error.
    pub fn errno(&self) -> i32 {
        match self {
            Error::Io { cause, .. } => match cause.raw_os_error() {
                Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG) => libc::ENOSPC,
                Some(libc::EPERM) | Some(libc::EROFS) | Some(libc::EACCES) => libc::EPERM,
                Some(libc::EOPNOTSUPP) => libc::ENOTSUP,
                Some(libc::EINVAL) => libc::EINVAL,
                // Refused for lack of space before the OS was asked (an
                // overlay's limit): the message says more than an errno could.
                None if cause.kind() == io::ErrorKind::StorageFull => libc::ENOSPC,
                _ => libc::EIO,
            },
            Error::Refused(_) | Error::InvalidConfig(_) => libc::EINVAL,
            Error::Internal(_) => libc::EIO,
            Error::OutOfRange { write: true, .. } => libc::ENOSPC,
            Error::OutOfRange { write: false, .. } => libc::EINVAL,
            Error::ReadOnly => libc::EPERM,
            Error::Shutdown => libc::ESHUTDOWN,
        }
    }
}

/// Adds context to `io::Result`s.
pub trait IoContext<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|cause| Error::Io { context: context(), cause })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_io_error_says_its_reason_once_even_through_a_chain_printer() {
        let e = Error::io("cannot open /x", io::Error::from_raw_os_error(libc::ENOENT));
        let chained = format!("{:#}", anyhow_like(&e));
        assert_eq!(chained.matches("No such file").count(), 1, "{chained}");
    }

    /// What `anyhow`'s `{:#}` prints: the error and every source below it.
    fn anyhow_like(e: &dyn std::error::Error) -> String {
        let mut out = e.to_string();
        let mut cur = e.source();
        while let Some(c) = cur {
            out.push_str(": ");
            out.push_str(&c.to_string());
            cur = c.source();
        }
        out
    }

    #[test]
    fn internal_errors_are_eio_not_einval() {
        assert_eq!(Error::Internal("x".into()).errno(), libc::EIO);
        assert_eq!(Error::InvalidConfig("x".into()).errno(), libc::EINVAL);
    }
}
