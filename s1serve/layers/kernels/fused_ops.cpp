// The small per-layer steps of a decoder forward, each fused into one call: what PyTorch runs as 5-15 ops of a few
// microseconds' dispatch each, on tensors of a few rows. A batch-1 decode step of the bench preset ran ~90 such ops
// per layer; these cut them to a handful (s1serve/layers/kernels/__init__.py says where each is used).
//
// Every output row depends only on its own input row, computed in a fixed order: row-invariant, as the matmuls are.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <numeric>
#include <vector>

namespace {

using bf16 = at::BFloat16;

inline float round_bf16(float v) { return static_cast<float>(static_cast<bf16>(v)); }

// Rows worth of work per thread below which a call stays on one thread (a parallel region costs more than it saves).
constexpr int64_t GRAIN_ELEMENTS = 1 << 15;

int64_t grain_rows(int64_t width) { return std::max<int64_t>(1, GRAIN_ELEMENTS / std::max<int64_t>(width, 1)); }

// The lanes of a 16-wide step that hold elements when `left` of them remain.
inline __mmask16 tail_mask(int64_t left) { return left >= 16 ? __mmask16(0xffff) : __mmask16((1u << left) - 1); }

// 16 bf16 values (mask: which lanes are there) widened to float32.
inline __m512 load_bf16(const bf16* p, __mmask16 mask) {
  const __m256i bits = _mm256_maskz_loadu_epi16(mask, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

// float32 -> bf16 bits, to nearest even (PyTorch's rounding; NaN stays NaN).
inline __m256i to_bf16(__m512 v) { return (__m256i)_mm512_cvtneps_pbh(v); }

inline __m512 round_bf16(__m512 v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(to_bf16(v)), 16));
}

// exp(x) for 16 floats: 2^n * p(r), r = x - n ln2 in two parts, p the polynomial of Cephes' expf (within 2 ulp),
// 2^n applied by scalef (so far-negative x go smoothly to 0); past 88.72, inf; NaN stays NaN.
inline __m512 exp16(__m512 x) {
  const __mmask16 overflow = _mm512_cmp_ps_mask(x, _mm512_set1_ps(88.72f), _CMP_GT_OQ);
  x = _mm512_min_ps(_mm512_set1_ps(88.72f), _mm512_max_ps(_mm512_set1_ps(-104.f), x));  // NaN passes through
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_mask_mov_ps(_mm512_scalef_ps(y, n), overflow, _mm512_set1_ps(INFINITY));
}

// -x, bit for bit (the sign flipped, zeros included), as PyTorch's bf16 negation.
inline __m512 negated(__m512 x) {
  return _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(x), _mm512_set1_epi32(INT32_MIN)));
}

// One row of RMSNorm (see rms_norm below): x [D] -> y [D], both bf16.
inline void norm_row(const bf16* x, const bf16* weight, int64_t D, float eps, bf16* y) {
  __m512 squares = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; d += 16) {
    const __m512 v = load_bf16(x + d, tail_mask(D - d));
    squares = _mm512_fmadd_ps(v, v, squares);
  }
  const __m512 inv = _mm512_set1_ps(1.f / std::sqrt(_mm512_reduce_add_ps(squares) / static_cast<float>(D) + eps));
  for (int64_t d = 0; d < D; d += 16) {
    const __mmask16 mask = tail_mask(D - d);
    const __m512 normed = round_bf16(_mm512_mul_ps(load_bf16(x + d, mask), inv));
    _mm256_mask_storeu_epi16(y + d, mask, to_bf16(_mm512_mul_ps(load_bf16(weight + d, mask), normed)));
  }
}

// One head's row of the rotate-half encoding (see rotary below): x, cos, sin [D] -> out [D], all bf16.
inline void rotate_row(const bf16* x, const bf16* c, const bf16* s, int64_t D, bf16* out) {
  const int64_t half = D / 2;
  for (int64_t d = 0; d < half; d += 16) {  // 16 of each half at once: x1 beside -x2, x2 beside x1
    const __mmask16 mask = tail_mask(half - d);
    const __m512 x1 = load_bf16(x + d, mask), x2 = load_bf16(x + half + d, mask);
    const __m512 first = _mm512_add_ps(round_bf16(_mm512_mul_ps(x1, load_bf16(c + d, mask))),
                                       round_bf16(_mm512_mul_ps(negated(x2), load_bf16(s + d, mask))));
    const __m512 second = _mm512_add_ps(round_bf16(_mm512_mul_ps(x2, load_bf16(c + half + d, mask))),
                                        round_bf16(_mm512_mul_ps(x1, load_bf16(s + half + d, mask))));
    _mm256_mask_storeu_epi16(out + d, mask, to_bf16(first));
    _mm256_mask_storeu_epi16(out + half + d, mask, to_bf16(second));
  }
}

