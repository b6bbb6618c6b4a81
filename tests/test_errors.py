"""Every way a checkpoint or a call can be wrong gets one clear error naming what is at fault."""

import json
import os
import shutil
import struct

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from convert import CheckpointError, detect_format
from jina_jax import JinaEmbeddingsV3


@pytest.fixture
def b_copy(tmp_path, transformers_dir):
    dst = tmp_path / "b"
    shutil.copytree(transformers_dir, dst)
    return dst


@pytest.fixture
def a_copy(tmp_path, original_fp32):
    dst = tmp_path / "a"
    shutil.copytree(original_fp32[0], dst)
    return dst


def _edit_weights(folder, edit, name="model.safetensors"):
    path = os.path.join(folder, name)
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def test_missing_config(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        JinaEmbeddingsV3.from_pretrained(tmp_path)


def test_missing_weights(b_copy):
    os.remove(b_copy / "model.safetensors")
    with pytest.raises(CheckpointError, match="no weights"):
        JinaEmbeddingsV3.from_pretrained(b_copy)


def test_unknown_format(b_copy):
    (b_copy / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CheckpointError, match="unknown checkpoint format.*'bert'"):
        detect_format(str(b_copy))


def test_unknown_key(b_copy):
    _edit_weights(b_copy, lambda t: t.update({"encoder.layers.0.mixer.rotary.inv_freq": np.ones(3, np.float32)}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: key 'encoder\.layers\.0\.mixer\.rotary\.inv_freq'"):
        JinaEmbeddingsV3.from_pretrained(b_copy)


def test_missing_key(a_copy):
    _edit_weights(a_copy, lambda t: t.pop("roberta.encoder.layers.2.norm2.bias"))
    with pytest.raises(CheckpointError, match=r"missing key.*encoder\.layers\.2\.norm2\.bias"):
        JinaEmbeddingsV3.from_pretrained(a_copy)


def test_shape_disagrees_with_config(b_copy):
    _edit_weights(b_copy, lambda t: t.update({"encoder.layers.1.mlp.fc1.weight": np.zeros((70, 48), np.float32)}))
    with pytest.raises(CheckpointError, match=r"'encoder\.layers\.1\.mlp\.fc1\.weight' has shape \[48, 70\]"):
        JinaEmbeddingsV3.from_pretrained(b_copy)


def test_layer_beyond_config(b_copy):
    _edit_weights(b_copy, lambda t: t.update({"encoder.layers.9.norm1.bias": np.zeros(48, np.float32)}))
    with pytest.raises(CheckpointError, match="layer 9.*num_hidden_layers=3"):
        JinaEmbeddingsV3.from_pretrained(b_copy)


def test_corrupt_header(b_copy):
    path = b_copy / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[10:20] = b"\xff" * 10
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt safetensors header"):
        JinaEmbeddingsV3.from_pretrained(b_copy)


def test_truncated_file(a_copy):
    path = a_copy / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated file: key '.*'"):
        JinaEmbeddingsV3.from_pretrained(a_copy)


def test_not_safetensors(b_copy):
    (b_copy / "model.safetensors").write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        JinaEmbeddingsV3.from_pretrained(b_copy)


def test_header_length_past_end(b_copy):
    (b_copy / "model.safetensors").write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        JinaEmbeddingsV3.from_pretrained(b_copy)


def test_adapter_folder_without_config(b_copy):
    os.remove(b_copy / "separation" / "adapter_config.json")
    with pytest.raises(CheckpointError, match=r"separation: adapter weights without adapter_config\.json"):
        JinaEmbeddingsV3.from_pretrained(b_copy)


def test_dora_is_refused(b_copy):
    path = b_copy / "classification" / "adapter_config.json"
    conf = json.loads(path.read_text())
    conf["use_dora"] = True
    path.write_text(json.dumps(conf))
    with pytest.raises(CheckpointError, match=r"classification/adapter_config\.json: DoRA"):
        JinaEmbeddingsV3.from_pretrained(b_copy)


def test_other_peft_type_is_refused(b_copy):
    path = b_copy / "classification" / "adapter_config.json"
    conf = json.loads(path.read_text())
    conf["peft_type"] = "IA3"
    path.write_text(json.dumps(conf))
    with pytest.raises(CheckpointError, match="peft_type 'IA3' is not LoRA"):
        JinaEmbeddingsV3.from_pretrained(b_copy)


def test_adapter_rank_disagrees_with_config(b_copy):
    path = b_copy / "text_matching" / "adapter_config.json"
    conf = json.loads(path.read_text())
    conf["r"] = 5
    path.write_text(json.dumps(conf))
    with pytest.raises(CheckpointError, match=r"text_matching/adapter_model\.safetensors: key .* has rank 6"):
        JinaEmbeddingsV3.from_pretrained(b_copy)


def test_adapter_factor_without_partner(b_copy):
    def drop(t):
        t.pop("base_model.model.layers.0.mlp.fc1.lora_B.weight")
    _edit_weights(b_copy / "text_matching", drop, "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match=r"fc1\.lora_A\.weight' has no matching lora_B"):
        JinaEmbeddingsV3.from_pretrained(b_copy)


def test_adapter_unknown_key(b_copy):
    def add(t):
        t["base_model.model.layers.0.mlp.fc3.lora_A.weight"] = np.zeros((6, 48), np.float32)
    _edit_weights(b_copy / "text_matching", add, "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match=r"key 'base_model\.model\.layers\.0\.mlp\.fc3"):
        JinaEmbeddingsV3.from_pretrained(b_copy)


def test_release_lora_rank_disagrees_with_config(a_copy):
    path = a_copy / "config.json"
    conf = json.loads(path.read_text())
    conf["lora_rank"] = 4
    path.write_text(json.dumps(conf))
    with pytest.raises(CheckpointError, match="has rank 3, but config.json says lora_rank=4"):
        JinaEmbeddingsV3.from_pretrained(a_copy)


def test_release_task_count_disagrees(a_copy):
    path = a_copy / "config.json"
    conf = json.loads(path.read_text())
    conf["lora_adaptations"] = conf["lora_adaptations"][:4]
    path.write_text(json.dumps(conf))
    with pytest.raises(CheckpointError, match=r"expected \[4 tasks"):
        JinaEmbeddingsV3.from_pretrained(a_copy)


def test_missing_folder_or_bad_hub_id(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        JinaEmbeddingsV3.from_pretrained(str(tmp_path / "nope" / "deeper" / "x"))


# --- calls ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model(transformers_dir):
    return JinaEmbeddingsV3.from_pretrained(transformers_dir)


def test_unknown_task_lists_valid_ones(model):
    with pytest.raises(ValueError, match=r"unknown task 'retrieval'.*'retrieval\.query'.*'text-matching'"):
        model(np.zeros((1, 3), np.int32), task="retrieval")


def test_unknown_task_in_mixed_batch_names_row(model):
    with pytest.raises(ValueError, match=r"task\[1\]: unknown task 'nope'"):
        model(np.zeros((2, 3), np.int32), task=["separation", "nope"])


def test_mixed_task_length_mismatch(model):
    with pytest.raises(ValueError, match="task has 1 entries but there are 2 rows"):
        model(np.zeros((2, 3), np.int32), task=["separation"])


def test_token_outside_vocab_names_index(model):
    ids = np.zeros((2, 4), np.int32)
    ids[1, 2] = 500
    with pytest.raises(ValueError, match=r"input_ids\[1, 2\] = 500 is outside the vocabulary"):
        model(ids)


def test_too_long(model):
    with pytest.raises(ValueError, match="exceeds max_position_embeddings 40"):
        model(np.zeros((1, 41), np.int32))


def test_mask_shape(model):
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model(np.zeros((1, 4), np.int32), np.ones((1, 5), np.int32))


def test_bad_dtype_name(transformers_dir):
    with pytest.raises(ValueError, match="dtype 'float8'"):
        JinaEmbeddingsV3.from_pretrained(transformers_dir, dtype="float8")
