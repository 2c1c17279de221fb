// SyncDirectory: makes the entries created, renamed or removed in a local
// directory durable (fsync of the directory). Shared by the local object
// store and the repository's own files (its configuration). Stateless and
// thread-safe.
#pragma once

#include <string>

#include "base/status.h"

namespace vmdedup {

// fsyncs `dir`. Filesystems that cannot sync directories (EINVAL) are
// accepted. A missing directory is IOError (on a write path it vanished),
// other failures map as Status::FromErrno.
Status SyncDirectory(const std::string& dir);

}  // namespace vmdedup
