"""pyckpt.load_state_dict: torch's results and errors, whatever the wrapping on either side."""

from __future__ import annotations

import collections
import io
import zipfile

import factory
import pytest
import torch
from torch import nn

import pyckpt


def assert_models_equal(expected: nn.Module, got: nn.Module) -> None:
    e, g = expected.state_dict(), got.state_dict()
    assert list(e) == list(g)
    for key in e:
        assert e[key].dtype == g[key].dtype and torch.equal(e[key], g[key]), key


def fresh_net(seed: int = 123) -> factory.Net:
    torch.manual_seed(seed)
    return factory.Net()


def test_dataparallel_checkpoint_into_plain_model(backend, tmp_path):
    source = factory.seeded_net()
    path = factory.save(factory.dp_state_dict(source), tmp_path / "dp.pt")
    target = fresh_net()
    with pytest.raises(RuntimeError, match="Missing key"):
        target.load_state_dict(torch.load(path, weights_only=True))
    result = pyckpt.load_state_dict(target, path)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert_models_equal(source, target)


@pytest.mark.parametrize("wrap", ["dataparallel", "compile", "dp_of_compile"])
def test_plain_checkpoint_into_wrapped_model(backend, tmp_path, wrap):
    source = factory.seeded_net()
    path = factory.save(source.state_dict(), tmp_path / "plain.pt")
    inner = fresh_net()
    model = {
        "dataparallel": lambda: nn.DataParallel(inner),
        "compile": lambda: torch.compile(inner),
        "dp_of_compile": lambda: nn.DataParallel(torch.compile(inner)),
    }[wrap]()
    result = pyckpt.load_state_dict(model, path)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert_models_equal(source, inner)


def test_fsdp_inner_prefixes(backend, tmp_path):
    source = factory.seeded_net()
    fsdp_keys = collections.OrderedDict(
        (key.replace("block.", "_fsdp_wrapped_module.block._fsdp_wrapped_module.").replace("head.", "head._checkpoint_wrapped_module."), value)
        for key, value in source.state_dict().items()
    )
    path = factory.save(fsdp_keys, tmp_path / "fsdp.pt")
    target = fresh_net()
    result = pyckpt.load_state_dict(target, path)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert_models_equal(source, target)


@pytest.mark.parametrize("entry", ["state_dict", "model"])
def test_finds_state_dict_in_training_checkpoints(backend, tmp_path, entry):
    source = factory.seeded_net()
    path = factory.save({"epoch": 2, entry: source.state_dict(), "optimizer": {}}, tmp_path / "t.pt")
    target = fresh_net()
    pyckpt.load_state_dict(target, path)
    assert_models_equal(source, target)


def test_key_argument_picks_the_entry(backend, tmp_path):
    source, other = factory.seeded_net(1), factory.seeded_net(2)
    path = factory.save({"ema": source.state_dict(), "student": other.state_dict()}, tmp_path / "t.pt")
    with pytest.raises(pyckpt.CheckpointError, match="several entries"):
        pyckpt.load_state_dict(fresh_net(), path)
    target = fresh_net()
    pyckpt.load_state_dict(target, path, key="ema")
    assert_models_equal(source, target)
    with pytest.raises(pyckpt.CheckpointError, match="no entry 'missing'"):
        pyckpt.load_state_dict(target, path, key="missing")


def test_strict_errors_match_torch(backend, tmp_path):
    source = factory.seeded_net()
    state = source.state_dict()
    del state["head.weight"]
    state["extra.weight"] = torch.ones(1)
    path = factory.save(state, tmp_path / "partial.pt")
    with pytest.raises(RuntimeError) as expected:
        fresh_net().load_state_dict(torch.load(path, weights_only=True))
    with pytest.raises(RuntimeError) as got:
        pyckpt.load_state_dict(fresh_net(), path)
    assert str(got.value) == str(expected.value)
    torch_result = fresh_net().load_state_dict(torch.load(path, weights_only=True), strict=False)
    ours = pyckpt.load_state_dict(fresh_net(), path, strict=False)
    assert ours.missing_keys == torch_result.missing_keys
    assert ours.unexpected_keys == torch_result.unexpected_keys


