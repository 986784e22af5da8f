//! Image references as users write them (`--image`), parsed and validated at the edge:
//! `host`, `dir:PATH`, `oci:PATH[:TAG]`, `docker-archive:PATH`, `im-<24 hex>` and registry
//! references `[REGISTRY/]REPO[:TAG|@sha256:…]` with the grammar of the distribution spec.
//!
//! Registry references are normalized the way docker does it: no registry means `docker.io`,
//! a single-component name on docker.io gets `library/`, no tag and no digest means `latest`.
//! The first component is a registry when it contains `.` or `:`, is `localhost`, or has an
//! upper-case letter (a repository never does).

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::store::{Digest, ImageId};

/// The registry used when a reference names none.
pub const DEFAULT_REGISTRY: &str = "docker.io";
/// The tag used when a reference names neither tag nor digest.
pub const DEFAULT_TAG: &str = "latest";
/// Longest repository name (registry included), as docker enforces.
const MAX_NAME_LEN: usize = 255;

/// An image a sandbox can start from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reference {
    /// The host's /usr and friends read-only with a minimal /etc.
    Host,
    /// A rootfs directory on the host (absolute path).
    Dir(PathBuf),
    /// An OCI image layout directory; `tag` matches `org.opencontainers.image.ref.name`.
    OciLayout { path: PathBuf, tag: Option<String> },
    /// A `docker save` (or `skopeo copy … docker-archive:`) tarball.
    DockerArchive { path: PathBuf },
    /// An image built, snapshotted or imported into the store.
    Built(ImageId),
    /// An image in a registry.
    Registry(RegistryRef),
}

/// A normalized registry reference.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RegistryRef {
    /// Host with optional port: `docker.io`, `127.0.0.1:5000`, `[::1]:5000`.
    pub registry: String,
    /// Path components: `library/busybox`, `test/busybox`.
    pub repository: String,
    /// `None` only when a digest was given without a tag.
    pub tag: Option<String>,
    /// Pins the manifest (or index) when given.
    pub digest: Option<Digest>,
}

/// A reference that does not parse; says which and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid image reference {reference:?}: {reason}")]
pub struct ReferenceError {
    pub reference: String,
    pub reason: String,
}

impl RegistryRef {
    /// The registry host without its port (`127.0.0.1`, `::1`, `docker.io`).
    pub fn host(&self) -> &str {
        host_of(&self.registry)
    }

    /// Whether the registry is on this machine (127.0.0.0/8, ::1, localhost): the only
    /// registries talked to over plain HTTP.
    pub fn is_loopback(&self) -> bool {
        is_loopback_host(self.host())
    }

    /// `registry/repository` without tag or digest.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// The same image pinned to a digest (the tag is kept for display).
    pub fn with_digest(&self, digest: Digest) -> RegistryRef {
        RegistryRef {
            digest: Some(digest),
            ..self.clone()
        }
    }
}

fn host_of(registry: &str) -> &str {
    if let Some(rest) = registry.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    registry.split(':').next().unwrap_or(registry)
}

/// Whether a host name or address is loopback: `localhost`, `127.0.0.0/8`, `::1`.
pub fn is_loopback_host(host: &str) -> bool {
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    match host.parse::<std::net::IpAddr>() {
        Ok(ip) => ip.is_loopback(),
        Err(_) => false,
    }
}

impl fmt::Display for RegistryRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Host => f.write_str("host"),
            Reference::Dir(p) => write!(f, "dir:{}", p.display()),
            Reference::OciLayout { path, tag: None } => write!(f, "oci:{}", path.display()),
            Reference::OciLayout { path, tag: Some(t) } => write!(f, "oci:{}:{t}", path.display()),
            Reference::DockerArchive { path } => write!(f, "docker-archive:{}", path.display()),
            Reference::Built(id) => write!(f, "{id}"),
            Reference::Registry(r) => write!(f, "{r}"),
        }
    }
}

impl FromStr for Reference {
    type Err = ReferenceError;
    fn from_str(s: &str) -> Result<Self, ReferenceError> {
        Reference::parse(s)
    }
}

impl FromStr for RegistryRef {
    type Err = ReferenceError;
    fn from_str(s: &str) -> Result<Self, ReferenceError> {
        parse_registry(s).map_err(|reason| ReferenceError {
            reference: s.to_string(),
            reason,
        })
    }
}

