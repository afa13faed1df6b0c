"""FLOPs of a spec's model, counted analytically from its IR: the dense layers (``6 N``), the
attention, and every in-context level's inner loop (each chunk's read, inner gradient and update,
as ``nlc.runtime.chunk`` computes them), for ``nlc bench``'s and ``benchmarks/peers.py``'s MFU.

:func:`count_flops` gives a model's FLOPs per token, split into those parts; :func:`level_flops`
one level's, from the chunk step's count (:func:`chunk_step_flops`) and the memory's forward
(:func:`memory_flops`). ``docs/benchmarks.md`` has the formulas.
"""

from __future__ import annotations

import math

__all__ = [
    "attention_flops",
    "chunk_step_flops",
    "chunk_steps_per_forward",
    "count_flops",
    "level_flops",
    "memory_flops",
]


def memory_flops(spec) -> int:
    """Forward matmul FLOPs of one memory on one token: ``sum_l 2 * out_l * in_l``."""
    return sum(2 * o * i for o, i in spec.weight_shapes())


def chunk_step_flops(spec, rule, read: str, C: int, with_query: bool, update: bool = True,
                     reads_keys: bool = False) -> tuple[int, int]:
    """Forward FLOPs of one ``nlc.runtime.chunk.chunk_step`` call for one (sequence, head).

    Returns ``(matmul, solve)``: the matrix-product FLOPs (2 per multiply-add; exactly what
    ``torch.utils.flop_counter.FlopCounterMode`` counts for the call) and the FLOPs of the DGD
    unit-triangular solves (``C (C - 1)`` per right-hand side), which FlopCounterMode does not see.
    Follows the runtime term by term (``docs/benchmarks.md`` lists the terms). ``update=False``:
    a chunk whose end state nothing reads (the read alone, or the causal read's algebra without
    the end state); ``reads_keys``: the queries are the keys, and a chunk read is the keys'
    forward, counted once.
    """
    shapes = spec.weight_shapes()
    if not update and (not with_query or read == "chunk"):
        return (2 * C * sum(o * i for o, i in shapes) if with_query else 0), 0
    n = len(shapes)
    mom = rule.uses_momentum
    if rule.is_dgd:
        pre = [True] * n if rule.dgd_layers == "all" else list(spec.input_side())
    else:
        pre = [False] * n
    full = read == "causal" or any(pre)
    P = [o * i for o, i in shapes]
    f = 0
    solve = 0
    # the memory's forward on the keys and its closed-form backward (one product per weight but
    # the input-side one; for a SwiGLU only the output weight is back-propagated through)
    f += 2 * C * sum(P)
    f += 2 * C * (P[2] if spec.kind == "swiglu" else sum(P[1:]))
    # chunk coefficients: G = A @ Bm (C x C x C) and d = A @ b with momentum
    if mom:
        f += (2 * C**3 + 2 * C**2) if full else 2 * C**2
    for (o, i), p in zip(shapes, pre):
        if full and p:  # DGD: a a^T, W0 a (and S0 a), the masked gradient term, the solve
            f += 2 * C * C * i + 2 * C * i * o + (2 * C * i * o if mom else 0) + 2 * C * C * i + 2 * C * C * o
            solve += C * (C - 1) * o
        if update:
            f += 2 * C * o * i + (2 * C * o * i if p else 0)  # chunk-end weight
        if mom and update:
            f += 2 * C * o * i  # chunk-end momentum
        if with_query and read == "causal":  # token t reads W_t, layer by layer
            f += 2 * C * o * i + (2 * C * o * i if mom else 0) + 2 * C * C * (i + o)
            if p:
                f += 2 * C * C * (i + o)
    if with_query and read == "chunk" and not reads_keys:
        f += 2 * C * sum(P)  # every token reads the chunk-start memory
    return f, solve


def _read_nodes(flow) -> list:
    """The state reads in a flow expression (not following ``ref``s to other bindings)."""
    out = []
    stack = [flow]
    while stack:
        f = stack.pop()
        if f is None:
            continue
        if f.kind == "read":
            out.append(f)
        stack.append(f.arg)
    return out


