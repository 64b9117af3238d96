//! The session keeper: a small process that holds the node's FUSE session descriptor, so the
//! kernel's side of every sealed-layer mount outlives a restart, crash or upgrade of the
//! daemon. The kernel keeps a FUSE connection alive while any process holds its `/dev/fuse`
//! descriptor; requests that arrive while no daemon serves it wait in the kernel, and the next
//! daemon takes a copy of the descriptor from the keeper and answers them (see
//! `docs/semantics.md`, "Restarts").
//!
//! The keeper is the daemon's own binary (`containerd-sealfs-grpc keep-sessions`), started by
//! the daemon the first time it mounts a session and detached from it (its own session and
//! process group), so that a `kill -9` of the daemon, or systemd stopping only the main process
//! (`KillMode=process`, as containerd's unit does for its shims), leaves it running. It knows
//! nothing of FUSE: it holds named descriptors and answers a few requests on a unix socket in
//! the daemon's private root, from root only. It exits once a `release` leaves it holding
//! nothing (`containerd-sealfs-grpc release`, the deliberate shutdown).
//!
//! Protocol: one `SOCK_SEQPACKET` message per request and one per reply, text, a descriptor
//! attached as `SCM_RIGHTS` where one travels:
//! - `store NAME` + fd -> `ok` (replaces a descriptor held under that name)
//! - `take NAME` -> `ok` + a copy of the fd (the keeper keeps its own), or `none`
//! - `release NAME` -> `ok` or `none`
//! - `list` -> `ok NAME NAME ...`
//!
//! Depends on nothing else in the crate.

