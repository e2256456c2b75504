// bf16 x bf16 matmuls (float32 sums, bf16 or float32 out) with AVX512-BF16, on weights packed for them: y[m, n] = sum_k x[m, k] w[n, k].
//
// A weight [N, K] is packed (kernels.pack, in Python) as [N/64, K/2, 64, 2]: blocks of 64 output columns, and
// inside a block, for each pair of k, the 64 columns' two values side by side. One 512-bit load then holds 16
// columns' pairs, and vdpbf16ps against x's pair broadcast adds both products to 16 column sums at once. A block is
// one sequential stream of K x 128 bytes, which the decode case (one row of x) reads at memory speed.
//
// Row-invariant by construction: every output is one float32 lane accumulated over the k pairs in order, whatever
// M, the tiling or the threads; so a sequence's result never depends on what else is in the batch.
//
// On CPUs with AMX (set_amx, called once from Python), every call instead runs on the tile unit, from the same packed
// layout: a B tile is 16 k pairs x 16 columns of a block (row stride 256 bytes), an A tile 16 rows x 32 k of x, and
// each tdpbf16ps adds 16 x 16 x 32 products. That is 16x the products per instruction of vdpbf16ps, so steps with
// many rows (prefill, a full decode batch) stop being compute-bound; with one row it still streams the weight at
// memory speed. Also row-invariant: a row's sums depend only on that row, whatever the rows beside it in the tile
// (the tile unit sums each row's products in its own fixed order). The two paths round differently, so one process
// uses one of them for every call; it needs K a multiple of 32 (else the AVX-512 path takes the call).
//
// FP8 weights (W8A16, the second half of this file) are decoded to exactly the bf16 values bf16(fp8 * scale) that
// s1serve.checkpoint.fp8.dequantize gives, in registers, and then take the same vdpbf16ps steps in the same order:
// their results are bitwise those of the bf16 kernel on the dequantized weight, at half the bytes read.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstring>
#include <functional>
#include <vector>

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

// With ASK_NEXT, every PAIRS_PER_ASK k pairs the tile first asks for the next `next_lines` cache lines from `next` on
// into L2 (see rows_times_block). `next` is passed by value: the fp8 tiles, given it by reference, kept their sums on
// the stack (docs/engine.md, eighth sitting).
constexpr int64_t PAIRS_PER_ASK = 4;

