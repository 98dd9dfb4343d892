"""What each rank of a spawned gloo group does in ``test_distributed.py``.

Every case runs on every rank and returns facts the test asserts on: whether the result is
bit-identical to torch's own load of the same file, how many bytes this rank read (the
kernel's ``rchar`` counter, which counts file reads and not gloo's socket traffic) and how
many it had to. Cases run one after another in one group, with a barrier after each: a case
that left a rank behind in a collective would hang that barrier, and the test's deadline.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import pyckpt  # noqa: E402
from pyckpt._backend import use_backend  # noqa: E402


class Wide(nn.Module):
    """Dimensions that split unevenly over 2 and 4 ranks, one (``head``: 3 rows) leaving a
    rank of 4 empty under ``Shard(0)``, a BatchNorm whose buffers stay plain tensors, many
    small tensors, and a tied weight."""

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.embed = nn.Embedding(1001, 258, dtype=dtype)
        self.proj = nn.Linear(258, 1030, dtype=dtype)
        self.norm = nn.LayerNorm(1030, dtype=dtype)
        self.head = nn.Linear(1030, 3, dtype=dtype)
        self.bn = nn.BatchNorm1d(3, dtype=dtype)
        self.small = nn.ModuleList(nn.Linear(3, 3, dtype=dtype) for _ in range(40))
        self.out = nn.Linear(258, 1001, bias=False, dtype=dtype)
        self.out.weight = self.embed.weight  # tied: one tensor under two keys, read once


def make_files(directory: str) -> None:
    """The checkpoints every case reads (written once by the test process)."""
    from factory import dp_state_dict, rezip  # tests/factory.py
    import zipfile

    torch.manual_seed(0)
    model = Wide()
    with torch.no_grad():
        model.bn.running_mean.normal_()
        model.bn.running_var.uniform_(0.5, 2)
        model.bn.num_batches_tracked.fill_(7)
    torch.save(dp_state_dict(model), os.path.join(directory, "dp.pt"))
    torch.save(model.state_dict(), os.path.join(directory, "plain.pt"))
    import torch.distributed.checkpoint as dcp

    dcp.save(model.state_dict(), checkpoint_id=os.path.join(directory, "saved-dcp"), no_dist=True)
    with torch.no_grad():
        model.proj.bias.add_(1)  # the same file but for these bytes: other CRC-32s, same size
    os.mkdir(os.path.join(directory, "other"))  # the same name: torch names the zip's folder after it
    torch.save(dp_state_dict(model), os.path.join(directory, "other", "dp.pt"))
    dcp.save(model.state_dict(), checkpoint_id=os.path.join(directory, "other", "saved-dcp"), no_dist=True)
    rezip(os.path.join(directory, "dp.pt"), os.path.join(directory, "deflate.pt"), zipfile.ZIP_DEFLATED)
    pyckpt.convert(os.path.join(directory, "dp.pt"), os.path.join(directory, "model.safetensors"))
    pyckpt.convert(os.path.join(directory, "dp.pt"), os.path.join(directory, "sharded"), max_shard_size="1MB")


def rchar() -> int:
    with open("/proc/self/io") as io:
        for line in io:
            if line.startswith("rchar:"):
                return int(line.split()[1])
    raise RuntimeError("no rchar in /proc/self/io")


def reference(directory: str) -> dict[str, torch.Tensor]:
    return torch.load(os.path.join(directory, "plain.pt"), weights_only=True)


def local_bytes(model: nn.Module, *, per_key: bool = False) -> int:
    """The bytes of this rank's shards (local tensors of DTensors, whole plain tensors), each
    tensor once however many keys it has; or once per key (``per_key``: safetensors files
    hold a tied tensor once per key, and each copy is read, as torch would)."""
    locals_ = [value.to_local() if hasattr(value, "to_local") else value for value in model.state_dict().values()]
    return sum(t.numel() * t.element_size() for t in locals_) if per_key else unique_bytes(locals_)


def unique_bytes(tensors: Any) -> int:
    seen: dict[tuple[int, int], int] = {}
    for tensor in tensors:
        if tensor.numel():
            seen[(tensor.untyped_storage().data_ptr(), tensor.storage_offset())] = tensor.numel() * tensor.element_size()
    return sum(seen.values())


def full_equal(model: nn.Module, expected: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> list[str]:
    """Keys whose full value differs from ``expected`` (cast like ``param.copy_`` would)."""
    wrong = []
    for key, value in model.state_dict().items():
        full = value.full_tensor() if hasattr(value, "full_tensor") else value
        want = expected[key] if dtype is None or not expected[key].is_floating_point() else expected[key].to(dtype)
        if full.dtype != want.dtype or full.shape != want.shape or not torch.equal(full, want):
            wrong.append(key)
    return wrong


def mesh_1d(world: int) -> Any:
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (world,))


def mesh_2d(world: int) -> Any:
    from torch.distributed.device_mesh import init_device_mesh

    rows = 2 if world % 2 == 0 else 1
    return init_device_mesh("cpu", (rows, world // rows), mesh_dim_names=("a", "b"))


def fsdp2(dtype: torch.dtype = torch.float32) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    model = Wide(dtype)
    for module in model.small:
        fully_shard(module)
    fully_shard(model)
    return model


def distributed(placements_for: Callable[[torch.Tensor], list[Any]], mesh: Any) -> nn.Module:
    """Every parameter a DTensor with the placements ``placements_for`` gives it."""
    from torch.distributed.tensor import distribute_tensor

    from torch.distributed.tensor import DTensor, Partial

    model = Wide()
    made: dict[int, nn.Parameter] = {}  # a tied parameter stays tied
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            if id(param) not in made:
                placements = placements_for(param)
                if any(isinstance(p, Partial) for p in placements):  # distribute_tensor makes no Partial
                    value = DTensor.from_local(param.detach(), mesh, placements, run_check=False)
                else:
                    value = distribute_tensor(param.detach(), mesh, placements)
                made[id(param)] = nn.Parameter(value)
            module._parameters[name] = made[id(param)]
    return model


def measured(call: Callable[[], Any]) -> tuple[Any, int]:
    before = rchar()
    result = call()
    return result, rchar() - before


# --- DTensor targets ---------------------------------------------------------------------


def dtensor_fsdp2_from_dp_pt(ctx: dict[str, Any]) -> dict[str, Any]:
    model = fsdp2()
    result, read = measured(lambda: pyckpt.load_state_dict(model, ctx["dp.pt"]))
    return {"wrong": full_equal(model, ctx["expected"]), "read": read, "needed": local_bytes(model),
            "missing": list(result.missing_keys), "placements": sorted({str(p.placements) for p in model.parameters()})}


def dtensor_shard1_from_safetensors(ctx: dict[str, Any]) -> dict[str, Any]:
    from torch.distributed.tensor import Replicate, Shard

    model = distributed(lambda p: [Shard(1)] if p.dim() == 2 else [Replicate()], mesh_1d(ctx["world"]))
    _, read = measured(lambda: pyckpt.load_state_dict(model, ctx["model.safetensors"]))
    return {"wrong": full_equal(model, ctx["expected"]), "read": read, "needed": local_bytes(model, per_key=True)}


def dtensor_2d_mesh_from_sharded_dir(ctx: dict[str, Any]) -> dict[str, Any]:
    from torch.distributed.tensor import Replicate, Shard

    mesh = mesh_2d(ctx["world"])
    model = distributed(lambda p: [Shard(0), Shard(1)] if p.dim() == 2 else [Replicate(), Shard(0)], mesh)
    _, read = measured(lambda: pyckpt.load_state_dict(model, ctx["sharded"]))
    return {"wrong": full_equal(model, ctx["expected"]), "read": read, "needed": local_bytes(model, per_key=True)}


def dtensor_cast_into_bf16(ctx: dict[str, Any]) -> dict[str, Any]:
    model = fsdp2(torch.bfloat16)
    _, read = measured(lambda: pyckpt.load_state_dict(model, ctx["dp.pt"]))
    # read from the fp32 file: twice the local bf16 bytes of the floating-point tensors
    locals_ = [v.to_local() if hasattr(v, "to_local") else v for v in model.state_dict().values()]
    needed = unique_bytes(locals_) + unique_bytes(t for t in locals_ if t.is_floating_point())  # fp32 = 2 x bf16
    return {"wrong": full_equal(model, ctx["expected"], torch.bfloat16), "read": read, "needed": needed}


def dtensor_deflate_read_whole(ctx: dict[str, Any]) -> dict[str, Any]:
    model = fsdp2()
    pyckpt.load_state_dict(model, ctx["deflate.pt"])
    return {"wrong": full_equal(model, ctx["expected"])}


def dtensor_assign(ctx: dict[str, Any]) -> dict[str, Any]:
    """New DTensors like the old; the tied pair shares one local tensor, as torch's assign
    leaves two parameters sharing one storage."""
    from torch.distributed.tensor import Shard

    model = fsdp2()
    before = {name: str(p.placements) for name, p in model.named_parameters(remove_duplicate=False)}
    pyckpt.load_state_dict(model, ctx["dp.pt"], assign=True)
    after = {name: str(p.placements) for name, p in model.named_parameters(remove_duplicate=False)}
    wrong = full_equal(model, ctx["expected"])
    # FSDP2 copies an assigned shard into its own padded buffer where a rank's shard is
    # padded, so the tie is checked on plain DTensors
    plain = distributed(lambda p: [Shard(0)], mesh_1d(ctx["world"]))
    pyckpt.load_state_dict(plain, ctx["dp.pt"], assign=True)
    tied = plain.out.weight.to_local().data_ptr() == plain.embed.weight.to_local().data_ptr()
    return {"wrong": wrong + full_equal(plain, ctx["expected"]), "same_placements": before == after, "tied": tied}


def dtensor_dcp_resharded(ctx: dict[str, Any]) -> dict[str, Any]:
    """Saved by DCP from FSDP2's Shard(0), loaded into Shard(1) parameters."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.tensor import Replicate, Shard

    saved = fsdp2()
    pyckpt.load_state_dict(saved, ctx["dp.pt"])
    directory = os.path.join(ctx["work"], "dcp")
    dcp.save(saved.state_dict(), checkpoint_id=directory)
    dist.barrier()
    model = distributed(lambda p: [Shard(1)] if p.dim() == 2 else [Replicate()], mesh_1d(ctx["world"]))
    _, read = measured(lambda: pyckpt.load_state_dict(model, directory))  # DCP too keeps a tied tensor per key
    return {"wrong": full_equal(model, ctx["expected"]), "read": read, "needed": local_bytes(model, per_key=True)}


