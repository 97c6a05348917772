// Backward pass of attention over per-row key intervals: the op zorro_cpu::interval_bwd (CPU_KERNEL_SPEC.md).
//
// Flash-attention backward with the forward's saved log-sum-exp, so no N x N matrix is ever stored:
//   Di = rowsum(dO * O); for each row block and each key chunk its rows attend:
//     S = Q K^T,  P = exp(scale * S - lse)  (selected: exactly 0 outside each row's intervals),
//     dV += P^T dO,  dP = dO V^T,  dS = scale * P * (dP - Di)  (selected 0 outside the intervals),
//     dQ += dS K,  dK += dS^T Q.
// Masked entries are written as 0, never computed and multiplied by 0: a key a row may not attend can hold any finite
// value (even one whose score overflows to inf) without reaching that row's dq or any other key's dk/dv.
//
// The plan (row blocks and the key chunks each block visits) depends only on lo/hi, so it is built once per sample and
// shared by every head. Work is split over (sample, kv head): each task owns its dk/dv slices, so no atomics, and it
// loops over the query heads that share its kv head (GQA) inside each (block, chunk) while that K/V chunk is in cache.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "interval_common.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

using zorro_cpu::gemm_ab;
using zorro_cpu::gemm_abt;
using zorro_cpu::gemm_atb;
using zorro_cpu::SequentialBlas;

// Rows per block and keys per chunk: a block's GEMMs are (<= kBlockRows) x (<= kChunkKeys) x D. Larger tiles amortise
// the BLAS call overhead; smaller ones compute fewer masked pairs on a causal diagonal.
constexpr int kBlockRows = 64;
constexpr int kChunkKeys = 128;
// A row joins the open block only if it adds at most this many keys to the block's key union and misses at most this
// many keys of it: rows of one segment (equal intervals) or a causal run (one more key per row) share a block, while a
// jump to a different segment's keys starts a new one, so a block's GEMMs seldom cover keys most of its rows skip.
constexpr int kJoinSlack = 16;
// Key ranges of a block's union closer than this are visited as one range: a few masked keys cost less than the extra
// GEMM calls of separate chunks when blocks are small (a fusion row seeing three short segments).
constexpr int kBridgeGap = 32;

struct Chunk {
  int k0, k1;      // keys [k0, k1)
  int r0, r1;      // block rows (absolute) that attend at least one key of the chunk: [r0, r1)
  bool full;       // every row of [r0, r1) attends every key of the chunk: no selection needed
};

struct Block {
  int r0, r1;                  // query rows [r0, r1)
  int64_t chunk0, chunk1;      // its chunks in Plan::chunks
};

struct Plan {
  std::vector<Block> blocks;
  std::vector<Chunk> chunks;
};

using Ranges = std::vector<std::pair<int, int>>;

// The non-empty intervals of one row, in order.
struct RowIntervals {
  const int32_t* lo;
  const int32_t* hi;
  int R;
  int64_t count() const {
    int64_t s = 0;
    for (int r = 0; r < R; ++r) s += std::max(0, hi[r] - lo[r]);
    return s;
  }
  bool empty() const { return count() == 0; }
};

int64_t measure(const Ranges& u) {
  int64_t s = 0;
  for (auto& p : u) s += p.second - p.first;
  return s;
}

// u ∪ the row's intervals, merged and sorted.
Ranges merged(const Ranges& u, const RowIntervals& row) {
  Ranges all(u);
  for (int r = 0; r < row.R; ++r)
    if (row.lo[r] < row.hi[r]) all.emplace_back(row.lo[r], row.hi[r]);
  std::sort(all.begin(), all.end());
  Ranges out;
  for (auto& p : all) {
    if (!out.empty() && p.first <= out.back().second)
      out.back().second = std::max(out.back().second, p.second);
    else
      out.push_back(p);
  }
  return out;
}

