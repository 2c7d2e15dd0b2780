// The guest runtime's interface with the VMM: the mailbox layout, the commands, the ports,
// and where the image lives in the host binary. Swift (MemVirtKVM) imports this header, so
// both sides share one layout.
//
// Protocol: the VMM fills a vCPU's mailbox and enters the guest at CPL3 in
// `memvirt_guest_main(mailbox)`. The guest runs `command`, writes the results into the
// mailbox and reports with `out` to MEMVIRT_PORT_DONE (32-bit value = status). The VMM may
// then write a new command and resume: the guest loops back and reads it.
//
// The CPL0 part is a table of 16-byte trap stubs, one per vector 0...47, each
// `out %al, $(MEMVIRT_PORT_VECTOR_BASE + vector)`: any exception or interrupt ends at the VMM
// at once (one emulated instruction, no register changed), which reads the frame from the
// vCPU's kernel stack. Vectors 32... are the interrupts of the VMM-side scheduler (LAPIC timer,
// async-PF "page ready"); `memvirt_guest_idle` (sti; hlt) is where a vCPU with no runnable
// guest thread waits for one. One more
// CPL0 routine, `memvirt_guest_cpl0_loop`, is entered directly by the VMM (it counts %rcx
// down, then exits through MEMVIRT_PORT_MARK) to time CPL0 instructions for `kvm probe`.
// (Software interrupts from CPL3 are not used: kvm_pvm answers `int n` with #UD.)
#pragma once
#include <stdint.h>
#include <stddef.h>

#define MEMVIRT_PORT_DONE 0x10
#define MEMVIRT_PORT_PING 0x11
#define MEMVIRT_PORT_MARK 0x12
/// Trap stubs: `out` to MEMVIRT_PORT_VECTOR_BASE + vector (0...47).
#define MEMVIRT_PORT_VECTOR_BASE 0xc0
#define MEMVIRT_TRAP_VECTORS 48
/// The LAPIC timer's vector (the scheduler's time slice).
#define MEMVIRT_VECTOR_TIMER 32
/// The async-PF "page ready" vector (MSR_KVM_ASYNC_PF_INT).
#define MEMVIRT_VECTOR_APF_READY 33
/// A port no device answers (the unknown-port test).
#define MEMVIRT_PORT_UNKNOWN 0x1234

#define MEMVIRT_TRAP_STUB_SIZE 16

enum memvirt_command {
    /// Run the workload stream (pattern, footprint, accesses, ...).
    MEMVIRT_CMD_WORKLOAD = 1,
    /// Write word 0 of each of the `list_len` GVAs in `list` (value: index + 1).
    MEMVIRT_CMD_WRITE_LIST = 2,
    /// memory_checksum = sum over the footprint's words w[k] of w[k] * (2k + 1) (mod 2^64).
    MEMVIRT_CMD_CHECKSUM = 3,
    /// `out` to MEMVIRT_PORT_PING `count` times.
    MEMVIRT_CMD_PING = 4,
    /// out MARK; write one word in each of `count` pages from `base` (4 KiB apart); out MARK.
    MEMVIRT_CMD_TOUCH_PAGES = 5,
    /// `out` to MEMVIRT_PORT_UNKNOWN.
    MEMVIRT_CMD_BAD_PORT = 7,
    /// Write 8 bytes at GVA `list` (anything: the MMIO-hole test points it at no memory).
    MEMVIRT_CMD_TOUCH_ADDRESS = 8,
    /// Write `count` at GVA `list` (the VMM passes this vCPU's TSS.RSP0 and an unmapped
    /// address), then ud2: every exception delivery faults, a triple fault.
    MEMVIRT_CMD_TRIPLE_FAULT = 9,
    /// Forever: `counter` += 1 (the working thread of the async-PF benchmark).
    MEMVIRT_CMD_COUNT = 10,
    /// Forever: read a uniformly random word w of [base, base + footprint) (SplitMix64 from
    /// `rng_state`), compare it with memvirt_store_word(w) (`salt`), count the read in
    /// `done_accesses` and a difference in `mismatches` (the faulting thread).
    MEMVIRT_CMD_RANDOM_READ = 11,
    /// `accesses` times: write word `i mod (footprint/8)` := v(i), for ever more (a writer
    /// for migration: each pass over the footprint adds 1 to `passes`), then reports DONE;
    /// `accesses` = 0 runs forever. Between writes, `compute` adds (sets the write rate).
    MEMVIRT_CMD_WRITE_PASSES = 12,
    /// For each page p of [base, base + footprint): write all 512 words of the page with
    /// memvirt_fill_word(table[p], k) (`table` has footprint/4096 uint64 content ids; id 0
    /// writes zeros). Same ids, same page content: the KSM experiment's duplicate pages.
    MEMVIRT_CMD_FILL_PAGES = 13,
    /// out MARK; word 0 of each of the `list_len` GVAs in `list` := (index + 1) ^ salt; out MARK.
    MEMVIRT_CMD_WRITE_LIST_MARKED = 14,
    /// `kvm calibrate`: `count` timed events of kind `pattern` (enum memvirt_calibrate_op);
    /// event i's TSC ticks (lfence; rdtsc around it) go to uint64 `list`[i]. The VMM reads
    /// them and converts with the guest TSC frequency.
    MEMVIRT_CMD_CALIBRATE = 15,
    /// Run a GuestOpScript on self-managed page tables (guest_ops.c): the
    /// `struct memvirt_ops_state` (memvirt_ops.h) is at GVA `table`.
    MEMVIRT_CMD_OPS = 16,
};