def dtensor_partial_refused(ctx: dict[str, Any]) -> dict[str, Any]:
    from torch.distributed.tensor import Partial, Replicate

    model = distributed(lambda p: [Partial()] if p.dim() == 2 else [Replicate()], mesh_1d(ctx["world"]))
    try:
        pyckpt.load_state_dict(model, ctx["dp.pt"])
    except ValueError as exc:
        return {"error": str(exc)}
    return {"error": None}


def dtensor_replicas_share_their_box(ctx: dict[str, Any]) -> dict[str, Any]:
    """TP x DP: Shard(1) along mesh dimension "b", replicas along "a"; the replicas of each box
    (the group along "a") split its reads."""
    from torch.distributed.tensor import Replicate, Shard

    mesh = mesh_2d(ctx["world"])
    model = distributed(lambda p: [Replicate(), Shard(p.dim() - 1)], mesh)
    replicas = mesh.get_group("a")
    _, read = measured(lambda: pyckpt.load_state_dict(model, ctx["dp.pt"], process_group=replicas))
    return {"wrong": full_equal(model, ctx["expected"]), "read": read, "needed": local_bytes(model),
            "replicas": dist.get_world_size(replicas)}


def dtensor_group_of_different_boxes_refused(ctx: dict[str, Any]) -> dict[str, Any]:
    """FSDP2 over the whole world with process_group=WORLD: the ranks hold different boxes."""
    return _error_of(lambda: pyckpt.load_state_dict(fsdp2(), ctx["dp.pt"], process_group=dist.group.WORLD))


