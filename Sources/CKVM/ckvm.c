// Every CKVM function is a static inline in include/ckvm.h; this file gives SwiftPM a source.
#include "ckvm.h"