use std::collections::BTreeMap;
use std::io::{self, BufRead, IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use nix::sys::socket::{
    self, AddressFamily, Backlog, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag,
    SockType, UnixAddr,
};

/// The name the node's FUSE session is kept under.
pub const NODE_SESSION: &str = "node-session";
/// The keeper's socket, in the daemon's root.
pub const SOCKET_NAME: &str = "session-keeper.sock";
/// The keeper's log, in the daemon's root.
pub const LOG_NAME: &str = "session-keeper.log";
/// What the keeper prints on stdout once it answers on its socket.
const READY_LINE: &str = "session keeper ready";

/// Descriptors the keeper holds at most: the node has one session; the bound keeps a
/// misbehaving client from filling the keeper's descriptor table.
const MAX_HELD: usize = 16;
/// Longest request or reply; names are short.
const MAX_MESSAGE: usize = 512;
/// How long either side waits for the other's message.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// A client of the keeper at a socket.
#[derive(Clone, Debug)]
pub struct Keeper {
    socket: PathBuf,
}

impl Keeper {
    /// The keeper of the daemon whose root is `root`.
    pub fn in_root(root: &Path) -> Self {
        Keeper {
            socket: root.join(SOCKET_NAME),
        }
    }

    /// Its socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Whether a keeper answers.
    pub fn is_running(&self) -> bool {
        self.list().is_ok()
    }

    /// Hands `fd` to the keeper under `name`.
    pub fn store(&self, name: &str, fd: BorrowedFd<'_>) -> io::Result<()> {
        check_name(name)?;
        match self.call(&format!("store {name}"), Some(fd))? {
            (reply, _) if reply == "ok" => Ok(()),
            (reply, _) => Err(refused("store", &reply)),
        }
    }

    /// A copy of the descriptor held under `name`, if one is.
    pub fn take(&self, name: &str) -> io::Result<Option<OwnedFd>> {
        check_name(name)?;
        match self.call(&format!("take {name}"), None)? {
            (reply, Some(fd)) if reply == "ok" => Ok(Some(fd)),
            (reply, None) if reply == "none" => Ok(None),
            (reply, _) => Err(refused("take", &reply)),
        }
    }

    /// Closes the keeper's descriptor under `name`; whether it held one. A keeper left holding
    /// nothing exits.
    pub fn release(&self, name: &str) -> io::Result<bool> {
        check_name(name)?;
        match self.call(&format!("release {name}"), None)? {
            (reply, _) if reply == "ok" => Ok(true),
            (reply, _) if reply == "none" => Ok(false),
            (reply, _) => Err(refused("release", &reply)),
        }
    }

    /// The names held.
    pub fn list(&self) -> io::Result<Vec<String>> {
        match self.call("list", None)? {
            (reply, _) if reply == "ok" || reply.starts_with("ok ") => {
                Ok(reply.split(' ').skip(1).map(str::to_string).collect())
            }
            (reply, _) => Err(refused("list", &reply)),
        }
    }

    fn call(
        &self,
        request: &str,
        fd: Option<BorrowedFd<'_>>,
    ) -> io::Result<(String, Option<OwnedFd>)> {
        let stream = seqpacket()?;
        let address = UnixAddr::new(&self.socket).map_err(io::Error::from)?;
        socket::connect(stream.as_raw_fd(), &address).map_err(|error| {
            io::Error::new(
                io::Error::from(error).kind(),
                format!(
                    "connecting to the session keeper at {}: {error}",
                    self.socket.display()
                ),
            )
        })?;
        set_timeouts(&stream)?;
        send(stream.as_fd(), request, fd)?;
        receive(stream.as_fd())
    }

    /// Starts a keeper on this socket (the program at `program`, normally this daemon's own
    /// binary) detached from the caller, logging to `log`, and returns once it answers. The
    /// caller reaps the process if it dies first ([`std::process::Child::try_wait`]); dropping
    /// the handle leaves it running, as it is meant to outlive the daemon.
    pub fn spawn(&self, program: &Path, log: &Path) -> io::Result<std::process::Child> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|error| {
                io::Error::new(error.kind(), format!("opening {}: {error}", log.display()))
            })?;
        let mut command = Command::new(program);
        command
            .arg("keep-sessions")
            .arg("--socket")
            .arg(&self.socket)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log);
        // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
        unsafe {
            // Its own session and process group: a terminal's ^C or a kill of the daemon's
            // process group does not reach it.
            command.pre_exec(|| {
                if libc::setsid() < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = command.spawn().map_err(|error| {
            io::Error::new(
                error.kind(),
                format!("starting {}: {error}", program.display()),
            )
        })?;
        let stdout = child.stdout.take().expect("piped stdout");
        let mut line = String::new();
        io::BufReader::new(stdout).read_line(&mut line)?;
        if line.trim_end() != READY_LINE {
            let status = child.wait()?;
            return Err(io::Error::other(format!(
                "the session keeper did not start ({status}); see its log"
            )));
        }
        Ok(child)
    }
}

fn check_name(name: &str) -> io::Result<()> {
    if name.is_empty() || name.len() > 128 || name.contains(char::is_whitespace) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("session keeper name {name:?}: 1 to 128 characters, no spaces"),
        ));
    }
    Ok(())
}

fn refused(what: &str, reply: &str) -> io::Error {
    io::Error::other(format!("the session keeper refused {what}: {reply}"))
}

fn seqpacket() -> io::Result<OwnedFd> {
    Ok(socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?)
}

fn set_timeouts(stream: &OwnedFd) -> io::Result<()> {
    let timeout = nix::sys::time::TimeVal::new(IO_TIMEOUT.as_secs() as i64, 0);
    socket::setsockopt(stream, socket::sockopt::ReceiveTimeout, &timeout)?;
    socket::setsockopt(stream, socket::sockopt::SendTimeout, &timeout)?;
    Ok(())
}

fn send(stream: BorrowedFd<'_>, text: &str, fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
    let fds: Vec<RawFd> = fd.iter().map(|fd| fd.as_raw_fd()).collect();
    let rights = [ControlMessage::ScmRights(&fds)];
    let control: &[ControlMessage] = if fds.is_empty() { &[] } else { &rights };
    socket::sendmsg::<UnixAddr>(
        stream.as_raw_fd(),
        &[IoSlice::new(text.as_bytes())],
        control,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )?;
    Ok(())
}

