"""``python -m pseudolabel``: the same program as the ``pseudolabel`` console script."""

import sys

from pseudolabel.pipelines.cli import main

if __name__ == "__main__":
    sys.exit(main())
