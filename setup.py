from setuptools import find_packages, setup

setup(
    name="cam-caffe",
    version="0.1.0",
    description="Class Activation Maps for Caffe models (GoogLeNet-CAM and any GAP->FC net)",
    python_requires=">=3.11",
    packages=find_packages(include=["cam_caffe", "cam_caffe.*"]),
    package_data={"cam_caffe.proto": ["caffe.proto", "caffe.desc", "LICENSE.caffe"]},
    install_requires=[
        "numpy>=2",
        "opencv-python-headless>=4.8,<5",   # OpenCV 5 removed readNetFromCaffe
        "matplotlib>=3.7",
        "pillow>=10",
        "protobuf>=4.22,<8",
        "isal>=1.6,<2",                     # fast deflate for PNG output
    ],
    extras_require={"test": ["pytest>=7", "hypothesis>=6"],
                    "onnx": ["onnx>=1.16", "onnxruntime>=1.18"]},
    entry_points={"console_scripts": ["cam-caffe=cam_caffe.cli:entry"]},
)
