//! X.509 credentials for STARTTLS on the server (`--tls-certs DIR`), and the
//! key checks the `nbds://` client shares, read with OpenSSL, so that every
//! key and certificate a user's CA may issue for qemu-nbd, nbdkit or
//! nbd-server (gnutls) works here too: RSA of any size from 2048 bits, ECDSA
//! on P-256, P-384 and P-521, Ed25519 and Ed448, in PKCS#1, SEC1 or PKCS#8,
//! with intermediate CAs in the chain.
//!
//! Everything else is refused at start with the reason, before anything
//! listens: an encrypted key (the daemon has nobody to ask for the
//! passphrase), an RSA key under 2048 bits, a curve TLS clients do not take,
//! a key that is not the certificate's, a chain OpenSSL refuses at security
//! level 2 (a SHA-1 signature, a CA key too small). The security level is set
//! here, not left to the system's OpenSSL configuration, so the same files are
//! accepted on every distribution.

use std::path::Path;

use openssl::nid::Nid;
use openssl::pkey::{Id, PKey, Private};
use openssl::ssl::{SslContext, SslContextBuilder, SslMethod, SslOptions, SslVerifyMode, SslVersion};
use openssl::x509::store::X509StoreBuilder;
use openssl::x509::X509;

use super::TlsSetupError;

/// OpenSSL's security level 2: 112-bit security (RSA and DH from 2048 bits,
/// no SHA-1 signatures in the chain). Debian's default, set explicitly.
pub(crate) const SECURITY_LEVEL: u32 = 2;

/// The smallest RSA key accepted: what level 2 asks for (NIST has disallowed
/// 1024-bit RSA since 2013; gnutls still serves it, we do not).
const MIN_RSA_BITS: u32 = 2048;

/// TLS 1.3 suites, AES-128-GCM first and chosen over the client's order: gnutls
/// clients ask for AES-256 first, which costs both ends a third more per byte
/// (docs/decisions.md, "AES-128-GCM first").
pub(crate) const TLS13_SUITES: &str = "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256";

/// TLS 1.2: an ephemeral key exchange and an AEAD cipher only (forward
/// secrecy, no CBC), for ECDSA/EdDSA and RSA certificates alike.
pub(crate) const TLS12_CIPHERS: &str = "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:\
                             ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:\
                             ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305";

fn read(path: &Path) -> Result<Vec<u8>, TlsSetupError> {
    std::fs::read(path).map_err(|source| TlsSetupError::Read { path: path.to_path_buf(), source })
}

fn invalid(path: &Path, reason: impl std::fmt::Display) -> TlsSetupError {
    TlsSetupError::Invalid { path: path.to_path_buf(), reason: reason.to_string() }
}

/// The first line of OpenSSL's error stack, which names what it refused.
pub(crate) fn openssl_reason(e: &openssl::error::ErrorStack) -> String {
    e.errors().first().map(|x| x.reason().unwrap_or("unknown reason").to_string()).unwrap_or_else(|| e.to_string())
}

/// True for PEM that holds an encrypted key: PKCS#8 (`ENCRYPTED PRIVATE
/// KEY`) or a traditional key with `Proc-Type: 4,ENCRYPTED`.
fn is_encrypted(pem: &[u8]) -> bool {
    let text = String::from_utf8_lossy(pem);
    text.contains("-----BEGIN ENCRYPTED PRIVATE KEY-----") || text.contains("Proc-Type: 4,ENCRYPTED")
}

/// Reads a private key (the server's, or a client's) and checks it is one TLS
/// peers accept.
pub(crate) fn private_key(path: &Path) -> Result<PKey<Private>, TlsSetupError> {
    let pem = read(path)?;
    if is_encrypted(&pem) {
        return Err(invalid(
            path,
            "the key is encrypted with a passphrase, which the daemon has no way to ask for: give it the key \
             without one (openssl pkey -in KEY -out PLAIN, then keep PLAIN readable by root only)",
        ));
    }
    // The callback answers any passphrase question with none: OpenSSL must
    // never prompt on a terminal the daemon may have.
    let key = PKey::private_key_from_pem_callback(&pem, |_| Ok(0)).map_err(|e| {
        invalid(
            path,
            format!("not a PEM private key (PKCS#1, SEC1 or PKCS#8) OpenSSL can read: {}", openssl_reason(&e)),
        )
    })?;
    check_key(&key).map_err(|reason| invalid(path, reason))?;
    Ok(key)
}

