// CKVM: the C shim over <linux/kvm.h> and <linux/userfaultfd.h>. (Filled in by the KVM engine work.)
#pragma once
#include <stdint.h>
static inline int ckvm_placeholder(void) { return 0; }
