// bf16 x bf16 matmuls (float32 sums, bf16 or float32 out) with AVX512-BF16, on weights packed for them: y[m, n] = sum_k x[m, k] w[n, k].
//
// A weight [N, K] is packed (kernels.pack, in Python) as [N/64, K/2, 64, 2]: blocks of 64 output columns, and
// inside a block, for each pair of k, the 64 columns' two values side by side. One 512-bit load then holds 16
// columns' pairs, and vdpbf16ps against x's pair broadcast adds both products to 16 column sums at once. A block is
// one sequential stream of K x 128 bytes, which the decode case (one row of x) reads at memory speed.
//
// Row-invariant by construction: every output is one float32 lane accumulated over the k pairs in order, whatever
// M, the tiling or the threads; so a sequence's result never depends on what else is in the batch.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cstring>

namespace {

constexpr int64_t BLOCK_N = 64;  // output columns per packed block: 4 vectors of 16 float lanes
constexpr int ROWS = 6;          // rows of x per register tile: 6 x 4 accumulators + 4 weight vectors + 1 broadcast
using bf16 = at::BFloat16;

// Output element type: float32, or bf16 rounded to nearest even (as PyTorch's conversion) in the same pass.
template <typename Out>
inline void store16(Out* y, __m512 v);
template <>
inline void store16<float>(float* y, __m512 v) { _mm512_storeu_ps(y, v); }
template <>
inline void store16<bf16>(bf16* y, __m512 v) { _mm256_storeu_si256((__m256i*)y, (__m256i)_mm512_cvtneps_pbh(v)); }

// The MB x 64 tile of rows x (stride ldx) times one packed block.
template <int MB, typename Out>
inline void tile(const bf16* x, int64_t ldx, const bf16* w, int64_t K, Out* y, int64_t ldy) {
  __m512 acc[MB][4];
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t p = 0; p < K / 2; ++p) {
    const bf16* wp = w + p * 2 * BLOCK_N;
    __m512bh wv[4];
    for (int j = 0; j < 4; ++j) wv[j] = (__m512bh)_mm512_loadu_si512((const void*)(wp + 32 * j));
    for (int i = 0; i < MB; ++i) {
      int32_t pair;
      std::memcpy(&pair, x + i * ldx + 2 * p, sizeof(pair));
      const __m512bh xb = (__m512bh)_mm512_set1_epi32(pair);
      for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], xb, wv[j]);
    }
  }
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < 4; ++j) store16(y + i * ldy + 16 * j, acc[i][j]);
}

// The 64 columns of one packed block for all M rows of x.
template <typename Out>
void rows_times_block(const bf16* x, int64_t M, int64_t ldx, const bf16* w, int64_t K, Out* y, int64_t ldy) {
  int64_t m = 0;
  for (; m + ROWS <= M; m += ROWS) tile<ROWS>(x + m * ldx, ldx, w, K, y + m * ldy, ldy);
  const bf16* xr = x + m * ldx;
  Out* yr = y + m * ldy;
  switch (M - m) {
    case 5: tile<5>(xr, ldx, w, K, yr, ldy); break;
    case 4: tile<4>(xr, ldx, w, K, yr, ldy); break;
    case 3: tile<3>(xr, ldx, w, K, yr, ldy); break;
    case 2: tile<2>(xr, ldx, w, K, yr, ldy); break;
    case 1: tile<1>(xr, ldx, w, K, yr, ldy); break;
    default: break;
  }
}

void check_x(const torch::Tensor& x, int64_t K) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.stride(1) == 1, "x must be a [M, K] bf16 matrix");
  TORCH_CHECK(x.size(1) == K, "x has ", x.size(1), " columns, the packed weight ", K);
}

}  // namespace

