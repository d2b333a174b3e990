"""The original pycaffe CAM script's way, for bench_original.py: one image per process.

It imports caffe, loads the net, resizes the image to the net's input size
(224×224 for GoogLeNet-CAM), subtracts the mean, runs the net, builds the CAM
of the top class with a Python loop over the channels of CAM_conv (1024), and
saves a matplotlib overlay (alpha 0.5) as PNG.

    python benchmarks/original_script.py PROTOTXT CAFFEMODEL IMAGE OUT.png [B,G,R mean]
"""
import os
import sys

os.environ.setdefault("GLOG_minloglevel", "2")

import caffe
import cv2
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def main(prototxt: str, weights: str, image_path: str, out_path: str,
         mean: str = "104,117,123") -> None:
    caffe.set_mode_cpu()
    net = caffe.Net(prototxt, caffe.TEST, weights=weights)
    _, _, height, width = net.blobs["data"].data.shape

    image = cv2.imread(image_path)
    image = cv2.resize(image, (width, height))
    data = image.astype(np.float32) - np.array(mean.split(","), np.float32)
    net.blobs["data"].reshape(1, 3, height, width)
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
    cam = cv2.resize(cam, (width, height))

    plt.figure()
    plt.imshow(image[:, :, ::-1])
    plt.imshow(cam, alpha=0.5, cmap="jet")
    plt.axis("off")
    plt.savefig(out_path)
    plt.close()


if __name__ == "__main__":
    main(*sys.argv[1:6])
