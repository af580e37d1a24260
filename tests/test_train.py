"""The training entry point end to end: outputs of a real quickstart run, the CLI, bf16 masters."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from lipnext_scale import Certifier, certify, evaluate, load_pretrained
from lipnext_scale.config import load_recipe
from lipnext_scale.data import build_loader, make_digits_shards
from lipnext_scale.trainer import Trainer
from tests.conftest import QUICKSTART, REPO


def test_eval_json_reports_accuracy_cra_bound_and_orthogonality(trained_quickstart):
    result = json.loads((trained_quickstart / "eval.json").read_text())
    assert set(result) >= {"clean_acc", "cra", "lipschitz_bound", "orthogonality_error", "num_params"}
    assert [row["eps"] for row in result["cra"]] == pytest.approx([36 / 255, 72 / 255, 108 / 255, 1.0])
    cras = [row["cra"] for row in result["cra"]]
    assert cras == sorted(cras, reverse=True) and cras[0] <= result["clean_acc"]
    assert result["clean_acc"] > 0.8, "12 epochs of the quickstart should learn the digits"
    assert 1.0 <= result["lipschitz_bound"] < 1.001
    assert result["orthogonality_error"] < 1e-5
    assert result["num_samples"] == 297


def test_metrics_log_every_step_record_with_orthogonality_below_1e5(trained_quickstart):
    records = [json.loads(line) for line in (trained_quickstart / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval" in r]
    assert len(evals) == 12
    last = steps[-1]["step"]
    assert [r["step"] for r in steps] == [*range(5, last, 5), last]
    assert all(r["orthogonality_error"] < 1e-5 for r in steps)
    assert all(r["images_per_s"] > 0 and r["skipped_steps"] == 0 for r in steps)
    assert all(0 <= r["data_wait_share"] < 1 for r in steps)
    assert all(0 <= r["train_cert_acc"] <= r["acc"] for r in steps) and steps[-1]["train_cert_acc"] > 0
    (plan,) = [r["memory_plan"] for r in records if "memory_plan" in r]
    assert plan["micro_batch"] == 64 and plan["compute_dtype"] == "float32" and "RSS" in plan["measured_as"]
    static = plan["weights_gib"] + plan["grad_buffer_gib"] + plan["optimizer_largest_rank_gib"]
    assert plan["peak_gib"] >= static + plan["activation_peak_gib"] > static > 0
    assert all(r["planned_peak_gib"] == plan["peak_gib"] for r in steps)
    assert all(r["peak_memory_gib"] > plan["peak_gib"] for r in steps)  # RSS: the plan plus the process
    # Training learns: seen 3.58 at step 5 and 0.26-0.28 over the last three records (2-core CPU, torch 2.13);
    # a quarter leaves 3x room for another torch's rounding, and an untrained or broken run stays near 2.3.
    first, last = steps[0]["loss"], [r["loss"] for r in steps[-3:]]
    assert sum(last) / 3 <= 0.25 * first, (first, last)
    # ... and so does held-out accuracy: 0.42 after the first epoch, about 0.9 after the last.
    assert evals[-1]["eval"]["clean_acc"] >= evals[0]["eval"]["clean_acc"] + 0.3


def test_saved_weights_reload_to_the_same_certificates(trained_quickstart):
    model = load_pretrained(trained_quickstart / "model.safetensors")
    assert not model.training
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    with safe_open(str(trained_quickstart / "model.safetensors"), framework="pt") as f:
        embedded = json.loads(f.metadata()["recipe"])
    assert embedded["model"]["size"] == load_recipe(QUICKSTART).model.size
    test_manifest = make_digits_shards(trained_quickstart / "data")["test"]
    loader = build_loader(test_manifest, batch_size=128, train=False, image_size=32)
    reloaded = evaluate(model, loader)
    saved = json.loads((trained_quickstart / "eval.json").read_text())
    assert reloaded["clean_acc"] == saved["clean_acc"]
    assert [r["cra"] for r in reloaded["cra"]] == [r["cra"] for r in saved["cra"]]
    # The bound is sound for the saved weights as certification applies them (P = fl(M·Rᵀ) formed once per
    # block): at least the product of the exact spectral norms of E, each R and each P (float64 SVD), and it
    # is the one eval.json reports.
    certifier = Certifier(model, "fp32")
    products = model.mixing_products()
    exact = torch.linalg.matrix_norm(model.embed.weight.detach().double(), ord=2).item()
    for block, product in zip(model.blocks, products):
        for w in (block.R, product):
            exact *= torch.linalg.matrix_norm(w.detach().double(), ord=2).item()
    assert exact <= certifier.lipschitz == saved["lipschitz_bound"] < 1.001
    # The certifier's radius against the certificate computed here from its definition: for the predicted
    # class ŷ, min over j ≠ ŷ of (z_ŷ − z_j) / (L·‖w_ŷ − w_j‖), in float64 from the same logits; and
    # eval.json's accuracy and CRA counted again from those radii.
    w = model.head.normalized_weight().detach().double()
    hits, total = torch.zeros(len(saved["cra"]), dtype=torch.long), 0
    correct = 0
    with torch.no_grad():
        for images, labels in loader:
            logits = certifier.logits(images)
            radius, pred = certifier(images)
            z = logits.double()
            assert torch.equal(pred, z.argmax(1))
            margins = z.gather(1, pred[:, None]) - z
            distances = torch.linalg.vector_norm(w[pred][:, None] - w[None], dim=2)  # explicit differences
            ratios = (margins / (saved["lipschitz_bound"] * distances)).scatter(1, pred[:, None], torch.inf)
            expected = ratios.amin(1)
            # The certifier rounds its radius down (outward); it may only be below the definition's value.
            assert torch.all(radius <= expected) and torch.allclose(radius, expected, rtol=1e-9, atol=0)
            hit = pred == labels
            correct += int(hit.sum())
            hits += torch.tensor([int((hit & (radius > row["eps"])).sum()) for row in saved["cra"]])
            total += len(labels)
    assert total == saved["num_samples"] and correct / total == saved["clean_acc"]
    assert [int(h) / total for h in hits] == [r["cra"] for r in saved["cra"]]
    radius, pred = certify(model, images)
    assert radius.shape == pred.shape == (len(images),)


def test_certification_refuses_bf16_weights(trained_quickstart):
    model = load_pretrained(trained_quickstart / "model.safetensors").to(torch.bfloat16)
    with pytest.raises(ValueError, match="fp32"):
        certify(model, torch.zeros(1, 3, 32, 32))


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "lipnext_scale" / "train.py"), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )


def test_cli_runs_a_capped_quickstart_and_writes_its_outputs(tmp_path, trained_quickstart):
    out = tmp_path / "run"
    proc = run_cli(
        str(QUICKSTART),
        "train.max_steps=3",
        f"run.output_dir={out}",
        f"data.root={trained_quickstart / 'data'}",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "clean" in proc.stdout and "Lipschitz bound" in proc.stdout
    assert (out / "model.safetensors").exists() and (out / "eval.json").exists()
    assert len([ln for ln in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in ln]) == 1


def test_cli_rejects_a_bad_override_naming_the_key(tmp_path):
    proc = run_cli(str(QUICKSTART), "model.beta=2", f"run.output_dir={tmp_path}")
    assert proc.returncode == 2
    assert "model.beta" in proc.stderr and "quickstart.yaml" in proc.stderr
    assert not (tmp_path / "metrics.jsonl").exists()


def test_bf16_compute_keeps_fp32_masters_and_saves_fp32(tmp_path, trained_quickstart):
    recipe = load_recipe(
        QUICKSTART,
        [
            "train.precision=bf16",
            "train.max_steps=4",
            "train.log_every=1",
            f"run.output_dir={tmp_path}",
            f"data.root={trained_quickstart / 'data'}",
        ],
    )
    trainer = Trainer(recipe)
    try:
        assert {p.dtype for p in trainer.model.parameters()} == {torch.bfloat16}
        result = trainer.fit()
        trainer.save(result)
    finally:
        trainer.close()
    masters = trainer.fp32_state()
    assert {v.dtype for v in masters.values()} == {torch.float32}
    assert result["orthogonality_error"] < 1e-5
    # The bf16 copies are rounded masters, not independent weights.
    for name, param in trainer.model.named_parameters():
        assert torch.equal(param.data, masters[name].to(torch.bfloat16)), name
    # The saved file holds the masters themselves, bit for bit, not the bf16 copies widened back to fp32.
    saved = load_pretrained(tmp_path / "model.safetensors").state_dict()
    assert saved.keys() == masters.keys()
    for name, master in masters.items():
        assert saved[name].dtype == torch.float32 and torch.equal(saved[name], master), name


def test_run_records_itself_and_logs_to_wandb_offline(tmp_path, digits_root, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    recipe = load_recipe(
        QUICKSTART,
        [
            "train.max_steps=2",
            "train.log_every=1",
            "run.wandb=true",
            f"run.output_dir={tmp_path}",
            f"data.root={digits_root}",
        ],
    )
    trainer = Trainer(recipe)
    try:
        trainer.save(trainer.fit())
    finally:
        trainer.close()
    info = json.loads((tmp_path / "run_info.json").read_text())
    assert info["recipe"]["train"]["max_steps"] == 2
    assert info["versions"]["torch"].startswith("2.") and info["versions"]["deepspeed"]
    assert info["hardware"]["world_size"] == 1 and info["hardware"]["cpus"] >= 1
    assert "commit" in info["git"]
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, "wandb must run offline (no network) by default"
    assert list(runs[0].glob("run-*.wandb"))[0].stat().st_size > 0
