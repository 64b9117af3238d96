//! A test certificate authority (openssl) for registries served over HTTPS.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Runs openssl, failing the test with its message if it fails.
pub(crate) fn openssl(args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("running openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA whose certificate clients are told to trust.
pub struct TestCa {
    dir: PathBuf,
    key: PathBuf,
    /// The CA certificate (PEM).
    pub certificate: PathBuf,
}

impl TestCa {
    /// Makes a CA key and certificate in `dir`.
    pub fn new(dir: &Path) -> Self {
        let (key, certificate) = (dir.join("ca.key"), dir.join("ca.crt"));
        let p = |p: &Path| p.to_str().expect("UTF-8 path").to_string();
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=sealfs test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign",
            "-keyout",
            &p(&key),
            "-out",
            &p(&certificate),
        ]);
        TestCa {
            dir: dir.to_path_buf(),
            key,
            certificate,
        }
    }

    /// A server certificate and key for IP address `ip`, signed by this CA.
    pub fn server_certificate(&self, ip: &str) -> (PathBuf, PathBuf) {
        let p = |p: &Path| p.to_str().expect("UTF-8 path").to_string();
        let (key, csr, certificate, extensions) = (
            self.dir.join("server.key"),
            self.dir.join("server.csr"),
            self.dir.join("server.crt"),
            self.dir.join("server.ext"),
        );
        std::fs::write(&extensions, format!(
            "subjectAltName=IP:{ip}\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n"
        ))
        .expect("writing extensions");
        openssl(&[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            &format!("/CN={ip}"),
            "-keyout",
            &p(&key),
            "-out",
            &p(&csr),
        ]);
        openssl(&[
            "x509",
            "-req",
            "-in",
            &p(&csr),
            "-CA",
            &p(&self.certificate),
            "-CAkey",
            &p(&self.key),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &p(&extensions),
            "-out",
            &p(&certificate),
        ]);
        (certificate, key)
    }
}