// bf16(silu(gate)) * up for n columns (see silu_mul below).
inline void swiglu_row(const bf16* gate, const bf16* up, int64_t n, bf16* out) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 mask = tail_mask(n - i);
    const __m512 g = load_bf16(gate + i, mask);
    const __m512 exp_minus_g = exp16(_mm512_sub_ps(_mm512_setzero_ps(), g));
    const __m512 silu = round_bf16(_mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.f), exp_minus_g)));
    _mm256_mask_storeu_epi16(out + i, mask, to_bf16(_mm512_mul_ps(silu, load_bf16(up + i, mask))));
  }
}

}  // namespace

// RMSNorm as the published model computes it: y = weight * bf16(x * rsqrt(mean(x^2) + eps)), the statistics in
// float32, the weight applied in bf16. x [..., D] bf16 with contiguous rows; weight [D] bf16. The float32 sum of
// squares runs in 16 lanes (element d in lane d % 16), then the lanes are added: a fixed order, but not always
// PyTorch's, so a result can land one bf16 step away from PyTorch's (none of the tests' 3 x 22400 values does; an
// earlier in-order sum moved 1 of 22400 at x ~ 1e-3).
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kBFloat16, "rms_norm takes bf16");
  const int64_t D = x.size(-1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == D && weight.is_contiguous(), "weight must be [", D, "]");
  auto xc = x.contiguous();
  auto y = torch::empty_like(xc);
  const int64_t rows = xc.numel() / std::max<int64_t>(D, 1);
  const bf16* xp = xc.data_ptr<bf16>();
  const bf16* wp = weight.data_ptr<bf16>();
  bf16* yp = y.data_ptr<bf16>();
  const float epsf = static_cast<float>(eps);
  at::parallel_for(0, rows, grain_rows(D), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) norm_row(xp + r * D, wp, D, epsf, yp + r * D);
  });
  return y;
}

// Rotate-half position encoding: x * cos + rotate_half(x) * sin with each product and the sum rounded to bf16, as
// PyTorch's bf16 ops round them (bitwise s1serve.layers.rotary.apply_rotary). x [T, H, D] bf16 (any strides of the
// first two dims, contiguous D); cos / sin [T, G, D] bf16 with H a multiple of G: head h uses group h / (H / G).
torch::Tensor rotary(torch::Tensor x, torch::Tensor cos, torch::Tensor sin) {
  TORCH_CHECK(x.dim() == 3 && x.scalar_type() == at::kBFloat16 && x.stride(2) == 1, "x must be [T, H, D] bf16");
  TORCH_CHECK(cos.dim() == 3 && cos.sizes() == sin.sizes() && cos.scalar_type() == at::kBFloat16 &&
                  sin.scalar_type() == at::kBFloat16 && cos.size(0) == x.size(0) && cos.size(2) == x.size(2) &&
                  x.size(1) % cos.size(1) == 0 && x.size(2) % 2 == 0,
              "cos and sin must be [T, G, D] bf16 with G dividing x's heads");
  const int64_t T = x.size(0), H = x.size(1), D = x.size(2), G = cos.size(1), per_group = H / G;
  auto cc = cos.contiguous(), sc = sin.contiguous();
  auto out = torch::empty({T, H, D}, x.options());
  const bf16* xp = x.data_ptr<bf16>();
  const bf16* cp = cc.data_ptr<bf16>();
  const bf16* sp = sc.data_ptr<bf16>();
  bf16* op = out.data_ptr<bf16>();
  const int64_t st = x.stride(0), sh = x.stride(1);
  at::parallel_for(0, T * H, grain_rows(D), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t t = i / H, h = i % H;
      const bf16* xr = xp + t * st + h * sh;
      const bf16* c = cp + (t * G + h / per_group) * D;
      const bf16* s = sp + (t * G + h / per_group) * D;
      rotate_row(xr, c, s, D, op + i * D);
    }
  });
  return out;
}

