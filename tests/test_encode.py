"""encode(): against a reference pipeline (Transformers + PEFT + tokenizers), and its contract."""

import os
import warnings

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from jina_jax import JinaEmbeddingsV3
from jina_jax.cost import for_model
from jina_jax.encode import plan
from jina_jax.tokenize import position_limit
from tests import reference as ref

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "",
    "naïve café, Zürich — 東京タワー and Ελληνικά",
    "short",
    "a much longer text " * 12,          # past max_length: truncated, never an error
    "The quick brown fox jumps over the lazy dog.",  # duplicate
    "42",
    "What is the capital of France?",
]


@pytest.fixture(scope="module")
def model(transformers_dir):
    return JinaEmbeddingsV3.from_pretrained(transformers_dir)


@pytest.fixture(scope="module")
def reference(transformers_dir):
    """embed(texts, task, max_length, dim, prompt) from Transformers + PEFT, one text at a time
    (no padding), mean pooling, truncation, normalisation."""
    tok = Tokenizer.from_file(os.path.join(transformers_dir, "tokenizer.json"))
    models = {}

    def embed(texts, task, max_length=24, dim=None, prompt=None):
        if task not in models:
            folder = None if task is None else task.replace(".", "_").replace("-", "_")
            models[task] = ref.peft_reference(transformers_dir, folder)
        if prompt is None:
            prompt = "" if task is None else ref.INSTRUCTIONS[task]
        tok.enable_truncation(max_length)
        out = []
        for text in texts:
            ids = torch.tensor([tok.encode(prompt + text).ids])
            with torch.no_grad():
                h = models[task](input_ids=ids).last_hidden_state[0].numpy()
            v = h.mean(0)[:dim]
            out.append(v / np.linalg.norm(v))
        return np.stack(out)

    return embed


def _min_cosine(a, b):
    return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min())


@pytest.mark.parametrize("task,dim,batch_size", [
    ("retrieval.query", None, 3), ("retrieval.passage", 16, 32), ("text-matching", 8, 1),
    (None, None, 5), ("separation", 48, 2)])
def test_parity_with_reference_pipeline(model, reference, task, dim, batch_size):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 8 and 48 are not in the test config's Matryoshka list
        ours = model.encode(CORPUS, task=task, batch_size=batch_size, max_length=24,
                            truncate_dim=dim)
    theirs = reference(CORPUS, task, dim=dim)
    assert ours.shape == (len(CORPUS), dim or 48) and ours.dtype == np.float32
    assert _min_cosine(ours, theirs) > 0.99999
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-6)


def test_instructions_are_prepended(model, reference):
    """The task's instruction reaches the tokens: with it stripped, the result differs."""
    ours = model.encode(CORPUS[:3], task="retrieval.query", max_length=24)
    without = reference(CORPUS[:3], "retrieval.query", prompt="")
    assert _min_cosine(ours, without) < 0.9999


def test_prompt_overrides_instruction(model, reference):
    ours = model.encode(CORPUS, task="retrieval.passage", prompt="search: ", max_length=24)
    assert _min_cosine(ours, reference(CORPUS, "retrieval.passage", prompt="search: ")) > 0.99999


def test_mixed_tasks_per_text(model):
    tasks = ["retrieval.query", "retrieval.passage", None, "classification"] * 2
    mixed = model.encode(CORPUS, task=tasks, max_length=24)
    for i, task in enumerate(tasks):
        alone = model.encode(CORPUS[i], task=task, max_length=24)
        assert np.abs(mixed[i] - alone).max() < 1e-5


def test_single_string_and_unnormalised(model, reference):
    one = model.encode(CORPUS[0], task="classification", max_length=24)
    assert one.shape == (48,)
    raw = model.encode([CORPUS[0]], task="classification", max_length=24, normalize=False)
    assert abs(np.linalg.norm(raw) - 1.0) > 1e-3
    np.testing.assert_allclose(raw[0] / np.linalg.norm(raw[0]), one, atol=1e-6)


def test_batch_composition_and_order_do_not_matter(model):
    base = model.encode(CORPUS, task="separation", batch_size=32, max_length=24)
    for batch_size in (1, 2, 7):
        np.testing.assert_allclose(
            model.encode(CORPUS, task="separation", batch_size=batch_size, max_length=24),
            base, atol=1e-5)
    order = np.random.default_rng(0).permutation(len(CORPUS))
    shuffled = model.encode([CORPUS[i] for i in order], task="separation", max_length=24)
    np.testing.assert_allclose(shuffled, base[order], atol=1e-5)
    np.testing.assert_allclose(base[0], base[5], atol=1e-6)  # duplicates agree


def test_compiles_once_per_shape_and_never_again(transformers_dir):
    model = JinaEmbeddingsV3.from_pretrained(transformers_dir)
    rng = np.random.default_rng(1)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    texts = [" ".join(rng.choice(words, size=rng.integers(0, 12))) for _ in range(2000)]
    limit = position_limit(model.config)
    tok = model.tokenizer
    tok.enable_truncation(limit)
    prompt = model.config.instruction("retrieval.passage")
    lengths = [len(e.ids) for e in tok.encode_batch([prompt + t for t in texts])]
    batches = plan(lengths, ["retrieval.passage"] * len(texts), limit, 16, cost=for_model(model))
    shapes = {(b.rows, b.width) for b in batches}
    assert len({w for _, w in shapes}) >= 3
    model.encode(texts, task="retrieval.passage", batch_size=16)
    first = model.compile_count
    assert first == len(shapes), (first, shapes)
    model.encode(texts, task="retrieval.passage", batch_size=16)
    model.encode(texts[::-1], task="retrieval.query", batch_size=16)  # same shapes, other task
    assert model.compile_count == first


