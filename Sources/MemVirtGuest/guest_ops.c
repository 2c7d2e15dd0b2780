// The guest runtime's page-table-editing mode: a small guest kernel that runs a MemVirtCore
// `GuestOpScript` (encoded by Sources/MemVirtKVM/Guest/GuestOpsEncoding.swift, layout in
// memvirt_ops.h) on address spaces whose page tables it builds and edits while it runs.
//
// Policy: the same as the model's SimulatedGuestKernel (Sources/MemVirtModel/Guest), write
// for write, so KVM's shadow-MMU counters can be compared with the model's:
//   - frames: a LIFO stack of freed 4 KiB frames, else the next never-used one (FrameAllocator);
//   - a demand fault allocates the data frame, zeroes it, then builds the missing tables
//     (each a fresh zeroed page referenced by a P|W|U entry), then writes the leaf P|U(|W);
//   - a write to a copy-on-write page copies it when the frame is still shared (else takes it
//     over), writes the PTE (W|D added) and INVLPGs the page (do_wp_page);
//   - protect rewrites every present PTE of the region, unmap clears them (frames released),
//     fork write-protects the parent's writable PTEs and shares every frame with the child;
//     each then flushes the changed pages: INVLPG each up to `ceiling`, else a CR3 reload of
//     the current space (flush_tlb_mm_range's tlb_single_page_flush_ceiling);
//   - exit clears every present PTE (frames released) and frees the space's page-table pages
//     in allocation order (root first); no flush.
// Where it differs from the model (kernel mappings every space needs), docs/guest-ops.md says.
//
// The same rules as guest.c: section memvirt_guest, always_inline helpers, no globals, no
// libc (bulk zeroing and copying are `rep stosq` / `rep movsq`), no jump tables.
#include "memvirt_guest.h"
#include "memvirt_prng.h"
#include "memvirt_ops.h"

#define GUEST __attribute__((section("memvirt_guest"), used, noinline, no_stack_protector))
#define GI MEMVIRT_INLINE

#define PTE_P 1ull
#define PTE_W 2ull
#define PTE_U 4ull
#define PTE_A 0x20ull
#define PTE_D 0x40ull
#define PTE_PS 0x80ull
#define PTE_ADDR 0x000ffffffffff000ull
#define CR3_NOFLUSH (1ull << 63)
/// GuestOpScript.regionBase(0) (WorkloadSpec.defaultBase): PML4[0], PDPT[256 + region].
#define REGION_BASE 0x0000004000000000ull
#define REGION_PDPT_INDEX 256
#define GOLDEN 0x9E3779B97F4A7C15ull
/// link[] mark of a freed page-table frame (until it is handed out again).
#define FREED_TABLE 0x80000000u

typedef struct memvirt_ops_state ops_state;
typedef struct memvirt_ops_space ops_space;

// ---- CPL0 entries (stubs.S): each a deliberate exception whose 3-instruction handler does
// the privileged work and resumes at the address in %rsi.

GI void cpu_invlpg(uint64_t va) {
    __asm__ volatile("lea 1f(%%rip), %%rsi\n\tud2\n1:" : : "D"(va) : "rsi", "memory");
}

GI void cpu_load_cr3(uint64_t v) {
    __asm__ volatile("lea 1f(%%rip), %%rsi\n\txor %%ecx, %%ecx\n\tdivl %%ecx\n1:" : : "d"(v) : "rsi", "rcx", "rax", "memory");
}

/// Reads the word at `va`; 0 when the read faulted (the #PF handler resumed at label 1).
GI uint64_t try_read(uint64_t va, uint64_t *out) {
    uint64_t v, fault;
    __asm__ volatile(
        "lea 1f(%%rip), %%rsi\n\t"
        "movq (%2), %0\n\t"
        "xorl %k1, %k1\n\t"
        "jmp 2f\n"
        "1: movl $1, %k1\n"
        "2:"
        : "=&a"(v), "=&c"(fault) : "r"(va) : "rsi", "memory");
    *out = v;
    return !fault;
}