// Attention's steps between its projections and the attention itself, in one call: qkv [T, (H + 2 KVH) * D] bf16
// (the q, k and v projections side by side) -> q [T, H, D], each head RMS-normed with q_norm, then rotated; each of
// k's heads normed with k_norm and rotated, then written with v's head to the token's slot of the paged cache
// (k_cache, v_cache [KVH, blocks, block_size, D] bf16). Bitwise rms_norm, rotary and the cache write one after the
// other; cos / sin [T, G, D] bf16 as rotary takes them, G dividing both H and KVH.
torch::Tensor qk_norm_rotary_cache(torch::Tensor qkv, int64_t H, int64_t KVH, torch::Tensor q_norm, double q_eps,
                                   torch::Tensor k_norm, double k_eps, torch::Tensor cos, torch::Tensor sin,
                                   torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor slots) {
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() && k_cache.size(0) == KVH &&
                  k_cache.scalar_type() == at::kBFloat16 && v_cache.scalar_type() == at::kBFloat16 &&
                  k_cache.is_contiguous() && v_cache.is_contiguous(),
              "the caches must be contiguous [KVH, blocks, block_size, D] bf16");
  const int64_t T = qkv.size(0), D = k_cache.size(3), S = k_cache.size(1) * k_cache.size(2);
  TORCH_CHECK(qkv.dim() == 2 && qkv.scalar_type() == at::kBFloat16 && qkv.is_contiguous() &&
                  qkv.size(1) == (H + 2 * KVH) * D && D % 2 == 0 && D <= 1024,
              "qkv must be contiguous [T, (H + 2 KVH) * D] bf16");
  for (const auto& w : {q_norm, k_norm})
    TORCH_CHECK(w.dim() == 1 && w.size(0) == D && w.scalar_type() == at::kBFloat16 && w.is_contiguous(),
                "the norms' weights must be [", D, "] bf16");
  TORCH_CHECK(cos.dim() == 3 && cos.sizes() == sin.sizes() && cos.scalar_type() == at::kBFloat16 &&
                  sin.scalar_type() == at::kBFloat16 && cos.size(0) == T && cos.size(2) == D &&
                  H % cos.size(1) == 0 && KVH % cos.size(1) == 0,
              "cos and sin must be [T, G, D] bf16 with G dividing both head counts");
  TORCH_CHECK(slots.dim() == 1 && slots.size(0) == T && slots.scalar_type() == at::kLong, "slots must be [T] int64");
  auto sc = slots.contiguous();
  const int64_t* slot = sc.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) TORCH_CHECK(slot[t] >= 0 && slot[t] < S, "slot ", slot[t], " is outside the cache");
  auto cc = cos.contiguous(), ssc = sin.contiguous();
  auto q = torch::empty({T, H, D}, qkv.options());
  const bf16* in = qkv.data_ptr<bf16>();
  const bf16* cp = cc.data_ptr<bf16>();
  const bf16* sp = ssc.data_ptr<bf16>();
  const bf16* qw = q_norm.data_ptr<bf16>();
  const bf16* kw = k_norm.data_ptr<bf16>();
  bf16* qp = q.data_ptr<bf16>();
  bf16* kc = k_cache.data_ptr<bf16>();
  bf16* vc = v_cache.data_ptr<bf16>();
  const int64_t G = cos.size(1), heads = H + KVH, width = (H + 2 * KVH) * D;
  const float qe = static_cast<float>(q_eps), ke = static_cast<float>(k_eps);
  at::parallel_for(0, T * heads, grain_rows(D), [&](int64_t i0, int64_t i1) {
    bf16 normed[1024];
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t t = i / heads, h = i % heads;
      const bf16* row = in + t * width + h * D;
      if (h < H) {  // a query head
        const int64_t g = h / (H / G);
        norm_row(row, qw, D, qe, normed);
        rotate_row(normed, cp + (t * G + g) * D, sp + (t * G + g) * D, D, qp + (t * H + h) * D);
      } else {  // a key head, and the value head beside it
        const int64_t j = h - H, g = j / (KVH / G), at = (j * S + slot[t]) * D;
        norm_row(row, kw, D, ke, normed);
        rotate_row(normed, cp + (t * G + g) * D, sp + (t * G + g) * D, D, kc + at);
        std::memcpy(vc + at, row + KVH * D, D * sizeof(bf16));
      }
    }
  });
  return q;
}

// SwiGLU's middle: h [R, 2I] bf16 (gate columns, then up) -> bf16(silu(gate)) * up, [R, I] bf16, each result
// rounded to bf16 as PyTorch's bf16 ops round it; silu(g) = g / (1 + exp(-g)) in float32, 16 lanes at a time.
torch::Tensor silu_mul(torch::Tensor h) {
  TORCH_CHECK(h.dim() == 2 && h.scalar_type() == at::kBFloat16 && h.size(1) % 2 == 0, "h must be [R, 2I] bf16");
  auto hc = h.contiguous();
  const int64_t R = hc.size(0), I = hc.size(1) / 2;
  auto out = torch::empty({R, I}, hc.options());
  const bf16* hp = hc.data_ptr<bf16>();
  bf16* op = out.data_ptr<bf16>();
  at::parallel_for(0, R, grain_rows(I), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) swiglu_row(hp + r * 2 * I, hp + r * 2 * I + I, I, op + r * I);
  });
  return out;
}

