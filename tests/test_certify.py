"""The certificate is right: exact on a hand-built model, unbroken by PGD on a trained one, and EMMA is as
documented.

- A LipNeXt whose orthogonal matrices are identities has features = per-channel L2 norms of the centred
  image's patch values, so logits and the certified radius are computable by hand, and a perturbation of
  exactly that radius along the worst direction ties the prediction: the radius is right and tight.
- On the quickstart model trained in `tests/conftest.py`, PGD-L2 never changes a prediction within its
  certified radius (and never moves a logit difference faster than the certificate allows), but does at
  twice the radius.
- Rounding: on the hand-built model, whose radii are exactly tight, the float32 rounding search breaks
  fp32-mode certificates and never a sound one; on the trained model it breaks no sound certificate.
- The API: `certify(model, images)` computes its own logits (eager, P formed once, exact fp32 matmuls),
  refuses autocast and non-fp32 weights; radius > ε (not ≥) counts as certified.
- EMMA: cross-entropy as ε → 0; competitors raised by min(margin, ε·‖w_y − w_i‖)⁺; the fraction detached.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import lipnext_scale
from lipnext_scale.audit import audit, rounding_search
from lipnext_scale.certify import (
    Certifier,
    certification_counts,
    certified_radius,
    certify,
    evaluate,
    exact_fp32_matmuls,
    fp32_forward,
    head_pair_distances,
    radius_from_logits,
)
from lipnext_scale.data import build_loader, make_digits_shards
from lipnext_scale.loss import emma_loss
from lipnext_scale.model import LipNeXt
from tests.conftest import QUICKSTART

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
    lipschitz = model.lipschitz_bound()
    # Identity matrices are exactly orthogonal; what is left is the outward rounding of the bound itself.
    assert 1.0 < lipschitz < 1 + 1e-12
    torch.manual_seed(1)
    images = torch.rand(16, 3, IMAGE, IMAGE)
    radius_hand, pred_hand, _, rows, z_hand = hand_radius(model, images)
    assert torch.equal(model.head.normalized_weight().double(), rows)
    z = logits64(model, images)
    assert torch.allclose(z, z_hand, atol=1e-12, rtol=0)
    radius, pred = radius_from_logits(z, lipschitz, head_pair_distances(model))
    assert torch.equal(pred, pred_hand)
    assert torch.allclose(radius, radius_hand, atol=1e-9, rtol=0)
    assert (radius > 0).all()
    # From the fp32 forward pass (fp32 mode): the same up to fp32 rounding of the logits.
    radius32, pred32 = certify(model, images)
    assert torch.equal(pred32, pred_hand)
    assert torch.allclose(radius32, radius_hand, atol=1e-5, rtol=0)
    # Sound mode: never above the exact radius, and below it only by the rounding bound.
    radius64, pred64 = certify(model, images, mode="sound")
    assert torch.equal(pred64, pred_hand)
    assert (radius64 <= radius_hand * (1 + 1e-12)).all()
    assert (radius64 >= radius_hand * (1 - 1e-9)).all()


@pytest.mark.parametrize("alpha, beta", [(0.0, 0.0), (1 / 8, 0.5)])
def test_certified_radius_is_tight_along_the_worst_direction(alpha, beta):
    """Moving the features by −r·(w_ŷ − w_j)/‖w_ŷ − w_j‖ costs exactly r in pixel space (each feature is the
    norm of its own pixels: shrink those pixels radially) and brings z_ŷ − z_j to exactly 0."""
    model = identity_model(alpha, beta, seed=2)
    torch.manual_seed(3)
    images = torch.rand(32, 3, IMAGE, IMAGE, dtype=torch.float64)
    radius, pred = radius_from_logits(
        logits64(model, images), model.lipschitz_bound(), head_pair_distances(model)
    )
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


def test_certify_arguments_and_refusals():
    model = identity_model(0.0, 0.0, seed=4)
    torch.manual_seed(5)
    images = torch.rand(6, 3, IMAGE, IMAGE)
    radius, pred = certify(model, images)
    distances = head_pair_distances(model)
    assert (distances.diagonal() < 1e-200).all()  # 0 plus the bound's underflow allowance
    assert torch.allclose(distances, distances.t(), rtol=1e-15, atol=0)
    z = Certifier(model).logits(images)
    same, _ = radius_from_logits(z, Certifier(model).lipschitz, distances)
    assert torch.equal(same, radius)
    halved, pred2 = radius_from_logits(z, 2.0 * Certifier(model).lipschitz, distances)
    assert torch.allclose(halved, radius / 2, rtol=1e-14, atol=0) and torch.equal(pred2, pred)
    # A tie between the top two logits certifies nothing.
    tied = z.clone()
    top2 = tied[0].topk(2).indices
    tied[0, top2[1]] = tied[0, top2[0]]
    assert radius_from_logits(tied, 1.0, distances)[0][0].item() == 0.0
    # Never with non-fp32 weights; never inside autocast; never from bare logits.
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        with pytest.raises(ValueError, match="fp32"):
            certify(copy.deepcopy(model).to(dtype), images)
    for mode in ("fp32", "sound"):
        with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(ValueError, match="autocast"):
            certify(model, images, mode=mode)
    certifier = Certifier(model)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(ValueError, match="autocast"):
        certifier(images)
    with pytest.raises(TypeError, match=r"certify\(model, images"):
        certified_radius(model, z)
    with pytest.raises(ValueError, match="mode"):
        Certifier(model, "fp16")


def test_fp32_forward_is_the_model_forward_with_p_formed_once(trained_quickstart):
    """The certified fp32 logits are those of `LipNeXt.forward` up to fp32 rounding (same ops, P once), and
    the bound is computed from the very P applied: ‖E‖·Π‖R‖‖P‖ covers the exact norms of those matrices."""
    model = lipnext_scale.load_pretrained(trained_quickstart / "model.safetensors")
    certifier = Certifier(model)
    torch.manual_seed(0)
    images = torch.rand(8, 3, 32, 32)
    with torch.no_grad():
        # Bit for bit while the block forms M·Rᵀ itself; a block that applies R and M separately rounds
        # differently, by fp32 rounding only.
        certified = fp32_forward(model, images, certifier.products)
        assert torch.allclose(certified, model(images), rtol=1e-5, atol=1e-5)
    for block, p in zip(model.blocks, certifier.products):
        assert p.dtype == torch.float32 and torch.equal(p, block.M.detach() @ block.R.detach().t())
    exact = math.prod(
        torch.linalg.matrix_norm(m.detach().double(), ord=2).item()
        for _, m in model.lipschitz_factors(certifier.products)
    )
    assert exact <= certifier.lipschitz < exact * (1 + 1e-5)


def test_recipe_certify_mode_is_validated():
    from lipnext_scale.config import ConfigError, load_recipe

    assert load_recipe(QUICKSTART, ["certify.mode=sound"]).certify.mode == "sound"
    assert load_recipe(QUICKSTART).certify.mode == "fp32"
    with pytest.raises(ConfigError, match="'certify.mode' is 'fp16'; allowed: one of fp32, sound"):
        load_recipe(QUICKSTART, ["certify.mode=fp16"])


def test_certified_means_radius_strictly_above_eps():
    """At ‖δ‖ = r there can be an exact tie, so a point whose radius equals ε is not certified at ε."""
    model = identity_model(1 / 8, 0.5, seed=10)
    torch.manual_seed(11)
    images = torch.rand(12, 3, IMAGE, IMAGE)
    certifier = Certifier(model)
    radius, pred = certifier(images)
    eps = radius[3].item()
    counts = certification_counts(certifier, [(images, pred)], [eps])
    assert counts.tolist() == [12, int((radius > eps).sum()), 12]
    assert int((radius > eps).sum()) < int((radius >= eps).sum())


@pytest.fixture
def reduced_fp32_matmuls():
    """The process asks for TF32 / bf16-pass fp32 matmuls, as fast-training code often does."""
    torch.set_float32_matmul_precision("medium")
    yield
    torch.backends.cuda.matmul.fp32_precision = torch.backends.mkldnn.matmul.fp32_precision = "none"


def test_certificates_compute_their_own_logits_exactly_under_reduced_precision(reduced_fp32_matmuls):
    model = identity_model(1 / 8, 0.5, seed=8)
    torch.manual_seed(9)
    images = torch.rand(12, 3, IMAGE, IMAGE)
    settings_in_forward = []
    hook = model.head.register_forward_hook(
        lambda *_: settings_in_forward.append(
            (torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision)
        )
    )
    result = evaluate(model, [(images, torch.zeros(12, dtype=torch.long))])
    radius, _ = certify(model, images)
    hook.remove()
    assert settings_in_forward == [("ieee", "ieee")] * 2
    assert torch.get_float32_matmul_precision() == "medium"  # the process's own setting is back
    with exact_fp32_matmuls():
        again, _ = certify(model, images)
    assert result["num_samples"] == 12 and torch.equal(radius, again)


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
    certifier = Certifier(model)
    lipschitz = certifier.lipschitz
    assert 1.0 <= lipschitz < 1 + 1e-4
    radius, pred = certifier(images)
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


# ----------------------------------------------------------------------------- rounding


def worst_directions(model: LipNeXt, images: torch.Tensor, radius: torch.Tensor) -> tuple[torch.Tensor, list]:
    """The exact worst perturbation of each image of the hand-built model (see the tightness test), or 0."""
    _, pred, runner_up, rows, _ = hand_radius(model, images)
    pixels, features = channel_pixels(images), hand_features(images)
    out, usable = torch.zeros(images.shape, dtype=torch.float64), []
    for n in range(len(images)):
        y, j = pred[n].item(), runner_up[n].item()
        change = -radius[n].item() * (rows[y] - rows[j]) / torch.linalg.vector_norm(rows[y] - rows[j])
        if (features[n] + change <= 0).any():
            continue
        k = 0
        for c in range(3):
            for i in range(PATCH):
                for jj in range(PATCH):
                    v = pixels[k][n]
                    out[n, c, i::PATCH, jj::PATCH] = (change[k] * v / torch.linalg.vector_norm(v)).view(
                        IMAGE // PATCH, IMAGE // PATCH
                    )
                    k += 1
        usable.append(n)
    return out, usable


def test_rounding_search_breaks_tight_fp32_certificates_but_never_sound_ones():
    """The hand-built model's radii are exactly tight, so along the worst direction the last float32 point
    of the certified ball sits on the decision boundary up to rounding: the fp32 classifier flips there for
    some points (fp32-mode certificates do not cover rounding), the float64 classifier never does inside
    its sound radius."""
    model = identity_model(1 / 8, 0.5, seed=2)
    torch.manual_seed(3)
    images = torch.rand(24, 3, IMAGE, IMAGE)
    broken = {}
    for mode in ("fp32", "sound"):
        certifier = Certifier(model, mode)
        radius, pred = certifier(images)
        directions, usable = worst_directions(model, images, radius)
        assert len(usable) >= 8

        def predict(batch, certifier=certifier):
            return certifier.logits(batch).argmax(dim=1)

        found = rounding_search(predict, images[usable], pred[usable], radius[usable], directions[usable])
        for v in found:  # each claimed violation re-checked from its example
            n = usable[v["index"]]
            x_adv = v.pop("example")[None]
            assert x_adv.dtype == torch.float32
            assert torch.linalg.vector_norm(x_adv.double() - images[n].double()).item() < radius[n].item()
            assert predict(x_adv).item() != pred[n].item()
        broken[mode] = len(found)
    assert broken["sound"] == 0
    assert broken["fp32"] >= 2, broken  # the search has teeth


def test_rounding_bound_covers_the_measured_error_of_an_fp32_forward():
    """The a-priori analysis run for binary32 (u = 2⁻²⁴) must bound the actual difference between the fp32
    and the float64 evaluation (float64 is 2²⁹× more precise: a near-exact reference) — at x and at points
    of the ball ‖x'' − x‖ ≤ r, with the bound computed at x. A dropped or mis-propagated term shows."""
    from lipnext_scale.sound import SoundCertifier

    torch.manual_seed(12)
    model = LipNeXt(depth=3, width=64, num_classes=10, image_size=16, patch=4).eval()
    with torch.no_grad():
        for block in model.blocks:  # every term in play: positional terms and biases not zero
            block.pos.normal_(0, 0.5)
            block.bias.normal_(0, 0.5)
        model.head.bias.normal_(0, 1.0)
    x = torch.rand(16, 3, 16, 16)
    s32, s64 = SoundCertifier(model, dtype=torch.float32), SoundCertifier(model)
    r = 2.0
    z32, e32 = s32.logits_and_error(x)
    delta = torch.randn_like(x)
    delta = 0.999 * r * delta / torch.linalg.vector_norm(delta.flatten(1), dim=1).view(-1, 1, 1, 1)
    for points in (x, x + delta):
        step = torch.linalg.vector_norm((points - x).flatten(1).double(), dim=1)
        assert (step <= r).all()
        z32_at, _ = s32.logits_and_error(points)
        z64_at, e64 = s64.logits_and_error(points)
        actual = (z32_at.double() - z64_at).abs()
        allowed = (e32.c0 + e32.c1 * r)[:, None] + s32.bias_term
        allowed = allowed + (e64.c0 + e64.c1 * r)[:, None] + s64.bias_term
        assert (actual <= allowed).all()
        # Worst-case bounds (γ_n grows like n, typical rounding like √n): loose, but not vacuous.
        assert actual.max() > 0 and (allowed / actual.clamp_min(1e-30)).min() < 1e6
    assert (e32.c0 > 0).all() and e32.c1 > 0


def test_sound_radius_is_the_margin_reduced_by_the_error_bound():
    """r* satisfies m̂_j − 2(e_ŷ(r*) + e_j(r*)) ≥ L·d_ŷj·r* for every j (the definition), with equality for
    the worst j up to rounding. Run with the binary32 analysis, whose errors are large enough to show."""
    from lipnext_scale.sound import SoundCertifier

    torch.manual_seed(13)
    model = LipNeXt(depth=2, width=64, num_classes=10, image_size=16, patch=4).eval()
    x = torch.rand(16, 3, 16, 16)
    sound = SoundCertifier(model, dtype=torch.float32)
    z, e = sound.logits_and_error(x)
    radius, pred = sound(x)
    z = z.double()
    alpha = e.c0[:, None] + sound.bias_term[None, :]
    margins = z.gather(1, pred[:, None]) - z
    reduced = margins - 2 * (alpha.gather(1, pred[:, None]) + alpha) - 4 * e.c1 * radius[:, None]
    allowed = sound.lipschitz * sound.distances[pred] * radius[:, None]
    others = torch.ones_like(z, dtype=torch.bool).scatter(1, pred[:, None], False)
    positive = radius > 0  # (radius 0: the reduced margin is ≤ 0 for some j, nothing certified)
    assert positive.sum() >= 8
    check = others & positive[:, None]
    assert (reduced[check] >= allowed[check] * (1 - 1e-12)).all()
    slack = (reduced - allowed).masked_fill(~others, math.inf).min(dim=1).values
    assert (slack[positive].abs() <= 1e-9 * margins.abs().max()).all()  # the worst pair is tight
    plain = (margins / (sound.lipschitz * sound.distances[pred])).masked_fill(~others, math.inf).min(1).values
    assert (radius[positive] < plain[positive] * (1 - 1e-6)).all()  # the reduction is real


def test_sound_certificates_survive_the_audit_on_a_trained_model(trained_quickstart):
    model = lipnext_scale.load_pretrained(trained_quickstart / "model.safetensors")
    manifest = make_digits_shards(trained_quickstart / "data")["test"]
    images, labels = next(iter(build_loader(manifest, batch_size=8, train=False, image_size=32)))
    certifier = Certifier(model, "sound")
    radius, pred = certifier(images)
    fp32_radius, fp32_pred = certify(model, images)
    assert torch.equal(pred, fp32_pred)
    assert torch.allclose(radius, fp32_radius, rtol=1e-4, atol=0)  # rounding costs little here
    keep = radius > 0
    assert keep.sum() >= 6
    report = audit(certifier, images[keep], radius[keep], steps=20, restarts=1, apgd=False, rounding_tries=32)
    assert report["mode"] == "sound" and "rounding_search" in report["attacks"]
    assert report["violations"] == []
    for ratio in report["min_margin_ratio"].values():
        assert 0 < ratio < 1  # the attacks made progress and never crossed


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