// The MB x 64 tile of rows x (stride ldx) times one packed block.
template <int MB, bool ASK_NEXT, typename Out>
inline void tile(const bf16* x, int64_t ldx, const bf16* w, int64_t K, Out* y, int64_t ldy, const char* next,
                 int64_t next_lines) {
  __m512 acc[MB][4];
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t p = 0; p < K / 2; ++p) {
    if (ASK_NEXT && p % PAIRS_PER_ASK == 0) {
      for (int64_t l = 0; l < next_lines; ++l) _mm_prefetch(next + 64 * l, _MM_HINT_T1);
      next += 64 * next_lines;
    }
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

template <bool ASK_NEXT, typename Out>
void row_tiles(const bf16* x, int64_t M, int64_t ldx, const bf16* w, int64_t K, Out* y, int64_t ldy,
               const char* next, int64_t next_lines) {
  const int64_t per_tile = 64 * next_lines * ((K / 2 + PAIRS_PER_ASK - 1) / PAIRS_PER_ASK);  // bytes a tile asks for
  int64_t m = 0;
  for (; m + ROWS <= M; m += ROWS, next += per_tile)
    tile<ROWS, ASK_NEXT>(x + m * ldx, ldx, w, K, y + m * ldy, ldy, next, next_lines);
  const bf16* xr = x + m * ldx;
  Out* yr = y + m * ldy;
  switch (M - m) {
    case 5: tile<5, ASK_NEXT>(xr, ldx, w, K, yr, ldy, next, next_lines); break;
    case 4: tile<4, ASK_NEXT>(xr, ldx, w, K, yr, ldy, next, next_lines); break;
    case 3: tile<3, ASK_NEXT>(xr, ldx, w, K, yr, ldy, next, next_lines); break;
    case 2: tile<2, ASK_NEXT>(xr, ldx, w, K, yr, ldy, next, next_lines); break;
    case 1: tile<1, ASK_NEXT>(xr, ldx, w, K, yr, ldy, next, next_lines); break;
    default: break;
  }
}

// From NEXT_BLOCK_MIN_ROWS to NEXT_BLOCK_MAX_ROWS rows (a decode batch, a prefill's last rows for the lm_head) the
// AVX-512 path asks for the next block while it multiplies this one: each row tile past the first rereads the block
// from L2 at the multiply rate while memory would sit idle. Fewer rows are bound by the read itself; with more, the
// read is a small part of the block's time, so prefill keeps the plain loop. By hand, the bench preset's lm_head
// (317.5 MB, 2 threads, alternating in one process) ran 1.24x / 1.28x / 1.34x / 1.26x / 1.13x / 1.03x as fast with it
// at 12 / 16 / 24 / 32 / 64 / 128 rows, 0.96x-1.07x at 4-8, and 0.997x-1.014x at 512-1024 rows of a 78 MB weight.
constexpr int64_t NEXT_BLOCK_MIN_ROWS = 12, NEXT_BLOCK_MAX_ROWS = 96;

// The 64 columns of one packed block for all M rows of x. With `ask_next` (w is followed in memory by the weight's
// next block) and a decode batch's rows, that block is asked into L2 a few lines per PAIRS_PER_ASK k pairs over all
// row tiles.
template <typename Out>
void rows_times_block(const bf16* x, int64_t M, int64_t ldx, const bf16* w, int64_t K, Out* y, int64_t ldy,
                      bool ask_next) {
  if (!ask_next || M < NEXT_BLOCK_MIN_ROWS || M > NEXT_BLOCK_MAX_ROWS) {
    row_tiles<false>(x, M, ldx, w, K, y, ldy, nullptr, 0);
    return;
  }
  const int64_t asks = (M + ROWS - 1) / ROWS * ((K / 2 + PAIRS_PER_ASK - 1) / PAIRS_PER_ASK);
  const int64_t lines = K * BLOCK_N * sizeof(bf16) / 64;
  row_tiles<true>(x, M, ldx, w, K, y, ldy, reinterpret_cast<const char*>(w + K * BLOCK_N), (lines + asks - 1) / asks);
}

void check_x(const torch::Tensor& x, int64_t K) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.stride(1) == 1, "x must be a [M, K] bf16 matrix");
  TORCH_CHECK(x.size(1) == K, "x has ", x.size(1), " columns, the packed weight ", K);
}

// ---- AMX tiles ----
#pragma GCC push_options
#pragma GCC target("amx-tile,amx-bf16")

constexpr int TILE_ROWS = 16;  // rows of x per A tile
constexpr int64_t TILE_K = 32;  // k per tdpbf16ps (16 pairs)
bool amx_enabled = false;

// The tile configuration (palette 1): tiles 0-3 the sums of 4 x 16 columns for `rows` rows, tile 4 the rows of x,
// tiles 5 and 6 the weight (16 pairs x 16 columns each, loaded alternately).
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Configures this thread's tiles for `rows` rows (1..16) unless they already are; `configured` is the caller's
// record of this thread's current setting within one parallel region (other code may reconfigure between calls).
inline void configure(int rows, int& configured) {
  if (rows == configured) return;
  TileConfig cfg;
  for (int t = 0; t < 4; ++t) cfg.rows[t] = rows, cfg.colsb[t] = 64;
  cfg.rows[4] = rows, cfg.colsb[4] = 64;
  for (int t = 5; t < 7; ++t) cfg.rows[t] = 16, cfg.colsb[t] = 64;
  _tile_loadconfig(&cfg);
  configured = rows;
}

inline void zero_sums() {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
}

// The sums in tiles 0-3 (`rows` rows x 64 columns) into y.
template <typename Out>
inline void store_sums(Out* y, int64_t ldy, int rows) {
  alignas(64) float sums[TILE_ROWS * BLOCK_N];
  _tile_stored(0, sums, BLOCK_N * sizeof(float));
  _tile_stored(1, sums + 16, BLOCK_N * sizeof(float));
  _tile_stored(2, sums + 32, BLOCK_N * sizeof(float));
  _tile_stored(3, sums + 48, BLOCK_N * sizeof(float));
  for (int i = 0; i < rows; ++i)
    for (int j = 0; j < 4; ++j) store16(y + i * ldy + 16 * j, _mm512_load_ps(sums + i * BLOCK_N + 16 * j));
}

