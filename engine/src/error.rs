//! Engine errors. Every error carries enough context to be printed as the one-line
//! reason the CLI shows, and maps to the errno an NBD client should see.

use std::io;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O error on a device, with what we were doing.
    /// Displays as "context: OS error" on one line (the source is part of
    /// the message, not a separate cause, so chains do not repeat it).
    #[error("{context}: {source}")]
    Io { context: String, source: io::Error },
    /// The operation is not allowed in the current state or with these arguments.
    #[error("{0}")]
    Refused(String),
    /// A request reaches past the end of the export.
    #[error("request [{offset}, +{len}) is past the end of the {size}-byte export")]
    OutOfRange { offset: u64, len: u64, size: u64, write: bool },
    #[error("the export is read-only")]
    ReadOnly,
    #[error("{0}")]
    NotSupported(String),
    #[error("the device is shutting down")]
    Shutdown,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(context: impl Into<String>, source: io::Error) -> Error {
        Error::Io { context: context.into(), source }
    }

    /// The errno an NBD client should receive for this error.
    pub fn errno(&self) -> i32 {
        match self {
            Error::Io { source, .. } => match source.raw_os_error() {
                Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG) => libc::ENOSPC,
                Some(libc::EPERM) | Some(libc::EROFS) | Some(libc::EACCES) => libc::EPERM,
                Some(libc::EOPNOTSUPP) => libc::ENOTSUP,
                Some(libc::EINVAL) => libc::EINVAL,
                _ => libc::EIO,
            },
            Error::Refused(_) => libc::EINVAL,
            Error::OutOfRange { write: true, .. } => libc::ENOSPC,
            Error::OutOfRange { write: false, .. } => libc::EINVAL,
            Error::ReadOnly => libc::EPERM,
            Error::NotSupported(_) => libc::ENOTSUP,
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
        self.map_err(|source| Error::Io { context: context(), source })
    }
}
