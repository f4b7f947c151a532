//! STARTTLS with real clients: qemu-io/qemu-img (gnutls) and nbdinfo (libnbd,
//! gnutls) over X.509 and pre-shared keys; refusals of clients without
//! credentials, with a wrong certificate or key, and of plaintext options
//! under `--tls require`; a TLS client of our own (rustls) for what the tools
//! cannot be made to send. Credentials are made per test by
//! tests/scripts/tls_creds.sh (certtool, psktool); the matrix of key kinds
//! (RSA 2048 to 8192, the reference server's 2432-bit key, ECDSA P-256 to
//! P-521, Ed25519, Ed448, PKCS#1/SEC1/PKCS#8, a chain) is in tests/certs.
#![allow(clippy::unwrap_used, unreachable_pub)] // test code: a panic is a failure; helpers are shared through `mod common`
mod common;
use common::raw::*;
use common::*;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

const CREDS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/scripts/tls_creds.sh");
const OPT_ABORT: u32 = 2;
const OPT_LIST: u32 = 3;
const OPT_STARTTLS: u32 = 5;
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;
const OPT_EXTENDED_HEADERS: u32 = 11;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_ERR_INVALID: u32 = (1 << 31) | 3;
const REP_ERR_TLS_REQD: u32 = (1 << 31) | 5;

/// Makes the credentials under `dir/creds`.
fn creds(dir: &Path) -> PathBuf {
    let c = dir.join("creds");
    let out = std::process::Command::new("bash").arg(CREDS).arg(&c).env("PATH", debian_path()).output().unwrap();
    assert!(out.status.success(), "tls_creds.sh failed:\n{}", text(&out));
    c
}

fn image(dir: &Path, len: usize) -> (PathBuf, Vec<u8>) {
    let img = dir.join("s.img");
    let data = pattern(3, len);
    make_image(&img, &data);
    (img, data)
}

fn qemu_x509(sock: &Path, creds: &Path, cmds: &[&str]) -> std::process::Output {
    let object = format!("tls-creds-x509,id=tls0,dir={},endpoint=client", creds.display());
    let opts = format!("driver=nbd,path={},tls-creds=tls0,tls-hostname=localhost", sock.display());
    qemu_io(&object, &opts, cmds)
}

fn qemu_psk(sock: &Path, keys_dir: &Path, user: &str, cmds: &[&str]) -> std::process::Output {
    let object = format!("tls-creds-psk,id=tls0,dir={},username={user},endpoint=client", keys_dir.display());
    let opts = format!("driver=nbd,path={},tls-creds=tls0", sock.display());
    qemu_io(&object, &opts, cmds)
}

/// qemu-io with a TLS object; traces the option replies so a test can see
/// what was negotiated.
fn qemu_io(object: &str, opts: &str, cmds: &[&str]) -> std::process::Output {
    let mut args = vec!["--trace", "nbd_receive_option_reply", "--object", object, "--image-opts", opts];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    run(&tool("qemu-io"), &args)
}

fn ok_output(o: &std::process::Output, what: &str) -> String {
    let t = text(o);
    assert!(o.status.success(), "{what} failed:\n{t}");
    assert!(!t.contains("Pattern verification failed") && !t.contains("failed:"), "{what}:\n{t}");
    t
}

fn refused(o: &std::process::Output, what: &str) -> String {
    let t = text(o);
    assert!(!o.status.success() && !t.contains("read 4096/4096"), "{what} was not refused:\n{t}");
    t
}

fn nbdinfo(uri: &str) -> std::process::Output {
    run(&tool("nbdinfo"), &["--json", uri])
}

fn assert_alive(d: &mut Daemon) {
    if let Some(st) = d.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
        panic!("livemirror exited ({st}):\n{}", d.log_text());
    }
    assert_eq!(d.state(), "serving", "{}", d.log_text());
}

fn free_tcp_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