impl Reference {
    /// Parse a reference; local paths must be absolute (see [`Reference::parse_relative_to`]).
    pub fn parse(s: &str) -> Result<Reference, ReferenceError> {
        parse(s, None).map_err(|reason| ReferenceError {
            reference: s.to_string(),
            reason,
        })
    }

    /// Parse a reference typed by a user in `cwd`: relative `dir:`, `oci:` and
    /// `docker-archive:` paths are taken relative to it (a CLI resolves them before sending a
    /// reference to the daemon, whose working directory is not the user's).
    pub fn parse_relative_to(s: &str, cwd: &Path) -> Result<Reference, ReferenceError> {
        parse(s, Some(cwd)).map_err(|reason| ReferenceError {
            reference: s.to_string(),
            reason,
        })
    }

    /// Whether using this image may need the network.
    pub fn is_remote(&self) -> bool {
        matches!(self, Reference::Registry(_))
    }
}

fn local_path(kind: &str, p: &str, cwd: Option<&Path>) -> Result<PathBuf, String> {
    if p.is_empty() {
        return Err(format!("{kind}: needs a path"));
    }
    if p.contains('\0') {
        return Err("a path cannot contain NUL".into());
    }
    let path = PathBuf::from(p);
    let path = match cwd {
        Some(cwd) if path.is_relative() => cwd.join(path),
        _ => path,
    };
    if !path.is_absolute() {
        return Err(format!("the {kind}: path must be absolute"));
    }
    if path
        .components()
        .any(|c| c == std::path::Component::ParentDir)
    {
        return Err(format!("the {kind}: path must not contain `..`"));
    }
    Ok(path)
}

fn parse(s: &str, cwd: Option<&Path>) -> Result<Reference, String> {
    if s.is_empty() {
        return Err("empty".into());
    }
    if s == "host" {
        return Ok(Reference::Host);
    }
    if let Some(p) = s.strip_prefix("dir:") {
        return Ok(Reference::Dir(local_path("dir", p, cwd)?));
    }
    if let Some(rest) = s.strip_prefix("oci:") {
        // Like skopeo's oci transport: the path ends at the first `:`.
        let (p, tag) = match rest.split_once(':') {
            Some((p, t)) => (p, Some(t)),
            None => (rest, None),
        };
        let path = local_path("oci", p, cwd)?;
        if let Some(t) = tag {
            validate_oci_ref_name(t)?;
        }
        return Ok(Reference::OciLayout {
            path,
            tag: tag.map(str::to_string),
        });
    }
    if let Some(p) = s.strip_prefix("docker-archive:") {
        return Ok(Reference::DockerArchive {
            path: local_path("docker-archive", p, cwd)?,
        });
    }
    if let Some(rest) = s.strip_prefix("im-") {
        if !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_hexdigit()) {
            return ImageId::parse(s)
                .map(Reference::Built)
                .map_err(|_| "an image id is im- followed by 24 lowercase hex digits".into());
        }
    }
    if s.contains("://") {
        return Err(
            "a URL is not an image reference; write [REGISTRY/]REPO[:TAG|@sha256:DIGEST]".into(),
        );
    }
    parse_registry(s).map(Reference::Registry)
}

/// `org.opencontainers.image.ref.name`: `component ("/" component)*` with
/// `component ::= alphanum (separator alphanum)*`, `separator ::= [-._:@+] | "--"`.
pub(crate) fn validate_oci_ref_name(t: &str) -> Result<(), String> {
    let bad = || {
        format!("{t:?} is not a valid OCI ref.name (letters, digits, and -._:@+ between them, / between components)")
    };
    if t.is_empty() {
        return Err("the oci: tag after `:` is empty".into());
    }
    for comp in t.split('/') {
        let b = comp.as_bytes();
        if b.is_empty() || !b[0].is_ascii_alphanumeric() || !b[b.len() - 1].is_ascii_alphanumeric()
        {
            return Err(bad());
        }
        let mut i = 0;
        while i < b.len() {
            if b[i].is_ascii_alphanumeric() {
                i += 1;
                continue;
            }
            // A separator: one of -._:@+ or "--", followed by an alphanumeric.
            let len = if b[i] == b'-' && b.get(i + 1) == Some(&b'-') {
                2
            } else if b"-._:@+".contains(&b[i]) {
                1
            } else {
                return Err(bad());
            };
            if !b.get(i + len).is_some_and(|c| c.is_ascii_alphanumeric()) {
                return Err(bad());
            }
            i += len;
        }
    }
    Ok(())
}

