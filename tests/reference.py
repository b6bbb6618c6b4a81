"""Builds reference checkpoints with the live Transformers + PEFT stack (test time only).

Everything here is the *reference*: the Transformers-format folders are written by Transformers and PEFT
themselves, and release-format folders are assembled from the same Transformers weights in the release's
layout, with the release's LoRA formula applied in PyTorch for the reference outputs.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import JinaEmbeddingsV3Config, JinaEmbeddingsV3Model

torch.set_num_threads(1)

TASKS = ("retrieval.query", "retrieval.passage", "separation", "classification", "text-matching")
INSTRUCTIONS = {"retrieval.query": "Q: ", "retrieval.passage": "P: ", "separation": "",
                "classification": "", "text-matching": ""}

# Deliberately untidy: odd head count, head_dim 16, rope_theta not 20000, eps not 1e-5.
SMALL = dict(vocab_size=120, hidden_size=48, num_hidden_layers=3, num_attention_heads=3,
             intermediate_size=72, max_position_embeddings=40, layer_norm_eps=1e-6,
             rope_parameters={"rope_type": "default", "rope_theta": 1234.5})

# One PEFT config per task: different ranks, alphas, module subsets, rsLoRA and patterns.
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"]
PEFT_ADAPTERS = {
    "retrieval_query": dict(r=3, lora_alpha=5, target_modules=ALL_LINEAR + [
        "word_embeddings", "token_type_embeddings", "dense"]),
    "retrieval_passage": dict(r=2, lora_alpha=3, use_rslora=True,
                              target_modules=["q_proj", "v_proj", "fc2", "word_embeddings"]),
    "separation": dict(r=5, lora_alpha=2, target_modules=ALL_LINEAR,
                       rank_pattern={"fc1": 2}, alpha_pattern={"o_proj": 7}),
    "classification": dict(r=3, lora_alpha=4, target_modules=["q_proj", "k_proj", "fc1"],
                           layers_to_transform=[1], layers_pattern="layers"),
    "text_matching": dict(r=6, lora_alpha=1.5, target_modules=["word_embeddings", "fc1", "dense"]),
}

# The release format: all LoRA-parametrized modules, rank 3, alpha 2 (scale 2/3).
A_RANK, A_ALPHA = 3, 2.0
_A_LINEARS = ("mixer.Wqkv", "mixer.out_proj", "mlp.fc1", "mlp.fc2")


def make_config(**overrides) -> JinaEmbeddingsV3Config:
    return JinaEmbeddingsV3Config(**{**SMALL, **overrides})


def random_base(cfg: JinaEmbeddingsV3Config, seed: int = 0, cls=JinaEmbeddingsV3Model):
    """A Transformers model (`cls`: the encoder or a head model) with every weight random:
    norms and biases off their defaults."""
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower():
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.3 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.2)
    return model


def write_transformers(folder: str, model, adapters=PEFT_ADAPTERS, seed: int = 1) -> None:
    """The Transformers format: `save_pretrained` of the base (or head) model, plus one PEFT folder per task."""
    shutil.rmtree(folder, ignore_errors=True)
    model.save_pretrained(folder)
    for i, (name, kw) in enumerate(adapters.items()):
        torch.manual_seed(seed + i)
        fresh = type(model).from_pretrained(folder).eval()
        peft_model = get_peft_model(fresh, LoraConfig(init_lora_weights=False, **kw),
                                    adapter_name=name)
        with torch.no_grad():
            # PEFT's non-zero init draws embedding factors from N(0, 1): a delta of std ~3 on a
            # table of std 0.2, where logits over the tied table reach the hundreds and fp32
            # rounding alone exceeds 1e-4. Scaled to a delta about the table's size.
            for n, p in peft_model.named_parameters():
                if "lora_embedding_B" in n:
                    p.mul_(0.1)
        tmp = folder + "-peft"
        peft_model.save_pretrained(tmp)
        shutil.move(os.path.join(tmp, name), os.path.join(folder, name))
        shutil.rmtree(tmp)


def peft_reference(folder: str, task_folder: str | None, cls=JinaEmbeddingsV3Model) -> torch.nn.Module:
    base = cls.from_pretrained(folder).eval()
    if task_folder is None:
        return base
    return PeftModel.from_pretrained(base, os.path.join(folder, task_folder)).eval()


def write_original(folder: str, transformers_folder: str, dtype=torch.float32, seed: int = 7,
                   with_pooler: bool = True) -> dict:
    """The release (original) format from a Transformers-format base: `roberta.` prefix, parametrized weights, stacked LoRA for
    all five tasks on every Linear and Embedding. Returns the LoRA factors (torch, fp32, as
    stored) for the reference."""
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    base = load_file(os.path.join(transformers_folder, "model.safetensors"))
    hf_cfg = json.load(open(os.path.join(transformers_folder, "config.json")))
    g = torch.Generator().manual_seed(seed)
    n_tasks = len(TASKS)
    out = {}
    for key, value in base.items():
        module = key.rsplit(".", 1)[0]
        if not with_pooler and module.startswith("pooler"):
            continue
        parametrized = key.endswith(".weight") and (
            module.endswith(_A_LINEARS) or module.endswith("_embeddings") or module == "pooler.dense")
        if not parametrized:
            out["roberta." + key] = value
            continue
        out[f"roberta.{module}.parametrizations.weight.original"] = value
        if module.endswith("_embeddings"):  # A [T, V, r], B [T, r, H]
            a = torch.randn(n_tasks, value.shape[0], A_RANK, generator=g) * 0.3
            b = torch.randn(n_tasks, A_RANK, value.shape[1], generator=g) * 0.2
        else:  # A [T, r, in], B [T, out, r]
            a = torch.randn(n_tasks, A_RANK, value.shape[1], generator=g) * 0.3
            b = torch.randn(n_tasks, value.shape[0], A_RANK, generator=g) * 0.2
        out[f"roberta.{module}.parametrizations.weight.0.lora_A"] = a
        out[f"roberta.{module}.parametrizations.weight.0.lora_B"] = b
    out = {k: v.to(dtype).contiguous() for k, v in out.items()}
    save_file(out, os.path.join(folder, "model.safetensors"))
    config = {
        "architectures": ["XLMRobertaLoRA"], "model_type": "xlm-roberta",
        "position_embedding_type": "rotary",
        "rotary_emb_base": hf_cfg["rope_parameters"]["rope_theta"],
        "lora_adaptations": list(TASKS), "lora_rank": A_RANK, "lora_alpha": A_ALPHA,
        "lora_dropout_p": 0.1, "task_instructions": INSTRUCTIONS,
        "matryoshka_dimensions": [8, 16, 32, 48], "truncate_dim": None, "use_flash_attn": True,
        **{k: hf_cfg[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers",
                                   "num_attention_heads", "intermediate_size", "hidden_act",
                                   "max_position_embeddings", "type_vocab_size",
                                   "layer_norm_eps", "pad_token_id", "bos_token_id",
                                   "eos_token_id")},
    }
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    # What the file holds, back in fp32: the reference sees exactly the stored values.
    return {k: v.float() for k, v in out.items()}


_RUNTIME = [("encoder.layers.", "layers."), ("mixer.out_proj", "self_attn.o_proj"),
            ("norm1", "post_attention_layernorm"), ("norm2", "post_mlp_layernorm"),
            ("emb_ln", "embeddings.LayerNorm")]


def original_reference(stored: dict, cfg: JinaEmbeddingsV3Config, task: str | None,
                       with_pooler: bool = True, tasks=TASKS,
                       scale: float = A_ALPHA / A_RANK) -> JinaEmbeddingsV3Model:
    """A Transformers model carrying the release's weights for `task`, merged by the release's
    formula in PyTorch: W_t = W + s * B[t] @ A[t] (Linear), E_t = E + s * A[t] @ B[t] (Embedding)."""
    t = None if task is None else list(tasks).index(task)
    state = {}
    for key, value in stored.items():
        key = key[len("roberta."):]
        if ".lora_" in key:
            continue
        if key.endswith(".parametrizations.weight.original"):
            module = key[: -len(".parametrizations.weight.original")]
            if t is not None:
                a = stored[f"roberta.{module}.parametrizations.weight.0.lora_A"][t]
                b = stored[f"roberta.{module}.parametrizations.weight.0.lora_B"][t]
                value = value + scale * (a @ b if module.endswith("_embeddings") else b @ a)
            key = module + ".weight"
        for old, new in _RUNTIME:
            key = key.replace(old, new)
        if ".mixer.Wqkv." in key:
            for name, part in zip("qkv", value.chunk(3, dim=0)):
                state[key.replace("mixer.Wqkv", f"self_attn.{name}_proj")] = part
        else:
            state[key] = value
    model = JinaEmbeddingsV3Model(cfg, add_pooling_layer=with_pooler).eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and not missing, (missing, unexpected)
    return model


def run(model, ids: np.ndarray, mask: np.ndarray):
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids).long(),
                    attention_mask=torch.from_numpy(mask).long())
    pooled = None if out.pooler_output is None else out.pooler_output.numpy()
    return out.last_hidden_state.numpy(), pooled


def padded_batch(vocab: int, lengths=(11, 7, 1, 4), seed: int = 3, left: bool = False):
    """ids, mask [B, max(lengths)]: `<s> ... </s>` rows of mixed lengths, padded with id 1."""
    rng = np.random.default_rng(seed)
    width = max(lengths)
    ids = np.ones((len(lengths), width), np.int64)
    mask = np.zeros((len(lengths), width), np.int64)
    for i, n in enumerate(lengths):
        row = rng.integers(3, vocab, size=n)
        row[0], row[-1] = 0, 2
        sl = slice(width - n, width) if left else slice(0, n)
        ids[i, sl], mask[i, sl] = row, 1
    return ids, mask