/// One message and the descriptor it carries, if any (any further ones are closed).
fn receive(stream: BorrowedFd<'_>) -> io::Result<(String, Option<OwnedFd>)> {
    let mut buffer = [0u8; MAX_MESSAGE];
    let mut control = nix::cmsg_space!([RawFd; 4]);
    let mut iov = [IoSliceMut::new(&mut buffer)];
    let message = socket::recvmsg::<UnixAddr>(
        stream.as_raw_fd(),
        &mut iov,
        Some(&mut control),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let mut received: Vec<OwnedFd> = Vec::new();
    for cmsg in message.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            // SAFETY: the kernel just installed these descriptors in this process for us.
            received.extend(
                fds.into_iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
        }
    }
    let truncated = message
        .flags
        .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC);
    let length = message.bytes;
    if truncated {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "session keeper message too long",
        ));
    }
    let text = std::str::from_utf8(&buffer[..length])
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "session keeper message is not text",
            )
        })?
        .to_string();
    Ok((text, received.into_iter().next()))
}

/// Runs the keeper on `socket` until a `release` leaves it holding nothing. Prints
/// its ready line on stdout once it answers, then closes stdout.
pub fn serve(socket_path: &Path) -> io::Result<()> {
    let listener = listen(socket_path)?;
    {
        use std::io::Write;
        let mut stdout = io::stdout().lock();
        writeln!(stdout, "{READY_LINE}")?;
        stdout.flush()?;
    }
    // stdout is a pipe its starter reads one line from; nothing more goes there.
    // SAFETY: closing descriptor 1, which this process owns and no Rust object wraps.
    unsafe { libc::close(1) };
    serve_on(&listener, socket_path)
}

/// Binds the keeper's socket, replacing one a dead keeper left; refuses if a keeper answers.
fn listen(socket_path: &Path) -> io::Result<OwnedFd> {
    let keeper = Keeper {
        socket: socket_path.to_path_buf(),
    };
    if keeper.is_running() {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!(
                "a session keeper already answers on {}",
                socket_path.display()
            ),
        ));
    }
    match std::fs::remove_file(socket_path) {
        Err(error) if error.kind() != io::ErrorKind::NotFound => return Err(error),
        _ => {}
    }
    let listener = seqpacket()?;
    let address = UnixAddr::new(socket_path).map_err(io::Error::from)?;
    socket::bind(listener.as_raw_fd(), &address).map_err(|error| {
        io::Error::new(
            io::Error::from(error).kind(),
            format!("listening on {}: {error}", socket_path.display()),
        )
    })?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(socket_path, std::fs::Permissions::from_mode(0o600))?;
    socket::listen(&listener, Backlog::new(16).map_err(io::Error::from)?)?;
    Ok(listener)
}

/// Answers requests one at a time (each is a few bytes) until nothing is held after a release.
fn serve_on(listener: &OwnedFd, socket_path: &Path) -> io::Result<()> {
    let mut held: BTreeMap<String, OwnedFd> = BTreeMap::new();
    loop {
        let accepted = match socket::accept4(listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC) {
            Ok(fd) => fd,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(error) => return Err(error.into()),
        };
        // SAFETY: accept4 returned a new descriptor that nothing else owns.
        let stream = unsafe { OwnedFd::from_raw_fd(accepted) };
        let released = match answer(&stream, &mut held, socket_path) {
            Ok(released) => released,
            Err(error) => {
                eprintln!("session keeper: a request failed: {error}");
                false
            }
        };
        if released && held.is_empty() {
            eprintln!("session keeper: nothing left to hold; exiting");
            return Ok(());
        }
    }
}

