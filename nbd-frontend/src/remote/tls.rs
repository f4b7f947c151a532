//! The TLS client of `nbds://`, on OpenSSL like the server side, so that it
//! takes every key and certificate the gnutls clients (qemu, libnbd) take.
//!
//! - X.509 (`tls-certificates=DIR`, the layout qemu-nbd and nbdkit use):
//!   `DIR/ca-cert.pem` is the only trust anchor (the system's roots are not
//!   consulted: an NBD server's certificate comes from its operator's CA);
//!   the server's certificate must name the URI's host (its subjectAltName,
//!   or its CN when it has none, as gnutls checks). `DIR/client-cert.pem` and
//!   `DIR/client-key.pem`, when both exist, are presented to a server that
//!   asks for a client certificate; the key is checked as the server's own is
//!   (`crate::tls::x509`).
//! - Pre-shared keys (`tls-psk-file=FILE`, psktool's format). The key
//!   authenticates both ends, so there is nothing else to verify.

use std::net::IpAddr;
use std::path::Path;

use openssl::ssl::{SslContext, SslContextBuilder, SslMethod, SslOptions, SslVerifyMode, SslVersion};
use openssl::x509::store::X509StoreBuilder;

use super::handshake::BoxStream;
use super::uri::TlsCreds;

/// OpenSSL's verification results for a certificate that does not name the
/// host or address asked for (x509_vfy.h; the `openssl` crate has no names).
const X509_V_ERR_HOSTNAME_MISMATCH: i32 = 62;
const X509_V_ERR_IP_ADDRESS_MISMATCH: i32 = 64;

/// What a TLS connection needs: the context (credentials and what to
/// verify), the name the server's certificate must carry (X.509 only), and
/// what to call the credentials in an error.
#[derive(Clone)]
pub(super) struct TlsClient {
    context: SslContext,
    server_name: Option<String>,
    what: String,
}

impl std::fmt::Debug for TlsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TlsClient({})", self.what)
    }
}

/// TLS 1.2 and 1.3 as the server side offers them: an ephemeral key exchange,
/// AEAD ciphers, AES-128-GCM first.
fn x509_builder() -> Result<SslContextBuilder, String> {
    let lib = |e: openssl::error::ErrorStack| format!("TLS setup: {e}");
    let mut b = SslContextBuilder::new(SslMethod::tls_client()).map_err(lib)?;
    b.set_security_level(crate::tls::x509::SECURITY_LEVEL);
    b.set_min_proto_version(Some(SslVersion::TLS1_2)).map_err(lib)?;
    b.set_options(SslOptions::NO_RENEGOTIATION | SslOptions::NO_TICKET);
    b.set_read_ahead(true);
    b.set_ciphersuites(crate::tls::x509::TLS13_SUITES).map_err(lib)?;
    b.set_cipher_list(crate::tls::x509::TLS12_CIPHERS).map_err(lib)?;
    Ok(b)
}

impl TlsClient {
    /// Loads the credentials. `locate` maps a file name to where this
    /// process can open it (paths after a switch_root).
    pub(super) fn new(
        creds: &TlsCreds,
        server_name: &str,
        locate: &dyn Fn(&Path) -> std::path::PathBuf,
    ) -> Result<TlsClient, String> {
        let dir = match creds {
            TlsCreds::X509 { dir } => dir,
            TlsCreds::Psk { file, username } => return psk_client(file, username.as_deref(), locate),
        };
        // Read where this process finds them, named as the user gave them.
        let named = |e: crate::tls::TlsSetupError, name: &str| {
            let shown = dir.join(name);
            let real = locate(&shown);
            e.to_string().replace(&real.display().to_string(), &shown.display().to_string())
        };
        let exists = |name: &str| locate(&dir.join(name)).exists();
        let ca_path = dir.join("ca-cert.pem");
        if !exists("ca-cert.pem") {
            return Err(format!("{} is missing: it is the CA that verifies the server", ca_path.display()));
        }
        let mut b = x509_builder()?;
        let lib = |e: openssl::error::ErrorStack| format!("TLS setup: {e}");
        let mut store = X509StoreBuilder::new().map_err(lib)?;
        for ca in crate::tls::x509::certificates(&locate(&ca_path)).map_err(|e| named(e, "ca-cert.pem"))? {
            store.add_cert(ca).map_err(|e| format!("{}: {e}", ca_path.display()))?;
        }
        b.set_verify_cert_store(store.build()).map_err(lib)?;
        b.set_verify(SslVerifyMode::PEER);
        if exists("client-cert.pem") && exists("client-key.pem") {
            let chain = crate::tls::x509::certificates(&locate(&dir.join("client-cert.pem")))
                .map_err(|e| named(e, "client-cert.pem"))?;
            let key = crate::tls::x509::private_key(&locate(&dir.join("client-key.pem")))
                .map_err(|e| named(e, "client-key.pem"))?;
            let refused = |e: openssl::error::ErrorStack| {
                format!("the client certificate in {}: {}", dir.display(), crate::tls::x509::openssl_reason(&e))
            };
            if !chain[0].public_key().map_err(refused)?.public_eq(&key) {
                return Err(format!(
                    "the client certificate in {}: client-key.pem does not belong to client-cert.pem",
                    dir.display()
                ));
            }
            b.set_certificate(&chain[0]).map_err(refused)?;
            for c in &chain[1..] {
                b.add_extra_chain_cert(c.clone()).map_err(refused)?;
            }
            b.set_private_key(&key).map_err(refused)?;
        }
        if server_name.is_empty() {
            return Err("no host name to check the server's certificate against".into());
        }
        Ok(TlsClient {
            context: b.build(),
            server_name: Some(server_name.to_string()),
            what: format!("X.509 with {}", dir.display()),
        })
    }

