"""cms_nested: the model compiled by nlc from cms_nested.nl.

Levels (the paper's level table):
    attn         attention    every 1 tokens     attention(heads=4, window=None, rope=Tru -
    outer        in_context   every 64 tokens    mlp(128 -> 128, hidden=256, depth=2, act gd
    inner        in_context   every 16 tokens    mlp(128 -> 128, hidden=256, depth=2, act gd
    pretrain     outer        every 1 steps      -                                        adamw
Generated code: edit the spec and run `nlc compile cms_nested.nl` again.
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
    "name": 'cms_nested',
    "file": 'cms_nested.nl',
    "hash": '13fbbfccf6567386bde73aefe42dc2eeabdb58107f9d5f24a79ef016b92af8fe',
    "lr": 0.002,
    "seq_len": 256,
    "dims": {'d': 128, 'heads': 4, 'vocab': 256, 'layers': 2, 'seq': 256},
}


@dataclass
class ModelConfig:
    """What may change without recompiling. Widths are fixed by the spec's dims."""

    vocab_size: int = 256  # cms_nested.nl:20  embed vocab -> d
    seq_len: int = 256  # training sequence length (dims: seq)
    layer_repeat: int = 2  # cms_nested.nl:22  block layer x layers {

# ---------------------------------------------------------------------------------------------
# memories and rules
# ---------------------------------------------------------------------------------------------
OUTER_RULE = nl_chunk.RuleSpec('gd')  # cms_nested.nl:32  rule gd(lr = 0.01)
# cms_nested.nl:27  level outer : mlp(d -> d, hidden = 2 * d) {
OUTER_MEMORY = nl_mem.MemorySpec('mlp', din=128, dout=128, hidden=256, depth=2, act='silu')
INNER_RULE = nl_chunk.RuleSpec('gd')  # cms_nested.nl:41  rule gd(lr = 0.01)
# cms_nested.nl:36  level inner : mlp(d -> d, hidden = 2 * d) {
INNER_MEMORY = nl_mem.MemorySpec('mlp', din=128, dout=128, hidden=256, depth=2, act='silu')


