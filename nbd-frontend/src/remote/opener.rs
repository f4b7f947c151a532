//! The device opener the daemon installs: NBD URIs become remote devices,
//! anything else is a local path for the engine.

use std::path::Path;

use engine::{Backend, DeviceOpener, OpenOptions};

use super::device::{OpenError, RemoteExport, RemoteOptions};
use super::uri::{is_nbd_uri, NbdUri};

/// Opens `nbd://`, `nbds://` and `nbd+unix://` names as NBD exports.
#[derive(Debug, Default, Clone)]
pub struct NbdOpener {
    /// How the devices it opens behave on a bad link.
    pub options: RemoteOptions,
}

impl DeviceOpener for NbdOpener {
    fn open(&self, name: &Path, viewer: Option<u32>, opts: &OpenOptions) -> engine::Result<Backend> {
        let Some(text) = name.to_str().filter(|s| is_nbd_uri(s)) else {
            return Backend::open_as(name, viewer, opts);
        };
        let uri = NbdUri::parse(text).map_err(|e| engine::Error::InvalidConfig(format!("{text}: {e}")))?;
        let locate = |p: &Path| engine::hostfs::locate(p, viewer);
        let dev = RemoteExport::open(&uri, name, &self.options, &locate).map_err(|e| match e {
            OpenError::Io { context, cause } => engine::Error::io(context, cause),
            OpenError::Refused(why) => engine::Error::Refused(why),
        })?;
        if opts.writable && dev.read_only() {
            return Err(engine::Error::Refused(format!(
                "{text} is a read-only export (the server says so): it cannot be written, so it cannot be a \
                 target, nor a source served writable (serve it with --read-only)"
            )));
        }
        Ok(Backend::Remote(dev))
    }
}
