//! Fuzzes the TLS-wrapped handshake through the real driver
//! (`server::negotiate`) on a real socket pair: the harness is the client. It
//! sends its flags and NBD_OPT_STARTTLS, runs a real TLS handshake (X.509
//! through rustls, or a pre-shared key through OpenSSL: the two libraries of
//! `nbd_frontend::tls`), then sends the fuzzed option stream inside TLS and
//! reads whatever comes back until the server is done.
//!
//! Input layout (missing header bytes read as 0):
//!
//! | byte | meaning                                                          |
//! |------|------------------------------------------------------------------|
//! | 0    | bit 0: PSK (OpenSSL) instead of X.509 (rustls); bit 1: TLS       |
//! |      | offered instead of required; bit 2: send the body in plaintext   |
//! |      | right behind STARTTLS (the injection the server must refuse)     |
//! | 1..  | body: the client's option stream (after STARTTLS)                |
//!
//! Invariants checked:
//! * no panic, and the driver finishes (the client closes its side);
//! * with the injection, no TLS handshake happens and nothing is answered
//!   after the plaintext, not even the STARTTLS ACK;
//! * otherwise the ACK comes in plaintext, the TLS handshake succeeds, and
//!   every reply inside TLS is a well-formed option reply (magic, bounded
//!   length) until the export data or the end; never TLS_REQD inside TLS;
//! * a negotiation that finishes reports TLS, and extended headers only with
//!   structured replies.
#![no_main]

use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use nbd_frontend::proto::*;
use nbd_frontend::server::negotiate;
use nbd_frontend::stream::Stream;
use nbd_frontend::{Export, TlsAcceptor, TlsPolicy};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tls");
/// Inputs longer than this are cut: each option costs the client 16 bytes.
const MAX_BODY: usize = 16 << 10;

struct Fixture {
    rt: tokio::runtime::Runtime,
    x509: TlsAcceptor,
    psk: TlsAcceptor,
    client_x509: Arc<rustls::ClientConfig>,
    client_psk: openssl::ssl::SslConnector,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = Path::new(FIXTURE);
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let x509 = TlsAcceptor::x509(dir, false).expect("fixture certificates");
        let psk = TlsAcceptor::psk(&dir.join("keys.psk")).expect("fixture keys");
        let mut roots = rustls::RootCertStore::empty();
        let ca = std::fs::read(dir.join("ca-cert.pem")).expect("fixture CA");
        for c in rustls::pki_types::pem::PemObject::pem_slice_iter(&ca) {
            roots.add(c.expect("CA PEM")).expect("CA");
        }
        let client_x509 = Arc::new(
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .expect("versions")
                .with_root_certificates(roots)
                .with_no_client_auth(),
        );
        let text = std::fs::read_to_string(dir.join("keys.psk")).expect("fixture keys");
        let (id, hex) = text.trim().split_once(':').expect("identity:key");
        let key: Vec<u8> =
            (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex")).collect();
        let id = id.to_string();
        let mut b = openssl::ssl::SslConnector::builder(openssl::ssl::SslMethod::tls_client()).expect("connector");
        b.set_psk_client_callback(move |_, _hint, identity, psk| {
            identity[..id.len()].copy_from_slice(id.as_bytes());
            identity[id.len()] = 0;
            psk[..key.len()].copy_from_slice(&key);
            Ok(key.len())
        });
        b.set_verify(openssl::ssl::SslVerifyMode::NONE);
        Fixture { rt, x509, psk, client_x509, client_psk: b.build() }
    })
}

fn exports() -> Vec<Export> {
    let e = |name: &str, size, read_only| Export {
        name: name.into(),
        description: "fuzz".into(),
        size,
        read_only,
        fast_zero: !read_only,
        block: BlockSizes::default(),
    };
    vec![e("", 1 << 30, false), e("ro", 1 << 20, true)]
}