/// Why a key cannot serve TLS clients, if it cannot.
fn check_key(key: &PKey<Private>) -> Result<(), String> {
    match key.id() {
        Id::RSA | Id::RSA_PSS => {
            let bits = key.bits();
            if bits < MIN_RSA_BITS {
                return Err(format!(
                    "an RSA key of {bits} bits is too weak: at least {MIN_RSA_BITS} bits are needed (OpenSSL's \
                     security level {SECURITY_LEVEL}; issue a new key)"
                ));
            }
            Ok(())
        }
        Id::EC => {
            let ec = key.ec_key().map_err(|e| format!("an EC key OpenSSL cannot use: {}", openssl_reason(&e)))?;
            match ec.group().curve_name() {
                Some(Nid::X9_62_PRIME256V1 | Nid::SECP384R1 | Nid::SECP521R1) => Ok(()),
                other => Err(format!(
                    "an EC key on the curve {}: TLS clients take ECDSA keys on P-256, P-384 and P-521 only",
                    other.and_then(|n| n.short_name().ok()).unwrap_or("(unnamed, explicit parameters)")
                )),
            }
        }
        Id::ED25519 | Id::ED448 => Ok(()),
        Id::DSA => Err("a DSA key: TLS 1.3 has no DSA, and no NBD client offers it (use RSA, ECDSA or EdDSA)".into()),
        other => Err(format!("a key of type {other:?}, which TLS cannot sign with (use RSA, ECDSA or EdDSA)")),
    }
}

/// Reads a PEM file of certificates (at least one).
pub(crate) fn certificates(path: &Path) -> Result<Vec<X509>, TlsSetupError> {
    let pem = read(path)?;
    let certs = X509::stack_from_pem(&pem).map_err(|e| invalid(path, openssl_reason(&e)))?;
    if certs.is_empty() {
        return Err(invalid(path, "holds no PEM certificate"));
    }
    Ok(certs)
}

/// Logs a warning when the certificate is not valid now: clients will refuse
/// it, but the daemon can serve plaintext clients and the clock may be wrong.
fn warn_if_not_valid_now(cert: &X509, path: &Path) {
    let Ok(now) = openssl::asn1::Asn1Time::days_from_now(0) else { return };
    if cert.not_after() < now {
        tracing::warn!(
            "{}: the certificate expired on {}: TLS clients will refuse it",
            path.display(),
            cert.not_after()
        );
    } else if cert.not_before() > now {
        tracing::warn!(
            "{}: the certificate is valid only from {}: TLS clients will refuse it until then",
            path.display(),
            cert.not_before()
        );
    }
}

