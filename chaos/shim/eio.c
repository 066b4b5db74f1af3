/*
 * EIO on demand for one directory: an LD_PRELOAD library for chaos's eio
 * scenario (chaos/src/eio.rs builds it with the system C compiler).
 *
 *   CHAOS_EIO_DIR   a directory (absolute, as /proc/self/fd shows it)
 *   CHAOS_EIO_FLAG  a file; while it exists, calls on files below the
 *                   directory fail with EIO: write, pwrite, writev,
 *                   pwritev, fsync and fdatasync if the file says "all",
 *                   only fsync and fdatasync if it says "sync"
 *
 * Every other call, and every call while the flag file is absent, goes to
 * the C library untouched. Each failed call counts in CHAOS_EIO_FLAG.hits
 * (appended, one byte per hit) so the scenario can prove the fault landed.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

static const char *eio_dir;
static size_t eio_dir_len;
static const char *eio_flag;
static char eio_hits[PATH_MAX];

__attribute__((constructor)) static void eio_init(void) {
    eio_dir = getenv("CHAOS_EIO_DIR");
    eio_flag = getenv("CHAOS_EIO_FLAG");
    if (eio_dir) eio_dir_len = strlen(eio_dir);
    if (eio_flag) snprintf(eio_hits, sizeof eio_hits, "%s.hits", eio_flag);
}

/* 0: pass the call on; 1: fail it with EIO. Uses raw syscalls only, so it
 * never re-enters the functions it wraps. */
static int eio_armed(int fd, int is_sync) {
    char mode[8] = {0};
    char link[64];
    char path[PATH_MAX];
    long n;
    int f;
    if (!eio_dir || !eio_flag || eio_dir_len == 0) return 0;
    f = (int)syscall(SYS_openat, AT_FDCWD, eio_flag, O_RDONLY | O_CLOEXEC);
    if (f < 0) return 0;
    n = syscall(SYS_read, f, mode, sizeof mode - 1);
    syscall(SYS_close, f);
    if (n <= 0) return 0;
    if (!is_sync && strncmp(mode, "all", 3) != 0) return 0;
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    n = syscall(SYS_readlinkat, AT_FDCWD, link, path, sizeof path - 1);
    if (n <= 0) return 0;
    path[n] = 0;
    if (strncmp(path, eio_dir, eio_dir_len) != 0) return 0;
    if (path[eio_dir_len] != '/' && path[eio_dir_len] != 0) return 0;
    f = (int)syscall(SYS_openat, AT_FDCWD, eio_hits, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (f >= 0) {
        syscall(SYS_write, f, "x", 1);
        syscall(SYS_close, f);
    }
    return 1;
}

#define REAL(name) \
    static __typeof__(name) *real_##name; \
    if (!real_##name) real_##name = (__typeof__(name) *)dlsym(RTLD_NEXT, #name)

ssize_t write(int fd, const void *buf, size_t count) {
    REAL(write);
    if (eio_armed(fd, 0)) { errno = EIO; return -1; }
    return real_write(fd, buf, count);
}

ssize_t pwrite(int fd, const void *buf, size_t count, off_t offset) {
    REAL(pwrite);
    if (eio_armed(fd, 0)) { errno = EIO; return -1; }
    return real_pwrite(fd, buf, count, offset);
}

ssize_t pwrite64(int fd, const void *buf, size_t count, off64_t offset) {
    REAL(pwrite64);
    if (eio_armed(fd, 0)) { errno = EIO; return -1; }
    return real_pwrite64(fd, buf, count, offset);
}

ssize_t writev(int fd, const struct iovec *iov, int iovcnt) {
    REAL(writev);
    if (eio_armed(fd, 0)) { errno = EIO; return -1; }
    return real_writev(fd, iov, iovcnt);
}

ssize_t pwritev(int fd, const struct iovec *iov, int iovcnt, off_t offset) {
    REAL(pwritev);
    if (eio_armed(fd, 0)) { errno = EIO; return -1; }
    return real_pwritev(fd, iov, iovcnt, offset);
}

int fsync(int fd) {
    REAL(fsync);
    if (eio_armed(fd, 1)) { errno = EIO; return -1; }
    return real_fsync(fd);
}

int fdatasync(int fd) {
    REAL(fdatasync);
    if (eio_armed(fd, 1)) { errno = EIO; return -1; }
    return real_fdatasync(fd);
}