GI uint64_t try_write(uint64_t va, uint64_t value) {
    uint64_t fault;
    __asm__ volatile(
        "lea 1f(%%rip), %%rsi\n\t"
        "movq %2, (%1)\n\t"
        "xorl %k0, %k0\n\t"
        "jmp 2f\n"
        "1: movl $1, %k0\n"
        "2:"
        : "=&c"(fault) : "r"(va), "r"(value) : "rsi", "memory");
    return !fault;
}

GI void zero_page(uint64_t va) {
    uint64_t c = 512, d = va;
    __asm__ volatile("rep stosq" : "+c"(c), "+D"(d) : "a"(0ull) : "memory");
}

GI void copy_words(uint64_t dst, uint64_t src, uint64_t words) {
    uint64_t c = words, d = dst, s = src;
    __asm__ volatile("rep movsq" : "+c"(c), "+D"(d), "+S"(s) : : "memory");
}

// ---- frames

GI uint64_t frame_gpa(ops_state *s, uint64_t i) { return s->pool_gpa + (i << 12); }
GI uint64_t frame_index(ops_state *s, uint64_t gpa) { return (gpa - s->pool_gpa) >> 12; }
/// The direct map: where CPL3 reaches a pool frame.
GI volatile uint64_t *frame_ptr(ops_state *s, uint64_t gpa) { return (volatile uint64_t *)(s->pool_gva + (gpa - s->pool_gpa)); }

GI void fail(ops_state *s, uint64_t error, uint64_t detail) {
    if (s->error == 0) { s->error = error; s->error_detail = detail; }
}

GI int alloc_frame(ops_state *s, uint64_t *out) {
    uint32_t *stack = (uint32_t *)s->free_stack;
    uint64_t i;
    if (s->free_top) {
        s->free_top = s->free_top - 1;
        i = stack[s->free_top];
    } else if (s->bump < s->pool_frames) {
        i = s->bump;
        s->bump = i + 1;
    } else {
        fail(s, MEMVIRT_OPS_NO_FRAMES, s->pool_frames);
        return 0;
    }
    s->frames_in_use = s->frames_in_use + 1;
    if (s->frames_in_use > s->peak_frames) s->peak_frames = s->frames_in_use;
    uint32_t *link = (uint32_t *)s->link;
    if (link[i] & FREED_TABLE) {
        // A frame the shadow MMU may still shadow as a page table (an exited space's).
        s->reused_table_frames = s->reused_table_frames + 1;
        link[i] = 0;
    }
    *out = frame_gpa(s, i);
    return 1;
}

GI void free_frame(ops_state *s, uint64_t gpa) {
    uint32_t *stack = (uint32_t *)s->free_stack;
    stack[s->free_top] = (uint32_t)frame_index(s, gpa);
    s->free_top = s->free_top + 1;
    s->frames_in_use = s->frames_in_use - 1;
}

/// Drops one mapping of a data frame; frees it with the last.
GI void release(ops_state *s, uint64_t gpa) {
    uint32_t *share = (uint32_t *)s->share;
    uint64_t i = frame_index(s, gpa);
    if (share[i]) share[i] = share[i] - 1;
    else free_frame(s, gpa);
}

/// A zeroed page-table page of `sp` (kept on its list, in allocation order).
GI int alloc_table(ops_state *s, ops_space *sp, uint64_t *out) {
    uint64_t t;
    if (!alloc_frame(s, &t)) return 0;
    zero_page((uint64_t)frame_ptr(s, t));
    s->frames_zeroed = s->frames_zeroed + 1;
    s->table_pages = s->table_pages + 1;
    uint32_t *link = (uint32_t *)s->link;
    uint64_t i = frame_index(s, t);
    link[i] = 0;
    if (sp->tables_tail) link[sp->tables_tail - 1] = (uint32_t)(i + 1);
    else sp->tables_head = i + 1;
    sp->tables_tail = i + 1;
    *out = t;
    return 1;
}

