// KV-cache store on CPU: each new token's K and V rows copied into their cache slots in one call.
//
// Owns the `tsllm_cpu::store_kv` op (slots of -1 are skipped, as in kernels/reference.py; the
// slots come as int32, as the engine sends them, or int64). It replaces a mask, a host sync and
// two index_copy calls per layer with one loop: memcpy where K/V have the cache's dtype, else
// each row rounded to it (fp32, fp16, bf16: round-to-nearest-even, as the reference's `.to()`).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "ops.h"
#include "vec.h"

#include <cstring>

namespace tsllm {

template <typename S, typename TI, typename TC>
static void copy_rows(const TI* k, const TI* v, int64_t stride, TC* kc, TC* vc, const S* slot,
                      int64_t tokens, int64_t slots, int64_t row) {
    for (int64_t t = 0; t < tokens; ++t) {
        if (slot[t] < 0) continue;
        TORCH_CHECK(slot[t] < slots, "store_kv: slot ", slot[t], " past the cache's ", slots);
        if constexpr (std::is_same_v<TI, TC>) {
            std::memcpy(kc + slot[t] * row, k + t * stride, row * sizeof(TC));
            std::memcpy(vc + slot[t] * row, v + t * stride, row * sizeof(TC));
        } else {
            vec::convert(k + t * stride, kc + slot[t] * row, row);
            vec::convert(v + t * stride, vc + slot[t] * row, row);
        }
    }
}

void store_rows(const float* k, const float* v, int64_t stride, void* k_cache, void* v_cache,
                at::ScalarType cache, const int32_t* slot, int64_t tokens, int64_t slots,
                int64_t row) {
    with_float_type(cache, "store_kv: the cache", [&](auto c) {
        using TC = decltype(c);
        copy_rows(k, v, stride, static_cast<TC*>(k_cache), static_cast<TC*>(v_cache), slot,
                  tokens, slots, row);
    });
}

void store_kv(const at::Tensor& key, const at::Tensor& value, at::Tensor& k_cache,
              at::Tensor& v_cache, const at::Tensor& slot_mapping) {
    TORCH_CHECK(key.is_contiguous() && value.is_contiguous() && k_cache.is_contiguous() &&
                v_cache.is_contiguous(), "store_kv: contiguous tensors only");
    TORCH_CHECK(key.scalar_type() == value.scalar_type() &&
                k_cache.scalar_type() == v_cache.scalar_type(),
                "store_kv: K and V share a dtype, and so do the caches");
    const auto slot_type = slot_mapping.scalar_type();
    TORCH_CHECK((slot_type == at::kLong || slot_type == at::kInt) && slot_mapping.is_contiguous(),
                "store_kv: slot_mapping must be contiguous int32 or int64");
    const int64_t tokens = key.size(0), row = key.numel() / std::max<int64_t>(tokens, 1);
    const int64_t slots = k_cache.numel() / row;
    TORCH_CHECK(k_cache.size(2) * k_cache.size(3) == row && slot_mapping.numel() == tokens,
                "store_kv: shapes");
    with_float_type(key.scalar_type(), "store_kv: K/V", [&](auto i) {
        with_float_type(k_cache.scalar_type(), "store_kv: the cache", [&](auto c) {
            using TI = decltype(i);
            using TC = decltype(c);
            const auto* k = static_cast<const TI*>(key.data_ptr());
            const auto* v = static_cast<const TI*>(value.data_ptr());
            auto* kc = static_cast<TC*>(k_cache.data_ptr());
            auto* vc = static_cast<TC*>(v_cache.data_ptr());
            if (slot_type == at::kLong)
                copy_rows(k, v, row, kc, vc, slot_mapping.data_ptr<int64_t>(), tokens, slots, row);
            else
                copy_rows(k, v, row, kc, vc, slot_mapping.data_ptr<int32_t>(), tokens, slots, row);
        });
    });
}

}  // namespace tsllm

TORCH_LIBRARY_FRAGMENT(tsllm_cpu, m) {
    m.def("store_kv(Tensor key, Tensor value, Tensor(a!) k_cache, Tensor(b!) v_cache, "
          "Tensor slot_mapping) -> ()");
    m.impl("store_kv", c10::DispatchKey::CPU, &tsllm::store_kv);
}
