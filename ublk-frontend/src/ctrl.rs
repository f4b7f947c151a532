//! The control device, `/dev/ublk-control`: adding, starting, stopping,
//! deleting and recovering devices.
//!
//! Each command is an `IORING_OP_URING_CMD` in a 128-byte SQE on a small ring of
//! its own, made for that one command and closed after it. Control commands are
//! rare, and a ring per command needs no locking between the threads that send
//! them. START_DEV and END_USER_RECOVERY wait in the kernel until every queue
//! has fetched all its requests, so they must never be sent from a queue's own
//! thread, and every command is bounded: when the bound passes the ring is
//! closed, which interrupts the kernel's wait.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::time::Duration;

use io_uring::{cqueue, opcode, squeue, types, IoUring};

use crate::sys::{self, CtrlCmd, DevInfo, Params};

/// How long a control command may take, unless it says otherwise. Adding and
/// deleting devices take milliseconds; this only bounds a stuck kernel.
const DEFAULT_BOUND: Duration = Duration::from_secs(30);

/// An open control device.
pub struct Control {
    file: File,
}

/// True when the ublk driver is loaded (its control device exists).
pub fn driver_loaded() -> bool {
    std::path::Path::new(sys::CONTROL_PATH).exists()
}

impl Control {
    /// Opens `/dev/ublk-control`. `NotFound` means the driver is not loaded.
    pub fn open() -> io::Result<Control> {
        let file = std::fs::OpenOptions::new().read(true).write(true).open(sys::CONTROL_PATH)?;
        Ok(Control { file })
    }

