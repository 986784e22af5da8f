//! Snapshots through the runtime library: a running sandbox's writable layer committed as a
//! layer (`rootfs_fetch::commit`), derived into an image, and new sandboxes started from it see
//! the files with their owners, without what was removed — over the built-in `host` image
//! (the host's /usr still bound) and over a stored image. Runs as root.

mod support;

use std::os::unix::fs::MetadataExt;

use rootfs_fetch::commit::{self, Derive};
use rootfs_fetch::store::{ImageConfig, ImageRecord, Store};
use sbx::runtime::{ImageRef, Sandbox};
use support::*;

fn store() -> Store {
    rootfs_fetch::image_store(&config().state_dir).expect("open the image store")
}

/// Commit the sandbox's upper (while it runs) on top of `parent` as a new image.
fn snapshot(sb: &Sandbox, parent: Option<&ImageRecord>, host_base: bool) -> ImageRecord {
    let (base, count) = sb.id_range();
    let store = store();
    let layer = commit::layer_from_upper(&store, &sb.upper_dir(), base, count)
        .expect("commit the upper dir");
    commit::derive_image(
        &store,
        Derive {
            parent,
            host_base,
            layer: Some(layer),
            config: ImageConfig {
                env: vec!["PATH=/usr/bin:/bin".into(), "SNAP=1".into()],
                ..ImageConfig::default()
            },
            created_by: format!("snapshot {}", sb.id()),
            reference: format!("snapshot:{}", sb.id()),
        },
    )
    .expect("derive the image")
}

fn destroy(sb: Sandbox) {
    let id = sb.id().to_string();
    sb.destroy().expect("destroy");
    assert!(host_mounts_with(&id).is_empty(), "{id}: mounts left");
}

#[test]
fn a_snapshot_of_a_host_sandbox_starts_with_its_files_over_the_host() {
    let a = spawn(ImageRef::Host);
    // (In a `host` sandbox /etc is the skeleton as it is on the host, owned by host root: not
    // writable. It is in sandboxes of host-based images, whose skeleton is id-mapped.)
    sh_ok(
        &a,
        "echo a > /root/a && mkdir -p /home/u && echo f > /home/u/f \
         && chown -R 1000:1000 /home/u && chmod 4755 /home/u/f && ln /root/a /root/a2",
    );
    let img = snapshot(&a, None, true);
    assert!(img.host_base);
    assert_eq!(img.layers.len(), 1);
    destroy(a);

    let resolved = rootfs_fetch::resolve(&ImageRef::Stored(img.id.clone()), &config().state_dir)
        .expect("resolve the snapshot");
    assert!(resolved
        .binds
        .iter()
        .any(|b| b.target.as_os_str() == "/usr"));
    assert_eq!(resolved.lowers.len(), 2, "the layer and the host skeleton");

    let b = spawn(ImageRef::Stored(img.id.clone()));
    assert_eq!(sh_ok(&b, "cat /root/a"), "a\n");
    assert_eq!(
        sh_ok(&b, "stat -c %u:%g:%a /home/u/f /home/u"),
        "1000:1000:4755\n1000:1000:755\n"
    );
    assert_eq!(sh_ok(&b, "stat -c %u:%h /root/a"), "0:2\n", "hardlink kept");
    assert!(sh_ok(&b, "cat /etc/passwd").starts_with("root:x:0:0"));
    // /usr is the host's own (the same directory, bound); the skeleton is sandbox root's.
    let host_usr_bin = std::fs::metadata("/usr/bin").unwrap().ino();
    assert_eq!(
        sh_ok(&b, "stat -c %i /usr/bin").trim(),
        host_usr_bin.to_string()
    );
    assert_eq!(sh_ok(&b, "stat -c %u /root /etc /tmp"), "0\n0\n0\n");
    sh_ok(
        &b,
        "echo x > /etc/x && chown 1000:1000 /etc/x && chmod 600 /etc/x \
         && rm /etc/nsswitch.conf && echo c > /root/c && echo t > /tmp/t && rm /root/a2",
    );

    // A snapshot of a snapshot: layered again, still host-based.
    let img2 = snapshot(&b, Some(&img), false);
    assert!(img2.host_base);
    assert_eq!(img2.layers.len(), 2);
    destroy(b);
    let c = spawn(ImageRef::Stored(img2.id.clone()));
    assert_eq!(
        sh_ok(&c, "cat /root/a /root/c /tmp/t /etc/x"),
        "a\nc\nt\nx\n"
    );
    assert_eq!(sh_ok(&c, "stat -c %u:%g:%a /etc/x"), "1000:1000:600\n");
    let (code, _, _) = sh(&c, "test -e /etc/nsswitch.conf");
    assert_eq!(code, 1, "the removed skeleton file stays removed");
    assert!(sh_ok(&c, "cat /etc/hosts").contains("localhost"));
    let (code, _, _) = sh(&c, "test -e /root/a2");
    assert_eq!(code, 1);
    assert_eq!(
        sh_ok(&c, "stat -c %i /usr/bin").trim(),
        host_usr_bin.to_string()
    );
    destroy(c);
}

#[test]
fn a_snapshot_of_a_stored_image_sandbox_keeps_the_image_below() {
    // The base: the busybox rootfs as a stored image, made with COPY.
    let store = store();
    let base_layer = commit::layer_from_context(&store, &busybox_rootfs(), &[".".into()], "/")
        .expect("copy the busybox rootfs");
    let base = commit::derive_image(
        &store,
        Derive {
            parent: None,
            host_base: false,
            layer: Some(base_layer),
            config: ImageConfig {
                env: vec!["PATH=/bin".into()],
                ..ImageConfig::default()
            },
            created_by: "COPY . /".into(),
            reference: "build".into(),
        },
    )
    .expect("derive the base");

    let a = spawn(ImageRef::Stored(base.id.clone()));
    sh_ok(
        &a,
        "echo a > /root/a && echo x > /etc/x && chown 1000:1000 /etc/x && rm /etc/group \
         && mkdir /data && echo d > /data/d && chown -R 7:7 /data",
    );
    let img = snapshot(&a, Some(&base), false);
    destroy(a);
    assert!(!img.host_base);
    assert_eq!(img.layers.len(), 2);
    assert_eq!(img.layers[0], base.layers[0]);

    let resolved = rootfs_fetch::resolve(&ImageRef::Stored(img.id.clone()), &config().state_dir)
        .expect("resolve the snapshot");
    assert!(resolved.binds.is_empty());
    assert_eq!(
        resolved.config.unwrap().env,
        vec!["PATH=/usr/bin:/bin", "SNAP=1"]
    );

    let b = spawn(ImageRef::Stored(img.id.clone()));
    assert_eq!(sh_ok(&b, "cat /root/a /data/d"), "a\nd\n");
    assert_eq!(
        sh_ok(&b, "stat -c %u:%g /etc/x /data/d"),
        "1000:1000\n7:7\n"
    );
    let (code, _, _) = sh(&b, "test -e /etc/group");
    assert_eq!(code, 1, "the removed file stays removed");
    assert_eq!(
        sh_ok(&b, "cat /etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\n"
    );
    assert_eq!(sh_ok(&b, "stat -c %u /bin/busybox"), "0\n");
    destroy(b);
}
