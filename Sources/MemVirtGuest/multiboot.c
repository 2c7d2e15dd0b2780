// The multiboot image's CPL3 part (see memvirt_multiboot.h): parse the multiboot command
// line into a workload mailbox, run guest.c's workload (the same stream as the KVM runtime
// and the model), checksum the footprint, and report on port 0xE9 as text lines:
//
//   memvirt-guest: boot mem_lower_kib=... mem_upper_kib=... ram_end=0x...
//   memvirt-guest: workload pattern=... footprint=... accesses=... write_threshold=... seed=... base=0x400000
//   memvirt-guest: result accesses=... reads=... writes=... read_sum=... memory_checksum=... gaps=... max_gap_ticks=... [max_gap_us=...]
//   memvirt-guest: error <what>                      (then exit value 2)
//
// Command line (tokens without '=' are skipped: loaders pass the image's name first):
//   pattern=sequential|strided:BYTES|uniform|gups  footprint=64MiB  accesses=2M
//   write-ratio=0.3  seed=1  compute=N  rate=N (accesses/s, needs tsc-khz)  tsc-khz=N
//   gap-us=N (log gaps longer than this; needs tsc-khz; default 100000 TSC ticks)
//   vcpus=1|2 (2: the boot CPU wakes CPU 1 through its local APIC, memvirt_multiboot.h; CPU 1
//   runs the same workload with seed + 1 over the next footprint, and reports first as
//   `memvirt-guest: cpu1 result ...`)
//
// Same rules as guest.c: section memvirt_guest, no globals, no string constants (text is
// packed into 64-bit immediates by W8), no libc, no runtime helpers (no 128-bit division).
#include "memvirt_guest.h"
#include "memvirt_multiboot.h"
#include "memvirt_prng.h"

#define GUEST __attribute__((section("memvirt_guest"), used, noinline, no_stack_protector))
#define GI MEMVIRT_INLINE

// Up to 8 characters of a string literal from index k, as a little-endian word (constant-folded).
#define CH(s, i) ((i) < sizeof(s) - 1 ? (uint64_t)(uint8_t)(s)[(i) % sizeof(s)] : 0ull)
#define W8(s, k) (CH(s, k) | CH(s, k + 1) << 8 | CH(s, k + 2) << 16 | CH(s, k + 3) << 24 | \
                  CH(s, k + 4) << 32 | CH(s, k + 5) << 40 | CH(s, k + 6) << 48 | CH(s, k + 7) << 56)
// A string literal of up to 96 characters, 8 at a time (a longer one does not compile).
#define SAY(s) do { _Static_assert(sizeof(s) <= 97, "SAY takes at most 96 characters"); \
                    say(W8(s, 0)); if (sizeof(s) > 9) say(W8(s, 8)); if (sizeof(s) > 17) say(W8(s, 16)); \
                    if (sizeof(s) > 25) say(W8(s, 24)); if (sizeof(s) > 33) say(W8(s, 32)); \
                    if (sizeof(s) > 41) say(W8(s, 40)); if (sizeof(s) > 49) say(W8(s, 48)); \
                    if (sizeof(s) > 57) say(W8(s, 56)); if (sizeof(s) > 65) say(W8(s, 64)); \
                    if (sizeof(s) > 73) say(W8(s, 72)); if (sizeof(s) > 81) say(W8(s, 80)); \
                    if (sizeof(s) > 89) say(W8(s, 88)); } while (0)