def _depends_on_state(lv, flow, memo: dict) -> bool:
    for f in flow.walk():
        if f.kind == "read":
            return True
        if f.kind == "ref":
            if f.name not in memo:
                memo[f.name] = False  # no cycles in a verified program; guard anyway
                b = lv.binding(f.name)
                memo[f.name] = b is not None and _depends_on_state(lv, b.flow, memo)
            if memo[f.name]:
                return True
    return False


def level_flops(lv, T: int, persist: bool | None = None) -> dict:
    """Forward inner-loop FLOPs of one in-context level over one sequence of ``T`` tokens.

    Counted from the IR the way the generated code computes the level (``nlc.lower.levels``):
    per chunk of C tokens (a last partial chunk is counted at its size) and per head,

    * every flow that reads a chunk-start state (``mk(x)``): one memory forward per token;
    * ``target self``: each memory's forward on the values;
    * each state: one ``chunk_step`` (:func:`chunk_step_flops`): the memory's forward on the
      keys, its closed-form backward, the rule's chunk algebra, the chunk-end state, and for the
      state the level reads, the read of the queries (none apart where the queries are the keys,
      ``Level.reads_at_keys``);
    * a chunk whose end state nothing reads (the last one, and the last one before each reset, of
      a level that does not keep its state: ``persist``, by default the level's ``reset never``):
      its reads only, as ``run_chunks(..., final_state=False)`` runs it. Where the fused or the
      linear whole-sequence op runs the level (``nlc.runtime.chunks.sequence_step``) it updates
      that chunk too (the wide MLP op does not), and the count is the level's need, below what
      runs.

    Returns ``{"matmul": int, "solve": int}`` for the whole sequence and one sequence (multiply
    by the batch). The level's projections, convolutions and output (ordinary parameters) are not
    included: :func:`count_flops` counts them with the dense parameters.
    """
    from .reference_level import memory_spec, rule_spec
    from .runtime.chunks import boundaries

    H = int(lv.heads)
    C = int(lv.period.every)
    rule = rule_spec(lv)
    specs = {st.name: memory_spec(st.memory) for st in lv.states}
    node = lv.reads
    while node is not None and node.kind == "op":
        node = node.arg
    read_state = node.name if node is not None and node.kind == "read" else (lv.states[0].name if lv.states else None)
    read_arg = node.arg if node is not None and node.kind == "read" else None
    memo: dict = {}
    per_token_reads = 0
    for b in lv.bindings:
        if _depends_on_state(lv, b.flow, memo):
            per_token_reads += sum(memory_flops(specs[r.name]) for r in _read_nodes(b.flow) if r.name in specs)
    if read_arg is not None:
        per_token_reads += sum(memory_flops(specs[r.name]) for r in _read_nodes(read_arg) if r.name in specs)
    if lv.target == "self":
        per_token_reads += sum(memory_flops(s) for s in specs.values())

    reads_keys = lv.reads_at_keys()

    def one_chunk(c: int, update: bool) -> tuple[int, int]:
        m, s = per_token_reads * c, 0
        for st in lv.states:
            is_read = st.name == read_state
            fm, fs = chunk_step_flops(specs[st.name], rule, lv.read_mode if is_read else "chunk", c, is_read,
                                      update, reads_keys and is_read)
            m, s = m + fm, s + fs
        return m, s

    # the chunks as nlc.runtime.chunks.run_chunks's loop runs them: a level that does not keep
    # its state across calls skips the update of each chunk whose end state nothing reads (the
    # last one, and the last one before each reset)
    if persist is None:
        persist = lv.reset.mode == "never"
    reset_every = int(lv.reset.every) if lv.reset.mode == "every" else None
    segments = boundaries(T, C, reset_every, None)
    matmul = solve = 0
    for i, (s0, s1, _, _) in enumerate(segments):
        dead_end = not persist and (i + 1 == len(segments) or segments[i + 1][2])
        starts = list(range(s0, s1, C))
        for j, c0 in enumerate(starts):
            m, s = one_chunk(min(C, s1 - c0), not (dead_end and j == len(starts) - 1))
            matmul, solve = matmul + m, solve + s
    return {"matmul": matmul * H, "solve": solve * H}


def attention_flops(lv, T: int, width: int) -> int:
    """Forward FLOPs of one attention level over one sequence: ``sum_t 4 * width * ctx(t)``.

    ``ctx(t) = min(t + 1, window)``: causal attention does half the work of the full T x T
    products (QK^T and PV, 2 FLOPs per multiply-add each).
    """
    window = lv.primary.memory.option("window") if lv.primary is not None else None
    window = int(window) if window else None
    if window is None or window >= T:
        ctx = T * (T + 1) // 2
    else:
        ctx = window * (window + 1) // 2 + (T - window) * window
    return 4 * width * ctx


