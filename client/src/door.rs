//! What is wrong with a node's address, in words, when calls to it fail below gRPC: nothing
//! listens there, it speaks TLS to a plaintext client or plaintext to a TLS one, its
//! certificate is not from the given CA, it is a node's peer door or an HTTP server (a metrics
//! port). gRPC only reports a closed connection or a protocol error; `diagnose` opens a
//! connection of its own and reads what the other end says to the first bytes of HTTP/2.

use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::Security;

/// How long each step of a diagnosis (connect, handshake, first reply) may take.
const STEP_MAX: Duration = Duration::from_secs(1);

/// The first bytes of an HTTP/2 connection: the client preface, then an empty SETTINGS frame.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

/// What a door answered to the preface.
#[derive(Debug, PartialEq)]
enum Reply {
    /// An HTTP/2 frame: a gRPC server, as a client door is.
    Http2,
    /// A TLS record (an alert, or a handshake): the door speaks TLS.
    Tls,
    /// `HTTP/1.x`: a web server, such as a node's metrics port.
    Http1,
    /// The connection closed (or was reset) without a byte.
    Closed,
    /// Silence until the step's deadline.
    Silent,
    Other,
}

fn classify(bytes: &[u8]) -> Reply {
    match bytes {
        [] => Reply::Closed,
        [0x15 | 0x16, 0x03, ..] => Reply::Tls,
        _ if bytes.starts_with(b"HTTP/") => Reply::Http1,
        // A frame header: 3 bytes of length, then the type (4: SETTINGS, 7: GOAWAY).
        [_, _, _, 0x04 | 0x07, ..] => Reply::Http2,
        _ => Reply::Other,
    }
}

/// An HTTP/1 request, which a gRPC server refuses and a web server (a metrics port) answers.
const HTTP1_GET: &[u8] = b"GET /ready HTTP/1.0\r\n\r\n";

async fn read_reply(
    stream: &mut (impl AsyncRead + AsyncWrite + Unpin),
    first: &[u8],
) -> Result<Reply, std::io::Error> {
    stream.write_all(first).await?;
    stream.flush().await?;
    let mut buffer = [0u8; 16];
    match tokio::time::timeout(STEP_MAX, stream.read(&mut buffer)).await {
        Err(_) => Ok(Reply::Silent),
        Ok(Ok(read)) => Ok(classify(&buffer[..read])),
        // Closed at once, with or without TLS's close_notify.
        Ok(Err(e))
            if matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::UnexpectedEof
            ) =>
        {
            Ok(Reply::Closed)
        }
        Ok(Err(e)) => Err(e),
    }
}

async fn connect(address: &str) -> Result<TcpStream, String> {
    match tokio::time::timeout(STEP_MAX, TcpStream::connect(address)).await {
        Err(_) => Err(format!(
            "no TCP answer within {} s: a wrong host, a firewall, or a machine that is down",
            STEP_MAX.as_secs()
        )),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => Err(
            "nothing listens there (connection refused): is the node running, and is this its client door \
             (its --listen)?"
                .into(),
        ),
        Ok(Err(e)) => Err(format!("cannot connect: {e}")),
        Ok(Ok(stream)) => Ok(stream),
    }
}

/// What a plaintext door is, from its reply to the preface; None for a gRPC server.
async fn plaintext_door(address: &str, insecure_asked: bool) -> Result<Option<String>, String> {
    let mut stream = connect(address).await?;
    let reply = read_reply(&mut stream, PREFACE).await.map_err(|e| format!("the connection failed: {e}"))?;
    // A web server may speak HTTP/2 too: one that also answers HTTP/1 is not a node's door.
    let reply = match reply {
        Reply::Http2 => match read_reply(&mut connect(address).await?, HTTP1_GET).await {
            Ok(Reply::Http1) => Reply::Http1,
            _ => Reply::Http2,
        },
        other => other,
    };
    Ok(match reply {
        Reply::Http2 if insecure_asked => None,
        Reply::Http2 => Some(
            "it speaks plaintext (a cluster started with --insecure): pass --insecure, or start the nodes with TLS"
                .into(),
        ),
        Reply::Tls | Reply::Closed => Some(
            "it speaks TLS: drop --insecure, and pass the cluster's CA with --ca (and --cert, --key for a role)"
                .into(),
        ),
        Reply::Http1 => Some(
            "it is an HTTP/1 server (a node's metrics port, --metrics-listen?), not a node's client door (--listen)"
                .into(),
        ),
        Reply::Silent | Reply::Other => {
            Some("it does not speak gRPC: is this a node's client door (its --listen)?".into())
        }
    })
}

