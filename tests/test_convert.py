"""pyckpt convert / inspect / verify: round trips against torch, atomicity, exit codes."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
import zlib

import factory
import pytest
import torch
from compare import assert_same
from safetensors.torch import load_file
from torch import nn

import pyckpt
from pyckpt import converting
from pyckpt.rename import make_key_map, rename_tree


def digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def stripped_reference(path, **load_kwargs):
    """What the seed recipe gives: torch.load, then the same renaming, done on real tensors."""
    obj = torch.load(path, weights_only=True, **load_kwargs)
    return rename_tree(obj, make_key_map("auto", None))


def cli(*args, env=None, **kwargs) -> subprocess.CompletedProcess:
    environment = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "pyckpt", *map(str, args)], capture_output=True, text=True, env=environment, **kwargs
    )


def storage_data_offsets(path) -> list[int]:
    return factory.data_offsets(str(path))


@pytest.mark.parametrize("case", ["training_checkpoint", "views", "shared", "parameters", "every_dtype", "exotic", "plain_values", "conj_neg"])
def test_pt_round_trip_matches_the_seed_recipe(backend, tmp_path, case):
    src = factory.save(factory.OBJECT_CASES[case](), tmp_path / "src.pt")
    dst = tmp_path / "dst.pt"
    before = digest(src)
    report = pyckpt.convert(src, dst)
    assert digest(src) == before
    expected = stripped_reference(src)
    assert_same(expected, torch.load(dst, weights_only=True))
    assert_same(expected, torch.load(dst, weights_only=True, mmap=True))
    assert all(offset % 64 == 0 for offset in storage_data_offsets(dst))
    with zipfile.ZipFile(dst) as z:
        assert z.testzip() is None  # every CRC in the central directory is right
    from pyckpt.index import index_checkpoint

    with index_checkpoint(src) as index:
        assert report.tensor_bytes == sum(record.nbytes for record in index.storages.values())


def test_pt_output_keeps_dataparallel_metadata_and_entries(backend, tmp_path):
    net = factory.seeded_net()
    src = factory.save({"epoch": 9, "model": factory.dp_state_dict(net), "note": "x"}, tmp_path / "dp.pt")
    dst = tmp_path / "plain.pt"
    report = pyckpt.convert(src, dst)
    loaded = torch.load(dst, weights_only=True)
    assert loaded["epoch"] == 9 and loaded["note"] == "x"
    assert_same(net.state_dict(), loaded["model"])  # keys, values, and the inner module's _metadata
    assert report.renamed_keys == len(net.state_dict())
    fresh = factory.Net()
    fresh.load_state_dict(loaded["model"])


@pytest.mark.parametrize("variant", ["legacy", "torchscript", "deflate", "unaligned", "big_endian"])
def test_pt_from_every_input_format(backend, tmp_path, variant):
    obj = factory.dp_state_dict(factory.seeded_net())
    src = str(tmp_path / "src.pt")
    if variant == "legacy":
        factory.save(obj, src, _use_new_zipfile_serialization=False)
    elif variant == "torchscript":
        torch.jit.script(factory.seeded_net()).save(src)
    else:
        original = factory.save(obj, tmp_path / "orig.pt")
        if variant == "big_endian":
            factory.make_big_endian(original, src, {str(i): 4 for i in range(100)} | {"8": 8})
        else:
            factory.rezip(original, src, zipfile.ZIP_DEFLATED if variant == "deflate" else zipfile.ZIP_STORED)
    dst = tmp_path / "dst.pt"
    pyckpt.convert(src, dst)
    expected = pyckpt.load(src, strip_prefix="auto", mmap=False)
    assert_same(expected, torch.load(dst, weights_only=True))
    assert all(offset % 64 == 0 for offset in storage_data_offsets(dst))
    assert zipfile.ZipFile(dst).testzip() is None


def test_pt_pass_through_keeps_bytes(backend, tmp_path):
    """Storage records are copied byte for byte (no decode/re-encode)."""
    src = factory.save({"module.w": torch.randn(1000), "module.b": torch.arange(7)}, tmp_path / "s.pt")
    dst = tmp_path / "d.pt"
    pyckpt.convert(src, dst)
    with zipfile.ZipFile(src) as a, zipfile.ZipFile(dst) as b:
        source = sorted(a.read(n) for n in a.namelist() if "/data/" in n)
        output = sorted(b.read(n) for n in b.namelist() if "/data/" in n)
    assert source == output


def test_safetensors_output(backend, tmp_path):
    net = factory.seeded_net()
    state = factory.dp_state_dict(net)
    state["module.view"] = torch.arange(24.0).reshape(4, 6).t()  # non-contiguous view
    src = factory.save({"epoch": 4, "lr": 0.5, "name": "run", "state_dict": state}, tmp_path / "train.pt")
    dst = tmp_path / "model.safetensors"
    pyckpt.convert(src, dst)
    loaded = load_file(dst)
    reference = {k.removeprefix("module."): v for k, v in state.items()}
    assert list(loaded) == list(reference) or set(loaded) == set(reference)
    for key, value in reference.items():
        assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value.contiguous()), key
    assert torch.equal(loaded["head.weight"], loaded["embed.weight"])  # tied: kept under both keys
    from safetensors import safe_open

    with safe_open(dst, "pt") as f:
        assert f.metadata() == {"format": "pt", "epoch": "4", "lr": "0.5", "name": "run"}


def test_safetensors_refuses_to_lose_entries(backend, tmp_path):
    src = factory.save(factory.training_checkpoint(), tmp_path / "t.pt")
    dst = tmp_path / "m.safetensors"
    with pytest.raises(pyckpt.CheckpointError) as error:
        pyckpt.convert(src, dst)
    assert "'optimizer'" in str(error.value) and "'hparams'" in str(error.value)
    assert not dst.exists()
    report = pyckpt.convert(src, dst, drop_extra=True)
    assert any("optimizer" in d for d in report.dropped)
    assert len(load_file(dst)) == 10


def test_safetensors_key_and_bad_dtype(backend, tmp_path):
    src = factory.save({"a": {"x": torch.ones(2)}, "b": {"y": torch.zeros(3)}}, tmp_path / "two.pt")
    dst = tmp_path / "b.safetensors"
    pyckpt.convert(src, dst, key="b", drop_extra=True)
    assert list(load_file(dst)) == ["y"]
    src2 = factory.save({"z": torch.ones(2, dtype=torch.complex128)}, tmp_path / "c.pt")
    with pytest.raises(pyckpt.CheckpointError, match="'z'.*complex128"):
        pyckpt.convert(src2, tmp_path / "c.safetensors")


def test_collision_refused_and_nothing_written(backend, tmp_path):
    src = factory.save({"module.w": torch.ones(1), "w": torch.zeros(1)}, tmp_path / "c.pt")
    result = cli("convert", src, tmp_path / "out.pt")
    assert result.returncode == 1
    assert "'module.w'" in result.stderr and "'w'" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out.pt").exists()
    assert sorted(os.listdir(tmp_path)) == ["c.pt"]


def test_existing_destination_needs_force(backend, tmp_path):
    src = factory.save({"module.w": torch.ones(3)}, tmp_path / "s.pt")
    dst = tmp_path / "d.pt"
    dst.write_bytes(b"precious")
    result = cli("convert", src, dst)
    assert result.returncode == 1 and "--force" in result.stderr
    assert dst.read_bytes() == b"precious"
    assert cli("convert", src, dst, "--force", "--quiet").returncode == 0
    assert list(torch.load(dst, weights_only=True)) == ["w"]


def test_convert_in_place(backend, tmp_path):
    src = factory.save(factory.dp_state_dict(factory.seeded_net()), tmp_path / "same.pt")
    expected = stripped_reference(src)
    refused = cli("convert", src, src)
    assert refused.returncode == 1 and "--force" in refused.stderr
    assert cli("convert", src, src, "--force", "--quiet").returncode == 0
    assert_same(expected, torch.load(src, weights_only=True))


def test_inspect_json(backend, tmp_path):
    src = factory.save(factory.training_checkpoint(), tmp_path / "t.pt")
    result = cli("inspect", src, "--json")
    assert result.returncode == 0
    info = json.loads(result.stdout)
    assert info["format"] == "zip" and info["top_folder"] == "t"
    state_dict = next(sd for sd in info["state_dicts"] if sd["entry"] == "state_dict")
    assert state_dict["wrapper_prefixes"] == {"module.": 10}
    assert state_dict["auto_strip"]["renamed"] == 10
    assert {e["key"] for e in info["entries"]} == {"epoch", "optimizer", "hparams", "rng"}
    assert info["dtypes"]["float32"]["tensors"] == 14
    assert sum(d["tensors"] for d in info["dtypes"].values()) == info["tensors"] == len(info["table"])


@pytest.mark.parametrize("compression", [zipfile.ZIP_DEFLATED, zipfile.ZIP_STORED])
def test_inspect_warns_of_compressed_and_notes_unaligned_storages(backend, tmp_path, compression):
    original = factory.save({f"t{i}": torch.randn(16 + i) for i in range(6)}, tmp_path / "aligned.pt")
    src = factory.rezip(original, str(tmp_path / "rezipped.pt"), compression)
    info = json.loads(cli("inspect", src, "--json").stdout)
    text = cli("inspect", src).stdout
    if compression == zipfile.ZIP_DEFLATED:
        assert info["compressed_storages"] == 6 and info["unaligned_storages"] == 0
        assert "6 compressed storages: they are inflated and read, never mapped" in text
        assert "not aligned" not in text
    else:
        unaligned = sum(1 for offset in storage_data_offsets(src) if offset % 64)
        assert unaligned > 0  # Python's zipfile leaves no padding, so this file has some
        assert info["compressed_storages"] == 0 and info["unaligned_storages"] == unaligned
        assert f"{unaligned} storages are not aligned for a mapping: they are read, not mapped" in text
        assert "compressed" not in text


def test_inspect_truncates_huge_tables(backend, tmp_path):
    src = factory.save(factory.many_tensors(500), tmp_path / "m.pt")
    text = cli("inspect", src).stdout
    assert "... 460 more tensors" in text
    assert len(json.loads(cli("inspect", src, "--json", "--all").stdout)["table"]) == 500


def test_verify_clean_and_flipped_byte(backend, tmp_path):
    src = factory.save({"layer.weight": torch.randn(256), "other": torch.ones(4)}, tmp_path / "v.pt")
    assert cli("verify", src).returncode == 0
    offset = next(o for o in storage_data_offsets(src))
    data = bytearray(open(src, "rb").read())
    data[offset + 100] ^= 0xFF
    bad = tmp_path / "flipped.pt"
    bad.write_bytes(bytes(data))
    result = cli("verify", bad)
    assert result.returncode == 1
    assert "CRC32 mismatch" in result.stderr and "v/data/0" in result.stderr and "'layer.weight'" in result.stderr
    from pyckpt.verification import verify_checkpoint

    assert not verify_checkpoint(bad).ok and verify_checkpoint(src).ok


def test_verify_reports_bad_views(backend, tmp_path):
    src = factory.save({"w": torch.arange(10.0)}, tmp_path / "w.pt")
    from pyckpt.index import index_checkpoint

    with index_checkpoint(src) as index:
        record = index.storages["0"]
    # Shrink the declared storage: rewrite numel 10 -> 5 in data.pkl (BININT1 10 after 'cpu').
    with zipfile.ZipFile(src) as z:
        pickle_bytes = z.read("w/data.pkl")
    patched = pickle_bytes.replace(b"X\x03\x00\x00\x00cpuq\x06K\n", b"X\x03\x00\x00\x00cpuq\x06K\x05")
    assert patched != pickle_bytes and record.nbytes == 40
    bad = factory.rezip(src, str(tmp_path / "lying.pt"), zipfile.ZIP_STORED,
                        transform=lambda name, data: patched if name.endswith("data.pkl") else data)
    result = cli("verify", bad)
    assert result.returncode == 1 and "needs 40 bytes but storage '0' has 20" in result.stderr


def test_exit_codes_and_help(backend, tmp_path):
    assert cli("convert").returncode == 2
    assert cli("convert", "a", "b", "--format", "zip").returncode == 2
    missing = cli("convert", tmp_path / "missing.pt", tmp_path / "o.pt")
    assert missing.returncode == 1 and "missing.pt" in missing.stderr and "Traceback" not in missing.stderr
    debug = cli("--debug", "convert", tmp_path / "missing.pt", tmp_path / "o.pt")
    assert "Traceback" in debug.stderr
    for command in ("convert", "inspect", "verify", "demo"):
        text = cli(command, "--help").stdout
        assert "example" in text and "usage" in text
        if command != "demo":  # every reading command says which layouts it reads
            flat = " ".join(text.split())
            assert all(kind in flat for kind in ("legacy", ".safetensors", "sharded model directory", "(DCP)")), command


def test_summary_line_and_quiet(backend, tmp_path):
    src = factory.save({"module.w": torch.ones(3)}, tmp_path / "s.pt")
    loud = cli("convert", src, tmp_path / "a.pt")
    assert loud.returncode == 0 and "1 tensors" in loud.stderr and "1 keys renamed" in loud.stderr
    quiet = cli("convert", src, tmp_path / "b.pt", "--quiet")
    assert quiet.returncode == 0 and quiet.stderr == "" and quiet.stdout == ""


def test_progress_bar_draws_bytes_rate_and_eta():
    import io

    from pyckpt.cli.progress import ProgressBar

    stream = io.StringIO()
    bar = ProgressBar("converting", stream=stream, enabled=True)
    bar.update(512 << 20, 1 << 30)
    bar.update(1 << 30, 1 << 30)
    text = stream.getvalue()
    assert "50.0%" in text and "100.0%" in text and "GB/s" in text and "ETA" in text and "1.00 GiB" in text


def _big_checkpoint(path, megabytes=256):
    factory.save({f"module.layer{i}.weight": torch.full((megabytes // 8, 1 << 18), float(i)) for i in range(8)}, path)
    return str(path)


KILLABLE_CONVERT = """
import sys, time, pathlib, pyckpt
marker = pathlib.Path(sys.argv[3])
def progress(done, total):
    # Announce that bytes are being written, then linger so the parent can kill us mid-write.
    if not marker.exists():
        marker.write_text(str(done))
        time.sleep(30)
