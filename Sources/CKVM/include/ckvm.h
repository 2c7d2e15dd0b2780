// CKVM: the C shim over <linux/kvm.h> and <linux/userfaultfd.h>.
//
// Swift cannot call the variadic ioctl(2) nor import the function-like request macros
// (_IOW/_IOR), so every request gets one static inline function here. Each returns the
// ioctl's non-negative result, or -errno: Swift never reads errno after ARC could have run.
// Nothing else lives here except the two ordered loads/stores the dirty-ring protocol
// (Documentation/virt/kvm/api.rst, "KVM_CAP_DIRTY_LOG_RING") requires.
#pragma once
#include <errno.h>
#include <stdint.h>
#include <stddef.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <time.h>

#define CKVM_CALL(expr) do { int r_ = (expr); return r_ < 0 ? -errno : r_; } while (0)

// MARK: system fd (/dev/kvm)
static inline int ckvm_get_api_version(int fd) { CKVM_CALL(ioctl(fd, KVM_GET_API_VERSION, 0)); }
static inline int ckvm_create_vm(int fd, unsigned long type) { CKVM_CALL(ioctl(fd, KVM_CREATE_VM, type)); }
static inline int ckvm_check_extension(int fd, long cap) { CKVM_CALL(ioctl(fd, KVM_CHECK_EXTENSION, cap)); }
static inline int ckvm_get_vcpu_mmap_size(int fd) { CKVM_CALL(ioctl(fd, KVM_GET_VCPU_MMAP_SIZE, 0)); }
static inline int ckvm_get_supported_cpuid(int fd, struct kvm_cpuid2 *c) { CKVM_CALL(ioctl(fd, KVM_GET_SUPPORTED_CPUID, c)); }
static inline int ckvm_get_msr_index_list(int fd, struct kvm_msr_list *l) { CKVM_CALL(ioctl(fd, KVM_GET_MSR_INDEX_LIST, l)); }

// MARK: VM fd
static inline int ckvm_create_vcpu(int vm, unsigned long id) { CKVM_CALL(ioctl(vm, KVM_CREATE_VCPU, id)); }
static inline int ckvm_set_user_memory_region(int vm, const struct kvm_userspace_memory_region *r) { CKVM_CALL(ioctl(vm, KVM_SET_USER_MEMORY_REGION, r)); }
static inline int ckvm_set_tss_addr(int vm, unsigned long addr) { CKVM_CALL(ioctl(vm, KVM_SET_TSS_ADDR, addr)); }
static inline int ckvm_create_irqchip(int vm) { CKVM_CALL(ioctl(vm, KVM_CREATE_IRQCHIP, 0)); }
static inline int ckvm_enable_cap(int fd, const struct kvm_enable_cap *c) { CKVM_CALL(ioctl(fd, KVM_ENABLE_CAP, c)); }
static inline int ckvm_get_dirty_log(int vm, struct kvm_dirty_log *l) { CKVM_CALL(ioctl(vm, KVM_GET_DIRTY_LOG, l)); }
static inline int ckvm_clear_dirty_log(int vm, struct kvm_clear_dirty_log *l) { CKVM_CALL(ioctl(vm, KVM_CLEAR_DIRTY_LOG, l)); }
static inline int ckvm_reset_dirty_rings(int vm) { CKVM_CALL(ioctl(vm, KVM_RESET_DIRTY_RINGS, 0)); }
static inline int ckvm_get_stats_fd(int fd) { CKVM_CALL(ioctl(fd, KVM_GET_STATS_FD, 0)); }

