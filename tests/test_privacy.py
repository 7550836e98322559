"""DP-SGD clipping and noise, client-level DP, and accounting against dp-accounting."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from dp_accounting import NeighboringRelation, dp_event, pld, rdp

from fedmpi.config import from_mapping
from fedmpi.models import FlatModel, LastStep, LSTMLayer, TokenEmbedding, build_model
from fedmpi.privacy import accounting, client_level, dpsgd
from fedmpi.schema import ModelConfig
from fedmpi.training import LocalTrainer

torch.set_num_threads(1)

MODELS = [(ModelConfig(name="logreg"), (9,)), (ModelConfig(name="mlp", hidden=[16, 8]), (1, 8, 8)),
          (ModelConfig(name="cnn"), (2, 12, 12))]


def _loop_reference(model, x, y, clip):
    """Per-example gradients one at a time, float64, clipped and summed."""
    total = None
    for i in range(len(y)):
        model.zero_grad()
        F.cross_entropy(model(x[i:i + 1]), y[i:i + 1], reduction="sum").backward()
        g = torch.cat([p.grad.reshape(-1) for _, p in model.named_parameters()])
        g = g * min(1.0, clip / float(g.norm()))
        total = g if total is None else total + g
    return total


@pytest.mark.parametrize("model_cfg, shape", MODELS, ids=[m[0].name for m in MODELS])
@pytest.mark.parametrize("clip", [0.05, 1.0, 1e6])
def test_clipped_grad_sum_matches_per_example_loop_in_float64(model_cfg, shape, clip):
    torch.manual_seed(0)
    model = build_model(model_cfg, shape, 5).double()
    x = torch.randn(7, *shape, dtype=torch.float64) * 3
    y = torch.randint(0, 5, (7,))
    ours = dpsgd.clipped_grad_sum(model, F.cross_entropy, x, y, clip)
    ref = _loop_reference(model, x, y, clip)
    assert ours.dtype == torch.float64 and ours.shape == ref.shape
    assert float((ours - ref).abs().max()) <= 1e-10 * max(1.0, float(ref.abs().max()))
    # no hooks are left behind on the user's model
    assert all(not m._forward_hooks for m in model.modules())


def test_layer_that_mixes_examples_is_refused():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    with pytest.raises(ValueError, match="2 is a BatchNorm1d, which mixes the examples of a batch"):
        dpsgd.PerExampleGradients(model)
    with pytest.raises(ValueError, match="batch_first=False"):
        dpsgd.PerExampleGradients(torch.nn.Sequential(torch.nn.LSTM(3, 4)))


class _MixedConv(torch.nn.Module):
    """Ghost-norm layers (Conv2d, Linear) beside generic ones (GroupNorm, a grouped
    Conv2d), and a Linear called twice per forward pass (which takes the generic path)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 4, 3, padding=1)
        self.norm = torch.nn.GroupNorm(2, 4)
        self.grouped = torch.nn.Conv2d(4, 4, 3, groups=2)
        self.shared = torch.nn.Linear(16, 16)
        self.out = torch.nn.Linear(16, 3)

    def forward(self, x):
        h = self.grouped(torch.relu(self.norm(self.conv(x)))).flatten(1)
        return self.out(torch.tanh(self.shared(torch.tanh(self.shared(h)))))


def _char_model():
    return torch.nn.Sequential(TokenEmbedding(11, 4), LSTMLayer(4, 6), LSTMLayer(6, 5), LastStep(), torch.nn.Linear(5, 11))


MIXED = {"char_lstm": (_char_model, lambda g: torch.randint(0, 11, (9, 7), dtype=torch.uint8, generator=g), 11),
         "conv_norm_shared": (_MixedConv, lambda g: torch.randn(8, 2, 4, 4, generator=g) * 3, 3)}


