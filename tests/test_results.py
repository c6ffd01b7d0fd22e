"""Experiments and results: the registry, run_experiment, the results table and README update."""

import json

import pytest

import helpers as H


def record(name, epochs_run, epochs, test_acc, complete=True):
    cfg = H.experiment_config(name, epochs=epochs)
    history = {"steps_per_epoch": 1, "epoch": list(range(1, epochs_run + 1)), "train_loss": [1.0] * epochs_run,
               "train_acc": [90.0] * epochs_run, "val_loss": [], "val_acc": [], "test_loss": [1.0] * epochs_run,
               "test_acc": [test_acc - 1] * (epochs_run - 1) + [test_acc], "epoch_time": [60.0] * epochs_run,
               "lr": [0.1] * epochs_run}
    return H.run_record(cfg, history, params=11_173_962, device="cpu", source="fixture", wall_time=600.0,
                        complete=complete)


def test_table_has_every_experiment_and_says_not_run(tmp_path):
    H.save_results(record(H.HEADLINE, 20, 20, 94.12), tmp_path)
    H.save_results(record("seed000_steplr_cutout", 40, 150, 85.5, complete=False), tmp_path)
    table = H.results_table(tmp_path)
    lines = table.splitlines()
    assert len(lines) == 2 + len(H.EXPERIMENTS)
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {ln.split("|")[1].strip(): [c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:]}
    assert set(rows) == set(H.EXPERIMENTS)
    headline = dict(zip(head, rows[H.HEADLINE]))
    assert headline["final test acc %"] == "94.12" and headline["epochs"] == "20/20"
    assert headline["params"] == "11,173,962" and headline["wall time"] == "10.0 min"
    assert dict(zip(head, rows["seed000_steplr_cutout"]))["epochs"] == "40/150 (incomplete)"
    r50 = dict(zip(head, rows["seed002_resnet50_onecycle"]))
    assert r50["final test acc %"] == "not run" and r50["params"] == "23,520,842"
    assert all(c for row in rows.values() for c in row)  # no blank cell anywhere


def test_unregistered_results_are_listed_too(tmp_path):
    rec = record(H.HEADLINE, 1, 1, 50.0)
    rec["experiment"] = rec["config"]["experiment"] = "my_own_run"
    H.save_results(rec, tmp_path)
    assert "| my_own_run |" in H.results_table(tmp_path)


def test_update_readme_replaces_only_the_marked_table(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results:start -->\nold\n<!-- results:end -->\noutro\n")
    H.update_readme(readme, tmp_path)
    text = readme.read_text()
    assert text.startswith("intro\n<!-- results:start -->\n| experiment |")
    assert text.endswith("<!-- results:end -->\noutro\n")
    assert "old" not in text
    readme.write_text("no markers")
    with pytest.raises(ValueError, match="markers"):
        H.update_readme(readme, tmp_path)


def test_experiment_config_checks_names_and_keys():
    cfg = H.experiment_config("seed001_resnet34_ln_step", epochs=9)
    assert cfg["model"] == "resnet34" and cfg["norm"] == "ln" and cfg["step_size"] == 3 and cfg["rotate"] == 5
    cutout = H.experiment_config("seed000_steplr_cutout")
    assert cutout["cutout"] and not cutout["crop"] and not cutout["flip"]
    with pytest.raises(ValueError, match="resnet18_onecycle"):
        H.experiment_config("nope")
    with pytest.raises(ValueError, match="unknown config keys"):
        H.experiment_config(H.HEADLINE, epoch=3)


def test_run_experiment_writes_results_and_skips_a_finished_run(fake_cifar, tmp_path, capsys):
    cfg = H.experiment_config(H.HEADLINE, epochs=1, subset=60, batch_size=16, num_workers=0, lr=0.05)
    rec, model = H.run_experiment(cfg, data_dir=fake_cifar, output_dir=tmp_path, device="cpu", progress=False)
    saved = json.loads((tmp_path / "results" / f"{H.HEADLINE}.json").read_text())
    assert saved["complete"] and saved["epochs_run"] == 1 and saved["params"] == 11_173_962
    assert saved["final_test_acc"] == rec["final_test_acc"] and saved["config"]["lr"] == 0.05
    assert {"device", "versions", "wall_time_s", "data", "history", "best_val_acc"} <= set(saved)
    assert (tmp_path / "checkpoints" / f"{H.HEADLINE}_best.pt").exists()
    capsys.readouterr()
    again, model2 = H.run_experiment(cfg, data_dir=fake_cifar, output_dir=tmp_path, device="cpu", progress=False)
    assert "already finished" in capsys.readouterr().out
    assert again["finished_at"] == saved["finished_at"]
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert (a.cpu() == b.cpu()).all()


def test_changed_settings_archive_the_old_run_and_train_again(fake_cifar, tmp_path, capsys):
    cfg = H.experiment_config(H.HEADLINE, epochs=1, subset=60, batch_size=16, num_workers=0, lr=0.05)
    H.run_experiment(cfg, data_dir=fake_cifar, output_dir=tmp_path, device="cpu", progress=False)
    changed = {**cfg, "epochs": 2}
    rec, _ = H.run_experiment(changed, data_dir=fake_cifar, output_dir=tmp_path, device="cpu", progress=False)
    assert "'epochs': (1, 2)" in capsys.readouterr().out
    assert rec["complete"] and rec["epochs_run"] == 2
    archived = list((tmp_path / "archive").iterdir())
    assert len(archived) == 1
    assert {p.name for p in archived[0].iterdir()} == {f"{H.HEADLINE}.json", f"{H.HEADLINE}_last.pt",
                                                        f"{H.HEADLINE}_best.pt"}