# --- replicated targets, cooperative reads -----------------------------------------------


def group_load_state_dict(ctx: dict[str, Any]) -> dict[str, Any]:
    model = Wide()
    _, read = measured(lambda: pyckpt.load_state_dict(model, ctx["dp.pt"], process_group=dist.group.WORLD))
    return {"wrong": full_equal(model, ctx["expected"]), "read": read, "total": ctx["state_bytes"]}


def group_load(ctx: dict[str, Any]) -> dict[str, Any]:
    return _group_load_like_torch(ctx, ctx["expected"])


def _group_load_like_torch(ctx: dict[str, Any], expected: Any, **options: Any) -> dict[str, Any]:
    """``load`` of the plain file on the group against torch's load of it (``expected``)."""
    from compare import assert_same  # tests/compare.py: values, dtypes, shapes, strides, sharing

    loaded, read = measured(lambda: pyckpt.load(ctx["plain.pt"], process_group=dist.group.WORLD, **options))
    try:
        assert_same(expected, loaded)
        wrong = None
    except AssertionError as exc:
        wrong = str(exc)
    return {"wrong": wrong, "read": read, "total": ctx["state_bytes"]}


def group_load_sharded_dir(ctx: dict[str, Any]) -> dict[str, Any]:
    # safetensors keep no _metadata and hold a tied tensor twice: compared with a lone pyckpt load
    return _group_load_like_alone(ctx, ctx["sharded"], strip_prefix="auto")


