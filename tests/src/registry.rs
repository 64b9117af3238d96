//! A real `docker-registry` (distribution) for tests, on a free loopback port with its storage
//! in a temporary directory. It can be stopped and started again on the same port and storage,
//! to test what clients do while it is away.

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running (or stopped) registry.
pub struct DockerRegistry {
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// `127.0.0.1:PORT`.
    pub host: String,
}

impl DockerRegistry {
    /// Starts a registry without authentication.
    pub fn start() -> Self {
        Self::start_with(tempfile::tempdir().expect("tempdir"), None, None)
    }

    /// Starts a registry that wants HTTP basic authentication as `user` with `password`
    /// (an htpasswd file with a bcrypt hash, as the registry requires).
    pub fn start_with_password(user: &str, password: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let hash = bcrypt::hash(password, 5).expect("bcrypt");
        let htpasswd = dir.path().join("htpasswd");
        std::fs::write(&htpasswd, format!("{user}:{hash}\n")).expect("writing htpasswd");
        let auth = format!(
            "auth:\n  htpasswd:\n    realm: sealfs-test\n    path: {}\n",
            htpasswd.display()
        );
        Self::start_with(dir, None, Some(auth))
    }

    /// Starts a registry with token authentication: clients get bearer tokens from `issuer`.
    pub fn start_with_tokens(issuer: &crate::token_issuer::TokenIssuer) -> Self {
        let auth = format!(
            "auth:\n  token:\n    realm: {}\n    service: {}\n    issuer: {}\n    rootcertbundle: {}\n",
            issuer.realm,
            crate::token_issuer::SERVICE,
            crate::token_issuer::ISSUER,
            issuer.certificate.display()
        );
        Self::start_with(tempfile::tempdir().expect("tempdir"), None, Some(auth))
    }

    /// Starts a pull-through cache of the registry at `upstream` (`HOST:PORT`, plain HTTP):
    /// distribution's proxy mode, as a fleet's mirror runs it.
    pub fn start_pull_through(upstream: &str) -> Self {
        let proxy = format!("proxy:\n  remoteurl: http://{upstream}\n");
        Self::start_with(tempfile::tempdir().expect("tempdir"), None, Some(proxy))
    }

    /// Starts a registry serving HTTPS with a certificate for 127.0.0.1 issued by a test CA;
    /// returns it and the CA certificate (PEM) a client must trust.
    pub fn start_with_tls() -> (Self, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = crate::tls::TestCa::new(dir.path());
        let (certificate, key) = ca.server_certificate("127.0.0.1");
        let tls = format!(
            "  tls:\n    certificate: {}\n    key: {}\n",
            certificate.display(),
            key.display()
        );
        let ca_path = ca.certificate.clone();
        (Self::start_with(dir, Some(tls), None), ca_path)
    }