pyckpt.convert(sys.argv[1], sys.argv[2], progress=progress)
"""


def test_sigkill_mid_write_leaves_nothing_at_destination(backend, tmp_path):
    src = _big_checkpoint(tmp_path / "big.pt", megabytes=64)
    before = digest(src)
    dst, marker = tmp_path / "out.pt", tmp_path / "writing"
    env = {**os.environ, "PYCKPT_DISABLE_EXT": "1" if backend == "python" else ""}
    process = subprocess.Popen([sys.executable, "-c", KILLABLE_CONVERT, src, str(dst), str(marker)], env=env)
    deadline = time.monotonic() + 120
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert marker.exists(), "convert never started writing"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not dst.exists()
    assert digest(src) == before
    # O_TMPFILE: not even a temporary name survives SIGKILL.
    assert sorted(os.listdir(tmp_path)) == ["big.pt", "writing"]


def test_sigkill_at_random_moments(backend, tmp_path):
    """Whenever the kill lands, DST is either absent or complete, and the input is unchanged."""
    src = _big_checkpoint(tmp_path / "big.pt")
    before = digest(src)
    env = {**os.environ, "PYCKPT_DISABLE_EXT": "1" if backend == "python" else ""}
    for delay in (0.5, 1.0, 1.5, 2.0):
        dst = tmp_path / f"out-{delay}.pt"
        process = subprocess.Popen([sys.executable, "-m", "pyckpt", "convert", src, str(dst), "--quiet"], env=env)
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait()
        if dst.exists():  # the rename happened before the kill: then the file is whole
            assert torch.load(dst, weights_only=True, mmap=True)["layer7.weight"][-1, -1].item() == 7.0
    assert digest(src) == before
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".pyckpt-tmp")]


def _limited(limit_bytes):
    def apply():
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return apply


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_file_size_limit_gives_clean_error(backend, tmp_path, fmt):
    src = factory.save({"module.w": torch.randn(1 << 20)}, tmp_path / "s.pt")
    before = digest(src)
    dst = tmp_path / f"out.{fmt}"
    env = {**os.environ, "PYCKPT_DISABLE_EXT": "1" if backend == "python" else ""}
    result = subprocess.run(
        [sys.executable, "-m", "pyckpt", "convert", src, str(dst)],
        capture_output=True, text=True, env=env, preexec_fn=_limited(1 << 20),
    )
    assert result.returncode == 1, result.stderr
    assert "File too large" in result.stderr and "Traceback" not in result.stderr
    assert not dst.exists() and digest(src) == before
    assert sorted(os.listdir(tmp_path)) == ["s.pt"]


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory holding a checkpoint, where nothing can be written (even by root)."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.getuid() != 0:
        src = factory.save({"module.w": torch.ones(4)}, folder / "s.pt")
        os.chmod(src, 0o444)
        os.chmod(folder, 0o555)
        yield folder
        os.chmod(folder, 0o755)
        return
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "none", str(folder)], capture_output=True).returncode:
        pytest.skip("running as root without permission to mount a read-only filesystem")
    try:
        factory.save({"module.w": torch.ones(4)}, folder / "s.pt")
        subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=False)


def test_read_only_input_works_and_read_only_output_fails_clearly(backend, read_only_dir):
    src = read_only_dir / "s.pt"
    assert list(pyckpt.load(src, strip_prefix="auto")) == ["w"]
    assert torch.equal(pyckpt.load(src, mmap=True)["module.w"], torch.ones(4))
    model = nn.Linear(2, 2)
    with pytest.raises(RuntimeError):  # wrong shapes: the point is it opens read-only files
        pyckpt.load_state_dict(model, src)
    env = {"PYCKPT_DISABLE_EXT": "1" if backend == "python" else ""}
    failed = cli("convert", src, read_only_dir / "o.pt", env=env)
    assert failed.returncode == 1 and "Traceback" not in failed.stderr
    assert "Read-only file system" in failed.stderr or "Permission denied" in failed.stderr
    assert sorted(os.listdir(read_only_dir)) == ["s.pt"]


# -- pt output of a torch-written file: the storage records copied as one span ------------


def _zip_records(path) -> dict[str, zipfile.ZipInfo]:
    with zipfile.ZipFile(path) as z:
        return {info.filename: info for info in z.infolist()}


def _span_bytes(path, names) -> bytes:
    """The bytes from the first named record's local header to the end of the last's data."""
    infos = _zip_records(path)
    first, last = infos[names[0]], infos[names[-1]]
    data_end = factory.data_offsets(str(path))[-1] + last.file_size
    with open(path, "rb") as f:
        f.seek(first.header_offset)
        return f.read(data_end - first.header_offset)


def _refuse_general_path(*args, **kwargs):
    raise AssertionError("convert wrote the storages one by one, not as one span")


@pytest.mark.parametrize("case", ["training_checkpoint", "views", "shared", "every_dtype"])
def test_pt_output_copies_the_storage_span_whole(backend, tmp_path, monkeypatch, case):
    src = factory.save(factory.OBJECT_CASES[case](), tmp_path / "src.pt")
    dst = tmp_path / "dst.pt"
    monkeypatch.setattr(pyckpt.converting, "write_pt", _refuse_general_path)
    report = pyckpt.convert(src, dst)
    expected = stripped_reference(src)
    assert_same(expected, torch.load(dst, weights_only=True))
    assert_same(expected, torch.load(dst, weights_only=True, mmap=True))
    assert_same(expected, pyckpt.load(dst, mmap=True))
    assert all(offset % 64 == 0 for offset in storage_data_offsets(dst))
    with zipfile.ZipFile(dst) as z:
        assert z.testzip() is None
        names = z.namelist()
    # torch's reader takes the top folder from the first directory entry: data.pkl, as torch lists it.
    assert names[0].endswith("/data.pkl") and names[-1].endswith("/version")
    storages = [name for name in names if "/data/" in name]
    assert storages == [name for name in _zip_records(src) if "/data/" in name]
    # Local headers, data and data descriptors: the same bytes as in the source.
    assert _span_bytes(dst, storages) == _span_bytes(src, storages)
    assert report.storages == len(storages)
    assert report.tensor_bytes == sum(_zip_records(src)[name].file_size for name in storages)


def _aligned_zip(path, records: list[tuple[str, bytes]]) -> str:
    """A stored zip with every record's data 64-byte aligned, records in the given order."""
    from pyckpt.sinks.torch_zip import central_directory, lay_out, local_header

    laid_out, cd_offset = lay_out([(name, len(data)) for name, data in records])
    with open(path, "wb") as f:
        for record, (_, data) in zip(laid_out, records):
            record.crc32 = zlib.crc32(data)
            f.write(local_header(record) + data)
        assert f.tell() == cd_offset
        f.write(central_directory(laid_out, cd_offset))
    return str(path)


