"""transport: sharded, its pure core in one process: the block layout, the fixed
tree order of the block sums, and every rule and pre-aggregation step over column
blocks against fedmpi.aggregation, with several ranks simulated by threads."""

from __future__ import annotations

import math
import queue
import re
import threading

import numpy as np
import pytest

from fedmpi import aggregation as agg
from fedmpi.comm import SingleProcess
from fedmpi.sharded.columns import Columns, pairwise_sq_distances
from fedmpi.sharded.layout import BlockLayout, reduce_blocks, split, tree_sum
from fedmpi.sharded.rules import SHARDED_RULES, SHARDED_STEPS

# ---------------------------------------------------------------------------- ranks as threads


class _Hub:
    def __init__(self, size):
        self.size, self.lock, self.boxes = size, threading.Lock(), {}
        self.shares = [queue.Queue() for _ in range(size)]

    def box(self, key):
        with self.lock:
            return self.boxes.setdefault(key, queue.Queue())


class ThreadGroup:
    """One simulated rank: point-to-point messages and rank 0's decisions through queues."""

    def __init__(self, hub, rank):
        self.hub, self.rank, self.size = hub, rank, hub.size

    def isend(self, array, dest, tag):
        self.hub.box((self.rank, dest, tag)).put(array.copy())

    def recv(self, array, source, tag):
        array[...] = self.hub.box((source, self.rank, tag)).get(timeout=60)

    def waitall(self, requests):
        pass

    def share(self, value):
        if self.rank == 0:
            for box in self.hub.shares[1:]:
                box.put(value)
            return value
        return self.hub.shares[self.rank].get(timeout=60)


def spmd(size, fn):
    """``fn(group)`` on ``size`` simulated ranks at once; their results in rank order."""
    hub, out, errors = _Hub(size), [None] * size, []

    def run(rank):
        try:
            out[rank] = fn(ThreadGroup(hub, rank))
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return out


# ---------------------------------------------------------------------------- layout and tree


