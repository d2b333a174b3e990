"""The original pycaffe CAM script's way, for bench_original.py: one image per process.

It imports caffe, loads the net, resizes the image to 224×224, subtracts the
mean, runs the net, builds the CAM of the top class with a Python loop over
the 1024 channels, and saves a matplotlib overlay (alpha 0.5) as PNG.

    python benchmarks/original_script.py PROTOTXT CAFFEMODEL IMAGE OUT.png
"""
import os
import sys

os.environ.setdefault("GLOG_minloglevel", "2")

import caffe                               # noqa: E402
import cv2                                 # noqa: E402
import matplotlib                          # noqa: E402
import numpy as np                         # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt            # noqa: E402


def main(prototxt: str, weights: str, image_path: str, out_path: str) -> None:
    caffe.set_mode_cpu()
    net = caffe.Net(prototxt, caffe.TEST, weights=weights)

    image = cv2.imread(image_path)
    image = cv2.resize(image, (224, 224))
    data = image.astype(np.float32) - np.array([104.0, 117.0, 123.0], np.float32)
    net.blobs["data"].reshape(1, 3, 224, 224)
    net.blobs["data"].data[...] = data.transpose(2, 0, 1)
    net.forward()

    probs = net.blobs["prob"].data[0]
    top5 = np.argsort(probs)[::-1][:5]
    for c in top5:
        print(c, probs[c])

    weights_fc = net.params["CAM_fc"][0].data
    features = net.blobs["CAM_conv"].data[0]
    cam = np.zeros(features.shape[1:], np.float32)
    for k in range(features.shape[0]):
        cam += weights_fc[top5[0], k] * features[k]
    cam = cv2.resize(cam, (224, 224))

    plt.figure()
    plt.imshow(image[:, :, ::-1])
    plt.imshow(cam, alpha=0.5, cmap="jet")
    plt.axis("off")
    plt.savefig(out_path)
    plt.close()


if __name__ == "__main__":
    main(*sys.argv[1:5])
