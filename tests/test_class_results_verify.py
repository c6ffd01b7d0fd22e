"""scripts/class_results.py --verify on hand-in zips holding real ResNet weights (as course.handin writes them: a
plain state dict in half precision): honest weights are verified; a claim the weights do not give, one set of weights
under two students, weights of another model and files that are not weights are flagged, never a traceback; nothing
loads weights without --verify; --verify without CIFAR-10 stops before anything is read."""

import csv
import io
import json
import pickle
import sys
import uuid
import zipfile
import zlib

import pytest
import torch
from conftest import ROOT

import helpers as H
from course.runs import record_checksum

sys.path.insert(0, str(ROOT / "scripts"))
import class_results as cr  # noqa: E402

NB = "03_resnet18_onecycle"
PARAMS = cr.notebook_spec(NB)["parameters"]  # the notebook's defaults: nothing else is flagged


def half_bytes(state):
    """A state dict as course.handin puts it in the zip: floating tensors in half precision, torch.save'd."""
    buffer = io.BytesIO()
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, buffer)
    return buffer.getvalue()


def accuracy(model, x, y):
    """The accuracy a student's run records for its weights (before they are rounded to half precision)."""
    return H.accuracy(H.predict(model, H.make_loader(x, y, H.make_transforms(train=False), batch_size=500),
                                device="cpu"))


@pytest.fixture(scope="module")
def nets(fake_cifar):
    """Two ResNet18s (seeds 0 and 1): their zipped weights and their accuracy on the whole test split (50 images)
    and on SUBSET 50's test split (10 images)."""
    out = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = H.make_model("resnet18")
        full = accuracy(model, *H.load_test_split(fake_cifar))
        subset = accuracy(model, *H.load_test_split(fake_cifar, subset=50, seed=0))
        out.append({"blob": half_bytes(model.state_dict()), "acc": full, "subset_acc": subset,
                    "state": model.state_dict()})
    return out


def record(name, claim, *, validation=True, model=None, test_images=50, train=45_000, val=5_000):
    """A results record as course.runs writes it, claiming `claim` for its best weights (with a validation split:
    test_acc_at_best_val at the best epoch, the last; without: final_test_acc)."""
    epochs = PARAMS["EPOCHS"]
    history = H.empty_history()
    for e in range(1, epochs + 1):
        history["epoch"].append(e)
        for key in ("train_loss", "val_loss", "test_loss"):
            history[key].append(2.3 / e)
        history["train_acc"].append(min(100, claim + 5))
        if validation:
            history["val_acc"].append(50 + e)
        history["test_acc"].append(claim if e == epochs else max(0, claim - 10))
        history["epoch_time"].append(30.0 + zlib.crc32(name.encode()) % 1000 / 100)  # two runs: two histories
    config = {"quick": False, "model": model or {"name": "resnet18", "norm": "bn", "num_classes": 10,
                                                  "last_stride": 2},
              "epochs": epochs, "monitor": "val_acc",
              "data": {"train_images": train, "val_images": val if validation else 0, "test_images": test_images,
                       "batch_size": PARAMS["BATCH_SIZE"], "seed": 0, "augment": []},
              "optimizer": {"name": "SGD", "groups": [{"lr": 0.004, "initial_lr": 0.004, "max_lr": 0.1}]},
              "scheduler": {"name": "OneCycleLR"}}
    summary = H.summarize(history)
    rec = {"experiment": name, "run_id": uuid.uuid4().hex[:12], "status": "complete", "quick": False,
           "config": config, "params": 11173962, **summary, "wall_time_s": summary["wall_time_s"] + 10,
           "device": "NVIDIA Tesla T4", "versions": {}, "finished_at": "2026-11-29 13:49:03"}
    rec["checksum"] = record_checksum(rec)
    return rec


def handin(folder, student, runs, params=None, listed=None, raw=None):
    """folder/<student>/03_resnet18_onecycle.zip holding each run's record and, where given, its weights; listed:
    the manifest's list of weights, if not those; raw: other members."""
    path = folder / student.lower() / f"{NB}.zip"
    path.parent.mkdir(parents=True, exist_ok=True)
    names = [rec["experiment"] for rec, _ in runs]
    manifest = {"notebook": NB, "student": student, "quick": False, "parameters": {**PARAMS, **(params or {})},
                "answers": {}, "unanswered": [], "self_checks": {}, "runs": names, "missing_runs": [],
                "weights": listed if listed is not None else [rec["experiment"] for rec, blob in runs if blob]}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("manifest.json", json.dumps(manifest))
        for rec, blob in runs:
            z.writestr(f"results/{rec['experiment']}.json", json.dumps(rec))
            if blob is not None:
                z.writestr(f"weights/{rec['experiment']}.pt", blob, zipfile.ZIP_STORED)
        for name, data in (raw or {}).items():
            z.writestr(name, data)
    return path