#ifdef MEMVIRT_MB_HOST
// Built for the host by the command-line fuzz target (Fuzz/Targets/cmdline), which supplies
// the ports; never defined in the guest build.
void memvirt_mb_host_out(uint16_t port, uint32_t v);
GI void outb(uint16_t port, uint8_t v) { memvirt_mb_host_out(port, v); }
GI void outl(uint16_t port, uint32_t v) { memvirt_mb_host_out(port, v); }
#else
GI void outb(uint16_t port, uint8_t v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port) : "memory"); }
GI void outl(uint16_t port, uint32_t v) { __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port) : "memory"); }
#endif
GI void say(uint64_t w) { while (w) { outb(MEMVIRT_MB_PORT_CONSOLE, (uint8_t)w); w >>= 8; } }
GI void say_u(uint64_t v) {
    char d[20];
    int n = 0;
    do { d[n++] = (char)('0' + v % 10); v /= 10; } while (v);
    while (n) outb(MEMVIRT_MB_PORT_CONSOLE, (uint8_t)d[--n]);
}
GI void say_x(uint64_t v) {
    say(W8("0x", 0));
    int started = 0;
    for (int s = 60; s >= 0; s -= 4) {
        uint64_t d = (v >> s) & 15;
        if (d || started || s == 0) { started = 1; outb(MEMVIRT_MB_PORT_CONSOLE, (uint8_t)(d < 10 ? '0' + d : 'a' + d - 10)); }
    }
}
GI void nl(void) { outb(MEMVIRT_MB_PORT_CONSOLE, '\n'); }
GI void prefix(void) { SAY("memvirt-guest: "); }
GI void exit_with(uint32_t v) {
    for (;;) outl(MEMVIRT_MB_PORT_EXIT, v);
}
GI void fail_token(const char *p, uint64_t len) {
    for (uint64_t i = 0; i < len; i++) outb(MEMVIRT_MB_PORT_CONSOLE, (uint8_t)p[i]);
    nl();
    exit_with(MEMVIRT_MB_EXIT_BAD_INPUT);
}

/// The first 16 bytes of [p, p+len) as two words (zero-padded); len > 16 never matches a key.
GI void pack(const char *p, uint64_t len, uint64_t *w0, uint64_t *w1) {
    uint64_t a = 0, b = 0;
    for (uint64_t i = 0; i < len && i < 16; i++) {
        if (i < 8) a |= (uint64_t)(uint8_t)p[i] << (8 * i); else b |= (uint64_t)(uint8_t)p[i] << (8 * (i - 8));
    }
    *w0 = a; *w1 = len > 16 ? ~0ull : b;
}
#define IS(w0, w1, s) ((w0) == W8(s, 0) && (w1) == W8(s, 8))

/// Decimal digits with an optional unit: K/M/G (10^3n), KB/MB/GB (10^3n), KiB/MiB/GiB (2^10n).
/// Returns 0 on success.
GI int parse_count(const char *p, uint64_t len, uint64_t *out) {
    uint64_t v = 0, i = 0;
    if (len == 0) return 1;
    while (i < len && p[i] >= '0' && p[i] <= '9') {
        if (v > 184467440737095516ull) return 1;
        v = v * 10 + (uint64_t)(p[i] - '0');
        i++;
    }
    if (i == 0) return 1;
    uint64_t w0, w1;
    pack(p + i, len - i, &w0, &w1);
    uint64_t m = 1;
    if (len == i) m = 1;
    else if (IS(w0, w1, "K") || IS(w0, w1, "KB")) m = 1000ull;
    else if (IS(w0, w1, "M") || IS(w0, w1, "MB")) m = 1000000ull;
    else if (IS(w0, w1, "G") || IS(w0, w1, "GB")) m = 1000000000ull;
    else if (IS(w0, w1, "KiB")) m = 1ull << 10;
    else if (IS(w0, w1, "MiB")) m = 1ull << 20;
    else if (IS(w0, w1, "GiB")) m = 1ull << 30;
    else return 1;
    if (v > ~0ull / m) return 1;
    *out = v * m;
    return 0;
}

