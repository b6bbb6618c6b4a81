"""Our trees -> the Transformers format with one PEFT LoRA folder per task, or the release's own
single-file format.

The base weights go under the names Transformers itself writes (`encoder.layers.3.mixer.Wqkv.weight`,
`emb_ln.weight`, ...); each adapter becomes a PEFT folder whose keys use the runtime names
(`base_model.model.layers.3.self_attn.q_proj.lora_A.weight`). The fused qkv factors split
exactly: a @ b restricted to the q columns is a @ b[:, q], so q, k and v share A and take their
own block of B. Ranks that differ per module go in `rank_pattern`, and `alpha_pattern` carries
alpha = scale * rank so that PEFT's alpha / r gives back our scale for every module.
"""

from __future__ import annotations

import json
import os

import numpy as np

from jina_jax.architecture import BY_PATH, release_key
from jina_jax.files import writes_folder
from jina_jax.tree import flatten, get_path

from .formats import copy_tokenizer
from .safetensors_io import Lazy, write


def _architecture(cfg) -> dict:
    """The size, dropout and special-token fields both formats' `config.json` spell alike."""
    names = (
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "hidden_act",
        "hidden_dropout_prob",
        "attention_probs_dropout_prob",
        "max_position_embeddings",
        "type_vocab_size",
        "layer_norm_eps",
        "pad_token_id",
        "bos_token_id",
        "eos_token_id",
    )
    return {name: getattr(cfg, name) for name in names}


def _hf_config(cfg) -> dict:
    return {
        "architectures": ["JinaEmbeddingsV3Model"],
        "model_type": "jina_embeddings_v3",
        **_architecture(cfg),
        "tie_word_embeddings": True,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
    }


def _base_tensors(params: dict, cfg) -> dict:
    out = {}
    for path, value in flatten(params).items():
        module, leaf = path[:-1], path[-1]
        value = np.asarray(value, np.float32)
        layers = range(cfg.num_hidden_layers) if BY_PATH[module].layered else [None]
        for i in layers:
            v = value[i] if i is not None else value
            if leaf == "kernel":
                v = v.T  # [in, out] -> PyTorch [out, in]
            out[release_key(module, leaf, i)] = np.ascontiguousarray(v)
    return out


def _adapter_tensors(adapter: dict, cfg, prefix: str = ""):
    """PEFT tensors for one adapter tree, and {runtime module suffix: rank} for rank_pattern.
    prefix: "roberta." when the adapter is for a head model (its encoder sits there)."""
    tensors, ranks = {}, {}
    modules = {path[:-1] for path in flatten(adapter)}
    for module in sorted(modules):
        node = get_path(adapter, module)
        a, b = np.asarray(node["a"], np.float32), np.asarray(node["b"], np.float32)
        runtime = BY_PATH[module].runtime
        embedding = BY_PATH[module].kind == "embed"
        layers = range(cfg.num_hidden_layers) if BY_PATH[module].layered else [None]
        for i in layers:
            la, lb = (a[i], b[i]) if i is not None else (a, b)
            cols = lb.shape[1] // len(runtime)
            for j, name in enumerate(runtime):
                name = f"base_model.model.{prefix}{name.format(i)}"
                block = lb[:, j * cols : (j + 1) * cols]
                if embedding:  # A [r, V], B [H, r]
                    tensors[f"{name}.lora_embedding_A"] = np.ascontiguousarray(la.T)
                    tensors[f"{name}.lora_embedding_B"] = np.ascontiguousarray(block.T)
                else:  # A [r, in], B [out, r]
                    tensors[f"{name}.lora_A.weight"] = np.ascontiguousarray(la.T)
                    tensors[f"{name}.lora_B.weight"] = np.ascontiguousarray(block.T)
                ranks[name.split(".")[-1]] = la.shape[1]
    return tensors, ranks


