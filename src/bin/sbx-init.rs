//! `sbx-init`: the single-threaded helper the runtime fork+execs for each sandbox; it becomes the
//! sandbox's supervisor and clones the sandbox's pid 1. Not meant to be run by hand.

fn main() {
    // The runtime hands us a SEQPACKET socket on fd 3; anything else means a person ran us.
    let ok = nix::sys::socket::getsockopt(&unsafe_free_fd3(), nix::sys::socket::sockopt::SockType)
        .map(|t| t == nix::sys::socket::SockType::SeqPacket)
        .unwrap_or(false);
    if !ok {
        eprintln!("sbx-init: this is the sandbox helper started by sbx; it is not run by hand");
        std::process::exit(2);
    }
    sbx::runtime::helper::main()
}

/// Borrow fd 3 without taking ownership.
fn unsafe_free_fd3() -> std::os::fd::BorrowedFd<'static> {
    // SAFETY: fd 3 is only borrowed for one getsockopt call; if it is not open, getsockopt
    // fails with EBADF, which we treat as "not started by the runtime".
    unsafe { std::os::fd::BorrowedFd::borrow_raw(3) }
}