// The four tdpbf16ps of one k step: rows of x in tile 4 times the 16 pairs x 64 columns at w (packed layout).
inline void tile_step(const bf16* w) {
  constexpr int64_t pair_stride = 2 * BLOCK_N * sizeof(bf16);  // bytes from one k pair's row to the next
  _tile_loadd(5, w, pair_stride);
  _tile_dpbf16ps(0, 4, 5);
  _tile_loadd(6, w + 32, pair_stride);
  _tile_dpbf16ps(1, 4, 6);
  _tile_loadd(5, w + 64, pair_stride);
  _tile_dpbf16ps(2, 4, 5);
  _tile_loadd(6, w + 96, pair_stride);
  _tile_dpbf16ps(3, 4, 6);
}

// Up to 16 rows of x (stride ldx) times one packed block (64 columns): the tiles configured for `rows` rows. Each k
// step first asks for the weight's 4 KiB of the step PREFETCH_STEPS ahead: the tile loads stride through a block 256
// bytes at a time, which the hardware prefetcher follows late (the bench preset's lm_head at 1-8 rows took ~8% less
// time with it, benchmarks/cpu_matmul.py).
constexpr int64_t PREFETCH_STEPS = 2;
constexpr int64_t NEXT_BLOCK_MIN_TILES = 4;  // 64 rows: see amx_rows_times_block

template <typename Out>
void amx_tile(const bf16* x, int64_t ldx, const bf16* w, int64_t K, Out* y, int64_t ldy, int rows,
              const char*& next, int64_t next_lines) {
  zero_sums();
  for (int64_t k = 0; k < K; k += TILE_K) {
    for (int64_t l = 0; l < next_lines; ++l) _mm_prefetch(next + 64 * l, _MM_HINT_T1);
    next += 64 * next_lines;
    if (k + PREFETCH_STEPS * TILE_K < K) {
      const char* ahead = reinterpret_cast<const char*>(w + (k + PREFETCH_STEPS * TILE_K) * BLOCK_N);
      for (int line = 0; line < TILE_K * BLOCK_N * 2 / 64; ++line) _mm_prefetch(ahead + 64 * line, _MM_HINT_T0);
    }
    _tile_loadd(4, x + k, ldx * sizeof(bf16));
    tile_step(w + k * BLOCK_N);  // k / 2 pairs in, 2 * BLOCK_N values each
  }
  store_sums(y, ldy, rows);
}

// All M rows of x times one packed block on the tiles: full tiles of 16 rows, then the remainder.
template <typename Out>
void amx_rows_times_block(const bf16* x, int64_t M, int64_t ldx, const bf16* w, int64_t K, Out* y, int64_t ldy,
                          int& configured, bool ask_next) {
  // With many row tiles (a prefill's projections, or its experts' rows), the block that follows this one in memory
  // is asked into L2 a few lines per k step, so that reading the next weight overlaps this block's products instead
  // of stalling the next block's first tile (prefetches never fault: past the weight's end they do nothing). A few
  // row tiles (decode batches) stay bound by the read itself, which the prefetch above keeps ahead.
  const int64_t tiles = (M + TILE_ROWS - 1) / TILE_ROWS, steps = tiles * (K / TILE_K);
  const int64_t per_step = ask_next && tiles >= NEXT_BLOCK_MIN_TILES ? (K * BLOCK_N * 2 / 64 + steps - 1) / steps : 0;
  const char* next = reinterpret_cast<const char*>(w + K * BLOCK_N);
  for (int64_t m = 0; m < M; m += TILE_ROWS) {
    const int rows = static_cast<int>(std::min<int64_t>(TILE_ROWS, M - m));
    configure(rows, configured);
    amx_tile(x + m * ldx, ldx, w, K, y + m * ldy, ldy, rows, next, per_step);  // moves `next` on
  }
}

#pragma GCC pop_options

// Asks the kernel for the AMX tile state (Linux gives it to a process only on request).
bool request_amx() {
  constexpr long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
  return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
}

inline bool amx_applies(int64_t K) { return amx_enabled && K % TILE_K == 0; }

// The rows of one block on whichever path this process uses. `ask_next`: whether the memory after w holds the
// weight's next block, which both paths ask for while they multiply many rows (not so for a decoded fp8 copy).
template <typename Out>
inline void any_rows_times_block(const bf16* x, int64_t M, int64_t ldx, const bf16* w, int64_t K, Out* y, int64_t ldy,
                                 int& configured, bool ask_next = true) {
  if (amx_applies(K))
    amx_rows_times_block(x, M, ldx, w, K, y, ldy, configured, ask_next);
  else
    rows_times_block(x, M, ldx, w, K, y, ldy, ask_next);
}

}  // namespace

