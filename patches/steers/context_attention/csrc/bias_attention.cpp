// Context-attention steering on the CPU: attention with a per-key bias for the steered decode rows,
// read from vLLM's CPU paged KV cache in place (no dense K/V copy of a request's context).
//
// Built at set-up by steerserve/patches/steers/context_attention/native.py with torch's extension
// tooling; the pure-torch pass in engine.py is the reference it is tested against and the fallback.
//
// Cache: [num_blocks, kv_heads, block_size, 2 * head_dim] in memory; per (block, KV head) the K
// interior (block_size * head_dim elements) then the V interior, each laid out as the backend's ISA
// path stores it (measured at start-up by CpuPagedKV.calibrate, passed here as a layout code):
//   0 identity   [bs][D]
//   1 transposed [D][bs]                (vLLM's "vec" K)
//   2 amx_k      [bs/16][D/2][16][2]    (AMX K: token tile, dim pair, token, pair)
//   3 amx_v      [D/16][bs/2][16][2]    (AMX V: dim tile, token pair, dim, pair)
//   4 permuted   perm[t * D + d] = stored offset (any other layout)
//
// For each (request, KV head) with a steered query head in its group, one pass over the request's
// blocks with an online softmax in float32: s = q.k * scale + bias[t]; out = softmax(s) . V. Only
// the steered (row, head) outputs are written.

#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

enum Layout : int64_t { IDENTITY = 0, TRANSPOSED = 1, AMX_K = 2, AMX_V = 3, PERMUTED = 4 };

