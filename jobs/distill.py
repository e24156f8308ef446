"""Distill a student from a soft-label folder.

Submit to a Ray cluster (the job joins it through RAY_ADDRESS, which `ray job submit` sets):

    ray job submit --address http://127.0.0.1:8275 --working-dir . -- \
        python jobs/distill.py --config jobs/configs/distill-demo.yaml

Any config field can be overridden after it, e.g. `--output /mnt/kd-ray/runs/x`.
Run locally with the same line minus the `ray job submit ... --` part.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the job's working dir holds kd_ray/

from kd_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["distill", *sys.argv[1:]]))
