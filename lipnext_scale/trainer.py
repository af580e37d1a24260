"""The training loop: data → forward → loss → backward → sharded manifold step, evaluation, checkpoints.

The same code runs as one process or as N ranks under deepspeed/torchrun; `engine` owns DeepSpeed.
"""

from __future__ import annotations

import dataclasses
import json
import resource
import time
from pathlib import Path

import torch
from tqdm import tqdm

from lipnext_scale import distributed
from lipnext_scale import engine as ds
from lipnext_scale.build import manifold_hyper, named_parameters_with_kinds, resolve_precision
from lipnext_scale.certify import Certifier, StreamedCertifier, certification_counts, format_table, summarize
from lipnext_scale.checkpoint import Checkpointer, RngState, ShardedOptimizerState, tag_for
from lipnext_scale.config import ConfigError, Recipe
from lipnext_scale.console import ConsoleLog, memory_text
from lipnext_scale.data import build_loader, make_digits_shards
from lipnext_scale.flops import flops_per_image, peak_flops
from lipnext_scale.loss import classification_loss, head_pair_distances_from_unit_rows, training_eps
from lipnext_scale.memory_plan import GIB, plan
from lipnext_scale.model.layers import max_orthogonality_defect
from lipnext_scale.optim import lr_schedule
from lipnext_scale.optim.sharded import ShardedManifoldOptimizer
from lipnext_scale.preemption import SCHEDULE_KEYS, Interrupted, StopRequest, recipe_changes
from lipnext_scale.pretrained import build_model, save_pretrained
from lipnext_scale.tracking import WandbLogger, run_info

# The running window of training statistics, one device tensor in this order (Trainer._window).
WINDOW = ("loss_sum", "correct", "certified", "images")


class TooManySkippedSteps(RuntimeError):
    pass


def _step_of_record(line: str) -> float:
    """A metrics line's step (0 when it has none); a line cut short by a crash sorts after every step."""
    try:
        return json.loads(line).get("step", 0)
    except json.JSONDecodeError:
        return float("inf")


class ThroughputMeter:
    """Images/s over all ranks and the share of wall time spent waiting for the next batch, per log window."""

    def __init__(self, world_size: int):
        self.world_size = world_size
        self.since, self.images, self.waited = time.perf_counter(), 0, 0.0

    def timed(self, batches):
        iterator = iter(batches)
        while True:
            start = time.perf_counter()
            try:
                images, labels = next(iterator)
            except StopIteration:
                return
            self.waited += time.perf_counter() - start
            self.images += len(labels)
            yield images, labels

    def read_and_reset(self) -> dict:
        now = time.perf_counter()
        elapsed = max(now - self.since, 1e-9)
        stats = {
            "images_per_s": self.images * self.world_size / elapsed,
            "data_wait_share": self.waited / elapsed,
        }
        self.since, self.images, self.waited = now, 0, 0.0
        return stats


