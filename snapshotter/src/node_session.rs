//! The node's one FUSE session and its life across daemon restarts. Every sealed layer of the
//! node is a directory of this session (mounted at `ROOT/layers`, see [`crate::fs::table`]);
//! it is mounted when the first layer needs it, and its descriptor is handed to the
//! [session keeper](crate::session_keeper) so the kernel's side of every layer mount outlives
//! this process. A daemon that starts while the keeper holds a session that is still mounted
//! *resumes* it instead of mounting a new one: the node puts every layer back into its table,
//! then it starts answering (the kernel has queued what arrived meanwhile). See
//! `docs/semantics.md`, "Restarts".

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use fsformat::LayerKey;

use crate::fuse::session::FuseSession;
use crate::kept_keys::{self, KeptKeys, KEPT_KEYS};
use crate::mount::{self, MountError, MountOptions};
use crate::session_keeper::{Keeper, NODE_SESSION};

/// The session keeper of a daemon and how to start it.
#[derive(Clone, Debug)]
pub struct SessionKeeping {
    /// Its socket.
    pub keeper: Keeper,
    /// The binary that runs `keep-sessions` (the daemon's own: `/proc/self/exe`, which works
    /// even after an upgrade replaced the file).
    pub program: PathBuf,
    /// Its log.
    pub log: PathBuf,
}

/// The node's FUSE session: none until a layer needs it or a kept one is resumed.
pub struct NodeSession {
    dir: PathBuf,
    /// FUSE threads and mount restrictions of the session.
    mount: MountOptions,
    /// Where the session is kept across restarts; `None`: it is not (a restart breaks the
    /// containers running on sealed layers).
    keeping: Option<SessionKeeping>,
    session: Mutex<Option<Arc<FuseSession>>>,
    /// Whether the keeper held the session when last handed or checked.
    kept: AtomicBool,
    /// Held while the keeper is checked or replaced: the periodic check and the check at
    /// shutdown never start two keepers, and shutdown sees the outcome of a replacement.
    checking: Mutex<()>,
    /// The keeper this daemon started, reaped when it is replaced after dying (else it stays
    /// a zombie while this daemon runs). A keeper an earlier daemon started is not a child.
    spawned: Mutex<Option<std::process::Child>>,
    /// Layer keys keyproviders unwrapped for mounted layers, kept with the session
    /// ([`crate::kept_keys`]); and the file the keeper was last handed, wiped when replaced.
    keys: KeptKeys,
    keys_file: Mutex<Option<std::os::fd::OwnedFd>>,
    /// How many keys the file the keeper holds has.
    keys_kept: std::sync::atomic::AtomicUsize,
}

