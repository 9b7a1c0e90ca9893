"""``python -m pseudolabel``: the same program as the ``pseudolabel`` console script."""

import sys

from pseudolabel.pipelines.cli import main

sys.exit(main())
