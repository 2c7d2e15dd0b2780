// The guest runtime as a multiboot (v1) image: what `memvirt kvm image` writes and both VMMs
// (MemVirt's `kvm run --kernel`, QEMU's `-kernel`) boot.
//
// Boot (boot32.S, CPL0, a few dozen instructions: on kvm_pvm each is emulated): the loader
// enters `memvirt_mb_boot32` in 32-bit protected mode, paging off, EAX = 0x2BADB002, EBX =
// the multiboot information. It loads the image's GDT, CR3 (identity map of 0-4 GiB with
// 2 MiB pages, built by the image writer), PAE, EFER.LME, paging, far-returns to 64-bit
// code, loads IDT and TR (TSS with an all-allowed I/O bitmap) and iretq's to CPL3 at
// `memvirt_mb_main(mbinfo, mailbox)` (multiboot.c), which parses the command line, runs the
// same `workload` as the KVM runtime (guest.c), checksums the footprint and reports.
//
// Ports (both VMMs see them): 0xE9 text (QEMU's isa-debugcon), 0xF4 exit (QEMU's
// isa-debug-exit: QEMU exits with status (value << 1) | 1), MEMVIRT_PORT_MAILBOX (ignored by
// QEMU: tells MemVirt's VMM where the guest's mailbox is, for migration and reports).
#pragma once
#include <stdint.h>

#define MEMVIRT_MB_PORT_CONSOLE 0xe9
#define MEMVIRT_MB_PORT_EXIT 0xf4
#define MEMVIRT_MB_PORT_MAILBOX 0x13
/// Exit values: 0 finished, 2 bad command line or memory, 0x100 + v exception vector v.
#define MEMVIRT_MB_EXIT_OK 0
#define MEMVIRT_MB_EXIT_BAD_INPUT 2
#define MEMVIRT_MB_EXIT_EXCEPTION 0x100
/// Where the workload's memory starts (guest-physical = guest-virtual); MemVirt's VMM puts
/// its slot split here too (below: the runtime, sent at the stop; above: dirty-logged).
#define MEMVIRT_MB_DATA_BASE 0x400000ull

/// The boot parameters block inside boot32.S (filled in the image by the writer).
/// Offsets: +2 u16 gdt_limit, +4 u32 gdt_base (lgdt operand), +8 u32 cr3, +22 u16 idt_limit,
/// +24 u64 idt_base (lidt operand), +32 kernel stack top, +40 user stack top, +48 user entry,
/// +56 mailbox, +64 u16 TSS selector, +66 u16 the second CPU's TSS selector, +72 its kernel
/// stack top, +80 its user stack top, +88 its user entry (memvirt_mb_ap_main), +96 its mailbox.
#define MEMVIRT_MB_PARAMS_SIZE 104

/// A second CPU (command line vcpus=2): the boot CPU copies the real-mode trampoline
/// (boot32.S, memvirt_mb_ap16) to MEMVIRT_MB_AP_TRAMPOLINE and wakes CPU 1 (APIC ID 1) with
/// INIT, SIPI, SIPI through its local APIC (MMIO at MEMVIRT_MB_LAPIC: both VMMs emulate it,
/// MemVirt through KVM's in-kernel irqchip). The trampoline goes from real mode straight to
/// IA-32e mode (CR4.PAE, EFER.LME, CR0.PE|PG at once), jumps to 64-bit code in the image,
/// loads its own TSS (a second descriptor on the same TSS) and iretq's to CPL3 at
/// memvirt_mb_ap_main with its own stacks and mailbox, all below 640 KiB. It runs the same
/// workload with seed + 1 over the next `footprint` bytes after the boot CPU's, reports on
/// port 0xE9 as `memvirt-guest: cpu1 result ...`, then writes MEMVIRT_PORT_DONE (0x10:
/// MemVirt's "this vCPU is done"; QEMU has no device there and ignores it) and spins.
#define MEMVIRT_MB_AP_TRAMPOLINE 0x8000ull
#define MEMVIRT_MB_AP_MAILBOX 0x9000ull
/// u64 words the second CPU sets: [0] it reached CPL3, [1] its workload and checksum are done.
#define MEMVIRT_MB_AP_FLAGS 0x9800ull
#define MEMVIRT_MB_AP_KERNEL_STACK 0xA000ull
#define MEMVIRT_MB_AP_USER_STACK 0xB000ull
#define MEMVIRT_MB_LAPIC 0xFEE00000ull

struct memvirt_mb_image {
    const void *start;          // the memvirt_guest section (the same bytes as memvirt_guest_image)
    uint64_t size;
    uint64_t boot32_offset;     // entry (32-bit code)
    uint64_t boot32_imm_offset; // u32 the writer sets to the absolute address of boot32 + 5
    uint64_t params_offset;     // the parameters block
    uint64_t main_offset;       // memvirt_mb_main (CPL3, 64-bit)
    uint64_t stubs_offset;      // 32 exception stubs, 16 bytes apart
    uint64_t ap16_offset;       // the second CPU's real-mode trampoline (copied to MEMVIRT_MB_AP_TRAMPOLINE)
    uint64_t ap16_size;
    uint64_t ap16_far_offset;   // its far pointer: u32 offset (the writer sets memvirt_mb_ap64's address), u16 selector
    uint64_t ap16_gdtr_offset;  // its lgdt operand: u16 limit, u32 base (the writer sets them)
    uint64_t ap16_cr3_offset;   // u32 CR3 (the writer sets it)
    uint64_t ap64_offset;       // the 64-bit continuation
    uint64_t ap_main_offset;    // memvirt_mb_ap_main (CPL3)
};

void memvirt_guest_multiboot_get(struct memvirt_mb_image *out);

struct memvirt_mailbox;
/// guest.c's workload and checksum, callable from multiboot.c (same section, hidden: direct calls).
__attribute__((visibility("hidden"))) void memvirt_guest_workload(volatile struct memvirt_mailbox *mb);
__attribute__((visibility("hidden"))) void memvirt_guest_checksum(volatile struct memvirt_mailbox *mb);
