// A decoder layer's two halves, each in one call from Python: attention from its projections to o_proj, and the MoE
// from its router to the experts' weighted sum. Each is the kernels of bf16_matmul.cpp and fused_ops.cpp called in
// the order the Python modules call them, so its result is bitwise theirs; what it saves is the Python between the
// steps (module lookups, argument checks, a dozen crossings into C++ a layer): a batch-1 decode step of the tiny
// preset, whose weights stay in cache, went from 0.95 to 0.90 ms (benchmarks/one_call_blocks.py: faster in 37 of 40
// alternating pairs).
#include <torch/extension.h>

#include <vector>

// bf16_matmul.cpp
torch::Tensor linear(torch::Tensor x, torch::Tensor w, bool bf16_out);
torch::Tensor linears(torch::Tensor x, std::vector<torch::Tensor> ws);
torch::Tensor grouped_linear(torch::Tensor x, torch::Tensor w, torch::Tensor ends, bool bf16_out);
// fused_ops.cpp
torch::Tensor qk_norm_rotary_cache(torch::Tensor qkv, int64_t H, int64_t KVH, torch::Tensor q_norm, double q_eps,
                                   torch::Tensor k_norm, double k_eps, torch::Tensor cos, torch::Tensor sin,
                                   torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor slots);
torch::Tensor paged_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor table,
                              torch::Tensor table_start, torch::Tensor positions, double scale);
torch::Tensor silu_mul(torch::Tensor h);
torch::Tensor grouped_swiglu(torch::Tensor x, torch::Tensor w13, torch::Tensor ends);
std::vector<torch::Tensor> select_experts(torch::Tensor logits, int64_t top_k, int64_t groups, bool renormalize);
std::vector<torch::Tensor> sort_rows(torch::Tensor ids, torch::Tensor weights, int64_t first, int64_t count);
torch::Tensor combine(torch::Tensor rows, torch::Tensor token_of_row, torch::Tensor row_weight, int64_t T);

namespace {

// Attention.forward where every token attends through the paged kernel: x [T, hidden] bf16 -> this rank's o_proj
// output [T, hidden] bf16 (before the tp all-reduce). qkv: the packed q, k and v weights; o_proj packed.
torch::Tensor attention_block(torch::Tensor x, std::vector<torch::Tensor> qkv, torch::Tensor o_proj, int64_t H,
                              int64_t KVH, torch::Tensor q_norm, double q_eps, torch::Tensor k_norm, double k_eps,
                              torch::Tensor cos, torch::Tensor sin, torch::Tensor k_cache, torch::Tensor v_cache,
                              torch::Tensor slots, torch::Tensor table, torch::Tensor table_start,
                              torch::Tensor positions, double scale) {
  const auto q = ::qk_norm_rotary_cache(::linears(x, std::move(qkv)), H, KVH, q_norm, q_eps, k_norm, k_eps, cos, sin,
                                        k_cache, v_cache, slots);
  const auto out = ::paged_attention(q, k_cache, v_cache, table, table_start, positions, scale);
  return ::linear(out.view({x.size(0), -1}), o_proj, true);
}

// SparseMoE's local experts with their router: x [T, hidden] bf16 -> sum over the routed experts held here
// (ids first .. first + E - 1, E = w13's experts) of weight * expert(x), [T, hidden] bf16. w13 and w2 packed; the
// router's weight packed, or bf16 [experts, hidden] where their count is no multiple of 64 (then PyTorch's linear, as
// kernels.linear takes it); the gate/up products and SwiGLU's product take grouped_swiglu from `swiglu_min_rows` rows per held expert on
// average (0: never), as SparseMoE.swiglu decides.
torch::Tensor moe_block(torch::Tensor x, torch::Tensor gate, torch::Tensor w13, torch::Tensor w2, int64_t top_k,
                        int64_t groups, bool renormalize, int64_t first, int64_t swiglu_min_rows) {
  const auto logits = gate.dim() == 4 ? ::linear(x, gate, true) : at::linear(x, gate);
  const auto route = ::select_experts(logits, top_k, groups, renormalize);
  const int64_t experts = w13.size(0);
  const auto sorted = ::sort_rows(route[0], route[1], first, experts);
  const auto& token_of_row = sorted[0];
  const auto& row_weight = sorted[1];
  const auto& ends = sorted[2];
  const auto rows = x.index_select(0, token_of_row);
  const bool one_call = swiglu_min_rows > 0 && rows.size(0) >= swiglu_min_rows * experts;
  const auto hidden = one_call ? ::grouped_swiglu(rows, w13, ends) : ::silu_mul(::grouped_linear(rows, w13, ends, true));
  return ::combine(::grouped_linear(hidden, w2, ends, true), token_of_row, row_weight, x.size(0));
}

}  // namespace

void register_fused_blocks(pybind11::module& m) {
  m.def("attention_block", &attention_block,
        "attention from x to o_proj's output in one call, every token through the paged kernel");
  m.def("moe_block", &moe_block, "the MoE's router and held experts in one call: their weighted sum per token");
}
