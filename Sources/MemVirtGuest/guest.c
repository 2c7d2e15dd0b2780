// The guest runtime's CPL3 part: the workload stream of MemVirtCore's WorkloadSpec, drawn
// with the same SplitMix64, plus the small commands `kvm probe` and the tests use.
//
// This code is copied out of the host binary into guest memory and runs there at another
// address, so it must not leave its section: every function is in section `memvirt_guest`
// (static helpers are always_inline), it uses no globals, no string constants, no
// floating point (zipf's table is integer), no jump tables, no libc, no stack protector.
// Package.swift compiles this target with -O2 -fno-jump-tables -fno-stack-protector
// -mgeneral-regs-only; tests check the image has no outside references by running it.
#include "memvirt_guest.h"
#include "memvirt_prng.h"

#define GUEST __attribute__((section("memvirt_guest"), used, noinline, no_stack_protector))
#define GI MEMVIRT_INLINE

GI void out32(uint16_t port, uint32_t v) { __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port) : "memory"); }

GI uint64_t write_value(uint64_t i, uint64_t salt) { return ((i + 1) * 0x9E3779B97F4A7C15ull) ^ salt; }

GI uint64_t rdtsc(void) {
    uint32_t lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((uint64_t)hi << 32) | lo;
}

GI void workload(volatile struct memvirt_mailbox *mb) {
    const uint64_t pattern = mb->pattern, base = mb->base, footprint = mb->footprint;
    const uint64_t n = mb->accesses, threshold = mb->write_threshold, stride = mb->stride;
    const uint64_t compute = mb->compute, salt = mb->salt;
    const uint64_t words = footprint >> 3;
    const uint64_t *zipf = (const uint64_t *)mb->table;
    const uint32_t *chase = (const uint32_t *)mb->table;
    const uint64_t pages = mb->table_len;
    uint64_t rng = mb->rng_state;
    uint64_t reads = 0, writes = 0, read_sum = 0, slot = 0, acc = 0;
    const uint64_t gap_threshold = mb->gap_threshold;
    uint64_t last = gap_threshold ? rdtsc() : 0;
    const uint64_t pace = mb->pace;
    if (pace && mb->pace_start == 0) mb->pace_start = rdtsc();
    const uint64_t pace_start = mb->pace_start;
    for (uint64_t i = 0; i < n; i++) {
        if (pace) {
            // A paced stream (a writer at a fixed rate): the schedule is absolute, so a pause
            // (a migration's downtime) is caught up afterwards, as a real writer's backlog.
            const uint64_t due = pace_start + i * pace;
            while (rdtsc() < due) __asm__ volatile("pause");
        }
        if (gap_threshold) {
            uint64_t t = rdtsc();
            if (t - last > gap_threshold) {
                uint64_t k = mb->gap_count & 63;
                mb->gap_log[2 * k] = last;
                mb->gap_log[2 * k + 1] = t - last;
                mb->gap_count = mb->gap_count + 1;
                if (t - last > mb->gap_max) mb->gap_max = t - last;
                const uint64_t sw = mb->switch_tsc;
                if (sw && last <= sw && sw <= t) mb->switch_gap = t - last;
            }
            last = t;
        }
        uint64_t offset;
        if (pattern == 0) {
            offset = (i * 64) % footprint;
        } else if (pattern == 1) {
            offset = (i * stride) % footprint;
        } else if (pattern == 2 || pattern == 5) {
            offset = memvirt_bounded(&rng, words) << 3;
        } else if (pattern == 3) {
            uint64_t u = memvirt_splitmix64_next(&rng) >> 11;
            uint64_t lo = 0, hi = pages - 1;
            while (lo < hi) {
                uint64_t mid = (lo + hi) >> 1;
                if (zipf[mid] >= u) hi = mid; else lo = mid + 1;
            }
            offset = (lo << 12) | (memvirt_bounded(&rng, 512) << 3);
        } else {
            offset = slot << 6;
            slot = chase[slot];
        }
        volatile uint64_t *p = (volatile uint64_t *)(base + offset);
        if (pattern == 5) {
            uint64_t x = *p;
            read_sum += x;
            *p = x ^ write_value(i, salt);
            writes++;
        } else {
            int write = 0;
            if (threshold == UINT64_MAX) write = 1;
            else if (threshold != 0 && memvirt_splitmix64_next(&rng) < threshold) write = 1;
            if (write) {
                *p = write_value(i, salt);
                writes++;
            } else {
                read_sum += *p;
                reads++;
            }
        }
        for (uint64_t c = 0; c < compute; c++) __asm__ volatile("add $1, %0" : "+r"(acc));
    }
    mb->rng_state = rng;
    mb->done_accesses = n;
    mb->reads = reads;
    mb->writes = writes;
    mb->read_sum = read_sum;
}

