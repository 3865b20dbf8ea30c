"""The PPO stage as a Ray job: the same arguments as `pagellm ppo`.

ray job submit --working-dir . -- python ray_jobs/ppo.py --data DATA_DIR --sft SFT_DIR --reward REWARD_DIR --out PPO_DIR
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir holds pagellm/

from pagellm.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["ppo", *sys.argv[1:]]))
