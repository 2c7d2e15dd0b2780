// The guest runtime's interface with the VMM: the mailbox layout, the commands, the ports,
// and where the image lives in the host binary. Swift (MemVirtKVM) imports this header, so
// both sides share one layout.
//
// Protocol: the VMM fills a vCPU's mailbox and enters the guest at CPL3 in
// `memvirt_guest_main(mailbox)`. The guest runs `command`, writes the results into the
// mailbox and reports with `out` to MEMVIRT_PORT_DONE (32-bit value = status). The VMM may
// then write a new command and resume: the guest loops back and reads it.
//
// The CPL0 part is a table of 16-byte trap stubs, one per vector 0...31, each
// `mov $vector, %al; out %al, $MEMVIRT_PORT_TRAP`: any exception ends at the VMM at once
// (two emulated instructions), which reads the frame from the vCPU's kernel stack. One more
// CPL0 routine, `memvirt_guest_cpl0_loop`, is entered directly by the VMM (it counts %rcx
// down, then exits through MEMVIRT_PORT_MARK) to time CPL0 instructions for `kvm probe`.
// (Software interrupts from CPL3 are not used: kvm_pvm answers `int n` with #UD.)
#pragma once
#include <stdint.h>
#include <stddef.h>

#define MEMVIRT_PORT_DONE 0x10
#define MEMVIRT_PORT_PING 0x11
#define MEMVIRT_PORT_MARK 0x12
#define MEMVIRT_PORT_TRAP 0x1f
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
};

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
    uint64_t reserved_in[17];
    // guest -> VMM
    uint64_t status;
    uint64_t done_accesses;
    uint64_t reads;
    uint64_t writes;
    uint64_t read_sum;
    uint64_t memory_checksum;
    uint64_t reserved_out[10];
};

/// Where the guest image sits in this binary: copy `size` bytes from `start` to a guest
/// address; the offsets are from `start`.
struct memvirt_guest_image {
    const void *start;
    uint64_t size;
    uint64_t entry_offset;      // memvirt_guest_main(struct memvirt_mailbox *)
    uint64_t trap_stubs_offset; // stub for vector v at trap_stubs_offset + 16 * v (v < 32)
    uint64_t cpl0_loop_offset;  // memvirt_guest_cpl0_loop
};

void memvirt_guest_image_get(struct memvirt_guest_image *out);