    /// Runs the TLS handshake on `stream` (right after STARTTLS was accepted).
    /// A protocol failure (a certificate that does not verify, a key the
    /// server does not accept) is final: `InvalidData`. A link that breaks
    /// mid-handshake stays an I/O error, which is retried.
    pub(super) async fn wrap(&self, stream: BoxStream) -> std::io::Result<BoxStream> {
        let what = &self.what;
        let failed = |kind: std::io::ErrorKind, e: &dyn std::fmt::Display| {
            std::io::Error::new(kind, format!("TLS handshake ({what}) failed: {e}"))
        };
        let mut ssl = openssl::ssl::Ssl::new(&self.context).map_err(|e| failed(std::io::ErrorKind::Other, &e))?;
        if let Some(name) = &self.server_name {
            // The name the certificate must carry: an address as an IP
            // subjectAltName, a host name as a DNS one (or the CN without any).
            let param = ssl.param_mut();
            match name.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
                Ok(ip) => param.set_ip(ip),
                Err(_) => param.set_host(name),
            }
            .map_err(|e| failed(std::io::ErrorKind::Other, &e))?;
            if name.parse::<IpAddr>().is_err() {
                ssl.set_hostname(name).map_err(|e| failed(std::io::ErrorKind::Other, &e))?;
            }
        }
        let mut tls = tokio_openssl::SslStream::new(ssl, stream).map_err(|e| failed(std::io::ErrorKind::Other, &e))?;
        if let Err(e) = std::pin::Pin::new(&mut tls).connect().await {
            let verify = tls.ssl().verify_result();
            if verify != openssl::x509::X509VerifyResult::OK {
                let name = self.server_name.as_deref().unwrap_or("?");
                let why = if [X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH].contains(&verify.as_raw()) {
                    format!("the server's certificate is not valid for name {name:?}")
                } else {
                    format!("the server's certificate does not verify: {}", verify.error_string())
                };
                return Err(failed(std::io::ErrorKind::InvalidData, &why));
            }
            let kind = match e.io_error() {
                Some(io) => io.kind(),
                None if e.code() == openssl::ssl::ErrorCode::SSL => std::io::ErrorKind::InvalidData,
                None => std::io::ErrorKind::ConnectionAborted,
            };
            let reasons: Vec<&str> =
                e.ssl_error().map(|s| s.errors().iter().filter_map(|x| x.reason()).collect()).unwrap_or_default();
            return Err(if reasons.is_empty() { failed(kind, &e) } else { failed(kind, &reasons.join("; ")) });
        }
        Ok(Box::new(tls))
    }
}

/// A client context that offers the key of `username` from `file` (or the
/// file's only key when the URI names nobody).
fn psk_client(
    file: &Path,
    username: Option<&str>,
    locate: &dyn Fn(&Path) -> std::path::PathBuf,
) -> Result<TlsClient, String> {
    use openssl::ssl::{SslContextBuilder, SslMethod, SslOptions, SslVersion};
    let text = std::fs::read(locate(file)).map_err(|e| format!("cannot read {}: {e}", file.display()))?;
    let keys = crate::tls::parse_psk_file(&text).map_err(|e| format!("{}: {e}", file.display()))?;
    let (identity, key) = match username {
        Some(name) => match keys.get(name.as_bytes()) {
            Some(key) => (name.to_string(), key.clone()),
            None => return Err(format!("{} has no key for the identity {name:?}", file.display())),
        },
        None => match keys.iter().next() {
            Some((id, key)) if keys.len() == 1 => (String::from_utf8_lossy(id).into_owned(), key.clone()),
            _ => {
                return Err(format!(
                    "{} holds {} identities: name one in the URI (nbds://NAME@host/export)",
                    file.display(),
                    keys.len()
                ))
            }
        },
    };
    let lib = |e: openssl::error::ErrorStack| format!("TLS setup: {e}");
    let mut b = SslContextBuilder::new(SslMethod::tls_client()).map_err(lib)?;
    b.set_min_proto_version(Some(SslVersion::TLS1_2)).map_err(lib)?;
    b.set_options(SslOptions::NO_RENEGOTIATION | SslOptions::NO_TICKET);
    b.set_read_ahead(true);
    // The same suites the server side accepts: TLS 1.2 only with an ephemeral
    // key exchange (forward secrecy), TLS 1.3 with AES-GCM first.
    b.set_cipher_list("ECDHE-PSK-CHACHA20-POLY1305:ECDHE-PSK-AES256-CBC-SHA384:ECDHE-PSK-AES128-CBC-SHA256")
        .map_err(lib)?;
    b.set_ciphersuites("TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256").map_err(lib)?;
    let offered = identity.clone();
    b.set_psk_client_callback(move |_ssl, _hint, identity_out, key_out| {
        // OpenSSL reads the identity as a C string.
        let id = offered.as_bytes();
        if id.len() >= identity_out.len() || key.len() > key_out.len() {
            return Ok(0);
        }
        identity_out[..id.len()].copy_from_slice(id);
        identity_out[id.len()] = 0;
        key_out[..key.len()].copy_from_slice(&key);
        Ok(key.len())
    });
    Ok(TlsClient { context: b.build(), server_name: None, what: format!("PSK identity {identity:?}") })
}
