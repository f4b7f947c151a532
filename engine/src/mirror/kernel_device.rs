//! The kernel block device in front of the export (`/dev/nbdN`, `/dev/ublkbN`),
//! as the frontend that made it declares it: `status` names it, and `grow`
//! is refused while it cannot follow a size change (nothing is changed then).

use super::Mirror;
use crate::error::{Error, Result};
use crate::sync::lock;

/// A kernel block device that serves the export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelDevice {
    /// Its path, as `status` shows it.
    pub path: String,
    /// Why it cannot take a larger size while it runs (`None`: it can).
    pub grow_refusal: Option<String>,
}

impl Mirror {
    /// Declares (or, with `None`, forgets) the kernel device that serves the export.
    pub fn set_kernel_device(&self, dev: Option<KernelDevice>) {
        *lock(&self.kernel_device) = dev;
    }

    pub fn kernel_device(&self) -> Option<KernelDevice> {
        lock(&self.kernel_device).clone()
    }

    /// Fails with the kernel device's reason when it cannot follow a grow.
    pub(crate) fn check_growable(&self) -> Result<()> {
        match lock(&self.kernel_device).as_ref().and_then(|k| k.grow_refusal.clone()) {
            Some(why) => Err(Error::Refused(why)),
            None => Ok(()),
        }
    }
}
