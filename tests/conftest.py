"""Session fixtures: reference checkpoints built once per test run with Transformers + PEFT."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402
import torch  # noqa: E402

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
    return folder


@pytest.fixture(scope="session")
def original_fp32(ckpt_root, transformers_dir):
    """Format A, fp32 storage: (folder, stored tensors)."""
    folder = str(ckpt_root / "original-fp32")
    return folder, ref.write_original(folder, transformers_dir, torch.float32)


@pytest.fixture(scope="session")
def original_bf16(ckpt_root, transformers_dir):
    """Format A, bf16 storage, as the release ships."""
    folder = str(ckpt_root / "original-bf16")
    return folder, ref.write_original(folder, transformers_dir, torch.bfloat16, seed=11)