// Runs fn(i0, i1, configured) over [0, n) in parallel, in chunks that each thread claims as it finishes the last
// (`configured`: that thread's tile setting, see configure). A thread that the OS or the hypervisor preempts (an API
// server or a client waking on the same cores) then holds back only its current chunk: the others take the rest,
// where a static split would leave them waiting at the end for its whole half. Each item's result does not depend on
// which thread computes it.
constexpr int64_t CHUNKS_PER_THREAD = 8;

template <typename Fn>
void for_items(int64_t n, const Fn& fn) {
  if (n <= 0) return;
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), n);
  const int64_t chunk = std::max<int64_t>(1, n / (threads * CHUNKS_PER_THREAD));
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    int configured = 0;
    for (int64_t i0 = next.fetch_add(chunk); i0 < n; i0 = next.fetch_add(chunk))
      fn(i0, std::min(i0 + chunk, n), configured);
  });
}

// For fused_ops.cpp (grouped_swiglu): the rows of x times one packed block into bf16 on this process's path.
void packed_block_bf16(const bf16* x, int64_t M, int64_t ldx, const bf16* w, int64_t K, bf16* y, int64_t ldy,
                       int& configured) {
  any_rows_times_block(x, M, ldx, w, K, y, ldy, configured);
}

template <typename Out>
void linear_into(const torch::Tensor& x, const torch::Tensor& w, torch::Tensor& y) {
  const int64_t M = x.size(0), K = x.size(1), blocks = w.size(0), N = blocks * BLOCK_N;
  const bf16* xp = x.data_ptr<bf16>();
  const bf16* wp = w.data_ptr<bf16>();
  Out* yp = y.data_ptr<Out>();
  const int64_t ldx = x.stride(0);
  for_items(blocks, [&](int64_t b0, int64_t b1, int& configured) {
    for (int64_t b = b0; b < b1; ++b)
      any_rows_times_block(xp, M, ldx, wp + b * BLOCK_N * K, K, yp + b * BLOCK_N, N, configured);
  });
}

// Runs fn(e, b, r0, r1, configured), in parallel, for each column block b of each expert e that received rows r0..r1
// of x (`configured`: the tile setting of the thread running it, see configure).
template <typename Fn>
void for_expert_blocks(const torch::Tensor& ends, int64_t R, int64_t blocks, const Fn& fn) {
  const int64_t* endp = ends.data_ptr<int64_t>();
  std::vector<std::pair<int64_t, int64_t>> items;  // (expert, block) for the experts that received rows
  std::vector<int64_t> starts(ends.size(0));
  int64_t start = 0;
  for (int64_t e = 0; e < ends.size(0); ++e) {
    TORCH_CHECK(endp[e] >= start && endp[e] <= R, "ends must be non-decreasing and at most the row count");
    starts[e] = start;
    if (endp[e] > start)
      for (int64_t b = 0; b < blocks; ++b) items.emplace_back(e, b);
    start = endp[e];
  }
  for_items(static_cast<int64_t>(items.size()), [&](int64_t i0, int64_t i1, int& configured) {
    for (int64_t i = i0; i < i1; ++i)
      fn(items[i].first, items[i].second, starts[items[i].first], endp[items[i].first], configured);
  });
}

// For fused_ops.cpp (grouped_swiglu): for_expert_blocks above.
void for_each_expert_block(const torch::Tensor& ends, int64_t R, int64_t blocks,
                           const std::function<void(int64_t, int64_t, int64_t, int64_t, int&)>& fn) {
  for_expert_blocks(ends, R, blocks, fn);
}