def test_pt_output_written_record_by_record_when_the_pickle_names_storages_otherwise(backend, tmp_path, monkeypatch):
    """Storage records stored out of the pickle's order: the span is copied, found not to fit
    once the pickle is written, and the file is written the general way instead."""
    original = factory.save(factory.dp_state_dict(factory.seeded_net()), tmp_path / "orig.pt")
    with zipfile.ZipFile(original) as z:
        records = [(info.filename, z.read(info)) for info in z.infolist()]
    storages = [record for record in records if "/data/" in record[0]]
    others = [record for record in records if "/data/" not in record[0]]
    src = _aligned_zip(tmp_path / "reordered.pt", others[:1] + storages[::-1] + others[1:])
    general = []
    real_write_pt = converting.write_pt
    monkeypatch.setattr(pyckpt.converting, "write_pt", lambda *a, **k: general.append(1) or real_write_pt(*a, **k))
    dst = tmp_path / "dst.pt"
    report = pyckpt.convert(src, dst)
    assert general == [1]
    expected = stripped_reference(src)
    assert_same(expected, torch.load(dst, weights_only=True))
    assert_same(expected, torch.load(dst, weights_only=True, mmap=True))
    assert all(offset % 64 == 0 for offset in storage_data_offsets(dst))
    assert zipfile.ZipFile(dst).testzip() is None
    assert report.file_bytes == os.path.getsize(dst)  # the span copied first left nothing behind


