"""titans_lmm: the model compiled by nlc from titans_lmm.nl.

Levels (the paper's level table):
    memory       in_context   every 16 tokens    mlp(32 -> 32, hidden=64, depth=2, act=si momentum
    ffn          static       never              swiglu(128 -> 128, hidden=512)           -
    pretrain     outer        every 1 steps      -                                        adamw
Generated code: edit the spec and run `nlc compile titans_lmm.nl` again.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nlc.runtime import chunk as nl_chunk
from nlc.runtime import chunks as nl_chunks
from nlc.runtime import flows as nl_flows
from nlc.runtime import memories as nl_mem
from nlc.runtime import model as nl_model
from nlc.runtime import ops as nl_ops

SPEC = {
    "name": 'titans_lmm',
    "file": 'titans_lmm.nl',
    "hash": 'd3436c057c28a9c3303302a3ace94d658c5067734da298af913966c5b2dd575d',
    "lr": 0.002,
    "seq_len": 256,
    "dims": {'d': 128, 'heads': 4, 'dh': 32, 'vocab': 256, 'layers': 2, 'seq': 256},
}


@dataclass
class ModelConfig:
    """What may change without recompiling. Widths are fixed by the spec's dims."""

    vocab_size: int = 256  # titans_lmm.nl:21  embed vocab -> d
    seq_len: int = 256  # training sequence length (dims: seq)
    layer_repeat: int = 2  # titans_lmm.nl:23  block layer x layers {

# ---------------------------------------------------------------------------------------------
# memories and rules
# ---------------------------------------------------------------------------------------------
# titans_lmm.nl:35  rule momentum(lr = theta, momentum = eta, decay = retain)
MEMORY_RULE = nl_chunk.RuleSpec('momentum')
# titans_lmm.nl:26  level memory per head : mlp(dh -> dh, hidden = 2 * dh, depth = 2, a...
MEMORY_MEMORY = nl_mem.MemorySpec('mlp', din=32, dout=32, hidden=64, depth=2, act='silu')
# titans_lmm.nl:43  level ffn : swiglu(d -> d, hidden = 4 * d) {
FFN_MEMORY = nl_mem.MemorySpec('swiglu', din=128, dout=128, hidden=512)


