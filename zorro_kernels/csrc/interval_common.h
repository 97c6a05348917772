// Shared pieces of the interval kernels: row intervals, GEMM wrappers and a vectorisable exp.
//
// A row i of sample b attends key j iff lo[b, i, r] <= j < hi[b, i, r] for some r (docs: CPU_KERNEL_SPEC).
#pragma once

#include <ATen/core/Tensor.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace zorro_cpu {

// Fortran BLAS, exported by libtorch_cpu (MKL on x86 builds); ATen's cpublas wrappers are not exported to extensions.
extern "C" {
void sgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc);
void dgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc);
// MKL's per-thread thread count, its C entry point (mkl.h maps mkl_set_num_threads_local to it; the lowercase symbol is
// the Fortran one, taking a pointer). Weak: absent from builds without MKL, then nothing to do.
int MKL_Set_Num_Threads_Local(int n) __attribute__((weak));
}

// Every GEMM of the kernels is one tile of one task: the parallelism is ours (over tasks). MKL called outside an
// OpenMP parallel region (a single task runs inline on the calling thread) would thread each small GEMM itself: one
// sample, one kv head, 2 threads, causal N=2048 backward: 852 ms with MKL threading, 117 ms sequential. Held for the
// calling thread over an op's run (the pool's threads run MKL sequentially inside their parallel region anyway).
struct SequentialBlas {
  int previous = 0;
  SequentialBlas() {
    if (MKL_Set_Num_Threads_Local) previous = MKL_Set_Num_Threads_Local(1);
  }
  ~SequentialBlas() {
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(previous);
  }
};

// Column-major C (m x n) = alpha * op(A) op(B) + beta * C.
inline void blas_gemm(char ta, char tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
                      const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  int im = static_cast<int>(m), in = static_cast<int>(n), ik = static_cast<int>(k);
  int ia = static_cast<int>(lda), ib = static_cast<int>(ldb), ic = static_cast<int>(ldc);
  sgemm_(&ta, &tb, &im, &in, &ik, &alpha, a, &ia, b, &ib, &beta, c, &ic);
}

inline void blas_gemm(char ta, char tb, int64_t m, int64_t n, int64_t k, double alpha, const double* a, int64_t lda,
                      const double* b, int64_t ldb, double beta, double* c, int64_t ldc) {
  int im = static_cast<int>(m), in = static_cast<int>(n), ik = static_cast<int>(k);
  int ia = static_cast<int>(lda), ib = static_cast<int>(ldb), ic = static_cast<int>(ldc);
  dgemm_(&ta, &tb, &im, &in, &ik, &alpha, a, &ia, b, &ib, &beta, c, &ic);
}

// Row-major C (m x n, ldc) = alpha * A (m x k, lda) @ B^T (n x k, ldb) + beta * C; column-major that is
// C^T = B A^T.
template <typename T>
inline void gemm_abt(int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b, int64_t ldb,
                     T beta, T* c, int64_t ldc) {
  blas_gemm('T', 'N', n, m, k, alpha, b, ldb, a, lda, beta, c, ldc);
}

// Row-major C (m x n, ldc) = alpha * A (m x k, lda) @ B (k x n, ldb) + beta * C.
template <typename T>
inline void gemm_ab(int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b, int64_t ldb,
                    T beta, T* c, int64_t ldc) {
  blas_gemm('N', 'N', n, m, k, alpha, b, ldb, a, lda, beta, c, ldc);
}

// Row-major C (m x n, ldc) = alpha * A^T (A: k x m, lda) @ B (k x n, ldb) + beta * C.
template <typename T>
inline void gemm_atb(int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b, int64_t ldb,
                     T beta, T* c, int64_t ldc) {
  blas_gemm('N', 'T', n, m, k, alpha, b, ldb, a, lda, beta, c, ldc);
}

// Vectors through GCC/Clang vector extensions, as wide as the flags the loader chose allow (AVX-512, AVX2, else
// 128-bit): portable source, and the compiler emits the target's instructions without -ffast-math (which would let it
// assume no -inf, the value every masked score holds).
#if defined(__AVX512F__)
constexpr int kVecBytes = 64;
#elif defined(__AVX2__)
constexpr int kVecBytes = 32;
#else
constexpr int kVecBytes = 16;
#endif
constexpr int kFloatLanes = kVecBytes / 4;
typedef float vfloat __attribute__((vector_size(kVecBytes)));
typedef int32_t vint __attribute__((vector_size(kVecBytes)));

