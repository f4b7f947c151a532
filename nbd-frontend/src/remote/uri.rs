//! NBD URIs as libnbd writes them (the project's interface contract):
//!
//! - `nbd://HOST[:PORT]/EXPORT` — plain TCP (port 10809 by default);
//! - `nbds://HOST[:PORT]/EXPORT?tls-certificates=DIR` — TLS with X.509
//!   (`DIR/ca-cert.pem` verifies the server; `client-cert.pem` and
//!   `client-key.pem`, when present, identify us), or `?tls-psk-file=FILE`;
//! - `nbd+unix:///EXPORT?socket=PATH` (and `nbds+unix://`).
//!
//! The export name is the path without its leading slash, percent-decoded;
//! query values are percent-decoded too. An unknown query key is refused
//! rather than ignored: a misspelt `tls-certificates` must not quietly fall
//! back to something else.

use std::fmt;
use std::path::{Path, PathBuf};

/// The NBD port IANA assigned.
pub const DEFAULT_PORT: u16 = 10809;

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// `nbd://HOST:PORT`.
    #[allow(missing_docs)]
    Tcp { host: String, port: u16 },
    /// `nbd+unix://...?socket=PATH`.
    #[allow(missing_docs)]
    Unix { socket: PathBuf },
}

/// The credentials a TLS connection uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsCreds {
    /// A directory in the qemu/nbdkit layout (`ca-cert.pem`, optionally
    /// `client-cert.pem` and `client-key.pem`).
    X509 {
        /// The directory.
        dir: PathBuf,
    },
    /// A psktool-format key file (`identity:hexkey` lines).
    Psk {
        /// The key file.
        file: PathBuf,
        /// The identity to use (`tls-username`); the file's first one without it.
        username: Option<String>,
    },
}

/// A parsed NBD URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    /// Where the server listens.
    pub transport: Transport,
    /// The export's name.
    pub export: String,
    /// `Some` for the `nbds` schemes.
    pub tls: Option<TlsCreds>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
/// Why a URI cannot be used (what is wrong with it).
pub struct UriError(String);

fn err<T>(msg: impl Into<String>) -> Result<T, UriError> {
    Err(UriError(msg.into()))
}

/// True when `name` is meant as an NBD URI rather than a path.
pub fn is_nbd_uri(name: &str) -> bool {
    ["nbd://", "nbds://", "nbd+unix://", "nbds+unix://"].iter().any(|p| name.starts_with(p))
}

fn percent_decode(s: &str, what: &str) -> Result<String, UriError> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(h, 16).ok());
            let Some(v) = hex else { return err(format!("bad percent escape in the {what}")) };
            out.push(v);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).or_else(|_| err(format!("the {what} is not UTF-8")))
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for &c in s.as_bytes() {
        if c.is_ascii_alphanumeric() || b"-._~/:@!$&'()*+,;=".contains(&c) {
            out.push(c as char);
        } else {
            out.push_str(&format!("%{c:02X}"));
        }
    }
    out
}

