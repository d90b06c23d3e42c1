//! TLS for both doors and for calls to peers (rustls, ring), reloadable without a restart.
//!
//! One node certificate serves three ways: as the server certificate of the client door and of
//! the peer door, and as the client certificate a node calls its peers with. The client door
//! asks for a client certificate but does not require one (clients may stay anonymous; an
//! operator proves the role with one). The peer door requires a node certificate of this
//! cluster's CA. A node calling a peer checks the peer's certificate against the CA and its node
//! id against the node it meant to call, not its host name: routes, NATs and the chaos harness's
//! proxies put other addresses in between.
//!
//! `Tls::reload` (on SIGHUP) reads the three files again; new connections use the new
//! certificates, open ones keep theirs. A reload that fails keeps the old ones and says why.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use serde::{Deserialize, Serialize};
use x509_parser::extensions::GeneralName;

use super::roles::Role;
use crate::types::NodeId;

/// Where a node's TLS files are: the cluster's CA, and its own certificate and key (PEM).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The rustls configurations made from one reading of the files.
pub struct Configs {
    pub client_door: Arc<ServerConfig>,
    pub peer_door: Arc<ServerConfig>,
    pub peer_calls: Arc<ClientConfig>,
}

/// A node's TLS, as last (re)loaded.
pub struct Tls {
    files: TlsFiles,
    node: NodeId,
    current: RwLock<Arc<Configs>>,
}

impl Tls {
    /// Loads the files of node `node`; its certificate must be a node certificate for that id,
    /// signed by the CA.
    pub fn load(files: TlsFiles, node: NodeId) -> Result<Tls, String> {
        let configs = configs(&files, node)?;
        Ok(Tls { files, node, current: RwLock::new(Arc::new(configs)) })
    }

    pub fn current(&self) -> Arc<Configs> {
        self.current.read().expect("tls lock").clone()
    }

    /// Reads the files again and uses them for every new connection; on error keeps the old.
    pub fn reload(&self) -> Result<(), String> {
        let configs = configs(&self.files, self.node)?;
        *self.current.write().expect("tls lock") = Arc::new(configs);
        Ok(())
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_certificates(path: &std::path::Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certificates = CertificateDer::pem_file_iter(path)
        .and_then(|certificates| certificates.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("cannot read certificates from {}: {e}", path.display()))?;
    if certificates.is_empty() {
        return Err(format!("{} holds no certificate (PEM)", path.display()));
    }
    Ok(certificates)
}

fn configs(files: &TlsFiles, node: NodeId) -> Result<Configs, String> {
    let mut roots = RootCertStore::empty();
    for ca in read_certificates(&files.ca)? {
        roots.add(ca).map_err(|e| format!("{}: not a usable CA certificate: {e}", files.ca.display()))?;
    }
    let roots = Arc::new(roots);
    let chain = read_certificates(&files.cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| format!("cannot read a private key from {}: {e}", files.key.display()))?;
    let what = files.cert.display();
    match Role::of_certificate(&chain[0]) {
        Ok(Role::Node(id)) if id == node => {}
        Ok(role) => return Err(format!("{what} is the certificate of {role}, not of node {node}")),
        Err(e) => return Err(format!("{what} is not a tally node certificate: {e}")),
    }
    let tls_error = |e: rustls::Error| format!("TLS with {what}: {e}");
    let verifier_error =
        |e: rustls::server::VerifierBuilderError| format!("the CA in {}: {e}", files.ca.display());
    let required = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
        .build()
        .map_err(verifier_error)?;
    // A certificate the CA did not sign fails here rather than at every peer's handshake.
    required
        .verify_client_cert(&chain[0], &chain[1..], UnixTime::now())
        .map_err(|e| format!("{what} does not check out against {}: {e}", files.ca.display()))?;
    let optional = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
        .allow_unauthenticated()
        .build()
        .map_err(verifier_error)?;
    let server = |verifier| -> Result<Arc<ServerConfig>, String> {
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(tls_error)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(tls_error)?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    };
    let server_verifier = WebPkiServerVerifier::builder_with_provider(roots, provider())
        .build()
        .map_err(|e| format!("the CA in {}: {e}", files.ca.display()))?;
    let mut peer_calls = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(tls_error)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(NodeCertificates { webpki: server_verifier }))
        .with_client_auth_cert(chain.clone(), key.clone_key())
        .map_err(tls_error)?;
    peer_calls.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Configs {
        client_door: server(optional)?,
        peer_door: server(required)?,
        peer_calls: Arc::new(peer_calls),
    })
}

/// Accepts a server's certificate if the CA signed it (webpki: chain, validity, usage) and it
/// is a node's; which node is checked by the caller, who knows whom it meant to reach.
#[derive(Debug)]
struct NodeCertificates {
    webpki: Arc<WebPkiServerVerifier>,
}

/// A name the certificate itself gives, so that webpki checks everything but the host name.
fn own_name(der: &CertificateDer<'_>) -> Option<ServerName<'static>> {
    let (_, certificate) = x509_parser::parse_x509_certificate(der).ok()?;
    let names = certificate.subject_alternative_name().ok()??.value.general_names.clone();
    names.iter().find_map(|name| match name {
        GeneralName::DNSName(dns) => ServerName::try_from(dns.to_string()).ok(),
        GeneralName::IPAddress(bytes) => match bytes.len() {
            4 => Some(ServerName::IpAddress(IpAddr::from(<[u8; 4]>::try_from(*bytes).ok()?).into())),
            16 => Some(ServerName::IpAddress(IpAddr::from(<[u8; 16]>::try_from(*bytes).ok()?).into())),
            _ => None,
        },
        _ => None,
    })
}

impl ServerCertVerifier for NodeCertificates {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match Role::of_certificate(end_entity) {
            Ok(Role::Node(_)) => {}
            _ => return Err(rustls::Error::General("the peer's certificate is not a tally node's".into())),
        }
        let name = own_name(end_entity)
            .ok_or_else(|| rustls::Error::General("the node's certificate names no host".into()))?;
        self.webpki.verify_server_cert(end_entity, intermediates, &name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// The role of the first certificate a peer presented, if any.
pub fn presented_role(certificates: Option<&[CertificateDer<'_>]>) -> Option<Result<Role, String>> {
    certificates.and_then(|c| c.first()).map(|first| Role::of_certificate(first))
}