#[test]
fn qemu_and_nbdinfo_use_x509_over_unix_and_tcp() {
    let dir = scratch();
    let c = creds(dir.path());
    let (img, data) = image(dir.path(), 4 << 20);
    let port = free_tcp_port();
    let unix = format!("unix:{}", dir.path().join("nbd.sock").display());
    let tcp = format!("tcp:127.0.0.1:{port}");
    let certs = c.join("server");
    let mut d = Daemon::start(
        dir.path(),
        &["--source", p(&img), "--listen", &unix, "--listen", &tcp, "--tls", "require", "--tls-certs", p(&certs)],
    );
    // A client without a certificate of its own: no --tls-verify-peer here.
    let out = qemu_x509(
        &d.sock,
        &c.join("anon"),
        &["read -P 0 0 0", "write -P 0x5a 4096 8192", "read -P 0x5a 4096 8192", "write -z 1M 1M", "flush"],
    );
    let t = ok_output(&out, "qemu-io over TLS");
    assert!(t.contains("Received option reply 5 (starttls), type 1 (ack)"), "qemu started TLS:\n{t}");
    assert!(t.contains("option reply 11 (extended headers), type 1 (ack)"), "extended headers inside TLS:\n{t}");
    // TCP loopback; the certificate names 127.0.0.1.
    let object = format!("tls-creds-x509,id=tls0,dir={},endpoint=client", c.join("anon").display());
    let info = run_ok(
        &tool("qemu-img"),
        &[
            "info",
            "--output=json",
            "--object",
            &object,
            "--image-opts",
            &format!("driver=nbd,host=127.0.0.1,port={port},tls-creds=tls0"),
        ],
    );
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(v["virtual-size"], 4 << 20, "{info}");
    // nbdinfo (libnbd) over both.
    let anon = c.join("anon");
    for uri in [
        format!("nbds+unix:///?socket={}&tls-certificates={}", d.sock.display(), anon.display()),
        format!("nbds://localhost:{port}/?tls-certificates={}", anon.display()),
    ] {
        let out = nbdinfo(&uri);
        assert!(out.status.success(), "nbdinfo {uri}:\n{}", text(&out));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["TLS"], true, "{v}");
        assert_eq!(v["exports"][0]["export-size"], 4 << 20, "{v}");
    }
    // A client that does not trust our server refuses it itself (no client
    // certificates are asked for here, so the refusal is the client's alone).
    let t = refused(&qemu_x509(&d.sock, &c.join("distrust"), &["read 0 4k"]), "a client of another CA");
    assert!(t.contains("certificate"), "{t}");
    assert_alive(&mut d);
    assert_eq!(d.stop().code(), Some(0));
    let got = std::fs::read(&img).unwrap();
    assert!(got[4096..12288].iter().all(|&b| b == 0x5a), "the TLS write reached the image");
    assert!(got[1 << 20..2 << 20].iter().all(|&b| b == 0), "write -z zeroed");
    assert_eq!(&got[..4096], &data[..4096]);
    assert_eq!(&got[2 << 20..], &data[2 << 20..]);
}

#[test]
fn client_certificates_are_verified_and_wrong_ones_refused() {
    let dir = scratch();
    let c = creds(dir.path());
    let (img, _) = image(dir.path(), 1 << 20);
    let certs = c.join("server");
    let mut d = Daemon::start(
        dir.path(),
        &["--source", p(&img), "--tls", "require", "--tls-certs", p(&certs), "--tls-verify-peer"],
    );
    ok_output(&qemu_x509(&d.sock, &c.join("client"), &["read 0 4k"]), "a client our CA signed");
    let ok =
        nbdinfo(&format!("nbds+unix:///?socket={}&tls-certificates={}", d.sock.display(), c.join("client").display()));
    assert!(ok.status.success(), "{}", text(&ok));
    // No certificate, or one from another CA: the server ends the handshake.
    refused(&qemu_x509(&d.sock, &c.join("anon"), &["read 0 4k"]), "a client without a certificate");
    refused(&qemu_x509(&d.sock, &c.join("rogue"), &["read 0 4k"]), "a client of another CA");
    let rogue =
        nbdinfo(&format!("nbds+unix:///?socket={}&tls-certificates={}", d.sock.display(), c.join("rogue").display()));
    assert!(!rogue.status.success(), "{}", text(&rogue));
    // gnutls sends no certificate the server's CA list does not name; rustls
    // sends what it is given, so the server's own check is what refuses it.
    let e = tls_client(&d.sock, &c, Some("rogue"), false).unwrap_err();
    assert!(!e.is_empty());
    wait_log(&d, &["TLS handshake failed: peer did not return a certificate"]);
    wait_log(
        &d,
        &["TLS handshake failed: certificate verify failed (the client certificate: unable to get local issuer"],
    );
    assert!(tls_client(&d.sock, &c, Some("client"), false).is_ok(), "our own client with a good certificate");
    assert_alive(&mut d);
}

