"""The certificate is right: exact on a hand-built model, unbroken by PGD on a trained one, and EMMA is as
documented.

- A LipNeXt whose orthogonal matrices are identities has features = per-channel L2 norms of the centred
  image's patch values, so logits and the certified radius are computable by hand, and a perturbation of
  exactly that radius along the worst direction ties the prediction: the radius is right and tight.
- On the quickstart model trained in `tests/conftest.py`, PGD-L2 never changes a prediction within its
  certified radius (and never moves a logit difference faster than the certificate allows), but does at
  twice the radius.
- EMMA: cross-entropy as ε → 0; competitors raised by min(margin, ε·‖w_y − w_i‖)⁺; the fraction detached.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import lipnext_scale
from lipnext_scale.certify import certified_radius, evaluate, exact_fp32_matmuls, head_pair_distances
from lipnext_scale.data import build_loader, make_digits_shards
from lipnext_scale.loss import emma_loss
from lipnext_scale.model import LipNeXt

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def logits64(model: LipNeXt, images: torch.Tensor) -> torch.Tensor:
    """Logits in float64 from a float64 copy of the fp32 weights (`forward` returns fp32 logits)."""
    m = copy.deepcopy(model).double()
    return m.head(m.features(images.double()))


# ----------------------------------------------------------------------------- a model solvable by hand

IMAGE, PATCH = 8, 2
WIDTH = 3 * PATCH * PATCH  # 12: an isometric stem, every channel is one pixel of the patch
NUM_CLASSES = 5
ROW_SUPPORT = 4  # each head row: ±1 on 4 channels, so its normalised row is exactly ±1/2 there


def identity_model(alpha: float, beta: float, seed: int = 0) -> LipNeXt:
    torch.manual_seed(seed)
    model = LipNeXt(
        depth=2, width=WIDTH, num_classes=NUM_CLASSES, image_size=IMAGE, patch=PATCH, alpha=alpha, beta=beta
    )
    g = torch.Generator().manual_seed(seed)
    rows = torch.zeros(NUM_CLASSES, WIDTH)
    for i in range(NUM_CLASSES):
        support = torch.randperm(WIDTH, generator=g)[:ROW_SUPPORT]
        rows[i, support] = torch.randint(0, 2, (ROW_SUPPORT,), generator=g).float() * 2 - 1
    with torch.no_grad():
        model.embed.weight.copy_(torch.eye(WIDTH))
        for block in model.blocks:
            block.R.copy_(torch.eye(WIDTH))
            block.M.copy_(torch.eye(WIDTH))
            block.bias.zero_()
            block.pos.zero_()
        model.head.weight.copy_(3.0 * rows)  # any positive scale: the head normalises its rows
        model.head.bias.copy_(0.1 * torch.randn(NUM_CLASSES, generator=g))
    return model.eval()


def channel_pixels(images: torch.Tensor) -> list[torch.Tensor]:
    """For stem channel k = c·P² + i·P + j: the centred pixels (c, i::P, j::P) of every patch, flattened."""
    centred = images.double() - 0.5
    return [
        centred[:, c, i::PATCH, j::PATCH].flatten(1)
        for c in range(3)
        for i in range(PATCH)
        for j in range(PATCH)
    ]


def hand_features(images: torch.Tensor) -> torch.Tensor:
    return torch.stack([torch.linalg.vector_norm(v, dim=1) for v in channel_pixels(images)], dim=1)


def hand_radius(model: LipNeXt, images: torch.Tensor):
    """(radius, pred, runner-up j, head rows) computed from the definitions, in float64."""
    rows = model.head.weight.detach().double() / (2.0 * 3.0)  # ‖row‖ = 3·√4 = 6, exactly
    z = hand_features(images) @ rows.t() + model.head.bias.detach().double()
    pred = z.argmax(dim=1)
    best = torch.full((len(images),), float("inf"), dtype=torch.float64)
    runner_up = torch.zeros(len(images), dtype=torch.long)
    for n in range(len(images)):
        for j in range(NUM_CLASSES):
            if j == pred[n]:
                continue
            r = (z[n, pred[n]] - z[n, j]) / torch.linalg.vector_norm(rows[pred[n]] - rows[j])
            if r < best[n]:
                best[n], runner_up[n] = r, j
    return best, pred, runner_up, rows, z


@pytest.mark.parametrize("alpha, beta", [(0.0, 0.0), (1 / 8, 0.5)])
def test_certified_radius_of_a_hand_built_model_is_exact(alpha, beta):
    # With R = M = I, a shift only moves entries within a channel and β-Abs keeps their magnitudes: the pooled
    # per-channel norms are the same for any α, β.
    model = identity_model(alpha, beta)
    assert model.lipschitz_bound() == 1.0  # identity matrices are exactly orthogonal in fp32
    torch.manual_seed(1)
    images = torch.rand(16, 3, IMAGE, IMAGE)
    radius_hand, pred_hand, _, rows, z_hand = hand_radius(model, images)
    assert torch.equal(model.head.normalized_weight().double(), rows)
    z = logits64(model, images)
    assert torch.allclose(z, z_hand, atol=1e-12, rtol=0)
    radius, pred = certified_radius(model, z)
    assert torch.equal(pred, pred_hand)
    assert torch.allclose(radius, radius_hand, atol=1e-9, rtol=0)
    assert (radius > 0).all()
    # From the fp32 forward pass, as `evaluate` does: the same up to fp32 rounding of the logits.
    with torch.no_grad():
        radius32, pred32 = certified_radius(model, model(images))
    assert torch.equal(pred32, pred_hand)
    assert torch.allclose(radius32, radius_hand, atol=1e-5, rtol=0)


@pytest.mark.parametrize("alpha, beta", [(0.0, 0.0), (1 / 8, 0.5)])
def test_certified_radius_is_tight_along_the_worst_direction(alpha, beta):
    """Moving the features by −r·(w_ŷ − w_j)/‖w_ŷ − w_j‖ costs exactly r in pixel space (each feature is the
    norm of its own pixels: shrink those pixels radially) and brings z_ŷ − z_j to exactly 0."""
    model = identity_model(alpha, beta, seed=2)
    torch.manual_seed(3)
    images = torch.rand(32, 3, IMAGE, IMAGE, dtype=torch.float64)
    radius, pred = certified_radius(model, logits64(model, images))
    _, _, runner_up, rows, _ = hand_radius(model, images)
    pixels = channel_pixels(images)
    features = hand_features(images)
    tested = 0
    for n in range(len(images)):
        r, y, j = radius[n].item(), pred[n].item(), runner_up[n].item()
        u = (rows[y] - rows[j]) / torch.linalg.vector_norm(rows[y] - rows[j])
        change = -r * u  # per feature
        if (features[n] + change <= 0).any():
            continue  # a feature would have to go below 0; this image is not usable for the construction
        delta = torch.zeros(3, IMAGE, IMAGE, dtype=torch.float64)
        k = 0
        for c in range(3):
            for i in range(PATCH):
                for jj in range(PATCH):
                    v = pixels[k][n]
                    delta[c, i::PATCH, jj::PATCH] = (change[k] * v / torch.linalg.vector_norm(v)).view(
                        IMAGE // PATCH, IMAGE // PATCH
                    )
                    k += 1
        assert torch.linalg.vector_norm(delta).item() == pytest.approx(r, rel=1e-12)
        for scale, expect_kept in ((1 - 1e-6, True), (1.0, None), (1 + 1e-6, False)):
            z = logits64(model, (images[n] + scale * delta)[None])[0]
            gap = (z[y] - z[j]).item()
            if expect_kept is None:
                assert abs(gap) < 1e-9, gap  # exactly the radius: a tie
            else:
                assert (z.argmax().item() == y) == expect_kept, (n, scale)
        tested += 1
    assert tested >= 8


def test_certified_radius_arguments_and_refusals():
    model = identity_model(0.0, 0.0, seed=4)
    torch.manual_seed(5)
    z = logits64(model, torch.rand(6, 3, IMAGE, IMAGE))
    radius, pred = certified_radius(model, z)
    distances = head_pair_distances(model)
    assert torch.allclose(distances, distances.t(), atol=0)
    assert torch.equal(distances.diagonal(), torch.zeros(NUM_CLASSES, dtype=torch.float64))
    same, _ = certified_radius(model, z, lipschitz=1.0, pair_distances=distances)
    assert torch.equal(same, radius)
    halved, pred2 = certified_radius(model, z, lipschitz=2.0)
    assert torch.allclose(halved, radius / 2, atol=1e-15, rtol=0) and torch.equal(pred2, pred)
    # A tie between the top two logits certifies nothing.
    tied = z.clone()
    top2 = tied[0].topk(2).indices
    tied[0, top2[1]] = tied[0, top2[0]]
    assert certified_radius(model, tied)[0][0].item() == 0.0
    # Never with non-fp32 weights, even when the bound and distances are handed in.
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        with pytest.raises(ValueError, match="fp32"):
            certified_radius(copy.deepcopy(model).to(dtype), z, lipschitz=1.0, pair_distances=distances)


def test_evaluate_counts_certified_accuracy():
    model = identity_model(1 / 8, 0.5, seed=6)
    torch.manual_seed(7)
    images = torch.rand(20, 3, IMAGE, IMAGE)
    radius, pred, *_ = hand_radius(model, images)
    labels = pred.clone()
    labels[:5] = (labels[:5] + 1) % NUM_CLASSES  # 5 wrong
    eps_list = [0.0, radius.median().item(), 10.0]
    batches = [(images[:8], labels[:8]), (images[8:], labels[8:])]
    result = evaluate(model, batches, eps_list)
    assert result["num_samples"] == 20
    assert result["clean_acc"] == pytest.approx(15 / 20)
    hit = pred == labels
    for row, eps in zip(result["cra"], eps_list):
        assert row["eps"] == eps
        assert row["cra"] == pytest.approx((hit & (radius >= eps)).sum().item() / 20)
    assert result["lipschitz_bound"] == 1.0


@pytest.fixture
def reduced_fp32_matmuls():
    """The process asks for TF32 / bf16-pass fp32 matmuls, as fast-training code often does."""
    torch.set_float32_matmul_precision("medium")
    yield
    torch.backends.cuda.matmul.fp32_precision = torch.backends.mkldnn.matmul.fp32_precision = "none"


def test_certificates_refuse_reduced_precision_logits_and_compute_their_own_exactly(reduced_fp32_matmuls):
    model = identity_model(1 / 8, 0.5, seed=8)
    torch.manual_seed(9)
    images = torch.rand(12, 3, IMAGE, IMAGE)
    with pytest.raises(ValueError, match="exact fp32 logits"):
        certified_radius(model, model(images))
    settings_in_forward = []
    hook = model.register_forward_hook(
        lambda *_: settings_in_forward.append(
            (torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision)
        )
    )
    result = evaluate(model, [(images, torch.zeros(12, dtype=torch.long))])
    hook.remove()
    assert settings_in_forward == [("ieee", "ieee")]
    assert torch.get_float32_matmul_precision() == "medium"  # the process's own setting is back
    with exact_fp32_matmuls():
        radius, _ = certified_radius(model, model(images))
    assert result["num_samples"] == 12 and len(radius) == 12


# ----------------------------------------------------------------------------- PGD on a trained model

PGD_POINTS = 32
PGD_STEPS = 40
PGD_RESTARTS = 3  # within the radius; one more run at twice the radius


def pgd_l2(logits_fn, images, pred, eps, steps, seed):
    """Maximise −(z_ŷ − max_{j≠ŷ} z_j) over ‖δ‖₂ ≤ eps (per sample) by normalised-gradient steps projected
    onto the ball, from a random start inside it. Returns (worst δ, its margin, every iterate's ‖δ‖ and z)."""
    g = torch.Generator().manual_seed(seed)
    shape = (-1,) + (1,) * (images.dim() - 1)
    eps = eps.to(images.dtype).view(shape)
    delta = torch.randn(images.shape, generator=g, dtype=images.dtype)
    start_radius = torch.rand(len(images), generator=g, dtype=images.dtype).view(shape)
    delta = delta / torch.linalg.vector_norm(delta.flatten(1), dim=1).view(shape) * eps * start_radius
    worst_margin = torch.full((len(images),), float("inf"), dtype=torch.float64)
    worst_delta = delta.clone()
    seen = []
    for _ in range(steps + 1):
        delta.requires_grad_()
        z = logits_fn(images + delta)
        z_pred = z.gather(1, pred[:, None]).squeeze(1)
        margin = z_pred - z.scatter(1, pred[:, None], float("-inf")).amax(dim=1)
        (grad,) = torch.autograd.grad(margin.sum(), delta)
        with torch.no_grad():
            seen.append((torch.linalg.vector_norm(delta.flatten(1), dim=1).double(), z.detach().double()))
            better = margin.double() < worst_margin
            worst_margin = torch.where(better, margin.double(), worst_margin)
            worst_delta[better] = delta[better]
            step = grad / torch.linalg.vector_norm(grad.flatten(1), dim=1).clamp_min(1e-30).view(shape)
            delta = delta - 2.5 * eps / steps * step
            norm = torch.linalg.vector_norm(delta.flatten(1), dim=1).view(shape)
            delta = delta * (eps / norm).clamp(max=1.0)
    return worst_delta, worst_margin, seen


def test_pgd_never_breaks_a_certificate_but_breaks_twice_the_radius(trained_quickstart):
    run_dir = trained_quickstart
    model = lipnext_scale.load_pretrained(run_dir / "model.safetensors")
    manifest = make_digits_shards(run_dir / "data")["test"]
    images, labels = next(iter(build_loader(manifest, batch_size=PGD_POINTS, train=False, image_size=32)))
    assert images.shape == (PGD_POINTS, 3, 32, 32) and images.dtype == torch.float32
    lipschitz = model.lipschitz_bound()
    assert 1.0 <= lipschitz < 1.001
    with torch.no_grad():
        radius, pred = certified_radius(model, model(images))
    assert (pred == labels).float().mean().item() > 0.5  # a trained model, not a random one
    certified = radius > 0
    assert certified.sum().item() >= PGD_POINTS // 2
    images, pred, radius = images[certified], pred[certified], radius[certified]
    n = len(images)

    # One batched attack in fp32: PGD_RESTARTS runs just inside each radius, one at twice it. Inputs are not
    # clamped to [0, 1]: the certificate holds in all of R^n.
    factors = torch.cat([torch.full((PGD_RESTARTS * n,), 1 - 1e-6), torch.full((n,), 2.0)]).double()
    rep = PGD_RESTARTS + 1
    eps = radius.repeat(rep) * factors
    x, y = images.repeat(rep, 1, 1, 1), pred.repeat(rep)
    worst_delta, worst_margin, seen = pgd_l2(model, x, y, eps, PGD_STEPS, seed=0)

    inside = slice(0, PGD_RESTARTS * n)
    # The ascent did work: the margin dropped a good part of the way towards what the radius allows.
    with torch.no_grad():
        clean = model(x).double()
    clean_margin = clean.gather(1, y[:, None]).squeeze(1) - clean.scatter(1, y[:, None], -1e30).amax(1)
    assert ((clean_margin - worst_margin)[inside] > 0.5 * clean_margin[inside]).float().mean().item() > 0.5

    # Within the radius: the prediction never changed, checked in float64 at the worst point of each run.
    z_worst = logits64(model, x[inside] + worst_delta[inside])
    assert torch.equal(z_worst.argmax(dim=1), y[inside])
    assert (worst_margin[inside] > -1e-4).all()  # fp32 attack logits agree

    # Every iterate, every class pair: z_ŷ − z_j moved by at most L·‖w_ŷ − w_j‖·‖δ‖ (fp32 slack).
    distances = head_pair_distances(model)[y]
    clean_gap = clean.gather(1, y[:, None]) - clean
    for delta_norm, z in seen:
        moved = (clean_gap - (z.gather(1, y[:, None]) - z)).abs()
        allowed = lipschitz * distances * delta_norm[:, None]
        assert (moved <= allowed + 1e-4).all()

    # Twice the radius: the attack breaks points, so the check above has teeth.
    outside = slice(PGD_RESTARTS * n, None)
    z_out = logits64(model, x[outside] + worst_delta[outside])
    broken = (z_out.argmax(dim=1) != y[outside]).sum().item()
    assert broken >= n // 4, f"PGD broke only {broken} of {n} points at twice their radius"


# ----------------------------------------------------------------------------- EMMA


def emma_case(seed: int, batch: int = 32, classes: int = 6, width: int = 9):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, classes, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, classes, (batch,), generator=g)
    raw = torch.randn(classes, width, generator=g, dtype=torch.float64)
    return logits, labels, raw