def group_load_state_dict_dcp(ctx: dict[str, Any]) -> dict[str, Any]:
    """A DCP directory into a replicated model: the chunk bytes that go straight into the
    parameters are shared out (DCP keeps the tied tensor once per key; only the last key's is
    read, as torch's copies leave the tied memory)."""
    model = Wide()
    _, read = measured(lambda: pyckpt.load_state_dict(model, ctx["saved-dcp"], process_group=dist.group.WORLD))
    return {"wrong": full_equal(model, ctx["expected"]), "read": read, "total": ctx["state_bytes"]}


def group_load_dcp(ctx: dict[str, Any]) -> dict[str, Any]:
    return _group_load_like_alone(ctx, ctx["saved-dcp"])


def group_dcp_bound_for_cuda(ctx: dict[str, Any]) -> dict[str, Any]:
    """DCP chunks bound for CUDA: ring pieces, shared out like a file's. The destinations are
    host memory that says it is on CUDA, and the ring's CPU transfer runs each rank's pieces
    (tests/ring_probe.py); the native backend only, as only it has the ring."""
    from ring_probe import ring_on_the_host, skeleton_fills
    from pyckpt._backend import current_backend
    from pyckpt.dcp_loading import DcpSkeleton
    from pyckpt.execute.cooperative import GroupLoad
    from pyckpt.index.policy import UNKNOWN_OPAQUE

    if current_backend().name != "native":
        return {"native": False}
    with DcpSkeleton(ctx["saved-dcp"], UNKNOWN_OPAQUE) as skeleton:
        fills = skeleton_fills(skeleton)

        def fill() -> list[int]:
            with ring_on_the_host(buffer_bytes=1 << 16) as sent, GroupLoad(dist.group.WORLD, current_backend()) as session:
                skeleton.fill([(placeholder, fake, (0,) * placeholder.dim()) for placeholder, fake in fills.values()],
                              session=session)
            return sent

        sent, read = measured(fill)
    wrong = [key for key, tensor in ctx["expected"].items() if not torch.equal(fills[key][1].memory, tensor)]
    return {"native": True, "wrong": wrong + sorted(set(fills) - set(ctx["expected"])), "read": read,
            "through_ring": sum(sent), "total": ctx["state_bytes_per_key"]}