void close_block(Plan& plan, int r0, int r1, const Ranges& keys, const int32_t* lo, const int32_t* hi, int R) {
  Block blk{r0, r1, static_cast<int64_t>(plan.chunks.size()), 0};
  Ranges bridged;
  for (auto& range : keys) {
    if (!bridged.empty() && range.first - bridged.back().second <= kBridgeGap)
      bridged.back().second = range.second;
    else
      bridged.push_back(range);
  }
  std::vector<Chunk> chunks;
  for (auto& range : bridged)
    for (int k0 = range.first; k0 < range.second; k0 += kChunkKeys)
      chunks.push_back(Chunk{k0, std::min(range.second, k0 + kChunkKeys), -1, -1, true});
  // Each row walks its (sorted) intervals and the (sorted) chunks together: O(chunks + R) per row.
  for (int i = r0; i < r1; ++i) {
    const int32_t* l = lo + int64_t(i) * R;
    const int32_t* h = hi + int64_t(i) * R;
    int r = 0;
    for (Chunk& c : chunks) {
      while (r < R && (l[r] >= h[r] || h[r] <= c.k0)) ++r;  // skip empty intervals and those ending before the chunk
      if (r == R) break;
      if (l[r] >= c.k1) continue;  // the row's next interval starts after this chunk
      if (c.r0 < 0)
        c.r0 = i;
      else if (c.r1 < i)
        c.full = false;  // rows between the chunk's first and last touching rows that skip it: partial
      c.r1 = i + 1;
      c.full = c.full && l[r] <= c.k0 && h[r] >= c.k1;
    }
  }
  for (const Chunk& c : chunks)
    if (c.r0 >= 0) plan.chunks.push_back(c);
  blk.chunk1 = static_cast<int64_t>(plan.chunks.size());
  if (blk.chunk1 > blk.chunk0) plan.blocks.push_back(blk);
}

// Row blocks and key chunks of one sample: linear in rows x (R + chunks per block); lo/hi sorted per row (the spec).
Plan build_plan(const int32_t* lo, const int32_t* hi, int Nq, int R) {
  Plan plan;
  Ranges keys;
  int64_t first_count = 0;
  int start = -1;
  for (int i = 0; i < Nq; ++i) {
    RowIntervals row{lo + int64_t(i) * R, hi + int64_t(i) * R, R};
    if (row.empty()) {  // a row with no keys keeps dq = 0 and joins no block
      if (start >= 0) close_block(plan, start, i, keys, lo, hi, R);
      start = -1;
      continue;
    }
    if (start >= 0) {
      Ranges grown = merged(keys, row);
      const int64_t size = measure(grown);
      const bool joins = i - start < kBlockRows && size - measure(keys) <= kJoinSlack &&
                         size - row.count() <= kJoinSlack && size - first_count <= kBlockRows;
      if (joins) {
        keys = std::move(grown);
        continue;
      }
      close_block(plan, start, i, keys, lo, hi, R);
    }
    start = i;
    keys = merged(Ranges{}, row);
    first_count = row.count();
  }
  if (start >= 0) close_block(plan, start, Nq, keys, lo, hi, R);
  return plan;
}

