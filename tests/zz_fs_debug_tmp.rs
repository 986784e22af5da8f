mod support;
use sbx::runtime::ImageRef;
use support::*;
#[test]
fn dbg() {
    let sb = spawn(ImageRef::Dir(busybox_rootfs()));
    let fs = sb.fs();
    for p in ["/proc", "/proc/sys", "/proc/sys/kernel", "/proc/sys/kernel/hostname", "/proc/self", "/proc/1"] {
        eprintln!("{p}: {:?}", fs.stat(p));
    }
    eprintln!("{:?}", fs.list_dir("/proc").map(|v| v.into_iter().map(|f| f.name).collect::<Vec<_>>()));
    eprintln!("{}", sh_ok(&sb, "grep proc /proc/self/mountinfo"));
}