def _group_load_like_alone(ctx: dict[str, Any], path: str, **options: Any) -> dict[str, Any]:
    """``load`` on the group against the same load by this rank alone (values, strides,
    sharing), and every expected tensor's values; both formats read a tied tensor per key."""
    from compare import assert_same  # tests/compare.py

    alone = pyckpt.load(path, **options)
    loaded, read = measured(lambda: pyckpt.load(path, process_group=dist.group.WORLD, **options))
    try:
        assert_same(alone, loaded)
        assert all(torch.equal(ctx["expected"][key], loaded[key]) for key in ctx["expected"]) and len(loaded) == len(alone)
        wrong = None
    except AssertionError as exc:
        wrong = str(exc)
    return {"wrong": wrong, "read": read, "total": ctx["state_bytes_per_key"]}


def group_small_chunks(ctx: dict[str, Any]) -> dict[str, Any]:
    """64 KiB chunks: big tensors cut in many, small ones packed together."""
    os.environ["PYCKPT_GROUP_CHUNK_MB"] = "1"
    os.environ["PYCKPT_GROUP_INFLIGHT"] = "2"
    try:
        model = Wide()
        _, read = measured(lambda: pyckpt.load_state_dict(model, ctx["sharded"], process_group=dist.group.WORLD))
    finally:
        del os.environ["PYCKPT_GROUP_CHUNK_MB"], os.environ["PYCKPT_GROUP_INFLIGHT"]
    # the shards hold the tied tensor under both keys; only the last key's is read
    return {"wrong": full_equal(model, ctx["expected"]), "read": read, "total": ctx["state_bytes"]}


def group_cast_into_bf16(ctx: dict[str, Any]) -> dict[str, Any]:
    model = Wide(torch.bfloat16)
    pyckpt.load_state_dict(model, ctx["dp.pt"], process_group=dist.group.WORLD)
    return {"wrong": full_equal(model, ctx["expected"], torch.bfloat16)}


def group_deflate(ctx: dict[str, Any]) -> dict[str, Any]:
    model = Wide()
    pyckpt.load_state_dict(model, ctx["deflate.pt"], process_group=dist.group.WORLD)
    return {"wrong": full_equal(model, ctx["expected"])}


def group_other_file_on_last_rank(ctx: dict[str, Any]) -> dict[str, Any]:
    path = ctx["other.pt"] if ctx["rank"] == ctx["world"] - 1 else ctx["dp.pt"]
    return _error_of(lambda: pyckpt.load_state_dict(Wide(), path, process_group=dist.group.WORLD))


def group_other_dcp_on_last_rank(ctx: dict[str, Any]) -> dict[str, Any]:
    """Another save of the same shapes: same sizes, same .metadata, other chunk CRC-32s."""
    path = os.path.join(ctx["work"], "other", "saved-dcp") if ctx["rank"] == ctx["world"] - 1 else ctx["saved-dcp"]
    return _error_of(lambda: pyckpt.load_state_dict(Wide(), path, process_group=dist.group.WORLD))


def group_missing_file_on_last_rank(ctx: dict[str, Any]) -> dict[str, Any]:
    path = os.path.join(ctx["work"], "absent.pt") if ctx["rank"] == ctx["world"] - 1 else ctx["dp.pt"]
    return _error_of(lambda: pyckpt.load_state_dict(Wide(), path, process_group=dist.group.WORLD))


def group_read_fails_on_last_rank(ctx: dict[str, Any]) -> dict[str, Any]:
    """The last rank's reads fail in the middle of the exchange (an I/O error, injected)."""
    from pyckpt._backend import current_backend

    backend = current_backend()
    real = backend.read_into
    if ctx["rank"] == ctx["world"] - 1:
        def failing(source: Any, jobs: Any) -> None:
            raise OSError(5, "Input/output error (injected)")

        backend.read_into = failing  # type: ignore[method-assign]
    try:
        return _error_of(lambda: pyckpt.load(ctx["plain.pt"], process_group=dist.group.WORLD))
    finally:
        backend.read_into = real  # type: ignore[method-assign]


