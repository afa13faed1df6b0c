"""hope: the model compiled by nlc from hope.nl.

Levels (the paper's level table):
    titans       in_context   every 16 tokens    residual_mlp(32 -> 32, hidden=32, depth= dgd
    fast         in_context   every 16 tokens    mlp(128 -> 128, hidden=256, depth=2, act gd
    mid          in_context   every 64 tokens    mlp(128 -> 128, hidden=256, depth=2, act gd
    slow         static       never              mlp(128 -> 128, hidden=256, depth=2, act -
    pretrain     outer        every 1 steps      -                                        adamw
Generated code: edit the spec and run `nlc compile hope.nl` again.
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
    "name": 'hope',
    "file": 'hope.nl',
    "hash": '907f664600aec72e3759d97d99a5b596380f745552c4e0e5eda16afd517e4381',
    "lr": 0.002,
    "seq_len": 256,
    "dims": {'d': 128, 'heads': 4, 'dh': 32, 'vocab': 256, 'layers': 2, 'seq': 256},
}


@dataclass
class ModelConfig:
    """What may change without recompiling. Widths are fixed by the spec's dims."""

    vocab_size: int = 256  # hope.nl:29  embed vocab -> d
    seq_len: int = 256  # training sequence length (dims: seq)
    layer_repeat: int = 2  # hope.nl:31  block layer x layers {

# ---------------------------------------------------------------------------------------------
# memories and rules
# ---------------------------------------------------------------------------------------------
TITANS_RULE = nl_chunk.RuleSpec('dgd')  # hope.nl:46  rule dgd(lr = lr, decay = retain)
# hope.nl:36  state mem, mk, mv, meta, malpha : small(dh)
TITANS_MEMORY = nl_mem.MemorySpec('residual_mlp', din=32, dout=32, hidden=32, depth=2, act='silu')
FAST_RULE = nl_chunk.RuleSpec('gd')  # hope.nl:56  rule gd(lr = 0.0025)
# hope.nl:51  level fast : mlp(d -> d, hidden = 2 * d) {
FAST_MEMORY = nl_mem.MemorySpec('mlp', din=128, dout=128, hidden=256, depth=2, act='silu')
MID_RULE = nl_chunk.RuleSpec('gd')  # hope.nl:65  rule gd(lr = 0.000625)
# hope.nl:60  level mid : mlp(d -> d, hidden = 2 * d) {
MID_MEMORY = nl_mem.MemorySpec('mlp', din=128, dout=128, hidden=256, depth=2, act='silu')
# hope.nl:69  level slow : mlp(d -> d, hidden = 2 * d) {
SLOW_MEMORY = nl_mem.MemorySpec('mlp', din=128, dout=128, hidden=256, depth=2, act='silu')


