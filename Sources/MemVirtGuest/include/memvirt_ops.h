// The guest runtime's page-table-editing mode (MEMVIRT_CMD_OPS, guest_ops.c): a guest kernel
// that runs a MemVirtCore `GuestOpScript` on address spaces whose page tables it builds and
// edits itself while it runs, so KVM's shadow MMU sees real guest page-table writes, INVLPGs
// and CR3 loads. Swift (MemVirtKVM/Guest/GuestOps*.swift) encodes the script, builds the
// first address space and reads the counts back; this header is the shared layout.
//
// Memory: the VMM's runtime (identity-mapped, GuestLayout) holds the code, this state, the
// encoded script and the per-frame arrays; the data slot is the guest kernel's frame pool
// (page-table pages and data frames, 4 KiB each), mapped for CPL3 at `pool_gva` (the "direct
// map", 2 MiB pages built by the VMM) so the kernel's work (zeroing, copying, PTE writes)
// runs natively at CPL3. CPL0 runs only three 3-instruction stubs (stubs.S):
//   #PF (vector 14): add $8,%rsp; mov %rsi,(%rsp); iretq      (resume at the CPL3 fault path)
//   #UD (vector 6, `ud2`): invlpg (%rdi); mov %rsi,(%rsp); iretq          (INVLPG)
//   #DE (vector 0, `div` by 0): mov %rdx,%cr3; mov %rsi,(%rsp); iretq   (CR3 load)
#pragma once
#include <stdint.h>

/// One encoded operation: 4 uint64 words {code, a, b, c}.
enum memvirt_op_code {
    /// End of the script.
    MEMVIRT_OP_END = 0,
    /// a = region, b = pages, c = writable (0/1).
    MEMVIRT_OP_MAP = 1,
    /// a = region, b = count, c = bit 0: uniform order, bit 1: write.
    MEMVIRT_OP_TOUCH = 2,
    /// a = region, b = writable.
    MEMVIRT_OP_PROTECT = 3,
    /// a = region.
    MEMVIRT_OP_UNMAP = 4,
    MEMVIRT_OP_FORK = 5,
    /// a = space.
    MEMVIRT_OP_SWITCH = 6,
    /// a = space.
    MEMVIRT_OP_EXIT = 7,
    /// a = count, b = index of the op after the matching LOOP_END (the body follows).
    MEMVIRT_OP_LOOP = 8,
    /// Closes the innermost loop's body.
    MEMVIRT_OP_LOOP_END = 9,
};

#define MEMVIRT_OPS_MAX_SPACES 64
#define MEMVIRT_OPS_MAX_REGIONS 64
#define MEMVIRT_OPS_MAX_DEPTH 16
/// Linux's tlb_single_page_flush_ceiling can be set up to this many pages here.
#define MEMVIRT_OPS_MAX_CEILING 64

/// What stopped a script (state.error).
enum memvirt_ops_error {
    MEMVIRT_OPS_OK = 0,
    /// The frame pool is exhausted (detail: frames in the pool).
    MEMVIRT_OPS_NO_FRAMES = 1,
    /// An access no region allows (detail: the address).
    MEMVIRT_OPS_SEGV = 2,
    /// An op names a space or region that is not there (detail: the id).
    MEMVIRT_OPS_BAD_OP = 3,
    /// No free space id / PCID.
    MEMVIRT_OPS_NO_SPACE = 4,
};

struct memvirt_ops_region {
    uint32_t pages;
    uint8_t mapped;
    uint8_t writable;
    uint8_t used;    // ever mapped in this space: its page-directory entry may exist
    uint8_t pad;
};

struct memvirt_ops_space {
    uint64_t root;         // GPA of the PML4 (what CR3 holds, without the PCID)
    uint64_t pdpt;         // GPA of the PDPT under PML4[0] (runtime entries + the regions)
    uint64_t pcid;
    uint64_t live;
    uint64_t flush_on_first_load; // a reused PCID: the first CR3 load flushes it
    uint64_t tables_head;  // pool frame index + 1 of the first page-table page (0: none)
    uint64_t tables_tail;
    uint64_t reserved;
    struct memvirt_ops_region regions[MEMVIRT_OPS_MAX_REGIONS];
};

