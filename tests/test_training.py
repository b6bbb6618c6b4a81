"""Fine-tuning: gradients against PyTorch autograd through PEFT, training behaviour, state I/O."""

import os

import jax
import numpy as np
import optax
import pytest
import torch

from jina_jax import JinaEmbeddingsV3
from jina_jax.training import Contrastive, Trainer
from tests import reference as ref

TEMPERATURE = 0.07
Q_LENGTHS, P_LENGTHS, N_LENGTHS = (5, 9, 3, 7), (12, 4, 8, 10), (6, 11, 2, 9)


def _rows(vocab, lengths, seed, width=None):
    ids, mask = ref.padded_batch(vocab, lengths, seed=seed)
    if width is not None:  # more padding on the right
        ids = np.pad(ids, ((0, 0), (0, width - ids.shape[1])), constant_values=1)
        mask = np.pad(mask, ((0, 0), (0, width - mask.shape[1])))
    return ids.astype(np.int32), mask.sum(1).astype(np.int32), mask


def contrastive_arrays(vocab, width=None):
    """A padded batch of 4 queries, 4 positives and one hard negative each (mixed lengths).
    width: pad all three to one width, so they run as one mixed-task forward."""
    (q, ql, qm), (p, pl, pm), (n, nl, nm) = (_rows(vocab, lengths, seed, width)
                                             for lengths, seed in ((Q_LENGTHS, 1), (P_LENGTHS, 2),
                                                                   (N_LENGTHS, 3)))
    batch = {"query_ids": q, "query_lengths": ql, "positive_ids": p, "positive_lengths": pl,
             "negative_ids": n[:, None], "negative_lengths": nl[:, None]}
    return batch, (q, qm), (p, pm), (n, nm)


def _torch_loss(model, batch_parts, symmetric):
    """The same loss in PyTorch: mean pool, cosine, InfoNCE, queries and passages through
    their own adapter (PEFT's active adapter switched between the forwards)."""
    (q, qm), (p, pm), (n, nm) = batch_parts

    def embed(ids, mask, adapter):
        model.set_adapter(adapter)
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.requires_grad_(True)  # set_adapter freezes the inactive adapter
        mask_t = torch.from_numpy(mask).float()
        h = model(input_ids=torch.from_numpy(ids).long(),
                  attention_mask=torch.from_numpy(mask).long()).last_hidden_state
        pooled = (h * mask_t[..., None]).sum(1) / mask_t.sum(1, keepdim=True)
        return torch.nn.functional.normalize(pooled, dim=-1)

    eq = embed(q, qm, "retrieval_query")
    ep = embed(p, pm, "retrieval_passage")
    en = embed(n, nm, "retrieval_passage")
    labels = torch.arange(len(q))
    logits = eq @ torch.cat([ep, en]).T / TEMPERATURE
    loss = torch.nn.functional.cross_entropy(logits, labels)
    if symmetric:
        loss = (loss + torch.nn.functional.cross_entropy(ep @ eq.T / TEMPERATURE, labels)) / 2
    return loss


def _peft_two_adapters(folder):
    from peft import PeftModel
    base = ref.peft_reference(folder, None)
    model = PeftModel.from_pretrained(base, os.path.join(folder, "retrieval_query"),
                                      adapter_name="retrieval_query")
    model.load_adapter(os.path.join(folder, "retrieval_passage"), adapter_name="retrieval_passage")
    return model.eval()