fn parse_registry(s: &str) -> Result<RegistryRef, String> {
    let (name_tag, digest) = match s.split_once('@') {
        Some((n, d)) => (
            n,
            Some(Digest::parse(d).map_err(|e| format!("bad digest {d:?}: {}", e.reason))?),
        ),
        None => (s, None),
    };
    // The tag is after the last `:` that follows the last `/` (a registry port is before it).
    let last_slash = name_tag.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match name_tag[last_slash..].rfind(':') {
        Some(i) => (
            &name_tag[..last_slash + i],
            Some(&name_tag[last_slash + i + 1..]),
        ),
        None => (name_tag, None),
    };
    if let Some(t) = tag {
        validate_tag(t)?;
    }
    if name.is_empty() {
        return Err("no repository name".into());
    }
    let (mut registry, mut repository) = match name.split_once('/') {
        Some((first, rest))
            if first.contains(['.', ':'])
                || first == "localhost"
                || first.bytes().any(|b| b.is_ascii_uppercase()) =>
        {
            validate_registry(first)?;
            (first.to_string(), rest.to_string())
        }
        _ => (DEFAULT_REGISTRY.to_string(), name.to_string()),
    };
    if registry == "index.docker.io" || registry == "registry-1.docker.io" {
        registry = DEFAULT_REGISTRY.to_string();
    }
    validate_repository(&repository)?;
    if registry == DEFAULT_REGISTRY && !repository.contains('/') {
        repository = format!("library/{repository}");
    }
    if registry.len() + 1 + repository.len() > MAX_NAME_LEN {
        return Err(format!(
            "the repository name is longer than {MAX_NAME_LEN} characters"
        ));
    }
    let tag = match (tag, &digest) {
        (Some(t), _) => Some(t.to_string()),
        (None, Some(_)) => None,
        (None, None) => Some(DEFAULT_TAG.to_string()),
    };
    Ok(RegistryRef {
        registry,
        repository,
        tag,
        digest,
    })
}

/// `[\w][\w.-]{0,127}`.
fn validate_tag(t: &str) -> Result<(), String> {
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let b = t.as_bytes();
    if b.is_empty() {
        return Err("the tag after `:` is empty".into());
    }
    if b.len() > 128 {
        return Err(format!("tag {t:?} is longer than 128 characters"));
    }
    if !word(b[0]) || !b.iter().all(|&c| word(c) || c == b'.' || c == b'-') {
        return Err(format!(
            "tag {t:?} may only hold letters, digits, `_`, `.` and `-`, and not start with `.` or `-`"
        ));
    }
    Ok(())
}

/// `path-component ("/" path-component)*`, each `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`.
fn validate_repository(repo: &str) -> Result<(), String> {
    for comp in repo.split('/') {
        let b = comp.as_bytes();
        if b.is_empty() {
            return Err(format!("repository {repo:?} has an empty path component"));
        }
        if b.iter().any(|c| c.is_ascii_uppercase()) {
            return Err(format!("repository {repo:?} must be lower case"));
        }
        let alnum = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
        let bad = || {
            format!(
                "repository component {comp:?} must be lower-case letters and digits, \
                 separated by one `.`, one or two `_`, or `-`s"
            )
        };
        if !alnum(&b[0]) || !alnum(&b[b.len() - 1]) {
            return Err(bad());
        }
        let mut i = 0;
        while i < b.len() {
            if alnum(&b[i]) {
                i += 1;
                continue;
            }
            let start = i;
            match b[i] {
                b'.' => i += 1,
                b'_' => {
                    i += 1;
                    if b.get(i) == Some(&b'_') {
                        i += 1;
                    }
                }
                b'-' => {
                    while b.get(i) == Some(&b'-') {
                        i += 1;
                    }
                }
                _ => return Err(bad()),
            }
            if i == start || !b.get(i).is_some_and(alnum) {
                return Err(bad());
            }
        }
    }
    Ok(())
}

