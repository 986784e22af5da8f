/* syscall probe, run inside a sandbox by the isolation tests: performs one syscall by name with
 * harmless arguments and prints the errno it got ("0" on success). Built static by the tests. */
#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc < 2) { fprintf(stderr, "usage: probe SYSCALL\n"); return 2; }
    const char *n = argv[1];
    long r;
    errno = 0;
    if (!strcmp(n, "mount")) r = syscall(SYS_mount, "none", "/tmp", "tmpfs", 0, 0);
    else if (!strcmp(n, "umount2")) r = syscall(SYS_umount2, "/proc", 0);
    else if (!strcmp(n, "pivot_root")) r = syscall(SYS_pivot_root, "/tmp", "/tmp");
    else if (!strcmp(n, "unshare")) r = syscall(SYS_unshare, CLONE_NEWUSER);
    else if (!strcmp(n, "unshare_ns")) r = syscall(SYS_unshare, CLONE_NEWNS);
    else if (!strcmp(n, "clone_newuser")) {
        r = syscall(SYS_clone, CLONE_NEWUSER | SIGCHLD, 0, 0, 0, 0);
        if (r == 0) _exit(0);
    }
    else if (!strcmp(n, "clone3")) r = syscall(SYS_clone3, 0, 0);
    else if (!strcmp(n, "setns")) r = syscall(SYS_setns, 0, CLONE_NEWNS);
    else if (!strcmp(n, "keyctl")) r = syscall(SYS_keyctl, 0 /* GET_KEYRING_ID */, -3, 0);
    else if (!strcmp(n, "add_key")) r = syscall(SYS_add_key, "user", "sbx", "x", 1, -3);
    else if (!strcmp(n, "request_key")) r = syscall(SYS_request_key, "user", "sbx", 0, 0);
    else if (!strcmp(n, "bpf")) r = syscall(SYS_bpf, 0, 0, 0);
    else if (!strcmp(n, "perf_event_open")) r = syscall(SYS_perf_event_open, 0, 0, -1, -1, 0);
    else if (!strcmp(n, "open_by_handle_at")) r = syscall(SYS_open_by_handle_at, -1, 0, 0);
    else if (!strcmp(n, "name_to_handle_at")) r = syscall(SYS_name_to_handle_at, -1, "", 0, 0, 0);
    else if (!strcmp(n, "kexec_load")) r = syscall(SYS_kexec_load, 0, 0, 0, 0);
    else if (!strcmp(n, "init_module")) r = syscall(SYS_init_module, 0, 0, "");
    else if (!strcmp(n, "finit_module")) r = syscall(SYS_finit_module, -1, "", 0);
    else if (!strcmp(n, "delete_module")) r = syscall(SYS_delete_module, "sbx_none", 0);
    else if (!strcmp(n, "reboot")) r = syscall(SYS_reboot, 0, 0, 0, 0); /* bad magic */
    else if (!strcmp(n, "swapon")) r = syscall(SYS_swapon, "/nonexistent", 0);
    else if (!strcmp(n, "swapoff")) r = syscall(SYS_swapoff, "/nonexistent");
    else if (!strcmp(n, "syslog")) r = syscall(SYS_syslog, 10 /* SIZE_BUFFER */, 0, 0);
    else if (!strcmp(n, "acct")) r = syscall(SYS_acct, 0);
    else if (!strcmp(n, "quotactl")) r = syscall(SYS_quotactl, 0, 0, 0, 0);
    else if (!strcmp(n, "userfaultfd")) r = syscall(SYS_userfaultfd, 0);
    else if (!strcmp(n, "lookup_dcookie")) r = syscall(SYS_lookup_dcookie, 0, 0, 0);
    else if (!strcmp(n, "iopl")) r = syscall(SYS_iopl, 0);
    else if (!strcmp(n, "ioperm")) r = syscall(SYS_ioperm, 0, 0, 0);
    else if (!strcmp(n, "getpid")) r = syscall(SYS_getpid);
    else { fprintf(stderr, "probe: unknown syscall %s\n", n); return 2; }
    printf("%d\n", r < 0 ? errno : 0);
    return 0;
}
