"""The training loop: data → forward → loss → backward → manifold step, with evaluation and logging."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from lipnext_scale.certify import evaluate, format_table
from lipnext_scale.config import Recipe
from lipnext_scale.data import build_loader, make_digits_shards
from lipnext_scale.loss import classification_loss, training_eps
from lipnext_scale.model.layers import orthogonality_error
from lipnext_scale.optim import ManifoldHyper, ManifoldOptimizer, lr_schedule, parameter_kind
from lipnext_scale.pretrained import build_model, save_pretrained


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    if precision == "auto":
        # bf16 matmuls are fast on GPUs; on CPUs they are emulated and slower than fp32.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[precision]


def data_manifests(recipe: Recipe) -> tuple[Path, Path]:
    d = recipe.data
    if d.source == "digits":
        root = Path(d.root) if d.root else Path(recipe.run.output_dir) / "data"
        manifests = make_digits_shards(root, image_size=recipe.model.image_size)
        return manifests["train"], manifests["test"]
    return Path(d.train_manifest), Path(d.val_manifest)


def named_parameters_with_kinds(model) -> list[tuple[str, torch.nn.Parameter, str]]:
    manifold = {id(p) for _, p in model.orthogonal_parameters()}
    return [(n, p, parameter_kind(p, id(p) in manifold)) for n, p in model.named_parameters()]


def build_optimizer(model, recipe: Recipe) -> ManifoldOptimizer:
    o = recipe.optim
    hyper = ManifoldHyper(
        lr=o.lr,
        euclidean_lr=o.euclidean_lr,
        betas=o.betas,
        eps=o.eps,
        weight_decay=o.weight_decay,
        euclidean_method=o.euclidean,
        lookahead_k=o.lookahead_k,
        lookahead_alpha=o.lookahead_alpha,
        reorthogonalize_every=o.reorthogonalize_every,
    )
    return ManifoldOptimizer(named_parameters_with_kinds(model), hyper)


class Trainer:
    def __init__(self, recipe: Recipe, device: torch.device | None = None):
        self.recipe = recipe
        self.device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.out = Path(recipe.run.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(recipe.train.seed)

        train_manifest, val_manifest = data_manifests(recipe)
        d, t = recipe.data, recipe.train
        self.train_loader = build_loader(
            train_manifest,
            batch_size=d.batch_size,
            train=True,
            image_size=recipe.model.image_size,
            augment=d.augment,
            seed=t.seed,
            backend=d.backend,
            device=self.device.type,
        )
        self.val_loader = build_loader(
            val_manifest,
            batch_size=recipe.certify.batch_size,
            train=False,
            image_size=recipe.model.image_size,
            backend=d.backend,
            device=self.device.type,
        )

        self.model = build_model(recipe).to(self.device)
        self.num_params = sum(p.numel() for p in self.model.parameters())
        self.optimizer = build_optimizer(self.model, recipe)
        # Cast after the optimizer has taken its fp32 masters from the fp32 weights.
        self.compute_dtype = resolve_precision(t.precision, self.device)
        for p in self.model.parameters():
            p.data = p.data.to(self.compute_dtype)

        self.steps_per_epoch = len(self.train_loader)
        self.total_steps = t.epochs * self.steps_per_epoch
        if t.max_steps:
            self.total_steps = min(self.total_steps, t.max_steps)
        self.warmup_steps = int(recipe.optim.warmup_epochs * self.steps_per_epoch)
        self.step = 0
        self.skipped_steps = 0
        self.metrics_file = open(self.out / "metrics.jsonl", "a")

    # --- one step ---

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> dict:
        t, o = self.recipe.train, self.recipe.optim
        lr_factor = lr_schedule(self.step, self.warmup_steps, self.total_steps, o.min_lr_ratio)
        self.optimizer.set_lr_factor(lr_factor)
        eps = training_eps(t.eps, t.eps_ramp, self.step / max(1, self.total_steps - 1))
        logits = self.model(images.to(self.device))
        labels = labels.to(self.device)
        head = self.model.head.normalized_weight().float()
        loss = classification_loss(t.loss, logits, labels, head, eps)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), o.grad_clip or math.inf)
        finite = bool(torch.isfinite(loss)) and bool(torch.isfinite(grad_norm))
        if finite:
            self.optimizer.step()
        else:
            self.skipped_steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return {
            "loss": loss.item(),
            "acc": (logits.argmax(1) == labels).float().mean().item(),
            "grad_norm": grad_norm.item(),
            "lr": self.optimizer.param_groups[0]["lr"],
            "eps": eps,
        }

    # --- evaluation and outputs ---

    def fp32_state(self) -> dict[str, torch.Tensor]:
        """The fp32 masters as a state dict (the truth; the model may hold bf16 copies)."""
        masters = {s["name"]: s["master"] for s in self.optimizer.state.values()}
        return {name: masters[name] for name, _ in self.model.named_parameters()}

    def fp32_model(self):
        if self.compute_dtype == torch.float32:
            return self.model
        if not hasattr(self, "_eval_model"):
            with torch.device("meta"):
                self._eval_model = build_model(self.recipe)
        self._eval_model.load_state_dict({k: v.clone() for k, v in self.fp32_state().items()}, assign=True)
        return self._eval_model

    def orthogonality_error(self) -> float:
        masters = [self.optimizer.state[p]["master"] for _, p in self.model.orthogonal_parameters()]
        return orthogonality_error(masters)

    def evaluate(self) -> dict:
        model = self.fp32_model()
        result = evaluate(model, self.val_loader, self.recipe.certify.eps)
        result["orthogonality_error"] = self.orthogonality_error()
        result["num_params"] = self.num_params
        return result

    def log(self, record: dict) -> None:
        self.metrics_file.write(json.dumps(record) + "\n")
        self.metrics_file.flush()

    # --- the loop ---

    def fit(self) -> dict:
        t = self.recipe.train
        bar = tqdm(total=self.total_steps, desc="train", unit="step", dynamic_ncols=True)
        result = None
        epoch = 0
        while self.step < self.total_steps:
            epoch += 1
            tick, seen = time.perf_counter(), 0
            for images, labels in self.train_loader:
                stats = self.train_step(images, labels)
                seen += len(labels)
                bar.update(1)
                if self.step % t.log_every == 0 or self.step == self.total_steps:
                    stats.update(
                        step=self.step,
                        epoch=epoch,
                        images_per_s=seen / (time.perf_counter() - tick),
                        orthogonality_error=self.orthogonality_error(),
                        skipped_steps=self.skipped_steps,
                    )
                    self.log(stats)
                    bar.set_postfix(
                        loss=f"{stats['loss']:.3f}",
                        acc=f"{stats['acc']:.3f}",
                        img_s=f"{stats['images_per_s']:.0f}",
                    )
                if self.step >= self.total_steps:
                    break
            result = self.evaluate()
            self.log({"step": self.step, "epoch": epoch, "eval": result})
            bar.write(
                f"epoch {epoch}: clean {100 * result['clean_acc']:.2f}%  "
                + "  ".join(f"CRA@{r['eps']:.3f} {100 * r['cra']:.2f}%" for r in result["cra"])
            )
        bar.close()
        return result

    def save(self, result: dict) -> None:
        save_pretrained(self.out / "model.safetensors", self.fp32_state(), self.recipe)
        tmp = self.out / "eval.json.tmp"
        tmp.write_text(json.dumps(result, indent=2))
        tmp.replace(self.out / "eval.json")
        print(format_table(result))

    def close(self) -> None:
        self.metrics_file.close()