# ---------------------------------------------------------------------------------------------
# attention `attn`
# ---------------------------------------------------------------------------------------------
class AttnLevel(nn.Module):
    """Level `attn` (cms_nested.nl:24): attention, every 1 tokens.
    state attn: attention(heads=4, window=None, rope=True)
    4 heads of 32; full causal; rotary positions
    """

    level = 'attn'
    kind = 'attention'

    def __init__(self):
        super().__init__()
        # cms_nested.nl:24  level attn : attention(heads = heads)
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
# in-context `outer`
# ---------------------------------------------------------------------------------------------
class OuterLevel(nn.Module):
    """Level `outer` (cms_nested.nl:27): in-context, every 64 tokens.
    state outer: mlp(128 -> 128, hidden=256, depth=2, act=silu)
    objective l2; rule gd(lr=0.01)
    reset per sequence; init learned; grad through writes full; read chunk; target plain
    Inner gradients: closed form (nl_mem.forward_backward); updates: exact chunk form.
    """

    level = 'outer'
    kind = 'in_context'
    period = 64
    heads = 1
    flow_attrs = {976: 'value_linear'}
    state_attrs = {'outer': 'outer0'}
    reset_never = False

    def __init__(self):
        super().__init__()
        self.persist = False  # keep the state across calls (reset never, or test-time learning)
        self.carry = None
        # cms_nested.nl:27  level outer : mlp(d -> d, hidden = 2 * d) {
        self.outer0 = nl_flows.MemoryInit(OUTER_MEMORY, heads=1)
        # cms_nested.nl:29  let value = input | linear(d -> d)
        self.value_linear = nl_flows.HeadLinear(1, 128, 128)
        self.register_buffer("state_sq", torch.zeros(()), persistent=False)

    def forward(self, x, keep_chunk_states=False):
        B, T, _ = x.shape
        xin = x.unsqueeze(1)  # [B, 1, T, d]: the input is shared by all heads
        # flows that read no in-context state: computed once for the whole sequence
        key = nl_flows.l2norm(xin)  # cms_nested.nl:28  let key = input | l2norm
        value = self.value_linear(xin)  # cms_nested.nl:29  let value = input | linear(d -> d)
        query = key  # cms_nested.nl:30  let query = key
        # in-context state at the start of the sequence (learned)
        if self.persist and self.carry is not None and nl_flows.batch_of(self.carry) == B:
            state = self.carry  # kept from the previous call (reset never / test-time learning)
        else:
            state = self.start(B, x)
        # cms_nested.nl:33  every 64 tokens
        state, out, chunk_states = nl_chunks.run_chunks(
            self.chunk,
            state,
            (key, value, query),
            T,
            64,
            keep_states=keep_chunk_states,
            final_state=self.persist,
            sequence=self.sequence,
        )
        self.state_sq.copy_(nl_flows.sq_norm(*state[0]))
        if self.persist:
            self.carry = nl_chunks.detach(state)
        out = nl_flows.merge_heads(out)  # [B, T, 1 * w]
        if keep_chunk_states:
            return out, [s[0][0] for s in chunk_states]  # chunk-start weights of the first state
        return out

    def chunk(self, state, xs, update=True):
        """One chunk of at most 64 tokens: read at the chunk-start states, then update every state.

        state: ((weights of each state), (momentum of each state)); xs: this chunk's slices of
        the whole-sequence flows, each [B, H', C, w]. update=False: the read only, for a chunk
        whose end state nothing reads (run_chunks decides); the states come back None.
        Returns (the state at the chunk end, y [B, heads, C, w]).
        """
        (outer,), _ = state
        key_c, value_c, query_c = xs  # this chunk's tokens
        # cms_nested.nl:32  rule gd(lr = 0.01)
        # rule gd: closed-form inner gradients at the chunk-start state, exact chunk form
        keys = nl_flows.heads(key_c, 1)  # also the queries: one forward serves both
        y, outer, _ = nl_chunk.chunk_step(
            OUTER_MEMORY,
            'l2',
            OUTER_RULE,
            outer,
            None,
            keys,
            nl_flows.heads(value_c, 1),
            keys,
            0.01,
            None,
            None,
            update=update,
        )
        return ((outer,), ()), y

    def sequence(self, state, xs, final_state=True):
        """The whole sequence in chunks of 64 tokens at once (nl_chunks.sequence_step), or None where
        no whole-sequence form covers the memory. Same values as `chunk` applied chunk by chunk.
        final_state=False: nothing reads the end state (a form may leave the last update out).
        """
        (outer,), _ = state
        key_c, value_c, query_c = xs  # the whole sequence's tokens
        keys = nl_flows.heads(key_c, 1)  # also the queries
        # cms_nested.nl:32  rule gd(lr = 0.01)
        done = nl_chunks.sequence_step(
            OUTER_MEMORY,
            'l2',
            OUTER_RULE,
            outer,
            None,
            keys,
            nl_flows.heads(value_c, 1),
            keys,
            0.01,
            None,
            None,
            chunk=64,
            final=final_state,
        )
        if done is None:
            return None  # not covered: run_chunks runs `chunk`
        y, outer, _ = done
        return ((outer,), ()), y

    def start(self, B, like):
        """The in-context state at the start of a sequence (learned)."""
        states = (nl_flows.expand_state(self.outer0(), B),)
        return states, ()