// MARK: vCPU fd
static inline int ckvm_run(int vcpu) { CKVM_CALL(ioctl(vcpu, KVM_RUN, 0)); }
static inline int ckvm_get_regs(int vcpu, struct kvm_regs *r) { CKVM_CALL(ioctl(vcpu, KVM_GET_REGS, r)); }
static inline int ckvm_set_regs(int vcpu, const struct kvm_regs *r) { CKVM_CALL(ioctl(vcpu, KVM_SET_REGS, r)); }
static inline int ckvm_get_sregs(int vcpu, struct kvm_sregs *r) { CKVM_CALL(ioctl(vcpu, KVM_GET_SREGS, r)); }
static inline int ckvm_set_sregs(int vcpu, const struct kvm_sregs *r) { CKVM_CALL(ioctl(vcpu, KVM_SET_SREGS, r)); }
static inline int ckvm_get_fpu(int vcpu, struct kvm_fpu *f) { CKVM_CALL(ioctl(vcpu, KVM_GET_FPU, f)); }
static inline int ckvm_set_fpu(int vcpu, const struct kvm_fpu *f) { CKVM_CALL(ioctl(vcpu, KVM_SET_FPU, f)); }
static inline int ckvm_get_xsave(int vcpu, struct kvm_xsave *x) { CKVM_CALL(ioctl(vcpu, KVM_GET_XSAVE, x)); }
static inline int ckvm_set_xsave(int vcpu, const struct kvm_xsave *x) { CKVM_CALL(ioctl(vcpu, KVM_SET_XSAVE, x)); }
static inline int ckvm_get_xcrs(int vcpu, struct kvm_xcrs *x) { CKVM_CALL(ioctl(vcpu, KVM_GET_XCRS, x)); }
static inline int ckvm_set_xcrs(int vcpu, const struct kvm_xcrs *x) { CKVM_CALL(ioctl(vcpu, KVM_SET_XCRS, x)); }
static inline int ckvm_get_msrs(int vcpu, struct kvm_msrs *m) { CKVM_CALL(ioctl(vcpu, KVM_GET_MSRS, m)); }
static inline int ckvm_set_msrs(int vcpu, const struct kvm_msrs *m) { CKVM_CALL(ioctl(vcpu, KVM_SET_MSRS, m)); }
static inline int ckvm_get_lapic(int vcpu, struct kvm_lapic_state *l) { CKVM_CALL(ioctl(vcpu, KVM_GET_LAPIC, l)); }
static inline int ckvm_set_lapic(int vcpu, const struct kvm_lapic_state *l) { CKVM_CALL(ioctl(vcpu, KVM_SET_LAPIC, l)); }
static inline int ckvm_get_vcpu_events(int vcpu, struct kvm_vcpu_events *e) { CKVM_CALL(ioctl(vcpu, KVM_GET_VCPU_EVENTS, e)); }
static inline int ckvm_set_vcpu_events(int vcpu, const struct kvm_vcpu_events *e) { CKVM_CALL(ioctl(vcpu, KVM_SET_VCPU_EVENTS, e)); }
static inline int ckvm_get_mp_state(int vcpu, struct kvm_mp_state *s) { CKVM_CALL(ioctl(vcpu, KVM_GET_MP_STATE, s)); }
static inline int ckvm_set_mp_state(int vcpu, const struct kvm_mp_state *s) { CKVM_CALL(ioctl(vcpu, KVM_SET_MP_STATE, s)); }
static inline int ckvm_get_debugregs(int vcpu, struct kvm_debugregs *d) { CKVM_CALL(ioctl(vcpu, KVM_GET_DEBUGREGS, d)); }
static inline int ckvm_set_debugregs(int vcpu, const struct kvm_debugregs *d) { CKVM_CALL(ioctl(vcpu, KVM_SET_DEBUGREGS, d)); }
static inline int ckvm_set_cpuid2(int vcpu, const struct kvm_cpuid2 *c) { CKVM_CALL(ioctl(vcpu, KVM_SET_CPUID2, c)); }
static inline int ckvm_get_tsc_khz(int vcpu) { CKVM_CALL(ioctl(vcpu, KVM_GET_TSC_KHZ, 0)); }
static inline int ckvm_set_tsc_khz(int vcpu, unsigned long khz) { CKVM_CALL(ioctl(vcpu, KVM_SET_TSC_KHZ, khz)); }

