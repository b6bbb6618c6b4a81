"""Session fixtures: reference checkpoints built once per test run with Transformers + PEFT.

The reference stack (torch, Transformers, PEFT) is imported by the fixtures that need it, so the
pure-JAX unit tests run without it installed.
"""

import json
import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One compilation cache for the session (and the CLI processes it starts), never the user's.
os.environ.setdefault("JINA_JAX_COMPILATION_CACHE", tempfile.mkdtemp(prefix="jina-jax-xla-"))

import shutil  # noqa: E402

import pytest  # noqa: E402

from convert.random_checkpoint import write_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def ref():
    from tests import reference

    return reference


@pytest.fixture(scope="session")
def ckpt_root(tmp_path_factory):
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="session")
def hf_config(ref):
    return ref.make_config()


@pytest.fixture(scope="session")
def transformers_dir(ref, ckpt_root, hf_config):
    """Transformers format: base weights + five PEFT LoRA folders."""
    folder = str(ckpt_root / "transformers")
    ref.write_transformers(folder, ref.random_base(hf_config))
    write_tokenizer(folder, hf_config.vocab_size)
    # The Transformers format keeps task instructions where sentence-transformers does.
    with open(os.path.join(folder, "config_sentence_transformers.json"), "w") as f:
        json.dump({"prompts": ref.INSTRUCTIONS, "default_prompt_name": None}, f)
    return folder


@pytest.fixture(scope="session")
def original_fp32(ref, ckpt_root, transformers_dir):
    """The release format, fp32 storage: (folder, stored tensors)."""
    import torch

    folder = str(ckpt_root / "original-fp32")
    stored = ref.write_original(folder, transformers_dir, torch.float32)
    shutil.copy(os.path.join(transformers_dir, "tokenizer.json"), folder)
    return folder, stored


@pytest.fixture(scope="session")
def original_bf16(ref, ckpt_root, transformers_dir):
    """The release format, bf16 storage, as the release ships."""
    import torch

    folder = str(ckpt_root / "original-bf16")
    return folder, ref.write_original(folder, transformers_dir, torch.bfloat16, seed=11)


@pytest.fixture(scope="session")
def tiny_release(ckpt_root):
    """A tiny random release-format checkpoint (bf16, 2 layers, 32 wide, vocab 300) written by
    `convert.random_checkpoint`: no reference stack needed, loads in milliseconds."""
    from convert.random_checkpoint import write_random_release
    from jina_jax.config import JinaConfig

    folder = str(ckpt_root / "tiny-release")
    write_random_release(folder, JinaConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2,
                                            num_attention_heads=2, intermediate_size=64))
    return folder
