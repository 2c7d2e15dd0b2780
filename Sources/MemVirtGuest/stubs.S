// The guest runtime's CPL0 part: trap stubs. Each runs in KVM's instruction emulator on a
// shadow-paging host without VMX (about 1-3 us an instruction), so each is a handful of
// instructions and leaves to the VMM at once through port I/O (see memvirt_guest.h).
#define MEMVIRT_PORT_TRAP 0x1f

    .section memvirt_guest,"axR",@progbits
    .balign 16
    .globl memvirt_guest_trap_stubs
    .hidden memvirt_guest_trap_stubs
memvirt_guest_trap_stubs:
    .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .balign 16
    movb $\v, %al
    outb %al, $MEMVIRT_PORT_TRAP
    hlt
    jmp . - 1
    .endr

    // int $0x81 from CPL3: an empty IDT, then #UD -> #GP -> #DF -> triple fault.
    .balign 16
    .globl memvirt_guest_triple_stub
    .hidden memvirt_guest_triple_stub
memvirt_guest_triple_stub:
    pushq $0
    pushq $0
    lidt (%rsp)
    ud2

    // int $0x82 from CPL3 with %rcx = n >= 1: 2n emulated instructions, then back to CPL3.
    .balign 16
    .globl memvirt_guest_emulate_stub
    .hidden memvirt_guest_emulate_stub
memvirt_guest_emulate_stub:
1:  dec %rcx
    jnz 1b
    iretq

    .section .note.GNU-stack,"",@progbits