impl NbdUri {
    /// Parses one of the forms above.
    pub fn parse(s: &str) -> Result<NbdUri, UriError> {
        let Some((scheme, rest)) = s.split_once("://") else { return err("not a URI (no scheme://)") };
        let (tls, unix) = match scheme {
            "nbd" => (false, false),
            "nbds" => (true, false),
            "nbd+unix" => (false, true),
            "nbds+unix" => (true, true),
            _ => return err(format!("unknown scheme {scheme:?} (nbd, nbds, nbd+unix, nbds+unix)")),
        };
        let (before_query, query) = match rest.split_once('?') {
            Some((a, q)) => (a, Some(q)),
            None => (rest, None),
        };
        if before_query.contains('#') || query.is_some_and(|q| q.contains('#')) {
            return err("a fragment (#...) has no meaning in an NBD URI");
        }
        let (authority, path) = match before_query.find('/') {
            Some(i) => (&before_query[..i], &before_query[i..]),
            None => (before_query, ""),
        };
        let export = percent_decode(path.strip_prefix('/').unwrap_or(path), "export name")?;
        let (username, hostport) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(percent_decode(u, "user name")?), h),
            None => (None, authority),
        };
        if username.as_deref().is_some_and(|u| u.contains(':')) {
            return err("a password in the URI is not supported (and would be a secret in the state file)");
        }
        let mut socket = None;
        let mut certs = None;
        let mut psk = None;
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = percent_decode(v, k)?;
            match k {
                "socket" => socket = Some(PathBuf::from(v)),
                "tls-certificates" => certs = Some(PathBuf::from(v)),
                "tls-psk-file" => psk = Some(PathBuf::from(v)),
                _ => return err(format!("unknown query parameter {k:?} (socket, tls-certificates, tls-psk-file)")),
            }
        }
        let transport = if unix {
            if !hostport.is_empty() {
                return err(format!("{scheme}:// takes no host ({hostport:?}); the socket is ?socket=PATH"));
            }
            match socket {
                Some(p) if !p.as_os_str().is_empty() => Transport::Unix { socket: p },
                _ => return err(format!("{scheme}:// needs ?socket=PATH")),
            }
        } else {
            if socket.is_some() {
                return err(format!("?socket= belongs to nbd+unix://, not {scheme}://"));
            }
            let (host, port) = split_host_port(hostport)?;
            Transport::Tcp { host, port }
        };
        let tls = match (tls, certs, psk) {
            (false, None, None) => None,
            (false, _, _) => return err(format!("TLS parameters need the nbds scheme, not {scheme}://")),
            (true, Some(_), Some(_)) => return err("give tls-certificates or tls-psk-file, not both"),
            (true, Some(dir), None) => Some(TlsCreds::X509 { dir }),
            (true, None, Some(file)) => Some(TlsCreds::Psk { file, username }),
            (true, None, None) => {
                return err(format!(
                    "{scheme}:// needs ?tls-certificates=DIR (ca-cert.pem verifies the server) or ?tls-psk-file=FILE"
                ))
            }
        };
        Ok(NbdUri { transport, export, tls })
    }

    /// Where the server is and which export, without credentials: what
    /// identifies the export in the state file and in messages.
    pub fn endpoint(&self) -> String {
        let scheme = match (&self.transport, self.tls.is_some()) {
            (Transport::Tcp { .. }, false) => "nbd",
            (Transport::Tcp { .. }, true) => "nbds",
            (Transport::Unix { .. }, false) => "nbd+unix",
            (Transport::Unix { .. }, true) => "nbds+unix",
        };
        let export = percent_encode(&self.export);
        match &self.transport {
            Transport::Tcp { host, port } if host.contains(':') => format!("{scheme}://[{host}]:{port}/{export}"),
            Transport::Tcp { host, port } => format!("{scheme}://{host}:{port}/{export}"),
            Transport::Unix { socket } => {
                format!("{scheme}:///{export}?socket={}", percent_encode(&socket.to_string_lossy()))
            }
        }
    }

    /// The host name TLS verifies the server's certificate against.
    pub(crate) fn tls_server_name(&self) -> &str {
        match &self.transport {
            Transport::Tcp { host, .. } => host,
            // A Unix socket has no host; qemu and libnbd use "localhost".
            Transport::Unix { .. } => "localhost",
        }
    }

    /// The same URI with relative file names made absolute against `cwd`.
    pub fn with_absolute_paths(mut self, cwd: &Path) -> NbdUri {
        let abs = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = cwd.join(&*p);
            }
        };
        if let Transport::Unix { socket } = &mut self.transport {
            abs(socket);
        }
        match &mut self.tls {
            Some(TlsCreds::X509 { dir }) => abs(dir),
            Some(TlsCreds::Psk { file, .. }) => abs(file),
            None => {}
        }
        self
    }
}

impl fmt::Display for NbdUri {
    /// The whole URI again, credentials' file names included (they are not
    /// secrets; the files are), so it can be reopened from what is printed.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.endpoint())?;
        let sep = if matches!(self.transport, Transport::Unix { .. }) { '&' } else { '?' };
        match &self.tls {
            Some(TlsCreds::X509 { dir }) => {
                write!(f, "{sep}tls-certificates={}", percent_encode(&dir.to_string_lossy()))
            }
            Some(TlsCreds::Psk { file, .. }) => {
                write!(f, "{sep}tls-psk-file={}", percent_encode(&file.to_string_lossy()))
            }
            None => Ok(()),
        }
    }
}

