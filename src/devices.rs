//! Which devices `serve` and `attach` accept: local paths, and NBD exports
//! named by URI (`nbd://HOST[:PORT]/EXPORT`, `nbds://…`,
//! `nbd+unix:///EXPORT?socket=PATH`), opened by nbd-frontend's remote device.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use nbd_frontend::remote::{is_nbd_uri, NbdOpener, NbdUri, RemoteOptions};

/// How a device is named, at the end of `serve --help` and `attach --help` (and
/// so of their man pages); livemirror.uri(7) has the whole grammar. The
/// indented lines stay under 72 columns: in a man page each is a line of its
/// own, and a longer one would wrap.
pub(crate) const DEVICE_HELP: &str = "\
A device (serve's --source and --target, attach's TARGET) is a path or
an NBD export named by a URI:
  /dev/sdb, disk.img
      a block device or an image file
  nbd://HOST[:PORT]/EXPORT
      NBD over TCP (port 10809 by default)
  nbds://HOST[:PORT]/EXPORT?tls-certificates=DIR
      TLS with X.509: DIR/ca-cert.pem verifies the server;
      DIR/client-cert.pem and client-key.pem, if present,
      are livemirror's own certificate
  nbds://[NAME@]HOST[:PORT]/EXPORT?tls-psk-file=FILE
      TLS with NAME's pre-shared key from FILE (psktool's
      identity:hexkey lines; without NAME@, its only key)
  nbd+unix:///EXPORT?socket=PATH
      a Unix socket; nbds+unix:// takes &tls-certificates=DIR
      or &tls-psk-file=FILE after it

Quote a URI that holds ? or & from the shell. The whole grammar:
  man livemirror.uri";

/// How remote devices (NBD URIs) behave on a bad link.
#[derive(Args, Debug, Clone)]
pub(crate) struct RemoteArgs {
    /// How long an I/O to a remote device waits for its link (reconnects
    /// included) before it fails; a failed remote target is dropped (degraded).
    #[arg(long, value_name = "SECS", default_value_t = RemoteOptions::DEFAULT_TIMEOUT.as_secs_f64())]
    pub(crate) remote_timeout: f64,
    /// Connections to a remote device whose server allows several (CAN_MULTI_CONN).
    #[arg(long, value_name = "N", default_value_t = RemoteOptions::DEFAULT_CONNECTIONS)]
    pub(crate) remote_connections: usize,
}

impl RemoteArgs {
    /// The opener the engine uses for `--source`, `--target` and `attach`.
    pub(crate) fn opener(&self) -> anyhow::Result<engine::Opener> {
        let timeout = Duration::try_from_secs_f64(self.remote_timeout)
            .ok()
            .filter(|d| !d.is_zero())
            .ok_or_else(|| anyhow::anyhow!("--remote-timeout must be a positive number of seconds"))?;
        if !(1..=16).contains(&self.remote_connections) {
            anyhow::bail!("--remote-connections must be between 1 and 16");
        }
        let options = RemoteOptions { timeout, connections: self.remote_connections };
        Ok(engine::Opener(std::sync::Arc::new(NbdOpener { options })))
    }
}

/// A device name made independent of the working directory: a path made
/// absolute; a URI kept as it is, except the files it names (socket, TLS
/// credentials), which are made absolute inside it.
pub(crate) fn absolute(name: &Path) -> std::io::Result<PathBuf> {
    match name.to_str().filter(|s| is_nbd_uri(s)) {
        Some(s) => match NbdUri::parse(s) {
            Ok(uri) => {
                let abs = uri.clone().with_absolute_paths(&std::env::current_dir()?);
                // Rewritten only when a file name in it was relative.
                Ok(if abs == uri { name.to_path_buf() } else { PathBuf::from(abs.to_string()) })
            }
            // Kept as given: the daemon's opener says what is wrong with it.
            Err(_) => Ok(name.to_path_buf()),
        },
        None => std::path::absolute(name),
    }
}