def _error_of(call: Callable[[], Any]) -> dict[str, Any]:
    try:
        call()
    except Exception as exc:  # noqa: BLE001 - the test checks the type
        return {"error_type": type(exc).__name__, "error": str(exc)}
    return {"error_type": None, "error": None}


# --- CUDA targets: two gloo ranks on one GPU (gloo broadcasts CUDA tensors), so the group's
# exchange into device memory runs on a machine with a single GPU, where NCCL cannot ---------


def cuda_group_load_state_dict(ctx: dict[str, Any]) -> dict[str, Any]:
    model = Wide().cuda()
    _, read = measured(lambda: pyckpt.load_state_dict(model, ctx["dp.pt"], process_group=dist.group.WORLD))
    return {"wrong": full_equal(model, ctx["expected_cuda"]), "read": read, "total": ctx["state_bytes"]}


def cuda_group_load(ctx: dict[str, Any]) -> dict[str, Any]:
    return _group_load_like_torch(ctx, ctx["expected_cuda"], map_location="cuda")


def cuda_group_load_state_dict_dcp(ctx: dict[str, Any]) -> dict[str, Any]:
    model = Wide().cuda()
    _, read = measured(lambda: pyckpt.load_state_dict(model, ctx["saved-dcp"], process_group=dist.group.WORLD))
    return {"wrong": full_equal(model, ctx["expected_cuda"]), "read": read, "total": ctx["state_bytes"]}


def cuda_group_on_a_side_stream(ctx: dict[str, Any]) -> dict[str, Any]:
    """Under ``torch.cuda.stream(side)``, with the side stream's queue holding work back: the
    bytes a rank broadcasts must be those its reads put in place, on whichever stream."""
    model = Wide().cuda()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)
        pyckpt.load_state_dict(model, ctx["dp.pt"], process_group=dist.group.WORLD)
    torch.cuda.synchronize()
    return {"wrong": full_equal(model, ctx["expected_cuda"])}


CASES = [function for name, function in list(globals().items()) if name.startswith(("dtensor_", "group_"))]
CUDA_CASES = [function for name, function in list(globals().items()) if name.startswith("cuda_")]


def worker(rank: int, world: int, store: str, backend: str, work: str, results: str, on_cuda: bool = False) -> None:
    """Every case (``on_cuda``: every CUDA case, on cuda:0) on this rank of a gloo group that
    meets through the file ``store`` (no port to race another process for)."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    if on_cuda:
        torch.cuda.set_device(0)
    expected = reference(work)
    ctx = {"rank": rank, "world": world, "work": work, "expected": expected,
           "expected_cuda": torch.load(os.path.join(work, "plain.pt"), map_location="cuda", weights_only=True) if on_cuda
           else None,
           "state_bytes": unique_bytes(expected.values()),
           "state_bytes_per_key": sum(t.numel() * t.element_size() for t in expected.values())}
    for name in ("dp.pt", "plain.pt", "deflate.pt", "model.safetensors", "sharded", "saved-dcp"):
        ctx[name] = os.path.join(work, name)
    ctx["other.pt"] = os.path.join(work, "other", "dp.pt")
    outcomes: dict[str, Any] = {}
    with use_backend(backend):
        pyckpt.load_state_dict(Wide(), ctx["dp.pt"])  # first use: lazy imports read .py files
        for case in CUDA_CASES if on_cuda else CASES:
            try:
                outcomes[case.__name__] = {"ok": True, "facts": case(ctx)}
            except Exception:  # noqa: BLE001 - reported to the test
                outcomes[case.__name__] = {"ok": False, "error": traceback.format_exc()}
            dist.barrier()
    with open(os.path.join(results, f"rank{rank}.json"), "w") as out:
        json.dump(outcomes, out)
    dist.destroy_process_group()