GI void write_entry(volatile uint64_t *slot, uint64_t v) { *slot = v; }

// ---- TLB

GI uint64_t cr3_value(ops_state *s, ops_space *sp, int noflush) {
    if (!s->pcid) return sp->root;
    return sp->root | sp->pcid | (noflush ? CR3_NOFLUSH : 0);
}

/// A full flush of the current space: a CR3 reload without the no-flush bit.
GI void flush_all(ops_state *s) {
    ops_space *sp = &s->spaces[s->current];
    cpu_load_cr3(cr3_value(s, sp, 0));
    s->cr3_loads = s->cr3_loads + 1;
    s->full_flushes = s->full_flushes + 1;
}

/// Flushes `n` changed pages of the current space (`vas` holds the first ceiling + 1).
GI void flush_pages(ops_state *s, const uint64_t *vas, uint64_t n) {
    if (n == 0) return;
    if (n <= s->ceiling) {
        for (uint64_t k = 0; k < n; k++) {
            cpu_invlpg(vas[k]);
            s->invlpg = s->invlpg + 1;
        }
    } else {
        flush_all(s);
    }
}

GI void note_changed(ops_state *s, uint64_t *vas, uint64_t *n, uint64_t va) {
    if (*n <= s->ceiling) vas[*n] = va;
    *n = *n + 1;
}

// ---- page tables

/// The level-1 slot of `va` in `sp`, building missing tables when `create` (else 0 when a
/// table on the way is missing).
GI volatile uint64_t *leaf_slot(ops_state *s, ops_space *sp, uint64_t va, int create) {
    volatile uint64_t *table = frame_ptr(s, sp->pdpt);
    uint64_t idx[3] = {(va >> 30) & 511, (va >> 21) & 511, (va >> 12) & 511};
    for (int level = 0; level < 2; level++) {
        volatile uint64_t *slot = &table[idx[level]];
        uint64_t e = *slot;
        if (!(e & PTE_P)) {
            if (!create) return 0;
            uint64_t t;
            if (!alloc_table(s, sp, &t)) return 0;
            e = t | PTE_P | PTE_W | PTE_U;
            write_entry(slot, e);
            s->table_writes = s->table_writes + 1;
        }
        table = frame_ptr(s, e & PTE_ADDR);
    }
    return &table[idx[2]];
}

GI uint64_t region_base(uint64_t r) { return REGION_BASE + (r << 30); }

enum visit_mode { VISIT_PROTECT, VISIT_UNMAP, VISIT_FORK, VISIT_EXIT, VISIT_CHECKSUM };

/// Every present leaf of region `r` of `sp`, in address order, with the operation's work.
GI void visit_region(ops_state *s, ops_space *sp, uint64_t r, int mode, uint64_t arg,
                     ops_space *child, uint64_t *vas, uint64_t *n, uint64_t *sum, uint64_t key) {
    volatile uint64_t *pdpt = frame_ptr(s, sp->pdpt);
    uint64_t pdpte = pdpt[REGION_PDPT_INDEX + r];
    if (!(pdpte & PTE_P)) return;
    volatile uint64_t *pd = frame_ptr(s, pdpte & PTE_ADDR);
    uint32_t *share = (uint32_t *)s->share;
    for (uint64_t i2 = 0; i2 < 512; i2++) {
        uint64_t pde = pd[i2];
        if (!(pde & PTE_P)) continue;
        volatile uint64_t *pt = frame_ptr(s, pde & PTE_ADDR);
        for (uint64_t i1 = 0; i1 < 512; i1++) {
            uint64_t e = pt[i1];
            if (!(e & PTE_P)) continue;
            const uint64_t page = (i2 << 9) | i1;
            const uint64_t va = region_base(r) + (page << 12);
            const uint64_t frame = e & PTE_ADDR;
            if (mode == VISIT_PROTECT) {
                uint64_t v = e & ~PTE_W;
                if (arg && share[frame_index(s, frame)] == 0) v |= PTE_W;
                write_entry(&pt[i1], v);
                s->leaf_writes = s->leaf_writes + 1;
                note_changed(s, vas, n, va);
            } else if (mode == VISIT_UNMAP || mode == VISIT_EXIT) {
                write_entry(&pt[i1], 0);
                s->leaf_writes = s->leaf_writes + 1;
                release(s, frame);
                s->pages_unmapped = s->pages_unmapped + 1;
                if (mode == VISIT_UNMAP) note_changed(s, vas, n, va);
            } else if (mode == VISIT_FORK) {
                if (e & PTE_W) {
                    e &= ~PTE_W;
                    write_entry(&pt[i1], e);
                    s->leaf_writes = s->leaf_writes + 1;
                    note_changed(s, vas, n, va);
                }
                share[frame_index(s, frame)] = share[frame_index(s, frame)] + 1;
                volatile uint64_t *slot = leaf_slot(s, child, va, 1);
                if (!slot) return;
                write_entry(slot, e & ~(PTE_A | PTE_D | PTE_PS));
                s->leaf_writes = s->leaf_writes + 1;
            } else {
                const uint64_t k = key | page;
                *sum += frame_ptr(s, frame)[0] * (2 * k + 1);
            }
        }
    }
}

