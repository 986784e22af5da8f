//! `sbx-init`: the single-threaded helper the runtime spawns for each sandbox; it becomes the
//! sandbox's supervisor and clones the sandbox's pid 1. Not meant to be run by hand.

fn main() {
    // The runtime hands us a SEQPACKET socket as stdin; anything else means a person ran us.
    let ok = nix::sys::socket::getsockopt(&std::io::stdin(), nix::sys::socket::sockopt::SockType)
        .map(|t| t == nix::sys::socket::SockType::SeqPacket)
        .unwrap_or(false);
    if !ok {
        eprintln!("sbx-init: this is the sandbox helper started by sbx; it is not run by hand");
        std::process::exit(2);
    }
    sbx::runtime::helper::main()
}