def peak_memory_gib(device: torch.device) -> float:
    """Peak GPU memory allocated by torch, or on CPUs the process's peak resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / GIB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def peak_memory_meaning(device: torch.device) -> str:
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated, largest rank: comparable to the plan"
    return (
        "process peak RSS, largest rank: also holds the interpreter, libraries and the data pipeline, "
        "so on CPUs it exceeds the plan by a constant"
    )


def data_manifests(recipe: Recipe, is_main: bool) -> tuple[Path, Path]:
    d = recipe.data
    if d.source != "digits":
        return Path(d.train_manifest), Path(d.val_manifest)
    root = Path(d.root) if d.root else Path(recipe.run.output_dir) / "data"
    # The digits are always stored at 32×32 (the loader resizes to model.image_size), so that runs of
    # different image sizes can share one copy without rewriting it under each other.
    if is_main:  # one writer; the others reuse the finished shards
        make_digits_shards(root)
    distributed.barrier()
    manifests = make_digits_shards(root)
    return manifests["train"], manifests["test"]


class Trainer:
    def __init__(
        self,
        recipe: Recipe,
        local_rank: int | None = None,
        stop: StopRequest | None = None,
        after_rank_file=None,
    ):
        """`stop`: the signal flag train.py installs (none: the run is stopped only by its end).
        `after_rank_file(step, rank)`: the checkpointer's fault-injection hook, for tests."""
        self.recipe = recipe
        self.dist = ds.setup_distributed(local_rank, timeout_s=recipe.run.collective_timeout_s)
        self.device = self.dist.device
        self.is_main = self.dist.is_main
        self.out = Path(recipe.run.output_dir)
        self.ckpt_dir = self.out / "checkpoints"
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(recipe.train.seed)

        d, t = recipe.data, recipe.train
        micro = t.micro_batch_size or max(1, d.batch_size // self.dist.world_size)
        config = ds.deepspeed_config(
            d.batch_size,
            micro,
            self.dist.world_size,
            self.out / "monitor",
            comms_logger=recipe.run.comms_logger,
            wall_clock_breakdown=recipe.run.wall_clock_breakdown,
        )
        self.accumulation = config["gradient_accumulation_steps"]
        train_manifest, val_manifest = data_manifests(recipe, self.is_main)
        common = dict(
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            backend=d.backend,
            device=self.device.type,
            image_size=recipe.model.image_size,
        )
        self.train_loader = build_loader(
            train_manifest, batch_size=micro, train=True, augment=d.augment, seed=t.seed, **common
        )
        # Evaluation never augments; the name still picks its transform (ImageNet: resize + centre crop).
        self.val_loader = build_loader(
            val_manifest, batch_size=recipe.certify.batch_size, train=False, augment=d.augment, **common
        )

        self.compute_dtype = resolve_precision(t.precision, self.device)
        # The plan is checked against this GPU's memory (80 GiB elsewhere); it also resolves activation
        # checkpointing "auto" to the least recomputation that fits.
        cuda = self.device.type == "cuda"
        gpu_gib = torch.cuda.get_device_properties(self.device).total_memory / GIB if cuda else 80.0
        self.memory_plan = plan(
            recipe, self.dist.world_size, gpu_memory_gib=gpu_gib, micro_batch=micro, dtype=self.compute_dtype
        )
        model = self._build_model(self.memory_plan["activation_checkpointing"])
        self.num_params = sum(p.numel() for p in model.parameters())

        def make_optimizer(_params):
            # Called by DeepSpeed after it has broadcast rank 0's weights: masters start identical everywhere.
            return ShardedManifoldOptimizer(
                named_parameters_with_kinds(model), manifold_hyper(recipe), grad_clip=recipe.optim.grad_clip
            )

        self.engine, self.optimizer = ds.initialize(model, make_optimizer, config)
        self.model = model
        # Updated weights are all-gathered asynchronously; each module waits for its own just before it runs.
        self.optimizer.wait_before_forward(model)
        # Cast after the optimizer has taken its fp32 masters from the fp32 weights.
        for p in self.model.parameters():
            p.data = p.data.to(self.compute_dtype)
        self.flops_per_image = flops_per_image(recipe.model, micro)
        self.peak_flops = peak_flops(self.device, self.compute_dtype)

        self.steps_per_epoch = len(self.train_loader) // self.accumulation
        if self.steps_per_epoch == 0:
            raise ValueError(f"{train_manifest}: too few samples for one step of batch {d.batch_size}")
        self.total_steps = t.epochs * self.steps_per_epoch
        if t.max_steps:
            self.total_steps = min(self.total_steps, t.max_steps)
        self.warmup_steps = int(recipe.optim.warmup_epochs * self.steps_per_epoch)
        self.step = 0
        self._saved: tuple[int, int] | None = None  # (step, evaluated step) of the last checkpoint
        # Running sums since the last log step, on the device: loss·n, correct, certified, images. Read on the
        # host only in step_stats (no synchronisation per micro-batch).
        self._window = torch.zeros(len(WINDOW), dtype=torch.float64, device=self.device)
        self.stop = stop or StopRequest(self.dist.rank)
        self._last_save_time = time.monotonic()
        self._evaluated_step = 0  # the step whose evaluation last finished
        self.checkpointer = Checkpointer(
            self.ckpt_dir,
            self.dist.rank,
            self.dist.world_size,
            keep=recipe.run.keep_checkpoints,
            after_rank_file=after_rank_file,
        )
        if self.dist.world_size > 1:
            self.checkpointer.check_shared()
        self.states = {
            "trainer": self,
            "optimizer": ShardedOptimizerState(self.optimizer),
            "data": self.train_loader,
            "rng": RngState(),
        }
        self.resumed_from = self._resume() if recipe.run.resume else self._fresh("run.resume=false")
        self.metrics_file = self._open_metrics() if self.is_main else None
        self.wandb = None
        if self.is_main:
            info = run_info(recipe.to_dict(), self.dist.world_size)
            (self.out / "run_info.json").write_text(json.dumps(info, indent=1))
            if recipe.run.wandb:
                self.wandb = WandbLogger(self.out, recipe.run.wandb_project, self.out.name, info)
        # Rank 0's console, also in the run directory (the progress bar stays on the terminal).
        mode = "w" if self.resumed_from is None else "a"
        self.console = ConsoleLog(self.out / "console.log", mode) if self.is_main else None
        self._log_optimizer_bytes()
        self._log_memory_plan()
        self._window_since = time.perf_counter()

    def _build_model(self, activation_checkpointing: int):
        """The model on this rank's device. Rank 0 initialises it there (its QRs run on the GPU, not the
        host); the other ranks only allocate: `deepspeed.initialize` broadcasts every parameter of rank 0's
        model (`DeepSpeedEngine._broadcast_model`) before the optimizer takes its masters."""
        if self.dist.rank == 0:
            with torch.device(self.device):
                return build_model(self.recipe, activation_checkpointing)
        with torch.device("meta"):
            model = build_model(self.recipe, activation_checkpointing)
        return model.to_empty(device=self.device)

    # --- one micro-batch; every `accumulation` of them make an optimizer step ---

    def train_micro_batch(self, images: torch.Tensor, labels: torch.Tensor) -> bool:
        """Forward and backward one micro-batch; returns True when it completed an optimizer step."""
        t, o = self.recipe.train, self.recipe.optim
        eps = training_eps(t.eps, t.eps_ramp, self.step / max(1, self.total_steps - 1))
        labels = labels.to(self.device)
        logits = self.engine(images.to(self.device))
        head = self.model.head.normalized_weight().float()
        loss = classification_loss(t.loss, logits, labels, head, eps)
        self.optimizer.note_loss(loss)
        self.engine.backward(loss)
        n = len(labels)
        with torch.no_grad():  # device ops only: the host reads the window at log steps
            self._window[0] += loss.detach().double() * n
            self._window[1] += (logits.argmax(1) == labels).sum()
            self._window[2] += self._certified_at(logits.detach(), labels, head.detach(), eps)
            self._window[3] += n
        boundary = self.engine.is_gradient_accumulation_boundary()
        if boundary:
            self.optimizer.set_lr_factor(
                lr_schedule(self.step, self.warmup_steps, self.total_steps, o.min_lr_ratio)
            )
            self.optimizer.agree_on(self.stop.flags(self._checkpoint_time_due()))
        self.engine.step()
        if not boundary:
            return False
        self.step += 1
        if self.optimizer.consecutive_skips >= t.max_consecutive_skips:
            raise TooManySkippedSteps(
                f"stopping: {self.optimizer.consecutive_skips} optimizer steps in a row had a non-finite "
                f"loss or gradient (skipped on every rank). Last good checkpoint: {self._last_checkpoint()}"
            )
        return True

    def _checkpoint_time_due(self) -> bool:
        """Rank 0's clock decides (the ranks agree on its answer at the step)."""
        minutes = self.recipe.run.checkpoint_minutes
        return minutes > 0 and self.is_main and time.monotonic() - self._last_save_time >= 60 * minutes

    def step_stats(self, eps: float) -> dict:
        """Global (all-rank) loss and accuracy since the last call, plus optimizer scalars, model FLOP/s and,
        on GPUs with a known peak, MFU. Collective: one sum (the window) and one max (orthogonality error,
        peak memory), both on the communication device; the host reads them here and only here."""
        comm = distributed.comm_device()
        totals = distributed.all_reduce_sum(self._window.to(comm)).tolist()
        self._window.zero_()
        maxima = torch.stack([self._orthogonality_defect().to(comm), self._peak_memory_gib_tensor(comm)])
        orthogonality, peak_memory = distributed.all_reduce_max(maxima).tolist()
        loss_sum, correct, certified, count = totals
        now = time.perf_counter()
        flops_per_s = count * self.flops_per_image / max(now - self._window_since, 1e-9)
        self._window_since = now
        stats = {
            "step": self.step,
            "epoch": self.train_loader.epoch + 1,  # the one in progress, counting from 1
            "loss": loss_sum / count,
            "acc": correct / count,
            "train_cert_acc": certified / count,
            "grad_norm": self.optimizer._global_grad_norm,
            "lr": self.optimizer.param_groups[0]["lr"],
            "eps": eps,
            "skipped_steps": self.optimizer.skipped_steps,
            "orthogonality_error": orthogonality,
            "peak_memory_gib": peak_memory,
            "planned_peak_gib": self.memory_plan["peak"] / GIB,
            "model_flops_per_s": flops_per_s,  # all ranks together; definition: lipnext_scale/flops.py
        }
        if self.peak_flops:
            stats["mfu"] = flops_per_s / (self.dist.world_size * self.peak_flops)
        return stats

    @staticmethod
    def _certified_at(
        logits: torch.Tensor, labels: torch.Tensor, head: torch.Tensor, eps: float
    ) -> torch.Tensor:
        """How many training-batch points are correct with margin radius > eps (a device scalar), taking the
        backbone's bound as 1 and the compute-dtype head: a progress signal, not a certificate (evaluation
        certifies with fp32 weights)."""
        distances = head_pair_distances_from_unit_rows(head)[labels]
        margins = logits.gather(1, labels[:, None]) - logits
        radius = (margins / distances).scatter(1, labels[:, None], float("inf")).amin(1)
        return (radius > eps).sum()

    # --- evaluation and outputs ---

    def fp32_state(self) -> dict[str, torch.Tensor]:
        """Every parameter's fp32 master, gathered from its owner (collective)."""
        return self.optimizer.gather_fp32_state()

    @staticmethod
    def fp32_model(recipe: Recipe, state: dict[str, torch.Tensor] | None = None):
        """A model on fp32 weights `state` (views, no copy), or with none its structure only, on the meta
        device (`StreamedCertifier` assigns what it fetches); for evaluation only: no compile, no activation
        checkpointing."""
        eager = dataclasses.replace(recipe.model, compile=False, activation_checkpointing=0)
        with torch.device("meta"):
            model = build_model(dataclasses.replace(recipe, model=eager))
        if state is not None:
            model.load_state_dict(state, assign=True)
        return model

    @staticmethod
    def certified_counts(
        recipe: Recipe, optimizer: ShardedManifoldOptimizer, batches, chunk_batches: int
    ) -> tuple[torch.Tensor, float]:
        """This rank's [correct, certified at each ε…, total] over `batches` and the largest Lipschitz bound
        its certificates used, from the fp32 masters (collective; the dry run calls it too).

        fp32 mode streams the masters block by block from their owners (`certify.StreamedCertifier`):
        no rank holds the full fp32 model, the batches go through `chunk_batches` at a time (the memory
        plan's `evaluation.chunk_batches`). Sound mode gathers every master on every rank (4 bytes per
        parameter) and runs `Certifier`: `SoundCertifier` takes a whole model."""
        eps_list = list(recipe.certify.eps)
        if recipe.certify.mode == "fp32":
            certifier = StreamedCertifier(Trainer.fp32_model(recipe), optimizer.fetch_fp32)
            return certifier.counts(batches, eps_list, chunk_batches), certifier.lipschitz
        model = Trainer.fp32_model(recipe, optimizer.gather_fp32_state())
        share = (distributed.rank(), distributed.world_size(), distributed.sum_over_ranks)
        certifier = Certifier(model, recipe.certify.mode, share=share)
        return certification_counts(certifier, batches, eps_list), certifier.lipschitz

    def _orthogonality_defect(self) -> torch.Tensor:
        """max |XᵀX − I| over the fp32 masters this rank owns, as a float64 scalar on its device: each owner
        measures its own matrices there (2·W³ float64 each), so only the scalar travels."""
        owned = [
            s["master"]
            for p, s in self.optimizer.state.items()
            if self.optimizer.kind_of[id(p)] != "euclidean"
        ]
        return max_orthogonality_defect(owned, self.device)

    def orthogonality_error(self) -> float:
        """max |XᵀX − I| over the fp32 masters of every rank (collective: one all-reduce MAX)."""
        defect = self._orthogonality_defect().to(distributed.comm_device())
        return distributed.all_reduce_max(defect).item()

    def _peak_memory_gib_tensor(self, device: torch.device) -> torch.Tensor:
        return torch.tensor(peak_memory_gib(self.device), dtype=torch.float64, device=device)

    def peak_memory_gib_all_ranks(self) -> float:
        """The largest rank's peak memory (collective: one all-reduce MAX)."""
        peak = self._peak_memory_gib_tensor(distributed.comm_device())
        return distributed.all_reduce_max(peak).item()

    def evaluate(self) -> dict:
        """Clean accuracy and CRA on the validation split, certified with the fp32 masters (collective).

        In fp32 mode the masters are streamed block by block (`certified_counts`): evaluation holds no full
        fp32 copy, and its chunk of batches is sized by the memory plan into the training phases' headroom.
        The Lipschitz bound reported is the largest any rank's certificates used. Certification is eager and
        in `certify.mode` (fp32 or sound) whatever the recipe compiles."""
        eps_list = list(self.recipe.certify.eps)
        mode = self.recipe.certify.mode
        chunk = min(self.memory_plan["evaluation"]["chunk_batches"], max(1, len(self.val_loader)))
        # The smallest over ranks (plans follow each GPU's memory): the per-batch stop agreement and the
        # chunks' fetches then interleave in the same order on every rank.
        chunk = -int(distributed.max_over_ranks(-chunk))
        batches = _Stoppable(self.val_loader, self.stop)
        counts, lipschitz = self.certified_counts(self.recipe, self.optimizer, batches, chunk)
        counts = distributed.all_reduce_sum(counts.to(distributed.comm_device())).cpu()
        result = summarize(counts, eps_list, distributed.max_over_ranks(lipschitz), mode)
        result["orthogonality_error"] = self.orthogonality_error()
        result["num_params"] = self.num_params
        self._window_since = time.perf_counter()  # evaluation time is not training FLOP/s
        return result

    def log(self, record: dict) -> None:
        if self.metrics_file:
            self.metrics_file.write(json.dumps(record) + "\n")
            self.metrics_file.flush()
        if self.wandb and "step" in record:
            flat = {**record, **{f"eval/{k}": v for k, v in record.get("eval", {}).items()}}
            for row in record.get("eval", {}).get("cra", []):
                flat[f"eval/cra@{row['eps']:.4f}"] = row["cra"]
            self.wandb.log(flat, step=record["step"])

    def _log_optimizer_bytes(self) -> None:
        mine = self.optimizer.optimizer_bytes()
        owned = len(self.optimizer.state)
        print(
            f"[rank {self.dist.rank}/{self.dist.world_size}] optimizer state {mine / 2**20:.2f} MiB, "
            f"owns {owned} of {len(self.optimizer.owners)} parameters",
            flush=True,
        )
        mine_t = torch.tensor(mine, dtype=torch.int64, device=distributed.comm_device())
        per_rank = distributed.all_gather(mine_t).tolist()
        self.log({"step": self.step, "optimizer_bytes_per_rank": per_rank})

    def _log_memory_plan(self) -> None:
        """The planner's per-rank figures for this run, logged once, so the measured peak has a reference."""
        p = self.memory_plan
        figures = {
            "peak_gib": p["peak"] / GIB,
            "weights_gib": p["weights"] / GIB,
            "grad_buffer_gib": p["grad_buffer"] / GIB,
            "optimizer_largest_rank_gib": max(p["optimizer_per_rank"]) / GIB,
            "activation_peak_gib": p["activations"]["peak"] / GIB,
            "step_transient_gib": p["step_transient"] / GIB,
            "evaluation_gib": p["evaluation"]["extra"] / GIB,
            "micro_batch": p["micro_batch"],
            "activation_checkpointing": p["activation_checkpointing"],
            "compute_dtype": p["compute_dtype"],
            "measured_as": peak_memory_meaning(self.device),
        }
        self.log({"step": self.step, "memory_plan": figures})
        if self.is_main:
            f = figures
            parts = (
                f"weights {f['weights_gib']:.2f}, fp32 gradient buffer {f['grad_buffer_gib']:.2f}, "
                f"optimizer state {f['optimizer_largest_rank_gib']:.2f}, "
                f"activations {f['activation_peak_gib']:.2f} at micro-batch {f['micro_batch']}, "
                f"or evaluation {f['evaluation_gib']:.2f}"
            )
            print(
                f"memory plan per rank: peak {f['peak_gib']:.2f} GiB ({parts}); "
                f"logged as peak_memory_gib beside it: {f['measured_as']}",
                flush=True,
            )

    # --- checkpoints ---

    @property
    def epoch(self) -> int:
        """Epochs completed: the data stream's count, so that it survives any resume."""
        return self.train_loader.epoch + int(self.train_loader.epoch_complete)

    def state_dict(self) -> dict:
        return {"step": self.step, "evaluated_step": self._evaluated_step}

    def load_state_dict(self, state: dict) -> None:
        self.step, self._evaluated_step = state["step"], state.get("evaluated_step", state["step"])

    def _evaluation_pending(self) -> bool:
        """An epoch (or the run) ended at this step and its evaluation did not finish before the checkpoint:
        a stop during the evaluation, or a checkpoint taken at the epoch's last step and a crash after it."""
        ended = self.train_loader.epoch_complete or self.step >= self.total_steps
        return self.step > 0 and ended and self._evaluated_step != self.step

    def save_checkpoint(self) -> None:
        """Collective. At most one checkpoint per step, and one more once its evaluation has finished."""
        if self._saved == (self.step, self._evaluated_step):
            return
        self._saved = (self.step, self._evaluated_step)
        self.checkpointer.save(self.step, self.states, recipe=self.recipe.to_dict())
        self._last_save_time = time.monotonic()

    def _last_checkpoint(self) -> str:
        """The checkpoint `latest` names (not re-verified: this is for messages)."""
        latest = self.ckpt_dir / "latest"
        return str(self.ckpt_dir / latest.read_text().strip()) if latest.exists() else "none"

    def _fresh(self, why: str) -> None:
        if self.is_main:
            print(f"starting fresh at step 0: {why}", flush=True)

    def _resume(self) -> str | None:
        """Resume from the newest checkpoint that verifies (rank 0 decides for every rank), or start fresh
        and say why. Refuses a recipe that changes the run."""
        tag_dir, manifest, notes = self.checkpointer.find()
        if self.is_main:
            for note in notes:
                if note.startswith("skipped"):
                    print(f"checkpoint {note}; falling back to an older one", flush=True)
        if tag_dir is None:
            self._fresh(f"no complete checkpoint in {self.ckpt_dir} ({'; '.join(notes)})")
            return None
        refused, accepted = recipe_changes(manifest["recipe"], self.recipe.to_dict())
        if refused:
            raise ConfigError(
                f"{tag_dir} was written by a run whose recipe differs in what changes the run: "
                + "; ".join(refused)
                + ". To start a new run, choose another run.output_dir; to start over in this directory "
                "(its checkpoints are replaced as the new run saves), pass run.resume=false"
            )
        skipped = self.checkpointer.load(tag_dir, manifest, self.states)
        if self.is_main:
            print(f"resumed from {tag_dir} at step {self.step} (epoch {self.epoch})", flush=True)
            for line in accepted:
                schedule = line.startswith(SCHEDULE_KEYS)
                print(
                    f"  changed since the checkpoint: {line}"
                    + (f"; the schedule is recomputed for {self.total_steps} steps" if schedule else ""),
                    flush=True,
                )
            if manifest["world_size"] != self.dist.world_size:
                loader, old = self.train_loader, manifest["world_size"]
                print(
                    f"resuming on {self.dist.world_size} ranks from a {old}-rank checkpoint: "
                    + (
                        f"the unread samples of epoch {loader.epoch + 1} are split over the new ranks "
                        f"({loader.batches_in_epoch} batches each, then ordinary epochs); "
                        if not loader.epoch_complete
                        else ""
                    )
                    + f"not carried over: {', '.join(skipped) or 'nothing'}",
                    flush=True,
                )
        return str(tag_dir)

    def _open_metrics(self):
        """A resumed run continues its log from the checkpoint's step (later records, written after the
        checkpoint, are dropped: they are about to be written again); a fresh run starts a new log."""
        path = self.out / "metrics.jsonl"
        if self.resumed_from is None or not path.exists():
            return open(path, "w")
        pending = self._evaluation_pending()  # its record, if one was written, is about to be written again
        kept = [
            line
            for line in path.read_text().splitlines()
            if _step_of_record(line) < self.step
            or (_step_of_record(line) == self.step and not (pending and '"eval"' in line))
        ]
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(path)
        return open(path, "a")

    # --- the loop ---

    def fit(self) -> dict:
        t, run = self.recipe.train, self.recipe.run
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            disable=not self.is_main,
            mininterval=1.0,
        )
        result = None
        meter = ThroughputMeter(self.dist.world_size)
        self._last_save_time = time.monotonic()
        if self._evaluation_pending():
            result = self._evaluate_and_report(f"step {self.step} (its evaluation, left pending)", bar)
        while self.step < self.total_steps:
            for images, labels in meter.timed(self.train_loader):
                if not self.train_micro_batch(images, labels):
                    continue
                bar.update(1)
                if self.step % t.log_every == 0 or self.step == self.total_steps:
                    eps = training_eps(t.eps, t.eps_ramp, (self.step - 1) / max(1, self.total_steps - 1))
                    stats = {**self.step_stats(eps), **meter.read_and_reset()}
                    self.log(stats)
                    ds.write_monitor_events(self.engine, stats, self.step)
                    planned_gib = stats["planned_peak_gib"]
                    bar.set_postfix(
                        loss=f"{stats['loss']:.3f}",
                        acc=f"{stats['acc']:.3f}",
                        cert=f"{stats['train_cert_acc']:.3f}",
                        img_s=f"{stats['images_per_s']:.0f}",
                        wait=f"{stats['data_wait_share']:.0%}",
                        mem=f"{memory_text(stats['peak_memory_gib'])}/plan {memory_text(planned_gib)}",
                    )
                if self.step >= self.total_steps:  # the final weights leave exactly re-orthogonalised
                    self.optimizer.reorthogonalize_masters()
                    self.optimizer.broadcast_weights()
                due = bool(run.checkpoint_every) and self.step % run.checkpoint_every == 0
                stop, timed = self.optimizer.agreed  # raised before the step, agreed by its all-reduce
                if due or timed or stop:
                    self.save_checkpoint()
                if stop:
                    bar.close()
                    raise self._interrupted(str(self.ckpt_dir / tag_for(self.step)))
                if self.step >= self.total_steps:
                    break
            if self.train_loader.epoch_complete:
                done = f"epoch {self.epoch}"
            else:  # max_steps ended inside an epoch
                share = self.train_loader.position / self.train_loader.batches_in_epoch
                done = f"step {self.step} (epoch {self.epoch + 1}, {share:.0%} done)"
            result = self._evaluate_and_report(done, bar)
            meter.read_and_reset()  # evaluation time is not training throughput
        bar.close()
        if result is None:  # resumed after the last step: nothing left to train
            result = self.evaluate()
        measured = self.peak_memory_gib_all_ranks()
        planned = self.memory_plan["peak"] / GIB
        if self.is_main:
            print(
                f"peak memory {measured:.2f} GiB per rank against a plan of {planned:.2f} GiB "
                f"({peak_memory_meaning(self.device)})",
                flush=True,
            )
        return result

    def _evaluate_and_report(self, done: str, bar) -> dict:
        """Evaluate, log and print; a stop agreed during the evaluation checkpoints (the evaluation then
        runs first thing on resume) and raises Interrupted."""
        try:
            result = self.evaluate()
        except _EvaluationStopped:
            if self.engine.micro_steps % self.accumulation == 0:
                self.save_checkpoint()
                where = str(self.ckpt_dir / tag_for(self.step))
            else:  # the epoch ended inside a step, whose gradients no checkpoint holds: the last one stands
                where = self._last_checkpoint()
            bar.close()
            raise self._interrupted(where) from None
        self._evaluated_step = self.step
        self.log({"step": self.step, "epoch": self.epoch, "eval": result})
        if self.is_main:
            bar.write(
                f"{done}: clean {100 * result['clean_acc']:.2f}%  "
                + "  ".join(f"CRA@{r['eps']:.3f} {100 * r['cra']:.2f}%" for r in result["cra"])
            )
        return result

    def _interrupted(self, checkpoint: str) -> Interrupted:
        return Interrupted(self.stop.received or "a signal on another rank", self.step, checkpoint)

    def save(self, result: dict) -> None:
        """Final checkpoint (collective), then rank 0 writes model.safetensors and eval.json."""
        self.save_checkpoint()
        state = self.fp32_state()
        if self.is_main:
            save_pretrained(self.out / "model.safetensors", state, self.recipe)
            tmp = self.out / "eval.json.tmp"
            tmp.write_text(json.dumps(result, indent=2))
            tmp.replace(self.out / "eval.json")
            print(format_table(result))

    def close(self) -> None:
        if self.metrics_file:
            self.metrics_file.close()
        if self.console:
            self.console.close()
        if self.wandb:
            self.wandb.finish()
        ds.shutdown()


class _EvaluationStopped(Exception):
    pass


class _Stoppable:
    """The validation batches, with the ranks agreeing before each one whether a stop signal arrived (one
    all-reduce of two numbers per batch: an evaluation can outlast Slurm's warning before the kill). Every
    rank has the same number of validation batches, so the agreements match across ranks."""

    def __init__(self, batches, stop: StopRequest):
        self.batches, self.stop = batches, stop

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for batch in self.batches:
            if self.stop.agreed(False, distributed.comm_device())[0]:
                raise _EvaluationStopped
            yield batch
