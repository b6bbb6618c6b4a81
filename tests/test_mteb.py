"""The MTEB encoder: MTEB's own task metadata and prompt types pick the adapters MTEB's jina
wrapper picks, and `mteb.evaluate` runs on an in-memory task (no downloads) with the scores an
independent computation gives."""

import mteb
import numpy as np
import pytest
from datasets import Dataset
from mteb.types import PromptType
from scipy.stats import spearmanr

from jina_jax import JinaEmbeddingsV3
from jina_jax.mteb import MTEBEncoder


@pytest.fixture(scope="module")
def encoder(transformers_dir):
    return MTEBEncoder(JinaEmbeddingsV3.from_pretrained(transformers_dir), max_length=32)


@pytest.mark.parametrize("task, prompt_type, adapter", [
    ("SciFact", PromptType.query, "retrieval.query"),
    ("SciFact", PromptType.document, "retrieval.passage"),
    ("TwentyNewsgroupsClustering", None, "separation"),
    ("AskUbuntuDupQuestions", None, "separation"),           # reranking
    ("Banking77Classification", None, "classification"),
    ("SprintDuplicateQuestions", None, "classification"),    # pair classification
    ("STS12", None, "text-matching"),
    ("BUCC", None, "text-matching"),                          # bitext mining
    ("SummEval", None, "text-matching"),
])
def test_task_types_pick_mtebs_adapters(encoder, task, prompt_type, adapter):
    assert encoder.adapter_for(mteb.get_task(task).metadata, prompt_type) == adapter


def test_encode_through_mtebs_data_loader(encoder):
    from torch.utils.data import DataLoader

    texts = ["a cat sits", "dogs run fast", "", "the sun"]
    loader = DataLoader(Dataset.from_dict({"text": texts}), batch_size=3)
    metadata = mteb.get_task("SciFact").metadata
    got = encoder.encode(loader, task_metadata=metadata, hf_split="test", hf_subset="default",
                         prompt_type=PromptType.query)
    np.testing.assert_array_equal(got, encoder.model.encode(texts, task="retrieval.query",
                                                            max_length=32))


def test_evaluate_an_in_memory_sts_task(encoder):
    first = ["a cat", "dogs run", "the sun rises", "red apples", "a quiet lake"]
    second = ["a kitten", "cars drive", "the moon sets", "green apples", "a calm pond"]
    scores = [4.5, 1.0, 2.0, 3.0, 4.0]
    task = mteb.get_task("STS12")
    task.dataset = {"default": {"test": Dataset.from_dict(
        {"sentence1": first, "sentence2": second, "score": scores})}}
    task.data_loaded = True
    result = mteb.evaluate(encoder, task, cache=None, overwrite_strategy="always")
    main = result.task_results[0].get_score()
    a = encoder.model.encode(first, task="text-matching", max_length=32)
    b = encoder.model.encode(second, task="text-matching", max_length=32)
    expected = spearmanr(scores, (a * b).sum(1)).statistic
    assert main == pytest.approx(expected, abs=1e-6)
