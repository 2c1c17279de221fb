#include "engine/retention.h"

#include <algorithm>
#include <cctype>
#include <climits>
#include <ctime>
#include <functional>

namespace vmdedup {
namespace {

std::tm LocalTime(int64_t t) {
  std::time_t tt = static_cast<std::time_t>(t);
  std::tm tm{};
  ::localtime_r(&tt, &tm);
  return tm;
}

// The ISO 8601 week of `tm`: year * 100 + week.
int64_t IsoWeek(const std::tm& tm) {
  // The Thursday of this week decides its year.
  const int weekday = (tm.tm_wday + 6) % 7;  // Monday 0
  std::tm thursday = tm;
  thursday.tm_mday += 3 - weekday;
  thursday.tm_hour = 12;
  thursday.tm_isdst = -1;
  std::mktime(&thursday);
  return (thursday.tm_year + 1900) * 100LL + thursday.tm_yday / 7 + 1;
}

struct Bucket {
  const char* reason;
  int count;
  std::function<int64_t(const std::tm&, size_t index)> of;
  int64_t last = INT64_MIN;
};

}  // namespace

std::string RetentionDuration::ToString() const {
  std::string out;
  if (years) out += std::to_string(years) + "y";
  if (months) out += std::to_string(months) + "m";
  if (days) out += std::to_string(days) + "d";
  if (hours) out += std::to_string(hours) + "h";
  return out.empty() ? "0h" : out;
}

Result<RetentionDuration> ParseRetentionDuration(std::string_view text) {
  RetentionDuration d;
  const auto bad = [&] {
    return Status::InvalidArgument("'" + std::string(text) +
                                   "' is not a duration: numbers with units y (years), m "
                                   "(months), d (days), h (hours), as 1y6m or 7d or 36h");
  };
  if (text.empty()) return bad();
  size_t i = 0;
  while (i < text.size()) {
    size_t j = i;
    int64_t n = 0;
    while (j < text.size() && std::isdigit(static_cast<unsigned char>(text[j]))) {
      n = n * 10 + (text[j] - '0');
      if (n > 1000000) return bad();
      j++;
    }
    if (j == i || j == text.size()) return bad();
    int* field = text[j] == 'y'   ? &d.years
                 : text[j] == 'm' ? &d.months
                 : text[j] == 'd' ? &d.days
                 : text[j] == 'h' ? &d.hours
                                  : nullptr;
    if (field == nullptr) return bad();
    *field += static_cast<int>(n);
    i = j + 1;
  }
  return d;
}

bool RetentionPolicy::empty() const {
  return last == 0 && hourly == 0 && daily == 0 && weekly == 0 && monthly == 0 && yearly == 0 &&
         within.empty() && tags.empty();
}

std::vector<RetentionDecision> ApplyRetentionPolicy(std::vector<SnapshotRecord> series,
                                                    const RetentionPolicy& policy) {
  std::sort(series.begin(), series.end(), [](const SnapshotRecord& a, const SnapshotRecord& b) {
    return a.time != b.time ? a.time > b.time : a.seq > b.seq;
  });
  std::vector<Bucket> buckets = {
      {"last snapshot", policy.last, [](const std::tm&, size_t i) { return int64_t(i); }},
      {"hourly snapshot", policy.hourly,
       [](const std::tm& t, size_t) {
         return (t.tm_year + 1900) * 1000000LL + (t.tm_mon + 1) * 10000LL + t.tm_mday * 100LL +
                t.tm_hour;
       }},
      {"daily snapshot", policy.daily,
       [](const std::tm& t, size_t) {
         return (t.tm_year + 1900) * 10000LL + (t.tm_mon + 1) * 100LL + t.tm_mday;
       }},
      {"weekly snapshot", policy.weekly, [](const std::tm& t, size_t) { return IsoWeek(t); }},
      {"monthly snapshot", policy.monthly,
       [](const std::tm& t, size_t) { return (t.tm_year + 1900) * 100LL + t.tm_mon + 1; }},
      {"yearly snapshot", policy.yearly,
       [](const std::tm& t, size_t) { return int64_t(t.tm_year) + 1900; }},
  };
  // --keep-within: newer than the newest snapshot minus the duration, on
  // the calendar of the local time zone.
  int64_t within_cutoff = INT64_MAX;
  if (!policy.within.empty() && !series.empty()) {
    std::tm tm = LocalTime(series.front().time);
    tm.tm_year -= policy.within.years;
    tm.tm_mon -= policy.within.months;
    tm.tm_mday -= policy.within.days;
    tm.tm_isdst = -1;
    within_cutoff = static_cast<int64_t>(std::mktime(&tm)) - 3600LL * policy.within.hours;
  }
  std::vector<RetentionDecision> out;
  for (size_t i = 0; i < series.size(); i++) {
    RetentionDecision d;
    d.snapshot = std::move(series[i]);
    const std::tm tm = LocalTime(d.snapshot.time);
    for (const std::string& tag : policy.tags)
      if (std::find(d.snapshot.tags.begin(), d.snapshot.tags.end(), tag) != d.snapshot.tags.end())
        d.reasons.push_back("tag " + tag);
    for (Bucket& b : buckets) {
      if (b.count == 0) continue;
      const int64_t value = b.of(tm, i);
      if (value == b.last) continue;
      b.last = value;
      if (b.count > 0) b.count--;
      d.reasons.push_back(b.reason);
    }
    if (d.snapshot.time > within_cutoff) d.reasons.push_back("within " + policy.within.ToString());
    d.keep = !d.reasons.empty();
    out.push_back(std::move(d));
  }
  return out;
}

}  // namespace vmdedup
