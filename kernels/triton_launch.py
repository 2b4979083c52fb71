"""A planned Triton kernel launch, and the specialization Triton's JIT derives from it.

The launch paths (``triton_paged_attention``, ``triton_store_kv``) first plan each launch
(kernel, grid, runtime arguments, constexprs, options) and then run it, so the compile checks
in ``triton_variants`` see exactly what the engine launches: they make the same plans and
compile each plan's specialization for a GPU target, no GPU needed.
"""
import functools
from dataclasses import dataclass, field

import torch
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import BaseBackend
from triton.runtime.jit import JITFunction


@dataclass(frozen=True)
class Specialization:
    """One compiled binary per target: what ``triton.compile(ASTSource(...))`` takes."""
    kernel: JITFunction
    signature: dict[str, str]
    constexprs: dict[str, object]
    attrs: dict[tuple[int], list]
    options: dict[str, int]

    def key(self) -> str:
        attrs = sorted((k[0], str(v)) for k, v in self.attrs.items())
        return (f"{self.kernel.__name__}|{sorted(self.signature.items())}|{attrs}|"
                f"{sorted(self.constexprs.items())}|{sorted(self.options.items())}")


@dataclass
class Launch:
    kernel: JITFunction
    grid: tuple[int, ...]
    args: dict[str, object]           # runtime arguments by name, in the kernel's order
    constexprs: dict[str, object]
    options: dict[str, int] = field(default_factory=lambda: {"num_warps": 4})

    def __call__(self) -> None:
        self.kernel[self.grid](**self.args, **self.constexprs, **self.options)

    def specialize(self) -> Specialization:
        """As the JIT specializes at launch: tensor dtypes, 16-divisibility of pointers and
        ints (unless ``do_not_specialize``), ints equal to 1 folded into constants."""
        assert list(self.args) + list(self.constexprs) == self.kernel.arg_names, \
            f"{self.kernel.__name__}: a plan must give every argument, in order"
        signature, constexprs, attrs = {}, dict(self.constexprs), {}
        for i, param in enumerate(self.kernel.params):
            if param.is_constexpr:
                signature[param.name] = "constexpr"
                continue
            value = self.args[param.name]
            kind, attr = native_specialize_impl(BaseBackend, value, False,
                                                not param.do_not_specialize,
                                                not param.do_not_specialize_on_alignment)
            signature[param.name] = kind
            if kind == "constexpr":
                constexprs[param.name] = value
            elif attr:
                attrs[(i,)] = BaseBackend.parse_attr(attr)
        return Specialization(self.kernel, signature, constexprs, attrs, dict(self.options))


MAX_HEAD_DIM = 256


@functools.lru_cache(maxsize=None)
def device_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (8 for the interpreter on CPU): what the
    planners size their split work to."""
    if device.type != "cuda":
        return 8
    return torch.cuda.get_device_properties(device).multi_processor_count


def check_head_dim(head_dim: int) -> None:
    """The Triton kernels take head sizes that are multiples of 16 up to ``MAX_HEAD_DIM``: the
    compiled variants (checked by tests/kernels/test_compile.py) are the ones for those."""
    if head_dim % 16 or not 16 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"the Triton kernels need head_dim to be a multiple of 16 in "
                         f"[16, {MAX_HEAD_DIM}], got {head_dim}; use the reference backend")


def check_aligned(*tensors: torch.Tensor) -> None:
    """The compiled variants take 16-byte aligned tensors (fresh allocations and the engine's
    views are); an unaligned one would make the JIT build an unchecked variant."""
    for t in tensors:
        assert t.data_ptr() % 16 == 0, f"tensor {tuple(t.shape)} {t.dtype} is not 16-byte aligned"
