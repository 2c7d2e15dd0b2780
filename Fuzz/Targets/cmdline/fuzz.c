// Fuzz target: the guest's multiboot command-line parser (Sources/MemVirtGuest/multiboot.c,
// memvirt_mb_main), built for the host with clang -fsanitize=fuzzer,address and
// -DMEMVIRT_MB_HOST (its port writes come here instead of `out`). The input is the command
// line; the multiboot info says 4 GiB of RAM (so any footprint the parser accepts fits). The
// parser ends by writing the exit port (caught here with longjmp) or by running the workload
// (replaced here by a check of what it would run: the mailbox's values).
//
// Properties: no crash or out-of-bounds read (ASan); a command line that reaches the workload
// leaves a footprint that is a positive multiple of 4 KiB at most 1 TiB, a non-zero stride that
// is a multiple of 8, and a known pattern; an exit is OK or BAD_INPUT, after an "error" line.
#include <setjmp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "memvirt_guest.h"
#include "memvirt_multiboot.h"

// The guest image's section markers, which memvirt_guest_multiboot_get (unused here) names.
const char memvirt_mb_boot32[1], memvirt_mb_boot32_imm[1], memvirt_mb_params[1], memvirt_mb_stubs[1];

void memvirt_mb_main(uint64_t mbinfo, volatile struct memvirt_mailbox *mb);

static jmp_buf done;
static char console[4096];
static size_t console_len;
static int workload_ran;

void memvirt_mb_host_out(uint16_t port, uint32_t v) {
    if (port == MEMVIRT_MB_PORT_CONSOLE) {
        if (console_len + 1 < sizeof console) console[console_len++] = (char)v;
        return;
    }
    if (port == MEMVIRT_MB_PORT_EXIT) longjmp(done, (int)v + 1);
}

void memvirt_guest_workload(volatile struct memvirt_mailbox *mb) {
    workload_ran = 1;
    if (mb->footprint < 4096 || mb->footprint % 4096 || mb->footprint > (1ull << 40)) { fprintf(stderr, "footprint %llu accepted\n", (unsigned long long)mb->footprint); abort(); }
    if (mb->pattern == 1 && (mb->stride == 0 || mb->stride % 8)) { fprintf(stderr, "stride %llu accepted\n", (unsigned long long)mb->stride); abort(); }
    if (mb->pattern != 0 && mb->pattern != 1 && mb->pattern != 2 && mb->pattern != 5) { fprintf(stderr, "pattern %llu\n", (unsigned long long)mb->pattern); abort(); }
    if (mb->base != MEMVIRT_MB_DATA_BASE) abort();
}
void memvirt_guest_checksum(volatile struct memvirt_mailbox *mb) { (void)mb; }

// Below 4 GiB: the multiboot info holds 32-bit addresses.
static uint32_t *info;
static char *line;
static struct memvirt_mailbox *mailbox;
static char *line_end;  // a PROT_NONE page starts here: a read past the NUL faults
#define LINE_MAX_BYTES (1 << 16)
#define LINE_AREA (LINE_MAX_BYTES + 4096)

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc; (void)argv;
    char *p = mmap(NULL, 2 * 4096 + LINE_AREA + 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_32BIT, -1, 0);
    if (p == MAP_FAILED) { perror("mmap MAP_32BIT"); exit(1); }
    info = (uint32_t *)p;
    mailbox = (struct memvirt_mailbox *)(p + 4096);
    line_end = p + 2 * 4096 + LINE_AREA;
    if (mprotect(line_end, 4096, PROT_NONE) != 0) { perror("mprotect"); exit(1); }
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size > LINE_MAX_BYTES) return -1;
    // The line with its NUL as the last byte before the guard page.
    line = line_end - (size + 1);
    memcpy(line, data, size);
    line[size] = 0;
    memset(info, 0, 4096);
    info[0] = 1u | 1u << 2;                      // mem_lower/mem_upper, cmdline
    info[1] = 640;
    info[2] = (uint32_t)((4ull << 30) / 1024 - 1024);  // KiB from 1 MiB: 4 GiB of RAM
    info[4] = (uint32_t)(uintptr_t)line;
    console_len = 0;
    workload_ran = 0;
    int r = setjmp(done);
    if (r == 0) {
        memvirt_mb_main((uint64_t)(uintptr_t)info, mailbox);
        fprintf(stderr, "memvirt_mb_main returned without an exit\n");
        abort();
    }
    uint32_t exit_value = (uint32_t)(r - 1);
    console[console_len] = 0;
    if (exit_value == MEMVIRT_MB_EXIT_OK) {
        if (!workload_ran) { fprintf(stderr, "exit OK without the workload\n"); abort(); }
    } else if (exit_value == MEMVIRT_MB_EXIT_BAD_INPUT) {
        if (!strstr(console, "memvirt-guest: error")) { fprintf(stderr, "bad-input exit without an error line: %s\n", console); abort(); }
    } else {
        fprintf(stderr, "exit value %u\n", exit_value);
        abort();
    }
    return 0;
}