def _ours_in_peft_layout(grads, peft_names, cfg):
    """Our factor gradients under PEFT's names: fused qkv a = [a_q | a_k | a_v] (the slots the
    adapter has, in order), b block-diagonal; Linear A = a.T, B = b.T; Embedding likewise."""
    out = {}
    h = cfg.hidden_size
    for name in peft_names:
        module = name.split("base_model.model.")[1].rsplit(".lora_", 1)[0]
        parts = module.split(".")
        if parts[0] == "embeddings":
            node = grads["embeddings"]["word" if parts[1] == "word_embeddings" else "token_type"]
            out[name] = np.asarray(node["a" if "embedding_A" in name else "b"]).T
            continue
        if parts[0] == "pooler":
            node, layer = grads["pooler"]["dense"], None
        else:
            layer = int(parts[1])
            kind = parts[3]
            if kind in ("q_proj", "k_proj", "v_proj"):
                slots = [s for s in "qkv" if any(f"layers.{layer}.self_attn.{s}_proj." in n
                                                  for n in peft_names)]
                r = next(v for k, v in peft_names.items()
                         if f"layers.{layer}.self_attn.q_proj.lora_A" in k or
                         f"layers.{layer}.self_attn.{slots[0]}_proj.lora_A" in k).shape[0]
                j, col = slots.index(kind[0]), "qkv".index(kind[0])
                node = grads["layers"]["attn"]["qkv"]
                a = np.asarray(node["a"][layer])[:, j * r:(j + 1) * r]
                b = np.asarray(node["b"][layer])[j * r:(j + 1) * r, col * h:(col + 1) * h]
                out[name] = a.T if ".lora_A." in name else b.T
                continue
            group = "attn" if kind == "o_proj" else "mlp"
            node = grads["layers"][group]["out" if kind == "o_proj" else kind]
        a, b = np.asarray(node["a"]), np.asarray(node["b"])
        if layer is not None:
            a, b = a[layer], b[layer]
        out[name] = a.T if ".lora_A." in name else b.T
    return out


@pytest.mark.parametrize("symmetric, width", [(False, None), (True, 16)])
def test_lora_gradients_match_peft_autograd(transformers_dir, hf_config, symmetric, width):
    """width 16: queries and passages padded alike, so they run as ONE forward whose rows use
    different adapters (the mixed-task path); None: one forward per width."""
    model = JinaEmbeddingsV3.from_pretrained(transformers_dir)
    trainer = Trainer(model, Contrastive(temperature=TEMPERATURE, symmetric=symmetric),
                      optax.sgd(1.0), dropout=False)
    batch, *parts = contrastive_arrays(hf_config.vocab_size, width)
    loss, _, grads = trainer.gradients(trainer.init(), batch)

    peft_model = _peft_two_adapters(transformers_dir)
    torch_loss = _torch_loss(peft_model, parts, symmetric)
    assert abs(float(loss) - float(torch_loss.detach())) < 1e-5
    for task, folder in (("retrieval.query", "retrieval_query"),
                         ("retrieval.passage", "retrieval_passage")):
        named = {n: p for n, p in peft_model.named_parameters() if f".{folder}" in n}
        theirs = torch.autograd.grad(torch_loss, list(named.values()), retain_graph=True,
                                     allow_unused=True)
        theirs = {n.replace(f".{folder}", ""): (np.zeros(tuple(p.shape), np.float32) if g is None
                                                else g.numpy())
                  for (n, p), g in zip(named.items(), theirs)}
        ours = _ours_in_peft_layout(grads["adapters"][task], theirs, hf_config)
        assert set(ours) == set(theirs)
        for name, g in theirs.items():
            scale = max(np.abs(g).max(), 1e-6)
            err = np.abs(ours[name] - g).max() / scale
            assert err < 1e-4, (task, name, err)
        # Nothing beyond what PEFT has: the rest of our gradient tree is exactly zero.
        total = sum(float(np.sum(np.square(x))) for x in
                    jax.tree_util.tree_leaves(grads["adapters"][task]))
        matched = sum(float(np.sum(np.square(x))) for x in ours.values())
        assert abs(total - matched) <= 1e-6 * total, (task, total, matched)


# --- training behaviour ----------------------------------------------------------------------

def synthetic_pairs(n: int, seed: int = 0):
    """Queries of three words from one alphabet, passages of the *matching* words from another
    (a -> m, b -> n, ...), in a shuffled order: no token overlap, so an untrained model cannot
    pair them, but the mapping is learnable and carries over to unseen combinations."""
    import itertools
    rng = np.random.default_rng(seed)
    q_words, p_words = "abcdefghijkl", "mnopqrstuvwx"
    combos = list(itertools.combinations(range(12), 3))
    rng.shuffle(combos)
    pairs = []
    for c in combos[:n]:
        c = list(c)
        rng.shuffle(c)
        pairs.append((" ".join(q_words[i] for i in c), " ".join(p_words[i] for i in c)))
    return pairs


