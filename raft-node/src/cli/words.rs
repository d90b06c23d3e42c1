//! Codes and flags in words: what a result code means (the `.proto` file's own comment on it,
//! read from the descriptor set the server also serves for reflection), and flag sets by name.

use std::collections::HashMap;
use std::sync::OnceLock;

use prost::Message;
use tally_client::v1;

/// The leading comment of each enum value of the tally protos, by "Enum.VALUE_NAME".
fn comments() -> &'static HashMap<String, String> {
    static COMMENTS: OnceLock<HashMap<String, String>> = OnceLock::new();
    COMMENTS.get_or_init(|| {
        let mut found = HashMap::new();
        let Ok(set) = prost_types::FileDescriptorSet::decode(tally_proto::FILE_DESCRIPTOR_SET) else {
            return found;
        };
        for file in &set.file {
            let Some(info) = &file.source_code_info else { continue };
            for location in &info.location {
                // [5, enum index, 2, value index]: a value of a top-level enum.
                let &[5, e, 2, v] = location.path.as_slice() else { continue };
                let Some(comment) = location.leading_comments.as_deref() else { continue };
                let Some(enumeration) = file.enum_type.get(e as usize) else { continue };
                let Some(value) = enumeration.value.get(v as usize) else { continue };
                let text = comment.split_whitespace().collect::<Vec<_>>().join(" ");
                found.insert(format!("{}.{}", enumeration.name(), value.name()), text);
            }
        }
        found
    })
}

/// What a result code means: the proto's comment on it, else its name in words.
pub fn meaning(enumeration: &str, value_name: &str, prefix: &str) -> String {
    match comments().get(&format!("{enumeration}.{value_name}")) {
        Some(comment) => comment.clone(),
        None => value_name.trim_start_matches(prefix).to_lowercase().replace('_', " "),
    }
}

const ACCOUNT_FLAGS: &[(v1::AccountFlag, &str)] = &[
    (v1::AccountFlag::Linked, "linked"),
    (v1::AccountFlag::DebitsMustNotExceedCredits, "debits-must-not-exceed-credits"),
    (v1::AccountFlag::CreditsMustNotExceedDebits, "credits-must-not-exceed-debits"),
    (v1::AccountFlag::History, "history"),
    (v1::AccountFlag::Imported, "imported"),
    (v1::AccountFlag::Closed, "closed"),
];

const TRANSFER_FLAGS: &[(v1::TransferFlag, &str)] = &[
    (v1::TransferFlag::Linked, "linked"),
    (v1::TransferFlag::Pending, "pending"),
    (v1::TransferFlag::PostPendingTransfer, "post"),
    (v1::TransferFlag::VoidPendingTransfer, "void"),
    (v1::TransferFlag::BalancingDebit, "balancing-debit"),
    (v1::TransferFlag::BalancingCredit, "balancing-credit"),
    (v1::TransferFlag::ClosingDebit, "closing-debit"),
    (v1::TransferFlag::ClosingCredit, "closing-credit"),
    (v1::TransferFlag::Imported, "imported"),
];

fn names(flags: u32, known: impl Iterator<Item = (u32, &'static str)>) -> String {
    let mut left = flags;
    let mut words: Vec<String> = Vec::new();
    for (bit, name) in known {
        if flags & bit != 0 {
            words.push(name.to_string());
            left &= !bit;
        }
    }
    if left != 0 {
        words.push(format!("{left:#x}"));
    }
    words.join(",")
}

pub fn account_flag_names(flags: u32) -> String {
    names(flags, ACCOUNT_FLAGS.iter().map(|(f, n)| (*f as u32, *n)))
}

pub fn transfer_flag_names(flags: u32) -> String {
    names(flags, TRANSFER_FLAGS.iter().map(|(f, n)| (*f as u32, *n)))
}

/// A flag given by name: dashes or underscores, any case, as the proto spells it too
/// (`debits_must_not_exceed_credits`, `ACCOUNT_FLAG_HISTORY`).
fn parse_flag<F: Copy + Into<i32>>(
    name: &str,
    known: &[(F, &str)],
    proto_prefix: &str,
    settable: &[&str],
) -> Result<u32, String> {
    let plain = name.trim().to_lowercase().replace('_', "-");
    let plain = plain.trim_start_matches(&proto_prefix.to_lowercase().replace('_', "-")).to_string();
    match known.iter().find(|(_, n)| *n == plain && settable.contains(n)) {
        Some((flag, _)) => Ok((*flag).into() as u32),
        None => Err(format!("unknown flag '{name}': use {} (dashes or underscores)", settable.join(", "))),
    }
}

/// Account flags by name (comma-separated lists already split).
pub fn parse_account_flags(names: &[String]) -> Result<u32, String> {
    let settable =
        ["linked", "debits-must-not-exceed-credits", "credits-must-not-exceed-debits", "history", "closed"];
    names
        .iter()
        .filter(|n| !n.trim().is_empty())
        .try_fold(0, |flags, name| Ok(flags | parse_flag(name, ACCOUNT_FLAGS, "ACCOUNT_FLAG_", &settable)?))
}

/// Transfer flags by name; post, void and imported have flags of their own (--post, --void,
/// --imported-at).
pub fn parse_transfer_flags(names: &[String]) -> Result<u32, String> {
    let settable =
        ["linked", "pending", "balancing-debit", "balancing-credit", "closing-debit", "closing-credit"];
    names
        .iter()
        .filter(|n| !n.trim().is_empty())
        .try_fold(0, |flags, name| Ok(flags | parse_flag(name, TRANSFER_FLAGS, "TRANSFER_FLAG_", &settable)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_codes_read_as_the_protos_comments() {
        let meaning = |name| meaning("CreateTransferStatus", name, "CREATE_TRANSFER_STATUS_");
        assert!(
            meaning("CREATE_TRANSFER_STATUS_EXCEEDS_CREDITS").contains("DEBITS_MUST_NOT_EXCEED_CREDITS"),
            "{}",
            meaning("CREATE_TRANSFER_STATUS_EXCEEDS_CREDITS")
        );
        assert!(meaning("CREATE_TRANSFER_STATUS_LINKED_EVENT_CHAIN_OPEN").contains("never closed"));
        // A code without a comment of its own reads as its name.
        assert_eq!(meaning("CREATE_TRANSFER_STATUS_DEBIT_ACCOUNT_NOT_FOUND"), "debit account not found");
    }

    #[test]
    fn flags_read_and_parse_by_name_in_either_spelling() {
        let list = |text: &str| text.split(',').map(str::to_string).collect::<Vec<_>>();
        let flags = parse_account_flags(&list("debits_must_not_exceed_credits,HISTORY")).unwrap();
        assert_eq!(account_flag_names(flags), "debits-must-not-exceed-credits,history");
        assert_eq!(parse_account_flags(&list("ACCOUNT_FLAG_LINKED")).unwrap(), 1);
        let error = parse_account_flags(&list("overdraft")).unwrap_err();
        assert!(
            error.contains("unknown flag 'overdraft': use linked, debits-must-not-exceed-credits"),
            "{error}"
        );
        assert_eq!(
            transfer_flag_names(parse_transfer_flags(&list("linked,pending")).unwrap()),
            "linked,pending"
        );
        assert!(parse_transfer_flags(&list("imported")).is_err());
        assert_eq!(transfer_flag_names(1 << 20 | 1), "linked,0x100000");
    }
}