    /// `http` is extra YAML under `http:` (indented), `section` a whole top-level section
    /// (`auth:`, `proxy:`).
    fn start_with(dir: tempfile::TempDir, http: Option<String>, section: Option<String>) -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let host = format!("127.0.0.1:{port}");
        let mut config = format!(
            "version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {host}\nlog:\n  level: info\n  formatter: json\n",
            dir.path().join("data").display()
        );
        if let Some(http) = http {
            // Under `http:`, right after its `addr`.
            config = config.replace("\nlog:", &format!("\n{http}log:"));
        }
        if let Some(section) = section {
            config += &section;
        }
        std::fs::write(dir.path().join("config.yml"), config).expect("writing the registry config");
        let mut registry = DockerRegistry {
            dir,
            child: None,
            host,
        };
        registry.resume();
        registry
    }

    fn config(&self) -> PathBuf {
        self.dir.path().join("config.yml")
    }

    /// Starts the registry process again (same port, same storage); waits until it accepts
    /// connections.
    pub fn resume(&mut self) {
        // Appended: the log counts served bytes across restarts.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("registry.log"))
            .expect("log file");
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(self.config())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting docker-registry (is it installed?)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(&self.host).is_err() {
            assert!(Instant::now() < deadline, "docker-registry did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Freezes the registry process (SIGSTOP): connections are accepted by the kernel and
    /// never answered, as from a registry that hangs. [`DockerRegistry::thaw`] undoes it.
    pub fn freeze(&self) {
        self.send_signal("STOP");
    }

    /// Lets a frozen registry run again (SIGCONT).
    pub fn thaw(&self) {
        self.send_signal("CONT");
    }

    fn send_signal(&self, signal: &str) {
        let child = self.child.as_ref().expect("the registry runs");
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(child.id().to_string())
            .status()
            .expect("running kill");
        assert!(status.success(), "kill -{signal} of the registry failed");
    }

    /// Stops the registry process (storage is kept).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The requests this registry has answered so far, from its access log (JSON lines).
    /// How many GETs of URIs `uri` accepts it has refused for want of credentials or a token
    /// (distribution logs those as an authorization error, not as a completed response).
    pub fn gets_refused_for_want_of_credentials(&self, uri: impl Fn(&str) -> bool) -> usize {
        let log = std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default();
        log.lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter(|entry| {
                entry["http.request.method"] == "GET"
                    && entry["msg"]
                        .as_str()
                        .is_some_and(|msg| msg.starts_with("error authorizing context"))
                    && entry["http.request.uri"].as_str().is_some_and(&uri)
            })
            .count()
    }

    fn answered(&self) -> Vec<serde_json::Value> {
        let log = std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default();
        log.lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            // "response completed with error" too: a client that stopped reading early.
            .filter(|entry| {
                entry["msg"]
                    .as_str()
                    .is_some_and(|msg| msg.starts_with("response completed"))
            })
            .collect()
    }

    /// Bytes of blob bodies this registry has sent so far (from its access log): what a
    /// client really downloaded.
    pub fn blob_bytes_served(&self) -> u64 {
        self.answered()
            .iter()
            .filter(|entry| {
                entry["http.request.method"] == "GET"
                    && entry["http.request.uri"]
                        .as_str()
                        .is_some_and(|uri| uri.contains("/blobs/"))
            })
            .filter_map(|entry| entry["http.response.written"].as_u64())
            .sum()
    }

    /// Whether this registry's storage holds the blob `digest` (`sha256:HEX`), committed: a
    /// pull-through cache holds it once it has fetched all of it from upstream.
    pub fn holds_blob(&self, digest: &str) -> bool {
        let hex = digest.trim_start_matches("sha256:");
        hex.len() > 2
            && self
                .dir
                .path()
                .join("data/docker/registry/v2/blobs/sha256")
                .join(&hex[..2])
                .join(hex)
                .join("data")
                .is_file()
    }

    /// How many GET requests for a path that `uri` accepts this registry has answered so far.
    pub fn gets(&self, uri: impl Fn(&str) -> bool) -> usize {
        self.gets_answered(uri, None)
    }

    /// How many GETs of the blob `digest` this registry has answered with HTTP `status` so
    /// far (206: a range; `None`: any, such as the 500 it logs for an answer the client
    /// stopped reading).
    pub fn blob_gets_answered(&self, digest: &str, status: Option<u64>) -> usize {
        let path = format!("/blobs/{digest}");
        self.gets_answered(|uri| uri.ends_with(&path), status)
    }

    fn gets_answered(&self, uri: impl Fn(&str) -> bool, status: Option<u64>) -> usize {
        self.answered()
            .iter()
            .filter(|entry| {
                entry["http.request.method"] == "GET"
                    && status.is_none_or(|status| entry["http.response.status"] == status)
                    && entry["http.request.uri"].as_str().is_some_and(&uri)
            })
            .count()
    }

    /// Pushes an OCI layout image with skopeo to `NAME:TAG` here; returns `HOST/NAME:TAG`.
    pub fn push(&self, layout: &std::path::Path, tag: &str, name: &str) -> String {
        self.push_as(layout, tag, name, None)
    }

    /// Like [`Self::push`], logging in as `user:password`.
    pub fn push_as(
        &self,
        layout: &std::path::Path,
        tag: &str,
        name: &str,
        credentials: Option<&str>,
    ) -> String {
        let target = format!("{}/{name}:{tag}", self.host);
        let mut command = Command::new("skopeo");
        command.args(["copy", "--quiet", "--dest-tls-verify=false"]);
        if let Some(credentials) = credentials {
            command.arg(format!("--dest-creds={credentials}"));
        }
        let out = command
            .arg(format!("oci:{}:{tag}", layout.display()))
            .arg(format!("docker://{target}"))
            .output()
            .expect("running skopeo");
        assert!(
            out.status.success(),
            "skopeo copy: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        target
    }
}

impl Drop for DockerRegistry {
    fn drop(&mut self) {
        self.stop();
    }
}
