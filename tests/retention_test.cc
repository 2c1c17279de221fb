// Retention policies (engine/retention.h), table-driven over synthetic
// snapshot times: each --keep-* rule alone and combined, -1, ties, the ISO
// week across a year boundary, calendar months in --keep-within, tags, and
// the local time zone deciding the buckets. The cases follow the meaning
// restic's forget documents.
#include "engine/retention.h"

#include <gtest/gtest.h>
#include <stdlib.h>
#include <time.h>

#include <set>
#include <string>
#include <vector>

namespace vmdedup {
namespace {

// "YYYY-MM-DD HH:MM" in UTC → unix seconds.
int64_t Utc(const std::string& text) {
  std::tm tm{};
  EXPECT_NE(strptime(text.c_str(), "%Y-%m-%d %H:%M", &tm), nullptr) << text;
  return static_cast<int64_t>(timegm(&tm));
}

class RetentionTest : public ::testing::Test {
 protected:
  void SetUp() override { SetZone("UTC0"); }
  void TearDown() override { SetZone("UTC0"); }
  static void SetZone(const char* tz) {
    setenv("TZ", tz, 1);
    tzset();
  }
  // Snapshots at these times (seq in the given order, from 1).
  static std::vector<SnapshotRecord> Series(
      const std::vector<std::string>& times,
      const std::vector<std::vector<std::string>>& tags = {}) {
    std::vector<SnapshotRecord> out;
    for (size_t i = 0; i < times.size(); i++) {
      SnapshotRecord s;
      s.vm = "vm";
      s.disk = "vda";
      s.seq = i + 1;
      s.time = Utc(times[i]);
      if (i < tags.size()) s.tags = tags[i];
      out.push_back(s);
    }
    return out;
  }
  // The seqs kept.
  static std::set<uint64_t> Kept(const std::vector<SnapshotRecord>& series,
                                 const RetentionPolicy& p) {
    std::set<uint64_t> out;
    for (const RetentionDecision& d : ApplyRetentionPolicy(series, p)) {
      EXPECT_EQ(d.keep, !d.reasons.empty());
      if (d.keep) out.insert(d.snapshot.seq);
    }
    return out;
  }
};

// Ten snapshots: three a day on 1-3 March, one on 10 March (seq 10).
const std::vector<std::string> kMarch = {"2026-03-01 01:00", "2026-03-01 09:00", "2026-03-01 17:00",
                                         "2026-03-02 01:00", "2026-03-02 09:30", "2026-03-02 17:00",
                                         "2026-03-03 01:00", "2026-03-03 09:00", "2026-03-03 17:45",
                                         "2026-03-10 12:00"};

TEST_F(RetentionTest, EachRuleAlone) {
  const auto s = Series(kMarch);
  struct Case {
    const char* what;
    RetentionPolicy policy;
    std::set<uint64_t> kept;
  };
  auto p = [](auto set) {
    RetentionPolicy r;
    set(r);
    return r;
  };
  const std::vector<Case> cases = {
      {"last 1", p([](auto& r) { r.last = 1; }), {10}},
      {"last 4", p([](auto& r) { r.last = 4; }), {7, 8, 9, 10}},
      {"last more than there are",
       p([](auto& r) { r.last = 100; }),
       {1, 2, 3, 4, 5, 6, 7, 8, 9, 10}},
      {"hourly 2", p([](auto& r) { r.hourly = 2; }), {9, 10}},
      {"daily 1", p([](auto& r) { r.daily = 1; }), {10}},
      {"daily 3", p([](auto& r) { r.daily = 3; }), {6, 9, 10}},
      {"daily all", p([](auto& r) { r.daily = -1; }), {3, 6, 9, 10}},
      {"weekly 2", p([](auto& r) { r.weekly = 2; }), {9, 10}},  // 1 Mar is a Sunday
      {"weekly 3", p([](auto& r) { r.weekly = 3; }), {3, 9, 10}},
      {"monthly 5", p([](auto& r) { r.monthly = 5; }), {10}},
      {"yearly 1", p([](auto& r) { r.yearly = 1; }), {10}},
  };
  for (const Case& c : cases) EXPECT_EQ(Kept(s, c.policy), c.kept) << c.what;
}

TEST_F(RetentionTest, RulesCombineAndNameEveryReason) {
  const auto s = Series(kMarch);
  RetentionPolicy p;
  p.last = 2;
  p.daily = 2;
  p.monthly = 1;
  EXPECT_EQ(Kept(s, p), (std::set<uint64_t>{9, 10}));
  auto d = ApplyRetentionPolicy(s, p);
  ASSERT_EQ(d.front().snapshot.seq, 10u);  // newest first
  EXPECT_EQ(d.front().reasons,
            (std::vector<std::string>{"last snapshot", "daily snapshot", "monthly snapshot"}));
  EXPECT_EQ(d[1].reasons, (std::vector<std::string>{"last snapshot", "daily snapshot"}));
  p.last = 0;
  p.daily = 5;
  EXPECT_EQ(Kept(s, p), (std::set<uint64_t>{3, 6, 9, 10}));
}

TEST_F(RetentionTest, WithinCountsBackFromTheNewestSnapshotOnTheCalendar) {
  RetentionPolicy p;
  p.within = *ParseRetentionDuration("8d");
  EXPECT_EQ(Kept(Series(kMarch), p), (std::set<uint64_t>{6, 7, 8, 9, 10}));  // after 2 Mar 12:00
  // One month back from 31 March is "31 February", that is 3 March, as
  // restic's calendar arithmetic has it.
  p.within = *ParseRetentionDuration("1m");
  EXPECT_EQ(Kept(Series({"2026-03-02 12:00", "2026-03-04 12:00", "2026-03-31 12:00"}), p),
            (std::set<uint64_t>{2, 3}));
  p.within = *ParseRetentionDuration("1d12h");
  EXPECT_EQ(Kept(Series({"2026-03-01 00:00", "2026-03-01 23:59", "2026-03-03 00:00"}), p),
            (std::set<uint64_t>{2, 3}));
  EXPECT_EQ(ApplyRetentionPolicy(Series({"2026-03-03 00:00"}), p).front().reasons,
            (std::vector<std::string>{"within 1d12h"}));
}

TEST_F(RetentionTest, IsoWeeksCrossTheYear) {
  // 2026 has 53 ISO weeks: Thursday 31 Dec 2026 and Sunday 3 Jan 2027 are
  // both in 2026-W53; Monday 4 Jan 2027 starts 2027-W01.
  const auto s = Series({"2026-12-31 10:00", "2027-01-03 10:00", "2027-01-04 10:00"});
  RetentionPolicy p;
  p.weekly = 2;
  EXPECT_EQ(Kept(s, p), (std::set<uint64_t>{2, 3}));
  p.weekly = 0;
  p.yearly = 2;
  EXPECT_EQ(Kept(s, p), (std::set<uint64_t>{1, 3}));
}

TEST_F(RetentionTest, TagsKeepWhateverTheOtherRulesSay) {
  const auto s = Series({"2026-03-01 01:00", "2026-03-02 01:00", "2026-03-03 01:00"},
                        {{"monthly"}, {}, {"x", "pre-upgrade"}});
  RetentionPolicy p;
  p.tags = {"monthly"};
  EXPECT_EQ(Kept(s, p), (std::set<uint64_t>{1}));
  p.tags = {"pre-upgrade", "monthly"};
  p.last = 1;
  EXPECT_EQ(Kept(s, p), (std::set<uint64_t>{1, 3}));
  EXPECT_EQ(ApplyRetentionPolicy(s, p).front().reasons,
            (std::vector<std::string>{"tag pre-upgrade", "last snapshot"}));
}

TEST_F(RetentionTest, TiesAreBrokenByTheNewerSequenceNumber) {
  const auto s = Series({"2026-03-01 01:00", "2026-03-01 01:00"});
  RetentionPolicy p;
  p.last = 1;
  EXPECT_EQ(Kept(s, p), (std::set<uint64_t>{2}));
  p.last = 0;
  p.daily = 1;
  EXPECT_EQ(Kept(s, p), (std::set<uint64_t>{2}));
}

TEST_F(RetentionTest, TheLocalTimeZoneDecidesTheBuckets) {
  // 22:30 and 23:30 UTC on 1 March: one day in UTC, two in UTC+1 (where
  // the second is 00:30 on 2 March).
  const auto s = Series({"2026-03-01 22:30", "2026-03-01 23:30"});
  RetentionPolicy p;
  p.daily = 2;
  EXPECT_EQ(Kept(s, p), (std::set<uint64_t>{2}));
  SetZone("CET-1");
  EXPECT_EQ(Kept(s, p), (std::set<uint64_t>{1, 2}));
}

TEST_F(RetentionTest, PoliciesAndDurations) {
  EXPECT_TRUE(RetentionPolicy{}.empty());
  RetentionPolicy p;
  p.tags = {"x"};
  EXPECT_FALSE(p.empty());
  auto d = ParseRetentionDuration("1y6m2d5h");
  ASSERT_TRUE(d.ok());
  EXPECT_EQ(d->years, 1);
  EXPECT_EQ(d->months, 6);
  EXPECT_EQ(d->days, 2);
  EXPECT_EQ(d->hours, 5);
  EXPECT_EQ(d->ToString(), "1y6m2d5h");
  for (const char* bad : {"", "7", "d", "7w", "-1d", "1d2", "99999999d"})
    EXPECT_FALSE(ParseRetentionDuration(bad).ok()) << bad;
  EXPECT_TRUE(ApplyRetentionPolicy({}, RetentionPolicy{}).empty());
}

}  // namespace
}  // namespace vmdedup