// bf16_matmul.cpp: one packed block's products for M rows into bf16, and the chunked parallel loop over each
// (expert that received rows, column block) pair, fn(expert, block, first row, end row, configured).
void packed_block_bf16(const bf16* x, int64_t M, int64_t ldx, const bf16* w, int64_t K, bf16* y, int64_t ldy,
                       int& configured);
void for_each_expert_block(const torch::Tensor& ends, int64_t R, int64_t blocks,
                           const std::function<void(int64_t, int64_t, int64_t, int64_t, int&)>& fn);

// grouped_linear and silu_mul in one call: rows ends[e-1]..ends[e] of x [R, K] bf16 times expert e's packed w13
// [E, 2I/64, K/2, 64, 2] (gate blocks, then up blocks), each 64 gate columns and their 64 up columns computed side by
// side into the thread's scratch rows and turned into bf16(silu(gate)) * up there -> [R, I] bf16. Bitwise
// silu_mul(grouped_linear(x, w13, ends)), without writing and reading back the [R, 2I] products.
torch::Tensor grouped_swiglu(torch::Tensor x, torch::Tensor w13, torch::Tensor ends) {
  TORCH_CHECK(w13.dim() == 5 && w13.size(3) == 64 && w13.size(4) == 2 && w13.is_contiguous() &&
                  w13.scalar_type() == at::kBFloat16 && w13.size(1) % 2 == 0,
              "w13 must be packed bf16 [E, 2I/64, K/2, 64, 2]");
  TORCH_CHECK(ends.dim() == 1 && ends.size(0) == w13.size(0) && ends.scalar_type() == at::kLong,
              "ends must be [E] int64");
  const int64_t R = x.size(0), K = 2 * w13.size(2), pairs = w13.size(1) / 2, I = pairs * 64, ldx = x.stride(0);
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.stride(1) == 1 && x.size(1) == K,
              "x must be [R, ", K, "] bf16 with contiguous rows");
  auto out = torch::empty({R, I}, x.options());
  const bf16* xp = x.data_ptr<bf16>();
  const bf16* wp = w13.data_ptr<bf16>();
  bf16* op = out.data_ptr<bf16>();
  const int64_t block = 64 * K;  // values per packed block
  // block j of `pairs`: expert e's gate block j and up block pairs + j
  for_each_expert_block(ends, R, pairs, [&](int64_t e, int64_t j, int64_t r0, int64_t r1, int& configured) {
    thread_local std::vector<bf16> gate, up;  // this thread's scratch rows, 64 columns each
    const int64_t rows = r1 - r0;
    gate.resize(rows * 64);
    up.resize(rows * 64);
    const bf16* expert = wp + e * 2 * pairs * block;
    packed_block_bf16(xp + r0 * ldx, rows, ldx, expert + j * block, K, gate.data(), 64, configured);
    packed_block_bf16(xp + r0 * ldx, rows, ldx, expert + (pairs + j) * block, K, up.data(), 64, configured);
    for (int64_t r = 0; r < rows; ++r)
      swiglu_row(gate.data() + r * 64, up.data() + r * 64, 64, op + (r0 + r) * I + j * 64);
  });
  return out;
}