def peft_folder_name(task: str) -> str:
    """The PEFT subfolder of a task ("retrieval.query" -> "retrieval_query")."""
    return task.replace(".", "_").replace("-", "_")


def write_peft_adapter(sub: str, adapter: dict, cfg, scale: float, prefix: str = "") -> None:
    """One PEFT LoRA folder (`adapter_config.json`, `adapter_model.safetensors`) in the existing
    folder `sub`, loadable with `PeftModel.from_pretrained` onto Transformers' model."""
    tensors, ranks = _adapter_tensors(adapter, cfg, prefix)
    write(tensors, os.path.join(sub, "adapter_model.safetensors"), metadata={"format": "pt"})
    scale = float(scale)
    rank = max(ranks.values(), default=1)
    conf = {
        "peft_type": "LORA",
        "task_type": None,
        "r": rank,
        "lora_alpha": scale * rank,
        "target_modules": sorted(ranks),
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "rank_pattern": {m: r for m, r in ranks.items() if r != rank},
        "alpha_pattern": {m: scale * r for m, r in ranks.items() if r != rank},
        "base_model_name_or_path": None,
    }
    with open(os.path.join(sub, "adapter_config.json"), "w") as f:
        json.dump(conf, f, indent=2)


_HEAD_CLASSES = {
    "masked_lm": "JinaEmbeddingsV3ForMaskedLM",
    "sequence_classification": "JinaEmbeddingsV3ForSequenceClassification",
    "token_classification": "JinaEmbeddingsV3ForTokenClassification",
    "question_answering": "JinaEmbeddingsV3ForQuestionAnswering",
}


# save_transformers and save_original take the same arguments: packed, not one a line.
@writes_folder
def save_transformers(
    folder: str, cfg, params: dict, adapters: dict, scales: dict, source_folder: str | None = None,
    heads: dict | None = None, head: tuple[str, int | None] | None = None,
) -> None:  # fmt: skip
    """Writes `folder` in the Transformers format plus one PEFT LoRA folder per task.

    heads: head tensors (checkpoint names) to write beside the encoder, which then goes under
    `roberta.` as Transformers' head models save it; head: (kind, num_labels) of the model's own
    head, which names the architecture in config.json. Written whole or not at all (an existing
    folder is replaced).
    """
    tensors = _base_tensors(params, cfg)
    if heads:
        tensors = {"roberta." + k: v for k, v in tensors.items()}
        tensors.update({k: np.asarray(v, np.float32) for k, v in heads.items()})
    write(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    config = _hf_config(cfg)
    if head is not None:
        kind, num_labels = head
        config["architectures"] = [_HEAD_CLASSES[kind]]
        if num_labels is not None:
            config["id2label"] = {str(i): f"LABEL_{i}" for i in range(num_labels)}
            config["label2id"] = {f"LABEL_{i}": i for i in range(num_labels)}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(folder, "config_sentence_transformers.json"), "w") as f:
        json.dump(
            {"prompts": dict(cfg.task_instructions), "default_prompt_name": None}, f, indent=2
        )
    for task, adapter in adapters.items():
        sub = os.path.join(folder, peft_folder_name(task))
        os.makedirs(sub, exist_ok=True)
        write_peft_adapter(sub, adapter, cfg, scales[task], "roberta." if heads else "")
    copy_tokenizer(source_folder, folder, skip=("config_sentence_transformers.json",))


# --- the release's single-file format -------------------------------------------------------


def release_config(cfg, **extra) -> dict:
    """The release's `config.json` (model_type "xlm-roberta", rotary, task fields) for `cfg`."""
    return {
        "architectures": ["XLMRobertaLoRA"],
        "model_type": "xlm-roberta",
        "position_embedding_type": "rotary",
        "rotary_emb_base": cfg.rope_theta,
        **_architecture(cfg),
        "lora_adaptations": list(cfg.lora_adaptations),
        "lora_rank": cfg.lora_rank,
        "lora_alpha": cfg.lora_alpha,
        "lora_dropout_p": 0.1,
        "task_instructions": dict(cfg.task_instructions),
        "matryoshka_dimensions": list(cfg.matryoshka_dimensions),
        "truncate_dim": cfg.truncate_dim,
        "use_flash_attn": True,
        **extra,
    }