def verify(folder, data, assignment=None):
    rows = cr.collect(folder, assignment, verifier=cr.make_verifier(data, "cpu"))[0]
    return {(r["student"], r["run"]): r for r in rows}


def test_honest_weights_are_verified_and_a_claim_they_do_not_give_is_flagged(tmp_path, fake_cifar, nets, capsys):
    a, b = nets
    handin(tmp_path / "hand", "Ada", [(record("resnet18_onecycle", a["acc"]), a["blob"])])
    inflated = min(100.0, b["acc"] + 20) if b["acc"] <= 80 else b["acc"] - 20
    handin(tmp_path / "hand", "Bea", [(record("no_val", inflated, validation=False), b["blob"])])
    assert cr.main([str(tmp_path / "hand"), "--verify", "--data", str(fake_cifar), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "--verify on CPU" in printed and "2 runs in 2 hand-ins" in printed and "s a hand-in" in printed
    with open(tmp_path / "hand" / "class_results.csv", newline="") as f:
        rows = {r["student"]: r for r in csv.DictReader(f)}
    ada, bea = rows["Ada"], rows["Bea"]
    assert ada["flags"] == "-", ada["flags"]
    assert abs(float(ada["verified test acc %"]) - a["acc"]) <= cr.tolerance(50)  # fp16 rounding: within it
    assert float(bea["verified test acc %"]) == pytest.approx(b["acc"], abs=cr.tolerance(50))
    assert f"verified accuracy {bea['verified test acc %']}% differs from the claimed {inflated:.2f}% (final test " \
           f"acc, 50 test images)" in bea["flags"], bea["flags"]


def test_one_set_of_weights_under_two_students_is_flagged_on_both(tmp_path, fake_cifar, nets):
    a = nets[0]
    handin(tmp_path, "Ada", [(record("resnet18_onecycle", a["acc"]), a["blob"])])
    as_zipped = torch.load(io.BytesIO(a["blob"]), weights_only=True)
    buffer = io.BytesIO()
    torch.save({k: v.float() if v.is_floating_point() else v for k, v in as_zipped.items()}, buffer)  # re-saved
    handin(tmp_path, "Ben", [(record("mine", a["acc"]), buffer.getvalue())])  # his own record, her weights
    handin(tmp_path, "Cid", [(record("resnet18_onecycle", nets[1]["acc"]), nets[1]["blob"])])
    rows = verify(tmp_path, fake_cifar)
    assert "same weights as Ben (ben/03_resnet18_onecycle.zip)" in rows["Ada", "resnet18_onecycle"]["flags"]
    assert "same weights as Ada (ada/03_resnet18_onecycle.zip)" in rows["Ben", "mine"]["flags"]
    assert "same run" not in rows["Ben", "mine"]["flags"]  # the records differ: only the weights tell
    assert rows["Cid", "resnet18_onecycle"]["flags"] == "-"
    assert all(r["verified test acc %"] not in ("-", "no weights") for r in rows.values())


def test_weights_that_do_not_fit_or_are_not_weights_are_refused_without_a_traceback(tmp_path, fake_cifar, nets,
                                                                                    monkeypatch):
    torch.manual_seed(0)
    resnet34 = half_bytes(H.make_model("resnet34").state_dict())
    evil = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(evil), "w"))

    buffer = io.BytesIO()
    torch.save({"conv1.weight": [1, 2, 3]}, buffer)
    cases = {"Ada": (record("r34", 90.0), resnet34),  # a resnet34 state dict under a resnet18 record
             "Bea": (record("ints", 90.0), buffer.getvalue()),  # no pickled code, but not tensors
             "Cal": (record("code", 90.0), pickle.dumps({"w": Payload()})),  # a pickle that would run code
             "Dan": (record("junk", 90.0), b"not a torch file"),
             "Eve": (record("arch", 90.0, model={"name": "resnet18", "norm": "bn", "num_classes": 10,
                                                 "last_stride": 2, "hook": "os.system"}), nets[0]["blob"]),
             "Fay": (record("vgg", 90.0, model={"name": "vgg16", "norm": "bn"}), nets[0]["blob"]),
             "Gil": (record("big", 90.0), nets[1]["blob"])}
    for student, run in cases.items():
        handin(tmp_path, student, [run])
    handin(tmp_path, "Hal", [(record("lost", 90.0), None)], listed=["lost"], raw={"weights/spare.pt": b"x"})
    monkeypatch.setitem(cr.LIMITS, "weights", 30 << 20)  # a resnet18 in fp16 (22 MB) fits, a resnet34 (42 MB) not
    rows = verify(tmp_path, fake_cifar)
    flags = {student: rows[student, run[0]["experiment"]]["flags"] for student, run in cases.items()}
    assert "weights refused: weights/r34.pt is too large" in flags["Ada"]
    assert "weights refused: weights/ints.pt is not a state dict of tensors (conv1.weight holds a list)" \
        in flags["Bea"]
    assert "weights refused: weights/code.pt cannot be loaded as weights" in flags["Cal"] and not evil.exists()
    assert "weights refused: weights/junk.pt cannot be loaded as weights" in flags["Dan"]
    assert "weights not verified: the record's model" in flags["Eve"] and "unexpected keys (hook)" in flags["Eve"]
    assert "weights not verified: the record's model has name vgg16" in flags["Fay"]
    assert "differs from the claimed 90.00%" in flags["Gil"]
    hal = rows["Hal", "lost"]
    assert "weights missing (the manifest lists them)" in hal["flags"], hal["flags"]
    assert "weights without a results file, not verified: weights/spare.pt" in hal["flags"]
    monkeypatch.setitem(cr.LIMITS, "weights", 200 << 20)  # now the resnet34 is read, and does not fit
    flags = verify(tmp_path, fake_cifar)["Ada", "r34"]["flags"]
    assert "weights refused: weights/r34.pt does not fit the record's model (resnet18 bn):" in flags
    assert "unexpected (layer1.2." in flags, flags
    assert all("Traceback" not in r["flags"] for r in rows.values())