namespace {

// Sixteen float32 vectors -> one vector whose lane j is the sum of v[j]'s 16 lanes: halves added across 256-bit,
// 128-bit, 64-bit and 32-bit steps, each step folding two vectors into one, then the lanes put back in key order.
// (The same fixed order for every call, so a score does not depend on the other keys of its 16.)
inline __m512 sum_lanes16(__m512 v[16]) {
  __m512 w[8], x[4], y[2];
  for (int i = 0; i < 8; ++i)
    w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[i], v[i + 8], 0x44), _mm512_shuffle_f32x4(v[i], v[i + 8], 0xEE));
  for (int i = 0; i < 4; ++i)
    x[i] = _mm512_add_ps(_mm512_shuffle_f32x4(w[i], w[i + 4], 0x88), _mm512_shuffle_f32x4(w[i], w[i + 4], 0xDD));
  for (int i = 0; i < 2; ++i)
    y[i] = _mm512_add_ps(_mm512_shuffle_ps(x[i], x[i + 2], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(x[i], x[i + 2], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 z = _mm512_add_ps(_mm512_shuffle_ps(y[0], y[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                 _mm512_shuffle_ps(y[0], y[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512i key_order = _mm512_setr_epi32(0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15);
  return _mm512_permutexvar_ps(key_order, z);
}

constexpr int64_t HEADS_AT_ONCE = 4;  // query heads whose value sums share each converted value row
constexpr int64_t DIM_AT_ONCE = 4;    // 16-wide slices of the head dimension summed per pass over the keys

}  // namespace

// Attention of each query row over its own sequence's keys in the paged cache, read in place: q [T, H, D] bf16,
// k_cache / v_cache [KVH, blocks, block_size, D] bf16, the step's block tables flattened into `table`, each row's
// table offset `table_start` [T] and position `positions` [T] (it sees keys 0..position). Per row and KV head, in a
// fixed order whatever else is in the step: the scores of 16 keys at a time (vdpbf16ps over D, then sum_lanes16),
// times `scale`; a float32 softmax (max, exp, lane sums over the keys in order); the values summed in float32 with
// those weights, rounded to bf16 once. Returns [T, H, D] bf16.
torch::Tensor paged_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor table,
                              torch::Tensor table_start, torch::Tensor positions, double scale) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == at::kBFloat16 && q.is_contiguous(), "q must be [T, H, D] bf16");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() && k_cache.scalar_type() == at::kBFloat16 &&
                  v_cache.scalar_type() == at::kBFloat16 && k_cache.is_contiguous() && v_cache.is_contiguous(),
              "the caches must be [KVH, blocks, block_size, D] bf16");
  const int64_t T = q.size(0), H = q.size(1), D = q.size(2), KVH = k_cache.size(0), NB = k_cache.size(1),
                BS = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == D && D % 32 == 0 && D <= 256 && H % KVH == 0, "unsupported attention shape");
  TORCH_CHECK(table.scalar_type() == at::kLong && table_start.scalar_type() == at::kLong &&
                  positions.scalar_type() == at::kLong && table_start.numel() == T && positions.numel() == T,
              "table, table_start and positions must be int64, one start and position per row");
  auto tc = table.contiguous(), sc = table_start.contiguous(), pc = positions.contiguous();
  const int64_t G = H / KVH, chunks = D / 16;
  auto out = torch::empty_like(q);
  const bf16* qp = q.data_ptr<bf16>();
  const bf16* kp = k_cache.data_ptr<bf16>();
  const bf16* vp = v_cache.data_ptr<bf16>();
  const int64_t* tp = tc.data_ptr<int64_t>();
  const int64_t* startp = sc.data_ptr<int64_t>();
  const int64_t* posp = pc.data_ptr<int64_t>();
  bf16* op = out.data_ptr<bf16>();
  const float scalef = static_cast<float>(scale);
  at::parallel_for(0, T * KVH, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> probs;             // [G, keys rounded up to 16]: scores, then softmax weights
    std::vector<int64_t> key_rows;        // where each key's row starts in the K cache, and its value's in V
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t t = i / KVH, g = i % KVH, n = posp[t] + 1, width = (n + 15) / 16 * 16;
      const int64_t* blocks = tp + startp[t];
      const bf16* qt = qp + (t * H + g * G) * D;
      probs.resize(G * width);
      key_rows.resize(n);
      for (int64_t j = 0; j < n; ++j) key_rows[j] = ((g * NB + blocks[j / BS]) * BS + j % BS) * D;
      for (int64_t j0 = 0; j0 < n; j0 += 16) {
        const int64_t keys = std::min<int64_t>(16, n - j0);
        for (int64_t h = 0; h < G; ++h) {
          __m512 acc[16];
          for (int64_t j = 0; j < 16; ++j) {
            acc[j] = _mm512_setzero_ps();
            if (j >= keys) continue;
            for (int64_t c = 0; c < D; c += 32)
              acc[j] = _mm512_dpbf16_ps(acc[j], (__m512bh)_mm512_loadu_si512(qt + h * D + c),
                                        (__m512bh)_mm512_loadu_si512(kp + key_rows[j0 + j] + c));
          }
          _mm512_storeu_ps(probs.data() + h * width + j0, _mm512_mul_ps(sum_lanes16(acc), _mm512_set1_ps(scalef)));
        }
      }
      for (int64_t h = 0; h < G; ++h) {
        float* s = probs.data() + h * width;
        __m512 top = _mm512_set1_ps(-INFINITY);
        for (int64_t j = 0; j < n; j += 16) top = _mm512_max_ps(top, _mm512_maskz_loadu_ps(tail_mask(n - j), s + j));
        const __m512 topv = _mm512_set1_ps(_mm512_reduce_max_ps(top));
        __m512 lanes = _mm512_setzero_ps();
        for (int64_t j = 0; j < n; j += 16) {
          const __mmask16 mask = tail_mask(n - j);
          const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, s + j), topv));
          _mm512_mask_storeu_ps(s + j, mask, e);
          lanes = _mm512_mask_add_ps(lanes, mask, lanes, e);
        }
        const __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(lanes));
        for (int64_t j = 0; j < n; j += 16) {
          const __mmask16 mask = tail_mask(n - j);
          _mm512_mask_storeu_ps(s + j, mask, _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, s + j), inv));
        }
      }
      for (int64_t h0 = 0; h0 < G; h0 += HEADS_AT_ONCE) {
        const int64_t heads = std::min(HEADS_AT_ONCE, G - h0);
        for (int64_t c0 = 0; c0 < chunks; c0 += DIM_AT_ONCE) {
          const int64_t slices = std::min(DIM_AT_ONCE, chunks - c0);
          __m512 acc[HEADS_AT_ONCE][DIM_AT_ONCE];
          for (int64_t h = 0; h < HEADS_AT_ONCE; ++h)
            for (int64_t c = 0; c < DIM_AT_ONCE; ++c) acc[h][c] = _mm512_setzero_ps();
          for (int64_t j = 0; j < n; ++j) {
            const bf16* vj = vp + key_rows[j] + 16 * c0;
            __m512 value[DIM_AT_ONCE];
            for (int64_t c = 0; c < slices; ++c) value[c] = load_bf16(vj + 16 * c, 0xffff);
            for (int64_t h = 0; h < heads; ++h) {
              const __m512 w = _mm512_set1_ps(probs[(h0 + h) * width + j]);
              for (int64_t c = 0; c < slices; ++c) acc[h][c] = _mm512_fmadd_ps(w, value[c], acc[h][c]);
            }
          }
          for (int64_t h = 0; h < heads; ++h) {
            bf16* o = op + (t * H + g * G + h0 + h) * D + 16 * c0;
            for (int64_t c = 0; c < slices; ++c) _mm256_storeu_si256((__m256i*)(o + 16 * c), to_bf16(acc[h][c]));
          }
        }
      }
    }
  });
  return out;
}

