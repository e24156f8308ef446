"""Distill the demo's student on a given soft-label folder; print its per-epoch train loss and a digest
of its weights, to compare two checkouts of kd-ray on the same input (a refactor must not change them).

    PYTHONPATH=/path/to/old/checkout python benchmarks/distill_digest.py runs/demo/soft_labels /tmp/old \\
        --validation data/vader/validation.csv
    PYTHONPATH=/path/to/new/checkout python benchmarks/distill_digest.py runs/demo/soft_labels /tmp/new \\
        --validation data/vader/validation.csv
"""

from __future__ import annotations

import argparse
import hashlib


def main() -> None:
    from safetensors.torch import load_file

    from kd_ray.config import DistillConfig, load_config
    from kd_ray.stages.train import read_run_info, run_distill

    parser = argparse.ArgumentParser()
    parser.add_argument("soft_labels")
    parser.add_argument("output")
    parser.add_argument("--validation", help="a validation CSV (normalised like the demo's)")
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    overrides = {"soft_labels": args.soft_labels, "output": args.output, "student.num_layers": 2,
                 "student.ffn_size": None, "train.epochs": args.epochs, "train.max_length": 64,
                 "train.threads_per_worker": 2, "train.num_cpus_per_worker": 1.5, "train.keep": "last",
                 "ray.num_cpus": 2}  # the demo's distill settings (jobs/configs/pipeline-demo.yaml)
    if args.validation:
        overrides.update({"validation.path": args.validation, "validation.normalize": True})
    run_distill(load_config(DistillConfig, overrides=overrides))
    weights = load_file(f"{args.output}/model.safetensors")
    digest = hashlib.sha256(b"".join(weights[k].numpy().tobytes() for k in sorted(weights))).hexdigest()[:16]
    print("train_loss per epoch:", [round(h["train_loss"], 6) for h in read_run_info(args.output)["history"]])
    print("weights sha256:", digest)


if __name__ == "__main__":
    main()