fn option(opt: u32, data: &[u8]) -> Vec<u8> {
    let mut v = IHAVEOPT.to_be_bytes().to_vec();
    v.extend_from_slice(&opt.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

/// Writes `body` and closes the sending side while reading everything the
/// server sends; returns what was read.
async fn converse<S: AsyncRead + AsyncWrite + Unpin>(s: S, body: &[u8]) -> Vec<u8> {
    let (mut rd, mut wr) = tokio::io::split(s);
    let send = async {
        let _ = wr.write_all(body).await;
        let _ = wr.shutdown().await;
    };
    let recv = async {
        let mut out = Vec::new();
        let _ = rd.read_to_end(&mut out).await;
        out
    };
    tokio::join!(send, recv).1
}

/// Option replies, then possibly the export data of EXPORT_NAME (which
/// starts with the export size, never the reply magic for our exports).
fn check_replies(mut out: &[u8]) {
    while out.len() >= 20 && out[..8] == OPT_REPLY_MAGIC.to_be_bytes() {
        let kind = u32::from_be_bytes(out[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(out[16..20].try_into().unwrap()) as usize;
        assert_ne!(kind, REP_ERR_TLS_REQD, "TLS_REQD inside TLS");
        assert!(len <= 64 << 10, "reply of {len} bytes");
        if out.len() < 20 + len {
            break;
        }
        out = &out[20 + len..];
    }
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    let cfg = data.first().copied().unwrap_or(0);
    let body = &data.get(1..).unwrap_or(&[])[..data.len().saturating_sub(1).min(MAX_BODY)];
    let (psk, offered, inject) = (cfg & 1 != 0, cfg & 2 != 0, cfg & 4 != 0);
    let acceptor = if psk { f.psk.clone() } else { f.x509.clone() };
    let policy = if offered { TlsPolicy::Offered(acceptor) } else { TlsPolicy::Required(acceptor) };

    f.rt.block_on(async {
        let (client, server) = tokio::net::UnixStream::pair().expect("socket pair");
        // The stream is dropped when negotiate returns (the result keeps
        // only whether it was TLS), so the client sees the end.
        let server = async {
            negotiate(Stream::Unix(server), exports(), &policy).await.map(|o| o.map(|(s, n, _)| (s.is_tls(), n)))
        };
        let client = async {
            let mut c = client;
            let mut greeting = [0u8; 18];
            c.read_exact(&mut greeting).await.expect("greeting");
            let mut hello = (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes().to_vec();
            hello.extend(option(OPT_STARTTLS, &[]));
            if inject {
                // Plaintext behind STARTTLS, in the same write: refused whole.
                hello.extend_from_slice(body);
                let out = converse(c, &hello).await;
                return (true, out);
            }
            c.write_all(&hello).await.expect("STARTTLS");
            let mut ack = [0u8; 20];
            c.read_exact(&mut ack).await.expect("STARTTLS reply");
            assert_eq!(u32::from_be_bytes(ack[12..16].try_into().unwrap()), REP_ACK, "STARTTLS refused");
            let out = if psk {
                let ssl = f.client_psk.configure().expect("ssl").into_ssl("localhost").expect("ssl");
                let mut s = tokio_openssl::SslStream::new(ssl, c).expect("stream");
                Pin::new(&mut s).connect().await.expect("PSK handshake");
                converse(s, body).await
            } else {
                let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
                let s = tokio_rustls::TlsConnector::from(f.client_x509.clone())
                    .connect(name, c)
                    .await
                    .expect("X.509 handshake");
                converse(s, body).await
            };
            (false, out)
        };
        let (result, (injected, out)) = tokio::join!(server, client);
        if injected {
            if !body.is_empty() {
                let e = result.err().expect("plaintext behind STARTTLS is refused");
                assert!(e.to_string().contains("plaintext"), "{e}");
                assert!(out.is_empty(), "the server answered after the plaintext: {out:02x?}");
            }
            return;
        }
        check_replies(&out);
        if let Ok(Some((is_tls, neg))) = result {
            assert!(is_tls && neg.tls, "negotiated outside TLS");
            assert!(!neg.extended || neg.structured);
        }
    });
});
