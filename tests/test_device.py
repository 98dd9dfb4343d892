"""Loading to CUDA: the pinned-ring pipeline (tested here through its CPU transfer, which
runs the same spans, buffers and threads) and, on a GPU, equality with torch."""

from __future__ import annotations

import os

import factory
import pytest
import torch
from compare import assert_same

import pyckpt
from conftest import require_backend
from pyckpt.errors import CheckpointError
from pyckpt.execute.device import RingConfig, copy_pieces, ring_config
from pyckpt.index.source import BufferSource, FileSource

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def ring():
    require_backend("native")
    try:
        from pyckpt import _ring
    except ImportError as exc:
        pytest.fail(f"the ring extension is not available: {exc}")
    return _ring


@pytest.fixture
def random_file(tmp_path):
    data = os.urandom(3_000_017)
    path = tmp_path / "bytes.bin"
    path.write_bytes(data)
    return str(path), data


@pytest.mark.parametrize(
    "config",
    [
        RingConfig(buffer_bytes=4096, buffers=1, streams=1, readers=1),
        RingConfig(buffer_bytes=100_003, buffers=2, streams=3, readers=4),
        RingConfig(buffer_bytes=1 << 20, buffers=4, streams=2, readers=2),
    ],
    ids=["tiny-one-buffer", "odd-sizes", "default-like"],
)
def test_ring_pipeline_copies_every_byte(ring, random_file, config):
    path, data = random_file
    # Odd sizes that straddle buffer boundaries, out of file order, one empty, one whole file.
    spans = [(123_457, 777_777), (7, 1), (2_000_000, 1_000_017), (0, 0), (999_000, 5_000), (0, len(data))]
    dests = [torch.full((length + 3,), 0xAB, dtype=torch.uint8) for _, length in spans]
    pieces = [(offset, length, dest, 3) for (offset, length), dest in zip(spans, dests)]
    with FileSource(path) as source:
        stats = copy_pieces(ring, source, pieces, torch.device("cpu"), config)
    for (offset, length), dest in zip(spans, dests):
        assert bytes(dest[:3].tolist()) == b"\xab\xab\xab"  # nothing written before the offset
        assert bytes(dest[3:].numpy()) == data[offset : offset + length]
    assert stats["bytes"] == sum(length for _, length in spans)
    assert stats["spans"] >= -(-len(data) // config.buffer_bytes)


def test_ring_coalesces_small_pieces_and_is_reused(ring, random_file):
    path, data = random_file
    dests = [torch.empty(100, dtype=torch.uint8) for _ in range(1000)]
    pieces = [(i * 1000, 100, dest, 0) for i, dest in enumerate(dests)]
    config = RingConfig(buffer_bytes=1 << 20, buffers=2, streams=2, readers=2)
    with FileSource(path) as source:
        first = copy_pieces(ring, source, pieces, torch.device("cpu"), config)
        second = copy_pieces(ring, source, pieces, torch.device("cpu"), config)
    assert first["copies"] == 1000 and first["spans"] == 1  # one read serves many small tensors
    assert second["ring_reused"]
    assert all(bytes(d.numpy()) == data[i * 1000 : i * 1000 + 100] for i, d in enumerate(dests))


def test_ring_from_a_buffer_source(ring):
    data = os.urandom(50_000)
    dest = torch.empty(40_000, dtype=torch.uint8)
    copy_pieces(ring, BufferSource(data), [(5_000, 40_000, dest, 0)], torch.device("cpu"), RingConfig(buffer_bytes=8192))
    assert bytes(dest.numpy()) == data[5_000:45_000]


def test_ring_errors_are_clean_and_leave_the_ring_usable(ring, random_file):
    path, data = random_file
    dest = torch.empty(10, dtype=torch.uint8)
    with FileSource(path) as source:
        with pytest.raises(CheckpointError, match="passes the end of the file"):
            copy_pieces(ring, source, [(len(data) - 5, 10, dest, 0)], torch.device("cpu"), RingConfig())
        with pytest.raises(RuntimeError, match="destination too small"):
            copy_pieces(ring, source, [(0, 11, dest, 0)], torch.device("cpu"), RingConfig())
        copy_pieces(ring, source, [(0, 10, dest, 0)], torch.device("cpu"), RingConfig())
    assert bytes(dest.numpy()) == data[:10]


def test_ring_config_from_arguments_and_environment(monkeypatch):
    monkeypatch.setenv("PYCKPT_RING_MB", "16")
    monkeypatch.setenv("PYCKPT_RING_BUFFERS", "3")
    monkeypatch.setenv("PYCKPT_STREAMS", "4")
    config = ring_config(readers=1)
    assert (config.buffer_bytes, config.buffers, config.streams, config.readers) == (16 << 20, 3, 4, 1)
    monkeypatch.setenv("PYCKPT_STREAMS", "0")
    with pytest.raises(ValueError, match="PYCKPT_STREAMS"):
        ring_config()


def test_release_buffers_is_safe_anytime():
    from pyckpt.execute.device import release_buffers

    release_buffers()
    release_buffers()


# --- on a GPU --------------------------------------------------------------------------


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("case", ["every_dtype", "views", "shared", "parameters", "conj_neg", "training_checkpoint"])
def test_cuda_load_matches_torch(backend, tmp_path, case):
    path = factory.save(factory.OBJECT_CASES[case](), tmp_path / f"{case}.pt")
    expected = torch.load(path, weights_only=True, map_location="cuda")
    got = pyckpt.load(path, map_location="cuda")
    assert_same(expected, got)


@needs_cuda
@pytest.mark.cuda
def test_cuda_odd_sizes_straddle_ring_buffers(backend, tmp_path, monkeypatch):
    monkeypatch.setenv("PYCKPT_RING_MB", "1")
    monkeypatch.setenv("PYCKPT_RING_BUFFERS", "2")
    tensors = {f"t{i}": torch.randn(n) for i, n in enumerate([1, 262_143, 262_145, 1_000_003, 7, 524_289])}
    tensors["view"] = tensors["t3"][5:900_000:3]
    path = factory.save(tensors, tmp_path / "odd.pt")
    assert_same(torch.load(path, weights_only=True, map_location="cuda"), pyckpt.load(path, map_location="cuda"))


SLEEP_CYCLES = 200_000_000  # torch.cuda._sleep: about 0.1 s of a GPU's time, far longer than any call here


@needs_cuda
@pytest.mark.cuda
def test_cuda_ring_calls_back_to_back_wait_for_the_copies_still_reading_it(ring, tmp_path):
    """A call returns once its copies are enqueued, so the next call's readers must not refill
    a pinned buffer the last call's copies have yet to read. The caller's stream is held busy,
    so the first call's copies (which wait for it) are all still queued when the second call,
    of other bytes, reuses the ring: each destination must hold its own file's bytes."""
    size = 6 << 20  # three buffers' worth: the first call never waits for a buffer of its own
    sources = []
    for value in (1, 2):
        path = tmp_path / f"{value}.bin"
        path.write_bytes(bytes([value]) * size)
        sources.append(FileSource(str(path)))
    config, device, results = RingConfig(buffer_bytes=2 << 20, buffers=3, readers=3), torch.device("cuda", 0), []
    try:
        for _ in range(3):
            torch.cuda._sleep(SLEEP_CYCLES)
            for value, source in zip((1, 2), sources):
                dest = torch.empty(size, dtype=torch.uint8, device=device)
                copy_pieces(ring, source, [(0, size, dest, 0)], device, config)
                results.append((value, dest))
    finally:
        for source in sources:
            source.close()
    torch.cuda.synchronize()
    wrong = [(i, value, int(dest.min()), int(dest.max())) for i, (value, dest) in enumerate(results)
             if not int(dest.min()) == value == int(dest.max())]
    assert wrong == []


@needs_cuda
@pytest.mark.cuda
def test_cuda_load_state_dict_comes_after_work_queued_on_the_callers_stream(backend, tmp_path):
    """Kernels the caller queued on its stream before the load (here: zeroing the parameters,
    behind a sleep) run before the load's copies, as they would before copies on that stream."""
    source = factory.seeded_net()
    path = factory.save(factory.dp_state_dict(source), tmp_path / "dp.pt")
    expected = {key: value.detach().cpu().clone() for key, value in source.state_dict().items()}
    target = factory.Net().cuda()
    torch.cuda._sleep(SLEEP_CYCLES)
    with torch.no_grad():
        for tensor in target.state_dict().values():
            tensor.zero_()
    assert pyckpt.load_state_dict(target, path).missing_keys == []
    torch.cuda.synchronize()
    assert [key for key, tensor in target.state_dict().items() if not torch.equal(tensor.cpu(), expected[key])] == []


@needs_cuda
@pytest.mark.cuda
def test_cuda_memory_freed_under_queued_copies_is_not_handed_out_again(tmp_path):
    """A model built on the default stream, loaded under a side stream whose queue holds the
    copies back, then dropped: its parameters' blocks return to the default stream's pool, and
    new tensors made there at once must not receive the late copies' bytes."""
    require_backend("native")  # the ring's copies; param.copy_ (Python backend) is torch's own case
    torch.manual_seed(0)
    # plain fp32 parameters only, so that every entry goes through the ring's copies
    layers = [torch.nn.Linear(64, 256), torch.nn.Linear(256, 256), torch.nn.Linear(256, 64)]
    path = factory.save(factory.dp_state_dict(torch.nn.Sequential(*layers)), tmp_path / "dp.pt")
    target = torch.nn.Sequential(*(torch.nn.Linear(layer.in_features, layer.out_features) for layer in layers)).cuda()
    sizes = [tensor.numel() for tensor in target.state_dict().values()]
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(SLEEP_CYCLES)
        assert pyckpt.load_state_dict(target, path).missing_keys == []
    del target
    fresh = [torch.full((n,), 9.0, device="cuda") for n in sizes]
    torch.cuda.synchronize()
    assert [n for n, tensor in zip(sizes, fresh) if not bool((tensor == 9).all())] == []


@needs_cuda
@pytest.mark.cuda
def test_cuda_loads_back_to_back_keep_their_own_bytes(backend, tmp_path, monkeypatch):
    """The same through pyckpt.load, files loaded one after another behind a busy stream."""
    monkeypatch.setenv("PYCKPT_RING_MB", "2")
    monkeypatch.setenv("PYCKPT_RING_BUFFERS", "3")
    paths = [factory.save({"w": torch.full((4 << 20,), value, dtype=torch.uint8)}, tmp_path / f"{value}.pt")
             for value in (1, 2, 3)]
    torch.cuda._sleep(SLEEP_CYCLES)
    loaded = [(value, pyckpt.load(path, map_location="cuda")["w"]) for _ in range(4) for value, path in zip((1, 2, 3), paths)]
    torch.cuda.synchronize()
    assert [value for value, tensor in loaded if not int(tensor.min()) == value == int(tensor.max())] == []


@needs_cuda
@pytest.mark.cuda
def test_cuda_dcp_directory(backend, tmp_path, monkeypatch):
    """A DCP directory loads to CUDA and into a CUDA model. On the native backend every chunk
    read in place goes through the ring, straight into its place; the Python backend assembles
    each chunk on the host and copies it over."""
    import warnings

    import torch.distributed.checkpoint as dcp

    source = factory.seeded_net()
    state = {k: v.detach().cpu().clone() for k, v in source.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        dcp.save({"model": state, "step": 3}, checkpoint_id=str(tmp_path / "ckpt"))
    from ring_probe import ring_bytes

    sent = ring_bytes(monkeypatch)
    model_bytes = sum(t.nbytes for t in state.values())
    got = pyckpt.load(tmp_path / "ckpt", map_location="cuda")
    assert got["step"] == 3
    for key, tensor in state.items():
        assert got["model"][key].device.type == "cuda", key
        assert_same({key: tensor}, {key: got["model"][key].cpu()})
    assert sum(sent) == (model_bytes if backend == "native" else 0)
    sent.clear()
    target = factory.Net().cuda()
    pointers = {k: v.data_ptr() for k, v in target.state_dict().items()}
    assert pyckpt.load_state_dict(target, tmp_path / "ckpt", key="model", map_location="cuda").missing_keys == []
    assert {k: v.data_ptr() for k, v in target.state_dict().items()} == pointers  # filled in place
    for key, tensor in state.items():
        assert torch.equal(target.state_dict()[key].cpu(), tensor), key
    # factory.Net ties embed.weight to head.weight: only head's chunk is read (tied_targets.py)
    filled_bytes = model_bytes - state["embed.weight"].nbytes
    assert sum(sent) == (filled_bytes if backend == "native" else 0)


@needs_cuda
@pytest.mark.cuda
def test_cuda_model_load_state_dict(backend, tmp_path):
    source = factory.seeded_net()
    path = factory.save(factory.dp_state_dict(source), tmp_path / "dp.pt")
    target = factory.Net().cuda()
    pointers = {k: v.data_ptr() for k, v in target.state_dict().items()}
    assert pyckpt.load_state_dict(target, path).missing_keys == []
    assert {k: v.data_ptr() for k, v in target.state_dict().items()} == pointers
    for key, value in source.state_dict().items():  # DataParallel moved source to cuda:0 where there is one
        assert torch.equal(target.state_dict()[key].cpu(), value.cpu()), key


@needs_cuda
@pytest.mark.cuda
def test_cuda_tensors_are_ready_on_the_current_stream(backend, tmp_path):
    big = torch.randn(64 << 20 >> 2)  # 64 MiB: copies still in flight if nobody waited
    path = factory.save({"w": big}, tmp_path / "big.pt")
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        loaded = pyckpt.load(path, map_location="cuda")["w"]
        doubled = loaded * 2  # runs on `side`, right after return, with no synchronize
    torch.cuda.synchronize()
    assert torch.equal(doubled.cpu(), big * 2)


@needs_cuda
@pytest.mark.parametrize("dtype", ["bf16", None])
def test_cuda_load_and_load_state_dict_cast(backend, tmp_path, dtype):
    """An fp32 checkpoint into a bf16 CUDA model (cast through the pinned buffers), and
    ``load(map_location="cuda", dtype=)`` against torch's own cast."""
    source_net = factory.seeded_net(seed=1, width=512)
    path = factory.save(source_net.state_dict(), tmp_path / "fp32.pt")
    expected = factory.seeded_net(seed=2, width=512).to("cuda", torch.bfloat16)
    expected.load_state_dict(source_net.state_dict())
    model = factory.seeded_net(seed=2, width=512).to("cuda", torch.bfloat16)
    pyckpt.load_state_dict(model, path)
    for (key, a), b in zip(expected.state_dict().items(), model.state_dict().values()):
        assert a.dtype == b.dtype and torch.equal(a.cpu(), b.cpu()), key
    got = pyckpt.load(path, map_location="cuda", dtype=dtype)
    for key, tensor in source_net.state_dict().items():
        want = tensor.bfloat16() if dtype and tensor.is_floating_point() else tensor
        assert got[key].device.type == "cuda" and got[key].dtype == want.dtype, key
        assert torch.equal(got[key].cpu(), want), key

