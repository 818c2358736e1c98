"""SNF-style filter pruning: the FLOPs counter against hand counts, widths under a budget,
the filters a criterion keeps, the masked model against the compact one, the federated
phases (search round, shared masks), scenario errors, device files, and one fixed-seed
claim (L1 filters against randomly chosen ones at the same widths)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from server.run_config import ScenarioError, client_view
from simulations.reference import Reference
from simulations.scenarios import load_scenario
from workloads.base import TrainSettings, stack_params
from workloads.device_files import DeviceDataError
from workloads.digits import digits
from workloads.snf import SCORES_KEY, SNFPruning, parse_variant
from workloads.snf.data import augment, fixed_views, generator, split_federation, upsample
from workloads.snf.model import Arch, ResNet, compact, count_macs, flops, mask_names
from workloads.snf.pruning import (
    BudgetError, budget, candidates, filter_scores, fits, floor_widths, keep_filters, uniform_widths,
)

torch.set_num_threads(1)

TINY = ["federation.clients=3", "snf.widths=[4, 8, 8]", "snf.test_size=200", "snf.test_views=1",
        "snf.candidates=3", "snf.proxy_steps=1", "snf.dense_rounds=1", "run.rounds=3", "train.local_steps=2",
        "snf.cuts=[0.5]"]


def tiny(overrides=(), seed=0):
    scenario = load_scenario("snf-pruning", [*TINY, *overrides], seed=seed)
    return scenario, SNFPruning(client_view(scenario))


# ---- FLOPs ------------------------------------------------------------------------------


TOY = Arch(widths=(2, 4), blocks=1, side=4, classes=3)
MARGIN = 0.02  # L1 over the mean of three random filter choices (pilot: +0.054)


def test_flops_match_a_hand_count_of_a_toy_resnet():
    # stem 3x3, 1->2 channels on 4x4: 9*1*2*16 = 288
    # block 0 (2->2, stride 1, 4x4): conv1 9*2*m0*16, conv2 9*m0*2*16
    # block 1 (2->4, stride 2, out 2x2): conv1 9*2*m1*4, conv2 9*m1*4*4, 1x1 projection 2*4*4 = 32
    # head 4*3 = 12
    assert flops(TOY) == 288 + (576 + 576) + (288 + 576 + 32) + 12 == 2348
    assert flops(TOY, [1, 3]) == 288 + (288 + 288) + (216 + 432 + 32) + 12 == 1556
    assert count_macs(ResNet(TOY), torch.zeros(1, 1, 4, 4)) == 2348
    assert count_macs(ResNet(TOY, (1, 3)), torch.zeros(1, 1, 4, 4)) == 1556


def test_the_spec_resnet14_and_every_pruned_shape_count_alike_by_hand_and_by_hooks():
    arch = Arch()
    assert flops(arch) == count_macs(ResNet(arch), torch.zeros(1, 1, 16, 16)) == 6_591_104  # the spec's count
    rng = np.random.default_rng(0)
    for _ in range(3):
        mids = tuple(int(rng.integers(1, w + 1)) for w in arch.block_widths)
        assert flops(arch, mids) == count_macs(ResNet(arch, mids), torch.zeros(1, 1, 16, 16))


# ---- widths under a budget ---------------------------------------------------------------


@pytest.mark.parametrize("cut", [0.5, 0.65])
def test_candidates_fit_the_budget_keep_a_fifth_and_start_with_the_uniform_widths(cut):
    arch = Arch()
    pool = candidates(arch, cut, 0.02, 0.2, 12, np.random.default_rng(1))
    assert np.array_equal(pool[0], uniform_widths(arch, cut, 0.02, 0.2))
    for widths in pool:
        assert flops(arch, widths) <= (1 - cut) * flops(arch)  # exact: the budget is never exceeded
        assert flops(arch, widths) >= budget(arch, cut) - 0.02 * flops(arch)
        assert np.all(widths >= np.ceil(0.2 * np.array(arch.block_widths)))
        assert fits(arch, widths, cut, 0.02, 0.2)
    assert len({tuple(w) for w in pool}) == len(pool)  # distinct configurations
    uniform = pool[0] / np.array(arch.block_widths)
    assert uniform.max() - uniform.min() < 0.1  # one keep ratio, up to rounding


def test_a_cut_below_the_floor_of_min_keep_is_refused():
    arch = Arch()
    assert flops(arch, floor_widths(arch, 0.2)) > 0.2 * flops(arch)  # a 80% cut cannot keep a fifth
    with pytest.raises(BudgetError, match="min_keep = 0.2"):
        uniform_widths(arch, 0.8, 0.02, 0.2)


# ---- the criterion and the masked model ---------------------------------------------------


def test_l1_keeps_the_filters_with_the_largest_l1_norms():
    rng = np.random.default_rng(2)
    weight = rng.standard_normal((10, 3, 3, 3))
    weight[[2, 7, 9]] *= 5
    mask = keep_filters(filter_scores("l1", weight, np.ones(10)), 3)
    assert np.flatnonzero(mask).tolist() == [2, 7, 9]
    norms = np.abs(weight).reshape(10, -1).sum(1)
    mask5 = keep_filters(filter_scores("l1", weight, np.ones(10)), 5)
    assert norms[mask5 > 0].min() >= norms[mask5 == 0].max()
    assert keep_filters(filter_scores("bn-scale", weight, np.arange(10.0) - 4.5), 2).tolist() == \
        [1, 0, 0, 0, 0, 0, 0, 0, 0, 1]  # |gamma| largest at both ends
    with pytest.raises(ValueError, match="unknown criterion 'hrank'"):
        filter_scores("hrank", weight, np.ones(10))


def test_the_masked_dense_model_computes_what_the_compact_model_computes():
    torch.manual_seed(0)
    model = ResNet(Arch(widths=(4, 8, 8)))
    model.train()
    with torch.no_grad():  # non-trivial BN statistics and a nonzero BN shift on masked channels
        model(torch.randn(64, 1, 16, 16))
        for block in model.blocks:
            block.bn1.bias.uniform_(-1, 1)
            block.mask.copy_((torch.rand(len(block.mask)) < 0.5).float())
            block.mask[0] = 1.0
    model.eval()
    small = compact(model)
    assert [b.conv1.out_channels for b in small.blocks] == [int(b.mask.sum()) for b in model.blocks]
    x = torch.randn(5, 1, 16, 16)
    with torch.no_grad():
        assert torch.allclose(model(x), small(x), atol=1e-5)
    assert count_macs(small, x) == flops(model.arch, [int(b.mask.sum()) for b in model.blocks])


# ---- data -----------------------------------------------------------------------------------


def test_hard_digits_are_distorted_seeded_and_the_split_is_disjoint():
    images, _ = digits()
    x = upsample(images[:8])
    assert x.shape == (8, 1, 16, 16)
    a, b = augment(x, generator(0, 1)), augment(x, generator(0, 1))
    assert torch.equal(a, b) and not torch.equal(a, augment(x, generator(0, 2)))
    assert (a - x).abs().mean() > 0.1  # distorted, not a copy
    assert torch.equal(fixed_views(images[:4], 2, 5), fixed_views(images[:4], 2, 5))
    split = split_federation(0, 5, 0.5, 300, 0.2)
    every = np.concatenate([split.test, *split.train, *split.val])
    assert len(every) == len(np.unique(every)) == len(images)
    assert all(len(v) >= 1 and len(t) >= 1 for v, t in zip(split.val, split.train))


# ---- the workload through the scenario's constructor ------------------------------------------


@pytest.mark.parametrize("override, field, message", [
    ("snf.methods=['dense', 'pruned']", "snf.methods", "unknown method 'pruned'"),
    ("snf.cuts=[1.2]", "snf.cuts", r"number in \(0, 1\)"),
    ("snf.cuts=[0.85]", "snf.cuts", "min_keep = 0.2"),
    ("run.strategies=['ifca']", "run.strategies", "only fedavg and fedprox"),
    ("run.rounds=2", "run.rounds", "snf.dense_rounds \\+ 2 = 3"),
    ("snf.proxy='magic'", "snf.proxy", "magic"),
    ("snf.min_keep=0.0", "snf.min_keep", r"\(0, 1\]"),
    ("federation.clients=400", "federation.clients", "cannot each hold"),
])
def test_bad_settings_name_the_field(override, field, message):
    with pytest.raises(ScenarioError, match=rf"{field}: .*{message}"):
        load_scenario("snf-pruning", [*TINY, override])


def test_arms_are_dense_and_every_method_at_every_cut():
    _, workload = tiny(["snf.cuts=[0.5, 0.65]"])
    assert workload.variants() == ("dense", "uniform@0.5", "uniform@0.65", "random@0.5", "random@0.65",
                                   "searched@0.5", "searched@0.65")
    assert parse_variant("searched@0.65") == ("searched", 0.65)
    with pytest.raises(ValueError, match="unknown SNF arm"):
        parse_variant("uniform")


@pytest.mark.slow
def test_the_phases_search_then_prune_with_masks_shared_by_every_client():
    """Round 1 dense, round 2 the search (weights unchanged, clients' scores averaged),
    round 3 pruned to the best-scored candidate (L1 filters of the global model), the masks
    identical in every client's reply and in the aggregate."""
    scenario, workload = tiny()
    ref = Reference(scenario)
    seen = {}
    rows = ref.run("fedavg", variant="searched@0.5", on_row=lambda r: seen.setdefault(r["round"], r))
    final = {n: v[0] for n, v in rows[-1]["models"].items()}
    reference = workload.initial_parameters()
    assert {n: v.shape for n, v in final.items()} == {n: v.shape for n, v in reference.items()}
    scores = final[SCORES_KEY]
    assert scores.shape == (3,) and 0 < scores.max() <= 1  # mean validation accuracies
    widths = workload.widths_of(final)
    assert np.array_equal(widths, workload.pool(0.5)[int(np.argmax(scores))])
    assert flops(workload.arch, widths) <= 0.5 * workload.dense_flops
    assert widths.min() >= 1 and np.all(widths >= np.ceil(0.2 * np.array(workload.arch.block_widths)))
    for name in mask_names(workload.arch):
        assert set(np.unique(final[name])) <= {0.0, 1.0}
    i = int(np.argmin(widths / np.array(workload.arch.block_widths)))
    off = final[f"blocks.{i}.mask"] < 0.5
    assert np.all(final[f"blocks.{i}.conv1.weight"][off] == 0)
    assert [rows[r]["flops_cut"] for r in (1, 2)] == [0.0, 0.0] and rows[3]["flops_cut"] >= 0.5
    # every client's reply in the pruning round carries the same masks: a cohort by hand
    data = ref.cohorts[0]
    dense = {**reference, SCORES_KEY: scores}
    cohort = workload.with_state(data, {"arm": np.frombuffer(b"searched@0.5", np.uint8)})
    trained = workload.local_train(stack_params(dense, len(cohort.client_ids)), cohort,
                                   TrainSettings(local_steps=1, lr=1e-3, server_round=3))
    for name in mask_names(workload.arch):
        assert np.all(trained[name] == trained[name][:1])
    assert np.array_equal(workload.widths_of({n: v[0] for n, v in trained.items()}), widths)


@pytest.mark.slow
def test_uniform_random_and_dense_arms_prune_to_their_widths():
    """Every unsearched arm ends at its widths; the opt-in ``random-wide`` arm draws from the
    spec's wider space (a layer may keep a tenth), not the search space's draw."""
    scenario, workload = tiny(["snf.cuts=[0.65]", "snf.methods=['dense', 'uniform', 'random', 'random-wide']"])
    assert workload.variants() == ("dense", "uniform@0.65", "random@0.65", "random-wide@0.65")
    wide = workload.random_arm_widths(0.65, wide=True)
    dense_widths = np.array(workload.arch.block_widths)
    assert not np.array_equal(wide, workload.random_arm_widths(0.65))
    assert np.all(wide >= np.ceil(0.1 * dense_widths)) and flops(workload.arch, wide) <= 0.35 * workload.dense_flops
    ref = Reference(scenario)
    for variant, expected in (("uniform@0.65", uniform_widths(workload.arch, 0.65, 0.02, 0.2)),
                              ("random@0.65", workload.random_arm_widths(0.65)),
                              ("random-wide@0.65", wide),
                              ("dense", dense_widths)):
        rows = ref.run("fedavg", variant=variant)
        final = {n: v[0] for n, v in rows[-1]["models"].items()}
        assert np.array_equal(workload.widths_of(final), expected), variant
        assert np.all(final[SCORES_KEY] == 0)  # only the searched arms score
        assert rows[-1]["final"]["widths"] == expected.tolist()
        assert rows[-1]["final"]["tradeoff"]["x"] == pytest.approx(flops(workload.arch, expected) / 1e6)


def test_device_files_read_back_as_the_simulated_clients_and_bad_ones_are_named(tmp_path):
    _, workload = tiny()
    data = workload.client_data(np.arange(3))
    paths = []
    for cid, arrays in workload.device_files(data):
        paths.append(tmp_path / f"client-{cid}.npz")
        np.savez(paths[-1], **arrays)
    back = workload.read_device_files(paths)
    for field in ("client_ids", "images", "targets", "starts", "val_images", "val_targets", "val_starts"):
        assert np.array_equal(getattr(back, field), getattr(data, field)), field
    arrays = dict(np.load(paths[0]))
    bad = tmp_path / "bad.npz"
    np.savez(bad, **{**arrays, "validation": np.zeros_like(arrays["validation"])})
    with pytest.raises(DeviceDataError, match=rf"{bad}: 'validation' must mark at least one"):
        workload.read_device_files([bad])
    np.savez(bad, **{**arrays, "images": arrays["images"][:, :, :4]})
    with pytest.raises(DeviceDataError, match="expected \\(n, 1, 8, 8\\)"):
        workload.read_device_files([bad])


# ---- a fixed-seed claim ---------------------------------------------------------------------


@pytest.mark.slow
def test_l1_filters_beat_randomly_chosen_filters_at_the_uniform_widths_before_fine_tuning():
    """Seed 0: a half-width ResNet-14 trained centrally for 6 epochs on the hard digits,
    pruned to the uniform widths of a 65% cut by L1 and by three random filter choices, BN
    reset, no fine-tuning. Pilot: L1 45.5%, random 47.3 / 30.3 / 42.8% (mean 40.1): one
    random draw beat L1, so the claim is on the mean, with under half the pilot's lead."""
    scenario, workload = tiny(["federation.clients=1", "snf.widths=[8, 16, 32]", "snf.test_views=2",
                               "snf.cuts=[0.65]"])
    data = workload.client_data(np.array([0]))
    torch.manual_seed(0)
    model = ResNet(workload.arch)
    x, y = upsample(data.images), torch.from_numpy(data.targets)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=5e-4)
    g = generator(0, 99)
    for _ in range(6):
        model.train()
        for idx in torch.randperm(len(y), generator=g).split(32):
            loss = F.cross_entropy(model(augment(x[idx], g)), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    params = {n: t.detach().numpy().copy() for n, t in model.state_dict().items()}
    params[SCORES_KEY] = np.zeros(3, np.float32)
    widths = uniform_widths(workload.arch, 0.65, 0.02, 0.2)
    images, targets = workload._test

    def pruned_accuracy(criterion: str, seed: int) -> float:
        workload.options["criterion"], workload.seed = criterion, seed  # seed: the random choice's stream
        pruned = workload.prune(params, widths)
        net = workload._load({n: v for n, v in pruned.items() if n != SCORES_KEY}, ResNet(workload.arch))
        workload.bn_reset(net, data, 0, (0, 0))
        with torch.no_grad():
            return float((net(images).argmax(1) == targets).double().mean())

    l1 = pruned_accuracy("l1", 0)
    random = [pruned_accuracy("random", s) for s in (100, 101, 102)]
    print(l1, random)
    assert l1 > np.mean(random) + MARGIN
