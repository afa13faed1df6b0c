"""transformer_pp: the model compiled by nlc from transformer_pp.nl.

Levels (the paper's level table):
    attn         attention    every 1 tokens     attention(heads=4, window=None, rope=Tru -
    ffn          static       never              swiglu(128 -> 128, hidden=512)           -
    pretrain     outer        every 1 steps      -                                        adamw
Generated code: edit the spec and run `nlc compile transformer_pp.nl` again.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nlc.runtime import flows as nl_flows
from nlc.runtime import memories as nl_mem
from nlc.runtime import model as nl_model
from nlc.runtime import ops as nl_ops

SPEC = {
    "name": 'transformer_pp',
    "file": 'transformer_pp.nl',
    "hash": '7238bf3cd13c2197b9bbdc7b0c72aa18b9d1cb8c8846451ca1f9a6f734cf2003',
    "lr": 0.002,
    "seq_len": 256,
    "dims": {'d': 128, 'heads': 4, 'vocab': 256, 'layers': 4, 'seq': 256},
}


@dataclass
class ModelConfig:
    """What may change without recompiling. Widths are fixed by the spec's dims."""

    vocab_size: int = 256  # transformer_pp.nl:17  embed vocab -> d
    seq_len: int = 256  # training sequence length (dims: seq)
    layer_repeat: int = 4  # transformer_pp.nl:19  block layer x layers {

# ---------------------------------------------------------------------------------------------
# memories and rules
# ---------------------------------------------------------------------------------------------
# transformer_pp.nl:23  level ffn : swiglu(d -> d, hidden = 4 * d) {
FFN_MEMORY = nl_mem.MemorySpec('swiglu', din=128, dout=128, hidden=512)


# ---------------------------------------------------------------------------------------------
# attention `attn`
# ---------------------------------------------------------------------------------------------
class AttnLevel(nn.Module):
    """Level `attn` (transformer_pp.nl:21): attention, every 1 tokens.
    state attn: attention(heads=4, window=None, rope=True)
    4 heads of 32; full causal; rotary positions
    """

    level = 'attn'
    kind = 'attention'

    def __init__(self):
        super().__init__()
        # transformer_pp.nl:21  level attn : attention(heads = heads, rope = yes)
        self.qkv = nn.Linear(128, 384, bias=False)
        self.proj = nn.Linear(128, 128, bias=False)
        self.rope = nl_ops.RopeTables(32, 256)  # rotary tables for up to 256 positions

    def forward(self, x):
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split(128, dim=-1)
        q, k, v = (nl_ops.split_heads(t, 4) for t in (q, k, v))  # [B, 4, T, 32]
        cos, sin = self.rope(T, x.dtype)
        q, k = nl_ops.apply_rope(q, cos, sin), nl_ops.apply_rope(k, cos, sin)
        y = nl_ops.causal_attention(q, k, v, window=None)
        return self.proj(nl_ops.merge_heads(y))


# ---------------------------------------------------------------------------------------------
# static `ffn`
# ---------------------------------------------------------------------------------------------
class FfnLevel(nn.Module):
    """Level `ffn` (transformer_pp.nl:23): static, never.
    state ffn: swiglu(128 -> 128, hidden=512)
    """

    level = 'ffn'
    kind = 'static'
    flow_attrs = {}

    def __init__(self):
        super().__init__()
        # transformer_pp.nl:23  level ffn : swiglu(d -> d, hidden = 4 * d) {
        self.ffn = nl_flows.StaticMemory(FFN_MEMORY)

    def forward(self, x):
        xin = x.unsqueeze(1)  # [B, 1, T, d]
        out = self.ffn(xin).squeeze(1)
        return out


# ---------------------------------------------------------------------------------------------
# block `layer`
# ---------------------------------------------------------------------------------------------
class LayerBlock(nn.Module):
    """Block `layer` (transformer_pp.nl:19), repeated 4 times: pre-norm residual sublayers x = x +
        f(norm(x)).
    """

    def __init__(self):
        super().__init__()
        self.attn_norm = nl_ops.RMSNorm(128)
        # transformer_pp.nl:21  level attn : attention(heads = heads, rope = yes)
        self.attn = AttnLevel()
        self.ffn_norm = nl_ops.RMSNorm(128)
        self.ffn = FfnLevel()  # transformer_pp.nl:23  level ffn : swiglu(d -> d, hidden = 4 * d) {

    def forward(self, x):
        x = x + self.attn(self.attn_norm(x))
        x = x + self.ffn(self.ffn_norm(x))
        return x


# ---------------------------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------------------------
LEVELS = {
    'attn': ('attention', 'every 1 tokens'),
    'ffn': ('static', 'never'),
    'pretrain': ('outer', 'every 1 steps'),
}


class Model(nl_model.NestedModel):
    """`transformer_pp`: embedding, 1 block kind(s), final norm, tied head.

    forward(idx [B, T] int64, targets [B, T] int64 or None) -> (logits [B, T, vocab], loss or None).
    Targets equal to -100 are ignored by the loss. The control of in-context memories (persisting,
    resetting, checkpointing them, finding non-finite levels) comes from nl_model.NestedModel.
    """

    levels = LEVELS

    def __init__(self, cfg: ModelConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or ModelConfig()
        self.embed = nn.Embedding(cfg.vocab_size, 128)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.layer = nn.ModuleList([LayerBlock() for _ in range(cfg.layer_repeat)])
        self.norm = nl_ops.RMSNorm(128)

    def forward(self, idx, targets=None):
        x = self.embed(idx)
        for block in self.layer:
            x = block(x)
        x = self.norm(x)
        logits = F.linear(x, self.embed.weight)  # tied head
        loss = None
        if targets is not None:
            logits_flat = logits.float().flatten(0, 1)
            loss = F.cross_entropy(logits_flat, targets.flatten(), ignore_index=-100)
        return logits, loss


# ---------------------------------------------------------------------------------------------
# optimizers: the outer level
# ---------------------------------------------------------------------------------------------
STEPS_GROUPS = []


def build_optimizers(model, cfg=None):
    """The optimizers of the levels updated by the outer loss, in the order of optimizer_periods().

    cfg (a dict, optional): "lr" overrides the outer level's learning rate.
    """
    cfg = cfg or {}
    grouped = {id(p) for name in STEPS_GROUPS for p in model.level_parameters(name)}
    optimizers = []
    params = [p for p in model.parameters() if id(p) not in grouped]
    groups = nl_model.param_groups(params, 0.1)
    # transformer_pp.nl:33  rule adamw(lr = 2e-3, wd = 0.1)
    optimizer = torch.optim.AdamW(
        groups,
        lr=0.002,
        betas=(0.9, 0.999),
        eps=1e-08,
        weight_decay=0.1,
        fused=nl_model.on_cuda(params),
    )
    if cfg.get("lr") is not None:
        for g in optimizer.param_groups:
            g["lr"] = cfg["lr"]
    optimizers.append(optimizer)
    return optimizers


def optimizer_periods():
    """Optimizer i steps every optimizer_periods()[i] outer steps; gradients accumulate between."""
    return [1]
