// A read-only view of a LevelDB metadata store that never writes to it and
// never takes its LOCK: for readers (snapshots, restore, serve) of a
// repository on a read-only file system or owned by someone else, and of a
// VM that a backup is writing at the same moment (the view is the store as
// of its opening; what the writer commits later is not in it).
//
// LevelDB writes while it opens a store (a new log, MANIFEST and CURRENT,
// a table from the log's records, its LOG, its LOCK) and may compact later.
// The view's Env sends every such write to a private scratch directory
// under $TMPDIR, reads a file from there when the view wrote it and from
// the store's directory otherwise, and remembers deletions instead of
// doing them. The table files present when the view opens are opened at
// once and held open, so that a writer's compaction that deletes them
// afterwards cannot take them from under the view. The scratch directory
// is removed when the view's Env is destroyed (after the DB).
//
// Thread model: the Env is safe from LevelDB's threads (one mutex guards
// its maps).
#pragma once

#include <memory>
#include <string>

#include "base/status.h"
#include "leveldb/env.h"

namespace vmdedup {

// The Env of a read view of the store in `db_dir`, over `base` (the real
// file system's Env, or a test's). Makes the scratch directory and opens
// the table files; the caller opens the DB with it and destroys it after
// the DB.
Result<std::unique_ptr<leveldb::Env>> NewLevelDbReadViewEnv(const std::string& db_dir,
                                                            leveldb::Env* base);

}  // namespace vmdedup
