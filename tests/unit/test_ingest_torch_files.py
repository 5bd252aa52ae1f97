"""service.ingest.torch_files: PyTorch files identified by content; state dicts converted by a child
process under weights_only=True."""

from __future__ import annotations

import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file as torch_save_file

from service.errors import PayloadTooLarge
from service.ingest import torch_files
from service.ingest.safetensors import read_safetensors_header
from service.ingest.torch_files import ConversionLimits, classify_zip_entries, identify_model_file
from tests.unit.ingest_support import invalid


def test_ingest_modules_do_not_import_torch():
    code = (
        "import sys, service.ingest.csv, service.ingest.npz, service.ingest.safetensors, "
        "service.ingest.torch_files; assert 'torch' not in sys.modules, 'torch imported'"
    )
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)


class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 2)

    def forward(self, x):
        return self.layer(x)


def _zip(path: Path, names: list[str]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name in names:
            archive.writestr(name, b"x")
    return path


def test_identify_model_file_by_content(tmp_path):
    st = tmp_path / "weights.pt"  # the name says .pt, the bytes are safetensors
    torch_save_file({"w": torch.zeros(2)}, str(st))
    assert identify_model_file(st) == "safetensors"
    zipped = tmp_path / "a.safetensors"
    torch.save({"w": torch.zeros(2)}, zipped)
    legacy = tmp_path / "b.bin"
    torch.save({"w": torch.zeros(2)}, legacy, _use_new_zipfile_serialization=False)
    raw = tmp_path / "c.pkl"
    raw.write_bytes(pickle.dumps({"w": 1}, protocol=2))
    for path in (zipped, legacy, raw):
        assert identify_model_file(path) == "torch-checkpoint", path


def test_torchscript_and_torch_export_archives_are_refused_with_how_to_export(tmp_path):
    scripted = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(_Tiny()), str(scripted))
    err = invalid(identify_model_file, scripted)
    assert err.detail.startswith("the file is a TorchScript archive") and "code/ and constants.pkl" in err.detail
    assert 'save_file(model.state_dict(), "model.safetensors")' in err.detail
    exported = tmp_path / "exported.pt2"
    torch.export.save(torch.export.export(_Tiny(), (torch.randn(1, 3),)), str(exported))
    err = invalid(identify_model_file, exported)
    assert err.detail.startswith("the file is a torch.export archive") and "archive_format" in err.detail
    assert "torch.export.load can run code from a crafted archive" in err.detail
    assert 'save_file(model.state_dict(), "model.safetensors")' in err.detail


def test_classify_zip_entries():
    assert classify_zip_entries(["m/data.pkl", "m/data/0", "m/version"]) == "checkpoint"
    # A checkpoint-looking archive that also carries code is TorchScript, whatever else it holds.
    assert classify_zip_entries(["m/data.pkl", "m/code/__torch__.py"]) == "torchscript"
    assert classify_zip_entries(["m/data.pkl", "m/constants.pkl"]) == "torchscript"
    assert classify_zip_entries(["m/data.pkl", "m/archive_format"]) == "torch.export"
    assert classify_zip_entries(["m/models/model.json", "m/data/weights/weight_0"]) == "torch.export"
    assert classify_zip_entries(["x.npy", "y.npy"]) == "other"
    assert classify_zip_entries(["m/nested/data.pkl"]) == "other"


def test_other_zips_and_broken_zips_are_refused(tmp_path, monkeypatch):
    npz = tmp_path / "d.npz"
    np.savez(npz, x=np.zeros(3))
    assert "not a PyTorch checkpoint" in invalid(identify_model_file, npz).detail
    truncated = tmp_path / "t.pt"
    torch.save({"w": torch.zeros(64)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:-120])
    assert "no zip directory" in invalid(identify_model_file, truncated).detail
    many = _zip(tmp_path / "many.pt", [f"m/data/{i}" for i in range(20)] + ["m/data.pkl"])
    monkeypatch.setattr(torch_files, "MAX_ZIP_ENTRIES", 10)
    assert "lists 21 entries" in invalid(identify_model_file, many).detail