fn split_host_port(hp: &str) -> Result<(String, u16), UriError> {
    if hp.is_empty() {
        return err("no host");
    }
    let (host, port) = if let Some(rest) = hp.strip_prefix('[') {
        let Some((h, after)) = rest.split_once(']') else { return err("unclosed [ in the host") };
        match after {
            "" => (h.to_string(), None),
            p => match p.strip_prefix(':') {
                Some(p) => (h.to_string(), Some(p)),
                None => return err(format!("junk after ]: {after:?}")),
            },
        }
    } else {
        match hp.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') => (h.to_string(), Some(p)),
            Some(_) => return err("an IPv6 address must be in brackets: nbd://[::1]:10809/"),
            None => (hp.to_string(), None),
        }
    };
    let host = percent_decode(&host, "host")?;
    if host.is_empty() {
        return err("no host");
    }
    let port = match port {
        None | Some("") => DEFAULT_PORT,
        Some(p) => p.parse::<u16>().ok().filter(|&p| p != 0).ok_or_else(|| UriError(format!("bad port {p:?}")))?,
    };
    Ok((host, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_contract_forms_parse() {
        let u = NbdUri::parse("nbd://example.com/disk").unwrap();
        assert_eq!(u.transport, Transport::Tcp { host: "example.com".into(), port: DEFAULT_PORT });
        assert_eq!((u.export.as_str(), u.tls.is_none()), ("disk", true));
        let u = NbdUri::parse("nbd://10.0.0.2:10810").unwrap();
        assert_eq!(u.transport, Transport::Tcp { host: "10.0.0.2".into(), port: 10810 });
        assert_eq!(u.export, "");
        let u = NbdUri::parse("nbd://[::1]:7/a%20b").unwrap();
        assert_eq!(u.transport, Transport::Tcp { host: "::1".into(), port: 7 });
        assert_eq!(u.export, "a b");
        assert_eq!(u.endpoint(), "nbd://[::1]:7/a%20b");
        let u = NbdUri::parse("nbd+unix:///exp?socket=/run/x.sock").unwrap();
        assert_eq!(u.transport, Transport::Unix { socket: "/run/x.sock".into() });
        assert_eq!(u.export, "exp");
        let u = NbdUri::parse("nbds://h/e?tls-certificates=/etc/pki/x").unwrap();
        assert_eq!(u.tls, Some(TlsCreds::X509 { dir: "/etc/pki/x".into() }));
        assert_eq!(u.to_string(), "nbds://h:10809/e?tls-certificates=/etc/pki/x");
        let u = NbdUri::parse("nbds://alice@h/e?tls-psk-file=/k").unwrap();
        assert_eq!(u.tls, Some(TlsCreds::Psk { file: "/k".into(), username: Some("alice".into()) }));
        assert_eq!(u.endpoint(), "nbds://h:10809/e", "no credentials in the endpoint");
    }

    #[test]
    fn mistakes_are_refused_with_a_reason() {
        for (uri, why) in [
            ("http://h/e", "unknown scheme"),
            ("nbd://h/e?tls-certifcates=/x", "unknown query parameter"),
            ("nbd://h/e?tls-certificates=/x", "need the nbds scheme"),
            ("nbds://h/e", "needs ?tls-certificates"),
            ("nbd+unix:///e", "needs ?socket"),
            ("nbd+unix://h/e?socket=/s", "takes no host"),
            ("nbd://h:0/e", "bad port"),
            ("nbd://h:99999/e", "bad port"),
            ("nbd:///e", "no host"),
            ("nbd://::1/e", "brackets"),
            ("nbd://u:pw@h/e", "password"),
            ("nbd://h/%zz", "percent"),
        ] {
            let e = NbdUri::parse(uri).unwrap_err().to_string();
            assert!(e.contains(why), "{uri}: {e}");
        }
        assert!(is_nbd_uri("nbd+unix:///?socket=/s") && !is_nbd_uri("/dev/sda") && !is_nbd_uri("nbd.img"));
    }

    #[test]
    fn relative_file_names_become_absolute() {
        let u = NbdUri::parse("nbds+unix:///e?socket=s.sock&tls-certificates=pki").unwrap();
        let u = u.with_absolute_paths(Path::new("/work"));
        assert_eq!(u.to_string(), "nbds+unix:///e?socket=/work/s.sock&tls-certificates=/work/pki");
        assert_eq!(NbdUri::parse(&u.to_string()).unwrap(), u, "what is printed parses back");
    }
}