# ---------------------------------------------------------------------------------------------
# in-context `memory`
# ---------------------------------------------------------------------------------------------
class MemoryLevel(nn.Module):
    """Level `memory` (titans_lmm.nl:26): in-context, every 16 tokens.
    Per head: 4 heads.
    state memory: mlp(32 -> 32, hidden=64, depth=2, act=silu)
    objective l2; rule momentum(lr=theta, momentum=eta, decay=retain)
    reset per sequence; init learned; grad through writes full; read chunk; target plain
    Inner gradients: closed form (nl_mem.forward_backward); updates: exact chunk form.
    """

    level = 'memory'
    kind = 'in_context'
    period = 16
    heads = 4
    flow_attrs = {
        984: 'key_linear',
        1002: 'key_conv',
        1052: 'value_linear',
        1070: 'value_conv',
        1111: 'query_linear',
        1129: 'query_conv',
        1179: 'theta_linear',
        1241: 'eta_linear',
        1293: 'retain_linear',
        1331: 'out_linear',
    }
    state_attrs = {'memory': 'memory0'}
    reset_never = False

    def __init__(self):
        super().__init__()
        self.persist = False  # keep the state across calls (reset never, or test-time learning)
        self.carry = None
        self.memory0 = nl_flows.MemoryInit(MEMORY_MEMORY, heads=4)  # titans_lmm.nl:38  init learned
        # titans_lmm.nl:27  let key = input | linear(d -> dh) | conv(4) | silu | l2norm
        self.key_linear = nl_flows.HeadLinear(4, 128, 32)
        # titans_lmm.nl:27  let key = input | linear(d -> dh) | conv(4) | silu | l2norm
        self.key_conv = nl_flows.HeadConv(4 * 32, 4)
        # titans_lmm.nl:28  let value = input | linear(d -> dh) | conv(4) | silu
        self.value_linear = nl_flows.HeadLinear(4, 128, 32)
        # titans_lmm.nl:28  let value = input | linear(d -> dh) | conv(4) | silu
        self.value_conv = nl_flows.HeadConv(4 * 32, 4)
        # titans_lmm.nl:29  let query = input | linear(d -> dh) | conv(4) | silu | l2norm
        self.query_linear = nl_flows.HeadLinear(4, 128, 32)
        # titans_lmm.nl:29  let query = input | linear(d -> dh) | conv(4) | silu | l2norm
        self.query_conv = nl_flows.HeadConv(4 * 32, 4)
        # titans_lmm.nl:30  let theta = input | linear(d -> 1) | sigmoid | scale(0.1)
        self.theta_linear = nl_flows.HeadLinear(4, 128, 1)
        # titans_lmm.nl:31  let eta = input | linear(d -> 1) | sigmoid
        self.eta_linear = nl_flows.HeadLinear(4, 128, 1)
        # titans_lmm.nl:32  let retain = input | linear(d -> 1) | sigmoid
        self.retain_linear = nl_flows.HeadLinear(4, 128, 1)
        # titans_lmm.nl:33  output linear(heads * dh -> d)
        self.out_linear = nn.Linear(128, 128, bias=False)
        self.register_buffer("state_sq", torch.zeros(()), persistent=False)

    def forward(self, x, keep_chunk_states=False):
        B, T, _ = x.shape
        xin = x.unsqueeze(1)  # [B, 1, T, d]: the input is shared by all heads
        # flows that read no in-context state: computed once for the whole sequence
        # titans_lmm.nl:27  let key = input | linear(d -> dh) | conv(4) | silu | l2norm
        key = nl_flows.l2norm(F.silu(self.key_conv(self.key_linear(xin))))
        # titans_lmm.nl:28  let value = input | linear(d -> dh) | conv(4) | silu
        value = F.silu(self.value_conv(self.value_linear(xin)))
        # titans_lmm.nl:29  let query = input | linear(d -> dh) | conv(4) | silu | l2norm
        query = nl_flows.l2norm(F.silu(self.query_conv(self.query_linear(xin))))
        # titans_lmm.nl:30  let theta = input | linear(d -> 1) | sigmoid | scale(0.1)
        theta = torch.sigmoid(self.theta_linear(xin)) * 0.1
        # titans_lmm.nl:31  let eta = input | linear(d -> 1) | sigmoid
        eta = torch.sigmoid(self.eta_linear(xin))
        # titans_lmm.nl:32  let retain = input | linear(d -> 1) | sigmoid
        retain = torch.sigmoid(self.retain_linear(xin))
        # in-context state at the start of the sequence (learned)
        if self.persist and self.carry is not None and nl_flows.batch_of(self.carry) == B:
            state = self.carry  # kept from the previous call (reset never / test-time learning)
        else:
            state = self.start(B, x)
        # titans_lmm.nl:36  every 16 tokens
        state, out, chunk_states = nl_chunks.run_chunks(
            self.chunk,
            state,
            (key, value, query, theta, retain, eta),
            T,
            16,
            keep_states=keep_chunk_states,
            final_state=self.persist,
            sequence=self.sequence,
        )
        self.state_sq.copy_(nl_flows.sq_norm(*state[0]))
        if self.persist:
            self.carry = nl_chunks.detach(state)
        out = nl_flows.merge_heads(out)  # [B, T, 4 * w]
        out = self.out_linear(out)  # titans_lmm.nl:33  output linear(heads * dh -> d)
        if keep_chunk_states:
            return out, [s[0][0] for s in chunk_states]  # chunk-start weights of the first state
        return out

    def chunk(self, state, xs, update=True):
        """One chunk of at most 16 tokens: read at the chunk-start states, then update every state.

        state: ((weights of each state), (momentum of each state)); xs: this chunk's slices of
        the whole-sequence flows, each [B, H', C, w]. update=False: the read only, for a chunk
        whose end state nothing reads (run_chunks decides); the states come back None.
        Returns (the state at the chunk end, y [B, heads, C, w]).
        """
        (memory,), (memory_s,) = state
        key_c, value_c, query_c, theta_c, retain_c, eta_c = xs  # this chunk's tokens
        # titans_lmm.nl:35  rule momentum(lr = theta, momentum = eta, decay = retain)
        # rule momentum: closed-form inner gradients at the chunk-start state, exact chunk form
        y, memory, memory_s = nl_chunk.chunk_step(
            MEMORY_MEMORY,
            'l2',
            MEMORY_RULE,
            memory,
            memory_s,
            nl_flows.heads(key_c, 4),
            nl_flows.heads(value_c, 4),
            nl_flows.heads(query_c, 4),
            nl_flows.gate(theta_c, 4),
            nl_flows.gate(retain_c, 4),
            nl_flows.gate(eta_c, 4),
            update=update,
        )
        return ((memory,), (memory_s,)), y

    def sequence(self, state, xs, final_state=True):
        """The whole sequence in chunks of 16 tokens at once (nl_chunks.sequence_step), or None where
        no whole-sequence form covers the memory. Same values as `chunk` applied chunk by chunk.
        final_state=False: nothing reads the end state (a form may leave the last update out).
        """
        (memory,), (memory_s,) = state
        key_c, value_c, query_c, theta_c, retain_c, eta_c = xs  # the whole sequence's tokens
        # titans_lmm.nl:35  rule momentum(lr = theta, momentum = eta, decay = retain)
        done = nl_chunks.sequence_step(
            MEMORY_MEMORY,
            'l2',
            MEMORY_RULE,
            memory,
            memory_s,
            nl_flows.heads(key_c, 4),
            nl_flows.heads(value_c, 4),
            nl_flows.heads(query_c, 4),
            nl_flows.gate(theta_c, 4),
            nl_flows.gate(retain_c, 4),
            nl_flows.gate(eta_c, 4),
            chunk=16,
            final=final_state,
        )
        if done is None:
            return None  # not covered: run_chunks runs `chunk`
        y, memory, memory_s = done
        return ((memory,), (memory_s,)), y

    def start(self, B, like):
        """The in-context state at the start of a sequence (learned)."""
        states = (nl_flows.expand_state(self.memory0(), B),)
        return states, tuple(nl_flows.zeros_like_state(s) for s in states)


