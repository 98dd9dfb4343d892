"""convert --max-shard-size output, read by the Hugging Face libraries themselves: a
DataParallel-saved ``transformers`` model converted into shards (safetensors or pt), with
its ``config.json`` beside them, loads through ``transformers.AutoModelForCausalLM`` and
through ``huggingface_hub.load_torch_model`` with every weight equal to the original's.

Needs ``transformers`` and ``huggingface_hub`` (the README's test command installs them).
Everything is local: the models are built from a config with a fixed seed, and
from_pretrained runs with ``local_files_only=True``, so nothing is downloaded."""

from __future__ import annotations

import json
import os

import pytest
import torch
import transformers
import factory
from compare import assert_same
from huggingface_hub import load_state_dict_from_file, load_torch_model
from torch import nn

import pyckpt

# tied: GPT2's default (lm_head.weight is transformer.wte.weight); untied in bfloat16: lm_head
# comes from its own entry, and from_pretrained(dtype="auto") keeps the dtype of config.json
VARIANTS = {"tied-float32": (True, torch.float32), "untied-bfloat16": (False, torch.bfloat16)}
FORMATS = {
    "safetensors": ("model-{:05d}-of-{:05d}.safetensors", "model.safetensors.index.json", "model.safetensors"),
    "pt": ("pytorch_model-{:05d}-of-{:05d}.bin", "pytorch_model.bin.index.json", "pytorch_model.bin"),
}
# safetensors asked for explicitly (no silent fall back to a .bin); pt shards with the defaults
USE_SAFETENSORS = {"safetensors": {"use_safetensors": True}, "pt": {}}
INPUT_IDS = torch.tensor([[3, 17, 42, 99, 127, 0, 64, 5]])


class Source:
    """The original model, its state dict, and the DataParallel checkpoint torch.save wrote."""

    def __init__(self, directory, tied: bool, dtype: torch.dtype, seed: int = 0) -> None:
        self.config = transformers.GPT2Config(
            n_layer=2, n_embd=64, n_head=2, vocab_size=128, n_positions=32, bos_token_id=0, eos_token_id=0,
            tie_word_embeddings=tied,
        )
        self.config.dtype = dtype  # written to config.json: what dtype="auto" loads as
        self.model = fresh_model(self.config, seed)
        self.reference = self.model.state_dict()
        self.path = str(directory / "src.pt")
        torch.save(factory.dp_state_dict(self.model), self.path)
        saved = torch.load(self.path, weights_only=True)
        assert list(saved) == [f"module.{key}" for key in self.reference]  # what convert has to strip
        self.total_bytes = sum(t.numel() * t.element_size() for t in self.reference.values())
        self.tied = tied
        self.dtype = dtype
        self.logits = logits(self.model)

    def write(self, out, fmt: str, max_shard_size) -> None:
        pyckpt.convert(self.path, out, max_shard_size=max_shard_size, format=fmt)  # strip_prefix="auto"
        self.config.save_pretrained(out)


def fresh_model(config, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(config).to(config.dtype).eval()


@pytest.fixture(scope="module", autouse=True)
def quiet_transformers():
    """No progress bars or config notices in the test output; restored afterwards."""
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    yield
    transformers.logging.enable_progress_bar()
    transformers.logging.set_verbosity(verbosity)


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Source]:
    made = {}
    for name, (tied, dtype) in VARIANTS.items():
        directory = tmp_path_factory.mktemp(name)
        made[name] = Source(directory, tied, dtype)
    return made