def test_a_subset_run_is_verified_on_its_own_test_images(tmp_path, fake_cifar, nets):
    a = nets[0]
    subset = {"SUBSET": 50}  # 45 + 5 training images, 10 test images (one per class, chosen with SEED)
    handin(tmp_path, "Ada", [(record("resnet18_onecycle", a["subset_acc"], test_images=10, train=45, val=5),
                              a["blob"])], params=subset)
    handin(tmp_path, "Bob", [(record("no_weights", a["subset_acc"], test_images=10, train=45, val=5),
                              None)], params=subset)  # a run without weights: shown, not verified
    handin(tmp_path, "Cy", [(record("odd", 50.0, test_images=20, train=45, val=5), nets[1]["blob"])],
           params=subset)  # its weights are fine; its test set is not SUBSET's
    b = nets[1]
    raised = b["subset_acc"] + 40 if b["subset_acc"] <= 60 else b["subset_acc"] - 40
    handin(tmp_path, "Dee", [(record("raised", raised, test_images=10, train=45, val=5), b["blob"])], params=subset)
    rows = verify(tmp_path, fake_cifar, {"03": subset})
    ada = rows["Ada", "resnet18_onecycle"]
    assert ada["flags"] == "-" and abs(float(ada["verified test acc %"]) - a["subset_acc"]) <= cr.tolerance(10)
    assert rows["Bob", "no_weights"]["verified test acc %"] == "no weights"
    assert "weights not verified: the run was tested on 20 images, not the 10 its SUBSET 50 gives" \
        in rows["Cy", "odd"]["flags"]
    assert f"differs from the claimed {raised:.2f}% (test acc at best val, 10 test images)" \
        in rows["Dee", "raised"]["flags"]


def test_without_verify_nothing_loads_weights(tmp_path, nets, monkeypatch):
    handin(tmp_path, "Ada", [(record("resnet18_onecycle", 12.5), nets[0]["blob"])])

    def refuse(*args, **kwargs):
        raise AssertionError("weights were read without --verify")

    monkeypatch.setattr(cr, "read_weights", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    (row,) = cr.collect(tmp_path)[0]
    assert row["flags"] == "-" and row["verified test acc %"] == "-"


def test_verify_without_cifar10_stops_before_anything_is_read(tmp_path, nets, capsys):
    handin(tmp_path / "hand", "Ada", [(record("resnet18_onecycle", 12.5), nets[0]["blob"])])
    assert cr.main([str(tmp_path / "hand"), "--verify", "--data", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "nowhere" / "cifar-10-batches-py" / "test_batch") in err and "--data" in err
    assert "Nothing was read" in err and not (tmp_path / "hand" / "class_results.md").exists()