// The router's choice for each token, as s1serve.layers.moe.select_experts makes it. logits [T, E] (any float
// dtype): softmax over all E in float32; with G > 1 groups, the top k/G experts inside each of the G equal groups,
// else the top k overall (ties: the lower id); renormalised to sum to one when asked (with 1e-20 added under groups).
// Returns ids [T, k] int64 and weights [T, k] float32.
std::vector<torch::Tensor> select_experts(torch::Tensor logits, int64_t top_k, int64_t groups, bool renormalize) {
  TORCH_CHECK(logits.dim() == 2, "logits must be [T, E]");
  auto probs = logits.to(at::kFloat, /*non_blocking=*/false, /*copy=*/true).contiguous();  // written in place below
  const int64_t T = probs.size(0), E = probs.size(1);
  TORCH_CHECK(groups >= 1 && E % groups == 0 && top_k % groups == 0 && top_k / groups <= E / groups,
              "top_k and the experts must divide into the groups");
  auto ids = torch::empty({T, top_k}, torch::kLong);
  auto weights = torch::empty({T, top_k}, torch::kFloat);
  float* pp = probs.data_ptr<float>();
  int64_t* idp = ids.data_ptr<int64_t>();
  float* wp = weights.data_ptr<float>();
  const int64_t group_size = E / groups, per_group = top_k / groups;
  at::parallel_for(0, T, grain_rows(E * 4), [&](int64_t t0, int64_t t1) {
    std::vector<int64_t> rank(group_size);
    for (int64_t t = t0; t < t1; ++t) {
      float* p = pp + t * E;
      const float top = *std::max_element(p, p + E);
      float sum = 0.f;
      for (int64_t e = 0; e < E; ++e) sum += (p[e] = std::exp(p[e] - top));
      for (int64_t e = 0; e < E; ++e) p[e] /= sum;
      int64_t* id = idp + t * top_k;
      float* w = wp + t * top_k;
      for (int64_t g = 0; g < groups; ++g) {
        std::iota(rank.begin(), rank.end(), g * group_size);
        std::partial_sort(rank.begin(), rank.begin() + per_group, rank.end(),
                          [&](int64_t a, int64_t b) { return p[a] > p[b] || (p[a] == p[b] && a < b); });
        for (int64_t j = 0; j < per_group; ++j) id[g * per_group + j] = rank[j], w[g * per_group + j] = p[rank[j]];
      }
      if (renormalize) {
        float total = 0.f;
        for (int64_t j = 0; j < top_k; ++j) total += w[j];
        if (groups > 1) total += 1e-20f;
        for (int64_t j = 0; j < top_k; ++j) w[j] /= total;
      }
    }
  });
  return {ids, weights};
}