template <typename Out>
void grouped_into(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& ends, torch::Tensor& y) {
  const int64_t K = x.size(1), blocks = w.size(1), N = blocks * BLOCK_N, ldx = x.stride(0);
  const bf16* xp = x.data_ptr<bf16>();
  const bf16* wp = w.data_ptr<bf16>();
  Out* yp = y.data_ptr<Out>();
  for_expert_blocks(ends, x.size(0), blocks, [&](int64_t e, int64_t b, int64_t r0, int64_t r1, int& configured) {
    any_rows_times_block(xp + r0 * ldx, r1 - r0, ldx, wp + (e * blocks + b) * BLOCK_N * K, K,
                         yp + r0 * N + b * BLOCK_N, N, configured);
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

// x [M, K] bf16 times several packed weights (each [N_i/64, K/2, 64, 2]) -> [M, sum N_i], their outputs side by side
// in bf16: attention's q, k and v projections in one parallel region. Each block's result is the one linear() gives.
torch::Tensor linears(torch::Tensor x, std::vector<torch::Tensor> ws) {
  TORCH_CHECK(!ws.empty(), "linears needs at least one weight");
  const int64_t M = x.size(0), K = 2 * ws[0].size(1);
  check_x(x, K);
  std::vector<const bf16*> block_weight;  // per output block: its packed weight block
  for (const auto& w : ws) {
    TORCH_CHECK(w.dim() == 4 && w.size(2) == BLOCK_N && w.size(3) == 2 && w.is_contiguous() &&
                    w.scalar_type() == at::kBFloat16 && 2 * w.size(1) == K,
                "every weight must be packed bf16 with K = ", K);
    for (int64_t b = 0; b < w.size(0); ++b) block_weight.push_back(w.data_ptr<bf16>() + b * BLOCK_N * K);
  }
  const int64_t blocks = static_cast<int64_t>(block_weight.size()), N = blocks * BLOCK_N, ldx = x.stride(0);
  auto y = torch::empty({M, N}, x.options());
  const bf16* xp = x.data_ptr<bf16>();
  bf16* yp = y.data_ptr<bf16>();
  for_items(blocks, [&](int64_t b0, int64_t b1, int& configured) {
    for (int64_t b = b0; b < b1; ++b)
      any_rows_times_block(xp, M, ldx, block_weight[b], K, yp + b * BLOCK_N, N, configured);
  });
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

// ---- FP8 weights (float8_e4m3fn, one float32 scale per 64 columns x 128 k), bf16 activations ----
//
// A weight [N, K] is packed (kernels.pack_fp8) as bytes [N/64, K/2, 128]: the bf16 layout's 128 values of a k pair,
// reordered so that the byte interleave below lands each decoded value in its bf16-layout lane. Its scales are packed
// as [N/64, ceil(K/128)]. Decoding needs AVX512-VBMI (vpermi2b), so this part is compiled for it and only called
// where the CPU has it (checked in Python).
#pragma GCC push_options
#pragma GCC target("avx512vbmi")

namespace {

constexpr int64_t BLOCK_K = 128;  // k per scale block: 64 pairs share one lookup table
constexpr int FUSED_ROWS = 4;     // rows per tile that decodes in registers (registers: 16 sums, 4 tables, weights)
constexpr int64_t DECODE_ONCE_ROWS = 48;  // more rows than this decode each block once into a bf16 buffer

// The float values of the 128 fp8 magnitudes (code & 0x7f; 0x7f is NaN).
const float* fp8_magnitudes() {
  static const std::array<float, 128> table = [] {
    std::array<float, 128> t{};
    for (int m = 0; m < 128; ++m) t[m] = static_cast<float>(c10::Float8_e4m3fn(m, c10::Float8_e4m3fn::from_bits()));
    return t;
  }();
  return table.data();
}

// bf16(magnitude * scale) for the 128 magnitudes, split into low and high bytes, 64 magnitudes per register: the
// operands of the vpermi2b lookups.
struct Lut {
  __m512i lo0, lo1, hi0, hi1;
};

// Rounds as dequantize does: the float32 product, to nearest even (c10's rounding), NaN to a quiet NaN.
inline Lut make_lut(float scale) {
  static const __m512i gather = [] {  // bytes 2 (low) then 3 (high) of 32 dwords: [32 low bytes | 32 high bytes]
    alignas(64) uint8_t idx[64];
    for (int i = 0; i < 32; ++i) idx[i] = 4 * i + 2, idx[32 + i] = 4 * i + 3;
    return _mm512_load_si512(idx);
  }();
  const float* mags = fp8_magnitudes();
  const __m512 s = _mm512_set1_ps(scale);
  __m512i rounded[8];
  for (int q = 0; q < 8; ++q) {
    const __m512 f = _mm512_mul_ps(_mm512_loadu_ps(mags + 16 * q), s);
    const __m512i bits = _mm512_castps_si512(f);
    const __m512i bias = _mm512_add_epi32(_mm512_set1_epi32(0x7fff),
                                          _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1)));
    rounded[q] = _mm512_mask_mov_epi32(_mm512_set1_epi32(0x7fc00000), _mm512_cmp_ps_mask(f, f, _CMP_ORD_Q),
                                       _mm512_add_epi32(bits, bias));
  }
  __m512i part[4];  // part[a]: [low bytes | high bytes] of magnitudes 32a..32a+31
  for (int a = 0; a < 4; ++a) part[a] = _mm512_permutex2var_epi8(rounded[2 * a], gather, rounded[2 * a + 1]);
  return {_mm512_shuffle_i64x2(part[0], part[1], 0x44), _mm512_shuffle_i64x2(part[2], part[3], 0x44),
          _mm512_shuffle_i64x2(part[0], part[1], 0xee), _mm512_shuffle_i64x2(part[2], part[3], 0xee)};
}

// 64 fp8 bytes -> 64 bf16 values: bf16(|v| * scale) looked up by the low 7 bits, v's sign xor-ed into the high
// byte (so a negative scale flips it as the product does), then low/high bytes interleaved into words per 128-bit lane.
inline void decode(__m512i v, const Lut& t, __m512bh& first, __m512bh& second) {
  const __m512i lo = _mm512_permutex2var_epi8(t.lo0, v, t.lo1);
  const __m512i hi = _mm512_ternarylogic_epi32(_mm512_permutex2var_epi8(t.hi0, v, t.hi1), v,
                                               _mm512_set1_epi8(static_cast<char>(0x80)), 0x78);  // a ^ (b & c)
  first = (__m512bh)_mm512_unpacklo_epi8(lo, hi);
  second = (__m512bh)_mm512_unpackhi_epi8(lo, hi);
}

// The MB x 64 tile of rows x times one packed fp8 block, decoding in registers: tile's steps, in tile's order.
template <int MB, typename Out>
void fp8_tile(const bf16* x, int64_t ldx, const uint8_t* w, const float* scales, int64_t K, Out* y, int64_t ldy) {
  __m512 acc[MB][4];
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t p = 0, kb = 0; p < K / 2; ++kb) {
    const Lut t = make_lut(scales[kb]);
    for (const int64_t end = std::min(K / 2, p + BLOCK_K / 2); p < end; ++p) {
      __m512bh xb[MB];
      for (int i = 0; i < MB; ++i) {
        int32_t pair;
        std::memcpy(&pair, x + i * ldx + 2 * p, sizeof(pair));
        xb[i] = (__m512bh)_mm512_set1_epi32(pair);
      }
      for (int h = 0; h < 2; ++h) {
        __m512bh w0, w1;
        decode(_mm512_loadu_si512(w + p * 2 * BLOCK_N + 64 * h), t, w0, w1);
        for (int i = 0; i < MB; ++i) {
          acc[i][2 * h] = _mm512_dpbf16_ps(acc[i][2 * h], xb[i], w0);
          acc[i][2 * h + 1] = _mm512_dpbf16_ps(acc[i][2 * h + 1], xb[i], w1);
        }
      }
    }
  }
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < 4; ++j) store16(y + i * ldy + 16 * j, acc[i][j]);
}

// One packed fp8 block decoded into the bf16 layout [K/2, 64, 2] (this thread's buffer, reused across calls).
const bf16* decode_block(const uint8_t* w, const float* scales, int64_t K) {
  thread_local std::vector<bf16> buffer;
  if (static_cast<int64_t>(buffer.size()) < K * BLOCK_N) buffer.resize(K * BLOCK_N);
  bf16* out = buffer.data();
  for (int64_t p = 0, kb = 0; p < K / 2; ++kb) {
    const Lut t = make_lut(scales[kb]);
    for (const int64_t end = std::min(K / 2, p + BLOCK_K / 2); p < end; ++p)
      for (int h = 0; h < 2; ++h) {
        __m512bh w0, w1;
        decode(_mm512_loadu_si512(w + p * 2 * BLOCK_N + 64 * h), t, w0, w1);
        _mm512_storeu_si512(out + p * 2 * BLOCK_N + 64 * h, (__m512i)w0);
        _mm512_storeu_si512(out + p * 2 * BLOCK_N + 64 * h + 32, (__m512i)w1);
      }
  }
  return out;
}

#pragma GCC push_options
#pragma GCC target("avx512vbmi,amx-tile,amx-bf16")

// Up to 16 rows of x times one packed fp8 block on the AMX tiles: each k step's 16 pairs x 64 columns are decoded into
// a 4 KiB buffer that stays in L1 and multiplied at once (the weight tiles must come from memory), so one pass over
// the block suffices; the same bf16 values and tile steps as the bf16 path on the dequantized weight.
template <typename Out>
void amx_fp8_tile(const bf16* x, int64_t ldx, const uint8_t* w, const float* scales, int64_t K, Out* y, int64_t ldy,
                  int rows, int& configured) {
  alignas(64) bf16 step[TILE_K * BLOCK_N];  // 16 pairs x 64 columns x 2
  configure(rows, configured);
  zero_sums();
  Lut t{};
  for (int64_t k = 0; k < K; k += TILE_K) {
    if (k % BLOCK_K == 0) t = make_lut(scales[k / BLOCK_K]);
    for (int64_t p = 0; p < TILE_K / 2; ++p)
      for (int h = 0; h < 2; ++h) {
        __m512bh w0, w1;
        decode(_mm512_loadu_si512(w + (k / 2 + p) * 2 * BLOCK_N + 64 * h), t, w0, w1);
        _mm512_store_si512(step + p * 2 * BLOCK_N + 64 * h, (__m512i)w0);
        _mm512_store_si512(step + p * 2 * BLOCK_N + 64 * h + 32, (__m512i)w1);
      }
    _tile_loadd(4, x + k, ldx * sizeof(bf16));
    tile_step(step);
  }
  store_sums(y, ldy, rows);
}

#pragma GCC pop_options

// The 64 columns of one packed fp8 block for all M rows of x. Decoding in registers costs each tile of rows a
// little; decoding into a buffer (written, then read from cache) costs more, but once: it wins past DECODE_ONCE_ROWS.
// Where the bf16 path runs on AMX the fp8 path does too, so that its results stay bitwise the bf16 path's: up to 16
// rows decode step by step (amx_fp8_tile), more rows decode the block once.
template <typename Out>
void fp8_rows_times_block(const bf16* x, int64_t M, int64_t ldx, const uint8_t* w, const float* scales, int64_t K,
                          Out* y, int64_t ldy, int& configured) {
  if (amx_applies(K) && M <= TILE_ROWS) {
    if (M > 0) amx_fp8_tile(x, ldx, w, scales, K, y, ldy, static_cast<int>(M), configured);
    return;
  }
  if (amx_applies(K) || M > DECODE_ONCE_ROWS) {
    any_rows_times_block(x, M, ldx, decode_block(w, scales, K), K, y, ldy, configured, /*ask_next=*/false);
    return;
  }
  static_assert(FUSED_ROWS == 4, "one case per remaining row count");
  int64_t m = 0;
  for (; m + FUSED_ROWS <= M; m += FUSED_ROWS) fp8_tile<FUSED_ROWS>(x + m * ldx, ldx, w, scales, K, y + m * ldy, ldy);
  switch (M - m) {
    case 3: fp8_tile<3>(x + m * ldx, ldx, w, scales, K, y + m * ldy, ldy); break;
    case 2: fp8_tile<2>(x + m * ldx, ldx, w, scales, K, y + m * ldy, ldy); break;
    case 1: fp8_tile<1>(x + m * ldx, ldx, w, scales, K, y + m * ldy, ldy); break;
    default: break;
  }
}

void check_fp8(const torch::Tensor& w, const torch::Tensor& scales, int64_t lead) {
  TORCH_CHECK(w.dim() == lead + 3 && w.scalar_type() == at::kByte && w.size(-1) == 2 * BLOCK_N && w.is_contiguous(),
              "w must be a packed fp8 weight");
  const int64_t K = 2 * w.size(-2);
  TORCH_CHECK(scales.dim() == lead + 2 && scales.scalar_type() == at::kFloat && scales.is_contiguous() &&
                  scales.size(-2) == w.size(-3) && scales.size(-1) == (K + BLOCK_K - 1) / BLOCK_K &&
                  (lead == 0 || scales.size(0) == w.size(0)),
              "scales must be the packed [..., N/64, ceil(K/128)] float32 scales of w");
}

}  // namespace

