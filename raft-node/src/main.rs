//! The `tally` binary: see `cli.rs`.

use clap::Parser;

// glibc's allocator hands large freed blocks back to the kernel and pays for zeroed pages again
// on every entry; mimalloc keeps them (see ledger/benches/apply.rs).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let cli = raft_node::cli::Cli::parse();
    // A client command piped into `head` stops quietly when the pipe closes, as Unix tools do,
    // instead of panicking on the failed print. Processes that serve keep SIGPIPE ignored (a
    // peer closing a socket must not kill a node).
    if cli.command.prints_only() {
        // SAFETY: called before any thread starts; restores the default action of one signal.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    } else {
        // A SIGHUP (a certificate reload, a closed terminal) must not stop a node or `tally dev`
        // while it starts; `tally serve` takes it over for reloads before anything slow.
        // SAFETY: called before any thread starts; ignores one signal.
        unsafe { libc::signal(libc::SIGHUP, libc::SIG_IGN) };
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    runtime.block_on(raft_node::cli::run(cli))
}
