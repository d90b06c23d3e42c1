//! Who may call a node, and how they prove it (DESIGN.md, decision 11): certificates
//! (`certs`), the roles they name and what each may do (`roles`), TLS for both doors and for
//! calls to peers (`tls`), and the doors' connections under their limits (`doors`).

pub mod certs;
pub mod doors;
pub mod roles;
pub mod tls;