@writes_folder
def save_original(
    folder: str, cfg, params: dict, adapters: dict, scales: dict, source_folder: str | None = None,
    heads: dict | None = None,
) -> None:  # fmt: skip
    """Writes the release layout: `roberta.`-prefixed keys, every Linear and Embedding
    parametrized with all tasks' factors stacked [T, ...] (fp32).

    The format has one rank and one scale for everything. Ranks are zero-padded to the largest
    (a @ b unchanged); modules an adapter lacks get zero factors; when the tasks' scales differ,
    each task's scale is folded into its B and lora_alpha = rank (scale 1). Written whole or
    not at all (an existing folder is replaced).
    """
    tasks = list(adapters)
    if not tasks:
        raise ValueError("the original format stacks task adapters; this model has none")
    factors = {t: flatten(a) for t, a in adapters.items()}
    rank = max(np.shape(v)[-1] for f in factors.values() for p, v in f.items() if p[-1] == "a")
    shared = len({float(scales[t]) for t in tasks}) == 1
    scale = float(scales[tasks[0]]) if shared else 1.0
    fold = {t: 1.0 if shared else float(scales[t]) for t in tasks}
    n_layers = cfg.num_hidden_layers

    def stacked(module, leaf, kernel_shape, layer):
        """[T, ...] in the release layout for one module (one layer)."""
        rows, cols = kernel_shape
        embedding = module[0] == "embeddings"
        a_all = np.zeros((len(tasks), rows, rank), np.float32)
        b_all = np.zeros((len(tasks), rank, cols), np.float32)
        for i, t in enumerate(tasks):
            a, b = factors[t].get(module + ("a",)), factors[t].get(module + ("b",))
            if a is None:
                continue
            a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
            if layer is not None:
                a, b = a[layer], b[layer]
            a_all[i, :, : a.shape[-1]] = a
            b_all[i, : b.shape[0]] = b * fold[t]
        if embedding:  # A [T, V, r], B [T, r, H]
            return a_all if leaf == "lora_A" else b_all
        # Linear: A [T, r, in], B [T, out, r]
        return (a_all if leaf == "lora_A" else b_all).transpose(0, 2, 1)

    tensors = {}
    for path, value in flatten(params).items():
        module, leaf = path[:-1], path[-1]
        layered = BY_PATH[module].layered
        layers = range(n_layers) if layered else [None]
        shape = tuple(np.shape(value))[1:] if layered else tuple(np.shape(value))
        for layer in layers:
            name = "roberta." + BY_PATH[module].release_name(layer)

            def base(value=value, layer=layer, leaf=leaf):
                v = np.asarray(value[layer] if layer is not None else value, np.float32)
                return v.T if leaf == "kernel" else v

            torch_shape = shape[::-1] if leaf == "kernel" else shape
            if leaf not in ("kernel", "embedding"):
                tensors["roberta." + release_key(module, leaf, layer)] = Lazy(
                    shape, np.float32, base
                )
                continue
            tensors[f"{name}.parametrizations.weight.original"] = Lazy(
                torch_shape, np.float32, base
            )
            for factor in ("lora_A", "lora_B"):
                made = stacked(module, factor, shape, layer)
                tensors[f"{name}.parametrizations.weight.0.{factor}"] = made
    tensors.update({k: np.asarray(v, np.float32) for k, v in (heads or {}).items()})
    write(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    config = release_config(cfg.replace(lora_adaptations=tuple(tasks)), torch_dtype="float32")
    config.update(lora_rank=rank, lora_alpha=scale * rank)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    copy_tokenizer(source_folder, folder)