def test_executable_store_skips_tracing_in_a_new_model(transformers_dir, tmp_path):
    """A second model object (as in a second process) loads every executable the first one
    compiled, traces none, and gives identical numbers; a damaged entry is compiled again and
    rewritten; other settings never load another's entries."""
    from jina_jax.executables import ExecutableStore

    def fresh(**kwargs):
        m = JinaEmbeddingsV3.from_pretrained(transformers_dir, **kwargs)
        m.forward.store = ExecutableStore(str(tmp_path))
        return m

    texts = [t * k for t in CORPUS for k in (1, 3)]
    first = fresh()
    base = first.encode(texts, task="retrieval.query", batch_size=4, max_length=24)
    shapes = first.compile_count
    entries = sorted(tmp_path.glob("*.jexe"))
    assert shapes >= 2 and first.forward.loaded_count == 0 and len(entries) == shapes

    second = fresh()
    again = second.encode(texts, task="retrieval.query", batch_size=4, max_length=24)
    assert second.compile_count == second.forward.loaded_count == shapes  # nothing traced
    np.testing.assert_array_equal(again, base)

    entries[0].write_bytes(entries[0].read_bytes()[:200])  # a truncated entry
    third = fresh()
    np.testing.assert_array_equal(
        third.encode(texts, task="retrieval.query", batch_size=4, max_length=24), base)
    assert third.compile_count == shapes and third.forward.loaded_count == shapes - 1
    assert entries[0].stat().st_size > 200  # rewritten whole

    other = fresh(precision="highest")
    other.encode(texts, task="retrieval.query", batch_size=4, max_length=24)
    assert other.forward.loaded_count == 0
    assert len(list(tmp_path.glob("*.jexe"))) == 2 * shapes
    assert not list(tmp_path.glob("*.tmp"))

    # What JAX's own cache hands back is used but never saved: on CPU its serialized copy
    # lacks the kernels and fails when run.
    jit_only = fresh()
    jit_only.forward.store = None  # plain jax.jit: JAX's persistent cache writes the shape
    via_jit = jit_only.encode(["one more text"], task="separation", max_length=24)
    guarded = fresh()
    guarded.forward.store = ExecutableStore(str(tmp_path / "guarded"))
    np.testing.assert_array_equal(
        guarded.encode(["one more text"], task="separation", max_length=24), via_jit)
    assert guarded.compile_count == 1 and guarded.forward.loaded_count == 0
    assert not (tmp_path / "guarded").exists()


def test_token_budget_bounds_rows(model):
    from jina_jax.encode import rows_for

    assert rows_for(8192, 100, 32, 16384) == 2
    assert rows_for(128, 100, 32, 16384) == 32
    assert rows_for(128, 3, 32, 16384) == 4
    assert rows_for(38, 1, 32, 16384) == 1


def test_progress_bar(model, capsys):
    model.encode(CORPUS, task="separation", max_length=24, show_progress_bar=True)
    assert "encode" in capsys.readouterr().err
    model.encode(CORPUS, task="separation", max_length=24, show_progress_bar=False)
    assert capsys.readouterr().err == ""
    model.encode(CORPUS, task="separation", max_length=24)  # few batches: off by default
    assert capsys.readouterr().err == ""
    model.encode(CORPUS * 3, task="separation", max_length=24, batch_size=1)  # many: on
    assert "encode" in capsys.readouterr().err


def test_empty_inputs(model):
    assert model.encode([], task="separation").shape == (0, 48)
    assert model.encode([], truncate_dim=32).shape == (0, 32)
    empty = model.encode("", task="separation")
    assert np.isfinite(empty).all() and abs(np.linalg.norm(empty) - 1) < 1e-6


def test_bad_inputs(model):
    with pytest.raises(ValueError, match=r"unknown task 'query'.*retrieval\.query"):
        model.encode(["x"], task="query")
    with pytest.raises(TypeError, match=r"texts\[1\] is int, not a string"):
        model.encode(["x", 3])
    with pytest.raises(TypeError, match="texts must be a string or a list of strings"):
        model.encode(None)
    with pytest.raises(TypeError, match="texts must be a string or a list of strings"):
        model.encode(5)
    with pytest.raises(ValueError, match=r"truncate_dim must be in 1\.\.48"):
        model.encode(["x"], truncate_dim=49)
    with pytest.raises(ValueError, match=r"truncate_dim must be in 1\.\.48"):
        model.encode(["x"], truncate_dim=0)
    with pytest.raises(ValueError, match=r"max_length must be an integer in 2\.\.38"):
        model.encode(["x"], max_length=39)
    with pytest.raises(ValueError, match=r"task has 1 entries but there are 2 texts"):
        model.encode(["x", "y"], task=["separation"])
    with pytest.warns(UserWarning, match="truncate_dim=5 is not one of the dimensions"):
        model.encode(["x"], truncate_dim=5)


def test_release_format_encode_uses_its_instructions(original_fp32):
    model = JinaEmbeddingsV3.from_pretrained(original_fp32[0])
    assert model.config.instruction("retrieval.query") == "Q: "
    a = model.encode(["hello"], task="retrieval.query")
    b = model.encode(["hello"], task="retrieval.query", prompt="Q: ")
    np.testing.assert_array_equal(a, b)
