#include "model/linear_cpu.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>

#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#if defined(COIL_WITH_CUDA)
#include "model/linear_cuda.h"
#include "util/error.h"
#endif

namespace coil {
namespace {

constexpr int64_t kMaxRows = 64;  // rows of x the kernel takes; more go to at::linear

#if defined(__x86_64__)
#define COIL_AVX2 __attribute__((target("avx2,fma")))

// Eight consecutive weights as float32. bfloat16 is the top 16 bits of a float32, so widening is
// a zero-extension to 32 bits and a shift left by 16: exact.
COIL_AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
COIL_AVX2 inline __m256 load8(const c10::BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline float widen(float v) { return v; }
inline float widen(c10::BFloat16 v) { return static_cast<float>(v); }

COIL_AVX2 inline float hsum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}

// The micro-kernel: y[b + j, n + i] = <x[b + j], w[n + i]> for i < NB rows of W and j < XB rows of
// x. NB x XB accumulators of 8 lanes along k (at most 12, beside NB weight registers: AVX2 has 16);
// every 8 columns cost NB weight loads and XB x loads for NB x XB FMAs. The lanes are summed at the
// end, the last K % 8 columns in scalar code. Each block of W (3 rows: <= 18 KB) stays in L1 while
// it meets every row of x (<= 64 x 6 KB, from L2).
template <typename T, int NB, int XB>
COIL_AVX2 void micro(const float* x, const T* w, float* y, int64_t K, int64_t N, int64_t n, int64_t b) {
  __m256 acc[NB][XB];
  for (int i = 0; i < NB; ++i)
    for (int j = 0; j < XB; ++j) acc[i][j] = _mm256_setzero_ps();
  const int64_t K8 = K / 8 * 8;
  for (int64_t k = 0; k < K8; k += 8) {
    __m256 wv[NB];
    for (int i = 0; i < NB; ++i) wv[i] = load8(w + (n + i) * K + k);
    for (int j = 0; j < XB; ++j) {
      const __m256 xv = _mm256_loadu_ps(x + (b + j) * K + k);
      for (int i = 0; i < NB; ++i) acc[i][j] = _mm256_fmadd_ps(xv, wv[i], acc[i][j]);
    }
  }
  for (int i = 0; i < NB; ++i)
    for (int j = 0; j < XB; ++j) {
      float s = hsum(acc[i][j]);
      for (int64_t k = K8; k < K; ++k) s += x[(b + j) * K + k] * widen(w[(n + i) * K + k]);
      y[(b + j) * N + n + i] = s;
    }
}

// A matrix-vector product (one row of x), row n of W: U = 8 accumulators along k hide the FMA
// latency while W is read as one stream: several rows of W at once (several streams) left the
// hardware prefetchers behind, at 16-20 GB/s against 27-30 GB/s here.
template <typename T>
COIL_AVX2 float dot_row(const float* x, const T* w, int64_t K) {
  constexpr int U = 8;
  __m256 acc[U];
  for (int u = 0; u < U; ++u) acc[u] = _mm256_setzero_ps();
  const int64_t KU = K / (8 * U) * (8 * U);
  for (int64_t k = 0; k < KU; k += 8 * U)
    for (int u = 0; u < U; ++u) acc[u] = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 8 * u), load8(w + k + 8 * u), acc[u]);
  for (int u = 1; u < U; ++u) acc[0] = _mm256_add_ps(acc[0], acc[u]);
  int64_t k = KU;
  for (; k + 8 <= K; k += 8) acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), load8(w + k), acc[0]);
  float s = hsum(acc[0]);
  for (; k < K; ++k) s += x[k] * widen(w[k]);
  return s;
}

// NB rows of W from n against every row of x: blocks of 4 rows, then the last B % 4.
template <typename T, int NB>
COIL_AVX2 void rows_of_w(const float* x, const T* w, float* y, int64_t B, int64_t K, int64_t N, int64_t n) {
  int64_t b = 0;
  for (; b + 4 <= B; b += 4) micro<T, NB, 4>(x, w, y, K, N, n, b);
  switch (B - b) {
    case 3: micro<T, NB, 3>(x, w, y, K, N, n, b); break;
    case 2: micro<T, NB, 2>(x, w, y, K, N, n, b); break;
    case 1: micro<T, NB, 1>(x, w, y, K, N, n, b); break;
    default: break;
  }
}