template <typename Out>
void linear_into(const torch::Tensor& x, const torch::Tensor& w, torch::Tensor& y) {
  const int64_t M = x.size(0), K = x.size(1), blocks = w.size(0), N = blocks * BLOCK_N;
  const bf16* xp = x.data_ptr<bf16>();
  const bf16* wp = w.data_ptr<bf16>();
  Out* yp = y.data_ptr<Out>();
  const int64_t ldx = x.stride(0);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) rows_times_block(xp, M, ldx, wp + b * BLOCK_N * K, K, yp + b * BLOCK_N, N);
  });
}

template <typename Out>
void grouped_into(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& ends, torch::Tensor& y) {
  const int64_t R = x.size(0), K = x.size(1), E = w.size(0), blocks = w.size(1), N = blocks * BLOCK_N;
  const bf16* xp = x.data_ptr<bf16>();
  const bf16* wp = w.data_ptr<bf16>();
  const int64_t* endp = ends.data_ptr<int64_t>();
  Out* yp = y.data_ptr<Out>();
  const int64_t ldx = x.stride(0);
  // Work items: (expert, block of columns) for the experts that received rows.
  std::vector<int64_t> starts(E);
  std::vector<std::pair<int64_t, int64_t>> items;
  int64_t start = 0;
  for (int64_t e = 0; e < E; ++e) {
    TORCH_CHECK(endp[e] >= start && endp[e] <= R, "ends must be non-decreasing and at most the row count");
    starts[e] = start;
    if (endp[e] > start)
      for (int64_t b = 0; b < blocks; ++b) items.emplace_back(e, b);
    start = endp[e];
  }
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const auto [e, b] = items[i];
      const int64_t r0 = starts[e];
      rows_times_block(xp + r0 * ldx, endp[e] - r0, ldx, wp + (e * blocks + b) * BLOCK_N * K, K,
                       yp + r0 * N + b * BLOCK_N, N);
    }
  });
}

// x [M, K] bf16, w packed [N/64, K/2, 64, 2] -> [M, N] in bf16 or float32.
torch::Tensor linear(torch::Tensor x, torch::Tensor w, bool bf16_out) {
  TORCH_CHECK(w.dim() == 4 && w.size(2) == BLOCK_N && w.size(3) == 2 && w.is_contiguous(), "w must be packed");
  const int64_t M = x.size(0), K = 2 * w.size(1), blocks = w.size(0), N = blocks * BLOCK_N;
  check_x(x, K);
  auto y = torch::empty({M, N}, x.options().dtype(bf16_out ? at::kBFloat16 : at::kFloat));
  if (bf16_out)
    linear_into<bf16>(x, w, y);
  else
    linear_into<float>(x, w, y);
  return y;
}

// Rows ends[e-1]..ends[e] of x times expert e: x [R, K] bf16, w packed [E, N/64, K/2, 64, 2], ends [E] int64
// -> [R, N] in bf16 or float32.
torch::Tensor grouped_linear(torch::Tensor x, torch::Tensor w, torch::Tensor ends, bool bf16_out) {
  TORCH_CHECK(w.dim() == 5 && w.size(3) == BLOCK_N && w.size(4) == 2 && w.is_contiguous(), "w must be packed");
  TORCH_CHECK(ends.dim() == 1 && ends.size(0) == w.size(0) && ends.scalar_type() == at::kLong, "ends must be [E] int64");
  const int64_t R = x.size(0), K = 2 * w.size(2), E = w.size(0), blocks = w.size(1), N = blocks * BLOCK_N;
  check_x(x, K);
  auto y = torch::empty({R, N}, x.options().dtype(bf16_out ? at::kBFloat16 : at::kFloat));
  if (bf16_out)
    grouped_into<bf16>(x, w, ends, y);
  else
    grouped_into<float>(x, w, ends, y);
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear", &linear, "x [M, K] bf16 times a packed [N, K] weight -> [M, N] bf16 or float32");
  m.def("grouped_linear", &grouped_linear, "row segments of x times their packed experts -> bf16 or float32");
}
