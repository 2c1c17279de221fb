// Byte counts for humans ("1.5 GiB", "512 B"): binary units, one decimal.
// Pure and thread-safe; for messages and reports, never for parsing.
#pragma once

#include <cstdint>
#include <string>

namespace vmdedup {

std::string HumanSize(uint64_t bytes);

}  // namespace vmdedup
