//! Who may call a node, and how they prove it (DESIGN.md, decision 11): certificates
//! (`certs`), the roles they name and what each may do (`roles`), TLS for both doors and for
//! calls to peers (`tls`), the doors' connections under their limits (`doors`), and the bytes the
//! client door receives at once (`budget`).

pub mod budget;
pub mod certs;
pub mod doors;
pub mod roles;
pub mod tls;
