"""Models, the flat parameter view, local training and server optimizers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedmpi import aggregation
from fedmpi.architectures import count_params
from fedmpi.config import from_mapping
from fedmpi.models import FlatModel, LSTMLayer, MaxPool2dSame, build_model, flatten_params, init_weights, layout, load_flat
from fedmpi.optimizers import ServerOptimizer
from fedmpi.schema import ModelConfig, ServerConfig
from fedmpi.training import LocalTrainer

torch.set_num_threads(1)


def test_mcmahan_cnn_parameter_count():
    model = build_model(ModelConfig(name="cnn"), (1, 28, 28), 10)
    assert sum(p.numel() for p in model.parameters()) == 1_663_370  # as published by McMahan et al. 2017


@pytest.mark.parametrize("cfg, shape", [(ModelConfig(name="cnn"), (3, 12, 10)), (ModelConfig(hidden=[7, 5]), (1, 8, 8)),
                                        (ModelConfig(name="logreg"), (60,)), (ModelConfig(name="cifar_cnn"), (3, 13, 10)),
                                        (ModelConfig(name="char_lstm"), (80,))])
def test_parameter_count_without_building_the_model(cfg, shape):
    assert count_params(cfg, shape, 7) == sum(p.numel() for p in build_model(cfg, shape, 7).parameters())


def test_cifar_and_shakespeare_model_sizes():
    """McMahan et al. 2017 give "about 10^6" parameters for the CIFAR CNN on its 24x24
    crops: (5*5*3+1)*64 + (5*5*64+1)*64 + (6*6*64+1)*384 + 385*192 + 193*10 = 1,068,298.
    The character LSTM: 81*8 + 4*256*(8+256+2) + 4*256*(256+256+2) + 257*81 = 820,185."""
    cifar = ModelConfig(name="cifar_cnn")
    assert count_params(cifar, (3, 24, 24), 10) == 1_068_298
    assert count_params(cifar, (3, 32, 32), 10) == 1_756_426  # full images: 8*8*64 inputs to the 384 units
    assert count_params(ModelConfig(name="char_lstm"), (80,), 81) == 820_185


def test_lstm_layers_equal_torch_two_layer_lstm_and_their_vmap_forward_agrees():
    """Two LSTMLayers are torch's nn.LSTM(num_layers=2); per_example_forward (the explicit
    recurrence DP-SGD's generic path differentiates) gives the same outputs and gradients."""
    torch.manual_seed(0)
    reference = torch.nn.LSTM(5, 7, num_layers=2, batch_first=True).double()
    first, second = LSTMLayer(5, 7).double(), LSTMLayer(7, 7).double()
    with torch.no_grad():
        for layer, k in ((first, 0), (second, 1)):
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(layer, f"{name}_l0").copy_(getattr(reference, f"{name}_l{k}"))
    x = torch.randn(3, 6, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 6, 7, dtype=torch.float64)
    expected = reference(x)[0]
    for run in (lambda v: second(first(v)), lambda v: second.per_example_forward(first.per_example_forward(v))):
        out = run(x)
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
        grads = torch.autograd.grad((out * weight).sum(), [x, first.weight_hh_l0, second.bias_ih_l0])
        want = torch.autograd.grad((expected * weight).sum(), [x, reference.weight_hh_l0, reference.bias_ih_l1],
                                   retain_graph=True)
        for got, ref in zip(grads, want):
            torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)


def test_same_max_pooling_pads_after_like_tensorflow():
    """TensorFlow SAME, 3x3 stride 2 on 4 columns: 2 outputs, one padding column after:
    windows [0, 3) and [2, 5)."""
    x = torch.tensor([[[[1.0, 5.0, 2.0, 7.0]]]]).expand(1, 1, 3, 4)
    out = MaxPool2dSame(3, 2)(x)
    assert out.shape == (1, 1, 2, 2) and out[0, 0, 0].tolist() == [5.0, 7.0]
    assert MaxPool2dSame(3, 2)(torch.zeros(1, 2, 5, 5)).shape == (1, 2, 3, 3)


def test_mlp_shape_and_layout_is_contiguous():
    model = build_model(ModelConfig(name="mlp", hidden=[200, 200]), (1, 8, 8), 10)
    specs = layout(model)
    assert [s.shape for s in specs] == [(200, 64), (200,), (200, 200), (200,), (10, 200), (10,)]
    assert all(a.offset + a.numel == b.offset for a, b in zip(specs, specs[1:]))


def test_flat_round_trip_and_views():
    model = build_model(ModelConfig(name="cnn"), (1, 8, 8), 10)
    vec = np.random.default_rng(0).normal(size=sum(p.numel() for p in model.parameters())).astype(np.float32)
    load_flat(model, vec)
    assert np.array_equal(flatten_params(model), vec)
    flat = FlatModel(model)
    assert np.array_equal(flat.weights(), vec)
    loss = model(torch.randn(4, 1, 8, 8)).square().mean()
    loss.backward()
    # gradients accumulated in place into the flat buffer, parameters are views of it
    assert flat.grad.abs().sum() > 0
    for spec, p in zip(flat.specs, model.parameters()):
        assert p.data_ptr() == flat.flat[spec.offset:].data_ptr()
        assert p.grad.data_ptr() == flat.grad[spec.offset:].data_ptr()