# ---------------------------------------------------------------------------------------------
# static `ffn`
# ---------------------------------------------------------------------------------------------
class FfnLevel(nn.Module):
    """Level `ffn` (titans_lmm.nl:43): static, never.
    state ffn: swiglu(128 -> 128, hidden=512)
    """

    level = 'ffn'
    kind = 'static'
    flow_attrs = {}

    def __init__(self):
        super().__init__()
        # titans_lmm.nl:43  level ffn : swiglu(d -> d, hidden = 4 * d) {
        self.ffn = nl_flows.StaticMemory(FFN_MEMORY)

    def forward(self, x):
        xin = x.unsqueeze(1)  # [B, 1, T, d]
        out = self.ffn(xin).squeeze(1)
        return out


# ---------------------------------------------------------------------------------------------
# block `layer`
# ---------------------------------------------------------------------------------------------
class LayerBlock(nn.Module):
    """Block `layer` (titans_lmm.nl:23), repeated 2 times: pre-norm residual sublayers x = x +
        f(norm(x)).
    """

    def __init__(self):
        super().__init__()
        self.memory_norm = nl_ops.RMSNorm(128)
        # titans_lmm.nl:26  level memory per head : mlp(dh -> dh, hidden = 2 * dh, depth = 2, a...
        self.memory = MemoryLevel()
        self.ffn_norm = nl_ops.RMSNorm(128)
        self.ffn = FfnLevel()  # titans_lmm.nl:43  level ffn : swiglu(d -> d, hidden = 4 * d) {

    def forward(self, x):
        x = x + self.memory(self.memory_norm(x))
        x = x + self.ffn(self.ffn_norm(x))
        return x


# ---------------------------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------------------------
LEVELS = {
    'memory': ('in_context', 'every 16 tokens'),
    'ffn': ('static', 'never'),
    'pretrain': ('outer', 'every 1 steps'),
}


class Model(nl_model.NestedModel):
    """`titans_lmm`: embedding, 1 block kind(s), final norm, tied head.

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
    # titans_lmm.nl:53  rule adamw(lr = 2e-3, wd = 0.1)
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