GI void checksum(volatile struct memvirt_mailbox *mb) {
    const uint64_t *w = (const uint64_t *)mb->base;
    const uint64_t words = mb->footprint >> 3;
    uint64_t h = 0;
    for (uint64_t k = 0; k < words; k++) h += w[k] * (2 * k + 1);
    mb->memory_checksum = h;
}

// Entry points for the multiboot image's main (multiboot.c), in this section.
__attribute__((visibility("hidden"))) GUEST void memvirt_guest_workload(volatile struct memvirt_mailbox *mb) { workload(mb); }
__attribute__((visibility("hidden"))) GUEST void memvirt_guest_checksum(volatile struct memvirt_mailbox *mb) { checksum(mb); }

GI void count_forever(volatile struct memvirt_mailbox *mb) {
    for (;;) mb->counter = mb->counter + 1;
}

GI void random_read_forever(volatile struct memvirt_mailbox *mb) {
    const uint64_t base = mb->base, words = mb->footprint >> 3, salt = mb->salt;
    uint64_t rng = mb->rng_state;
    for (;;) {
        uint64_t off = memvirt_bounded(&rng, words) << 3;
        uint64_t x = *(volatile uint64_t *)(base + off);
        if (x != memvirt_store_word(off, salt)) mb->mismatches = mb->mismatches + 1;
        mb->done_accesses = mb->done_accesses + 1;
    }
}

GI void write_passes(volatile struct memvirt_mailbox *mb) {
    const uint64_t base = mb->base, words = mb->footprint >> 3, n = mb->accesses, salt = mb->salt;
    const uint64_t compute = mb->compute;
    uint64_t w = 0, acc = 0, last = rdtsc(), gap = 0;
    for (uint64_t i = 0; n == 0 || i < n; i++) {
        *(volatile uint64_t *)(base + (w << 3)) = write_value(i, salt);
        if (++w == words) { w = 0; mb->passes = mb->passes + 1; }
        for (uint64_t c = 0; c < compute; c++) __asm__ volatile("add $1, %0" : "+r"(acc));
        uint64_t t = rdtsc();
        if (t - last > gap) { gap = t - last; mb->tsc_max_gap = gap; }
        last = t;
        mb->tsc_last = t;
        mb->done_accesses = i + 1;
    }
    mb->writes = n;
}

GI void fill_pages(volatile struct memvirt_mailbox *mb) {
    const uint64_t base = mb->base, pages = mb->footprint >> 12;
    const uint64_t *ids = (const uint64_t *)mb->table;
    for (uint64_t p = 0; p < pages; p++) {
        volatile uint64_t *w = (volatile uint64_t *)(base + (p << 12));
        const uint64_t id = ids[p];
        if (id == 0) {
            for (uint64_t k = 0; k < 512; k++) w[k] = 0;
        } else {
            for (uint64_t k = 0; k < 512; k++) w[k] = memvirt_fill_word(id, k);
        }
    }
    mb->writes = pages;
}

GI uint64_t tsc_fenced(void) {
    uint32_t lo, hi;
    __asm__ volatile("lfence; rdtsc; lfence" : "=a"(lo), "=d"(hi) : : "memory");
    return ((uint64_t)hi << 32) | lo;
}

