"""Session fixtures: reference checkpoints built once per test run with Transformers + PEFT."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import json  # noqa: E402
import shutil  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from convert.random_checkpoint import write_tokenizer  # noqa: E402
from tests import reference as ref  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def ckpt_root(tmp_path_factory):
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="session")
def hf_config():
    return ref.make_config()


@pytest.fixture(scope="session")
def transformers_dir(ckpt_root, hf_config):
    """Format B: base weights + five PEFT LoRA folders."""
    folder = str(ckpt_root / "transformers")
    ref.write_transformers(folder, ref.random_base(hf_config))
    write_tokenizer(folder, hf_config.vocab_size)
    # Format B keeps task instructions where sentence-transformers does.
    with open(os.path.join(folder, "config_sentence_transformers.json"), "w") as f:
        json.dump({"prompts": ref.INSTRUCTIONS, "default_prompt_name": None}, f)
    return folder


@pytest.fixture(scope="session")
def original_fp32(ckpt_root, transformers_dir):
    """Format A, fp32 storage: (folder, stored tensors)."""
    folder = str(ckpt_root / "original-fp32")
    stored = ref.write_original(folder, transformers_dir, torch.float32)
    shutil.copy(os.path.join(transformers_dir, "tokenizer.json"), folder)
    return folder, stored


@pytest.fixture(scope="session")
def original_bf16(ckpt_root, transformers_dir):
    """Format A, bf16 storage, as the release ships."""
    folder = str(ckpt_root / "original-bf16")
    return folder, ref.write_original(folder, transformers_dir, torch.bfloat16, seed=11)