/// `host[:port]`, host a dotted domain name (letters, digits, inner `-`) or `[ipv6]`.
fn validate_registry(r: &str) -> Result<(), String> {
    let bad = |why: &str| format!("registry {r:?} is not valid: {why}");
    let (host, port) = if let Some(rest) = r.strip_prefix('[') {
        let (ip, after) = rest.split_once(']').ok_or_else(|| bad("unclosed `[`"))?;
        if ip.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(bad("not an IPv6 address in brackets"));
        }
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or_else(|| bad("junk after `]`"))?),
        };
        (None, port)
    } else {
        match r.split_once(':') {
            Some((h, p)) => (Some(h), Some(p)),
            None => (Some(r), None),
        }
    };
    if let Some(p) = port {
        if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) || p.parse::<u16>().is_err() {
            return Err(bad("the port must be a number from 1 to 65535"));
        }
        if p.parse::<u16>() == Ok(0) {
            return Err(bad("the port must be a number from 1 to 65535"));
        }
    }
    if let Some(h) = host {
        if h.is_empty() {
            return Err(bad("empty host"));
        }
        for label in h.split('.') {
            let b = label.as_bytes();
            if b.is_empty()
                || !b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
                || b[0] == b'-'
                || b[b.len() - 1] == b'-'
            {
                return Err(bad(
                    "host labels are letters, digits and inner `-`, separated by `.`",
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(s: &str) -> RegistryRef {
        match Reference::parse(s) {
            Ok(Reference::Registry(r)) => r,
            other => panic!("{s}: {other:?}"),
        }
    }

    fn bad(s: &str, why: &str) {
        let e = Reference::parse(s).expect_err(s);
        assert_eq!(e.reference, s);
        let msg = e.to_string();
        assert!(msg.contains(&format!("{s:?}")), "{msg}");
        assert!(msg.contains(why), "{s}: {msg} lacks {why:?}");
    }

    const HEX: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn local_references() {
        assert_eq!(Reference::parse("host").unwrap(), Reference::Host);
        assert_eq!(
            Reference::parse("dir:/srv/rootfs").unwrap(),
            Reference::Dir("/srv/rootfs".into())
        );
        assert_eq!(
            Reference::parse("oci:/srv/layout").unwrap(),
            Reference::OciLayout {
                path: "/srv/layout".into(),
                tag: None
            }
        );
        assert_eq!(
            Reference::parse("oci:/srv/layout:v1.2").unwrap(),
            Reference::OciLayout {
                path: "/srv/layout".into(),
                tag: Some("v1.2".into())
            }
        );
        assert_eq!(
            Reference::parse("oci:/srv/layout:test/busybox:1").unwrap(),
            Reference::OciLayout {
                path: "/srv/layout".into(),
                tag: Some("test/busybox:1".into())
            }
        );
        assert_eq!(
            Reference::parse("docker-archive:/tmp/a.tar").unwrap(),
            Reference::DockerArchive {
                path: "/tmp/a.tar".into()
            }
        );
        let id = format!("im-{}", &HEX[..24]);
        assert_eq!(
            Reference::parse(&id).unwrap(),
            Reference::Built(ImageId::parse(&id).unwrap())
        );
        for s in [
            "host",
            "dir:/a/b",
            "oci:/a:t",
            "oci:/a",
            "docker-archive:/x.tar",
            id.as_str(),
        ] {
            assert_eq!(Reference::parse(s).unwrap().to_string(), s);
        }
        assert_eq!(
            Reference::parse_relative_to("oci:img:t", Path::new("/home/u")).unwrap(),
            Reference::OciLayout {
                path: "/home/u/img".into(),
                tag: Some("t".into())
            }
        );
        assert_eq!(
            Reference::parse_relative_to("dir:/abs", Path::new("/home/u")).unwrap(),
            Reference::Dir("/abs".into())
        );
    }

    #[test]
    fn bad_local_references() {
        bad("", "empty");
        bad("dir:", "needs a path");
        bad("dir:relative", "absolute");
        bad("dir:/a/../b", "..");
        bad("oci:rel:tag", "absolute");
        bad("oci:/a:", "empty");
        bad("oci:/a:-x", "ref.name");
        bad("oci:/a:a b", "ref.name");
        bad("docker-archive:x.tar", "absolute");
        bad("im-abc", "24 lowercase hex");
        bad(&format!("im-{}", &HEX[..25]), "24 lowercase hex");
        bad(
            &format!("im-{}", HEX[..24].to_uppercase()),
            "24 lowercase hex",
        );
        bad("docker://busybox", "URL");
        bad("https://example.com/x", "URL");
    }

    #[test]
    fn registry_references_are_normalized() {
        let r = reg("busybox");
        assert_eq!(
            (
                r.registry.as_str(),
                r.repository.as_str(),
                r.tag.as_deref(),
                r.digest.as_ref()
            ),
            ("docker.io", "library/busybox", Some("latest"), None)
        );
        assert_eq!(r.to_string(), "docker.io/library/busybox:latest");
        assert!(!r.is_loopback());

        let r = reg("127.0.0.1:5000/test/busybox:1");
        assert_eq!(r.registry, "127.0.0.1:5000");
        assert_eq!(r.repository, "test/busybox");
        assert_eq!(r.tag.as_deref(), Some("1"));
        assert_eq!(r.host(), "127.0.0.1");
        assert!(r.is_loopback());
        assert_eq!(r.to_string(), "127.0.0.1:5000/test/busybox:1");

        let r = reg(&format!("ubuntu@sha256:{HEX}"));
        assert_eq!(r.repository, "library/ubuntu");
        assert_eq!(r.tag, None);
        assert_eq!(r.digest.as_ref().unwrap().hex(), HEX);
        assert_eq!(
            r.to_string(),
            format!("docker.io/library/ubuntu@sha256:{HEX}")
        );

        let r = reg(&format!("localhost:5000/a/b:v1@sha256:{HEX}"));
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str(), r.tag.as_deref()),
            ("localhost:5000", "a/b", Some("v1"))
        );
        assert!(r.is_loopback());
        assert!(r.digest.is_some());

        let cases = [
            ("user/app", "docker.io", "user/app", "latest"),
            (
                "docker.io/busybox",
                "docker.io",
                "library/busybox",
                "latest",
            ),
            (
                "index.docker.io/library/busybox:1.36",
                "docker.io",
                "library/busybox",
                "1.36",
            ),
            ("localhost/foo", "localhost", "foo", "latest"),
            ("localhost:5000/foo:bar", "localhost:5000", "foo", "bar"),
            (
                "ghcr.io/org/team/app:v1.2.3-rc_1",
                "ghcr.io",
                "org/team/app",
                "v1.2.3-rc_1",
            ),
            (
                "quay.io/a.b/c__d/e--f:T_1",
                "quay.io",
                "a.b/c__d/e--f",
                "T_1",
            ),
            ("127.0.0.2:1/x", "127.0.0.2:1", "x", "latest"),
            ("[::1]:5000/x/y:z", "[::1]:5000", "x/y", "z"),
            ("Registry/x", "Registry", "x", "latest"),
            (
                "my-reg.example.com:443/x",
                "my-reg.example.com:443",
                "x",
                "latest",
            ),
            ("a1/b2/c3", "docker.io", "a1/b2/c3", "latest"),
        ];
        for (s, registry, repo, tag) in cases {
            let r = reg(s);
            assert_eq!(
                (r.registry.as_str(), r.repository.as_str(), r.tag.as_deref()),
                (registry, repo, Some(tag)),
                "{s}"
            );
            // Display is a fixed point of parsing.
            assert_eq!(reg(&r.to_string()), r, "{s}");
        }
        assert!(reg("[::1]:5000/x").is_loopback());
        assert!(reg("127.9.9.9:80/x").is_loopback());
        assert!(!reg("128.0.0.1:80/x").is_loopback());
        assert!(!reg("localhost.example.com/x").is_loopback());
        assert!(!reg("10.0.0.1:5000/x").is_loopback());
    }

    #[test]
    fn bad_registry_references() {
        bad("Busybox", "lower case");
        bad("docker.io/Library/busybox", "lower case");
        bad("127.0.0.1:5000/Test/busybox:1", "lower case");
        bad("busybox@sha256:abc", "bad digest");
        bad(&format!("busybox@sha512:{HEX}"), "only sha256");
        bad(
            &format!("busybox@sha256:{}", HEX.to_uppercase()),
            "bad digest",
        );
        bad("busybox@", "bad digest");
        bad("busybox:", "tag after `:` is empty");
        bad("busybox:-x", "tag");
        bad(&format!("busybox:{}", "a".repeat(129)), "128");
        bad("busybox:a/b", "port"); // `busybox:a` then reads as a registry with a bad port
        bad("a//b", "empty path component");
        bad("/busybox", "empty path component");
        bad("busybox/", "empty path component");
        bad("a-/b", "component");
        bad("a..b", "component");
        bad("a___b", "component");
        bad("-a", "component");
        bad("a b", "component");
        bad("127.0.0.1:99999/x", "port");
        bad("127.0.0.1:/x", "port");
        bad("127.0.0.1:0/x", "port");
        bad("bad_host.com/x", "host labels");
        bad("-bad.com/x", "host labels");
        bad("[::1/x", "unclosed");
        bad("[nope]:5/x", "IPv6");
        bad(":5000/x", "empty host");
        bad(&format!("reg.io/{}", "a".repeat(260)), "255");
    }
}