#[test]
fn qemu_and_nbdinfo_use_pre_shared_keys() {
    let dir = scratch();
    let c = creds(dir.path());
    let (img, _) = image(dir.path(), 2 << 20);
    let keys = c.join("psk/keys.psk");
    let mut d = Daemon::start(dir.path(), &["--source", p(&img), "--tls", "require", "--tls-psk", p(&keys)]);
    let t = ok_output(
        &qemu_psk(&d.sock, &c.join("psk"), "alice", &["write -P 0x77 0 64k", "read -P 0x77 0 64k"]),
        "qemu-io with a PSK",
    );
    assert!(t.contains("option reply 5 (starttls), type 1 (ack)"), "{t}");
    let uri = format!("nbds+unix://alice@/?socket={}&tls-psk-file={}", d.sock.display(), keys.display());
    let out = nbdinfo(&uri);
    assert!(out.status.success(), "nbdinfo {uri}:\n{}", text(&out));
    // The right identity with another key, an identity the server does not
    // know, no credentials at all: refused.
    refused(&qemu_psk(&d.sock, &c.join("psk-wrong"), "alice", &["read 0 4k"]), "a wrong key");
    refused(&qemu_psk(&d.sock, &c.join("psk-bob"), "bob", &["read 0 4k"]), "an unknown identity");
    let wrong = c.join("psk-wrong/keys.psk");
    let out = nbdinfo(&format!("nbds+unix://alice@/?socket={}&tls-psk-file={}", d.sock.display(), wrong.display()));
    assert!(!out.status.success(), "{}", text(&out));
    wait_log(&d, &["TLS handshake failed"]);
    wait_log(&d, &["unknown PSK identity \"bob\""]);
    assert_alive(&mut d);
    assert_eq!(d.stop().code(), Some(0));
    assert!(std::fs::read(&img).unwrap()[..65536].iter().all(|&b| b == 0x77));
}

#[test]
fn without_credentials_required_tls_refuses_plaintext() {
    let dir = scratch();
    let c = creds(dir.path());
    let (img, _) = image(dir.path(), 1 << 20);
    let keys = c.join("psk/keys.psk");
    let mut d = Daemon::start(dir.path(), &["--source", p(&img), "--tls", "require", "--tls-psk", p(&keys)]);
    let out = run(&tool("qemu-io"), &["-f", "raw", &d.uri(), "-c", "read 0 4k"]);
    let t = refused(&out, "qemu-io without TLS");
    assert!(t.contains("TLS"), "qemu names TLS as the reason:\n{t}");
    let out = nbdinfo(&d.uri());
    let t = text(&out);
    assert!(!out.status.success() && t.to_lowercase().contains("tls"), "nbdinfo without TLS:\n{t}");

    // By hand: every plaintext option but STARTTLS and ABORT gets TLS_REQD,
    // and the connection goes on.
    let mut s = raw_connect(&d.sock);
    let go = [0u8, 0, 0, 0, 0, 0];
    for (opt, data) in [
        (OPT_LIST, &[][..]),
        (OPT_STRUCTURED_REPLY, &[][..]),
        (OPT_EXTENDED_HEADERS, &[][..]),
        (OPT_INFO, &go[..]),
        (OPT_GO, &go[..]),
        (99, &b"unknown"[..]),
        (OPT_GO, &vec![0u8; 100_000][..]),
    ] {
        send_option(&mut s, opt, data);
        let (o, kind, msg) = option_reply(&mut s);
        assert_eq!((o, kind), (opt, REP_ERR_TLS_REQD), "option {opt}: {msg:?}");
    }
    send_option(&mut s, OPT_STARTTLS, b"data");
    assert_eq!(option_reply(&mut s).1, REP_ERR_INVALID, "STARTTLS takes no data");
    send_option(&mut s, OPT_ABORT, &[]);
    assert_eq!(option_reply(&mut s).1, REP_ACK);
    assert_closed(&mut s, "after ABORT");
    // EXPORT_NAME cannot be refused: the server hangs up.
    let mut s = raw_connect(&d.sock);
    send_option(&mut s, 1, b"");
    assert_closed(&mut s, "EXPORT_NAME before TLS");
    // STARTTLS with plaintext behind it (not waiting for the ACK): the
    // server never reads those bytes as TLS or as options; it hangs up.
    let mut s = raw_connect(&d.sock);
    let mut both = Vec::new();
    for (o, data) in [(OPT_STARTTLS, &[][..]), (OPT_GO, &go[..])] {
        both.extend_from_slice(&IHAVEOPT.to_be_bytes());
        both.extend_from_slice(&o.to_be_bytes());
        both.extend_from_slice(&(data.len() as u32).to_be_bytes());
        both.extend_from_slice(data);
    }
    s.write_all(&both).unwrap();
    assert_closed(&mut s, "plaintext after STARTTLS");
    // Normally both arrive in one read and the handshake sees them; if they
    // come apart, the TLS handshake gets the plaintext and fails. Either way
    // no option is read from them.
    wait_log(&d, &["plaintext bytes after NBD_OPT_STARTTLS", "TLS handshake failed"]);
    assert_alive(&mut d);
}