/// What MEMVIRT_CMD_CALIBRATE times, one event per sample.
enum memvirt_calibrate_op {
    /// Write word 0 of page `base` + i * `stride`.
    MEMVIRT_CAL_TOUCH_WRITE = 0,
    /// Read word 0 of page `base` + i * `stride`.
    MEMVIRT_CAL_TOUCH_READ = 1,
    /// `out` to MEMVIRT_PORT_PING (an exit to the VMM and back).
    MEMVIRT_CAL_PIO = 2,
    /// Write 8 bytes at `base` (a GVA no slot backs: an MMIO exit to the VMM and back).
    MEMVIRT_CAL_MMIO = 3,
    /// CPUID leaf 0 (an exit KVM handles in the kernel where CPUID is intercepted).
    MEMVIRT_CAL_CPUID = 4,
    /// Read `base` (mapped not-present in the guest's tables): the #PF is delivered to the
    /// calibration handler (memvirt_guest_calib_pf_handler), which resumes after the read.
    MEMVIRT_CAL_GUEST_PF = 5,
    /// Write `salt` to the uint64 at `base` (a guest page-table entry, the same value it
    /// holds), timed; then, untimed, write word 0 of page `table` (a page mapped through that
    /// entry), so KVM re-links the shadow entry the emulated write zapped.
    MEMVIRT_CAL_PT_WRITE = 6,
    /// VMCALL (VMMCALL on AMD, `salt` != 0) at CPL3 with %rax = `base` (a hypercall number
    /// KVM does not know): KVM refuses a hypercall from CPL3 (-KVM_EPERM in %rax) after the
    /// exit, so the event is an exit and KVM's hypercall entry, no service. %rax after it
    /// goes to the uint64 at `table` when nonzero.
    MEMVIRT_CAL_VMCALL = 7,
    /// Pairs, two timed events per sample (ticks to `list`[2i] and [2i + 1]): a write of word
    /// 0 of page `base` + i * `stride`, then a write of word 0 of page `table` + i * `stride`.
    MEMVIRT_CAL_PAIR_TOUCH = 8,
    /// Pairs: a write of word 0 of page `base` + i * `stride`, then a read of `table` (mapped
    /// not present: the #PF goes to the calibration handler, as MEMVIRT_CAL_GUEST_PF).
    MEMVIRT_CAL_PAIR_PF = 9,
    /// Pairs: a write of word 0 of page `base` + i * `stride`, then the page-table-editing
    /// guest's INVLPG stub entered from CPL3 as guest_ops.c enters it (`ud2` with %rdi =
    /// `table`, %rsi = the continuation; vector 6 at memvirt_guest_ops_invlpg_handler).
    MEMVIRT_CAL_PAIR_INVLPG_STUB = 10,
    /// Pairs: a write of word 0 of page `base` + i * `stride`, then the CR3 stub as guest_ops.c
    /// enters it (`div` by zero with %rdx = `salt`, the current CR3; vector 0 at
    /// memvirt_guest_ops_cr3_handler).
    MEMVIRT_CAL_PAIR_CR3_STUB = 11,
    /// As MEMVIRT_CAL_PAIR_CR3_STUB, switching roots: pair i loads `table` (i even) or `salt`
    /// (i odd), two roots mapping the same memory (`salt` the current one; `count` even).
    MEMVIRT_CAL_PAIR_CR3_SWITCH_STUB = 12,
    /// Pairs, a string store KVM emulates element by element: root `table` (a copy of the
    /// current root `salt`) made a cached shadow root (CR3 := `table`, CR3 := `salt` through the
    /// CR3 stub, untimed), then `rep movsq` of 1 element of it onto itself, timed; again, then
    /// of all 512, timed. The frame is a root in use, so KVM cannot unprotect and retry.
    MEMVIRT_CAL_PAIR_STRING_ROOT = 13,
};