def unit_rows(raw: torch.Tensor) -> torch.Tensor:
    return raw / torch.linalg.vector_norm(raw, dim=1, keepdim=True)


def explicit_raise(logits, labels, rows, eps, lipschitz=1.0):
    """EMMA's raise of each competitor from its definition: min(margin, ε·L·‖w_y − w_i‖)⁺, 0 for the label."""
    k = lipschitz * torch.linalg.vector_norm(rows[labels][:, None, :] - rows[None, :, :], dim=2)
    margins = logits.gather(1, labels[:, None]) - logits
    raise_by = torch.minimum(margins.clamp_min(0), eps * k)
    return raise_by.scatter(1, labels[:, None], 0.0), k


def test_emma_is_cross_entropy_as_eps_vanishes():
    logits, labels, raw = emma_case(0)
    rows = unit_rows(raw)
    ce = F.cross_entropy(logits, labels)
    for eps in (1e-9, 1e-12):
        assert emma_loss(logits, labels, rows, eps).item() == pytest.approx(ce.item(), abs=1e-8)
    assert emma_loss(logits, labels, rows, 0.0).item() == pytest.approx(ce.item(), abs=1e-15)
    # Even at a tie between the label's logit and another (common with bf16 logits).
    tied = logits.clone()
    tied[0, (labels[0] + 1) % 6] = tied[0, labels[0]]
    assert torch.isfinite(emma_loss(tied, labels, rows, 0.0))
    # And it is not cross-entropy for a real ε.
    assert emma_loss(logits, labels, rows, 0.5).item() > ce.item() + 1e-3


