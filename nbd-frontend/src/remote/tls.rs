//! The TLS client of `nbds://`: rustls with X.509 certificates in the layout
//! qemu-nbd and nbdkit use. `DIR/ca-cert.pem` is the only trust anchor (the
//! system's roots are not consulted: an NBD server's certificate comes from
//! its operator's CA); `DIR/client-cert.pem` and `DIR/client-key.pem`, when
//! both exist, are presented to a server that asks for a client certificate.
//!
//! Pre-shared keys (`tls-psk-file`) are refused with a reason: rustls has no
//! external PSK (docs/decisions.md).

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use super::handshake::BoxStream;
use super::uri::TlsCreds;

/// What a TLS connection needs: the verified configuration and the name the
/// server's certificate must carry.
#[derive(Clone)]
pub(super) struct TlsClient {
    config: Arc<rustls::ClientConfig>,
    server_name: ServerName<'static>,
}

impl std::fmt::Debug for TlsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TlsClient({:?})", self.server_name)
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
            TlsCreds::Psk { file, .. } => {
                return Err(format!(
                    "tls-psk-file={}: TLS with pre-shared keys is not supported yet (rustls has no external PSK); \
                     use tls-certificates=DIR with X.509 certificates",
                    file.display()
                ))
            }
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
        Ok(TlsClient { config: Arc::new(config), server_name })
    }

    /// Runs the TLS handshake on `stream` (right after STARTTLS was accepted).
    pub(super) async fn wrap(&self, stream: BoxStream) -> std::io::Result<BoxStream> {
        let connector = tokio_rustls::TlsConnector::from(self.config.clone());
        let tls = connector.connect(self.server_name.clone(), stream).await?;
        Ok(Box::new(tls))
    }
}