def test_size_mismatch_names_the_key(backend, tmp_path):
    path = factory.save(factory.Net(width=4).state_dict(), tmp_path / "small.pt")
    with pytest.raises(RuntimeError) as expected:
        fresh_net().load_state_dict(torch.load(path, weights_only=True))
    with pytest.raises(RuntimeError) as got:
        pyckpt.load_state_dict(fresh_net(), path)
    assert "size mismatch for block.0.weight" in str(got.value)
    assert str(got.value) == str(expected.value)


def test_writes_into_existing_parameter_memory(backend, tmp_path):
    source = factory.seeded_net()
    path = factory.save(factory.dp_state_dict(source), tmp_path / "dp.pt")
    target = fresh_net()
    before = {k: v.data_ptr() for k, v in target.state_dict().items()}
    pyckpt.load_state_dict(target, path)
    assert {k: v.data_ptr() for k, v in target.state_dict().items()} == before
    assert_models_equal(source, target)
    assert target.head.weight is target.embed.weight  # the model's own tying is untouched


def _untied_checkpoint(winner: str) -> dict[str, torch.Tensor]:
    """A state dict of factory.Net whose two tied keys hold different bytes, head first: the
    checkpoint's order is not the model's, where embed comes first and head's copy lands last."""
    state = dict(factory.seeded_net(seed=4).state_dict())
    torch.manual_seed(5)
    head = torch.randn(16, 8)
    if winner == "staged":  # head stored as a transposed view: torch's copy_, not a direct fill
        head = torch.randn(8, 16).t()
    elif winner == "filled, the other staged":  # embed copied by torch's copy_, head filled directly
        state["embed.weight"] = torch.randn(8, 16).t()
    elif winner == "wrong shape":  # torch refuses the loser: size mismatch for embed.weight
        state["embed.weight"] = torch.randn(16, 4)
    return {"head.weight": head, **{k: v for k, v in state.items() if k != "head.weight"}}


@pytest.mark.parametrize(
    "layout, winner",
    [(layout, winner) for layout in ("pt", "safetensors", "shards", "dcp") for winner in ("filled", "wrong shape")]
    + [("pt", "staged"), ("pt", "filled, the other staged")],  # safetensors stores contiguous tensors only
)
def test_keys_tied_in_the_model_end_with_torchs_last_copy(backend, tmp_path, layout, winner):
    """Different bytes under two keys the model ties: torch copies in the model's order, so the
    later key's bytes stay, whatever order the file holds them in and whichever file holds them."""
    from safetensors.torch import save_file
    from sharded_cases import write_sharded

    state = _untied_checkpoint(winner)
    if layout == "pt":
        path = factory.save(state, tmp_path / "untied.pt")
    elif layout == "safetensors":
        path = str(tmp_path / "untied.safetensors")
        save_file(state, path)
    elif layout == "dcp":
        import warnings

        import torch.distributed.checkpoint as dcp

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
            dcp.save(state, checkpoint_id=str(tmp_path / "dcp"))
        path = tmp_path / "dcp"
    else:  # head.weight alone in the first shard, embed.weight in the last
        keys = list(state)
        write_sharded(tmp_path / "m", state, shard_keys=[keys[:1], keys[1:-1], keys[-1:]], kinds=["safetensors"] * 3)
        path = tmp_path / "m"
    expected, got = fresh_net(), fresh_net()
    if winner == "wrong shape":
        with pytest.raises(RuntimeError) as torch_error:
            expected.load_state_dict(state)
        with pytest.raises(RuntimeError) as ours:
            pyckpt.load_state_dict(got, path)
        assert "size mismatch for embed.weight" in str(ours.value)
        assert str(ours.value) == str(torch_error.value)
        return
    expected.load_state_dict(state)
    assert torch.equal(expected.embed.weight, state["head.weight"])  # the oracle: head's copy stays
    pyckpt.load_state_dict(got, path)
    assert_models_equal(expected, got)
    assert got.head.weight is got.embed.weight