// Element -> float, written so that loops over it vectorise (bfloat16: a 16-bit shift).
inline float to_f(float x) { return x; }
inline float to_f(double x) { return static_cast<float>(x); }
inline float to_f(c10::Half x) { return static_cast<float>(x); }
inline float to_f(c10::BFloat16 x) {
  const uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// exp(x) for x <= 0 (softmax terms), vectorisable: 2^n * p(r), r = x - n ln2 in [-ln2/2, ln2/2],
// degree-6 polynomial (relative error ~2e-7, the float rounding of std::exp); 0 below -87.
inline float exp_neg(float x) {
  x = std::max(x, -87.0f);
  // round to nearest by the 1.5 * 2^23 trick (vectorises; |x * log2(e)| < 2^22 here)
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = x - n * 0.693145751953125f - n * 1.428606765330187045e-06f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// One block interior (stored order) -> float, logical [bs][D] (`to_dim_major` false: V) or
// [D][bs] (true: K, so the scores loop runs over tokens, vectorised, without a reduction).
template <typename T>
void unpack(const T* src, float* dst, int64_t bs, int64_t d, int64_t layout, const int64_t* perm, bool to_dim_major) {
  // dst index of logical (t, c)
  auto at = [&](int64_t t, int64_t c) { return to_dim_major ? c * bs + t : t * d + c; };
  const int64_t n = bs * d;
  if ((layout == IDENTITY && !to_dim_major) || (layout == TRANSPOSED && to_dim_major)) {
    for (int64_t i = 0; i < n; ++i) dst[i] = to_f(src[i]);
    return;
  }
  switch (layout) {
    case IDENTITY:    // [bs][D], wanted as [D][bs]
    case TRANSPOSED:  // [D][bs], wanted as [bs][D]
      for (int64_t t = 0; t < bs; ++t)
        for (int64_t c = 0; c < d; ++c) dst[at(t, c)] = to_f(src[layout == IDENTITY ? t * d + c : c * bs + t]);
      break;
    case AMX_K:    // [bs/16][D/2][16][2]: token tile, dim pair, token, pair member
    case AMX_V: {  // [D/16][bs/2][16][2]: the same walk with the roles of token and dim swapped
      const bool v = layout == AMX_V;
      const int64_t tiles = (v ? d : bs) / 16, pairs = (v ? bs : d) / 2;
      const T* p = src;
      for (int64_t tile = 0; tile < tiles; ++tile)
        for (int64_t pair = 0; pair < pairs; ++pair)
          for (int64_t j = 0; j < 16; ++j, p += 2)
            for (int64_t e = 0; e < 2; ++e) {
              const int64_t along = tile * 16 + j, paired = pair * 2 + e;
              dst[v ? at(paired, along) : at(along, paired)] = to_f(p[e]);
            }
      break;
    }
    default:
      for (int64_t t = 0; t < bs; ++t)
        for (int64_t c = 0; c < d; ++c) dst[at(t, c)] = to_f(src[perm[t * d + c]]);
  }
}

// One block of one (request, KV head): K as [D][bs] (dim-major), V as [bs][D]; `valid` tokens;
// nh query heads (q pre-scaled, [nh][D]); updates the online-softmax state m, l, acc [nh][D].
template <typename KT, typename VT>
void block_(const KT* k, const VT* v, int64_t bs, int64_t d, int64_t valid, int64_t nh, const float* bias,
            const float* q, float* s, float* acc, float* m, float* l) {
  for (int64_t j = 0; j < nh; ++j) std::memcpy(s + j * bs, bias, valid * sizeof(float));
  for (int64_t c = 0; c < d; ++c) {  // K row c read once for every head; over tokens: no reduction
    const KT* kc = k + c * bs;
    for (int64_t j = 0; j < nh; ++j) {
      const float qc = q[j * d + c];
      float* sj = s + j * bs;
      for (int64_t t = 0; t < valid; ++t) sj[t] += qc * to_f(kc[t]);
    }
  }
  for (int64_t j = 0; j < nh; ++j) {
    float* sj = s + j * bs;
    float block_max = -std::numeric_limits<float>::infinity();
    for (int64_t t = 0; t < valid; ++t) block_max = std::max(block_max, sj[t]);
    const float new_max = std::max(m[j], block_max);
    const float correction = m[j] == -std::numeric_limits<float>::infinity() ? 0.f : exp_neg(m[j] - new_max);
    float sum = 0.f;
    for (int64_t t = 0; t < valid; ++t) {
      sj[t] = exp_neg(sj[t] - new_max);
      sum += sj[t];
    }
    l[j] = l[j] * correction + sum;
    m[j] = new_max;
    float* aj = acc + j * d;
    for (int64_t c = 0; c < d; ++c) aj[c] *= correction;
  }
  for (int64_t t = 0; t < valid; ++t) {  // V row t read once for every head
    const VT* vt = v + t * d;
    for (int64_t j = 0; j < nh; ++j) {
      const float p = s[j * bs + t];
      float* aj = acc + j * d;
      for (int64_t c = 0; c < d; ++c) aj[c] += p * to_f(vt[c]);
    }
  }
}

template <typename T, typename O>
void run(const at::Tensor& query, at::Tensor& output, const at::Tensor& kv_cache, const at::Tensor& block_ids,
         const at::Tensor& lengths, const at::Tensor& rows, const at::Tensor& head_mask, const at::Tensor& bias,
         double scale, int64_t k_layout, int64_t v_layout, const at::Tensor& perm_k, const at::Tensor& perm_v) {
  const int64_t num_heads = query.size(1), d = query.size(2);
  const int64_t kvh = kv_cache.size(1), bs = kv_cache.size(2);
  const int64_t g = num_heads / kvh;
  const int64_t r_count = rows.size(0), max_blocks = block_ids.size(1), bias_len = bias.size(1);
  const T* cache = kv_cache.data_ptr<T>();
  const int64_t* blocks = block_ids.data_ptr<int64_t>();
  const int64_t* lens = lengths.data_ptr<int64_t>();
  const int64_t* row_of = rows.data_ptr<int64_t>();
  const bool* mask = head_mask.data_ptr<bool>();
  const float* bias_p = bias.data_ptr<float>();
  const int64_t* pk = perm_k.numel() ? perm_k.data_ptr<int64_t>() : nullptr;
  const int64_t* pv = perm_v.numel() ? perm_v.data_ptr<int64_t>() : nullptr;
  const T* q_p = query.data_ptr<T>();
  O* o_p = output.data_ptr<O>();
  const int64_t qs0 = query.stride(0), qs1 = query.stride(1), qs2 = query.stride(2);
  const int64_t os0 = output.stride(0), os1 = output.stride(1), os2 = output.stride(2);

  // work items: (request, KV head) with at least one steered query head in the group
  std::vector<std::pair<int64_t, int64_t>> items;
  for (int64_t r = 0; r < r_count; ++r)
    for (int64_t kh = 0; kh < kvh; ++kh)
      for (int64_t j = 0; j < g; ++j)
        if (mask[r * num_heads + kh * g + j]) {
          items.emplace_back(r, kh);
          break;
        }
  const int64_t block_elems = bs * d;
  const float fscale = static_cast<float>(scale);

  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> kf(block_elems), vf(block_elems), q(g * d), acc(g * d), s(g * bs), m(g), l(g);
    std::vector<int64_t> heads;
    for (int64_t it = begin; it < end; ++it) {
      const int64_t r = items[it].first, kh = items[it].second;
      const int64_t length = lens[r], row = row_of[r];
      heads.clear();
      for (int64_t j = 0; j < g; ++j)
        if (mask[r * num_heads + kh * g + j]) heads.push_back(kh * g + j);
      const int64_t nh = static_cast<int64_t>(heads.size());
      for (int64_t j = 0; j < nh; ++j) {
        const T* src = q_p + row * qs0 + heads[j] * qs1;
        for (int64_t c = 0; c < d; ++c) q[j * d + c] = static_cast<float>(src[c * qs2]) * fscale;
        m[j] = -std::numeric_limits<float>::infinity();
        l[j] = 0.f;
      }
      std::fill(acc.begin(), acc.begin() + nh * d, 0.f);
      const float* brow = bias_p + r * bias_len;
      const int64_t n_blocks = (length + bs - 1) / bs;
      for (int64_t b = 0; b < n_blocks && b < max_blocks; ++b) {
        const int64_t phys = blocks[r * max_blocks + b];
        const T* kb = cache + (phys * kvh + kh) * 2 * block_elems;
        const int64_t valid = std::min(bs, length - b * bs);
        const float* bb = brow + b * bs;
        if (k_layout == TRANSPOSED && v_layout == IDENTITY) {  // vLLM's "vec" layout: read in place
          block_(kb, kb + block_elems, bs, d, valid, nh, bb, q.data(), s.data(), acc.data(), m.data(), l.data());
        } else {
          unpack<T>(kb, kf.data(), bs, d, k_layout, pk, true);  // K as [D][bs]
          unpack<T>(kb + block_elems, vf.data(), bs, d, v_layout, pv, false);  // V as [bs][D]
          block_(kf.data(), vf.data(), bs, d, valid, nh, bb, q.data(), s.data(), acc.data(), m.data(), l.data());
        }
      }
      for (int64_t j = 0; j < nh; ++j) {
        O* dst = o_p + row * os0 + heads[j] * os1;
        const float inv = l[j] > 0.f ? 1.f / l[j] : 0.f;
        for (int64_t c = 0; c < d; ++c) dst[c * os2] = static_cast<O>(acc[j * d + c] * inv);
      }
    }
  });
}