/// The state of one script run (in the runtime, at mailbox `table`). VMM -> guest first.
struct memvirt_ops_state {
    uint64_t script;        // GVA of the encoded ops (4 words each)
    uint64_t script_ops;
    uint64_t pcid;          // CR4.PCIDE is on: CR3 loads carry PCIDs and the no-flush bit
    uint64_t seed;          // SplitMix64 state of the uniform touches
    uint64_t pool_gpa;      // frame i is at pool_gpa + 4096 i, mapped at pool_gva + 4096 i
    uint64_t pool_gva;
    uint64_t pool_frames;
    uint64_t share;         // GVA of uint32 share[pool_frames]: mappings - 1 of a data frame
    uint64_t link;          // GVA of uint32 link[pool_frames]: a space's next table page (+1)
    uint64_t free_stack;    // GVA of uint32 free_stack[pool_frames] (LIFO of freed frames)
    uint64_t kernel_pml4e1; // PML4[1] of every space: the direct map (shared PDPT)
    uint64_t kernel_pdpte_count; // PDPT[0...] entries of every space: the runtime's
    uint64_t kernel_pdpte[3];
    uint64_t ceiling;       // INVLPG page by page up to this many pages, else a full flush
    uint64_t frames_preset; // frames the VMM took for space 0 (its root and PDPT)
    uint64_t prepare_only;  // warm-up: touch this state, the arrays, the code, each stub once; run nothing
    uint64_t image_gva;     // the runtime's code image (prepare reads it)
    uint64_t image_bytes;
    uint64_t reserved_in[12];

    // guest -> VMM
    uint64_t error;         // enum memvirt_ops_error
    uint64_t error_op;      // index of the op that failed
    uint64_t error_detail;
    uint64_t ops_executed;
    uint64_t guest_pf;      // #PFs the guest's handler took (each one delivered by KVM)
    uint64_t demand_zero;   // of which: not-present pages mapped with a zeroed frame
    uint64_t cow_faults;    // of which: writes to copy-on-write pages
    uint64_t cow_copies;    //   ... that copied the page (the frame was still shared)
    uint64_t spurious;      // of which: the PTE already allowed the access
    uint64_t leaf_writes;   // PTE (level-1) writes
    uint64_t table_writes;  // non-leaf entry writes of the regions (PDPTE, PDE)
    uint64_t kernel_writes; // entries written into a new space's root and PDPT
    uint64_t invlpg;
    uint64_t cr3_loads;     // all CR3 writes (switches and full flushes)
    uint64_t cr3_noflush;   // of which with the PCID no-flush bit
    uint64_t full_flushes;  // CR3 reloads of the current space (above the ceiling)
    uint64_t frames_zeroed; // 4 KiB frames cleared (data and page tables)
    uint64_t table_pages;   // page-table pages allocated (roots included)
    uint64_t frames_in_use;
    uint64_t peak_frames;
    uint64_t bump;          // pool frames ever handed out (the high-water mark)
    uint64_t forks;
    uint64_t exits;
    uint64_t pages_unmapped; // leaves cleared by unmap and exit
    uint64_t touches;
    uint64_t reads;
    uint64_t writes;
    uint64_t read_sum;      // sum of the words the read touches saw
    uint64_t checksum;      // after the script: see guest_ops.c (final_checksum)
    uint64_t current;       // the current space
    uint64_t free_top;
    uint64_t next_pcid;
    uint64_t pcids_wrapped;
    uint64_t rng;
    uint64_t reused_table_frames; // frames handed out again whose last use was a page-table page
    uint64_t reserved_out[7];
    struct memvirt_ops_space spaces[MEMVIRT_OPS_MAX_SPACES];
};