fn client_config(
    ca_pem: &[u8],
    identity: Option<&(Vec<u8>, Vec<u8>)>,
) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    for certificate in CertificateDer::pem_slice_iter(ca_pem) {
        let certificate = certificate.map_err(|e| format!("the CA file: {e}"))?;
        roots.add(certificate).map_err(|e| format!("the CA file: {e}"))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    match identity {
        None => Ok(builder.with_no_client_auth()),
        Some((cert, key)) => {
            let chain = CertificateDer::pem_slice_iter(cert)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("the certificate file: {e}"))?;
            let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| format!("the key file: {e}"))?;
            builder.with_client_auth_cert(chain, key).map_err(|e| format!("the certificate and key: {e}"))
        }
    }
}

/// Why a TLS handshake failed, in words; None when the cause is not the door's TLS.
fn handshake_failure(error: &std::io::Error) -> Option<String> {
    let tls = error.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>())?;
    use rustls::CertificateError as C;
    Some(match tls {
        rustls::Error::InvalidCertificate(C::UnknownIssuer | C::BadSignature) => {
            "its certificate is not signed by the CA given (--ca): pass this cluster's CA certificate".into()
        }
        rustls::Error::InvalidCertificate(C::NotValidForName | C::NotValidForNameContext { .. }) => {
            "its certificate does not name the host you connect to: use an address its certificate names \
             (`tally certs` puts each node's --advertise address in it)"
                .into()
        }
        rustls::Error::InvalidCertificate(C::Expired | C::ExpiredContext { .. }) => {
            "its certificate has expired: make new certificates (`tally certs`) and reload the node (SIGHUP)"
                .into()
        }
        rustls::Error::InvalidCertificate(other) => format!("its certificate is refused: {other:?}"),
        rustls::Error::AlertReceived(alert) => format!("it refused the TLS handshake ({alert:?})"),
        _ => return None,
    })
}

/// What is wrong with the door at `address` for a client with `security`, in words; None when
/// it is a node's client door that this client can talk to (the failure is elsewhere).
pub async fn diagnose(address: &str, security: &Security) -> Option<String> {
    if let Err(problem) = crate::check_address(address) {
        return Some(problem);
    }
    let (ca_pem, identity) = match security {
        Security::Insecure => return plaintext_door(address, true).await.unwrap_or_else(Some),
        Security::Tls { ca_pem, identity } => (ca_pem, identity.as_ref()),
    };
    let config = match client_config(ca_pem, identity) {
        Ok(config) => config,
        Err(problem) => return Some(problem),
    };
    let host = address.rsplit_once(':').map_or(address, |(host, _)| host.trim_matches(['[', ']']));
    let name = match ServerName::try_from(host.to_string()) {
        Ok(name) => name,
        Err(e) => return Some(format!("'{host}' is not a host name or address: {e}")),
    };
    let stream = match connect(address).await {
        Ok(stream) => stream,
        Err(problem) => return Some(problem),
    };
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let mut stream = match tokio::time::timeout(STEP_MAX, connector.connect(name, stream)).await {
        Err(_) => return Some("it did not finish a TLS handshake within 1 s".into()),
        Ok(Err(error)) => {
            return match handshake_failure(&error) {
                Some(problem) => Some(problem),
                // Not TLS at all: find out what it speaks.
                None => plaintext_door(address, false).await.unwrap_or_else(Some),
            };
        }
        Ok(Ok(stream)) => stream,
    };
    // With TLS 1.3, a door that refuses the client's certificate says so after the handshake.
    let refused = "it refused this connection's certificate: a node's peer door (--peer-listen) admits only \
                   node certificates; clients and operators use the client door (--listen)";
    match read_reply(&mut stream, PREFACE).await {
        Ok(Reply::Http2) => None,
        Ok(Reply::Http1) => Some("it is an HTTP/1 server, not a node's client door (--listen)".into()),
        Ok(Reply::Closed) => Some(refused.into()),
        Ok(_) => Some("it does not speak gRPC: is this a node's client door (its --listen)?".into()),
        Err(error) => match error.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) {
            Some(rustls::Error::AlertReceived(
                rustls::AlertDescription::CertificateRequired
                | rustls::AlertDescription::BadCertificate
                | rustls::AlertDescription::AccessDenied
                | rustls::AlertDescription::UnknownCA,
            )) => Some(refused.into()),
            _ => Some(format!("the connection failed after the TLS handshake: {error}")),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_told_apart_by_their_first_bytes() {
        assert_eq!(classify(b""), Reply::Closed);
        assert_eq!(classify(&[0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x32]), Reply::Tls);
        assert_eq!(classify(b"HTTP/1.1 400 Bad Request\r\n"), Reply::Http1);
        assert_eq!(classify(&[0x00, 0x00, 0x12, 0x04, 0x00, 0x00, 0x00, 0x00, 0x00]), Reply::Http2);
        assert_eq!(classify(b"SSH-2.0-OpenSSH"), Reply::Other);
    }
}
