//! Making certificates (rcgen): a cluster's CA, and node, operator and client certificates
//! signed by it, as PEM files in one directory. Used by `tally certs` for real deployments,
//! by `tally dev` for its throwaway cluster, and by tests.
//!
//! Files in the directory: `ca.pem` and `ca.key`; `node-<id>.pem`/`.key`,
//! `operator-<name>.pem`/`.key`, `client-<name>.pem`/`.key`. Keys are written mode 0600, and
//! an existing file is never overwritten.

use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, SanType,
};

use super::roles::Role;

/// How long a CA made here is valid.
pub const CA_DAYS: i64 = 10 * 365;
/// How long a node, operator or client certificate made here is valid.
pub const LEAF_DAYS: i64 = 365;

pub const CA_CERT: &str = "ca.pem";
pub const CA_KEY: &str = "ca.key";

/// The file names of a role's certificate and key in a certificates directory.
pub fn file_names(role: &Role) -> (String, String) {
    let stem = match role {
        Role::Node(id) => format!("node-{id}"),
        Role::Operator(name) => format!("operator-{name}"),
        Role::Client(name) => format!("client-{name}"),
        Role::Anonymous | Role::Insecure => unreachable!("no certificate for {role}"),
    };
    (format!("{stem}.pem"), format!("{stem}.key"))
}

/// The paths of a role's certificate and key in `dir`.
pub fn paths(dir: &Path, role: &Role) -> (PathBuf, PathBuf) {
    let (cert, key) = file_names(role);
    (dir.join(cert), dir.join(key))
}

fn error(what: &str, e: impl std::fmt::Display) -> String {
    format!("{what}: {e}")
}

fn validity(params: &mut CertificateParams, days: i64) {
    let now = time::OffsetDateTime::now_utc();
    // An hour back, for clocks a little behind the one that made it.
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(days);
}

/// Writes `text` to a new file; `secret` makes it readable by its owner only.
fn write_new(path: &Path, text: &str, secret: bool) -> Result<(), String> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true).mode(if secret { 0o600 } else { 0o644 });
    let mut file = options.open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::AlreadyExists => format!("{} exists already; not overwritten", path.display()),
        _ => format!("cannot create {}: {e}", path.display()),
    })?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// Makes a new CA in `dir` (created if missing): `ca.pem`, `ca.key`.
pub fn make_ca(dir: &Path, name: &str) -> Result<PathBuf, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let mut params = CertificateParams::default();
    let mut subject = DistinguishedName::new();
    subject.push(DnType::CommonName, format!("tally CA {name}"));
    params.distinguished_name = subject;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    validity(&mut params, CA_DAYS);
    let key = KeyPair::generate().map_err(|e| error("generating the CA key", e))?;
    let certificate = params.self_signed(&key).map_err(|e| error("signing the CA", e))?;
    write_new(&dir.join(CA_KEY), &key.serialize_pem(), true)?;
    write_new(&dir.join(CA_CERT), &certificate.pem(), false)?;
    Ok(dir.join(CA_CERT))
}

/// Makes a certificate for `role`, signed by the CA in `dir`, valid for `days`. A node's
/// certificate also names the `hosts` (DNS names or IP addresses) clients reach it at; every
/// certificate serves as a client certificate too (a node calls its peers with it).
pub fn make(dir: &Path, role: &Role, hosts: &[String], days: i64) -> Result<(PathBuf, PathBuf), String> {
    let read = |name: &str| {
        std::fs::read_to_string(dir.join(name))
            .map_err(|e| format!("cannot read {}: {e}", dir.join(name).display()))
    };
    let ca_key = KeyPair::from_pem(&read(CA_KEY)?).map_err(|e| error("the CA key", e))?;
    let issuer =
        Issuer::from_ca_cert_pem(&read(CA_CERT)?, ca_key).map_err(|e| error("the CA certificate", e))?;
    let uri = role.uri().ok_or_else(|| format!("no certificate for {role}"))?;
    let mut params = CertificateParams::default();
    let mut subject = DistinguishedName::new();
    subject.push(DnType::CommonName, uri.clone());
    params.distinguished_name = subject;
    params.subject_alt_names.push(SanType::URI(uri.as_str().try_into().map_err(|e| error(&uri, e))?));
    for host in hosts {
        let name = match host.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(host.as_str().try_into().map_err(|e| error(host, e))?),
        };
        params.subject_alt_names.push(name);
    }
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = match role {
        Role::Node(_) => vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth],
        _ => vec![ExtendedKeyUsagePurpose::ClientAuth],
    };
    validity(&mut params, days);
    let key = KeyPair::generate().map_err(|e| error("generating a key", e))?;
    let certificate = params.signed_by(&key, &issuer).map_err(|e| error("signing", e))?;
    let (cert_path, key_path) = paths(dir, role);
    write_new(&key_path, &key.serialize_pem(), true)?;
    write_new(&cert_path, &certificate.pem(), false)?;
    Ok((cert_path, key_path))
}

/// The operator of a local cluster (`make_local`).
pub const LOCAL_OPERATOR: &str = "cli";

/// The CA and certificates of a local cluster of `nodes` nodes on 127.0.0.1 and an operator
/// named `LOCAL_OPERATOR`, made in `dir` unless there already: for `tally dev` and tests.
pub fn make_local(dir: &Path, nodes: u64) -> Result<(), String> {
    if !dir.join(CA_CERT).exists() {
        make_ca(dir, "local")?;
    }
    let hosts = ["127.0.0.1".to_string(), "localhost".to_string()];
    let mut roles: Vec<Role> = (1..=nodes).map(Role::Node).collect();
    roles.push(Role::Operator(LOCAL_OPERATOR.into()));
    for role in roles {
        if !paths(dir, &role).0.exists() {
            make(dir, &role, &hosts, LEAF_DAYS)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_certificate_names_its_role_and_none_is_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        make_ca(dir.path(), "test").unwrap();
        let roles = [Role::Node(7), Role::Operator("alice".into()), Role::Client("payments".into())];
        for role in &roles {
            let (cert, key) = make(dir.path(), role, &["127.0.0.1".into(), "db1.example".into()], 1).unwrap();
            let pem = std::fs::read(&cert).unwrap();
            let der = rustls::pki_types::CertificateDer::from_pem_slice(&pem).unwrap();
            assert_eq!(&Role::of_certificate(&der).unwrap(), role);
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
            let again = make(dir.path(), role, &[], 1).unwrap_err();
            assert!(again.contains("exists already"), "{again}");
        }
        assert!(make_ca(dir.path(), "again").unwrap_err().contains("exists already"));
        // The CA itself names no role.
        let ca = std::fs::read(dir.path().join(CA_CERT)).unwrap();
        let der = rustls::pki_types::CertificateDer::from_pem_slice(&ca).unwrap();
        assert!(Role::of_certificate(&der).is_err());
    }

    use rustls::pki_types::pem::PemObject;
}