    /// Sends one command and waits at most `bound` for its result (bytes or 0;
    /// a negative result is returned as the error it names).
    fn send(&self, op: u32, cmd: CtrlCmd, bound: Duration) -> io::Result<i32> {
        let mut ring: IoUring<squeue::Entry128, cqueue::Entry> = IoUring::builder().build(2)?;
        let sqe = opcode::UringCmd80::new(types::Fd(self.file.as_raw_fd()), op).cmd(cmd.to_sqe_cmd()).build();
        // SAFETY: every buffer `cmd.addr` points to is borrowed by the caller for
        // the whole call, and the ring is closed (its commands cancelled) before
        // this function returns on every path.
        unsafe { ring.submission().push(&sqe) }.map_err(|_| io::Error::other("control ring full"))?;
        let ts = types::Timespec::from(bound);
        let args = types::SubmitArgs::new().timespec(&ts);
        loop {
            match ring.submitter().submit_with_args(1, &args) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) if e.raw_os_error() == Some(libc::ETIME) => {
                    // Dropping the ring cancels the command in the kernel.
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("the ublk driver did not answer within {} s", bound.as_secs()),
                    ));
                }
                Err(e) => return Err(e),
            }
            if let Some(cqe) = ring.completion().next() {
                let r = cqe.result();
                return if r < 0 { Err(io::Error::from_raw_os_error(-r)) } else { Ok(r) };
            }
        }
    }

    /// The driver's features (`UBLK_F_*`), Linux 6.5 and later; 0 before (the
    /// command is unknown there).
    pub fn features(&self) -> io::Result<u64> {
        let mut features = 0u64;
        let cmd = CtrlCmd { len: 8, addr: &mut features as *mut u64 as u64, ..CtrlCmd::new(u32::MAX) };
        match self.send(sys::CMD_GET_FEATURES, cmd, DEFAULT_BOUND) {
            Ok(_) => Ok(features),
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) || e.raw_os_error() == Some(libc::EINVAL) => Ok(0),
            Err(e) => Err(e),
        }
    }

    /// ADD_DEV: creates `/dev/ublkcN` from `info` (`dev_id` `u32::MAX`: the next
    /// free number). The kernel writes back what it made: the number, the
    /// flags it kept, the queue count it allows.
    pub fn add(&self, info: &mut DevInfo) -> io::Result<()> {
        let cmd = CtrlCmd {
            len: std::mem::size_of::<DevInfo>() as u16,
            addr: info as *mut DevInfo as u64,
            ..CtrlCmd::new(info.dev_id)
        };
        self.send(sys::CMD_ADD_DEV, cmd, DEFAULT_BOUND).map(|_| ())
    }

    pub fn info(&self, id: u32) -> io::Result<DevInfo> {
        let mut info = DevInfo::default();
        let cmd = CtrlCmd {
            len: std::mem::size_of::<DevInfo>() as u16,
            addr: &mut info as *mut DevInfo as u64,
            ..CtrlCmd::new(id)
        };
        self.send(sys::CMD_GET_DEV_INFO, cmd, DEFAULT_BOUND)?;
        Ok(info)
    }

    pub fn set_params(&self, id: u32, params: &Params) -> io::Result<()> {
        let mut p = *params;
        p.len = std::mem::size_of::<Params>() as u32;
        let cmd = CtrlCmd { len: p.len as u16, addr: &mut p as *mut Params as u64, ..CtrlCmd::new(id) };
        self.send(sys::CMD_SET_PARAMS, cmd, DEFAULT_BOUND).map(|_| ())
    }

    pub fn params(&self, id: u32) -> io::Result<Params> {
        let mut p = Params { len: std::mem::size_of::<Params>() as u32, ..Default::default() };
        let cmd = CtrlCmd { len: p.len as u16, addr: &mut p as *mut Params as u64, ..CtrlCmd::new(id) };
        self.send(sys::CMD_GET_PARAMS, cmd, DEFAULT_BOUND)?;
        Ok(p)
    }

    /// START_DEV: waits (at most `bound`) until every queue fetched every
    /// request, then makes `/dev/ublkbN`.
    pub fn start(&self, id: u32, pid: i32, bound: Duration) -> io::Result<()> {
        let cmd = CtrlCmd { data: [pid as u64], ..CtrlCmd::new(id) };
        self.send(sys::CMD_START_DEV, cmd, bound).map(|_| ())
    }

    /// STOP_DEV: removes `/dev/ublkbN`; requests still queued fail, and every
    /// queue's fetches complete with `UBLK_IO_RES_ABORT`.
    pub fn stop(&self, id: u32) -> io::Result<()> {
        self.send(sys::CMD_STOP_DEV, CtrlCmd::new(id), DEFAULT_BOUND).map(|_| ())
    }

    /// DEL_DEV: removes `/dev/ublkcN`; waits until nothing holds it (the
    /// server's character device must be closed first).
    pub fn delete(&self, id: u32) -> io::Result<()> {
        self.send(sys::CMD_DEL_DEV, CtrlCmd::new(id), DEFAULT_BOUND).map(|_| ())
    }

    /// START_USER_RECOVERY: the previous server is gone (its character device
    /// closed, the device quiesced); a new one may now open and fetch. EBUSY
    /// while the previous server's exit is still being cleaned up.
    pub fn start_recovery(&self, id: u32) -> io::Result<()> {
        self.send(sys::CMD_START_USER_RECOVERY, CtrlCmd::new(id), DEFAULT_BOUND).map(|_| ())
    }

    /// END_USER_RECOVERY: waits (at most `bound`) until every queue fetched,
    /// then lets the waiting I/O through to the new server.
    pub fn end_recovery(&self, id: u32, pid: i32, bound: Duration) -> io::Result<()> {
        let cmd = CtrlCmd { data: [pid as u64], ..CtrlCmd::new(id) };
        self.send(sys::CMD_END_USER_RECOVERY, cmd, bound).map(|_| ())
    }

    /// UPDATE_SIZE (Linux 6.16): the device's capacity, in 512-byte sectors.
    pub fn update_size(&self, id: u32, sectors: u64) -> io::Result<()> {
        let cmd = CtrlCmd { data: [sectors], ..CtrlCmd::new(id) };
        self.send(sys::CMD_UPDATE_SIZE, cmd, DEFAULT_BOUND).map(|_| ())
    }
}

/// The numbers of the ublk devices that exist now (from `/sys/class/ublk-char`).
pub fn device_ids() -> Vec<u32> {
    let mut ids: Vec<u32> = std::fs::read_dir("/sys/class/ublk-char")
        .map(|dir| {
            dir.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_prefix("ublkc")?.parse().ok()))
                .collect()
        })
        .unwrap_or_default();
    ids.sort_unstable();
    ids
}