/// Word k (0...511) of a page with content id `id` (nonzero) under FILL_PAGES: SplitMix64's
/// finalizer over id and k, so different ids give different pages.
static inline __attribute__((always_inline)) uint64_t memvirt_fill_word(uint64_t id, uint64_t k) {
    uint64_t z = id * 0x9E3779B97F4A7C15ull + (k + 1) * 0xD1B54A32D192ED03ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/// The word the page store holds at byte offset `off` of the data area (the faulting
/// thread's oracle).
static inline uint64_t memvirt_store_word(uint64_t off, uint64_t salt) {
    return (off * 0x9E3779B97F4A7C15ull) ^ salt ^ 0x5bd1e995ull;
}

enum memvirt_status { MEMVIRT_STATUS_OK = 0, MEMVIRT_STATUS_BAD_COMMAND = 1 };

/// One vCPU's mailbox (in guest memory, one page). VMM -> guest fields first.
///
/// The workload stream (MemVirtCore/Workload.swift documents the addresses): pattern codes
/// 0 sequential, 1 strided, 2 uniform, 3 zipf, 4 chase, 5 gups. What each access does, with
/// v(i) = ((i + 1) * 0x9E3779B97F4A7C15) ^ salt:
///   read:  x = *p; read_sum += x
///   write: *p = v(i)
///   gups:  x = *p; read_sum += x; *p = x ^ v(i)      (counted as a write)
/// then `compute` dependent adds.
struct memvirt_mailbox {
    uint64_t command;
    uint64_t pattern;
    uint64_t base;            // GVA of the workload memory
    uint64_t footprint;       // bytes, multiple of 4096
    uint64_t accesses;
    uint64_t rng_state;       // SplitMix64 state (derive(seed, thread), after Sattolo for chase)
    uint64_t write_threshold; // 0: never, UINT64_MAX: always, else write iff next() < threshold
    uint64_t stride;          // strided: bytes
    uint64_t compute;         // adds per access
    uint64_t table;           // GVA: zipf uint64 ceil(cdf[k] * 2^53), or chase uint32 next[]
    uint64_t table_len;       // entries
    uint64_t list;            // GVA of a uint64 GVA list (WRITE_LIST), or one GVA (TOUCH_ADDRESS)
    uint64_t list_len;
    uint64_t count;           // PING / TOUCH_PAGES / TRIPLE_FAULT
    uint64_t salt;
    uint64_t gap_threshold;   // WORKLOAD: log gaps between accesses longer than this (TSC ticks; 0: off)
    uint64_t pace;            // WORKLOAD: access i waits for TSC >= pace_start + i * pace (0: no pacing)
    uint64_t pace_start;      // WORKLOAD with pace: the TSC of access 0 (0: the guest's first rdtsc)
    uint64_t switch_tsc;      // WORKLOAD with gap_threshold: a logged gap spanning this TSC is kept in switch_gap
    uint64_t reserved_in[13];
    // guest -> VMM
    uint64_t status;
    uint64_t done_accesses;
    uint64_t reads;
    uint64_t writes;
    uint64_t read_sum;
    uint64_t memory_checksum;
    uint64_t counter;         // COUNT: increments
    uint64_t mismatches;      // RANDOM_READ: words that differed from the store's
    uint64_t passes;          // WRITE_PASSES: completed passes over the footprint
    uint64_t tsc_last;        // WRITE_PASSES: rdtsc at the last write
    uint64_t tsc_max_gap;     // WRITE_PASSES: the largest gap between two writes, TSC ticks
    uint64_t gap_count;       // WORKLOAD: gaps logged (the log keeps the last 64)
    uint64_t switch_gap;      // WORKLOAD: length (TSC ticks) of the logged gap spanning switch_tsc (a migration's downtime)
    uint64_t gap_max;         // WORKLOAD with gap_threshold: the longest gap of all (TSC ticks; the log keeps only 64)
    uint64_t reserved_out[2];
    /// WORKLOAD with gap_threshold: (start TSC, length) of each gap longer than the threshold,
    /// entry gap_count mod 64: how the guest itself sees a migration's downtime.
    uint64_t gap_log[128];
};

/// Where the guest image sits in this binary: copy `size` bytes from `start` to a guest
/// address; the offsets are from `start`.
struct memvirt_guest_image {
    const void *start;
    uint64_t size;
    uint64_t entry_offset;      // memvirt_guest_main(struct memvirt_mailbox *)
    uint64_t trap_stubs_offset; // stub for vector v at trap_stubs_offset + 16 * v (v < 32)
    uint64_t cpl0_loop_offset;  // memvirt_guest_cpl0_loop
    uint64_t idle_offset;       // memvirt_guest_idle
    uint64_t calib_invlpg_offset; // memvirt_guest_calib_invlpg_loop (CPL0, rcx = n, rdi = GVA)
    uint64_t calib_cr3_offset;    // memvirt_guest_calib_cr3_loop (CPL0, rcx = n, rdx = CR3 value)
    uint64_t calib_pf_offset;     // memvirt_guest_calib_pf_handler (#PF gate of the calibration guest)
    uint64_t ops_invlpg_offset;   // memvirt_guest_ops_invlpg_handler (#UD gate of the ops guest)
    uint64_t ops_cr3_offset;      // memvirt_guest_ops_cr3_handler (#DE gate of the ops guest)
    uint64_t calib_hlt_offset;    // memvirt_guest_calib_hlt (CPL0: HLT, then a MARK exit)
};

void memvirt_guest_image_get(struct memvirt_guest_image *out);