/// write-ratio text -> WorkloadSpec.writeThreshold exactly: UInt64(Double(text) * 2^64), 0
/// and >= 1 special, >= 2^64 - 2048 clamped to UInt64.max - 1 (Workload.swift). The double
/// nearest N / 10^k (round half to even) is found by long division, bit by bit.
GI int parse_ratio(const char *p, uint64_t len, uint64_t *out) {
    uint64_t n = 0, d = 1, i = 0, digits = 0, intpart = 0;
    while (i < len && p[i] >= '0' && p[i] <= '9') { intpart = intpart * 10 + (uint64_t)(p[i] - '0'); i++; digits++; if (digits > 18) return 1; }
    if (i < len && p[i] == '.') {
        i++;
        uint64_t frac = 0;
        while (i < len && p[i] >= '0' && p[i] <= '9') {
            if (d >= 100000000000000000ull) { i++; continue; }  // digits past 10^-17: below a double's reach here
            frac = frac * 10 + (uint64_t)(p[i] - '0'); d *= 10; i++; digits++;
        }
        n = frac;
    }
    if (i != len || digits == 0) return 1;
    if (intpart >= 1) { if (intpart == 1 && n == 0) { *out = ~0ull; return 0; } return 1; }
    if (n == 0) { *out = 0; return 0; }
    // Bits of n/d after the binary point: find the first 1 (position e, 1-based), take 53
    // bits from there, round with the next bit and the rest (sticky).
    uint64_t r = n, e = 0, m = 0, got = 0;
    while (got < 53) {
        r <<= 1; uint64_t bit = 0;
        if (r >= d) { r -= d; bit = 1; }
        e++;
        if (got == 0 && !bit) continue;
        m = (m << 1) | bit; got++;
    }
    uint64_t first = e - 52;  // position of m's top bit
    r <<= 1; uint64_t guard = 0;
    if (r >= d) { r -= d; guard = 1; }
    if (guard && (r != 0 || (m & 1))) m++;
    if (m == (1ull << 53)) { m >>= 1; first--; }
    if (first == 0) { *out = ~0ull; return 0; }  // rounded to 1.0
    // value = m * 2^-(first + 52); threshold = floor(value * 2^64).
    uint64_t sh = first + 52;
    uint64_t t = sh <= 64 ? m << (64 - sh) : (sh - 64 >= 64 ? 0 : m >> (sh - 64));
    if (t >= 18446744073709549568ull) t = ~0ull - 1;
    *out = t;
    return 0;
}

GI void say_result(volatile struct memvirt_mailbox *mb, uint64_t khz) {
    uint64_t gaps = mb->gap_count, max_gap = mb->gap_max;
    SAY("result accesses="); say_u(mb->done_accesses); SAY(" reads="); say_u(mb->reads); SAY(" writes="); say_u(mb->writes);
    SAY(" read_sum="); say_u(mb->read_sum); SAY(" memory_checksum="); say_u(mb->memory_checksum);
    SAY(" gaps="); say_u(gaps); SAY(" max_gap_ticks="); say_u(max_gap);
    if (khz) { SAY(" max_gap_us="); say_u(max_gap * 1000 / khz); }
    nl();
}

#ifndef MEMVIRT_MB_HOST
extern const char memvirt_mb_ap16[] __attribute__((visibility("hidden")));
extern const char memvirt_mb_ap16_end[] __attribute__((visibility("hidden")));
GI void cpu_pause(void) { __asm__ volatile("pause" ::: "memory"); }
GI void lapic_write(uint64_t reg, uint32_t v) { *(volatile uint32_t *)(MEMVIRT_MB_LAPIC + reg) = v; }
GI uint32_t lapic_read(uint64_t reg) { return *(volatile uint32_t *)(MEMVIRT_MB_LAPIC + reg); }
/// One IPI to APIC ID 1 (ICR high, then low: the write of the low half sends it).
GI void ipi_cpu1(uint32_t low) {
    lapic_write(0x310, 1u << 24);
    lapic_write(0x300, low);
    for (uint64_t k = 0; k < 1000000 && (lapic_read(0x300) & (1u << 12)); k++) cpu_pause();  // delivery status
}
/// Waits for CPU 1's "at CPL3" flag, at most `spins` pauses; 1 when it came.
GI int wait_cpu1(uint64_t spins) {
    volatile uint64_t *flags = (volatile uint64_t *)MEMVIRT_MB_AP_FLAGS;
    for (uint64_t k = 0; k < spins; k++) { if (flags[0]) return 1; cpu_pause(); }
    return flags[0] != 0;
}
/// Copies the trampoline below 1 MiB and sends INIT, SIPI, SIPI (the second only if the
/// first did not start it: a started CPU ignores SIPI anyway). 1 when CPU 1 reached CPL3.
GI int start_cpu1(void) {
    volatile char *dst = (volatile char *)MEMVIRT_MB_AP_TRAMPOLINE;
    const volatile char *src = memvirt_mb_ap16;
    uint64_t n = (uint64_t)(memvirt_mb_ap16_end - memvirt_mb_ap16);
    for (uint64_t k = 0; k < n; k++) dst[k] = src[k];
    volatile uint64_t *flags = (volatile uint64_t *)MEMVIRT_MB_AP_FLAGS;
    flags[0] = 0; flags[1] = 0;
    lapic_write(0xF0, lapic_read(0xF0) | 0x1FF);   // SVR: APIC software-enabled, spurious vector 0xFF
    ipi_cpu1(0x00004500);                          // INIT, assert
    const uint32_t sipi = 0x00004600u | (uint32_t)(MEMVIRT_MB_AP_TRAMPOLINE >> 12);
    ipi_cpu1(sipi);
    if (wait_cpu1(20000000)) return 1;
    ipi_cpu1(sipi);
    return wait_cpu1(400000000);
}
#endif