@pytest.mark.parametrize("eps, lipschitz", [(0.1, 1.0), (0.5, 1.0), (2.0, 1.0), (0.5, 1.5)])
def test_emma_raises_competitors_by_at_most_eps_times_head_distance(eps, lipschitz):
    logits, labels, raw = emma_case(1)
    rows = unit_rows(raw)
    raise_by, k = explicit_raise(logits, labels, rows, eps, lipschitz)
    loss = emma_loss(logits, labels, rows, eps, lipschitz)
    assert loss.item() == pytest.approx(F.cross_entropy(logits + raise_by, labels).item(), abs=1e-12)
    assert (raise_by <= eps * k + 1e-15).all()  # at most ε·L·‖w_y − w_i‖
    # A competitor is never pushed past the label's logit, nor raised if it is already above it.
    label_logit = logits.gather(1, labels[:, None]).expand_as(logits)
    below = logits < label_logit
    assert ((logits + raise_by)[below] <= label_logit[below] + 1e-12).all()
    assert (raise_by[~below] == 0).all()
    # Both regimes occur here: saturated (ε·k reached) and proportional (the full margin).
    saturated = (raise_by == eps * k) & (raise_by > 0)
    partial = (raise_by > 0) & ~saturated
    assert saturated.any() and partial.any()
    # Bounds: between plain cross-entropy and raising every competitor by the full ε·L·‖w_y − w_i‖.
    full = (eps * k).scatter(1, labels[:, None], 0.0)
    assert F.cross_entropy(logits, labels).item() < loss.item()
    assert loss.item() <= F.cross_entropy(logits + full, labels).item()