// The (token, slot) pairs routed to the experts held here, [first, first + count), in the order the grouped
// matmuls want them: by expert, and within an expert by token and slot (ids outside the range, as padding rows
// carry, are dropped). ids / weights [T, k]. Returns token_of_row [R] int64, row_weight [R] float32 and
// ends [count] int64 (where each held expert's rows end).
std::vector<torch::Tensor> sort_rows(torch::Tensor ids, torch::Tensor weights, int64_t first, int64_t count) {
  TORCH_CHECK(ids.dim() == 2 && ids.sizes() == weights.sizes(), "ids and weights must be [T, k]");
  auto idc = ids.to(at::kLong).contiguous();
  auto wc = weights.to(at::kFloat).contiguous();
  const int64_t pairs = idc.numel(), top_k = idc.size(1);
  const int64_t* idp = idc.data_ptr<int64_t>();
  const float* wsrc = wc.data_ptr<float>();
  auto ends = torch::zeros({count}, torch::kLong);
  int64_t* endp = ends.data_ptr<int64_t>();
  for (int64_t pair = 0; pair < pairs; ++pair) {
    const int64_t local = idp[pair] - first;
    if (local >= 0 && local < count) ++endp[local];
  }
  std::vector<int64_t> next(count);
  int64_t total = 0;
  for (int64_t e = 0; e < count; ++e) next[e] = total, total += endp[e], endp[e] = total;
  auto token_of_row = torch::empty({total}, torch::kLong);
  auto row_weight = torch::empty({total}, torch::kFloat);
  int64_t* tp = token_of_row.data_ptr<int64_t>();
  float* wp = row_weight.data_ptr<float>();
  for (int64_t pair = 0; pair < pairs; ++pair) {  // pairs in (token, slot) order: stable within each expert
    const int64_t local = idp[pair] - first;
    if (local < 0 || local >= count) continue;
    const int64_t row = next[local]++;
    tp[row] = pair / top_k;
    wp[row] = wsrc[pair];
  }
  return {token_of_row, row_weight, ends};
}

// The experts' outputs summed per token: out[t] = sum over the rows r of token t (in row order) of
// bf16(row_weight[r]) * rows[r], in float32, rounded to bf16 once. rows [R, H] bf16 -> [T, H] bf16.
torch::Tensor combine(torch::Tensor rows, torch::Tensor token_of_row, torch::Tensor row_weight, int64_t T) {
  TORCH_CHECK(rows.dim() == 2 && rows.scalar_type() == at::kBFloat16, "rows must be [R, H] bf16");
  TORCH_CHECK(token_of_row.scalar_type() == at::kLong && row_weight.scalar_type() == at::kFloat &&
                  token_of_row.numel() == rows.size(0) && row_weight.numel() == rows.size(0),
              "token_of_row / row_weight must give each row its token and weight");
  auto rc = rows.contiguous();
  const int64_t R = rc.size(0), H = rc.size(1);
  const int64_t* tp = token_of_row.data_ptr<int64_t>();
  const float* wp = row_weight.data_ptr<float>();
  std::vector<int64_t> first(T + 1, 0), rows_by_token(R);  // each token's rows, in row order: rows_by_token[first[t]..]
  for (int64_t r = 0; r < R; ++r) {
    TORCH_CHECK(tp[r] >= 0 && tp[r] < T, "token_of_row out of range");
    ++first[tp[r] + 1];
  }
  std::partial_sum(first.begin(), first.end(), first.begin());
  std::vector<int64_t> next(first.begin(), first.end() - 1);
  for (int64_t r = 0; r < R; ++r) rows_by_token[next[tp[r]]++] = r;
  auto out = torch::empty({T, H}, rc.options());
  const bf16* rp = rc.data_ptr<bf16>();
  bf16* op = out.data_ptr<bf16>();
  at::parallel_for(0, T, grain_rows(H * 8), [&](int64_t t0, int64_t t1) {
    std::vector<float> acc(H);
    for (int64_t t = t0; t < t1; ++t) {
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t i = first[t]; i < first[t + 1]; ++i) {  // rows in order, each read front to back
        const int64_t r = rows_by_token[i];
        const __m512 w = _mm512_set1_ps(round_bf16(wp[r]));
        const bf16* row = rp + r * H;
        for (int64_t h = 0; h < H; h += 16) {  // product, then sum: no fused multiply-add
          const __mmask16 mask = tail_mask(H - h);
          const __m512 sum = _mm512_add_ps(_mm512_maskz_loadu_ps(mask, acc.data() + h),
                                           _mm512_mul_ps(w, load_bf16(row + h, mask)));
          _mm512_mask_storeu_ps(acc.data() + h, mask, sum);
        }
      }
      for (int64_t h = 0; h < H; h += 16) {
        const __mmask16 mask = tail_mask(H - h);
        _mm256_mask_storeu_epi16(op + t * H + h, mask, to_bf16(_mm512_maskz_loadu_ps(mask, acc.data() + h)));
      }
    }
  });
  return out;
}