// exp for the softmax recompute, written so the compiler vectorises the loops that call it: 2^n * p(r) with
// r = x - n ln2 in [-ln2/2, ln2/2] and a degree-6 polynomial (the Cephes expf coefficients). Arguments below -87
// give exactly 0; P = exp(s - lse) <= 1, so the clamp at 88 never bites.
inline float exp_approx(float x) {
  const float xc = std::min(std::max(x, -87.0f), 88.0f);
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer, without a rounding instruction
  const float t = xc * 1.44269504088896341f + shifter;
  const float n = t - shifter;
  const float r = (xc - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return x < -87.0f ? 0.0f : p * two_n;
}

inline double exp_approx(double x) { return std::exp(x); }

// P[j] = exp(scale * S[j] - l) on [a, b)
template <typename T>
inline void exp_span(const T* s, T* p, int a, int b, T scale, T l) {
  for (int j = a; j < b; ++j) p[j] = exp_approx(s[j] * scale - l);
}

// dS[j] = scale * P[j] * (dP[j] - di) on [a, b), in place over P
template <typename T>
inline void ds_span(const T* dp, T* p, int a, int b, T scale, T di) {
  for (int j = a; j < b; ++j) p[j] = scale * p[j] * (dp[j] - di);
}

// A (rows, D) slice of a (B, H, N, D) tensor with the last dim contiguous; ld is the row stride.
template <typename T>
struct Rows {
  T* ptr;
  int64_t sb, sh, ld;
  T* at(int64_t b, int64_t h, int64_t i) const { return ptr + b * sb + h * sh + i * ld; }
};

template <typename T>
Rows<T> rows_of(const at::Tensor& t) {
  // a size-1 row dim may report any stride; BLAS wants ld >= D there
  const int64_t ld = t.size(2) > 1 ? t.stride(2) : t.size(3);
  return Rows<T>{t.data_ptr<std::remove_const_t<T>>(), t.stride(0), t.stride(1), std::max<int64_t>(ld, 1)};
}

template <typename T>
struct Problem {
  Rows<const T> q, k, v, o, dout;
  Rows<T> dq, dk, dv;
  const T* lse;        // (B, Hq, Nq)
  const int32_t* lo;   // (B, Nq, R)
  const int32_t* hi;
  int64_t Hq, Hkv, Nq, Nk, D, R;
  T scale;
};

// P and dS of one (block, chunk, head) tile: selected over the intervals for partial chunks.
template <typename T>
void softmax_grad_tile(const Problem<T>& pb, const Chunk& c, int64_t b, int64_t h, T* sbuf, T* pbuf, const T* di,
                       bool second_pass) {
  const int n = c.k1 - c.k0;
  const T* lse = pb.lse + (b * pb.Hq + h) * pb.Nq;
  for (int i = c.r0; i < c.r1; ++i) {
    const T* s = sbuf + int64_t(i - c.r0) * kChunkKeys;
    T* p = pbuf + int64_t(i - c.r0) * kChunkKeys;
    if (c.full) {
      if (second_pass)
        ds_span(s, p, 0, n, pb.scale, di[i]);
      else
        exp_span(s, p, 0, n, pb.scale, lse[i]);
      continue;
    }
    // partial: zero-filled on the first pass; P (then dS) written on the row's intervals clipped to the chunk only
    if (!second_pass) std::fill(p, p + n, T(0));
    const int32_t* lo = pb.lo + (b * pb.Nq + i) * pb.R;
    const int32_t* hi = pb.hi + (b * pb.Nq + i) * pb.R;
    for (int64_t r = 0; r < pb.R; ++r) {
      const int a = std::max<int>(lo[r], c.k0) - c.k0;
      const int e = std::min<int>(hi[r], c.k1) - c.k0;
      if (a >= e) continue;
      if (second_pass)
        ds_span(s, p, a, e, pb.scale, di[i]);
      else
        exp_span(s, p, a, e, pb.scale, lse[i]);
    }
  }
}

// All (block, chunk, query head) tiles of one (sample, kv head).
template <typename T>
void backward_task(const Problem<T>& pb, const Plan& plan, int64_t b, int64_t hk, std::vector<T>& di_all,
                   std::vector<T>& sbuf, std::vector<T>& pbuf) {
  const int64_t group = pb.Hq / pb.Hkv, D = pb.D;
  // the task's output slices (contiguous) start at 0 here, by the thread that accumulates into them, not in a separate
  // pass over freshly allocated memory
  std::fill(pb.dk.at(b, hk, 0), pb.dk.at(b, hk, pb.Nk), T(0));
  std::fill(pb.dv.at(b, hk, 0), pb.dv.at(b, hk, pb.Nk), T(0));
  std::fill(pb.dq.at(b, hk * group, 0), pb.dq.at(b, hk * group + group, 0), T(0));
  // Di = rowsum(dO * O) for every row of the group's heads
  for (int64_t g = 0; g < group; ++g) {
    const int64_t h = hk * group + g;
    for (int64_t i = 0; i < pb.Nq; ++i) {
      const T* o = pb.o.at(b, h, i);
      const T* d = pb.dout.at(b, h, i);
      T acc = 0;
      for (int64_t x = 0; x < D; ++x) acc += o[x] * d[x];
      di_all[g * pb.Nq + i] = acc;
    }
  }
  const T* k_rows = pb.k.at(b, hk, 0);
  const T* v_rows = pb.v.at(b, hk, 0);
  for (const Block& blk : plan.blocks) {
    for (int64_t ci = blk.chunk0; ci < blk.chunk1; ++ci) {
      const Chunk& c = plan.chunks[ci];
      const int64_t m = c.r1 - c.r0, n = c.k1 - c.k0;
      const T* kc = k_rows + c.k0 * pb.k.ld;
      const T* vc = v_rows + c.k0 * pb.v.ld;
      T* dkc = pb.dk.at(b, hk, c.k0);
      T* dvc = pb.dv.at(b, hk, c.k0);
      for (int64_t g = 0; g < group; ++g) {
        const int64_t h = hk * group + g;
        const T* qb = pb.q.at(b, h, c.r0);
        const T* dob = pb.dout.at(b, h, c.r0);
        T* dqb = pb.dq.at(b, h, c.r0);
        const T* di = di_all.data() + g * pb.Nq;
        gemm_abt<T>(m, n, D, T(1), qb, pb.q.ld, kc, pb.k.ld, T(0), sbuf.data(), kChunkKeys);
        softmax_grad_tile(pb, c, b, h, sbuf.data(), pbuf.data(), di, false);
        gemm_atb<T>(n, D, m, T(1), pbuf.data(), kChunkKeys, dob, pb.dout.ld, T(1), dvc, pb.dv.ld);
        gemm_abt<T>(m, n, D, T(1), dob, pb.dout.ld, vc, pb.v.ld, T(0), sbuf.data(), kChunkKeys);
        softmax_grad_tile(pb, c, b, h, sbuf.data(), pbuf.data(), di, true);
        gemm_ab<T>(m, D, n, T(1), pbuf.data(), kChunkKeys, kc, pb.k.ld, T(1), dqb, pb.dq.ld);
        gemm_atb<T>(n, D, m, T(1), pbuf.data(), kChunkKeys, qb, pb.q.ld, T(1), dkc, pb.dk.ld);
      }
    }
  }
}

template <typename T>
void run_backward(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& out, const at::Tensor& lse, const at::Tensor& lo, const at::Tensor& hi,
                  double scale, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv) {
  const int64_t B = q.size(0), Nq = q.size(2), R = lo.size(2), Hkv = k.size(1);
  SequentialBlas sequential;
  Problem<T> pb{rows_of<const T>(q), rows_of<const T>(k), rows_of<const T>(v), rows_of<const T>(out),
                rows_of<const T>(dout), rows_of<T>(dq), rows_of<T>(dk), rows_of<T>(dv),
                lse.data_ptr<T>(), lo.data_ptr<int32_t>(), hi.data_ptr<int32_t>(),
                q.size(1), Hkv, Nq, k.size(2), q.size(3), R, static_cast<T>(scale)};
  std::vector<Plan> plans(B);
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      plans[b] = build_plan(pb.lo + b * Nq * R, pb.hi + b * Nq * R, static_cast<int>(Nq), static_cast<int>(R));
  });
  // One task per (sample, kv head): it owns its dk/dv slices, so no atomics and no reduction. (Splitting a kv head's
  // query heads over tasks with private dk/dv, summed after, for fewer tasks than threads measured 0.80x at 2 threads
  // on the shared 2-core machine, no free core to win back the reduction: not kept.)
  const int64_t group = pb.Hq / Hkv;
  at::parallel_for(0, B * Hkv, 1, [&](int64_t t0, int64_t t1) {
    std::vector<T> di(static_cast<size_t>(group * Nq));
    std::vector<T> sbuf(static_cast<size_t>(kBlockRows) * kChunkKeys), pbuf(sbuf.size());
    for (int64_t t = t0; t < t1; ++t) backward_task(pb, plans[t / Hkv], t / Hkv, t % Hkv, di, sbuf, pbuf);
  });
}

