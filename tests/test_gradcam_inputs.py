"""Grad-CAM's inputs, as a student could get them wrong: targets that are not class indices, a layer that is not a
layer. (Moved from the old test_safety.py; kept apart from test_gradcam.py, which another branch is editing: merge
them when both have landed.)"""

import numpy as np
import pytest
import torch

import helpers as H


@pytest.fixture(scope="module")
def resnet18():
    return H.make_model("resnet18").eval()


@pytest.mark.parametrize("targets", [[2.7, 1.2, 0.9], [True, False, True], ["cat", "dog", "cat"],
                                     [float("nan"), 1, 2], torch.tensor([2.7, 1.2, 0.9]), [1, 2], [0, 1, 10]])
def test_grad_cam_takes_only_class_indices(resnet18, targets):
    with H.GradCAM(resnet18, "layer3") as cam, pytest.raises(ValueError, match="3 class indices \\(whole numbers "
                                                                            "from 0 to 9, one per image\\)"):
        cam(torch.randn(3, 3, 32, 32), targets)
    with H.GradCAM(resnet18, "layer3") as cam:
        assert cam(torch.randn(3, 3, 32, 32), np.array([1, 2, 3])).shape == (3, 32, 32)


@pytest.mark.parametrize("layer", [3, None, 2.5])
def test_grad_cam_layer_must_be_a_layer_or_its_name(resnet18, layer):
    with pytest.raises(ValueError, match="target_layer must be a layer of the model or its name.*layer3"):
        H.GradCAM(resnet18, layer)