inline vfloat vload(const float* p) {
  vfloat v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}
inline void vstore(float* p, vfloat v) { __builtin_memcpy(p, &v, sizeof(v)); }
inline vfloat vsplat(float x) { return vfloat{} + x; }

// exp for x <= 0 (scores minus their row max): Cody-Waite range reduction and a degree-6 Taylor polynomial
// (|r| <= ln2/2, relative error < 2e-7). Below -87 (and at -inf, a masked score) the result is *selected* to 0,
// never computed from a huge negative exponent.
inline vfloat vexp_nonpos(vfloat x) {
  const vfloat big = vsplat(-87.0f);
  const vfloat xc = x < big ? big : x;
  const vfloat shifter = vsplat(12582912.0f);  // 1.5 * 2^23: adding and subtracting it rounds to an integer
  const vfloat n = (xc * 1.44269504088896341f + shifter) - shifter;
  vfloat r = xc - n * 0.693145751953125f;
  r = r - n * 1.428606765330187045e-06f;
  vfloat p = vsplat(1.0f / 720.0f);
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const vint bits = (__builtin_convertvector(n, vint) + 127) << 23;
  return x < big ? vsplat(0.0f) : p * (vfloat)bits;
}

inline float exp_nonpos(float x) { return vexp_nonpos(vsplat(x))[0]; }
inline double exp_nonpos(double x) { return std::exp(x); }

// Largest element of s[0, n), ignoring NaN (-inf when all are -inf or NaN: the caller tells those apart).
inline float row_max(const float* s, int64_t n) {
  vfloat acc = vsplat(-std::numeric_limits<float>::infinity());
  int64_t j = 0;
  for (; j + kFloatLanes <= n; j += kFloatLanes) {
    const vfloat x = vload(s + j);
    acc = x > acc ? x : acc;
  }
  float m = -std::numeric_limits<float>::infinity();
  for (int l = 0; l < kFloatLanes; ++l) m = acc[l] > m ? acc[l] : m;
  for (; j < n; ++j) m = s[j] > m ? s[j] : m;
  return m;
}

inline double row_max(const double* s, int64_t n) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t j = 0; j < n; ++j) m = s[j] > m ? s[j] : m;
  return m;
}

// s = exp(s - m) in place (m >= every s, finite); returns the sum.
inline float exp_sum(float* s, int64_t n, float m) {
  vfloat acc = vsplat(0.0f);
  const vfloat vm = vsplat(m);
  int64_t j = 0;
  for (; j + kFloatLanes <= n; j += kFloatLanes) {
    const vfloat p = vexp_nonpos(vload(s + j) - vm);
    vstore(s + j, p);
    acc += p;
  }
  float sum = 0;
  for (int l = 0; l < kFloatLanes; ++l) sum += acc[l];
  for (; j < n; ++j) {
    s[j] = exp_nonpos(s[j] - m);
    sum += s[j];
  }
  return sum;
}

inline double exp_sum(double* s, int64_t n, double m) {
  double sum = 0;
  for (int64_t j = 0; j < n; ++j) {
    s[j] = std::exp(s[j] - m);
    sum += s[j];
  }
  return sum;
}

// Row intervals of one sample: lo/hi point at (Nq, R) int32.
struct RowIntervals {
  const int32_t* lo;
  const int32_t* hi;
  int64_t R;
  // First attended key and one past the last; lo >= hi when the row attends nothing.
  inline void span(int64_t row, int32_t& first, int32_t& last) const {
    first = std::numeric_limits<int32_t>::max();
    last = 0;
    for (int64_t r = 0; r < R; ++r) {
      int32_t a = lo[row * R + r], b = hi[row * R + r];
      if (a < b) {
        first = a < first ? a : first;
        last = b > last ? b : last;
      }
    }
  }
  // Whether the row attends every key of [c0, c1).
  inline bool covers(int64_t row, int64_t c0, int64_t c1) const {
    for (int64_t r = 0; r < R; ++r)
      if (lo[row * R + r] <= c0 && hi[row * R + r] >= c1) return true;
    return false;
  }
  // Whether the row attends any key of [c0, c1).
  inline bool touches(int64_t row, int64_t c0, int64_t c1) const {
    for (int64_t r = 0; r < R; ++r) {
      int64_t a = lo[row * R + r], b = hi[row * R + r];
      if (a < b && a < c1 && b > c0) return true;
    }
    return false;
  }
};