// `kvm calibrate`: one timed event per sample, ticks into mb->list (see memvirt_calibrate_op).
GI void calibrate(volatile struct memvirt_mailbox *mb) {
    const uint64_t op = mb->pattern, base = mb->base, n = mb->count, stride = mb->stride;
    const uint64_t salt = mb->salt, other = mb->table;
    volatile uint64_t *out = (volatile uint64_t *)mb->list;
    if (op == MEMVIRT_CAL_PAIR_STRING_ROOT) {
        for (uint64_t i = 0; i < 2 * n; i++) out[i] = 0;
        for (uint64_t i = 0; i < n; i++) {
            uint64_t t[4];
            for (uint64_t j = 0; j < 2; j++) {
                // Re-shadow `other` as a root and leave it cached (the last string zapped it).
                __asm__ volatile("lea 1f(%%rip), %%rsi\n\txor %%ecx, %%ecx\n\tdivl %%ecx\n1:" : : "d"(other) : "rsi", "rcx", "rax", "memory");
                __asm__ volatile("lea 1f(%%rip), %%rsi\n\txor %%ecx, %%ecx\n\tdivl %%ecx\n1:" : : "d"(salt) : "rsi", "rcx", "rax", "memory");
                uint64_t c = j ? 512 : 1, d = other, s = other;
                t[2 * j] = tsc_fenced();
                __asm__ volatile("rep movsq" : "+c"(c), "+D"(d), "+S"(s) : : "memory");
                t[2 * j + 1] = tsc_fenced();
            }
            out[2 * i] = t[1] - t[0];
            out[2 * i + 1] = t[3] - t[2];
        }
        return;
    }
    if (op == MEMVIRT_CAL_PAIR_TOUCH || op == MEMVIRT_CAL_PAIR_PF || op == MEMVIRT_CAL_PAIR_INVLPG_STUB ||
        op == MEMVIRT_CAL_PAIR_CR3_STUB || op == MEMVIRT_CAL_PAIR_CR3_SWITCH_STUB) {
        for (uint64_t i = 0; i < 2 * n; i++) out[i] = 0;
        for (uint64_t i = 0; i < n; i++) {
            uint64_t t0 = tsc_fenced();
            *(volatile uint64_t *)(base + i * stride) = i + 1;
            uint64_t t1 = tsc_fenced();
            if (op == MEMVIRT_CAL_PAIR_TOUCH) {
                *(volatile uint64_t *)(other + i * stride) = i + 1;
            } else if (op == MEMVIRT_CAL_PAIR_INVLPG_STUB) {
                // As guest_ops.c's cpu_invlpg: the #UD stub runs INVLPG (%rdi), resumes at 1:.
                __asm__ volatile("lea 1f(%%rip), %%rsi\n\tud2\n1:" : : "D"(other) : "rsi", "memory");
            } else if (op == MEMVIRT_CAL_PAIR_CR3_STUB || op == MEMVIRT_CAL_PAIR_CR3_SWITCH_STUB) {
                // As guest_ops.c's cpu_load_cr3: the #DE stub loads CR3 := %rdx, resumes at 1:.
                const uint64_t cr3 = op == MEMVIRT_CAL_PAIR_CR3_STUB || (i & 1) ? salt : other;
                __asm__ volatile("lea 1f(%%rip), %%rsi\n\txor %%ecx, %%ecx\n\tdivl %%ecx\n1:" : : "d"(cr3) : "rsi", "rcx", "rax", "memory");
            } else {
                __asm__ volatile("lea 1f(%%rip), %%rsi\n\tmovq (%0), %%rax\n1:" : : "r"(other) : "rsi", "rax", "memory");
            }
            uint64_t t2 = tsc_fenced();
            out[2 * i] = t1 - t0;
            out[2 * i + 1] = t2 - t1;
        }
        return;
    }
    for (uint64_t i = 0; i < n; i++) out[i] = 0;  // map the output before timing
    for (uint64_t i = 0; i < n; i++) {
        uint64_t t0 = tsc_fenced();
        if (op == MEMVIRT_CAL_TOUCH_WRITE) {
            *(volatile uint64_t *)(base + i * stride) = i + 1;
        } else if (op == MEMVIRT_CAL_TOUCH_READ) {
            (void)*(volatile uint64_t *)(base + i * stride);
        } else if (op == MEMVIRT_CAL_PIO) {
            out32(MEMVIRT_PORT_PING, (uint32_t)i);
        } else if (op == MEMVIRT_CAL_MMIO) {
            *(volatile uint64_t *)base = i;
        } else if (op == MEMVIRT_CAL_CPUID) {
            uint32_t a = 0, b, c = 0, d;
            __asm__ volatile("cpuid" : "+a"(a), "=b"(b), "+c"(c), "=d"(d) : : "memory");
        } else if (op == MEMVIRT_CAL_GUEST_PF) {
            // The handler resumes at 1: with every register as it was (rax never loaded).
            __asm__ volatile("lea 1f(%%rip), %%rsi\n\tmovq (%0), %%rax\n1:" : : "r"(base) : "rsi", "rax", "memory");
        } else if (op == MEMVIRT_CAL_PT_WRITE) {
            *(volatile uint64_t *)base = salt;
        } else if (op == MEMVIRT_CAL_VMCALL) {
            uint64_t r = base;
            if (salt) __asm__ volatile("vmmcall" : "+a"(r) : : "rbx", "rcx", "rdx", "rsi", "memory");
            else __asm__ volatile("vmcall" : "+a"(r) : : "rbx", "rcx", "rdx", "rsi", "memory");
            if (other) *(volatile uint64_t *)other = r;  // the VMM reads what came back
        }
        uint64_t t1 = tsc_fenced();
        out[i] = t1 - t0;
        if (op == MEMVIRT_CAL_PT_WRITE) *(volatile uint64_t *)other = i;
    }
}

__attribute__((visibility("hidden"))) void memvirt_guest_ops(volatile struct memvirt_mailbox *mb);