// A (B, H, N, D) input whose rows BLAS can address: last dim contiguous and row stride >= D (else a copy).
at::Tensor as_rows(const at::Tensor& t) {
  if (t.stride(3) == 1 && (t.size(2) <= 1 || t.stride(2) >= t.size(3))) return t;
  return t.contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> interval_bwd(const at::Tensor& dout, const at::Tensor& q,
                                                            const at::Tensor& k, const at::Tensor& v,
                                                            const at::Tensor& out, const at::Tensor& lse,
                                                            const at::Tensor& lo, const at::Tensor& hi,
                                                            double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "interval_bwd: q, k, v must be 4-d (B, H, N, D), got ",
              q.dim(), ", ", k.dim(), ", ", v.dim(), " dims");
  const int64_t B = q.size(0), Hq = q.size(1), Nq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Nk = k.size(2);
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble,
              "interval_bwd: q must be float32 or float64, got ", q.scalar_type());
  for (const at::Tensor* t : {&k, &v, &out, &dout, &lse})
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), "interval_bwd: every tensor must have q's dtype ",
                q.scalar_type(), ", got ", t->scalar_type());
  TORCH_CHECK(k.size(0) == B && k.size(3) == D && v.sizes() == k.sizes(), "interval_bwd: k ", k.sizes(), " and v ",
              v.sizes(), " must be (", B, ", Hkv, Nk, ", D, ")");
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, "interval_bwd: q's ", Hq, " heads must be a multiple of k's ", Hkv);
  TORCH_CHECK(out.sizes() == q.sizes() && dout.sizes() == q.sizes(), "interval_bwd: out ", out.sizes(), " and dout ",
              dout.sizes(), " must match q ", q.sizes());
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == B && lse.size(1) == Hq && lse.size(2) == Nq, "interval_bwd: lse ",
              lse.sizes(), " must be (", B, ", ", Hq, ", ", Nq, ")");
  TORCH_CHECK(lo.scalar_type() == at::kInt && hi.scalar_type() == at::kInt, "interval_bwd: lo and hi must be int32, got ",
              lo.scalar_type(), " and ", hi.scalar_type());
  TORCH_CHECK(lo.dim() == 3 && lo.size(0) == B && lo.size(1) == Nq && lo.size(2) >= 1 && hi.sizes() == lo.sizes(),
              "interval_bwd: lo ", lo.sizes(), " and hi ", hi.sizes(), " must both be (", B, ", ", Nq, ", R >= 1)");
  for (const at::Tensor* t : {&q, &k, &v, &out, &dout, &lse, &lo, &hi})
    TORCH_CHECK(t->device().is_cpu(), "interval_bwd: every tensor must be on the CPU, got ", t->device());
  // empty: every (sample, kv head) task zero-fills its own slices first
  auto dq = at::empty({B, Hq, Nq, D}, q.options());
  auto dk = at::empty({B, Hkv, Nk, D}, k.options());
  auto dv = at::empty({B, Hkv, Nk, D}, k.options());
  if (q.numel() == 0 || k.numel() == 0) return {dq.zero_(), dk.zero_(), dv.zero_()};
  auto lo_c = lo.contiguous(), hi_c = hi.contiguous();
  const int64_t lo_min = lo_c.min().item<int64_t>(), hi_max = hi_c.max().item<int64_t>();
  const int64_t hi_min = hi_c.min().item<int64_t>();
  TORCH_CHECK(lo_min >= 0 && hi_min >= 0 && hi_max <= Nk, "interval_bwd: lo/hi must lie in [0, Nk=", Nk,
              "], got lo min ", lo_min, ", hi min ", hi_min, ", hi max ", hi_max);
  auto lse_c = lse.contiguous();
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "interval_bwd", [&] {
    run_backward<scalar_t>(as_rows(dout), as_rows(q), as_rows(k), as_rows(v), as_rows(out), lse_c, lo_c, hi_c, scale,
                           dq, dk, dv);
  });
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(zorro_cpu, m) {
  m.def(
      "interval_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor lo, Tensor hi, "
      "float scale) -> (Tensor dq, Tensor dk, Tensor dv)");
}

TORCH_LIBRARY_IMPL(zorro_cpu, CPU, m) { m.impl("interval_bwd", &interval_bwd); }
