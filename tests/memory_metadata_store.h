// An in-memory MetadataStore for tests (a sorted map under a mutex):
// thread-safe, as the contract of store/metadata_store.h asks. Not part of
// the shipped binary.
#pragma once

#include <memory>

#include "store/metadata_store.h"

namespace vmdedup {

std::unique_ptr<MetadataStore> NewMemoryMetadataStore();

}  // namespace vmdedup