def test_emma_fraction_is_detached():
    """Gradients flow as for cross-entropy at the raised logits with the clipped fraction held constant."""
    logits, labels, raw = emma_case(2)
    eps = 0.5
    z = logits.clone().requires_grad_()
    v = raw.clone().requires_grad_()
    emma_loss(z, labels, unit_rows(v), eps).backward()

    z_ref = logits.clone().requires_grad_()
    v_ref = raw.clone().requires_grad_()
    rows = unit_rows(v_ref)
    raise_by, k = explicit_raise(z_ref.detach(), labels, rows.detach(), eps)
    fraction = (raise_by / (eps * k.clamp_min(1e-300))).detach()  # constant
    k_live = torch.linalg.vector_norm(rows[labels][:, None, :] - rows[None, :, :], dim=2)
    F.cross_entropy(z_ref + (fraction * eps * k_live).scatter(1, labels[:, None], 0.0), labels).backward()
    assert torch.allclose(z.grad, z_ref.grad, atol=1e-12, rtol=0)
    assert torch.allclose(v.grad, v_ref.grad, atol=1e-9, rtol=0)
    assert v.grad.abs().max().item() > 1e-3  # the head distances do carry gradient

    # With respect to the logits: exactly softmax(z + raise) − onehot (averaged), the raise held constant.
    expected = (torch.softmax(logits + raise_by, dim=1) - F.one_hot(labels, 6)) / len(labels)
    assert torch.allclose(z.grad, expected, atol=1e-12, rtol=0)
    # Teeth: had the fraction been differentiated, proportional raises (z_i + margin = z_y) would cancel z_i's
    # gradient; it does not here.
    z_live = logits.clone().requires_grad_()
    margins = z_live.gather(1, labels[:, None]) - z_live
    live = torch.minimum(margins.clamp_min(0), eps * k.detach()).scatter(1, labels[:, None], 0.0)
    F.cross_entropy(z_live + live, labels).backward()
    assert not torch.allclose(z_live.grad, z.grad, atol=1e-6)