def _level_repeats(program) -> dict[str, int]:
    """How many times each level is instantiated (its block's repeat count)."""
    out: dict[str, int] = {}
    for lv in program.levels:
        block = program.block(lv.block) if lv.block else None
        out[lv.name] = int(block.repeat) if block is not None else 1
    return out


def chunk_steps_per_forward(program, seq_len: int) -> int:
    """Chunk steps one forward runs: per in-context level, chunks x states x the block's repeats.

    Eagerly each is a handful of kernel launches, so this sizes the launch overhead of an eager
    step. (Under ``torch.compile`` the chunks run through ``scan``: the graph holds the step once.)
    """
    from . import ir

    reps = _level_repeats(program)
    n = 0
    for lv in program.levels:
        if lv.kind is ir.LevelKind.IN_CONTEXT:
            n += reps.get(lv.name, 1) * math.ceil(seq_len / int(lv.period.every)) * max(1, len(lv.states))
    return n


def count_flops(program, model, seq_len: int) -> dict:
    """FLOPs per token of one training step (forward + backward) of ``model`` at ``seq_len``.

    * ``6n``: ``6 * N``, N = every trainable parameter, the token embedding excluded unless it
      is the tied output head.
    * ``dense``: ``6 * N_dense``, N_dense = the parameters applied to every token by a matrix
      product or a convolution (matrices and convolution kernels; not norm gains, not an untied
      embedding table, not the learned initial states of in-context levels, whose products are
      part of the inner loop).
    * ``attention``: 3 x the forward of every attention level (causal, windowed if so).
    * ``inner``: 3 x the forward inner-loop FLOPs of every in-context level (:func:`level_flops`),
      ``inner_solve`` the DGD triangular solves among them.
    * ``model`` = dense + attention + inner. Backward is taken as 2 x forward throughout.
    """
    from . import ir
    from .runtime.flows import MemoryInit

    init_ids = {id(p) for m in model.modules() if isinstance(m, MemoryInit) for p in m.parameters()}
    embed = getattr(model, "embed", None)
    embed_ids = {id(embed.weight)} if embed is not None and program.head != "tied" else set()
    n_total = n_6n = n_dense = n_init = 0
    for p in model.parameters():
        if not p.requires_grad:
            continue
        n_total += p.numel()
        if id(p) in embed_ids:
            continue
        n_6n += p.numel()
        if id(p) in init_ids:
            n_init += p.numel()
        elif p.dim() >= 2:
            n_dense += p.numel()
    repeats = _level_repeats(program)
    T = int(seq_len)
    width = int(program.d_model)
    levels = []
    attn = inner = solve = 0
    for lv in program.levels:
        r = repeats.get(lv.name, 1)
        if lv.kind is ir.LevelKind.ATTENTION:
            f = attention_flops(lv, T, width)
            attn += r * f
            levels.append({"name": lv.name, "kind": "attention", "repeat": r, "fwd_per_token": f / T})
        elif lv.kind is ir.LevelKind.IN_CONTEXT:
            f = level_flops(lv, T)
            inner += r * f["matmul"]
            solve += r * f["solve"]
            levels.append(
                {
                    "name": lv.name,
                    "kind": "in_context",
                    "repeat": r,
                    "period": int(lv.period.every),
                    "heads": int(lv.heads),
                    "read": lv.read_mode,
                    "rule": lv.rule,
                    "fwd_per_token": f["matmul"] / T,
                    "fwd_solve_per_token": f["solve"] / T,
                }
            )
    dense = 6 * n_dense
    out = {
        "6n": 6 * n_6n,
        "dense": dense,
        "attention": 3 * attn / T,
        "inner": 3 * (inner + solve) / T,
        "inner_solve": 3 * solve / T,
        "levels": levels,
        "params": {
            "total": n_total,
            "n_6n": n_6n,
            "n_dense": n_dense,
            "in_context_init": n_init,
            "embedding_excluded": n_total - n_6n,
        },
    }
    out["model"] = out["dense"] + out["attention"] + out["inner"]
    return out
