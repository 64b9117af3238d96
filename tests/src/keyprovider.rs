//! The keyprovider test programs (tests/keyprovider, Go in GOPATH mode on Debian's packaged
//! sources, built with the Go that scripts/install-deps.sh unpacks into target/debian/go2):
//! `kms-provider`, the tests' stand-in for a KMS, and `ocicrypt-keyprovider`, which drives a
//! provider through ocicrypt itself (the reference client).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;

/// The two programs, built once per test process.
pub struct Programs {
    /// The stand-in KMS.
    pub kms_provider: PathBuf,
    /// ocicrypt's keyprovider client.
    pub ocicrypt: PathBuf,
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// Builds the programs; `None` (the test skips) when sid's Go and ocicrypt sources are not
/// unpacked, which fails the test in CI instead.
pub fn programs() -> Option<&'static Programs> {
    static BUILT: OnceLock<Option<Programs>> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let go2 = workspace().join("target/debian/go2");
            let go = go2.join("usr/lib/go-1.27/bin/go");
            let ocicrypt = go2.join("usr/share/gocode/src/github.com/containers/ocicrypt");
            if !go.exists() || !ocicrypt.exists() {
                let why = format!(
                    "{} or {} is missing (bash scripts/install-deps.sh unpacks them)",
                    go.display(),
                    ocicrypt.display()
                );
                if std::env::var_os("CI").is_some() {
                    panic!("prerequisites missing in CI: {why}");
                }
                eprintln!("skipping: {why}");
                return None;
            }
            let source = workspace().join("tests/keyprovider");
            let out = workspace().join("target/keyprovider-go");
            let built = Command::new(&go)
                .current_dir(&source)
                .env("GO111MODULE", "off")
                .env(
                    "GOPATH",
                    format!(
                        "{}:{}",
                        source.display(),
                        go2.join("usr/share/gocode").display()
                    ),
                )
                .env("GOROOT", go2.join("usr/lib/go-1.27"))
                .arg("build")
                .arg("-o")
                .arg(format!("{}/", out.display()))
                .args([
                    "sealfs.test/kms-provider",
                    "sealfs.test/ocicrypt-keyprovider",
                ])
                .output()
                .expect("running go build");
            assert!(
                built.status.success(),
                "go build of the keyprovider programs: {}",
                String::from_utf8_lossy(&built.stderr)
            );
            Some(Programs {
                kms_provider: out.join("kms-provider"),
                ocicrypt: out.join("ocicrypt-keyprovider"),
            })
        })
        .as_ref()
}

/// A `kms-provider` serving gRPC; killed when dropped.
pub struct GrpcProvider {
    child: Child,
    /// The address it serves, as a keyprovider config names it (`unix:///PATH`).
    pub address: String,
}

impl GrpcProvider {
    /// Starts `kms-provider -grpc unix://SOCKET` with `args` and waits until it serves.
    pub fn start(programs: &Programs, socket: &Path, args: &[&str]) -> Self {
        let _ = std::fs::remove_file(socket);
        let address = format!("unix://{}", socket.display());
        let mut child = Command::new(&programs.kms_provider)
            .args(["-grpc", &address])
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting kms-provider");
        // It prints "serving ADDRESS" once it listens: wait for that line, not for time.
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped"))
            .read_line(&mut line)
            .expect("reading kms-provider's output");
        assert!(line.starts_with("serving"), "kms-provider said {line:?}");
        GrpcProvider { child, address }
    }
}

impl Drop for GrpcProvider {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