#[test]
fn tls_on_serves_plaintext_and_tls_clients_and_starttls_drops_what_was_negotiated() {
    let dir = scratch();
    let c = creds(dir.path());
    let (img, data) = image(dir.path(), 1 << 20);
    let certs = c.join("server");
    let mut d = Daemon::start(dir.path(), &["--source", p(&img), "--tls", "on", "--tls-certs", p(&certs)]);
    let out = run(&tool("qemu-io"), &["-f", "raw", &d.uri(), "-c", "read -P 0 0 0", "-c", "write -P 1 0 4k"]);
    ok_output(&out, "plaintext qemu-io with TLS offered");
    ok_output(&qemu_x509(&d.sock, &c.join("anon"), &["read -P 1 0 4k"]), "TLS qemu-io with TLS offered");
    // Extended headers in plaintext, then STARTTLS: inside TLS the session
    // starts over, so GO without renegotiating gives compact requests and
    // simple replies.
    let got = tls_client(&d.sock, &c, None, true).unwrap();
    assert_eq!(&got[..4096], &[1u8; 4096][..]);
    assert_eq!(&got[4096..], &data[4096..8192]);
    assert_alive(&mut d);
}

#[test]
fn startup_refuses_tls_flags_that_do_not_fit() {
    let dir = scratch();
    let c = creds(dir.path());
    let (img, _) = image(dir.path(), 1 << 20);
    let certs = c.join("server");
    let keys = c.join("psk/keys.psk");
    let missing = dir.path().join("nope");
    let not_keys = certs.join("server-cert.pem");
    let cases: Vec<(Vec<&str>, i32, &str)> = vec![
        (vec!["--tls", "on"], 1, "need credentials"),
        (vec!["--tls", "require"], 1, "need credentials"),
        (vec!["--tls-certs", p(&certs)], 1, "--tls is off"),
        (vec!["--tls", "on", "--tls-certs", p(&missing)], 1, "server-cert.pem"),
        (vec!["--tls", "on", "--tls-psk", p(&missing)], 1, "nope"),
        (vec!["--tls", "on", "--tls-psk", p(&not_keys)], 1, "identity:hexkey"),
        (vec!["--tls", "on", "--tls-certs", p(&certs), "--tls-psk", p(&keys)], 2, "cannot be used with"),
        (vec!["--tls", "on", "--tls-verify-peer"], 2, "--tls-certs"),
        (vec!["--tls", "maybe"], 2, "possible values"),
    ];
    for (i, (extra, want, says)) in cases.into_iter().enumerate() {
        let sub = dir.path().join(format!("case{i}"));
        std::fs::create_dir_all(&sub).unwrap();
        let mut args = vec!["--source", p(&img)];
        args.extend(extra.iter().copied());
        let mut d = Daemon::spawn_raw(&sub, &args);
        let st = wait_timeout(d.child.as_mut().unwrap(), Duration::from_secs(20)).expect("exits");
        d.child = None;
        assert_eq!(exit_code(&st), want, "{extra:?}:\n{}", d.log_text());
        assert!(d.log_text().contains(says), "{extra:?} should say {says:?}:\n{}", d.log_text());
        assert!(!d.sock.exists(), "{extra:?} left a socket");
    }
}