// ---- address spaces

/// A new space (`id`): root and PDPT zeroed, the kernel's entries written (PML4[0] -> its
/// PDPT, PML4[1] = the direct map, PDPT[0...] = the runtime), a PCID as the model hands them.
GI int create_space(ops_state *s, uint64_t id) {
    ops_space *sp = &s->spaces[id];
    sp->tables_head = 0;
    sp->tables_tail = 0;
    uint64_t root, pdpt;
    if (!alloc_table(s, sp, &root)) return 0;
    if (!alloc_table(s, sp, &pdpt)) return 0;
    sp->root = root;
    sp->pdpt = pdpt;
    volatile uint64_t *r = frame_ptr(s, root), *p = frame_ptr(s, pdpt);
    write_entry(&r[0], pdpt | PTE_P | PTE_W | PTE_U);
    write_entry(&r[1], s->kernel_pml4e1);
    for (uint64_t k = 0; k < s->kernel_pdpte_count; k++) write_entry(&p[k], s->kernel_pdpte[k]);
    s->kernel_writes = s->kernel_writes + 2 + s->kernel_pdpte_count;
    // PCIDs 1...4095 round robin, skipping live spaces'; after a wrap the first load of a
    // (possibly reused) PCID flushes it (SimulatedGuestKernel.createAddressSpace).
    uint64_t pcid = s->next_pcid, tried = 0;
    for (;;) {
        int used = 0;
        for (uint64_t j = 0; j < MEMVIRT_OPS_MAX_SPACES; j++)
            if (s->spaces[j].live && s->spaces[j].pcid == pcid) used = 1;
        if (!used) break;
        if (++tried >= 4095) { fail(s, MEMVIRT_OPS_NO_SPACE, id); return 0; }
        if (pcid == 4095) { s->pcids_wrapped = 1; pcid = 1; } else pcid++;
    }
    sp->flush_on_first_load = s->pcids_wrapped;
    if (pcid == 4095) { s->pcids_wrapped = 1; s->next_pcid = 1; } else s->next_pcid = pcid + 1;
    sp->pcid = pcid;
    sp->live = 1;
    return 1;
}

GI void op_fork(ops_state *s) {
    uint64_t id = 0;
    while (id < MEMVIRT_OPS_MAX_SPACES && s->spaces[id].live) id++;
    if (id == MEMVIRT_OPS_MAX_SPACES) { fail(s, MEMVIRT_OPS_NO_SPACE, id); return; }
    ops_space *parent = &s->spaces[s->current], *child = &s->spaces[id];
    if (!create_space(s, id)) return;
    copy_words((uint64_t)child->regions, (uint64_t)parent->regions, sizeof(parent->regions) / 8);
    uint64_t vas[MEMVIRT_OPS_MAX_CEILING + 1], n = 0;
    for (uint64_t r = 0; r < MEMVIRT_OPS_MAX_REGIONS; r++) {
        child->regions[r].used = child->regions[r].mapped;
        if (parent->regions[r].used) visit_region(s, parent, r, VISIT_FORK, 0, child, vas, &n, 0, 0);
        if (s->error) return;
    }
    flush_pages(s, vas, n);
    s->forks = s->forks + 1;
}