def test_zip_directory_size_reads_torch_zip64_end_records(tmp_path):
    path = tmp_path / "m.pt"
    torch.save({f"w{i}": torch.zeros(i + 1) for i in range(5)}, path)
    with open(path, "rb") as fh:
        entries, directory_bytes = torch_files._zip_directory_size(fh, path.stat().st_size)
    with zipfile.ZipFile(path) as archive:
        assert entries == len(archive.infolist()) and directory_bytes > 0


def _convert(source: Path, tmp_path: Path, **kwargs) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    target = tmp_path / "out.safetensors"
    torch_files.convert_torch_checkpoint(
        source, target, max_output_bytes=kwargs.pop("max_output_bytes", 10**8), **kwargs
    )
    assert read_safetensors_header(target)
    return load_file(str(target))


def test_convert_state_dict_with_tied_and_viewed_tensors(tmp_path):
    base = torch.arange(12, dtype=torch.float32)
    state = {
        "a": base[:6].view(2, 3),
        "b": base[:6].view(2, 3),
        "c": base[6:],
        "t": base.view(3, 4).t(),
        "steps": torch.tensor(5),
        "half": torch.ones(2, dtype=torch.bfloat16),
    }
    path = tmp_path / "tied.pt"
    torch.save({"state_dict": state, "epoch": 3}, path)
    out = _convert(path, tmp_path)
    assert sorted(out) == sorted(state)
    for key, value in state.items():
        assert out[key].dtype == value.dtype and torch.equal(out[key], value), key


def test_convert_refuses_what_is_not_a_state_dict(tmp_path):
    cases = {
        "whole": (_Tiny(), "_Tiny, which is code, not weights"),
        "list": ([torch.zeros(2)], "value of type list, not a state dict"),
        "value": ({"w": torch.zeros(2), "note": "hi"}, "'note' to a value of type str"),
        "key": ({1: torch.zeros(2)}, "keys must be parameter names"),
    }
    for name, (obj, fragment) in cases.items():
        path = tmp_path / f"{name}.pt"
        torch.save(obj, path)
        err = invalid(_convert, path, tmp_path)
        assert fragment in err.detail and 'save_file(model.state_dict(), "model.safetensors")' in err.detail, name
        assert "weights_only=False" not in err.detail
        assert not (tmp_path / "out.safetensors").exists()


def test_convert_limits(tmp_path):
    path = tmp_path / "sd.pt"
    torch.save({"w": torch.zeros(4096)}, path)
    with pytest.raises(PayloadTooLarge, match="exceeds the limit of 1000 bytes"):
        _convert(path, tmp_path, max_output_bytes=1000)
    err = invalid(_convert, path, tmp_path, limits=ConversionLimits(timeout_s=0.05))
    assert "took longer than" in err.detail
    assert not (tmp_path / "out.safetensors").exists() and not list(tmp_path.glob("convert~*"))


def test_convert_memory_cap_counts_resident_memory_not_address_space(tmp_path):
    path = tmp_path / "sd.pt"
    torch.save({"w": torch.zeros(64, 64)}, path)
    # The child maps ~584 MiB (torch's libraries) but keeps ~280 MiB resident: a 400 MiB cap on resident memory
    # lets it convert, as a cap on address space would not (nor, at 3.2 GB mapped, with a CUDA build of torch).
    assert set(_convert(path, tmp_path, limits=ConversionLimits(base_rss_bytes=400 * 2**20))) == {"w"}
    err = invalid(_convert, path, tmp_path, limits=ConversionLimits(base_rss_bytes=64 * 2**20))
    assert "exceeded the server's limits" in err.detail and "64 MiB of memory" in err.detail
    assert not list(tmp_path.glob("convert~*"))
