"""The Ray Tune sweep over beta and lambda as a Ray job: the same arguments as `pagellm tune`.

    ray job submit --working-dir . -- python ray_jobs/tune.py --config pagellm/configs/embedded.yaml \
        --config configs/amazon2014.yaml --config tuning/amazon_2x2.yaml --out SWEEP_DIR
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir holds pagellm/

from pagellm.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