#[test]
fn remote_listeners_need_authenticating_tls_or_allow_remote() {
    let dir = scratch();
    let c = creds(dir.path());
    let (img, _) = image(dir.path(), 1 << 20);
    let certs = c.join("server");
    let keys = c.join("psk/keys.psk");
    let port = free_tcp_port();
    let any = format!("tcp:0.0.0.0:{port}");
    // Encrypted but anyone may connect: still refused without --allow-remote.
    let sub = dir.path().join("x509");
    std::fs::create_dir_all(&sub).unwrap();
    let mut d =
        Daemon::spawn_raw(&sub, &["--source", p(&img), "--listen", &any, "--tls", "require", "--tls-certs", p(&certs)]);
    let st = wait_timeout(d.child.as_mut().unwrap(), Duration::from_secs(20)).expect("exits");
    d.child = None;
    assert_eq!(exit_code(&st), 1, "{}", d.log_text());
    assert!(d.log_text().contains("clients are not authenticated"), "{}", d.log_text());
    // Pre-shared keys authenticate every client: served without --allow-remote.
    let sub = dir.path().join("psk");
    std::fs::create_dir_all(&sub).unwrap();
    let ctl = sub.join("ctl.sock");
    let mut d = Daemon::spawn_raw(
        &sub,
        &["--source", p(&img), "--listen", &any, "--tls", "require", "--tls-psk", p(&keys), "--control", p(&ctl)],
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(d.cli(&["status"]).status.success() && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()) {
        assert!(Instant::now() < deadline, "not ready:\n{}", d.log_text());
        std::thread::sleep(Duration::from_millis(25));
    }
    let out = nbdinfo(&format!("nbds://alice@127.0.0.1:{port}/?tls-psk-file={}", keys.display()));
    assert!(out.status.success(), "{}\n{}", text(&out), d.log_text());
    assert!(!d.log_text().contains("unauthenticated"), "{}", d.log_text());
    assert_eq!(d.stop().code(), Some(0));
    // Plaintext with --allow-remote: served, and the log says what that means.
    let sub = dir.path().join("plain");
    std::fs::create_dir_all(&sub).unwrap();
    let ctl = sub.join("ctl.sock");
    let mut d =
        Daemon::spawn_raw(&sub, &["--source", p(&img), "--listen", &any, "--allow-remote", "--control", p(&ctl)]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !d.cli(&["status"]).status.success() {
        assert!(Instant::now() < deadline, "not ready:\n{}", d.log_text());
        std::thread::sleep(Duration::from_millis(25));
    }
    assert!(d.log_text().contains("the export is unauthenticated"), "{}", d.log_text());
    assert_eq!(d.stop().code(), Some(0));
}

/// One option reply: (option, type, data as text).
/// Each kind of key serves real clients over TLS, with client certificates
/// of the same CA verified: qemu-io writes and reads a pattern, nbdinfo
/// (libnbd) connects. Both are gnutls clients, which check the server's
/// certificate against the CA and the name `localhost`.
#[test]
fn every_key_and_chain_the_peers_serve_with_serves_qemu_and_libnbd() {
    for kind in TLS_KINDS {
        let dir = scratch();
        let (img, _) = image(dir.path(), 1 << 20);
        let creds = Path::new(TLS_MATRIX).join(kind);
        let mut d = Daemon::start(
            dir.path(),
            &["--source", p(&img), "--tls", "require", "--tls-certs", p(&creds), "--tls-verify-peer"],
        );
        // qemu checks its own certificate against ca-cert.pem alone: with an
        // intermediate CA, its ca-cert.pem must hold both (qemu's layout).
        let qemu_creds = if *kind == "chain" { qemu_chain_dir(dir.path(), &creds) } else { creds.clone() };
        let out = qemu_x509(&d.sock, &qemu_creds, &["write -P 0x3c 8k 4k", "read -P 0x3c 8k 4k", "flush"]);
        let t = ok_output(&out, &format!("qemu-io over TLS with the {kind} credentials"));
        assert!(t.contains("Received option reply 5 (starttls), type 1 (ack)"), "{kind}: qemu started TLS:\n{t}");
        let uri = format!(
            "nbds+unix:///?socket={}&tls-certificates={}&tls-hostname=localhost",
            d.sock.display(),
            creds.display()
        );
        let out = nbdinfo(&uri);
        assert!(out.status.success(), "nbdinfo with the {kind} credentials:\n{}\n{}", text(&out), d.log_text());
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["TLS"], true, "{kind}: {v}");
        assert!(!d.log_text().contains("handshake failed"), "{kind}:\n{}", d.log_text());
        assert_eq!(d.stop().code(), Some(0), "{kind}");
        assert!(std::fs::read(&img).unwrap()[8192..12288].iter().all(|&b| b == 0x3c), "{kind}: the write");
    }
}

/// A copy of `creds` for qemu as a client: its ca-cert.pem also holds the
/// intermediate CA (the second certificate of client-cert.pem).
fn qemu_chain_dir(dir: &Path, creds: &Path) -> PathBuf {
    let q = dir.join("qemu-chain");
    std::fs::create_dir_all(&q).unwrap();
    let chain = std::fs::read_to_string(creds.join("client-cert.pem")).unwrap();
    let end = "-----END CERTIFICATE-----";
    let intermediate = chain.split_inclusive(end).nth(1).expect("an intermediate after the leaf");
    let root = std::fs::read_to_string(creds.join("ca-cert.pem")).unwrap();
    std::fs::write(q.join("ca-cert.pem"), format!("{root}{}\n", intermediate.trim())).unwrap();
    for f in ["client-cert.pem", "client-key.pem"] {
        std::fs::copy(creds.join(f), q.join(f)).unwrap();
    }
    q
}

/// What no client should trust, or the daemon cannot use, is refused at
/// start, before anything listens, and the message says why and names the
/// file: an RSA key under 2048 bits (gnutls still serves one; OpenSSL,
/// rustls and NIST refuse it), a curve TLS clients do not take, a key
/// encrypted with a passphrase (nobody to ask), a key that is not the
/// certificate's.
#[test]
fn keys_that_cannot_serve_are_refused_at_start_with_the_reason() {
    for (kind, file, reason) in [
        ("refused-rsa1024", "server-key.pem", "an RSA key of 1024 bits is too weak: at least 2048 bits are needed"),
        (
            "refused-secp256k1",
            "server-key.pem",
            "an EC key on the curve secp256k1: TLS clients take ECDSA keys on P-256",
        ),
        ("refused-encrypted", "server-key.pem", "the key is encrypted with a passphrase"),
        ("refused-mismatch", "server-key.pem", "this key does not belong to the certificate in"),
    ] {
        let dir = scratch();
        let (img, _) = image(dir.path(), 1 << 20);
        let creds = Path::new(TLS_MATRIX).join(kind);
        let mut d = Daemon::spawn_raw(dir.path(), &["--source", p(&img), "--tls", "require", "--tls-certs", p(&creds)]);
        let st = wait_timeout(d.child.as_mut().unwrap(), Duration::from_secs(30)).expect("exits at once");
        assert_eq!(exit_code(&st), 1, "{kind}: {}", d.log_text());
        let log = d.log_text();
        assert!(log.contains(reason), "{kind}: the reason is not said:\n{log}");
        assert!(log.contains(&format!("{}/{file}", creds.display())), "{kind}: the file is not named:\n{log}");
        assert_eq!(log.lines().count(), 1, "{kind}: one line says it all:\n{log}");
        assert!(!d.sock.exists() && !d.control.exists(), "{kind}: nothing may listen");
    }
}

fn option_reply(s: &mut impl Read) -> (u32, u32, String) {
    let mut h = [0u8; 20];
    s.read_exact(&mut h).expect("option reply");
    assert_eq!(&h[..8], &0x0003_e889_0455_65a9u64.to_be_bytes(), "reply magic");
    let u = |i: usize| u32::from_be_bytes(h[i..i + 4].try_into().unwrap());
    let mut data = vec![0u8; u(16) as usize];
    s.read_exact(&mut data).unwrap();
    (u(8), u(12), String::from_utf8_lossy(&data).into_owned())
}

/// Waits up to 10 s for one of `needles` in the daemon's log (it is written
/// by a thread of its own, after the event).
fn wait_log(d: &Daemon, needles: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = d.log_text();
        if needles.iter().any(|n| log.contains(n)) {
            return;
        }
        assert!(Instant::now() < deadline, "none of {needles:?} in the log:\n{log}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Our own TLS client: extended headers in plaintext (if `ext_first`; TLS
/// required would refuse them), STARTTLS, the TLS
/// handshake (with `DIR/NAME/client-cert.pem` if a name is given), then GO
/// without renegotiating and two compact READs, whose simple replies prove
/// that the plaintext negotiation was dropped. Returns the 8 KiB read, or
/// why the TLS handshake failed.
fn tls_client(sock: &Path, creds: &Path, cert: Option<&str>, ext_first: bool) -> Result<Vec<u8>, String> {
    let mut s = raw_connect(sock);
    if ext_first {
        send_option(&mut s, OPT_EXTENDED_HEADERS, &[]);
        assert_eq!(option_reply(&mut s).1, REP_ACK);
    }
    send_option(&mut s, OPT_STARTTLS, &[]);
    assert_eq!(option_reply(&mut s).1, REP_ACK);
    let mut roots = rustls::RootCertStore::empty();
    let ca = std::fs::read(creds.join("ca/ca-cert.pem")).unwrap();
    for c in rustls::pki_types::pem::PemObject::pem_slice_iter(&ca) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let b = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match cert {
        Some(name) => {
            use rustls::pki_types::pem::PemObject;
            let dir = creds.join(name);
            let chain = rustls::pki_types::CertificateDer::pem_file_iter(dir.join("client-cert.pem"))
                .unwrap()
                .collect::<Result<Vec<_>, _>>()
                .unwrap();
            let key = rustls::pki_types::PrivateKeyDer::from_pem_file(dir.join("client-key.pem")).unwrap();
            b.with_client_auth_cert(chain, key).unwrap()
        }
        None => b.with_no_client_auth(),
    };
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, s);
    // The first option is where a refused handshake shows.
    let mut go = 0u32.to_be_bytes().to_vec();
    go.extend_from_slice(&0u16.to_be_bytes());
    let mut opt = IHAVEOPT.to_be_bytes().to_vec();
    opt.extend_from_slice(&OPT_GO.to_be_bytes());
    opt.extend_from_slice(&(go.len() as u32).to_be_bytes());
    opt.extend_from_slice(&go);
    tls.write_all(&opt).map_err(|e| e.to_string())?;
    tls.flush().map_err(|e| e.to_string())?;
    let mut first = [0u8; 1];
    // TLS 1.3 client authentication fails after the client's Finished: the
    // server's alert arrives as the answer to the first read.
    let n = tls.read(&mut first).map_err(|e| e.to_string())?;
    if n == 0 {
        return Err("the server closed the TLS session".into());
    }
    let mut rest = [0u8; 19];
    tls.read_exact(&mut rest).unwrap();
    let mut h = first.to_vec();
    h.extend_from_slice(&rest);
    loop {
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
        let mut data = vec![0u8; len];
        tls.read_exact(&mut data).unwrap();
        if kind == REP_ACK {
            break;
        }
        assert_eq!(kind, REP_INFO, "GO inside TLS: {}", String::from_utf8_lossy(&data));
        tls.read_exact(&mut h).unwrap();
    }
    // Compact requests and simple replies: extended headers did not survive.
    let mut out = Vec::new();
    for (cookie, offset) in [(1u64, 0u64), (2, 4096)] {
        tls.write_all(&request_bytes(CMD_READ, 0, cookie, offset, 4096)).unwrap();
        let (err, c) = read_simple_reply(&mut tls).unwrap();
        assert_eq!((err, c), (0, cookie));
        let mut d = vec![0u8; 4096];
        tls.read_exact(&mut d).unwrap();
        out.extend(d);
    }
    tls.write_all(&request_bytes(CMD_DISC, 0, 3, 0, 0)).unwrap();
    let _ = tls.flush();
    Ok(out)
}