// The index of the first largest value of each row of float32 logits [R, V] (torch.argmax's rule: NaN counts as the
// largest, so the first NaN wins), 16 lanes at a time and rows over the threads: one pass at memory speed, where
// torch's reductions over the last dim of a few rows run on one thread.
torch::Tensor greedy(torch::Tensor logits) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat, "logits must be [R, V] float32");
  auto lc = logits.contiguous();
  const int64_t R = lc.size(0), V = lc.size(1);
  TORCH_CHECK(V > 0, "logits must have at least one column");
  auto out = torch::empty({R}, torch::kLong);
  const float* lp = lc.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, R, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* row = lp + r * V;
      __m512 best = _mm512_set1_ps(-INFINITY);
      __m512i best_at = _mm512_set1_epi32(0);
      __m512i at = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
      const __m512i step = _mm512_set1_epi32(16);
      bool nan = false;
      int64_t v = 0;
      for (; v + 16 <= V && V < (int64_t{1} << 31); v += 16) {
        const __m512 x = _mm512_loadu_ps(row + v);
        if (_mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q)) {
          nan = true;
          break;
        }
        const __mmask16 higher = _mm512_cmp_ps_mask(x, best, _CMP_GT_OQ);  // strictly: each lane keeps its first
        best = _mm512_mask_mov_ps(best, higher, x);
        best_at = _mm512_mask_mov_epi32(best_at, higher, at);
        at = _mm512_add_epi32(at, step);
      }
      alignas(64) float lane_best[16];
      alignas(64) int32_t lane_at[16];
      _mm512_store_ps(lane_best, best);
      _mm512_store_si512(lane_at, best_at);
      float top = -INFINITY;
      int64_t index = 0;
      for (int i = 0; i < 16; ++i)  // the largest over the lanes; among equals the lowest index
        if (lane_best[i] > top || (lane_best[i] == top && lane_at[i] < index)) top = lane_best[i], index = lane_at[i];
      if (nan || v == 0) v = 0, top = -INFINITY, index = 0;  // a NaN ahead, or nothing done: the plain scan decides
      for (; v < V; ++v) {
        if (std::isnan(row[v])) {
          index = v;
          break;
        }
        if (row[v] > top) top = row[v], index = v;
      }
      op[r] = index;
    }
  });
  return out;
}

void register_fused_ops(pybind11::module& m) {
  m.def("greedy", &greedy, "the first index of each row's largest value (argmax's rule) of float32 logits");
  m.def("rms_norm", &rms_norm, "RMSNorm of bf16 rows (float32 statistics, weight applied in bf16)");
  m.def("rotary", &rotary, "x * cos + rotate_half(x) * sin of [T, H, D] bf16, rounded as PyTorch's bf16 ops");
  m.def("qk_norm_rotary_cache", &qk_norm_rotary_cache,
        "q and k heads normed and rotated, k and v written to their cache slots, q returned");
  m.def("paged_attention", &paged_attention, "each row's attention over its own keys in the paged cache, in place");
  m.def("silu_mul", &silu_mul, "bf16(silu(gate)) * up of [R, 2I] bf16 rows");
  m.def("grouped_swiglu", &grouped_swiglu, "bf16(silu(gate)) * up of each expert's rows, from its packed w13");
  m.def("select_experts", &select_experts, "softmax and (grouped) top-k routing: ids, weights");
  m.def("sort_rows", &sort_rows, "the held experts' (token, slot) rows by expert: token_of_row, row_weight, ends");
  m.def("combine", &combine, "weighted per-token sums of the experts' output rows");
}
