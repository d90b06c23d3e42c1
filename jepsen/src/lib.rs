//! `tally-jepsen`: tally's chaos harness. It will run real `tally` processes, inject faults,
//! record a history and check it (see the chaos-harness issue). It talks gRPC through
//! `tally-client` and signals processes, like an operator, and never reaches into server code.

pub use tally_client as client;