template <typename Out>
void fp8_linear_into(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& scales, torch::Tensor& y) {
  const int64_t M = x.size(0), K = x.size(1), blocks = w.size(0), N = blocks * BLOCK_N, kb = scales.size(1);
  const bf16* xp = x.data_ptr<bf16>();
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const float* sp = scales.data_ptr<float>();
  Out* yp = y.data_ptr<Out>();
  for_items(blocks, [&](int64_t b0, int64_t b1, int& configured) {
    for (int64_t b = b0; b < b1; ++b)
      fp8_rows_times_block(xp, M, x.stride(0), wp + b * BLOCK_N * K, sp + b * kb, K, yp + b * BLOCK_N, N, configured);
  });
}

template <typename Out>
void fp8_grouped_into(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& scales,
                      const torch::Tensor& ends, torch::Tensor& y) {
  const int64_t K = x.size(1), blocks = w.size(1), N = blocks * BLOCK_N, kb = scales.size(2), ldx = x.stride(0);
  const bf16* xp = x.data_ptr<bf16>();
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const float* sp = scales.data_ptr<float>();
  Out* yp = y.data_ptr<Out>();
  for_expert_blocks(ends, x.size(0), blocks, [&](int64_t e, int64_t b, int64_t r0, int64_t r1, int& configured) {
    const int64_t block = e * blocks + b;
    fp8_rows_times_block(xp + r0 * ldx, r1 - r0, ldx, wp + block * BLOCK_N * K, sp + block * kb, K,
                         yp + r0 * N + b * BLOCK_N, N, configured);
  });
}

