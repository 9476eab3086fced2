"""Test set-up: Triton's interpreter on CPU-only machines (set before triton is first imported), offline HF."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

if not torch.cuda.is_available():
    # The Triton kernels themselves run on the CPU under the interpreter (tiny sizes only: it is slow).
    os.environ["TRITON_INTERPRET"] = "1"

import pytest

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: OpenMP fan-out only adds contention on a 2-core box (two test workers)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok():
    """The integrations' in-process word-level tokenizer (nothing downloaded)."""
    from fastpref.testing.toy import toy_tokenizer

    return toy_tokenizer()