# ---------------------------------------------------------------------------------------------
# in-context `titans`
# ---------------------------------------------------------------------------------------------
class TitansLevel(nn.Module):
    """Level `titans` (hope.nl:34): in-context, every 16 tokens.
    Per head: 4 heads.
    state mem: residual_mlp(32 -> 32, hidden=32, depth=2, act=silu)
    state mk: residual_mlp(32 -> 32, hidden=32, depth=2, act=silu)
    state mv: residual_mlp(32 -> 32, hidden=32, depth=2, act=silu)
    state meta: residual_mlp(32 -> 32, hidden=32, depth=2, act=silu)
    state malpha: residual_mlp(32 -> 32, hidden=32, depth=2, act=silu)
    objective l2; rule dgd(lr=lr, decay=retain)
    reset per sequence; init learned; grad through writes full; read chunk; target self
    Inner gradients: closed form (nl_mem.forward_backward); updates: exact chunk form.
    """

    level = 'titans'
    kind = 'in_context'
    period = 16
    heads = 4
    flow_attrs = {1364: 'x_linear', 1382: 'x_conv', 1517: 'query_linear', 1680: 'out_linear'}
    state_attrs = {'mem': 'mem0', 'mk': 'mk0', 'mv': 'mv0', 'meta': 'meta0', 'malpha': 'malpha0'}
    reset_never = False

    def __init__(self):
        super().__init__()
        self.persist = False  # keep the state across calls (reset never, or test-time learning)
        self.carry = None
        # hope.nl:36  state mem, mk, mv, meta, malpha : small(dh)
        self.mem0 = nl_flows.MemoryInit(TITANS_MEMORY, heads=4)
        # hope.nl:36  state mem, mk, mv, meta, malpha : small(dh)
        self.mk0 = nl_flows.MemoryInit(TITANS_MEMORY, heads=4)
        # hope.nl:36  state mem, mk, mv, meta, malpha : small(dh)
        self.mv0 = nl_flows.MemoryInit(TITANS_MEMORY, heads=4)
        # hope.nl:36  state mem, mk, mv, meta, malpha : small(dh)
        self.meta0 = nl_flows.MemoryInit(TITANS_MEMORY, heads=4)
        # hope.nl:36  state mem, mk, mv, meta, malpha : small(dh)
        self.malpha0 = nl_flows.MemoryInit(TITANS_MEMORY, heads=4)
        # hope.nl:35  let x = input | linear(d -> dh) | conv(4)
        self.x_linear = nl_flows.HeadLinear(4, 128, 32)
        # hope.nl:35  let x = input | linear(d -> dh) | conv(4)
        self.x_conv = nl_flows.HeadConv(4 * 32, 4)
        # hope.nl:39  let query = x | linear(dh -> dh) | l2norm
        self.query_linear = nl_flows.HeadLinear(4, 32, 32)
        # hope.nl:43  output linear(heads * dh -> d)
        self.out_linear = nn.Linear(128, 128, bias=False)
        self.register_buffer("state_sq", torch.zeros(()), persistent=False)

    def forward(self, x, keep_chunk_states=False):
        B, T, _ = x.shape
        xin = x.unsqueeze(1)  # [B, 1, T, d]: the input is shared by all heads
        # flows that read no in-context state: computed once for the whole sequence
        # hope.nl:35  let x = input | linear(d -> dh) | conv(4)
        x_2 = self.x_conv(self.x_linear(xin))
        # hope.nl:39  let query = x | linear(dh -> dh) | l2norm
        query = nl_flows.l2norm(self.query_linear(x_2))
        # in-context state at the start of the sequence (learned)
        if self.persist and self.carry is not None and nl_flows.batch_of(self.carry) == B:
            state = self.carry  # kept from the previous call (reset never / test-time learning)
        else:
            state = self.start(B, x)
        # hope.nl:47  every 16 tokens
        state, out, chunk_states = nl_chunks.run_chunks(
            self.chunk,
            state,
            (x_2, query),
            T,
            16,
            keep_states=keep_chunk_states,
            final_state=self.persist,
        )
        self.state_sq.copy_(nl_flows.sq_norm(*state[0]))
        if self.persist:
            self.carry = nl_chunks.detach(state)
        out = nl_flows.merge_heads(out)  # [B, T, 4 * w]
        out = self.out_linear(out)  # hope.nl:43  output linear(heads * dh -> d)
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
        (w,), _ = state
        x_c, query_c = xs  # this chunk's tokens
        # flows that read the chunk-start states (paper eq 90)
        # all 5 memories at once
        x_c_all = nl_mem.forward(TITANS_MEMORY, w, nl_flows.tile(nl_flows.heads(x_c, 4), 5))
        # hope.nl:37  let key = mk(x) | l2norm
        key_c = nl_flows.l2norm(nl_flows.part(x_c_all, 1, 5))
        value_c = nl_flows.part(x_c_all, 2, 5)  # hope.nl:38  let value = mv(x)
        # hope.nl:40  let lr = meta(x) | mean | softplus | scale(0.01)
        lr_c = F.softplus(nl_flows.part(x_c_all, 3, 5).mean(-1, keepdim=True)) * 0.01
        # hope.nl:41  let retain = malpha(x) | mean | sigmoid
        retain_c = torch.sigmoid(nl_flows.part(x_c_all, 4, 5).mean(-1, keepdim=True))
        # target self: each memory is trained towards its own view of the values (eq 84-85)
        target = nl_mem.forward(TITANS_MEMORY, w, nl_flows.tile(nl_flows.heads(value_c, 4), 5))
        # hope.nl:46  rule dgd(lr = lr, decay = retain)
        # rule dgd for all 5 memories at once: closed-form inner gradients at the chunk-start state
        y, w, _ = nl_chunk.chunk_step(
            TITANS_MEMORY,
            'l2',
            TITANS_RULE,
            w,
            None,
            nl_flows.tile(nl_flows.heads(key_c, 4), 5),
            target,
            nl_flows.tile(nl_flows.heads(query_c, 4), 5),
            nl_flows.tile(nl_flows.gate(lr_c, 4), 5),
            nl_flows.tile(nl_flows.gate(retain_c, 4), 5),
            None,
            update=update,
        )
        y = nl_flows.part(y, 0, 5)  # what `mem` reads
        return ((w,), ()), y

    def start(self, B, like):
        """The in-context state at the start of a sequence (learned)."""
        # mem, mk, mv, meta, malpha stacked: [5 * B, heads, out, in]
        states = (
            nl_flows.stack_states([self.mem0(), self.mk0(), self.mv0(), self.meta0(), self.malpha0()], B),
        )
        return states, ()