/// The TLS context for X.509 credentials in `dir` (qemu-nbd's layout):
/// `server-cert.pem` (the chain, leaf first) and `server-key.pem`; with
/// `verify_peer`, clients must present a certificate that chains to
/// `ca-cert.pem`.
pub(crate) fn server_context(dir: &Path, verify_peer: bool) -> Result<SslContext, TlsSetupError> {
    let cert_path = dir.join("server-cert.pem");
    let key_path = dir.join("server-key.pem");
    let chain = certificates(&cert_path)?;
    let key = private_key(&key_path)?;
    let leaf = &chain[0];
    let leaf_key = leaf.public_key().map_err(|e| invalid(&cert_path, openssl_reason(&e)))?;
    if !leaf_key.public_eq(&key) {
        return Err(invalid(
            &key_path,
            format!(
                "this key does not belong to the certificate in {} (its first certificate must be the server's own)",
                cert_path.display()
            ),
        ));
    }
    warn_if_not_valid_now(leaf, &cert_path);
    let lib = |e: openssl::error::ErrorStack| TlsSetupError::Library(e.to_string());
    let mut b = SslContextBuilder::new(SslMethod::tls_server()).map_err(lib)?;
    b.set_security_level(SECURITY_LEVEL);
    b.set_min_proto_version(Some(SslVersion::TLS1_2)).map_err(lib)?;
    // Renegotiation would let the peer restart the handshake under a split
    // stream; tickets would only cost records (no NBD client resumes).
    b.set_options(SslOptions::NO_RENEGOTIATION | SslOptions::NO_TICKET | SslOptions::CIPHER_SERVER_PREFERENCE);
    b.set_num_tickets(0).map_err(lib)?;
    // One read takes in everything the socket has, not a record header and
    // then its body: a third of the receive calls per small request.
    b.set_read_ahead(true);
    b.set_ciphersuites(TLS13_SUITES).map_err(lib)?;
    b.set_cipher_list(TLS12_CIPHERS).map_err(lib)?;
    let chain_refused = |what: &str, e: openssl::error::ErrorStack| {
        invalid(
            &cert_path,
            format!(
                "OpenSSL refuses {what} at security level {SECURITY_LEVEL}: {} (a SHA-1 or MD5 signature, or a key \
                 too small, somewhere in the chain)",
                openssl_reason(&e)
            ),
        )
    };
    b.set_certificate(leaf).map_err(|e| chain_refused("the certificate", e))?;
    for c in &chain[1..] {
        b.add_extra_chain_cert(c.clone()).map_err(|e| chain_refused("a certificate of the chain", e))?;
    }
    b.set_private_key(&key).map_err(|e| invalid(&key_path, openssl_reason(&e)))?;
    b.check_private_key().map_err(|e| invalid(&key_path, openssl_reason(&e)))?;
    if verify_peer {
        let ca_path = dir.join("ca-cert.pem");
        let mut store = X509StoreBuilder::new().map_err(lib)?;
        for ca in certificates(&ca_path)? {
            // Clients learn which CAs we take (they pick a certificate by it).
            b.add_client_ca(&ca).map_err(|e| invalid(&ca_path, openssl_reason(&e)))?;
            store.add_cert(ca).map_err(|e| invalid(&ca_path, openssl_reason(&e)))?;
        }
        b.set_verify_cert_store(store.build()).map_err(lib)?;
        b.set_verify(SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT);
    } else {
        b.set_verify(SslVerifyMode::NONE);
    }
    Ok(b.build())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encrypted_keys_are_recognised_in_both_pem_forms() {
        assert!(is_encrypted(b"-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIF...\n"));
        assert!(is_encrypted(b"-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: AES-128-CBC,00\n"));
        assert!(!is_encrypted(b"-----BEGIN PRIVATE KEY-----\nMIIE...\n"));
    }

    #[test]
    fn weak_and_unusable_keys_are_refused_with_the_reason() {
        let rsa = |bits| PKey::from_rsa(openssl::rsa::Rsa::generate(bits).unwrap()).unwrap();
        let e = check_key(&rsa(1024)).unwrap_err();
        assert!(e.contains("1024 bits") && e.contains("at least 2048"), "{e}");
        assert!(check_key(&rsa(2048)).is_ok());
        assert!(check_key(&rsa(2432)).is_ok(), "any size from 2048 bits");
        let ec = |nid| {
            let g = openssl::ec::EcGroup::from_curve_name(nid).unwrap();
            PKey::from_ec_key(openssl::ec::EcKey::generate(&g).unwrap()).unwrap()
        };
        for nid in [Nid::X9_62_PRIME256V1, Nid::SECP384R1, Nid::SECP521R1] {
            assert!(check_key(&ec(nid)).is_ok());
        }
        let e = check_key(&ec(Nid::SECP256K1)).unwrap_err();
        assert!(e.contains("secp256k1") && e.contains("P-256"), "{e}");
        assert!(check_key(&PKey::generate_ed25519().unwrap()).is_ok());
        assert!(check_key(&PKey::generate_ed448().unwrap()).is_ok());
        let dsa = PKey::from_dsa(openssl::dsa::Dsa::generate(2048).unwrap()).unwrap();
        assert!(check_key(&dsa).unwrap_err().contains("DSA"));
    }
}
