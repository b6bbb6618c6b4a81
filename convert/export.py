"""Our trees -> the Transformers format with one PEFT LoRA folder per task.

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
import shutil

import numpy as np

from .formats import TOKENIZER_FILES
from .names import RELEASE_MODULES, TORCH_LEAF
from .safetensors_io import write

# Target module path -> Transformers' runtime module names, which PEFT keys use (q, k, v for
# the fused qkv; none for LayerNorms, which carry no adapters).
_RUNTIME = {
    ("embeddings", "word"): ["embeddings.word_embeddings"],
    ("embeddings", "token_type"): ["embeddings.token_type_embeddings"],
    ("layers", "attn", "qkv"): ["layers.{}.self_attn.q_proj", "layers.{}.self_attn.k_proj",
                                "layers.{}.self_attn.v_proj"],
    ("layers", "attn", "out"): ["layers.{}.self_attn.o_proj"],
    ("layers", "mlp", "fc1"): ["layers.{}.mlp.fc1"],
    ("layers", "mlp", "fc2"): ["layers.{}.mlp.fc2"],
    ("pooler", "dense"): ["pooler.dense"],
}


def _hf_config(cfg) -> dict:
    return {
        "architectures": ["JinaEmbeddingsV3Model"], "model_type": "jina_embeddings_v3",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "intermediate_size": cfg.intermediate_size, "hidden_act": cfg.hidden_act,
        "hidden_dropout_prob": cfg.hidden_dropout_prob,
        "attention_probs_dropout_prob": cfg.attention_probs_dropout_prob,
        "max_position_embeddings": cfg.max_position_embeddings,
        "type_vocab_size": cfg.type_vocab_size, "layer_norm_eps": cfg.layer_norm_eps,
        "pad_token_id": cfg.pad_token_id, "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id, "tie_word_embeddings": True,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
    }


def _base_tensors(params_flat: dict, cfg) -> dict:
    out = {}
    for path, value in params_flat.items():
        module, leaf = path[:-1], path[-1]
        name = RELEASE_MODULES[module]
        value = np.asarray(value, np.float32)
        layers = range(cfg.num_hidden_layers) if module[0] == "layers" else [None]
        for i in layers:
            v = value[i] if i is not None else value
            if leaf == "kernel":
                v = v.T  # [in, out] -> PyTorch [out, in]
            out[f"{name.format(i)}.{TORCH_LEAF[leaf]}"] = np.ascontiguousarray(v)
    return out


def _adapter_tensors(adapter: dict, cfg):
    """PEFT tensors for one adapter tree, and {runtime module suffix: rank} for rank_pattern."""
    from .tree import flatten

    tensors, ranks = {}, {}
    modules = {path[:-1] for path in flatten(adapter)}
    for module in sorted(modules):
        node = adapter
        for key in module:
            node = node[key]
        a, b = np.asarray(node["a"], np.float32), np.asarray(node["b"], np.float32)
        runtime = _RUNTIME[module]
        embedding = module[0] == "embeddings"
        layers = range(cfg.num_hidden_layers) if module[0] == "layers" else [None]
        for i in layers:
            la, lb = (a[i], b[i]) if i is not None else (a, b)
            cols = lb.shape[1] // len(runtime)
            for j, name in enumerate(runtime):
                name = f"base_model.model.{name.format(i)}"
                block = lb[:, j * cols:(j + 1) * cols]
                if embedding:  # A [r, V], B [H, r]
                    tensors[f"{name}.lora_embedding_A"] = np.ascontiguousarray(la.T)
                    tensors[f"{name}.lora_embedding_B"] = np.ascontiguousarray(block.T)
                else:  # A [r, in], B [out, r]
                    tensors[f"{name}.lora_A.weight"] = np.ascontiguousarray(la.T)
                    tensors[f"{name}.lora_B.weight"] = np.ascontiguousarray(block.T)
                ranks[name.split(".")[-1]] = la.shape[1]
    return tensors, ranks


def save_transformers(folder: str, cfg, params_flat: dict, adapters: dict, scales: dict,
                      source_folder: str | None = None) -> None:
    """Writes `folder` in the Transformers format plus one PEFT LoRA folder per task."""
    os.makedirs(folder, exist_ok=True)
    write(_base_tensors(params_flat, cfg), os.path.join(folder, "model.safetensors"),
          metadata={"format": "pt"})
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(_hf_config(cfg), f, indent=2)
    with open(os.path.join(folder, "config_sentence_transformers.json"), "w") as f:
        json.dump({"prompts": dict(cfg.task_instructions), "default_prompt_name": None}, f,
                  indent=2)
    for task, adapter in adapters.items():
        tensors, ranks = _adapter_tensors(adapter, cfg)
        sub = os.path.join(folder, task.replace(".", "_").replace("-", "_"))
        os.makedirs(sub, exist_ok=True)
        write(tensors, os.path.join(sub, "adapter_model.safetensors"), metadata={"format": "pt"})
        scale = float(scales[task])
        rank = max(ranks.values(), default=1)
        conf = {
            "peft_type": "LORA", "task_type": None, "r": rank, "lora_alpha": scale * rank,
            "target_modules": sorted(ranks), "lora_dropout": 0.0, "bias": "none",
            "use_rslora": False, "use_dora": False, "fan_in_fan_out": False,
            "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
            "rank_pattern": {m: r for m, r in ranks.items() if r != rank},
            "alpha_pattern": {m: scale * r for m, r in ranks.items() if r != rank},
            "base_model_name_or_path": None,
        }
        with open(os.path.join(sub, "adapter_config.json"), "w") as f:
            json.dump(conf, f, indent=2)
    if source_folder and os.path.abspath(source_folder) != os.path.abspath(folder):
        for name in TOKENIZER_FILES:
            path = os.path.join(source_folder, name)
            if os.path.isfile(path) and name != "config_sentence_transformers.json":
                shutil.copyfile(path, os.path.join(folder, name))