# ---------------------------------------------------------------------------------------------
# in-context `fast`
# ---------------------------------------------------------------------------------------------
class FastLevel(nn.Module):
    """Level `fast` (hope.nl:51): in-context, every 16 tokens.
    state fast: mlp(128 -> 128, hidden=256, depth=2, act=silu)
    objective l2; rule gd(lr=0.0025)
    reset per sequence; init learned; grad through writes full; read chunk; target plain
    Inner gradients: closed form (nl_mem.forward_backward); updates: exact chunk form.
    """

    level = 'fast'
    kind = 'in_context'
    period = 16
    heads = 1
    flow_attrs = {1945: 'value_linear'}
    state_attrs = {'fast': 'fast0'}
    reset_never = False

    def __init__(self):
        super().__init__()
        self.persist = False  # keep the state across calls (reset never, or test-time learning)
        self.carry = None
        # hope.nl:51  level fast : mlp(d -> d, hidden = 2 * d) {
        self.fast0 = nl_flows.MemoryInit(FAST_MEMORY, heads=1)
        # hope.nl:53  let value = input | linear(d -> d)
        self.value_linear = nl_flows.HeadLinear(1, 128, 128)
        self.register_buffer("state_sq", torch.zeros(()), persistent=False)

    def forward(self, x, keep_chunk_states=False):
        B, T, _ = x.shape
        xin = x.unsqueeze(1)  # [B, 1, T, d]: the input is shared by all heads
        # flows that read no in-context state: computed once for the whole sequence
        key = nl_flows.l2norm(xin)  # hope.nl:52  let key = input | l2norm
        value = self.value_linear(xin)  # hope.nl:53  let value = input | linear(d -> d)
        query = key  # hope.nl:54  let query = key
        # in-context state at the start of the sequence (learned)
        if self.persist and self.carry is not None and nl_flows.batch_of(self.carry) == B:
            state = self.carry  # kept from the previous call (reset never / test-time learning)
        else:
            state = self.start(B, x)
        # hope.nl:57  every 16 tokens
        state, out, chunk_states = nl_chunks.run_chunks(
            self.chunk,
            state,
            (key, value, query),
            T,
            16,
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
        """One chunk of at most 16 tokens: read at the chunk-start states, then update every state.

        state: ((weights of each state), (momentum of each state)); xs: this chunk's slices of
        the whole-sequence flows, each [B, H', C, w]. update=False: the read only, for a chunk
        whose end state nothing reads (run_chunks decides); the states come back None.
        Returns (the state at the chunk end, y [B, heads, C, w]).
        """
        (fast,), _ = state
        key_c, value_c, query_c = xs  # this chunk's tokens
        # hope.nl:56  rule gd(lr = 0.0025)
        # rule gd: closed-form inner gradients at the chunk-start state, exact chunk form
        keys = nl_flows.heads(key_c, 1)  # also the queries: one forward serves both
        y, fast, _ = nl_chunk.chunk_step(
            FAST_MEMORY,
            'l2',
            FAST_RULE,
            fast,
            None,
            keys,
            nl_flows.heads(value_c, 1),
            keys,
            0.0025,
            None,
            None,
            update=update,
        )
        return ((fast,), ()), y

    def sequence(self, state, xs, final_state=True):
        """The whole sequence in chunks of 16 tokens at once (nl_chunks.sequence_step), or None where
        no whole-sequence form covers the memory. Same values as `chunk` applied chunk by chunk.
        final_state=False: nothing reads the end state (a form may leave the last update out).
        """
        (fast,), _ = state
        key_c, value_c, query_c = xs  # the whole sequence's tokens
        keys = nl_flows.heads(key_c, 1)  # also the queries
        # hope.nl:56  rule gd(lr = 0.0025)
        done = nl_chunks.sequence_step(
            FAST_MEMORY,
            'l2',
            FAST_RULE,
            fast,
            None,
            keys,
            nl_flows.heads(value_c, 1),
            keys,
            0.0025,
            None,
            None,
            chunk=16,
            final=final_state,
        )
        if done is None:
            return None  # not covered: run_chunks runs `chunk`
        y, fast, _ = done
        return ((fast,), ()), y

    def start(self, B, like):
        """The in-context state at the start of a sequence (learned)."""
        states = (nl_flows.expand_state(self.fast0(), B),)
        return states, ()


# ---------------------------------------------------------------------------------------------
# in-context `mid`
# ---------------------------------------------------------------------------------------------
class MidLevel(nn.Module):
    """Level `mid` (hope.nl:60): in-context, every 64 tokens.
    state mid: mlp(128 -> 128, hidden=256, depth=2, act=silu)
    objective l2; rule gd(lr=0.000625)
    reset per sequence; init learned; grad through writes full; read chunk; target plain
    Inner gradients: closed form (nl_mem.forward_backward); updates: exact chunk form.
    """

    level = 'mid'
    kind = 'in_context'
    period = 64
    heads = 1
    flow_attrs = {2176: 'value_linear'}
    state_attrs = {'mid': 'mid0'}
    reset_never = False

    def __init__(self):
        super().__init__()
        self.persist = False  # keep the state across calls (reset never, or test-time learning)
        self.carry = None
        # hope.nl:60  level mid : mlp(d -> d, hidden = 2 * d) {
        self.mid0 = nl_flows.MemoryInit(MID_MEMORY, heads=1)
        # hope.nl:62  let value = input | linear(d -> d)
        self.value_linear = nl_flows.HeadLinear(1, 128, 128)
        self.register_buffer("state_sq", torch.zeros(()), persistent=False)

    def forward(self, x, keep_chunk_states=False):
        B, T, _ = x.shape
        xin = x.unsqueeze(1)  # [B, 1, T, d]: the input is shared by all heads
        # flows that read no in-context state: computed once for the whole sequence
        key = nl_flows.l2norm(xin)  # hope.nl:61  let key = input | l2norm
        value = self.value_linear(xin)  # hope.nl:62  let value = input | linear(d -> d)
        query = key  # hope.nl:63  let query = key
        # in-context state at the start of the sequence (learned)
        if self.persist and self.carry is not None and nl_flows.batch_of(self.carry) == B:
            state = self.carry  # kept from the previous call (reset never / test-time learning)
        else:
            state = self.start(B, x)
        # hope.nl:66  every 64 tokens
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
        (mid,), _ = state
        key_c, value_c, query_c = xs  # this chunk's tokens
        # hope.nl:65  rule gd(lr = 0.000625)
        # rule gd: closed-form inner gradients at the chunk-start state, exact chunk form
        keys = nl_flows.heads(key_c, 1)  # also the queries: one forward serves both
        y, mid, _ = nl_chunk.chunk_step(
            MID_MEMORY,
            'l2',
            MID_RULE,
            mid,
            None,
            keys,
            nl_flows.heads(value_c, 1),
            keys,
            0.000625,
            None,
            None,
            update=update,
        )
        return ((mid,), ()), y

    def sequence(self, state, xs, final_state=True):
        """The whole sequence in chunks of 64 tokens at once (nl_chunks.sequence_step), or None where
        no whole-sequence form covers the memory. Same values as `chunk` applied chunk by chunk.
        final_state=False: nothing reads the end state (a form may leave the last update out).
        """
        (mid,), _ = state
        key_c, value_c, query_c = xs  # the whole sequence's tokens
        keys = nl_flows.heads(key_c, 1)  # also the queries
        # hope.nl:65  rule gd(lr = 0.000625)
        done = nl_chunks.sequence_step(
            MID_MEMORY,
            'l2',
            MID_RULE,
            mid,
            None,
            keys,
            nl_flows.heads(value_c, 1),
            keys,
            0.000625,
            None,
            None,
            chunk=64,
            final=final_state,
        )
        if done is None:
            return None  # not covered: run_chunks runs `chunk`
        y, mid, _ = done
        return ((mid,), ()), y

    def start(self, B, like):
        """The in-context state at the start of a sequence (learned)."""
        states = (nl_flows.expand_state(self.mid0(), B),)
        return states, ()


# ---------------------------------------------------------------------------------------------
# static `slow`
# ---------------------------------------------------------------------------------------------
class SlowLevel(nn.Module):
    """Level `slow` (hope.nl:69): static, never.
    state slow: mlp(128 -> 128, hidden=256, depth=2, act=silu)
    """

    level = 'slow'
    kind = 'static'
    flow_attrs = {}

    def __init__(self):
        super().__init__()
        # hope.nl:69  level slow : mlp(d -> d, hidden = 2 * d) {
        self.slow = nl_flows.StaticMemory(SLOW_MEMORY)

    def forward(self, x):
        xin = x.unsqueeze(1)  # [B, 1, T, d]
        out = self.slow(xin).squeeze(1)
        return out


# ---------------------------------------------------------------------------------------------
# block `layer`
# ---------------------------------------------------------------------------------------------
class LayerBlock(nn.Module):
    """Block `layer` (hope.nl:31), repeated 2 times: pre-norm residual sublayers x = x +
        f(norm(x)).
    """

    def __init__(self):
        super().__init__()
        self.titans_norm = nl_ops.RMSNorm(128)
        self.titans = TitansLevel()  # hope.nl:34  level titans per head {
        self.fast_norm = nl_ops.RMSNorm(128)
        self.fast = FastLevel()  # hope.nl:51  level fast : mlp(d -> d, hidden = 2 * d) {
        self.mid_norm = nl_ops.RMSNorm(128)
        self.mid = MidLevel()  # hope.nl:60  level mid : mlp(d -> d, hidden = 2 * d) {
        self.slow_norm = nl_ops.RMSNorm(128)
        self.slow = SlowLevel()  # hope.nl:69  level slow : mlp(d -> d, hidden = 2 * d) {

    def forward(self, x):
        x = x + self.titans(self.titans_norm(x))
        x = x + self.fast(self.fast_norm(x))  # CMS ffn: sequential
        x = x + self.mid(self.mid_norm(x))
        x = x + self.slow(self.slow_norm(x))
        return x


# ---------------------------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------------------------
LEVELS = {
    'titans': ('in_context', 'every 16 tokens'),
    'fast': ('in_context', 'every 16 tokens'),
    'mid': ('in_context', 'every 64 tokens'),
    'slow': ('static', 'never'),
    'pretrain': ('outer', 'every 1 steps'),
}


class Model(nl_model.NestedModel):
    """`hope`: embedding, 1 block kind(s), final norm, tied head.

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
    # hope.nl:80  rule adamw(lr = 2e-3, wd = 0.1)
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