def assert_same_weights(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> None:
    """Same keys in the same order; per key same dtype, shape, stride and values."""
    assert list(got) == list(expected)
    for key, tensor in expected.items():
        value = got[key]
        assert value.dtype == tensor.dtype, (key, value.dtype, tensor.dtype)
        assert value.shape == tensor.shape, (key, value.shape, tensor.shape)
        assert value.stride() == tensor.stride(), (key, value.stride(), tensor.stride())
        assert torch.equal(value, tensor), f"{key}: values differ"


def assert_differs(expected: dict[str, torch.Tensor], model: nn.Module) -> None:
    """A model seeded otherwise starts with other weights, so equality afterwards proves the load."""
    state = model.state_dict()
    assert any(not torch.equal(state[key], value) for key, value in expected.items() if value.is_floating_point())


def assert_tied_as_before(source: Source, model: nn.Module) -> None:
    tied = model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    assert tied == source.tied


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(INPUT_IDS).logits


def shard_names(out, fmt: str) -> list[str]:
    """The shards the index names, checked against the directory: numbered 1..N, N > 2, nothing else."""
    numbered, index_name, _ = FORMATS[fmt]
    index = json.loads((out / index_name).read_text())
    names = sorted(set(index["weight_map"].values()))
    assert len(names) > 2 and names == [numbered.format(i, len(names)) for i in range(1, len(names) + 1)]
    assert sorted(os.listdir(out)) == sorted([*names, index_name, "config.json"])
    return names


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_transformers_from_pretrained_loads_shards(backend, sources, tmp_path, variant, fmt):
    source = sources[variant]
    out = tmp_path / "hf"
    source.write(out, fmt, max_shard_size=source.total_bytes // 4)
    shard_names(out, fmt)
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        out, local_files_only=True, dtype="auto", output_loading_info=True, **USE_SAFETENSORS[fmt]
    )
    assert type(model) is transformers.GPT2LMHeadModel
    assert set(info) >= {"missing_keys", "unexpected_keys", "mismatched_keys"} and not any(info.values()), info
    assert model.dtype == source.dtype
    assert_same_weights(source.reference, model.state_dict())
    assert_tied_as_before(source, model)
    assert torch.equal(logits(model), source.logits)


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_huggingface_hub_load_torch_model_loads_shards(backend, sources, tmp_path, variant, fmt):
    source = sources[variant]
    out = tmp_path / "hf"
    source.write(out, fmt, max_shard_size=source.total_bytes // 4)
    names = shard_names(out, fmt)
    safe = fmt == "safetensors"

    model = fresh_model(source.config, seed=1)
    assert_differs(source.reference, model)
    result = load_torch_model(model, out, strict=True, safe=safe)
    assert not result.missing_keys and not result.unexpected_keys, result
    assert_same_weights(source.reference, model.state_dict())
    assert_tied_as_before(source, model)
    assert torch.equal(logits(model), source.logits)

    # each shard on its own: exactly the keys the index gives it, as the original held them
    index = json.loads((out / FORMATS[fmt][1]).read_text())
    seen: list[str] = []
    for name in names:
        shard = load_state_dict_from_file(out / name, safe=safe)
        assert set(shard) == {key for key, file in index["weight_map"].items() if file == name}
        for key, tensor in shard.items():
            assert_same({key: source.reference[key]}, {key: tensor})
        seen.extend(shard)
        if fmt == "pt" and source.tied and "lm_head.weight" in shard:  # one storage in the pt shard
            assert shard["lm_head.weight"].data_ptr() == shard["transformer.wte.weight"].data_ptr()
    assert sorted(seen) == sorted(source.reference)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_one_shard_loads_without_an_index(backend, sources, tmp_path, fmt):
    source = sources["tied-float32"]
    out = tmp_path / "hf"
    source.write(out, fmt, max_shard_size="5GB")
    single = FORMATS[fmt][2]
    assert sorted(os.listdir(out)) == ["config.json", single]

    model = transformers.AutoModelForCausalLM.from_pretrained(
        out, local_files_only=True, dtype="auto", **USE_SAFETENSORS[fmt]
    )
    assert_same_weights(source.reference, model.state_dict())
    assert_tied_as_before(source, model)
    assert torch.equal(logits(model), source.logits)

    fresh = fresh_model(source.config, seed=1)
    assert_differs(source.reference, fresh)
    result = load_torch_model(fresh, out, strict=True, safe=fmt == "safetensors")
    assert not result.missing_keys and not result.unexpected_keys, result
    assert_same_weights(source.reference, fresh.state_dict())

    # the file itself, as huggingface_hub reads it (loading into a model would hide a dtype change)
    stored = load_state_dict_from_file(out / single, safe=fmt == "safetensors")
    assert sorted(stored) == sorted(source.reference)
    for key, tensor in stored.items():
        assert_same({key: source.reference[key]}, {key: tensor})
    if fmt == "pt":  # tied weights stay one storage in a pt file
        assert stored["lm_head.weight"].data_ptr() == stored["transformer.wte.weight"].data_ptr()


def test_shards_with_kept_metadata_load_in_huggingface_hub(backend, sources, tmp_path):
    source = sources["tied-float32"]
    checkpoint = {"state_dict": torch.load(source.path, weights_only=True), "epoch": 3, "arch": "gpt2"}
    torch.save(checkpoint, tmp_path / "with_metadata.pt")
    out = tmp_path / "hf"
    pyckpt.convert(str(tmp_path / "with_metadata.pt"), out, max_shard_size=source.total_bytes // 4)
    source.config.save_pretrained(out)
    names = shard_names(out, "safetensors")

    model = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True, dtype="auto")
    assert_same_weights(source.reference, model.state_dict())  # transformers 5 does not look at the metadata

    fresh = fresh_model(source.config, seed=1)
    load_torch_model(fresh, out, strict=True)  # refused without "format": "pt" in the metadata
    assert_same_weights(source.reference, fresh.state_dict())
    for key, tensor in load_state_dict_from_file(out / names[0]).items():
        assert_same({key: source.reference[key]}, {key: tensor})
