"""Launch a Triton kernel through its compiled form after the first call (CUDA only).

Why: a `kernel[grid](...)` call through the JIT binds the arguments, computes the specialisation key
and looks the compiled kernel up on every call, several times the host time of the launch itself
(docs/benchmarks.md, "Figures behind the source's design notes"). A training step of an 8B model launches our
kernels thousands of times and is bound by host time, so after the first (JIT) launch for a given key
we keep the compiled kernel's runner and call it directly.

Correctness: Triton specialises a compiled kernel on the integer arguments (== 1, divisible by 16) and
on the 16-byte alignment of pointers. The cache key here holds the grid and every integer argument
exactly, and the direct path is taken only when every tensor argument is 16-byte aligned (what the JIT
assumes for torch allocations); anything else goes through the JIT.
"""

from __future__ import annotations

from typing import Any

import torch


class DirectKernel:
    """`DirectKernel(kernel)(grid, *args, **constexprs)`: like `kernel[grid](*args, **constexprs)`, faster."""

    def __init__(self, kernel: Any, num_warps: int = 4) -> None:
        self.kernel, self.num_warps = kernel, num_warps
        self.runners: dict[tuple, Any] = {}

    def __call__(self, grid: tuple[int, ...], *args: Any, **constexprs: Any) -> None:
        grid3, key, aligned = self._key(grid, args, constexprs)
        runner = self.runners.get(key) if aligned else None
        if runner is not None:
            runner(*args, *constexprs.values())  # constexprs in the kernel's parameter order
            return
        self._jit(grid3, key, aligned, args, constexprs)

    def jit(self, grid: tuple[int, ...], *args: Any, **constexprs: Any) -> None:
        """Always through the JIT (for comparisons); the compiled kernel is kept for later direct calls."""
        self._jit(*self._key(grid, args, constexprs), args, constexprs)

    @staticmethod
    def _key(grid: tuple[int, ...], args: tuple, constexprs: dict) -> tuple[tuple, tuple, bool]:
        grid3 = tuple(grid) + (1,) * (3 - len(grid))
        aligned = all(a.data_ptr() % 16 == 0 for a in args if isinstance(a, torch.Tensor))
        key = (grid3, tuple(a if isinstance(a, int) else (a.dtype, a.device.index) if isinstance(a, torch.Tensor)
                            else type(a) for a in args), tuple(constexprs.items()))
        return grid3, key, aligned

    def _jit(self, grid3: tuple, key: tuple, aligned: bool, args: tuple, constexprs: dict) -> None:
        compiled = self.kernel[grid3](*args, **constexprs, num_warps=self.num_warps)
        if aligned and compiled is not None:
            self.runners[key] = compiled[grid3]