// MARK: userfaultfd
static inline int ckvm_userfaultfd(int flags) { CKVM_CALL((int)syscall(SYS_userfaultfd, flags)); }
static inline int ckvm_uffdio_api(int uffd, struct uffdio_api *a) { CKVM_CALL(ioctl(uffd, UFFDIO_API, a)); }
static inline int ckvm_uffdio_register(int uffd, struct uffdio_register *r) { CKVM_CALL(ioctl(uffd, UFFDIO_REGISTER, r)); }
static inline int ckvm_uffdio_copy(int uffd, struct uffdio_copy *c) { CKVM_CALL(ioctl(uffd, UFFDIO_COPY, c)); }
static inline int ckvm_uffdio_zeropage(int uffd, struct uffdio_zeropage *z) { CKVM_CALL(ioctl(uffd, UFFDIO_ZEROPAGE, z)); }
static inline int ckvm_uffdio_wake(int uffd, struct uffdio_range *r) { CKVM_CALL(ioctl(uffd, UFFDIO_WAKE, r)); }

// MARK: constants Swift cannot import (function-like or computed macros)
static inline uint64_t ckvm_uffd_api(void) { return UFFD_API; }
static inline unsigned long ckvm_dirty_log_page_offset(void) { return KVM_DIRTY_LOG_PAGE_OFFSET; }

// MARK: dirty ring ordering (api.rst: read `flags` with acquire, write RESET with release)
static inline uint32_t ckvm_load_acquire_u32(const uint32_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline void ckvm_store_release_u32(uint32_t *p, uint32_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }

// Added: the XSAVE2 request (larger XSAVE areas, AMX).
static inline int ckvm_get_xsave2(int vcpu, struct kvm_xsave *x) { CKVM_CALL(ioctl(vcpu, KVM_GET_XSAVE2, x)); }

// ppoll(2) with a nanosecond timeout (< 0: none), through syscall(2) so no feature macro is needed.
static inline int ckvm_ppoll_ns(struct pollfd *fds, unsigned long n, int64_t ns) {
    struct timespec ts = { .tv_sec = ns / 1000000000, .tv_nsec = ns % 1000000000 };
    CKVM_CALL((int)syscall(SYS_ppoll, fds, n, ns < 0 ? NULL : &ts, NULL, (size_t)8));
}

// CPU affinity of thread `tid` (0: the caller) as a mask of CPUs 0-63, and the caller's
// thread id: sched_{get,set}affinity and gettid through syscall(2) (their glibc wrappers
// need _GNU_SOURCE). Get returns the mask (>= 0) or -errno.
static inline int64_t ckvm_get_affinity(int tid) {
    uint64_t m = 0;
    int r = (int)syscall(SYS_sched_getaffinity, tid, sizeof m, &m);
    return r < 0 ? -errno : (int64_t)(m & 0x7fffffffffffffffULL);
}
/// The CPU the calling thread runs on (getcpu), or -1.
static inline int ckvm_current_cpu(void) {
    unsigned cpu = 0;
    return syscall(SYS_getcpu, &cpu, (void *)0, (void *)0) == 0 ? (int)cpu : -1;
}
static inline int ckvm_set_affinity(int tid, uint64_t mask) { CKVM_CALL((int)syscall(SYS_sched_setaffinity, tid, sizeof mask, &mask)); }
static inline int ckvm_gettid(void) { return (int)syscall(SYS_gettid); }

// MARK: migration helpers, in ckvm.c (compiled -O2: Swift debug builds would compile
// static inline bodies at -O0, and these loops run over all guest memory)
/// A 64-bit hash of one 4 KiB page and its index (the switch-over hash of guest memory).
uint64_t ckvm_page_hash(const void *page, uint64_t index);
/// ckvm_page_hash of an all-zero page at `index` (no page read).
uint64_t ckvm_page_hash_zero(uint64_t index);
/// How many of `n` page hashes (pages first..first+n-1) are not the zero page's hash: the
/// pages of a snapshot with content.
size_t ckvm_count_nonzero_hashes(const uint64_t *hashes, size_t n, uint64_t first);
/// A 64-bit checksum of `n` bytes (a stream message's payload).
uint64_t ckvm_checksum(const void *p, size_t n);
/// 1 when the 4 KiB page is all zero bytes.
int ckvm_page_is_zero(const void *page);
/// Sets `immediate_exit` in a vCPU's kvm_run (a kicked KVM_RUN then returns EINTR at once).
static inline void ckvm_set_immediate_exit(struct kvm_run *run, uint8_t v) { __atomic_store_n(&run->immediate_exit, v, __ATOMIC_SEQ_CST); }
