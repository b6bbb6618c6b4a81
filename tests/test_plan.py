"""The priced plan (`encode.plan` with a `cost.CostModel`) and the cost model itself: the plan
is the cheapest cut its cost model allows, uses only shapes from `shapes`, covers every text
once, and gives every row the answer it gets alone; the fit recovers a known model; a
calibration is cached per device and model."""

import dataclasses
import itertools
import json
import os
import warnings

import numpy as np
import pytest

from jina_jax import JinaEmbeddingsV3
from jina_jax import cost as cost_lib
from jina_jax.cost import CostModel
from jina_jax.encode import (
    Runner,
    batch_rows,
    cheapest_cut,
    padding_fraction,
    plan,
    priced_cut,
    progress,
    shapes,
)
from jina_jax.tokenize import WIDTHS, bucket_for

CPU = CostModel(call_s=0.04, token_s=2e-3, key_s=1.4e-6, min_tokens=96, shape_s=1.2)
GPU = CostModel(call_s=3e-4, token_s=1e-6, key_s=4e-10, min_tokens=16384, shape_s=5.0)


def mixed_lengths(n, seed=0):
    """Token lengths of a query / paragraph / document mix (like the benchmark's corpora)."""
    rng = np.random.default_rng(seed)
    kinds = rng.choice(3, n, p=[0.55, 0.35, 0.10])
    lows, highs = np.array([8, 60, 500]), np.array([40, 500, 1800])
    return [int(rng.integers(lows[k], highs[k])) for k in kinds]


def check_plan(batches, lengths, tasks, limit, batch_size, budget=16384, multiple=1):
    allowed = set(shapes(limit, max(lengths), batch_size, budget, multiple))
    seen = []
    for b in batches:
        assert (b.rows, b.width) in allowed
        assert 1 <= len(b.members) <= b.rows and b.rows % multiple == 0
        assert all(lengths[i] <= b.width for i in b.members)
        assert len({tasks[i] for i in b.members}) == 1
        seen += b.members
    assert sorted(seen) == list(range(len(lengths)))


@pytest.mark.parametrize("cost", [CPU, GPU, dataclasses.replace(CPU, shape_s=0.0)])
@pytest.mark.parametrize("multiple", [1, 3])
def test_priced_plan_uses_known_shapes_and_covers_every_text(cost, multiple):
    lengths = mixed_lengths(300)
    tasks = [("a", "b")[i % 2] for i in range(len(lengths))]
    batches = plan(lengths, tasks, 8192, 32, row_multiple=multiple, cost=cost)
    check_plan(batches, lengths, tasks, 8192, 32, multiple=multiple)
    # One task's batches follow each other, longest first.
    order = [tasks[b.members[0]] for b in batches]
    assert order == sorted(order)