void decode_bias_attention_(const at::Tensor& query, at::Tensor& output, const at::Tensor& kv_cache,
                            const at::Tensor& block_ids, const at::Tensor& lengths, const at::Tensor& rows,
                            const at::Tensor& head_mask, const at::Tensor& bias, double scale, int64_t k_layout,
                            int64_t v_layout, const at::Tensor& perm_k, const at::Tensor& perm_v) {
  TORCH_CHECK(query.device().is_cpu() && kv_cache.device().is_cpu(), "decode_bias_attention_: CPU tensors only");
  TORCH_CHECK(query.dim() == 3 && output.dim() == 3 && kv_cache.dim() == 4, "decode_bias_attention_: bad ranks");
  TORCH_CHECK(kv_cache.is_contiguous(), "decode_bias_attention_: kv_cache must be contiguous");
  TORCH_CHECK(query.scalar_type() == kv_cache.scalar_type(), "decode_bias_attention_: query and cache dtypes differ");
  TORCH_CHECK(kv_cache.size(3) == 2 * query.size(2), "decode_bias_attention_: head_dim mismatch");
  TORCH_CHECK(query.size(1) % kv_cache.size(1) == 0, "decode_bias_attention_: heads not a multiple of KV heads");
  TORCH_CHECK(block_ids.scalar_type() == at::kLong && lengths.scalar_type() == at::kLong &&
                  rows.scalar_type() == at::kLong, "decode_bias_attention_: indices must be int64");
  TORCH_CHECK(block_ids.is_contiguous() && lengths.is_contiguous() && rows.is_contiguous() &&
                  head_mask.is_contiguous() && bias.is_contiguous(), "decode_bias_attention_: inputs not contiguous");
  TORCH_CHECK(head_mask.scalar_type() == at::kBool && head_mask.size(0) == rows.size(0) &&
                  head_mask.size(1) == query.size(1), "decode_bias_attention_: head_mask must be bool [R, heads]");
  TORCH_CHECK(bias.scalar_type() == at::kFloat && bias.size(0) == rows.size(0), "decode_bias_attention_: bias");
  const int64_t bs = kv_cache.size(2), d = query.size(2);
  for (int64_t layout : {k_layout, v_layout}) {
    TORCH_CHECK(layout >= 0 && layout <= 4, "decode_bias_attention_: unknown layout ", layout);
    TORCH_CHECK(layout != AMX_K || bs % 16 == 0, "amx_k layout needs block_size % 16 == 0");
    TORCH_CHECK(layout != AMX_V || d % 16 == 0, "amx_v layout needs head_dim % 16 == 0");
  }
  TORCH_CHECK(k_layout != PERMUTED || perm_k.numel() == bs * d, "decode_bias_attention_: perm_k size");
  TORCH_CHECK(v_layout != PERMUTED || perm_v.numel() == bs * d, "decode_bias_attention_: perm_v size");
  const auto lens = lengths.accessor<int64_t, 1>();
  for (int64_t r = 0; r < lengths.size(0); ++r)
    TORCH_CHECK(lens[r] >= 1 && lens[r] <= bias.size(1) && (lens[r] + bs - 1) / bs <= block_ids.size(1),
                "decode_bias_attention_: length out of range for the bias or the block ids");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, query.scalar_type(), "decode_bias_attention_", [&] {
    using T = scalar_t;
    if (output.scalar_type() == query.scalar_type()) {
      run<T, T>(query, output, kv_cache, block_ids, lengths, rows, head_mask, bias, scale, k_layout, v_layout,
                perm_k, perm_v);
    } else {
      TORCH_CHECK(output.scalar_type() == at::kFloat, "decode_bias_attention_: output dtype");
      run<T, float>(query, output, kv_cache, block_ids, lengths, rows, head_mask, bias, scale, k_layout, v_layout,
                    perm_k, perm_v);
    }
  });
}

}  // namespace

TORCH_LIBRARY(steerserve_ctx, m) {
  m.def("decode_bias_attention_(Tensor query, Tensor(a!) output, Tensor kv_cache, Tensor block_ids, "
        "Tensor lengths, Tensor rows, Tensor head_mask, Tensor bias, float scale, int k_layout, int v_layout, "
        "Tensor perm_k, Tensor perm_v) -> ()");
}

TORCH_LIBRARY_IMPL(steerserve_ctx, CPU, m) { m.impl("decode_bias_attention_", &decode_bias_attention_); }