/// CPU 1 at CPL3 (boot32.S, memvirt_mb_ap64): its mailbox was filled by the boot CPU before
/// the INIT/SIPI.
GUEST void memvirt_mb_ap_main(volatile struct memvirt_mailbox *mb) {
    volatile uint64_t *flags = (volatile uint64_t *)MEMVIRT_MB_AP_FLAGS;
    flags[0] = 1;
    memvirt_guest_workload(mb);
    memvirt_guest_checksum(mb);
    flags[1] = 1;
    // MemVirt: this vCPU is done (its thread ends); QEMU: no device at 0x10, ignored.
    outl(MEMVIRT_PORT_DONE, MEMVIRT_STATUS_OK);
    for (;;) __asm__ volatile("pause" ::: "memory");
}

GUEST void memvirt_mb_main(uint64_t mbinfo, volatile struct memvirt_mailbox *mb) {
    outl(MEMVIRT_MB_PORT_MAILBOX, (uint32_t)(uint64_t)mb);
    const volatile uint32_t *mbi = (const volatile uint32_t *)mbinfo;
    const uint32_t flags = mbi[0];
    // RAM from the memory map (flag 6): the end of the available region holding the data base;
    // else mem_upper (flag 0): KiB from 1 MiB.
    uint64_t ram_end = 0;
    if (flags & (1u << 6)) {
        uint64_t at = mbi[12], end = at + mbi[11];
        while (at + 24 <= end + 4) {
            const volatile uint32_t *e = (const volatile uint32_t *)at;
            uint64_t base = e[1] | (uint64_t)e[2] << 32, length = e[3] | (uint64_t)e[4] << 32;
            if (e[5] == 1 && base <= MEMVIRT_MB_DATA_BASE && MEMVIRT_MB_DATA_BASE < base + length) ram_end = base + length;
            at += (uint64_t)e[0] + 4;
        }
    } else if (flags & 1u) {
        ram_end = 0x100000ull + (uint64_t)mbi[2] * 1024;
    }
    prefix(); SAY("boot flags="); say_x(flags);
    if (flags & 1u) { SAY(" mem_lower_kib="); say_u(mbi[1]); SAY(" mem_upper_kib="); say_u(mbi[2]); }
    SAY(" ram_end="); say_x(ram_end); nl();

    // The command line.
    uint64_t pattern = 2, stride = 64, footprint = 64ull << 20, accesses = 1000000, threshold = 0, seed = 1;
    uint64_t compute = 0, rate = 0, khz = 0, gap_us = 0, vcpus = 1;
    if (flags & (1u << 2)) {
        const char *c = (const char *)(uint64_t)mbi[4];
        uint64_t i = 0;
        while (c[i]) {
            while (c[i] == ' ') i++;
            if (!c[i]) break;
            uint64_t s = i, eq = 0;
            while (c[i] && c[i] != ' ') { if (c[i] == '=' && !eq) eq = i; i++; }
            if (!eq) continue;  // the image's name, or a flag for somebody else
            const char *k = c + s, *v = c + eq + 1;
            uint64_t kl = eq - s, vl = i - eq - 1;
            uint64_t w0, w1;
            pack(k, kl, &w0, &w1);
            int bad = 0;
            if (IS(w0, w1, "pattern")) {
                uint64_t cl = 0;
                while (cl < vl && v[cl] != ':') cl++;
                uint64_t p0, p1;
                pack(v, cl, &p0, &p1);
                if (IS(p0, p1, "sequential") && cl == vl) pattern = 0;
                else if (IS(p0, p1, "uniform") && cl == vl) pattern = 2;
                else if (IS(p0, p1, "gups") && cl == vl) pattern = 5;
                else if (IS(p0, p1, "strided")) {
                    pattern = 1;
                    if (cl < vl) bad = parse_count(v + cl + 1, vl - cl - 1, &stride) || stride == 0 || stride % 8 != 0;
                } else {
                    prefix(); SAY("error pattern (this image runs sequential, strided[:N], uniform, gups): ");
                    fail_token(v, vl);
                }
            } else if (IS(w0, w1, "footprint")) bad = parse_count(v, vl, &footprint);
            else if (IS(w0, w1, "accesses")) bad = parse_count(v, vl, &accesses);
            else if (IS(w0, w1, "write-ratio")) bad = parse_ratio(v, vl, &threshold);
            else if (IS(w0, w1, "seed")) bad = parse_count(v, vl, &seed);
            else if (IS(w0, w1, "compute")) bad = parse_count(v, vl, &compute);
            else if (IS(w0, w1, "rate")) bad = parse_count(v, vl, &rate);
            else if (IS(w0, w1, "tsc-khz")) bad = parse_count(v, vl, &khz);
            else if (IS(w0, w1, "gap-us")) bad = parse_count(v, vl, &gap_us);
            else if (IS(w0, w1, "vcpus")) bad = parse_count(v, vl, &vcpus) || vcpus < 1 || vcpus > 2;
            else { prefix(); SAY("error unknown key: "); fail_token(k, i - s); }
            if (bad) { prefix(); SAY("error bad value: "); fail_token(k, i - s); }
        }
    }
    if (footprint < 4096 || footprint % 4096 != 0 || footprint > (1ull << 40)) {
        prefix(); SAY("error footprint must be a positive multiple of 4KiB"); nl(); exit_with(MEMVIRT_MB_EXIT_BAD_INPUT);
    }
    // The identity map covers 4 GiB; the footprint must be RAM from the data base on.
    if (MEMVIRT_MB_DATA_BASE + vcpus * footprint > ram_end || MEMVIRT_MB_DATA_BASE + vcpus * footprint > (4ull << 30)) {
        prefix(); SAY("error footprint="); say_u(footprint); if (vcpus > 1) SAY(" per vCPU x2");
        SAY(" does not fit in RAM from "); say_x(MEMVIRT_MB_DATA_BASE);
        SAY(" to "); say_x(ram_end); SAY(" (give the VM more memory)"); nl(); exit_with(MEMVIRT_MB_EXIT_BAD_INPUT);
    }
    if ((rate || gap_us) && !khz) { prefix(); SAY("error rate= and gap-us= need tsc-khz="); nl(); exit_with(MEMVIRT_MB_EXIT_BAD_INPUT); }

    prefix(); SAY("workload pattern="); say_u(pattern); SAY(" footprint="); say_u(footprint); SAY(" accesses="); say_u(accesses);
    SAY(" write_threshold="); say_u(threshold); SAY(" seed="); say_u(seed); SAY(" base="); say_x(MEMVIRT_MB_DATA_BASE); nl();

    // The mailbox of the KVM runtime's thread 0 (KVMRunner.prepare): same stream, same values.
    volatile uint64_t *w = (volatile uint64_t *)mb;
    for (uint64_t k = 0; k < sizeof(struct memvirt_mailbox) / 8; k++) w[k] = 0;
    mb->command = MEMVIRT_CMD_WORKLOAD;
    mb->pattern = pattern;
    mb->base = MEMVIRT_MB_DATA_BASE;
    mb->footprint = footprint;
    mb->accesses = accesses;
    mb->rng_state = memvirt_derive(seed, 0);
    mb->write_threshold = threshold;
    mb->stride = stride;
    mb->compute = compute;
    mb->salt = 0;
    mb->gap_threshold = khz ? (gap_us ? gap_us : 300) * khz / 1000 : 100000;
    if (rate) mb->pace = khz * 1000 / rate ? khz * 1000 / rate : 1;
#ifndef MEMVIRT_MB_HOST
    volatile struct memvirt_mailbox *ap = (volatile struct memvirt_mailbox *)MEMVIRT_MB_AP_MAILBOX;
    if (vcpus == 2) {
        // CPU 1's mailbox: the same workload, seed + 1, the next footprint.
        volatile uint64_t *src = (volatile uint64_t *)mb, *dst = (volatile uint64_t *)ap;
        for (uint64_t k = 0; k < sizeof(struct memvirt_mailbox) / 8; k++) dst[k] = src[k];
        ap->base = MEMVIRT_MB_DATA_BASE + footprint;
        ap->rng_state = memvirt_derive(seed + 1, 0);
        if (!start_cpu1()) {
            prefix(); SAY("error vcpus=2: CPU 1 did not start (INIT/SIPI to APIC ID 1; does the VM have 2 vCPUs?)"); nl();
            exit_with(MEMVIRT_MB_EXIT_BAD_INPUT);
        }
    }
#endif
    memvirt_guest_workload(mb);
    memvirt_guest_checksum(mb);
#ifndef MEMVIRT_MB_HOST
    if (vcpus == 2) {
        volatile uint64_t *flags = (volatile uint64_t *)MEMVIRT_MB_AP_FLAGS;
        while (!flags[1]) cpu_pause();
        prefix(); SAY("cpu1 "); say_result(ap, khz);
    }
#endif
    prefix(); say_result(mb, khz);
    exit_with(MEMVIRT_MB_EXIT_OK);
}