def flat_state(tree):
    return {jax.tree_util.keystr(p): np.asarray(x)
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_short_finetune_improves_recall_and_freezes_the_rest(transformers_dir):
    from jina_jax.training import contrastive_batch, recall_at_k

    model = JinaEmbeddingsV3.from_pretrained(transformers_dir)
    frozen_before = flat_state({"params": model.params, **{t: model.adapters[t] for t in
                                                       ("separation", "classification")}})
    pairs = synthetic_pairs(96)
    train, held_out = pairs[:64], pairs[64:]
    queries, passages = [q for q, _ in held_out], [p for _, p in held_out]
    before = recall_at_k(model, queries, passages, ks=(1,))["recall@1"]

    trainer = Trainer(model, Contrastive(), optax.adamw(3e-3), dropout=False)
    state = trainer.init()
    rng = np.random.default_rng(1)
    history = []
    for _ in range(40):
        idx = rng.choice(len(train), 16, replace=False)
        batch = contrastive_batch(model, [train[i][0] for i in idx], [train[i][1] for i in idx],
                                  max_length=16)
        state, metrics = trainer.step(state, batch)
        history.append(float(metrics["loss"]))
    trainer.update_model(state)
    after = recall_at_k(model, queries, passages, ks=(1,))["recall@1"]
    assert np.mean(history[-5:]) < 0.6 * np.mean(history[:5]), history
    assert after >= before + 0.15, (before, after)
    frozen_after = flat_state({"params": model.params, **{t: model.adapters[t] for t in
                                                      ("separation", "classification")}})
    for key, value in frozen_before.items():
        np.testing.assert_array_equal(value, frozen_after[key], err_msg=key)
    # PEFT's blocks stay blocks: the split q/k/v adapter's off-diagonal b is still zero.
    b = np.asarray(model.adapters["retrieval.query"]["layers"]["attn"]["qkv"]["b"])
    r, h = 3, b.shape[-1] // 3
    assert np.all(b[:, :r, h:] == 0) and np.any(b[:, :r, :h] != 0)


def test_optimizer_state_covers_trained_leaves_only(transformers_dir):
    model = JinaEmbeddingsV3.from_pretrained(transformers_dir)
    trainer = Trainer(model, Contrastive(), optax.adam(1e-3))
    state = trainer.init()
    assert set(state.params) == {"adapters"}
    assert set(state.params["adapters"]) == {"retrieval.query", "retrieval.passage"}
    n_trained = sum(x.size for x in jax.tree_util.tree_leaves(state.params))
    n_opt = sum(x.size for x in jax.tree_util.tree_leaves(state.opt_state))
    assert n_opt == 2 * n_trained + 1  # Adam's mu and nu, and its step count


def test_resume_gives_the_identical_next_step(transformers_dir, hf_config, tmp_path):
    model = JinaEmbeddingsV3.from_pretrained(transformers_dir)
    trainer = Trainer(model, Contrastive(symmetric=True), optax.adamw(1e-3), dropout=True)
    batch, *_ = contrastive_arrays(hf_config.vocab_size)
    state = trainer.init(seed=5)
    for _ in range(2):
        state, _ = trainer.step(state, batch)
    path = str(tmp_path / "state.safetensors")
    trainer.save_state(path, state)
    straight, m1 = trainer.step(state, batch)

    again = Trainer(JinaEmbeddingsV3.from_pretrained(transformers_dir),
                    Contrastive(symmetric=True), optax.adamw(1e-3), dropout=True)
    restored = again.restore(path)
    for key, value in flat_state(state).items():
        np.testing.assert_array_equal(value, flat_state(restored)[key], err_msg=key)
    resumed, m2 = again.step(restored, batch)
    assert float(m1["loss"]) == float(m2["loss"])
    for key, value in flat_state(straight).items():
        np.testing.assert_array_equal(value, flat_state(resumed)[key], err_msg=key)
    # Dropout really is on: another step's key gives another loss.
    other, m3 = trainer.step(straight, batch)
    assert float(m3["loss"]) != float(m1["loss"])


def test_restore_refuses_a_different_trainer(transformers_dir, tmp_path):
    model = JinaEmbeddingsV3.from_pretrained(transformers_dir)
    trainer = Trainer(model, Contrastive(), optax.adam(1e-3))
    path = str(tmp_path / "state.safetensors")
    trainer.save_state(path, trainer.init())
    other = Trainer(model, Contrastive(), optax.adam(1e-3), train=["retrieval.query"])
    with pytest.raises(ValueError, match="trains"):
        other.restore(path)
    sgd = Trainer(model, Contrastive(), optax.sgd(1e-3, momentum=0.9))
    with pytest.raises(ValueError, match="state.safetensors"):
        sgd.restore(path)


def _rel(a, b):
    a, b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return max(float(np.abs(np.asarray(x) - np.asarray(y)).max() /
                     max(np.abs(np.asarray(y)).max(), 1e-12)) for x, y in zip(a, b))


@pytest.mark.parametrize("remat", ["full", "dots", "dots_no_batch"])
def test_remat_changes_memory_not_gradients(transformers_dir, hf_config, remat):
    model = JinaEmbeddingsV3.from_pretrained(transformers_dir)
    batch, *_ = contrastive_arrays(hf_config.vocab_size)
    plain = Trainer(model, Contrastive(), optax.sgd(1.0), dropout=False)
    rematted = Trainer(model, Contrastive(), optax.sgd(1.0), dropout=False, remat=remat)
    g1 = plain.gradients(plain.init(), batch)[2]
    g2 = rematted.gradients(rematted.init(), batch)[2]
    assert _rel(g2, g1) < 1e-5


def test_gradient_accumulation_averages_micro_batches(transformers_dir, hf_config):
    model = JinaEmbeddingsV3.from_pretrained(transformers_dir)
    batch, *_ = contrastive_arrays(hf_config.vocab_size)
    single = Trainer(model, Contrastive(), optax.sgd(1.0), dropout=False)
    accumulated = Trainer(model, Contrastive(), optax.sgd(1.0), dropout=False, accumulate=2)
    state = single.init()
    halves = [{k: v[j::2] for k, v in batch.items()} for j in range(2)]
    parts = [single.gradients(state, h) for h in halves]
    loss, _, grads = accumulated.gradients(state, batch)
    mean = jax.tree_util.tree_map(lambda a, b: (a + b) / 2, parts[0][2], parts[1][2])
    assert _rel(grads, mean) < 1e-5
    assert abs(float(loss) - (float(parts[0][0]) + float(parts[1][0])) / 2) < 1e-6
    with pytest.raises(ValueError, match="multiple of devices"):
        accumulated.step(state, {k: v[:3] for k, v in batch.items()})


def test_bf16_compute_keeps_fp32_master_weights(transformers_dir, hf_config):
    model = JinaEmbeddingsV3.from_pretrained(transformers_dir)
    batch, *_ = contrastive_arrays(hf_config.vocab_size)
    fp32 = Trainer(model, Contrastive(), optax.adam(1e-3), dropout=False)
    bf16 = Trainer(model, Contrastive(), optax.adam(1e-3), dropout=False,
                   compute_dtype="bfloat16")
    state, metrics = bf16.step(bf16.init(), batch)
    assert all(x.dtype == np.float32 for x in jax.tree_util.tree_leaves(state.params))
    reference = float(fp32.gradients(fp32.init(), batch)[0])
    assert np.isfinite(float(metrics["loss"]))
    assert abs(float(metrics["loss"]) - reference) < 0.05 * abs(reference)  # bf16 rounding


def test_new_adapter_trains_and_exports(transformers_dir, hf_config, tmp_path):
    """A fresh rank-2 adapter (delta zero at first) trained on text-matching pairs with CoSENT,
    then served by Transformers + PEFT, by the release format and by our own loader."""
    from jina_jax.training import CoSENT

    model = JinaEmbeddingsV3.from_pretrained(transformers_dir)
    model.add_adapter("domain", rank=2, alpha=4.0, modules=["qkv", "fc1", "word"])
    ids, mask = ref.padded_batch(hf_config.vocab_size)
    base = np.asarray(model(ids, mask).last_hidden_state)
    np.testing.assert_array_equal(base, np.asarray(model(ids, mask, task="domain").last_hidden_state))

    a, al, am = _rows(hf_config.vocab_size, (5, 9, 3, 7), 4)
    b, bl, bm = _rows(hf_config.vocab_size, (6, 4, 8, 10), 5)
    batch = {"first_ids": a, "first_lengths": al, "second_ids": b, "second_lengths": bl,
             "score": np.array([0.1, 0.9, 0.5, 0.3], np.float32)}
    trainer = Trainer(model, CoSENT(task="domain"), optax.adam(1e-2), dropout=False)
    state = trainer.init()
    history = []
    for _ in range(8):
        state, metrics = trainer.step(state, batch)
        history.append(float(metrics["loss"]))
    assert history[-1] < history[0], history
    trainer.update_model(state)
    trained = np.asarray(model(ids, mask, task="domain").last_hidden_state)
    assert np.abs(trained - base).max() > 1e-3  # the adapter is no longer zero

    m = mask.astype(bool)
    hf = str(tmp_path / "hf")
    model.save_pretrained(hf, format="transformers")
    for task in model.tasks:
        ours = np.asarray(model(ids, mask, task=task).last_hidden_state)
        folder = task.replace(".", "_").replace("-", "_")
        theirs = ref.run(ref.peft_reference(hf, folder), ids, mask)[0]
        assert np.abs(ours - theirs)[m].max() < 1e-4, task
    # The release format, read back by the release's own formula in PyTorch (not our loader).
    import json

    from safetensors.torch import load_file
    orig = str(tmp_path / "orig-ref")
    model.save_pretrained(orig, format="original")
    stored = load_file(os.path.join(orig, "model.safetensors"))
    conf = json.load(open(os.path.join(orig, "config.json")))
    for task in (None,) + model.tasks:
        theirs = ref.run(ref.original_reference(stored, hf_config, task,
                                                tasks=conf["lora_adaptations"],
                                                scale=conf["lora_alpha"] / conf["lora_rank"]),
                         ids, mask)[0]
        ours = np.asarray(model(ids, mask, task=task).last_hidden_state)
        assert np.abs(ours - theirs)[m].max() < 1e-4, ("original", task)
    for fmt in ("original", "jina_jax", "transformers"):
        dst = str(tmp_path / fmt)
        model.save_pretrained(dst, format=fmt)
        again = JinaEmbeddingsV3.from_pretrained(dst)
        assert set(again.tasks) == set(model.tasks)
        for task in (None,) + model.tasks:
            x = np.asarray(again(ids, mask, task=task).last_hidden_state)
            y = np.asarray(model(ids, mask, task=task).last_hidden_state)
            assert np.abs(x - y)[m].max() < 1e-4, (fmt, task)


def test_cosent_matches_its_definition():
    from jina_jax import losses
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((5, 8)), rng.standard_normal((5, 8))
    scores = np.array([0.2, 0.9, 0.2, 0.5, 0.1])
    cos = np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1) * 20
    terms = [np.exp(cos[j] - cos[i]) for i in range(5) for j in range(5) if scores[i] > scores[j]]
    expected = np.log1p(np.sum(terms))
    assert abs(float(losses.cosent(a, b, scores)) - expected) < 1e-4 * expected