// x [M, K] bf16, w packed fp8 [N/64, K/2, 128] with scales [N/64, ceil(K/128)] -> [M, N] in bf16 or float32.
torch::Tensor fp8_linear(torch::Tensor x, torch::Tensor w, torch::Tensor scales, bool bf16_out) {
  check_fp8(w, scales, 0);
  const int64_t M = x.size(0), K = 2 * w.size(1), N = w.size(0) * BLOCK_N;
  check_x(x, K);
  auto y = torch::empty({M, N}, x.options().dtype(bf16_out ? at::kBFloat16 : at::kFloat));
  if (bf16_out)
    fp8_linear_into<bf16>(x, w, scales, y);
  else
    fp8_linear_into<float>(x, w, scales, y);
  return y;
}

// Rows ends[e-1]..ends[e] of x times expert e: x [R, K] bf16, w packed fp8 [E, N/64, K/2, 128], scales
// [E, N/64, ceil(K/128)], ends [E] int64 -> [R, N] in bf16 or float32.
torch::Tensor fp8_grouped_linear(torch::Tensor x, torch::Tensor w, torch::Tensor scales, torch::Tensor ends,
                                 bool bf16_out) {
  check_fp8(w, scales, 1);
  TORCH_CHECK(ends.dim() == 1 && ends.size(0) == w.size(0) && ends.scalar_type() == at::kLong,
              "ends must be [E] int64");
  const int64_t R = x.size(0), K = 2 * w.size(2), N = w.size(1) * BLOCK_N;
  check_x(x, K);
  auto y = torch::empty({R, N}, x.options().dtype(bf16_out ? at::kBFloat16 : at::kFloat));
  if (bf16_out)
    fp8_grouped_into<bf16>(x, w, scales, ends, y);
  else
    fp8_grouped_into<float>(x, w, scales, ends, y);
  return y;
}

