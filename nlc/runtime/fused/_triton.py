"""Triton, when it can be imported (it ships with CUDA builds of torch, not the CPU wheel)."""

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None
    tl = None

__all__ = ["tl", "triton"]
