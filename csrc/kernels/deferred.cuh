// Deferred value checks (es_kernels/_checks.py, "deferred"): the checks of one call computed where the data lives,
// without the host reading anything. The guard runs before the call's update: it checks the inputs, clamps the ids
// into range and keeps the old (score, weight) at them; the settle runs after it: it checks the losses the call
// computed, puts the old values back if any check failed, marks the visits if none did, and keeps the first failure
// with the call's number. Shared by the CPU loops and the CUDA kernels; torch-free.
#pragma once

#include <cstdint>

#include "kernels/common.cuh"

namespace es_kernels {
namespace deferred {

// Numbered as es_kernels._checks.ValueCheck.
constexpr int64_t kOk = 0;
constexpr int64_t kIndicesOutOfRange = 1;
constexpr int64_t kIndicesRepeat = 2;
constexpr int64_t kLossesNotFinite = 3;
constexpr int64_t kLossesNegative = 4;
constexpr int64_t kLabelsOutOfRange = 6;
constexpr int64_t kSoftTargetsBad = 7;
constexpr int64_t kComputedLossesNotFinite = 8;
constexpr int64_t kComputedLossesNegative = 9;
constexpr int64_t kIndicesRevisited = 10;
constexpr int64_t kTokenTargetsOutOfRange = 11;

// What the guard's passes found, reduced over the whole call. Each field starts at its identity (Findings::fresh)
// and is combined with min/max/or, so threads and blocks can merge them with atomics in any order.
struct Findings {
  int64_t min_id;
  int64_t max_id;
  int64_t repeat;          // 0/1
  int64_t first_revisit;   // smallest position of an id already visited in the epoch; kNone if none
  int64_t losses_nonfinite;
  int64_t losses_negative;
  int64_t labels_a_bad;
  int64_t labels_b_bad;
  int64_t soft_bad;
  int64_t tokens_bad;
};

constexpr int64_t kNone = INT64_MAX;
constexpr int kFindingsWords = sizeof(Findings) / sizeof(int64_t);

ES_HD Findings fresh_findings() { return {INT64_MAX, INT64_MIN, 0, kNone, 0, 0, 0, 0, 0, 0}; }

ES_HD bool finite(float x) { return x == x && x - x == 0.0f; }  // NaN fails the first test, +-inf the second

// Which inputs a call has (the guard checks exactly those, in the order the immediate checks run).
struct GuardInputs {
  const int64_t* ids;
  int64_t batch;
  int64_t num_samples;
  const bool* visited;  // nullptr: no epoch marks
  const int64_t* labels_a;
  const int64_t* labels_b;
  int64_t num_classes;
  const float* losses;        // given losses, fp32 contiguous
  const float* soft_targets;  // (B, C) fp32 contiguous
  const int64_t* tokens;      // (B, T) contiguous
  int64_t tokens_count;       // B * T
  int64_t ignore_index;
  int64_t vocab;
  const float* score;
  const float* weight;
  int64_t* safe_ids;  // out (B,)
  float* snapshot;    // out (2, B)
};

// Row i of the batch: its id's findings, the clamped id and the snapshot.
ES_HD void guard_row(const GuardInputs& in, int64_t i, Findings& f) {
  const int64_t id = in.ids[i];
  f.min_id = id < f.min_id ? id : f.min_id;
  f.max_id = id > f.max_id ? id : f.max_id;
  const int64_t safe = id < 0 ? 0 : (id >= in.num_samples ? in.num_samples - 1 : id);
  in.safe_ids[i] = safe;
  in.snapshot[i] = in.score[safe];
  in.snapshot[in.batch + i] = in.weight[safe];
  if (in.visited != nullptr && id == safe && in.visited[id] && i < f.first_revisit) f.first_revisit = i;
  if (in.losses != nullptr) {
    const float loss = in.losses[i];
    if (!finite(loss)) f.losses_nonfinite = 1;
    if (loss < 0.0f) f.losses_negative = 1;
  }
  if (in.labels_a != nullptr && (in.labels_a[i] < 0 || in.labels_a[i] >= in.num_classes)) f.labels_a_bad = 1;
  if (in.labels_b != nullptr && (in.labels_b[i] < 0 || in.labels_b[i] >= in.num_classes)) f.labels_b_bad = 1;
}

// Element e of the soft targets or the token targets (grid-strided over the larger of the two).
ES_HD void guard_element(const GuardInputs& in, int64_t e, Findings& f) {
  if (in.soft_targets != nullptr && e < in.batch * in.num_classes) {
    const float t = in.soft_targets[e];
    if (!finite(t) || t < 0.0f) f.soft_bad = 1;
  }
  if (in.tokens != nullptr && e < in.tokens_count) {
    const int64_t t = in.tokens[e];
    if (t != in.ignore_index && (t < 0 || t >= in.vocab)) f.tokens_bad = 1;
  }
}

// (code, value) of the first failed check in the immediate mode's order.
ES_HD void compose_status(const GuardInputs& in, const Findings& f, int64_t* status) {
  int64_t code = kOk, value = 0;
  if (f.min_id < 0 || f.max_id >= in.num_samples) {
    code = kIndicesOutOfRange;
    value = f.min_id < 0 ? f.min_id : f.max_id;
  } else if (f.repeat) {
    code = kIndicesRepeat;
  } else if (f.first_revisit != kNone) {
    code = kIndicesRevisited;
    value = in.ids[f.first_revisit];
  } else if (f.losses_nonfinite) {
    code = kLossesNotFinite;
  } else if (f.losses_negative) {
    code = kLossesNegative;
  } else if (f.tokens_bad) {
    code = kTokenTargetsOutOfRange;
    value = in.ignore_index;
  } else if (f.soft_bad) {
    code = kSoftTargetsBad;
  } else if (f.labels_a_bad) {
    code = kLabelsOutOfRange;
    value = in.labels_b != nullptr ? 1 : 0;
  } else if (f.labels_b_bad) {
    code = kLabelsOutOfRange;
    value = 2;
  }
  status[0] = code;
  status[1] = value;
}

struct SettleInputs {
  float* score;
  float* weight;
  const int64_t* safe_ids;
  const float* snapshot;
  int64_t batch;
  const int64_t* status;    // the guard's (code, value)
  const float* losses;      // computed losses to check, or nullptr
  bool* visited;            // nullptr: no epoch marks
  bool* scored;             // every sample ever scored
  int64_t* error_record;    // (code, value, call, classes): the first failure not yet raised
  int64_t* calls;           // the state's call counter
  int64_t classes;
};

// The code of the whole call once the computed losses' findings are known.
ES_HD int64_t settled_code(const SettleInputs& in, int64_t nonfinite, int64_t negative, int64_t* value) {
  *value = in.status[1];
  if (in.status[0] != kOk) return in.status[0];
  *value = 0;
  if (nonfinite) return kComputedLossesNotFinite;
  if (negative) return kComputedLossesNegative;
  return kOk;
}

// Row i once the code is known: the old values back on failure, the visit and the scoring marked on success.
ES_HD void settle_row(const SettleInputs& in, int64_t i, bool passed) {
  const int64_t id = in.safe_ids[i];
  if (!passed) {
    in.score[id] = in.snapshot[i];
    in.weight[id] = in.snapshot[in.batch + i];
    return;
  }
  in.scored[id] = true;
  if (in.visited != nullptr) in.visited[id] = true;
}

// Once per call, after every row: count the call and keep its failure if none is pending.
ES_HD void settle_record(const SettleInputs& in, int64_t code, int64_t value) {
  const int64_t call = in.calls[0] + 1;
  in.calls[0] = call;
  if (code != kOk && in.error_record[0] == kOk) {
    in.error_record[0] = code;
    in.error_record[1] = value;
    in.error_record[2] = call;
    in.error_record[3] = in.classes;
  }
}

}  // namespace deferred
}  // namespace es_kernels
