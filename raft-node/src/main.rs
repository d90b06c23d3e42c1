//! The `tally` binary: see `cli.rs`.

// glibc's allocator hands large freed blocks back to the kernel and pays for zeroed pages again
// on every entry; mimalloc keeps them (see ledger/benches/apply.rs).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A build with the simulator's `sim` feature (files, sockets and the clock from turmoil) has no
/// command line: it only exists as the simulator's library.
#[cfg(feature = "sim")]
fn main() -> std::process::ExitCode {
    eprintln!("error: this tally was built with the simulator's `sim` feature; build it without");
    std::process::ExitCode::from(2)
}

#[cfg(not(feature = "sim"))]
fn main() -> std::process::ExitCode {
    let cli = <raft_node::cli::Cli as clap::Parser>::parse();
    // SIGPIPE stays ignored in every command: a node that closes a connection (a TLS door asked
    // in plaintext, a peer door) must not kill a client command in silence. A client command
    // piped into `head` instead finds stdout closed: it stops quietly, as Unix tools do.
    if cli.command.prints_only() {
        let default_hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let message = info
                .payload()
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| info.payload().downcast_ref::<&str>().copied())
                .unwrap_or("");
            if message.contains("failed printing to stdout") && message.contains("Broken pipe") {
                std::process::exit(141);
            }
            default_hook(info)
        }));
    } else {
        // A SIGHUP (a certificate reload, a closed terminal) must not stop a node or `tally dev`
        // while it starts; `tally serve` takes it over for reloads before anything slow.
        // SAFETY: called before any thread starts; ignores one signal.
        unsafe { libc::signal(libc::SIGHUP, libc::SIG_IGN) };
    }
    raft_node::cli::run_to_end(cli)
}
