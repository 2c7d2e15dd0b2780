// The multiboot image's CPL0 part (see memvirt_multiboot.h): the 32-bit boot path and 32
// exception stubs. Every instruction here is emulated on kvm_pvm (1-3 us each): the boot
// path is ~30 instructions; all tables are prebuilt by the image writer.
// Position independent: the writer stores the absolute address of label 1 in the first
// instruction's immediate (the loader gives no usable stack for call/pop: multiboot leaves
// ESP undefined); everything else is relative to it, or RIP-relative in 64-bit code.

    .section memvirt_guest,"axR",@progbits
    .balign 16
    .globl memvirt_mb_boot32
    .hidden memvirt_mb_boot32
    .globl memvirt_mb_boot32_imm
    .hidden memvirt_mb_boot32_imm
    .code32
memvirt_mb_boot32:
    .byte 0xbd                       // movl $imm32, %ebp
memvirt_mb_boot32_imm:
    .long 0
1:  cli
    movl (memvirt_mb_params + 32 - 1b)(%ebp), %esp
    movl %ebx, %esi                  // the multiboot information
    lgdt (memvirt_mb_params + 2 - 1b)(%ebp)
    movl (memvirt_mb_params + 8 - 1b)(%ebp), %eax
    movl %eax, %cr3
    movl $0x20, %eax                 // CR4.PAE
    movl %eax, %cr4
    movl $0xC0000080, %ecx           // EFER.LME
    rdmsr
    orl $0x100, %eax
    wrmsr
    movl %cr0, %eax
    orl $0x80010001, %eax            // PG | WP | PE: IA-32e mode, compatibility
    movl %eax, %cr0
    leal (2f - 1b)(%ebp), %eax
    pushl $0x08                      // 64-bit kernel code
    pushl %eax
    lret
    .code64
2:  movl $0x10, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    movl %eax, %fs
    movl %eax, %gs
    lidt memvirt_mb_params + 22(%rip)
    movw memvirt_mb_params + 64(%rip), %ax
    ltr %ax
    pushq $0x1b                      // user data: SS
    pushq memvirt_mb_params + 40(%rip)
    pushq $0x2                       // RFLAGS: IF=0, IOPL=0 (ports through the TSS bitmap)
    pushq $0x23                      // user code: CS
    pushq memvirt_mb_params + 48(%rip)
    movl %esi, %edi                  // mbinfo (zero-extended)
    movq memvirt_mb_params + 56(%rip), %rsi
    iretq

    .balign 8
    .globl memvirt_mb_params
    .hidden memvirt_mb_params
memvirt_mb_params:
    .space 104

    // The second CPU (vcpus=2, memvirt_multiboot.h): the boot CPU copies this real-mode
    // trampoline to MEMVIRT_MB_AP_TRAMPOLINE and sends INIT, SIPI (vector 0x08), so it starts
    // here at CS 0x0800, IP 0. Straight to IA-32e mode: CR3, CR4.PAE, EFER.LME, then CR0.PE
    // and PG in one write (compatibility mode with the real-mode CS), then a far jump to
    // 64-bit code. Its three fields are set by the image writer; every address here is an
    // offset from the trampoline's start (DS = CS).
    .balign 16
    .globl memvirt_mb_ap16
    .hidden memvirt_mb_ap16
    .globl memvirt_mb_ap16_end
    .hidden memvirt_mb_ap16_end
    .globl memvirt_mb_ap16_far
    .hidden memvirt_mb_ap16_far
    .globl memvirt_mb_ap16_gdtr
    .hidden memvirt_mb_ap16_gdtr
    .globl memvirt_mb_ap16_cr3
    .hidden memvirt_mb_ap16_cr3
    .code16
memvirt_mb_ap16:
    cli
    movw %cs, %ax
    movw %ax, %ds
    movl (memvirt_mb_ap16_cr3 - memvirt_mb_ap16), %eax
    movl %eax, %cr3
    movl $0x20, %eax                 // CR4.PAE
    movl %eax, %cr4
    movl $0xC0000080, %ecx           // EFER.LME
    rdmsr
    orl $0x100, %eax
    wrmsr
    lgdtl (memvirt_mb_ap16_gdtr - memvirt_mb_ap16)
    movl %cr0, %eax
    orl $0x80010001, %eax            // PG | WP | PE
    movl %eax, %cr0
    ljmpl *(memvirt_mb_ap16_far - memvirt_mb_ap16)
    .balign 4
memvirt_mb_ap16_far:
    .long 0                          // memvirt_mb_ap64 (absolute)
    .word 0x08                       // 64-bit kernel code
    .balign 4
    .word 0
memvirt_mb_ap16_gdtr:
    .word 0                          // limit
    .long 0                          // base
    .balign 4
memvirt_mb_ap16_cr3:
    .long 0
memvirt_mb_ap16_end:

    // The second CPU in 64-bit mode: its own kernel stack and TSS descriptor, then CPL3 at
    // memvirt_mb_ap_main(its mailbox) on its own user stack.
    .code64
    .balign 16
    .globl memvirt_mb_ap64
    .hidden memvirt_mb_ap64
memvirt_mb_ap64:
    movl $0x10, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    movl %eax, %fs
    movl %eax, %gs
    movq memvirt_mb_params + 72(%rip), %rsp
    lidt memvirt_mb_params + 22(%rip)
    movw memvirt_mb_params + 66(%rip), %ax
    ltr %ax
    pushq $0x1b
    pushq memvirt_mb_params + 80(%rip)
    pushq $0x2
    pushq $0x23
    pushq memvirt_mb_params + 88(%rip)
    movq memvirt_mb_params + 96(%rip), %rdi
    iretq

    // Exception stubs (IDT vectors 0-31). MemVirt's VMM stops at the first `out` (the port
    // names the vector, as the runtime's stubs); QEMU ignores that port, then exits at the
    // second (isa-debug-exit, value 0x100 + vector).
    .balign 16
    .globl memvirt_mb_stubs
    .hidden memvirt_mb_stubs
memvirt_mb_stubs:
    .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .balign 16
    outb %al, $(0xc0 + \v)
    movl $(0x100 + \v), %eax
    outl %eax, $0xf4
    hlt
    jmp . - 1
    .endr
    .code64

    .section .note.GNU-stack,"",@progbits
