// Small self-checking objects (the CDS pointer, quarantine and manifests,
// a VM's snapshot ledger): an 8-byte magic, a u32 body length, the body
// and a masked CRC-32C of everything before it (docs/format.md). Pure
// functions; any thread.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>

#include "base/status.h"

namespace vmdedup {

constexpr size_t kFrameOverhead = 16;  // magic, length, crc

// magic | u32 body length | body | u32 masked crc32c(all preceding bytes)
std::string FrameObject(const char (&magic)[8], std::string_view body);
// Checks magic, length and checksum of `data` and returns its body;
// Corruption naming `what` otherwise.
Status UnframeObject(std::string_view data, const char (&magic)[8], const std::string& what,
                     std::string_view* body);

}  // namespace vmdedup