impl NodeSession {
    /// A session to mount at `dir` (private to root) with `mount`'s settings, kept by
    /// `keeping` across restarts.
    pub fn new(dir: PathBuf, mount: MountOptions, keeping: Option<SessionKeeping>) -> Self {
        NodeSession {
            dir,
            mount,
            keeping,
            session: Mutex::new(None),
            kept: AtomicBool::new(false),
            checking: Mutex::new(()),
            spawned: Mutex::new(None),
            keys: KeptKeys::new(),
            keys_file: Mutex::new(None),
            keys_kept: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    fn current(&self) -> Option<Arc<FuseSession>> {
        self.session.lock().expect("session lock").clone()
    }

    /// The session, mounted now if it is not yet (and handed to the keeper). A session a dead
    /// daemon left mounted, and nobody kept, answers nothing: it is detached first.
    pub fn get_or_mount(&self) -> Result<Arc<FuseSession>, MountError> {
        let mut session = self.session.lock().expect("session lock");
        if let Some(session) = &*session {
            return Ok(session.clone());
        }
        let dir = &self.dir;
        if crate::mount_table::detach_all(dir) > 0 {
            tracing::warn!(dir = %dir.display(), "detached a dead FUSE session a previous daemon left (nothing kept it); containers still running on its layers cannot read them");
        }
        crate::hardening::ensure_private_dir(dir).map_err(|source| MountError::Io {
            what: format!("creating {}", dir.display()),
            source,
        })?;
        let mounted = Arc::new(mount::mount_session(dir, &self.mount, "node")?);
        tracing::info!(dir = %dir.display(), fuse_threads = self.mount.fuse_threads,
            serving = ?mounted.serving(), "FUSE session mounted for every layer");
        self.keep(&mounted);
        *session = Some(mounted.clone());
        Ok(mounted)
    }

    /// Hands the session's connection to the keeper, starting one if none runs. A failure
    /// leaves the session working, only not kept: said once, as a warning.
    fn keep(&self, session: &FuseSession) {
        let Some(keeping) = &self.keeping else {
            return;
        };
        let kept = (|| {
            if !keeping.keeper.is_running() {
                let mut spawned = self.spawned.lock().expect("keeper lock");
                if let Some(mut dead) = spawned.take() {
                    // Reaped if it has exited; one that hangs is left to run (not killed: it
                    // may still hold a session) and reaped by init after this daemon.
                    let _ = dead.try_wait();
                }
                *spawned = Some(keeping.keeper.spawn(&keeping.program, &keeping.log)?);
            }
            keeping.keeper.store(NODE_SESSION, session.device())
        })();
        self.kept.store(kept.is_ok(), Ordering::Relaxed);
        if kept.is_ok() && !self.keys.is_empty() {
            self.hand_keys(keeping);
        }
        match kept {
            Ok(()) => {
                tracing::info!(keeper = %keeping.keeper.socket().display(), "FUSE session kept for restarts")
            }
            Err(error) => {
                tracing::warn!(%error, "the FUSE session is not kept: a restart of this daemon will break the containers running on sealed layers")
            }
        }
    }

    /// Takes over the session an earlier daemon left with the keeper, if there is one and it
    /// is still mounted; it answers nothing until [`NodeSession::start_resumed`], so the
    /// layers can be put back first. Whether a session was resumed.
    pub fn resume(&self) -> bool {
        let Some(keeping) = &self.keeping else {
            return false;
        };
        let dir = &self.dir;
        let device = match keeping.keeper.take(NODE_SESSION) {
            Ok(Some(device)) => device,
            Ok(None) => return false,
            Err(error) => {
                if keeping.keeper.socket().exists() {
                    tracing::warn!(%error, "the session keeper does not answer; mounting a new FUSE session");
                }
                return false;
            }
        };
        // Taken whether or not the session is still mounted: either way the layers are
        // opened again now, and these keys open the ones keyproviders opened.
        self.take_kept_keys(keeping);
        if !crate::mount_table::is_mounted(dir) {
            // Unmounted by hand: the kept connection serves nothing any more.
            tracing::warn!(dir = %dir.display(), "the kept FUSE session is no longer mounted; releasing it");
            let _ = keeping.keeper.release(NODE_SESSION);
            return false;
        }
        let config = mount::session_config(&self.mount, "node");
        match FuseSession::resume(Arc::default(), device, dir, &config) {
            Ok(resumed) => {
                tracing::info!(dir = %dir.display(), serving = ?resumed.serving(), "resuming the FUSE session the previous daemon left");
                // The keeper still holds it: it handed over a copy.
                self.kept.store(true, Ordering::Relaxed);
                *self.session.lock().expect("session lock") = Some(Arc::new(resumed));
                true
            }
            Err(error) => {
                tracing::error!(%error, "could not resume the kept FUSE session; mounting a new one");
                false
            }
        }
    }

    /// Starts answering in a resumed session: requests waiting since the restart are served.
    pub fn start_resumed(&self) -> std::io::Result<()> {
        let Some(session) = self.current() else {
            return Ok(());
        };
        session.start()?;
        tracing::info!(
            layers = session.table().len(),
            "resumed FUSE session serving"
        );
        Ok(())
    }

    /// Whether the session is held by the keeper (so leaving it mounted at exit lets the next
    /// daemon resume it).
    pub fn is_kept(&self) -> bool {
        let Some(keeping) = &self.keeping else {
            return false;
        };
        self.current().is_some()
            && keeping
                .keeper
                .list()
                .is_ok_and(|names| names.iter().any(|name| name == NODE_SESSION))
    }

    /// Whether the keeper held the session when last handed or checked (no I/O; see
    /// [`NodeSession::ensure_kept`]).
    pub fn kept_now(&self) -> bool {
        self.kept.load(Ordering::Relaxed)
    }

    /// Checks that the keeper still holds the session: a keeper that died (killed, say)
    /// would leave the next restart nothing to resume, so another is started and handed the
    /// session. Whether the session is kept now; false before any is mounted.
    pub fn ensure_kept(&self) -> bool {
        let _checking = self.checking.lock().expect("checking lock");
        let Some(session) = self.current() else {
            return false;
        };
        if self.is_kept() {
            self.kept.store(true, Ordering::Relaxed);
            return true;
        }
        self.kept.store(false, Ordering::Relaxed);
        if self.keeping.is_some() {
            tracing::warn!(
                "the session keeper no longer holds the FUSE session (it died?); starting another"
            );
            self.keep(&session);
        }
        self.kept_now()
    }

    /// Leaves the session mounted and connected when this daemon exits.
    pub fn keep_for_restart(&self) {
        if let Some(session) = self.current() {
            session.keep_for_restart();
        }
    }

    /// Unmounts the session (on shutdown, after every layer is gone) and tells the keeper to
    /// let it go.
    pub fn end(&self) {
        if self.session.lock().expect("session lock").take().is_some() {
            // The keys first: a keeper left holding nothing after a release exits.
            self.let_keys_go();
            if let Some(keeping) = &self.keeping {
                let _ = keeping.keeper.release(NODE_SESSION);
            }
        }
    }

    /// Takes the kept-keys file back from the keeper and wipes it.
    fn let_keys_go(&self) {
        if let Some(keeping) = &self.keeping {
            let _ = keeping.keeper.release(KEPT_KEYS);
        }
        if let Some(file) = self.keys_file.lock().expect("keys file lock").take() {
            kept_keys::wipe(&file);
        }
        self.keys_kept.store(0, Ordering::Relaxed);
    }

    /// How many layer keys of keyprovider layers the session keeper holds for the next daemon.
    pub fn keys_kept(&self) -> usize {
        self.keys_kept.load(Ordering::Relaxed)
    }

    /// The layer key kept for snapshot `id` if it opens layer `digest`, and what unwrapped it
    /// (a restart reopens a provider's layer with it, see [`crate::kept_keys`]).
    pub fn kept_key(&self, id: u64, digest: &str) -> Option<(LayerKey, String)> {
        self.keys.get(id, digest)
    }

    /// Keeps the key a keyprovider (`opened_by`) unwrapped for snapshot `id`'s layer `digest`,
    /// with the keeper, for the next daemon.
    pub fn keep_key(&self, id: u64, digest: &str, opened_by: &str, key: &LayerKey) {
        if self.keys.insert(id, digest, opened_by, key) {
            if let Some(keeping) = self.keeping.as_ref().filter(|_| self.kept_now()) {
                self.hand_keys(keeping);
            }
        }
    }

    /// Drops the key kept for snapshot `id` (removed), with the keeper too.
    pub fn forget_key(&self, id: u64) {
        if !self.keys.remove(id) {
            return;
        }
        if self.keys.is_empty() {
            self.let_keys_go();
        } else if let Some(keeping) = self.keeping.as_ref().filter(|_| self.kept_now()) {
            self.hand_keys(keeping);
        }
    }

    /// Hands the keeper a new file of every kept key (replacing the one it held, which is
    /// wiped). A failure leaves provider layers to their providers at the next restart: said
    /// as a warning.
    fn hand_keys(&self, keeping: &SessionKeeping) {
        let mut current = self.keys_file.lock().expect("keys file lock");
        let handed = self.keys.to_file().and_then(|(file, count)| {
            keeping
                .keeper
                .store(KEPT_KEYS, std::os::fd::AsFd::as_fd(&file))?;
            Ok((file, count))
        });
        match handed {
            Ok((file, count)) => {
                self.keys_kept.store(count, Ordering::Relaxed);
                if let Some(old) = current.replace(file) {
                    kept_keys::wipe(&old);
                }
            }
            Err(error) => {
                tracing::warn!(%error, "layer keys from keyproviders are not kept: after a restart their layers need the providers again")
            }
        }
    }

    /// Takes the layer keys an earlier daemon kept with the session.
    fn take_kept_keys(&self, keeping: &SessionKeeping) {
        match keeping.keeper.take(KEPT_KEYS) {
            Ok(Some(file)) => match self.keys.load(&file) {
                Ok(count) => {
                    tracing::info!(
                        layers = count,
                        "layer keys from keyproviders kept across the restart"
                    );
                    // The same file the keeper holds: replaced (and wiped) at the next change.
                    *self.keys_file.lock().expect("keys file lock") = Some(file);
                    self.keys_kept.store(count, Ordering::Relaxed);
                }
                Err(error) => {
                    tracing::warn!(%error, "the kept layer keys cannot be read; layers opened by keyproviders ask them again")
                }
            },
            Ok(None) => {}
            Err(error) => {
                tracing::warn!(%error, "the kept layer keys cannot be taken from the session keeper")
            }
        }
    }
}
