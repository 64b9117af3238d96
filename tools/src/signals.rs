//! Ending a mount process cleanly: the termination signals are blocked in every thread and
//! received on a signalfd, beside the mount table, so `umount` or a signal both lead to an
//! orderly unmount instead of a process dead with its mounts left behind.

use std::io;
use std::path::Path;

use snapshotter::mount_table::is_mounted;

/// Signals that end a mount process cleanly (unmount, then exit).
const TERMINATION: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

/// Blocks the termination signals in the calling thread and every thread it starts later, so
/// that [`wait_until_unmounted`] receives them instead of the process dying with its mounts
/// left behind. Call before any thread exists.
pub fn block_termination_signals() -> io::Result<()> {
    // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it, and
    // pthread_sigmask only reads it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for signal in TERMINATION {
            libc::sigaddset(&mut set, signal);
        }
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
    }
    Ok(())
}

/// Why [`wait_until_unmounted`] returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaitOutcome {
    /// Someone unmounted the target.
    Unmounted,
    /// A termination signal arrived (the caller unmounts).
    Signalled(i32),
}

/// Blocks until `target` is no longer mounted or a termination signal (blocked with
/// [`block_termination_signals`]) arrives. Waits on `/proc/self/mountinfo` (POLLPRI, which the
/// kernel raises on every mount table change) and a signalfd: no polling loop with sleeps.
pub fn wait_until_unmounted(target: &Path) -> io::Result<WaitOutcome> {
    use std::io::{Read, Seek};
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let mountinfo = std::fs::File::open("/proc/self/mountinfo")?;
    // SAFETY: as in block_termination_signals; signalfd returns a new descriptor we own.
    let signals = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for signal in TERMINATION {
            libc::sigaddset(&mut set, signal);
        }
        let fd = libc::signalfd(-1, &set, libc::SFD_CLOEXEC);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        OwnedFd::from_raw_fd(fd)
    };
    loop {
        if !is_mounted(target) {
            return Ok(WaitOutcome::Unmounted);
        }
        let mut fds = [
            libc::pollfd {
                fd: mountinfo.as_raw_fd(),
                events: libc::POLLPRI | libc::POLLERR,
                revents: 0,
            },
            libc::pollfd {
                fd: signals.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: two valid pollfds for the duration of the call.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if rc < 0 {
            let error = io::Error::last_os_error();
            if error.kind() != io::ErrorKind::Interrupted {
                return Err(error);
            }
            continue;
        }
        if fds[1].revents & libc::POLLIN != 0 {
            let mut info = [0u8; std::mem::size_of::<libc::signalfd_siginfo>()];
            let mut file = std::fs::File::from(signals.try_clone()?);
            file.read_exact(&mut info)?;
            let signal = u32::from_ne_bytes(info[..4].try_into().expect("4 bytes")) as i32;
            return Ok(WaitOutcome::Signalled(signal));
        }
        // Re-arm: the event stays signalled until the file is read from the start again.
        let mut reader = &mountinfo;
        reader.seek(io::SeekFrom::Start(0))?;
        reader.read_to_end(&mut Vec::new())?;
    }
}