@pytest.mark.parametrize("variant", ["file", "deflate", "buffer"])
def test_direct_fill_never_copies_the_checkpoint_in_ram(backend, tmp_path, monkeypatch, variant):
    """No tensor the size of a parameter is allocated on the way, even where nothing can be mapped."""
    source = nn.Linear(512, 512)
    path = factory.save(source.state_dict(), tmp_path / "l.pt")
    if variant == "deflate":
        path = factory.rezip(path, str(tmp_path / "d.pt"), zipfile.ZIP_DEFLATED)
    elif variant == "buffer":
        path = io.BytesIO(open(path, "rb").read())
    target = nn.Linear(512, 512)
    allocations = []
    real_empty = torch.empty

    def tracking_empty(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        allocations.append(out.numel() * out.element_size())
        return out

    monkeypatch.setattr(torch, "empty", tracking_empty)
    pyckpt.load_state_dict(target, path)
    assert max(allocations, default=0) < 512 * 512 * 4
    assert torch.equal(target.weight, source.weight)


@pytest.mark.parametrize("variant", ["deflate", "buffer"])
def test_unmappable_inputs_fill_directly_too(backend, tmp_path, variant):
    source = factory.seeded_net()
    path = factory.save(source.state_dict(), tmp_path / "p.pt")
    target = fresh_net()
    if variant == "deflate":
        f = factory.rezip(path, str(tmp_path / "d.pt"), zipfile.ZIP_DEFLATED)
    else:
        f = io.BytesIO(open(path, "rb").read())
    pyckpt.load_state_dict(target, f)
    assert_models_equal(source, target)


def test_dtype_conversion_and_noncontiguous_sources_go_through_torch(backend, tmp_path):
    source = nn.Linear(6, 4)
    state = {"weight": source.weight.detach().double().t().contiguous().t(), "bias": source.bias.detach().half()}
    path = factory.save(state, tmp_path / "odd.pt")
    target = nn.Linear(6, 4)
    expected = nn.Linear(6, 4)
    expected.load_state_dict(torch.load(path, weights_only=True))
    pyckpt.load_state_dict(target, path)
    assert_models_equal(expected, target)


def test_batchnorm_metadata_version_is_honoured(backend, tmp_path):
    """An old BatchNorm checkpoint (version 1, no num_batches_tracked) loads like torch loads it."""
    source = factory.seeded_net()
    state = factory.dp_state_dict(source)
    del state["module.block.1.num_batches_tracked"]
    state._metadata["module.block.1"]["version"] = 1
    path = factory.save(state, tmp_path / "old_bn.pt")
    target = fresh_net()
    result = pyckpt.load_state_dict(target, path)
    assert result.missing_keys == []
    assert target.block[1].num_batches_tracked.item() == 0


def test_assign_matches_torch(backend, tmp_path):
    source = factory.seeded_net()
    path = factory.save(source.state_dict(), tmp_path / "p.pt")
    with torch.device("meta"):
        target = factory.Net()
    pyckpt.load_state_dict(target, path, assign=True)
    assert_models_equal(source, target)
    assert isinstance(target.block[0].weight, nn.Parameter)
    assert target.block[0].weight.requires_grad


def test_not_a_state_dict(backend, tmp_path):
    path = factory.save({"epoch": 1, "lr": 0.1}, tmp_path / "nothing.pt")
    with pytest.raises(pyckpt.CheckpointError, match="no state dict found"):
        pyckpt.load_state_dict(fresh_net(), path)


# -- the linear-time driver is torch's load_state_dict, step for step ---------------------------


class _Hooked(nn.Module):
    """Every hook kind torch's driver runs, and BatchNorm's version handling."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)) for _ in range(3)])
        self.head = nn.Linear(3, 2)
        self.calls: list[tuple[str, list[str], list[str]]] = []
        self.head.register_load_state_dict_post_hook(self._post)
        self.blocks[1].register_load_state_dict_post_hook(self._forget_missing)
        self.blocks[2].register_load_state_dict_pre_hook(self._pre)

    def _post(self, module: nn.Module, keys) -> None:  # type: ignore[no-untyped-def]
        self.calls.append(("post", list(keys.missing_keys), list(keys.unexpected_keys)))

    def _forget_missing(self, module: nn.Module, keys) -> None:  # type: ignore[no-untyped-def]
        keys.missing_keys[:] = [k for k in keys.missing_keys if "blocks.1" not in k]

    def _pre(self, module, state_dict, prefix, *args) -> None:  # type: ignore[no-untyped-def]
        self.calls.append(("pre", sorted(k for k in state_dict if k.startswith(prefix)), []))


class _OwnLoader(nn.Linear):
    def load_state_dict(self, state_dict, strict=True, assign=False):  # type: ignore[no-untyped-def]
        self.seen = sorted(state_dict)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def _hooked_state(drop: str | None = None, extra: bool = False, old_batchnorm: bool = False) -> dict:
    torch.manual_seed(7)
    state = _Hooked().state_dict()
    if drop:
        state = collections.OrderedDict((k, v) for k, v in state.items() if drop not in k)
        state._metadata = _Hooked().state_dict()._metadata  # type: ignore[attr-defined]
    if extra:
        state["blocks.0.0.surplus"] = torch.ones(1)
        state["nowhere.weight"] = torch.ones(1)
    if old_batchnorm:  # a checkpoint from before BatchNorm counted batches: version 1, no counter
        state = collections.OrderedDict((k, v) for k, v in state.items() if "num_batches_tracked" not in k)
        metadata = _Hooked().state_dict()._metadata
        for path in ("blocks.0.1", "blocks.1.1", "blocks.2.1"):
            metadata[path] = {"version": 1}
        state._metadata = metadata  # type: ignore[attr-defined]
    return state


@pytest.mark.parametrize("case", ["exact", "missing", "unexpected", "both", "old_batchnorm"])
@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("assign", [False, True])
def test_driver_matches_torch(backend, tmp_path, case, strict, assign):
    state = _hooked_state(
        drop={"missing": "blocks.1.0", "both": "head.bias"}.get(case),
        extra=case in ("unexpected", "both"),
        old_batchnorm=case == "old_batchnorm",
    )
    path = factory.save(state, tmp_path / "hooked.pt")
    expected_model, got_model = _Hooked(), _Hooked()
    expected_model.load_state_dict(_Hooked().state_dict())  # same starting weights for both
    got_model.load_state_dict(expected_model.state_dict())
    try:
        expected = expected_model.load_state_dict(torch.load(path, weights_only=True), strict=strict, assign=assign)
    except RuntimeError as exc:
        with pytest.raises(RuntimeError) as caught:
            pyckpt.load_state_dict(got_model, path, strict=strict, assign=assign)
        assert str(caught.value) == str(exc)
    else:
        got = pyckpt.load_state_dict(got_model, path, strict=strict, assign=assign)
        assert got.missing_keys == expected.missing_keys and got.unexpected_keys == expected.unexpected_keys
        assert_models_equal(expected_model, got_model)
    assert got_model.calls == expected_model.calls


def test_driver_defers_to_a_model_that_loads_itself(backend, tmp_path):
    path = factory.save(nn.Linear(2, 2).state_dict(), tmp_path / "linear.pt")
    model = _OwnLoader(2, 2)
    pyckpt.load_state_dict(model, path)
    assert model.seen == ["bias", "weight"]