def _span_cases(tmp_path) -> dict[str, tuple[str, bool]]:
    """Zips whose storage records are (True) or are not (False) one copyable span."""
    original = factory.save(factory.dp_state_dict(factory.seeded_net()), tmp_path / "orig.pt")
    with zipfile.ZipFile(original) as z:
        records = [(info.filename, z.read(info)) for info in z.infolist()]
    storages = [record for record in records if "/data/" in record[0]]
    others = [record for record in records if "/data/" not in record[0]]
    deflated = tmp_path / "deflated.pt"
    with zipfile.ZipFile(deflated, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for name, data in records:
            z.writestr(name, data)
    return {
        "torch": (original, True),
        "reordered": (_aligned_zip(tmp_path / "reordered.pt", others[:1] + storages[::-1] + others[1:]), True),
        "record between": (_aligned_zip(tmp_path / "between.pt", others[:1] + storages[:1] + others[1:2] + storages[1:] + others[2:]), False),
        "deflated": (str(deflated), False),
        "no storages": (_aligned_zip(tmp_path / "empty.pt", others), False),
    }


def test_native_and_python_span_finders_agree(tmp_path):
    """The native span finder (no Python object per record) is the Python one's twin."""
    from pyckpt._backend import native_backend, python_backend
    from pyckpt.index.source import open_source
    from pyckpt.sinks.storage_span import find_storage_span

    from conftest import require_backend

    require_backend("native")
    for name, (path, copyable) in _span_cases(tmp_path).items():
        spans = []
        for backend in (native_backend(), python_backend()):
            with open_source(path) as source:
                spans.append(find_storage_span(backend.zip_entries(source)))
        assert spans[0] == spans[1], name
        assert (spans[0] is not None) == copyable, name
        if copyable:
            infos = sorted((info for info in zipfile.ZipFile(path).infolist() if "/data/" in info.filename),
                           key=lambda info: info.header_offset)
            assert spans[0].start == infos[0].header_offset and spans[0].count == len(infos), name
