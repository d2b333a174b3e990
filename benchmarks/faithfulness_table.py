"""The README's faithfulness table: each map method × (top-1 localization error,
Average Drop, Increase in Confidence, Deletion AUC, Insertion AUC) on the demo
model's held-out set (``scripts/make_demo_data.py --seed 2 --count 500``).

Each method's row is one ``cam-caffe evaluate --faithfulness --boxes-file …
--method NAME --json`` run. A last row, a uniform random map per image (of the same top-1
class), is the floor a method must beat; it has no boxes of its own.

    python benchmarks/faithfulness_table.py [--count 500] [--steps 50] [--substrate mean]
"""
from __future__ import annotations

import argparse
import importlib.util
import json

import numpy as np
from common import CLI, ROOT, WORK, run_timed, table, title

from cam_caffe.methods import METHODS

DEMO = ROOT / "models" / "demo"


def demo_data():
    spec = importlib.util.spec_from_file_location("make_demo_data",
                                                  ROOT / "scripts" / "make_demo_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def random_row(count: int, steps: int, substrate: str) -> dict:
    """The metrics of a uniform random map of each image's top-1 class."""
    from cam_caffe import CAMNet
    from cam_caffe.metrics import faithfulness, summary
    net = CAMNet(DEMO / "deploy.prototxt", DEMO / "demo.caffemodel")
    rng = np.random.default_rng(0)
    results = []
    for sample in demo_data().generate(count, seed=2):
        class_id = net.predict([sample.image])[0].classes[0]
        results.append(faithfulness(net, sample.image, class_id, rng.random(net.input_size),
                                    steps, substrate))
    return summary(results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=500, help="held-out images (default 500)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--substrate", choices=("mean", "blur"), default="mean")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma list (default all: {','.join(METHODS)})")
    args = parser.parse_args()
    folder = WORK / f"demo-heldout-{args.count}"
    boxes = demo_data().write_split(folder, args.count, seed=2)
    headers = ["method", "top-1 loc. error", "Average Drop ↓", "Increase in Conf. ↑",
               "Deletion AUC ↓", "Insertion AUC ↑"]
    title(f"Faithfulness on the demo model's held-out set ({args.count} images, seed 2; "
          f"substrate {args.substrate}, {args.steps} steps)")
    print(table(headers, []), flush=True)       # then each row as soon as it is measured

    def row(name: str, loc: str, f: dict) -> None:
        print(table(headers, [[name, loc, f"{f['average_drop']:.1f}%",
                               f"{f['increase_in_confidence']:.1f}%", f"{f['deletion_auc']:.3f}",
                               f"{f['insertion_auc']:.3f}"]]).splitlines()[-1], flush=True)

    for name in args.methods.split(","):
        _, done = run_timed([CLI, "evaluate", str(folder), "--boxes-file", str(boxes),
                             "--model", "demo", "--faithfulness", "--steps", str(args.steps),
                             "--substrate", args.substrate, "--json", "--method", name])
        result = json.loads(done.stdout)
        row(name, f"{100 * result['top1_loc_error']:.1f}%", result["faithfulness"])
    row("random map", "—", random_row(args.count, args.steps, args.substrate))

if __name__ == "__main__":
    main()
