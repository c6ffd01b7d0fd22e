"""Results files: the record, a table of whatever runs exist, bad files skipped, README's table rebuilt."""

import importlib.util
import json

import pytest
import torch
from conftest import ROOT

import helpers as H


def record(name, epochs_run, epochs, test_acc, status="complete"):
    history = {"steps_per_epoch": 1, "epoch": list(range(1, epochs_run + 1)), "train_loss": [1.0] * epochs_run,
               "train_acc": [90.0] * epochs_run, "val_loss": [1.0] * epochs_run,
               "val_acc": [70.0 + i for i in range(epochs_run)],
               "test_loss": [1.0] * epochs_run, "test_acc": [test_acc - 1] * (epochs_run - 1) + [test_acc],
               "epoch_time": [60.0] * epochs_run, "lr": [0.1] * epochs_run}
    model = H.make_model("resnet18")
    config = {"model": model.arch, "epochs": epochs, "scheduler": {"name": "OneCycleLR"}}
    return H.run_record(name, config, history, H.count_params(model), "CPU (test)", 600.0, status,
                        best_epoch=epochs_run)


def test_table_lists_every_run_with_its_state(tmp_path):
    H.save_results(record("resnet18_onecycle", 20, 20, 94.12), tmp_path)
    H.save_results(record("steplr_cutout", 40, 150, 85.5, status="running"), tmp_path)
    H.save_results(record("my_own_run", 3, 20, 10.0, status="diverged"), tmp_path)
    lines = H.results_table(tmp_path).splitlines()
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {ln.split("|")[1].strip(): dict(zip(head, [c.strip() for c in ln.strip("|").split("|")]))
            for ln in lines[2:]}
    assert set(rows) == {"resnet18_onecycle", "steplr_cutout", "my_own_run"}
    headline = rows["resnet18_onecycle"]
    assert headline["final test acc %"] == "94.12" and headline["epochs"] == "20/20"
    assert headline["params"] == "11,173,962" and headline["wall time"] == "10.0 min"
    assert headline["model"] == "resnet18 bn" and headline["test acc at best val %"] == "94.12"
    assert rows["steplr_cutout"]["epochs"] == "40/150 (running)"
    assert rows["my_own_run"]["epochs"] == "3/20 (stopped: diverged)" and headline["device"] == "CPU (test)"


def test_a_bad_results_file_is_skipped_with_one_warning_naming_it(tmp_path):
    H.save_results(record("good", 1, 1, 50.0), tmp_path)
    results = tmp_path / "results"
    (results / "truncated.json").write_text('{"experiment": "trunc')
    (results / "a_list.json").write_text("[1, 2]")
    (results / "notes.json").write_text(json.dumps({"note": "my notes"}))
    with pytest.warns(UserWarning) as caught:
        runs = H.load_results(tmp_path)
    assert set(runs) == {"good"}
    assert sorted(str(w.message).split(":")[0] for w in caught) == [
        f"skipped {results / n}" for n in ("a_list.json", "notes.json", "truncated.json")]
    with pytest.warns(UserWarning):
        assert "| good |" in H.results_table(tmp_path)


def test_a_bad_results_file_does_not_stop_training(tmp_path, fake_cifar):
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "notes.json").write_text("not json")
    data = H.make_data(fake_cifar, batch_size=50, device="cpu", num_workers=0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3072, 10))
    with pytest.warns(UserWarning, match="notes.json"):
        rec = H.fit(model, data, torch.optim.SGD(model.parameters(), lr=0.01), epochs=1, name="x", output_dir=tmp_path,
                    device="cpu", progress=False)
    assert rec["status"] == "complete"


def test_update_readme_replaces_only_the_marked_table(tmp_path):
    spec = importlib.util.spec_from_file_location("update_readme", ROOT / "scripts" / "update_readme.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    H.save_results(record("r", 1, 1, 50.0), tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results:start -->\nold\n<!-- results:end -->\noutro\n")
    script.update_readme(readme, tmp_path)
    text = readme.read_text()
    assert text.startswith("intro\n<!-- results:start -->\n| experiment |") and "| r |" in text
    assert text.endswith("<!-- results:end -->\noutro\n") and "old" not in text
    readme.write_text("no markers")
    with pytest.raises(ValueError, match="markers"):
        script.update_readme(readme, tmp_path)
