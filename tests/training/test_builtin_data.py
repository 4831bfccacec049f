"""Builtin data sets: parsing, labelling and splitting on synthetic sdists with the real layout.

Only the test marked slow touches the real sources (cached, else downloaded with pip).
"""

import dataclasses
import io
import json
import subprocess
import tarfile
from pathlib import Path

import pytest

from metatt_deploy.common.errors import MetaTTError
from metatt_deploy.training import builtin_data as db

MOVIE_MEMBER = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"


def _add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def _targz(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        for name, data in members.items():
            _add(archive, name, data)
    return path


def _ground_truth(n: int) -> bytes:
    """n rows with scores cycling through positive, negative and exactly neutral (dropped)."""
    scores = ["1.5", "-0.25", "0", "2.26666666667", "-3.1"]
    lines = [f"{i}\t{scores[(i - 1) % len(scores)]}\tsnippet {i} caf\u00e9" for i in range(1, n + 1)]
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")


def _vader_sdist(tmp_path: Path, ground_truth: bytes) -> Path:
    inner = _targz(tmp_path / "hutto.tar.gz", {MOVIE_MEMBER: ground_truth, "hutto_ICWSM_2014/other.txt": b"x"})
    return _targz(
        tmp_path / db.VADER.filename,
        {
            "vaderSentiment-3.3.2/setup.py": b"",
            db.HUTTO_ARCHIVE: inner.read_bytes(),
        },
    )


def _snli_line(pair_id: str, label: str) -> str:
    return json.dumps(
        {
            "gold_label": label,
            "pairID": pair_id,
            "sentence1": f"premise {pair_id}",
            "sentence2": f"hypothesis {pair_id}",
            "sentence1_parse": "(ROOT)",
        }
    )


@pytest.fixture
def movie_source(tmp_path, monkeypatch):
    """A synthetic vaderSentiment sdist in <data>/sources, with the pinned sha256 set to its own."""
    data_dir = tmp_path / "data"
    sdist = _vader_sdist(tmp_path, _ground_truth(50))
    (data_dir / "sources").mkdir(parents=True)
    cached = data_dir / "sources" / db.VADER.filename
    cached.write_bytes(sdist.read_bytes())
    source = dataclasses.replace(db.VADER, sha256=db.sha256_file(cached))
    task = dataclasses.replace(db.BUILTIN_TASKS["movie-sentiment"], source=source)
    monkeypatch.setitem(db.BUILTIN_TASKS, "movie-sentiment", task)
    return data_dir, source


def _no_pip(*args, **kwargs):
    raise AssertionError("pip must not run when the source is cached")


# ---------------------------------------------------------------- labelling and parsing


@pytest.mark.parametrize("score, label", [(0.01, "positive"), (-0.01, "negative"), (0.0, None), (-0.0, None)])
def test_sentiment_label_rule(score, label):
    assert db.sentiment_label(score) == label


def test_parse_ground_truth_crlf_unicode_and_neutral():
    rows = db.parse_ground_truth(_ground_truth(5).decode("utf-8"), "gt.txt")
    assert [r["id"] for r in rows] == ["1", "2", "4", "5"]  # id 3 has score 0
    assert rows[0] == {"text": "snippet 1 caf\u00e9", "label": "positive", "score": 1.5, "id": "1"}
    assert [r["label"] for r in rows] == ["positive", "negative", "positive", "negative"]


def test_parse_ground_truth_keeps_tabs_inside_text():
    assert db.parse_ground_truth("7\t1\ta\tb", "gt.txt")[0]["text"] == "a\tb"


@pytest.mark.parametrize("line", ["1\t0.5", "1\tgood\ttext"])
def test_parse_ground_truth_rejects_malformed_lines(line):
    with pytest.raises(MetaTTError, match=r"gt.txt line 2 .*prepare_data"):
        db.parse_ground_truth("1\t1\tok\n" + line, "gt.txt")


def test_parse_snli_drops_no_consensus_and_renames():
    lines = [_snli_line("a", "neutral"), _snli_line("b", "-"), "", _snli_line("c", "entailment")]
    rows = db.parse_snli(lines, "snli.jsonl")
    assert rows == [
        {"premise": "premise a", "hypothesis": "hypothesis a", "label": "neutral", "id": "a"},
        {"premise": "premise c", "hypothesis": "hypothesis c", "label": "entailment", "id": "c"},
    ]


@pytest.mark.parametrize("line", [_snli_line("a", "maybe"), "{not json", json.dumps({"gold_label": "neutral"})])
def test_parse_snli_rejects_bad_records(line):
    with pytest.raises(MetaTTError, match="snli.jsonl line 1"):
        db.parse_snli([line], "snli.jsonl")


# ---------------------------------------------------------------- splitting


def _rows(n: int) -> list[dict]:
    return [{"id": f"{i:03d}", "label": "positive"} for i in range(n)]


def test_split_80_10_10_sizes_disjoint_and_order_independent():
    rows = _rows(105)
    splits = db.split_80_10_10(rows)
    assert {k: len(v) for k, v in splits.items()} == {"train": 85, "validation": 10, "test": 10}
    ids = [r["id"] for part in splits.values() for r in part]
    assert sorted(ids) == sorted(r["id"] for r in rows)
    assert db.split_80_10_10(list(reversed(rows))) == splits
    assert [r["id"] for r in splits["train"]] != sorted(r["id"] for r in splits["train"])  # shuffled


def test_split_snli_carves_fixed_validation():
    train, test = _rows(30), _rows(4)
    splits = db.split_snli(train, test, validation_size=7)
    assert (len(splits["train"]), len(splits["validation"])) == (23, 7)
    assert splits["test"] is test
    assert db.split_snli(list(reversed(train)), test, validation_size=7) == splits
    with pytest.raises(MetaTTError, match="only 30 pairs"):
        db.split_snli(train, test, validation_size=30)


# ---------------------------------------------------------------- archives


def test_read_sentiment_rows_from_nested_archive(tmp_path):
    sdist = _vader_sdist(tmp_path, _ground_truth(10))
    rows = db.read_sentiment_rows(sdist, MOVIE_MEMBER)
    assert len(rows) == 8 and rows[0]["text"] == "snippet 1 caf\u00e9"


def test_read_snli_rows_from_archive(tmp_path):
    member = f"{db.NLI_LR.root}/data/snli_1.0_test.jsonl"
    lines = "\n".join([_snli_line("x", "contradiction"), _snli_line("y", "-")]).encode()
    sdist = _targz(tmp_path / db.NLI_LR.filename, {member: lines})
    assert [r["id"] for r in db.read_snli_rows(sdist, member)] == ["x"]


def test_missing_member_is_a_clear_error(tmp_path):
    sdist = _targz(tmp_path / "s.tar.gz", {"other": b""})
    with pytest.raises(MetaTTError, match=f"has no member {db.HUTTO_ARCHIVE}; delete it"):
        db.read_sentiment_rows(sdist, MOVIE_MEMBER)


def test_link_members_are_refused_and_nothing_is_extracted(tmp_path):
    sdist = tmp_path / "s.tar.gz"
    with tarfile.open(sdist, "w:gz") as archive:
        _add(archive, "../escape.txt", b"evil")
        link = tarfile.TarInfo(db.HUTTO_ARCHIVE)
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        archive.addfile(link)
    with pytest.raises(MetaTTError, match="is not a regular file"):
        db.read_sentiment_rows(sdist, MOVIE_MEMBER)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.tar.gz"]


def test_corrupt_archive_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(b"not a tarball")
    with pytest.raises(MetaTTError, match="not a readable .tar.gz"):
        db.read_sentiment_rows(bad, MOVIE_MEMBER)


# ---------------------------------------------------------------- data dir, sources, cache


def test_resolve_data_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("METATT_DATA_DIR", str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert db.resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"
    assert db.resolve_data_dir() == tmp_path / "env"
    monkeypatch.delenv("METATT_DATA_DIR")
    assert db.resolve_data_dir() == tmp_path / "xdg" / "metatt-deploy" / "data"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert db.resolve_data_dir() == tmp_path / "home" / ".cache" / "metatt-deploy" / "data"


def test_ensure_builtin_builds_from_cached_source(movie_source, monkeypatch, capsys):
    data_dir, source = movie_source
    monkeypatch.setattr(db.subprocess, "run", _no_pip)
    task_dir = db.ensure_builtin("movie-sentiment", data_dir)
    assert task_dir == data_dir / "movie-sentiment"
    info = json.loads((task_dir / "info.json").read_text())
    assert info["splits"] == {"train": 32, "validation": 4, "test": 4}  # 50 rows, 10 neutral dropped
    assert info["label_names"] == ["negative", "positive"] and info["text_columns"] == ["text"]
    assert info["source"] == {
        "package": "vaderSentiment",
        "version": "3.3.2",
        "sha256": source.sha256,
        "sdist": "vaderSentiment-3.3.2.tar.gz",
        "members": [db.HUTTO_ARCHIVE, MOVIE_MEMBER],
    }
    assert sum(info["label_counts"]["train"].values()) == 32
    rows = [json.loads(line) for line in (task_dir / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 32 and set(rows[0]) == {"text", "label", "score", "id"}
    assert "movie-sentiment: train 32, validation 4, test 4" in capsys.readouterr().out
    assert [p.name for p in data_dir.iterdir() if p.name.startswith(".")] == []  # no temporaries left


def test_ensure_builtin_reuses_cache_and_rebuilds_when_needed(movie_source, monkeypatch):
    data_dir, _ = movie_source
    task_dir = db.ensure_builtin("movie-sentiment", data_dir)
    stamp = (task_dir / "info.json").stat().st_mtime_ns
    builds = []
    real_build = db.build_splits
    monkeypatch.setattr(db, "build_splits", lambda *args: builds.append(args) or real_build(*args))
    assert db.ensure_builtin("movie-sentiment", data_dir) == task_dir
    assert builds == [] and (task_dir / "info.json").stat().st_mtime_ns == stamp
    db.ensure_builtin("movie-sentiment", data_dir, force=True)
    assert len(builds) == 1
    (task_dir / "test.jsonl").unlink()  # an incomplete cache is rebuilt without force
    db.ensure_builtin("movie-sentiment", data_dir)
    assert len(builds) == 2 and (task_dir / "test.jsonl").is_file()


def test_prepare_builtins_reports_cached(movie_source, capsys):
    data_dir, _ = movie_source
    db.prepare_builtins(["movie-sentiment"], data_dir)
    db.prepare_builtins(["movie-sentiment"], data_dir)
    assert "movie-sentiment: cached at" in capsys.readouterr().out
    with pytest.raises(MetaTTError, match="unknown builtin data set 'bogus'; choose one of: movie-sentiment"):
        db.prepare_builtins(["movie-sentiment", "bogus"], data_dir)


def test_sha_mismatch_is_refused(movie_source):
    data_dir, _ = movie_source
    with pytest.raises(MetaTTError, match="expected 5d7c06e0.*delete the file and rerun"):
        db.fetch_source(db.VADER, data_dir / "sources")


def test_fetch_source_downloads_with_pinned_hash(tmp_path, monkeypatch):
    sdist = _vader_sdist(tmp_path, _ground_truth(3))
    source = dataclasses.replace(db.VADER, sha256=db.sha256_file(sdist))
    calls = []

    def fake_pip(cmd, **kwargs):
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        dest.mkdir()
        (dest / source.filename).write_bytes(sdist.read_bytes())
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(db.subprocess, "run", fake_pip)
    path = db.fetch_source(source, tmp_path / "sources")
    assert path.read_bytes() == sdist.read_bytes()
    (cmd,) = calls
    assert cmd[1:7] == ["-m", "pip", "download", "--no-binary", ":all:", "--no-deps"]
    assert "--no-build-isolation" in cmd
    requirements = Path(cmd[cmd.index("-r") + 1])
    assert not requirements.exists()  # the temporary download folder is gone
    assert sorted(p.name for p in (tmp_path / "sources").iterdir()) == [source.filename]


def test_pip_failure_is_one_line(tmp_path, monkeypatch):
    stderr = "WARNING: Location 'file:///opt/pypi/x' is ignored\nERROR: No matching distribution found\n  detail\n"
    monkeypatch.setattr(db.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", stderr))
    with pytest.raises(MetaTTError) as info:
        db.fetch_source(db.VADER, tmp_path / "sources")
    assert "(ERROR: No matching distribution found); check access to PyPI" in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_builtin(tmp_path):
    with pytest.raises(MetaTTError, match="unknown builtin data set 'sst2'; choose one of: .*snli"):
        db.ensure_builtin("sst2", tmp_path)


# ---------------------------------------------------------------- the real source


@pytest.mark.slow
def test_real_movie_sentiment():
    try:
        task_dir = db.ensure_builtin("movie-sentiment")
    except MetaTTError as e:
        if "pip could not download" in str(e):
            pytest.skip(f"source not cached and not downloadable: {e}")
        raise
    info = json.loads((task_dir / "info.json").read_text())
    assert sum(info["splits"].values()) == 10_605 - 37
    assert info["splits"] == {"train": 8456, "validation": 1056, "test": 1056}
    for split, counts in info["label_counts"].items():
        assert 0.4 < counts["positive"] / info["splits"][split] < 0.6, split
    lines = (task_dir / "validation.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 1056