extern const char __start_memvirt_guest[];
extern const char __stop_memvirt_guest[];
extern const char memvirt_mb_boot32[];
extern const char memvirt_mb_boot32_imm[];
extern const char memvirt_mb_params[];
extern const char memvirt_mb_stubs[];
extern const char memvirt_mb_ap16_far[];
extern const char memvirt_mb_ap16_gdtr[];
extern const char memvirt_mb_ap16_cr3[];
extern const char memvirt_mb_ap64[];

void memvirt_guest_multiboot_get(struct memvirt_mb_image *out) {
    const char *s = __start_memvirt_guest;
    out->start = s;
    out->size = (uint64_t)(__stop_memvirt_guest - s);
    out->boot32_offset = (uint64_t)(memvirt_mb_boot32 - s);
    out->boot32_imm_offset = (uint64_t)(memvirt_mb_boot32_imm - s);
    out->params_offset = (uint64_t)(memvirt_mb_params - s);
    out->main_offset = (uint64_t)((const char *)memvirt_mb_main - s);
    out->stubs_offset = (uint64_t)(memvirt_mb_stubs - s);
#ifndef MEMVIRT_MB_HOST
    out->ap16_offset = (uint64_t)(memvirt_mb_ap16 - s);
    out->ap16_size = (uint64_t)(memvirt_mb_ap16_end - memvirt_mb_ap16);
    out->ap16_far_offset = (uint64_t)(memvirt_mb_ap16_far - s);
    out->ap16_gdtr_offset = (uint64_t)(memvirt_mb_ap16_gdtr - s);
    out->ap16_cr3_offset = (uint64_t)(memvirt_mb_ap16_cr3 - s);
    out->ap64_offset = (uint64_t)(memvirt_mb_ap64 - s);
    out->ap_main_offset = (uint64_t)((const char *)memvirt_mb_ap_main - s);
#endif
}
