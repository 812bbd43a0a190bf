//! NBD URIs, as qemu and libnbd write them: `nbd://host[:port][/export]` (TCP, port 10809 by
//! default) and `nbd+unix:///export?socket=PATH` (a Unix socket). TLS (`nbds`) is refused with
//! a message, never silently dropped.

use std::fmt;
use std::path::PathBuf;

/// The IANA port of NBD.
pub const DEFAULT_PORT: u16 = 10809;

/// Where the server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Tcp { host: String, port: u16 },
    Unix(PathBuf),
}

/// A parsed NBD URI.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NbdUri {
    pub endpoint: Endpoint,
    /// The export name (may be empty: the server's default export).
    pub export: String,
}

impl fmt::Display for NbdUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.endpoint {
            Endpoint::Tcp { host, port } if host.contains(':') => {
                write!(f, "nbd://[{host}]:{port}/{}", self.export)
            }
            Endpoint::Tcp { host, port } => write!(f, "nbd://{host}:{port}/{}", self.export),
            Endpoint::Unix(p) => write!(f, "nbd+unix:///{}?socket={}", self.export, p.display()),
        }
    }
}

/// Whether `s` names an NBD source (a URI) rather than a file or device path.
pub fn is_nbd_uri(s: &str) -> bool {
    ["nbd:", "nbd+unix:", "nbds:", "nbds+unix:"]
        .iter()
        .any(|p| s.starts_with(p))
}

/// Parses an NBD URI; the error says what is wrong with it.
pub fn parse(s: &str) -> Result<NbdUri, String> {
    let (scheme, rest) = s.split_once("://").ok_or_else(|| {
        format!("{s}: not an NBD URI (nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH)")
    })?;
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, ""),
    };
    let export =
        percent_decode(path).ok_or_else(|| format!("{s}: bad %-escape in the export name"))?;
    let params: Vec<(&str, &str)> = query
        .map(|q| {
            q.split('&')
                .filter(|p| !p.is_empty())
                .map(|p| p.split_once('=').unwrap_or((p, "")))
                .collect()
        })
        .unwrap_or_default();
    match scheme {
        "nbds" | "nbds+unix" => Err(format!(
            "{s}: TLS (nbds) is not supported; serve the image without TLS on a trusted network \
             or a Unix socket"
        )),
        "nbd" => {
            if let Some((k, _)) = params.first() {
                return Err(format!("{s}: unknown parameter {k:?} for nbd://"));
            }
            let (host, port) = split_host_port(authority)
                .ok_or_else(|| format!("{s}: bad host or port {authority:?}"))?;
            if host.is_empty() {
                return Err(format!("{s}: no host (nbd://HOST[:PORT]/EXPORT)"));
            }
            Ok(NbdUri {
                endpoint: Endpoint::Tcp { host, port },
                export,
            })
        }
        "nbd+unix" => {
            if !authority.is_empty() {
                return Err(format!(
                    "{s}: nbd+unix takes no host (nbd+unix:///EXPORT?socket=PATH)"
                ));
            }
            let mut socket = None;
            for (k, v) in params {
                match k {
                    "socket" => {
                        let v = percent_decode(v)
                            .ok_or_else(|| format!("{s}: bad %-escape in the socket path"))?;
                        socket = Some(PathBuf::from(v));
                    }
                    _ => return Err(format!("{s}: unknown parameter {k:?} for nbd+unix://")),
                }
            }
            let socket = socket
                .filter(|p| !p.as_os_str().is_empty())
                .ok_or_else(|| format!("{s}: no socket (nbd+unix:///EXPORT?socket=PATH)"))?;
            Ok(NbdUri {
                endpoint: Endpoint::Unix(socket),
                export,
            })
        }
        other => Err(format!(
            "{s}: unknown scheme {other:?} (nbd:// or nbd+unix://)"
        )),
    }
}

/// `host`, `host:port`, `[v6]` or `[v6]:port`.
fn split_host_port(a: &str) -> Option<(String, u16)> {
    if let Some(v6) = a.strip_prefix('[') {
        let (host, after) = v6.split_once(']')?;
        let port = match after {
            "" => DEFAULT_PORT,
            p => p.strip_prefix(':')?.parse().ok()?,
        };
        return Some((host.to_string(), port));
    }
    match a.rsplit_once(':') {
        Some((h, p)) => Some((h.to_string(), p.parse().ok()?)),
        None => Some((a.to_string(), DEFAULT_PORT)),
    }
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(host: &str, port: u16, export: &str) -> NbdUri {
        NbdUri {
            endpoint: Endpoint::Tcp {
                host: host.into(),
                port,
            },
            export: export.into(),
        }
    }

    #[test]
    fn uris_in_qemus_and_libnbds_forms_parse() {
        assert_eq!(parse("nbd://localhost"), Ok(tcp("localhost", 10809, "")));
        assert_eq!(parse("nbd://h:1234/disk"), Ok(tcp("h", 1234, "disk")));
        assert_eq!(parse("nbd://[::1]:99/a%20b"), Ok(tcp("::1", 99, "a b")));
        assert_eq!(parse("nbd://[fe80::1]/x"), Ok(tcp("fe80::1", 10809, "x")));
        assert_eq!(
            parse("nbd+unix:///img?socket=/run/s.sock"),
            Ok(NbdUri {
                endpoint: Endpoint::Unix("/run/s.sock".into()),
                export: "img".into()
            })
        );
        assert_eq!(
            parse("nbd+unix://?socket=/s").map(|u| u.export),
            Ok(String::new())
        );
        let u = parse("nbd+unix:///e?socket=/tmp/x").expect("parse");
        assert_eq!(parse(&u.to_string()), Ok(u));
        assert!(is_nbd_uri("nbd://x") && is_nbd_uri("nbd+unix:///?socket=/s"));
        assert!(!is_nbd_uri("/dev/nbd0") && !is_nbd_uri("nbd.img"));
    }

    #[test]
    fn bad_uris_are_refused_with_the_reason() {
        for (uri, says) in [
            ("nbds://h/x", "TLS"),
            ("nbds+unix:///x?socket=/s", "TLS"),
            ("nbd+unix:///x", "no socket"),
            ("nbd+unix://h/x?socket=/s", "no host"),
            ("nbd://h:port/x", "bad host or port"),
            ("nbd:///x", "no host"),
            ("nbd://h/x?tls=on", "unknown parameter"),
            ("nbd://h/%zz", "%-escape"),
            ("http://h/x", "unknown scheme"),
            ("nbd:h", "not an NBD URI"),
        ] {
            match parse(uri) {
                Ok(u) => panic!("{uri} parsed as {u:?}"),
                Err(e) => assert!(e.contains(says), "{uri}: {e}"),
            }
        }
    }
}
