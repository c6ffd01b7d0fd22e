"""Evaluation: one eval-mode pass in loader order, and everything computed from it."""

import numpy as np
import torch

import helpers as H


def test_predict_is_one_pass_in_eval_mode_and_in_order(fake_cifar):
    data = H.make_data(fake_cifar, batch_size=16, device="cpu", num_workers=0)
    torch.manual_seed(0)
    model = H.make_model("resnet18")
    model.train()
    calls = []
    handle = model.register_forward_pre_hook(lambda m, i: calls.append(len(i[0])))
    stats = model.norm1.running_mean.clone()
    pred = H.predict(model, data.test)
    handle.remove()
    assert calls == [16, 16, 16, 2]  # one pass over 50 test images
    assert torch.equal(stats, model.norm1.running_mean)  # eval mode: BN statistics untouched
    assert model.training  # mode restored
    assert np.array_equal(pred["labels"], data.test_labels)
    assert pred["probs"].shape == (50, 10) and np.allclose(pred["probs"].sum(1), 1, atol=1e-5)
    model.eval()
    x = torch.stack([data.test.dataset[i][0] for i in range(5)])
    with torch.no_grad():
        assert np.allclose(pred["probs"][:5], model(x).softmax(1).numpy(), atol=1e-5)
    tta = H.predict(model, data.test, tta=True)
    assert tta["probs"].shape == (50, 10) and not np.allclose(tta["probs"], pred["probs"])


def fake_pred():
    labels = np.array([0, 1, 2, 2, 1, 0, 2])
    preds = np.array([0, 2, 2, 1, 2, 1, 2])
    conf = np.array([0.9, 0.6, 0.8, 0.95, 0.7, 0.55, 0.5])
    probs = np.full((7, 3), 0.0)
    probs[np.arange(7), preds] = conf
    return {"labels": labels, "preds": preds, "probs": probs}


def test_misclassified_most_confident_first():
    assert H.misclassified(fake_pred()).tolist() == [3, 4, 1, 5]
    assert H.accuracy(fake_pred()) == 100 * 3 / 7


def test_confusion_matrix_and_per_class_metrics():
    p = fake_pred()
    cm = H.confusion_matrix(p["labels"], p["preds"], num_classes=3)
    manual = np.zeros((3, 3), int)
    for a, b in zip(p["labels"], p["preds"]):
        manual[a, b] += 1
    assert np.array_equal(cm, manual) and cm.sum() == 7
    m = H.per_class_metrics(cm)
    assert np.allclose(m["recall"], [50, 0, 200 / 3])  # per-class accuracy
    assert np.allclose(m["precision"], [100, 0, 50])
    assert m["support"].tolist() == [2, 2, 3]
    assert H.per_class_metrics(np.zeros((2, 2)))["precision"].tolist() == [0, 0]  # no NaN
    assert H.most_confused(cm, k=2, classes=("a", "b", "c")) == [("b", "c", 2), ("a", "b", 1)]


def test_plots_return_figures_that_save_as_png():
    import io

    import matplotlib.pyplot as plt
    p = fake_pred()
    cm = H.confusion_matrix(p["labels"], p["preds"], num_classes=3)
    figs = [H.plot_confusion(cm, classes=("a", "b", "c")), H.plot_confusion(cm, ("a", "b", "c"), normalize=True),
            H.plot_per_class(H.per_class_metrics(cm), classes=("a", "b", "c")),
            H.plot_images([np.zeros((3, 32, 32, 3), np.uint8)], titles=[["x", "y", "z"]]),
            H.plot_cams(torch.zeros(7, 3, 32, 32), [torch.rand(7, 32, 32)], ["cam"], [str(i) for i in range(7)]),
            H.plot_cams(torch.zeros(1, 3, 32, 32), [torch.rand(1, 32, 32)] * 2, ["a", "b"])]
    for i, fig in enumerate(figs):
        assert isinstance(fig, plt.Figure)
        png = io.BytesIO()
        fig.savefig(png, format="png", dpi=120, bbox_inches="tight")  # what ws.savefig writes (test_course_workspace)
        assert png.getvalue().startswith(b"\x89PNG") and len(png.getvalue()) > 1000, i
        plt.close(fig)