/// Answers one request; whether it released a descriptor. The release of the last one
/// removes the socket before it is answered, so its client knows the keeper is gone.
fn answer(
    stream: &OwnedFd,
    held: &mut BTreeMap<String, OwnedFd>,
    socket_path: &Path,
) -> io::Result<bool> {
    let peer = socket::getsockopt(stream, socket::sockopt::PeerCredentials)?;
    // SAFETY: geteuid only reads the process's credentials.
    let me = unsafe { libc::geteuid() };
    if peer.uid() != 0 && peer.uid() != me {
        send(
            stream.as_fd(),
            "error: only root may use the session keeper",
            None,
        )?;
        return Ok(false);
    }
    set_timeouts(stream)?;
    let (request, fd) = receive(stream.as_fd())?;
    let (verb, name) = request.split_once(' ').unwrap_or((request.as_str(), ""));
    let mut released = false;
    match (verb, fd) {
        ("store", Some(fd)) if check_name(name).is_ok() => {
            if held.len() >= MAX_HELD && !held.contains_key(name) {
                send(stream.as_fd(), "error: holding too many descriptors", None)?;
            } else {
                held.insert(name.to_string(), fd);
                send(stream.as_fd(), "ok", None)?;
            }
        }
        ("take", None) => match held.get(name) {
            Some(fd) => send(stream.as_fd(), "ok", Some(fd.as_fd()))?,
            None => send(stream.as_fd(), "none", None)?,
        },
        ("release", None) => {
            released = held.remove(name).is_some();
            if released && held.is_empty() {
                let _ = std::fs::remove_file(socket_path);
            }
            send(stream.as_fd(), if released { "ok" } else { "none" }, None)?;
        }
        ("list", None) => {
            let names: Vec<&str> = held.keys().map(String::as_str).collect();
            let reply = std::iter::once("ok")
                .chain(names)
                .collect::<Vec<_>>()
                .join(" ");
            send(stream.as_fd(), &reply, None)?;
        }
        _ => send(stream.as_fd(), "error: unknown request", None)?,
    }
    Ok(released)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, Write};

    /// The keeper loop on a thread (the process, with its ready line, is tested end to end).
    fn keeper_in(dir: &Path) -> (Keeper, std::thread::JoinHandle<io::Result<()>>) {
        let keeper = Keeper::in_root(dir);
        let listener = listen(keeper.socket()).unwrap();
        let socket = keeper.socket.clone();
        let thread = std::thread::spawn(move || serve_on(&listener, &socket));
        (keeper, thread)
    }

    #[test]
    fn a_stored_descriptor_is_handed_out_as_the_same_open_file_until_released() {
        let dir = tempfile::tempdir().unwrap();
        let (keeper, thread) = keeper_in(dir.path());
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(b"kept").unwrap();
        keeper.store(NODE_SESSION, file.as_fd()).unwrap();
        drop(file);
        assert_eq!(keeper.list().unwrap(), vec![NODE_SESSION.to_string()]);

        // The same open file (shared offset), not a reopen: what a FUSE connection needs.
        let mut first = std::fs::File::from(keeper.take(NODE_SESSION).unwrap().unwrap());
        first.seek(io::SeekFrom::Start(0)).unwrap();
        let mut second = std::fs::File::from(keeper.take(NODE_SESSION).unwrap().unwrap());
        let mut text = String::new();
        second.read_to_string(&mut text).unwrap();
        assert_eq!(text, "kept");
        assert_eq!(
            first.stream_position().unwrap(),
            4,
            "one open file behind both"
        );

        assert!(keeper.take("other").unwrap().is_none());
        assert!(!keeper.release("other").unwrap());
        assert!(keeper.store("bad name", second.as_fd()).is_err());
        assert!(keeper.release(NODE_SESSION).unwrap());
        // Holding nothing after a release, it ends.
        thread.join().unwrap().unwrap();
        assert!(!keeper.is_running());
    }
}
