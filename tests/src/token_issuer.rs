//! A token issuer for testing the registry's token authentication (the "auth: token" mode of
//! distribution): it checks HTTP basic credentials and answers with a JWT signed by a key
//! whose self-signed certificate the registry trusts (`rootcertbundle`), carrying the
//! certificate in the `x5c` header. It stands in for an external auth server, which this
//! machine does not have; the registry that verifies its tokens is the real one.

use crate::tls::openssl;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};

/// The issuer name the registry must trust.
pub const ISSUER: &str = "sealfs-test-issuer";
/// The service (audience) of the tokens.
pub const SERVICE: &str = "sealfs-test-registry";

/// A running token issuer.
pub struct TokenIssuer {
    /// `http://127.0.0.1:PORT/token`.
    pub realm: String,
    /// PEM certificate for the registry's `rootcertbundle`.
    pub certificate: PathBuf,
    stop: Arc<AtomicBool>,
}

impl TokenIssuer {
    /// Starts an issuer that accepts `user`/`password`, with its key material in `dir`.
    pub fn start(dir: &Path, user: &str, password: &str) -> Self {
        Self::start_with(dir, Some((user, password)))
    }

    /// Starts an issuer that hands tokens to anyone, as Docker Hub does for public
    /// repositories: a client without credentials is still challenged and must fetch one.
    pub fn start_anonymous(dir: &Path) -> Self {
        Self::start_with(dir, None)
    }

    fn start_with(dir: &Path, credentials: Option<(&str, &str)>) -> Self {
        let (key_pem, cert_pem) = (dir.join("token.key"), dir.join("token.crt"));
        let (key_der, cert_der) = (dir.join("token.key.der"), dir.join("token.crt.der"));
        // ring makes the key (it reads back only its own PKCS#8 encoding); openssl makes the
        // self-signed certificate for it.
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .expect("generating a P-256 key");
        std::fs::write(&key_der, pkcs8.as_ref()).unwrap();
        let path = |p: &PathBuf| p.to_str().unwrap().to_string();
        openssl(&[
            "pkey",
            "-inform",
            "DER",
            "-in",
            &path(&key_der),
            "-out",
            &path(&key_pem),
        ]);
        let subject = "/CN=sealfs-test-token-issuer";
        openssl(&[
            "req",
            "-x509",
            "-new",
            "-key",
            &path(&key_pem),
            "-days",
            "2",
            "-subj",
            subject,
            "-out",
            &path(&cert_pem),
        ]);
        openssl(&[
            "x509",
            "-in",
            &path(&cert_pem),
            "-outform",
            "DER",
            "-out",
            &path(&cert_der),
        ]);
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .expect("P-256 PKCS#8 key");
        let x5c = STANDARD.encode(std::fs::read(&cert_der).unwrap());
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let realm = format!("http://{}/token", listener.local_addr().unwrap());
        let expected = credentials.map(|(user, password)| {
            format!("Basic {}", STANDARD.encode(format!("{user}:{password}")))
        });
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        listener.set_nonblocking(false).unwrap();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stopping.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(mut stream) = stream else { continue };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut request_line = String::new();
                if reader.read_line(&mut request_line).is_err() {
                    continue;
                }
                let mut authorization = None;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).is_err() || line.trim().is_empty() {
                        break;
                    }
                    if let Some((name, value)) = line.split_once(':') {
                        if name.eq_ignore_ascii_case("authorization") {
                            authorization = Some(value.trim().to_string());
                        }
                    }
                }
                let target = request_line
                    .split_whitespace()
                    .nth(1)
                    .unwrap_or_default()
                    .to_string();
                let refused = expected
                    .as_deref()
                    .is_some_and(|expected| authorization.as_deref() != Some(expected));
                let response = if refused {
                    "HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nWWW-Authenticate: Basic realm=\"token\"\r\n\r\n".to_string()
                } else {
                    let token = sign(&key, &rng, &x5c, &target);
                    let body = format!(
                        r#"{{"token":"{token}","access_token":"{token}","expires_in":300}}"#
                    );
                    format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len())
                };
                let _ = stream.write_all(response.as_bytes());
            }
        });
        TokenIssuer {
            realm,
            certificate: cert_pem,
            stop,
        }
    }
}

impl Drop for TokenIssuer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = std::net::TcpStream::connect(
            self.realm
                .trim_start_matches("http://")
                .trim_end_matches("/token"),
        );
    }
}

/// A JWT granting every scope the query asks for.
fn sign(key: &EcdsaKeyPair, rng: &ring::rand::SystemRandom, x5c: &str, target: &str) -> String {
    let query = target.split_once('?').map(|(_, q)| q).unwrap_or_default();
    let mut access = Vec::new();
    for pair in query.split('&') {
        let Some(scope) = pair.strip_prefix("scope=") else {
            continue;
        };
        let scope = scope
            .replace("%3A", ":")
            .replace("%2C", ",")
            .replace("%2F", "/");
        let mut parts = scope.splitn(3, ':');
        let (kind, name, actions) = (
            parts.next().unwrap_or_default(),
            parts.next().unwrap_or_default(),
            parts.next().unwrap_or_default(),
        );
        let actions: Vec<String> = actions.split(',').map(|a| format!("\"{a}\"")).collect();
        access.push(format!(
            r#"{{"type":"{kind}","name":"{name}","actions":[{}]}}"#,
            actions.join(",")
        ));
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let header = format!(r#"{{"typ":"JWT","alg":"ES256","x5c":["{x5c}"]}}"#);
    let claims = format!(
        r#"{{"iss":"{ISSUER}","sub":"tester","aud":"{SERVICE}","exp":{},"nbf":{},"iat":{now},"jti":"{now}-{}","access":[{}]}}"#,
        now + 300,
        now - 10,
        access.len(),
        access.join(",")
    );
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(claims)
    );
    let signature = key.sign(rng, signing_input.as_bytes()).expect("signing");
    format!(
        "{signing_input}.{}",
        URL_SAFE_NO_PAD.encode(signature.as_ref())
    )
}