// A run of consecutive rows computed together, over the keys [k0, k1) that any of them attends.
struct RowBlock {
  int64_t r0, r1, k0, k1;
};

// Cuts the rows of one sample into blocks. A new block starts at `max_rows` rows, at a row with no keys (it gets no
// block: its output is 0), and where a row would widen the block's key span by more than `slack` keys at either end
// (a causal row widens it by 1; an image or a segment with its own keys widens it by the segment), so a block's GEMMs
// run over at most a thin band of keys some of its rows do not attend.
inline std::vector<RowBlock> row_blocks(const RowIntervals& iv, int64_t nq, int64_t max_rows, int64_t slack) {
  std::vector<RowBlock> blocks;
  RowBlock cur{0, 0, 0, 0};
  bool open = false;
  for (int64_t i = 0; i < nq; ++i) {
    int32_t first, last;
    iv.span(i, first, last);
    if (first >= last) {
      if (open) blocks.push_back(cur);
      open = false;
      continue;
    }
    if (open) {
      bool wide = cur.k0 - first > slack || last - cur.k1 > slack || cur.k0 >= last || first >= cur.k1;
      if (cur.r1 - cur.r0 >= max_rows || wide) {
        blocks.push_back(cur);
        open = false;
      }
    }
    if (!open) {
      cur = RowBlock{i, i + 1, first, last};
      open = true;
    } else {
      cur.r1 = i + 1;
      cur.k0 = first < cur.k0 ? first : cur.k0;
      cur.k1 = last > cur.k1 ? last : cur.k1;
    }
  }
  if (open) blocks.push_back(cur);
  return blocks;
}

// Checks shared by the forward and backward ops; each message names the argument and its numbers.
inline void check_intervals(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& lo,
                            const at::Tensor& hi) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "q, k, v must be 4-D (B, H, N, D); got ", q.dim(), ", ",
              k.dim(), ", ", v.dim(), " dims");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "q, k, v must share a dtype; got ", q.scalar_type(), ", ", k.scalar_type(), ", ", v.scalar_type());
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble, "q must be float32 or float64; got ",
              q.scalar_type());
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1,
              "q, k, v must have stride 1 in their last dim; got ", q.stride(3), ", ", k.stride(3), ", ", v.stride(3));
  const int64_t B = q.size(0), Hq = q.size(1), Nq = q.size(2), D = q.size(3);
  TORCH_CHECK(k.size(0) == B && v.size(0) == B, "k, v batch must equal q's ", B, "; got ", k.size(0), ", ", v.size(0));
  TORCH_CHECK(k.size(3) == D && v.size(3) == D, "k, v head dim must equal q's ", D, "; got ", k.size(3), ", ",
              v.size(3));
  TORCH_CHECK(k.size(1) == v.size(1) && k.size(2) == v.size(2), "k and v must have the same heads and length; got ",
              k.sizes(), " and ", v.sizes());
  TORCH_CHECK(k.size(1) > 0 && Hq % k.size(1) == 0, "q heads ", Hq, " must be a multiple of k heads ", k.size(1));
  TORCH_CHECK(lo.scalar_type() == at::kInt && hi.scalar_type() == at::kInt, "lo, hi must be int32; got ",
              lo.scalar_type(), ", ", hi.scalar_type());
  TORCH_CHECK(lo.is_contiguous() && hi.is_contiguous(), "lo, hi must be contiguous");
  TORCH_CHECK(lo.dim() == 3 && lo.sizes() == hi.sizes() && lo.size(0) == B && lo.size(1) == Nq && lo.size(2) >= 1,
              "lo, hi must be (B, Nq, R) = (", B, ", ", Nq, ", R>=1); got ", lo.sizes(), " and ", hi.sizes());
}

}  // namespace zorro_cpu
