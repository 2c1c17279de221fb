// Fault-injecting ObjectStore and MetadataStore wrappers; see
// fault_injection.h for what each fault kind does.

#include "tests/fault_injection.h"

#include <string>

namespace vmdedup {
namespace {

// Counts one write operation and decides whether it faults.
FaultPlan::Kind NextWriteFault(FaultPlan& plan) {
  uint64_t n = plan.write_ops.fetch_add(1) + 1;
  uint64_t fail_at = plan.fail_at.load();
  FaultPlan::Kind kind = plan.kind.load();
  if (fail_at == 0 || kind == FaultPlan::Kind::kNone) return FaultPlan::Kind::kNone;
  if (n == fail_at || (kind == FaultPlan::Kind::kCrash && n > fail_at)) {
    plan.faults_injected.fetch_add(1);
    return kind;
  }
  return FaultPlan::Kind::kNone;
}

// True once a kCrash fault has fired: the simulated process is dead.
bool Crashed(const FaultPlan& plan) {
  uint64_t fail_at = plan.fail_at.load();
  return plan.kind.load() == FaultPlan::Kind::kCrash && fail_at != 0 &&
         plan.write_ops.load() >= fail_at;
}

Status InjectedError(FaultPlan::Kind kind, const std::string& what) {
  switch (kind) {
    case FaultPlan::Kind::kNoSpace:
      return Status::NoSpace(what + ": injected: No space left on device");
    case FaultPlan::Kind::kShortWrite:
      return Status::IOError(what + ": injected: short write");
    case FaultPlan::Kind::kCrash:
      return Status::IOError(what + ": injected: process crashed");
    case FaultPlan::Kind::kIOError:
    case FaultPlan::Kind::kNone:
      break;
  }
  return Status::IOError(what + ": injected: Input/output error");
}

class FaultInjectingObjectStore final : public ObjectStore {
 public:
  FaultInjectingObjectStore(ObjectStore* base, std::shared_ptr<FaultPlan> plan)
      : base_(base), plan_(std::move(plan)) {}

  Status Put(const std::string& name, std::span<const uint8_t> data) override {
    FaultPlan::Kind fault = NextWriteFault(*plan_);
    if (fault == FaultPlan::Kind::kNone) return base_->Put(name, data);
    plan_->NoteFault(name);
    if (fault == FaultPlan::Kind::kShortWrite) {
      // A medium that broke Put's atomicity: the tail is lost but the name
      // holds the head. Readers must report the truncated object.
      Status st = base_->Put(name, data.first(data.size() / 2));
      if (!st.ok()) return st;
    }
    return InjectedError(fault, "put " + name);
  }

  Status Get(const std::string& name, std::string* out) override {
    if (plan_->fail_reads) return InjectedError(FaultPlan::Kind::kIOError, "get " + name);
    return base_->Get(name, out);
  }

  Status GetRange(const std::string& name, uint64_t offset, uint64_t length,
                  std::string* out) override {
    if (plan_->fail_reads) return InjectedError(FaultPlan::Kind::kIOError, "get " + name);
    return base_->GetRange(name, offset, length, out);
  }

  Result<uint64_t> Size(const std::string& name) override {
    if (plan_->fail_reads) return InjectedError(FaultPlan::Kind::kIOError, "size " + name);
    return base_->Size(name);
  }

  Status Delete(const std::string& name) override {
    if (Crashed(*plan_)) return InjectedError(FaultPlan::Kind::kCrash, "delete " + name);
    return base_->Delete(name);
  }

  Status List(const std::string& prefix, std::vector<std::string>* names) override {
    if (plan_->fail_reads) return InjectedError(FaultPlan::Kind::kIOError, "list " + prefix);
    return base_->List(prefix, names);
  }

  Status ListTemporary(const std::string& prefix, std::vector<Temporary>* out) override {
    if (plan_->fail_reads) return InjectedError(FaultPlan::Kind::kIOError, "list " + prefix);
    return base_->ListTemporary(prefix, out);
  }

  Status RemoveTemporary(const std::string& name) override {
    if (Crashed(*plan_)) return InjectedError(FaultPlan::Kind::kCrash, "remove " + name);
    return base_->RemoveTemporary(name);
  }

  std::string Describe() const override { return base_->Describe() + " (fault injection)"; }

 private:
  ObjectStore* base_;
  std::shared_ptr<FaultPlan> plan_;
};

class FaultInjectingMetadataStore final : public MetadataStore {
 public:
  FaultInjectingMetadataStore(MetadataStore* base, std::shared_ptr<FaultPlan> plan)
      : base_(base), plan_(std::move(plan)) {}

  Status Get(std::string_view key, std::string* value) override {
    if (plan_->fail_reads) return InjectedError(FaultPlan::Kind::kIOError, "metadata get");
    return base_->Get(key, value);
  }

  Status Write(const WriteBatch& batch, bool sync) override {
    FaultPlan::Kind fault = NextWriteFault(*plan_);
    // Every fault, a short write included, leaves the batch unapplied: a
    // metadata batch is atomic, a torn one is dropped on recovery.
    if (fault != FaultPlan::Kind::kNone) {
      plan_->NoteFault("metadata");
      return InjectedError(fault, "metadata write");
    }
    return base_->Write(batch, sync);
  }

  Status Scan(std::string_view prefix,
              const std::function<bool(std::string_view, std::string_view)>& fn) override {
    if (plan_->fail_reads) return InjectedError(FaultPlan::Kind::kIOError, "metadata scan");
    return base_->Scan(prefix, fn);
  }

  uint64_t ApproximateBytes() override { return base_->ApproximateBytes(); }

 private:
  MetadataStore* base_;
  std::shared_ptr<FaultPlan> plan_;
};

}  // namespace

std::unique_ptr<ObjectStore> NewFaultInjectingObjectStore(ObjectStore* base,
                                                          std::shared_ptr<FaultPlan> plan) {
  return std::make_unique<FaultInjectingObjectStore>(base, std::move(plan));
}

std::unique_ptr<MetadataStore> NewFaultInjectingMetadataStore(MetadataStore* base,
                                                              std::shared_ptr<FaultPlan> plan) {
  return std::make_unique<FaultInjectingMetadataStore>(base, std::move(plan));
}

}  // namespace vmdedup