GUEST void memvirt_guest_main(volatile struct memvirt_mailbox *mb) {
    for (;;) {
        uint64_t cmd = mb->command, status = MEMVIRT_STATUS_OK;
        if (cmd == MEMVIRT_CMD_WORKLOAD) {
            workload(mb);
        } else if (cmd == MEMVIRT_CMD_WRITE_LIST) {
            const uint64_t *list = (const uint64_t *)mb->list;
            uint64_t len = mb->list_len;
            for (uint64_t i = 0; i < len; i++) *(volatile uint64_t *)list[i] = i + 1;
            mb->writes = len;
        } else if (cmd == MEMVIRT_CMD_CHECKSUM) {
            checksum(mb);
        } else if (cmd == MEMVIRT_CMD_PING) {
            uint64_t count = mb->count;
            for (uint64_t i = 0; i < count; i++) out32(MEMVIRT_PORT_PING, (uint32_t)i);
        } else if (cmd == MEMVIRT_CMD_TOUCH_PAGES) {
            uint64_t count = mb->count, base = mb->base;
            out32(MEMVIRT_PORT_MARK, 0);
            for (uint64_t i = 0; i < count; i++) *(volatile uint64_t *)(base + (i << 12)) = i + 1;
            out32(MEMVIRT_PORT_MARK, 1);
        } else if (cmd == MEMVIRT_CMD_BAD_PORT) {
            out32(MEMVIRT_PORT_UNKNOWN, 0xbad);
        } else if (cmd == MEMVIRT_CMD_TOUCH_ADDRESS) {
            *(volatile uint64_t *)mb->list = 0x5a5a5a5a5a5a5a5aull;
        } else if (cmd == MEMVIRT_CMD_TRIPLE_FAULT) {
            // Point this vCPU's TSS.RSP0 at unmapped memory, then fault: delivering #UD
            // faults (#PF), delivering that faults (#DF), delivering #DF faults: shutdown.
            *(volatile uint64_t *)mb->list = mb->count;
            __asm__ volatile("ud2" : : : "memory");
        } else if (cmd == MEMVIRT_CMD_COUNT) {
            count_forever(mb);
        } else if (cmd == MEMVIRT_CMD_RANDOM_READ) {
            random_read_forever(mb);
        } else if (cmd == MEMVIRT_CMD_WRITE_PASSES) {
            write_passes(mb);
        } else if (cmd == MEMVIRT_CMD_FILL_PAGES) {
            fill_pages(mb);
        } else if (cmd == MEMVIRT_CMD_WRITE_LIST_MARKED) {
            const uint64_t *list = (const uint64_t *)mb->list;
            uint64_t len = mb->list_len, salt = mb->salt;
            out32(MEMVIRT_PORT_MARK, 0);
            for (uint64_t i = 0; i < len; i++) *(volatile uint64_t *)list[i] = (i + 1) ^ salt;
            out32(MEMVIRT_PORT_MARK, 1);
            mb->writes = len;
        } else if (cmd == MEMVIRT_CMD_CALIBRATE) {
            calibrate(mb);
        } else if (cmd == MEMVIRT_CMD_OPS) {
            memvirt_guest_ops(mb);
        } else {
            status = MEMVIRT_STATUS_BAD_COMMAND;
        }
        mb->status = status;
        out32(MEMVIRT_PORT_DONE, (uint32_t)status);
    }
}

// The host side: where the image is.
extern const char __start_memvirt_guest[];
extern const char __stop_memvirt_guest[];
extern const char memvirt_guest_trap_stubs[];
extern const char memvirt_guest_cpl0_loop[];
extern const char memvirt_guest_idle[];
extern const char memvirt_guest_calib_invlpg_loop[];
extern const char memvirt_guest_calib_cr3_loop[];
extern const char memvirt_guest_calib_pf_handler[];
extern const char memvirt_guest_ops_invlpg_handler[];
extern const char memvirt_guest_ops_cr3_handler[];
extern const char memvirt_guest_calib_hlt[];

void memvirt_guest_image_get(struct memvirt_guest_image *out) {
    const char *s = __start_memvirt_guest;
    out->start = s;
    out->size = (uint64_t)(__stop_memvirt_guest - s);
    out->entry_offset = (uint64_t)((const char *)memvirt_guest_main - s);
    out->trap_stubs_offset = (uint64_t)(memvirt_guest_trap_stubs - s);
    out->cpl0_loop_offset = (uint64_t)(memvirt_guest_cpl0_loop - s);
    out->idle_offset = (uint64_t)(memvirt_guest_idle - s);
    out->calib_invlpg_offset = (uint64_t)(memvirt_guest_calib_invlpg_loop - s);
    out->calib_cr3_offset = (uint64_t)(memvirt_guest_calib_cr3_loop - s);
    out->calib_pf_offset = (uint64_t)(memvirt_guest_calib_pf_handler - s);
    out->ops_invlpg_offset = (uint64_t)(memvirt_guest_ops_invlpg_handler - s);
    out->ops_cr3_offset = (uint64_t)(memvirt_guest_ops_cr3_handler - s);
    out->calib_hlt_offset = (uint64_t)(memvirt_guest_calib_hlt - s);
}
