"""Real data of the official GoogLeNet-CAM model (../shared golden_img1.npz)."""
import numpy as np

from cam_caffe.cam import class_activation_maps, softmax
from conftest import shared


def load_golden():
    data = np.load(shared("googlenet_cam", "golden_img1.npz"))
    return data["cam_conv"], data["cam_fc_weights"], data["prob"]


def test_probabilities_from_stored_activations_match_stored_prob():
    features, weights, prob = load_golden()
    # The project's path from features to probabilities: GAP, then the CAM weights.
    scores = features.mean(axis=(2, 3)) @ weights.T
    np.testing.assert_allclose(softmax(scores), prob, atol=1e-3)


def test_cam_equals_independent_numpy_reference():
    features, weights, prob = load_golden()
    classes = np.argsort(-prob, axis=1)[:, :5]
    cams = class_activation_maps(features, weights, classes)
    assert cams.shape == (10, 5, 14, 14) and cams.dtype == np.float32
    for n in range(10):
        for m, c in enumerate(classes[n]):
            reference = np.zeros((14, 14), np.float64)
            for k in range(features.shape[1]):          # the original script's loop
                reference += weights[c, k] * features[n, k].astype(np.float64)
            np.testing.assert_allclose(cams[n, m], reference, rtol=1e-4, atol=1e-4)


def test_cam_mean_identity():
    """The spatial mean of CAM_c is the class score without bias (GAP then FC)."""
    features, weights, _ = load_golden()
    cams = class_activation_maps(features, weights, np.tile(np.arange(1000), (10, 1)))
    np.testing.assert_allclose(cams.mean(axis=(2, 3)), features.mean(axis=(2, 3)) @ weights.T,
                               rtol=1e-4, atol=1e-5)


def test_top1_is_cup():
    _, _, prob = load_golden()
    assert int(np.argmax(prob.mean(axis=0))) == 968
    labels = shared("imagenet", "synset_words.txt").read_text().splitlines()
    assert labels[968].endswith("cup")