GI void op_exit(ops_state *s, uint64_t id) {
    ops_space *sp = &s->spaces[id];
    uint64_t n = 0;
    for (uint64_t r = 0; r < MEMVIRT_OPS_MAX_REGIONS; r++)
        if (sp->regions[r].used) visit_region(s, sp, r, VISIT_EXIT, 0, 0, 0, &n, 0, 0);
    uint32_t *link = (uint32_t *)s->link;
    for (uint64_t i = sp->tables_head; i;) {
        uint64_t next = link[i - 1];
        free_frame(s, frame_gpa(s, i - 1));
        link[i - 1] = FREED_TABLE;
        i = next;
    }
    sp->tables_head = sp->tables_tail = 0;
    for (uint64_t r = 0; r < MEMVIRT_OPS_MAX_REGIONS; r++) {
        sp->regions[r].mapped = 0;
        sp->regions[r].used = 0;
        sp->regions[r].pages = 0;
    }
    sp->live = 0;
    s->exits = s->exits + 1;
}

GI void op_switch(ops_state *s, uint64_t id) {
    ops_space *sp = &s->spaces[id];
    const int noflush = !sp->flush_on_first_load;
    sp->flush_on_first_load = 0;
    cpu_load_cr3(cr3_value(s, sp, noflush));
    s->cr3_loads = s->cr3_loads + 1;
    if (s->pcid && noflush) s->cr3_noflush = s->cr3_noflush + 1;
    s->current = id;
}

/// The guest's #PF handling for an access to `va` that faulted (the CPL0 stub only resumed
/// here): demand-zero, copy-on-write, or spurious. 0 when the access is not allowed.
GI int handle_fault(ops_state *s, uint64_t va, int write) {
    ops_space *sp = &s->spaces[s->current];
    s->guest_pf = s->guest_pf + 1;
    const uint64_t r = (va - REGION_BASE) >> 30, page = ((va - REGION_BASE) >> 12) & 0x3ffff;
    if (va < REGION_BASE || r >= MEMVIRT_OPS_MAX_REGIONS || !sp->regions[r].mapped || page >= sp->regions[r].pages ||
        (write && !sp->regions[r].writable)) {
        fail(s, MEMVIRT_OPS_SEGV, va);
        return 0;
    }
    volatile uint64_t *slot = leaf_slot(s, sp, va, 0);
    uint64_t e = slot ? *slot : 0;
    if (e & PTE_P) {
        if (write && !(e & PTE_W)) {
            // do_wp_page: copy while shared, else take the frame over.
            uint64_t frame = e & PTE_ADDR, target = frame;
            uint32_t *share = (uint32_t *)s->share;
            if (share[frame_index(s, frame)]) {
                if (!alloc_frame(s, &target)) return 0;
                copy_words((uint64_t)frame_ptr(s, target), (uint64_t)frame_ptr(s, frame), 512);
                release(s, frame);
                s->cow_copies = s->cow_copies + 1;
            }
            write_entry(slot, (e & ~PTE_ADDR) | target | PTE_W | PTE_D);
            s->leaf_writes = s->leaf_writes + 1;
            cpu_invlpg(va & ~0xfffull);
            s->invlpg = s->invlpg + 1;
            s->cow_faults = s->cow_faults + 1;
        } else {
            s->spurious = s->spurious + 1;
        }
        return 1;
    }
    uint64_t frame;
    if (!alloc_frame(s, &frame)) return 0;
    zero_page((uint64_t)frame_ptr(s, frame));
    s->frames_zeroed = s->frames_zeroed + 1;
    slot = leaf_slot(s, sp, va, 1);
    if (!slot) return 0;
    write_entry(slot, frame | PTE_P | PTE_U | (sp->regions[r].writable ? PTE_W : 0));
    s->leaf_writes = s->leaf_writes + 1;
    s->demand_zero = s->demand_zero + 1;
    return 1;
}

