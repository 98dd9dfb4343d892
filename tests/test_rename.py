"""strip_prefix / rename: which mappings are renamed, how, and _metadata with them."""

from __future__ import annotations

import collections

import factory
import pytest
import torch
from compare import assert_same

import pyckpt
from pyckpt.rename import make_key_map, rename_metadata, module_map_for, strip_auto


@pytest.mark.parametrize(
    "key, expected",
    [
        ("module.layer.weight", "layer.weight"),
        ("module.module.layer.weight", "layer.weight"),
        ("_orig_mod.layer.weight", "layer.weight"),
        ("module._orig_mod.layer.weight", "layer.weight"),
        ("_orig_mod.module.layer.weight", "layer.weight"),
        ("layers.0._fsdp_wrapped_module.weight", "layers.0.weight"),
        ("_fsdp_wrapped_module.layers.0._fsdp_wrapped_module._checkpoint_wrapped_module.w", "layers.0.w"),
        ("layer.module.weight", "layer.module.weight"),  # only a *leading* run is stripped
        ("modules.x", "modules.x"),
        ("weight", "weight"),
    ],
)
def test_strip_auto(key, expected):
    assert strip_auto(key) == expected


def test_explicit_prefix_and_regex_rules_apply_in_order():
    key_map = make_key_map("module.", [(r"^encoder\.", "backbone."), (r"\.weight$", ".w")])
    assert key_map("module.encoder.layer.weight") == "backbone.layer.w"
    assert key_map("encoder.bias") == "backbone.bias"
    assert key_map("other.module.weight") == "other.module.w"


def test_consume_prefix_parity_for_single_segment(backend, tmp_path):
    net = factory.seeded_net()
    path = factory.save(factory.dp_state_dict(net), tmp_path / "dp.pt")
    expected = torch.load(path, weights_only=True)
    torch.nn.modules.utils.consume_prefix_in_state_dict_if_present(expected, "module.")
    got = pyckpt.load(path, strip_prefix="module.")
    assert_same(expected, got)
    assert_same(net.state_dict(), got)  # including _metadata: the inner module's versions


def test_multi_segment_prefix_metadata_is_right_where_torch_is_wrong(backend, tmp_path):
    """torch's consume_prefix drops the inner modules' _metadata for 'module._orig_mod.'."""
    net = factory.seeded_net()
    path = factory.save(factory.dp_state_dict(torch.compile(net)), tmp_path / "dp_compiled.pt")
    got = pyckpt.load(path, strip_prefix="auto")
    assert list(got.keys()) == list(net.state_dict().keys())
    assert got._metadata == net.state_dict()._metadata
    assert got._metadata["block.1"]["version"] == 2  # BatchNorm's version survives


def test_renaming_applies_to_nested_state_dicts_only(backend, tmp_path):
    checkpoint = factory.training_checkpoint()
    path = factory.save(checkpoint, tmp_path / "train.pt")
    got = pyckpt.load(path, strip_prefix="auto")
    reference = torch.load(path, weights_only=True)
    assert list(got["state_dict"]) == [k.removeprefix("module.") for k in reference["state_dict"]]
    # the optimizer state (int keys), hyperparameters and other entries are untouched
    assert_same(reference["optimizer"], got["optimizer"])
    assert_same(reference["hparams"], got["hparams"])
    assert got["epoch"] == 3 and list(got) == list(reference)
    for key, value in reference["state_dict"].items():
        assert torch.equal(got["state_dict"][key.removeprefix("module.")], value)


def test_renamed_tensors_keep_sharing(backend, tmp_path):
    path = factory.save({"module.a": (base := torch.randn(4)), "module.b": base[1:]}, tmp_path / "s.pt")
    got = pyckpt.load(path, strip_prefix="auto")
    assert got["b"].untyped_storage().data_ptr() == got["a"].untyped_storage().data_ptr()


def test_key_order_is_preserved(backend, tmp_path):
    keys = [f"module.k{i}" for i in (5, 1, 9, 0, 3)]
    path = factory.save(collections.OrderedDict((k, torch.ones(1)) for k in keys), tmp_path / "o.pt")
    assert list(pyckpt.load(path, strip_prefix="auto")) == [k.removeprefix("module.") for k in keys]


def test_collision_names_both_keys(backend, tmp_path):
    path = factory.save({"module.w": torch.ones(1), "w": torch.zeros(1)}, tmp_path / "c.pt")
    with pytest.raises(pyckpt.CheckpointError) as error:
        pyckpt.load(path, strip_prefix="auto")
    message = str(error.value)
    assert "'module.w'" in message and "'w'" in message and str(path) in message
    assert isinstance(error.value, pyckpt.KeyCollisionError)


def test_mappings_with_non_tensor_values_are_not_renamed(backend, tmp_path):
    path = factory.save({"module.lr": 0.1, "module.w": torch.ones(1)}, tmp_path / "mixed.pt")
    assert list(pyckpt.load(path, strip_prefix="auto")) == ["module.lr", "module.w"]


def test_metadata_renaming_keeps_wrapped_module_entries():
    metadata = collections.OrderedDict(
        [("", {"version": 99}), ("module", {"version": 1}), ("module.bn", {"version": 2})]
    )
    renamed = rename_metadata(metadata, module_map_for(strip_auto))
    assert renamed == collections.OrderedDict([("", {"version": 1}), ("bn", {"version": 2})])
    fsdp = collections.OrderedDict(
        [("layer", {"version": 5}), ("layer._fsdp_wrapped_module", {"version": 1}), ("layer._fsdp_wrapped_module.bn", {"version": 2})]
    )
    assert rename_metadata(fsdp, module_map_for(strip_auto)) == collections.OrderedDict(
        [("layer", {"version": 1}), ("layer.bn", {"version": 2})]
    )


def test_bad_arguments_are_type_errors(backend, tmp_path):
    path = factory.save({"w": torch.ones(1)}, tmp_path / "w.pt")
    with pytest.raises(TypeError):
        pyckpt.load(path, strip_prefix=3)
    with pytest.raises(TypeError):
        pyckpt.load(path, rename="module.=")
