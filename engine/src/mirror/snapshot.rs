//! The device's state written to a file on demand, for a daemon run without
//! `--state`: `livemirror upgrade` hands it to the next process, which would
//! otherwise start without the copy's progress, the detached source or the
//! runtime settings (they live only in this process's memory).

use std::path::Path;

use super::Mirror;
use crate::error::{Error, Result};
use crate::statefile::{self, StateFile};

impl Mirror {
    /// Writes the state to a new state file at `path`. Call after
    /// [`Mirror::shutdown`]: nothing is in flight and every device has been
    /// flushed, so every region marked clean is durable on the target, and no
    /// region needs an intent mark.
    pub fn write_state_file(&self, path: &Path) -> Result<()> {
        let route = self.route();
        let target = route.target.as_ref().map(|t| &*t.backend);
        let mut img = statefile::fresh_image(route.state, self.shift, self.size(), route.source.as_deref(), target);
        {
            let map = self.map.lock();
            img.clean = map.clean_bits().clone();
            img.discarded = map.discarded_bits().clone();
            img.unverifiable = map.unverifiable_bits().clone();
        }
        img.settings = Some(self.settings());
        StateFile::create(path, &img)
            .map(|_| ())
            .map_err(|e| Error::io(format!("cannot write the state file {}", path.display()), e))
    }
}