// y[:, n0:n1] = x W[n0:n1]^T + bias[n0:n1]. One row of x: row after row of W (dot_row). More:
// blocks of 3 rows of W against blocks of up to 4 rows of x (micro), the last (n1 - n0) % 3 rows
// of W one at a time.
template <typename T>
COIL_AVX2 void kernel(const float* x, const T* w, const float* bias, float* y, int64_t B, int64_t K, int64_t N,
                      int64_t n0, int64_t n1) {
  constexpr int NB = 3;
  int64_t n = n0;
  if (B == 1) {
    for (; n < n1; ++n) y[n] = dot_row(x, w + n * K, K);
  } else if (std::is_same_v<T, c10::BFloat16> && B > 4) {
    // Each block of W meets B / 4 blocks of x: widen it once into float32 (in L1) rather than at
    // every meeting.
    std::vector<float> wide(NB * K);
    for (; n + NB <= n1; n += NB) {
      const int64_t K8 = NB * K / 8 * 8;
      const T* src = w + n * K;
      for (int64_t k = 0; k < K8; k += 8) _mm256_storeu_ps(wide.data() + k, load8(src + k));
      for (int64_t k = K8; k < NB * K; ++k) wide[k] = widen(src[k]);
      rows_of_w<float, NB>(x, wide.data(), y + n, B, K, N, 0);
    }
  }
  for (; n + NB <= n1; n += NB) rows_of_w<T, NB>(x, w, y, B, K, N, n);
  for (; n < n1; ++n) rows_of_w<T, 1>(x, w, y, B, K, N, n);
  if (bias)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t m = n0; m < n1; ++m) y[b * N + m] += bias[m];
}

bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}
#else
bool cpu_has_avx2() { return false; }
#endif

#if defined(COIL_WITH_CUDA)
using at::Tensor;
namespace kernels = linear_cuda;
#include "model/linear_cuda_call.inc"

// The CUDA kernel's case: a bfloat16 W beside float32 x on one GPU, no gradient wanted.
bool fits_cuda_kernel(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias) {
  const bool grad = at::GradMode::is_enabled() && (x.requires_grad() || w.requires_grad() ||
                                                   (bias.defined() && bias.requires_grad()));
  return !grad && x.is_cuda() && x.dim() == 2 && x.size(0) <= kMaxRows && w.dim() == 2 && x.size(1) == w.size(1) &&
         x.scalar_type() == at::kFloat && w.scalar_type() == at::kBFloat16 && w.device() == x.device() &&
         (!bias.defined() || (bias.device() == x.device() && bias.numel() == w.size(0)));
}
#endif

}  // namespace

bool decode_linear_has_kernel() { return cpu_has_avx2(); }

at::Tensor decode_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias) {
#if defined(COIL_WITH_CUDA)
  if (fits_cuda_kernel(x, w, bias)) return decode_linear_bf16_cuda(x, w, bias);
#endif
  const bool fits = x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1) && x.size(0) <= kMaxRows &&
                    x.is_cpu() && w.is_cpu() && x.scalar_type() == at::kFloat &&
                    (w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16) &&
                    (!bias.defined() || (bias.is_cpu() && bias.scalar_type() == at::kFloat && bias.numel() == w.size(0)));
  if (!fits || !cpu_has_avx2()) {
    const at::Tensor wx = w.to(x.scalar_type());
    return bias.defined() ? at::linear(x, wx, bias.to(x.scalar_type())) : at::linear(x, wx);
  }
#if defined(__x86_64__)
  const at::Tensor xc = x.contiguous(), wc = w.contiguous(), bc = bias.defined() ? bias.contiguous() : bias;
  const int64_t B = xc.size(0), K = xc.size(1), N = wc.size(0);
  at::Tensor y = at::empty({B, N}, xc.options());
  const float* xp = xc.data_ptr<float>();
  const float* bp = bc.defined() ? bc.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  // Tasks of whole 3-row blocks of W, at least ~48 KB of W each so that threads are worth waking.
  const int64_t blocks = (N + 2) / 3, grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(K, 1));
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    const int64_t n0 = begin * 3, n1 = std::min(end * 3, N);
    if (wc.scalar_type() == at::kBFloat16)
      kernel(xp, wc.data_ptr<c10::BFloat16>(), bp, yp, B, K, N, n0, n1);
    else
      kernel(xp, wc.data_ptr<float>(), bp, yp, B, K, N, n0, n1);
  });
  return y;
#else
  return at::Tensor();
#endif
}

}  // namespace coil
