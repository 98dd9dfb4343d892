"""Loading on torch.distributed: DTensor targets and cooperative reads, on gloo groups of 1, 2
and 4 ranks spawned by the test itself (``distributed_cases.py`` holds what each rank does).

Each (world size, backend) pair is one spawned group that runs every case once; the tests
then assert on what each rank reported. A group that does not finish within its deadline
fails every test of that pair: some rank hung.
"""

from __future__ import annotations

import json
import os
import time

import pytest
import torch
import torch.multiprocessing as mp

from conftest import BACKENDS, require_backend
from distributed_cases import CASES, CUDA_CASES, make_files, worker

WORLD_SIZES = [1, 2, 4]
DEADLINE_S = 240
SLACK = 256 << 10  # indexing (the zip directory, the pickle) and the odd small read


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> str:
    directory = str(tmp_path_factory.mktemp("distributed-files"))
    make_files(directory)
    return directory


@pytest.fixture(scope="module", params=[(b, w) for b in BACKENDS for w in WORLD_SIZES], ids=lambda p: f"{p[0]}-world{p[1]}")
def group(request: pytest.FixtureRequest, files: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    backend, world = request.param
    require_backend(backend)
    return spawn_group(files, str(tmp_path_factory.mktemp(f"group-{backend}-{world}")), backend, world)


def spawn_group(files: str, work: str, backend: str, world: int, on_cuda: bool = False) -> dict:
    """Run every case (or every CUDA case) on a spawned gloo group; what each rank reported."""
    for name in os.listdir(files):
        os.symlink(os.path.join(files, name), os.path.join(work, name))
    context = mp.start_processes(
        worker, args=(world, os.path.join(work, "store"), backend, work, work, on_cuda), nprocs=world, join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + DEADLINE_S
    while not context.join(timeout=max(deadline - time.monotonic(), 0.1)):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the group of {world} rank(s) did not finish within {DEADLINE_S} s: a rank hung")
    ranks = []
    for rank in range(world):
        with open(os.path.join(work, f"rank{rank}.json")) as f:
            ranks.append(json.load(f))
    return {"world": world, "backend": backend, "ranks": ranks}


def facts(group: dict, case: str) -> list[dict]:
    """Every rank's facts for ``case``; a rank's unexpected exception fails the test."""
    out = []
    for rank, outcomes in enumerate(group["ranks"]):
        outcome = outcomes[case]
        assert outcome["ok"], f"rank {rank} raised in {case}:\n{outcome['error']}"
        out.append(outcome["facts"])
    return out


def test_every_case_ran(group: dict) -> None:
    names = [case.__name__ for case in CASES]
    for outcomes in group["ranks"]:
        assert sorted(outcomes) == sorted(names)


# --- DTensor targets: each rank reads only its own shard ---------------------------------


@pytest.mark.parametrize("case", [
    "dtensor_fsdp2_from_dp_pt",
    "dtensor_shard1_from_safetensors",
    "dtensor_2d_mesh_from_sharded_dir",
    "dtensor_cast_into_bf16",
    "dtensor_dcp_resharded",
])
def test_dtensor_reads_only_the_local_shard(group: dict, case: str) -> None:
    for rank, fact in enumerate(facts(group, case)):
        assert fact["wrong"] == [], f"rank {rank}: {fact['wrong']} differ from torch.load"
        # at least its shard (rchar counts every byte read) and no more than it, plus indexing
        assert fact["needed"] <= fact["read"] <= fact["needed"] + SLACK, (rank, fact)


def test_dtensor_fsdp2_takes_a_dp_checkpoint(group: dict) -> None:
    for fact in facts(group, "dtensor_fsdp2_from_dp_pt"):
        assert fact["missing"] == []
        assert fact["placements"] == ["(Shard(dim=0),)"]


@pytest.mark.parametrize("case", ["dtensor_deflate_read_whole", "dtensor_assign"])
def test_dtensor_other_paths_are_exact(group: dict, case: str) -> None:
    for fact in facts(group, case):
        assert fact["wrong"] == []
        assert fact.get("same_placements", True) and fact.get("tied", True)


def test_dtensor_partial_placement_is_refused(group: dict) -> None:
    for fact in facts(group, "dtensor_partial_refused"):
        assert fact["error"] is not None and "Partial" in fact["error"] and "'embed.weight'" in fact["error"]


def test_dtensor_replicas_split_the_reads_of_their_box(group: dict) -> None:
    for rank, fact in enumerate(facts(group, "dtensor_replicas_share_their_box")):
        assert fact["wrong"] == [], f"rank {rank}: {fact['wrong']}"
        share = fact["needed"] // fact["replicas"]
        assert share - 16 <= fact["read"] <= share + SLACK, (rank, fact)
    if group["world"] == 4:
        assert fact["replicas"] == 2


def test_dtensor_group_of_different_boxes_is_refused(group: dict) -> None:
    for fact in facts(group, "dtensor_group_of_different_boxes_refused"):
        if group["world"] == 1:
            assert fact["error"] is None  # one rank holds every box
            continue
        assert fact["error_type"] == "CheckpointError" and "must hold the same tensors" in fact["error"], fact


# --- replicated targets: each rank reads about 1/N, the ranks share by broadcast ----------


@pytest.mark.parametrize("case", ["group_load_state_dict", "group_load", "group_load_sharded_dir", "group_small_chunks",
                                  "group_load_state_dict_dcp", "group_load_dcp"])
def test_group_reads_one_share_each(group: dict, case: str) -> None:
    world = group["world"]
    for rank, fact in enumerate(facts(group, case)):
        assert not fact["wrong"], f"rank {rank}: {fact['wrong']}"
        share = fact["total"] // world
        assert share - 16 <= fact["read"] <= share + SLACK, (rank, world, fact)


def test_group_shares_dcp_chunks_bound_for_cuda(group: dict) -> None:
    if group["backend"] != "native":
        pytest.skip("the ring that takes bytes to CUDA is native only")
    world = group["world"]
    for rank, fact in enumerate(facts(group, "group_dcp_bound_for_cuda")):
        assert fact["native"]
        assert fact["wrong"] == [], f"rank {rank}: {fact['wrong']}"
        share = fact["total"] // world
        assert share - 16 <= fact["read"] <= share + SLACK, (rank, world, fact)
        assert share - 16 <= fact["through_ring"] <= fact["read"], (rank, fact)  # the bytes it read went through the ring


@pytest.mark.parametrize("case", ["group_cast_into_bf16", "group_deflate"])
def test_group_other_paths_are_exact(group: dict, case: str) -> None:
    for fact in facts(group, case):
        assert fact["wrong"] == []


def test_group_refuses_files_that_differ(group: dict, files: str) -> None:
    world = group["world"]
    for fact in facts(group, "group_other_file_on_last_rank"):
        if world == 1:
            assert fact["error"] is None  # one rank: nothing to differ from
            continue
        assert fact["error_type"] == "CheckpointError"
        assert os.path.getsize(files + "/other/dp.pt") == os.path.getsize(files + "/dp.pt")  # the CRCs must tell
        assert f"rank {world - 1}'s copy differs from rank 0's" in fact["error"], fact
        assert "CRC-32s" in fact["error"] and ".pt: " in fact["error"], fact


def test_group_refuses_dcp_saves_that_differ(group: dict, files: str) -> None:
    world = group["world"]
    sizes = [sorted((name, os.path.getsize(f"{where}/{name}")) for name in os.listdir(where) if name.endswith(".distcp"))
             for where in (files + "/saved-dcp", files + "/other/saved-dcp")]
    assert sizes[0] == sizes[1]  # the sizes cannot tell the saves apart: the chunks' CRC-32s must
    for fact in facts(group, "group_other_dcp_on_last_rank"):
        if world == 1:
            assert fact["error"] is None
            continue
        assert fact["error_type"] == "CheckpointError"
        assert f"rank {world - 1}'s copy differs from rank 0's" in fact["error"] and ".distcp: " in fact["error"], fact


def test_group_failure_on_one_rank_raises_on_every_rank(group: dict) -> None:
    world = group["world"]
    for case, said in [("group_missing_file_on_last_rank", "FileNotFoundError"),
                       ("group_read_fails_on_last_rank", "Input/output error (injected)")]:
        for rank, fact in enumerate(facts(group, case)):
            assert fact["error"] is not None, (case, rank)
            if rank == world - 1 and (world == 1 or case == "group_missing_file_on_last_rank"):
                # its own error, as without a group (one rank alone has nobody to tell)
                assert fact["error_type"] == ("OSError" if case == "group_read_fails_on_last_rank" else "FileNotFoundError")
                continue
            assert fact["error_type"] == "CheckpointError", (case, rank, fact)
            assert f"rank {world - 1}: " in fact["error"] and said in fact["error"], (case, rank, fact)


# --- in-process argument checks -----------------------------------------------------------


def test_process_group_needs_an_initialised_group(backend: str, tmp_path) -> None:
    path = str(tmp_path / "m.pt")
    torch.save({"w": torch.ones(2)}, path)
    with pytest.raises(ValueError, match="torch.distributed is not initialised"):
        import pyckpt

        pyckpt.load(path, process_group=object())


@pytest.fixture
def one_rank_group():
    """A gloo group of this process alone, torn down after the test."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
def test_process_group_argument_checks(backend: str, tmp_path, one_rank_group) -> None:
    import pyckpt
    import torch.distributed.checkpoint as dcp

    path = str(tmp_path / "m.pt")
    torch.save({"w": torch.arange(6.0)}, path)
    with pytest.raises(ValueError, match="mmap=True cannot be combined with process_group"):
        pyckpt.load(path, mmap=True, process_group=one_rank_group)
    with pytest.raises(TypeError, match="must be a torch.distributed ProcessGroup"):
        pyckpt.load(path, process_group="world")
    directory = str(tmp_path / "dcp")  # a DCP directory on a group of one: read as by one process
    saved = {"weight": torch.arange(6.0).reshape(3, 2), "bias": torch.arange(3.0)}
    dcp.save(saved, checkpoint_id=directory, no_dist=True)
    linear = torch.nn.Linear(2, 3)
    pyckpt.load_state_dict(linear, directory, process_group=one_rank_group)
    assert torch.equal(linear.weight, saved["weight"]) and torch.equal(linear.bias, saved["bias"])
    loaded = pyckpt.load(path, process_group=one_rank_group)  # the group is still usable after those
    assert torch.equal(loaded["w"], torch.arange(6.0)) and loaded["w"].untyped_storage().nbytes() == 24


# --- CUDA: NCCL for the shared bytes, DTensor boxes through the ring (one GPU is enough) ---

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def one_rank_nccl_group():
    import torch.distributed as dist

    torch.cuda.set_device(0)
    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


@needs_cuda
@pytest.mark.cuda
def test_cuda_group_and_dtensor_loads(backend: str, tmp_path, one_rank_nccl_group) -> None:
    import pyckpt
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from distributed_cases import Wide, full_equal

    torch.manual_seed(0)
    source = Wide()
    path = str(tmp_path / "dp.pt")
    torch.save({"module." + k: v for k, v in source.state_dict().items()}, path)
    expected = {k: v.to("cuda") for k, v in source.state_dict().items()}

    model = Wide().to("cuda")
    pyckpt.load_state_dict(model, path, process_group=one_rank_nccl_group)
    assert full_equal(model, expected) == []
    loaded = pyckpt.load(path, map_location="cuda", process_group=one_rank_nccl_group)
    assert all(torch.equal(loaded["module." + k], v) for k, v in expected.items())

    import warnings

    import torch.distributed.checkpoint as dcp

    directory = str(tmp_path / "dcp")  # DCP chunks go through the group's path to CUDA too
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({k: v.cpu() for k, v in source.state_dict().items()}, checkpoint_id=directory, no_dist=True)
    from_dcp = Wide().to("cuda")
    pyckpt.load_state_dict(from_dcp, directory, process_group=one_rank_nccl_group)
    assert full_equal(from_dcp, expected) == []
    loaded = pyckpt.load(directory, map_location="cuda", process_group=one_rank_nccl_group)
    assert all(loaded[k].device.type == "cuda" and torch.equal(loaded[k], v) for k, v in expected.items())

    mesh = init_device_mesh("cuda", (1,))
    sharded = Wide().to("cuda")
    for module in sharded.modules():
        for name, param in list(module._parameters.items()):
            if param is not None:
                module._parameters[name] = nn.Parameter(distribute_tensor(param.detach(), mesh, [Shard(param.dim() - 1)]))
    pyckpt.load_state_dict(sharded, path)
    assert full_equal(sharded, expected) == []


@pytest.fixture(scope="module", params=BACKENDS)
def cuda_group(request: pytest.FixtureRequest, files: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two gloo ranks loading into cuda:0: the group's exchange into device memory (the reader
    thread's ring copies, broadcasts out of and into CUDA memory, staging buffers) on one GPU."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    require_backend(request.param)
    return spawn_group(files, str(tmp_path_factory.mktemp(f"cuda-group-{request.param}")), request.param, 2, on_cuda=True)


@pytest.mark.cuda
def test_cuda_group_of_two_ranks_on_one_gpu_ran_every_case(cuda_group: dict) -> None:
    for outcomes in cuda_group["ranks"]:
        assert sorted(outcomes) == sorted(case.__name__ for case in CUDA_CASES)


@pytest.mark.cuda
@pytest.mark.parametrize("case", ["cuda_group_load_state_dict", "cuda_group_load", "cuda_group_load_state_dict_dcp",
                                  "cuda_group_on_a_side_stream"])
def test_cuda_group_of_two_ranks_on_one_gpu(cuda_group: dict, case: str) -> None:
    for rank, fact in enumerate(facts(cuda_group, case)):
        assert not fact["wrong"], f"rank {rank}: {fact['wrong']}"
        if cuda_group["backend"] == "native" and "total" in fact:  # the Python backend stages CUDA entries per rank
            share = fact["total"] // 2
            assert share - 16 <= fact["read"] <= share + SLACK, (rank, fact)