GI void op_touch(ops_state *s, uint64_t r, uint64_t count, uint64_t flags) {
    ops_space *sp = &s->spaces[s->current];
    const uint64_t pages = sp->regions[r].pages, base = region_base(r);
    const int uniform = flags & 1, write = (flags >> 1) & 1;
    uint64_t rng = s->rng, sum = 0;
    for (uint64_t i = 0; i < count; i++) {
        const uint64_t page = uniform ? memvirt_bounded(&rng, pages) : i % pages;
        const uint64_t va = base + (page << 12);
        if (write) {
            const uint64_t v = (s->touches + 1) * GOLDEN;
            while (!try_write(va, v)) if (!handle_fault(s, va, 1)) { s->rng = rng; return; }
            s->writes = s->writes + 1;
        } else {
            uint64_t x;
            while (!try_read(va, &x)) if (!handle_fault(s, va, 0)) { s->rng = rng; return; }
            sum += x;
            s->reads = s->reads + 1;
        }
        s->touches = s->touches + 1;
    }
    s->read_sum = s->read_sum + sum;
    s->rng = rng;
}

/// Sum over live spaces (by id), their mapped regions and present pages of word 0 of the
/// page * (2k + 1), k = ((space * 64 + region) << 18) | page, read through the direct map.
GI void final_checksum(ops_state *s) {
    uint64_t sum = 0;
    for (uint64_t id = 0; id < MEMVIRT_OPS_MAX_SPACES; id++) {
        ops_space *sp = &s->spaces[id];
        if (!sp->live) continue;
        for (uint64_t r = 0; r < MEMVIRT_OPS_MAX_REGIONS; r++)
            if (sp->regions[r].mapped) visit_region(s, sp, r, VISIT_CHECKSUM, 0, 0, 0, 0, &sum, ((id * 64) + r) << 18);
    }
    s->checksum = sum;
}

/// Warm-up: the state, the arrays, the script and the code get their shadow entries, and
/// each CPL0 stub runs once (its code and the kernel stack), so the measured run that follows
/// sees only the script's own events.
GI void prepare(ops_state *s) {
    for (uint64_t a = (uint64_t)s; a < (uint64_t)(s + 1); a += 4096) *(volatile uint64_t *)a = *(volatile uint64_t *)a;
    *(volatile uint64_t *)((uint64_t)(s + 1) - 8) = *(volatile uint64_t *)((uint64_t)(s + 1) - 8);
    const uint64_t arrays[3] = {s->share, s->link, s->free_stack};
    for (int k = 0; k < 3; k++)
        for (uint64_t a = arrays[k]; a < arrays[k] + s->pool_frames * 4; a += 4096) *(volatile uint32_t *)a = 0;
    uint64_t x = 0;
    for (uint64_t a = s->script; a < s->script + s->script_ops * 32; a += 4096) x += *(volatile uint64_t *)a;
    for (uint64_t a = s->image_gva; a < s->image_gva + s->image_bytes; a += 4096) x += *(volatile uint64_t *)a;
    s->reserved_out[0] = x;
    cpu_invlpg(REGION_BASE);
    (void)try_read(REGION_BASE + ((uint64_t)(MEMVIRT_OPS_MAX_REGIONS - 1) << 30), &x);
    cpu_load_cr3(cr3_value(s, &s->spaces[s->current], 1));
}

GI int valid_region(ops_state *s, uint64_t r) {
    if (r < MEMVIRT_OPS_MAX_REGIONS) return 1;
    fail(s, MEMVIRT_OPS_BAD_OP, r);
    return 0;
}

