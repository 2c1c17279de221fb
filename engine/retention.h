// Retention policies for `vmdedup forget`, with restic's meaning: within one
// series (a VM's disk), snapshots are taken newest first; each --keep-*
// rule with a count keeps the newest snapshot of each of its last N
// buckets (hour, day, ISO week, month, year, in the local time zone;
// --keep-last: every snapshot is its own bucket); --keep-within keeps every
// snapshot newer than the newest one minus the duration; --keep-tag keeps
// every snapshot with that tag. A snapshot is kept when any rule keeps it,
// and the decision names each rule that did. A count of -1 keeps every
// bucket. Pure functions; any thread.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "base/status.h"
#include "store/records.h"

namespace vmdedup {

// A --keep-within duration: years, months, days, hours ("1y6m", "7d",
// "36h"), counted back on the calendar from the newest snapshot.
struct RetentionDuration {
  int years = 0, months = 0, days = 0, hours = 0;
  bool empty() const { return years == 0 && months == 0 && days == 0 && hours == 0; }
  std::string ToString() const;
};
Result<RetentionDuration> ParseRetentionDuration(std::string_view text);

struct RetentionPolicy {
  int last = 0, hourly = 0, daily = 0, weekly = 0, monthly = 0, yearly = 0;  // -1: all
  RetentionDuration within;
  std::vector<std::string> tags;
  // No rule at all: forget refuses it (it would remove everything).
  bool empty() const;
};

struct RetentionDecision {
  SnapshotRecord snapshot;
  bool keep = false;
  std::vector<std::string>
      reasons;  // "last snapshot", "daily snapshot", "within 7d", "tag nightly"
};

// Decides for every snapshot of one series; returns them newest first.
std::vector<RetentionDecision> ApplyRetentionPolicy(std::vector<SnapshotRecord> series,
                                                    const RetentionPolicy& policy);

}  // namespace vmdedup
