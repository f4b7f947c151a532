//! The TLS client of `nbds://`.
//!
//! - X.509 (`tls-certificates=DIR`, the layout qemu-nbd and nbdkit use) through
//!   rustls. `DIR/ca-cert.pem` is the only trust anchor (the system's roots are
//!   not consulted: an NBD server's certificate comes from its operator's CA);
//!   `DIR/client-cert.pem` and `DIR/client-key.pem`, when both exist, are
//!   presented to a server that asks for a client certificate.
//! - Pre-shared keys (`tls-psk-file=FILE`, psktool's format) through OpenSSL,
//!   like the server side: rustls has no external PSK (docs/decisions.md). The
//!   key authenticates both ends, so there is nothing else to verify.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use super::handshake::BoxStream;
use super::uri::TlsCreds;

/// What a TLS connection needs: for X.509 the verified configuration and the
/// name the server's certificate must carry; for a pre-shared key the context
/// that offers it.
#[derive(Clone)]
pub(super) enum TlsClient {
    X509 { config: Arc<rustls::ClientConfig>, server_name: ServerName<'static> },
    Psk { context: openssl::ssl::SslContext, identity: String },
}

impl std::fmt::Debug for TlsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TlsClient::X509 { server_name, .. } => write!(f, "TlsClient(X.509, {server_name:?})"),
            TlsClient::Psk { identity, .. } => write!(f, "TlsClient(PSK, identity {identity:?})"),
        }
    }
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
        let read = |name: &str| -> Result<Option<Vec<u8>>, String> {
            let p = dir.join(name);
            match std::fs::read(locate(&p)) {
                Ok(b) => Ok(Some(b)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(format!("cannot read {}: {e}", p.display())),
            }
        };
        let ca_path = dir.join("ca-cert.pem");
        let ca = read("ca-cert.pem")?
            .ok_or_else(|| format!("{} is missing: it is the CA that verifies the server", ca_path.display()))?;
        let mut roots = rustls::RootCertStore::empty();
        let mut n = 0;
        for c in CertificateDer::pem_slice_iter(&ca) {
            let c = c.map_err(|e| format!("{}: {e}", ca_path.display()))?;
            roots.add(c).map_err(|e| format!("{}: {e}", ca_path.display()))?;
            n += 1;
        }
        if n == 0 {
            return Err(format!("{} holds no certificate", ca_path.display()));
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS setup: {e}"))?
            .with_root_certificates(roots);
        let config = match (read("client-cert.pem")?, read("client-key.pem")?) {
            (Some(cert), Some(key)) => {
                let chain = CertificateDer::pem_slice_iter(&cert)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| format!("{}: {e}", dir.join("client-cert.pem").display()))?;
                let key = PrivateKeyDer::from_pem_slice(&key)
                    .map_err(|e| format!("{}: {e}", dir.join("client-key.pem").display()))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| format!("the client certificate in {}: {e}", dir.display()))?
            }
            _ => builder.with_no_client_auth(),
        };
        let server_name = ServerName::try_from(server_name.to_string())
            .map_err(|e| format!("{server_name:?} cannot be checked against a certificate: {e}"))?;
        Ok(TlsClient::X509 { config: Arc::new(config), server_name })
    }

    /// Runs the TLS handshake on `stream` (right after STARTTLS was accepted).
    pub(super) async fn wrap(&self, stream: BoxStream) -> std::io::Result<BoxStream> {
        match self {
            TlsClient::X509 { config, server_name } => {
                let connector = tokio_rustls::TlsConnector::from(config.clone());
                let tls = connector.connect(server_name.clone(), stream).await?;
                Ok(Box::new(tls))
            }
            TlsClient::Psk { context, identity } => {
                // A protocol failure (a key the server does not accept) is
                // final: InvalidData, as rustls reports a bad certificate. A
                // link that breaks mid-handshake stays an I/O error (retried).
                let failed = |kind: std::io::ErrorKind, e: &dyn std::fmt::Display| {
                    std::io::Error::new(kind, format!("handshake with PSK identity {identity:?} failed: {e}"))
                };
                let ssl = openssl::ssl::Ssl::new(context).map_err(|e| failed(std::io::ErrorKind::Other, &e))?;
                let mut tls =
                    tokio_openssl::SslStream::new(ssl, stream).map_err(|e| failed(std::io::ErrorKind::Other, &e))?;
                if let Err(e) = std::pin::Pin::new(&mut tls).connect().await {
                    let kind = match e.io_error() {
                        Some(io) => io.kind(),
                        None if e.code() == openssl::ssl::ErrorCode::SSL => std::io::ErrorKind::InvalidData,
                        None => std::io::ErrorKind::ConnectionAborted,
                    };
                    return Err(failed(kind, &e));
                }
                Ok(Box::new(tls))
            }
        }
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
    Ok(TlsClient::Psk { context: b.build(), identity })
}
