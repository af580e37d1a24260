"""Riemannian Adam on the orthogonal group and Stiefel manifold, NAdam/AdamW elsewhere, manifold Lookahead.

Every parameter has an fp32 *master* that is the truth; the model's (possibly bf16) weights are written
from it after each update. Kinds (DESIGN.md §2):

- "orthogonal" (square X ∈ O(n)): moments on Ω = skew(XᵀG) in the Lie algebra, step A = −lr·m̂/(√v̂+eps)
  (skew), X ← X·T(A) with T a truncated exponential whose orthogonality defect is ≤ 1e-8 per step
  (fastexp.py). Lookahead moves the slow weights by T(α·ΣA) over the last k steps. Every
  `reorthogonalize_every` steps the weights the next steps build on (the slow ones under Lookahead) are
  re-orthogonalised by Newton–Schulz in float64.
- "stiefel" (tall X, XᵀX = I): moments on the Riemannian gradient G − X·sym(XᵀG), retraction by the polar
  factor (Newton–Schulz; the SVD only when the defect is too large for it).
- "euclidean": NAdam or AdamW with decoupled weight decay; Lookahead by averaging.

State is kept per parameter *name* so that a rank's shard of it (sharded.py) is a subset of the same keys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lipnext_scale.optim.fastexp import (
    gram_minus_identity,
    newton_schulz,
    newton_schulz_iterations,
    polar,
    read_scalars,
    reorthogonalize,
    retraction_orders,
    series_factor,
    skew,
    spectral_bound,
    sym,
)

matrix_norm = torch.linalg.matrix_norm  # Frobenius

KINDS = ("orthogonal", "stiefel", "euclidean")
# Allowance for the orthogonality defect of fp32 matrices (rounding: ~1e-7) in bounds that assume none.
SLACK = 1e-4


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
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("ManifoldOptimizer does not take a closure")
        self.step_count += 1
        pairs = [
            (param, param.grad.float())
            for group in self.param_groups
            for param in group["params"]
            if param.grad is not None and param in self.state
        ]
        self.update_parameters(pairs)
        for param, _ in pairs:
            self.write_back(param)

    def update_parameters(self, pairs: list[tuple[torch.nn.Parameter, torch.Tensor]]) -> None:
        """One step of each parameter's master from its (fp32, already averaged and clipped) gradient.

        Two phases around the step's single host sync: each matrix first does the device work up to the
        scalars its retraction must be planned from (norms of A², of Newton–Schulz defects); they are read
        at once (`read_scalars`), and each matrix then finishes on the device.
        """
        h = self.hyper
        sync = bool(h.lookahead_k) and self.step_count % h.lookahead_k == 0
        reorth = bool(h.reorthogonalize_every) and self.step_count % h.reorthogonalize_every == 0
        jobs = []
        for param, grad in pairs:
            kind = self.kind_of[id(param)]
            lr = self.group_of[id(param)]["lr"]
            jobs.append(getattr(self, f"_prepare_{kind}")(self.state[param], grad, lr, sync, reorth))
        values = read_scalars([s for scalars, _ in jobs for s in scalars])
        pos = 0
        for scalars, finish in jobs:
            finish(None if values is None else values[pos : pos + len(scalars)])
            pos += len(scalars)

    @torch.no_grad()
    def reorthogonalize_masters(self) -> None:
        """Re-orthogonalise every owned manifold master (and its Lookahead slow weights) now, in float64
        (Newton–Schulz), and write the model weights: for the weights a run ends with, which the certificate
        is computed from. Between periodic re-orthogonalisations fp32 rounding accumulates (quickstart: the
        bound 1.000012 twenty steps after one, 1.000005 right after). Once per run: a host read per matrix."""
        for param, state in self.state.items():
            if self.kind_of[id(param)] == "euclidean":
                continue
            for key in ("master", "slow"):
                if key in state:
                    state[key].copy_(reorthogonalize(state[key]))
            self.write_back(param)

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

    @staticmethod
    def _polar(y: torch.Tensor, defect: torch.Tensor, defect_bound: float | None) -> torch.Tensor:
        """Polar factor of float64 `y` (`defect` = yᵀy − I, `defect_bound` ≥ its spectral norm), in fp32."""
        iterations = newton_schulz_iterations(defect_bound)
        if iterations is None:
            return polar(y).float()
        return newton_schulz(y, defect, iterations).float()

    def _prepare_orthogonal(self, state: dict, grad: torch.Tensor, lr: float, sync: bool, reorth: bool):
        h, dt = self.hyper, self.hyper.exp_dtype
        x = state["master"]
        omega = skew(x.t() @ grad)
        step = skew(-lr * self._adam_direction(state, omega))  # skew already; re-skewing removes rounding
        if "step_sum" in state:
            state["step_sum"].add_(step)
        # Held across the host read for every owned matrix, so kept lean: the steps in fp32 (exactly the
        # float64 values) and their squares in float64, one W×W each per factor.
        factors = [step]
        if sync:
            # Lookahead: the fast weights moved by ≈ exp(ΣA) since the last sync; the slow ones go α of
            # that way along the manifold rather than by averaging, which would leave the group.
            factors.append(h.lookahead_alpha * state["step_sum"])
        squares = [a.to(dt) @ a.to(dt) for a in factors]
        scalars = [n for a, a2 in zip(factors, squares) for n in (matrix_norm(a2), matrix_norm(a))]
        # Re-orthogonalisation must reach what the next steps build on. Under Lookahead each sync overwrites
        # the master with the slow weights, so those are re-orthogonalised (a master about to be overwritten
        # is not); the master too when this step is not a sync. Done before this step's products, so the
        # decision shares the step's host read; the result carries one step's fp32 rounding.
        lookahead = "slow" in state
        keys = []
        if reorth:
            keys = ["slow"] if lookahead else []
            keys += [] if lookahead and sync else ["master"]
        defects = {k: gram_minus_identity(state[k].double()) for k in keys}
        scalars += [matrix_norm(d) for d in defects.values()]

        def finish(values: list[float] | None) -> None:
            width, n, bounds = x.shape[-1], len(factors), None
            if values is not None:
                bounds = [spectral_bound(values[2 * i], values[2 * i + 1], width) for i in range(n)]
            plans = retraction_orders(bounds, n)
            for i, k in enumerate(keys):
                bound = None if values is None else values[2 * n + i]
                state[k].copy_(self._polar(state[k].double(), defects[k], bound))
            x.copy_((x.to(dt) @ series_factor(factors[0].to(dt), squares[0], plans[0])).float())
            if sync:
                slow = state["slow"]
                slow.copy_((slow.to(dt) @ series_factor(factors[1].to(dt), squares[1], plans[1])).float())
                x.copy_(slow)
                state["step_sum"].zero_()

        return scalars, finish

    def _prepare_stiefel(self, state: dict, grad: torch.Tensor, lr: float, sync: bool, reorth: bool):
        # Every step ends in a polar factor (of the master, and at syncs of the slow weights), which also
        # removes any drift: no separate re-orthogonalisation.
        alpha = self.hyper.lookahead_alpha
        x = state["master"]
        riemannian = grad - x @ sym(x.t() @ grad)
        direction = -lr * self._adam_direction(state, riemannian)
        direction = direction - x @ sym(x.t() @ direction)
        y = x.double() + direction.double()
        defect = gram_minus_identity(y)
        scalars = [matrix_norm(defect)]
        if sync:
            gap = x - state["slow"]
            scalars.append(matrix_norm(gap.t() @ gap))  # ≥ ‖M_old − S‖₂²

        def finish(values: list[float] | None) -> None:
            x.copy_(self._polar(y, defect, None if values is None else values[0]))
            if not sync:
                return
            slow = state["slow"]
            mixed = slow.double() + alpha * (x.double() - slow.double())
            bound = None
            if values is not None:
                # For S, M with orthonormal columns, (S + α(M − S))ᵀ(…) − I = −α(1−α)(M−S)ᵀ(M−S), and
                # ‖M_new − S‖₂ ≤ ‖M_old − S‖₂ + ‖D‖₂ + ‖YᵀY − I‖₂ (|1−σ| ≤ |1−σ²|), ‖D‖₂² ≤ ‖YᵀY − I‖₂ +
                # the defect of X. SLACK covers the fp32 rounding defects of S, M and X (~1e-7).
                move = math.sqrt(values[1]) + math.sqrt(values[0] + SLACK) + values[0]
                bound = SLACK + alpha * (1 - alpha) * move**2
            slow.copy_(self._polar(mixed, gram_minus_identity(mixed), bound))
            x.copy_(slow)

        return scalars, finish

    def _prepare_euclidean(self, state: dict, grad: torch.Tensor, lr: float, sync: bool, reorth: bool):
        h = self.hyper
        x = state["master"]
        if h.weight_decay:
            x.mul_(1 - lr * h.weight_decay)
        if h.euclidean_method == "adamw":
            x.add_(self._adam_direction(state, grad), alpha=-lr)
        else:
            # NAdam (Dozat): Nesterov look-ahead on the first moment, with constant momentum β1.
            b1, b2 = h.betas
            t = self.step_count
            state["exp_avg"].mul_(b1).add_(grad, alpha=1 - b1)
            state["exp_avg_sq"].mul_(b2).addcmul_(grad, grad, value=1 - b2)
            nesterov = state["exp_avg"] * (b1 / (1 - b1 ** (t + 1))) + grad * ((1 - b1) / (1 - b1**t))
            denom = (state["exp_avg_sq"] / (1 - b2**t)).sqrt_().add_(h.eps)
            x.addcdiv_(nesterov, denom, value=-lr)
        if sync:
            slow = state["slow"]
            slow.add_(x - slow, alpha=h.lookahead_alpha)
            x.copy_(slow)
        return [], lambda values: None

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
