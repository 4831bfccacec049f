"""Build the builtin data sets (docs/data.md) into the data dir, so later runs need no network.

python tools/prepare_data.py [--data-dir D] [--force] [TASK ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a checkout, uninstalled

from metatt_deploy import BUILTIN_TASKS, MetaTTError, prepare_builtins  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tasks", nargs="*", metavar="TASK", help=f"default: all of {', '.join(BUILTIN_TASKS)}")
    parser.add_argument("--data-dir", help="default: $METATT_DATA_DIR, else $XDG_CACHE_HOME/metatt-deploy/data")
    parser.add_argument("--force", action="store_true", help="rebuild tasks that are already cached")
    args = parser.parse_args(argv)
    try:
        prepare_builtins(args.tasks, args.data_dir, force=args.force)
    except MetaTTError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
