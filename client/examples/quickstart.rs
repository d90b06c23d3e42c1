use std::time::Duration;

use tally_client::v1::{Account, ReadConsistency, Transfer};
use tally_client::{Client, Security, u128_from, u128_to};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The nodes of `tally dev` and its CA, unless TALLY_NODES and TALLY_CA say otherwise.
    let nodes = std::env::var("TALLY_NODES").unwrap_or("127.0.0.1:7101,127.0.0.1:7102,127.0.0.1:7103".into());
    let ca = std::env::var("TALLY_CA").unwrap_or("tally-dev/certs/ca.pem".into());
    let nodes: Vec<String> = nodes.split(',').map(String::from).collect();
    let client = Client::new(&nodes, Duration::from_secs(5), &Security::from_files(ca.as_ref(), None)?)?;
    let account = |id| Account { id: u128_to(id), ledger: 1, code: 1, ..Default::default() };
    let results = client.create_accounts(vec![account(1), account(2)]).await?;
    let names: Vec<&str> = results.iter().map(|r| r.status().as_str_name()).collect();
    println!("accounts: {}", names.join(" ").replace("CREATE_ACCOUNT_STATUS_", ""));
    let payment = Transfer {
        id: u128_to(1),
        debit_account_id: u128_to(1),
        credit_account_id: u128_to(2),
        amount: u128_to(100),
        ledger: 1,
        code: 1,
        ..Default::default()
    };
    // Safe to send again after a timeout: the same id answers EXISTS and moves nothing twice.
    let result = &client.create_transfers(vec![payment]).await?[0];
    println!("payment: {}", result.status().as_str_name().replace("CREATE_TRANSFER_STATUS_", ""));
    for a in client.lookup_accounts(&[1, 2], ReadConsistency::Linearizable).await? {
        let (debits, credits) = (u128_from(a.debits_posted.as_ref()), u128_from(a.credits_posted.as_ref()));
        println!("account {}: debits {debits}, credits {credits}", u128_from(a.id.as_ref()));
    }
    Ok(())
}