@pytest.mark.parametrize("name", sorted(MIXED))
def test_generic_and_ghost_paths_together_match_a_float64_loop(name):
    """Per layer, ghost norm or torch.func vmap: the clipped sum equals a per-example loop
    in float64 (to 1e-10 when run in float64, to float32 rounding when run in float32),
    with some examples clipped and some not."""
    make, inputs, classes = MIXED[name]
    torch.manual_seed(0)
    model = make()
    plan = {p.name: p.path for p in dpsgd.per_example_plan(model)}
    assert "ghost" in plan.values() and "vmap" in plan.values()
    g = torch.Generator().manual_seed(1)
    x, y = inputs(g), torch.randint(0, classes, (len(inputs(torch.Generator().manual_seed(1))),), generator=g)
    reference64 = model.double()
    x64 = x if not x.is_floating_point() else x.double()
    norms = []
    for i in range(len(y)):
        reference64.zero_grad()
        F.cross_entropy(reference64(x64[i:i + 1]), y[i:i + 1], reduction="sum").backward()
        norms.append(float(torch.cat([p.grad.reshape(-1) for p in reference64.parameters()]).norm()))
    clip = float(np.median(norms))
    assert min(norms) < clip < max(norms)
    ref = _loop_reference(reference64, x64, y, clip)
    ours64 = dpsgd.clipped_grad_sum(reference64, F.cross_entropy, x64, y, clip)
    assert float((ours64 - ref).abs().max()) <= 1e-10 * max(1.0, float(ref.abs().max()))
    ours32 = dpsgd.clipped_grad_sum(model.float(), F.cross_entropy, x if not x.is_floating_point() else x.float(), y, clip)
    assert ours32.dtype == torch.float32
    assert float((ours32.double() - ref).abs().max()) <= 2e-6 * max(1.0, float(ref.abs().max()))
    assert all(not m._forward_hooks for m in model.modules())


def test_plan_chooses_per_layer_and_says_so_in_one_line():
    plan = dpsgd.per_example_plan(_MixedConv())
    assert [(p.name, p.path) for p in plan] == [("conv", "ghost"), ("norm", "vmap"), ("grouped", "vmap"),
                                                ("shared", "ghost"), ("out", "ghost")]
    assert dpsgd.describe_plan(plan) == ("ghost norm for 3 layers (conv: Conv2d, shared: Linear, out: Linear); "
                                         "torch.func vmap for 2 layers (norm: GroupNorm, grouped: Conv2d)")


class _HalfUsed(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.used, self.unused = torch.nn.Linear(3, 2), torch.nn.Embedding(4, 2)

    def forward(self, x):
        return self.used(x)


def test_parameters_the_forward_pass_does_not_reach_get_zero():
    model = _HalfUsed()
    out = [torch.full_like(p, 7.0) for p in model.parameters()]
    dpsgd.PerExampleGradients(model).compute(torch.randn(4, 3), torch.tensor([0, 1, 1, 0]), F.cross_entropy, 1.0, out)
    assert torch.count_nonzero(out[-1]) == 0 and torch.count_nonzero(out[0]) > 0


def _dp_trainer(sigma, clip, **train):
    cfg = from_mapping({"train": {"lr": 1.0, "batch_size": 10, **train},
                     "privacy": {"mode": "sample", "noise_multiplier": sigma, "max_grad_norm": clip}})
    module = build_model(ModelConfig(name="mlp", hidden=[100]), (50,), 10)
    return cfg, LocalTrainer(FlatModel(module), cfg)


def test_dp_sgd_noise_has_std_sigma_c():
    """With a clip norm so small that the clipped sum is ~0, one DP-SGD step of
    lr 1 moves the weights by noise / (q n): its std must be sigma C / (q n)."""
    sigma, clip = 2.0e9, 1e-9  # sigma C = 2
    cfg, trainer = _dp_trainer(sigma, clip, batch_size=10)
    x = np.random.default_rng(0).normal(size=(10, 50)).astype(np.float32)
    y = np.arange(10) % 10
    w0 = np.zeros(trainer.model.size, np.float32)
    out = np.empty_like(w0)
    result = trainer.train(w0, x, y, 0, 3, out)
    q, steps = accounting.dp_schedule(10, 10, 1)
    assert steps == 1 and result.steps == 1 and q == 1.0
    observed = float(np.std(out.astype(np.float64))) * (q * 10)
    assert observed == pytest.approx(sigma * clip, rel=0.02)
    assert abs(float(out.astype(np.float64).mean())) < 0.05 * observed / 10
    assert result.clipped_fraction == 1.0


def test_dp_sgd_is_keyed_and_poisson_batches_vary():
    cfg, trainer = _dp_trainer(1.0, 1.0, batch_size=8)
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(40, 50)).astype(np.float32), rng.integers(0, 10, 40)
    w0 = np.zeros(trainer.model.size, np.float32)
    a, b, c = (np.empty_like(w0) for _ in range(3))
    ra = trainer.train(w0, x, y, 2, 7, a)
    trainer.train(w0, x, y, 2, 7, b)
    trainer.train(w0, x, y, 2, 8, c)
    assert a.tobytes() == b.tobytes() and a.tobytes() != c.tobytes()
    assert ra.steps == 5  # round(40 / 8) Poisson batches