#pragma GCC pop_options

// Every later call runs on the AMX tiles (on) or on AVX-512 (off). Turning them on asks the OS for the tile state
// and fails (returns false, stays off) where it refuses; the caller knows whether the CPU has AMX-BF16.
bool set_amx(bool on) {
  amx_enabled = on && request_amx();
  return amx_enabled;
}

bool amx() { return amx_enabled; }

void register_fused_ops(pybind11::module& m);     // fused_ops.cpp
void register_fused_blocks(pybind11::module& m);  // fused_blocks.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  register_fused_ops(m);
  register_fused_blocks(m);
  m.def("set_amx", &set_amx, "run every call on the AMX tiles (true) or on AVX-512 (false); returns the setting");
  m.def("amx", &amx, "whether calls run on the AMX tiles");
  m.def("linear", &linear, "x [M, K] bf16 times a packed [N, K] weight -> [M, N] bf16 or float32");
  m.def("linears", &linears, "x [M, K] bf16 times several packed weights -> [M, sum N] bf16, side by side");
  m.def("grouped_linear", &grouped_linear, "row segments of x times their packed experts -> bf16 or float32");
  m.def("fp8_linear", &fp8_linear, "x [M, K] bf16 times a packed fp8 [N, K] weight -> [M, N] (needs AVX512-VBMI)");
  m.def("fp8_grouped_linear", &fp8_grouped_linear, "row segments of x times their packed fp8 experts (AVX512-VBMI)");
}
