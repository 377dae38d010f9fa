"""The label store: history and undo, restarts, concurrent writers, the labels training uses."""
import threading

from conftest import tiny_config, write_class_folders
from core.data.labels import LabelStore
from core.data.sources import load_dataset
from core.runs.life import prepare_run
from core.workspace.store import Workspace


def test_history_and_undo(dot_folder, workspace):
    store = LabelStore(workspace)
    ds = load_dataset(str(dot_folder))
    a, b = ds.samples[0].path, ds.samples[1].path
    assert store.version(ds.source) == 0
    v1 = store.set_label(ds.source, a, "dot", original="blank")
    v2 = store.set_labels(ds.source, {a: "other", b: "other"}, source="suggestion", original={b: "blank"})
    assert v2 > v1
    hist = store.history(ds.source, a)
    assert [(h["old_label"], h["new_label"], h["source"]) for h in hist] == [("dot", "other", "suggestion"),
                                                                           ("blank", "dot", "manual")]
    reverted = store.undo(ds.source)  # undoes the two-image action as one
    assert {e["path"] for e in reverted} == {a, b}
    assert store.overrides(ds.source)[a] == ("dot", False)
    assert b not in store.overrides(ds.source)  # exactly as before: no override (not "blank" written down)
    store.undo(ds.source)
    assert store.overrides(ds.source) == {}
    assert store.undo(ds.source) == []
    assert store.version(ds.source) > v2  # undo is itself recorded


def test_undo_is_per_person_and_leaves_a_later_change_by_someone_else(dot_folder, workspace):
    store = LabelStore(workspace)
    ds = load_dataset(str(dot_folder))
    a, b, c = (s.path for s in ds.samples[:3])
    store.set_label(ds.source, a, "dot", original="blank", actor="ana@plant")
    store.set_labels(ds.source, {b: "dot", c: "dot"}, original={b: "blank", c: "blank"}, actor="ana@plant")
    store.set_label(ds.source, c, "scratch", original="blank", actor="ben@plant")  # after Ana, on one of hers
    assert store.undo(ds.source, actor="carl@plant") == []  # nothing of Carl's to undo
    reverted = store.undo(ds.source, actor="ana@plant")  # Ana's last action, not Ben's, which came after it
    assert {e["path"]: e["kept"] for e in reverted} == {b: False, c: True}
    over = store.overrides(ds.source)
    assert b not in over and over[c] == ("scratch", False) and over[a] == ("dot", False)
    assert store.history(ds.source, c)[0]["actor"] == "ben@plant"
    store.undo(ds.source, actor="ana@plant")
    assert a not in store.overrides(ds.source)
    store.undo(ds.source, actor="ben@plant")  # back to what Ben found: Ana's label, which her undo had left
    assert store.overrides(ds.source) == {c: ("dot", False)}


def test_undo_in_a_workspace_from_before_the_exact_state_was_kept(dot_folder, workspace):
    import sqlite3
    ds = load_dataset(str(dot_folder))
    con = sqlite3.connect(workspace.db_path)  # the tables as an older studio made them, with one change in them
    con.executescript(__import__("core.data.labels", fromlist=["SCHEMA"]).SCHEMA)
    con.execute("INSERT INTO labels VALUES (?,?,?,0,1.0)", (ds.source, ds.samples[0].path, "dot"))
    con.execute("INSERT INTO label_history (dataset, path, old_label, new_label, old_excluded, new_excluded, at, "
                "source, batch) VALUES (?,?,'blank','dot',0,0,1.0,'manual','b1')", (ds.source, ds.samples[0].path))
    con.commit()
    con.close()
    store = LabelStore(workspace)  # adds the new columns
    assert [e["path"] for e in store.undo(ds.source)] == [ds.samples[0].path]
    assert store.overrides(ds.source)[ds.samples[0].path] == ("blank", False)  # as it used to undo


def test_labels_survive_a_restart(dot_folder, tmp_path):
    ds = load_dataset(str(dot_folder))
    LabelStore(Workspace(tmp_path / "ws")).set_label(ds.source, ds.samples[0].path, "dot", original="blank")
    again = LabelStore(Workspace(tmp_path / "ws"))  # a new process opening the same workspace
    assert again.overrides(ds.source)[ds.samples[0].path] == ("dot", False)


def test_two_concurrent_writers_lose_nothing(dot_folder, workspace):
    ds = load_dataset(str(dot_folder))
    paths = [s.path for s in ds.samples]

    def writer(k):
        store = LabelStore(workspace)  # each session has its own store and connections
        for p in paths[k::2]:
            store.set_label(ds.source, p, f"w{k}")

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    over = LabelStore(workspace).overrides(ds.source)
    assert len(over) == len(paths)
    assert all(over[p][0] == f"w{i % 2}" for i, p in enumerate(paths))
    assert len(LabelStore(workspace).history(ds.source, limit=1000)) == len(paths)


def test_training_uses_effective_labels_and_records_the_version(tmp_path, workspace):
    root = write_class_folders(tmp_path / "d", per_class=12, size=16)
    (root / "unlabeled").mkdir()
    write_class_folders(tmp_path / "u", per_class=3, size=16)
    for f in (tmp_path / "u" / "dot").iterdir():
        f.rename(root / "unlabeled" / f.name)
    ds = load_dataset(str(root))
    assert ds.classes == ["blank", "dot"] and len(ds.unlabeled) == 3
    store = LabelStore(workspace)
    moved, dropped = ds.samples[0].path, ds.samples[1].path
    store.set_label(ds.source, moved, "dot", original="blank")
    store.exclude(ds.source, [dropped])
    store.set_label(ds.source, ds.unlabeled[0], "dot", source="suggestion")
    version = store.version(ds.source)
    run = prepare_run(workspace, tiny_config(root, epochs=1, batch_size=4))
    assert workspace.run_row(run.id)["label_version"] == version
    split = run.split()
    rows = {r[0]: r[1] for part in ("train", "val", "test") for r in split[part]}
    assert rows[moved] == "dot" and dropped not in rows and rows[ds.unlabeled[0]] == "dot"
    assert len(rows) == 24 - 1 + 1
