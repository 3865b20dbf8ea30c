"""The whole chain as one Ray job: data -> SFT -> reward heads -> PPO -> evaluation -> report,
the same arguments as `pagellm run` (--config FILE, repeatable, and dotted overrides).

    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \
        python ray_jobs/run.py --config pagellm/configs/embedded.yaml --config configs/amazon2014.yaml --out /mnt/shared/runs/amz
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir holds pagellm/

from pagellm.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