def test_client_update_clipping():
    u = np.array([3.0, 4.0], dtype=np.float32)
    assert client_level.clip_update(u, 1.0) and np.allclose(u, [0.6, 0.8])
    v = np.array([0.3, 0.4], dtype=np.float32)
    assert not client_level.clip_update(v, 1.0) and np.allclose(v, [0.3, 0.4])


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_epsilon_equals_a_direct_library_call(accountant):
    ours = accounting.epsilon(1.1, 0.02, 500, 1e-5, accountant)
    acc = rdp.RdpAccountant() if accountant == "rdp" else pld.PLDAccountant()  # the library's default orders
    acc.compose(dp_event.PoissonSampledDpEvent(0.02, dp_event.GaussianDpEvent(1.1)), 500)
    assert ours == acc.get_epsilon(1e-5)


def test_rdp_orders_are_the_librarys_default_grid():
    from dp_accounting.rdp.rdp_privacy_accountant import DEFAULT_RDP_ORDERS

    assert list(accounting.RDP_ORDERS) == list(DEFAULT_RDP_ORDERS)


@pytest.mark.parametrize("q, sigma, steps, expected", [(0.001, 0.5, 1000, 4.38), (0.001, 0.8, 10, 1.03)])
def test_rdp_epsilon_is_what_opacus_and_dp_accounting_report(q, sigma, steps, expected):
    # Both libraries give these (issue 13); the integer orders 2..256 gave 4.96 and 1.21.
    assert accounting.epsilon(sigma, q, steps, 1e-5) == pytest.approx(expected, abs=0.005)
    assert accounting.epsilon(sigma, q, steps, 1e-5, "rdp", accounting.BRACKET_ORDERS) > 1.13 * expected


@pytest.mark.parametrize("steps", [1, 7, 180, 181, 5000])
def test_cached_per_step_rdp_equals_fresh_compositions(steps):
    # the per-step vector is computed once per event; every step count matches a fresh accountant bit for bit
    for event, ours in (
        (dp_event.PoissonSampledDpEvent(0.11, dp_event.GaussianDpEvent(1.0)), accounting.epsilon(1.0, 0.11, steps, 1e-5)),
        (dp_event.SampledWithoutReplacementDpEvent(40, 10, dp_event.GaussianDpEvent(0.4)),
         accounting.epsilon_without_replacement(0.8, 40, 10, steps, 1e-5)),
        (dp_event.GaussianDpEvent(1.5), accounting.epsilon_local(3.0, steps, 1e-5)),
    ):
        relation = (NeighboringRelation.ADD_OR_REMOVE_ONE if isinstance(event, dp_event.PoissonSampledDpEvent)
                    else NeighboringRelation.REPLACE_ONE)
        acc = rdp.RdpAccountant(neighboring_relation=relation)
        acc.compose(event, steps)
        assert ours == acc.get_epsilon(1e-5)


def test_epsilon_grows_with_steps_and_shrinks_with_noise():
    steps = [1, 10, 100, 1000]
    eps = [accounting.epsilon(1.0, 0.05, s, 1e-5) for s in steps]
    assert all(a < b for a, b in zip(eps, eps[1:]))
    assert accounting.epsilon(2.0, 0.05, 100, 1e-5) < accounting.epsilon(1.0, 0.05, 100, 1e-5)
    assert accounting.epsilon(1.0, 0.05, 0, 1e-5) == 0.0