def test_training_bad_input(transformers_dir, tmp_path):
    model = JinaEmbeddingsV3.from_pretrained(transformers_dir)
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        Trainer(model, Contrastive(), optax.sgd(1.0), train=["nope"])
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        Trainer(model, Contrastive(query_task="nope"), optax.sgd(1.0))
    with pytest.raises(ValueError, match="train='head'"):
        Trainer(model, Contrastive(), optax.sgd(1.0), train="head")
    with pytest.raises(ValueError, match="unknown remat policy 'some'"):
        Trainer(model, Contrastive(), optax.sgd(1.0), remat="some")
    with pytest.raises(ValueError, match="rank must be a positive integer, got 0"):
        model.add_adapter("x", rank=0)
    with pytest.raises(ValueError, match="unknown adapter module"):
        model.add_adapter("x", rank=2, modules=["fc3"])
    with pytest.raises(ValueError, match="already exists"):
        model.add_adapter("retrieval_query", rank=2)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        model.save_pretrained(str(tmp_path / "missing" / "out"), format="transformers")
    trainer = Trainer(model, Contrastive(), optax.sgd(1.0))
    with pytest.raises(ValueError, match="same number of rows"):
        trainer.step(trainer.init(), {"query_ids": np.zeros((2, 4), np.int32),
                                      "query_lengths": np.ones((3,), np.int32)})
