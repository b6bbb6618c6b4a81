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


def _rows(vocab, lengths, seed):
    ids, mask = ref.padded_batch(vocab, lengths, seed=seed)
    return ids.astype(np.int32), mask.sum(1).astype(np.int32), mask


def contrastive_arrays(vocab):
    """A padded batch of 4 queries, 4 positives and one hard negative each (mixed lengths)."""
    (q, ql, qm), (p, pl, pm), (n, nl, nm) = (_rows(vocab, lengths, seed) for lengths, seed in
                                             ((Q_LENGTHS, 1), (P_LENGTHS, 2), (N_LENGTHS, 3)))
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


@pytest.mark.parametrize("symmetric", [False, True])
def test_lora_gradients_match_peft_autograd(transformers_dir, hf_config, symmetric):
    model = JinaEmbeddingsV3.from_pretrained(transformers_dir)
    trainer = Trainer(model, Contrastive(temperature=TEMPERATURE, symmetric=symmetric),
                      optax.sgd(1.0), dropout=False)
    batch, *parts = contrastive_arrays(hf_config.vocab_size)
    loss, _, grads = trainer.gradients(trainer.init(), batch)

    peft_model = _peft_two_adapters(transformers_dir)
    torch_loss = _torch_loss(peft_model, parts, symmetric)
    assert abs(float(loss) - float(torch_loss)) < 1e-5
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