@pytest.mark.parametrize("target, q, steps, accountant", [(1.0, 0.01, 1000, "rdp"), (8.0, 0.1, 180, "rdp"),
                                                          (3.0, 0.05, 50, "pld")])
def test_target_mode_lands_within_one_percent(target, q, steps, accountant):
    sigma = accounting.calibrate_noise(target, q, steps, 1e-5, accountant)
    eps = accounting.epsilon(sigma, q, steps, 1e-5, accountant)
    assert eps <= target and eps == pytest.approx(target, rel=0.01)


def test_calibrate_refuses_non_positive_target():
    with pytest.raises(ValueError, match="target epsilon must be > 0"):
        accounting.calibrate_noise(0.0, 0.1, 10, 1e-5)


def test_run_accountant_central_poisson_equals_epsilon():
    cfg = from_mapping({"clients": {"total": 100, "per_round": 10, "sampling": "poisson"},
                     "privacy": {"mode": "client_central", "noise_multiplier": 1.0, "accountant": "rdp"}})
    acc = accounting.RunAccountant(cfg)
    for _ in range(3):
        eps, med = acc.after_round(np.array([1, 5, 9]), np.array([10, 10, 10]))
    assert eps == med == accounting.epsilon(1.0, 0.1, 3, 1e-5, "rdp")


def test_run_accountant_sample_level_is_per_client():
    cfg = from_mapping({"clients": {"total": 4, "per_round": 2}, "train": {"batch_size": 10},
                     "privacy": {"mode": "sample", "noise_multiplier": 1.0, "accountant": "rdp"}})
    acc = accounting.RunAccountant(cfg)
    acc.after_round(np.array([0, 1]), np.array([100, 50]))
    eps, med = acc.after_round(np.array([0, 2]), np.array([100, 20]))
    # client 0: q = 0.1, 2 x 10 steps; client 1: q = 0.2, 5 steps; client 2: q = 0.5, 2 steps; client 3: none
    expected = [accounting.epsilon(1.0, 0.1, 20, 1e-5), accounting.epsilon(1.0, 0.2, 5, 1e-5),
                accounting.epsilon(1.0, 0.5, 2, 1e-5), 0.0]
    np.testing.assert_allclose(acc.eps, expected)
    assert eps == max(expected) and med == np.median(expected)


def test_final_report_stays_with_rdp_when_there_is_almost_no_noise():
    cfg = from_mapping({"clients": {"total": 4, "per_round": 4},
                     "privacy": {"mode": "client_local", "noise_multiplier": 0.01, "accountant": "pld"}})
    acc = accounting.RunAccountant(cfg)
    acc.after_round(np.arange(4), np.full(4, 10))
    eps, med, used = acc.final()
    assert used == "rdp" and eps > accounting.PLD_MAX_EPSILON and eps == med


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_target_epsilon_holds_for_the_client_that_spends_most_not_only_the_smallest(accountant):
    """Clients of 44 and 46 examples, batches of 10: the smaller samples at q = 10/44 for
    4 steps an epoch, the larger at 10/46 for 5, and spends more. The calibrated noise
    keeps every client at or below the target, the larger one within the tolerance of it.
    Each client's epsilon comes from dp-accounting directly, Poisson-subsampled Gaussian."""
    cfg = from_mapping({"rounds": 10, "clients": {"total": 20, "per_round": 20}, "train": {"batch_size": 10},
                        "privacy": {"mode": "sample", "target_epsilon": 1.0, "accountant": accountant}})
    sigma = accounting.calibrate_for_run(cfg, np.array([44] * 10 + [46] * 10))
    spent = {}
    for n, steps in ((44, 4), (46, 5)):
        event = dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(10 / n, dp_event.GaussianDpEvent(sigma)),
                                             10 * steps)
        acc = rdp.RdpAccountant() if accountant == "rdp" else pld.PLDAccountant()
        spent[n] = acc.compose(event).get_epsilon(1e-5)
    assert spent[46] > spent[44]
    assert spent[46] <= 1.0 + 1e-6 and spent[46] >= 1.0 - 2e-3, spent
