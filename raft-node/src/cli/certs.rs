//! `tally certs`: a cluster's CA and its node, operator and client certificates, as PEM files
//! in one directory (`security::certs`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;

use crate::security::certs;
use crate::security::roles::Role;

#[derive(Subcommand)]
pub enum CertsCommand {
    /// A new CA for one cluster: ca.pem (give it to every node and client) and ca.key (keep it
    /// offline; it signs the others).
    Ca {
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        /// A name for the cluster, in the CA's subject.
        #[arg(long, default_value = "tally")]
        name: String,
    },
    /// A node's certificate (node-ID.pem, node-ID.key): the node id it may act as, and the host
    /// names and IP addresses clients reach it at.
    Node {
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        #[arg(long)]
        id: u64,
        /// A DNS name or IP address of the node (repeatable; at least one).
        #[arg(long = "host", required = true)]
        hosts: Vec<String>,
        #[arg(long, default_value_t = certs::LEAF_DAYS)]
        days: i64,
    },
    /// An operator's certificate (operator-NAME.pem/.key): may change the membership.
    Operator {
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        #[arg(long)]
        name: String,
        #[arg(long, default_value_t = certs::LEAF_DAYS)]
        days: i64,
    },
    /// A client's certificate (client-NAME.pem/.key): names a client; no operator rights.
    Client {
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        #[arg(long)]
        name: String,
        #[arg(long, default_value_t = certs::LEAF_DAYS)]
        days: i64,
    },
}

fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
        return Err(format!("name '{name}': use letters, digits, '-' and '_'"));
    }
    Ok(())
}

pub fn run(command: CertsCommand) -> Result<ExitCode, String> {
    let (dir, role, hosts, days) = match command {
        CertsCommand::Ca { dir, name } => {
            check_name(&name)?;
            let ca = certs::make_ca(&dir, &name)?;
            println!("{} (and ca.key: keep it offline)", ca.display());
            return Ok(ExitCode::SUCCESS);
        }
        CertsCommand::Node { dir, id, hosts, days } => {
            if id == 0 {
                return Err("--id must not be 0".into());
            }
            (dir, Role::Node(id), hosts, days)
        }
        CertsCommand::Operator { dir, name, days } => {
            check_name(&name)?;
            (dir, Role::Operator(name), Vec::new(), days)
        }
        CertsCommand::Client { dir, name, days } => {
            check_name(&name)?;
            (dir, Role::Client(name), Vec::new(), days)
        }
    };
    if days <= 0 {
        return Err("--days must be above 0".into());
    }
    let (cert, key) = certs::make(&dir, &role, &hosts, days)?;
    println!("{} {}", cert.display(), key.display());
    Ok(ExitCode::SUCCESS)
}
