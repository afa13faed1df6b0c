"""A hand-written Transformer++ (Llama-style) language model: the control of the benchmarks.

A speed-minded, nanoGPT-style model in one file: RMSNorm
pre-norm residual blocks, one fused QKV projection, rotary positions (rotate-half), causal
``scaled_dot_product_attention`` (flash kernels on the GPU), a SwiGLU feed-forward with one fused
gate-and-up projection, a final RMSNorm and an output head tied to the embedding. No biases.
The optimizer is AdamW with the fused CUDA kernel (weight decay on matrices only).

It computes the same function as nlc's ``examples/transformer_pp.nl`` at the same dims
(:func:`copy_from_nlc` maps the weights; ``benchmarks/peers.py`` checks the two against each
other in float64 before timing), so that timing the two compares code, not architectures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ControlConfig", "Transformer", "build_optimizer", "copy_from_nlc"]


@dataclass
class ControlConfig:
    vocab: int = 32768
    d: int = 768
    layers: int = 12
    heads: int = 12
    hidden: int | None = None  # SwiGLU width; default 4 * d (as transformer_pp.nl)
    max_seq: int = 4096
    eps: float = 1e-6
    rope_base: float = 10000.0

    @property
    def ffn(self) -> int:
        return self.hidden or 4 * self.d


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return y.to(x.dtype) * self.weight


def _rope_tables(T: int, dim: int, base: float):
    inv = base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    ang = torch.outer(torch.arange(T, dtype=torch.float64), inv)
    ang = torch.cat((ang, ang), dim=-1)
    return ang.cos(), ang.sin()  # float64; cast to the activations' dtype where used


def _rotate(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg: ControlConfig):
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.d, 3 * cfg.d, bias=False)
        self.proj = nn.Linear(cfg.d, cfg.d, bias=False)

    def forward(self, x, cos, sin):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=-1)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        cos, sin = cos[:T].to(q.dtype), sin[:T].to(q.dtype)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class SwiGLU(nn.Module):
    def __init__(self, cfg: ControlConfig):
        super().__init__()
        self.w_in = nn.Linear(cfg.d, 2 * cfg.ffn, bias=False)  # gate and up in one product
        self.w_out = nn.Linear(cfg.ffn, cfg.d, bias=False)

    def forward(self, x):
        gate, up = self.w_in(x).chunk(2, dim=-1)
        return self.w_out(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ControlConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d, cfg.eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d, cfg.eps)
        self.ffn = SwiGLU(cfg)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.ffn(self.ffn_norm(x))


class Transformer(nn.Module):
    """``forward(idx [B, T], targets [B, T] | None) -> (logits, loss | None)``."""

    def __init__(self, cfg: ControlConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab, cfg.d)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.layers)])
        self.norm = RMSNorm(cfg.d, cfg.eps)
        cos, sin = _rope_tables(cfg.max_seq, cfg.d // cfg.heads, cfg.rope_base)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.apply(self._init)
        for name, p in self.named_parameters():  # scaled init of the residual projections (GPT-2)
            if name.endswith(("proj.weight", "w_out.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.layers))

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)

    def forward(self, idx, targets=None):
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x, self.cos, self.sin)
        logits = F.linear(self.norm(x), self.embed.weight)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
        return logits, loss


def build_optimizer(model: nn.Module, lr: float = 3e-4, weight_decay: float = 0.1) -> torch.optim.Optimizer:
    """AdamW, decay on matrices only, the fused CUDA kernel when the parameters are on a GPU."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    fused = all(p.is_cuda for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=fused)


@torch.no_grad()
def copy_from_nlc(control: Transformer, nlc_model: nn.Module) -> None:
    """Give ``control`` the weights of a generated ``transformer_pp`` model of the same dims.

    Both keep the SwiGLU's gate and up projections fused in one ``w_in`` (``cat(W_g, W_u)``).
    """
    control.embed.weight.copy_(nlc_model.embed.weight)
    control.norm.weight.copy_(nlc_model.norm.weight)
    for mine, theirs in zip(control.blocks, nlc_model.layer, strict=True):
        mine.attn_norm.weight.copy_(theirs.attn_norm.weight)
        mine.attn.qkv.weight.copy_(theirs.attn.qkv.weight)
        mine.attn.proj.weight.copy_(theirs.attn.proj.weight)
        mine.ffn_norm.weight.copy_(theirs.ffn_norm.weight)
        mine.ffn.w_in.weight.copy_(theirs.ffn.ffn.w_in)
        mine.ffn.w_out.weight.copy_(theirs.ffn.ffn.w_out)
