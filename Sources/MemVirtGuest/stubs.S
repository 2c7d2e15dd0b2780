// The guest runtime's CPL0 part: trap stubs. Each runs in KVM's instruction emulator on a
// shadow-paging host without VMX (about 1-3 us an instruction), so each is one instruction
// that leaves to the VMM at once through port I/O (see memvirt_guest.h): the port names the
// vector (MEMVIRT_PORT_VECTOR_BASE + v) and no register is changed, so the VMM finds the
// interrupted thread's registers intact (its rip/rsp/rflags in the frame on the kernel stack).
#define MEMVIRT_PORT_VECTOR_BASE 0xc0

    .section memvirt_guest,"axR",@progbits
    .balign 16
    .globl memvirt_guest_trap_stubs
    .hidden memvirt_guest_trap_stubs
memvirt_guest_trap_stubs:
    .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31,32,33,34,35,36,37,38,39,40,41,42,43,44,45,46,47
    .balign 16
    outb %al, $(MEMVIRT_PORT_VECTOR_BASE + \v)
    hlt
    jmp . - 1
    .endr

    // The idle loop of the VMM-side scheduler, entered at CPL0 when no guest thread of a vCPU
    // can run: interrupts on, halt until one arrives (its stub then exits to the VMM).
    .balign 16
    .globl memvirt_guest_idle
    .hidden memvirt_guest_idle
memvirt_guest_idle:
    sti
1:  hlt
    jmp 1b

    // Entered directly by the VMM at CPL0 (KVM_SET_SREGS/KVM_SET_REGS) with %rcx = n >= 1:
    // 2n instructions, then a MARK exit. Measures KVM's cost per CPL0 instruction (on PVM
    // every one is emulated). The VMM puts the vCPU back at CPL3 afterwards.
    .balign 16
    .globl memvirt_guest_cpl0_loop
    .hidden memvirt_guest_cpl0_loop
memvirt_guest_cpl0_loop:
1:  dec %rcx
    jnz 1b
    movb $1, %al
    outb %al, $0x12
    hlt

    // `kvm calibrate`, entered directly by the VMM at CPL0 like memvirt_guest_cpl0_loop:
    // %rcx = n >= 1 iterations of (INVLPG (%rdi) | MOV %rdx, %cr3; dec; jnz), then a MARK
    // exit. Against cpl0_loop's 2 instructions per iteration, the difference is one INVLPG
    // or one CR3 write each.
    .balign 16
    .globl memvirt_guest_calib_invlpg_loop
    .hidden memvirt_guest_calib_invlpg_loop
memvirt_guest_calib_invlpg_loop:
1:  invlpg (%rdi)
    dec %rcx
    jnz 1b
    movb $1, %al
    outb %al, $0x12
    hlt

    .balign 16
    .globl memvirt_guest_calib_cr3_loop
    .hidden memvirt_guest_calib_cr3_loop
memvirt_guest_calib_cr3_loop:
1:  mov %rdx, %cr3
    dec %rcx
    jnz 1b
    movb $1, %al
    outb %al, $0x12
    hlt

    // The calibration guest's #PF handler (vector 14): drop the error code, resume at the
    // address the faulting CPL3 code left in %rsi (MEMVIRT_CAL_GUEST_PF), IRET. Three CPL0
    // instructions, no register but %rsp touched.
    .balign 16
    .globl memvirt_guest_calib_pf_handler
    .hidden memvirt_guest_calib_pf_handler
memvirt_guest_calib_pf_handler:
    add $8, %rsp
    mov %rsi, (%rsp)
    iretq

    // The page-table-editing guest's CPL0 stubs (guest_ops.c, memvirt_ops.h). CPL3 code enters
    // each through a deliberate exception with the continuation in %rsi; 3 CPL0 instructions
    // each (the #PF handler is memvirt_guest_calib_pf_handler above, also 3):
    // #UD (`ud2`, vector 6, no error code): INVLPG (%rdi), resume at %rsi.
    .balign 16
    .globl memvirt_guest_ops_invlpg_handler
    .hidden memvirt_guest_ops_invlpg_handler
memvirt_guest_ops_invlpg_handler:
    invlpg (%rdi)
    mov %rsi, (%rsp)
    iretq

    // #DE (`div` by zero, vector 0, no error code): CR3 := %rdx, resume at %rsi.
    .balign 16
    .globl memvirt_guest_ops_cr3_handler
    .hidden memvirt_guest_ops_cr3_handler
memvirt_guest_ops_cr3_handler:
    mov %rdx, %cr3
    mov %rsi, (%rsp)
    iretq

    // `kvm calibrate`: entered directly by the VMM at CPL0 like memvirt_guest_cpl0_loop: one
    // HLT (with no in-kernel irqchip, KVM_RUN returns KVM_EXIT_HLT), then, when the VMM runs
    // the vCPU again, a MARK exit.
    .balign 16
    .globl memvirt_guest_calib_hlt
    .hidden memvirt_guest_calib_hlt
memvirt_guest_calib_hlt:
    hlt
    movb $1, %al
    outb %al, $0x12
    hlt

    .section .note.GNU-stack,"",@progbits
