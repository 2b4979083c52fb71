// KV-cache store on CPU: each new token's K and V rows copied into their cache slots in one call.
//
// Owns the `tsllm_cpu::store_kv` op (slots of -1 are skipped, as in kernels/reference.py; the
// slots come as int32, as the engine sends them, or int64). It replaces a mask, a host sync and
// two index_copy calls per layer with one loop of memcpy.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "ops.h"

#include <cstring>

namespace tsllm {

template <typename S>
static void copy_rows(const char* k, const char* v, int64_t stride, char* kc, char* vc,
                      const S* slot, int64_t tokens, int64_t slots, int64_t bytes) {
    for (int64_t t = 0; t < tokens; ++t) {
        if (slot[t] < 0) continue;
        TORCH_CHECK(slot[t] < slots, "store_kv: slot ", slot[t], " past the cache's ", slots);
        std::memcpy(kc + slot[t] * bytes, k + t * stride, bytes);
        std::memcpy(vc + slot[t] * bytes, v + t * stride, bytes);
    }
}

void store_rows(const char* k, const char* v, int64_t stride, char* kc, char* vc,
                const int32_t* slot, int64_t tokens, int64_t slots, int64_t bytes) {
    copy_rows(k, v, stride, kc, vc, slot, tokens, slots, bytes);
}

void store_kv(const at::Tensor& key, const at::Tensor& value, at::Tensor& k_cache,
              at::Tensor& v_cache, const at::Tensor& slot_mapping) {
    TORCH_CHECK(key.is_contiguous() && value.is_contiguous() && k_cache.is_contiguous() &&
                v_cache.is_contiguous(), "store_kv: contiguous tensors only");
    TORCH_CHECK(key.scalar_type() == k_cache.scalar_type() &&
                value.scalar_type() == v_cache.scalar_type(),
                "store_kv: K/V and caches share a dtype");
    const auto slot_type = slot_mapping.scalar_type();
    TORCH_CHECK((slot_type == at::kLong || slot_type == at::kInt) && slot_mapping.is_contiguous(),
                "store_kv: slot_mapping must be contiguous int32 or int64");
    const int64_t tokens = key.size(0), row = key.numel() / std::max<int64_t>(tokens, 1);
    const int64_t slots = k_cache.numel() / row;
    TORCH_CHECK(k_cache.size(2) * k_cache.size(3) == row && slot_mapping.numel() == tokens,
                "store_kv: shapes");
    const int64_t bytes = row * key.element_size();
    auto* kc = static_cast<char*>(k_cache.data_ptr());
    auto* vc = static_cast<char*>(v_cache.data_ptr());
    const auto* k = static_cast<const char*>(key.data_ptr());
    const auto* v = static_cast<const char*>(value.data_ptr());
    if (slot_type == at::kLong)
        copy_rows(k, v, bytes, kc, vc, slot_mapping.data_ptr<int64_t>(), tokens, slots, bytes);
    else
        copy_rows(k, v, bytes, kc, vc, slot_mapping.data_ptr<int32_t>(), tokens, slots, bytes);
}

}  // namespace tsllm

TORCH_LIBRARY_FRAGMENT(tsllm_cpu, m) {
    m.def("store_kv(Tensor key, Tensor value, Tensor(a!) k_cache, Tensor(b!) v_cache, "
          "Tensor slot_mapping) -> ()");
    m.impl("store_kv", c10::DispatchKey::CPU, &tsllm::store_kv);
}
