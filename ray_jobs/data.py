"""Data stage as a Ray job: the same arguments as ``pagellm data``.

    ray job submit --working-dir . -- python ray_jobs/data.py \
        --dataset amazon2014:/data/amazon2014-musical-instruments --out /shared/runs/amz/data
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir holds pagellm/

from pagellm.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["data", *sys.argv[1:]]))