# ---------------------------------------------------------------------------------------------
# in-context `inner`
# ---------------------------------------------------------------------------------------------
class InnerLevel(nn.Module):
    """Level `inner` (cms_nested.nl:36): in-context, every 16 tokens.
    state inner: mlp(128 -> 128, hidden=256, depth=2, act=silu)
    objective l2; rule gd(lr=0.01)
    reset every 64 tokens; init from outer; grad through writes full; read chunk; target plain
    Inner gradients: closed form (nl_mem.forward_backward); updates: exact chunk form.
    """

    level = 'inner'
    kind = 'in_context'
    period = 16
    heads = 1
    flow_attrs = {1207: 'value_linear'}
    state_attrs = {}
    reset_never = False

    def __init__(self):
        super().__init__()
        self.persist = False  # keep the state across calls (reset never, or test-time learning)
        self.carry = None
        # cms_nested.nl:38  let value = input | linear(d -> d)
        self.value_linear = nl_flows.HeadLinear(1, 128, 128)
        self.register_buffer("state_sq", torch.zeros(()), persistent=False)

    def forward(self, x, start_states=None, keep_chunk_states=False):
        B, T, _ = x.shape
        xin = x.unsqueeze(1)  # [B, 1, T, d]: the input is shared by all heads
        # flows that read no in-context state: computed once for the whole sequence
        key = nl_flows.l2norm(xin)  # cms_nested.nl:37  let key = input | l2norm
        value = self.value_linear(xin)  # cms_nested.nl:38  let value = input | linear(d -> d)
        query = key  # cms_nested.nl:39  let query = key
        if start_states is None:
            raise ValueError(
                'level `inner` is nested in `outer`: call it with the chunk states of `outer`',
            )
        # init from outer, restarted when it updates
        start = lambda c0: ((nl_flows.expand_state(start_states[c0 // 64], B),), ())
        # in-context state at the start of the sequence (from outer)
        if self.persist and self.carry is not None and nl_flows.batch_of(self.carry) == B:
            state = self.carry  # kept from the previous call (reset never / test-time learning)
        else:
            state = start(0)
        # cms_nested.nl:42  every 16 tokens
        state, out, chunk_states = nl_chunks.run_chunks(
            self.chunk,
            state,
            (key, value, query),
            T,
            16,
            reset_every=64,
            restart=start,
            keep_states=keep_chunk_states,
            final_state=self.persist,
        )
        self.state_sq.copy_(nl_flows.sq_norm(*state[0]))
        if self.persist:
            self.carry = nl_chunks.detach(state)
        out = nl_flows.merge_heads(out)  # [B, T, 1 * w]
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
        (inner,), _ = state
        key_c, value_c, query_c = xs  # this chunk's tokens
        # cms_nested.nl:41  rule gd(lr = 0.01)
        # rule gd: closed-form inner gradients at the chunk-start state, exact chunk form
        keys = nl_flows.heads(key_c, 1)  # also the queries: one forward serves both
        y, inner, _ = nl_chunk.chunk_step(
            INNER_MEMORY,
            'l2',
            INNER_RULE,
            inner,
            None,
            keys,
            nl_flows.heads(value_c, 1),
            keys,
            0.01,
            None,
            None,
            update=update,
        )
        return ((inner,), ()), y


# ---------------------------------------------------------------------------------------------
# block `layer`
# ---------------------------------------------------------------------------------------------
class LayerBlock(nn.Module):
    """Block `layer` (cms_nested.nl:22), repeated 2 times: pre-norm residual sublayers x = x +
        f(norm(x)).
    """

    def __init__(self):
        super().__init__()
        self.attn_norm = nl_ops.RMSNorm(128)
        self.attn = AttnLevel()  # cms_nested.nl:24  level attn : attention(heads = heads)
        self.outer_norm = nl_ops.RMSNorm(128)
        self.outer = OuterLevel()  # cms_nested.nl:27  level outer : mlp(d -> d, hidden = 2 * d) {
        self.inner_norm = nl_ops.RMSNorm(128)
        self.inner = InnerLevel()  # cms_nested.nl:36  level inner : mlp(d -> d, hidden = 2 * d) {

    def forward(self, x):
        x = x + self.attn(self.attn_norm(x))
        h, outer_states = self.outer(self.outer_norm(x), keep_chunk_states=True)  # CMS ffn: nested
        x = x + h
        x = x + self.inner(self.inner_norm(x), start_states=outer_states)
        return x


# ---------------------------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------------------------
LEVELS = {
    'attn': ('attention', 'every 1 tokens'),
    'outer': ('in_context', 'every 64 tokens'),
    'inner': ('in_context', 'every 16 tokens'),
    'pretrain': ('outer', 'every 1 steps'),
}


class Model(nl_model.NestedModel):
    """`cms_nested`: embedding, 1 block kind(s), final norm, tied head.

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
    # cms_nested.nl:54  rule adamw(lr = 2e-3, wd = 0.1)
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