GI int valid_space(ops_state *s, uint64_t id) {
    if (id < MEMVIRT_OPS_MAX_SPACES && s->spaces[id].live) return 1;
    fail(s, MEMVIRT_OPS_BAD_OP, id);
    return 0;
}

GI void run_script(ops_state *s) {
    const uint64_t *ops = (const uint64_t *)s->script;
    uint64_t loop_start[MEMVIRT_OPS_MAX_DEPTH], loop_left[MEMVIRT_OPS_MAX_DEPTH];
    uint64_t depth = 0, pc = 0;
    while (pc < s->script_ops && s->error == 0) {
        const uint64_t *op = ops + 4 * pc;
        const uint64_t code = op[0], a = op[1], b = op[2], c = op[3];
        s->error_op = pc;
        ops_space *sp = &s->spaces[s->current];
        if (code == MEMVIRT_OP_END) break;
        if (code == MEMVIRT_OP_LOOP) {
            if (a == 0) { pc = b; continue; }
            if (depth == MEMVIRT_OPS_MAX_DEPTH) { fail(s, MEMVIRT_OPS_BAD_OP, depth); break; }
            loop_start[depth] = pc + 1;
            loop_left[depth] = a;
            depth++;
            pc++;
            continue;
        }
        if (code == MEMVIRT_OP_LOOP_END) {
            if (depth == 0) { fail(s, MEMVIRT_OPS_BAD_OP, pc); break; }
            if (--loop_left[depth - 1] > 0) {
                pc = loop_start[depth - 1];
            } else {
                depth--;
                pc++;
            }
            continue;
        }
        s->ops_executed = s->ops_executed + 1;
        if (code == MEMVIRT_OP_MAP) {
            if (!valid_region(s, a)) break;
            if (sp->regions[a].mapped || b == 0 || b > (1ull << 18)) { fail(s, MEMVIRT_OPS_BAD_OP, a); break; }
            sp->regions[a].pages = (uint32_t)b;
            sp->regions[a].writable = c ? 1 : 0;
            sp->regions[a].mapped = 1;
            sp->regions[a].used = 1;
        } else if (code == MEMVIRT_OP_TOUCH) {
            if (!valid_region(s, a)) break;
            if (!sp->regions[a].mapped) { fail(s, MEMVIRT_OPS_BAD_OP, a); break; }
            op_touch(s, a, b, c);
        } else if (code == MEMVIRT_OP_PROTECT || code == MEMVIRT_OP_UNMAP) {
            if (!valid_region(s, a)) break;
            if (!sp->regions[a].mapped) { fail(s, MEMVIRT_OPS_BAD_OP, a); break; }
            uint64_t vas[MEMVIRT_OPS_MAX_CEILING + 1], n = 0;
            visit_region(s, sp, a, code == MEMVIRT_OP_PROTECT ? VISIT_PROTECT : VISIT_UNMAP, b, 0, vas, &n, 0, 0);
            flush_pages(s, vas, n);
            if (code == MEMVIRT_OP_PROTECT) sp->regions[a].writable = b ? 1 : 0;
            else sp->regions[a].mapped = 0;
        } else if (code == MEMVIRT_OP_FORK) {
            op_fork(s);
        } else if (code == MEMVIRT_OP_SWITCH) {
            if (!valid_space(s, a)) break;
            op_switch(s, a);
        } else if (code == MEMVIRT_OP_EXIT) {
            if (!valid_space(s, a) || a == s->current) { fail(s, MEMVIRT_OPS_BAD_OP, a); break; }
            op_exit(s, a);
        } else {
            fail(s, MEMVIRT_OPS_BAD_OP, code);
            break;
        }
        pc++;
    }
    if (s->error == 0) s->error_op = 0;
    final_checksum(s);
}

/// MEMVIRT_CMD_OPS: the state is at mailbox `table`.
__attribute__((visibility("hidden"))) GUEST void memvirt_guest_ops(volatile struct memvirt_mailbox *mb) {
    ops_state *s = (ops_state *)mb->table;
    if (s->prepare_only) prepare(s);
    else run_script(s);
}
