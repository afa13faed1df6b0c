"""Every closed set of names the language accepts, listed once.

Resolution validates each option against these tables and suggests the closest name on a
miss; ``docs/language.md`` documents the same tables (a test checks they agree).
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = [
    "ArgSpec", "MEMORY_KINDS", "ACTIVATIONS", "OPS", "IN_CONTEXT_RULES", "OUTER_RULES",
    "OPTIMIZER_RULES", "IN_CONTEXT_OBJECTIVES", "OPTIMIZER_OBJECTIVES", "OUTER_OBJECTIVES",
    "UNITS", "RESET_PER", "INIT_MODES", "GRAD_MODES", "READ_MODES", "TARGET_MODES",
    "NORMS", "HEADS", "CMS_VARIANTS", "CMS_AGG", "RESERVED", "GATE_ARGS", "OUTPUT_OPS",
]


@dataclass(frozen=True)
class ArgSpec:
    """Keyword arguments a constructor/rule accepts: name -> (kind, default).

    kinds: ``int`` (a positive integer expression), ``num`` (a number), ``gate`` (a number or a
    let-binding giving one number per token), ``name:<a|b|c>`` (one of those names),
    ``bool`` (yes/no/true/false).
    """

    kwargs: dict = field(default_factory=dict)
    required: tuple[str, ...] = ()
    positional: str = ""  # "shape" (a -> b, or one width n meaning n -> n), "int", "num", ""
    doc: str = ""


BOOL = "name:yes|no|true|false"

ACTIVATIONS = ("silu", "gelu", "relu", "tanh", "sigmoid", "identity")

# memory constructors ------------------------------------------------------------------------------
MEMORY_KINDS: dict[str, ArgSpec] = {
    "linear": ArgSpec({}, positional="shape", doc="y = W k (a matrix memory)"),
    "matrix": ArgSpec({}, positional="shape", doc="alias of linear"),
    "mlp": ArgSpec(
        {"hidden": ("int", None), "depth": ("int", 2), "act": ("name:" + "|".join(ACTIVATIONS), "silu")},
        positional="shape",
        doc="y = W_L σ(... σ(W_1 k))",
    ),
    "residual_mlp": ArgSpec(
        {"hidden": ("int", None), "depth": ("int", 2), "act": ("name:" + "|".join(ACTIVATIONS), "silu")},
        positional="shape",
        doc="y = k + mlp(k) (paper eq 89)",
    ),
    "swiglu": ArgSpec({"hidden": ("int", None)}, positional="shape", doc="y = W_o(silu(W_g k) ⊙ W_u k)"),
    "attention": ArgSpec(
        {"heads": ("int", None), "window": ("int", None), "rope": (BOOL, "yes")},
        doc="causal softmax attention (non-parametric, period 1 token)",
    ),
    "elementwise": ArgSpec({}, doc="one buffer per parameter, of its shape (optimizer levels)"),
}

# flow stages -------------------------------------------------------------------------------------
OPS: dict[str, ArgSpec] = {
    "linear": ArgSpec({}, positional="shape", doc="a learned projection (per head in a per-head level)"),
    "conv": ArgSpec({}, positional="int", doc="short causal depthwise convolution of that width"),
    "l2norm": ArgSpec({}, doc="divide by the L2 norm over the last dimension"),
    "mean": ArgSpec({}, doc="average over the last dimension (width 1)"),
    "scale": ArgSpec({}, positional="num", doc="multiply by a constant"),
    **{a: ArgSpec({}, doc=f"{a} activation") for a in ACTIVATIONS if a != "identity"},
    "softplus": ArgSpec({}, doc="softplus activation"),
    "newton_schulz": ArgSpec({}, positional="int",
                             doc="orthogonalize an optimizer level's update (paper eq 52; Muon)"),
}
OUTPUT_OPS = ("linear", "newton_schulz")  # `output` stages (newton_schulz: optimizer levels)

# rules -------------------------------------------------------------------------------------------
GATE_ARGS = ("lr", "decay", "momentum")

IN_CONTEXT_RULES: dict[str, ArgSpec] = {
    "gd": ArgSpec({"lr": ("gate", None), "decay": ("gate", 1.0)}, required=("lr",),
                  doc="W_t = α_t W_{t-1} − η_t ∇ℓ"),
    "momentum": ArgSpec(
        {"lr": ("gate", None), "momentum": ("gate", None), "decay": ("gate", 1.0)},
        required=("lr", "momentum"),
        doc="S_t = β_t S_{t-1} − η_t ∇ℓ; W_t = α_t W_{t-1} + S_t (Titans eq 9-14)",
    ),
    "dgd": ArgSpec(
        {"lr": ("gate", None), "decay": ("gate", 1.0), "momentum": ("gate", None),
         "form": ("name:eq88|normalized", "eq88")},
        required=("lr",),
        doc="W_t = W_{t-1}(α_t I − η_t k kᵀ) − η_t ∇ℓ (paper eq 88)",
    ),
}

_OPT_COMMON = {"lr": ("num", None), "wd": ("num", 0.0)}
OUTER_RULES: dict[str, ArgSpec] = {
    "adamw": ArgSpec({**_OPT_COMMON, "beta1": ("num", 0.9), "beta2": ("num", 0.999), "eps": ("num", 1e-8)},
                     required=("lr",)),
    "adam": ArgSpec({**_OPT_COMMON, "beta1": ("num", 0.9), "beta2": ("num", 0.999), "eps": ("num", 1e-8)},
                    required=("lr",)),
    "sgd": ArgSpec({**_OPT_COMMON, "momentum": ("num", 0.0), "nesterov": (BOOL, "no")}, required=("lr",)),
    "muon": ArgSpec({**_OPT_COMMON, "momentum": ("num", 0.95), "ns_steps": ("int", 5)}, required=("lr",)),
    "m3": ArgSpec(
        {**_OPT_COMMON, "beta1": ("num", 0.9), "beta2": ("num", 0.999), "beta3": ("num", 0.9),
         "alpha": ("num", 1.0), "eps": ("num", 1e-8), "ns_steps": ("int", 5), "slow": ("int", 100),
         # the paper's ambiguities (reference §7 item 19), defaults = Algorithm 1
         "accumulate": ("name:sum|ema", "sum"), "precondition": ("name:elementwise|tensor|none", "elementwise"),
         "slow_sign": ("name:plus|minus", "plus"), "slow_beta": ("name:beta3|beta2", "beta3"),
         "slow_timing": ("name:after_step|before_step", "after_step"),
         "eps_placement": ("name:outside|inside", "outside")},
        required=("lr",),
        doc="multi-scale momentum Muon (paper §7.2, Algorithm 1)",
    ),
}

OPTIMIZER_RULES: dict[str, ArgSpec] = {
    "gd": ArgSpec({**_OPT_COMMON, "decay": ("num", 0.0), "nesterov": (BOOL, "no")}, required=("lr",),
                  doc="a memory of gradients trained by GD: m ← α m − η ∇; W ← W + m (α = decay: momentum)"),
    "delta": ArgSpec({**_OPT_COMMON, "decay": ("num", 0.9), "form": ("name:nl|nips", "nl")},
                     required=("lr",), doc="delta momentum (paper eq 48-49)"),
    "dmgd": ArgSpec({**_OPT_COMMON, "decay": ("num", 0.9), "hidden": ("int", 8), "inner_lr": ("num", 0.01)},
                    required=("lr",), doc="deep momentum GD: an MLP memory of gradients (eq 50)"),
    "adam": ArgSpec({**_OPT_COMMON, "beta1": ("num", 0.9), "beta2": ("num", 0.999), "eps": ("num", 1e-8)},
                    required=("lr",), doc="Adam as a memory of gradients (App. B eq 101-105)"),
    "m3": OUTER_RULES["m3"],
}

IN_CONTEXT_OBJECTIVES: dict[str, ArgSpec] = {
    "dot": ArgSpec({}, doc="ℓ = −⟨M(k), v⟩"),
    "l2": ArgSpec({}, doc="ℓ = ½‖M(k) − v‖²"),
    "huber": ArgSpec({"delta": ("num", 1.0)}, doc="Huber loss on M(k) − v"),
}
OUTER_OBJECTIVES: dict[str, ArgSpec] = {"next_token": ArgSpec({}, doc="next-token cross-entropy")}
OPTIMIZER_OBJECTIVES: dict[str, ArgSpec] = {
    "dot": ArgSpec({}, doc="−⟨m, −∇⟩: momentum (paper eq 13)"),
    "l2": ArgSpec({}, doc="L2 regression of gradients (delta momentum, Adam)"),
}
# which objective each optimizer rule implements
OPTIMIZER_RULE_OBJECTIVE = {"gd": "dot", "delta": "l2", "dmgd": "dot", "adam": "l2", "m3": "dot"}

UNITS = {"tokens": "tokens", "token": "tokens", "steps": "steps", "step": "steps"}
RESET_PER = ("sequence",)
INIT_MODES = ("learned", "zeros")
GRAD_MODES = ("full", "stop", "truncate")
READ_MODES = ("chunk", "causal")
TARGET_MODES = ("plain", "self")
NORMS = ("rms", "layer", "none")
HEADS = ("tied", "untied")
CMS_VARIANTS = ("sequential", "nested", "independent")
CMS_AGG = ("sum", "mean", "learned")

# names a user may not bind: they already mean something inside flows
RESERVED = frozenset({"input"}) | frozenset(OPS) | frozenset(MEMORY_KINDS)
