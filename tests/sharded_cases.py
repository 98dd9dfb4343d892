"""Sharded Hugging Face checkpoints for the tests: written shard by shard with each format's own
library, and directories whose index lies about its shards (read by the Python package in
test_sharded_input.py and by the C++ API in test_cpp_api.py, with the same messages)."""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file


def write_sharded(directory, state_dict, *, shard_keys: list[list[str]], kinds: list[str], index_name=None):
    """HF-style shards: ``kinds[i]`` ("safetensors" or "bin") for the keys ``shard_keys[i]``."""
    os.makedirs(directory, exist_ok=True)
    count = len(shard_keys)
    weight_map = {}
    for number, (keys, kind) in enumerate(zip(shard_keys, kinds), start=1):
        name = f"model-{number:05d}-of-{count:05d}." + ("safetensors" if kind == "safetensors" else "bin")
        part = {key: state_dict[key].clone() for key in keys}  # safetensors refuses tied weights
        if kind == "safetensors":
            save_file(part, os.path.join(directory, name))
        else:
            torch.save(part, os.path.join(directory, name))
        weight_map.update({key: name for key in keys})
    ordered = {key: weight_map[key] for key in state_dict if key in weight_map}
    total = sum(t.numel() * t.element_size() for t in state_dict.values())
    index_name = index_name or ("model.safetensors.index.json" if kinds[0] == "safetensors" else "pytorch_model.bin.index.json")
    with open(os.path.join(directory, index_name), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": ordered}, f)
    return os.path.join(directory, index_name)


def rewrite_index(index, change):
    with open(index) as f:
        document = json.load(f)
    change(document)
    with open(index, "w") as f:
        json.dump(document, f)


def lying_sharded_checkpoints(tmp_path):
    """Sharded directories whose index lies, each with the message both readers must give."""
    state_dict = {f"module.l{i}": torch.full((2,), float(i)) for i in range(4)}
    keys = list(state_dict)

    def made(name, change=None, extra=None):
        index = write_sharded(tmp_path / name, state_dict, shard_keys=[keys[:2], keys[2:]], kinds=["safetensors"] * 2)
        if change is not None:
            rewrite_index(index, change)
        if extra is not None:
            extra(tmp_path / name)
        return tmp_path / name

    def first_shard(document):
        return next(iter(document["weight_map"].values()))

    return {
        "missing shard": (made("missing", extra=lambda d: os.remove(d / "model-00002-of-00002.safetensors")),
                          "shard 'model-00002-of-00002.safetensors' named by the index is missing"),
        "dotdot": (made("dotdot", lambda d: d["weight_map"].update({keys[0]: "../outside.safetensors"})),
                   "shard '../outside.safetensors' is not a file name beside the index"),
        "absolute": (made("absolute", lambda d: d["weight_map"].update({keys[0]: "/etc/passwd"})),
                     "shard '/etc/passwd' is not a file name beside the index"),
        "key in two shards": (made("two", extra=lambda d: save_file(
            {keys[0]: state_dict[keys[0]], keys[2]: state_dict[keys[2]], keys[3]: state_dict[keys[3]]},
            d / "model-00002-of-00002.safetensors")),
            f"keys the index does not list there, e.g. '{keys[0]}' (the index puts it in 'model-00001-of-00002"),
        "unlisted key": (made("unlisted", lambda d: d["weight_map"].pop(keys[3])),
                         f"shard holds 1 keys the index does not list there, e.g. '{keys[3]}'"),
        "listed key absent": (made("absent", lambda d: d["weight_map"].update({"module.ghost": first_shard(d)})),
                              "the index lists 1 keys in this shard that it does not hold, e.g. 'module.ghost'"),
        "no weight_map": (made("nomap", lambda d: d.pop("weight_map")), "index has no weight_map"),
        "not json": (made("notjson", extra=lambda d: (d / "model.safetensors.index.json").write_text("{\"weight_map\": ")),
                     "index is not valid JSON"),
    }
