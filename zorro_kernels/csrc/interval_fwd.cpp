// Forward of interval-masked attention on CPU: out, lse = softmax(scale * q k^T restricted to each row's key
// intervals) v. Spec: CPU_KERNEL_SPEC (lo/hi semantics, layouts, lse of empty rows = -inf with out = 0).
//
// Work is split over (b, h, row block). A row block (see row_blocks) runs over its key span in chunks of kChunk keys:
// S = scale * Q K^T by GEMM, online softmax across chunks, O += P V by GEMM. A chunk no row of the block attends is
// skipped; a chunk every row attends entirely is "full" and pays no masking; the others ("partial") select -inf
// outside each row's intervals before the exp, so a masked score never contributes whatever its value.
#include <ATen/Parallel.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "interval_common.h"

namespace zorro_cpu {
namespace {

// Rows per block and keys per chunk, measured (BENCHMARKS.md): a 128 x 256 fp32 score tile (128 KiB) stays in L2.
#ifndef ZORRO_ROWS
#define ZORRO_ROWS 128
#endif
#ifndef ZORRO_CHUNK
#define ZORRO_CHUNK 256
#endif
constexpr int64_t kMaxRows = ZORRO_ROWS;
constexpr int64_t kChunk = ZORRO_CHUNK;
constexpr int64_t kSlack = 32;     // keys a row may widen its block's span by before a new block starts

// Selects -inf for the keys of [c0, c0 + n) outside the row's intervals (sorted, disjoint, possibly empty).
template <typename T>
inline void mask_row(T* s, const RowIntervals& iv, int64_t row, int64_t c0, int64_t n) {
  const T ninf = -std::numeric_limits<T>::infinity();
  int64_t pos = 0;
  for (int64_t r = 0; r < iv.R; ++r) {
    int64_t a = std::max<int64_t>(iv.lo[row * iv.R + r] - c0, 0);
    int64_t b = std::min<int64_t>(iv.hi[row * iv.R + r] - c0, n);
    if (a >= b) continue;
    for (int64_t j = pos; j < a; ++j) s[j] = ninf;
    pos = b;
  }
  for (int64_t j = pos; j < n; ++j) s[j] = ninf;
}

struct Workspace {
  std::vector<char> bytes;
  template <typename T>
  T* get(size_t count) {
    if (bytes.size() < count * sizeof(T)) bytes.resize(count * sizeof(T));
    return reinterpret_cast<T*>(bytes.data());
  }
};

// One (b, h, block): rows [blk.r0, blk.r1) of q against keys [blk.k0, blk.k1) of k, v.
template <typename T>
void block_forward(const T* q, int64_t sq, const T* k, int64_t sk, const T* v, int64_t sv, int64_t D, T scale,
                   const RowIntervals& iv, const RowBlock& blk, T* out, T* lse, Workspace& ws) {
  const int64_t rows = blk.r1 - blk.r0;
  T* buf = ws.get<T>(rows * kChunk + rows * D + 2 * rows);
  T* S = buf;
  T* O = S + rows * kChunk;
  T* m = O + rows * D;
  T* l = m + rows;
  for (int64_t i = 0; i < rows; ++i) {
    m[i] = -std::numeric_limits<T>::infinity();
    l[i] = 0;
  }
  const T* qb = q + blk.r0 * sq;
  bool first = true;
  for (int64_t c0 = blk.k0; c0 < blk.k1; c0 += kChunk) {
    const int64_t c1 = std::min(c0 + kChunk, blk.k1), w = c1 - c0;
    bool any = false, full = true;
    for (int64_t i = blk.r0; i < blk.r1 && (full || !any); ++i) {
      any = any || iv.touches(i, c0, c1);
      full = full && iv.covers(i, c0, c1);
    }
    if (!any) continue;
    gemm_abt<T>(rows, w, D, scale, qb, sq, k + c0 * sk, sk, T(0), S, kChunk);
    for (int64_t i = 0; i < rows; ++i) {
      T* s = S + i * kChunk;
      if (!full) mask_row(s, iv, blk.r0 + i, c0, w);
      const T mnew = std::max(m[i], row_max(s, w));
      if (mnew == -std::numeric_limits<T>::infinity()) {
        // nothing attended yet (P = 0, O stays 0), unless a score is NaN (a NaN query row): the row must come out
        // NaN, not look empty, so its sum is poisoned
        for (int64_t j = 0; j < w; ++j)
          if (s[j] != -std::numeric_limits<T>::infinity()) l[i] = std::numeric_limits<T>::quiet_NaN();
        std::fill(s, s + w, T(0));
        continue;
      }
      const T sum = exp_sum(s, w, mnew);
      if (!first && mnew != m[i]) {
        const T alpha = exp_nonpos(m[i] - mnew);
        T* o = O + i * D;
        for (int64_t d = 0; d < D; ++d) o[d] *= alpha;
        l[i] *= alpha;
      }
      l[i] += sum;
      m[i] = mnew;
    }
    gemm_ab<T>(rows, D, w, T(1), S, kChunk, v + c0 * sv, sv, first ? T(0) : T(1), O, D);
    first = false;
  }
  for (int64_t i = 0; i < rows; ++i) {
    T* o = out + (blk.r0 + i) * D;
    const T* oi = O + i * D;
    if (first || l[i] == T(0)) {  // no key attended (l is NaN, not 0, for a poisoned row)
      std::fill(o, o + D, T(0));
      lse[blk.r0 + i] = -std::numeric_limits<T>::infinity();
      continue;
    }
    const T inv = T(1) / l[i];
    for (int64_t d = 0; d < D; ++d) o[d] = oi[d] * inv;
    lse[blk.r0 + i] = m[i] + std::log(l[i]);
  }
}

template <typename T>
void forward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& lo,
                  const at::Tensor& hi, double scale, at::Tensor& out, at::Tensor& lse) {
  const int64_t B = q.size(0), Hq = q.size(1), Nq = q.size(2), D = q.size(3), Hkv = k.size(1), R = lo.size(2);
  const int64_t group = Hq / Hkv;
  SequentialBlas sequential;
  std::vector<std::vector<RowBlock>> blocks(B);
  std::vector<int64_t> start(B + 1, 0);  // work items of sample b: [start[b], start[b+1]), head-major
  for (int64_t b = 0; b < B; ++b) {
    RowIntervals iv{lo.data_ptr<int32_t>() + b * Nq * R, hi.data_ptr<int32_t>() + b * Nq * R, R};
    blocks[b] = row_blocks(iv, Nq, kMaxRows, kSlack);
    start[b + 1] = start[b] + Hq * static_cast<int64_t>(blocks[b].size());
  }
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  T* op = out.data_ptr<T>();
  T* lp = lse.data_ptr<T>();
  at::parallel_for(0, start[B], 1, [&](int64_t begin, int64_t end) {
    Workspace ws;
    int64_t b = 0;
    for (int64_t item = begin; item < end; ++item) {
      while (item >= start[b + 1]) ++b;
      const int64_t nb = static_cast<int64_t>(blocks[b].size());
      const int64_t h = (item - start[b]) / nb, j = (item - start[b]) % nb;
      const int64_t hk = h / group;
      RowIntervals iv{lo.data_ptr<int32_t>() + b * Nq * R, hi.data_ptr<int32_t>() + b * Nq * R, R};
      block_forward<T>(qp + b * q.stride(0) + h * q.stride(1), q.stride(2), kp + b * k.stride(0) + hk * k.stride(1),
                          k.stride(2), vp + b * v.stride(0) + hk * v.stride(1), v.stride(2), D, static_cast<T>(scale),
                          iv, blocks[b][j], op + (b * Hq + h) * Nq * D, lp + (b * Hq + h) * Nq, ws);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> interval_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                const at::Tensor& lo, const at::Tensor& hi, double scale) {
  check_intervals(q, k, v, lo, hi);
  // the GEMMs read keys [lo, hi) unchecked: an interval past the keys must be an error, not an out-of-bounds read
  const int32_t* lp = lo.data_ptr<int32_t>();
  const int32_t* hp = hi.data_ptr<int32_t>();
  for (int64_t i = 0, n = lo.numel(); i < n; ++i)
    TORCH_CHECK(lp[i] >= hp[i] || (lp[i] >= 0 && hp[i] <= k.size(2)), "lo, hi must lie in [0, Nk=", k.size(2),
                "]; got the interval [", lp[i], ", ", hp[i], ") at flat index ", i);
  // Rows that no block visits (no keys) keep these: out exactly 0, lse -inf.
  at::Tensor out = at::zeros({q.size(0), q.size(1), q.size(2), q.size(3)}, q.options());
  at::Tensor lse = at::full({q.size(0), q.size(1), q.size(2)}, -std::numeric_limits<double>::infinity(), q.options());
  if (q.scalar_type() == at::kFloat)
    forward_impl<float>(q, k, v, lo, hi, scale, out, lse);
  else
    forward_impl<double>(q, k, v, lo, hi, scale, out, lse);
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(zorro_cpu, m) {
  m.def("interval_fwd(Tensor q, Tensor k, Tensor v, Tensor lo, Tensor hi, float scale) -> (Tensor out, Tensor lse)");
}

TORCH_LIBRARY_IMPL(zorro_cpu, CPU, m) { m.impl("interval_fwd", &interval_fwd); }

}  // namespace zorro_cpu