def test_init_is_keyed_not_ambient():
    m = build_model(ModelConfig(), (64,), 10)
    torch.manual_seed(123)
    a = init_weights(m, seed=7)
    torch.manual_seed(456)
    b = init_weights(m, seed=7)
    c = init_weights(m, seed=8)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def _trainer(**train):
    cfg = from_mapping({"train": train})
    module = build_model(ModelConfig(name="mlp", hidden=[16]), (5,), 3)
    return cfg, LocalTrainer(FlatModel(module), cfg), module


@pytest.mark.parametrize("train", [{"lr": 0.1}, {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.01, "epochs": 2}])
def test_local_training_matches_torch_sgd(train):
    """Our flat SGD equals torch.optim.SGD over the same batches in the same order."""
    train = {"batch_size": 4, **train}
    cfg, trainer, module = _trainer(**train)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(22, 5)).astype(np.float32)
    y = rng.integers(0, 3, 22)
    w0 = init_weights(build_model(ModelConfig(name="mlp", hidden=[16]), (5,), 3), 0)
    out = np.empty_like(w0)
    result = trainer.train(w0, x, y, round_index=3, client_id=11, out=out)

    ref = build_model(ModelConfig(name="mlp", hidden=[16]), (5,), 3)
    load_flat(ref, w0)
    opt = torch.optim.SGD(ref.parameters(), lr=train["lr"], momentum=train.get("momentum", 0.0),
                          weight_decay=train.get("weight_decay", 0.0))
    from fedmpi import seeding

    gen = torch.Generator().manual_seed(seeding.torch_seed(0, "shuffle", 3, 11))
    steps = 0
    for _ in range(train.get("epochs", 1)):
        order = torch.randperm(22, generator=gen)
        for s in range(0, 22, 4):
            idx = order[s:s + 4]
            opt.zero_grad()
            F.cross_entropy(ref(torch.from_numpy(x)[idx]), torch.from_numpy(y)[idx]).backward()
            opt.step()
            steps += 1
    np.testing.assert_allclose(out, flatten_params(ref) - w0, rtol=1e-5, atol=1e-6)
    assert result.steps == steps and result.num_samples == 22


def test_training_is_deterministic_per_key():
    cfg, trainer, _ = _trainer(lr=0.1, batch_size=3)
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(10, 5)).astype(np.float32), rng.integers(0, 3, 10)
    w0 = np.zeros(trainer.model.size, np.float32) + 0.01
    a, b, c = (np.empty_like(w0) for _ in range(3))
    trainer.train(w0, x, y, 0, 5, a)
    trainer.train(w0, x, y, 0, 5, b)
    trainer.train(w0, x, y, 1, 5, c)  # another round: another shuffle
    assert a.tobytes() == b.tobytes() and a.tobytes() != c.tobytes()


def test_fedavg_weights_by_samples_and_accumulates_in_float64():
    updates = np.array([[1.0, 0.0], [3.0, 4.0]], dtype=np.float32)
    res = aggregation.fedavg(updates, weights=[1, 3])
    np.testing.assert_array_equal(res.vector, [2.5, 3.0])
    assert res.vector.dtype == np.float64 and res.selected.tolist() == [0, 1]
    big = np.full((3, 4), 1e30, dtype=np.float32)
    assert np.isfinite(aggregation.row_norms(big)).all()
    np.testing.assert_allclose(aggregation.row_norms(big), 2e30, rtol=1e-6)
    with pytest.raises(ValueError, match="must not all be zero"):
        aggregation.fedavg(updates, weights=[0, 0])


def test_fedavg_blocked_sum_equals_float64_reference():
    rng = np.random.default_rng(0)
    updates = rng.normal(size=(7, 100_003)).astype(np.float32)
    weights = rng.random(7)
    before = updates.copy()
    res = aggregation.fedavg(updates, weights)
    ref = (weights / weights.sum()) @ updates.astype(np.float64)
    np.testing.assert_allclose(res.vector, ref, rtol=1e-13, atol=1e-15)
    assert np.array_equal(updates, before)  # input untouched


def test_server_optimizers_follow_their_update_rules():
    u1, u2 = np.array([1.0, -2.0]), np.array([0.5, 0.5])
    w = np.array([0.0, 0.0], dtype=np.float32)

    avg = ServerOptimizer(ServerConfig(optimizer="avg", lr=0.5), 2)
    wa = w.copy()
    avg.step(wa, u1)
    np.testing.assert_allclose(wa, [0.5, -1.0])

    m = ServerOptimizer(ServerConfig(optimizer="fedavgm", lr=1.0, momentum=0.9), 2)
    wm = w.copy()
    m.step(wm, u1)
    m.step(wm, u2)
    np.testing.assert_allclose(wm, u1 + (0.9 * u1 + u2), rtol=1e-6)

    adam = ServerOptimizer(ServerConfig(optimizer="fedadam", lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3), 2)
    wd = w.copy()
    adam.step(wd, u1)
    mm = 0.1 * u1
    vv = 0.99 * 1e-6 + 0.01 * u1 ** 2
    np.testing.assert_allclose(wd, 0.1 * mm / (np.sqrt(vv) + 1e-3), rtol=1e-6)
    assert set(adam.state) == {"m", "v"}
