#include "model/linear_cpu.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace coil {
namespace {

constexpr int64_t kMaxRows = 64;  // rows of x the kernel takes; more go to at::linear

#if defined(__x86_64__)
__attribute__((target("avx2,fma"))) inline float hsum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}

// y[b, n] = <x[b], w[n]> + bias[n] for n in [n0, n1): blocks of 4 rows of W against pairs of rows
// of x (8 accumulators, 8 FMAs per 6 loads), then the leftover rows one at a time. K's last
// K % 8 columns are summed in scalar code.
__attribute__((target("avx2,fma"))) void kernel(const float* x, const float* w, const float* bias, float* y,
                                                 int64_t B, int64_t K, int64_t N, int64_t n0, int64_t n1) {
  const int64_t K8 = K / 8 * 8;
  auto tail = [&](const float* a, const float* b) {
    float s = 0;
    for (int64_t k = K8; k < K; ++k) s += a[k] * b[k];
    return s;
  };
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) {
    const float* w0 = w + n * K;
    const float* w1 = w0 + K;
    const float* w2 = w1 + K;
    const float* w3 = w2 + K;
    int64_t b = 0;
    for (; b + 2 <= B; b += 2) {
      const float* xa = x + b * K;
      const float* xb = xa + K;
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
      for (int64_t k = 0; k < K8; k += 8) {
        const __m256 va = _mm256_loadu_ps(xa + k), vb = _mm256_loadu_ps(xb + k);
        const __m256 v0 = _mm256_loadu_ps(w0 + k), v1 = _mm256_loadu_ps(w1 + k);
        const __m256 v2 = _mm256_loadu_ps(w2 + k), v3 = _mm256_loadu_ps(w3 + k);
        a0 = _mm256_fmadd_ps(va, v0, a0), a1 = _mm256_fmadd_ps(va, v1, a1);
        a2 = _mm256_fmadd_ps(va, v2, a2), a3 = _mm256_fmadd_ps(va, v3, a3);
        b0 = _mm256_fmadd_ps(vb, v0, b0), b1 = _mm256_fmadd_ps(vb, v1, b1);
        b2 = _mm256_fmadd_ps(vb, v2, b2), b3 = _mm256_fmadd_ps(vb, v3, b3);
      }
      float* ya = y + b * N + n;
      float* yb = ya + N;
      ya[0] = hsum(a0) + tail(xa, w0), ya[1] = hsum(a1) + tail(xa, w1);
      ya[2] = hsum(a2) + tail(xa, w2), ya[3] = hsum(a3) + tail(xa, w3);
      yb[0] = hsum(b0) + tail(xb, w0), yb[1] = hsum(b1) + tail(xb, w1);
      yb[2] = hsum(b2) + tail(xb, w2), yb[3] = hsum(b3) + tail(xb, w3);
    }
    for (; b < B; ++b) {  // an odd last row of x
      const float* xa = x + b * K;
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (int64_t k = 0; k < K8; k += 8) {
        const __m256 va = _mm256_loadu_ps(xa + k);
        a0 = _mm256_fmadd_ps(va, _mm256_loadu_ps(w0 + k), a0);
        a1 = _mm256_fmadd_ps(va, _mm256_loadu_ps(w1 + k), a1);
        a2 = _mm256_fmadd_ps(va, _mm256_loadu_ps(w2 + k), a2);
        a3 = _mm256_fmadd_ps(va, _mm256_loadu_ps(w3 + k), a3);
      }
      float* ya = y + b * N + n;
      ya[0] = hsum(a0) + tail(xa, w0), ya[1] = hsum(a1) + tail(xa, w1);
      ya[2] = hsum(a2) + tail(xa, w2), ya[3] = hsum(a3) + tail(xa, w3);
    }
  }
  for (; n < n1; ++n) {  // the last N % 4 rows of W
    const float* w0 = w + n * K;
    for (int64_t b = 0; b < B; ++b) {
      const float* xa = x + b * K;
      __m256 a0 = _mm256_setzero_ps();
      for (int64_t k = 0; k < K8; k += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(xa + k), _mm256_loadu_ps(w0 + k), a0);
      y[b * N + n] = hsum(a0) + tail(xa, w0);
    }
  }
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

}  // namespace

bool decode_linear_has_kernel() { return cpu_has_avx2(); }

at::Tensor decode_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias) {
  const bool fits = x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1) && x.size(0) <= kMaxRows &&
                    x.is_cpu() && w.is_cpu() && x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat &&
                    (!bias.defined() || (bias.is_cpu() && bias.scalar_type() == at::kFloat && bias.numel() == w.size(0)));
  if (!fits || !cpu_has_avx2()) return bias.defined() ? at::linear(x, w, bias) : at::linear(x, w);
#if defined(__x86_64__)
  const at::Tensor xc = x.contiguous(), wc = w.contiguous(), bc = bias.defined() ? bias.contiguous() : bias;
  const int64_t B = xc.size(0), K = xc.size(1), N = wc.size(0);
  at::Tensor y = at::empty({B, N}, xc.options());
  const float* xp = xc.data_ptr<float>();
  const float* wp = wc.data_ptr<float>();
  const float* bp = bc.defined() ? bc.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  // Blocks of 4 rows of W, at least ~64 KB of W per task so that threads are worth waking.
  const int64_t grain = std::max<int64_t>(4, 16384 / std::max<int64_t>(K, 1) / 4 * 4);
  at::parallel_for(0, (N + 3) / 4, std::max<int64_t>(1, grain / 4), [&](int64_t begin, int64_t end) {
    kernel(xp, wp, bp, yp, B, K, N, begin * 4, std::min(end * 4, N));
  });
  return y;
#else
  return at::Tensor();
#endif
}

}  // namespace coil
