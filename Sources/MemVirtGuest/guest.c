#include "memvirt_guest.h"
