"""Riemannian Adam on the orthogonal group and Stiefel manifold, NAdam/AdamW elsewhere, manifold Lookahead.

Every parameter has an fp32 *master* that is the truth; the model's (possibly bf16) weights are written
from it after each update. Kinds (DESIGN.md §2):

- "orthogonal" (square X ∈ O(n)): moments on Ω = skew(XᵀG) in the Lie algebra, step A = −lr·m̂/(√v̂+eps)
  (skew), X ← X·exp(A) by `fast_exp`. Lookahead moves the slow weights by exp(α·ΣA) over the last k steps.
- "stiefel" (tall X, XᵀX = I): moments on the Riemannian gradient G − X·sym(XᵀG), retraction by polar.
- "euclidean": NAdam or AdamW with decoupled weight decay; Lookahead by averaging.

State is kept per parameter *name* so that a shard of it (issue: distributed) is a subset of the same keys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lipnext_scale.optim.fastexp import fast_exp, polar, reorthogonalize, skew, sym

KINDS = ("orthogonal", "stiefel", "euclidean")


@dataclass(frozen=True)
class ManifoldHyper:
    lr: float
    euclidean_lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    euclidean_method: str = "nadam"
    lookahead_k: int = 0
    lookahead_alpha: float = 0.5
    reorthogonalize_every: int = 100
    exp_dtype: torch.dtype = torch.float64


def parameter_kind(param: torch.Tensor, is_manifold: bool) -> str:
    if not is_manifold:
        return "euclidean"
    return "orthogonal" if param.shape[0] == param.shape[1] else "stiefel"


class ManifoldOptimizer(torch.optim.Optimizer):
    """Updates `named_params`, a list of (name, param, kind) with kind in KINDS.

    Only the `owned` names (default: all) get a master and optimizer state; the others are updated by
    whoever owns them (see `ShardedManifoldOptimizer`).
    """

    def __init__(
        self,
        named_params: list[tuple[str, torch.nn.Parameter, str]],
        hyper: ManifoldHyper,
        owned: set[str] | None = None,
    ):
        for name, _, kind in named_params:
            if kind not in KINDS:
                raise ValueError(f"parameter {name}: unknown kind {kind!r}")
        groups = [
            {
                "params": [p for _, p, k in named_params if k == kind],
                "names": [n for n, _, k in named_params if k == kind],
                "kind": kind,
                "lr": hyper.euclidean_lr if kind == "euclidean" else hyper.lr,
            }
            for kind in KINDS
            if any(k == kind for _, _, k in named_params)
        ]
        for group in groups:
            group["base_lr"] = group["lr"]
        super().__init__(groups, {})
        self.hyper = hyper
        self.step_count = 0
        self.kind_of = {id(p): kind for _, p, kind in named_params}
        self.group_of = {id(p): group for group in self.param_groups for p in group["params"]}
        for name, param, kind in named_params:
            if owned is None or name in owned:
                self.state[param] = self._initial_state(param, kind)
                self.state[param]["name"] = name

    def _initial_state(self, param: torch.Tensor, kind: str) -> dict:
        # An fp32 parameter is its own master; a bf16 one gets a separate fp32 copy.
        master = param.data if param.dtype == torch.float32 else param.data.float()
        state = {
            "master": master,
            "exp_avg": torch.zeros_like(master),
            "exp_avg_sq": torch.zeros_like(master),
        }
        if self.hyper.lookahead_k:
            state["slow"] = master.clone()
            if kind == "orthogonal":
                state["step_sum"] = torch.zeros_like(master)
        return state

    def set_lr_factor(self, factor: float) -> None:
        for group in self.param_groups:
            group["lr"] = group["base_lr"] * factor

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D401 - torch.optim signature
        if closure is not None:
            raise ValueError("ManifoldOptimizer does not take a closure")
        self.step_count += 1
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None and param in self.state:
                    self.update_parameter(param, param.grad.float())
                    self.write_back(param)

    def update_parameter(self, param: torch.nn.Parameter, grad: torch.Tensor) -> None:
        """One step of `param`'s master from its (fp32, already averaged and clipped) gradient."""
        h = self.hyper
        kind = self.kind_of[id(param)]
        state = self.state[param]
        getattr(self, f"_update_{kind}")(state, grad, self.group_of[id(param)]["lr"])
        if h.lookahead_k and self.step_count % h.lookahead_k == 0:
            getattr(self, f"_lookahead_{kind}")(state)
        if kind != "euclidean" and h.reorthogonalize_every and self.step_count % h.reorthogonalize_every == 0:
            state["master"].copy_(reorthogonalize(state["master"]))

    def write_back(self, param: torch.nn.Parameter) -> None:
        """Copy the master into the (possibly lower-precision) model weight."""
        master = self.state[param]["master"]
        if master.data_ptr() != param.data_ptr():  # an fp32 weight is its own master
            param.data.copy_(master)

    def _adam_direction(self, state: dict, direction_grad: torch.Tensor) -> torch.Tensor:
        """Bias-corrected Adam ratio m̂ / (√v̂ + eps), moments updated in place."""
        b1, b2 = self.hyper.betas
        t = self.step_count
        state["exp_avg"].mul_(b1).add_(direction_grad, alpha=1 - b1)
        state["exp_avg_sq"].mul_(b2).addcmul_(direction_grad, direction_grad, value=1 - b2)
        denom = (state["exp_avg_sq"] / (1 - b2**t)).sqrt_().add_(self.hyper.eps)
        return (state["exp_avg"] / (1 - b1**t)) / denom

    def _update_orthogonal(self, state: dict, grad: torch.Tensor, lr: float) -> None:
        x = state["master"]
        omega = skew(x.t() @ grad)
        step = skew(-lr * self._adam_direction(state, omega))  # skew already; re-skewing removes rounding
        if "step_sum" in state:
            state["step_sum"].add_(step)
        dt = self.hyper.exp_dtype
        x.copy_((x.to(dt) @ fast_exp(step.to(dt))).float())

    def _update_stiefel(self, state: dict, grad: torch.Tensor, lr: float) -> None:
        x = state["master"]
        riemannian = grad - x @ sym(x.t() @ grad)
        direction = -lr * self._adam_direction(state, riemannian)
        direction = direction - x @ sym(x.t() @ direction)
        x.copy_(polar((x + direction).double()).float())

    def _update_euclidean(self, state: dict, grad: torch.Tensor, lr: float) -> None:
        h = self.hyper
        x = state["master"]
        if h.weight_decay:
            x.mul_(1 - lr * h.weight_decay)
        if h.euclidean_method == "adamw":
            x.add_(self._adam_direction(state, grad), alpha=-lr)
            return
        # NAdam (Dozat): Nesterov look-ahead on the first moment, with constant momentum β1.
        b1, b2 = h.betas
        t = self.step_count
        state["exp_avg"].mul_(b1).add_(grad, alpha=1 - b1)
        state["exp_avg_sq"].mul_(b2).addcmul_(grad, grad, value=1 - b2)
        nesterov = state["exp_avg"] * (b1 / (1 - b1 ** (t + 1))) + grad * ((1 - b1) / (1 - b1**t))
        denom = (state["exp_avg_sq"] / (1 - b2**t)).sqrt_().add_(h.eps)
        x.addcdiv_(nesterov, denom, value=-lr)

    def _lookahead_orthogonal(self, state: dict) -> None:
        # The fast weights moved by ≈ exp(ΣA) since the last sync; the slow ones go α of that way along the
        # manifold rather than by averaging, which would leave the group.
        dt = self.hyper.exp_dtype
        slow = state["slow"]
        slow.copy_((slow.to(dt) @ fast_exp(self.hyper.lookahead_alpha * state["step_sum"].to(dt))).float())
        state["master"].copy_(slow)
        state["step_sum"].zero_()

    def _lookahead_stiefel(self, state: dict) -> None:
        slow = state["slow"]
        slow.add_(state["master"] - slow, alpha=self.hyper.lookahead_alpha)
        slow.copy_(polar(slow.double()).float())
        state["master"].copy_(slow)

    def _lookahead_euclidean(self, state: dict) -> None:
        slow = state["slow"]
        slow.add_(state["master"] - slow, alpha=self.hyper.lookahead_alpha)
        state["master"].copy_(slow)

    # --- checkpointing: plain tensors keyed by parameter name (safetensors-friendly) ---

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for state in self.state.values():
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    out[f"{state['name']}/{key}"] = value
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], step_count: int) -> None:
        self.step_count = step_count
        for param, state in self.state.items():
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    full_key = f"{state['name']}/{key}"
                    if full_key not in tensors:
                        raise KeyError(f"optimizer checkpoint lacks {full_key}")
                    value.copy_(tensors[full_key])
            self.write_back(param)


def lr_schedule(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """Linear warm-up to 1, then cosine down to `min_ratio` at `total_steps`."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