def brute_force(widths, cost, batch_size, budget, free):
    """The cheapest contiguous cut by enumerating every one (small inputs only): each batch
    in its own shape (priced unless free) or in the cheapest free shape that holds it."""
    n, best = len(widths), (np.inf, None)
    for mask in itertools.product((0, 1), repeat=n - 1):
        cuts = [0] + [i + 1 for i, m in enumerate(mask) if m] + [n]
        total, ok = 0.0, True
        for start, end in zip(cuts, cuts[1:]):
            width = widths[start]
            if end - start > max(1, min(batch_size, budget // width)):
                ok = False
                break
            rows = batch_rows(width, end - start, batch_size, budget)
            options = [
                cost.seconds(rows, width)
                + (0.0 if free is not None and (rows, width) in free else cost.shape_s)
            ]
            options += [
                cost.seconds(r, w) for r, w in (free or ()) if w > width and r >= end - start
            ]
            total += min(options)
        if ok and total < best[0] - 1e-12:
            best = (total, cuts)
    return best[0]


@pytest.mark.parametrize("seed", range(9))
def test_cheapest_cut_is_the_cheapest(seed):
    rng = np.random.default_rng(seed)
    widths = sorted(
        (bucket_for(int(x), 8192, WIDTHS) for x in rng.integers(5, 700, 11)), reverse=True
    )
    cost = (CPU, GPU, dataclasses.replace(CPU, shape_s=0.0))[seed % 3]
    # None: every shape priced; then free shapes of the texts' own widths, and (seeds 6-8)
    # free shapes wider than some texts, which those may run in.
    free = (
        None,
        {(4, widths[0]), (8, widths[-1])},
        {(2, widths[0] + 8), (4, widths[5] + 4), (1, widths[-1] + 4)},
    )[seed // 3]
    cut = cheapest_cut(widths, cost, 4, 2048, 1, free, cost.shape_s)
    total = 0.0
    for start, end, rows, width in cut:
        assert width >= widths[start] and rows >= end - start
        total += cost.seconds(rows, width) + (
            0.0 if free is not None and (rows, width) in free else cost.shape_s
        )
    assert [e for _, e, _, _ in cut][-1] == len(widths)
    assert total == pytest.approx(brute_force(widths, cost, 4, 2048, free), rel=1e-9)


def test_a_free_wider_shape_holds_a_few_texts():
    """Three texts of width 40 with a free 4x48 shape and a high price of a new one: they run
    in 4x48, not in a new 4x40; with no price they get their own shape (less padding)."""
    dear = dataclasses.replace(CPU, shape_s=100.0)
    assert cheapest_cut([40, 40, 40], dear, 32, 16384, 1, {(4, 48)}, 100.0) == [(0, 3, 4, 48)]
    assert cheapest_cut([40, 40, 40], dear, 32, 16384, 1, {(4, 48)}, 0.0) == [(0, 3, 4, 40)]


def test_a_short_call_prices_a_new_shape_at_a_share_of_its_compile(monkeypatch):
    """A new shape must save its compile within PAYBACK_S of encode work: a call that long
    pays the whole price (the plan of shape_s itself), a short one a share, so it takes more
    shapes and less padding, but never less than 1 / PAYBACK_CALLS of it."""
    import jina_jax.encode as encode_lib

    lengths = mixed_lengths(100, seed=2)
    tasks = ["t"] * len(lengths)
    shapes_of = lambda batches: len({(b.rows, b.width) for b in batches})
    monkeypatch.setattr(encode_lib, "PAYBACK_S", 1e-9)
    whole = plan(lengths, tasks, 8192, 32, cost=CPU)
    monkeypatch.setattr(encode_lib, "PAYBACK_S", 1e30)
    floor = plan(lengths, tasks, 8192, 32, cost=CPU)
    cheap = dataclasses.replace(CPU, shape_s=CPU.shape_s / encode_lib.PAYBACK_CALLS)
    monkeypatch.setattr(encode_lib, "PAYBACK_S", 1e-9)  # the whole of the cheaper price
    assert floor == plan(lengths, tasks, 8192, 32, cost=cheap)
    monkeypatch.setattr(encode_lib, "PAYBACK_S", 1e30)
    monkeypatch.setattr(encode_lib, "PAYBACK_CALLS", 10**9)
    free = plan(lengths, tasks, 8192, 32, cost=CPU)
    predicted = sum(CPU.seconds(b.rows, b.width) for b in free)
    monkeypatch.setattr(encode_lib, "PAYBACK_S", 4 * predicted)
    share = plan(lengths, tasks, 8192, 32, cost=CPU)
    assert shapes_of(whole) < shapes_of(share) < shapes_of(free)
    assert (padding_fraction(free, lengths) < padding_fraction(share, lengths)
            < padding_fraction(whole, lengths))


def test_gpu_prices_merge_rungs_cpu_prices_cut_padding():
    """A cost with a high floor (a GPU's) merges short texts of many rungs into full batches;
    a CPU's keeps padding at or below the padding-only plan's with no more shapes."""
    lengths = mixed_lengths(520, seed=3)
    tasks = ["t"] * len(lengths)
    before = plan(lengths, tasks, 8192, 32)
    gpu = plan(lengths, tasks, 8192, 32, cost=GPU)
    cpu = plan(lengths, tasks, 8192, 32, cost=CPU)
    assert len(gpu) < len(before)
    assert len({(b.rows, b.width) for b in gpu}) < len({(b.rows, b.width) for b in before})
    assert padding_fraction(cpu, lengths) <= padding_fraction(before, lengths)
    assert len({(b.rows, b.width) for b in cpu}) <= len({(b.rows, b.width) for b in before})
    predicted = lambda batches: sum(CPU.seconds(b.rows, b.width) for b in batches)
    assert predicted(cpu) < predicted(before)


def test_known_shapes_are_reused():
    lengths = mixed_lengths(200, seed=5)
    tasks = ["t"] * len(lengths)
    alone = {(b.rows, b.width) for b in plan(lengths[:100], tasks[:100], 8192, 32, cost=CPU)}
    later = plan(lengths[100:], tasks[100:], 8192, 32, cost=CPU, known=frozenset(alone))
    fresh = plan(lengths[100:], tasks[100:], 8192, 32, cost=CPU)
    reused = lambda batches: len({(b.rows, b.width) for b in batches} & alone)
    assert reused(later) >= reused(fresh)
    assert len({(b.rows, b.width) for b in later} - alone) <= len(
        {(b.rows, b.width) for b in fresh} - alone
    )


def test_fit_recovers_a_known_model():
    true = CostModel(call_s=0.03, token_s=1.5e-3, key_s=2e-6, min_tokens=100)
    samples = [(r, w, true.seconds(r, w)) for r, w in cost_lib.CALIBRATION_SHAPES]
    fitted = cost_lib.fit(samples)
    assert fitted["call_s"] == pytest.approx(true.call_s, rel=1e-6)
    assert fitted["token_s"] == pytest.approx(true.token_s, rel=1e-6)
    assert fitted["key_s"] == pytest.approx(true.key_s, rel=1e-6)
    assert fitted["min_tokens"] == pytest.approx(true.min_tokens, abs=1)
    assert fitted["knee_tokens"] == 0 and fitted["knee_s"] == 0.0  # none to find
    with pytest.raises(ValueError, match="three timed shapes"):
        cost_lib.fit(samples[:2])


def test_fit_finds_the_knee():
    """Batches past 2048 tokens a third dearer per token (a CPU's caches): the fit finds the
    knee and its price, and predicts every calibration shape."""
    true = CostModel(
        call_s=0.02, token_s=5e-4, key_s=2e-7, min_tokens=150, knee_tokens=2048, knee_s=1.5e-4
    )
    samples = [(r, w, true.seconds(r, w)) for r, w in cost_lib.CALIBRATION_SHAPES]
    fitted = CostModel(**cost_lib.fit(samples))
    assert fitted.knee_tokens == 2048
    assert fitted.knee_s == pytest.approx(true.knee_s, rel=1e-6)
    for r, w, seconds in samples:
        assert fitted.seconds(r, w) == pytest.approx(seconds, rel=1e-6)
    assert true.seconds(16, 256) > 2 * true.seconds(8, 256)  # past the knee: dearer per token


def test_device_defaults_scale_with_the_model():
    from jina_jax.config import JinaConfig

    small, deep = JinaConfig(num_hidden_layers=2), JinaConfig(num_hidden_layers=8)
    for platform in ("cpu", "gpu", "tpu"):
        a, b = cost_lib.default(small, platform), cost_lib.default(deep, platform)
        assert b.token_s == pytest.approx(4 * a.token_s) and b.call_s == pytest.approx(4 * a.call_s)
        assert a.source == f"default:{platform}"
    assert cost_lib.default(small, "cpu").min_tokens < cost_lib.default(small, "gpu").min_tokens
    assert cost_lib.default(small, "rocm").source == "default:gpu"


@pytest.fixture(scope="module")
def model(transformers_dir):
    return JinaEmbeddingsV3.from_pretrained(transformers_dir)


def test_every_plan_gives_each_row_its_own_answer(model):
    """Rows of mixed lengths through the Runner under three plans (padding-only, a CPU price,
    a GPU price that merges rungs): the same embeddings (batch invariance)."""
    rng = np.random.default_rng(0)
    ids = [
        np.concatenate([[0], rng.integers(3, 90, n), [2]]).astype(np.int32)
        for n in rng.integers(1, 30, 12)
    ]
    tasks = ["retrieval_query"] * len(ids)
    out = {}
    for name, cost in (("padding", None), ("cpu", CPU), ("gpu", GPU)):
        runner = Runner(model, 4, 16384, False, progress(None, 1, False), cost=cost)
        runner.timeline = []
        batches = runner.plan(ids, tasks)
        out[name] = runner.submit(ids, tasks, batches)
        runner.drain()
        assert len(runner.timeline) == len(batches)
        assert all(t[1] <= t[2] <= t[3] <= t[4] for t in runner.timeline)
    assert len(Runner(model, 4, 16384, False, None, cost=GPU).plan(ids, tasks)) < len(
        Runner(model, 4, 16384, False, None, cost=None).plan(ids, tasks)
    )
    np.testing.assert_allclose(out["cpu"], out["padding"], atol=1e-5)
    np.testing.assert_allclose(out["gpu"], out["padding"], atol=1e-5)


def test_calibration_is_cached_per_device_and_model(transformers_dir, tmp_path):
    m = JinaEmbeddingsV3.from_pretrained(transformers_dir)
    m.forward.cache_dir = str(tmp_path)
    assert cost_lib.for_model(m).source.startswith("default:")
    fitted = cost_lib.calibrate(
        m, shapes=((1, 8), (16, 16), (8, 32), (16, 32), (1, 64)), repeats=1
    )  # 1x64: wider than the model, left out
    assert fitted.source.startswith("calibrated:") and fitted.token_s > 0
    path = cost_lib.cache_path(m)
    assert os.path.isfile(path) and path.startswith(str(tmp_path))
    assert cost_lib.for_model(m) == fitted
    assert Runner(m, 8, 16384, False, None).cost == fitted
    other = JinaEmbeddingsV3.from_pretrained(transformers_dir, dtype="bfloat16")
    other.forward.cache_dir = str(tmp_path)
    assert cost_lib.cache_path(other) != path
    assert cost_lib.for_model(other).source.startswith("default:")
    with open(path, "w") as f:
        f.write("{not json")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cost_lib.for_model(m).source.startswith("default:")
    assert any(path in str(w.message) for w in caught)
    json.dumps(dataclasses.asdict(fitted))  # what the cache holds is plain JSON
