//! Who is calling: the role a certificate names, and what each role may do.
//!
//! Every certificate `tally certs` (and `tally dev`) makes names its holder in one URI subject
//! alternative name: `tally://node/<id>`, `tally://operator/<name>` or `tally://client/<name>`.
//! The cluster's CA signs them all; the role is read once per connection, at the handshake.

use std::net::SocketAddr;

use tonic::Status;
use x509_parser::extensions::GeneralName;

use crate::types::NodeId;

const SCHEME: &str = "tally://";

/// The role a connection's caller proved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// A node of this cluster (`tally://node/<id>`).
    Node(NodeId),
    /// May change the membership (`tally://operator/<name>`).
    Operator(String),
    /// A client that identified itself (`tally://client/<name>`).
    Client(String),
    /// TLS without a client certificate: a client.
    Anonymous,
    /// A door started with `--insecure`: nobody proved anything, everything is allowed.
    Insecure,
}

impl Role {
    /// The role in a certificate (DER), or why it names none.
    pub fn of_certificate(der: &[u8]) -> Result<Role, String> {
        let (_, certificate) =
            x509_parser::parse_x509_certificate(der).map_err(|e| format!("not a certificate: {e}"))?;
        let names = certificate
            .subject_alternative_name()
            .map_err(|e| format!("its subject alternative names: {e}"))?
            .map(|extension| extension.value.general_names.clone())
            .unwrap_or_default();
        let mut roles = names.iter().filter_map(|name| match name {
            GeneralName::URI(uri) => uri.strip_prefix(SCHEME),
            _ => None,
        });
        let (Some(role), None) = (roles.next(), roles.next()) else {
            return Err(format!("it needs exactly one {SCHEME}node|operator|client/... name"));
        };
        match role.split_once('/') {
            Some(("node", id)) => match id.parse::<NodeId>() {
                Ok(id) if id != 0 => Ok(Role::Node(id)),
                _ => Err(format!("'{SCHEME}{role}': a node id is a number above 0")),
            },
            Some(("operator", name)) if !name.is_empty() => Ok(Role::Operator(name.into())),
            Some(("client", name)) if !name.is_empty() => Ok(Role::Client(name.into())),
            _ => Err(format!("'{SCHEME}{role}' is not a tally role")),
        }
    }

    /// The URI a certificate for this role carries.
    pub fn uri(&self) -> Option<String> {
        match self {
            Role::Node(id) => Some(format!("{SCHEME}node/{id}")),
            Role::Operator(name) => Some(format!("{SCHEME}operator/{name}")),
            Role::Client(name) => Some(format!("{SCHEME}client/{name}")),
            Role::Anonymous | Role::Insecure => None,
        }
    }

    /// May change the membership, transfer leadership, snapshot or back up: operators only. (A
    /// member node forwards an operator's request to the leader, and a new node asks to join:
    /// `service::cluster` allows those two by name, not every node certificate of the CA.)
    pub fn may_operate(&self) -> bool {
        matches!(self, Role::Operator(_) | Role::Insecure)
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Role::Node(id) => write!(f, "node {id}"),
            Role::Operator(name) => write!(f, "operator '{name}'"),
            Role::Client(name) => write!(f, "client '{name}'"),
            Role::Anonymous => f.write_str("a client without a certificate"),
            Role::Insecure => f.write_str("a caller on an --insecure door"),
        }
    }
}

/// What a service learns about the connection a request came on (tonic puts it in the
/// request's extensions: `Conn`'s `Connected::ConnectInfo`).
#[derive(Debug, Clone)]
pub struct Caller {
    pub role: Role,
    pub remote: SocketAddr,
}

/// The caller of `request`. A request without one did not come through a door (a test calling
/// a service directly): it proved nothing.
pub fn caller_of<T>(request: &tonic::Request<T>) -> Role {
    request.extensions().get::<Caller>().map(|c| c.role.clone()).unwrap_or(Role::Anonymous)
}

/// Refuses a caller that may not operate, saying which credential is needed.
pub fn require_operator<T>(request: &tonic::Request<T>) -> Result<(), Status> {
    let role = caller_of(request);
    if role.may_operate() {
        return Ok(());
    }
    Err(Status::permission_denied(format!(
        "{role} may not change the cluster: call with an operator certificate (`tally certs operator`; \
         the CLI's --cert and --key)"
    )))
}