@pytest.mark.parametrize("d, block, ranks", [(10, 3, 2), (53, 5, 5), (1000, 64, 3), (7, 16, 4), (100, 10, 17), (130, 16, 1)])
def test_layout_cuts_fixed_blocks_into_contiguous_runs(d, block, ranks):
    lay = BlockLayout(d, block, ranks)
    widths = [lay.columns(b)[1] - lay.columns(b)[0] for b in range(lay.blocks)]
    assert sum(widths) == d and lay.blocks == max(1, d // block)
    assert min(widths) >= min(block, d) and max(widths) < 2 * block or lay.blocks == 1  # remainder joins the last block
    spans = [lay.span(r) for r in range(ranks)]
    assert spans[0][0] == 0 and spans[-1][1] == d and len(lay.blocks_of(0)) >= 1
    assert all(spans[r][1] == spans[r + 1][0] for r in range(ranks - 1))
    counts = [len(lay.blocks_of(r)) for r in range(ranks)]
    assert max(counts) - min(counts) <= 1 and sum(counts) == lay.blocks
    assert all(lay.owner(b) == r for r in range(ranks) for b in lay.blocks_of(r))
    # the blocks do not depend on the rank count
    assert [lay.columns(b) for b in range(lay.blocks)] == [BlockLayout(d, block, 1).columns(b) for b in range(lay.blocks)]


def test_tree_splits_at_the_largest_power_of_two_below_the_size():
    assert [split(0, n) for n in (2, 3, 4, 5, 8, 9, 13)] == [1, 2, 2, 4, 4, 8, 8]
    assert split(4, 7) == 6
    # ((0+1)+(2+3)) + 4: association by the tree, not left to right
    leaves = [1.0, 1e16, -1e16, 1.0, 1.0]
    assert tree_sum(lambda b: np.array([leaves[b]]), 0, 5)[0] == ((1.0 + 1e16) + (-1e16 + 1.0)) + 1.0 == 1.0
    assert (((1.0 + 1e16) + -1e16) + 1.0) + 1.0 == 2.0  # what a left-to-right sum would give


def _tree_over_ranks(values, ranks):
    lay = BlockLayout(len(values) * 3, 3, ranks)
    evaluated = []

    def leaf(b, rank):
        assert lay.owner(b) == rank, "a rank evaluated a block it does not own"
        evaluated.append(b)
        return values[b].copy()

    out = spmd(ranks, lambda g: reduce_blocks(lambda b: leaf(b, g.rank), lay, g, values.shape[1:]))
    return out, sorted(evaluated)


@pytest.mark.parametrize("ranks", [1, 2, 3, 5, 7, 12])
def test_the_block_tree_over_ranks_equals_the_one_process_sum_bit_for_bit(ranks):
    rng = np.random.default_rng(ranks)
    for blocks in (1, 2, 3, 5, 8, 11, 16, 19):
        values = rng.standard_normal((blocks, 4)) * 10.0 ** rng.integers(-8, 8, (blocks, 1))
        out, evaluated = _tree_over_ranks(values, ranks)
        assert out[0].tobytes() == tree_sum(lambda b, v=values: v[b].copy(), 0, blocks).tobytes()
        assert all(o is None for o in out[1:]) and evaluated == list(range(blocks))


# ---------------------------------------------------------------------------- rules and steps


def _rows(kind, n=15, d=203, seed=0):
    rng = np.random.default_rng(seed)
    if kind == "diverse":
        return rng.standard_normal((n, d)).astype(np.float32)
    base = rng.standard_normal(d).astype(np.float32)
    rows = (base + 1e-4 * rng.standard_normal((n, d))).astype(np.float32)  # near-identical clients
    if kind == "1e30":
        rows[[2, 9]] = (rng.standard_normal((2, d)) * 1e30).astype(np.float32)
    if kind == "overflow":  # float32 sums of these columns overflow: the center is taken in float64
        rows[[1, 4, 6]] = np.float32(3e38)
    return rows


F = 3
WEIGHTS = np.arange(1.0, 16.0)
# geometric_median: stopping at tol = 1e-12, both stop within 1e-12 of each other (at its default 1e-10
# the two can stop an iteration apart: scores then agree to about 1e-11, the aggregate still to 1e-15)
RULE_ARGS = {"fedavg": {"weights": WEIGHTS}, "krum": {"f": F}, "multi_krum": {"f": F}, "median": {},
             "trimmed_mean": {"f": F}, "meamed": {"f": F}, "geometric_median": {"weights": WEIGHTS, "tol": 1e-12},
             "bulyan": {"f": F}, "centered_clipping": {"tau": 0.5, "iterations": 2}, "mda": {"f": F}, "monna": {"f": F}}
STEP_ARGS = {"nnm": ({"f": F}, agg.nnm_step), "bucketing": ({"bucket_size": 4}, agg.bucketing_step),
             "clip": ({"max_norm": 3.0}, agg.clip_step), "arc": ({"f": F}, agg.arc_step)}
COLUMNWISE = {"median", "trimmed_mean", "meamed", "bulyan", "krum"}  # the same arithmetic on every column


def _sharded(rows, ranks, block, fn):
    lay = BlockLayout(rows.shape[1], block, ranks)

    def rank_part(group):
        lo, hi = lay.span(group.rank)
        return fn(Columns(np.ascontiguousarray(rows[:, lo:hi]), lay, group))

    return spmd(ranks, rank_part)


def _scale(rows):
    """Per pair, what the Gram trick subtracts (|x_i - c|^2 + |x_j - c|^2 around the
    rows' mean): distances agree to rounding of these, not of themselves."""
    x = rows.astype(np.float64)
    c = np.sum(((x - x.mean(0)) ** 2), axis=1)
    return c[:, None] + c[None, :]


def test_rules_are_registered_for_every_rule_and_step():
    assert set(SHARDED_RULES) == set(agg.RULES) and set(SHARDED_STEPS) == set(agg.PRE_STEPS)
    assert set(RULE_ARGS) == set(agg.RULES) and set(STEP_ARGS) == set(agg.PRE_STEPS)


@pytest.mark.parametrize("kind", ["diverse", "1e30", "overflow"])
@pytest.mark.parametrize("name", sorted(RULE_ARGS))
def test_every_rule_over_blocks_matches_the_rank_0_rule_and_is_the_same_for_any_rank_count(name, kind):
    rows = _rows(kind)
    kwargs = RULE_ARGS[name]
    if name == "centered_clipping":
        kwargs = {**kwargs, "center": None}
    expected = agg.RULES[name].function(rows, **kwargs)
    results = {}
    for ranks in (1, 2, 3, 5):
        def call(columns):
            extra = {"center": np.zeros(columns.rows.shape[1])} if name == "centered_clipping" else {}
            return SHARDED_RULES[name](columns, **{**RULE_ARGS[name], **extra})

        out = _sharded(rows, ranks, 8, call)
        results[ranks] = (np.concatenate([o.vector for o in out]), out[0])
    vector, root = results[1]
    for ranks, (v, r) in results.items():  # bitwise across rank counts
        assert v.tobytes() == vector.tobytes(), f"{name}: vector differs at {ranks} ranks"
        assert np.array_equal(r.selected, root.selected)
        assert (r.scores is None and root.scores is None) or r.scores.tobytes() == root.scores.tobytes()
    assert np.array_equal(root.selected, expected.selected), name
    if name in COLUMNWISE:
        assert vector.tobytes() == expected.vector.tobytes(), f"{name}: same arithmetic, different bits"
    else:
        np.testing.assert_allclose(vector, expected.vector, rtol=1e-12, atol=1e-12 * np.abs(expected.vector).max())
    if expected.scores is not None:
        if name in ("krum", "multi_krum", "bulyan", "mda"):  # (sums of) squared distances
            tol = 1e-12 * np.sort(_scale(rows), axis=1)[:, :rows.shape[0] - F - 1].sum(axis=1)
            assert np.all(np.abs(root.scores - expected.scores) <= tol), name
        else:
            np.testing.assert_allclose(root.scores, expected.scores, rtol=1e-12)


@pytest.mark.parametrize("kind", ["diverse", "1e30"])
def test_distances_over_blocks_match_the_recentred_rank_0_distances(kind):
    rows = _rows(kind, n=12, d=150)
    expected = agg.pairwise_sq_distances(rows)
    out = _sharded(rows, 3, 8, pairwise_sq_distances)
    assert out[1] is None and out[2] is None
    assert np.all(np.abs(out[0] - expected) <= 1e-12 * _scale(rows) + 1e-300)
    if kind == "1e30":  # the tight group was recentred: its distances are exact to 1e-12 themselves
        honest = [i for i in range(12) if i not in (2, 9)]
        sub, ref = out[0][np.ix_(honest, honest)], expected[np.ix_(honest, honest)]
        off = ~np.eye(len(honest), dtype=bool)
        assert np.max(np.abs(sub - ref)[off] / ref[off]) < 1e-12


@pytest.mark.parametrize("name", sorted(STEP_ARGS))
def test_every_pre_aggregation_step_over_blocks_matches_the_rank_0_step(name):
    rows = _rows("1e30")
    kwargs, reference = STEP_ARGS[name]

    def rng():
        return np.random.default_rng(7)

    expected = reference(rows, **{**kwargs, **({"rng": rng()} if name == "bucketing" else {})})
    outs = {}
    for ranks in (1, 3, 5):
        out = _sharded(rows, ranks, 8, lambda c: SHARDED_STEPS[name](c, **{**kwargs, **({"rng": rng()} if name == "bucketing" else {})}))
        outs[ranks] = (np.concatenate([o.rows.rows for o in out], axis=1), out[0])
    new_rows, root = outs[1]
    assert all(r.tobytes() == new_rows.tobytes() for r, _ in outs.values())
    if expected.groups is not None:
        assert [list(g) for g in root.groups] == [list(g) for g in expected.groups]
    np.testing.assert_allclose(new_rows, expected.rows, rtol=1e-12, atol=0)


def test_one_process_group_is_the_same_as_simulated_ranks():
    rows = _rows("diverse")
    lay = BlockLayout(rows.shape[1], 8, 1)
    alone = SHARDED_RULES["multi_krum"](Columns(rows, lay, SingleProcess()), f=F)
    threaded = _sharded(rows, 4, 8, lambda c: SHARDED_RULES["multi_krum"](c, f=F))
    assert alone.vector.tobytes() == np.concatenate([o.vector for o in threaded]).tobytes()
    assert alone.scores.tobytes() == threaded[0].scores.tobytes()


# ---------------------------------------------------------------------------- the memory check


class _MnistShape:
    input_shape, num_classes = (1, 28, 28), 10


def test_the_memory_check_accepts_2000_clients_of_a_4_2m_model_sharded_where_rank_0_alone_is_refused():
    """The run rank 0 refuses (a cohort of 2,000 of a 4,237,360-parameter MLP: 31.6 GiB of
    rows, over 22.6 GiB) fits that budget per rank on 8 ranks with transport: sharded;
    on 2 a worker still needs more (its 1,000 trained rows plus half the columns)."""
    from fedmpi.config import load
    from fedmpi.preflight import check_memory, sharded_memory
    from fedmpi.schema import ConfigError

    base = ["data.name=mnist", "clients.total=2000", "clients.per_round=2000", "model.hidden=[5330]",
            "aggregator.name=krum", "aggregator.f=100", "memory_limit_gb=22.6"]
    with pytest.raises(ConfigError, match=r"rank 0 would need about 3\d\.\d\d GiB: 31\.57 GiB of update rows"):
        check_memory(load(None, base), _MnistShape())
    cfg = load(None, [*base, "transport=sharded"])
    for rank in range(8):
        check_memory(cfg, _MnistShape(), rank, 8)
    d = 4_237_360
    columns, training, _ = sharded_memory(cfg, d, 0, 8)
    assert training == 0 and columns == 2000 * (BlockLayout(d, 4096, 8).width(0)) * 4
    assert abs(columns / (2000 * d * 4) - 1 / 8) < 0.01  # rank 0: an eighth of the rows
    with pytest.raises(ConfigError, match="rank 1 of 2 would need about"):
        check_memory(cfg, _MnistShape(), 1, 2)


# ---------------------------------------------------------------------------- one process, the whole round


def _loop(transport, overrides):
    import torch

    from fedmpi.config import load
    from fedmpi.data import load as load_data
    from fedmpi.models import FlatModel, build_model, init_weights
    from fedmpi.server import ServerLoop
    from fedmpi.sharded.layout import BlockLayout as Layout
    from fedmpi.sharded.round import ShardContext
    from fedmpi.worker import ClientHost, LocalClients, ShardedClients

    torch.set_num_threads(1)
    cfg = load(None, ["rounds=2", "clients.total=10", "clients.per_round=10", "model.hidden=[8]", f"transport={transport}",
                      *([f"shard_block={16}"] if transport == "sharded" else []), *overrides])
    data = load_data(cfg)
    module = build_model(cfg.model, data.input_shape, data.num_classes)
    model = FlatModel(module)
    clients = LocalClients(ClientHost(cfg, data, model), model.size, reduce=False)
    if transport == "sharded":
        clients = ShardedClients(cfg, ShardContext(Layout(model.size, 16, 1), SingleProcess()), clients)

    class Writer:
        snapshot_every = 0
        rounds, clients = [], []

        def append_round(self, row, records):
            self.rounds.append(row)
            self.clients.append(records)

    writer = Writer()
    loop = ServerLoop(cfg, clients, data, model, init_weights(module, cfg.seed).copy(), writer, quiet=True)
    for r in range(cfg.rounds):
        loop.run_round(r)
    return loop, writer


def test_a_sharded_round_in_one_process_equals_the_gathered_round():
    """NaN rows left out and counted against f, ARC and NNM before Krum, FedAdam: the
    same slots, scores and model as transport: gather."""
    overrides = ["attack.name=nonfinite", "attack.clients=[2, 7]", "aggregator.name=krum", "aggregator.f=3",
                 "aggregator.pre=[{name: arc}, {name: nnm}]", "server.optimizer=fedadam"]
    gathered, g = _loop("gather", overrides)
    sharded, s = _loop("sharded", overrides)
    for a, b in zip(g.clients, s.clients):
        assert np.array_equal(a.selected, b.selected) and np.array_equal(a.finite, b.finite) and not a.finite[[2, 7]].any()
        np.testing.assert_allclose(b.score, a.score, rtol=1e-12)
        np.testing.assert_allclose(b.update_norm, a.update_norm, rtol=1e-12)
    for a, b in zip(g.rounds, s.rounds):
        assert a.nonfinite_updates == b.nonfinite_updates == 2
        assert math.isclose(a.update_norm, b.update_norm, rel_tol=1e-12)
    np.testing.assert_allclose(sharded.weights, gathered.weights, rtol=1e-6, atol=1e-7)
    for key, value in gathered.state().items():
        np.testing.assert_allclose(sharded.state()[key], value, rtol=1e-9, atol=1e-15, err_msg=key)


@pytest.mark.parametrize("overrides, fragment", [
    (["attack.name=min_max", "attack.fraction=0.25"], "attack.name = 'min_max': acts on whole rows on rank 0"),
    (["attack.name=fang_krum", "attack.fraction=0.25", "aggregator.name=krum"], "attack.name = 'fang_krum'"),
    (["privacy.mode=client_central", "privacy.noise_multiplier=1", "privacy.accountant=rdp"],
     "privacy.mode = 'client_central': clips and noises the rows on rank 0"),
    (["shard_block=1"], "shard_block = 1: must be >= 2"),
])
def test_what_sharding_cannot_do_is_refused_with_one_line(overrides, fragment):
    from fedmpi.config import load
    from fedmpi.schema import ConfigError

    with pytest.raises(ConfigError, match=re.escape(fragment)) as err:
        load(None, ["transport=sharded", *overrides])
    assert "\n" not in str(err.value)
    load(None, ["transport=sharded", "attack.name=alie", "attack.fraction=0.25"])  # coordinate-wise: accepted


def test_a_refusal_decided_on_rank_0_is_raised_on_every_rank():
    """MDA with more than f non-finite rows: every subset has an infinite diameter. Rank
    0 finds it; every simulated rank raises the same ValueError (none waits for a decision)."""
    rows = _rows("diverse")
    rows[[1, 4]] = np.nan
    with pytest.raises(ValueError, match="more than f = 1 rows have non-finite coordinates") as expected:
        agg.mda(rows, f=1)
    outcomes = _sharded(rows, 3, 8, lambda c: _outcome(lambda: SHARDED_RULES["mda"](c, f=1)))
    assert outcomes == [str(expected.value)] * 3


def _outcome(call):
    try:
        call()
    except ValueError as exc:
        return str(exc)
    return None
